//! Stable codes for every packet the programs did not forward themselves, and for the way
//! forwarded packets left. The numbers are part of the counters' contract: never reuse one.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// IPv4/IPv6 TCP/UDP packet that matches no forward and no tracked flow: passed.
    NoRule = 1,
    /// Not an IP frame (ARP, LLDP, ...): passed.
    NotIp = 2,
    /// Truncated or inconsistent headers: passed untouched.
    Malformed = 3,
    /// IPv4 header with options: passed untouched to the stack.
    IpOptions = 4,
    /// A fragment of no forward's datagram (a first fragment that matches no forward and
    /// no tracked flow, or a fragment of a protocol other than TCP/UDP): passed untouched
    /// to the stack, which reassembles it.
    Fragment = 5,
    /// IP but neither TCP nor UDP: passed.
    NotTcpUdp = 6,
    // 7 was "ipv6" before IPv6 forwards existed: retired, never reused.
    /// XDP handed a matching packet to the TC program (checksum offload pending on the
    /// frame, or the egress device cannot take XDP frames, or the FIB had no direct answer).
    XdpToTc = 8,
    /// Rewritten, but the FIB gave no usable next hop: the kernel stack forwards it.
    FibToStack = 9,
    /// Rewritten, next hop without a resolved neighbour: sent with bpf_redirect_neigh.
    FibNoNeigh = 10,
    /// Rewritten, TTL would expire: the stack forwards or answers it.
    TtlToStack = 11,
    /// New flow could not be recorded in the connection table: dropped.
    ConntrackFull = 12,
    /// No free SNAT source port for the flow: dropped.
    PortsExhausted = 13,
    /// Rewritten and sent by XDP_REDIRECT.
    RedirectXdp = 14,
    /// Rewritten and sent by bpf_redirect from TC.
    RedirectTc = 15,
    /// Rewritten with a FIB answer of "too big for the MTU": the stack handles it.
    FibFragNeeded = 16,
    /// VLAN-tagged frame (802.1Q/802.1ad): passed to the stack untouched.
    Vlan = 17,
    /// A helper that rewrites the packet failed: dropped (should never happen).
    RewriteFailed = 18,
    /// Sent straight to a same-switch peer (bpf_redirect_neigh).
    PeerDirect = 19,
    /// For a peer that does not answer ARP/ND: left to normal routing.
    PeerFallback = 20,
    /// IPv6 with extension headers: passed to the stack untouched.
    Ipv6Extension = 21,
    /// ICMP/ICMPv6 error that quotes no forwarded connection: passed to the stack.
    IcmpError = 22,
    /// ICMP/ICMPv6 error about a forwarded connection, translated (outer and quoted
    /// headers) and sent on towards the other side.
    IcmpTranslated = 23,
    /// Rewritten and sent by XDP_REDIRECT from the connection's cached next hop: the
    /// established-flow fast path, without a FIB lookup (a subset of no other code).
    RedirectXdpCached = 24,
    /// As `RedirectXdpCached`, from this CPU's flow cache (a copy of the connection's
    /// entry found by indexing, without the connection table's hash lookup).
    RedirectXdpFlowCache = 25,
    /// A TCP segment for a forward's listen address that is not a SYN and belongs to no
    /// tracked connection (only a SYN opens one; a SYN-ACK answering the host's own
    /// connection from that port, say): passed to the stack untouched.
    TcpNotSyn = 26,
    /// A TCP segment the connection's state does not allow (netfilter's INVALID: an ACK
    /// before the SYN-ACK, a FIN before the handshake, ...): dropped.
    CtInvalid = 27,
    /// An RST whose sequence lies outside its connection's window (a blind reset): dropped,
    /// the connection's state unchanged.
    RstOutOfWindow = 28,
    /// Not a packet: an unassured connection (handshake never completed, UDP never
    /// answered) was dropped to make room for a new one (netfilter's early_drop).
    EarlyDrop = 29,
    /// A datagram for a forward's listen port that belongs to a connected socket of this
    /// host (its own conversation from that port): passed to the stack untouched.
    HostSocket = 30,
    /// Not a packet on the wire: a local program's datagram refused at sendmsg (EPERM). Its
    /// unconnected socket was in a live exchange with the same backend through another
    /// listen address, and the answers of the two could not be told apart.
    LocalUdpAmbiguous = 31,
    /// Rewritten for a backend on this host (TC ingress: destination only, no SNAT) and
    /// handed to the local stack, which delivers it to the backend's socket.
    ToHostBackend = 32,
    /// A reply of a backend on this host, rewritten at TC egress as it leaves (source back
    /// to the listen address and port the client dialled).
    FromHostBackend = 33,
    /// A forward's packet whose TTL / hop limit would expire here: dropped and answered
    /// with ICMP time exceeded (ICMPv6 time exceeded) from the address it was sent to, as a
    /// router answers. Dropped without an answer when the ICMP rate limit holds it back or
    /// the sender's address is not one to answer (multicast, unspecified, ...).
    IcmpTimeExceeded = 37,
    /// A forward's packet larger than its egress MTU that may not be fragmented here (IPv4
    /// with DF, every IPv6 packet; for GSO packets, segments larger than the MTU): dropped
    /// and answered with fragmentation needed / packet too big carrying the next hop's MTU.
    IcmpTooBig = 38,
    /// A forward's packet whose route is `unreachable` or `prohibit`: dropped and answered
    /// with destination unreachable (host unreachable / administratively prohibited; for
    /// IPv6 no route / administratively prohibited); `blackhole`: dropped silently, as the
    /// stack would. Rate-limited like time exceeded.
    IcmpUnreachable = 39,
    /// Not an outcome: a fragment of a forwarded datagram was translated (the first with
    /// its L4 header, a later one by the ports its first fragment recorded in
    /// `FWD_FRAG_V1`). The packet is counted again under how it left.
    FragmentTranslated = 34,
    /// A later fragment (offset > 0) of a TCP/UDP datagram whose first fragment forwarder
    /// has not translated: it has not come yet (out of order), it came more than a second
    /// earlier, or the datagram is not a forward's (the host's own). Passed untouched: the
    /// stack holds it for reassembly against its local destination and drops it on timeout.
    FragmentUnknown = 35,
    /// A first fragment whose ports could not be recorded in `FWD_FRAG_V1`: dropped (its
    /// later fragments could not be translated).
    FragmentMapFull = 36,
    /// A new connection for a forward none of whose backends takes new connections (all
    /// down by their health checks, or drained): refused at once (ICMP port unreachable,
    /// or EPERM for a local program), not silently dropped.
    NoBackend = 40,
    /// A new connection from a source the forward's allow/deny lists refuse: dropped.
    SourceDenied = 41,
    /// Rewritten and sent by TC (`bpf_redirect`) from the connection's cached next hop: the
    /// TC established-flow fast path, without the full parse and the FIB lookup.
    RedirectTcCached = 42,
    /// As `RedirectTcCached`, from this CPU's TC flow cache (without the connection
    /// table's hash lookup).
    RedirectTcFlowCache = 43,
}

/// Every reason, for iteration by userspace (table order).
pub const ALL_REASONS: [Reason; 42] = [
    Reason::NoRule,
    Reason::NotIp,
    Reason::Malformed,
    Reason::IpOptions,
    Reason::Fragment,
    Reason::NotTcpUdp,
    Reason::XdpToTc,
    Reason::FibToStack,
    Reason::FibNoNeigh,
    Reason::TtlToStack,
    Reason::ConntrackFull,
    Reason::PortsExhausted,
    Reason::RedirectXdp,
    Reason::RedirectTc,
    Reason::FibFragNeeded,
    Reason::RewriteFailed,
    Reason::Vlan,
    Reason::PeerDirect,
    Reason::PeerFallback,
    Reason::Ipv6Extension,
    Reason::IcmpError,
    Reason::IcmpTranslated,
    Reason::RedirectXdpCached,
    Reason::RedirectXdpFlowCache,
    Reason::TcpNotSyn,
    Reason::CtInvalid,
    Reason::RstOutOfWindow,
    Reason::EarlyDrop,
    Reason::HostSocket,
    Reason::LocalUdpAmbiguous,
    Reason::ToHostBackend,
    Reason::FromHostBackend,
    Reason::IcmpTimeExceeded,
    Reason::IcmpTooBig,
    Reason::IcmpUnreachable,
    Reason::FragmentTranslated,
    Reason::FragmentUnknown,
    Reason::FragmentMapFull,
    Reason::NoBackend,
    Reason::SourceDenied,
    Reason::RedirectTcCached,
    Reason::RedirectTcFlowCache,
];

impl Reason {
    /// The reason with this stable code.
    pub const fn from_code(code: u32) -> Option<Reason> {
        match code {
            1 => Some(Reason::NoRule),
            2 => Some(Reason::NotIp),
            3 => Some(Reason::Malformed),
            4 => Some(Reason::IpOptions),
            5 => Some(Reason::Fragment),
            6 => Some(Reason::NotTcpUdp),
            8 => Some(Reason::XdpToTc),
            9 => Some(Reason::FibToStack),
            10 => Some(Reason::FibNoNeigh),
            11 => Some(Reason::TtlToStack),
            12 => Some(Reason::ConntrackFull),
            13 => Some(Reason::PortsExhausted),
            14 => Some(Reason::RedirectXdp),
            15 => Some(Reason::RedirectTc),
            16 => Some(Reason::FibFragNeeded),
            17 => Some(Reason::Vlan),
            18 => Some(Reason::RewriteFailed),
            19 => Some(Reason::PeerDirect),
            20 => Some(Reason::PeerFallback),
            21 => Some(Reason::Ipv6Extension),
            22 => Some(Reason::IcmpError),
            23 => Some(Reason::IcmpTranslated),
            24 => Some(Reason::RedirectXdpCached),
            25 => Some(Reason::RedirectXdpFlowCache),
            26 => Some(Reason::TcpNotSyn),
            27 => Some(Reason::CtInvalid),
            28 => Some(Reason::RstOutOfWindow),
            29 => Some(Reason::EarlyDrop),
            30 => Some(Reason::HostSocket),
            31 => Some(Reason::LocalUdpAmbiguous),
            32 => Some(Reason::ToHostBackend),
            33 => Some(Reason::FromHostBackend),
            37 => Some(Reason::IcmpTimeExceeded),
            38 => Some(Reason::IcmpTooBig),
            39 => Some(Reason::IcmpUnreachable),
            34 => Some(Reason::FragmentTranslated),
            35 => Some(Reason::FragmentUnknown),
            36 => Some(Reason::FragmentMapFull),
            40 => Some(Reason::NoBackend),
            41 => Some(Reason::SourceDenied),
            42 => Some(Reason::RedirectTcCached),
            43 => Some(Reason::RedirectTcFlowCache),
            _ => None,
        }
    }

    /// Stable name used in `forwarder stats` output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NoRule => "no_rule",
            Reason::NotIp => "not_ip",
            Reason::Malformed => "malformed",
            Reason::IpOptions => "ip_options",
            Reason::Fragment => "fragment",
            Reason::NotTcpUdp => "not_tcp_udp",
            Reason::XdpToTc => "xdp_to_tc",
            Reason::FibToStack => "fib_to_stack",
            Reason::FibNoNeigh => "fib_no_neigh",
            Reason::TtlToStack => "ttl_to_stack",
            Reason::ConntrackFull => "conntrack_full",
            Reason::PortsExhausted => "ports_exhausted",
            Reason::RedirectXdp => "redirect_xdp",
            Reason::RedirectTc => "redirect_tc",
            Reason::FibFragNeeded => "fib_frag_needed",
            Reason::RewriteFailed => "rewrite_failed",
            Reason::Vlan => "vlan",
            Reason::PeerDirect => "peer_direct",
            Reason::PeerFallback => "peer_fallback",
            Reason::Ipv6Extension => "ipv6_extension",
            Reason::IcmpError => "icmp_error",
            Reason::IcmpTranslated => "icmp_translated",
            Reason::RedirectXdpCached => "redirect_xdp_cached",
            Reason::RedirectXdpFlowCache => "redirect_xdp_flow_cache",
            Reason::TcpNotSyn => "tcp_not_syn",
            Reason::CtInvalid => "ct_invalid",
            Reason::RstOutOfWindow => "rst_out_of_window",
            Reason::EarlyDrop => "early_drop",
            Reason::HostSocket => "host_socket",
            Reason::LocalUdpAmbiguous => "local_udp_ambiguous",
            Reason::ToHostBackend => "to_host_backend",
            Reason::FromHostBackend => "from_host_backend",
            Reason::IcmpTimeExceeded => "icmp_time_exceeded",
            Reason::IcmpTooBig => "icmp_too_big",
            Reason::IcmpUnreachable => "icmp_unreachable",
            Reason::FragmentTranslated => "fragment_translated",
            Reason::FragmentUnknown => "fragment_unknown",
            Reason::FragmentMapFull => "fragment_map_full",
            Reason::NoBackend => "no_backend",
            Reason::SourceDenied => "source_denied",
            Reason::RedirectTcCached => "redirect_tc_cached",
            Reason::RedirectTcFlowCache => "redirect_tc_flow_cache",
        }
    }

    /// True when packets counted under this code were dropped (for the ICMP answers: the
    /// packet answered is not forwarded).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::ConntrackFull
                | Reason::PortsExhausted
                | Reason::RewriteFailed
                | Reason::CtInvalid
                | Reason::RstOutOfWindow
                | Reason::LocalUdpAmbiguous
                | Reason::FragmentMapFull
                | Reason::NoBackend
                | Reason::SourceDenied
        ) || self.is_icmp_answer()
    }

    /// True for a forward's packet the programs answered with an ICMP error of their own
    /// instead of forwarding it.
    pub const fn is_icmp_answer(self) -> bool {
        matches!(self, Reason::IcmpTimeExceeded | Reason::IcmpTooBig | Reason::IcmpUnreachable | Reason::NoBackend)
    }

    /// True for a code that counts no packet's outcome: connection-table events, and
    /// fragments translated (each also counted under how it left).
    pub const fn is_event(self) -> bool {
        matches!(self, Reason::EarlyDrop | Reason::FragmentTranslated)
    }

    /// True when packets counted under this code were forwarded (rewritten).
    pub const fn is_forwarded(self) -> bool {
        matches!(
            self,
            Reason::RedirectXdp
                | Reason::RedirectXdpCached
                | Reason::RedirectXdpFlowCache
                | Reason::RedirectTc
                | Reason::RedirectTcCached
                | Reason::RedirectTcFlowCache
                | Reason::FibToStack
                | Reason::FibNoNeigh
                | Reason::TtlToStack
                | Reason::FibFragNeeded
                | Reason::ToHostBackend
                | Reason::FromHostBackend
        )
    }

    /// How operators read the code: "forwarded" (a forward's packet, rewritten, and how it
    /// left), "peer" (sent to a same-switch peer or left to routing for one), "icmp" (an
    /// ICMP error translated, or a forward's packet answered with one of the programs'
    /// own), "dropped", or "passed" (to the kernel untouched); "event" is no packet's
    /// outcome (a connection dropped early, a fragment translated and counted again under
    /// how it left), so packet totals leave it out.
    pub const fn kind(self) -> &'static str {
        if self.is_event() {
            "event"
        } else if self.is_forwarded() {
            "forwarded"
        } else if self.is_icmp_answer() || matches!(self, Reason::IcmpTranslated) {
            "icmp"
        } else if self.is_drop() {
            "dropped"
        } else if matches!(self, Reason::PeerDirect | Reason::PeerFallback) {
            "peer"
        } else {
            "passed"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for r in ALL_REASONS {
            assert_eq!(Reason::from_code(r as u32), Some(r));
        }
        assert_eq!(Reason::from_code(7), None, "retired");
    }

    #[test]
    fn codes_are_unique_and_fit_the_map() {
        for (i, a) in ALL_REASONS.iter().enumerate() {
            assert!((*a as u32) < crate::REASON_SLOTS);
            for b in &ALL_REASONS[i + 1..] {
                assert_ne!(*a as u32, *b as u32);
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
