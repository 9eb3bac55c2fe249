//! The demo: the classic `iptables ... --dport 3306 -j DNAT --to B:3197` (plus SNAT) done by
//! forwarder, in a sandbox of network namespaces that is removed afterwards.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use forwarder_tests::{
    Chain, Daemon,
    topo::{CLIENT_ADDR, ROUTER_CLIENT_ADDR, ROUTER_SERVER_ADDR, SERVER_ADDR},
};

/// The embedded default config: the classic forward.
pub const DEMO_CONFIG: &str = r#"
[[interface]]
name = "rc"       # router side of the client link
xdp = "native"

[[interface]]
name = "rs"       # router side of the server link
xdp = "native"

[[forward]]
name = "mysql"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"
snat = "auto"
"#;

pub fn run(connections: usize) -> Result<()> {
    crate::build_forwarder()?;
    println!(
        "== sandbox: client {CLIENT_ADDR} ─ router {ROUTER_CLIENT_ADDR} | {ROUTER_SERVER_ADDR} ─ server {SERVER_ADDR}"
    );
    let chain = Chain::new().context("creating the namespace sandbox")?;
    println!("== forwarder config (embedded default):{DEMO_CONFIG}");
    let daemon = Daemon::start(&chain.router, &chain.tag, DEMO_CONFIG)?;

    let (tx, rx) = std::sync::mpsc::channel();
    let server = chain.server.spawn(move || -> Result<()> {
        let l = TcpListener::bind((SERVER_ADDR, 3197))?;
        tx.send(()).ok();
        for _ in 0..connections {
            let (mut s, peer) = l.accept()?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            let reply = format!("backend {SERVER_ADDR}:3197 got {:?} from {peer}", String::from_utf8_lossy(&buf[..n]));
            s.write_all(reply.as_bytes())?;
        }
        Ok(())
    })?;
    rx.recv_timeout(Duration::from_secs(5)).context("backend did not start")?;

    for i in 0..connections {
        let line = chain.client.run(move || -> Result<String> {
            let mut s =
                TcpStream::connect_timeout(&format!("{ROUTER_CLIENT_ADDR}:3306").parse()?, Duration::from_secs(5))?;
            s.write_all(format!("hello #{i}").as_bytes())?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(format!("client → {ROUTER_CLIENT_ADDR}:3306 (peer {}): {reply}", s.peer_addr()?))
        })??;
        if i < 3 || i + 1 == connections {
            println!("{line}");
        } else if i == 3 {
            println!("...");
        }
        if i % 5 == 4 {
            print_counters(&daemon)?;
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    server.join().map_err(|_| anyhow::anyhow!("backend panicked"))??;
    println!("\n== final counters: forwarder stats");
    print!("{}", daemon.cli(&["stats"])?);
    println!("== removing the sandbox");
    drop(daemon);
    drop(chain);
    Ok(())
}

fn print_counters(daemon: &Daemon) -> Result<()> {
    let s = daemon.stats()?;
    let f = &s["forwards"][0];
    println!(
        "   live: forward {} packets={} bytes={} new_connections={}",
        f["name"].as_str().unwrap_or("?"),
        f["packets"],
        f["bytes"],
        f["new_connections"]
    );
    Ok(())
}
