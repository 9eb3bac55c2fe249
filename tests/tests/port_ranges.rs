//! Port ranges end to end: client ─ router (forwarder) ─ server, see forwarder_tests::topo.
//! A range to a range of the same size keeps the port's offset (8042 reaches 9042), a
//! range to one port sends every port there, and a port outside the range is left to the
//! router's own stack. The range-to-one-port case runs with iptables DNAT + MASQUERADE on
//! the router as the control, and must give the client the same answers.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon, Netns,
    config::{forward, forward_to_backends, router_interfaces},
    netns::run_ok,
    sockets::serve_in,
    topo::{ROUTER_CLIENT_ADDR, ROUTER_SERVER_DEV, SERVER_ADDR},
};

const WAIT: Duration = Duration::from_secs(5);

/// Servers on each of `ports` of the server (TCP, and UDP when `udp`), answering every
/// connection or datagram with "port N", N the port it arrived on.
fn port_servers(ns: &Netns, ports: &[u16], udp: bool) {
    for &port in ports {
        let at = SocketAddr::new([0, 0, 0, 0].into(), port);
        serve_in(
            ns,
            "TCP port server",
            move || TcpListener::bind(at),
            move |l| {
                for s in l.incoming() {
                    let Ok(mut s) = s else { break };
                    let _ = s.set_read_timeout(Some(WAIT));
                    let mut request = Vec::new();
                    let _ = s.read_to_end(&mut request);
                    let _ = s.write_all(format!("port {port}").as_bytes());
                }
            },
        )
        .unwrap();
        if udp {
            serve_in(
                ns,
                "UDP port server",
                move || UdpSocket::bind(at),
                move |s| {
                    let mut buf = [0u8; 1500];
                    while let Ok((_, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(format!("port {port}").as_bytes(), from);
                    }
                },
            )
            .unwrap();
        }
    }
}

/// What the client gets from a TCP connection to the router's `port`: the answer, or the
/// kind of error (refused: nothing listens there).
fn tcp_answer(client: &Netns, port: u16) -> Result<String, ErrorKind> {
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{port}").parse().unwrap();
    client
        .run(move || {
            let mut s = TcpStream::connect_timeout(&to, WAIT).map_err(|e| e.kind())?;
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(b"hello").map_err(|e| e.kind())?;
            s.shutdown(std::net::Shutdown::Write).map_err(|e| e.kind())?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).map_err(|e| e.kind())?;
            Ok(answer)
        })
        .unwrap()
}

/// What the client gets for a datagram to the router's `port` (from the listen address):
/// the answer, or the kind of error.
fn udp_answer(client: &Netns, port: u16) -> Result<String, ErrorKind> {
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{port}").parse().unwrap();
    client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.send_to(b"hello", to).map_err(|e| e.kind())?;
            let mut buf = [0u8; 1500];
            let (n, from) = s.recv_from(&mut buf).map_err(|e| e.kind())?;
            assert_eq!(from, to, "the answer comes from the address dialled");
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap()
}

fn answer(port: u16) -> Result<String, ErrorKind> {
    Ok(format!("port {port}"))
}

fn new_connections(d: &Daemon, name: &str) -> u64 {
    let s = d.stats().unwrap();
    let f = s["forwards"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap().clone();
    f["new_connections"].as_u64().unwrap()
}

/// 8000-8099 to 9000-9099, TCP and UDP: each port reaches the backend port at the same
/// offset; the ports around the range are not forwarded. The TCP forward is added by the
/// CLI and listed as written.
fn range_to_range(xdp: &str) {
    let chain = Chain::new().unwrap();
    let config = router_interfaces(xdp)
        + &forward("udp-range", "udp", "0.0.0.0:8000-8099", format!("{SERVER_ADDR}:9000-9099"))
        // A port of its own just past the range: the range lookup must not take it.
        + &forward("after", "tcp", "0.0.0.0:8100", format!("{SERVER_ADDR}:7100"));
    let d = Daemon::start(&chain.router, &chain.tag, &config).unwrap();
    let out = d
        .cli(&[
            "forward",
            "add",
            "--name",
            "tcp-range",
            "--protocol",
            "tcp",
            "--listen",
            "0.0.0.0:8000-8099",
            "--backend",
            &format!("{SERVER_ADDR}:9000-9099"),
        ])
        .unwrap();
    assert!(out.contains("tcp-range"), "{out}");
    let listed = d.cli(&["forward", "list"]).unwrap();
    let line = listed.lines().find(|l| l.starts_with("tcp-range")).unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("0.0.0.0:8000-8099") && line.contains(&format!("{SERVER_ADDR}:9000-9099")), "{listed}");
    let json: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
    let udp = json.as_array().unwrap().iter().find(|f| f["name"] == "udp-range").unwrap();
    assert_eq!(
        (&udp["listen"], &udp["backend"]),
        (&"0.0.0.0:8000-8099".into(), &format!("{SERVER_ADDR}:9000-9099").into())
    );
    let stats = d.stats().unwrap();
    let tcp = stats["forwards"].as_array().unwrap().iter().find(|f| f["name"] == "tcp-range").unwrap();
    assert_eq!(tcp["listen"], "0.0.0.0:8000-8099", "{stats}");

    port_servers(&chain.server, &[9000, 9042, 9099, 7100], true);
    // Would be reached if the offset ran past the range.
    port_servers(&chain.server, &[9100, 8999], false);
    for (port, backend) in [(8042, 9042), (8000, 9000), (8099, 9099)] {
        assert_eq!(tcp_answer(&chain.client, port), answer(backend), "TCP {port}");
        assert_eq!(udp_answer(&chain.client, port), answer(backend), "UDP {port}");
    }
    assert_eq!(tcp_answer(&chain.client, 8100), answer(7100), "the single port after the range is its own forward");
    assert_eq!(tcp_answer(&chain.client, 7999), Err(ErrorKind::ConnectionRefused), "before the range: the router's");
    assert_eq!(tcp_answer(&chain.client, 8101), Err(ErrorKind::ConnectionRefused), "after it");
    assert_eq!(new_connections(&d, "tcp-range"), 3);
    assert_eq!(new_connections(&d, "udp-range"), 3);
    assert_eq!(new_connections(&d, "after"), 1);

    // Local programs dialling a port of the range go the same way (cgroup hooks).
    for mode in ["tcp", "udp"] {
        let out = d
            .cgroup
            .command(&chain.router, env!("CARGO_BIN_EXE_fwt-probe"))
            .unwrap()
            .args([mode, &format!("{ROUTER_CLIENT_ADDR}:8042"), "hello"])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["reply"], "port 9042", "{mode}: {r}");
        assert_eq!(r["peer"], format!("{ROUTER_CLIENT_ADDR}:8042"), "{mode}: what the program dialled");
    }

    // Removed: the range is gone with it.
    d.cli(&["forward", "del", "tcp-range"]).unwrap();
    assert_eq!(tcp_answer(&chain.client, 8042), Err(ErrorKind::ConnectionRefused));
    assert_eq!(udp_answer(&chain.client, 8042), answer(9042), "the other protocol's range stays");
}

#[test]
fn range_to_range_xdp_native() {
    range_to_range("native");
}

#[test]
fn range_to_range_tc_only() {
    range_to_range("off");
}

/// How the router forwards 8000-8099 to the server's 9000.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `iptables -t nat ... --dport 8000:8099 -j DNAT --to SERVER:9000` and MASQUERADE.
    Iptables,
    Forwarder,
}

/// The client's answers from ports in and around the range, as `via` forwards them.
fn range_to_one_port(via: Via) -> Vec<(u16, Result<String, ErrorKind>)> {
    let chain = Chain::new().unwrap();
    let _daemon = match via {
        Via::Iptables => {
            for rule in [
                format!("-t nat -A PREROUTING -p tcp --dport 8000:8099 -j DNAT --to {SERVER_ADDR}:9000"),
                format!("-t nat -A POSTROUTING -o {ROUTER_SERVER_DEV} -j MASQUERADE"),
            ] {
                // Inside the router's namespace only (nsenter --net).
                run_ok(chain.router.cmd("iptables").args(rule.split(' '))).unwrap();
            }
            None
        }
        Via::Forwarder => {
            let config = router_interfaces("native")
                + &forward("to-one", "tcp", "0.0.0.0:8000-8099", format!("{SERVER_ADDR}:9000"));
            Some(Daemon::start(&chain.router, &chain.tag, &config).unwrap())
        }
    };
    port_servers(&chain.server, &[9000, 9042, 9099, 9100], false);
    [8000, 8042, 8099, 7999, 8100].into_iter().map(|port| (port, tcp_answer(&chain.client, port))).collect()
}

#[test]
fn range_to_one_port_as_iptables_does() {
    let control = range_to_one_port(Via::Iptables);
    let expected: Vec<_> = [
        (8000, answer(9000)),
        (8042, answer(9000)),
        (8099, answer(9000)),
        (7999, Err(ErrorKind::ConnectionRefused)),
        (8100, Err(ErrorKind::ConnectionRefused)),
    ]
    .into_iter()
    .collect();
    assert_eq!(control, expected, "the control");
    assert_eq!(range_to_one_port(Via::Forwarder), control, "forwarder as iptables");
}

/// A range to two backends, a range of the same size and one port: each new connection
/// goes to either, the range keeping the offset; with one of them drained, the other takes
/// every connection the same way.
#[test]
fn a_range_to_several_backends_keeps_the_offset_per_backend() {
    let chain = Chain::new().unwrap();
    const SECOND: &str = "203.0.113.21";
    chain.server.ip(&["addr", "add", &format!("{SECOND}/24"), "dev", "s0"]).unwrap();
    let range = format!("{SERVER_ADDR}:9000-9099");
    let single = format!("{SECOND}:7000");
    let config = router_interfaces("native")
        + &forward_to_backends("web", "tcp", "0.0.0.0:8000-8099", &[(range.clone(), 1), (single.clone(), 1)]);
    let d = Daemon::start(&chain.router, &chain.tag, &config).unwrap();
    port_servers(&chain.server, &[9042, 7000, 9000, 7042], false);
    let answers: Vec<_> = (0..24).map(|_| tcp_answer(&chain.client, 8042)).collect();
    for a in &answers {
        assert!(*a == answer(9042) || *a == answer(7000), "{answers:?}");
    }
    assert!(answers.contains(&answer(9042)) && answers.contains(&answer(7000)), "both backends: {answers:?}");
    let json: serde_json::Value = serde_json::from_str(&d.cli(&["forward", "list", "--json"]).unwrap()).unwrap();
    let listed: Vec<&str> =
        json[0]["backends"].as_array().unwrap().iter().map(|b| b["address"].as_str().unwrap()).collect();
    assert_eq!(listed, [range.as_str(), single.as_str()], "{json}");

    d.cli(&["backend", "set-weight", "web", &single, "0"]).unwrap();
    assert_eq!(tcp_answer(&chain.client, 8042), answer(9042), "the range alone");
    assert_eq!(tcp_answer(&chain.client, 8000), answer(9000));
    d.cli(&["backend", "set-weight", "web", &single, "1"]).unwrap();
    d.cli(&["backend", "set-weight", "web", &range, "0"]).unwrap();
    assert_eq!(tcp_answer(&chain.client, 8042), answer(7000), "the single port alone");
    assert_eq!(tcp_answer(&chain.client, 8000), answer(7000));
}
