//! The kernel programs on crafted frames through BPF_PROG_TEST_RUN, Katran-style: input frame
//! → expected verdict, output bytes and counters. Frames are built and checked with
//! etherparse, never with forwarder's own checksum code.
//!
//! The fixture (a fresh namespace with routes and neighbours, forwarder loaded) and the
//! frame builders are forwarder_tests::frames.

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use forwarder_common::{
    CtKey, CtValue, Reason,
    conntrack::{
        CT_ASSURED, TCP_CLOSE, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_LAST_ACK, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TIME_WAIT,
    },
    flow_cache_bucket,
};
use forwarder_tests::frames::{
    CLIENT, CLIENT_MAC, CLIENT6, CONFIG, Fixture, ROUTER_IN, ROUTER_IN6, ROUTER_OUT, ROUTER_OUT6, SERVER, SERVER_MAC,
    SERVER6, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT, fragment_invariants, tcp_frame,
    tcp6_frame, udp_frame, udp6_frame, with_fixture,
};

/// Parsed output: (eth src, eth dst, ip src, ip dst, ttl, sport, dport).
type Checked = ([u8; 6], [u8; 6], [u8; 4], [u8; 4], u8, u16, u16);

/// The frame's addresses, TTL and ports after asserting that every checksum is valid.
fn check(frame: &[u8]) -> Checked {
    let h = PacketHeaders::from_ethernet_slice(frame).expect("output parses");
    let eth = h.link.clone().unwrap().ethernet2().unwrap();
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("not IPv4") };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum");
    let payload = h.payload.slice();
    let (sport, dport) = match h.transport.as_ref().unwrap() {
        TransportHeader::Tcp(t) => {
            assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, payload).unwrap(), "TCP checksum");
            (t.source_port, t.destination_port)
        }
        TransportHeader::Udp(u) => {
            if u.checksum != 0 {
                assert_eq!(u.checksum, u.calc_checksum_ipv4(ip, payload).unwrap(), "UDP checksum");
            }
            (u.source_port, u.destination_port)
        }
        other => panic!("unexpected {other:?}"),
    };
    (eth.source, eth.destination, ip.source, ip.destination, ip.time_to_live, sport, dport)
}

#[test]
fn xdp_tcp_syn_gets_dnat_snat_and_reply_gets_reverse_nat() {
    with_fixture(CONFIG, |fx| {
        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, true, b"");
        let (verdict, out, _) = fx.xdp(&syn, fx.v0);
        assert_eq!(verdict, XDP_REDIRECT);
        let (smac, dmac, src, dst, ttl, sport, dport) = check(&out);
        assert_eq!((smac, dmac), (fx.v1_mac, SERVER_MAC), "next hop from the FIB");
        assert_eq!((src, dst, dport), (ROUTER_OUT, SERVER, 3197), "DNAT to the backend, SNAT to the egress address");
        assert_eq!(sport, 40000, "the client's port, free in the default range, is kept");
        let snat_port = sport;
        assert_eq!(ttl, 63);
        assert_eq!(fx.reason(Reason::RedirectXdp), 1);
        let s = fx.stats(1);
        assert_eq!((s.packets, s.new_conns, s.bytes), (1, 1, 40));

        // The backend's SYN-ACK comes back to the SNAT address and port.
        let reply = tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, sport, true, b"");
        let (verdict, out, _) = fx.xdp(&reply, fx.v1);
        assert_eq!(verdict, XDP_REDIRECT);
        let (smac, dmac, src, dst, ttl, sport, dport) = check(&out);
        assert_eq!((smac, dmac), (fx.v0_mac, CLIENT_MAC));
        assert_eq!((src, sport, dst, dport), (ROUTER_IN, 3306, CLIENT, 40000), "client sees only the listen address");
        assert_eq!(ttl, 63);
        let s = fx.stats(1);
        assert_eq!((s.packets, s.new_conns), (2, 1), "a reply is no new connection");

        // Established data packet with payload, same flow.
        let data = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, false, &[7u8; 333]);
        let (verdict, out, _) = fx.xdp(&data, fx.v0);
        assert_eq!(verdict, XDP_REDIRECT);
        let (_, _, src, dst, _, data_sport, _) = check(&out);
        assert_eq!((src, dst, data_sport), (ROUTER_OUT, SERVER, snat_port), "same flow, same SNAT port");
        assert_eq!(fx.stats(1).new_conns, 1);
    });
}

/// The fast path: once the full path has forwarded a packet of a connection, the next ones
/// of that direction are rewritten from the entry's cached next hop and checksum deltas,
/// byte for byte as the full path would; a bump of the route generation sends the next
/// packet through the full path (and its FIB lookup) again.
#[test]
fn established_packets_take_the_cached_next_hop_with_the_same_bytes() {
    with_fixture(CONFIG, |fx| {
        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40100, 3306, true, b"");
        let (_, out, _) = fx.xdp(&syn, fx.v0);
        let snat_port = check(&out).5;
        let reply = tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, true, b"");
        assert_eq!(fx.xdp(&reply, fx.v1).0, XDP_REDIRECT);
        assert_eq!((fx.reason(Reason::RedirectXdp), fx.reason(Reason::RedirectXdpCached)), (2, 0));

        let mut q0 = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6100, 53, b"no checksum");
        q0[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let frames = [
            (tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40100, 3306, false, &[7u8; 333]), fx.v0),
            (tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, false, &[9u8; 77]), fx.v1),
            (udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6101, 53, b"query"), fx.v0),
            (q0, fx.v0),
        ];
        // UDP flows: the first datagram opens the flow and fills the cache.
        for (f, ifindex) in &frames[2..] {
            assert_eq!(fx.xdp(f, *ifindex).0, XDP_REDIRECT);
        }
        let full_path = fx.reason(Reason::RedirectXdp);
        for (i, (f, ifindex)) in frames.iter().enumerate() {
            // The frame once through the full path first: the previous frame's bump made every
            // cached next hop stale, and the handshake's packets were shorter than this one
            // (the cache takes only packets as long as the FIB's MTU check has passed).
            assert_eq!(fx.xdp(f, *ifindex).0, XDP_REDIRECT, "frame {i}");
            let cached_before = fx.reason(Reason::RedirectXdpCached);
            let flow_cache_before = fx.reason(Reason::RedirectXdpFlowCache);
            let (verdict, cached, _) = fx.xdp(f, *ifindex);
            assert_eq!(verdict, XDP_REDIRECT, "frame {i}");
            assert_eq!(fx.reason(Reason::RedirectXdpCached), cached_before + 1, "frame {i} took the fast path");
            // The entry filled this CPU's flow cache slot: the next packet is found there.
            let (verdict, from_slot, _) = fx.xdp(f, *ifindex);
            assert_eq!(verdict, XDP_REDIRECT, "frame {i}");
            assert_eq!(fx.reason(Reason::RedirectXdpFlowCache), flow_cache_before + 1, "frame {i}: flow cache");
            assert_eq!(fx.reason(Reason::RedirectXdpCached), cached_before + 1, "frame {i}: not the entry");
            fx.state.bump_route_generation().unwrap();
            let (verdict, full, _) = fx.xdp(f, *ifindex);
            assert_eq!(verdict, XDP_REDIRECT, "frame {i}");
            assert_eq!(fx.reason(Reason::RedirectXdpCached), cached_before + 1, "frame {i}: new generation");
            assert_eq!(fx.reason(Reason::RedirectXdpFlowCache), flow_cache_before + 1, "frame {i}: new generation");
            assert_eq!(cached, full, "frame {i}: the fast path rewrites exactly as the full path");
            assert_eq!(from_slot, full, "frame {i}: so does the flow cache");
            check(&cached);
        }
        assert_eq!(fx.reason(Reason::RedirectXdp), full_path + 2 * frames.len() as u64);
        let zero_out = fx.xdp(&frames[3].0, fx.v0).1;
        let h = PacketHeaders::from_ethernet_slice(&zero_out).unwrap();
        let Some(TransportHeader::Udp(u)) = h.transport else { panic!() };
        assert_eq!(u.checksum, 0, "zero UDP checksum stays zero on the fast path");
        // Counters: the cached packets count for their forward like any other.
        assert_eq!(fx.stats(1).packets, 2 + 4 + 4);

        // What the fast path must not take: TTL about to expire, a fragment, IP options, a
        // pending checksum (CHECKSUM_PARTIAL seed), a frame shorter than its IP length.
        let data = &frames[0].0;
        // Through the full path and the entry into the flow cache again, so that a packet
        // of this tuple would be found there.
        let entry_hits = fx.reason(Reason::RedirectXdpCached);
        assert_eq!((fx.xdp(data, fx.v0).0, fx.xdp(data, fx.v0).0), (XDP_REDIRECT, XDP_REDIRECT));
        assert_eq!(fx.reason(Reason::RedirectXdpCached), entry_hits + 1);
        let cached = fast_path(fx);
        let mut ttl1 = data.clone();
        ttl1[14 + 8] = 1;
        let mut frag = data.clone();
        frag[14 + 6] |= 0x20; // more fragments
        let mut options = data.clone();
        options[14] = 0x46;
        let mut partial = data.clone();
        let seed = forwarder_common::csum::ipv4_pseudo_seed(CLIENT, ROUTER_IN, 6, (data.len() - 34) as u16);
        partial[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&seed.to_be_bytes());
        let truncated = data[..data.len() - 10].to_vec();
        for (name, f) in
            [("ttl", ttl1), ("fragment", frag), ("options", options), ("partial", partial), ("short", truncated)]
        {
            let (verdict, out, _) = fx.xdp(&f, fx.v0);
            assert_eq!((verdict, out == f), (XDP_PASS, true), "{name}: passed untouched");
        }
        assert_eq!(fast_path(fx), cached, "none of them on the fast path");
    });
}

/// Packets of both fast-path tiers: from the connection's entry and from the flow cache.
fn fast_path(fx: &Fixture) -> u64 {
    fx.reason(Reason::RedirectXdpCached) + fx.reason(Reason::RedirectXdpFlowCache)
}

/// The fast path never sends a packet longer than the FIB's MTU check has passed for the
/// cached next hop: longer ones take the full path, which hands a packet too big for the
/// egress to the stack (fragmentation or ICMP "too big") and raises the bound for one that
/// fits.
#[test]
fn packets_longer_than_the_cached_next_hop_has_passed_take_the_full_path() {
    with_fixture(CONFIG, |fx| {
        // This thread is in the fixture's namespace, and so is the command it starts.
        let status = std::process::Command::new("ip").args(["link", "set", "v1", "mtu", "1000"]).status().unwrap();
        assert!(status.success());
        let datagram = |n: usize| udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6300, 53, &vec![7u8; n]);
        let cached = fast_path;
        let (small, mid, big) = (datagram(10), datagram(500), datagram(1200));
        assert_eq!(fx.xdp(&small, fx.v0).0, XDP_REDIRECT);
        assert_eq!(fx.xdp(&small, fx.v0).0, XDP_REDIRECT);
        assert_eq!(cached(fx), 1);

        let to_tc = fx.reason(Reason::XdpToTc);
        let (verdict, out, _) = fx.xdp(&big, fx.v0);
        assert_eq!((verdict, out == big), (XDP_PASS, true), "too big for the egress: untouched, to TC");
        assert_eq!((cached(fx), fx.reason(Reason::XdpToTc)), (1, to_tc + 1));

        let full = fx.reason(Reason::RedirectXdp);
        assert_eq!(fx.xdp(&mid, fx.v0).0, XDP_REDIRECT);
        assert_eq!((cached(fx), fx.reason(Reason::RedirectXdp)), (1, full + 1), "longer than passed: full path");
        assert_eq!(fx.xdp(&mid, fx.v0).0, XDP_REDIRECT);
        assert_eq!(fx.xdp(&small, fx.v0).0, XDP_REDIRECT);
        assert_eq!(cached(fx), 3, "then cached, and shorter packets stay on the fast path");
    });
}

/// A cached next hop follows the neighbour table once the generation moves (the daemon
/// bumps it on every rtnetlink route/neighbour event; tests/tests/e2e.rs checks that part).
#[test]
fn cached_next_hop_follows_a_neighbour_change_after_a_generation_bump() {
    with_fixture(CONFIG, |fx| {
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6200, 53, b"query");
        assert_eq!(check(&fx.xdp(&q, fx.v0).1).1, SERVER_MAC);
        let new_mac = [0x02, 0, 0, 0, 0, 0x21];
        // This thread is in the fixture's namespace, and so is the command it starts.
        let status = std::process::Command::new("ip")
            .args(["neigh", "replace", "203.0.113.20", "lladdr", "02:00:00:00:00:21", "dev", "v1", "nud", "permanent"])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(check(&fx.xdp(&q, fx.v0).1).1, SERVER_MAC, "same generation: still cached");
        fx.state.bump_route_generation().unwrap();
        assert_eq!(check(&fx.xdp(&q, fx.v0).1).1, new_mac, "new generation: looked up again");
        assert_eq!(check(&fx.xdp(&q, fx.v0).1).1, new_mac, "and cached again");
    });
}

/// The flow cache (first tier of the fast path) holds copies of connection entries: a slot
/// is never used once its connection is gone, and a packet that changes the connection's
/// state (a FIN here) goes to the entry, which records it.
#[test]
fn flow_cache_slots_never_outlive_their_connection_and_leave_state_to_the_entry() {
    with_fixture(CONFIG, |fx| {
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6400, 53, b"query");
        for _ in 0..3 {
            assert_eq!(fx.xdp(&q, fx.v0).0, XDP_REDIRECT);
        }
        let tiers = |fx: &Fixture| {
            (
                fx.reason(Reason::RedirectXdp),
                fx.reason(Reason::RedirectXdpCached),
                fx.reason(Reason::RedirectXdpFlowCache),
            )
        };
        assert_eq!(tiers(fx), (1, 1, 1), "full path, entry, flow cache");
        // The connection removed (as idle expiry or a flush does): its slot is not used, the
        // next datagram is a new flow.
        let keys: Vec<_> = fx.state.conntrack().unwrap().into_iter().map(|(k, _)| k).collect();
        fx.state.remove_conntrack(&keys).unwrap();
        let new_conns = fx.stats(2).new_conns;
        assert_eq!(fx.xdp(&q, fx.v0).0, XDP_REDIRECT);
        assert_eq!(tiers(fx), (2, 1, 1), "a new flow, through the full path");
        assert_eq!((fx.stats(2).new_conns, fx.conntrack_len()), (new_conns + 1, 2));

        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40200, 3306, true, b"");
        let snat_port = check(&fx.xdp(&syn, fx.v0).1).5;
        let syn_ack = tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, true, b"");
        assert_eq!(fx.xdp(&syn_ack, fx.v1).0, XDP_REDIRECT);
        let data = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40200, 3306, false, b"data");
        for _ in 0..3 {
            assert_eq!(fx.xdp(&data, fx.v0).0, XDP_REDIRECT);
        }
        assert_eq!(tiers(fx), (5, 2, 2), "handshake and data: full path, entry, flow cache");
        let mut fin = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, fx.v0_mac)
            .ipv4(CLIENT, ROUTER_IN, 64)
            .tcp(40200, 3306, 1004, 65000)
            .ack(5000)
            .fin()
            .write(&mut fin, b"")
            .unwrap();
        let (verdict, first_fin, _) = fx.xdp(&fin, fx.v0);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(tiers(fx), (6, 2, 2), "a FIN moves the state: the full path takes it, not the copies");
        assert_eq!(tcp_states(fx, 40200), (TCP_FIN_WAIT, TCP_FIN_WAIT), "recorded in both entries");
        let (verdict, again, _) = fx.xdp(&fin, fx.v0);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(tiers(fx), (7, 2, 2), "a FIN again goes to the full path too");
        assert_eq!(tcp_states(fx, 40200).0, TCP_LAST_ACK, "netfilter's reading of a second FIN");
        assert_eq!(again, first_fin);
        check(&again);
    });
}

/// The original and reply entries of the client's flow from `client_port` (IPv4, TCP).
fn tcp_entries(fx: &Fixture, client_port: u16) -> ((CtKey, CtValue), (CtKey, CtValue)) {
    let all = fx.state.conntrack().unwrap();
    let orig = *all
        .iter()
        .find(|(k, _)| k.proto == 6 && k.src_addr[..4] == CLIENT && k.src_port_be == client_port.to_be())
        .expect("original entry");
    let reply = *all
        .iter()
        .find(|(k, _)| k.proto == 6 && k.dst_addr == orig.1.new_src_addr && k.dst_port_be == orig.1.new_src_port_be)
        .expect("reply entry");
    (orig, reply)
}

/// The state each entry of the client's flow from `client_port` holds.
fn tcp_states(fx: &Fixture, client_port: u16) -> (u8, u8) {
    let ((_, o), (_, r)) = tcp_entries(fx, client_port);
    (o.state, r.state)
}

/// Flows whose tuples fall into the same flow cache bucket (four slots) each keep their own
/// rewrite: four of them all stay cached, a fifth takes turns with the fourth.
#[test]
fn flows_sharing_a_flow_cache_bucket_keep_their_own_rewrite() {
    with_fixture(CONFIG, |fx| {
        let word = u32::from_ne_bytes;
        let bucket = |sport: u16| {
            let ([a, b], [c, d]) = (sport.to_be_bytes(), 53u16.to_be_bytes());
            flow_cache_bucket(word(CLIENT), word(ROUTER_IN), word([a, b, c, d]), 17)
        };
        let first = 7000u16;
        let same: Vec<u16> = (first + 1..u16::MAX).filter(|p| bucket(*p) == bucket(first)).take(4).collect();
        assert_eq!(same.len(), 4, "colliding ports");
        let query = |port: u16| udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, port, 53, b"q");
        let flows: Vec<Vec<u8>> = [first].iter().chain(&same).map(|p| query(*p)).collect();
        let port_of = |f: &[u8]| check(&fx.xdp(f, fx.v0).1).5;
        let tiers = |fx: &Fixture| (fx.reason(Reason::RedirectXdpCached), fx.reason(Reason::RedirectXdpFlowCache));
        // New flows (full path), then each from its entry into a slot of the bucket.
        let ports: Vec<u16> = flows.iter().map(|f| port_of(f)).collect();
        let mut distinct = ports.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 5, "{ports:?}");
        let four = &flows[..4];
        for (f, p) in four.iter().zip(&ports) {
            assert_eq!(port_of(f), *p);
        }
        assert_eq!(tiers(fx), (4, 0));
        for _ in 0..3 {
            for (f, p) in four.iter().zip(&ports) {
                assert_eq!(port_of(f), *p);
            }
        }
        assert_eq!(tiers(fx), (4, 12), "four flows of a bucket all stay cached");
        assert_eq!(port_of(&flows[4]), ports[4]);
        assert_eq!((port_of(&flows[0]), port_of(&flows[4])), (ports[0], ports[4]));
        assert_eq!(tiers(fx), (5, 14), "the fifth took the last slot; the first kept its own");
        assert_eq!(port_of(&flows[3]), ports[3]);
        assert_eq!(tiers(fx), (6, 14), "the fourth, displaced, from its entry");
    });
}

#[test]
fn tc_tcp_and_udp_get_the_same_rewrite() {
    with_fixture(CONFIG, |fx| {
        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40001, 3306, true, b"hello");
        let (verdict, out) = fx.tc(&syn, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (smac, dmac, src, dst, ttl, sport, dport) = check(&out);
        assert_eq!((smac, dmac, src, dst, dport, ttl), (fx.v1_mac, SERVER_MAC, ROUTER_OUT, SERVER, 3197, 63));
        let reply = tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, sport, true, b"");
        let (verdict, out) = fx.tc(&reply, fx.v1);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (_, _, src, dst, _, sport, dport) = check(&out);
        assert_eq!((src, sport, dst, dport), (ROUTER_IN, 3306, CLIENT, 40001));

        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5000, 53, b"query");
        let (verdict, out) = fx.tc(&q, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (_, _, src, dst, _, usport, dport) = check(&out);
        assert_eq!((src, dst, dport), (ROUTER_OUT, SERVER, 5353));
        let a = udp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 5353, usport, b"answer");
        let (verdict, out) = fx.tc(&a, fx.v1);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (_, _, src, dst, _, sport, dport) = check(&out);
        assert_eq!((src, sport, dst, dport), (ROUTER_IN, 53, CLIENT, 5000));
        assert_eq!(fx.reason(Reason::RedirectTc), 4);
        assert_eq!(fx.stats(2).new_conns, 1);
    });
}

/// A new UDP flow goes into the connection table with its next hop, in TC as in XDP: the
/// flow's next datagram takes the fast path's entry at once, rewritten to the same bytes.
#[test]
fn tc_new_udp_flow_goes_in_with_its_next_hop() {
    with_fixture(CONFIG, |fx| {
        let query = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6120, 53, b"query");
        let (verdict, first) = fx.tc(&query, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (full, entry) = (fx.reason(Reason::RedirectTc), fx.reason(Reason::RedirectTcCached));
        assert_eq!(full, 1, "the new flow took the full path");
        let (verdict, second) = fx.tc(&query, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!((fx.reason(Reason::RedirectTc), fx.reason(Reason::RedirectTcCached)), (full, entry + 1));
        assert_eq!(first, second, "the entry's rewrite is the full path's");
    });
}

/// TC's fast path, as XDP's: once the full path has forwarded a packet of a connection,
/// the next ones of that direction are rewritten from the entry's cached next hop, then
/// from TC's flow cache, byte for byte as the full path would (TCP, UDP, UDP without a
/// checksum); a bump of the route generation sends the next one through the full path
/// again. A next hop TC cached for an egress that takes XDP frames serves XDP too.
#[test]
fn tc_established_packets_take_the_cached_next_hop_with_the_same_bytes() {
    with_fixture(CONFIG, |fx| {
        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40200, 3306, true, b"");
        let (_, out) = fx.tc(&syn, fx.v0);
        let snat_port = check(&out).5;
        let reply = tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, true, b"");
        assert_eq!(fx.tc(&reply, fx.v1).0, TC_ACT_REDIRECT);
        assert_eq!((fx.reason(Reason::RedirectTc), fx.reason(Reason::RedirectTcCached)), (2, 0));

        let mut q0 = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6110, 53, b"no checksum");
        q0[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let frames = [
            (tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40200, 3306, false, &[7u8; 333]), fx.v0),
            (tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, false, &[9u8; 77]), fx.v1),
            (udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6111, 53, b"query"), fx.v0),
            (q0, fx.v0),
        ];
        for (f, ifindex) in &frames[2..] {
            assert_eq!(fx.tc(f, *ifindex).0, TC_ACT_REDIRECT);
        }
        for (i, (f, ifindex)) in frames.iter().enumerate() {
            // Through the full path first (a state change, a longer packet than the
            // handshake's, or the previous frame's generation bump).
            assert_eq!(fx.tc(f, *ifindex).0, TC_ACT_REDIRECT, "frame {i}");
            let (entry_before, slot_before) =
                (fx.reason(Reason::RedirectTcCached), fx.reason(Reason::RedirectTcFlowCache));
            let (verdict, cached) = fx.tc(f, *ifindex);
            assert_eq!(verdict, TC_ACT_REDIRECT, "frame {i}");
            assert_eq!(fx.reason(Reason::RedirectTcCached), entry_before + 1, "frame {i} took the fast path");
            let (verdict, from_slot) = fx.tc(f, *ifindex);
            assert_eq!(verdict, TC_ACT_REDIRECT, "frame {i}");
            assert_eq!(fx.reason(Reason::RedirectTcFlowCache), slot_before + 1, "frame {i}: flow cache");
            assert_eq!(fx.reason(Reason::RedirectTcCached), entry_before + 1, "frame {i}: not the entry");
            fx.state.bump_route_generation().unwrap();
            let full_before = fx.reason(Reason::RedirectTc);
            let (verdict, full) = fx.tc(f, *ifindex);
            assert_eq!(verdict, TC_ACT_REDIRECT, "frame {i}");
            assert_eq!(fx.reason(Reason::RedirectTc), full_before + 1, "frame {i}: new generation, full path");
            assert_eq!(cached, full, "frame {i}: the fast path rewrites exactly as the full path");
            assert_eq!(from_slot, full, "frame {i}: so does the flow cache");
            check(&cached);
        }
        let zero_out = fx.tc(&frames[3].0, fx.v0).1;
        let h = PacketHeaders::from_ethernet_slice(&zero_out).unwrap();
        let Some(TransportHeader::Udp(u)) = h.transport else { panic!() };
        assert_eq!(u.checksum, 0, "zero UDP checksum stays zero on the fast path");
        assert_eq!(fx.stats(1).packets, 2 + 4 + 4, "cached packets count for their forward");
        assert_eq!(fx.reason(Reason::RedirectXdp) + fast_path(fx), 0);

        // The data segment's next hop, cached by TC's full path after the last bump, serves
        // XDP (the egress takes XDP frames) with the same bytes.
        let data = &frames[0].0;
        let (_, by_tc) = fx.tc(data, fx.v0);
        let (verdict, by_xdp, _) = fx.xdp(data, fx.v0);
        assert_eq!((verdict, fx.reason(Reason::RedirectXdpCached)), (XDP_REDIRECT, 1));
        assert_eq!(by_xdp, by_tc);

        // What TC's fast path must not take is left to the full path: a frame shorter than
        // its IP length is passed untouched.
        let truncated = data[..data.len() - 10].to_vec();
        let fast_before = fx.reason(Reason::RedirectTcCached) + fx.reason(Reason::RedirectTcFlowCache);
        let (verdict, out) = fx.tc(&truncated, fx.v0);
        assert_eq!((verdict, out == truncated), (TC_ACT_OK, true));
        assert_eq!(fx.reason(Reason::RedirectTcCached) + fx.reason(Reason::RedirectTcFlowCache), fast_before);
    });
}

/// IPv6's fast path (the connection entry's cached next hop; no flow cache), in XDP and in
/// TC: after the full path, the next packets of a direction are rewritten from the entry,
/// byte for byte as the full path does.
#[test]
fn ipv6_established_packets_take_the_cached_next_hop_with_the_same_bytes() {
    with_fixture(CONFIG, |fx| {
        // This thread is in the fixture's namespace: routes and neighbours for IPv6.
        for args in [
            &["addr", "add", "2001:db8:1::1/64", "dev", "v0", "nodad"][..],
            &["addr", "add", "2001:db8:2::1/64", "dev", "v1", "nodad"],
            &["neigh", "replace", "2001:db8:1::2", "lladdr", "02:00:00:00:00:02", "dev", "v0", "nud", "permanent"],
            &["neigh", "replace", "2001:db8:2::20", "lladdr", "02:00:00:00:00:20", "dev", "v1", "nud", "permanent"],
        ] {
            assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "{args:?}");
        }
        fx.state.bump_route_generation().unwrap();
        let syn = tcp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 40300, 3306, true, b"");
        let (verdict, out) = fx.tc(&syn, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (src, dst, _, sport, _) = check6(&out);
        assert_eq!((src, dst), (ROUTER_OUT6, SERVER6));
        let reply = tcp6_frame(SERVER_MAC, fx.v1_mac, SERVER6, ROUTER_OUT6, 3197, sport, true, b"");
        assert_eq!(fx.tc(&reply, fx.v1).0, TC_ACT_REDIRECT);
        let query = udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 6120, 53, b"query6");
        assert_eq!(fx.tc(&query, fx.v0).0, TC_ACT_REDIRECT, "opens the UDP flow");
        let frames = [
            (tcp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 40300, 3306, false, &[7u8; 333]), fx.v0),
            (tcp6_frame(SERVER_MAC, fx.v1_mac, SERVER6, ROUTER_OUT6, 3197, sport, false, &[9u8; 77]), fx.v1),
            (query, fx.v0),
        ];
        for (i, (f, ifindex)) in frames.iter().enumerate() {
            fx.state.bump_route_generation().unwrap();
            let full_before = fx.reason(Reason::RedirectTc);
            let (verdict, full) = fx.tc(f, *ifindex);
            assert_eq!(
                (verdict, fx.reason(Reason::RedirectTc)),
                (TC_ACT_REDIRECT, full_before + 1),
                "frame {i}: TC's full path"
            );
            let cached_before = fx.reason(Reason::RedirectTcCached);
            let (verdict, cached) = fx.tc(f, *ifindex);
            assert_eq!(
                (verdict, fx.reason(Reason::RedirectTcCached)),
                (TC_ACT_REDIRECT, cached_before + 1),
                "frame {i}: TC's entry"
            );
            assert_eq!(cached, full, "frame {i}: TC's fast path rewrites exactly as its full path");
            check6(&cached);
            let slot_before = fx.reason(Reason::RedirectTcFlowCache);
            let (verdict, from_slot) = fx.tc(f, *ifindex);
            assert_eq!(
                (verdict, fx.reason(Reason::RedirectTcFlowCache)),
                (TC_ACT_REDIRECT, slot_before + 1),
                "frame {i}: TC's flow cache"
            );
            assert_eq!(from_slot, full, "frame {i}: TC's flow cache slot rewrites exactly as its full path");

            fx.state.bump_route_generation().unwrap();
            let full_before = fx.reason(Reason::RedirectXdp);
            let (verdict, xdp_full, _) = fx.xdp(f, *ifindex);
            assert_eq!(
                (verdict, fx.reason(Reason::RedirectXdp)),
                (XDP_REDIRECT, full_before + 1),
                "frame {i}: XDP's full path"
            );
            let cached_before = fx.reason(Reason::RedirectXdpCached);
            let (verdict, xdp_cached, _) = fx.xdp(f, *ifindex);
            assert_eq!(
                (verdict, fx.reason(Reason::RedirectXdpCached)),
                (XDP_REDIRECT, cached_before + 1),
                "frame {i}: XDP's entry"
            );
            assert_eq!(xdp_cached, xdp_full, "frame {i}: XDP's fast path rewrites exactly as its full path");
            assert_eq!(xdp_full, full, "frame {i}: XDP and TC alike");
            let slot_before = fx.reason(Reason::RedirectXdpFlowCache);
            let (verdict, xdp_slot, _) = fx.xdp(f, *ifindex);
            assert_eq!(
                (verdict, fx.reason(Reason::RedirectXdpFlowCache)),
                (XDP_REDIRECT, slot_before + 1),
                "frame {i}: XDP's flow cache"
            );
            assert_eq!(xdp_slot, full, "frame {i}: XDP's flow cache slot rewrites exactly as its full path");
        }
        // A slot serves only its own tuple: another source port of the UDP flow's client is a
        // new flow for the full path, never the cached rewrite.
        let other = udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 6121, 53, b"query6");
        let full_before = fx.reason(Reason::RedirectXdp);
        let (verdict, out, _) = fx.xdp(&other, fx.v0);
        assert_eq!((verdict, fx.reason(Reason::RedirectXdp)), (XDP_REDIRECT, full_before + 1), "a new flow");
        let (_, _, _, sport, _) = check6(&out);
        assert_eq!(sport, 6121, "its own SNAT port (the client's, kept), not the cached flow's 6120");
        // A CHECKSUM_PARTIAL seed goes from XDP to TC untouched.
        let mut partial = frames[0].0.clone();
        let l4_len = (partial.len() - 54) as u32;
        let mut sum = 6 + l4_len;
        for a in [CLIENT6, ROUTER_IN6] {
            for w in a.chunks(2) {
                sum += u16::from_be_bytes([w[0], w[1]]) as u32;
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        partial[54 + 16..54 + 18].copy_from_slice(&(sum as u16).to_be_bytes());
        let to_tc = fx.reason(Reason::XdpToTc);
        let (verdict, out, _) = fx.xdp(&partial, fx.v0);
        assert_eq!((verdict, out == partial, fx.reason(Reason::XdpToTc)), (XDP_PASS, true, to_tc + 1));
    });
}

#[test]
fn udp_checksums_including_zero_checksum() {
    with_fixture(CONFIG, |fx| {
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6000, 53, b"query with checksum");
        let (verdict, out, _) = fx.xdp(&q, fx.v0);
        assert_eq!(verdict, XDP_REDIRECT);
        let h = PacketHeaders::from_ethernet_slice(&out).unwrap();
        let Some(TransportHeader::Udp(u)) = h.transport else { panic!() };
        assert_ne!(u.checksum, 0);
        check(&out);

        // A datagram sent without checksum keeps "no checksum" after the rewrite, on both paths.
        let mut q0 = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6001, 53, b"no checksum");
        q0[14 + 20 + 6] = 0;
        q0[14 + 20 + 7] = 0;
        for out in [fx.xdp(&q0, fx.v0).1, fx.tc(&q0, fx.v0).1] {
            let h = PacketHeaders::from_ethernet_slice(&out).unwrap();
            let Some(TransportHeader::Udp(u)) = h.transport else { panic!() };
            assert_eq!(u.checksum, 0, "zero UDP checksum stays zero");
            let (_, _, src, dst, _, _, dport) = check(&out);
            assert_eq!((src, dst, dport), (ROUTER_OUT, SERVER, 5353));
        }
    });
}

#[test]
fn frames_forwarder_does_not_handle_pass_untouched_with_their_reason() {
    with_fixture(CONFIG, |fx| {
        let base = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, true, b"");
        let mut cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            ("no rule", tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 80, true, b""), Reason::NoRule),
            ("udp no rule", udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 1, 3306, b"x"), Reason::NoRule),
            ("truncated tcp", base[..14 + 20 + 10].to_vec(), Reason::Malformed),
            ("truncated ip", base[..14 + 12].to_vec(), Reason::Malformed),
        ];
        let mut bad_len = base.clone();
        bad_len[16] = 0x05; // total length 1280+ beyond the frame
        cases.push(("ip total length beyond frame", bad_len, Reason::Malformed));
        // Fragments of TCP/UDP datagrams go to TC (tests/tests/fragments.rs); of others, to
        // the stack.
        let mut ping = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, fx.v0_mac)
            .ipv4(CLIENT, ROUTER_IN, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, &[0x70; 64])
            .unwrap();
        let mut frag = ping.clone();
        frag[14 + 6] = 0x20; // more fragments
        cases.push(("fragment", frag, Reason::Fragment));
        let mut frag2 = ping.clone();
        frag2[14 + 7] = 0x10; // fragment offset
        cases.push(("later fragment", frag2, Reason::Fragment));
        // IPv4 header with 4 bytes of options (NOP x4): IHL 6.
        let mut opts = base[..14].to_vec();
        let mut ip = base[14..34].to_vec();
        ip[0] = 0x46;
        let tot = u16::from_be_bytes([ip[2], ip[3]]) + 4;
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        opts.extend_from_slice(&ip);
        opts.extend_from_slice(&[1, 1, 1, 1]);
        opts.extend_from_slice(&base[34..]);
        cases.push(("ip options", opts, Reason::IpOptions));
        let mut arp = base[..14].to_vec();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        arp.extend_from_slice(&[0u8; 28]);
        cases.push(("arp", arp, Reason::NotIp));
        let mut vlan = base[..12].to_vec();
        vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        vlan.extend_from_slice(&base[12..]);
        cases.push(("vlan", vlan, Reason::Vlan));
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, fx.v0_mac)
            .ipv4(CLIENT, ROUTER_IN, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut icmp, b"ping")
            .unwrap();
        cases.push(("icmp", icmp, Reason::NotTcpUdp));
        let mut v6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, fx.v0_mac)
            .ipv6(
                [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                64,
            )
            .tcp(40000, 3306, 1, 100)
            .syn()
            .write(&mut v6, b"")
            .unwrap();
        cases.push(("ipv6 without a rule", v6, Reason::NoRule));
        cases.push(("empty", vec![0u8; 14], Reason::NotIp));

        for (name, frame, reason) in cases {
            let before = fx.reason(reason);
            let (verdict, out, meta) = fx.xdp(&frame, fx.v0);
            assert_eq!(verdict, XDP_PASS, "{name}");
            assert_eq!(out, frame, "{name}: passed untouched");
            assert_eq!(meta, 4, "{name}: XDP tells TC it has seen it");
            assert_eq!(fx.reason(reason), before + 1, "{name}: counted as {}", reason.name());
            if frame.len() < 14 + 20 && frame[12..14] == [8, 0] {
                continue; // the kernel refuses to build an skb for an IPv4 frame this short
            }
            let before = fx.reason(reason);
            let (verdict, out) = fx.tc(&frame, fx.v0);
            assert_eq!((verdict, out == frame), (TC_ACT_OK, true), "{name}: TC passes it untouched");
            assert_eq!(fx.reason(reason), before + 1, "{name}: TC counts it too when it sees it first");
        }
        assert_eq!(fx.conntrack_len(), 0, "nothing tracked");
        assert_eq!(fx.stats(1).packets, 0);
    });
}

#[test]
fn partial_checksum_frames_go_to_tc_untouched() {
    with_fixture(CONFIG, |fx| {
        let mut f = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, true, b"abc");
        // What a sender with checksum offload leaves in the field: the folded pseudo-header
        // sum (RFC 793 pseudo header: addresses, zero, protocol, TCP length).
        let tcp_len = (f.len() - 34) as u32;
        let mut sum = 0u32;
        for w in [CLIENT, ROUTER_IN] {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32 + u16::from_be_bytes([w[2], w[3]]) as u32;
        }
        sum += 6 + tcp_len;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        f[34 + 16..34 + 18].copy_from_slice(&(sum as u16).to_be_bytes());
        let (verdict, out, meta) = fx.xdp(&f, fx.v0);
        assert_eq!((verdict, meta), (XDP_PASS, 0), "handed to TC without the skip mark");
        assert_eq!(out, f);
        assert_eq!(fx.reason(Reason::XdpToTc), 1);
        assert_eq!(fx.conntrack_len(), 0, "XDP commits nothing it does not finish");
    });
}

#[test]
fn concurrent_flows_never_share_a_snat_port_and_exhaustion_is_counted() {
    // 32 ports: a new flow's 32 distinct attempts cover the whole range, so every port is
    // handed out before any flow is refused.
    let cfg = format!("{CONFIG}\n[conntrack]\nsnat_ports = \"30000-30031\"\n");
    with_fixture(&cfg, |fx| {
        let mut ports = std::collections::HashSet::new();
        let mut dropped = 0;
        for i in 0..40u16 {
            let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 41000 + i, 3306, true, b"");
            let (verdict, out, _) = fx.xdp(&syn, fx.v0);
            if verdict == XDP_DROP {
                dropped += 1;
                continue;
            }
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(dropped, 0, "flow {i} got a port after one was refused");
            let (_, _, _, _, _, sport, _) = check(&out);
            assert!((30000..=30031).contains(&sport));
            assert!(ports.insert(sport), "port {sport} handed out twice");
        }
        assert_eq!((ports.len(), dropped), (32, 8), "the range is used up, then flows are refused");
        assert_eq!(fx.reason(Reason::PortsExhausted), dropped as u64);
        assert_eq!(fx.conntrack_len(), 2 * ports.len());
    });
}

/// An ICMP error the TC program sent back: (type, code, bytes 4-8, quote), after checking
/// its Ethernet and IP headers (the sender's next hop, from `from` to `to`), the IPv4
/// header checksum and the ICMP checksum (etherparse's).
fn icmp_answer(frame: &[u8], dmac: [u8; 6], smac: [u8; 6], from: &[u8], to: &[u8]) -> (u8, u8, [u8; 4], Vec<u8>) {
    let h = PacketHeaders::from_ethernet_slice(frame).expect("answer parses");
    let eth = h.link.clone().unwrap().ethernet2().unwrap();
    assert_eq!((eth.destination, eth.source), (dmac, smac), "Ethernet addresses");
    let payload = h.payload.slice();
    let icmp_at = match (&h.net, h.transport.as_ref()) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Icmpv4(icmp))) => {
            assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum");
            assert_eq!((&ip.source[..], &ip.destination[..], ip.time_to_live), (from, to, 64));
            assert_eq!(icmp.checksum, icmp.icmp_type.calc_checksum(payload), "ICMP checksum");
            14 + 20
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Icmpv6(icmp))) => {
            assert_eq!((&ip.source[..], &ip.destination[..], ip.hop_limit), (from, to, 64));
            let sum = icmp.icmp_type.calc_checksum(ip.source, ip.destination, payload).unwrap();
            assert_eq!(icmp.checksum, sum, "ICMPv6 checksum");
            14 + 40
        }
        other => panic!("not an ICMP error: {other:?}"),
    };
    let b = &frame[icmp_at..];
    (b[0], b[1], [b[4], b[5], b[6], b[7]], b[8..].to_vec())
}

/// What a router answers with ICMP, TC answers itself, from the address the packet was
/// sent to and quoting the packet as it arrived, without opening a connection: TTL expiry,
/// a `prohibit` route, a packet with DF too big for the egress; one without DF is rewritten
/// and handed to the stack through the loopback device to be fragmented. No route at all
/// still goes to the stack.
#[test]
fn ttl_expiry_routes_and_mtu_are_answered_with_icmp() {
    let cfg = format!(
        "{CONFIG}\n[[forward]]\nname = \"nowhere\"\nprotocol = \"tcp\"\nlisten = \"192.0.2.1:9\"\nbackend = \"198.51.100.9:9\"\n\
         [[forward]]\nname = \"prohibited\"\nprotocol = \"tcp\"\nlisten = \"192.0.2.1:10\"\nbackend = \"198.51.100.10:10\"\n\
         [[forward]]\nname = \"blackholed\"\nprotocol = \"tcp\"\nlisten = \"192.0.2.1:11\"\nbackend = \"198.51.100.11:11\"\n"
    );
    with_fixture(&cfg, |fx| {
        // This thread is in the fixture's namespace, and so are the commands it starts.
        let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success());
        ip(&["route", "add", "prohibit", "198.51.100.10/32"]);
        ip(&["route", "add", "blackhole", "198.51.100.11/32"]);
        let mut f = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, true, b"");
        f[14 + 8] = 1;
        let ip_sum = {
            let mut ip = f[14..34].to_vec();
            ip[10] = 0;
            ip[11] = 0;
            let mut s = 0u32;
            for c in ip.chunks(2) {
                s += u16::from_be_bytes([c[0], c[1]]) as u32;
            }
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        f[24..26].copy_from_slice(&ip_sum.to_be_bytes());
        let (verdict, _, _) = fx.xdp(&f, fx.v0);
        assert_eq!(verdict, XDP_PASS, "XDP leaves TTL expiry to TC");
        let (verdict, out) = fx.tc(&f, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (t, code, rest, quote) = icmp_answer(&out, CLIENT_MAC, fx.v0_mac, &ROUTER_IN, &CLIENT);
        assert_eq!((t, code, rest), (11, 0, [0; 4]), "time exceeded");
        assert_eq!(quote, f[14..], "the whole packet quoted as the client sent it");
        assert_eq!(fx.reason(Reason::IcmpTimeExceeded), 1);
        assert_eq!((fx.conntrack_len(), fx.stats(1).new_conns, fx.stats(1).packets), (0, 0, 0), "nothing opened");

        // A CHECKSUM_PARTIAL packet (the L4 checksum field holds the pseudo-header seed):
        // whatever sends the answer completes the quoted TCP checksum over the quote, and
        // the ICMP checksum is that of the quote as it will leave.
        let mut p = f.clone();
        let seed = forwarder_common::csum::ipv4_pseudo_seed(CLIENT, ROUTER_IN, 6, (p.len() - 34) as u16);
        p[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&seed.to_be_bytes());
        let (verdict, mut out) = fx.tc(&p, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let at = 14 + 20 + 8 + 20 + 16;
        assert_eq!(out[at..at + 2], seed.to_be_bytes(), "the seed is left for the offload");
        let completed =
            etherparse::TcpHeader::from_slice(&p[34..]).unwrap().0.calc_checksum_ipv4_raw(CLIENT, ROUTER_IN, b"");
        out[at..at + 2].copy_from_slice(&completed.unwrap().to_be_bytes());
        icmp_answer(&out, CLIENT_MAC, fx.v0_mac, &ROUTER_IN, &CLIENT);

        // No route to 198.51.100.0/24: rewritten, handed to the stack.
        let f = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 9, true, b"");
        let (verdict, out) = fx.tc(&f, fx.v0);
        assert_eq!(verdict, TC_ACT_OK);
        let (_, _, _, dst, ttl, _, dport) = check(&out);
        assert_eq!((dst, dport, ttl), ([198, 51, 100, 9], 9, 64));
        assert_eq!(fx.reason(Reason::FibToStack), 1);

        // A prohibit route: "communication administratively prohibited".
        let f = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40001, 10, true, b"");
        let (verdict, out) = fx.tc(&f, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (t, code, _, quote) = icmp_answer(&out, CLIENT_MAC, fx.v0_mac, &ROUTER_IN, &CLIENT);
        assert_eq!((t, code, quote), (3, 13, f[14..].to_vec()));
        assert_eq!(fx.reason(Reason::IcmpUnreachable), 1);
        // A blackhole route: dropped without an answer, as the stack does.
        let f = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40002, 11, true, b"");
        assert_eq!(fx.tc(&f, fx.v0).0, TC_ACT_SHOT);
        assert_eq!(fx.reason(Reason::IcmpUnreachable), 2);

        // Larger than the egress MTU with DF: "fragmentation needed" with the MTU, a quote
        // of 548 bytes (576 in all).
        ip(&["link", "set", "v1", "mtu", "1300"]);
        let mut big = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6400, 53, &[5u8; 1400]);
        big[14 + 6] |= 0x40;
        big[24..26].copy_from_slice(&[0, 0]);
        let ip_sum = etherparse::Ipv4Header::from_slice(&big[14..]).unwrap().0.calc_header_checksum();
        big[24..26].copy_from_slice(&ip_sum.to_be_bytes());
        let (verdict, out) = fx.tc(&big, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (t, code, rest, quote) = icmp_answer(&out, CLIENT_MAC, fx.v0_mac, &ROUTER_IN, &CLIENT);
        assert_eq!((t, code, rest), (3, 4, [0, 0, 0x05, 0x14]), "fragmentation needed, MTU 1300");
        assert_eq!(quote, big[14..14 + 548], "576 bytes in all");
        assert_eq!(fx.reason(Reason::IcmpTooBig), 1);

        // Without DF: rewritten and handed to the stack through lo, which fragments it.
        let mut no_df = big.clone();
        no_df[14 + 6] &= !0x40;
        no_df[24..26].copy_from_slice(&[0, 0]);
        let ip_sum = etherparse::Ipv4Header::from_slice(&no_df[14..]).unwrap().0.calc_header_checksum();
        no_df[24..26].copy_from_slice(&ip_sum.to_be_bytes());
        let (verdict, out) = fx.tc(&no_df, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT, "redirected to lo's ingress");
        let (_, dmac, src, dst, ttl, _, dport) = check(&out);
        assert_eq!((dmac, src, dst, dport, ttl), ([0; 6], ROUTER_OUT, SERVER, 5353, 64), "rewritten, for the stack");
        assert_eq!(fx.reason(Reason::FibFragNeeded), 1);

        // IPv6: hop limit 1 (the fixture's FIB has no IPv6 answer: back the way it came).
        let mut f6 = tcp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 40000, 3306, true, b"");
        f6[14 + 7] = 1;
        let (verdict, out) = fx.tc(&f6, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (t, code, _, quote) = icmp_answer(&out, CLIENT_MAC, fx.v0_mac, &ROUTER_IN6, &CLIENT6);
        assert_eq!((t, code, quote), (3, 0, f6[14..].to_vec()), "ICMPv6 time exceeded");
        assert_eq!(fx.reason(Reason::IcmpTimeExceeded), 3, "with the partial one");
    });
}

/// A small seeded PRNG (xorshift64*): the same seed gives the same frames on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// (IP header checksum valid (always for IPv6), L4 checksum valid) of a frame etherparse
/// can read.
fn checksums_valid(frame: &[u8]) -> Option<(bool, bool)> {
    let h = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let payload = h.payload.slice();
    match (&h.net, h.transport.as_ref()?) {
        (Some(NetHeaders::Ipv4(ip, _)), t) => {
            let l4 = match t {
                TransportHeader::Tcp(t) => t.checksum == t.calc_checksum_ipv4(ip, payload).ok()?,
                TransportHeader::Udp(u) => u.checksum == 0 || u.checksum == u.calc_checksum_ipv4(ip, payload).ok()?,
                _ => return None,
            };
            Some((ip.header_checksum == ip.calc_header_checksum(), l4))
        }
        (Some(NetHeaders::Ipv6(ip, ext)), t) if ext.is_empty() => {
            let l4 = match t {
                TransportHeader::Tcp(t) => t.checksum == t.calc_checksum_ipv6(ip, payload).ok()?,
                TransportHeader::Udp(u) => u.checksum == u.calc_checksum_ipv6(ip, payload).ok()?,
                _ => return None,
            };
            Some((true, l4))
        }
        _ => None,
    }
}

/// (ip src, ip dst, hop limit, sport, dport) of an IPv6 TCP/UDP frame whose checksums are
/// all valid.
fn check6(frame: &[u8]) -> ([u8; 16], [u8; 16], u8, u16, u16) {
    assert_eq!(checksums_valid(frame), Some((true, true)), "valid IPv6 checksums");
    let h = PacketHeaders::from_ethernet_slice(frame).unwrap();
    let Some(NetHeaders::Ipv6(ip, _)) = &h.net else { panic!("not IPv6") };
    let (sport, dport) = match h.transport.unwrap() {
        TransportHeader::Tcp(t) => (t.source_port, t.destination_port),
        TransportHeader::Udp(u) => (u.source_port, u.destination_port),
        other => panic!("{other:?}"),
    };
    (ip.source, ip.destination, ip.hop_limit, sport, dport)
}

/// IPv6 rewrites through TC (whose helpers handle any checksum state). In this fixture
/// the FIB answers IPv6 lookups made from BPF_PROG_TEST_RUN with "not forwarded", so the
/// rewritten packets are handed to the stack (TC_ACT_OK) and XDP hands them to TC; the
/// end-to-end tests (v6icmp.rs) show IPv6 redirected on real traffic.
#[test]
fn ipv6_tcp_and_udp_rewrites() {
    with_fixture(CONFIG, |fx| {
        let forwarded = |v: u32| v == TC_ACT_REDIRECT || v == TC_ACT_OK;
        let syn = tcp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 40000, 3306, true, b"");
        let (verdict, out, _) = fx.xdp(&syn, fx.v0);
        assert!(
            verdict == XDP_REDIRECT || (verdict == XDP_PASS && out == syn),
            "XDP finishes it or leaves it whole for TC"
        );
        let (verdict, out) = fx.tc(&syn, fx.v0);
        assert!(forwarded(verdict));
        let (src, dst, _, sport, dport) = check6(&out);
        // Without a FIB answer SNAT uses the address the client reached (see above).
        assert!(src == ROUTER_OUT6 || src == ROUTER_IN6, "SNAT to one of the router's addresses");
        assert_eq!((dst, dport), (SERVER6, 3197), "DNAT to the backend");
        let reply = tcp6_frame(SERVER_MAC, fx.v1_mac, SERVER6, src, 3197, sport, true, b"");
        let (verdict, out) = fx.tc(&reply, fx.v1);
        assert!(forwarded(verdict));
        let (src, dst, _, sport, dport) = check6(&out);
        assert_eq!((src, dst, sport, dport), (ROUTER_IN6, CLIENT6, 3306, 40000));

        let q = udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 5000, 53, b"query6");
        let (verdict, out) = fx.tc(&q, fx.v0);
        assert!(forwarded(verdict));
        let (usrc, dst, _, usport, dport) = check6(&out);
        assert_eq!((dst, dport), (SERVER6, 5353));
        let a = udp6_frame(SERVER_MAC, fx.v1_mac, SERVER6, usrc, 5353, usport, b"answer6");
        let (verdict, out) = fx.tc(&a, fx.v1);
        assert!(forwarded(verdict));
        let (src, dst, _, sport, dport) = check6(&out);
        assert_eq!((src, dst, sport, dport), (ROUTER_IN6, CLIENT6, 53, 5000));
        assert_eq!(fx.stats(3).new_conns, 1);
        assert_eq!(fx.stats(4).new_conns, 1);

        // Extension headers and fragments go to the stack untouched.
        let mut frag = syn.clone();
        frag[14 + 6] = 44;
        let (verdict, out, _) = fx.xdp(&frag, fx.v0);
        assert_eq!((verdict, out == frag), (XDP_PASS, true));
        assert_eq!(fx.reason(Reason::Fragment), 1);
        let mut hbh = syn.clone();
        hbh[14 + 6] = 0;
        let (verdict, out, _) = fx.xdp(&hbh, fx.v0);
        assert_eq!((verdict, out == hbh), (XDP_PASS, true));
        assert_eq!(fx.reason(Reason::Ipv6Extension), 1);
    });
}

/// Packets counted under their outcome (events such as a fragment translated are counted
/// beside it).
fn all_reasons(fx: &Fixture) -> u64 {
    forwarder_common::ALL_REASONS.iter().filter(|r| !r.is_event()).map(|r| fx.reason(*r)).sum()
}

/// Thousands of mutated frames through XDP and TC: every output is either the input
/// unchanged or a rewrite to the backend / back to the client whose checksums are exactly
/// as valid as the input's, and the reason counters add up to the frames sent.
#[test]
fn mutated_frames_are_left_alone_or_rewritten_correctly() {
    with_fixture(CONFIG, |fx| {
        let seed =
            std::env::var("FWT_SEED").ok().and_then(|s| s.parse().ok()).filter(|s| *s != 0).unwrap_or(0x5eed_f0f0_u64);
        let mut rng = Rng(seed);
        // Open a TCP (handshake completed) and a UDP flow so that reply-direction frames
        // match too.
        let (_, out, _) = fx.xdp(&tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, true, b""), fx.v0);
        let tcp_port = check(&out).5;
        fx.xdp(&tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, tcp_port, true, b""), fx.v1);
        fx.xdp(&tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, false, b""), fx.v0);
        assert_eq!(tcp_states(fx, 40000), (TCP_ESTABLISHED, TCP_ESTABLISHED));
        let (_, out, _) = fx.xdp(&udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5000, 53, b"q"), fx.v0);
        let udp_port = check(&out).5;
        let bases: Vec<(Vec<u8>, u32)> = vec![
            (tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 3306, false, &[1u8; 100]), fx.v0),
            (tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40001, 3306, true, b""), fx.v0),
            (udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5000, 53, b"query"), fx.v0),
            (tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, tcp_port, false, &[2u8; 60]), fx.v1),
            (udp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 5353, udp_port, b"answer"), fx.v1),
            (tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 40000, 80, false, b"other"), fx.v0),
            (tcp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 41000, 3306, true, &[3u8; 40]), fx.v0),
            (udp6_frame(CLIENT_MAC, fx.v0_mac, CLIENT6, ROUTER_IN6, 5001, 53, b"query6"), fx.v0),
        ];
        const FRAMES: usize = 3000;
        let (mut rewritten, mut untouched) = (0, 0);
        let mut refused_before = 0;
        for i in 0..FRAMES {
            let (base, ifindex) = &bases[rng.below(bases.len())];
            let mut f = base.clone();
            match rng.below(4) {
                // Flip 1-3 bytes of the headers.
                0 | 1 => {
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(f.len().min(60));
                        f[at] ^= 1 << rng.below(8);
                    }
                }
                // A random byte anywhere, payload included.
                2 => {
                    let at = rng.below(f.len());
                    f[at] = rng.next() as u8;
                }
                // Truncated or padded.
                _ => {
                    let len = rng.below(f.len() + 40);
                    f.resize(len.max(14), rng.next() as u8);
                }
            }
            let before = all_reasons(fx);
            let use_tc = i % 2 == 1;
            let (verdict, out) = if use_tc {
                if (f.len() < 34 && f[12..14] == [8, 0]) || (f.len() < 54 && f[12..14] == [0x86, 0xdd]) {
                    continue; // the kernel refuses to build an skb this short
                }
                fx.tc(&f, *ifindex)
            } else {
                let (v, out, _) = fx.xdp(&f, *ifindex);
                (v, out)
            };
            assert_eq!(all_reasons(fx), before + 1, "frame {i}: counted exactly once");
            let dropped = if use_tc { verdict == 2 } else { verdict == XDP_DROP };
            // Mutated flags or sequences may be segments the connection's state refuses
            // (a FIN or an RST where netfilter would not take one): dropped, and only so.
            let refused = fx.reason(Reason::CtInvalid) + fx.reason(Reason::RstOutOfWindow);
            if dropped && refused > refused_before {
                refused_before = refused;
                continue;
            }
            if dropped {
                let counts: Vec<(&str, u64)> = forwarder_common::ALL_REASONS
                    .iter()
                    .map(|r| (r.name(), fx.reason(*r)))
                    .filter(|c| c.1 > 0)
                    .collect();
                panic!("frame {i} (tc {use_tc}): dropped {f:02x?}\n{counts:?}");
            }
            if out == f {
                untouched += 1;
                continue;
            }
            rewritten += 1;
            // Fragments (a mutated flag or offset) are translated too; etherparse does not
            // take them apart, so their own invariants stand in for the checksums.
            let same = match fragment_invariants(&f) {
                Some(want) => fragment_invariants(&out) == Some(want),
                None => {
                    let want = checksums_valid(&f).expect("only parseable TCP/UDP frames are rewritten");
                    checksums_valid(&out) == Some(want)
                }
            };
            assert!(same, "frame {i}: checksums exactly as valid as the input's\n{f:02x?}\n{out:02x?}");
            let h = PacketHeaders::from_ethernet_slice(&out).unwrap();
            // Mutated client addresses and ports open flows of their own, so the way back
            // may lead to any client; its source is always the listen address.
            let ok = match &h.net {
                Some(NetHeaders::Ipv4(ip, _)) => {
                    (ip.destination == SERVER && ip.source == ROUTER_OUT) || ip.source == ROUTER_IN
                }
                Some(NetHeaders::Ipv6(ip, _)) => {
                    (ip.destination == SERVER6 && ip.source == ROUTER_OUT6) || ip.source == ROUTER_IN6
                }
                _ => false,
            };
            assert!(ok, "frame {i}: rewritten only to the backend or back to the client: {:?}", h.net);
            assert_eq!(out.len(), f.len(), "frame {i}: length unchanged");
        }
        assert!(
            rewritten > 300 && untouched > 300,
            "both outcomes exercised: {rewritten} rewritten, {untouched} untouched"
        );
    });
}

/// A TCP segment from the client (`reply` false) or the server with these flags and
/// sequence number.
fn segment(
    fx: &Fixture,
    reply: bool,
    client_port: u16,
    snat_port: u16,
    flags: u8,
    seq: u32,
    payload: &[u8],
) -> (Vec<u8>, u32) {
    let (src_mac, dst_mac, src, dst, sport, dport, ifindex) = if reply {
        (SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, 3197, snat_port, fx.v1)
    } else {
        (CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, client_port, 3306, fx.v0)
    };
    let mut b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).tcp(sport, dport, seq, 65000);
    if flags & 0x02 != 0 {
        b = b.syn();
    }
    if flags & 0x10 != 0 {
        b = b.ack(1);
    }
    if flags & 0x01 != 0 {
        b = b.fin();
    }
    if flags & 0x04 != 0 {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    (v, ifindex)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYNACK: u8 = 0x12;
const FINACK: u8 = 0x11;
const RST: u8 = 0x04;

/// Opens a connection from `client_port` through XDP (handshake done): its SNAT port.
fn handshake(fx: &Fixture, client_port: u16) -> u16 {
    let (syn, i) = segment(fx, false, client_port, 0, SYN, 100, b"");
    let (verdict, out, _) = fx.xdp(&syn, i);
    assert_eq!(verdict, XDP_REDIRECT, "SYN");
    let snat = check(&out).5;
    for (reply, flags, seq) in [(true, SYNACK, 900), (false, ACK, 101)] {
        let (f, i) = segment(fx, reply, client_port, snat, flags, seq, b"");
        assert_eq!(fx.xdp(&f, i).0, XDP_REDIRECT, "flags {flags:#x}");
    }
    snat
}

/// netfilter's TCP states, end to end through the programs: the handshake, data, the
/// server closing first, the client closing, TIME_WAIT; then the client reusing its port
/// reopens the connection with the same mapping. Both entries hold the state throughout.
#[test]
fn tcp_connections_walk_netfilters_states_and_a_new_syn_reopens_them() {
    with_fixture(CONFIG, |fx| {
        let (syn, i) = segment(fx, false, 40500, 0, SYN, 100, b"");
        let (verdict, out, _) = fx.xdp(&syn, i);
        assert_eq!(verdict, XDP_REDIRECT);
        let snat = check(&out).5;
        assert_eq!(tcp_states(fx, 40500), (TCP_SYN_SENT, TCP_SYN_SENT));
        let steps: &[(bool, u8, u32, u8, bool)] = &[
            (true, SYNACK, 900, TCP_SYN_RECV, false),
            (false, ACK, 101, TCP_ESTABLISHED, true),
            (false, ACK, 101, TCP_ESTABLISHED, true), // data below
            (true, FINACK, 901, TCP_FIN_WAIT, true),
            (false, ACK, 111, 5 /* CLOSE_WAIT */, true),
            (false, FINACK, 111, TCP_LAST_ACK, true),
            (true, ACK, 902, TCP_TIME_WAIT, true),
        ];
        for (n, &(reply, flags, seq, want, assured)) in steps.iter().enumerate() {
            let payload: &[u8] = if n == 2 { b"0123456789" } else { b"" };
            let (f, i) = segment(fx, reply, 40500, snat, flags, seq, payload);
            // Through TC every other step: both programs keep the same state machine.
            let verdict = if n % 2 == 0 { fx.xdp(&f, i).0 } else { fx.tc(&f, i).0 };
            assert!(verdict == XDP_REDIRECT || verdict == TC_ACT_REDIRECT, "step {n}: forwarded");
            let ((_, o), (_, r)) = tcp_entries(fx, 40500);
            assert_eq!((o.state, r.state), (want, want), "step {n}");
            assert_eq!(o.flags & CT_ASSURED != 0, assured, "step {n}: assured");
            assert_eq!(r.flags & CT_ASSURED, o.flags & CT_ASSURED, "step {n}: both entries");
        }
        // The client reuses its port: the SYN reopens the connection, same SNAT port,
        // unassured again, no new entries.
        let new_conns = fx.stats(1).new_conns;
        let (syn, i) = segment(fx, false, 40500, 0, SYN, 5_000_000, b"");
        let (verdict, out, _) = fx.xdp(&syn, i);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(check(&out).5, snat, "reopened with the same mapping");
        let ((_, o), (_, r)) = tcp_entries(fx, 40500);
        assert_eq!((o.state, r.state, o.flags & CT_ASSURED), (TCP_SYN_SENT, TCP_SYN_SENT, 0));
        assert_eq!((fx.stats(1).new_conns, fx.conntrack_len()), (new_conns, 2));
        // And it completes as any other.
        for (reply, flags, seq) in [(true, SYNACK, 77_000), (false, ACK, 5_000_001)] {
            let (f, i) = segment(fx, reply, 40500, snat, flags, seq, b"");
            assert_eq!(fx.xdp(&f, i).0, XDP_REDIRECT);
        }
        assert_eq!(tcp_states(fx, 40500), (TCP_ESTABLISHED, TCP_ESTABLISHED));
    });
}

/// Only a SYN opens a TCP connection: other segments for a listen port without a tracked
/// connection (the SYN-ACK answering the host's own connection from that port, a stray
/// ACK) reach the stack untouched, on both programs.
#[test]
fn only_a_syn_opens_a_tcp_flow() {
    with_fixture(CONFIG, |fx| {
        for flags in [SYNACK, ACK, FINACK, RST, ACK | 0x08] {
            let (f, i) = segment(fx, false, 40600, 0, flags, 7, b"");
            let before = fx.reason(Reason::TcpNotSyn);
            let (verdict, out, _) = fx.xdp(&f, i);
            assert_eq!((verdict, out == f), (XDP_PASS, true), "flags {flags:#x}: XDP passes it untouched");
            let (verdict, out) = fx.tc(&f, i);
            assert_eq!((verdict, out == f), (TC_ACT_OK, true), "flags {flags:#x}: TC too");
            assert_eq!(fx.reason(Reason::TcpNotSyn), before + 2, "flags {flags:#x}: counted");
        }
        assert_eq!(fx.conntrack_len(), 0, "nothing tracked");
    });
}

/// An RST outside the window of its sender (a blind reset with a made-up sequence) is
/// dropped and leaves an established connection as it was; one at the sender's sequence
/// closes it. During the handshake RSTs are not checked (they may answer a stale SYN-ACK).
/// Segments the state does not allow are dropped too.
#[test]
fn rsts_outside_the_window_and_invalid_segments_are_dropped() {
    with_fixture(CONFIG, |fx| {
        let snat = handshake(fx, 40700);
        for (reply, seq) in [(false, 101u32.wrapping_add(1 << 30)), (true, 901u32.wrapping_sub(64 << 20))] {
            let (rst, i) = segment(fx, reply, 40700, snat, RST, seq, b"");
            assert_eq!(fx.xdp(&rst, i).0, XDP_DROP, "reply {reply}: blind RST");
            assert_eq!(fx.tc(&rst, i).0, 2 /* TC_ACT_SHOT */);
            assert_eq!(tcp_states(fx, 40700), (TCP_ESTABLISHED, TCP_ESTABLISHED), "state unchanged");
        }
        assert_eq!(fx.reason(Reason::RstOutOfWindow), 4);
        let (rst, i) = segment(fx, true, 40700, snat, RST | ACK, 901, b"");
        assert_eq!(fx.xdp(&rst, i).0, XDP_REDIRECT, "the server's RST at its sequence");
        assert_eq!(tcp_states(fx, 40700), (TCP_CLOSE, TCP_CLOSE));

        // Before the backend answers, the client may not acknowledge anything.
        let (syn, i) = segment(fx, false, 40701, 0, SYN, 100, b"");
        let snat = check(&fx.xdp(&syn, i).1).5;
        let (ack, i) = segment(fx, false, 40701, snat, ACK, 101, b"");
        assert_eq!(fx.xdp(&ack, i).0, XDP_DROP);
        assert_eq!(fx.reason(Reason::CtInvalid), 1);
        assert_eq!(tcp_states(fx, 40701), (TCP_SYN_SENT, TCP_SYN_SENT));
        // The backend refusing (RST-ACK, no sequence of its own seen yet) closes it.
        let (rst, i) = segment(fx, true, 40701, snat, RST | ACK, 0, b"");
        assert_eq!(fx.xdp(&rst, i).0, XDP_REDIRECT);
        assert_eq!(tcp_states(fx, 40701), (TCP_CLOSE, TCP_CLOSE));

        // During the handshake the client refuses a SYN-ACK that is not for its SYN (the
        // backend's leftover of an earlier connection on the tuple) with an RST carrying
        // that SYN-ACK's acknowledgement, far from its own sequence: it reaches the backend.
        let (syn, i) = segment(fx, false, 40702, 0, SYN, 100, b"");
        let snat = check(&fx.xdp(&syn, i).1).5;
        let (stale, i) = segment(fx, true, 40702, snat, SYNACK, 777_000, b"");
        assert_eq!(fx.xdp(&stale, i).0, XDP_REDIRECT);
        let (rst, i) = segment(fx, false, 40702, snat, RST, 3_000_000_000, b"");
        assert_eq!(fx.xdp(&rst, i).0, XDP_REDIRECT, "not assured yet: no window check");
        assert_eq!(tcp_states(fx, 40702), (TCP_CLOSE, TCP_CLOSE));
        // The client's retried SYN reopens it.
        let (syn, i) = segment(fx, false, 40702, 0, SYN, 100, b"");
        assert_eq!(check(&fx.xdp(&syn, i).1).5, snat);
        assert_eq!(tcp_states(fx, 40702), (TCP_SYN_SENT, TCP_SYN_SENT));
        assert_eq!(fx.reason(Reason::RstOutOfWindow), 4, "only the blind RSTs above were refused");
    });
}

/// SNAT keeps the client's source port when that reply tuple is free (as netfilter does),
/// else takes another; ports a host socket holds are never handed out.
#[test]
fn snat_keeps_the_client_port_when_free_and_skips_host_sockets() {
    with_fixture(CONFIG, |fx| {
        let (syn, i) = segment(fx, false, 41500, 0, SYN, 100, b"");
        assert_eq!(check(&fx.xdp(&syn, i).1).5, 41500, "the client's port");
        // Another client with the same port: that reply tuple is taken.
        let mut other = syn.clone();
        other[14 + 15] = 3; // 192.0.2.3
        let other = {
            let h = PacketHeaders::from_ethernet_slice(&other).unwrap();
            let Some(NetHeaders::Ipv4(mut ip, _)) = h.net else { panic!() };
            ip.header_checksum = ip.calc_header_checksum();
            let mut v = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, fx.v0_mac)
                .ipv4(ip.source, ROUTER_IN, 64)
                .tcp(41500, 3306, 100, 65000)
                .syn()
                .write(&mut v, b"")
                .unwrap();
            v
        };
        let port = check(&fx.xdp(&other, fx.v0).1).5;
        assert_ne!(port, 41500);
        // A host socket on a port (this thread is in the fixture's namespace): a client
        // with that port gets another one, for TCP and UDP alike.
        let tcp_listener = std::net::TcpListener::bind("0.0.0.0:41600").unwrap();
        let (syn, i) = segment(fx, false, 41600, 0, SYN, 100, b"");
        assert_ne!(check(&fx.xdp(&syn, i).1).5, 41600, "TCP port of a host socket skipped");
        let udp = std::net::UdpSocket::bind("203.0.113.1:41601").unwrap();
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 41601, 53, b"q");
        assert_ne!(check(&fx.xdp(&q, fx.v0).1).5, 41601, "UDP port of a host socket skipped");
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 41602, 53, b"q");
        assert_eq!(check(&fx.xdp(&q, fx.v0).1).5, 41602, "UDP keeps the client's port too");
        drop((tcp_listener, udp));
    });
}

/// A datagram to a listen port that belongs to a connected socket of the host (its own
/// conversation from that port) is left to the host, not forwarded.
#[test]
fn datagrams_of_a_connected_host_socket_are_left_to_it() {
    with_fixture(CONFIG, |fx| {
        // This thread is in the fixture's namespace: the host's own socket on 192.0.2.1:53,
        // connected to the client's 6700.
        let sock = std::net::UdpSocket::bind("192.0.2.1:53").unwrap();
        sock.connect("192.0.2.2:6700").unwrap();
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6700, 53, b"answer to the host");
        let (verdict, out, _) = fx.xdp(&q, fx.v0);
        assert_eq!((verdict, out == q), (XDP_PASS, true));
        assert_eq!(fx.reason(Reason::HostSocket), 1);
        // Another client port is the forward's (a socket bound but not connected to it
        // does not take it: DNAT comes first, as with netfilter).
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 6701, 53, b"query");
        assert_eq!(fx.xdp(&q, fx.v0).0, XDP_REDIRECT);
        assert_eq!(fx.conntrack_len(), 2);
        drop(sock);
    });
}

/// With every SNAT port of the range held, a new flow takes the port of an unassured
/// connection idle for a while (netfilter's early_drop), counted; assured connections
/// and young handshakes are never dropped.
#[test]
fn a_full_port_range_drops_unassured_connections_early_never_assured_ones() {
    let cfg = format!("{CONFIG}\n[conntrack]\nsnat_ports = \"30000-30031\"\n");
    with_fixture(&cfg, |fx| {
        // 16 assured connections, 16 half-open ones (SYN only).
        for p in 0..16u16 {
            handshake(fx, 42000 + p);
        }
        for p in 16..32u16 {
            let (syn, i) = segment(fx, false, 42000 + p, 0, SYN, 100, b"");
            assert_eq!(fx.xdp(&syn, i).0, XDP_REDIRECT);
        }
        assert_eq!(fx.conntrack_len(), 64);
        let (syn, i) = segment(fx, false, 42100, 0, SYN, 100, b"");
        assert_eq!(fx.xdp(&syn, i).0, XDP_DROP, "the half-open ones are too young to give way");
        assert_eq!((fx.reason(Reason::PortsExhausted), fx.reason(Reason::EarlyDrop)), (1, 0));
        // Age every entry by 2 s.
        for (k, mut v) in fx.state.conntrack().unwrap() {
            v.last_seen_ns -= 2_000_000_000;
            fx.state.put_conntrack(&k, &v).unwrap();
        }
        for n in 0..16u16 {
            let (syn, i) = segment(fx, false, 42100 + n, 0, SYN, 100, b"");
            assert_eq!(fx.xdp(&syn, i).0, XDP_REDIRECT, "flow {n} takes a half-open one's port");
        }
        assert_eq!(fx.reason(Reason::EarlyDrop), 16);
        assert_eq!(fx.conntrack_len(), 64, "dropped ones leave both entries");
        for p in 0..16u16 {
            assert_eq!(tcp_states(fx, 42000 + p), (TCP_ESTABLISHED, TCP_ESTABLISHED), "assured {p} kept");
        }
        let (syn, i) = segment(fx, false, 42200, 0, SYN, 100, b"");
        assert_eq!(fx.xdp(&syn, i).0, XDP_DROP, "only assured and young ones left");
    });
}

/// The same new flow on two CPUs at once ends as one connection: the second CPU adopts
/// the first one's translation instead of taking a port of its own.
#[test]
fn one_new_flow_on_two_cpus_at_once_becomes_one_connection() {
    with_fixture(CONFIG, |fx| {
        const FLOWS: u16 = 400;
        let frames: Vec<Vec<u8>> = (0..FLOWS).map(|p| segment(fx, false, 43000 + p, 0, SYN, 100, b"").0).collect();
        let prog_fd = fx.xdp_fd();
        let v0 = fx.v0;
        let barrier = std::sync::Barrier::new(2);
        let outs: Vec<Vec<(u32, Vec<u8>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2usize)
                .map(|cpu| {
                    let (frames, barrier) = (&frames, &barrier);
                    s.spawn(move || {
                        pin_to_cpu(cpu);
                        frames
                            .iter()
                            .map(|f| {
                                barrier.wait();
                                xdp_test_run_fd(prog_fd, f, v0)
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (n, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
            assert_eq!((a.0, b.0), (XDP_REDIRECT, XDP_REDIRECT), "flow {n}");
            assert_eq!(check(&a.1).5, check(&b.1).5, "flow {n}: one SNAT port");
        }
        assert_eq!(fx.conntrack_len(), 2 * FLOWS as usize, "one entry pair per flow");
        assert_eq!(fx.stats(1).new_conns, FLOWS as u64, "counted once");
    });
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu % num_cpus()).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// BPF_PROG_TEST_RUN of an XDP program by fd, as [`Fixture::xdp`] does (usable from
/// several threads at once): (verdict, output frame).
fn xdp_test_run_fd(prog_fd: i32, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    // union bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in,
    // data_out, repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut attr = TestAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    const BPF_PROG_TEST_RUN: i64 = 10;
    // SAFETY: the attribute points at buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestAttr, std::mem::size_of::<TestAttr>())
    };
    assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    out.truncate(attr.data_size_out as usize);
    let meta = out.len() - frame.len();
    (attr.retval, out[meta..].to_vec())
}

/// Port ranges: a SYN to a port inside a listen range (not its first) is forwarded to the
/// backend port at the same offset, XDP and TC alike; a range to one port sends every port
/// there; the ports just outside are no rule's.
#[test]
fn ports_of_a_range_find_its_rule_and_keep_their_offset() {
    let config = r#"
[[forward]]
name = "web"
protocol = "tcp"
listen = "0.0.0.0:8000-8099"
backend = "203.0.113.20:9000-9099"

[[forward]]
name = "to-one"
protocol = "udp"
listen = "192.0.2.1:7000-7099"
backend = "203.0.113.20:5353"
"#;
    with_fixture(config, |fx| {
        for (client_port, port, backend_port) in [(41000, 8042, 9042), (41001, 8000, 9000), (41002, 8099, 9099)] {
            let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, client_port, port, true, b"");
            let (verdict, out, _) = fx.xdp(&syn, fx.v0);
            assert_eq!(verdict, XDP_REDIRECT, "{port}");
            let (_, _, src, dst, _, sport, dport) = check(&out);
            assert_eq!((src, dst, dport), (ROUTER_OUT, SERVER, backend_port), "{port}");
            let reply = tcp_frame(SERVER_MAC, fx.v1_mac, SERVER, ROUTER_OUT, backend_port, sport, true, b"");
            let (verdict, out, _) = fx.xdp(&reply, fx.v1);
            assert_eq!(verdict, XDP_REDIRECT);
            let (_, _, src, dst, _, sport, dport) = check(&out);
            assert_eq!((src, sport, dst, dport), (ROUTER_IN, port, CLIENT, client_port), "the client sees {port}");
        }
        assert_eq!(fx.stats(1).new_conns, 3);
        let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 41003, 8055, true, b"");
        let (verdict, out) = fx.tc(&syn, fx.v0);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(check(&out).6, 9055, "TC takes the range as XDP does");

        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5000, 7042, b"query");
        let (verdict, out, _) = fx.xdp(&q, fx.v0);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(check(&out).6, 5353, "a range to one port");

        let no_rule = fx.reason(Reason::NoRule);
        for port in [7999, 8100] {
            let syn = tcp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 41004, port, true, b"");
            let (verdict, out, _) = fx.xdp(&syn, fx.v0);
            assert_eq!((verdict, out), (XDP_PASS, syn), "{port} is outside the range");
        }
        let q = udp_frame(CLIENT_MAC, fx.v0_mac, CLIENT, ROUTER_IN, 5000, 7100, b"query");
        assert_eq!(fx.xdp(&q, fx.v0).0, XDP_PASS);
        assert_eq!(fx.reason(Reason::NoRule), no_rule + 3);
        assert_eq!(fx.stats(1).new_conns, 4);
    });
}
