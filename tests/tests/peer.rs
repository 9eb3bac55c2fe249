//! The peer shortcut on the two-ISP same-switch topology (forwarder_tests::topo::TwoIsp).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use forwarder_tests::{
    Daemon, Netns,
    sockets::{tcp_sink, upload_to_sink},
    topo::{A_ADDR, A_DEV, B_ADDR, B_DEV, TwoIsp},
};

fn peer_config(peer: &str, dev: &str) -> String {
    format!("[[peer]]\naddress = \"{peer}\"\ninterface = \"{dev}\"\n")
}

/// Pings `to` from `ns`; returns the TTLs of the replies.
fn ping(ns: &Netns, to: &str, count: u32) -> Vec<u8> {
    let out = ns.cmd("ping").args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "2", to]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("ttl=").and_then(|t| t.parse().ok()))
        .collect()
}

fn peer_stats(d: &Daemon) -> serde_json::Value {
    d.stats().unwrap()["peers"][0].clone()
}

/// Waits until the daemon reports its peer in `state`.
fn wait_state(d: &Daemon, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while peer_stats(d)["state"] != state {
        assert!(Instant::now() < deadline, "peer never became {state}: {}\n{}", peer_stats(d), d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP stream of `n` bytes from `from` to a server on B; returns the bytes B received.
fn tcp_stream(t: &TwoIsp, from: &Netns, n: usize) -> usize {
    let to: SocketAddr = format!("{B_ADDR}:5001").parse().unwrap();
    let server = tcp_sink(&t.b, to, 1).unwrap();
    let answered = from.run(move || upload_to_sink(to, n).0).unwrap();
    let received = server.join().unwrap()[0].1;
    assert_eq!(answered, received, "the client got the server's count");
    received
}

#[test]
fn without_forwarder_traffic_crosses_both_isps() {
    let t = TwoIsp::new().unwrap();
    let before = t.gateways_forwarded().unwrap();
    let ttls = ping(&t.a, B_ADDR, 3);
    assert_eq!(ttls, vec![61; 3], "B's replies cross GW-B, the internet and GW-A");
    let ttls = ping(&t.b, A_ADDR, 3);
    assert_eq!(ttls, vec![61; 3]);
    // Each echo and reply is forwarded by both gateways: 4 ping exchanges x 2 gateways x ...
    assert!(t.gateways_forwarded().unwrap() >= before + 24, "the gateways carried it");
}

#[test]
fn with_forwarder_on_both_sides_peers_talk_directly() {
    let t = TwoIsp::new().unwrap();
    let da = Daemon::start(&t.a, &format!("{}a", t.tag), &peer_config(B_ADDR, A_DEV)).unwrap();
    let db = Daemon::start(&t.b, &format!("{}b", t.tag), &peer_config(A_ADDR, B_DEV)).unwrap();
    wait_state(&da, "direct", Duration::from_secs(10));
    wait_state(&db, "direct", Duration::from_secs(10));

    let gw_before = t.gateways_forwarded().unwrap();
    let (a0, b0) = (peer_stats(&da), peer_stats(&db));
    assert_eq!(ping(&t.a, B_ADDR, 5), vec![64; 5], "TTL arrives undecremented");
    assert_eq!(ping(&t.b, A_ADDR, 5), vec![64; 5]);
    let (a1, b1) = (peer_stats(&da), peer_stats(&db));
    let diff = |x: &serde_json::Value, y: &serde_json::Value, k: &str| y[k].as_u64().unwrap() - x[k].as_u64().unwrap();
    // A sent 5 echo requests and 5 echo replies to B; so did B to A.
    assert_eq!(diff(&a0, &a1, "direct_packets"), 10, "{a1}");
    assert_eq!(diff(&b0, &b1, "direct_packets"), 10, "{b1}");
    assert_eq!(diff(&a0, &a1, "direct_bytes"), 10 * 84, "ICMP echo of 56 bytes is 84 bytes of IPv4");

    let received = tcp_stream(&t, &t.a, 1_000_000);
    assert_eq!(received, 1_000_000);
    assert_eq!(t.gateways_forwarded().unwrap(), gw_before, "the gateways saw none of it");
    assert_eq!(peer_stats(&da)["fallback_packets"], 0);
}

#[test]
fn with_forwarder_on_one_side_the_asymmetric_path_works() {
    let t = TwoIsp::new().unwrap();
    let da = Daemon::start(&t.a, &t.tag, &peer_config(B_ADDR, A_DEV)).unwrap();
    wait_state(&da, "direct", Duration::from_secs(10));
    // A → B direct (64 when B pings A: A's reply comes straight), B → A via the ISPs.
    assert_eq!(ping(&t.a, B_ADDR, 3), vec![61; 3], "B's replies still cross the ISPs");
    assert_eq!(ping(&t.b, A_ADDR, 3), vec![64; 3], "A's replies come straight");
    assert_eq!(tcp_stream(&t, &t.a, 200_000), 200_000);
    assert!(peer_stats(&da)["direct_packets"].as_u64().unwrap() > 6);
}

#[test]
fn a_peer_that_stops_answering_falls_back_and_recovers() {
    let t = TwoIsp::new().unwrap();
    // Quick neighbour timers on A so a silent peer is noticed in seconds, not minutes.
    for (k, v) in [
        ("base_reachable_time_ms", "500"),
        ("delay_first_probe_time", "1"),
        ("retrans_time_ms", "200"),
        ("ucast_solicit", "2"),
        ("mcast_solicit", "2"),
    ] {
        t.a.sysctl(&format!("net.ipv4.neigh.{A_DEV}.{k}"), v).unwrap();
    }
    let da = Daemon::start(&t.a, &t.tag, &peer_config(B_ADDR, A_DEV)).unwrap();
    wait_state(&da, "direct", Duration::from_secs(10));
    assert_eq!(ping(&t.a, B_ADDR, 2).len(), 2);

    t.b.ip(&["link", "set", B_DEV, "down"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer_stats(&da)["state"] != "fallback" {
        assert!(Instant::now() < deadline, "no fallback: {}", peer_stats(&da));
        ping(&t.a, B_ADDR, 1);
    }
    ping(&t.a, B_ADDR, 2);
    assert!(peer_stats(&da)["fallback_packets"].as_u64().unwrap() >= 2, "fallbacks counted: {}", peer_stats(&da));

    t.b.ip(&["link", "set", B_DEV, "up"]).unwrap();
    t.b.ip(&["route", "replace", "default", "via", "198.51.100.1"]).unwrap();
    wait_state(&da, "direct", Duration::from_secs(15));
    let before = peer_stats(&da)["direct_packets"].as_u64().unwrap();
    assert_eq!(ping(&t.a, B_ADDR, 3).len(), 3, "B answers again");
    assert!(peer_stats(&da)["direct_packets"].as_u64().unwrap() >= before + 3, "direct again");
}

/// Traffic A forwards for others also goes straight to the peer: a LAN client behind A
/// reaches a forward whose backend is B (DNAT + SNAT, then direct), and plain routed
/// traffic to B (ping) leaves A direct with its TTL decremented once, by A.
#[test]
fn forwarded_traffic_to_a_peer_goes_direct() {
    let t = TwoIsp::new().unwrap();
    let lan = Netns::new(&format!("fwt-{}-lan", t.tag)).unwrap();
    t.a.ip(&["link", "add", "l0", "type", "veth", "peer", "name", "c0", "netns", &lan.name]).unwrap();
    t.a.ip(&["addr", "add", "203.0.113.129/25", "dev", "l0"]).unwrap();
    t.a.ip(&["link", "set", "l0", "up"]).unwrap();
    t.a.sysctl("net.ipv4.ip_forward", "1").unwrap();
    lan.ip(&["addr", "add", "203.0.113.130/25", "dev", "c0"]).unwrap();
    lan.ip(&["link", "set", "c0", "up"]).unwrap();
    lan.ip(&["route", "add", "default", "via", "203.0.113.129"]).unwrap();
    // The way back to the LAN for B's ping replies, through the ISPs.
    t.internet.ip(&["route", "add", "203.0.113.128/25", "via", "203.0.113.1"]).unwrap();
    t.gw_a.ip(&["route", "add", "203.0.113.128/25", "via", A_ADDR]).unwrap();

    let cfg_a = format!(
        "[[interface]]\nname = \"l0\"\nxdp = \"native\"\n[[interface]]\nname = \"{A_DEV}\"\nxdp = \"native\"\n\
         [[forward]]\nname = \"to-b\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:3306\"\nbackend = \"{B_ADDR}:5001\"\n{}",
        peer_config(B_ADDR, A_DEV)
    );
    let da = Daemon::start(&t.a, &format!("{}a", t.tag), &cfg_a).unwrap();
    let db = Daemon::start(&t.b, &format!("{}b", t.tag), &peer_config(A_ADDR, B_DEV)).unwrap();
    wait_state(&da, "direct", Duration::from_secs(10));
    wait_state(&db, "direct", Duration::from_secs(10));

    let gw_before = t.gateways_forwarded().unwrap();
    let server = tcp_sink(&t.b, format!("{B_ADDR}:5001").parse().unwrap(), 1).unwrap();
    let counted = lan.run(|| upload_to_sink("203.0.113.129:3306".parse().unwrap(), 5).0).unwrap();
    let (peer, received) = server.join().unwrap()[0];
    assert_eq!((counted, received), (5, 5), "the bytes went through");
    assert_eq!(peer.ip().to_string(), A_ADDR, "SNAT to A's address: {peer}");
    assert_eq!(t.gateways_forwarded().unwrap(), gw_before, "both legs direct");
    let s = da.stats().unwrap();
    assert_eq!(s["forwards"][0]["new_connections"], 1, "{s}");

    let direct_before = peer_stats(&da)["direct_packets"].as_u64().unwrap();
    let ttls = ping(&lan, B_ADDR, 3);
    assert_eq!(ttls.len(), 3, "routed ping to B works");
    assert_eq!(peer_stats(&da)["direct_packets"].as_u64().unwrap() - direct_before, 3, "the echo requests went direct");
}

/// IPv6 peers: with forwarder on both sides ping6 goes direct (hop limit undecremented, the
/// gateways forward nothing), neighbour discovery resolving the peer.
#[test]
fn ipv6_peers_talk_directly() {
    let t = TwoIsp::new().unwrap().with_ipv6().unwrap();
    let (a6, b6) = ("2001:db8:a::10", "2001:db8:b::20");
    let before = TwoIsp::forwarded6(&t.gw_a).unwrap() + TwoIsp::forwarded6(&t.gw_b).unwrap();
    assert_eq!(ping(&t.a, b6, 2), vec![61; 2], "without forwarder: through both ISPs");
    assert!(TwoIsp::forwarded6(&t.gw_a).unwrap() + TwoIsp::forwarded6(&t.gw_b).unwrap() > before);
    let da = Daemon::start(&t.a, &format!("{}a", t.tag), &peer_config(b6, A_DEV)).unwrap();
    let db = Daemon::start(&t.b, &format!("{}b", t.tag), &peer_config(a6, B_DEV)).unwrap();
    wait_state(&da, "direct", Duration::from_secs(10));
    wait_state(&db, "direct", Duration::from_secs(10));
    let gw = TwoIsp::forwarded6(&t.gw_a).unwrap() + TwoIsp::forwarded6(&t.gw_b).unwrap();
    assert_eq!(ping(&t.a, b6, 3), vec![64; 3], "hop limit arrives undecremented");
    assert_eq!(
        TwoIsp::forwarded6(&t.gw_a).unwrap() + TwoIsp::forwarded6(&t.gw_b).unwrap(),
        gw,
        "gateways saw none of it"
    );
    assert!(peer_stats(&da)["direct_packets"].as_u64().unwrap() >= 3);
}
