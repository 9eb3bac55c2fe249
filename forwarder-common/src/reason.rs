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
    /// IP fragment: passed untouched to the stack.
    Fragment = 5,
    /// IP but neither TCP nor UDP: passed.
    NotTcpUdp = 6,
    /// IPv6 (forwards are IPv4 for now): passed.
    Ipv6 = 7,
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
}

/// Every reason, for iteration by userspace (table order).
pub const ALL_REASONS: [Reason; 20] = [
    Reason::NoRule,
    Reason::NotIp,
    Reason::Malformed,
    Reason::IpOptions,
    Reason::Fragment,
    Reason::NotTcpUdp,
    Reason::Ipv6,
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
];

impl Reason {
    /// Stable name used in `forwarder stats` output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NoRule => "no_rule",
            Reason::NotIp => "not_ip",
            Reason::Malformed => "malformed",
            Reason::IpOptions => "ip_options",
            Reason::Fragment => "fragment",
            Reason::NotTcpUdp => "not_tcp_udp",
            Reason::Ipv6 => "ipv6",
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
        }
    }

    /// True when packets counted under this code were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(self, Reason::ConntrackFull | Reason::PortsExhausted | Reason::RewriteFailed)
    }

    /// True when packets counted under this code were forwarded (rewritten).
    pub const fn is_forwarded(self) -> bool {
        matches!(
            self,
            Reason::RedirectXdp
                | Reason::RedirectTc
                | Reason::FibToStack
                | Reason::FibNoNeigh
                | Reason::TtlToStack
                | Reason::FibFragNeeded
        )
    }

    /// How operators read the code: "forwarded" (a forward's packet, rewritten, and how it
    /// left), "peer" (sent to a same-switch peer or left to routing for one), "dropped", or
    /// "passed" (to the kernel untouched).
    pub const fn kind(self) -> &'static str {
        if self.is_forwarded() {
            "forwarded"
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
