//! Connection tracking as netfilter does it, as pure logic shared by the kernel side and
//! userspace: the TCP state machine (nf_conntrack_proto_tcp's transition table), the
//! per-state idle timeouts that userspace's expiry applies, the RST acceptance window, and
//! the SNAT source-port walk.
//!
//! A connection has two entries (one per direction); both carry the connection's state in
//! [`crate::CtValue::state`] and its flags in [`crate::CtValue::flags`], written together on
//! every transition. Each entry tracks its own direction's sequence numbers.

/// TCP connection states ([`crate::CtValue::state`] of a TCP connection), netfilter's.
pub const TCP_NONE: u8 = 0;
/// A SYN was seen (from the client).
pub const TCP_SYN_SENT: u8 = 1;
/// The backend answered with a SYN-ACK.
pub const TCP_SYN_RECV: u8 = 2;
/// The client acknowledged the SYN-ACK: the handshake is complete.
pub const TCP_ESTABLISHED: u8 = 3;
/// A FIN was seen (either side).
pub const TCP_FIN_WAIT: u8 = 4;
/// The FIN was acknowledged; the other side has not closed yet.
pub const TCP_CLOSE_WAIT: u8 = 5;
/// FINs seen both ways, waiting for the last ACK.
pub const TCP_LAST_ACK: u8 = 6;
/// Closed by FINs; a new SYN from the client reopens the connection with the same mapping.
pub const TCP_TIME_WAIT: u8 = 7;
/// Closed by a RST; a new SYN reopens it too.
pub const TCP_CLOSE: u8 = 8;
/// Simultaneous open: a SYN from the backend answered the client's SYN.
pub const TCP_SYN_SENT2: u8 = 9;
/// Number of TCP states.
pub const TCP_STATES: usize = 10;

/// UDP connection states ([`crate::CtValue::state`] of a UDP flow).
pub const UDP_UNREPLIED: u8 = 0;
pub const UDP_REPLIED: u8 = 1;

/// [`crate::CtValue::flags`]: the connection completed its handshake (TCP) or was answered
/// (UDP). Assured connections are never dropped early to make room (netfilter's
/// IPS_ASSURED).
pub const CT_ASSURED: u8 = 1 << 0;
/// [`crate::CtValue::flags`]: `seq_end` holds this direction's sequence (TCP).
pub const CT_SEQ_KNOWN: u8 = 1 << 1;
/// [`crate::CtValue::flags`]: the connection's backend is on this host (both entries, for
/// the connection's life): the client's packets are handed to the local stack by TC
/// ingress, and the backend's replies are rewritten by TC egress as they leave.
pub const CT_HOST_BACKEND: u8 = 1 << 2;
/// [`crate::CtValue::flags`]: this direction's cached next hop takes XDP frames (its egress
/// is in the devmap and takes XDP_REDIRECT): the XDP fast path may use it. A next hop TC
/// cached for an egress XDP cannot send to serves TC only.
pub const CT_NH_XDP: u8 = 1 << 3;

/// Names of the TCP states, as conntrack-tools prints them.
pub const TCP_STATE_NAMES: [&str; TCP_STATES] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What a segment does to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The connection moves to (or stays in) this state.
    To(u8),
    /// Passed on with the connection's translation, state unchanged (netfilter's sIG:
    /// could be valid or not; the endpoint will tell).
    Ignore,
    /// Not a packet of this connection's state (netfilter's sIV): dropped and counted.
    Invalid,
}

const IV: u8 = 0xff;
const IG: u8 = 0xfe;
const SS: u8 = TCP_SYN_SENT;
const SR: u8 = TCP_SYN_RECV;
const ES: u8 = TCP_ESTABLISHED;
const FW: u8 = TCP_FIN_WAIT;
const CW: u8 = TCP_CLOSE_WAIT;
const LA: u8 = TCP_LAST_ACK;
const TW: u8 = TCP_TIME_WAIT;
const CL: u8 = TCP_CLOSE;
const S2: u8 = TCP_SYN_SENT2;

/// netfilter's `tcp_conntracks[direction][segment kind][state]` (nf_conntrack_proto_tcp.c):
/// rows syn, synack, fin, ack, rst, none; columns NONE, SYN_SENT, SYN_RECV, ESTABLISHED,
/// FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2.
const TABLE: [[[u8; TCP_STATES]; 6]; 2] = [
    // Original direction (client to backend).
    [
        [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2], // syn: TIME_WAIT/CLOSE reopen
        [IV, IV, IG, IG, IG, IG, IG, IG, IG, SR], // synack
        [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV], // fin
        [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV], // ack
        [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL], // rst
        [IV; TCP_STATES],                         // none
    ],
    // Reply direction (backend to client).
    [
        [IV, S2, IV, IV, IV, IV, IV, IV, IV, S2], // syn: the backend may not reopen
        [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR], // synack
        [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV], // fin
        [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG], // ack
        [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL], // rst
        [IV; TCP_STATES],                         // none
    ],
];

/// The row of the transition table for a segment's flags (netfilter's get_conntrack_index).
#[inline(always)]
pub fn segment_kind(flags: u8) -> usize {
    if flags & TCP_RST != 0 {
        4
    } else if flags & TCP_SYN != 0 {
        if flags & TCP_ACK != 0 { 1 } else { 0 }
    } else if flags & TCP_FIN != 0 {
        2
    } else if flags & TCP_ACK != 0 {
        3
    } else {
        5
    }
}

/// The transition of a connection in `state` on a segment with `flags` travelling in the
/// reply direction or not.
#[inline(always)]
pub fn tcp_step(state: u8, reply: bool, flags: u8) -> Step {
    let dir = reply as usize;
    let next = match TABLE[dir].get(segment_kind(flags)).and_then(|row| row.get(state as usize)) {
        Some(n) => *n,
        None => IV,
    };
    match next {
        IV => Step::Invalid,
        IG => Step::Ignore,
        s => Step::To(s),
    }
}

/// A transition that reopens a closed connection (RFC 1122: a new SYN on a tuple in
/// TIME_WAIT or CLOSE): the connection starts over with the same mapping, unassured and
/// with its sequence numbers forgotten.
#[inline(always)]
pub fn is_reopen(old: u8, new: u8) -> bool {
    new == TCP_SYN_SENT && (old == TCP_TIME_WAIT || old == TCP_CLOSE)
}

/// Whether a packet of an established connection with these TCP flags leaves its state as
/// it is, so a copy of the connection (the flow cache) may forward it without the entry.
#[inline(always)]
pub fn tcp_keeps_state(state: u8, flags: u8) -> bool {
    state == TCP_ESTABLISHED && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// True when `a` is after `b` in sequence space.
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// How far behind the highest sequence seen from its sender an RST may lie and still be
/// accepted: an RST answering a segment carries that segment's acknowledgement, which may
/// trail the sender's data by what is in flight (a receive window).
pub const RST_WINDOW_BEHIND: u32 = 8 << 20;
/// How far ahead of the highest sequence seen an RST may lie: the flow cache forwards up to
/// [`SEQ_SYNC_BYTES`] per CPU without telling the entry.
pub const RST_WINDOW_AHEAD: u32 = 1 << 20;
/// The flow cache serves a TCP direction only while the packet's sequence is within this
/// many bytes past the one the entry last recorded; beyond, the entry sees the packet and
/// records its sequence. Also keeps a copy of a closed connection from serving the next
/// one that reuses its tuple (a new initial sequence number).
pub const SEQ_SYNC_BYTES: u32 = 256 << 10;

/// Whether an RST with sequence `seq` is accepted for a direction whose highest sequence
/// seen is `seq_end` (`known`: any is recorded). netfilter checks every segment against
/// the window; forwarder checks the RST only, the one segment that ends a connection at
/// once, so a blind RST with a random sequence is refused with probability ~99.8%.
#[inline(always)]
pub fn rst_acceptable(seq: u32, seq_end: u32, known: bool) -> bool {
    !known || seq.wrapping_sub(seq_end.wrapping_sub(RST_WINDOW_BEHIND)) <= RST_WINDOW_BEHIND + RST_WINDOW_AHEAD
}

/// The sequence just past a segment: its sequence plus payload length, plus one for a SYN
/// and one for a FIN (netfilter's segment_seq_plus_len).
#[inline(always)]
pub fn segment_end(seq: u32, payload_len: u32, flags: u8) -> u32 {
    seq.wrapping_add(payload_len)
        .wrapping_add((flags & TCP_SYN != 0) as u32)
        .wrapping_add((flags & TCP_FIN != 0) as u32)
}

/// Idle timeouts, in nanoseconds: one per TCP state, and UDP unanswered / answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: [u64; TCP_STATES],
    pub udp_unreplied: u64,
    pub udp_replied: u64,
}

const NS: u64 = 1_000_000_000;

impl Timeouts {
    /// netfilter's defaults (nf_conntrack_tcp_timeout_*, nf_conntrack_udp_timeout{,_stream}).
    pub const NETFILTER_SECS: ([u64; TCP_STATES], u64, u64) = (
        // NONE, SYN_SENT, SYN_RECV, ESTABLISHED (5 days), FIN_WAIT, CLOSE_WAIT, LAST_ACK,
        // TIME_WAIT, CLOSE, SYN_SENT2
        [120, 120, 60, 432_000, 120, 60, 30, 120, 10, 120],
        30,
        120,
    );

    /// Timeouts from seconds.
    pub const fn from_secs(tcp: [u64; TCP_STATES], udp_unreplied: u64, udp_replied: u64) -> Self {
        let mut ns = [0u64; TCP_STATES];
        let mut i = 0;
        while i < TCP_STATES {
            ns[i] = tcp[i] * NS;
            i += 1;
        }
        Self { tcp: ns, udp_unreplied: udp_unreplied * NS, udp_replied: udp_replied * NS }
    }

    pub const fn netfilter() -> Self {
        let (tcp, u, r) = Self::NETFILTER_SECS;
        Self::from_secs(tcp, u, r)
    }
}

/// The timeout of a connection in `state`.
pub fn timeout_for(is_tcp: bool, state: u8, t: &Timeouts) -> u64 {
    if !is_tcp {
        if state == UDP_REPLIED { t.udp_replied } else { t.udp_unreplied }
    } else {
        t.tcp.get(state as usize).copied().unwrap_or(t.tcp[TCP_CLOSE as usize])
    }
}

/// How far `last_seen_ns` may lag a busy connection's last packet: the full path refreshes
/// it at most once a second, and the fast path hands a connection back to the full path
/// only every `NH_MAX_AGE_JIFFIES` (up to 2.5 s at HZ=100). Expiry waits this much longer.
pub const LAST_SEEN_SLACK_NS: u64 = 3_000_000_000;

/// Whether a connection in `state` whose entries were last refreshed `idle_ns` ago has
/// expired.
pub fn expired(is_tcp: bool, state: u8, idle_ns: u64, t: &Timeouts) -> bool {
    idle_ns > timeout_for(is_tcp, state, t) + LAST_SEEN_SLACK_NS
}

/// An unassured entry at least this old may be dropped to make room for a new connection
/// (netfilter's early_drop): younger ones are handshakes under way.
pub const EARLY_DROP_MIN_AGE_NS: u64 = 1_000_000_000;

/// Whether a connection with these flags, last seen `idle_ns` ago, may give way to a new one.
#[inline(always)]
pub fn early_droppable(flags: u8, idle_ns: u64) -> bool {
    flags & CT_ASSURED == 0 && idle_ns >= EARLY_DROP_MIN_AGE_NS
}

/// The SNAT source ports: `min..=max` without `hole_min..=hole_max` (the host's own
/// ephemeral range, so forwarded flows and the host's connections never share a port; an
/// empty hole when `hole_min > hole_max`). Host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
    pub hole_min: u16,
    pub hole_max: u16,
}

impl PortRange {
    /// The part of the hole inside `min..=max`, as (first, length).
    #[inline(always)]
    fn hole(&self) -> (u32, u32) {
        let lo = if self.hole_min > self.min { self.hole_min } else { self.min } as u32;
        let hi = if self.hole_max < self.max { self.hole_max } else { self.max } as u32;
        if self.max < self.min || self.hole_max < self.hole_min || hi < lo { (0, 0) } else { (lo, hi - lo + 1) }
    }

    /// How many ports the range offers.
    #[inline(always)]
    pub fn size(&self) -> u32 {
        if self.max < self.min {
            return 0;
        }
        self.max as u32 - self.min as u32 + 1 - self.hole().1
    }

    /// The `offset`-th port of the range (`offset < size()`).
    #[inline(always)]
    pub fn nth(&self, offset: u32) -> u16 {
        let (hole_start, hole_len) = self.hole();
        let p = self.min as u32 + offset;
        (if hole_len > 0 && p >= hole_start { p + hole_len } else { p }) as u16
    }

    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        let (hole_start, hole_len) = self.hole();
        port >= self.min
            && port <= self.max
            && !(hole_len > 0 && (port as u32) >= hole_start && (port as u32) < hole_start + hole_len)
    }
}

/// Source port (host order) for SNAT attempt `i` of a flow with hash `h`. Attempts walk
/// the range with a stride coprime with its size, so the first `size` attempts are all
/// distinct ports; the hash spreads flows over the whole range.
#[inline(always)]
pub fn pick_port(h: u32, i: u32, range: &PortRange) -> u16 {
    let span = range.size().max(1) as u64;
    // 7919 is prime: coprime with every span that is not a multiple of it.
    let step = if span.is_multiple_of(7919) { 1 } else { 7919 % span };
    let offset = (h as u64 % span + i as u64 * step) % span;
    range.nth(offset as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const ACK: u8 = TCP_ACK;
    const SYN: u8 = TCP_SYN;
    const SYNACK: u8 = TCP_SYN | TCP_ACK;
    const FINACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;

    /// netfilter's transitions, written out as its comments list them (state, direction,
    /// segment) -> next; checked against the table the kernel side uses.
    #[test]
    fn transitions_match_netfilter() {
        use Step::*;
        let orig = false;
        let reply = true;
        let cases: &[(u8, bool, u8, Step)] = &[
            (TCP_NONE, orig, SYN, To(TCP_SYN_SENT)),
            (TCP_SYN_SENT, orig, SYN, To(TCP_SYN_SENT)),
            (TCP_SYN_SENT, reply, SYNACK, To(TCP_SYN_RECV)),
            (TCP_SYN_SENT, reply, SYN, To(TCP_SYN_SENT2)),
            (TCP_SYN_SENT, orig, ACK, Invalid),
            (TCP_SYN_SENT, reply, ACK, Ignore),
            (TCP_SYN_SENT, orig, FINACK, Invalid),
            (TCP_SYN_SENT, orig, SYNACK, Invalid),
            (TCP_SYN_SENT2, orig, SYNACK, To(TCP_SYN_RECV)),
            (TCP_SYN_RECV, orig, ACK, To(TCP_ESTABLISHED)),
            (TCP_SYN_RECV, reply, ACK, To(TCP_SYN_RECV)),
            (TCP_SYN_RECV, reply, SYNACK, Ignore),
            (TCP_SYN_RECV, orig, FINACK, To(TCP_FIN_WAIT)),
            (TCP_ESTABLISHED, orig, ACK, To(TCP_ESTABLISHED)),
            (TCP_ESTABLISHED, reply, ACK, To(TCP_ESTABLISHED)),
            (TCP_ESTABLISHED, orig, SYN, Ignore),
            (TCP_ESTABLISHED, reply, SYN, Invalid),
            (TCP_ESTABLISHED, reply, FINACK, To(TCP_FIN_WAIT)),
            (TCP_ESTABLISHED, orig, FINACK, To(TCP_FIN_WAIT)),
            (TCP_FIN_WAIT, orig, ACK, To(TCP_CLOSE_WAIT)),
            (TCP_FIN_WAIT, orig, FINACK, To(TCP_LAST_ACK)),
            (TCP_CLOSE_WAIT, orig, FINACK, To(TCP_LAST_ACK)),
            (TCP_LAST_ACK, reply, ACK, To(TCP_TIME_WAIT)),
            (TCP_LAST_ACK, reply, FINACK, To(TCP_LAST_ACK)),
            (TCP_TIME_WAIT, orig, ACK, To(TCP_TIME_WAIT)),
            (TCP_TIME_WAIT, orig, SYN, To(TCP_SYN_SENT)),
            (TCP_TIME_WAIT, reply, SYN, Invalid),
            (TCP_SYN_RECV, orig, SYNACK, Ignore),
            (TCP_CLOSE, orig, SYN, To(TCP_SYN_SENT)),
            (TCP_CLOSE, reply, SYN, Invalid),
            (TCP_CLOSE, orig, ACK, To(TCP_CLOSE)),
            (TCP_NONE, orig, RST, Invalid),
            (TCP_SYN_SENT, reply, RST | ACK, To(TCP_CLOSE)),
            (TCP_ESTABLISHED, orig, RST, To(TCP_CLOSE)),
            (TCP_ESTABLISHED, reply, RST, To(TCP_CLOSE)),
            (TCP_ESTABLISHED, orig, 0, Invalid),
            (TCP_ESTABLISHED, orig, 0x08 /* PSH alone */, Invalid),
            (TCP_ESTABLISHED, orig, ACK | 0x08, To(TCP_ESTABLISHED)),
            (42, orig, ACK, Invalid),
        ];
        for &(state, dir, flags, want) in cases {
            assert_eq!(tcp_step(state, dir, flags), want, "state {state} reply {dir} flags {flags:#x}");
        }
    }

    /// A whole connection: handshake, data, the backend closes first (as a web server with
    /// `Connection: close`), the client closes, and a SYN reusing the tuple reopens it.
    #[test]
    fn a_connection_walks_netfilters_states() {
        let mut s = TCP_NONE;
        for (reply, flags, want) in [
            (false, SYN, TCP_SYN_SENT),
            (true, SYNACK, TCP_SYN_RECV),
            (false, ACK, TCP_ESTABLISHED),
            (true, ACK, TCP_ESTABLISHED),
            (true, FINACK, TCP_FIN_WAIT),
            (false, ACK, TCP_CLOSE_WAIT),
            (false, FINACK, TCP_LAST_ACK),
            (true, ACK, TCP_TIME_WAIT),
        ] {
            match tcp_step(s, reply, flags) {
                Step::To(n) => s = n,
                other => panic!("{other:?} from {s}"),
            }
            assert_eq!(s, want);
        }
        assert_eq!(tcp_step(s, false, SYN), Step::To(TCP_SYN_SENT));
        assert!(is_reopen(s, TCP_SYN_SENT));
        assert!(!is_reopen(TCP_SYN_SENT, TCP_SYN_SENT), "a retransmitted SYN is no reopen");
    }

    #[test]
    fn only_plain_segments_of_established_connections_keep_their_state() {
        assert!(tcp_keeps_state(TCP_ESTABLISHED, ACK));
        assert!(tcp_keeps_state(TCP_ESTABLISHED, ACK | 0x08));
        for f in [SYN, SYNACK, FINACK, RST, RST | ACK] {
            assert!(!tcp_keeps_state(TCP_ESTABLISHED, f), "{f:#x}");
        }
        assert!(!tcp_keeps_state(TCP_SYN_RECV, ACK), "the handshake's last ACK moves the state");
        assert!(!tcp_keeps_state(TCP_TIME_WAIT, ACK));
    }

    #[test]
    fn rst_window() {
        let end = 1_000_000u32;
        assert!(rst_acceptable(end, end, true), "exactly the next sequence");
        assert!(rst_acceptable(end - 5000, end, true), "an acknowledgement a little behind");
        assert!(rst_acceptable(end + 100_000, end, true), "data the flow cache forwarded");
        assert!(!rst_acceptable(end + (64 << 20), end, true), "far ahead");
        assert!(!rst_acceptable(end.wrapping_sub(64 << 20), end, true), "far behind");
        assert!(rst_acceptable(123, end, false), "nothing recorded: accepted (netfilter's SYN_SENT)");
        // Across the wrap of sequence space.
        assert!(rst_acceptable(5, u32::MAX - 5, true));
        assert!(rst_acceptable(u32::MAX - 5, 5, true));
        // A blind RST with a random sequence is refused almost always.
        let mut x = 0x1234_5678u32;
        let mut accepted = 0;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            accepted += rst_acceptable(x, end, true) as u32;
        }
        assert!(accepted < 500, "{accepted} of 100000 random RSTs accepted");
    }

    #[test]
    fn sequence_arithmetic() {
        assert_eq!(segment_end(100, 0, SYN), 101);
        assert_eq!(segment_end(100, 10, FINACK), 111);
        assert_eq!(segment_end(u32::MAX, 2, ACK), 1);
        assert!(seq_after(1, u32::MAX));
        assert!(!seq_after(u32::MAX, 1));
        assert!(!seq_after(7, 7));
    }

    #[test]
    fn timeouts_per_state_are_netfilters() {
        let t = Timeouts::netfilter();
        assert_eq!(timeout_for(true, TCP_SYN_SENT, &t), 120 * S);
        assert_eq!(timeout_for(true, TCP_SYN_RECV, &t), 60 * S);
        assert_eq!(timeout_for(true, TCP_ESTABLISHED, &t), 432_000 * S);
        assert_eq!(timeout_for(true, TCP_TIME_WAIT, &t), 120 * S);
        assert_eq!(timeout_for(true, TCP_CLOSE, &t), 10 * S);
        assert_eq!(timeout_for(true, 200, &t), 10 * S, "an unknown state expires as CLOSE");
        assert_eq!(timeout_for(false, UDP_UNREPLIED, &t), 30 * S);
        assert_eq!(timeout_for(false, UDP_REPLIED, &t), 120 * S);
        assert!(!expired(true, TCP_CLOSE, 12 * S, &t), "within the refresh slack");
        assert!(expired(true, TCP_CLOSE, 14 * S, &t));
        assert!(!expired(true, TCP_ESTABLISHED, 86_400 * S, &t));
    }

    #[test]
    fn early_drop_spares_assured_and_young_entries() {
        assert!(early_droppable(0, 2 * S));
        assert!(early_droppable(CT_SEQ_KNOWN, 2 * S));
        assert!(!early_droppable(CT_ASSURED, 1000 * S));
        assert!(!early_droppable(0, S / 2));
    }

    #[test]
    fn port_ranges_with_a_hole() {
        let r = PortRange { min: 1024, max: 65535, hole_min: 32768, hole_max: 60999 };
        assert_eq!(r.size(), 65535 - 1024 + 1 - (60999 - 32768 + 1));
        assert_eq!(r.nth(0), 1024);
        assert_eq!(r.nth(32767 - 1024), 32767);
        assert_eq!(r.nth(32768 - 1024), 61000);
        assert_eq!(r.nth(r.size() - 1), 65535);
        assert!(r.contains(1024) && r.contains(32767) && r.contains(61000) && r.contains(65535));
        assert!(!r.contains(32768) && !r.contains(60999) && !r.contains(1023));
        let no_hole = PortRange { min: 20000, max: 32767, hole_min: 1, hole_max: 0 };
        assert_eq!(no_hole.size(), 12768);
        assert!(no_hole.contains(20000) && !no_hole.contains(19999));
        let outside = PortRange { min: 20000, max: 30000, hole_min: 32768, hole_max: 60999 };
        assert_eq!(outside.size(), 10001, "a hole outside the range takes nothing");
        let overlap = PortRange { min: 30000, max: 40000, hole_min: 32768, hole_max: 60999 };
        assert_eq!(overlap.size(), 2768);
        assert_eq!(overlap.nth(2767), 32767);
        let all_hole = PortRange { min: 40000, max: 50000, hole_min: 32768, hole_max: 60999 };
        assert_eq!(all_hole.size(), 0);
    }

    #[test]
    fn snat_attempts_are_distinct_ports_inside_the_range() {
        let ranges = [
            PortRange { min: 20000, max: 32767, hole_min: 1, hole_max: 0 },
            PortRange { min: 30000, max: 30063, hole_min: 1, hole_max: 0 },
            PortRange { min: 1000, max: 1000 + 7918, hole_min: 1, hole_max: 0 },
            PortRange { min: 7, max: 9, hole_min: 1, hole_max: 0 },
            PortRange { min: 1, max: 65535, hole_min: 1, hole_max: 0 },
            PortRange { min: 1024, max: 65535, hole_min: 32768, hole_max: 60999 },
        ];
        for r in ranges {
            let span = r.size() as usize;
            for h in [0, 1, 7919, 0xdead_beef, u32::MAX] {
                // no_std: distinctness by pairwise comparison.
                let mut ports = [0u16; 32];
                for (i, p) in ports.iter_mut().enumerate() {
                    *p = pick_port(h, i as u32, &r);
                    assert!(r.contains(*p), "{r:?}: {p}");
                }
                let n = span.min(32);
                for i in 0..n {
                    for j in i + 1..n {
                        assert_ne!(ports[i], ports[j], "{r:?}, hash {h:#x}, attempts {i} and {j}");
                    }
                }
            }
        }
    }
}
