//! Facts about the host's network namespace: interfaces and local addresses.

use std::net::IpAddr;

use crate::error::{Error, Result};

pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| Error::Interface {
        name: name.to_string(),
        message: format!("not found in this network namespace ({e})"),
    })
}

/// True for a veth device (its far end only takes XDP frames if it runs XDP or GRO).
pub fn is_veth(name: &str) -> bool {
    // /sys/class/net/X/... has no "kind"; the driver name from ethtool's ioctl is "veth".
    std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", name])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.get(0)?.get("linkinfo")?.get("info_kind")?.as_str().map(|k| k == "veth"))
        .unwrap_or(false)
}

/// Every address configured in this network namespace (for wildcard listen addresses).
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(|e| Error::Io(e.into()))? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}
