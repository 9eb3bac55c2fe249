//! A client for local-forward tests, run as its own process so it can sit in a test cgroup
//! and network namespace. Prints one JSON line; on failure {"error": ...} and exit 1.
//!
//! - `fwt-probe tcp ADDR:PORT MESSAGE`: {"peer": getpeername, "reply": the reply as text}.
//! - `fwt-probe udp ADDR:PORT MESSAGE`: an unconnected socket, sendto and recvfrom:
//!   {"peer": the datagram's source, "reply": ...}.
//! - `fwt-probe udp-connected ADDR:PORT MESSAGE`: connect(), then three exchanges as glibc's
//!   resolver might make them: send()/recv(), write()/recvfrom(), send()/recvmsg():
//!   {"peer": getpeername, "replies": [3 texts], "recvfrom": source, "recvmsg": source}.
//! - `fwt-probe udp-seq MESSAGE STEP...`: one unconnected socket; a STEP is `ADDR:PORT`
//!   (sendto "MESSAGE <i>", then recvfrom) or `sleep=MS`: {"steps": [{"to", "from", "reply"}
//!   or {"to", "error", "errno"}]}.
//!
//! IPv6 addresses give AF_INET6 sockets with IPV6_V6ONLY off (dual stack, as Java's are),
//! so `[::ffff:127.0.0.1]:53` is IPv4 through an IPv6 socket.
use std::{
    io::{Read, Write},
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use serde_json::{Value, json};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("tcp") if args.len() == 4 => addr(&args[2]).and_then(|to| tcp(to, &args[3])),
        Some("udp") if args.len() == 4 => addr(&args[2]).and_then(|to| udp(to, &args[3])),
        Some("udp-connected") if args.len() == 4 => addr(&args[2]).and_then(|to| udp_connected(to, &args[3])),
        Some("udp-seq") if args.len() >= 4 => udp_seq(&args[2], &args[3..]),
        _ => {
            eprintln!(
                "usage: fwt-probe tcp|udp|udp-connected ADDR:PORT MESSAGE | fwt-probe udp-seq MESSAGE \
                 ADDR:PORT|sleep=MS..."
            );
            std::process::exit(2);
        }
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({"error": e.to_string()}));
            std::process::exit(1);
        }
    }
}

fn addr(s: &str) -> std::io::Result<SocketAddr> {
    s.parse().map_err(|_| std::io::Error::other(format!("{s:?} is not ADDR:PORT")))
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

fn set_opt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: T) -> std::io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (&value as *const T).cast(), size_of::<T>() as libc::socklen_t)
    })
    .map(|_| ())
}

/// A socket of `to`'s family; AF_INET6 ones with IPV6_V6ONLY off. Sends, receives and a
/// blocking connect() give up after 3 s.
fn socket(to: &SocketAddr, ty: libc::c_int) -> std::io::Result<OwnedFd> {
    let family = if to.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall; the descriptor is owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(cvt(libc::socket(family, ty | libc::SOCK_CLOEXEC, 0))?) };
    if to.is_ipv6() {
        set_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0 as libc::c_int)?;
    }
    let t = libc::timeval { tv_sec: 3, tv_usec: 0 };
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, t)?;
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, t)?;
    Ok(fd)
}

fn to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (s, len as libc::socklen_t)
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6 = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, sin6.sin6_scope_id)))
        }
        _ => None,
    }
}

fn connect(fd: &OwnedFd, to: &SocketAddr) -> std::io::Result<()> {
    let (sa, len) = to_sockaddr(to);
    // SAFETY: `sa` holds `len` bytes of a sockaddr.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), (&sa as *const libc::sockaddr_storage).cast(), len) }).map(|_| ())
}

fn tcp(to: SocketAddr, msg: &str) -> std::io::Result<Value> {
    let fd = socket(&to, libc::SOCK_STREAM)?;
    connect(&fd, &to)?;
    let mut s = TcpStream::from(fd);
    // Before the close: a fully closed socket has no peer any more.
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(json!({"peer": peer.to_string(), "reply": reply}))
}

/// An unbound UDP socket of `to`'s family, bound to the wildcard address.
fn udp_socket(to: &SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::from(socket(to, libc::SOCK_DGRAM)?);
    let any: SocketAddr = if to.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.expect("literal");
    let (sa, len) = to_sockaddr(&any);
    // SAFETY: `sa` holds `len` bytes of a sockaddr.
    cvt(unsafe { libc::bind(s.as_raw_fd(), (&sa as *const libc::sockaddr_storage).cast(), len) })?;
    Ok(s)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn udp(to: SocketAddr, msg: &str) -> std::io::Result<Value> {
    let s = udp_socket(&to)?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok(json!({"peer": from.to_string(), "reply": text(&buf[..n])}))
}

/// recvmsg() with a msg_name: the datagram and its source as the kernel reports it.
fn recvmsg(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, Option<SocketAddr>)> {
    // SAFETY: all-zero is valid for both.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: msg points at live buffers of the sizes it gives.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize, from_sockaddr(&name)))
}

fn udp_connected(to: SocketAddr, msg: &str) -> std::io::Result<Value> {
    let fd = socket(&to, libc::SOCK_DGRAM)?;
    connect(&fd, &to)?;
    let s = UdpSocket::from(fd);
    let peer = s.peer_addr()?;
    let mut buf = [0u8; 2048];
    s.send(format!("{msg} send").as_bytes())?;
    let n = s.recv(&mut buf)?;
    let mut replies = vec![text(&buf[..n])];
    let w = format!("{msg} write");
    // SAFETY: writes from a live buffer of the given length.
    if unsafe { libc::write(s.as_raw_fd(), w.as_ptr().cast(), w.len()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (n, from_recvfrom) = s.recv_from(&mut buf)?;
    replies.push(text(&buf[..n]));
    s.send(format!("{msg} send").as_bytes())?;
    let (n, from_recvmsg) = recvmsg(&s, &mut buf)?;
    replies.push(text(&buf[..n]));
    Ok(json!({
        "peer": peer.to_string(),
        "replies": replies,
        "recvfrom": from_recvfrom.to_string(),
        "recvmsg": from_recvmsg.map(|a| a.to_string()),
    }))
}

fn udp_seq(msg: &str, steps: &[String]) -> std::io::Result<Value> {
    let first = steps.iter().find(|s| !s.starts_with("sleep=")).ok_or(std::io::Error::other("no address"))?;
    let s = udp_socket(&addr(first)?)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    for (i, step) in steps.iter().enumerate() {
        if let Some(ms) = step.strip_prefix("sleep=") {
            std::thread::sleep(Duration::from_millis(ms.parse().map_err(std::io::Error::other)?));
            continue;
        }
        let to = addr(step)?;
        let res = s.send_to(format!("{msg} {i}").as_bytes(), to).and_then(|_| s.recv_from(&mut buf));
        out.push(match res {
            Ok((n, from)) => json!({"to": step, "from": from.to_string(), "reply": text(&buf[..n])}),
            Err(e) => json!({"to": step, "error": e.to_string(), "errno": e.raw_os_error()}),
        });
    }
    Ok(json!({ "steps": out }))
}
