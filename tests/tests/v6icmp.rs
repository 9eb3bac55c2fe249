//! IPv6 forwards and ICMP/ICMPv6 errors about forwarded connections, end to end.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use forwarder_tests::{
    Daemon, Netns,
    config::line_config,
    sockets::{tcp_sink, upload_to_sink},
    topo::{LINE_ROUTER_V6, LINE_SERVER_V6, Line},
};

/// A TCP sink in `ns` on `addr` for `conns` connections (see [`tcp_sink`]).
fn sink(ns: &Netns, addr: &str, conns: usize) -> std::thread::JoinHandle<Vec<(SocketAddr, usize)>> {
    tcp_sink(ns, addr.parse().unwrap(), conns).unwrap()
}

/// Uploads `n` bytes from `ns` to `to`; returns the count the sink answered.
fn upload(ns: &Netns, to: &str, n: usize) -> usize {
    let to: SocketAddr = to.parse().unwrap();
    ns.run(move || upload_to_sink(to, n).0).unwrap()
}

#[test]
fn ipv6_tcp_forward_and_local_ipv6() {
    let line = Line::new(1500).unwrap();
    let d = Daemon::start(&line.router, &line.tag, &line_config("native")).unwrap();
    let server = sink(&line.server, "[2001:db8:2::20]:3197", 2);
    assert_eq!(upload(&line.client, "[2001:db8:1::1]:3306", 300_000), 300_000);
    // A program on the router dialling [::1]:3306 reaches the IPv6 backend too.
    let r = d
        .cgroup
        .command(&line.router, env!("CARGO_BIN_EXE_fwt-probe"))
        .unwrap()
        .args(["tcp", "[::1]:3306", "hello over ::1"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["peer"], "[::1]:3306", "{v}");
    let seen = server.join().unwrap();
    assert_eq!(seen[0].0.ip().to_string(), "2001:db8:3::1", "SNAT to the router's IPv6 address");
    assert_eq!(seen[1].1, "hello over ::1".len());
    let s = d.stats().unwrap();
    let tcp6 = s["forwards"].as_array().unwrap().iter().find(|f| f["name"] == "tcp6").unwrap().clone();
    assert_eq!(tcp6["new_connections"], 1, "{s}");
    assert_eq!(tcp6["local_connections"], 1, "{s}");
    assert!(tcp6["packets"].as_u64().unwrap() > 20);
    let _ = LINE_ROUTER_V6;
}

/// The mid router's link to the server is narrower than the server's own MTU: only PMTU
/// discovery, through the translated "fragmentation needed" / "packet too big", lets an
/// upload through the forwarder complete.
#[test]
fn path_mtu_discovery_works_through_the_forwarder() {
    let line = Line::new(1280).unwrap();
    let d = Daemon::start(&line.router, &line.tag, &line_config("native")).unwrap();
    let server4 = sink(&line.server, "203.0.113.20:3197", 1);
    assert_eq!(upload(&line.client, "192.0.2.1:3306", 1_000_000), 1_000_000);
    server4.join().unwrap();
    let server6 = sink(&line.server, "[2001:db8:2::20]:3197", 1);
    assert_eq!(upload(&line.client, "[2001:db8:1::1]:3306", 1_000_000), 1_000_000);
    server6.join().unwrap();
    let s = d.stats().unwrap();
    let translated =
        s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "icmp_translated").unwrap()["packets"]
            .as_u64()
            .unwrap();
    assert!(translated >= 2, "an ICMP and an ICMPv6 error were translated: {s}");
    let _ = LINE_SERVER_V6;
}

/// A datagram whose TTL / hop limit runs out at the mid router: the time-exceeded error
/// comes back translated, so the client's own socket receives it (the kernel matches it to
/// the socket by the quoted header, and checks the checksums).
#[test]
fn ttl_expiry_beyond_the_forwarder_returns_a_translated_error() {
    let line = Line::new(1500).unwrap();
    let d = Daemon::start(&line.router, &line.tag, &line_config("native")).unwrap();
    for (to, v6) in [("192.0.2.1:5353", false), ("[2001:db8:1::1]:5353", true)] {
        let err = line
            .client
            .run(move || {
                let s = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
                s.connect(to).unwrap();
                let one: libc::c_int = 1;
                let two: libc::c_int = 2;
                // SAFETY: valid socket and option buffers.
                unsafe {
                    let (level, recverr, ttl) = if v6 {
                        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR, libc::IPV6_UNICAST_HOPS)
                    } else {
                        (libc::IPPROTO_IP, libc::IP_RECVERR, libc::IP_TTL)
                    };
                    assert_eq!(libc::setsockopt(s.as_raw_fd(), level, recverr, (&one as *const i32).cast(), 4), 0);
                    assert_eq!(libc::setsockopt(s.as_raw_fd(), level, ttl, (&two as *const i32).cast(), 4), 0);
                }
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send(b"expires at mid").unwrap();
                let mut b = [0u8; 64];
                s.recv(&mut b).err().map(|e| e.raw_os_error())
            })
            .unwrap();
        assert_eq!(err, Some(Some(libc::EHOSTUNREACH)), "{to}: the socket got the time-exceeded error");
    }
    let s = d.stats().unwrap();
    let translated =
        s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "icmp_translated").unwrap()["packets"]
            .as_u64()
            .unwrap();
    assert_eq!(translated, 2, "{s}");
}

/// An echo request to a listen address is answered by the host, forwarder or not.
#[test]
fn ping_to_a_listen_address_is_answered_by_the_host() {
    let line = Line::new(1500).unwrap();
    let _d = Daemon::start(&line.router, &line.tag, &line_config("native")).unwrap();
    for to in ["192.0.2.1", "2001:db8:1::1"] {
        let out = line.client.cmd("ping").args(["-n", "-c", "2", "-i", "0.2", "-W", "2", to]).output().unwrap();
        assert!(out.status.success(), "{to}: {}", String::from_utf8_lossy(&out.stdout));
    }
}
