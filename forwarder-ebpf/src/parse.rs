//! Header parsing: Ethernet, IPv4 without options or IPv6 without extension headers (but
//! for a fragment header), TCP/UDP ports and checksum, and the ICMP/ICMPv6 errors that
//! quote such packets. Anything the programs do not rewrite is reported as a [`Reason`]
//! and passed untouched.

use forwarder_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason};

use crate::ctx::{Packet, read};

pub const ETH_LEN: usize = 14;
pub const L3_OFF: usize = ETH_LEN;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
/// Length of the IPv6 fragment header (RFC 8200 4.5).
pub const IPV6_FRAG_LEN: usize = 8;
/// L4 offsets: IPv4 packets with options and IPv6 packets with extension headers other
/// than a fragment header never reach the rewrite, so there are three: IPv4, IPv6, and
/// IPv6 behind a fragment header.
pub const L4_OFF_V4: usize = L3_OFF + IPV4_LEN;
pub const L4_OFF_V6: usize = L3_OFF + IPV6_LEN;
pub const L4_OFF_V6_FRAG: usize = L4_OFF_V6 + IPV6_FRAG_LEN;
pub const IPV4_CHECK_OFF: usize = L3_OFF + 10;
pub const IPV4_TTL_OFF: usize = L3_OFF + 8;
pub const IPV4_SRC_OFF: usize = L3_OFF + 12;
pub const IPV4_DST_OFF: usize = L3_OFF + 16;
pub const IPV6_HOP_LIMIT_OFF: usize = L3_OFF + 7;
pub const IPV6_SRC_OFF: usize = L3_OFF + 8;
pub const IPV6_DST_OFF: usize = L3_OFF + 24;

/// [`Flow::frag`]: a whole datagram (an IPv6 "atomic" fragment, offset 0 without more
/// fragments, is whole too).
pub const FRAG_NONE: u8 = 0;
/// The first fragment: offset 0, more fragments; it carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: offset > 0, no L4 header; its ports come from the first's record.
pub const FRAG_LATER: u8 = 2;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// The fields of a TCP/UDP packet that the NAT reads. Addresses (IPv4 in the first four
/// bytes) and ports as on the wire (network order). The addresses first and the whole
/// 8-aligned: the compiler then copies an address in two 64-bit words (keys, entries, FIB
/// parameters) where it otherwise copied it byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    pub tos: u8,
    /// L3 length (IPv4 total length; IPv6 payload length + 40), host order. A fragment's
    /// own length, not its datagram's.
    pub l3_len: u16,
    /// L4 checksum as on the wire (host-order value of the two bytes); 0 for a later
    /// fragment, which has none.
    pub l4_check: u16,
    /// TCP flags byte, 0 for UDP.
    pub tcp_flags: u8,
    /// TCP sequence number (host order) and payload length; 0 for UDP.
    pub tcp_seq: u32,
    pub tcp_payload: u16,
    /// `FRAG_*`: whole, first or later fragment.
    pub frag: u8,
    /// Where the L4 header starts ([`L4_OFF_V4`], [`L4_OFF_V6`] or [`L4_OFF_V6_FRAG`]).
    pub l4_off: u8,
    /// A fragment's identification (IPv4: 16 bits; IPv6: 32), host order; 0 when whole.
    pub frag_id: u32,
}

const _: () = assert!(align_of::<Flow>() == 8 && core::mem::offset_of!(Flow, dst) == 16);

impl Flow {
    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.family == FAMILY_V6
    }
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.l4_off as usize
    }
    #[inline(always)]
    pub fn l4_len(&self) -> u16 {
        self.l3_len - (self.l4_off() - L3_OFF) as u16
    }
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_off() + if self.proto == PROTO_TCP { 16 } else { 6 }
    }
}

#[inline(always)]
fn v4_addr(b: &[u8]) -> [u8; 16] {
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// [`v4_addr`] as the two words [`store_addr`] writes.
#[inline(always)]
fn v4_addr_words(b: &[u8]) -> [u64; 2] {
    [u64::from_ne_bytes([b[0], b[1], b[2], b[3], 0, 0, 0, 0]), 0]
}

/// Writes an address as two 64-bit words. `dst` must lie 8-aligned: an address field of
/// `Flow`, `Tuple`, `Fib` (each 8-aligned, addresses at multiples of 8) or of a map value.
/// The compiler cannot see that alignment once the struct's pointer came from a map, and
/// copied `[u8; 16]` there byte by byte: sixteen byte stores, and a 64-bit load of the
/// address soon after (a connection key, a checksum sum) then waits for them all (no store
/// forwarding), the hottest spot of a new flow's own instructions in a profile.
#[inline(always)]
pub fn store_addr(dst: &mut [u8; 16], words: [u64; 2]) {
    let d = dst.as_mut_ptr() as *mut u64;
    // SAFETY: 16 writable bytes, 8-aligned (above).
    unsafe {
        d.write(words[0]);
        d.add(1).write(words[1]);
    }
}

/// An address as two 64-bit words, from an 8-aligned field as [`store_addr`]'s. Never from
/// a `[u8; 16]` local: the verifier refuses a misaligned stack access ([`Words16`]).
#[inline(always)]
pub fn load_addr(src: &[u8; 16]) -> [u64; 2] {
    let s = src.as_ptr() as *const u64;
    // SAFETY: 16 readable bytes, 8-aligned (see store_addr).
    unsafe { [s.read(), s.add(1).read()] }
}

/// An address held in a local: 8-aligned, so the compiler copies it in words too (a
/// `[u8; 16]` local has alignment 1, and a copy from it goes byte by byte).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Words16(pub [u8; 16]);

/// Copies an address between 8-aligned fields (see [`store_addr`]) in two words.
#[inline(always)]
pub fn copy_addr(dst: &mut [u8; 16], src: &[u8; 16]) {
    store_addr(dst, load_addr(src));
}

#[inline(always)]
fn v6_addr(b: &[u8; 40], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = b[at + i];
        i += 1;
    }
    a
}

/// IPv6 next header of a fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;

/// IPv6 next-header values of extension headers: such packets go to the stack untouched
/// (a fragment header, 44, is taken apart first).
#[inline(always)]
fn is_ipv6_extension(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
fn frag_kind(offset: u16, more: bool) -> u8 {
    if offset != 0 {
        FRAG_LATER
    } else if more {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

/// The L3 header of an IPv4/IPv6 packet that can carry a rewrite, into `f`'s L3 fields
/// (family, addresses, protocol, TTL, TOS, L3 length, L4 offset, fragment kind and
/// identification); the other fields are left as they were. Written in place, not
/// returned: the working memory is off the stack. `f` is only meaningful on `Ok`.
#[inline(always)]
pub fn parse_l3<P: Packet>(pkt: &P, f: &mut Flow) -> Result<(), Reason> {
    let eth_type: [u8; 2] = read(pkt, ETH_LEN - 2).map_err(|_| Reason::Malformed)?;
    let frame_l3_len = pkt.len().saturating_sub(L3_OFF);
    match u16::from_be_bytes(eth_type) {
        ETH_P_IP => {
            let ip: [u8; IPV4_LEN] = read(pkt, L3_OFF)?;
            if ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
                return Err(Reason::Malformed);
            }
            if ip[0] & 0x0f > 5 {
                return Err(Reason::IpOptions);
            }
            let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
            if (tot_len as usize) < IPV4_LEN || tot_len as usize > frame_l3_len {
                return Err(Reason::Malformed);
            }
            // Flags (DF, MF) and the fragment offset in 8-byte units.
            let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
            f.family = FAMILY_V4;
            store_addr(&mut f.src, v4_addr_words(&ip[12..16]));
            store_addr(&mut f.dst, v4_addr_words(&ip[16..20]));
            f.proto = ip[9];
            f.ttl = ip[8];
            f.tos = ip[1];
            f.l3_len = tot_len;
            f.l4_off = L4_OFF_V4 as u8;
            f.frag = frag_kind(flags_offset & 0x1fff, flags_offset & 0x2000 != 0);
            f.frag_id = u16::from_be_bytes([ip[4], ip[5]]) as u32;
            Ok(())
        }
        ETH_P_IPV6 => {
            // Version, traffic class, flow label, payload length, next header, hop limit.
            let ip: [u8; 8] = read(pkt, L3_OFF)?;
            if ip[0] >> 4 != 6 {
                return Err(Reason::Malformed);
            }
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize + IPV6_LEN;
            if len > frame_l3_len {
                return Err(Reason::Malformed);
            }
            f.family = FAMILY_V6;
            f.src = read(pkt, IPV6_SRC_OFF)?;
            f.dst = read(pkt, IPV6_DST_OFF)?;
            f.proto = ip[6];
            f.ttl = ip[7];
            f.tos = 0;
            f.l3_len = len as u16;
            f.l4_off = L4_OFF_V6 as u8;
            f.frag = FRAG_NONE;
            f.frag_id = 0;
            if ip[6] == IPPROTO_FRAGMENT {
                // Next header, reserved, offset (13 bits) + 2 reserved bits + M, identification.
                let fh: [u8; IPV6_FRAG_LEN] = read(pkt, L4_OFF_V6)?;
                if len < IPV6_LEN + IPV6_FRAG_LEN {
                    return Err(Reason::Malformed);
                }
                let offset_m = u16::from_be_bytes([fh[2], fh[3]]);
                f.proto = fh[0];
                f.l4_off = L4_OFF_V6_FRAG as u8;
                f.frag = frag_kind(offset_m >> 3, offset_m & 1 != 0);
                f.frag_id = u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]);
            }
            if is_ipv6_extension(f.proto) {
                return Err(if f.frag == FRAG_NONE { Reason::Ipv6Extension } else { Reason::Fragment });
            }
            Ok(())
        }
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::Vlan),
        _ => Err(Reason::NotIp),
    }
}

/// Parses a TCP/UDP packet into `flow` (per-CPU working memory, see work.rs). A first
/// fragment parses like a whole packet, but its UDP length may exceed what it carries (the
/// length is the datagram's); a later fragment has no L4 header, so its ports are left at
/// zero for `frag::ports_of_later` to fill in.
#[inline(always)]
pub fn parse_flow<P: Packet>(pkt: &P, flow: &mut Flow) -> Result<(), Reason> {
    parse_l3(pkt, flow)?;
    let (proto, frag, l4_off) = (flow.proto, flow.frag, flow.l4_off());
    let l4_len = (flow.l3_len as usize).saturating_sub(l4_off - L3_OFF);
    if frag != FRAG_NONE && proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::Fragment);
    }
    flow.tcp_flags = 0;
    flow.tcp_seq = 0;
    flow.tcp_payload = 0;
    if frag == FRAG_LATER {
        flow.sport = [0; 2];
        flow.dport = [0; 2];
        flow.l4_check = 0;
        return Ok(());
    }
    match proto {
        PROTO_TCP => {
            let tcp: [u8; 20] = read(pkt, l4_off)?;
            let data_off = (tcp[12] >> 4) as usize * 4;
            if l4_len < 20 || data_off < 20 || data_off > l4_len {
                return Err(Reason::Malformed);
            }
            flow.sport = [tcp[0], tcp[1]];
            flow.dport = [tcp[2], tcp[3]];
            flow.l4_check = u16::from_be_bytes([tcp[16], tcp[17]]);
            flow.tcp_flags = tcp[13];
            flow.tcp_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            flow.tcp_payload = (l4_len - data_off) as u16;
        }
        PROTO_UDP => {
            let udp: [u8; 8] = read(pkt, l4_off)?;
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            // A first fragment carries part of a datagram whose length the UDP header gives.
            if l4_len < 8 || udp_len < 8 || (udp_len > l4_len && frag != FRAG_FIRST) {
                return Err(Reason::Malformed);
            }
            flow.sport = [udp[0], udp[1]];
            flow.dport = [udp[2], udp[3]];
            flow.l4_check = u16::from_be_bytes([udp[6], udp[7]]);
        }
        PROTO_ICMP if flow.family == FAMILY_V4 => return Err(icmp_kind(pkt, l4_off, FAMILY_V4)),
        PROTO_ICMPV6 if flow.family == FAMILY_V6 => return Err(icmp_kind(pkt, l4_off, FAMILY_V6)),
        _ => return Err(Reason::NotTcpUdp),
    }
    Ok(())
}

/// ICMP errors (which may quote a forwarded connection) are `IcmpError`; everything else
/// (echo, neighbour discovery, ...) is the host's business.
#[inline(always)]
fn icmp_kind<P: Packet>(pkt: &P, l4_off: usize, family: u8) -> Reason {
    let Ok(t) = read::<1, _>(pkt, l4_off) else { return Reason::Malformed };
    let error = if family == FAMILY_V4 { matches!(t[0], 3 | 11 | 12) } else { matches!(t[0], 1..=4) };
    if error { Reason::IcmpError } else { Reason::NotTcpUdp }
}

/// The destination of any IPv4/IPv6 packet (for peer delivery, which ignores L4).
#[derive(Clone, Copy)]
pub struct L3Dst {
    pub family: u8,
    pub addr: [u8; 16],
    /// L3 length in bytes (IPv4 total length, or IPv6 payload + 40).
    pub len: u16,
    /// TTL / hop limit.
    pub ttl: u8,
}

impl L3Dst {
    /// The packet of `flow` as addressed to `addr` (its destination once rewritten).
    #[inline(always)]
    pub fn of_flow_to(flow: &Flow, addr: [u8; 16]) -> L3Dst {
        L3Dst { family: flow.family, addr, len: flow.l3_len, ttl: flow.ttl }
    }
}

#[inline(always)]
pub fn parse_l3_dst<P: Packet>(pkt: &P) -> Result<L3Dst, Reason> {
    let eth: [u8; ETH_LEN] = read(pkt, 0)?;
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip: [u8; IPV4_LEN] = read(pkt, L3_OFF)?;
            Ok(L3Dst {
                family: FAMILY_V4,
                addr: v4_addr(&ip[16..20]),
                len: u16::from_be_bytes([ip[2], ip[3]]),
                ttl: ip[8],
            })
        }
        ETH_P_IPV6 => {
            let ip: [u8; IPV6_LEN] = read(pkt, L3_OFF)?;
            Ok(L3Dst {
                family: FAMILY_V6,
                addr: v6_addr(&ip, 24),
                len: u16::from_be_bytes([ip[4], ip[5]]).saturating_add(IPV6_LEN as u16),
                ttl: ip[7],
            })
        }
        _ => Err(Reason::NotIp),
    }
}

/// An address's bytes as four native-endian words (how the fast paths and the FIB
/// parameters hold IPv6 addresses).
#[inline(always)]
pub fn addr_words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// [`addr_words`] undone.
#[inline(always)]
pub fn addr_bytes(w: &[u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}
