//! Connection-state bits kept by the kernel in each conntrack entry, and the timeout rule
//! userspace's expiry applies to a connection (both of its entries together).

/// The flow's first packet was a TCP SYN (set at creation).
pub const CT_SEEN_SYN: u8 = 1 << 0;
/// A FIN was seen in this direction.
pub const CT_SEEN_FIN: u8 = 1 << 1;
/// A RST was seen in this direction.
pub const CT_SEEN_RST: u8 = 1 << 2;
/// A packet went this way on a reply entry: the backend answered.
pub const CT_ANSWERED: u8 = 1 << 3;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// State bits a TCP segment with `flags` adds to its direction's entry.
#[inline(always)]
pub fn bits_of_tcp_flags(flags: u8) -> u8 {
    (if flags & TCP_FIN != 0 { CT_SEEN_FIN } else { 0 }) | (if flags & TCP_RST != 0 { CT_SEEN_RST } else { 0 })
}

/// Idle timeouts, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connection the backend has not answered yet.
    pub tcp_handshake: u64,
    pub tcp_established: u64,
    /// After a FIN or RST in either direction.
    pub tcp_closing: u64,
    pub udp: u64,
}

impl Timeouts {
    pub const fn from_secs(tcp_handshake: u64, tcp_established: u64, tcp_closing: u64, udp: u64) -> Self {
        const NS: u64 = 1_000_000_000;
        Self {
            tcp_handshake: tcp_handshake * NS,
            tcp_established: tcp_established * NS,
            tcp_closing: tcp_closing * NS,
            udp: udp * NS,
        }
    }
}

/// Source port (host order) for SNAT attempt `i` of a flow with hash `h`, inside
/// [min, max]. Attempts walk the range with a stride coprime with its size, so the first
/// `span` attempts are all distinct ports; the hash spreads flows over the whole range.
#[inline(always)]
pub fn pick_port(h: u32, i: u32, min: u16, max: u16) -> u16 {
    let span = if max < min { 1 } else { max as u64 - min as u64 + 1 };
    // 7919 is prime: coprime with every span that is not a multiple of it.
    let step = if span % 7919 == 0 { 1 } else { 7919 % span };
    let offset = (h as u64 % span + i as u64 * step) % span;
    (min as u64 + offset) as u16
}

/// The timeout that applies to a connection whose entries together carry `state` bits.
pub fn timeout_for(is_tcp: bool, state: u8, t: &Timeouts) -> u64 {
    if !is_tcp {
        t.udp
    } else if state & (CT_SEEN_FIN | CT_SEEN_RST) != 0 {
        t.tcp_closing
    } else if state & CT_ANSWERED != 0 {
        t.tcp_established
    } else {
        t.tcp_handshake
    }
}

/// How far `last_seen_ns` may lag a busy connection's last packet: the full path refreshes
/// it at most once a second, and the fast path hands a connection back to the full path
/// only every `NH_MAX_AGE_JIFFIES` (up to 2.5 s at HZ=100). Expiry waits this much longer.
pub const LAST_SEEN_SLACK_NS: u64 = 3_000_000_000;

/// Whether a connection whose entries were last refreshed `idle_ns` ago has expired.
pub fn expired(is_tcp: bool, state: u8, idle_ns: u64, t: &Timeouts) -> bool {
    idle_ns > timeout_for(is_tcp, state, t) + LAST_SEEN_SLACK_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts::from_secs(30, 3600, 10, 60);
    const S: u64 = 1_000_000_000;

    #[test]
    fn tcp_moves_from_handshake_to_established_to_closing() {
        assert!(expired(true, CT_SEEN_SYN, 34 * S, &T), "unanswered SYN");
        assert!(!expired(true, CT_SEEN_SYN | CT_ANSWERED, 34 * S, &T), "answered: established");
        assert!(expired(true, CT_SEEN_SYN | CT_ANSWERED, 3604 * S, &T));
        assert!(expired(true, CT_ANSWERED | CT_SEEN_FIN, 14 * S, &T), "closing");
        assert!(expired(true, CT_ANSWERED | CT_SEEN_RST, 14 * S, &T));
        assert!(!expired(true, CT_ANSWERED | CT_SEEN_FIN, 12 * S, &T), "within the refresh slack");
    }

    #[test]
    fn snat_attempts_are_distinct_ports_inside_the_range() {
        for (min, max) in
            [(20000, 32767), (30000, 30063), (1000, 1000 + 7918), (5, 5 + 2 * 7919 - 1), (7, 9), (1, 65535)]
        {
            let span = (max - min) as usize + 1;
            for h in [0, 1, 7919, 0xdead_beef, u32::MAX] {
                // no_std: distinctness by pairwise comparison.
                let mut ports = [0u16; 32];
                for (i, p) in ports.iter_mut().enumerate() {
                    *p = pick_port(h, i as u32, min, max);
                    assert!((min..=max).contains(p), "{min}-{max}");
                }
                let n = span.min(32);
                for i in 0..n {
                    for j in i + 1..n {
                        assert_ne!(ports[i], ports[j], "{min}-{max}, hash {h:#x}, attempts {i} and {j}");
                    }
                }
            }
        }
        assert_eq!(pick_port(123, 0, 9, 3), 9, "an empty range yields its start");
    }

    #[test]
    fn udp_has_one_timeout_and_flags_map_to_bits() {
        assert!(!expired(false, CT_ANSWERED, 62 * S, &T));
        assert!(expired(false, 0, 64 * S, &T));
        assert_eq!(bits_of_tcp_flags(0x11), CT_SEEN_FIN);
        assert_eq!(bits_of_tcp_flags(0x14), CT_SEEN_RST);
        assert_eq!(bits_of_tcp_flags(0x02), 0);
    }
}
