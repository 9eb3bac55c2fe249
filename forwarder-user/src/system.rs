//! Facts about the host's network namespace: interfaces and local addresses.

use std::net::IpAddr;

use crate::{
    error::{Error, Result},
    netlink,
};

/// The device called `name` (rtnetlink), as an interface error if this namespace has none.
pub fn link(name: &str) -> Result<netlink::Link> {
    netlink::link(name).map_err(|e| Error::Interface {
        name: name.to_string(),
        message: match e {
            netlink::Error::NoSuchLink(_) => "not found in this network namespace".to_string(),
            e => e.to_string(),
        },
    })
}

pub fn ifindex(name: &str) -> Result<u32> {
    link(name).map(|l| l.index)
}

/// Every address configured in this network namespace (for wildcard listen addresses).
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    Ok(netlink::addresses()?)
}

/// Whether `net.ipv4.conf.<dev>.route_localnet` (or `.all.`) lets packets from `dev`
/// carry a loopback destination into the stack.
pub fn route_localnet(dev: &str) -> bool {
    let on = |d: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{d}/route_localnet"))
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    };
    on("all") || on(dev)
}

/// Cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14+): what
/// the cgroup hooks compare to keep to this instance's namespace.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd and an out-buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// `net.ipv4.conf.lo.accept_local` of this network namespace: lets the stack take packets
/// with one of this host's addresses as source when they arrive on the loopback device.
const LO_ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";

/// Whether `net.ipv4.conf.lo.accept_local` is on.
pub fn lo_accept_local() -> Result<bool> {
    Ok(std::fs::read_to_string(LO_ACCEPT_LOCAL)?.trim() != "0")
}

pub fn set_lo_accept_local(on: bool) -> Result<()> {
    std::fs::write(LO_ACCEPT_LOCAL, if on { "1" } else { "0" })?;
    Ok(())
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| std::path::PathBuf::from(dir))
    })
}

/// Filesystems forwarder needs (bpffs for pins, cgroup2 for local forwards) that the host
/// has mounted but this process cannot see: its mount namespace is not PID 1's and lacks
/// them, as under `ip netns exec`, which remounts /sys privately. Returns (fstype, host
/// mount point) pairs; empty when nothing is hidden (or in a container, whose PID 1 shares
/// its mount namespace).
pub fn hidden_host_mounts() -> Vec<(&'static str, String)> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if ns("self") == ns("1") {
        return Vec::new();
    }
    let of = |pid: &str, fstype: &str| -> Vec<String> {
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap_or_default();
        mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_, dir, t) = (f.next()?, f.next()?, f.next()?);
                (t == fstype).then(|| dir.to_string())
            })
            .collect()
    };
    let mut hidden = Vec::new();
    for fstype in ["bpf", "cgroup2"] {
        let ours = of("self", fstype);
        if ours.is_empty()
            && let Some(host) = of("1", fstype).into_iter().next()
        {
            hidden.push((fstype, host));
        }
    }
    hidden
}

/// This namespace's ephemeral port range (`net.ipv4.ip_local_port_range`, which IPv6 shares):
/// the ports the kernel picks for the host's own outgoing connections.
pub fn local_port_range() -> Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").map_err(Error::Io)?;
    parse_port_range_sysctl(&text).ok_or_else(|| {
        Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("ip_local_port_range: {text:?}")))
    })
}

fn parse_port_range_sysctl(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>());
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ephemeral_range_parses_as_the_kernel_writes_it() {
        assert_eq!(super::parse_port_range_sysctl("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(super::parse_port_range_sysctl("1024 1024"), Some((1024, 1024)));
        assert_eq!(super::parse_port_range_sysctl("9 1"), None);
        assert_eq!(super::parse_port_range_sysctl(""), None);
    }
}
