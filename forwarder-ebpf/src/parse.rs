//! Header parsing: Ethernet, IPv4 without options, TCP/UDP ports and checksum.
//! Anything the fast path does not rewrite is reported as a [`Reason`] and passed untouched.

use forwarder_common::{PROTO_TCP, PROTO_UDP, Reason};

use crate::ctx::{Packet, read};

pub const ETH_LEN: usize = 14;
/// IPv4 header offset; packets with IP options never reach the rewrite, so L4 is fixed.
pub const L3_OFF: usize = ETH_LEN;
pub const IPV4_LEN: usize = 20;
pub const L4_OFF: usize = L3_OFF + IPV4_LEN;
pub const IPV4_CHECK_OFF: usize = L3_OFF + 10;
pub const IPV4_TTL_OFF: usize = L3_OFF + 8;
pub const IPV4_SRC_OFF: usize = L3_OFF + 12;
pub const IPV4_DST_OFF: usize = L3_OFF + 16;
pub const L4_SPORT_OFF: usize = L4_OFF;
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
pub const TCP_CHECK_OFF: usize = L4_OFF + 16;
pub const UDP_CHECK_OFF: usize = L4_OFF + 6;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// The fields of an IPv4 TCP/UDP packet that the NAT reads. Addresses and ports as on the
/// wire (network order).
#[derive(Clone, Copy)]
pub struct Ipv4Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub ttl: u8,
    pub tos: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
    /// L4 checksum as on the wire (host-order value of the two bytes).
    pub l4_check: u16,
    /// TCP flags byte, 0 for UDP.
    pub tcp_flags: u8,
}

impl Ipv4Flow {
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF }
    }
}

#[inline(always)]
pub fn parse_ipv4<P: Packet>(pkt: &P) -> Result<Ipv4Flow, Reason> {
    let eth: [u8; ETH_LEN] = read(pkt, 0).map_err(|_| Reason::Malformed)?;
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {}
        ETH_P_IPV6 => return Err(Reason::Ipv6),
        ETH_P_8021Q | ETH_P_8021AD => return Err(Reason::Vlan),
        _ => return Err(Reason::NotIp),
    }
    let ip: [u8; IPV4_LEN] = read(pkt, L3_OFF)?;
    if ip[0] >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    let ihl = ip[0] & 0x0f;
    if ihl < 5 {
        return Err(Reason::Malformed);
    }
    if ihl > 5 {
        return Err(Reason::IpOptions);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    let frame_l3_len = pkt.len().saturating_sub(L3_OFF);
    if (tot_len as usize) < IPV4_LEN || tot_len as usize > frame_l3_len {
        return Err(Reason::Malformed);
    }
    // More-fragments flag or a fragment offset: only the stack can reassemble.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Reason::Fragment);
    }
    let proto = ip[9];
    let l4_len = tot_len as usize - IPV4_LEN;
    let (l4_check, tcp_flags) = match proto {
        PROTO_TCP => {
            let tcp: [u8; 20] = read(pkt, L4_OFF)?;
            let data_off = (tcp[12] >> 4) as usize * 4;
            if l4_len < 20 || data_off < 20 || data_off > l4_len {
                return Err(Reason::Malformed);
            }
            (u16::from_be_bytes([tcp[16], tcp[17]]), tcp[13])
        }
        PROTO_UDP => {
            let udp: [u8; 8] = read(pkt, L4_OFF)?;
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            if l4_len < 8 || udp_len < 8 || udp_len > l4_len {
                return Err(Reason::Malformed);
            }
            (u16::from_be_bytes([udp[6], udp[7]]), 0)
        }
        _ => return Err(Reason::NotTcpUdp),
    };
    let ports: [u8; 4] = read(pkt, L4_OFF)?;
    Ok(Ipv4Flow {
        src: [ip[12], ip[13], ip[14], ip[15]],
        dst: [ip[16], ip[17], ip[18], ip[19]],
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto,
        ttl: ip[8],
        tos: ip[1],
        tot_len,
        l4_check,
        tcp_flags,
    })
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

pub const IPV6_HOP_LIMIT_OFF: usize = L3_OFF + 7;

#[inline(always)]
pub fn parse_l3_dst<P: Packet>(pkt: &P) -> Result<L3Dst, Reason> {
    let eth: [u8; ETH_LEN] = read(pkt, 0)?;
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip: [u8; IPV4_LEN] = read(pkt, L3_OFF)?;
            let d = [ip[16], ip[17], ip[18], ip[19]];
            Ok(L3Dst {
                family: forwarder_common::FAMILY_V4,
                addr: [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                len: u16::from_be_bytes([ip[2], ip[3]]),
                ttl: ip[8],
            })
        }
        ETH_P_IPV6 => {
            let ip: [u8; 40] = read(pkt, L3_OFF)?;
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&ip[24..40]);
            Ok(L3Dst {
                family: forwarder_common::FAMILY_V6,
                addr,
                len: u16::from_be_bytes([ip[4], ip[5]]).saturating_add(40),
                ttl: ip[7],
            })
        }
        _ => Err(Reason::NotIp),
    }
}
