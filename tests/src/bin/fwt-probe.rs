//! A client for local-forward tests, run as its own process so it can sit in a test cgroup
//! and network namespace: `fwt-probe tcp|udp ADDR:PORT MESSAGE`. Prints one JSON line:
//! {"peer": getpeername or the datagram's source, "reply": the reply as text}.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, to, msg] = &args[..] else {
        eprintln!("usage: fwt-probe tcp|udp ADDR:PORT MESSAGE");
        std::process::exit(2);
    };
    let to: SocketAddr = to.parse().expect("ADDR:PORT");
    let result = match mode.as_str() {
        "tcp" => tcp(to, msg),
        "udp" => udp(to, msg),
        _ => Err(std::io::Error::other("mode must be tcp or udp")),
    };
    match result {
        Ok((peer, reply)) => println!("{}", serde_json::json!({"peer": peer.to_string(), "reply": reply})),
        Err(e) => {
            println!("{}", serde_json::json!({"error": e.to_string()}));
            std::process::exit(1);
        }
    }
}

fn tcp(to: SocketAddr, msg: &str) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    // Before the close: a fully closed socket has no peer any more.
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((peer, reply))
}

fn udp(to: SocketAddr, msg: &str) -> std::io::Result<(SocketAddr, String)> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
}
