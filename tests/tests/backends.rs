//! Forwards with several backends, end to end: the weighted split of new connections
//! (forwarder beside iptables' round robin as the control), consistent hashing when a
//! backend goes, health checks that take a stopped backend out and bring it back, drain by
//! weight 0, and prompt refusal when no backend is up. Every client connection binds a
//! source port of its own, so the split is the same on every run.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use forwarder_tests::{
    Chain, Daemon, Netns,
    config::{forward_to_backends, router_interfaces},
    metrics::Scrape,
    sockets::serve_in,
    topo::{CLIENT_ADDR, ROUTER_CLIENT_ADDR},
    traffic, wait_for,
};

/// Backend addresses, all on the server namespace's link.
const BACKENDS: [&str; 4] = ["203.0.113.20", "203.0.113.21", "203.0.113.22", "203.0.113.23"];
const BACKEND_PORT: u16 = 80;
const LISTEN_PORT: u16 = 8080;

fn backend(i: usize) -> SocketAddr {
    SocketAddr::new(BACKENDS[i].parse().unwrap(), BACKEND_PORT)
}

fn listen() -> SocketAddr {
    SocketAddr::new(ROUTER_CLIENT_ADDR.parse().unwrap(), LISTEN_PORT)
}

/// The chain with every backend address on the server.
fn chain() -> Chain {
    let chain = Chain::new().unwrap();
    for a in &BACKENDS[1..] {
        chain.server.ip(&["addr", "add", &format!("{a}/24"), "dev", "s0"]).unwrap();
    }
    chain
}

fn config(backends: &[(usize, u32)], extra: &str) -> String {
    let list: Vec<(String, u32)> = backends.iter().map(|(i, w)| (backend(*i).to_string(), *w)).collect();
    router_interfaces("native") + &forward_to_backends("web", "tcp", listen(), &list) + extra
}

/// A backend that names itself: each connection gets the server's address on a line, then
/// its own bytes echoed until it closes. Stops taking connections when `stop` is set (the
/// listener closes: new connections are refused) and returns.
fn who_server(ns: &Netns, addr: SocketAddr) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    serve_in(
        ns,
        "who server",
        move || TcpListener::bind(addr),
        move |l: TcpListener| {
            for s in l.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = s else { break };
                std::thread::spawn(move || {
                    if s.write_all(format!("{addr}\n").as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        },
    )
    .unwrap();
    stop
}

/// Stops a [`who_server`]: the flag, then a connection that wakes its accept.
fn stop_server(ns: &Netns, addr: SocketAddr, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    let _ = ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
    wait_for("the stopped server to refuse connections", Duration::from_secs(5), || {
        ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()).unwrap()
    });
}

/// A connection from the client's `port` through the router: the backend that answered.
/// The client ends it with a reset, so neither side keeps a TIME_WAIT for its tuple.
fn who(port: u16) -> Result<String, traffic::Failed> {
    let from = SocketAddr::new(CLIENT_ADDR.parse().unwrap(), port);
    let s = traffic::connect(listen(), Some(from))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(|e| traffic::Failed::io("read", e))?;
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    Ok(line.trim().to_string())
}

/// The backend of every client port in `ports` (an error's text for a failed connection).
fn split(client: &Netns, ports: std::ops::Range<u16>) -> Vec<(u16, String)> {
    client.run(move || ports.map(|p| (p, who(p).unwrap_or_else(|e| format!("failed: {e:?}")))).collect()).unwrap()
}

fn counts(split: &[(u16, String)]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (_, b) in split {
        *out.entry(b.clone()).or_insert(0) += 1;
    }
    out
}

/// Within ±15% of 200/200/400 over 800 connections.
fn assert_weighted_split(what: &str, c: &HashMap<String, usize>) {
    for (i, want) in [(0, 200.0), (1, 200.0), (2, 400.0)] {
        let got = c.get(&backend(i).to_string()).copied().unwrap_or(0) as f64;
        assert!((got - want).abs() <= want * 0.15, "{what}: {} got {got} of 800, want {want} ±15%: {c:?}", backend(i));
    }
    assert_eq!(c.values().sum::<usize>(), 800, "{what}: every connection reached a backend: {c:?}");
}

/// Weights 1, 1, 2: 800 new connections split within ±15% of 200/200/400, each answered
/// by one backend; the per-backend counters agree. The control does the same with
/// iptables (DNAT by `statistic --mode nth`, netfilter's round robin, in the weights'
/// proportion).
#[test]
fn weights_split_new_connections_as_iptables_round_robin_does() {
    let chain = chain();
    for i in 0..3 {
        who_server(&chain.server, backend(i));
    }
    // Control: netfilter. Four turns: backend 0, 1, then 2 twice.
    let nth = |every: u32, turn: u32, to: SocketAddr| {
        format!(
            "iptables -t nat -A PREROUTING -p tcp -d {ROUTER_CLIENT_ADDR} --dport {LISTEN_PORT} -m statistic \
             --mode nth --every {every} --packet {turn} -j DNAT --to-destination {to}\n"
        )
    };
    chain
        .router
        .sh(&format!(
            "{}{}{}iptables -t nat -A PREROUTING -p tcp -d {ROUTER_CLIENT_ADDR} --dport {LISTEN_PORT} -j DNAT \
             --to-destination {}\niptables -t nat -A POSTROUTING -o rs -j MASQUERADE",
            nth(4, 0, backend(0)),
            nth(3, 0, backend(1)),
            nth(2, 0, backend(2)),
            backend(2)
        ))
        .unwrap();
    let control = split(&chain.client, 20_000..20_800);
    assert_weighted_split("iptables", &counts(&control));
    chain.router.sh("iptables -t nat -F").unwrap();

    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1), (2, 2)], "")).unwrap();
    let got = split(&chain.client, 21_000..21_800);
    let c = counts(&got);
    assert_weighted_split("forwarder", &c);
    let stats = d.stats().unwrap();
    let web = &stats["forwards"][0];
    assert_eq!(web["new_connections"], 800);
    for b in web["backends"].as_array().unwrap() {
        let address = b["address"].as_str().unwrap();
        assert_eq!(b["new_connections"].as_u64().unwrap() as usize, c[address], "{address}: {stats}");
        assert!(b["packets"].as_u64().unwrap() > 0, "{address} counts its packets");
        assert_eq!(b["state"], "up");
    }
}

/// Removing one of four backends (live, `backend del`) keeps at least 90% of the other
/// backends' assignments for the same 1,000 tuples, and none goes to the removed one.
#[test]
fn removing_one_of_four_backends_moves_only_its_connections() {
    let chain = chain();
    for i in 0..4 {
        who_server(&chain.server, backend(i));
    }
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1), (2, 1), (3, 1)], "")).unwrap();
    let before = split(&chain.client, 30_000..31_000);
    assert_eq!(counts(&before).len(), 4, "all four backends take connections: {:?}", counts(&before));
    // The same tuples again are new connections, not the old ones reopened.
    d.cli(&["conntrack", "flush"]).unwrap();
    let removed = backend(3).to_string();
    d.cli(&["backend", "del", "web", &removed]).unwrap();
    let after = split(&chain.client, 30_000..31_000);
    let stayed: Vec<bool> =
        before.iter().zip(&after).filter(|((_, b), _)| *b != removed).map(|((_, b), (_, a))| a == b).collect();
    let kept = stayed.iter().filter(|s| **s).count() as f64 / stayed.len() as f64;
    assert!(kept >= 0.90, "{:.1}% of the other backends' assignments kept", kept * 100.0);
    assert!(after.iter().all(|(_, a)| *a != removed && !a.starts_with("failed")), "{:?}", counts(&after));
}

/// A long connection to a backend: found by opening connections from fresh ports until
/// one lands on `on`.
fn long_connection_to(client: &Netns, on: SocketAddr, ports: std::ops::Range<u16>) -> TcpStream {
    let want = on.to_string();
    client
        .run(move || {
            for port in ports {
                let from = SocketAddr::new(CLIENT_ADDR.parse().unwrap(), port);
                let s = traffic::connect(listen(), Some(from)).unwrap();
                let mut line = String::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                r.read_line(&mut line).unwrap();
                if line.trim() == want {
                    return s;
                }
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            panic!("no connection landed on {want}");
        })
        .unwrap()
}

fn ping(s: &mut TcpStream, n: u32) {
    let msg = format!("ping {n}\n");
    s.write_all(msg.as_bytes()).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg.as_bytes());
}

fn backend_state(d: &Daemon, address: SocketAddr) -> String {
    let v: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
    let web = &v[0];
    let i = web["backends"].as_array().unwrap().iter().position(|b| b["address"] == address.to_string()).unwrap();
    web["backend_states"][i].as_str().unwrap().to_string()
}

/// A stopped backend is taken out within interval × fall + timeout, after which 200 of 200
/// new connections succeed on the others; it comes back after rise checks pass. A long
/// connection to another backend is untouched throughout.
#[test]
fn health_checks_take_a_stopped_backend_out_and_bring_it_back() {
    let chain = chain();
    let mut stops: Vec<Arc<AtomicBool>> = (0..3).map(|i| who_server(&chain.server, backend(i))).collect();
    let health = "\n[forward.health]\nkind = \"tcp\"\ninterval = 1\ntimeout = 0.5\nrise = 2\nfall = 2\n";
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1), (2, 1)], health)).unwrap();
    let mut long = long_connection_to(&chain.client, backend(0), 40_000..40_100);
    ping(&mut long, 0);

    stop_server(&chain.server, backend(2), &stops[2]);
    let stopped = Instant::now();
    // interval × fall + timeout, and a tick of the checker and a second of slack.
    let detection = Duration::from_millis(1000 * 2 + 500 + 50 + 1000);
    wait_for("the stopped backend to be taken out", detection, || backend_state(&d, backend(2)) == "down");
    assert!(stopped.elapsed() <= detection);
    ping(&mut long, 1);
    let during = split(&chain.client, 41_000..41_200);
    let c = counts(&during);
    assert_eq!(c.get(&backend(2).to_string()), None, "no new connection to the stopped backend: {c:?}");
    assert_eq!(c.values().sum::<usize>(), 200, "200 of 200 succeed: {c:?}");
    let stats = d.stats().unwrap();
    assert_eq!(stats["forwards"][0]["backends"][2]["up"], false);
    let stopped_backend = backend(2).to_string();
    let up =
        |scrape: &Scrape| scrape.value("forwarder_backend_up", &[("forward", "web"), ("backend", &stopped_backend)]);
    assert_eq!(up(&Scrape::of(&chain.router)), 0.0, "exported as down");
    ping(&mut long, 2);

    stops[2] = who_server(&chain.server, backend(2));
    wait_for("the backend to come back after rise checks", Duration::from_secs(5), || {
        backend_state(&d, backend(2)) == "up"
    });
    let back = counts(&split(&chain.client, 42_000..42_200));
    assert!(back.get(&backend(2).to_string()).copied().unwrap_or(0) > 30, "it takes its share again: {back:?}");
    ping(&mut long, 3);
    assert_eq!(up(&Scrape::of(&chain.router)), 1.0, "exported as up again");
    assert!(d.log().contains("backend down"), "the transitions are logged");
}

/// Weight 0 through `backend set-weight`: the backend's established connection goes on,
/// no new connection goes to it.
#[test]
fn set_weight_zero_drains_a_backend() {
    let chain = chain();
    for i in 0..2 {
        who_server(&chain.server, backend(i));
    }
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1)], "")).unwrap();
    let mut long = long_connection_to(&chain.client, backend(1), 50_000..50_100);
    ping(&mut long, 0);
    // A closed connection to the backend about to drain, whose tuple a client reuses later.
    let closed = split(&chain.client, 50_200..50_300).into_iter().find(|(_, b)| *b == backend(1).to_string());
    let (reused_port, _) = closed.expect("one of 100 connections on backend 1");
    d.cli(&["backend", "set-weight", "web", &backend(1).to_string(), "0"]).unwrap();
    let again = split(&chain.client, reused_port..reused_port + 1);
    assert_eq!(again[0].1, backend(0).to_string(), "a reused tuple is a new connection, which chooses again");
    assert_eq!(backend_state(&d, backend(1)), "drained");
    let c = counts(&split(&chain.client, 51_000..51_100));
    assert_eq!(c.get(&backend(0).to_string()), Some(&100), "every new connection on the other backend: {c:?}");
    for n in 1..20 {
        ping(&mut long, n);
    }
    let stats = d.stats().unwrap();
    let drained = &stats["forwards"][0]["backends"][1];
    assert_eq!((drained["weight"].as_u64(), drained["state"].as_str()), (Some(0), Some("drained")));
    assert_eq!(drained["established_connections"], 1, "{stats}");
    // Weights below 0 are refused and change nothing.
    assert!(d.cli(&["backend", "set-weight", "web", &backend(1).to_string(), "-1"]).is_err());
    assert_eq!(backend_state(&d, backend(1)), "drained");
}

/// With every backend down a new connection is refused at once (port unreachable:
/// ECONNREFUSED, not a timeout) and counted as `no_backend`.
#[test]
fn no_backend_up_refuses_new_connections_promptly() {
    let chain = chain();
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|i| who_server(&chain.server, backend(i))).collect();
    let health = "\n[forward.health]\nkind = \"tcp\"\ninterval = 0.5\ntimeout = 0.2\nrise = 1\nfall = 1\n";
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1)], health)).unwrap();
    assert!(split(&chain.client, 60_000..60_010).iter().all(|(_, b)| !b.starts_with("failed")));
    for (i, stop) in stops.iter().enumerate() {
        stop_server(&chain.server, backend(i), stop);
    }
    wait_for("both backends down", Duration::from_secs(5), || {
        backend_state(&d, backend(0)) == "down" && backend_state(&d, backend(1)) == "down"
    });
    let started = Instant::now();
    let refused = chain.client.run(|| who(60_100)).unwrap();
    let took = started.elapsed();
    match refused {
        Err(traffic::Failed { kind: traffic::Failure::Refused, .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(took < Duration::from_millis(900), "refused at once, not after a retransmission: {took:?}");
    let stats = d.stats().unwrap();
    let no_backend = stats["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "no_backend").unwrap();
    assert!(no_backend["packets"].as_u64().unwrap() >= 1, "{no_backend}");
}

/// A reload that changes weights and adds a backend applies as a diff: the forward keeps
/// its id, established connections keep their backend and pass, even with
/// `on_forward_removed = "flush"`; new connections follow the new weights.
#[test]
fn reload_changes_backends_without_touching_established_connections() {
    let chain = chain();
    for i in 0..3 {
        who_server(&chain.server, backend(i));
    }
    let flush = "\n[conntrack]\non_forward_removed = \"flush\"\n";
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1)], flush)).unwrap();
    let id = |d: &Daemon| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
        v[0]["id"].as_u64().unwrap()
    };
    let before = id(&d);
    let mut long = long_connection_to(&chain.client, backend(1), 52_000..52_100);
    ping(&mut long, 0);
    d.replace_config(&config(&[(0, 1), (1, 0), (2, 1)], flush)).unwrap();
    wait_for("the reload", Duration::from_secs(5), || backend_state(&d, backend(1)) == "drained");
    assert_eq!(id(&d), before, "the forward keeps its id");
    for n in 1..10 {
        ping(&mut long, n);
    }
    let c = counts(&split(&chain.client, 53_000..53_200));
    assert_eq!(c.get(&backend(1).to_string()), None, "{c:?}");
    assert_eq!(c.values().sum::<usize>(), 200, "{c:?}");
    assert!(c.get(&backend(2).to_string()).copied().unwrap_or(0) > 50, "the new backend takes its share: {c:?}");
    assert!(d.log().contains("updated"), "the reload reports the forward as updated");
}

/// Local programs (the cgroup hooks) choose among the backends by the same table: 40
/// connections from the router itself spread over the backends, every one answered, and
/// counted per backend.
#[test]
fn local_programs_choose_among_the_backends() {
    let chain = chain();
    for i in 0..3 {
        who_server(&chain.server, backend(i));
    }
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1), (1, 1), (2, 2)], "")).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for n in 0..40 {
        let out = d
            .cgroup
            .command(&chain.router, env!("CARGO_BIN_EXE_fwt-probe"))
            .unwrap()
            .args(["tcp", &listen().to_string(), &format!("hello {n}")])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let reply = r["reply"].as_str().unwrap_or_else(|| panic!("{r}"));
        let (who, echoed) = reply.split_once('\n').unwrap();
        assert_eq!(echoed, format!("hello {n}"));
        assert_eq!(r["peer"], listen().to_string(), "the program sees what it dialled");
        *seen.entry(who.to_string()).or_insert(0) += 1;
    }
    assert!(seen.len() >= 2, "the connections spread over the backends: {seen:?}");
    let stats = d.stats().unwrap();
    for b in stats["forwards"][0]["backends"].as_array().unwrap() {
        let address = b["address"].as_str().unwrap();
        let want = seen.get(address).copied().unwrap_or(0) as u64;
        assert_eq!(b["local_connections"].as_u64(), Some(want), "{address}: {stats}");
    }
}

/// A UDP backend that names itself in every answer; stops (its socket closes, so datagrams
/// get port unreachable) when `stop` is set.
fn who_udp_server(ns: &Netns, addr: SocketAddr) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    serve_in(
        ns,
        "UDP who server",
        move || forwarder_tests::sockets::udp_bound(addr, Duration::from_millis(50)),
        move |s: std::net::UdpSocket| {
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::SeqCst) {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(addr.to_string().as_bytes(), from);
                }
            }
        },
    )
    .unwrap();
    stop
}

/// One datagram from the client's `port` through the router: the backend that answered.
fn who_udp(client: &Netns, port: u16) -> Option<String> {
    client
        .run(move || {
            let s = forwarder_tests::sockets::udp_bound((CLIENT_ADDR, port), Duration::from_secs(2)).ok()?;
            s.send_to(b"who", listen()).ok()?;
            let mut buf = [0u8; 100];
            let n = s.recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap()
}

/// UDP health checks: a datagram must get an answer. A stopped UDP backend (port
/// unreachable) is taken out after `fall` checks and new flows go to the other; it comes
/// back after `rise`.
#[test]
fn udp_health_checks_follow_a_stopped_backend() {
    let chain = chain();
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|i| who_udp_server(&chain.server, backend(i))).collect();
    let list: Vec<(String, u32)> = (0..2).map(|i| (backend(i).to_string(), 1)).collect();
    let health = "\n[forward.health]\nkind = \"udp\"\ninterval = 0.5\ntimeout = 0.3\nrise = 1\nfall = 2\n";
    let text = router_interfaces("native") + &forward_to_backends("dns", "udp", listen(), &list) + health;
    let d = Daemon::start(&chain.router, &chain.tag, &text).unwrap();
    let state = |d: &Daemon| {
        let v: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
        v[0]["backend_states"][1].as_str().unwrap().to_string()
    };
    assert_eq!(state(&d), "up");
    stops[1].store(true, Ordering::SeqCst);
    wait_for("the stopped UDP backend to be taken out", Duration::from_secs(4), || state(&d) == "down");
    let answers: Vec<Option<String>> = (0..50).map(|i| who_udp(&chain.client, 54_000 + i)).collect();
    assert!(answers.iter().all(|a| a.as_deref() == Some(backend(0).to_string().as_str())), "{answers:?}");
    who_udp_server(&chain.server, backend(1));
    wait_for("the UDP backend to come back", Duration::from_secs(4), || state(&d) == "up");
    let answers: Vec<Option<String>> = (0..50).map(|i| who_udp(&chain.client, 55_000 + i)).collect();
    assert!(answers.iter().all(Option::is_some), "{answers:?}");
    assert!(answers.iter().any(|a| a.as_deref() == Some(backend(1).to_string().as_str())), "{answers:?}");
}

/// The CLI's edits of backends: `forward add` with several `--backend` and `--weight`,
/// `backend add`, and refusals that change nothing.
#[test]
fn forward_add_and_backend_edits_from_the_cli() {
    let chain = chain();
    for i in 0..3 {
        who_server(&chain.server, backend(i));
    }
    let d = Daemon::start(&chain.router, &chain.tag, &config(&[(0, 1)], "")).unwrap();
    let api = SocketAddr::new(ROUTER_CLIENT_ADDR.parse().unwrap(), 9090);
    let (b0, b1, b2) = (backend(0).to_string(), backend(1).to_string(), backend(2).to_string());
    d.cli(&[
        "forward",
        "add",
        "--name",
        "api",
        "--protocol",
        "tcp",
        "--listen",
        &api.to_string(),
        "--backend",
        &b0,
        "--backend",
        &b1,
        "--weight",
        "3",
        "--weight",
        "1",
    ])
    .unwrap();
    d.cli(&["backend", "add", "api", &b2, "--weight", "2"]).unwrap();
    let backends_of = |d: &Daemon| -> Vec<(String, u64)> {
        let v: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
        let api = v.as_array().unwrap().iter().find(|f| f["name"] == "api").unwrap().clone();
        api["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["address"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap()))
            .collect()
    };
    let want = vec![(b0.clone(), 3), (b1.clone(), 1), (b2.clone(), 2)];
    assert_eq!(backends_of(&d), want);
    // Refused, exit code 3, nothing changed: a duplicate, an unknown backend, an unknown
    // forward, a weight below 0, and the last backend of weight above 0 drained.
    for args in [
        vec!["backend", "add", "api", b1.as_str()],
        vec!["backend", "del", "api", "203.0.113.99:80"],
        vec!["backend", "set-weight", "nope", b1.as_str(), "1"],
        vec!["backend", "add", "api", "203.0.113.98:80", "--weight", "-2"],
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", chain.router.path()))
            .arg("--")
            .arg(forwarder_tests::daemon::forwarder_bin())
            .args(&args)
            .arg("--pin-path")
            .arg(&d.pin_path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    d.cli(&["backend", "set-weight", "web", &b0, "0"]).expect_err("the only backend of weight above 0");
    assert_eq!(backends_of(&d), want);
    // The forward works: its connections spread over the three.
    let api_split = chain
        .client
        .run(move || {
            (56_000..56_060u16)
                .map(|p| {
                    let s = traffic::connect(api, Some(SocketAddr::new(CLIENT_ADDR.parse().unwrap(), p))).unwrap();
                    let mut line = String::new();
                    BufReader::new(&s).read_line(&mut line).unwrap();
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    line.trim().to_string()
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let c = counts(&api_split.into_iter().map(|b| (0, b)).collect::<Vec<_>>());
    assert_eq!(c.len(), 3, "{c:?}");
}
