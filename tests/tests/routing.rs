//! Policy routing and route changes for new connections, with iptables DNAT + MASQUERADE as
//! the control: a rule that sends some client ports to an `unreachable` route, and an
//! `unreachable` route added and removed while connections come and go. forwarder keeps the
//! FIB's last answers per CPU (the FIB memo, route.rs) for a client's next connection to
//! the same backend; these scenarios fail if it served an answer the FIB would not give:
//! one found for another port while a rule looks at ports, or one from before a route
//! change. client ─ router ─ server; see forwarder_tests::topo.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use forwarder::state::State;
use forwarder_common::ROUTE_PORTS_IGNORED;
use forwarder_tests::{
    Chain, Daemon, Netns,
    config::{forward, router_interfaces},
    netns::run_ok,
    sockets::plus_one_server,
    topo::{CLIENT_ADDR, ROUTER_CLIENT_ADDR, SERVER_ADDR},
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
fn connect_from(client: &Netns, port: u16) -> Outcome {
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap();
    let from: SocketAddr = format!("{CLIENT_ADDR}:{port}").parse().unwrap();
    client
        .run(move || {
            // Every SYN from one CPU: the memo is per CPU, and a veth's receive work runs on
            // the sender's CPU, so a wrong answer kept for one connection would meet the next.
            let mut one = nix::sched::CpuSet::new();
            one.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
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
    /// whether a rule now looks at ports.
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

/// The scenario, the same for the control and for forwarder in each mode.
fn scenario(chain: &Chain, router: &dyn Router) {
    let server =
        plus_one_server(&chain.server, SocketAddr::new([0, 0, 0, 0].into(), BACKEND_PORT), FREE_PORTS.len()).unwrap();
    let r = &chain.router;
    // Neighbours that never change state: no event moves the route generation but the
    // changes below (forwarder keeps no FIB answer without a neighbour).
    for (ns, dev, addr, router_dev) in
        [(&chain.server, "s0", SERVER_ADDR, "rs"), (&chain.client, "c0", CLIENT_ADDR, "rc")]
    {
        let m = ns.mac(dev).unwrap();
        let mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
        r.ip(&["neigh", "replace", addr, "lladdr", &mac, "dev", router_dev, "nud", "permanent"]).unwrap();
    }
    r.ip(&["route", "add", "unreachable", SERVER_ADDR, "table", "100"]).unwrap();
    r.ip(&["rule", "add", "sport", RULED_PORTS, "table", "100", "priority", "100"]).unwrap();
    router.settled(false);
    // A rule looks at the client's port: the connection before it, from a port the rule
    // does not take, says nothing about the next one.
    assert_eq!(connect_from(&chain.client, FREE_PORTS[0]), Outcome::Answered);
    assert_eq!(connect_from(&chain.client, RULED_PORT), Outcome::Refused(libc::EHOSTUNREACH));
    assert_eq!(connect_from(&chain.client, FREE_PORTS[1]), Outcome::Answered);

    r.ip(&["rule", "del", "priority", "100"]).unwrap();
    router.settled(true);
    assert_eq!(connect_from(&chain.client, FREE_PORTS[2]), Outcome::Answered);
    // A route change: the next connection takes the new route at once.
    r.ip(&["route", "add", "unreachable", &format!("{SERVER_ADDR}/32")]).unwrap();
    router.settled(true);
    assert_eq!(connect_from(&chain.client, ROUTE_CHANGE_PORT), Outcome::Refused(libc::EHOSTUNREACH));
    r.ip(&["route", "del", "unreachable", &format!("{SERVER_ADDR}/32")]).unwrap();
    router.settled(true);
    assert_eq!(connect_from(&chain.client, FREE_PORTS[3]), Outcome::Answered);
    let peers = server.join().unwrap();
    assert_eq!(peers.len(), FREE_PORTS.len());
}

#[test]
fn control_iptables_follows_port_rules_and_route_changes() {
    let chain = Chain::new().unwrap();
    chain.iptables_dnat_masquerade("tcp", LISTEN_PORT, &format!("{SERVER_ADDR}:{BACKEND_PORT}")).unwrap();
    scenario(&chain, &Control);
}

fn forwarder_follows(xdp: &str) {
    let chain = Chain::new().unwrap();
    let config = router_interfaces(xdp)
        + &forward("db", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("{SERVER_ADDR}:{BACKEND_PORT}"));
    let daemon = Daemon::start(&chain.router, &chain.tag, &config).unwrap();
    let fwd = Forwarder { daemon, generation: std::cell::Cell::new(0) };
    // No rule on ports and the default multipath hash (L3): the memo may serve.
    wait_for("the routing facts", Duration::from_secs(10), || {
        fwd.state().route_flags().unwrap() == ROUTE_PORTS_IGNORED
    });
    fwd.generation.set(fwd.state().route_generation().unwrap());
    scenario(&chain, &fwd);
    let new = fwd.daemon.stats().unwrap()["forwards"][0]["new_connections"].as_u64().unwrap_or(0);
    assert!(new >= FREE_PORTS.len() as u64, "{}", fwd.daemon.stats().unwrap());

    // A multipath hash that takes the ports (a sysctl: no event, read every second) turns
    // the memo off, and the default turns it on again.
    for (policy, want) in [("1", 0), ("3", 0), ("0", ROUTE_PORTS_IGNORED)] {
        run_ok(chain.router.cmd("sysctl").args(["-qw", &format!("net.ipv4.fib_multipath_hash_policy={policy}")]))
            .unwrap();
        wait_for(&format!("routing facts under hash policy {policy}"), Duration::from_secs(10), || {
            fwd.state().route_flags().unwrap() == want
        });
    }
    run_ok(chain.router.cmd("sysctl").args(["-qw", "net.ipv6.fib_multipath_hash_policy=1"])).unwrap();
    wait_for("routing facts under IPv6 hash policy 1", Duration::from_secs(10), || {
        fwd.state().route_flags().unwrap() == 0
    });
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
