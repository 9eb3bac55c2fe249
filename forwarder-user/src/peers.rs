//! Same-switch peers: map entries, and the watch that keeps each peer's state in step with
//! the kernel's neighbour entry for it (direct while it answers ARP/ND, fallback otherwise):
//! neighbour events and states come from [`crate::netlink`].

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
};

use forwarder_common::{PEER_DIRECT, PEER_FALLBACK, PEER_PROBE_MARK, PeerKey, PeerValue};

use crate::maps::addr_bytes;

pub fn key_for(addr: IpAddr) -> PeerKey {
    let (addr, family) = addr_bytes(addr);
    PeerKey { addr, family, _pad: [0; 3] }
}

pub fn value_for(ifindex: u32, peer_id: u32, direct: bool) -> PeerValue {
    PeerValue { ifindex, peer_id, state: if direct { PEER_DIRECT } else { PEER_FALLBACK }, _pad: 0 }
}

/// Sends one datagram to the peer's discard port, marked so that the egress program sends
/// it direct even in fallback: the kernel then resolves the peer's neighbour entry again.
pub fn send_probe(address: IpAddr, interface: &str) -> std::io::Result<()> {
    let sock = match address {
        IpAddr::V4(_) => UdpSocket::bind("0.0.0.0:0")?,
        IpAddr::V6(_) => UdpSocket::bind("[::]:0")?,
    };
    let fd = sock.as_raw_fd();
    let mark = PEER_PROBE_MARK;
    // SAFETY: valid fd, option buffers of the advertised sizes.
    unsafe {
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, (&mark as *const u32).cast(), 4) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dev = interface.as_bytes();
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev.as_ptr().cast(), dev.len() as u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    sock.send_to(b"forwarder peer probe", SocketAddr::new(address, 9))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_both_families() {
        let k4 = key_for("198.51.100.20".parse().unwrap());
        assert_eq!((&k4.addr[..4], k4.family), (&[198, 51, 100, 20][..], forwarder_common::FAMILY_V4));
        let k6 = key_for("2001:db8::20".parse().unwrap());
        assert_eq!((k6.addr[0], k6.addr[15], k6.family), (0x20, 0x20, forwarder_common::FAMILY_V6));
    }
}
