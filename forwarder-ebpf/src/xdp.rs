//! The XDP program: the established-flow fast path (fastpath.rs) first, then the full
//! path, which finishes a packet only when it can do all of it and otherwise hands it to
//! the TC program untouched (docs/architecture.md, "Why XDP hands packets to TC").

use aya_ebpf::{macros::xdp, programs::XdpContext};
use forwarder_common::Reason;

use crate::{
    conntrack::{self, NextHopToCache},
    csum, fastpath, fastpath6, host, l2,
    maps::FWD_TX_PORTS,
    nat,
    parse::{self, FRAG_NONE, L3Dst},
    peer,
    route::{self, FIB_SUCCESS},
    stats, verdict,
    work::{self, Work},
};

#[xdp]
pub fn forwarder_xdp(ctx: XdpContext) -> u32 {
    let Some(w) = work::this_cpu() else {
        return verdict::xdp(&ctx, Err(Reason::Malformed));
    };
    let fast = if fastpath6::is_v6(&ctx) {
        fastpath6::try_cached6_out_of_line(ctx.ctx, &mut w.headers6)
    } else {
        fastpath::try_cached_out_of_line(ctx.ctx)
    };
    if fast >= 1 << 32 {
        return verdict::xdp(&ctx, verdict::unpack(fast));
    }
    not_cached(ctx.ctx, fast as u32, w)
}

/// Everything after the fast path, in its own frame (the fast path's stack and the full
/// path's would not fit in one): `how` is what the fast path found (`fastpath::NOT_CACHED_*`).
#[inline(never)]
fn not_cached(raw: *mut aya_ebpf::bindings::xdp_md, how: u32, w: &mut Work) -> u32 {
    let ctx = XdpContext::new(raw);
    let result = match how {
        fastpath::NOT_CACHED_NO_MATCH => Err(Reason::NoRule),
        // A forward's packet with a CHECKSUM_PARTIAL seed: TC's to finish.
        fastpath::NOT_CACHED_TO_TC => Err(Reason::XdpToTc),
        // One call: inlined at two, the full path would be verified twice.
        _ => try_xdp(&ctx, how == fastpath::NOT_CACHED_UNTRACKED, w),
    };
    let outcome = match result {
        // Peer delivery needs bpf_redirect_neigh, which only TC has.
        Err(Reason::NoRule | Reason::NotTcpUdp) if peer::addressed_to_peer(&ctx) => Err(Reason::XdpToTc),
        // Translating ICMP errors needs the skb helpers: TC does it; TC answers a refused
        // connection too.
        Err(Reason::IcmpError | Reason::NoBackend) => Err(Reason::XdpToTc),
        // A priority tag is the stack's untagged traffic: TC takes it once it is removed.
        Err(Reason::Vlan) if l2::priority_tagged(&ctx) => Err(Reason::XdpToTc),
        other => other,
    };
    verdict::xdp(&ctx, outcome)
}

/// The XDP fast path: it finishes a packet only when it can do all of it (full checksum,
/// FIB answer with a neighbour, an egress that takes XDP frames); otherwise the packet goes
/// untouched to the TC program, so no state is committed twice. Connections keep the
/// next hop found here for the fast path (fastpath.rs, fastpath6.rs). `untracked`: the fast path found no connection.
#[inline(always)]
fn try_xdp(ctx: &XdpContext, untracked: bool, w: &mut Work) -> verdict::Outcome {
    parse::parse_flow(ctx, &mut w.flow)?;
    // Fragments of TCP/UDP datagrams are TC's: a later fragment needs its first fragment's
    // record, and in a driver's batch XDP may see a later frame before TC has seen an
    // earlier one; TC, in the stack, takes them in the order they came.
    if w.flow.frag != FRAG_NONE {
        return Err(Reason::XdpToTc);
    }
    let mut plan = conntrack::classify(&w.flow, untracked, &mut w.source)?;
    // A backend on this host: TC hands the packet to the stack (see host.rs).
    if host::is_host(&plan) || csum::looks_partial(&w.flow) || w.flow.ttl <= 1 {
        return Err(Reason::XdpToTc);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let (counted, want_src) = conntrack::target_of(&plan, &w.flow, &mut w.to);
    if peer::enabled() && peer::lookup(&L3Dst::of_flow_to(&w.flow, w.to.dst)).is_some() {
        return Err(Reason::XdpToTc);
    }
    route::lookup_memo(ctx, ingress, &w.flow, &w.to, want_src, w.flow.l3_len, &mut w.params, &mut w.fib);
    if w.fib.rc != FIB_SUCCESS as i64 || !route::xdp_can_send(ingress, w.fib.ifindex) {
        return Err(Reason::XdpToTc);
    }
    // A new flow's original entry goes in with its next hop (no lookup again after it).
    let hop = NextHopToCache { len_ok: w.flow.l3_len, xdp_ok: true };
    w.hop = hop;
    conntrack::commit(ctx, &mut plan, &w.flow, &w.fib, &w.to, &mut w.new, &w.hop)?;
    if let Some(entry) = conntrack::tracked_entry(plan) {
        conntrack::cache_next_hop(entry, &w.flow, &w.new, &w.fib, hop);
    }
    nat::rewrite_direct(ctx, &w.flow, &w.new, true)?;
    l2::set_macs_xdp(ctx, w.fib.dmac, w.fib.smac)?;
    stats::count_forwarded(counted.forward_id, counted.backend, w.flow.l3_len);
    let action = FWD_TX_PORTS.redirect(w.fib.ifindex, 0).unwrap_or_else(|a| a);
    Ok((action as i32, Reason::RedirectXdp))
}
