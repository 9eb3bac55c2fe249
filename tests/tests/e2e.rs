//! End to end: real TCP and UDP between namespaces through a running `forwarder`.
//! client ─ router (forwarder) ─ server; see forwarder_tests::topo.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon,
    config::{forward, interface, router_interfaces},
    sockets::{plus_one_exchange, plus_one_server, serve_in, udp_bound},
    topo::{ROUTER_CLIENT_ADDR, ROUTER_SERVER_ADDR, SERVER_ADDR},
    wait_for,
};

const BACKEND_PORT: u16 = 3197;
const LISTEN_PORT: u16 = 3306;

fn config(xdp: &str, protocol: &str, snat: &str) -> String {
    router_interfaces(xdp)
        + &forward("classic", protocol, format!("0.0.0.0:{LISTEN_PORT}"), format!("{SERVER_ADDR}:{BACKEND_PORT}"))
        + &format!("snat = \"{snat}\"\n")
}

/// A [`plus_one_server`] on the backend port for `conns` connections; returns the peers it saw.
fn tcp_server(chain: &Chain, conns: usize) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    plus_one_server(&chain.server, SocketAddr::new([0, 0, 0, 0].into(), BACKEND_PORT), conns).unwrap()
}

/// Connects from the client to the router's listen port, sends `n` bytes, checks the reply.
fn tcp_exchange(chain: &Chain, n: usize) {
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap();
    chain.client.run(move || plus_one_exchange(to, n)).unwrap();
}

fn forward_stats(d: &Daemon) -> serde_json::Value {
    let s = d.stats().unwrap();
    s["forwards"][0].clone()
}

fn reason(d: &Daemon, name: &str) -> u64 {
    let s = d.stats().unwrap();
    s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap()["packets"].as_u64().unwrap()
}

/// Packets the router's `dev` has transmitted itself (`ip -s link`).
fn tx_packets(chain: &Chain, dev: &str) -> u64 {
    let out = chain.router.ip(&["-s", "-j", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or_else(|| panic!("no tx counter: {out}"))
}

fn tcp_forward(xdp: &str) {
    let chain = Chain::new().unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config(xdp, "tcp", "auto")).unwrap();
    let server = tcp_server(&chain, 3);
    let tx_before = tx_packets(&chain, "rc") + tx_packets(&chain, "rs");
    // Megabytes, so that GSO/GRO packets far above the MTU go through (a lost big
    // segment would stall the stream).
    for n in [10, 4_000_000, 1] {
        tcp_exchange(&chain, n);
    }
    let peers = server.join().unwrap();
    for p in &peers {
        assert_eq!(p.ip().to_string(), ROUTER_SERVER_ADDR, "with snat the server sees the router");
    }
    let f = forward_stats(&daemon);
    assert_eq!(f["new_connections"], 3, "{f}");
    assert!(f["packets"].as_u64().unwrap() >= 3 * 6, "{f}");
    // 100 kB each way: at least that many L3 bytes were rewritten.
    assert!(f["bytes"].as_u64().unwrap() > 200_000, "{f}");
    let stats = daemon.stats().unwrap();
    let left: u64 = stats["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "forwarded")
        .map(|r| r["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(left, f["packets"].as_u64().unwrap(), "every rewritten packet left one way: {stats}");
    assert_eq!(reason(&daemon, "malformed"), 0, "{stats}");
    assert_eq!(reason(&daemon, "rewrite_failed"), 0, "{stats}");
    // Established segments take a fast path: XDP's, or TC's for the locally sent ones
    // (CHECKSUM_PARTIAL, GSO) XDP hands over and for everything without XDP. The
    // megabytes' segments are most of the packets, and their bytes arrived intact above.
    let fast: u64 = ["redirect_xdp_flow_cache", "redirect_xdp_cached", "redirect_tc_flow_cache", "redirect_tc_cached"]
        .iter()
        .map(|r| reason(&daemon, r))
        .sum();
    assert!(fast * 2 > f["packets"].as_u64().unwrap(), "fast path: {fast} of {f}: {stats}");
    let tc_fast = reason(&daemon, "redirect_tc_flow_cache") + reason(&daemon, "redirect_tc_cached");
    assert!(tc_fast > 0, "locally sent segments through TC's fast path: {stats}");
    if xdp == "off" {
        // Both router veths have their peers in other namespaces: TC sends into the peer's
        // ingress (bpf_redirect_peer), so the router's own devices transmit next to nothing
        // (neighbour resolution) of the forwarded packets.
        let tx = tx_packets(&chain, "rc") + tx_packets(&chain, "rs") - tx_before;
        assert!(tx * 10 < f["packets"].as_u64().unwrap(), "{tx} packets sent by rc and rs themselves: {f}");
    }
}

#[test]
fn tcp_forward_xdp_native() {
    tcp_forward("native");
}

#[test]
fn tcp_forward_xdp_generic() {
    tcp_forward("generic");
}

#[test]
fn tcp_forward_tc_only() {
    tcp_forward("off");
}

/// `xdp = "auto"`, the default: no XDP on a veth (TC's fast path carries its traffic), and
/// on another device native XDP, or generic where the driver has none (a bridge).
#[test]
fn xdp_auto_runs_tc_only_on_veths() {
    let chain = Chain::new().unwrap();
    chain.router.ip(&["link", "add", "rd", "type", "bridge"]).unwrap();
    chain.router.ip(&["link", "set", "rd", "up"]).unwrap();
    let cfg =
        "[[interface]]\nname = \"rc\"\n\n[[interface]]\nname = \"rs\"\n\n[[interface]]\nname = \"rd\"\nxdp = \"auto\"\n"
            .to_string()
            + &forward("classic", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("{SERVER_ADDR}:{BACKEND_PORT}"));
    let daemon = Daemon::start(&chain.router, &chain.tag, &cfg).unwrap();
    let status: serde_json::Value = serde_json::from_str(&daemon.cli(&["status", "--json"]).unwrap()).unwrap();
    let modes: Vec<(String, String)> = status["daemon"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), i["xdp"].as_str().unwrap().to_string()))
        .collect();
    let want = [("rc", "off"), ("rs", "off"), ("rd", "generic")].map(|(n, m)| (n.to_string(), m.to_string()));
    assert_eq!(modes, want, "{status}");
    let rc = chain.router.ip(&["-d", "link", "show", "dev", "rc"]).unwrap();
    assert!(!rc.contains("prog/xdp"), "no XDP on the veth: {rc}");
    let server = tcp_server(&chain, 1);
    tcp_exchange(&chain, 1_000_000);
    server.join().unwrap();
    let stats = daemon.stats().unwrap();
    assert!(reason(&daemon, "redirect_tc_flow_cache") > 0, "{stats}");
    assert_eq!(reason(&daemon, "xdp_to_tc") + reason(&daemon, "redirect_xdp"), 0, "{stats}");
}

/// UDP request/reply with an unconnected client socket: replies come from the listen
/// address, and the forward's counters match the datagrams exactly.
fn udp_forward(xdp: &str, snat: &str) {
    let chain = Chain::new().unwrap();
    if snat == "off" {
        chain.server_route_via_router().unwrap();
    }
    let daemon = Daemon::start(&chain.router, &chain.tag, &config(xdp, "udp", snat)).unwrap();
    const N: usize = 20;
    let server = serve_in(
        &chain.server,
        "UDP server",
        || udp_bound(("0.0.0.0", BACKEND_PORT), Duration::from_secs(10)),
        |s| {
            let mut peers = Vec::new();
            let mut buf = [0u8; 2048];
            for _ in 0..N {
                let (n, peer) = s.recv_from(&mut buf).unwrap();
                peers.push(peer);
                let reply: Vec<u8> = buf[..n].iter().map(|b| b.wrapping_add(1)).collect();
                s.send_to(&reply, peer).unwrap();
            }
            peers
        },
    )
    .unwrap();
    let sizes: Vec<usize> = (0..N).map(|i| 1 + i * 61).collect();
    let sent_sizes = sizes.clone();
    chain
        .client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap();
            let mut buf = [0u8; 2048];
            for (i, n) in sent_sizes.iter().enumerate() {
                let data: Vec<u8> = (0..*n).map(|j| (i + j) as u8).collect();
                s.send_to(&data, to).unwrap();
                let (got, from) = s.recv_from(&mut buf).expect("UDP reply through forwarder");
                assert_eq!(from, to, "reply appears to come from the listen address");
                let want: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
                assert_eq!(&buf[..got], &want[..]);
            }
        })
        .unwrap();
    let peers = server.join().unwrap();
    let want_peer = if snat == "off" { forwarder_tests::topo::CLIENT_ADDR } else { ROUTER_SERVER_ADDR };
    assert!(peers.iter().all(|p| p.ip().to_string() == want_peer), "server saw {peers:?}, want {want_peer}");
    let f = forward_stats(&daemon);
    assert_eq!(f["packets"].as_u64().unwrap(), 2 * N as u64, "{f}");
    let l3_bytes: usize = sizes.iter().map(|n| 2 * (20 + 8 + n)).sum();
    assert_eq!(f["bytes"].as_u64().unwrap(), l3_bytes as u64, "{f}");
    assert_eq!(f["new_connections"], 1, "one client socket is one flow: {f}");
}

#[test]
fn udp_forward_xdp_native_snat() {
    udp_forward("native", "auto");
}

#[test]
fn udp_forward_tc_only_snat() {
    udp_forward("off", "auto");
}

#[test]
fn udp_forward_xdp_generic_snat_off() {
    udp_forward("generic", "off");
}

/// With SNAT off the server sees the client's own address and replies route back through
/// the router, which reverses the DNAT.
#[test]
fn tcp_forward_snat_off() {
    let chain = Chain::new().unwrap();
    chain.server_route_via_router().unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config("native", "tcp", "off")).unwrap();
    let server = tcp_server(&chain, 1);
    tcp_exchange(&chain, 5000);
    let peers = server.join().unwrap();
    assert_eq!(peers[0].ip().to_string(), forwarder_tests::topo::CLIENT_ADDR);
    assert_eq!(forward_stats(&daemon)["new_connections"], 1);
}

/// Traffic that matches no forward is left to the kernel: a server on the router itself
/// on another port still works, counted as no_rule.
#[test]
fn non_matching_traffic_is_untouched() {
    let chain = Chain::new().unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config("native", "tcp", "auto")).unwrap();
    let on_router: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:8080").parse().unwrap();
    let local = plus_one_server(&chain.router, on_router, 1).unwrap();
    chain.client.run(move || plus_one_exchange(on_router, 100)).unwrap();
    local.join().unwrap();
    assert!(reason(&daemon, "no_rule") > 0);
    assert_eq!(forward_stats(&daemon)["packets"], 0);
}

/// Two instances, one per network namespace, run side by side with their own pin paths,
/// and SIGTERM detaches cleanly: pins removed, and the forward stops working.
#[test]
fn instances_coexist_and_detach_cleanly() {
    let a = Chain::new().unwrap();
    let b = Chain::new().unwrap();
    let mut da = Daemon::start(&a.router, &a.tag, &config("native", "tcp", "auto")).unwrap();
    let db = Daemon::start(&b.router, &b.tag, &config("off", "tcp", "auto")).unwrap();
    let sa = tcp_server(&a, 1);
    let sb = tcp_server(&b, 1);
    tcp_exchange(&a, 100);
    tcp_exchange(&b, 100);
    sa.join().unwrap();
    sb.join().unwrap();
    assert_eq!(forward_stats(&da)["new_connections"], 1);
    assert_eq!(forward_stats(&db)["new_connections"], 1);

    assert!(da.stop().unwrap().success(), "clean exit on SIGTERM:\n{}", da.log());
    assert!(!da.pin_path.exists(), "pins removed");
    assert!(db.pin_path.exists(), "the other instance is untouched");
    let xdp = a.router.ip(&["-d", "link", "show", "dev", "rc"]).unwrap();
    assert!(!xdp.contains("prog/xdp"), "XDP detached: {xdp}");
    let refused = a.client.run(|| {
        TcpStream::connect_timeout(
            &format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap(),
            Duration::from_secs(2),
        )
    });
    assert!(refused.unwrap().is_err(), "without forwarder the port is closed on the router");
}

/// The XDP_REDIRECT path end to end. veth far ends normally drop XDP frames and send
/// checksum-offloaded (partial) packets, which XDP hands to TC; here, as on a router whose
/// neighbours take XDP frames, the far ends have GRO on and full checksums, and the
/// interfaces say `redirect = "xdp"`: XDP forwards every packet itself.
#[test]
fn xdp_redirect_path_when_receivers_take_xdp_frames() {
    let chain = Chain::new().unwrap();
    chain.client.sh("ethtool -K c0 tx off gro on >/dev/null").unwrap();
    chain.server.sh("ethtool -K s0 tx off gro on >/dev/null").unwrap();
    let cfg = config("native", "tcp", "auto").replace("xdp = \"native\"", "xdp = \"native\"\nredirect = \"xdp\"");
    let daemon = Daemon::start(&chain.router, &chain.tag, &cfg).unwrap();
    let server = tcp_server(&chain, 2);
    tcp_exchange(&chain, 50_000);
    tcp_exchange(&chain, 7);
    server.join().unwrap();
    let f = forward_stats(&daemon);
    let stats = daemon.stats().unwrap();
    let cached = reason(&daemon, "redirect_xdp_cached") + reason(&daemon, "redirect_xdp_flow_cache");
    let (by_xdp, first) = (reason(&daemon, "redirect_xdp") + cached, reason(&daemon, "fib_no_neigh"));
    // Only packets sent before the neighbour was resolved go through TC (redirect_neigh).
    assert!(first <= 2 && reason(&daemon, "xdp_to_tc") == first, "{stats}");
    assert_eq!(by_xdp + first, f["packets"].as_u64().unwrap(), "XDP forwarded all others: {stats}");
    assert!(by_xdp > 50, "{stats}");
    assert!(cached * 2 > by_xdp, "most established packets take the cached next hop: {stats}");
}

/// Cached next hops follow the neighbour table: the daemon's rtnetlink watch moves the
/// route generation on the change, after which no packet goes to the old next hop. The
/// server's neighbour entry on the router is pointed at a MAC nobody has (the server
/// drops such frames), then back.
#[test]
fn cached_next_hops_follow_neighbour_changes() {
    let chain = Chain::new().unwrap();
    chain.client.sh("ethtool -K c0 tx off gro on >/dev/null").unwrap();
    chain.server.sh("ethtool -K s0 tx off gro on >/dev/null").unwrap();
    let cfg = config("native", "udp", "auto").replace("xdp = \"native\"", "xdp = \"native\"\nredirect = \"xdp\"");
    let daemon = Daemon::start(&chain.router, &chain.tag, &cfg).unwrap();
    let m = chain.server.mac("s0").unwrap();
    let server_mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let server = chain
        .server
        .spawn(move || {
            let s = UdpSocket::bind(("0.0.0.0", BACKEND_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..n], peer).unwrap();
                if &buf[..n] == b"bye" {
                    break;
                }
            }
        })
        .unwrap();
    ready.recv_timeout(Duration::from_secs(10)).unwrap();
    let client = chain
        .client
        .spawn(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect((ROUTER_CLIENT_ADDR, LISTEN_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
            s
        })
        .unwrap()
        .join()
        .unwrap();
    let answered = |msg: &'static [u8]| {
        let s = client.try_clone().unwrap();
        chain
            .client
            .run(move || {
                s.send(msg).unwrap();
                let mut buf = [0u8; 64];
                matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == msg)
            })
            .unwrap()
    };
    let generation = || forwarder::state::State::open(&daemon.pin_path).unwrap().route_generation().unwrap();
    // Waits until the daemon has seen the change (the generation moved past `before`).
    let wait_for_bump = |before: u32| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while generation() == before {
            assert!(std::time::Instant::now() < deadline, "route watch did not react:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for _ in 0..20 {
        assert!(answered(b"ping"), "forwarded before the change");
    }
    // Neighbour resolution at the start moves the generation too; later packets are cached.
    let fast = reason(&daemon, "redirect_xdp_cached") + reason(&daemon, "redirect_xdp_flow_cache");
    assert!(fast >= 20, "{}", daemon.stats().unwrap());

    let before = generation();
    chain.router.ip(&["neigh", "replace", SERVER_ADDR, "lladdr", "02:00:00:00:de:ad", "dev", "rs"]).unwrap();
    wait_for_bump(before);
    assert!(!answered(b"lost"), "nothing goes to the old next hop once the watch has seen the change");

    let before = generation();
    chain.router.ip(&["neigh", "replace", SERVER_ADDR, "lladdr", &server_mac, "dev", "rs"]).unwrap();
    wait_for_bump(before);
    assert!(answered(b"back"), "forwarded to the restored next hop");
    assert!(answered(b"bye"));
    server.join().unwrap();
}

/// Generic XDP, with the backend reached through an interface that is not configured
/// (`rx`, so not in the devmap) while its replies come back through `rs`: XDP must leave
/// such packets to TC (an XDP redirect there would abort and lose them).
#[test]
fn generic_xdp_to_an_interface_not_configured() {
    let chain = Chain::new().unwrap();
    chain.router.ip(&["link", "add", "rx", "type", "veth", "peer", "name", "x0", "netns", &chain.server.name]).unwrap();
    chain.router.ip(&["addr", "add", "198.51.100.1/24", "dev", "rx"]).unwrap();
    chain.router.ip(&["link", "set", "rx", "up"]).unwrap();
    chain.server.ip(&["link", "set", "x0", "up"]).unwrap();
    chain.router.ip(&["route", "add", &format!("{SERVER_ADDR}/32"), "dev", "rx"]).unwrap();
    chain.server.ip(&["route", "add", "198.51.100.0/24", "via", ROUTER_SERVER_ADDR]).unwrap();
    // Full checksums from the client (as from a real NIC): XDP leaves partial ones to TC.
    chain.client.sh("ethtool -K c0 tx off").unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config("generic", "tcp", "auto")).unwrap();
    let server = tcp_server(&chain, 2);
    for n in [10, 1_000_000] {
        tcp_exchange(&chain, n);
    }
    let peers = server.join().unwrap();
    assert_eq!(peers[0].ip().to_string(), "198.51.100.1", "requests left through rx");
    let stats = daemon.stats().unwrap();
    assert_eq!(forward_stats(&daemon)["new_connections"], 2, "{stats}");
    // Every packet of the client's that XDP saw went on to TC.
    assert!(reason(&daemon, "xdp_to_tc") > 10, "{stats}");
    let tc_sent: u64 = ["redirect_tc", "redirect_tc_cached", "redirect_tc_flow_cache", "fib_no_neigh"]
        .iter()
        .map(|r| reason(&daemon, r))
        .sum();
    assert_eq!(tc_sent, reason(&daemon, "xdp_to_tc"), "TC sends what XDP may not: {stats}");
    // TC's fast path carried most of them; XDP never used a next hop TC cached for `rx`.
    assert!(reason(&daemon, "redirect_tc_flow_cache") * 2 > tc_sent, "{stats}");
    assert_eq!(reason(&daemon, "redirect_xdp_cached") + reason(&daemon, "redirect_xdp_flow_cache"), 0, "{stats}");
}

/// Whether the daemon's FWD_IFACES entry for `ifindex` has `IFACE_TC_PEER`.
fn tc_peer(daemon: &Daemon, ifindex: u32) -> bool {
    let flags = forwarder::state::State::open(&daemon.pin_path).unwrap().iface_flags(ifindex).unwrap();
    flags.unwrap_or_else(|| panic!("no FWD_IFACES entry for {ifindex}")) & forwarder_common::IFACE_TC_PEER != 0
}

/// Waits until the daemon has brought `IFACE_TC_PEER` of the router's `rs` to `want`.
fn wait_for_tc_peer(daemon: &Daemon, ifindex: u32, want: bool, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tc_peer(daemon, ifindex) != want {
        assert!(std::time::Instant::now() < deadline, "IFACE_TC_PEER of rs is not {want} {why}:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `conns` forwarded connections of a megabyte each way to a plus-one server in `server`;
/// returns the packets the forward rewrote and the packets `rs` transmitted itself meanwhile.
fn exchange_via_rs(chain: &Chain, daemon: &Daemon, server: &forwarder_tests::Netns, conns: usize) -> (u64, u64) {
    let srv = plus_one_server(server, SocketAddr::new([0, 0, 0, 0].into(), BACKEND_PORT), conns).unwrap();
    let packets = || forward_stats(daemon)["packets"].as_u64().unwrap();
    let (p0, tx0) = (packets(), tx_packets(chain, "rs"));
    for _ in 0..conns {
        tcp_exchange(chain, 1_000_000);
    }
    srv.join().unwrap();
    (packets() - p0, tx_packets(chain, "rs") - tx0)
}

/// TC only: the router's veth `rs` is attached while its far end `s0` is in the router's own
/// namespace, and `s0` then moves about as a container's veth does (created on the host and
/// moved into the container; taken back; moved into a recreated container). The daemon
/// follows the link events: `IFACE_TC_PEER` (TC sends into the peer's ingress with
/// `bpf_redirect_peer`) is on exactly while `s0` is in another namespace. Stale on, every
/// packet to `rs` would be dropped (the kernel refuses a peer redirect within a namespace);
/// stale off, `rs` would transmit each packet itself.
#[test]
fn tc_peer_follows_the_far_end() {
    let chain = Chain::new().unwrap();
    let rs = chain.router.ifindex("rs").unwrap();
    chain.server.ip(&["link", "set", "s0", "netns", &chain.router.name]).unwrap();
    chain.router.ip(&["link", "set", "s0", "up"]).unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config("off", "tcp", "auto")).unwrap();
    assert!(!tc_peer(&daemon, rs), "both ends in the router's namespace at attach");
    assert!(tc_peer(&daemon, chain.router.ifindex("rc").unwrap()), "c0 is in the client's namespace");

    // Into the server's namespace, as a container's end after its creation.
    chain.router.ip(&["link", "set", "s0", "netns", &chain.server.name]).unwrap();
    chain.server.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "s0"]).unwrap();
    chain.server.ip(&["link", "set", "s0", "up"]).unwrap();
    wait_for_tc_peer(&daemon, rs, true, "after s0 moved into the server's namespace");
    let (packets, tx) = exchange_via_rs(&chain, &daemon, &chain.server, 2);
    assert!(tx * 10 < packets, "peer redirect: rs itself sent {tx} of {packets} packets:\n{}", daemon.log());

    // Back into the router's namespace, where it reaches the server through a bridge: a
    // peer redirect now would be dropped.
    chain.server.ip(&["link", "set", "s0", "netns", &chain.router.name]).unwrap();
    wait_for_tc_peer(&daemon, rs, false, "after s0 came back into the router's namespace");
    chain.router.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    chain.router.ip(&["link", "add", "b0", "type", "veth", "peer", "name", "b1", "netns", &chain.server.name]).unwrap();
    for dev in ["s0", "b0"] {
        chain.router.ip(&["link", "set", dev, "master", "br0", "up"]).unwrap();
    }
    chain.router.ip(&["link", "set", "br0", "up"]).unwrap();
    chain.server.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "b1"]).unwrap();
    chain.server.ip(&["link", "set", "b1", "up"]).unwrap();
    let (packets, tx) = exchange_via_rs(&chain, &daemon, &chain.server, 2);
    assert!(tx * 4 > packets, "plain redirect: rs itself sent {tx} of {packets} packets:\n{}", daemon.log());

    // Into a new server namespace, as a recreated container's end.
    chain.router.ip(&["link", "del", "b0"]).unwrap();
    chain.router.ip(&["link", "del", "br0"]).unwrap();
    let server2 = forwarder_tests::Netns::new(&format!("fwt-{}-s2", chain.tag)).unwrap();
    chain.router.ip(&["link", "set", "s0", "netns", &server2.name]).unwrap();
    server2.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "s0"]).unwrap();
    server2.ip(&["link", "set", "s0", "up"]).unwrap();
    wait_for_tc_peer(&daemon, rs, true, "after s0 moved into a new server namespace");
    let (packets, tx) = exchange_via_rs(&chain, &daemon, &server2, 2);
    assert!(tx * 10 < packets, "peer redirect again: rs itself sent {tx} of {packets} packets:\n{}", daemon.log());
}

/// The router's `rs` is deleted and created again under its name, as a container's veth is
/// when the container restarts: the running daemon drops the old device's `FWD_IFACES`
/// entry, attaches its programs (generic XDP and TC) to the new device, and the forward
/// carries connections again. A daemon killed (pins kept) and started after another such
/// re-creation adopts its state and attaches anew instead of failing on the old device's
/// pinned links. An interface that leaves the config loses its entry.
#[test]
fn interface_created_again_is_attached_again() {
    let chain = Chain::new().unwrap();
    let mut daemon = Daemon::start(&chain.router, &chain.tag, &config("generic", "tcp", "auto")).unwrap();
    let server = tcp_server(&chain, 3);
    tcp_exchange(&chain, 100_000);
    let pin = daemon.pin_path.clone();
    let flags = |ifindex: u32| forwarder::state::State::open(&pin).unwrap().iface_flags(ifindex).unwrap();
    let attached_as = |d: &Daemon| -> u32 {
        let status: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
        let rs = status["daemon"]["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == "rs").cloned();
        rs.map_or(0, |rs| rs["ifindex"].as_u64().unwrap() as u32)
    };
    let old = chain.router.ifindex("rs").unwrap();
    assert!(flags(old).is_some());

    chain.router.ip(&["link", "del", "rs"]).unwrap();
    wait_for("the deleted device's entry to go", Duration::from_secs(10), || flags(old).is_none());
    create_rs(&chain);
    let new = chain.router.ifindex("rs").unwrap();
    assert_ne!(new, old);
    wait_for("the new device to be attached", Duration::from_secs(10), || {
        attached_as(&daemon) == new && flags(new).is_some()
    });
    let link = chain.router.ip(&["-d", "link", "show", "dev", "rs"]).unwrap();
    assert!(link.contains("xdpgeneric"), "{link}");
    tcp_exchange(&chain, 100_000);
    assert_eq!(forward_stats(&daemon)["new_connections"], 2, "{}", daemon.stats().unwrap());

    // Killed with its pins kept; the device goes and comes back before the next start.
    daemon.kill().unwrap();
    chain.router.ip(&["link", "del", "rs"]).unwrap();
    create_rs(&chain);
    let newer = chain.router.ifindex("rs").unwrap();
    daemon.launch().unwrap();
    assert_eq!(attached_as(&daemon), newer);
    assert!(flags(new).is_none() || new == newer, "the earlier device's entry stays");
    tcp_exchange(&chain, 100_000);
    assert_eq!(forward_stats(&daemon)["new_connections"], 3, "{}", daemon.stats().unwrap());
    server.join().unwrap();

    // Out of the config: its entry goes with its programs.
    let rc_only = interface("rc", "generic")
        + &forward("classic", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("{SERVER_ADDR}:{BACKEND_PORT}"));
    daemon.replace_config(&rc_only).unwrap();
    wait_for("the entry of an interface that left the config to go", Duration::from_secs(10), || {
        flags(newer).is_none()
    });
    let link = chain.router.ip(&["-d", "link", "show", "dev", "rs"]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
}

/// `optional = true`: the daemon starts while `rs` is missing (a required interface that is
/// missing refuses the config), shows it with ifindex 0, and attaches it when it appears,
/// as a PPP or VPN device comes up after the router's services.
#[test]
fn optional_interface_is_attached_when_it_appears() {
    let chain = Chain::new().unwrap();
    chain.router.ip(&["link", "del", "rs"]).unwrap();
    let cfg = config("off", "tcp", "auto").replacen("name = \"rs\"\n", "name = \"rs\"\noptional = true\n", 1);
    assert!(cfg.contains("optional = true"), "{cfg}");
    let daemon = Daemon::start(&chain.router, &chain.tag, &cfg).unwrap();
    let status = || -> serde_json::Value { serde_json::from_str(&daemon.cli(&["status", "--json"]).unwrap()).unwrap() };
    let rs_index = || {
        let s = status();
        s["daemon"]["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == "rs").map(|rs| rs["ifindex"].clone())
    };
    assert_eq!(rs_index(), Some(0.into()), "{}", status());
    assert!(daemon.log().contains("optional interface not present"), "{}", daemon.log());
    let table = daemon.cli(&["status"]).unwrap();
    assert!(table.contains("missing (attached when it appears)"), "{table}");

    create_rs(&chain);
    let ifindex = chain.router.ifindex("rs").unwrap();
    wait_for("rs to be attached", Duration::from_secs(10), || rs_index() == Some(ifindex.into()));
    let server = tcp_server(&chain, 1);
    tcp_exchange(&chain, 100_000);
    server.join().unwrap();
    assert_eq!(forward_stats(&daemon)["new_connections"], 1, "{}", daemon.stats().unwrap());
    assert!(
        reason(&daemon, "redirect_tc") + reason(&daemon, "redirect_tc_flow_cache") > 0,
        "{}",
        daemon.stats().unwrap()
    );
}

/// Creates the router's `rs` and the server's `s0` as [`Chain::new`] does.
fn create_rs(chain: &Chain) {
    chain.router.ip(&["link", "add", "rs", "type", "veth", "peer", "name", "s0", "netns", &chain.server.name]).unwrap();
    chain.router.ip(&["addr", "add", &format!("{ROUTER_SERVER_ADDR}/24"), "dev", "rs"]).unwrap();
    chain.router.ip(&["link", "set", "rs", "up"]).unwrap();
    chain.server.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "s0"]).unwrap();
    chain.server.ip(&["link", "set", "s0", "up"]).unwrap();
}
