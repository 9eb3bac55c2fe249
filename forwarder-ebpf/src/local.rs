//! Local forwards: cgroup socket-address hooks that rewrite where programs on this host
//! connect or send, so `localhost:3306` reaches the backend. The kernel then picks a
//! routable source address itself, which is why the 127.0.0.1 problem of an iptables
//! `nat OUTPUT` DNAT never arises. The hooks see sockets of every network namespace; only
//! those of this instance's namespace are touched.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use forwarder_common::{FAMILY_V4, FWD_FLAG_LOCAL, FwdKey, FwdValue, LocalOrig, LocalUdpKey};

use crate::{
    maps::{FWD_GLOBAL, FWD_LOCAL_CONN, FWD_LOCAL_UDP, FWD_RULES},
    stats,
};

#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let Some(g) = FWD_GLOBAL.get(0) else { return false };
    // SAFETY: helper on our own context.
    g.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == g.netns_cookie
}

/// The socket's destination as the program gave it: (address, port as on the wire).
#[inline(always)]
fn dest(ctx: &SockAddrContext) -> ([u8; 4], u16) {
    // SAFETY: reading context fields the hook allows to read.
    unsafe { ((*ctx.sock_addr).user_ip4.to_ne_bytes(), (*ctx.sock_addr).user_port as u16) }
}

#[inline(always)]
fn set_dest(ctx: &SockAddrContext, addr: [u8; 4], port_be: u16) {
    // SAFETY: the hook allows writing user_ip4/user_port.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr);
        (*ctx.sock_addr).user_port = port_be as u32;
    }
}

#[inline(always)]
fn addr16(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[inline(always)]
fn local_rule(ctx: &SockAddrContext, addr: [u8; 4], port_be: u16) -> Option<&'static FwdValue> {
    // SAFETY: reading a context field.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    let key = FwdKey { addr: addr16(addr), port_be, proto, family: FAMILY_V4 };
    // SAFETY: map value reference valid for this program run.
    unsafe { FWD_RULES.get(&key) }.filter(|f| f.flags & FWD_FLAG_LOCAL != 0 && f.family == FAMILY_V4)
}

#[inline(always)]
fn backend(f: &FwdValue) -> [u8; 4] {
    [f.backend_addr[0], f.backend_addr[1], f.backend_addr[2], f.backend_addr[3]]
}

/// connect(): TCP and connected UDP.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    if !ours(ctx) {
        return;
    }
    let (addr, port) = dest(ctx);
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(f) = local_rule(ctx, addr, port) else {
        // A socket connecting again elsewhere must not keep an old getpeername answer.
        let _ = FWD_LOCAL_CONN.remove(&cookie);
        return;
    };
    let orig = LocalOrig { addr: addr16(addr), port_be: port, family: FAMILY_V4, _pad: 0, forward_id: f.forward_id };
    set_dest(ctx, backend(f), f.backend_port_be);
    let _ = FWD_LOCAL_CONN.insert(&cookie, &orig, 0);
    stats::count_local_conn(f.forward_id);
}

/// getpeername(): what the program dialled, not the backend.
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) {
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied at once.
    if let Some(orig) = unsafe { FWD_LOCAL_CONN.get(&cookie) } {
        set_dest(ctx, [orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]], orig.port_be);
    }
}

/// sendmsg()/sendto() on unconnected UDP sockets.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) {
    if !ours(ctx) {
        return;
    }
    let (addr, port) = dest(ctx);
    let Some(f) = local_rule(ctx, addr, port) else { return };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalUdpKey {
        socket_cookie: cookie,
        backend_addr: f.backend_addr,
        backend_port_be: f.backend_port_be,
        family: FAMILY_V4,
        _pad: [0; 5],
    };
    let orig = LocalOrig { addr: addr16(addr), port_be: port, family: FAMILY_V4, _pad: 0, forward_id: f.forward_id };
    set_dest(ctx, backend(f), f.backend_port_be);
    // The first datagram of a socket to this forward counts as a local connection.
    if FWD_LOCAL_UDP.insert(&key, &orig, BPF_NOEXIST as u64).is_ok() {
        stats::count_local_conn(f.forward_id);
    }
}

/// recvmsg()/recvfrom() on unconnected UDP sockets: replies appear to come from the address
/// the program sent to.
#[inline(always)]
pub fn recvmsg4(ctx: &SockAddrContext) {
    let (addr, port) = dest(ctx);
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = LocalUdpKey {
        socket_cookie: cookie,
        backend_addr: addr16(addr),
        backend_port_be: port,
        family: FAMILY_V4,
        _pad: [0; 5],
    };
    // SAFETY: value copied at once.
    if let Some(orig) = unsafe { FWD_LOCAL_UDP.get(&key) } {
        set_dest(ctx, [orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]], orig.port_be);
    }
}
