//! Next-hop choice with bpf_fib_lookup, and whether XDP may send to the chosen device.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LOOKUP_SRC, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup_helper,
};
use forwarder_common::{IFACE_XDP_EGRESS_OK, IFACE_XDP_GENERIC};

use crate::{conntrack::Tuple, maps::FWD_IFACES, parse::Ipv4Flow};

pub use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED as FIB_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH as FIB_NO_NEIGH,
    BPF_FIB_LKUP_RET_SUCCESS as FIB_SUCCESS,
};

const AF_INET: u8 = 2;

/// The FIB's answer for a rewritten packet.
pub struct Fib {
    /// BPF_FIB_LKUP_RET_* (negative on a helper error).
    pub rc: i64,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Preferred source address of the route (when asked for), else zero.
    pub src: [u8; 4],
}

/// Looks up the route for `to` as if the packet arrived on `ingress`. With `want_src` the
/// kernel also fills in the route's preferred source address (SNAT auto).
#[inline(always)]
pub fn lookup<C: EbpfContext>(ctx: &C, ingress: u32, flow: &Ipv4Flow, to: &Tuple, want_src: bool) -> Fib {
    // SAFETY: plain-old-data C struct, all-zero is a valid starting value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = flow.proto;
    p.sport = u16::from_ne_bytes(to.sport);
    p.dport = u16::from_ne_bytes(to.dport);
    p.__bindgen_anon_1.tot_len = flow.tot_len;
    p.__bindgen_anon_2.tos = flow.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(to.src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(to.dst);
    p.ifindex = ingress;
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: p is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup_helper(ctx.as_ptr(), &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, flags) };
    // SAFETY: union members written by the kernel for AF_INET.
    let src = unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    Fib { rc, ifindex: p.ifindex, smac: p.smac, dmac: p.dmac, src: if want_src { src } else { [0; 4] } }
}

/// XDP_REDIRECT delivers only when the receiver takes XDP frames (a veth peer needs an XDP
/// program or GRO), which the loader records per device. Generic XDP redirects skbs, which
/// every device takes.
#[inline(always)]
pub fn xdp_can_send(ingress: u32, egress: u32) -> bool {
    // SAFETY: values are copied.
    let flags_of = |i: u32| unsafe { FWD_IFACES.get(&i) }.map(|c| c.flags).unwrap_or(0);
    flags_of(egress) & IFACE_XDP_EGRESS_OK != 0 || flags_of(ingress) & IFACE_XDP_GENERIC != 0
}
