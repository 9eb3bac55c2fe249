//! forwarder asks the kernel through rtnetlink only (forwarder::netlink): it needs no `ip`
//! at run time. Each daemon here runs with a PATH that holds no `ip` (only the `nsenter`
//! the test launches it with), as on a host or image without iproute2.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use forwarder_tests::{
    Cgroup, Chain, Daemon, ExactLaunch, Netns,
    config::{forward, interface},
    daemon::forwarder_bin,
    sockets::{plus_one_exchange, plus_one_server},
    topo::{A_DEV, B_ADDR, ROUTER_CLIENT_ADDR, ROUTER_CLIENT_DEV, ROUTER_SERVER_DEV, SERVER_ADDR, TwoIsp},
};

const BACKEND_PORT: u16 = 3197;
const LISTEN_PORT: u16 = 3306;

/// Starts `forwarder run` in `ns` with the whole environment `PATH=<dir with nsenter only>`.
fn start_without_ip(ns: &Netns, tag: &str, config: &str) -> Daemon {
    let scratch = Daemon::scratch_dir(tag).unwrap();
    let dir = scratch.path();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let nsenter = ["/usr/bin/nsenter", "/bin/nsenter", "/usr/sbin/nsenter"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nsenter");
    std::os::unix::fs::symlink(nsenter, bin.join("nsenter")).unwrap();
    assert!(!bin.join("ip").exists());
    let config_path = dir.join("forwarder.toml");
    std::fs::write(&config_path, config).unwrap();
    let pin_path = PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}"));
    let cgroup = Cgroup::new(tag).unwrap();
    let argv = vec![
        forwarder_bin().display().to_string(),
        "--log-level".into(),
        "debug".into(),
        "run".into(),
        "--config".into(),
        config_path.display().to_string(),
        "--pin-path".into(),
        pin_path.display().to_string(),
        "--cgroup".into(),
        cgroup.path.display().to_string(),
    ];
    let env = vec![("PATH".into(), bin.display().to_string())];
    Daemon::start_exact(ns, ExactLaunch { argv, env, pin_path, config_path, cgroup, scratch }).unwrap()
}

/// The running instance's status file (what `forwarder status --json` reports).
fn status(d_pin: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(forwarder::status::path_for(d_pin)).unwrap()).unwrap()
}

fn forward_config(xdp: &str) -> String {
    let redirect_auto = "redirect = \"auto\"\n";
    interface(ROUTER_CLIENT_DEV, xdp)
        + redirect_auto
        + &interface(ROUTER_SERVER_DEV, xdp)
        + redirect_auto
        + &forward("db", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("{SERVER_ADDR}:{BACKEND_PORT}"))
}

/// Three TCP exchanges client → router:3306 → server; each reply is the request + 1.
fn exchange(chain: &Chain) {
    let server = plus_one_server(&chain.server, SocketAddr::new([0, 0, 0, 0].into(), BACKEND_PORT), 3).unwrap();
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap();
    chain
        .client
        .run(move || {
            for _ in 0..3 {
                plus_one_exchange(to, 100_000);
            }
        })
        .unwrap();
    server.join().unwrap();
}

/// The control: iptables DNAT + MASQUERADE on the router carries the same exchange.
#[test]
fn iptables_control_forwards_over_veths() {
    let chain = Chain::new().unwrap();
    chain.iptables_dnat_masquerade("tcp", LISTEN_PORT, &format!("{SERVER_ADDR}:{BACKEND_PORT}")).unwrap();
    exchange(&chain);
}

/// `redirect = "auto"` tells veths from other devices by their link kind, read over
/// rtnetlink: without `ip` the veths still get no XDP redirect (their far ends run no XDP
/// and would drop the frames), and forwarding works.
fn auto_redirect_without_ip(xdp: &str) {
    let chain = Chain::new().unwrap();
    let d = start_without_ip(&chain.router, &chain.tag, &forward_config(xdp));
    let st = status(&d.pin_path);
    let ifaces = st["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2, "{st}");
    for i in ifaces {
        assert_eq!(i["xdp_egress"], false, "a veth is no XDP redirect target: {st}\n{}", d.log());
    }
    exchange(&chain);
    let f = d.stats().unwrap()["forwards"][0].clone();
    assert_eq!(f["new_connections"], 3, "the forwarder carried them: {f}");
}

#[test]
fn auto_redirect_sees_veths_without_ip_xdp_native() {
    auto_redirect_without_ip("native");
}

#[test]
fn auto_redirect_sees_veths_without_ip_xdp_generic() {
    auto_redirect_without_ip("generic");
}

fn peer_state(d: &Daemon) -> serde_json::Value {
    d.stats().unwrap()["peers"][0]["state"].clone()
}

/// Lines of the daemon's log that contain every one of `words`.
fn log_lines(d: &Daemon, words: &[&str]) -> usize {
    d.log().lines().filter(|l| words.iter().all(|w| l.contains(w))).count()
}

/// A peer's state follows its neighbour entry as rtnetlink announces it: deleting the entry
/// puts the peer in fallback at once (a neighbour event, not the periodic check), the probe
/// then resolves it again and the peer goes direct again. No `ip` anywhere on the path.
#[test]
fn peer_state_follows_neighbour_events_without_ip() {
    let t = TwoIsp::new().unwrap();
    let d = start_without_ip(&t.a, &t.tag, &format!("[[peer]]\naddress = \"{B_ADDR}\"\ninterface = \"{A_DEV}\"\n"));
    forwarder_tests::wait_for("peer direct", Duration::from_secs(10), || peer_state(&d) == "direct");
    let directs = log_lines(&d, &["peer direct"]);
    assert!(directs >= 1, "{}", d.log());

    let deleted = Instant::now();
    t.a.ip(&["neigh", "del", B_ADDR, "dev", A_DEV]).unwrap();
    forwarder_tests::wait_for("fallback on the neighbour event", Duration::from_secs(5), || {
        log_lines(&d, &["in fallback", "neighbour event"]) >= 1
    });
    // The periodic full re-read comes every 10 s: this was the event.
    assert!(deleted.elapsed() < Duration::from_secs(3), "fallback took {:?}\n{}", deleted.elapsed(), d.log());
    forwarder_tests::wait_for("direct again", Duration::from_secs(10), || {
        log_lines(&d, &["peer direct"]) > directs && peer_state(&d) == "direct"
    });
    assert!(log_lines(&d, &["peer direct", "neighbour event"]) >= 1, "{}", d.log());
}

/// The daemon's rule dump (one request for every family) sees a rule on ports in either
/// family, and only such a rule: the FIB memo serves only while there is none.
#[test]
fn rule_dump_sees_port_rules_of_both_families() {
    let ns = Netns::new("rules").unwrap();
    let dump = |ns: &Netns| ns.run(|| forwarder::netlink::rules_match_ports().unwrap()).unwrap();
    assert!(!dump(&ns), "a namespace's default rules match no ports");
    for (family, ports) in [("-4", "sport"), ("-6", "dport")] {
        ns.ip(&[family, "rule", "add", "from", "all", "table", "100", "priority", "90"]).unwrap();
        assert!(!dump(&ns), "{family}: a rule without ports");
        ns.ip(&[family, "rule", "add", ports, "40000-40999", "table", "100", "priority", "100"]).unwrap();
        assert!(dump(&ns), "{family}: a rule on {ports}");
        ns.ip(&[family, "rule", "del", "priority", "100"]).unwrap();
        ns.ip(&[family, "rule", "del", "priority", "90"]).unwrap();
        assert!(!dump(&ns), "{family}: its rules removed");
    }
}
