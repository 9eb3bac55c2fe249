//! Policy routing and route changes for new connections, IPv4 and IPv6, with iptables and
//! ip6tables DNAT + MASQUERADE as the control: a rule that sends some client ports to an
//! `unreachable` route, and an `unreachable` route added and removed while connections come
//! and go. forwarder keeps the FIB's last answers per CPU (the FIB memo, route.rs) for a
//! client's next connection to the same backend; these scenarios fail if it served an
//! answer the FIB would not give: one found for another port while a rule looks at ports,
//! or one from before a route change. client ─ router ─ mid ─ server
//! (forwarder_tests::topo::Line).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use forwarder::state::State;
use forwarder_common::ROUTE_PORTS_IGNORED;
use forwarder_tests::{
    Daemon, Netns,
    config::line_config,
    netns::run_ok,
    sockets::plus_one_server,
    topo::{LINE_ROUTER_V6, LINE_SERVER_V6, Line},
    wait_for,
};

const BACKEND_PORT: u16 = 3197;
const LISTEN_PORT: u16 = 3306;
/// Client ports the rule sends to table 100, whose route to the server is unreachable.
const RULED_PORTS: &str = "40000-40999";
const RULED_PORT: u16 = 40500;
/// Client ports no rule looks at (one per connection: each is a new flow).
const FREE_PORTS: [u16; 4] = [41500, 41501, 41502, 41504];
const ROUTE_CHANGE_PORT: u16 = 41503;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn client(self) -> &'static str {
        match self {
            Fam::V4 => "192.0.2.2",
            Fam::V6 => "2001:db8:1::2",
        }
    }

    fn listen(self) -> &'static str {
        match self {
            Fam::V4 => "192.0.2.1",
            Fam::V6 => LINE_ROUTER_V6,
        }
    }

    fn server(self) -> &'static str {
        match self {
            Fam::V4 => "203.0.113.20",
            Fam::V6 => LINE_SERVER_V6,
        }
    }

    /// The router's next hop towards the server (mid).
    fn mid(self) -> &'static str {
        match self {
            Fam::V4 => "198.51.100.2",
            Fam::V6 => "2001:db8:3::2",
        }
    }

    fn socket(self, addr: &str, port: u16) -> SocketAddr {
        match self {
            Fam::V4 => format!("{addr}:{port}"),
            Fam::V6 => format!("[{addr}]:{port}"),
        }
        .parse()
        .unwrap()
    }

    /// `ip` with this family's flag.
    fn ip(self, ns: &Netns, args: &[&str]) {
        let mut all = vec![if self == Fam::V4 { "-4" } else { "-6" }];
        all.extend_from_slice(args);
        ns.ip(&all).unwrap();
    }

    /// The errno of a connect the stack answers for an `unreachable` route: host
    /// unreachable (IPv4), no route (IPv6).
    fn unreachable(self) -> i32 {
        match self {
            Fam::V4 => libc::EHOSTUNREACH,
            Fam::V6 => libc::ENETUNREACH,
        }
    }

    fn host_prefix(self) -> String {
        match self {
            Fam::V4 => format!("{}/32", self.server()),
            Fam::V6 => format!("{}/128", self.server()),
        }
    }
}

/// How a connection from the client ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Connected, and the plus-one exchange came back.
    Answered,
    /// connect() failed with this errno.
    Refused(i32),
}

/// Connects from the client's `port` to the listen address and, once connected, makes one
/// plus-one exchange.
fn connect_from(client: &Netns, fam: Fam, port: u16) -> Outcome {
    let to = fam.socket(fam.listen(), LISTEN_PORT);
    let from = fam.socket(fam.client(), port);
    client
        .run(move || {
            // Every SYN from one CPU: the memo is per CPU, and a veth's receive work runs on
            // the sender's CPU, so a wrong answer kept for one connection would meet the next.
            let mut one = nix::sched::CpuSet::new();
            one.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
            let domain = if fam == Fam::V4 { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&from.into()).unwrap();
            if let Err(e) = s.connect_timeout(&to.into(), Duration::from_secs(5)) {
                return Outcome::Refused(e.raw_os_error().unwrap_or(0));
            }
            let mut s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let data = [7u8, 8, 9];
            s.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
            s.write_all(&data).unwrap();
            let mut back = [0u8; 3];
            s.read_exact(&mut back).expect("the plus-one reply");
            assert_eq!(back, [8, 9, 10]);
            Outcome::Answered
        })
        .unwrap()
}

/// What the scenario needs from the router under test: forwarder reports when its watch has
/// seen a change; the control's stack routes with the change at once.
trait Router {
    /// Waits until the router acts on the rules and routes as they are now; `ports_ignored`:
    /// no rule looks at ports now.
    fn settled(&self, ports_ignored: bool);
}

struct Control;

impl Router for Control {
    fn settled(&self, _: bool) {}
}

struct Forwarder {
    daemon: Daemon,
    generation: std::cell::Cell<u32>,
}

impl Forwarder {
    fn state(&self) -> State {
        State::open(&self.daemon.pin_path).unwrap()
    }
}

impl Router for Forwarder {
    fn settled(&self, ports_ignored: bool) {
        let want = if ports_ignored { ROUTE_PORTS_IGNORED } else { 0 };
        let before = self.generation.get();
        wait_for("the route watch to see the change", Duration::from_secs(10), || {
            let s = self.state();
            s.route_flags().unwrap() == want && s.route_generation().unwrap() != before
        });
        self.generation.set(self.state().route_generation().unwrap());
    }
}

/// A quiet router: no event moves the route generation but the changes the scenario makes,
/// so a FIB answer forwarder keeps for one connection meets the next (forwarder keeps none
/// without a neighbour). IPv6 link-local addresses finish their duplicate detection (the
/// router's own announces its address and routes as it does), the client stops soliciting
/// routers (each solicitation updates the router's neighbour entry for it), and the
/// neighbours the connections use never change state.
fn quiet_router(line: &Line) {
    line.client.sysctl("net.ipv6.conf.c0.router_solicitations", "0").unwrap();
    for ns in [&line.router, &line.client, &line.mid] {
        wait_for("IPv6 duplicate address detection", Duration::from_secs(10), || {
            ns.ip(&["-6", "addr", "show", "tentative"]).unwrap().trim().is_empty()
        });
    }
    let mac = |ns: &Netns, dev: &str| {
        let m = ns.mac(dev).unwrap();
        format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    };
    let pin = |ns: &Netns, fam: Fam, addr: &str, lladdr: &str, dev: &str| {
        fam.ip(ns, &["neigh", "replace", addr, "lladdr", lladdr, "dev", dev, "nud", "permanent"]);
    };
    for fam in [Fam::V4, Fam::V6] {
        // Both ways across each of the router's links: no neighbour solicitation reaches it
        // either (one from a link-local address would add an entry).
        pin(&line.router, fam, fam.mid(), &mac(&line.mid, "mr"), "rm");
        pin(&line.router, fam, fam.client(), &mac(&line.client, "c0"), "rc");
        let router_mid = if fam == Fam::V4 { "198.51.100.1" } else { "2001:db8:3::1" };
        pin(&line.mid, fam, router_mid, &mac(&line.router, "rm"), "mr");
        pin(&line.client, fam, fam.listen(), &mac(&line.router, "rc"), "c0");
    }
}

/// The scenario for one family, the same for the control and for forwarder in each mode.
fn scenario(line: &Line, router: &dyn Router, fam: Fam) {
    let server = plus_one_server(&line.server, fam.socket(fam.server(), BACKEND_PORT), FREE_PORTS.len()).unwrap();
    let r = &line.router;
    let connect = |port| connect_from(&line.client, fam, port);
    fam.ip(r, &["route", "add", "unreachable", fam.server(), "table", "100"]);
    fam.ip(r, &["rule", "add", "sport", RULED_PORTS, "table", "100", "priority", "100"]);
    router.settled(false);
    // A rule looks at the client's port: the connection before it, from a port the rule
    // does not take, says nothing about the next one.
    assert_eq!(connect(FREE_PORTS[0]), Outcome::Answered, "{fam:?}");
    assert_eq!(connect(RULED_PORT), Outcome::Refused(fam.unreachable()), "{fam:?}");
    assert_eq!(connect(FREE_PORTS[1]), Outcome::Answered, "{fam:?}");

    fam.ip(r, &["rule", "del", "priority", "100"]);
    fam.ip(r, &["route", "del", "unreachable", fam.server(), "table", "100"]);
    router.settled(true);
    assert_eq!(connect(FREE_PORTS[2]), Outcome::Answered, "{fam:?}");
    // A route change: the next connection takes the new route at once.
    fam.ip(r, &["route", "add", "unreachable", &fam.host_prefix()]);
    router.settled(true);
    assert_eq!(connect(ROUTE_CHANGE_PORT), Outcome::Refused(fam.unreachable()), "{fam:?}");
    fam.ip(r, &["route", "del", "unreachable", &fam.host_prefix()]);
    router.settled(true);
    assert_eq!(connect(FREE_PORTS[3]), Outcome::Answered, "{fam:?}");
    assert_eq!(server.join().unwrap().len(), FREE_PORTS.len(), "{fam:?}");
}

#[test]
fn control_iptables_follows_port_rules_and_route_changes() {
    let line = Line::new(1500).unwrap();
    quiet_router(&line);
    for (tool, backend) in [("iptables", "203.0.113.20:3197"), ("ip6tables", "[2001:db8:2::20]:3197")] {
        for rule in [
            format!("-t nat -A PREROUTING -p tcp --dport {LISTEN_PORT} -j DNAT --to-destination {backend}"),
            "-t nat -A POSTROUTING -o rm -j MASQUERADE".to_string(),
        ] {
            run_ok(line.router.cmd(tool).args(rule.split(' '))).unwrap();
        }
    }
    for fam in [Fam::V4, Fam::V6] {
        scenario(&line, &Control, fam);
    }
}

fn forwarder_follows(xdp: &str) {
    let line = Line::new(1500).unwrap();
    quiet_router(&line);
    let daemon = Daemon::start(&line.router, &line.tag, &line_config(xdp)).unwrap();
    let fwd = Forwarder { daemon, generation: std::cell::Cell::new(0) };
    // No rule on ports and the default multipath hash (L3): the memo may serve.
    wait_for("the routing facts", Duration::from_secs(10), || {
        fwd.state().route_flags().unwrap() == ROUTE_PORTS_IGNORED
    });
    fwd.generation.set(fwd.state().route_generation().unwrap());
    for fam in [Fam::V4, Fam::V6] {
        scenario(&line, &fwd, fam);
    }
    let stats = fwd.daemon.stats().unwrap();
    for name in ["tcp4", "tcp6"] {
        let f = stats["forwards"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap();
        assert!(f["new_connections"].as_u64().unwrap_or(0) >= FREE_PORTS.len() as u64, "{stats}");
    }

    // A multipath hash that takes the ports (a sysctl: no event, read every second) turns
    // the memo off, and the default turns it on again; in either family.
    for family in ["ipv4", "ipv6"] {
        for (policy, want) in [("1", 0), ("3", 0), ("0", ROUTE_PORTS_IGNORED)] {
            let set = format!("net.{family}.fib_multipath_hash_policy={policy}");
            run_ok(line.router.cmd("sysctl").args(["-qw", &set])).unwrap();
            wait_for(&format!("routing facts under {set}"), Duration::from_secs(10), || {
                fwd.state().route_flags().unwrap() == want
            });
        }
    }
}

#[test]
fn forwarder_tc_only_follows_port_rules_and_route_changes() {
    forwarder_follows("off");
}

#[test]
fn forwarder_xdp_native_follows_port_rules_and_route_changes() {
    forwarder_follows("native");
}

#[test]
fn forwarder_xdp_generic_follows_port_rules_and_route_changes() {
    forwarder_follows("generic");
}
