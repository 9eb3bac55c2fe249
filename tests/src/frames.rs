//! Frames for the kernel programs under BPF_PROG_TEST_RUN: the fixture that loads
//! forwarder in a fresh namespace with routes and neighbours and runs frames through its
//! XDP and TC programs, the TCP/UDP frame builders (etherparse), and IP fragmentation of
//! such frames with the checks a translated fragment must pass. Used by
//! tests/tests/packets.rs and tests/tests/fragments.rs.
//!
//! The FIB helper needs real routes and neighbours, so each fixture runs on a thread inside
//! a fresh network namespace with two veth pairs:
//! v0 192.0.2.1/24 (client side, neighbour 192.0.2.2) and v1 203.0.113.1/24 (server side,
//! neighbour 203.0.113.20), both with static neighbour entries.

use aya::programs::{ProgramError, TestRun, TestRunOptions, TestRunResult};
use etherparse::{Ethernet2Header, IpHeaders, PacketBuilder, PacketBuilderStep};
use forwarder::{
    config::{Config, OnForwardRemoved},
    loader::{Instance, LoadOptions},
    state::State,
};
use forwarder_common::{GlobalConfig, IFACE_XDP_EGRESS_OK, Reason};

use crate::{Netns, unique_tag};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
pub const CLIENT: [u8; 4] = [192, 0, 2, 2];
pub const ROUTER_IN: [u8; 4] = [192, 0, 2, 1];
pub const ROUTER_OUT: [u8; 4] = [203, 0, 113, 1];
pub const SERVER: [u8; 4] = [203, 0, 113, 20];

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const TC_ACT_SHOT: u32 = 2;

pub const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const ROUTER_IN6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const ROUTER_OUT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];

/// The fixture's usual forwards: TCP 3306 and UDP 53 to the backend, IPv4 (ids 1, 2) and
/// IPv6 (ids 3, 4).
pub const CONFIG: &str = r#"
[[forward]]
name = "mysql"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"

[[forward]]
name = "dns"
protocol = "udp"
listen = "192.0.2.1:53"
backend = "203.0.113.20:5353"

[[forward]]
name = "mysql6"
protocol = "tcp"
listen = "[::]:3306"
backend = "[2001:db8:2::20]:3197"

[[forward]]
name = "dns6"
protocol = "udp"
listen = "[2001:db8:1::1]:53"
backend = "[2001:db8:2::20]:5353"
"#;

pub struct Fixture {
    pub inst: Instance,
    pub state: State,
    pub v0: u32,
    pub v1: u32,
    pub v0_mac: [u8; 6],
    pub v1_mac: [u8; 6],
}

/// Runs `test` inside a fresh namespace with forwarder loaded (not attached anywhere).
pub fn with_fixture(config: &str, test: impl FnOnce(&mut Fixture) + Send + 'static) {
    let tag = unique_tag();
    let ns = Netns::new(&format!("fwt-{tag}-p")).unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    ns.sysctl("net.ipv6.conf.default.forwarding", "1").unwrap();
    for (dev, addr, neigh, mac) in [
        ("v0", "192.0.2.1/24", "192.0.2.2", "02:00:00:00:00:02"),
        ("v1", "203.0.113.1/24", "203.0.113.20", "02:00:00:00:00:20"),
    ] {
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &format!("{dev}p")]).unwrap();
        ns.ip(&["addr", "add", addr, "dev", dev]).unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
        ns.ip(&["link", "set", &format!("{dev}p"), "up"]).unwrap();
        ns.ip(&["neigh", "replace", neigh, "lladdr", mac, "dev", dev, "nud", "permanent"]).unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let (v0, v1) = (ns.ifindex("v0").unwrap(), ns.ifindex("v1").unwrap());
    let (v0_mac, v1_mac) = (ns.mac("v0").unwrap(), ns.mac("v1").unwrap());
    let cfg = Config::parse(config).unwrap();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}"));
    ns.run(move || {
        let mut inst = Instance::load(&LoadOptions::from_config(&cfg), &pin).unwrap();
        inst.detach_on_drop(true); // pins removed even if the test panics
        let state = inst.state().unwrap();
        let locals = vec![
            "192.0.2.1".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "2001:db8:1::1".parse().unwrap(),
            "2001:db8:2::1".parse().unwrap(),
        ];
        state
            .set_global(GlobalConfig {
                snat_port_min: cfg.conntrack.snat_port_min,
                snat_port_max: cfg.conntrack.snat_port_max,
                flags: 0,
                netns_cookie: 0,
                // No hole: the fixtures choose their ranges themselves.
                snat_hole_min: 1,
                snat_hole_max: 0,
                local_udp_idle_s: 0,
            })
            .unwrap();
        state.apply_forwards(&cfg.forwards, &locals, OnForwardRemoved::Drain).unwrap();
        state.set_egress(v0, IFACE_XDP_EGRESS_OK).unwrap();
        state.set_egress(v1, IFACE_XDP_EGRESS_OK).unwrap();
        let mut fx = Fixture { inst, state, v0, v1, v0_mac, v1_mac };
        test(&mut fx);
    })
    .unwrap();
}

/// BPF_PROG_TEST_RUN through `run` (a program's test_run) on `frame` with the context
/// `ctx`: (return value, output bytes).
fn test_run(
    run: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    frame: &[u8],
    ctx: &[u8],
) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let opts =
        TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(ctx), ..Default::default() };
    let r = run(opts).unwrap_or_else(|e| panic!("test run of {} bytes: {e}", frame.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

impl Fixture {
    /// XDP run as if `frame` arrived on `ifindex`: (verdict, output frame without metadata,
    /// metadata length).
    pub fn xdp(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>, usize) {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let (verdict, out) = test_run(|o| self.inst.xdp().test_run(o), frame, &ctx);
        // Output starts at the metadata; XDP writes 4 bytes of it on "not ours" passes.
        let meta = out.len() - frame.len();
        (verdict, out[meta..].to_vec(), meta)
    }

    /// TC ingress run as if `frame` arrived on `ifindex`.
    pub fn tc(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        // struct __sk_buff: ingress_ifindex at byte 36, ifindex at 40.
        let mut ctx = vec![0u8; 44];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        test_run(|o| self.inst.tc_ingress().test_run(o), frame, &ctx)
    }

    /// The XDP program's fd number, for test runs from several threads at once.
    pub fn xdp_fd(&self) -> i32 {
        use std::os::fd::{AsFd, AsRawFd};
        self.inst.xdp().fd().unwrap().as_fd().as_raw_fd()
    }

    pub fn reason(&self, r: Reason) -> u64 {
        self.state.reason_count(r).unwrap()
    }

    pub fn stats(&self, id: u32) -> forwarder_common::FwdStats {
        self.state.forward_stats(id).unwrap()
    }

    pub fn conntrack_len(&self) -> usize {
        self.state.conntrack_len().unwrap()
    }
}

/// An address etherparse builds an IP header of: IPv4 (4 bytes) or IPv6 (16), TTL 64.
pub trait IpAddress: Copy {
    fn ip_over(self, dst: Self, eth: PacketBuilderStep<Ethernet2Header>) -> PacketBuilderStep<IpHeaders>;
}

impl IpAddress for [u8; 4] {
    fn ip_over(self, dst: Self, eth: PacketBuilderStep<Ethernet2Header>) -> PacketBuilderStep<IpHeaders> {
        eth.ipv4(self, dst, 64)
    }
}

impl IpAddress for [u8; 16] {
    fn ip_over(self, dst: Self, eth: PacketBuilderStep<Ethernet2Header>) -> PacketBuilderStep<IpHeaders> {
        eth.ipv6(self, dst, 64)
    }
}

/// A TCP segment (sequence 1000, window 65000): with `syn` a SYN, or from the server
/// (`SERVER_MAC`) a SYN-ACK answering the client's; else an ACK of 5000. IPv4 or IPv6 by
/// the addresses.
#[allow(clippy::too_many_arguments)] // a frame is its fields
pub fn tcp_frame<A: IpAddress>(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = src.ip_over(dst, PacketBuilder::ethernet2(src_mac, dst_mac)).tcp(sport, dport, 1000, 65000);
    let b = if syn && src_mac == SERVER_MAC {
        b.syn().ack(1001)
    } else if syn {
        b.syn()
    } else {
        b.ack(5000)
    };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// A UDP datagram, IPv4 or IPv6 by the addresses.
pub fn udp_frame<A: IpAddress>(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    src.ip_over(dst, PacketBuilder::ethernet2(src_mac, dst_mac)).udp(sport, dport).write(&mut v, payload).unwrap();
    v
}

/// The same builders, named for the IPv6 frames they build.
pub use self::{tcp_frame as tcp6_frame, udp_frame as udp6_frame};

/// The EtherType of an Ethernet frame.
fn ether_type(frame: &[u8]) -> Option<[u8; 2]> {
    frame.get(12..14).map(|t| [t[0], t[1]])
}

/// RFC 1071 sum of `bytes` as 16-bit words (an odd last byte padded with zero), unfolded.
/// The tests' own arithmetic, so that a fault in forwarder's cannot hide itself.
fn sum_words(bytes: &[u8]) -> u64 {
    bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64).sum()
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Splits a frame holding one whole IPv4 (no options) or IPv6 (no extension headers)
/// datagram into fragments carrying at most `chunk` bytes of its payload each (a multiple
/// of 8), as a sender's stack does: IPv4 with identification `id` (its low 16 bits), MF on
/// all but the last and a fresh header checksum; IPv6 with a fragment header (RFC 8200
/// 4.5) of identification `id` after the fixed header.
pub fn fragment(frame: &[u8], id: u32, chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk > 0 && chunk.is_multiple_of(8), "fragment payloads are multiples of 8 bytes");
    let v6 = ether_type(frame) == Some([0x86, 0xdd]);
    let l3 = &frame[14..];
    let (hdr_len, total) = if v6 {
        (40, 40 + u16::from_be_bytes([l3[4], l3[5]]) as usize)
    } else {
        assert_eq!(l3[0], 0x45, "IPv4 without options");
        (20, u16::from_be_bytes([l3[2], l3[3]]) as usize)
    };
    let payload = &l3[hdr_len..total];
    let mut out = Vec::new();
    for start in (0..payload.len()).step_by(chunk) {
        let end = (start + chunk).min(payload.len());
        let more = end < payload.len();
        let mut f = frame[..14].to_vec();
        let mut ip = l3[..hdr_len].to_vec();
        if v6 {
            let next = ip[6];
            ip[6] = 44;
            ip[4..6].copy_from_slice(&((8 + end - start) as u16).to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&(((start / 8) as u16) << 3 | more as u16).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        } else {
            ip[2..4].copy_from_slice(&((20 + end - start) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            ip[6..8].copy_from_slice(&((more as u16) << 13 | (start / 8) as u16).to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let check = !fold(sum_words(&ip));
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        f.extend_from_slice(&payload[start..end]);
        out.push(f);
    }
    out
}

/// What an IP fragment is, read from its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentInfo {
    /// Offset of its payload within the datagram's, in bytes.
    pub offset: usize,
    pub more: bool,
    pub id: u32,
    /// The datagram's protocol.
    pub proto: u8,
    /// Where its payload (the L4 header, for the first fragment) starts in the frame.
    pub payload_at: usize,
    /// Where it ends (the IP length; padding after it is not the fragment's).
    pub end: usize,
}

/// The fragment fields of an IPv4 fragment (MF or an offset) or of an IPv6 packet with a
/// fragment header right after the fixed header; `None` for anything else.
pub fn fragment_info(frame: &[u8]) -> Option<FragmentInfo> {
    match ether_type(frame)? {
        [0x08, 0x00] => {
            let ip = frame.get(14..34)?;
            let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
            if ip[0] != 0x45 || flags_offset & 0x3fff == 0 {
                return None;
            }
            let end = 14 + u16::from_be_bytes([ip[2], ip[3]]) as usize;
            Some(FragmentInfo {
                offset: (flags_offset & 0x1fff) as usize * 8,
                more: flags_offset & 0x2000 != 0,
                id: u16::from_be_bytes([ip[4], ip[5]]) as u32,
                proto: ip[9],
                payload_at: 34,
                end: (end >= 34 && end <= frame.len()).then_some(end)?,
            })
        }
        [0x86, 0xdd] => {
            let ip = frame.get(14..62)?;
            if ip[6] != 44 {
                return None;
            }
            let offset_m = u16::from_be_bytes([ip[42], ip[43]]);
            let end = 54 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
            Some(FragmentInfo {
                offset: (offset_m >> 3) as usize * 8,
                more: offset_m & 1 != 0,
                id: u32::from_be_bytes([ip[44], ip[45], ip[46], ip[47]]),
                proto: ip[40],
                payload_at: 62,
                end: (end >= 62 && end <= frame.len()).then_some(end)?,
            })
        }
        _ => None,
    }
}

/// What a translation must keep of an IP fragment (see [`fragment_info`]), `None` for any
/// other frame: (whether its IPv4 header checksum is valid, true for IPv6; for a fragment
/// that carries the TCP/UDP header, the folded sum of its pseudo-header addresses and its
/// L4 bytes, checksum included). A correct rewrite of addresses, ports and checksum keeps
/// that sum, since the rest of the datagram, which the checksum covers too, is unchanged;
/// `None` for a later fragment, a UDP datagram without checksum (zero, kept) and one too
/// short to hold its L4 header.
pub fn fragment_invariants(frame: &[u8]) -> Option<(bool, Option<u16>)> {
    let info = fragment_info(frame)?;
    let v6 = ether_type(frame) == Some([0x86, 0xdd]);
    let header_ok = v6 || ipv4_header_ok(&frame[14..34]);
    let l4 = &frame[info.payload_at..info.end];
    let check_at = match info.proto {
        6 => 16,
        17 => 6,
        _ => return Some((header_ok, None)),
    };
    if info.offset != 0 || l4.len() < check_at + 2 || (info.proto == 17 && l4[check_at..check_at + 2] == [0, 0]) {
        return Some((header_ok, None));
    }
    let addrs = if v6 { &frame[22..54] } else { &frame[26..34] };
    Some((header_ok, Some(fold(sum_words(addrs) + sum_words(l4)))))
}

/// Whether an IPv4 header's checksum is valid.
pub fn ipv4_header_ok(header: &[u8]) -> bool {
    fold(sum_words(header)) == 0xffff
}

/// Whether the ICMP (IPv4: over the message) or ICMPv6 (IPv6: pseudo header too) checksum
/// of an ICMP frame without options or extension headers is valid.
pub fn icmp_checksum_ok(frame: &[u8]) -> bool {
    if ether_type(frame) == Some([0x86, 0xdd]) {
        let len = u16::from_be_bytes([frame[18], frame[19]]) as usize;
        let pseudo = sum_words(&frame[22..54]) + len as u64 + 58;
        fold(pseudo + sum_words(&frame[54..54 + len])) == 0xffff
    } else {
        let len = u16::from_be_bytes([frame[16], frame[17]]) as usize;
        fold(sum_words(&frame[34..14 + len])) == 0xffff
    }
}

/// What a TCP/UDP frame's checksums say (IPv4 without options, IPv6 without extension
/// headers; see [`wire_checksums`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireChecksums {
    /// The IPv4 header checksum is valid (always for IPv6).
    pub ip_header_ok: bool,
    /// The L4 checksum is valid over pseudo header and segment (an IPv4 UDP datagram
    /// without checksum counts as valid).
    pub l4_ok: bool,
    /// The L4 checksum field holds the pseudo header's folded sum: a CHECKSUM_PARTIAL seed,
    /// for the device to add the segment's sum to.
    pub l4_is_seed: bool,
}

/// The checksums of an IPv4 or IPv6 TCP/UDP frame as captured, with the tests' own
/// arithmetic; `None` for any other frame or one shorter than its IP length.
pub fn wire_checksums(frame: &[u8]) -> Option<WireChecksums> {
    let v6 = match ether_type(frame)? {
        [0x08, 0x00] => false,
        [0x86, 0xdd] => true,
        _ => return None,
    };
    let (proto, l4_at, end, ip_header_ok) = if v6 {
        let payload = u16::from_be_bytes([*frame.get(18)?, *frame.get(19)?]) as usize;
        (*frame.get(20)?, 54, 54 + payload, true)
    } else {
        if *frame.get(14)? != 0x45 {
            return None;
        }
        let total = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]) as usize;
        (*frame.get(23)?, 34, 14 + total, ipv4_header_ok(frame.get(14..34)?))
    };
    let check_at = match proto {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    let l4 = frame.get(l4_at..end)?;
    let check = u16::from_be_bytes([*l4.get(check_at)?, *l4.get(check_at + 1)?]);
    let addrs = if v6 { &frame[22..54] } else { &frame[26..34] };
    let pseudo = sum_words(addrs) + proto as u64 + l4.len() as u64;
    Some(WireChecksums {
        ip_header_ok,
        l4_ok: (!v6 && proto == 17 && check == 0) || fold(pseudo + sum_words(l4)) == 0xffff,
        l4_is_seed: check == fold(pseudo),
    })
}
