//! Sockets of the host itself, looked up in the packet's network namespace: a forwarded
//! flow never takes a tuple a host socket uses, a datagram that belongs to the host's own
//! conversation is left to it, and a TCP backend on loopback gets its packets assigned.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_TCP_LISTEN, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use forwarder_common::{FAMILY_V6, PROTO_TCP};

/// The lookup table of the namespace of the packet's device (BPF_F_CURRENT_NETNS).
const CURRENT_NETNS: u64 = -1i64 as u64;
const TUPLE_V4_LEN: u32 = 12;
const TUPLE_V6_LEN: u32 = 36;

/// A packet's tuple as the socket lookup takes it: addresses and ports as on the wire.
#[inline(always)]
fn tuple(family: u8, src: &[u8; 16], dst: &[u8; 16], sport: [u8; 2], dport: [u8; 2]) -> (bpf_sock_tuple, u32) {
    // SAFETY: a plain-data union; every byte is written below for the variant used.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
    if family == FAMILY_V6 {
        // SAFETY: writing the variant used.
        let v6 = unsafe { &mut t.__bindgen_anon_1.ipv6 };
        v6.saddr = [word(src, 0), word(src, 1), word(src, 2), word(src, 3)];
        v6.daddr = [word(dst, 0), word(dst, 1), word(dst, 2), word(dst, 3)];
        v6.sport = u16::from_ne_bytes(sport);
        v6.dport = u16::from_ne_bytes(dport);
        (t, TUPLE_V6_LEN)
    } else {
        // SAFETY: writing the variant used.
        let v4 = unsafe { &mut t.__bindgen_anon_1.ipv4 };
        v4.saddr = word(src, 0);
        v4.daddr = word(dst, 0);
        v4.sport = u16::from_ne_bytes(sport);
        v4.dport = u16::from_ne_bytes(dport);
        (t, TUPLE_V4_LEN)
    }
}

/// Whether a host socket would take a packet with this tuple: for TCP any socket (an
/// established or time-wait one, a listener, a request), for UDP a bound or connected one.
/// With `connected_only`, only a socket connected to exactly this peer counts (UDP).
/// `ctx`: the program's context.
#[inline(always)]
pub fn host_socket(
    ctx: *mut core::ffi::c_void,
    proto: u8,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    connected_only: bool,
) -> bool {
    let (mut t, len) = tuple(family, src, dst, sport, dport);
    // SAFETY: helper calls with a tuple on the stack; a found socket is released below.
    let sk: *mut bpf_sock = unsafe {
        if proto == PROTO_TCP {
            bpf_skc_lookup_tcp(ctx, &mut t, len, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(ctx, &mut t, len, CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, read then released.
    let connected = unsafe { (*sk).dst_port } != 0;
    // SAFETY: as above.
    unsafe { bpf_sk_release(sk as *mut _) };
    connected || !connected_only
}

/// Hands a TCP packet of a connection to a loopback backend to the backend's listener
/// (TC ingress, `bpf_sk_assign`, as a transparent proxy's socket gets its packets): the
/// packet, already rewritten to `dst` (the address the client dialled, since a loopback
/// destination is a martian on an interface) and the backend's port, names an address the
/// listener on `backend` is not bound to. A socket of the packet's own tuple (a request, a
/// connection, a time-wait) takes it without help and is left to; so is a packet for which
/// no listener exists (the stack refuses it as it would).
#[inline(always)]
pub fn assign_listener(
    ctx: &TcContext,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    backend: &[u8; 16],
) {
    let (mut t, len) = tuple(family, src, dst, sport, dport);
    // SAFETY: helper calls with a tuple on the stack; a found socket is released below.
    let own = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0) };
    if !own.is_null() {
        // SAFETY: a socket the lookup returned, read then released.
        let listening = unsafe { (*own).state } == BPF_TCP_LISTEN;
        // SAFETY: as above.
        unsafe { bpf_sk_release(own as *mut _) };
        if !listening {
            return;
        }
    }
    let (mut t, len) = tuple(family, src, backend, sport, dport);
    // SAFETY: as above; a full socket (the listener), released below.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return;
    }
    // SAFETY: a socket the lookup returned; the assignment takes its own reference.
    unsafe {
        if (*sk).state == BPF_TCP_LISTEN {
            bpf_sk_assign(ctx.as_ptr(), sk as *mut _, 0);
        }
        bpf_sk_release(sk as *mut _);
    }
}
