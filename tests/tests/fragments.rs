//! Fragments of forwarded datagrams (issue 14): a UDP answer of 3,000 bytes (DNS with EDNS,
//! say) crosses a 1500-byte link as three fragments, and so does a request that large.
//!
//! First on crafted frames through BPF_PROG_TEST_RUN (forwarder_tests::frames): fragments
//! in order, both ways, IPv4 and IPv6, TCP fragments that must not move the connection's
//! state, and fragments that come before their first fragment or after its record has
//! aged, which are passed untouched and counted. Then end to end and differential in
//! client ─ router ─ mid ─ server (forwarder_tests::topo::Line, MTU 1500, dual stack):
//! iptables/ip6tables DNAT + MASQUERADE on the router as the control, then forwarder with
//! XDP native, XDP generic and TC only; the client's socket must receive exactly the
//! 3,000 bytes each time, and forwarder's counters must show the fragments translated.

use std::{
    net::{SocketAddr, UdpSocket},
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use forwarder_common::{
    FWD_FRAG_V1, FragKey, FragValue, Reason,
    conntrack::{TCP_ESTABLISHED, UDP_REPLIED},
};
use forwarder_tests::{
    Daemon, Netns,
    frames::{
        CLIENT, CLIENT_MAC, CLIENT6, CONFIG, Fixture, ROUTER_IN, ROUTER_IN6, ROUTER_OUT, ROUTER_OUT6, SERVER,
        SERVER_MAC, SERVER6, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, fragment, fragment_info, fragment_invariants,
        icmp_checksum_ok, ipv4_header_ok, tcp_frame, udp_frame, udp6_frame, with_fixture,
    },
    netns::run_ok,
    sockets::{serve_in, udp_bound},
    topo::Line,
};

/// Payload bytes per fragment on a 1500-byte link: IPv4 1500 - 20, IPv6 1500 - 40 - 8
/// rounded down to a multiple of 8.
const CHUNK4: usize = 1480;
const CHUNK6: usize = 1448;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Where a frame's addresses and TTL / hop limit sit: (source, destination, ttl) offsets
/// and the address length.
fn l3_fields(frame: &[u8]) -> (usize, usize, usize, usize) {
    if frame[12..14] == [0x86, 0xdd] { (22, 38, 21, 16) } else { (26, 30, 22, 4) }
}

/// A translated fragment against the one that came in: the same fragment of the same
/// datagram (identification, offset, flags, protocol, length), now `src` → `dst` with a
/// valid IPv4 header checksum and the TTL one lower when TC sent it (`sent`; the stack
/// decrements what it is handed), and its bytes from `unchanged_from` on (past the L4
/// header of a first fragment, the whole payload of a later one) as they were.
fn assert_translated(input: &[u8], out: &[u8], src: &[u8], dst: &[u8], unchanged_from: usize, sent: bool) {
    let info = fragment_info(input).expect("a fragment went in");
    assert_eq!(fragment_info(out), Some(info), "the same fragment of the same datagram");
    assert_eq!(out.len(), input.len());
    let (s, d, ttl, n) = l3_fields(out);
    assert_eq!((&out[s..s + n], &out[d..d + n]), (src, dst), "addresses");
    assert_eq!(out[ttl], input[ttl] - sent as u8, "TTL / hop limit");
    assert_eq!(fragment_invariants(out).map(|v| v.0), Some(true), "IPv4 header checksum");
    let from = info.payload_at + unchanged_from;
    assert!(out[from..] == input[from..], "payload past byte {unchanged_from} unchanged");
}

/// The ports and L4 checksum of a first fragment (offset of its L4 header given).
fn l4_of(frame: &[u8], at: usize, check_at: usize) -> (u16, u16, u16) {
    (be16(&frame[at..]), be16(&frame[at + 2..]), be16(&frame[at + check_at..]))
}

/// The records of `FWD_FRAG_V1`.
fn frag_records(fx: &Fixture) -> Vec<(FragKey, FragValue)> {
    let map = MapData::from_pin(fx.inst.pin_dir.join(FWD_FRAG_V1)).unwrap();
    let map: HashMap<_, FragKey, FragValue> = HashMap::try_from(Map::from_map_data(map).unwrap()).unwrap();
    map.iter().map(|e| e.unwrap()).collect()
}

fn frag_record(fx: &Fixture, src: &[u8], id: u32) -> Option<(FragKey, FragValue)> {
    frag_records(fx).into_iter().find(|(k, _)| &k.src_addr[..src.len()] == src && k.id == id)
}

/// Runs the fragments through TC as arriving on `ifindex`; every one must be forwarded
/// (redirected, or for IPv6 in this fixture handed to the stack rewritten).
fn tc_all(fx: &Fixture, frags: &[Vec<u8>], ifindex: u32) -> Vec<Vec<u8>> {
    frags
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (verdict, out) = fx.tc(f, ifindex);
            assert!(verdict == TC_ACT_REDIRECT || verdict == TC_ACT_OK && out != *f, "fragment {i}: {verdict}");
            out
        })
        .collect()
}

/// A 3,000-byte query and a 3,000-byte answer, each in three fragments: XDP hands them to
/// TC untouched; TC translates the first fragment with its L4 header (the checksum is that
/// of the whole datagram translated) and the later ones by the first's record, in both
/// directions, and the answer's fragments make the flow replied.
#[test]
fn ipv4_udp_fragments_are_translated_both_ways() {
    with_fixture(CONFIG, |fx| {
        let query = pattern(3000, 1);
        let datagram = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5000, 53, &query);
        let frags = fragment(&datagram, 0x1234, CHUNK4);
        assert_eq!(frags.len(), 3);
        for (i, f) in frags.iter().enumerate() {
            let (verdict, out, meta) = fx.xdp(f, fx.v0);
            assert_eq!((verdict, out == *f, meta), (XDP_PASS, true, 0), "XDP leaves fragment {i} to TC");
        }
        assert_eq!(fx.reason(Reason::XdpToTc), 3);
        assert_eq!(fx.conntrack_len(), 0, "XDP committed nothing");

        let outs = tc_all(fx, &frags, fx.v0);
        let (snat_port, bport, check) = l4_of(&outs[0], 34, 6);
        assert_eq!(bport, 5353);
        let whole = udp_frame(fx.v1_mac, SERVER_MAC, ROUTER_OUT, SERVER, snat_port, 5353, &query);
        assert_eq!(check, be16(&whole[40..]), "the first fragment's checksum is the whole translated datagram's");
        for (i, (f, out)) in frags.iter().zip(&outs).enumerate() {
            assert_translated(f, out, &ROUTER_OUT, &SERVER, if i == 0 { 8 } else { 0 }, true);
            assert_eq!((&out[..6], &out[6..12]), (&SERVER_MAC[..], &fx.v1_mac[..]), "fragment {i}: next hop");
        }
        assert_eq!(fx.reason(Reason::RedirectTc), 3);
        assert_eq!(fx.reason(Reason::FragmentTranslated), 3);
        assert_eq!(fx.reason(Reason::FragmentUnknown), 0);
        assert_eq!((fx.stats(2).packets, fx.stats(2).new_conns), (3, 1));
        assert_eq!(fx.conntrack_len(), 2);
        // Recorded under the datagram's addresses and identification as they came in.
        let (key, value) = frag_record(fx, &CLIENT, 0x1234).expect("the first fragment's record");
        assert_eq!((&key.dst_addr[..4], key.proto, key.family), (&ROUTER_IN[..], 17, 4));
        assert_eq!((u16::from_be(value.src_port_be), u16::from_be(value.dst_port_be)), (5000, 53));

        // The backend's answer, fragmented by its stack.
        let answer = pattern(3000, 2);
        let datagram = udp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 5353, snat_port, &answer);
        let frags = fragment(&datagram, 0x4321, CHUNK4);
        let outs = tc_all(fx, &frags, fx.v1);
        let whole = udp_frame(fx.v0_mac, CLIENT_MAC, ROUTER_IN, CLIENT, 53, 5000, &answer);
        assert_eq!(l4_of(&outs[0], 34, 6), (53, 5000, be16(&whole[40..])));
        for (i, (f, out)) in frags.iter().zip(&outs).enumerate() {
            assert_translated(f, out, &ROUTER_IN, &CLIENT, if i == 0 { 8 } else { 0 }, true);
        }
        assert_eq!(fx.reason(Reason::FragmentTranslated), 6);
        let states: Vec<u8> = fx.state.conntrack().unwrap().iter().map(|(_, v)| v.state).collect();
        assert_eq!(states, [UDP_REPLIED, UDP_REPLIED], "the answer's first fragment made the flow replied");
        assert_eq!(fx.stats(2).packets, 6);
    });
}

/// The same for IPv6, whose L4 header sits behind the 8-byte fragment header; and an
/// "atomic" fragment (offset 0, no more fragments: a whole datagram with a fragment header)
/// is translated as a whole datagram.
#[test]
fn ipv6_udp_fragments_are_translated_both_ways() {
    with_fixture(CONFIG, |fx| {
        let query = pattern(3000, 3);
        let datagram = udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 5000, 53, &query);
        let frags = fragment(&datagram, 0xdead_beef, CHUNK6);
        assert_eq!(frags.len(), 3);
        for f in &frags {
            let (verdict, out, meta) = fx.xdp(f, fx.v0);
            assert_eq!((verdict, out == *f, meta), (XDP_PASS, true, 0), "XDP leaves it to TC");
        }
        let outs = tc_all(fx, &frags, fx.v0);
        // Without a FIB answer for IPv6 in this fixture, SNAT takes the address the client
        // reached (see packets.rs, ipv6_tcp_and_udp_rewrites).
        let snat: [u8; 16] = outs[0][22..38].try_into().unwrap();
        assert!(snat == ROUTER_OUT6 || snat == ROUTER_IN6, "SNAT to one of the router's addresses");
        let (snat_port, bport, check) = l4_of(&outs[0], 62, 6);
        assert_eq!(bport, 5353);
        let whole = udp6_frame(CLIENT_MAC, fx.v0_mac, snat, SERVER6, snat_port, 5353, &query);
        assert_eq!(check, be16(&whole[60..]), "the first fragment's checksum is the whole translated datagram's");
        for (i, (f, out)) in frags.iter().zip(&outs).enumerate() {
            assert_translated(f, out, &snat, &SERVER6, if i == 0 { 8 } else { 0 }, false);
        }
        assert_eq!(fx.reason(Reason::FragmentTranslated), 3);
        let (key, value) = frag_record(fx, &CLIENT6, 0xdead_beef).expect("the first fragment's record");
        assert_eq!((key.dst_addr, key.proto, key.family), (ROUTER_IN6, 17, 6));
        assert_eq!((u16::from_be(value.src_port_be), u16::from_be(value.dst_port_be)), (5000, 53));

        let answer = pattern(3000, 4);
        let datagram = udp6_frame(SERVER_MAC, fx.v1_mac, SERVER6, snat, 5353, snat_port, &answer);
        let frags = fragment(&datagram, 7, CHUNK6);
        let outs = tc_all(fx, &frags, fx.v1);
        let whole = udp6_frame(CLIENT_MAC, fx.v0_mac, ROUTER_IN6, CLIENT6, 53, 5000, &answer);
        assert_eq!(l4_of(&outs[0], 62, 6), (53, 5000, be16(&whole[60..])));
        for (i, (f, out)) in frags.iter().zip(&outs).enumerate() {
            assert_translated(f, out, &ROUTER_IN6, &CLIENT6, if i == 0 { 8 } else { 0 }, false);
        }
        assert_eq!(fx.reason(Reason::FragmentTranslated), 6);
        assert_eq!(fx.stats(4).packets, 6);

        // An atomic fragment: translated whole, not counted as a fragment.
        let small = udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 5000, 53, b"atomic");
        let atomic = fragment(&small, 9, CHUNK6).remove(0);
        let info = fragment_info(&atomic).unwrap();
        assert_eq!((info.offset, info.more), (0, false));
        let out = tc_all(fx, std::slice::from_ref(&atomic), fx.v0).remove(0);
        let whole = udp6_frame(CLIENT_MAC, fx.v0_mac, snat, SERVER6, snat_port, 5353, b"atomic");
        assert_eq!(l4_of(&out, 62, 6), (snat_port, 5353, be16(&whole[60..])));
        assert_translated(&atomic, &out, &snat, &SERVER6, 8, false);
        assert_eq!(fx.reason(Reason::FragmentTranslated), 6);
    });
}

/// A TCP segment of an established connection, fragmented: later fragments carry no TCP
/// flags, which netfilter's state table refuses as a segment (INVALID) — as fragments they
/// are translated and leave the connection's state alone.
#[test]
fn tcp_later_fragments_are_translated_and_move_no_state() {
    with_fixture(CONFIG, |fx| {
        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, true, b"");
        let (_, out) = fx.tc(&syn, fx.v0);
        let snat_port = be16(&out[34..]);
        fx.tc(&tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, true, b""), fx.v1);
        fx.tc(&tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, false, b""), fx.v0);
        let states = || fx.state.conntrack().unwrap().iter().map(|(_, v)| v.state).collect::<Vec<_>>();
        assert_eq!(states(), [TCP_ESTABLISHED, TCP_ESTABLISHED]);

        let data = pattern(3000, 5);
        let segment = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, false, &data);
        let frags = fragment(&segment, 77, CHUNK4);
        let outs = tc_all(fx, &frags, fx.v0);
        let whole = tcp_frame(fx.v1_mac, SERVER_MAC, ROUTER_OUT, SERVER, snat_port, 3197, false, &data);
        assert_eq!(l4_of(&outs[0], 34, 16), (snat_port, 3197, be16(&whole[50..])));
        for (i, (f, out)) in frags.iter().zip(&outs).enumerate() {
            assert_translated(f, out, &ROUTER_OUT, &SERVER, if i == 0 { 20 } else { 0 }, true);
        }
        assert_eq!(fx.reason(Reason::CtInvalid), 0, "no fragment refused as a segment without flags");
        assert_eq!(fx.reason(Reason::FragmentTranslated), 3);
        assert_eq!(states(), [TCP_ESTABLISHED, TCP_ESTABLISHED]);
    });
}

/// Later fragments that cannot be attributed are passed untouched and counted
/// (`fragment_unknown`), never rewritten by a guess: one before its first fragment (out of
/// order: the stack then holds it for reassembly against the router's own address and
/// drops it when reassembly times out), one of a datagram whose first fragment was never
/// seen, and one whose record is older than a second (its identification may be reused).
/// The fragments after the first are translated as usual. IPv4 and IPv6.
#[test]
fn fragments_before_their_first_or_after_its_record_aged_pass_untouched() {
    with_fixture(CONFIG, |fx| {
        let cases = [
            (udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5001, 53, &pattern(3000, 6)), 0x0101, CHUNK4),
            (udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 5001, 53, &pattern(3000, 7)), 0x0202, CHUNK6),
        ];
        let mut unknown = 0;
        for (n, (datagram, id, chunk)) in cases.into_iter().enumerate() {
            let frags = fragment(&datagram, id, chunk);
            let passed_untouched = |f: &Vec<u8>, what: &str, unknown: &mut u64| {
                let (verdict, out) = fx.tc(f, fx.v0);
                assert_eq!((verdict, out == *f), (TC_ACT_OK, true), "{n}: {what}: passed untouched");
                *unknown += 1;
                assert_eq!(fx.reason(Reason::FragmentUnknown), *unknown, "{n}: {what}: counted");
            };
            let (verdict, out, _) = fx.xdp(&frags[2], fx.v0);
            assert_eq!((verdict, out == frags[2]), (XDP_PASS, true), "{n}: XDP leaves it to TC");
            passed_untouched(&frags[2], "the last fragment first", &mut unknown);
            assert_eq!(fx.conntrack_len(), 2 * n, "{n}: a later fragment opens no flow");
            let translated = fx.reason(Reason::FragmentTranslated);
            let outs = tc_all(fx, &frags[..2], fx.v0);
            let (s, d, _, len) = l3_fields(&outs[0]);
            assert_translated(&frags[1], &outs[1], &outs[0][s..s + len], &outs[0][d..d + len], 0, n == 0);
            assert_eq!(fx.reason(Reason::FragmentTranslated), translated + 2);

            // A later fragment of another datagram between the same hosts.
            let other = fragment(&datagram, id + 1, chunk);
            passed_untouched(&other[1], "a datagram whose first fragment never came", &mut unknown);

            // The record aged: its datagram's identification may since be another's.
            let (key, mut value) = frag_record(fx, &datagram[if n == 0 { 26..30 } else { 22..38 }], id).unwrap();
            value.first_ns = 0;
            let map = MapData::from_pin(fx.inst.pin_dir.join(FWD_FRAG_V1)).unwrap();
            let mut map: HashMap<_, FragKey, FragValue> = HashMap::try_from(Map::from_map_data(map).unwrap()).unwrap();
            map.insert(key, value, 0).unwrap();
            passed_untouched(&frags[2], "a record older than a second", &mut unknown);
        }
        assert_eq!(fx.reason(Reason::Fragment), 0, "none taken for a fragment of no forward");
    });
}

/// ICMP errors about a fragmented datagram (a router beyond the forwarder asking for a
/// smaller MTU) quote its fragment: one quoting the first fragment, which holds the ports
/// (IPv6: behind the quoted fragment header), is translated back to the client like any
/// error about its connection; one quoting a later fragment cannot be attributed and goes
/// to the stack untouched.
#[test]
fn icmp_errors_quoting_a_first_fragment_are_translated() {
    with_fixture(CONFIG, |fx| {
        let hop4 = [203, 0, 113, 99];
        let hop6 = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99];
        let cases = [
            (udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5002, 53, &pattern(3000, 8)), CHUNK4),
            (udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 5002, 53, &pattern(3000, 9)), CHUNK6),
        ];
        for (n, (datagram, chunk)) in cases.into_iter().enumerate() {
            let outs = tc_all(fx, &fragment(&datagram, 0x5555, chunk), fx.v0);
            for (i, quoted) in outs.iter().take(2).enumerate() {
                // The error quotes what fits: the headers and a little payload.
                let quote = &quoted[14..14 + 120];
                let mut err = Vec::new();
                let eth = PacketBuilder::ethernet2(SERVER_MAC, fx.v1_mac);
                if n == 0 {
                    let snat: [u8; 4] = quoted[26..30].try_into().unwrap();
                    let need_frag = DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 };
                    let icmp = eth.ipv4(hop4, snat, 64).icmpv4(Icmpv4Type::DestinationUnreachable(need_frag));
                    icmp.write(&mut err, quote).unwrap();
                } else {
                    let snat: [u8; 16] = quoted[22..38].try_into().unwrap();
                    let icmp = eth.ipv6(hop6, snat, 64).icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 });
                    icmp.write(&mut err, quote).unwrap();
                }
                let (before_translated, before_passed) =
                    (fx.reason(Reason::IcmpTranslated), fx.reason(Reason::IcmpError));
                let (verdict, out) = fx.tc(&err, fx.v1);
                if i > 0 {
                    assert_eq!((verdict, out == err), (TC_ACT_OK, true), "{n}: a later fragment's error: untouched");
                    assert_eq!(fx.reason(Reason::IcmpError), before_passed + 1);
                    continue;
                }
                assert_eq!(fx.reason(Reason::IcmpTranslated), before_translated + 1, "{n}: translated");
                assert!(icmp_checksum_ok(&out), "{n}: ICMP checksum");
                // The outer header goes to the client; the quote is what the client sent.
                let (s, d, _, len) = l3_fields(&out);
                let (client, listen) =
                    if n == 0 { (&CLIENT[..], &ROUTER_IN[..]) } else { (&CLIENT6[..], &ROUTER_IN6[..]) };
                assert_eq!(&out[d..d + len], client, "{n}: to the client");
                assert_eq!(&out[s..s + len], if n == 0 { &hop4[..] } else { &hop6[..] }, "{n}: from the hop");
                // The quote: its IPv4 header (addresses at 12 and 16, ports after 20 bytes)
                // or IPv6 header (8 and 24) and fragment header (ports after 48 bytes).
                let q = &out[if n == 0 { 14 + 20 + 8 } else { 14 + 40 + 8 }..];
                let (qs, qd, l4) = if n == 0 { (12, 16, 20) } else { (8, 24, 48) };
                assert_eq!((&q[qs..qs + len], &q[qd..qd + len]), (client, listen), "{n}: quoted addresses");
                assert_eq!((be16(&q[l4..]), be16(&q[l4 + 2..])), (5002, 53), "{n}: quoted ports");
                assert!(n == 1 || ipv4_header_ok(&q[..20]), "quoted IPv4 header checksum");
            }
        }
    });
}

// End to end.

/// How the router forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// iptables/ip6tables DNAT + MASQUERADE (netfilter reassembles and refragments).
    Iptables,
    XdpNative,
    XdpGeneric,
    TcOnly,
}

const ANSWER_LEN: usize = 3000;

/// The router's listen addresses and the backend's, IPv4 then IPv6.
const FORWARDS: [(&str, &str, &str); 2] = [
    ("192.0.2.1:53", "203.0.113.20:5353", "198.51.100.1"),
    ("[2001:db8:1::1]:53", "[2001:db8:2::20]:5353", "2001:db8:3::1"),
];

fn forwarder_config(xdp: &str) -> String {
    format!(
        r#"
[[interface]]
name = "rc"
xdp = "{xdp}"

[[interface]]
name = "rm"
xdp = "{xdp}"

[[forward]]
name = "dns"
protocol = "udp"
listen = "0.0.0.0:53"
backend = "{}"

[[forward]]
name = "dns6"
protocol = "udp"
listen = "[::]:53"
backend = "{}"
"#,
        FORWARDS[0].1, FORWARDS[1].1
    )
}

/// A fresh Line (client ─ router ─ mid ─ server, MTU 1500) whose router forwards UDP :53
/// to the backend's :5353 by `via`.
struct Sandbox {
    // Field order is drop order: the daemon stops before its namespaces go.
    daemon: Option<Daemon>,
    line: Line,
}

impl Sandbox {
    fn new(via: Via) -> Self {
        let line = Line::new(1500).unwrap();
        let xdp = match via {
            Via::Iptables => {
                for (tool, to) in [("iptables", FORWARDS[0].1), ("ip6tables", FORWARDS[1].1)] {
                    for rule in [
                        format!("-t nat -A PREROUTING -i rc -p udp --dport 53 -j DNAT --to-destination {to}"),
                        "-t nat -A POSTROUTING -o rm -j MASQUERADE".to_string(),
                    ] {
                        // Inside the router's namespace only (nsenter --net).
                        run_ok(line.router.cmd(tool).args(rule.split(' '))).unwrap();
                    }
                }
                return Self { daemon: None, line };
            }
            Via::XdpNative => "native",
            Via::XdpGeneric => "generic",
            Via::TcOnly => "off",
        };
        let daemon = Daemon::start(&line.router, &line.tag, &forwarder_config(xdp)).unwrap();
        Self { daemon: Some(daemon), line }
    }
}

/// The backend: answers a short datagram (a query) with `ANSWER_LEN` bytes of a pattern
/// and a long one with its bytes each plus one, twice; returns the peers it saw.
fn backend(ns: &Netns, addr: &'static str) -> JoinHandle<Vec<SocketAddr>> {
    serve_in(
        ns,
        "backend",
        move || udp_bound(addr, Duration::from_secs(10)),
        |s| {
            let mut peers = Vec::new();
            let mut buf = vec![0u8; 65536];
            for _ in 0..2 {
                let Ok((n, peer)) = s.recv_from(&mut buf) else { break };
                peers.push(peer);
                let reply = if n < 16 {
                    pattern(ANSWER_LEN, buf[0])
                } else {
                    buf[..n].iter().map(|b| b.wrapping_add(1)).collect()
                };
                s.send_to(&reply, peer).unwrap();
            }
            peers
        },
    )
    .expect("backend bound")
}

/// From the client: a short query answered with 3,000 bytes, then a 3,000-byte request
/// answered with as many; each answer must arrive whole, from the listen address.
fn client_exchanges(ns: &Netns, to: &'static str) -> Result<(), String> {
    ns.run(move || {
        let to: SocketAddr = to.parse().unwrap();
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 65536];
        let request = pattern(ANSWER_LEN, 9);
        for (what, sent, want) in [
            ("query", b"query".to_vec(), pattern(ANSWER_LEN, b'q')),
            ("3,000-byte request", request.clone(), request.iter().map(|b| b.wrapping_add(1)).collect()),
        ] {
            s.send_to(&sent, to).map_err(|e| format!("{what}: send: {e}"))?;
            let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("{what}: no answer: {e}"))?;
            if (n, from) != (want.len(), to) || buf[..n] != want[..] {
                return Err(format!("{what}: {n} bytes from {from}, want {} from {to}", want.len()));
            }
        }
        Ok(())
    })
    .unwrap()
}

/// A reason's entry in `stats --json`.
fn reason<'a>(stats: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    stats["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap()
}

/// Both exchanges over IPv4 and IPv6 through the router, as `via` forwards.
fn large_datagrams_both_ways(via: Via) {
    let sb = Sandbox::new(via);
    for (listen, backend_addr, router_addr) in FORWARDS {
        let server = backend(&sb.line.server, backend_addr);
        let result = client_exchanges(&sb.line.client, listen);
        let peers = server.join().unwrap();
        let stats = sb.daemon.as_ref().map(|d| d.stats().unwrap());
        assert_eq!(result, Ok(()), "{via:?} {listen}; forwarder's counters: {stats:?}");
        assert!(
            peers.len() == 2 && peers.iter().all(|p| p.ip().to_string() == router_addr),
            "{via:?}: the backend sees the router's address: {peers:?}"
        );
    }
    let Some(d) = &sb.daemon else { return };
    let stats = d.stats().unwrap();
    // Per family: the first answer, the request and its answer, three fragments each.
    assert_eq!(reason(&stats, "fragment_translated")["packets"], 2 * 9, "{via:?}: {stats}");
    assert_eq!(reason(&stats, "fragment_unknown")["packets"], 0, "{via:?}: {stats}");
    // The kinds README tells operators to read them by.
    for (name, kind) in
        [("fragment_translated", "event"), ("fragment_unknown", "passed"), ("fragment_map_full", "dropped")]
    {
        assert_eq!(reason(&stats, name)["kind"], kind, "{name}");
    }
    for f in stats["forwards"].as_array().unwrap() {
        assert_eq!(f["packets"], 1 + 9, "{via:?}: the query and nine fragments: {stats}");
    }
}

#[test]
fn large_datagrams_through_iptables() {
    large_datagrams_both_ways(Via::Iptables);
}

#[test]
fn large_datagrams_through_forwarder_xdp_native() {
    large_datagrams_both_ways(Via::XdpNative);
}

#[test]
fn large_datagrams_through_forwarder_xdp_generic() {
    large_datagrams_both_ways(Via::XdpGeneric);
}

#[test]
fn large_datagrams_through_forwarder_tc_only() {
    large_datagrams_both_ways(Via::TcOnly);
}
