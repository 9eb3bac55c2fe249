//! Keeps the fast path's cached next hops honest: every routing, neighbour, link or address
//! change the kernel announces on rtnetlink bumps the route generation (`FWD_ROUTE_GEN`),
//! so each connection's next packet takes the full path with a fresh FIB lookup. Without
//! this watch a cached next hop still expires after `NH_MAX_AGE_JIFFIES` (about a second).

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tracing::{debug, warn};

use crate::state::State;

/// rtnetlink multicast groups (linux/rtnetlink.h, the legacy RTMGRP_* bits).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
const GROUPS: u32 =
    RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;

/// How often the watch looks at its stop flag while no event arrives.
const POLL: Duration = Duration::from_millis(200);

/// An rtnetlink socket subscribed to the route-relevant groups of the current namespace.
pub fn subscribe() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; the kernel picks the port id.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = GROUPS;
    // SAFETY: addr is a valid sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: POLL.as_micros() as libc::suseconds_t };
    // SAFETY: valid option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Waits for the next batch of events: true when at least one arrived (or some were lost,
/// which counts as a change), false on timeout.
fn next_batch(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = false;
    let mut flags = 0;
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), flags) };
        if n >= 0 {
            got = true;
            flags = libc::MSG_DONTWAIT; // drain what is queued, then bump once
            continue;
        }
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(got),
            // The socket's queue overflowed: events were lost, so assume a change.
            Some(libc::ENOBUFS) => Ok(true),
            _ => Err(e),
        };
    }
}

/// Runs the watch in its own thread until `stop`; `on_bump` runs after each bump.
pub fn spawn(
    pin: PathBuf,
    stop: Arc<AtomicBool>,
    on_bump: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let fd = subscribe()?;
    Ok(std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::SeqCst) {
            match next_batch(&fd, &mut buf) {
                Ok(false) => {}
                Ok(true) => match State::open(&pin).and_then(|s| s.bump_route_generation()) {
                    Ok(generation) => {
                        on_bump();
                        debug!(generation, "routes or neighbours changed: cached next hops invalidated");
                    }
                    Err(e) => warn!("route generation: {e}"),
                },
                Err(e) => {
                    warn!("route watch stopped ({e}); cached next hops now expire by age only");
                    return;
                }
            }
        }
    }))
}
