//! `forwarder conntrack list|flush` (issue 18) on a running instance with two forwards and a
//! held TCP connection through each.

use std::{net::SocketAddr, time::Duration};

use forwarder_tests::{
    Chain, Daemon,
    config::{forward, router_interfaces},
    sockets::{EchoConn, tcp_echo},
    topo::{CLIENT_ADDR, ROUTER_CLIENT_ADDR, ROUTER_SERVER_ADDR, SERVER_ADDR},
};

/// (name, listen port, backend port)
const FORWARDS: [(&str, u16, u16); 2] = [("mysql", 3306, 3197), ("web", 8080, 9080)];

fn config() -> String {
    let mut c = router_interfaces("off");
    for (name, listen, backend) in FORWARDS {
        c += &forward(name, "tcp", format!("0.0.0.0:{listen}"), format!("{SERVER_ADDR}:{backend}"));
    }
    c
}

#[test]
fn conntrack_list_and_flush() {
    let chain = Chain::new().unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config()).unwrap();
    let addr = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    let seen: Vec<_> =
        FORWARDS.iter().map(|(_, _, backend)| tcp_echo(&chain.server, addr(SERVER_ADDR, *backend)).unwrap()).collect();
    // One held connection per forward, opened in the client's namespace.
    let conns: Vec<EchoConn> = FORWARDS
        .iter()
        .map(|(_, listen, _)| {
            let mut c =
                EchoConn::open_in(&chain.client, addr(ROUTER_CLIENT_ADDR, *listen), Duration::from_secs(5)).unwrap();
            c.ping(b"ping").unwrap();
            c
        })
        .collect();
    let peers: Vec<SocketAddr> = seen.iter().map(|rx| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();

    let list: serde_json::Value = serde_json::from_str(&daemon.cli(&["conntrack", "list", "--json"]).unwrap()).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    for (((name, listen, backend), peer), conn) in FORWARDS.iter().zip(&peers).zip(&conns) {
        let c = list.iter().find(|c| c["forward"] == *name).unwrap_or_else(|| panic!("{name} listed: {list:?}"));
        assert_eq!(c["protocol"], "tcp");
        assert_eq!(c["state"], "ESTABLISHED", "{c}");
        assert_eq!(c["assured"], true);
        assert_eq!(c["original"]["src"], conn.0.local_addr().unwrap().to_string(), "{c}");
        assert_eq!(c["original"]["src"].as_str().unwrap().split(':').next(), Some(CLIENT_ADDR));
        assert_eq!(c["original"]["dst"], format!("{ROUTER_CLIENT_ADDR}:{listen}"));
        assert_eq!(c["reply"]["src"], format!("{SERVER_ADDR}:{backend}"));
        assert_eq!(c["reply"]["dst"], peer.to_string(), "the SNAT address and port the server sees: {c}");
        assert_eq!(peer.ip().to_string(), ROUTER_SERVER_ADDR);
        assert!(c["age_s"].as_u64().unwrap() < 60 && c["idle_s"].as_u64().unwrap() < 60, "{c}");
    }
    let text = daemon.cli(&["conntrack", "list", "--forward", "web"]).unwrap();
    assert!(text.contains("web") && !text.contains("mysql") && text.contains("1 connections"), "{text}");

    let flushed: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["conntrack", "flush", "--forward", "mysql", "--json"]).unwrap()).unwrap();
    assert_eq!(flushed["flushed"], 1);
    let left: serde_json::Value = serde_json::from_str(&daemon.cli(&["conntrack", "list", "--json"]).unwrap()).unwrap();
    let left = left.as_array().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["forward"], "web");
    // The flushed connection is over (its next segment is not a SYN); the other goes on.
    let (mut mysql, mut web) = {
        let mut it = conns.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    };
    let results = (mysql.ping(b"ping").is_err(), web.ping(b"ping").is_ok());
    assert_eq!(results, (true, true), "flushed connection ended, the other forward's untouched");
    assert!(daemon.cli(&["conntrack", "flush", "--forward", "nope"]).is_err(), "an unknown forward is an error");
}
