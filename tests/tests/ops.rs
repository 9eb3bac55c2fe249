//! Operations end to end: restarts without drops (even SIGKILL), live edits, reloads and
//! their policies, metrics, connection expiry and a full table.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon, Netns,
    config::{forward, router_interfaces},
    metrics::{Scrape, http_get},
    sockets::{self, EchoConn, PatternStream, StreamTotals},
    topo::{ROUTER_CLIENT_ADDR, SERVER_ADDR},
    wait_for,
};

fn config(extra: &str) -> String {
    router_interfaces("native") + &forward("classic", "tcp", "0.0.0.0:3306", format!("{SERVER_ADDR}:3197")) + extra
}

/// A TCP echo server on the backend at `port`, for any number of connections.
fn echo_server(ns: &Netns, port: u16) {
    sockets::tcp_echo(ns, addr(SERVER_ADDR, port)).unwrap();
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// An open connection from `ns` through the router's `port` to an echo server.
fn open(ns: &Netns, port: u16) -> std::io::Result<EchoConn> {
    EchoConn::open_in(ns, addr(ROUTER_CLIENT_ADDR, port), Duration::from_secs(2))
}

fn forward_names(d: &Daemon) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
    v.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()).collect()
}

/// A stream of known bytes keeps flowing while the daemon is SIGKILLed and started again:
/// pinned links keep the programs attached and pinned maps keep the connection.
#[test]
fn sigkill_and_restart_lose_no_byte() {
    let chain = Chain::new().unwrap();
    let mut d = Daemon::start(&chain.router, &chain.tag, &config("")).unwrap();
    const TOTAL: usize = 3_000_000;
    let stream = PatternStream::start(
        &chain.server,
        addr(SERVER_ADDR, 3197),
        &chain.client,
        addr(ROUTER_CLIENT_ADDR, 3306),
        Some(TOTAL),
    )
    .unwrap();
    stream.wait_for_more(100_000, "the stream to flow through the daemon");
    d.kill().unwrap();
    assert!(d.pin_path.join(forwarder_common::FWD_CT_V4).exists(), "state stays pinned after SIGKILL");
    stream.wait_for_more(100_000, "the stream to flow with no daemon");
    d.launch().unwrap();
    assert!(d.log().contains("adopting pinned state"), "{}", d.log());
    // All of it, before the client is told to stop (the restart may be quicker than the
    // paced stream's rest).
    stream.wait_for_total(TOTAL, "the whole stream through the restarted daemon");
    assert_eq!(stream.finish(), StreamTotals { sent: TOTAL, answered: TOTAL, received: TOTAL });
    assert_eq!(d.stats().unwrap()["forwards"][0]["new_connections"], 1, "counters survived the restart");
}

/// `forward add/del` on the live instance: new flows follow at once, flows of untouched
/// forwards keep going; `peer add/del/list` likewise.
#[test]
fn live_forward_and_peer_edits() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, &config("")).unwrap();
    echo_server(&chain.server, 3197);
    echo_server(&chain.server, 3198);
    let mut kept = open(&chain.client, 3306).unwrap();
    kept.ping(b"before").unwrap();

    assert!(open(&chain.client, 4406).is_err(), "no forward on 4406 yet");
    d.cli(&[
        "forward",
        "add",
        "--name",
        "extra",
        "--protocol",
        "tcp",
        "--listen",
        "0.0.0.0:4406",
        "--backend",
        "203.0.113.20:3198",
    ])
    .unwrap();
    assert_eq!(forward_names(&d), vec!["classic", "extra"]);
    let mut new = open(&chain.client, 4406).expect("the new forward works at once");
    new.ping(b"via extra").unwrap();
    kept.ping(b"after add").unwrap();

    // Bad input is refused and changes nothing.
    let err = d.cli(&[
        "forward",
        "add",
        "--name",
        "bad",
        "--protocol",
        "tcp",
        "--listen",
        "0.0.0.0:5506",
        "--backend",
        "nowhere",
    ]);
    assert!(err.unwrap_err().to_string().contains("backend"));
    assert!(
        d.cli(&[
            "forward",
            "add",
            "--name",
            "dup",
            "--protocol",
            "tcp",
            "--listen",
            "0.0.0.0:3306",
            "--backend",
            "203.0.113.20:1"
        ])
        .is_err()
    );
    assert_eq!(forward_names(&d), vec!["classic", "extra"]);

    d.cli(&["forward", "del", "extra"]).unwrap();
    assert_eq!(forward_names(&d), vec!["classic"]);
    assert!(open(&chain.client, 4406).is_err(), "new flows follow the removal at once");
    kept.ping(b"after del").unwrap();

    d.cli(&["peer", "add", "--address", "203.0.113.20", "--interface", "rs"]).unwrap();
    let peers: serde_json::Value = serde_json::from_str(&d.cli(&["peer", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(peers[0]["address"], "203.0.113.20");
    assert_eq!(peers[0]["interface"], "rs");
    wait_for("the new peer to go direct", Duration::from_secs(10), || {
        let p: serde_json::Value = serde_json::from_str(&d.cli(&["peer", "list", "--json"]).unwrap()).unwrap();
        p[0]["direct"] == true
    });
    kept.ping(b"with a peer").unwrap();
    d.cli(&["peer", "del", "203.0.113.20"]).unwrap();
    assert_eq!(d.cli(&["peer", "list", "--json"]).unwrap().trim(), "[]");
}

/// SIGHUP with a broken config is refused and nothing changes; a good config swapped in the
/// way kubelet does it is picked up; removed forwards drain by default.
#[test]
fn reload_refuses_broken_config_and_drains_removed_forwards() {
    let chain = Chain::new().unwrap();
    let two = config(
        "[[forward]]\nname = \"second\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:4406\"\nbackend = \"203.0.113.20:3198\"\n",
    );
    let d = Daemon::start(&chain.router, &chain.tag, &two).unwrap();
    echo_server(&chain.server, 3197);
    echo_server(&chain.server, 3198);
    let mut first = open(&chain.client, 3306).unwrap();
    let mut second = open(&chain.client, 4406).unwrap();
    second.ping(b"x").unwrap();
    let before = d.cli(&["forward", "list", "--json"]).unwrap();

    std::fs::write(
        &d.config_path,
        two.replace("protocol = \"tcp\"\nlisten = \"0.0.0.0:4406\"", "protocol = \"tcp\"\nlisten = \"0.0.0.0:99999\""),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("the refusal", Duration::from_secs(5), || d.log().contains("reload refused"));
    assert_eq!(d.cli(&["forward", "list", "--json"]).unwrap(), before, "state unchanged");
    first.ping(b"still").unwrap();
    second.ping(b"still").unwrap();
    assert!(open(&chain.client, 4406).is_ok(), "new flows still follow the old config");

    // Drop "second" (kubelet-style symlink swap, picked up by the file watch).
    d.replace_config(&config("")).unwrap();
    wait_for("the reload", Duration::from_secs(5), || forward_names(&d) == vec!["classic"]);
    assert!(open(&chain.client, 4406).is_err(), "no new flows for a removed forward");
    second.ping(b"drained, not cut").unwrap();
    first.ping(b"untouched").unwrap();
}

/// With `on_forward_removed = "flush"`, connections of a removed forward are cut at once.
#[test]
fn reload_with_flush_policy_cuts_removed_forwards() {
    let chain = Chain::new().unwrap();
    let policy = "[conntrack]\non_forward_removed = \"flush\"\n";
    let two = config(&format!(
        "[[forward]]\nname = \"second\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:4406\"\nbackend = \"203.0.113.20:3198\"\n{policy}"
    ));
    let d = Daemon::start(&chain.router, &chain.tag, &two).unwrap();
    echo_server(&chain.server, 3197);
    echo_server(&chain.server, 3198);
    let mut first = open(&chain.client, 3306).unwrap();
    let mut second = open(&chain.client, 4406).unwrap();
    second.ping(b"x").unwrap();
    d.replace_config(&config(policy)).unwrap();
    wait_for("the reload", Duration::from_secs(5), || forward_names(&d) == vec!["classic"]);
    assert!(second.ping(b"cut").is_err(), "a flushed connection no longer passes");
    first.ping(b"untouched").unwrap();
}

/// A daemon-wide counter of the /metrics scrape (no labels).
fn scraped(ns: &Netns, metric: &str) -> f64 {
    Scrape::of(ns).value(metric, &[])
}

/// An error in the daemon's own work (here every expiry pass fails: the connection table's
/// pin was removed under it) is logged and counted, and the daemon goes on: it answers,
/// refuses a reload that cannot read its state without ending, forwards, and at SIGTERM
/// does what `--on-exit` says (detach: the pins go).
#[test]
fn an_error_in_the_daemons_work_is_counted_and_the_daemon_goes_on() {
    let chain = Chain::new().unwrap();
    let mut d = Daemon::start(&chain.router, &chain.tag, &config("[conntrack]\ngc_interval = 1\n")).unwrap();
    echo_server(&chain.server, 3197);
    std::fs::remove_file(d.pin_path.join(forwarder_common::FWD_CT_V4)).unwrap();
    wait_for("an expiry error to be counted", Duration::from_secs(30), || {
        scraped(&chain.router, "forwarder_daemon_errors_total") >= 1.0
    });
    assert!(d.log().contains("conntrack expiry"), "logged:\n{}", d.log());
    assert_eq!(http_get(&chain.router, "/healthz").0, 200);
    d.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("the reload to be refused", Duration::from_secs(30), || {
        scraped(&chain.router, "forwarder_reload_failures_total") >= 1.0
    });
    assert_eq!(http_get(&chain.router, "/readyz").0, 200);
    open(&chain.client, 3306).unwrap().ping(b"still forwarding").unwrap();
    assert!(d.stop().unwrap().success(), "{}", d.log());
    assert!(!d.pin_path.join(forwarder_common::FWD_RULES_V2).exists(), "--on-exit detach removed the pins");
}

/// /metrics parses as Prometheus text and agrees with `forwarder stats --json`; health and
/// readiness answer; `forwarder status` tells what is attached.
#[test]
fn metrics_health_and_status() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, &config("")).unwrap();
    echo_server(&chain.server, 3197);
    for _ in 0..3 {
        open(&chain.client, 3306).unwrap().ping(b"metrics").unwrap();
    }
    wait_for("the three connections to be counted", Duration::from_secs(5), || {
        d.stats().unwrap()["forwards"][0]["new_connections"] == 3
    });
    let stats = d.stats().unwrap();
    let scrape = Scrape::of(&chain.router);
    let value = |metric: &str, label: (&str, &str)| scrape.value(metric, &[label]);
    let f = &stats["forwards"][0];
    assert_eq!(value("forwarder_forward_new_connections_total", ("forward", "classic")), 3.0);
    assert_eq!(
        value("forwarder_forward_new_connections_total", ("forward", "classic")) as u64,
        f["new_connections"].as_u64().unwrap()
    );
    // Packets may still trickle (FIN/ACKs) between the two reads: metrics read second.
    let packets = value("forwarder_forward_packets_total", ("forward", "classic")) as u64;
    assert!(packets >= f["packets"].as_u64().unwrap() && packets > 0);
    let no_rule =
        stats["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "redirect_tc").unwrap()["packets"]
            .as_u64()
            .unwrap();
    assert!(value("forwarder_packets_total", ("reason", "redirect_tc")) as u64 >= no_rule);
    assert_eq!(http_get(&chain.router, "/healthz").0, 200);
    assert_eq!(http_get(&chain.router, "/readyz").0, 200);
    assert_eq!(http_get(&chain.router, "/nope").0, 404);

    let status: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status["daemon_running"], true);
    let ifaces: Vec<&str> =
        status["daemon"]["interfaces"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(ifaces, vec!["rc", "rs"]);
    assert_eq!(status["daemon"]["interfaces"][0]["xdp"], "native");
    assert!(
        status["daemon"]["programs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "forwarder_xdp" && p["id"].as_u64() > Some(0))
    );
    assert_eq!(status["forwards"], 1);
    let table = d.cli(&["status"]).unwrap();
    assert!(table.contains("FWD_CT") && table.contains("interface rc"), "{table}");
}

/// Idle flows expire after their timeout; a full table refuses new flows (counted) while
/// established ones keep working.
#[test]
fn idle_flows_expire_and_a_full_table_keeps_established_flows() {
    let chain = Chain::new().unwrap();
    let cfg = config(
        "[[forward]]\nname = \"udp\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:5353\"\nbackend = \"203.0.113.20:5353\"\n\
         [conntrack]\nmax_entries = 64\nudp_timeout = 3\ngc_interval = 1\n",
    );
    let d = Daemon::start(&chain.router, &chain.tag, &cfg).unwrap();
    sockets::udp_echo(&chain.server, addr(SERVER_ADDR, 5353)).unwrap();
    let answered = chain
        .client
        .run(|| {
            // 40 flows for a table of 64 entries (32 connections).
            let socks: Vec<UdpSocket> = (0..40).map(|_| UdpSocket::bind("0.0.0.0:0").unwrap()).collect();
            let mut answered = Vec::new();
            for s in &socks {
                s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                s.send_to(b"hi", (ROUTER_CLIENT_ADDR, 5353)).unwrap();
                let mut b = [0u8; 16];
                answered.push(s.recv_from(&mut b).is_ok());
            }
            // The flows that got in keep working while the table is full.
            let first = socks.iter().zip(&answered).find(|(_, a)| **a).map(|(s, _)| s).unwrap();
            first.send_to(b"again", (ROUTER_CLIENT_ADDR, 5353)).unwrap();
            let mut b = [0u8; 16];
            assert!(first.recv_from(&mut b).is_ok(), "an established flow works in a full table");
            answered.iter().filter(|a| **a).count()
        })
        .unwrap();
    assert_eq!(answered, 32, "exactly the table's worth of flows got in");
    let full = d.stats().unwrap()["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "conntrack_full")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(full, 8, "refused new flows are counted");
    let status: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status["conntrack_connections"], 32);

    wait_for("idle flows to expire", Duration::from_secs(20), || {
        let s: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
        s["conntrack_entries"] == 0
    });
    assert!(d.log().contains("idle connections expired"));
    // Room again for new flows.
    udp_exchange(&chain);
}

/// One datagram through the UDP forward on :5353 from a new client socket, answered.
fn udp_exchange(chain: &Chain) {
    chain
        .client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send_to(b"new", (ROUTER_CLIENT_ADDR, 5353)).unwrap();
            let mut b = [0u8; 16];
            assert!(s.recv_from(&mut b).is_ok());
        })
        .unwrap();
}

/// The expiry follows the applied config: a reload that shortens a timeout ends the
/// connections it now covers (the pass reads the timeouts anew each time).
#[test]
fn a_reload_changes_the_timeouts_of_the_expiry() {
    let chain = Chain::new().unwrap();
    let forward =
        "[[forward]]\nname = \"udp\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:5353\"\nbackend = \"203.0.113.20:5353\"\n";
    let d = Daemon::start(
        &chain.router,
        &chain.tag,
        &config(&format!("{forward}[conntrack]\nudp_timeout = 3600\ngc_interval = 1\n")),
    )
    .unwrap();
    sockets::udp_echo(&chain.server, addr(SERVER_ADDR, 5353)).unwrap();
    udp_exchange(&chain);
    let connections = |d: &Daemon| {
        let s: serde_json::Value = serde_json::from_str(&d.cli(&["status", "--json"]).unwrap()).unwrap();
        s["conntrack_connections"].as_u64().unwrap()
    };
    assert_eq!(connections(&d), 1);
    d.replace_config(&config(&format!("{forward}[conntrack]\nudp_timeout = 1\ngc_interval = 1\n"))).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    // 1 s of timeout and 3 s of last-seen slack, then the next pass.
    wait_for("the reloaded timeout to end the connection", Duration::from_secs(20), || connections(&d) == 0);
}

/// `--on-exit keep`: SIGTERM leaves forwarding running without a daemon; the next one
/// adopts it; `forwarder detach` removes everything.
#[test]
fn on_exit_keep_then_adopt_then_detach() {
    let chain = Chain::new().unwrap();
    let mut d = Daemon::start_with(&chain.router, &chain.tag, &config(""), &["--on-exit", "keep"]).unwrap();
    echo_server(&chain.server, 3197);
    let mut c = open(&chain.client, 3306).unwrap();
    c.ping(b"one").unwrap();
    assert!(d.stop().unwrap().success());
    c.ping(b"no daemon, still forwarding").unwrap();
    open(&chain.client, 3306).unwrap().ping(b"new flows too").unwrap();
    d.launch().unwrap();
    c.ping(b"adopted").unwrap();
    assert!(d.stop().unwrap().success());
    assert!(d.pin_path.exists());
    d.cli(&["detach"]).unwrap();
    assert!(!d.pin_path.exists(), "detach removed the pins");
    let link = chain.router.ip(&["-d", "link", "show", "dev", "rc"]).unwrap();
    assert!(!link.contains("prog/xdp"), "XDP detached: {link}");
    assert!(c.ping(b"gone").is_err(), "forwarding stopped");
}

/// Removes a pin directory on every exit path (the test may fail before an instance owns it).
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        forwarder::pins::remove(&self.0);
    }
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

/// An upgrade in place keeps tracked connections: the connection table an earlier version
/// pinned (`FWD_CT`, 56-byte values before the next-hop cache; `FWD_CT_V2`, 80-byte values
/// with state bits; `FWD_CT_V3`, 88-byte values without the creation time) is carried into
/// `FWD_CT_V4`, each connection in the netfilter state its bits say, and its pin removed. The old tables are made here with bpftool, as the old
/// versions made them.
#[test]
fn connections_pinned_by_an_older_version_are_migrated() {
    use forwarder_common::{CtValueV1, CtValueV2, FWD_CT, FWD_CT_V2, FWD_CT_V3, V2_ANSWERED};
    // The V1 layout is V2's first 40 bytes, padding, then last_seen_ns at 48.
    let v1 = |v: &CtValueV2| {
        let mut o = CtValueV1 {
            new_src_addr: v.new_src_addr,
            new_dst_addr: v.new_dst_addr,
            new_src_port_be: v.new_src_port_be,
            new_dst_port_be: v.new_dst_port_be,
            forward_id: v.forward_id,
            direction: v.direction,
            state: v.state,
            last_seen_ns: v.last_seen_ns,
            ..CtValueV1::default()
        };
        o._pad = [0; 6];
        as_bytes(&o)
    };
    migrate_from(FWD_CT, 56, &v1);
    migrate_from(FWD_CT_V2, 80, &|v: &CtValueV2| as_bytes(v));
    // V3 held the connection's state in both entries already.
    migrate_from(FWD_CT_V3, 88, &|v: &CtValueV2| as_bytes(&v.upgrade(true, 1 | V2_ANSWERED)));
}

fn as_bytes<T>(v: &T) -> Vec<u8> {
    // SAFETY: repr(C) map types without padding; read as plain bytes.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
}

/// An old table `name` (values of `value_size` bytes, written by `encode`) holding one
/// established TCP connection (the original entry saw the SYN, the reply entry answered)
/// becomes one ESTABLISHED, assured connection in the current table, without a cached next
/// hop; the old pin goes.
fn migrate_from(name: &str, value_size: usize, encode: &dyn Fn(&forwarder_common::CtValueV2) -> Vec<u8>) {
    use forwarder_common::{
        CT_DIR_REPLY, CtKey, CtValueV2, FWD_CT_V4, V2_ANSWERED,
        conntrack::{CT_ASSURED, TCP_ESTABLISHED},
    };
    let pin = PinDir(std::path::PathBuf::from(format!("/sys/fs/bpf/fwt-{}", forwarder_tests::unique_tag())));
    std::fs::create_dir_all(&pin.0).unwrap();
    let old_path = pin.0.join(name);
    let bpftool = |args: &[String]| {
        let out = std::process::Command::new("bpftool").args(args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let s = |v: &str| v.to_string();
    let path = old_path.display().to_string();
    bpftool(
        &[s("map"), s("create"), path.clone(), s("type"), s("hash"), s("key"), s("40"), s("value")]
            .into_iter()
            .chain([value_size.to_string(), s("entries"), s("1024"), s("name"), s(name)])
            .collect::<Vec<_>>(),
    );
    let v4 = |a: [u8; 4]| {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    };
    let (client, listen, snat, backend) =
        (v4([192, 0, 2, 2]), v4([192, 0, 2, 1]), v4([203, 0, 113, 1]), v4([203, 0, 113, 20]));
    let orig_key = CtKey {
        src_addr: client,
        dst_addr: listen,
        src_port_be: 40000u16.to_be(),
        dst_port_be: 3306u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    };
    let orig = CtValueV2 {
        new_src_addr: snat,
        new_dst_addr: backend,
        new_src_port_be: 20001u16.to_be(),
        new_dst_port_be: 3197u16.to_be(),
        forward_id: 7,
        state: 1,
        last_seen_ns: 123_456_789,
        ..CtValueV2::default()
    };
    let reply_key = CtKey {
        src_addr: backend,
        dst_addr: snat,
        src_port_be: 3197u16.to_be(),
        dst_port_be: 20001u16.to_be(),
        ..orig_key
    };
    let reply = CtValueV2 {
        new_src_addr: listen,
        new_dst_addr: client,
        new_src_port_be: 3306u16.to_be(),
        new_dst_port_be: 40000u16.to_be(),
        direction: CT_DIR_REPLY,
        state: 1 | V2_ANSWERED,
        ..orig
    };
    for (k, v) in [(orig_key, orig), (reply_key, reply)] {
        bpftool(
            &[s("map"), s("update"), s("pinned"), path.clone(), s("key")]
                .into_iter()
                .chain(hex(&as_bytes(&k)))
                .chain([s("value")])
                .chain(hex(&encode(&v)))
                .collect::<Vec<_>>(),
        );
    }

    let inst = forwarder::loader::Instance::load(&forwarder::loader::LoadOptions::default(), &pin.0).unwrap();
    let mut table = inst.state().unwrap().conntrack().unwrap();
    table.sort_by_key(|(_, v)| v.direction);
    assert_eq!(table.len(), 2, "{name}: both entries");
    for ((k, v), (old_k, old_v)) in table.iter().zip([(orig_key, orig), (reply_key, reply)]) {
        assert_eq!(*k, old_k, "{name}");
        assert_eq!(
            (v.new_src_addr, v.new_dst_addr, v.new_src_port_be, v.new_dst_port_be, v.forward_id, v.direction),
            (old_v.new_src_addr, old_v.new_dst_addr, old_v.new_src_port_be, old_v.new_dst_port_be, 7, old_v.direction),
            "{name}: the same translation"
        );
        assert_eq!((v.state, v.flags & CT_ASSURED), (TCP_ESTABLISHED, CT_ASSURED), "{name}: established, assured");
        assert_eq!((v.last_seen_ns, v.nh_ifindex), (123_456_789, 0), "{name}: no cached next hop");
        assert_eq!(v.created_ns, 0, "{name}: age unknown");
    }
    assert!(!old_path.exists(), "{name}: old table unpinned");
    assert!(pin.0.join(FWD_CT_V4).exists());
    drop(inst);
}

/// A first start that fails while loading (here: a connection table the kernel refuses to
/// create) leaves no pinned maps behind.
#[test]
fn a_failed_first_load_leaves_no_pins() {
    let pin = PinDir(std::path::PathBuf::from(format!("/sys/fs/bpf/fwt-{}", forwarder_tests::unique_tag())));
    let opts = forwarder::loader::LoadOptions { ct_entries: 0, ..forwarder::loader::LoadOptions::default() };
    let err = forwarder::loader::Instance::load(&opts, &pin.0).err().expect("a table of 0 entries is refused");
    let left: Vec<_> = std::fs::read_dir(&pin.0).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "pins left after {err}: {left:?}");
}

/// Forwards pinned by a version with one backend per forward (`FWD_META`, `FWD_RULES`) are
/// carried over: the forward keeps its id, name and rule, its backend becomes slot 0 of
/// `FWD_BACKENDS`, the rule goes on matching, and the old pins go.
#[test]
fn forwards_pinned_by_a_version_before_several_backends_are_migrated() {
    use forwarder_common::{FWD_FLAG_INGRESS, FWD_META, FWD_RULES, FwdKey, FwdMetaV1, FwdValue, FwdValueV1};
    let pin = PinDir(std::path::PathBuf::from(format!("/sys/fs/bpf/fwt-{}", forwarder_tests::unique_tag())));
    std::fs::create_dir_all(&pin.0).unwrap();
    let bpftool = |args: Vec<String>| {
        let out = std::process::Command::new("bpftool").args(&args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let s = |v: &str| v.to_string();
    let create = |name: &str, kind: &str, key: usize, value: usize| {
        let path = pin.0.join(name).display().to_string();
        bpftool(
            vec![s("map"), s("create"), path, s("type"), s(kind), s("key"), key.to_string(), s("value")]
                .into_iter()
                .chain([value.to_string(), s("entries"), s("16"), s("name"), s(name)])
                .collect(),
        );
    };
    let update = |name: &str, key: &[u8], value: &[u8]| {
        let path = pin.0.join(name).display().to_string();
        bpftool(
            [s("map"), s("update"), s("pinned"), path, s("key")]
                .into_iter()
                .chain(hex(key))
                .chain([s("value")])
                .chain(hex(value))
                .collect(),
        );
    };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[192, 0, 2, 1]);
    let key = FwdKey { addr, port_be: 3306u16.to_be(), proto: 6, family: 4 };
    let mut backend_addr = [0u8; 16];
    backend_addr[..4].copy_from_slice(&[203, 0, 113, 20]);
    let old = FwdValueV1 {
        backend_addr,
        backend_port_be: 3197u16.to_be(),
        family: 4,
        snat_mode: forwarder_common::SNAT_AUTO,
        forward_id: 5,
        flags: FWD_FLAG_INGRESS,
        ..FwdValueV1::default()
    };
    let mut name = [0u8; 48];
    name[..7].copy_from_slice(b"classic");
    create(FWD_META, "array", 4, std::mem::size_of::<FwdMetaV1>());
    update(FWD_META, &5u32.to_ne_bytes(), &as_bytes(&FwdMetaV1 { name, key, value: old }));
    create(FWD_RULES, "hash", std::mem::size_of::<FwdKey>(), std::mem::size_of::<FwdValueV1>());
    update(FWD_RULES, &as_bytes(&key), &as_bytes(&old));

    let inst = forwarder::loader::Instance::load(&forwarder::loader::LoadOptions::default(), &pin.0).unwrap();
    let state = inst.state().unwrap();
    let forwards = state.forwards().unwrap();
    assert_eq!(forwards.len(), 1);
    let (id, f) = &forwards[0];
    assert_eq!((*id, f.name.as_str(), f.listen.to_string()), (5, "classic", "192.0.2.1:3306".to_string()));
    let backends: Vec<String> = f.backends.iter().map(|b| format!("{} {}", b.address, b.weight)).collect();
    assert_eq!(backends, ["203.0.113.20:3197 1"]);
    let rules: aya::maps::HashMap<_, FwdKey, FwdValue> = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
        forwarder::pins::open_map(&pin.0, forwarder_common::FWD_RULES_V2).unwrap(),
    ))
    .unwrap();
    let rule = rules.get(&key, 0).unwrap();
    assert_eq!((rule.forward_id, rule.backend_addr, rule.backend_index), (5, backend_addr, 5), "the rule goes on");
    assert!(!pin.0.join(FWD_META).exists() && !pin.0.join(FWD_RULES).exists(), "old pins removed");
    drop(inst);
}
