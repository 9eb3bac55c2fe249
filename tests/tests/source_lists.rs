//! Source allow/deny lists end to end, differential: the client has three addresses of
//! each family, one the lists allow, one the deny list refuses though the allow list takes
//! it (deny wins), one outside the allow list. First with iptables/ip6tables as the
//! control (DNAT + MASQUERADE, the refused sources dropped in the filter table's FORWARD
//! chain, as `-s` rules close a port forward), then with forwarder in XDP native and
//! TC-only modes; the client's sockets see the same in every run: the allowed source
//! connects and exchanges data, the refused ones get no answer at all (a drop, not a
//! reset). With forwarder, the refused SYNs are counted as `source_denied`, globally and
//! per forward.
//!
//! ```text
//! client 198.51.100.10 .66 .130 | 2001:db8:c::10 ::66 ::1:10 ── rc 198.51.100.1 2001:db8:c::1
//!   router ── rs 203.0.113.1 2001:db8:5::1 ── server 203.0.113.20 2001:db8:5::20
//! ```

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon,
    config::{forward, router_interfaces},
    netns::run_ok,
    sockets::tcp_echo,
};

const LISTEN_PORT: u16 = 3306;
const BACKEND_PORT: u16 = 3197;
const ROUTER_V4: &str = "198.51.100.1";
const ROUTER_V6: &str = "2001:db8:c::1";
const SERVER_V6: &str = "2001:db8:5::20";
const ALLOW_V4: &str = "198.51.100.0/25";
const ALLOW_V6: &str = "2001:db8:c::/112";
/// (source, allowed): in the allow list; in it but denied; outside it.
const SOURCES_V4: [(&str, bool); 3] = [("198.51.100.10", true), ("198.51.100.66", false), ("198.51.100.130", false)];
const SOURCES_V6: [(&str, bool); 3] =
    [("2001:db8:c::10", true), ("2001:db8:c::66", false), ("2001:db8:c::1:10", false)];
const DENY_V4: &str = "198.51.100.66";
const DENY_V6: &str = "2001:db8:c::66";
/// How long a refused connect waits for an answer that never comes (the SYN and its first
/// retransmission).
const REFUSED_WAIT: Duration = Duration::from_millis(2500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Iptables,
    Forwarder(&'static str),
}

/// Client addresses and the IPv6 legs the shared [`Chain`] does not have.
fn sandbox() -> Chain {
    let chain = Chain::new().unwrap();
    let (client, router, server) = (&chain.client, &chain.router, &chain.server);
    router.ip(&["addr", "add", &format!("{ROUTER_V4}/24"), "dev", "rc"]).unwrap();
    for (source, _) in SOURCES_V4 {
        client.ip(&["addr", "add", &format!("{source}/24"), "dev", "c0"]).unwrap();
    }
    for (ns, dev, addr) in
        [(router, "rc", "2001:db8:c::1/64"), (router, "rs", "2001:db8:5::1/64"), (server, "s0", "2001:db8:5::20/64")]
    {
        ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]).unwrap();
    }
    for (source, _) in SOURCES_V6 {
        client.ip(&["addr", "add", &format!("{source}/64"), "dev", "c0", "nodad"]).unwrap();
    }
    router.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    chain
}

fn forwarder_config(xdp: &str) -> String {
    router_interfaces(xdp)
        + &forward("db4", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("203.0.113.20:{BACKEND_PORT}"))
        + &format!("allow = [\"{ALLOW_V4}\"]\ndeny = [\"{DENY_V4}\"]\n")
        + &forward("db6", "tcp", format!("[::]:{LISTEN_PORT}"), format!("[{SERVER_V6}]:{BACKEND_PORT}"))
        + &format!("allow = [\"{ALLOW_V6}\"]\ndeny = [\"{DENY_V6}\"]\n")
}

/// The control's rules, in the router's namespace: the same forward, the same lists.
fn iptables_rules(chain: &Chain) {
    for (tool, backend, allow, deny) in [
        ("iptables", format!("203.0.113.20:{BACKEND_PORT}"), ALLOW_V4, DENY_V4),
        ("ip6tables", format!("[{SERVER_V6}]:{BACKEND_PORT}"), ALLOW_V6, DENY_V6),
    ] {
        for rule in [
            format!("-t nat -A PREROUTING -i rc -p tcp --dport {LISTEN_PORT} -j DNAT --to-destination {backend}"),
            "-t nat -A POSTROUTING -o rs -j MASQUERADE".to_string(),
            format!("-A FORWARD -i rc -p tcp --dport {BACKEND_PORT} -s {deny} -j DROP"),
            format!("-A FORWARD -i rc -p tcp --dport {BACKEND_PORT} ! -s {allow} -j DROP"),
        ] {
            run_ok(chain.router.cmd(tool).args(rule.split(' '))).unwrap();
        }
    }
}

/// What the client's socket saw connecting from `source` to `to`: Ok after an echoed
/// exchange, or the connect's error kind.
fn attempt(source: IpAddr, to: SocketAddr) -> Result<(), ErrorKind> {
    let domain = if to.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(source, 0).into()).unwrap();
    s.connect_timeout(&to.into(), REFUSED_WAIT).map_err(|e| e.kind())?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg = format!("hello from {source}");
    s.write_all(msg.as_bytes()).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg.as_bytes(), "echo through the forward");
    Ok(())
}

/// Every source of both families connects at once (a refused one waits out
/// [`REFUSED_WAIT`]); returns (source, outcome) in [`SOURCES_V4`], [`SOURCES_V6`] order.
fn attempts(chain: &Chain) -> Vec<(String, Result<(), ErrorKind>)> {
    chain
        .client
        .run(|| {
            std::thread::scope(|scope| {
                let tries: Vec<_> = SOURCES_V4
                    .iter()
                    .map(|(s, _)| (*s, SocketAddr::new(ROUTER_V4.parse().unwrap(), LISTEN_PORT)))
                    .chain(
                        SOURCES_V6.iter().map(|(s, _)| (*s, SocketAddr::new(ROUTER_V6.parse().unwrap(), LISTEN_PORT))),
                    )
                    .map(|(source, to)| (source, scope.spawn(move || attempt(source.parse().unwrap(), to))))
                    .collect();
                tries.into_iter().map(|(source, h)| (source.to_string(), h.join().unwrap())).collect()
            })
        })
        .unwrap()
}

fn run(via: Via) {
    let chain = sandbox();
    let daemon = match via {
        Via::Iptables => {
            iptables_rules(&chain);
            None
        }
        Via::Forwarder(xdp) => Some(Daemon::start(&chain.router, &chain.tag, &forwarder_config(xdp)).unwrap()),
    };
    let peers = tcp_echo(&chain.server, SocketAddr::new("::".parse().unwrap(), BACKEND_PORT)).unwrap();
    let outcomes = attempts(&chain);
    for ((source, allowed), (seen, outcome)) in SOURCES_V4.iter().chain(&SOURCES_V6).zip(&outcomes) {
        assert_eq!(source, seen);
        if *allowed {
            assert_eq!(*outcome, Ok(()), "{via:?}: {source} is allowed");
        } else {
            // Dropped: no reset, no ICMP error, so the connect runs out of time.
            assert_eq!(*outcome, Err(ErrorKind::TimedOut), "{via:?}: {source} is refused");
        }
    }
    let seen: Vec<SocketAddr> = peers.try_iter().collect();
    assert_eq!(seen.len(), 2, "{via:?}: only the allowed sources reached the backend: {seen:?}");

    let Some(d) = daemon else { return };
    let stats = d.stats().unwrap();
    let global = stats["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "source_denied").unwrap();
    assert_eq!(global["kind"], "dropped", "{global}");
    let mut per_forward = 0;
    for f in stats["forwards"].as_array().unwrap() {
        let denied = f["source_denied"].as_u64().unwrap();
        // Two refused sources per family, each with at least its first SYN.
        assert!(denied >= 2, "{}: {f}", f["name"]);
        assert_eq!(f["new_connections"], 1, "only the allowed source's connection: {f}");
        per_forward += denied;
    }
    assert_eq!(global["packets"].as_u64().unwrap(), per_forward, "{stats}");
    let list: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
    assert_eq!(list[0]["allow"], serde_json::json!([ALLOW_V4]), "{list}");
    assert_eq!(list[0]["deny"], serde_json::json!([format!("{DENY_V4}/32")]), "{list}");
    assert_eq!(list[1]["deny"], serde_json::json!([format!("{DENY_V6}/128")]), "{list}");
}

#[test]
fn control_iptables_filters_sources() {
    run(Via::Iptables);
}

#[test]
fn forwarder_xdp_native_filters_sources() {
    run(Via::Forwarder("native"));
}

#[test]
fn forwarder_tc_only_filters_sources() {
    run(Via::Forwarder("off"));
}

/// Live edits: `forward add --allow/--deny` takes effect for new connections, `forward
/// list` shows the lists, and a reload that drops the lists lets everyone in again.
#[test]
fn lists_of_live_edits_and_reloads() {
    let chain = sandbox();
    let d = Daemon::start(&chain.router, &chain.tag, &router_interfaces("native")).unwrap();
    let _peers = tcp_echo(&chain.server, SocketAddr::new("::".parse().unwrap(), BACKEND_PORT)).unwrap();
    let backend = format!("203.0.113.20:{BACKEND_PORT}");
    let listen = format!("0.0.0.0:{LISTEN_PORT}");
    let add = ["forward", "add", "--name", "db", "--protocol", "tcp", "--listen", &listen, "--backend", &backend];
    d.cli(&[&add[..], &["--allow", ALLOW_V4, "--deny", DENY_V4]].concat()).unwrap();
    let text = d.cli(&["forward", "list"]).unwrap();
    assert!(text.contains(&format!("allow {ALLOW_V4} deny {DENY_V4}/32")), "{text}");
    let to = SocketAddr::new(ROUTER_V4.parse().unwrap(), LISTEN_PORT);
    let try_from = |source: &'static str| chain.client.run(move || attempt(source.parse().unwrap(), to)).unwrap();
    assert_eq!(try_from("198.51.100.10"), Ok(()));
    assert_eq!(try_from(DENY_V4), Err(ErrorKind::TimedOut));
    let denied = d.stats().unwrap()["forwards"][0]["source_denied"].as_u64().unwrap();
    assert!(denied >= 1, "counted per forward");

    // A bad entry is refused naming the flag; nothing changes.
    let out = d.cli(&[&add[..], &["--allow", "198.51.100.0/33"]].concat());
    assert!(out.is_err(), "{out:?}");

    // The config's own forward without lists replaces the edit: every source again.
    d.replace_config(&(router_interfaces("native") + &forward("db", "tcp", &listen, &backend))).unwrap();
    forwarder_tests::wait_for("the reload without lists", Duration::from_secs(30), || {
        let list: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
        list[0].get("allow").is_none() && list[0].get("deny").is_none() && list[0]["name"] == "db"
    });
    assert_eq!(try_from(DENY_V4), Ok(()));
}

/// Established connections are not checked again: a reload that denies a connected source
/// leaves its connection alone with `drain` (the default), and with `flush` removes it at
/// once (its next segment meets no rewrite and is reset by the router's stack), while an
/// allowed source's connection of the same forward goes on in both.
fn reload_denying_a_connected_source(policy: &str) {
    let chain = sandbox();
    let base = router_interfaces("native")
        + &format!("\n[conntrack]\non_forward_removed = \"{policy}\"\n")
        + &forward("db", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), format!("203.0.113.20:{BACKEND_PORT}"));
    let d = Daemon::start(&chain.router, &chain.tag, &base).unwrap();
    let _peers = tcp_echo(&chain.server, SocketAddr::new("::".parse().unwrap(), BACKEND_PORT)).unwrap();
    let to = SocketAddr::new(ROUTER_V4.parse().unwrap(), LISTEN_PORT);
    let open = |source: &'static str| {
        chain
            .client
            .run(move || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.bind(&SocketAddr::new(source.parse().unwrap(), 0).into()).unwrap();
                s.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
                let s: TcpStream = s.into();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                forwarder_tests::sockets::EchoConn(s)
            })
            .unwrap()
    };
    let (mut kept, mut denied) = (open("198.51.100.10"), open(DENY_V4));
    kept.ping(b"before").unwrap();
    denied.ping(b"before").unwrap();
    d.replace_config(&format!("{base}deny = [\"{DENY_V4}\"]\n")).unwrap();
    forwarder_tests::wait_for("the reload with the deny list", Duration::from_secs(30), || {
        let list: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
        list[0]["deny"] == serde_json::json!([format!("{DENY_V4}/32")])
    });
    kept.ping(b"after").unwrap();
    if policy == "drain" {
        denied.ping(b"after").expect("an established connection is not checked again");
    } else {
        assert!(denied.ping(b"after").is_err(), "flushed: the refused source's connection is gone");
    }
    assert_eq!(try_new(&chain, DENY_V4, to), Err(ErrorKind::TimedOut), "new connections are refused");
}

fn try_new(chain: &Chain, source: &'static str, to: SocketAddr) -> Result<(), ErrorKind> {
    chain.client.run(move || attempt(source.parse().unwrap(), to)).unwrap()
}

#[test]
fn drain_keeps_a_denied_sources_connection() {
    reload_denying_a_connected_source("drain");
}

#[test]
fn flush_removes_a_denied_sources_connection() {
    reload_denying_a_connected_source("flush");
}
