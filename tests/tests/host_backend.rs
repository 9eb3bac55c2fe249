//! Backends on the forwarder host itself (issue 14, part 1): a client on the client
//! namespace dials the router's address on a listen port and is served by a server on the
//! router — bound to the wildcard address, to the router's address, or to loopback — over
//! TCP and UDP, IPv4 and IPv6; programs on the router reach the same backends through the
//! listen addresses (cgroup hooks); a held connection shows in the connection table.
//!
//! Differential: each scenario runs in a fresh client ─ router ─ server sandbox (`Chain`,
//! plus IPv6 on the client link), first with iptables/ip6tables DNAT on the router as the
//! control, then with forwarder in XDP native, XDP generic and TC-only modes, and the
//! outcome at the client's socket is compared with what each is expected to do:
//!
//! | case | iptables / ip6tables | forwarder |
//! |---|---|---|
//! | backend on the router's address or the wildcard, TCP and UDP, v4 and v6 | served | served |
//! | TCP to 127.0.0.1 | served with `route_localnet=1` only | served either way (its listener is assigned the packets) |
//! | UDP to 127.0.0.1 | served with `route_localnet=1` only | the same |
//! | TCP to ::1 | never (the stack answers a ::1 destination from an interface with "no route") | served |
//! | UDP to ::1 | never | refused at once (the forward serves local programs only) |
//! | backend port closed, TCP and UDP | refused | refused (RST and ICMP translated back) |
//!
//! Every client that is served checks the reply's source (UDP: recvfrom's address) is the
//! listen address and port it dialled, and that the server saw the client's own address.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use forwarder_common::{
    CtKey, FAMILY_V4,
    conntrack::{CT_HOST_BACKEND, TCP_ESTABLISHED},
};
use forwarder_tests::{Chain, Daemon, Netns, config as toml, netns::run_ok};

const CLIENT: &str = "192.0.2.2";
const CLIENT6: &str = "2001:db8:1::2";
const ROUTER6: &str = "2001:db8:1::1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One forward and its backend on the router: the client dials `listen`, the forward's
/// backend is `backend`, and a server bound to `bind` answers as `name` (no server when
/// `bind` is None: a closed port).
struct Case {
    name: &'static str,
    proto: Proto,
    listen: &'static str,
    backend: &'static str,
    bind: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        name: "tcp-own",
        proto: Proto::Tcp,
        listen: "192.0.2.1:3307",
        backend: "192.0.2.1:3197",
        bind: Some("0.0.0.0:3197"),
    },
    Case {
        name: "tcp-addr",
        proto: Proto::Tcp,
        listen: "192.0.2.1:3308",
        backend: "192.0.2.1:3198",
        bind: Some("192.0.2.1:3198"),
    },
    Case {
        name: "tcp-lo",
        proto: Proto::Tcp,
        listen: "192.0.2.1:3309",
        backend: "127.0.0.1:3199",
        bind: Some("127.0.0.1:3199"),
    },
    Case { name: "tcp-closed", proto: Proto::Tcp, listen: "192.0.2.1:3310", backend: "192.0.2.1:3200", bind: None },
    Case {
        name: "udp-own",
        proto: Proto::Udp,
        listen: "192.0.2.1:3307",
        backend: "192.0.2.1:3197",
        bind: Some("0.0.0.0:3197"),
    },
    Case {
        name: "udp-addr",
        proto: Proto::Udp,
        listen: "192.0.2.1:3308",
        backend: "192.0.2.1:3198",
        bind: Some("192.0.2.1:3198"),
    },
    Case {
        name: "udp-lo",
        proto: Proto::Udp,
        listen: "192.0.2.1:3309",
        backend: "127.0.0.1:3199",
        bind: Some("127.0.0.1:3199"),
    },
    Case { name: "udp-closed", proto: Proto::Udp, listen: "192.0.2.1:3310", backend: "192.0.2.1:3200", bind: None },
    Case {
        name: "tcp6-own",
        proto: Proto::Tcp,
        listen: "[2001:db8:1::1]:3317",
        backend: "[2001:db8:1::1]:3207",
        bind: Some("[::]:3207"),
    },
    Case {
        name: "tcp6-lo",
        proto: Proto::Tcp,
        listen: "[2001:db8:1::1]:3319",
        backend: "[::1]:3209",
        bind: Some("[::1]:3209"),
    },
    Case {
        name: "udp6-own",
        proto: Proto::Udp,
        listen: "[2001:db8:1::1]:3317",
        backend: "[2001:db8:1::1]:3207",
        bind: Some("[::]:3207"),
    },
    Case {
        name: "udp6-lo",
        proto: Proto::Udp,
        listen: "[2001:db8:1::1]:3319",
        backend: "[::1]:3209",
        bind: Some("[::1]:3209"),
    },
];

fn case(name: &str) -> &'static Case {
    CASES.iter().find(|c| c.name == name).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Iptables,
    Forwarder(&'static str),
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Iptables => f.write_str("iptables"),
            Via::Forwarder(xdp) => write!(f, "forwarder xdp={xdp}"),
        }
    }
}

/// What a client saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// Served by this server, which saw this peer address; the answer came from `from`.
    Served {
        server: String,
        peer_ip: String,
        from: SocketAddr,
    },
    /// Refused at once (TCP RST, or an ICMP port unreachable on a connected UDP socket).
    Refused,
    /// An ICMP "no route" / "unreachable" answered the connection attempt.
    Unreachable,
    /// No answer within the wait.
    Silent,
    Other(String),
}

/// What a case should give through `via` (with `route_localnet` on the client-side
/// interface or not). See the table at the top.
fn expected(via: Via, name: &str, localnet: bool) -> &'static str {
    match (name, via) {
        ("tcp-closed" | "udp-closed", _) => "refused",
        ("tcp-lo" | "udp-lo", Via::Iptables) => {
            if localnet {
                "served"
            } else {
                "silent"
            }
        }
        ("udp-lo", Via::Forwarder(_)) => {
            if localnet {
                "served"
            } else {
                "silent"
            }
        }
        // The stack answers a ::1 destination from an interface with "no route".
        ("tcp6-lo", Via::Iptables) => "unreachable",
        ("udp6-lo", Via::Iptables) => "silent",
        ("udp6-lo", Via::Forwarder(_)) => "refused",
        _ => "served",
    }
}

/// How long a client waits for what should not come.
const SILENT_WAIT: Duration = Duration::from_millis(1500);
const SERVED_WAIT: Duration = Duration::from_secs(5);

/// Collects every check and fails once at the end, naming all that did not hold.
struct Checks {
    via: Via,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            eprintln!("[{}] FAILED: {what}", self.via);
            self.failed.push(what);
        }
    }

    fn finish(self, log: &str) {
        assert!(
            self.failed.is_empty(),
            "{}: {} checks failed:\n{}\n{log}",
            self.via,
            self.failed.len(),
            self.failed.join("\n")
        );
    }
}

/// The servers of the cases, on the router; stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for c in CASES {
            let Some(bind) = c.bind else { continue };
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop, name, bind, proto) = (stop.clone(), c.name, addr(bind), c.proto);
            let h = ns
                .spawn(move || match proto {
                    Proto::Tcp => tcp_server(TcpListener::bind(bind).unwrap(), name, &stop, tx),
                    Proto::Udp => udp_server(UdpSocket::bind(bind).unwrap(), name, &stop, tx),
                })
                .unwrap();
            rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("server {name} on {bind}"));
            handles.push(h);
        }
        Self { stop, handles }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Each connection: read the client's message to its end, answer "<name> peer=<ip>".
fn tcp_server(l: TcpListener, name: &'static str, stop: &AtomicBool, ready: std::sync::mpsc::Sender<()>) {
    l.set_nonblocking(true).unwrap();
    ready.send(()).unwrap();
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((mut s, peer)) => {
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut msg = Vec::new();
                    if s.read_to_end(&mut msg).is_ok() {
                        let _ = s.write_all(format!("{name} peer={}", peer.ip()).as_bytes());
                    }
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{name}: accept: {e}"),
        }
    }
}

/// Each datagram is answered "<name> peer=<ip>".
fn udp_server(s: UdpSocket, name: &'static str, stop: &AtomicBool, ready: std::sync::mpsc::Sender<()>) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    ready.send(()).unwrap();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(format!("{name} peer={}", from.ip()).as_bytes(), from);
        }
    }
}

fn served(reply: &str, from: SocketAddr) -> Seen {
    match reply.split_once(" peer=") {
        Some((server, peer_ip)) => Seen::Served { server: server.into(), peer_ip: peer_ip.into(), from },
        None => Seen::Other(format!("reply {reply:?}")),
    }
}

fn io_seen(e: std::io::Error) -> Seen {
    match e.kind() {
        ErrorKind::ConnectionRefused => Seen::Refused,
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => Seen::Unreachable,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Seen::Silent,
        _ => Seen::Other(e.to_string()),
    }
}

/// A TCP exchange with `to`: connect, send, half-close, read the answer.
fn tcp_client(to: SocketAddr, wait: Duration) -> Seen {
    let mut s = match TcpStream::connect_timeout(&to, wait) {
        Ok(s) => s,
        Err(e) => return io_seen(e),
    };
    let from = s.peer_addr().unwrap();
    s.set_read_timeout(Some(SERVED_WAIT)).unwrap();
    let mut reply = String::new();
    match s
        .write_all(b"hello")
        .and_then(|_| s.shutdown(std::net::Shutdown::Write))
        .and_then(|_| s.read_to_string(&mut reply))
    {
        Ok(_) => served(&reply, from),
        Err(e) => io_seen(e),
    }
}

/// A UDP exchange with `to`: from an unconnected socket (the answer's source is reported
/// as it arrived) or a connected one (which hears ICMP errors about its datagrams).
fn udp_client(to: SocketAddr, wait: Duration, connected: bool) -> Seen {
    let s = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1500];
    let got = if connected {
        s.connect(to).and_then(|_| s.send(b"hello")).and_then(|_| s.recv(&mut buf)).map(|n| (n, to))
    } else {
        s.send_to(b"hello", to).and_then(|_| s.recv_from(&mut buf))
    };
    match got {
        Ok((n, from)) => served(&String::from_utf8_lossy(&buf[..n]), from),
        Err(e) => io_seen(e),
    }
}

/// Runs the cases' clients at once on the client namespace; returns what each saw.
fn run_clients(chain: &Chain, via: Via, names: &[&str], localnet: bool) -> Vec<(&'static Case, Seen)> {
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let c = case(n);
            let want = expected(via, c.name, localnet);
            let wait = if want == "served" { SERVED_WAIT } else { SILENT_WAIT };
            // A refusal reaches a UDP socket only when it is connected.
            let (to, proto, connected) = (addr(c.listen), c.proto, want == "refused");
            let h = chain
                .client
                .spawn(move || match proto {
                    Proto::Tcp => tcp_client(to, wait),
                    Proto::Udp => udp_client(to, wait, connected),
                })
                .unwrap();
            (c, h)
        })
        .collect();
    handles.into_iter().map(|(c, h)| (c, h.join().unwrap())).collect()
}

/// Compares what the clients saw with what `via` should give.
fn check_clients(checks: &mut Checks, via: Via, step: &str, seen: &[(&'static Case, Seen)], localnet: bool) {
    for (c, s) in seen {
        let want = expected(via, c.name, localnet);
        let what = format!("{} ({step}): want {want}, saw {s:?}", c.name);
        match (want, s) {
            ("served", Seen::Served { server, peer_ip, from }) => {
                let client = if c.listen.starts_with('[') { CLIENT6 } else { CLIENT };
                checks.check(
                    server == c.name && peer_ip == client && *from == addr(c.listen),
                    format!(
                        "{what}: the case's server, seeing the client's address, answering from the listen address"
                    ),
                );
            }
            ("refused", Seen::Refused) | ("silent", Seen::Silent) | ("unreachable", Seen::Unreachable) => {}
            _ => checks.check(false, what),
        }
    }
}

/// The sandbox: Chain with IPv6 on the client link, the servers on the router, and the
/// forwarding (rules or daemon). Field order is drop order: daemon, servers, namespaces.
struct Sandbox {
    daemon: Option<Daemon>,
    _servers: Servers,
    chain: Chain,
}

impl Sandbox {
    fn new(via: Via) -> Self {
        let chain = Chain::new().unwrap();
        chain.router.ip(&["addr", "add", &format!("{ROUTER6}/64"), "dev", "rc", "nodad"]).unwrap();
        chain.client.ip(&["addr", "add", &format!("{CLIENT6}/64"), "dev", "c0", "nodad"]).unwrap();
        let servers = Servers::start(&chain.router);
        let daemon = match via {
            Via::Iptables => {
                for c in CASES {
                    let (tool, port) =
                        (if c.listen.starts_with('[') { "ip6tables" } else { "iptables" }, addr(c.listen).port());
                    // Interface clients, and local programs (OUTPUT), inside the router's namespace.
                    for chain_name in ["PREROUTING", "OUTPUT"] {
                        let rule = format!(
                            "-t nat -A {chain_name} -p {} --dport {port} -j DNAT --to-destination {}",
                            c.proto.name(),
                            c.backend
                        );
                        run_ok(chain.router.cmd(tool).args(rule.split(' '))).unwrap();
                    }
                }
                None
            }
            Via::Forwarder(xdp) => Some(Daemon::start(&chain.router, &chain.tag, &config(xdp)).unwrap()),
        };
        Self { daemon, _servers: servers, chain }
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }
}

fn config(xdp: &str) -> String {
    let mut out = toml::interface("rc", xdp);
    for c in CASES {
        let port = addr(c.listen).port();
        let any = if c.listen.starts_with('[') { "[::]" } else { "0.0.0.0" };
        out += &toml::forward(c.name, c.proto.name(), format!("{any}:{port}"), c.backend);
    }
    out
}

/// fwt-probe on the router (in the daemon's cgroup, where its hooks see it): the reply
/// and the address the program saw it from.
fn local_program(sb: &Sandbox, proto: Proto, to: &str) -> serde_json::Value {
    let bin = env!("CARGO_BIN_EXE_fwt-probe");
    let mut cmd: Command = match &sb.daemon {
        Some(d) => d.cgroup.command(&sb.chain.router, bin).unwrap(),
        None => sb.chain.router.cmd(bin),
    };
    let out = cmd.args([proto.name(), to, "hi"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| serde_json::json!({"error": format!("{e}: {out:?}")}))
}

fn reason(stats: &serde_json::Value, name: &str) -> u64 {
    stats["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == name)
        .map(|r| r["packets"].as_u64().unwrap())
        .unwrap_or(0)
}

fn forward<'a>(stats: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    stats["forwards"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap()
}

fn v4_key(src: SocketAddr, dst: SocketAddr) -> CtKey {
    let bytes = |a: SocketAddr| {
        let mut b = [0u8; 16];
        if let IpAddr::V4(v4) = a.ip() {
            b[..4].copy_from_slice(&v4.octets());
        }
        b
    };
    CtKey {
        src_addr: bytes(src),
        dst_addr: bytes(dst),
        src_port_be: src.port().to_be(),
        dst_port_be: dst.port().to_be(),
        proto: 6,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// A TCP connection to a loopback backend held open: the connection table has it (both
/// entries, the backend flag, ESTABLISHED; the original entry keeps the dialled address
/// and takes the backend's port) and `forwarder status` counts it; netfilter's table for
/// the control. Then the exchange completes.
fn held_connection(sb: &Sandbox, checks: &mut Checks) {
    let c = case("tcp-lo");
    let to = addr(c.listen);
    let mut s = sb.chain.client.run(move || TcpStream::connect_timeout(&to, SERVED_WAIT)).unwrap().unwrap();
    let me = s.local_addr().unwrap();
    match &sb.daemon {
        Some(d) => {
            let state = forwarder::state::State::open(&d.pin_path).unwrap();
            let orig = v4_key(me, to);
            let backend_port = addr(c.backend).port();
            let reply = v4_key(SocketAddr::new(to.ip(), backend_port), me);
            let established = || {
                let ct = state.conntrack().unwrap();
                let get = |k: &CtKey| ct.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
                matches!((get(&orig), get(&reply)), (Some(o), Some(r))
                    if o.state == TCP_ESTABLISHED && r.state == TCP_ESTABLISHED
                        && o.flags & r.flags & CT_HOST_BACKEND != 0
                        && o.new_dst_addr == orig.dst_addr && o.new_dst_port_be == backend_port.to_be())
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while !established() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            checks.check(established(), format!("conntrack entries of {me} -> {to}: {:?}", state.conntrack().unwrap()));
            let status: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
            checks.check(status["conntrack_connections"].as_u64() >= Some(1), format!("status counts it: {status}"));
        }
        None => {
            let table = sb.chain.router.sh("cat /proc/net/nf_conntrack").unwrap();
            let line = table.lines().find(|l| l.contains(&format!("sport={} dport={}", me.port(), to.port())));
            checks.check(
                line.is_some_and(|l| l.contains("ESTABLISHED") && l.contains("src=127.0.0.1")),
                format!("netfilter's entry of {me} -> {to}: {table}"),
            );
        }
    }
    s.set_read_timeout(Some(SERVED_WAIT)).unwrap();
    let mut reply = String::new();
    let done = s
        .write_all(b"x")
        .and_then(|_| s.shutdown(std::net::Shutdown::Write))
        .and_then(|_| s.read_to_string(&mut reply));
    checks.check(
        done.is_ok() && reply == format!("tcp-lo peer={CLIENT}"),
        format!("held connection's answer {reply:?} {done:?}"),
    );
}

/// Programs on the router dialling listen addresses reach the backends on the router,
/// and see the address they dialled.
fn local_programs(sb: &Sandbox, checks: &mut Checks) {
    for (proto, to, server) in [
        (Proto::Tcp, "192.0.2.1:3307", "tcp-own"),
        (Proto::Tcp, "127.0.0.1:3307", "tcp-own"),
        (Proto::Tcp, "192.0.2.1:3309", "tcp-lo"),
        (Proto::Udp, "192.0.2.1:3307", "udp-own"),
        (Proto::Udp, "127.0.0.1:3309", "udp-lo"),
        (Proto::Tcp, "[2001:db8:1::1]:3317", "tcp6-own"),
        (Proto::Tcp, "[::1]:3319", "tcp6-lo"),
        (Proto::Udp, "[2001:db8:1::1]:3317", "udp6-own"),
        (Proto::Udp, "[::1]:3319", "udp6-lo"),
    ] {
        let r = local_program(sb, proto, to);
        let reply = r["reply"].as_str().unwrap_or("");
        checks.check(
            reply.starts_with(&format!("{server} peer=")) && r["peer"] == to,
            format!("local program {} to {to}: {r}", proto.name()),
        );
    }
}

fn run(via: Via) {
    let sb = Sandbox::new(via);
    let mut checks = Checks { via, failed: Vec::new() };
    let before = sb.daemon.as_ref().map(|d| d.stats().unwrap());

    // Interface clients, route_localnet off (the namespace's default).
    let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    let seen = run_clients(&sb.chain, via, &names, false);
    check_clients(&mut checks, via, "route_localnet 0", &seen, false);

    // route_localnet on the client-side interface: loopback backends over IPv4 (the
    // control's way to DNAT to 127.0.0.1; forwarder's UDP needs it too).
    sb.chain.router.sysctl("net.ipv4.conf.rc.route_localnet", "1").unwrap();
    let seen = run_clients(&sb.chain, via, &["tcp-lo", "udp-lo"], true);
    check_clients(&mut checks, via, "route_localnet 1", &seen, true);

    // SYN cookies for every SYN (no request socket): the handshake's last ACK must still
    // reach the loopback backend's listener, which only the assignment can find.
    sb.chain.router.sysctl("net.ipv4.tcp_syncookies", "2").unwrap();
    let seen = run_clients(&sb.chain, via, &["tcp-lo", "tcp-own"], true);
    check_clients(&mut checks, via, "SYN cookies", &seen, true);
    let seen = run_clients(&sb.chain, via, &["tcp6-lo"], true);
    checks.check(
        matches!(&seen[0].1, Seen::Served { .. }) || via == Via::Iptables,
        format!("tcp6-lo with SYN cookies: {:?}", seen[0].1),
    );
    sb.chain.router.sysctl("net.ipv4.tcp_syncookies", "1").unwrap();

    held_connection(&sb, &mut checks);
    local_programs(&sb, &mut checks);

    if let (Some(d), Some(before)) = (&sb.daemon, before) {
        let s = d.stats().unwrap();
        let (to_host, from_host) = (reason(&s, "to_host_backend"), reason(&s, "from_host_backend"));
        checks.check(to_host > 0 && from_host > 0, format!("to_host_backend {to_host}, from_host_backend {from_host}"));
        let packets: u64 = s["forwards"].as_array().unwrap().iter().map(|f| f["packets"].as_u64().unwrap()).sum();
        checks.check(packets == to_host + from_host, format!("forwards' packets {packets} = to + from host backend"));
        checks.check(reason(&before, "to_host_backend") == 0, "nothing before the clients");
        // udp-own: one datagram each way from the interface (and one local program, which
        // the hooks count as a local connection, not as packets).
        let u = forward(&s, "udp-own");
        checks.check(
            (u["packets"].as_u64(), u["new_connections"].as_u64(), u["local_connections"].as_u64())
                == (Some(2), Some(1), Some(1)),
            format!("udp-own counters: {u}"),
        );
        // tcp-lo: one connection at route_localnet 0, one at 1, one with SYN cookies, and
        // the held one.
        let t = forward(&s, "tcp-lo");
        checks.check(t["new_connections"].as_u64() == Some(4), format!("tcp-lo counters: {t}"));
        // The closed ports: a translated ICMP port unreachable (UDP), an RST (TCP).
        checks.check(reason(&s, "icmp_translated") >= 1, format!("icmp_translated {}", reason(&s, "icmp_translated")));
        let xdp_to_tc = reason(&s, "xdp_to_tc");
        match via {
            Via::Forwarder("off") => checks.check(xdp_to_tc == 0, format!("TC only: xdp_to_tc {xdp_to_tc}")),
            _ => checks.check(xdp_to_tc >= to_host, format!("XDP hands every packet to TC: {xdp_to_tc} < {to_host}")),
        }
        checks.check(
            d.log().contains("needs net.ipv4.conf.<interface>.route_localnet")
                && d.log().contains("serves local programs only"),
            "the daemon warns about UDP to loopback",
        );
    }
    checks.finish(&sb.log());
}

#[test]
fn control_iptables_dnat_to_the_router_itself() {
    run(Via::Iptables);
}

#[test]
fn forwarder_xdp_native_backends_on_the_router() {
    run(Via::Forwarder("native"));
}

#[test]
fn forwarder_xdp_generic_backends_on_the_router() {
    run(Via::Forwarder("generic"));
}

#[test]
fn forwarder_tc_only_backends_on_the_router() {
    run(Via::Forwarder("off"));
}

/// `snat = ADDR` cannot apply to a backend on this host (it sees the client's address):
/// a live edit asking for it is refused and changes nothing.
#[test]
fn a_fixed_snat_address_is_refused_for_a_backend_on_the_host() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, &config("off")).unwrap();
    let add = |name: &str, extra: &[&str]| {
        let mut args = vec!["forward", "add", "--name", name, "--protocol", "tcp", "--listen", "0.0.0.0:3400"];
        args.extend_from_slice(&["--backend", "192.0.2.1:3197"]);
        args.extend_from_slice(extra);
        d.cli(&args)
    };
    let err = add("fixed", &["--snat", "198.51.100.7"]).unwrap_err().to_string();
    assert!(err.contains("is on this host"), "{err}");
    assert!(!d.cli(&["forward", "list"]).unwrap().contains("fixed"));
    add("auto", &[]).unwrap();
    assert!(d.cli(&["forward", "list"]).unwrap().contains("auto"));
}
