//! ICMP errors the router itself owes a client, differential: the same scenarios through
//! iptables/ip6tables DNAT + MASQUERADE on the router (the control) and through forwarder
//! with XDP native, XDP generic and TC only, asserting the same outcome at the client's
//! socket (error queue, errno, path MTU). Each way is one test with a sandbox of its own
//! (tests/src/topo.rs `Line`: client ─ router ─ mid ─ server, dual stack; the router's link
//! to mid narrower than the client's), running the scenarios in turn:
//!
//! - TTL / hop limit 1: time exceeded from the listen address, quoting the listen port; a
//!   TCP connect fails with EHOSTUNREACH.
//! - Backends behind `unreachable` and `prohibit` routes: destination unreachable.
//! - The narrower egress: TCP uploads learn the path MTU, a datagram with DF gets EMSGSIZE
//!   with the MTU; then with GRO on the router's ingress, whose GSO packets' segments do not
//!   fit; an IPv4 datagram without DF is fragmented by the router.

use std::{
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use forwarder_tests::{
    Daemon, Netns,
    netns::run_ok,
    sockets::{tcp_sink, upload_to_sink},
    topo::{LINE_SERVER_V6, Line},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const LISTEN4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const LISTEN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const TCP_PORT: u16 = 3306;
const UDP_PORT: u16 = 5353;
const BACKEND_PORT: u16 = 3197;
/// Forwards whose backends sit behind an `unreachable` / a `prohibit` route on the router.
const TCP_UNREACHABLE: u16 = 3307;
const TCP_PROHIBITED: u16 = 3308;
const UDP_UNREACHABLE: u16 = 5307;
const UDP_PROHIBITED: u16 = 5308;
/// MTU of the router's link to mid (both ends), narrower than the client's 1500.
const EGRESS_MTU: u32 = 1400;
const UPLOAD: usize = 2_000_000;

/// Client addresses the probes come from, one each (see `Sandbox::new`).
const PROBE_SOURCES: u32 = 16;

const SO_EE_ORIGIN_ICMP: u8 = 2;
const SO_EE_ORIGIN_ICMP6: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Iptables,
    XdpNative,
    XdpGeneric,
    TcOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn listen(self) -> IpAddr {
        match self {
            Fam::V4 => LISTEN4.into(),
            Fam::V6 => LISTEN6.into(),
        }
    }
    fn to(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.listen(), port)
    }
    /// The `i`th probe source address (any port).
    fn source(self, i: u32) -> SocketAddr {
        match self {
            Fam::V4 => SocketAddr::new(Ipv4Addr::new(192, 0, 2, 100 + i as u8).into(), 0),
            Fam::V6 => SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100 + i as u16).into(), 0),
        }
    }
    fn origin(self) -> u8 {
        match self {
            Fam::V4 => SO_EE_ORIGIN_ICMP,
            Fam::V6 => SO_EE_ORIGIN_ICMP6,
        }
    }
    /// (level, option) of IP_RECVERR.
    fn recverr(self) -> (libc::c_int, libc::c_int) {
        match self {
            Fam::V4 => (libc::IPPROTO_IP, libc::IP_RECVERR),
            Fam::V6 => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
        }
    }
}

/// A run's backend server address of each family.
fn backend(fam: Fam, port: u16) -> String {
    match fam {
        Fam::V4 => format!("203.0.113.20:{port}"),
        Fam::V6 => format!("[{LINE_SERVER_V6}]:{port}"),
    }
}

/// (listen port, backend address, protocol) of every forward, in both families.
fn forwards(fam: Fam) -> Vec<(u16, String, &'static str)> {
    let (unreachable, prohibited) = match fam {
        Fam::V4 => ("198.51.100.77", "198.51.100.78"),
        Fam::V6 => ("[2001:db8:3::77]", "[2001:db8:3::78]"),
    };
    vec![
        (TCP_PORT, backend(fam, BACKEND_PORT), "tcp"),
        (UDP_PORT, backend(fam, UDP_PORT), "udp"),
        (TCP_UNREACHABLE, format!("{unreachable}:{BACKEND_PORT}"), "tcp"),
        (TCP_PROHIBITED, format!("{prohibited}:{BACKEND_PORT}"), "tcp"),
        (UDP_UNREACHABLE, format!("{unreachable}:{UDP_PORT}"), "udp"),
        (UDP_PROHIBITED, format!("{prohibited}:{UDP_PORT}"), "udp"),
    ]
}

/// A fresh Line whose router forwards through iptables or forwarder.
struct Sandbox {
    // Field order is drop order: the daemon stops before its namespaces go.
    daemon: Option<Daemon>,
    line: Line,
    via: Via,
    /// Probe source addresses used so far.
    sources: std::sync::atomic::AtomicU32,
}

impl Sandbox {
    fn new(via: Via) -> Self {
        let line = Line::new(1500).unwrap();
        let mtu = EGRESS_MTU.to_string();
        line.router.ip(&["link", "set", "rm", "mtu", &mtu]).unwrap();
        line.mid.ip(&["link", "set", "mr", "mtu", &mtu]).unwrap();
        for (kind, dst) in [
            ("unreachable", "198.51.100.77/32"),
            ("prohibit", "198.51.100.78/32"),
            ("unreachable", "2001:db8:3::77/128"),
            ("prohibit", "2001:db8:3::78/128"),
        ] {
            line.router.ip(&["route", "add", kind, dst]).unwrap();
        }
        // Each probe from an address of its own: the stack limits ICMP errors per
        // destination (a burst of about 5, then one a second, every kind together), which
        // would hold back the control's answers to one client address getting several;
        // forwarder limits per CPU only (docs/architecture.md).
        for i in 0..PROBE_SOURCES {
            line.client.ip(&["addr", "add", &format!("192.0.2.{}/24", 100 + i), "dev", "c0"]).unwrap();
            line.client.ip(&["addr", "add", &format!("2001:db8:1::{:x}/64", 0x100 + i), "dev", "c0", "nodad"]).unwrap();
        }
        let daemon = match via {
            Via::Iptables => {
                for fam in [Fam::V4, Fam::V6] {
                    let tool = if fam == Fam::V4 { "iptables" } else { "ip6tables" };
                    let mut rules: Vec<String> = forwards(fam)
                        .into_iter()
                        .map(|(port, to, proto)| {
                            format!(
                                "-t nat -A PREROUTING -d {} -p {proto} --dport {port} -j DNAT --to-destination {to}",
                                fam.listen()
                            )
                        })
                        .collect();
                    rules.push("-t nat -A POSTROUTING -o rm -j MASQUERADE".to_string());
                    // Inside the router's namespace only (nsenter --net).
                    for r in rules {
                        run_ok(line.router.cmd(tool).args(r.split(' '))).unwrap();
                    }
                }
                None
            }
            Via::XdpNative => Some(Self::forwarder(&line, "native")),
            Via::XdpGeneric => Some(Self::forwarder(&line, "generic")),
            Via::TcOnly => Some(Self::forwarder(&line, "off")),
        };
        Self { daemon, line, via, sources: Default::default() }
    }

    fn forwarder(line: &Line, xdp: &str) -> Daemon {
        let mut c =
            format!("[[interface]]\nname = \"rc\"\nxdp = \"{xdp}\"\n\n[[interface]]\nname = \"rm\"\nxdp = \"{xdp}\"\n");
        for fam in [Fam::V4, Fam::V6] {
            for (port, to, proto) in forwards(fam) {
                c.push_str(&format!(
                    "\n[[forward]]\nname = \"{proto}{port}-{fam:?}\"\nprotocol = \"{proto}\"\nlisten = \"{}\"\nbackend = \"{to}\"\n",
                    fam.to(port)
                ));
            }
        }
        Daemon::start(&line.router, &line.tag, &c).unwrap()
    }

    /// A client address no probe of this sandbox has used yet.
    fn fresh_source(&self, fam: Fam) -> SocketAddr {
        let i = self.sources.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(i < PROBE_SOURCES, "more probes than source addresses");
        fam.source(i)
    }

    /// A reason counter of the forwarder run (None for the iptables control).
    fn reason(&self, name: &str) -> Option<u64> {
        let s = self.daemon.as_ref()?.stats().unwrap();
        let r = s["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == name).unwrap_or_else(|| panic!("{s}"));
        Some(r["packets"].as_u64().unwrap())
    }

    /// Connections forwarder opened from interface traffic, over all forwards.
    fn new_connections(&self) -> Option<u64> {
        let s = self.daemon.as_ref()?.stats().unwrap();
        Some(s["forwards"].as_array().unwrap().iter().map(|f| f["new_connections"].as_u64().unwrap()).sum())
    }
}

fn setsockopt(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: valid socket and option buffer.
    let rc = unsafe { libc::setsockopt(fd, level, opt, (&value as *const libc::c_int).cast(), 4) };
    assert_eq!(rc, 0, "setsockopt {level}/{opt}: {}", std::io::Error::last_os_error());
}

fn getsockopt(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket and out-buffer of the advertised length.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&mut value as *mut libc::c_int).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt {level}/{opt}: {}", std::io::Error::last_os_error());
    value
}

/// An entry of a socket's error queue (IP_RECVERR / IPV6_RECVERR).
#[derive(Debug, PartialEq, Eq)]
struct QueuedError {
    errno: i32,
    origin: u8,
    icmp_type: u8,
    code: u8,
    /// The MTU of "too big".
    info: u32,
    /// The address the ICMP error came from (SO_EE_OFFENDER).
    offender: Option<IpAddr>,
    /// The original destination, port included, from the quoted header.
    dest: Option<SocketAddr>,
}

/// A sockaddr_in / sockaddr_in6 in raw memory.
///
/// # Safety
/// `p` points at a readable sockaddr of at least its family's size.
unsafe fn sockaddr(p: *const u8) -> Option<SocketAddr> {
    // SAFETY: as the caller promises.
    unsafe {
        match (*(p as *const libc::sockaddr)).sa_family as libc::c_int {
            libc::AF_INET => {
                let s = &*(p as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr));
                Some(SocketAddr::new(ip.into(), u16::from_be(s.sin_port)))
            }
            libc::AF_INET6 => {
                let s = &*(p as *const libc::sockaddr_in6);
                Some(SocketAddr::new(Ipv6Addr::from(s.sin6_addr.s6_addr).into(), u16::from_be(s.sin6_port)))
            }
            _ => None,
        }
    }
}

/// Waits up to `within` for an error on the socket and reads the first queued one.
fn read_error_queue(fd: RawFd, within: Duration) -> Option<QueuedError> {
    let mut pfd = libc::pollfd { fd, events: 0, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, within.as_millis() as libc::c_int) };
    if n <= 0 || pfd.revents & libc::POLLERR == 0 {
        return None;
    }
    // SAFETY: plain C structures, zero is valid for all of them; every pointer set below
    // points at a buffer of the length given with it, alive for the call.
    unsafe {
        let mut name: libc::sockaddr_storage = zeroed();
        let mut data = [0u8; 2048];
        let mut control = [0u64; 64];
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 64]>();
        if libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) < 0 {
            return None;
        }
        let dest = sockaddr((&name as *const libc::sockaddr_storage).cast());
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::SOL_IP && ty == libc::IP_RECVERR)
                || (level == libc::SOL_IPV6 && ty == libc::IPV6_RECVERR)
            {
                let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                let e = std::ptr::read_unaligned(ee);
                // SO_EE_OFFENDER: the sockaddr right after the structure.
                let offender = sockaddr(ee.add(1) as *const u8).map(|a| a.ip());
                return Some(QueuedError {
                    errno: e.ee_errno as i32,
                    origin: e.ee_origin,
                    icmp_type: e.ee_type,
                    code: e.ee_code,
                    info: e.ee_info,
                    offender,
                    dest,
                });
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        None
    }
}

/// A datagram to `to` from the client with TTL / hop limit `ttl` and IP_RECVERR on: the
/// error the socket gets within 3 s.
fn udp_probe(sb: &Sandbox, fam: Fam, to: SocketAddr, ttl: i32) -> Option<QueuedError> {
    let from = sb.fresh_source(fam);
    sb.line
        .client
        .run(move || {
            let s = UdpSocket::bind(from).unwrap();
            let (level, recverr) = fam.recverr();
            setsockopt(s.as_raw_fd(), level, recverr, 1);
            match fam {
                Fam::V4 => setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL, ttl),
                Fam::V6 => setsockopt(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, ttl),
            }
            s.send_to(b"probe", to).unwrap();
            read_error_queue(s.as_raw_fd(), Duration::from_secs(3))
        })
        .unwrap()
}

/// A TCP connect from the client with TTL / hop limit `ttl`: the errno it fails with.
fn tcp_connect(sb: &Sandbox, fam: Fam, to: SocketAddr, ttl: u32) -> Option<i32> {
    let from = sb.fresh_source(fam);
    sb.line
        .client
        .run(move || {
            let domain = if fam == Fam::V4 { Domain::IPV4 } else { Domain::IPV6 };
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.bind(&SockAddr::from(from)).unwrap();
            match fam {
                Fam::V4 => s.set_ttl_v4(ttl).unwrap(),
                Fam::V6 => s.set_unicast_hops_v6(ttl).unwrap(),
            }
            s.connect_timeout(&SockAddr::from(to), Duration::from_secs(3)).err().map(|e| e.raw_os_error().unwrap_or(-1))
        })
        .unwrap()
}

/// TTL / hop limit 1: time exceeded from the listen address, quoting the port dialled,
/// for a datagram and for a TCP SYN; nothing opened for them.
fn ttl_one_is_answered_with_time_exceeded_from_the_listen_address(sb: &Sandbox) {
    let via = sb.via;
    for fam in [Fam::V4, Fam::V6] {
        let before = sb.reason("icmp_time_exceeded");
        let e = udp_probe(sb, fam, fam.to(UDP_PORT), 1);
        let time_exceeded = if fam == Fam::V4 { 11 } else { 3 };
        assert_eq!(
            e,
            Some(QueuedError {
                errno: libc::EHOSTUNREACH,
                origin: fam.origin(),
                icmp_type: time_exceeded,
                code: 0,
                info: 0,
                offender: Some(fam.listen()),
                dest: Some(fam.to(UDP_PORT)),
            }),
            "{via:?} {fam:?}: time exceeded from the listen address, quoting the port dialled"
        );
        let after_udp = sb.reason("icmp_time_exceeded");
        if let (Some(b), Some(a)) = (before, after_udp) {
            assert_eq!(a, b + 1, "{via:?} {fam:?}: the datagram answered");
        }
        assert_eq!(
            tcp_connect(sb, fam, fam.to(TCP_PORT), 1),
            Some(libc::EHOSTUNREACH),
            "{via:?} {fam:?}: a TCP connect with TTL 1 fails"
        );
        // The SYN is answered; an answer that finds the socket busy in connect() is kept
        // as a soft error and the retransmitted SYN's answer ends it, with or without
        // forwarder: one or more.
        if let (Some(b), Some(a)) = (after_udp, sb.reason("icmp_time_exceeded")) {
            assert!(a > b, "{via:?} {fam:?}: the SYN answered");
        }
    }
    assert_eq!(sb.new_connections().unwrap_or(0), 0, "{via:?}: nothing opened for them");
}

/// Backends behind `unreachable` and `prohibit` routes: destination unreachable as from
/// the stack (host unreachable / administratively prohibited; IPv6 no route /
/// administratively prohibited), from the listen address. (A datagram each, and a TCP
/// connect to the unreachable one: the control's stack allows a client 5 route errors
/// in a burst, then one a second.)
fn unreachable_and_prohibit_routes_are_answered_as_the_stack_does(sb: &Sandbox) {
    let via = sb.via;
    for fam in [Fam::V4, Fam::V6] {
        // (UDP port, ICMP type, code, errno)
        let cases = match fam {
            Fam::V4 => [(UDP_UNREACHABLE, 3, 1, libc::EHOSTUNREACH), (UDP_PROHIBITED, 3, 13, libc::EHOSTUNREACH)],
            Fam::V6 => [(UDP_UNREACHABLE, 1, 0, libc::ENETUNREACH), (UDP_PROHIBITED, 1, 1, libc::EACCES)],
        };
        for (udp, icmp_type, code, errno) in cases {
            let before = sb.reason("icmp_unreachable");
            let e = udp_probe(sb, fam, fam.to(udp), 64);
            assert_eq!(
                e,
                Some(QueuedError {
                    errno,
                    origin: fam.origin(),
                    icmp_type,
                    code,
                    info: 0,
                    offender: Some(fam.listen()),
                    dest: Some(fam.to(udp)),
                }),
                "{via:?} {fam:?} :{udp}"
            );
            assert_eq!(sb.reason("icmp_unreachable"), before.map(|b| b + 1), "{via:?} {fam:?} :{udp}");
        }
        let before = sb.reason("icmp_unreachable");
        let errno = cases[0].3;
        let to = fam.to(TCP_UNREACHABLE);
        assert_eq!(tcp_connect(sb, fam, to, 64), Some(errno), "{via:?} {to}");
        // One or more (see the TTL scenario: a SYN may be sent again).
        assert!(sb.reason("icmp_unreachable") >= before.map(|b| b + 1), "{via:?} {to}");
    }
    assert_eq!(sb.new_connections().unwrap_or(0), 0, "{via:?}: nothing opened for them");
}

/// Uploads `n` bytes from the client through the TCP forward to a [`tcp_sink`]; returns
/// what the server counted and the path MTU the client's socket ended with (IP_MTU /
/// IPV6_MTU).
fn upload(sb: &Sandbox, fam: Fam, n: usize) -> (usize, i32) {
    let server = tcp_sink(&sb.line.server, backend(fam, BACKEND_PORT).parse().unwrap(), 1).unwrap();
    let to = fam.to(TCP_PORT);
    let got = sb
        .line
        .client
        .run(move || {
            let (count, s) = upload_to_sink(to, n);
            let mtu = match fam {
                Fam::V4 => getsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU),
                Fam::V6 => getsockopt(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU),
            };
            (count, mtu)
        })
        .unwrap();
    let counted = server.join().unwrap()[0].1;
    assert_eq!(counted, got.0, "the client got the server's count");
    got
}

/// A datagram with DF (IP_PMTUDISC_DO) larger than the egress MTU, from a connected UDP
/// socket: (the error queued, the errno of the same send once more).
fn udp_with_df(sb: &Sandbox, fam: Fam, payload: usize) -> (Option<QueuedError>, Option<i32>) {
    let from = sb.fresh_source(fam);
    sb.line
        .client
        .run(move || {
            let s = UdpSocket::bind(from).unwrap();
            s.connect(fam.to(UDP_PORT)).unwrap();
            let (level, recverr) = fam.recverr();
            setsockopt(s.as_raw_fd(), level, recverr, 1);
            match fam {
                Fam::V4 => setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO),
                Fam::V6 => {
                    setsockopt(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO)
                }
            }
            let big = vec![7u8; payload];
            s.send(&big).expect("fits the client's own link");
            let e = read_error_queue(s.as_raw_fd(), Duration::from_secs(3));
            (e, s.send(&big).err().and_then(|e| e.raw_os_error()))
        })
        .unwrap()
}

fn flush_route_cache(ns: &Netns) {
    ns.ip(&["route", "flush", "cache"]).unwrap();
    ns.ip(&["-6", "route", "flush", "cache"]).unwrap();
}

/// The client's link is 1500, the router's egress 1400: TCP (with DF, Linux's default)
/// learns the path MTU from "fragmentation needed" / "packet too big", and a datagram
/// with DF gets EMSGSIZE with the MTU in the error queue, then at once.
fn a_narrower_egress_is_discovered_by_tcp_and_by_datagrams_with_df(sb: &Sandbox) {
    let via = sb.via;
    for fam in [Fam::V4, Fam::V6] {
        let before = sb.reason("icmp_too_big");
        assert_eq!(upload(sb, fam, UPLOAD), (UPLOAD, EGRESS_MTU as i32), "{via:?} {fam:?}: upload, path MTU");
        if let (Some(b), Some(a)) = (before, sb.reason("icmp_too_big")) {
            assert!(a > b, "{via:?} {fam:?}: forwarder answered too big ({b} -> {a})");
        }
        // Forget the path MTU, for the datagram to find out again.
        flush_route_cache(&sb.line.client);
        let before = sb.reason("icmp_too_big");
        let (too_big, code) = if fam == Fam::V4 { (3, 4) } else { (2, 0) };
        let (e, again) = udp_with_df(sb, fam, 1450);
        assert_eq!(
            e,
            Some(QueuedError {
                errno: libc::EMSGSIZE,
                origin: fam.origin(),
                icmp_type: too_big,
                code,
                info: EGRESS_MTU,
                offender: Some(fam.listen()),
                dest: Some(fam.to(UDP_PORT)),
            }),
            "{via:?} {fam:?}: too big, with the egress MTU"
        );
        assert_eq!(again, Some(libc::EMSGSIZE), "{via:?} {fam:?}: the socket knows the path MTU now");
        if let (Some(b), Some(a)) = (before, sb.reason("icmp_too_big")) {
            assert_eq!(a, b + 1, "{via:?} {fam:?}: one datagram answered");
        }
    }
}

/// The largest length of a packet quoted by "too big" errors the client has received since
/// `socks` were opened (raw ICMP and ICMPv6 sockets: IPv4's total length, IPv6's payload
/// length + 40).
fn largest_quoted(socks: &(Socket, Socket)) -> usize {
    let mut largest = 0;
    for (s, v6) in [(&socks.0, false), (&socks.1, true)] {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while let Ok(n) = s.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            let b: Vec<u8> = buf[..n].iter().map(|x| unsafe { x.assume_init() }).collect();
            // Raw ICMP sockets get the IPv4 header, ICMPv6 ones the message alone.
            let icmp = if v6 { &b[..] } else { &b[((b[0] & 0x0f) as usize * 4)..] };
            let quote = &icmp[8..];
            if !v6 && icmp[0] == 3 && icmp[1] == 4 && quote.len() >= 4 {
                largest = largest.max(u16::from_be_bytes([quote[2], quote[3]]) as usize);
            }
            if v6 && icmp[0] == 2 && quote.len() >= 6 {
                largest = largest.max(u16::from_be_bytes([quote[4], quote[5]]) as usize + 40);
            }
        }
    }
    largest
}

/// GRO on the router's ingress veth: the upload's segments arrive merged into GSO packets
/// whose segments do not fit the egress. The router answers with "too big" quoting such a
/// packet (longer than any the client sent: the proof that a GSO packet was answered, not
/// dropped), and the uploads complete.
fn gso_packets_whose_segments_do_not_fit_are_answered(sb: &Sandbox) {
    let via = sb.via;
    flush_route_cache(&sb.line.client);
    sb.line.router.sh("ethtool -K rc gro on").unwrap();
    let k = sb.line.router.sh("ethtool -k rc").unwrap();
    assert!(k.contains("generic-receive-offload: on"), "{k}");
    let raw = sb
        .line
        .client
        .run(|| {
            let v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).unwrap();
            let v6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap();
            v4.set_nonblocking(true).unwrap();
            v6.set_nonblocking(true).unwrap();
            (v4, v6)
        })
        .unwrap();
    let before = sb.reason("icmp_too_big");
    for fam in [Fam::V4, Fam::V6] {
        assert_eq!(upload(sb, fam, UPLOAD), (UPLOAD, EGRESS_MTU as i32), "{via:?} {fam:?}: GRO, upload, path MTU");
    }
    let quoted = largest_quoted(&raw);
    assert!(quoted > 1500, "{via:?}: a GSO packet ({quoted} bytes quoted at most) was answered");
    if let (Some(b), Some(a)) = (before, sb.reason("icmp_too_big")) {
        assert!(a >= b + 2, "{via:?}: {b} -> {a}");
    }
}

/// An IPv4 datagram without DF larger than the egress MTU is fragmented by the router
/// (forwarder hands it to the stack through lo, whose accept_local it turns on while it
/// runs and off when it stops). Stops forwarder: the last scenario.
fn ipv4_without_df_larger_than_the_egress_is_fragmented(sb: &mut Sandbox) {
    let via = sb.via;
    let (tx, rx) = std::sync::mpsc::channel();
    let server = sb
        .line
        .server
        .spawn(move || {
            let s = UdpSocket::bind(backend(Fam::V4, UDP_PORT)).unwrap();
            tx.send(()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            s.send_to(format!("got {n}").as_bytes(), from).unwrap();
            n
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // The client sends it whole (having learned 1400 it would fragment it itself, and
    // forwarder leaves fragments to the stack).
    flush_route_cache(&sb.line.client);
    let before = (sb.reason("fib_frag_needed"), sb.reason("icmp_too_big"));
    let reply = sb
        .line
        .client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            setsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(&[9u8; 1450], Fam::V4.to(UDP_PORT)).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf).expect("the server's answer");
            (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
        })
        .unwrap();
    assert_eq!(reply, ("got 1450".to_string(), Fam::V4.to(UDP_PORT)), "{via:?}");
    assert_eq!(server.join().unwrap(), 1450);
    if let (Some(frag), Some(too_big)) = before {
        assert_eq!(sb.reason("fib_frag_needed"), Some(frag + 1), "{via:?}: handed to the stack");
        assert_eq!(sb.reason("icmp_too_big"), Some(too_big), "{via:?}");
    }
    let accept_local = || sb.line.router.sh("sysctl -n net.ipv4.conf.lo.accept_local").unwrap().trim().to_string();
    if let Some(d) = sb.daemon.as_mut() {
        assert_eq!(accept_local(), "1", "{via:?}: on while forwarder runs");
        assert!(d.stop().unwrap().success());
        assert_eq!(accept_local(), "0", "{via:?}: off again once it detached:\n{}", d.log());
    } else {
        assert_eq!(accept_local(), "0", "the control leaves it alone");
    }
}

/// Every scenario through one way, in one sandbox.
fn scenarios(via: Via) {
    let mut sb = Sandbox::new(via);
    ttl_one_is_answered_with_time_exceeded_from_the_listen_address(&sb);
    unreachable_and_prohibit_routes_are_answered_as_the_stack_does(&sb);
    a_narrower_egress_is_discovered_by_tcp_and_by_datagrams_with_df(&sb);
    gso_packets_whose_segments_do_not_fit_are_answered(&sb);
    if via != Via::Iptables {
        assert_eq!(sb.reason("rewrite_failed"), Some(0), "{via:?}");
    }
    ipv4_without_df_larger_than_the_egress_is_fragmented(&mut sb);
}

/// The control: the kernel's own answers through iptables DNAT + MASQUERADE.
#[test]
fn iptables_control() {
    scenarios(Via::Iptables);
}

#[test]
fn forwarder_xdp_native() {
    scenarios(Via::XdpNative);
}

#[test]
fn forwarder_xdp_generic() {
    scenarios(Via::XdpGeneric);
}

#[test]
fn forwarder_tc_only() {
    scenarios(Via::TcOnly);
}
