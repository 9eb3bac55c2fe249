//! Local forwards end to end: programs on the router itself (in its namespace and a test
//! cgroup) reach a forward through localhost, the router's own addresses and the listen
//! address, over TCP and UDP (connected or not, through IPv4 and dual-stack IPv6 sockets),
//! and see what they dialled.

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon, Netns,
    sockets::{serve_in, udp_bound},
};

const CONFIG: &str = r#"
[[interface]]
name = "rc"
xdp = "native"

[[interface]]
name = "rs"
xdp = "native"

[[forward]]
name = "mysql"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"

[[forward]]
name = "dns"
protocol = "udp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"

[[forward]]
name = "on-host"
protocol = "tcp"
listen = "0.0.0.0:4406"
backend = "127.0.0.1:3197"

[[forward]]
name = "not-local"
protocol = "tcp"
listen = "0.0.0.0:5506"
backend = "203.0.113.20:3197"
local = false
"#;

/// TCP server in `ns` on `addr`: replies "<who> got <message>" to `conns` connections.
fn tcp_server(ns: &Netns, addr: &'static str, who: &'static str, conns: usize) -> std::thread::JoinHandle<()> {
    serve_in(
        ns,
        who,
        move || TcpListener::bind(addr),
        move |l| {
            for _ in 0..conns {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut msg = String::new();
                s.read_to_string(&mut msg).unwrap();
                s.write_all(format!("{who} got {msg}").as_bytes()).unwrap();
            }
        },
    )
    .unwrap()
}

fn udp_server(ns: &Netns, datagrams: usize) -> std::thread::JoinHandle<()> {
    udp_server_on(ns, "203.0.113.20:3197", datagrams)
}

/// UDP server in `ns` on `addr`: answers `datagrams` datagrams "udp backend got <message>".
fn udp_server_on(ns: &Netns, addr: &'static str, datagrams: usize) -> std::thread::JoinHandle<()> {
    serve_in(
        ns,
        "UDP backend",
        move || udp_bound(addr, Duration::from_secs(10)),
        move |s| {
            let mut buf = [0u8; 1500];
            for _ in 0..datagrams {
                let (n, from) = s.recv_from(&mut buf).unwrap();
                s.send_to(format!("udp backend got {}", String::from_utf8_lossy(&buf[..n])).as_bytes(), from).unwrap();
            }
        },
    )
    .unwrap()
}

/// Runs fwt-probe in `ns` inside the daemon's cgroup; returns its JSON line.
fn probe(d: &Daemon, ns: &Netns, mode: &str, to: &str, msg: &str) -> serde_json::Value {
    probe_args(d, ns, &[mode, to, msg])
}

/// fwt-probe with any arguments (see its usage).
fn probe_args(d: &Daemon, ns: &Netns, args: &[&str]) -> serde_json::Value {
    let out = d.cgroup.command(ns, env!("CARGO_BIN_EXE_fwt-probe")).unwrap().args(args).output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probe output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

fn reason(d: &Daemon, name: &str) -> u64 {
    let s = d.stats().unwrap();
    s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap()["packets"].as_u64().unwrap()
}

fn local_conns(d: &Daemon, name: &str) -> u64 {
    let s = d.stats().unwrap();
    s["forwards"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap()["local_connections"].as_u64().unwrap()
}

#[test]
fn local_tcp_through_localhost_own_addresses_and_listen_address() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, CONFIG).unwrap();
    let server = tcp_server(&chain.server, "203.0.113.20:3197", "backend", 3);
    for to in ["127.0.0.1:3306", "192.0.2.1:3306", "203.0.113.1:3306"] {
        let r = probe(&d, &chain.router, "tcp", to, &format!("hello via {to}"));
        assert_eq!(r["reply"], format!("backend got hello via {to}"), "{to}: {r}");
        assert_eq!(r["peer"], to, "getpeername shows what the program dialled");
    }
    server.join().unwrap();
    assert_eq!(local_conns(&d, "mysql"), 3);
    let s = d.stats().unwrap();
    assert_eq!(s["forwards"][0]["new_connections"], 0, "local connections are not interface flows: {s}");
}

#[test]
fn local_unconnected_udp_replies_come_from_the_dialled_address() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, CONFIG).unwrap();
    let server = udp_server(&chain.server, 2);
    for to in ["127.0.0.1:3306", "192.0.2.1:3306"] {
        let r = probe(&d, &chain.router, "udp", to, "q");
        assert_eq!(r["reply"], "udp backend got q", "{r}");
        assert_eq!(r["peer"], to, "recvfrom shows the address the program sent to");
    }
    server.join().unwrap();
    assert_eq!(local_conns(&d, "dns"), 2);
}

#[test]
fn local_backend_on_the_host_itself() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, CONFIG).unwrap();
    let local = tcp_server(&chain.router, "127.0.0.1:3197", "router-local backend", 1);
    let r = probe(&d, &chain.router, "tcp", "127.0.0.1:4406", "x");
    assert_eq!(r["reply"], "router-local backend got x", "{r}");
    assert_eq!(r["peer"], "127.0.0.1:4406");
    local.join().unwrap();
    assert_eq!(local_conns(&d, "on-host"), 1);
}

#[test]
fn other_namespaces_and_non_local_forwards_are_left_alone_and_detach_removes_the_hooks() {
    let chain = Chain::new().unwrap();
    let mut d = Daemon::start(&chain.router, &chain.tag, CONFIG).unwrap();
    // A process in another namespace (same cgroup, so the hooks run for it) dialling
    // 127.0.0.1:3306 reaches its own namespace's listener, not the backend.
    let own = tcp_server(&chain.client, "127.0.0.1:3306", "client-local", 1);
    let r = probe(&d, &chain.client, "tcp", "127.0.0.1:3306", "a");
    assert_eq!(r["reply"], "client-local got a", "{r}");
    own.join().unwrap();

    // local = false: a local program gets no rewrite (nothing listens on 5506 here).
    let r = probe(&d, &chain.router, "tcp", "127.0.0.1:5506", "b");
    assert!(r["error"].as_str().unwrap_or("").contains("refused"), "{r}");
    assert_eq!(local_conns(&d, "not-local"), 0);

    assert!(d.stop().unwrap().success());
    let r = probe(&d, &chain.router, "tcp", "127.0.0.1:3306", "c");
    assert!(r["error"].as_str().unwrap_or("").contains("refused"), "without forwarder localhost:3306 is closed: {r}");
}

/// A resolver's view: DNS on 127.0.0.1:53 and a second listen port, 127.0.0.1:5300, both
/// forwarded to one backend; MySQL on every address. UDP's unreplied timeout (1 s) is how
/// long an unconnected socket's exchange with a backend must be quiet before the socket may
/// reach that backend through another listen address.
const RESOLVER: &str = r#"
[[interface]]
name = "rc"
xdp = "native"

[[interface]]
name = "rs"
xdp = "native"

[[forward]]
name = "dns"
protocol = "udp"
listen = "127.0.0.1:53"
backend = "203.0.113.20:5353"

[[forward]]
name = "dns-alt"
protocol = "udp"
listen = "127.0.0.1:5300"
backend = "203.0.113.20:5353"

[[forward]]
name = "mysql"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"

[conntrack]
udp_unreplied_timeout = 1
"#;

/// glibc's resolver connect()s its UDP socket to the name server, sends with send() and
/// reads with recv()/recvfrom()/recvmsg(), and drops answers whose source is not the server
/// it asked: every call must report 127.0.0.1:53, not the backend.
#[test]
fn local_connected_udp_reports_the_dialled_address_to_every_call() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, RESOLVER).unwrap();
    let server = udp_server_on(&chain.server, "203.0.113.20:5353", 6);
    for to in ["127.0.0.1:53", "127.0.0.1:5300"] {
        let r = probe(&d, &chain.router, "udp-connected", to, "q");
        assert_eq!(
            r["replies"],
            serde_json::json!(["udp backend got q send", "udp backend got q write", "udp backend got q send"]),
            "{to}: {r}"
        );
        assert_eq!(r["peer"], to, "getpeername: {r}");
        assert_eq!(r["recvfrom"], to, "recvfrom's source: {r}");
        assert_eq!(r["recvmsg"], to, "recvmsg's msg_name: {r}");
    }
    server.join().unwrap();
    assert_eq!((local_conns(&d, "dns"), local_conns(&d, "dns-alt")), (1, 1), "one connect() each");
}

/// Java's sockets are AF_INET6 with IPV6_V6ONLY off: 127.0.0.1 is dialled as
/// ::ffff:127.0.0.1. The IPv4 forwards apply, and the program sees the mapped address it
/// dialled, over TCP, unconnected UDP and connected UDP.
#[test]
fn local_ipv4_mapped_destinations_of_dual_stack_sockets_take_the_ipv4_forwards() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, RESOLVER).unwrap();
    let tcp = tcp_server(&chain.server, "203.0.113.20:3197", "backend", 2);
    for to in ["[::ffff:127.0.0.1]:3306", "[::ffff:192.0.2.1]:3306"] {
        let r = probe(&d, &chain.router, "tcp", to, "hi");
        assert_eq!(r["reply"], "backend got hi", "{to}: {r}");
        assert_eq!(r["peer"], to, "getpeername shows the mapped address dialled: {r}");
    }
    tcp.join().unwrap();
    assert_eq!(local_conns(&d, "mysql"), 2);

    let udp = udp_server_on(&chain.server, "203.0.113.20:5353", 4);
    let r = probe(&d, &chain.router, "udp", "[::ffff:127.0.0.1]:53", "m");
    assert_eq!(r["reply"], "udp backend got m", "{r}");
    assert_eq!(r["peer"], "[::ffff:127.0.0.1]:53", "recvfrom shows the mapped address sent to: {r}");
    let r = probe(&d, &chain.router, "udp-connected", "[::ffff:127.0.0.1]:53", "c");
    assert_eq!(r["replies"].as_array().map(Vec::len), Some(3), "{r}");
    for call in ["peer", "recvfrom", "recvmsg"] {
        assert_eq!(r[call], "[::ffff:127.0.0.1]:53", "{call}: {r}");
    }
    udp.join().unwrap();
    assert_eq!(local_conns(&d, "dns"), 2);
}

/// Two listen addresses, one backend: the datagrams of one unconnected socket to either
/// leave with the same addresses and ports, and so do the answers, so an answer cannot be
/// told to belong to one or the other. A socket gets the backend through one listen
/// address at a time: a datagram to the other while the first exchange is live (a datagram
/// either way within UDP's unreplied timeout) is refused with EPERM, counted as
/// `local_udp_ambiguous`, rather than an answer being reported from the wrong address.
/// Other sockets, and connected ones, are not affected.
#[test]
fn local_unconnected_udp_to_two_listen_addresses_of_one_backend_never_misreports() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, RESOLVER).unwrap();
    let (a, b) = ("127.0.0.1:53", "127.0.0.1:5300");
    assert!(d.log().contains("local UDP forwards share a backend"), "the operator is told:\n{}", d.log());
    // Answered: two of the four datagrams below, one of another socket, 2 x 3 connected.
    let server = udp_server_on(&chain.server, "203.0.113.20:5353", 9);
    let r = probe_args(&d, &chain.router, &["udp-seq", "q", a, b, "sleep=1500", b, a]);
    let steps = r["steps"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!((steps[0]["from"].as_str(), steps[0]["reply"].as_str()), (Some(a), Some("udp backend got q 0")), "{r}");
    assert_eq!(steps[1]["errno"], libc::EPERM, "{b} while the exchange through {a} is live: {r}");
    assert_eq!((steps[2]["from"].as_str(), steps[2]["reply"].as_str()), (Some(b), Some("udp backend got q 3")), "{r}");
    assert_eq!(steps[3]["errno"], libc::EPERM, "now {a} is the other one: {r}");
    assert_eq!(reason(&d, "local_udp_ambiguous"), 2);
    assert_eq!((local_conns(&d, "dns"), local_conns(&d, "dns-alt")), (1, 1));

    // Another socket may use the other address meanwhile; so may connected sockets.
    let r = probe_args(&d, &chain.router, &["udp-seq", "q", a]);
    assert_eq!(r["steps"][0]["from"], a, "{r}");
    for to in [a, b] {
        let r = probe(&d, &chain.router, "udp-connected", to, "c");
        assert_eq!(r["recvfrom"], to, "{r}");
    }
    server.join().unwrap();
}

/// Removes a pin directory on every exit path.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        forwarder::pins::remove(&self.0);
    }
}

/// An upgrade in place keeps the unconnected sockets' dialled addresses: the map an earlier
/// version pinned (`FWD_LOCAL_UDP`, 24-byte `LocalOrig` values) is carried into
/// `FWD_LOC_UDP_V2` as quiet exchanges, and its pin removed. The old map is made with
/// bpftool, as the old version made it.
#[test]
fn local_udp_sockets_pinned_by_an_older_version_are_migrated() {
    use forwarder_common::{FWD_LOC_UDP_V2, FWD_LOCAL_UDP, LocalOrig, LocalUdpKey, LocalUdpOrig};
    let pin = PinDir(std::path::PathBuf::from(format!("/sys/fs/bpf/fwt-{}", forwarder_tests::unique_tag())));
    std::fs::create_dir_all(&pin.0).unwrap();
    let old_path = pin.0.join(FWD_LOCAL_UDP).display().to_string();
    let bytes = |p: *const u8, n: usize| -> Vec<String> {
        // SAFETY: repr(C) map types without padding, read as the n bytes they are.
        unsafe { std::slice::from_raw_parts(p, n) }.iter().map(|b| format!("0x{b:02x}")).collect()
    };
    let bpftool = |args: Vec<String>| {
        let out = std::process::Command::new("bpftool").args(&args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let s = |v: &str| v.to_string();
    bpftool(
        ["map", "create", &old_path, "type", "lru_hash", "key", "32", "value", "24", "entries", "65536", "name"]
            .into_iter()
            .map(s)
            .chain([s(FWD_LOCAL_UDP)])
            .collect(),
    );
    let mut backend = [0u8; 16];
    backend[..4].copy_from_slice(&[203, 0, 113, 20]);
    let mut dialled = [0u8; 16];
    dialled[..4].copy_from_slice(&[127, 0, 0, 1]);
    let key = LocalUdpKey {
        socket_cookie: 4242,
        backend_addr: backend,
        backend_port_be: 5353u16.to_be(),
        family: 4,
        _pad: [0; 5],
    };
    let orig = LocalOrig { addr: dialled, port_be: 53u16.to_be(), family: 4, _pad: 0, forward_id: 3 };
    bpftool(
        [s("map"), s("update"), s("pinned"), old_path.clone(), s("key")]
            .into_iter()
            .chain(bytes((&key as *const LocalUdpKey).cast(), 32))
            .chain([s("value")])
            .chain(bytes((&orig as *const LocalOrig).cast(), 24))
            .collect(),
    );

    let inst = forwarder::loader::Instance::load(&forwarder::loader::LoadOptions::default(), &pin.0).unwrap();
    let map = aya::maps::MapData::from_pin(pin.0.join(FWD_LOC_UDP_V2)).unwrap();
    let map: aya::maps::HashMap<_, LocalUdpKey, LocalUdpOrig> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).unwrap();
    assert_eq!(map.get(&key, 0).unwrap(), LocalUdpOrig { orig, last_ns: 0 }, "the same address, a quiet exchange");
    assert!(!std::path::Path::new(&old_path).exists(), "old map unpinned");
    drop(inst);
}

/// A forward with source lists serves local programs only if the loopback address of its
/// family passes them (README, "Source lists"): `outside` allows a remote network only,
/// so a program dialling it reaches whatever listens where it dialled; `with-lo` allows
/// 127.0.0.0/8 and rewrites as usual; `lo-denied` allows it but denies 127.0.0.1.
#[test]
fn local_programs_take_a_listed_forward_only_if_loopback_passes() {
    let config = r#"
[[interface]]
name = "rc"
xdp = "native"

[[forward]]
name = "outside"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"
allow = ["198.51.100.0/25"]

[[forward]]
name = "with-lo"
protocol = "tcp"
listen = "0.0.0.0:4406"
backend = "203.0.113.20:3197"
allow = ["198.51.100.0/25", "127.0.0.0/8"]

[[forward]]
name = "lo-denied"
protocol = "tcp"
listen = "0.0.0.0:5506"
backend = "203.0.113.20:3197"
allow = ["127.0.0.0/8"]
deny = ["127.0.0.1"]
"#;
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, config).unwrap();
    let own = tcp_server(&chain.router, "127.0.0.1:3306", "router's own", 1);
    let backend = tcp_server(&chain.server, "203.0.113.20:3197", "backend", 1);
    let r = probe(&d, &chain.router, "tcp", "127.0.0.1:3306", "a");
    assert_eq!(r["reply"], "router's own got a", "left where it was dialled: {r}");
    own.join().unwrap();
    let r = probe(&d, &chain.router, "tcp", "127.0.0.1:4406", "b");
    assert_eq!(r["reply"], "backend got b", "{r}");
    backend.join().unwrap();
    let r = probe(&d, &chain.router, "tcp", "127.0.0.1:5506", "c");
    assert!(r["error"].as_str().unwrap_or("").contains("refused"), "deny wins over allow: {r}");
    assert_eq!((local_conns(&d, "outside"), local_conns(&d, "with-lo"), local_conns(&d, "lo-denied")), (0, 1, 0));
    assert_eq!(reason(&d, "source_denied"), 0, "a local program is not refused, only left alone");
}
