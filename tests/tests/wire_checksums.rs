//! Checksums on the wire after forwarder's TC programs rewrote the packets: every frame the
//! next hops receive is captured (packet socket) and checked with the tests' own arithmetic.
//! The ends' stacks would not tell: a veth hands on an skb's "verified" mark, and a
//! receiver trusts it, so a checksum written wrongly could cross unnoticed.
//!
//! The ends send full checksums (tx checksum offload off, as packets from a NIC's wire
//! arrive) and the router's devices have GRO on, which verifies them: TC sees
//! CHECKSUM_UNNECESSARY skbs, which its fast and full paths rewrite by direct writes, and
//! GRO's merged TCP segments as CHECKSUM_PARTIAL, which take the skb helpers.

use std::{net::UdpSocket, time::Duration};

use forwarder_tests::{
    Daemon,
    capture::{Capture, Frame},
    config::line_config,
    frames::wire_checksums,
    sockets::{serve_in, tcp_sink, upload_to_sink},
    topo::Line,
};

const DATAGRAMS: usize = 200;
const UPLOAD: usize = 400_000;

/// The router's own addresses towards the client and towards the server (SNAT).
const ROUTER_IN: [&str; 2] = ["192.0.2.1", "2001:db8:1::1"];
const ROUTER_OUT: [&str; 2] = ["198.51.100.1", "2001:db8:3::1"];

fn reason(d: &Daemon, name: &str) -> u64 {
    let s = d.stats().unwrap();
    s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap()["packets"].as_u64().unwrap()
}

/// (source address, L4 protocol) of an IPv4/IPv6 TCP/UDP frame.
fn source_and_proto(frame: &[u8]) -> Option<(String, u8)> {
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let a = frame.get(26..30)?;
            Some((std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(), *frame.get(23)?))
        }
        [0x86, 0xdd] => {
            let a: [u8; 16] = frame.get(22..38)?.try_into().ok()?;
            Some((std::net::Ipv6Addr::from(a).to_string(), *frame.get(20)?))
        }
        _ => None,
    }
}

/// The router's TCP/UDP frames of a capture, by protocol and family; how many were
/// CHECKSUM_PARTIAL and how many marked verified; and each one whose checksums are wrong.
#[derive(Debug, Default)]
struct Seen {
    udp4: usize,
    udp6: usize,
    tcp4: usize,
    tcp6: usize,
    partial: usize,
    marked_valid: usize,
    bad: Vec<String>,
}

/// Checks every TCP/UDP frame in `frames` sent from one of `sources` (IPv4, IPv6).
fn check_frames(frames: &[Frame], sources: [&str; 2]) -> Seen {
    let mut seen = Seen::default();
    for f in frames {
        let Some((src, proto)) = source_and_proto(&f.bytes) else { continue };
        let Some(v6) = sources.iter().position(|s| *s == src).map(|i| i == 1) else { continue };
        let Some(c) = wire_checksums(&f.bytes) else { continue };
        match (proto, v6) {
            (17, false) => seen.udp4 += 1,
            (17, true) => seen.udp6 += 1,
            (6, false) => seen.tcp4 += 1,
            _ => seen.tcp6 += 1,
        }
        seen.partial += f.checksum_partial() as usize;
        seen.marked_valid += f.checksum_marked_valid() as usize;
        // A CHECKSUM_PARTIAL frame carries the seed; any other a full, valid checksum.
        let l4 = if f.checksum_partial() { c.l4_is_seed } else { c.l4_ok };
        if !c.ip_header_ok || !l4 {
            seen.bad.push(format!("{src} proto {proto} len {} partial {}: {c:?}", f.bytes.len(), f.checksum_partial()));
        }
    }
    seen
}

#[test]
fn tc_rewrites_leave_valid_checksums_on_the_wire() {
    let line = Line::new(1500).unwrap();
    line.client.sh("ethtool -K c0 tx off >/dev/null").unwrap();
    line.server.sh("ethtool -K s0 tx off >/dev/null").unwrap();
    // A veth hands its peer's GRO only what it did not offer to segment (no TSO, which
    // checksum offload off turns off too): mid's forwarded replies as well.
    line.mid.sh("ethtool -K mr tx off >/dev/null").unwrap();
    line.router.sh("ethtool -K rc gro on >/dev/null && ethtool -K rm gro on >/dev/null").unwrap();
    let daemon = Daemon::start(&line.router, &line.tag, &line_config("off")).unwrap();

    // What the router sends towards the server (mid's side of the link) and back to the
    // client.
    let to_server = Capture::start(&line.mid, "mr").unwrap();
    let to_client = Capture::start(&line.client, "c0").unwrap();

    let echo = serve_in(
        &line.server,
        "UDP echo",
        || {
            let s = UdpSocket::bind("[::]:5353")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(s)
        },
        |s| {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..n], from).unwrap();
            }
        },
    )
    .unwrap();
    for to in ["192.0.2.1:5353", "[2001:db8:1::1]:5353"] {
        line.client
            .run(move || {
                let s = UdpSocket::bind(if to.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
                s.connect(to).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = vec![0u8; 2048];
                for i in 0..DATAGRAMS {
                    // Sizes over the whole range in no order, odd and even (the checksum's
                    // last word); the largest first, twice (the first may go out before the
                    // neighbour is known): a cached next hop serves packets up to the
                    // largest length the FIB has passed, so a run of ever larger ones, as
                    // after a route change, would each take the full path.
                    let len = if i < 2 { 1400 } else { 1 + i * 7919 % 1399 };
                    let msg: Vec<u8> = (0..len).map(|k| (k * 31 + i) as u8).collect();
                    s.send(&msg).unwrap();
                    let n = s.recv(&mut buf).unwrap_or_else(|e| panic!("echo {i} via {to}: {e}"));
                    assert_eq!(&buf[..n], &msg[..], "echo {i} via {to}");
                }
            })
            .unwrap();
    }
    let sink = tcp_sink(&line.server, "[::]:3197".parse().unwrap(), 2).unwrap();
    for to in ["192.0.2.1:3306", "[2001:db8:1::1]:3306"] {
        let to = to.parse().unwrap();
        let got = line.client.run(move || upload_to_sink(to, UPLOAD).0).unwrap();
        assert_eq!(got, UPLOAD, "upload via {to}");
    }
    sink.join().unwrap();
    echo.join().unwrap();

    let (out, back) = (to_server.stop().unwrap(), to_client.stop().unwrap());
    let (out, back) = (check_frames(&out, ROUTER_OUT), check_frames(&back, ROUTER_IN));
    println!("towards the server: {out:?}\nback to the client: {back:?}");
    println!("{}", daemon.stats().unwrap());
    assert!(
        out.bad.is_empty(),
        "{} frames towards the server with wrong checksums, first: {:?}",
        out.bad.len(),
        &out.bad[..out.bad.len().min(5)]
    );
    assert!(
        back.bad.is_empty(),
        "{} frames back to the client with wrong checksums, first: {:?}",
        back.bad.len(),
        &back.bad[..back.bad.len().min(5)]
    );
    for (what, n, want) in [
        ("UDP/IPv4 towards the server", out.udp4, DATAGRAMS),
        ("UDP/IPv6 towards the server", out.udp6, DATAGRAMS),
        ("UDP/IPv4 back", back.udp4, DATAGRAMS),
        ("UDP/IPv6 back", back.udp6, DATAGRAMS),
        ("TCP/IPv4 towards the server", out.tcp4, UPLOAD / 64_000),
        ("TCP/IPv6 towards the server", out.tcp6, UPLOAD / 64_000),
        ("TCP/IPv4 back", back.tcp4, 3),
        ("TCP/IPv6 back", back.tcp6, 3),
    ] {
        assert!(n >= want, "{what}: {n} frames checked, want at least {want}");
    }
    // The rewrite TC's fast path does by direct writes: verified skbs (the mark crosses the
    // redirect and the veth) it forwarded from its flow cache, both ways, both families.
    for (what, seen) in [("towards the server", &out), ("back to the client", &back)] {
        assert!(seen.marked_valid >= 2 * DATAGRAMS - 10, "{what}: verified frames {seen:?}");
    }
    // Most of the 4 x DATAGRAMS datagrams: the first of each way, any that outgrow the largest
    // length the FIB has passed, and any sent before the neighbour was known take the full path.
    let fast = reason(&daemon, "redirect_tc_flow_cache") + reason(&daemon, "redirect_tc_cached");
    assert!(fast >= 3 * DATAGRAMS as u64, "{}", daemon.stats().unwrap());
}
