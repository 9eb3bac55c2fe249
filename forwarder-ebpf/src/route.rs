//! Next-hop choice with bpf_fib_lookup, and whether XDP may send to the chosen device.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LOOKUP_SRC, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_jiffies64},
    programs::TcContext,
};
use forwarder_common::{
    FibMemoSlot, IFACE_TC_PEER, IFACE_XDP_EGRESS_OK, IFACE_XDP_GENERIC, PROTO_TCP, ROUTE_PORTS_IGNORED, fib_memo_slot,
    next_hop_current,
};

use crate::{
    conntrack::{Tuple, route_generation},
    maps::{FWD_FIB_MEMO, FWD_IFACES, FWD_ROUTE_FLAGS},
    parse::{Flow, L3_OFF, addr_words, copy_addr, load_addr, store_addr},
};

pub use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_BLACKHOLE as FIB_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED as FIB_FRAG_NEEDED,
    BPF_FIB_LKUP_RET_NO_NEIGH as FIB_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT as FIB_PROHIBIT,
    BPF_FIB_LKUP_RET_SUCCESS as FIB_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE as FIB_UNREACHABLE,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The FIB's answer for a rewritten packet.
#[repr(C)]
pub struct Fib {
    /// BPF_FIB_LKUP_RET_* (negative on a helper error).
    pub rc: i64,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Preferred source address of the route (when asked for), else zero.
    pub src: [u8; 16],
    /// The next hop's MTU when the answer is `FIB_FRAG_NEEDED` (the kernel's `mtu_result`).
    pub mtu: u16,
    /// Jiffies (low 32 bits) when the FIB gave this answer: now, or a memo's time
    /// ([`lookup_memo`]). A next hop cached from it ages from then.
    pub looked_up: u32,
}

/// Looks up the route for `to` as if the packet arrived on `ingress`. With `want_src` the
/// kernel also fills in the route's preferred source address (SNAT auto). `tot_len`: the L3
/// length the route's MTU (with its locked metric and learned exceptions) must take, see
/// [`check_len`]; 0 lets the kernel check the skb against the egress device's MTU instead.
#[inline(always)]
pub fn lookup<C: EbpfContext>(
    ctx: &C,
    ingress: u32,
    flow: &Flow,
    to: &Tuple,
    want_src: bool,
    tot_len: u16,
    p: &mut bpf_fib_lookup,
    out: &mut Fib,
) {
    // Cleared as eight 64-bit stores: `mem::zeroed()` compiles to a call of a byte-loop
    // memset subprogram, per packet (found by the benchmark's profile).
    const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == 64);
    let cells = p as *mut bpf_fib_lookup as *mut u64;
    let mut i = 0;
    while i < 8 {
        // SAFETY: p is the 8-aligned first field of the per-CPU Work area, 64 bytes long;
        // all-zero is a valid bpf_fib_lookup.
        unsafe { cells.add(i).write_volatile(0) };
        i += 1;
    }
    p.l4_protocol = flow.proto;
    p.sport = u16::from_ne_bytes(to.sport);
    p.dport = u16::from_ne_bytes(to.dport);
    p.__bindgen_anon_1.tot_len = tot_len;
    if flow.is_v6() {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = addr_words(&to.src);
        p.__bindgen_anon_4.ipv6_dst = addr_words(&to.dst);
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_2.tos = flow.tos;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([to.src[0], to.src[1], to.src[2], to.src[3]]);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([to.dst[0], to.dst[1], to.dst[2], to.dst[3]]);
    }
    p.ifindex = ingress;
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: p is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup_helper(ctx.as_ptr(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, flags) };
    out.rc = rc;
    // SAFETY: helper without arguments (inlined by the verifier).
    out.looked_up = unsafe { bpf_jiffies64() } as u32;
    out.ifindex = p.ifindex;
    out.smac = p.smac;
    out.dmac = p.dmac;
    // SAFETY: union member the kernel writes on FRAG_NEEDED (else it still holds tot_len).
    out.mtu = if rc == FIB_FRAG_NEEDED as i64 { unsafe { p.__bindgen_anon_1.mtu_result } } else { 0 };
    // The kernel fills the source in only when it found a route with a device; otherwise
    // the field still holds what we passed in. Its MTU check with a length comes first (a
    // FRAG_NEEDED answer then has no source); without one, it checks the skb afterwards.
    let routed = rc == FIB_SUCCESS as i64 || rc == FIB_NO_NEIGH as i64;
    let mut src = [0u64; 2];
    if want_src && (routed || (rc == FIB_FRAG_NEEDED as i64 && tot_len == 0)) {
        // SAFETY: union members written by the kernel for the family asked.
        if flow.is_v6() {
            let w = unsafe { p.__bindgen_anon_3.ipv6_src };
            let pair = |a: u32, b: u32| {
                let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
                u64::from_ne_bytes([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]])
            };
            src = [pair(w[0], w[1]), pair(w[2], w[3])];
        } else {
            let v4 = unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
            src[0] = u64::from_ne_bytes([v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 0]);
        }
    }
    store_addr(&mut out.src, src);
}

/// [`lookup`] for the full path, through this CPU's FIB memo (`FWD_FIB_MEMO`): a FIB answer
/// with a neighbour is kept per (source, destination, ingress, protocol, TOS, `want_src`)
/// and serves the next packet with the same question, a client's next connection to the
/// same backend, while the route generation is the one it was found in and it is younger
/// than a cached next hop may be (NH_MAX_AGE_JIFFIES), for packets no longer than the
/// length it passed. The FIB's question also has the ports, so the memo is used only while
/// userspace vouches that no rule and no multipath hash takes them (`ROUTE_PORTS_IGNORED`).
/// The lookup of a new flow was 12% of its cost (BPF_PROG_TEST_RUN profile).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn lookup_memo<C: EbpfContext>(
    ctx: &C,
    ingress: u32,
    flow: &Flow,
    to: &Tuple,
    want_src: bool,
    tot_len: u16,
    p: &mut bpf_fib_lookup,
    out: &mut Fib,
) {
    let usable = FWD_ROUTE_FLAGS.get(0).is_some_and(|f| *f & ROUTE_PORTS_IGNORED != 0);
    let slot = if usable {
        FWD_FIB_MEMO.get_ptr_mut(fib_memo_slot(addr_words(&to.src), addr_words(&to.dst), ingress, flow.proto))
    } else {
        None
    };
    // Read before the lookup: an answer found while a route change is being announced goes
    // in under the generation the announcement ends.
    let generation = route_generation();
    // SAFETY: helper without arguments (inlined by the verifier).
    let now = unsafe { bpf_jiffies64() } as u32;
    let tos = if flow.is_v6() { 0 } else { flow.tos };
    if let Some(s) = slot {
        // SAFETY: this CPU's slot; the programs that use it do not interleave on one CPU.
        let s: &FibMemoSlot = unsafe { &*s };
        if s.ifindex != 0
            && s.dst == to.dst
            && s.src == to.src
            && s.ingress == ingress
            && s.family == flow.family
            && s.proto == flow.proto
            && s.tos == tos
            && s.want_src == want_src as u8
            && tot_len <= s.len_ok
            && next_hop_current(s.generation, s.jiffies, generation, now)
        {
            out.rc = FIB_SUCCESS as i64;
            out.ifindex = s.ifindex;
            out.smac = s.smac;
            out.dmac = s.dmac;
            store_addr(&mut out.src, if want_src { load_addr(&s.pref_src) } else { [0; 2] });
            out.mtu = 0;
            out.looked_up = s.jiffies;
            return;
        }
    }
    lookup(ctx, ingress, flow, to, want_src, tot_len, p, out);
    if let Some(s) = slot {
        if out.rc == FIB_SUCCESS as i64 {
            // SAFETY: as above.
            let s: &mut FibMemoSlot = unsafe { &mut *s };
            copy_addr(&mut s.dst, &to.dst);
            copy_addr(&mut s.src, &to.src);
            copy_addr(&mut s.pref_src, &out.src);
            s.ingress = ingress;
            s.ifindex = out.ifindex;
            s.generation = generation;
            s.jiffies = now;
            s.dmac = out.dmac;
            s.smac = out.smac;
            s.len_ok = tot_len;
            s.family = flow.family;
            s.proto = flow.proto;
            s.tos = tos;
            s.want_src = want_src as u8;
        }
    }
}

/// The L3 length whose fit the FIB must check for a packet TC forwards: the packet's own,
/// or for a GSO packet (GRO merged it on ingress; it is segmented again at the egress) the
/// length of one segment, headers and `gso_size` bytes of payload, as the stack's
/// `skb_gso_validate_network_len` checks it. A GSO packet's own length is no measure: it
/// is far larger than any MTU, and the kernel's own check with no length passes every GSO
/// packet (`is_skb_forwardable`), even one whose segments do not fit.
#[inline(always)]
pub fn check_len(ctx: &TcContext, flow: &Flow) -> u16 {
    // SAFETY: reading a context field.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return flow.l3_len;
    }
    let headers = if flow.proto == PROTO_TCP {
        flow.l3_len - flow.tcp_payload
    } else {
        (flow.l4_off() - L3_OFF) as u16 + UDP_HEADER_LEN
    };
    let segment = headers as u32 + gso_size;
    if segment < flow.l3_len as u32 { segment as u16 } else { flow.l3_len }
}

const UDP_HEADER_LEN: u16 = 8;

/// TC ingress's redirect to `egress`: into the peer's ingress when `egress` is a veth to
/// another namespace (`IFACE_TC_PEER`: the packet skips this device's transmit and the
/// peer's backlog queue, as Cilium sends to its pods), else out of `egress`. Returns the
/// TC action.
#[inline(always)]
pub fn tc_redirect(egress: u32) -> i32 {
    // The flag must be current (the daemon's link watch keeps it so): the helper only records
    // the request and returns TC_ACT_REDIRECT, and the kernel drops the packet later, in
    // skb_do_redirect, if the peer is in this namespace; there is no error to fall back on.
    // SAFETY: a value copied.
    let peer = unsafe { FWD_IFACES.get(&egress) }.is_some_and(|c| c.flags & IFACE_TC_PEER != 0);
    // SAFETY: helper calls.
    unsafe {
        if peer {
            aya_ebpf::helpers::bpf_redirect_peer(egress, 0) as i32
        } else {
            aya_ebpf::helpers::bpf_redirect(egress, 0) as i32
        }
    }
}

/// XDP_REDIRECT delivers only when the receiver takes XDP frames (a veth peer needs an XDP
/// program or GRO), which the loader records per device. Generic XDP redirects skbs, which
/// every device takes, but only through the devmap, which holds the configured interfaces
/// (the same set as FWD_IFACES): to any other device the redirect would abort and lose the
/// packet, so TC sends it.
#[inline(always)]
pub fn xdp_can_send(ingress: u32, egress: u32) -> bool {
    // SAFETY: values are copied.
    let Some(out) = (unsafe { FWD_IFACES.get(&egress) }).map(|c| c.flags) else { return false };
    // SAFETY: as above.
    let generic = unsafe { FWD_IFACES.get(&ingress) }.map(|c| c.flags & IFACE_XDP_GENERIC != 0).unwrap_or(false);
    out & IFACE_XDP_EGRESS_OK != 0 || generic
}
