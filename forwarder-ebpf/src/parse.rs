//! Header parsing: Ethernet, IPv4 without options or IPv6 without extension headers,
//! TCP/UDP ports and checksum, and the ICMP/ICMPv6 errors that quote such packets.
//! Anything the fast path does not rewrite is reported as a [`Reason`] and passed untouched.

use forwarder_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason};

use crate::ctx::{Packet, read};

pub const ETH_LEN: usize = 14;
pub const L3_OFF: usize = ETH_LEN;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
/// L4 offsets: IPv4 packets with options and IPv6 packets with extension headers never
/// reach the rewrite, so each family has one fixed offset.
pub const L4_OFF_V4: usize = L3_OFF + IPV4_LEN;
pub const L4_OFF_V6: usize = L3_OFF + IPV6_LEN;
pub const IPV4_CHECK_OFF: usize = L3_OFF + 10;
pub const IPV4_TTL_OFF: usize = L3_OFF + 8;
pub const IPV4_SRC_OFF: usize = L3_OFF + 12;
pub const IPV4_DST_OFF: usize = L3_OFF + 16;
pub const IPV6_HOP_LIMIT_OFF: usize = L3_OFF + 7;
pub const IPV6_SRC_OFF: usize = L3_OFF + 8;
pub const IPV6_DST_OFF: usize = L3_OFF + 24;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// The fields of a TCP/UDP packet that the NAT reads. Addresses (IPv4 in the first four
/// bytes) and ports as on the wire (network order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flow {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    pub tos: u8,
    /// L3 length (IPv4 total length; IPv6 payload length + 40), host order.
    pub l3_len: u16,
    /// L4 checksum as on the wire (host-order value of the two bytes).
    pub l4_check: u16,
    /// TCP flags byte, 0 for UDP.
    pub tcp_flags: u8,
    /// TCP sequence number (host order) and payload length; 0 for UDP.
    pub tcp_seq: u32,
    pub tcp_payload: u16,
}

impl Flow {
    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.family == FAMILY_V6
    }
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        if self.is_v6() { L4_OFF_V6 } else { L4_OFF_V4 }
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

/// IPv6 next-header values of extension headers: such packets go to the stack untouched.
#[inline(always)]
fn is_ipv6_extension(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// The L3 header of an IPv4/IPv6 packet that can carry a rewrite: (family, src, dst,
/// protocol, ttl, tos, l3 length, l4 offset).
#[inline(always)]
pub fn parse_l3<P: Packet>(pkt: &P) -> Result<(u8, [u8; 16], [u8; 16], u8, u8, u8, u16, usize), Reason> {
    let eth: [u8; ETH_LEN] = read(pkt, 0).map_err(|_| Reason::Malformed)?;
    let frame_l3_len = pkt.len().saturating_sub(L3_OFF);
    match u16::from_be_bytes([eth[12], eth[13]]) {
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
            // More-fragments flag or a fragment offset: only the stack can reassemble.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err(Reason::Fragment);
            }
            Ok((FAMILY_V4, v4_addr(&ip[12..16]), v4_addr(&ip[16..20]), ip[9], ip[8], ip[1], tot_len, L4_OFF_V4))
        }
        ETH_P_IPV6 => {
            let ip: [u8; IPV6_LEN] = read(pkt, L3_OFF)?;
            if ip[0] >> 4 != 6 {
                return Err(Reason::Malformed);
            }
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize + IPV6_LEN;
            if len > frame_l3_len {
                return Err(Reason::Malformed);
            }
            let nh = ip[6];
            if nh == 44 {
                return Err(Reason::Fragment);
            }
            if is_ipv6_extension(nh) {
                return Err(Reason::Ipv6Extension);
            }
            Ok((FAMILY_V6, v6_addr(&ip, 8), v6_addr(&ip, 24), nh, ip[7], 0, len as u16, L4_OFF_V6))
        }
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::Vlan),
        _ => Err(Reason::NotIp),
    }
}

/// Parses a TCP/UDP packet into `flow` (per-CPU working memory, see maps::work).
#[inline(always)]
pub fn parse_flow<P: Packet>(pkt: &P, flow: &mut Flow) -> Result<(), Reason> {
    let (family, src, dst, proto, ttl, tos, l3_len, l4_off) = parse_l3(pkt)?;
    let l4_len = l3_len as usize - (l4_off - L3_OFF);
    let (l4_check, tcp_flags, tcp_seq, tcp_payload) = match proto {
        PROTO_TCP => {
            let tcp: [u8; 20] = read(pkt, l4_off)?;
            let data_off = (tcp[12] >> 4) as usize * 4;
            if l4_len < 20 || data_off < 20 || data_off > l4_len {
                return Err(Reason::Malformed);
            }
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            (u16::from_be_bytes([tcp[16], tcp[17]]), tcp[13], seq, (l4_len - data_off) as u16)
        }
        PROTO_UDP => {
            let udp: [u8; 8] = read(pkt, l4_off)?;
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            if l4_len < 8 || udp_len < 8 || udp_len > l4_len {
                return Err(Reason::Malformed);
            }
            (u16::from_be_bytes([udp[6], udp[7]]), 0, 0, 0)
        }
        PROTO_ICMP if family == FAMILY_V4 => return Err(icmp_kind(pkt, l4_off, family)),
        PROTO_ICMPV6 if family == FAMILY_V6 => return Err(icmp_kind(pkt, l4_off, family)),
        _ => return Err(Reason::NotTcpUdp),
    };
    let ports: [u8; 4] = read(pkt, l4_off)?;
    *flow = Flow {
        family,
        src,
        dst,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto,
        ttl,
        tos,
        l3_len,
        l4_check,
        tcp_flags,
        tcp_seq,
        tcp_payload,
    };
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
