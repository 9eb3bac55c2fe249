//! Lifecycle-test clients run as their own process, so they can sit in a test cgroup (where
//! the local-forward hooks see them) and a network namespace. Prints one JSON line.
//!
//! `fwt-traffic churn CHURN_JSON`: a `forwarder_tests::traffic::Churn`; prints its report.
//! `fwt-traffic from-port tcp|udp LOCAL_PORT ADDR:PORT BYTES`: binds LOCAL_PORT on every
//! address, connects to ADDR:PORT and exchanges BYTES each way (TCP: one stream answered by
//! `peer-addr\n` and the bytes + 1; UDP: datagrams of up to 1000 bytes, each echoed + 1);
//! prints {"local", "server_saw", "error"}.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use forwarder_tests::traffic::{Churn, IO_TIMEOUT};
use socket2::{Domain, Protocol, Socket, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = match args.iter().map(String::as_str).collect::<Vec<_>>()[1..] {
        ["churn", spec] => {
            let churn: Churn = serde_json::from_str(spec).expect("churn JSON");
            serde_json::to_value(churn.run()).expect("report")
        }
        ["from-port", proto, port, to, bytes] => {
            let port: u16 = port.parse().expect("LOCAL_PORT");
            let to: SocketAddr = to.parse().expect("ADDR:PORT");
            let bytes: usize = bytes.parse().expect("BYTES");
            let r = match proto {
                "tcp" => tcp_from_port(port, to, bytes),
                "udp" => udp_from_port(port, to, bytes),
                _ => Err(std::io::Error::other("tcp or udp")),
            };
            match r {
                Ok((local, server_saw)) => {
                    serde_json::json!({"local": local.to_string(), "server_saw": server_saw})
                }
                Err(e) => serde_json::json!({"error": e.to_string()}),
            }
        }
        _ => {
            eprintln!("usage: fwt-traffic churn JSON | from-port tcp|udp LOCAL_PORT ADDR:PORT BYTES");
            std::process::exit(2);
        }
    };
    println!("{out}");
}

/// The data of an exchange: byte i of a stream, or of a datagram.
fn pattern(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// The error of `step`, named.
fn at(step: &'static str) -> impl Fn(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{step}: {e}"))
}

fn bound(ty: Type, proto: Protocol, port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    Ok(s)
}

fn tcp_from_port(port: u16, to: SocketAddr, bytes: usize) -> std::io::Result<(SocketAddr, String)> {
    let s = bound(Type::STREAM, Protocol::TCP, port).map_err(at("bind"))?;
    s.connect_timeout(&to.into(), IO_TIMEOUT).map_err(at("connect"))?;
    let mut s = TcpStream::from(s);
    let local = s.local_addr()?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let data: Vec<u8> = (0..bytes).map(pattern).collect();
    s.write_all(&data).map_err(at("write"))?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(at("read"))?;
    let nl = reply.iter().position(|b| *b == b'\n').ok_or_else(|| std::io::Error::other("no peer line"))?;
    let server_saw = String::from_utf8_lossy(&reply[..nl]).into_owned();
    let back = &reply[nl + 1..];
    if back.len() != bytes || back.iter().zip(&data).any(|(b, d)| *b != d.wrapping_add(1)) {
        return Err(std::io::Error::other(format!("reply of {} bytes differs (sent {bytes})", back.len())));
    }
    Ok((local, server_saw))
}

fn udp_from_port(port: u16, to: SocketAddr, bytes: usize) -> std::io::Result<(SocketAddr, String)> {
    let s: UdpSocket = bound(Type::DGRAM, Protocol::UDP, port).map_err(at("bind"))?.into();
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let local = s.local_addr()?;
    let mut server_saw = String::new();
    let mut buf = [0u8; 2048];
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(1000);
        let data: Vec<u8> = (sent..sent + n).map(pattern).collect();
        s.send(&data).map_err(at("send"))?;
        let got = s.recv(&mut buf).map_err(at("recv (no echo in 2 s)"))?;
        // The echo: "peer-addr\n" and the datagram + 1.
        let nl = buf[..got].iter().position(|b| *b == b'\n').ok_or_else(|| std::io::Error::other("no peer line"))?;
        server_saw = String::from_utf8_lossy(&buf[..nl]).into_owned();
        let back = &buf[nl + 1..got];
        if back.len() != n || back.iter().zip(&data).any(|(b, d)| *b != d.wrapping_add(1)) {
            return Err(std::io::Error::other(format!("echo of datagram at {sent} differs")));
        }
        sent += n;
    }
    Ok((local, server_saw))
}
