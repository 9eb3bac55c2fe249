//! End to end: real TCP and UDP between namespaces through a running `forwarder`.
//! client ─ router (forwarder) ─ server; see forwarder_tests::topo.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use forwarder_tests::{
    Chain, Daemon,
    topo::{ROUTER_CLIENT_ADDR, ROUTER_SERVER_ADDR, SERVER_ADDR},
};

const BACKEND_PORT: u16 = 3197;
const LISTEN_PORT: u16 = 3306;

fn config(xdp: &str, protocol: &str, snat: &str) -> String {
    format!(
        r#"
[[interface]]
name = "rc"
xdp = "{xdp}"

[[interface]]
name = "rs"
xdp = "{xdp}"

[[forward]]
name = "classic"
protocol = "{protocol}"
listen = "0.0.0.0:{LISTEN_PORT}"
backend = "{SERVER_ADDR}:{BACKEND_PORT}"
snat = "{snat}"
"#
    )
}

/// A TCP echo-with-prefix server on the backend: it reports the peer address it saw, then
/// echoes `n` bytes back transformed (each byte + 1), so both directions are checked.
fn tcp_server(chain: &Chain, conns: usize) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = chain
        .server
        .spawn(move || {
            let l = TcpListener::bind(("0.0.0.0", BACKEND_PORT)).unwrap();
            tx.send(()).unwrap();
            let mut peers = Vec::new();
            for _ in 0..conns {
                let (mut s, peer) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                peers.push(peer);
                let mut len = [0u8; 4];
                s.read_exact(&mut len).unwrap();
                let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                s.read_exact(&mut buf).unwrap();
                let reply: Vec<u8> = buf.iter().map(|b| b.wrapping_add(1)).collect();
                s.write_all(&reply).unwrap();
            }
            peers
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(5)).expect("server listening");
    h
}

/// Connects from the client to the router's listen port, sends `n` bytes, checks the reply.
fn tcp_exchange(chain: &Chain, n: usize) {
    chain
        .client
        .run(move || {
            let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect through forwarder");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(s.peer_addr().unwrap(), to, "client sees only the listen address");
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            s.write_all(&(n as u32).to_be_bytes()).unwrap();
            s.write_all(&data).unwrap();
            let mut back = vec![0u8; n];
            s.read_exact(&mut back).expect("reply through forwarder");
            let want: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
            assert!(back == want, "reply bytes differ");
        })
        .unwrap();
}

fn forward_stats(d: &Daemon) -> serde_json::Value {
    let s = d.stats().unwrap();
    s["forwards"][0].clone()
}

fn reason(d: &Daemon, name: &str) -> u64 {
    let s = d.stats().unwrap();
    s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap()["packets"].as_u64().unwrap()
}

fn tcp_forward(xdp: &str) {
    let chain = Chain::new().unwrap();
    let daemon = Daemon::start(&chain.router, &chain.tag, &config(xdp, "tcp", "auto")).unwrap();
    let server = tcp_server(&chain, 3);
    for n in [10, 100_000, 1] {
        tcp_exchange(&chain, n);
    }
    let peers = server.join().unwrap();
    for p in &peers {
        assert_eq!(p.ip().to_string(), ROUTER_SERVER_ADDR, "with snat the server sees the router");
    }
    let f = forward_stats(&daemon);
    assert_eq!(f["new_connections"], 3, "{f}");
    assert!(f["packets"].as_u64().unwrap() >= 3 * 6, "{f}");
    // 100 kB each way: at least that many L3 bytes were rewritten.
    assert!(f["bytes"].as_u64().unwrap() > 200_000, "{f}");
    let stats = daemon.stats().unwrap();
    let left: u64 = stats["reasons"].as_array().unwrap().iter().filter(|r| r["kind"] == "forwarded").map(|r| r["packets"].as_u64().unwrap()).sum();
    assert_eq!(left, f["packets"].as_u64().unwrap(), "every rewritten packet left one way: {stats}");
    assert_eq!(reason(&daemon, "malformed"), 0, "{stats}");
}

#[test]
fn tcp_forward_xdp_native() {
    tcp_forward("native");
}

#[test]
fn tcp_forward_xdp_generic() {
    tcp_forward("generic");
}

#[test]
fn tcp_forward_tc_only() {
    tcp_forward("off");
}
