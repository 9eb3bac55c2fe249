//! Local forwards: cgroup socket-address hooks that rewrite where programs on this host
//! connect or send, so `localhost:3306` reaches the backend. The kernel then picks a
//! routable source address itself, which is why the 127.0.0.1 problem of an iptables
//! `nat OUTPUT` DNAT never arises. The hooks see sockets of every network namespace; only
//! those of this instance's namespace are touched.
//!
//! Dual-stack AF_INET6 sockets reach IPv4 through v4-mapped addresses (`::ffff:a.b.c.d`):
//! those take the IPv4 forwards, and the program sees mapped addresses. The kernel runs
//! connect6, getpeername6 and recvmsg6 for them with the mapped address, but hands a
//! datagram sent to one to `udp_sendmsg`, which runs sendmsg4 with the IPv4 address (and
//! refuses a mapped address written by sendmsg6): so sendmsg6 never sees one, and the
//! unconnected-UDP map holds IPv4 keys for them.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use forwarder_common::{
    DEFAULT_LOCAL_UDP_IDLE_S, FAMILY_V4, FAMILY_V6, FWD_FLAG_LOCAL, FwdKey, FwdValue, LocalOrig, LocalUdpKey,
    LocalUdpOrig, LocalUdpSend, Reason, mapped_of_v4, v4_of_mapped,
};

use crate::{
    backend::{self, Chosen},
    maps::{FWD_GLOBAL_V2, FWD_LOC_UDP_V2, FWD_LOCAL_CONN},
    rules, sources, stats,
};

#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let Some(g) = FWD_GLOBAL_V2.get(0) else { return false };
    // SAFETY: helper on our own context.
    g.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == g.netns_cookie
}

/// How long an exchange must be quiet before it may change address, in nanoseconds.
#[inline(always)]
fn udp_idle_ns() -> u64 {
    let s = FWD_GLOBAL_V2.get(0).map(|g| g.local_udp_idle_s).unwrap_or(0);
    (if s == 0 { DEFAULT_LOCAL_UDP_IDLE_S } else { s }) as u64 * 1_000_000_000
}

/// The socket's destination as the program gave it: (address, port as on the wire).
#[inline(always)]
fn dest(ctx: &SockAddrContext, v6: bool) -> ([u8; 16], u16) {
    // SAFETY: reading context fields the hook allows to read (user_ip6 in the *6 hooks).
    unsafe {
        let port = (*ctx.sock_addr).user_port as u16;
        if v6 {
            let w = (*ctx.sock_addr).user_ip6;
            let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
            ([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]], port)
        } else {
            let a = (*ctx.sock_addr).user_ip4.to_ne_bytes();
            ([a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], port)
        }
    }
}

#[inline(always)]
fn set_dest(ctx: &SockAddrContext, v6: bool, a: &[u8; 16], port_be: u16) {
    // SAFETY: the hooks allow writing user_ip4/user_ip6 and user_port.
    unsafe {
        if v6 {
            (*ctx.sock_addr).user_ip6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
        } else {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        }
        (*ctx.sock_addr).user_port = port_be as u32;
    }
}

#[inline(always)]
fn family(v6: bool) -> u8 {
    if v6 { FAMILY_V6 } else { FAMILY_V4 }
}

#[inline(always)]
fn local_rule(ctx: &SockAddrContext, v6: bool, addr: [u8; 16], port_be: u16) -> Option<&'static FwdValue> {
    // SAFETY: reading a context field.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    let mut key = FwdKey { addr, port_be, proto, family: family(v6) };
    rules::lookup(&mut key).filter(|f| {
        f.flags & FWD_FLAG_LOCAL != 0
            && f.family == family(v6)
            && sources::admits(f, family(v6), &loopback(v6), &mut sources::lookup_room())
    })
}

/// The source a forward's lists judge local programs by: the loopback address of the
/// family (a program's own source is not chosen yet at connect). A forward whose lists
/// refuse it leaves local programs' sockets alone (README, "Source lists").
#[inline(always)]
fn loopback(v6: bool) -> [u8; 16] {
    let mut a = [0u8; 16];
    if v6 {
        a[15] = 1;
    } else {
        a[0] = 127;
        a[3] = 1;
    }
    a
}

/// An address of a `v6` hook as the forwards see it: a v4-mapped address is IPv4
/// (returned as an IPv4 address field, with `false`); anything else is left as it is.
#[inline(always)]
fn as_forwards_see(v6: bool, addr: [u8; 16]) -> ([u8; 16], bool) {
    if v6 {
        if let Some(v4) = v4_of_mapped(&addr) {
            return (v4, false);
        }
    }
    (addr, v6)
}

/// An address of the forwards as the hook writes it: an IPv4 one v4-mapped when `mapped`
/// (a `v6` hook's v4-mapped destination), else as it is.
#[inline(always)]
fn for_hook(mapped: bool, addr: &[u8; 16]) -> [u8; 16] {
    if mapped { mapped_of_v4(addr) } else { *addr }
}

/// True when `addr`:`port_be` (the source of a datagram being received) is the peer the
/// socket is connected to.
#[inline(always)]
fn from_peer(ctx: &SockAddrContext, v6: bool, addr: &[u8; 16], port_be: u16) -> bool {
    // SAFETY: the hooks may read `sk` (never null in sock_addr programs), and of it the
    // peer's address and port.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() || (*sk).dst_port != port_be {
            return false;
        }
        if v6 {
            let w = (*sk).dst_ip6;
            w[0] == u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
                && w[1] == u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]])
                && w[2] == u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]])
                && w[3] == u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]])
        } else {
            (*sk).dst_ip4 == u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
        }
    }
}

/// The backend of a local socket's connection: chosen as for interface traffic, by the
/// Maglev table, with the socket's cookie in place of the client's address and port (a
/// connect has no source port yet), so a socket keeps its backend.
#[inline(always)]
fn choose(f: &'static FwdValue, cookie: u64, addr: &[u8; 16], port_be: u16, proto: u8) -> Option<Chosen> {
    let mut src = [0u8; 16];
    let c = cookie.to_ne_bytes();
    src[..8].copy_from_slice(&c);
    match backend::choose(f, || backend::hash_of(&src, addr, [0; 2], port_be.to_ne_bytes(), proto), port_be) {
        Ok(b) => Some(b),
        Err(r) => {
            stats::count_reason(r);
            None
        }
    }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: reading a context field.
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

/// connect(): TCP and connected UDP. A v4-mapped destination takes the IPv4 forwards and
/// becomes the mapped address of the backend. Returns false to refuse the connection
/// (EPERM): no backend of the forward takes new connections.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, v6: bool) -> bool {
    if !ours(ctx) {
        return true;
    }
    let (addr, port) = dest(ctx, v6);
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (rule_addr, rule_v6) = as_forwards_see(v6, addr);
    let Some(f) = local_rule(ctx, rule_v6, rule_addr, port) else {
        // A socket connecting again elsewhere must not keep an old getpeername answer.
        let _ = FWD_LOCAL_CONN.remove(&cookie);
        return true;
    };
    let Some(b) = choose(f, cookie, &rule_addr, port, protocol(ctx)) else {
        let _ = FWD_LOCAL_CONN.remove(&cookie);
        return false;
    };
    // What the program dialled, as its own family writes it (getpeername answers with it).
    let orig = LocalOrig { addr, port_be: port, family: family(v6), _pad: 0, forward_id: f.forward_id };
    set_dest(ctx, v6, &for_hook(v6 && !rule_v6, &b.addr), b.port_be);
    let _ = FWD_LOCAL_CONN.insert(&cookie, &orig, 0);
    stats::count_local_conn(f.forward_id, b.index);
    true
}

/// getpeername(): what the program dialled, not the backend.
#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map value reference valid for this program run.
    if let Some(orig) = unsafe { FWD_LOCAL_CONN.get(&cookie) } {
        if orig.family == family(v6) {
            set_dest(ctx, v6, &orig.addr, orig.port_be);
        }
    }
}

/// sendmsg()/sendto() with a destination (unconnected UDP, or a connected socket given
/// one). Returns false to refuse the datagram (EPERM): the socket is in a live exchange
/// with this backend through another listen address, and the answers of the two could not
/// be told apart (docs/architecture.md, "Local forwards").
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, v6: bool) -> bool {
    if !ours(ctx) {
        return true;
    }
    let (addr, port) = dest(ctx, v6);
    let Some(f) = local_rule(ctx, v6, addr, port) else { return true };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(b) = choose(f, cookie, &addr, port, protocol(ctx)) else { return false };
    let key = LocalUdpKey {
        socket_cookie: cookie,
        backend_addr: b.addr,
        backend_port_be: b.port_be,
        family: family(v6),
        _pad: [0; 5],
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let new = LocalUdpOrig {
        orig: LocalOrig { addr, port_be: port, family: family(v6), _pad: 0, forward_id: f.forward_id },
        last_ns: now,
    };
    match FWD_LOC_UDP_V2.get_ptr_mut(&key) {
        // SAFETY: map value pointer valid for this program run; an aligned u64 store.
        Some(e) => match unsafe { (*e).on_send(&addr, port, now, udp_idle_ns()) } {
            LocalUdpSend::Same => unsafe { (*e).last_ns = now },
            LocalUdpSend::Switch => {
                // A whole new element, so a concurrent recvmsg reads the old or the new.
                let _ = FWD_LOC_UDP_V2.insert(&key, &new, 0);
                stats::count_local_conn(f.forward_id, b.index);
            }
            LocalUdpSend::Refuse => {
                stats::count_reason(Reason::LocalUdpAmbiguous);
                return false;
            }
        },
        None => {
            // The first datagram of a socket to this backend counts as a local connection.
            if FWD_LOC_UDP_V2.insert(&key, &new, BPF_NOEXIST as u64).is_ok() {
                stats::count_local_conn(f.forward_id, b.index);
            } else if let Some(e) = FWD_LOC_UDP_V2.get_ptr(&key) {
                // Another thread of the program got there first: its address holds.
                // SAFETY: map value pointer valid for this program run.
                if unsafe { (*e).on_send(&addr, port, now, udp_idle_ns()) } != LocalUdpSend::Same {
                    stats::count_reason(Reason::LocalUdpAmbiguous);
                    return false;
                }
            }
        }
    }
    set_dest(ctx, v6, &b.addr, b.port_be);
    true
}

/// recvmsg()/recvfrom() with a source address: datagrams from a backend appear to come
/// from the address the program connected or sent to.
#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, v6: bool) {
    let (addr, port) = dest(ctx, v6);
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A connected socket (glibc's resolver calls recvfrom on one): from its peer.
    // SAFETY: map value reference valid for this program run.
    if let Some(orig) = unsafe { FWD_LOCAL_CONN.get(&cookie) } {
        if orig.family == family(v6) && from_peer(ctx, v6, &addr, port) {
            set_dest(ctx, v6, &orig.addr, orig.port_be);
            return;
        }
    }
    let (key_addr, key_v6) = as_forwards_see(v6, addr);
    let key = LocalUdpKey {
        socket_cookie: cookie,
        backend_addr: key_addr,
        backend_port_be: port,
        family: family(key_v6),
        _pad: [0; 5],
    };
    let Some(e) = FWD_LOC_UDP_V2.get_ptr_mut(&key) else { return };
    // SAFETY: map value pointer valid for this program run; an answer keeps the exchange
    // live (an aligned u64 store).
    let orig = unsafe {
        (*e).last_ns = bpf_ktime_get_ns();
        (*e).orig
    };
    if orig.family == family(key_v6) {
        set_dest(ctx, v6, &for_hook(v6 && !key_v6, &orig.addr), orig.port_be);
    }
}
