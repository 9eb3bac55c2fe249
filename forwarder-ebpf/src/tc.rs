//! The TC programs. Ingress: the complete path, for everything XDP hands over and for
//! everything when XDP is off; its parts that need a frame of their own (the TCP/UDP path,
//! the ICMP translation, the ICMP answer, the delivery to a backend on this host) are
//! called one beside another, never one below another. Egress: replies of backends on this
//! host, and host traffic to peers.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use forwarder_common::{
    GLOBAL_HAS_HOST_BACKENDS, GLOBAL_HAS_PEERS, PEER_DIRECT, PROTO_TCP, Reason, XDP_META_SKIP,
    conntrack::{TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    conntrack::{self, NextHopToCache, Plan},
    fastpath, fastpath6, frag, global, host, icmp, icmp_reply, l2, nat,
    parse::{self, FRAG_FIRST, FRAG_LATER, FRAG_NONE, Flow, L3Dst},
    peer,
    route::{self, FIB_FRAG_NEEDED, FIB_NO_NEIGH, FIB_SUCCESS},
    stats, verdict,
    work::{self, Work},
};

#[classifier]
pub fn forwarder_tc_ingress(ctx: TcContext) -> i32 {
    if xdp_said_skip(&ctx) {
        return TC_ACT_OK;
    }
    let Some(w) = work::this_cpu() else {
        return verdict::tc(Err(Reason::Malformed));
    };
    let fast = if fastpath6::is_v6(&ctx) {
        fastpath6::try_cached6_tc_out_of_line(ctx.skb.skb, &mut w.headers6)
    } else {
        fastpath::try_cached_tc_out_of_line(ctx.skb.skb)
    };
    if fast >= 1 << 32 {
        return verdict::tc(verdict::unpack(fast));
    }
    // Neither a connection nor a forward: the full path would only look for a peer.
    if fast == fastpath::NOT_CACHED_NO_MATCH as u64 && !peer::enabled() {
        return verdict::tc(Err(Reason::NoRule));
    }
    let untracked = fast == fastpath::NOT_CACHED_UNTRACKED as u64;
    let mut outcome = verdict::unpack(try_tc_out_of_line(ctx.skb.skb, untracked, w));
    match outcome {
        Err(Reason::IcmpError) => outcome = verdict::unpack(icmp::translate(ctx.skb.skb, false, w)),
        Err(Reason::ToHostBackend) => outcome = verdict::unpack(host::deliver(ctx.skb.skb, w)),
        Err(r) if r.is_icmp_answer() => outcome = verdict::unpack(icmp_reply::send(ctx.skb.skb, w)),
        _ => {}
    }
    verdict::tc(outcome)
}

/// The loopback device's ifindex, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// The TCP/UDP path in its own frame (see icmp::translate); `untracked`: the fast path
/// found no connection for the packet. `Err(IcmpError)`: an ICMP
/// error for icmp::translate; `Err(ToHostBackend)`: a committed packet for a backend on
/// this host, for host::deliver; an ICMP answer's reason: for icmp_reply::send (each in a
/// frame of its own beside this one, with the working memory `w` as this path left it).
#[inline(never)]
fn try_tc_out_of_line(skb: *mut aya_ebpf::bindings::__sk_buff, untracked: bool, w: &mut Work) -> u64 {
    verdict::pack(try_tc(&TcContext::new(skb), untracked, w))
}

#[inline(always)]
fn xdp_said_skip(ctx: &TcContext) -> bool {
    // SAFETY: reading context fields.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + 4 > data {
        return false;
    }
    // SAFETY: 4 metadata bytes checked against data above.
    unsafe { core::ptr::read_unaligned(meta as *const u32) == XDP_META_SKIP }
}

/// Linear bytes the parser needs at most (Ethernet, IPv6, a fragment header and a TCP
/// header); shorter packets are pulled whole.
const PULL_LEN: u32 = 14 + 40 + 8 + 20;

/// The complete path: everything XDP hands over, and everything when XDP is off.
#[inline(always)]
fn try_tc(ctx: &TcContext, untracked: bool, w: &mut Work) -> verdict::Outcome {
    l2::untagged_tc(ctx)?;
    let want = if ctx.len() < PULL_LEN { ctx.len() } else { PULL_LEN };
    if ctx.data() + (want as usize) > ctx.data_end() {
        let _ = ctx.pull_data(want);
    }
    if let Err(r) = parse::parse_flow(ctx, &mut w.flow) {
        return to_peer_or(ctx, r);
    }
    if w.flow.frag == FRAG_LATER {
        frag::ports_of_later(&mut w.flow, &mut w.frag_key)?;
    }
    let mut plan = match conntrack::classify(&w.flow, untracked, &mut w.source) {
        Ok(p) => p,
        // A new connection no backend takes: refused at once, as a host without the
        // service would (a later fragment never opens a connection).
        Err(Reason::NoBackend) if w.flow.frag != FRAG_LATER => {
            let from = w.flow.dst;
            return Err(icmp_reply::request_from(&mut w.answer, from, &w.flow, icmp_reply::Why::NoBackend));
        }
        Err(r) => return to_peer_or(ctx, frag::not_ours(&w.flow, r)),
    };
    // A later fragment follows its connection; it never opens one.
    if w.flow.frag == FRAG_LATER && !matches!(plan, Plan::Tracked { .. }) {
        return Err(Reason::FragmentUnknown);
    }
    // SAFETY: reading a context field.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let (counted, want_src) = conntrack::target_of(&plan, &w.flow, &mut w.to);
    // A backend on this host: no route, the local stack takes the packet (host.rs). The
    // decision is read again after the commit, never kept in a register across it: a
    // register the verifier sees as 0 on one path and 1 on the other would make it walk
    // the commit twice, past its budget.
    if host::is_host(&plan) {
        if host::is_reply(&plan) {
            return Err(Reason::NoRule);
        }
        host::note(w, counted, host::may_need_listener(&plan, &w.flow));
    } else {
        // What the packet cannot do is answered with ICMP from the packet as it arrived,
        // before anything is committed or rewritten (icmp_reply.rs; TC's entry point sends
        // it).
        if w.flow.ttl <= 1 {
            return Err(icmp_reply::request(&mut w.answer, &plan, &w.flow, icmp_reply::Why::TtlExpired));
        }
        let check_len = route::check_len(ctx, &w.flow);
        route::lookup_memo(ctx, ingress, &w.flow, &w.to, want_src, check_len, &mut w.params, &mut w.fib);
        if let Some(reason) = icmp_reply::after_fib(ctx, &mut w.answer, &plan, &w.flow, &w.fib) {
            return Err(reason);
        }
        if want_src && w.fib.rc == FIB_FRAG_NEEDED as i64 {
            // Left to the stack to fragment; the FIB answered "too big" before it named the
            // route's source, which SNAT wants: asked again without a length.
            route::lookup(ctx, ingress, &w.flow, &w.to, true, 0, &mut w.params, &mut w.fib);
            w.fib.rc = FIB_FRAG_NEEDED as i64;
        }
    }
    // A new flow's original entry goes in with its next hop when the packet is sure to take
    // it, as XDP's does (no lookup of the entry after the commit): a FIB answer with a
    // neighbour, a whole packet that neither opens nor closes a connection (the next packet
    // of an opening one caches it), and no peers (which may take the packet elsewhere;
    // cached below then, once the packet is known to take it).
    w.hop = NextHopToCache { len_ok: 0, xdp_ok: false };
    if !host::is_host(&plan)
        && w.fib.rc == FIB_SUCCESS as i64
        && w.flow.frag == FRAG_NONE
        && !opens_or_closes(&w.flow)
        && !peer::enabled()
    {
        w.hop = NextHopToCache {
            len_ok: route::check_len(ctx, &w.flow),
            xdp_ok: route::xdp_can_send(ingress, w.fib.ifindex),
        };
    }
    conntrack::commit(ctx, &mut plan, &w.flow, &w.fib, &w.to, &mut w.new, &w.hop)?;
    if w.flow.frag == FRAG_FIRST {
        frag::record(&w.flow, &mut w.frag_key)?;
    }
    if host::is_host(&plan) {
        // Committed: host::deliver, beside this frame, rewrites and hands it over.
        return Err(Reason::ToHostBackend);
    }
    let (flow, new, fib, hop_at_commit) = (&w.flow, &w.new, &w.fib, w.hop);
    if peer::enabled() {
        let dst = L3Dst::of_flow_to(flow, new.dst);
        if let Some(p) = peer::lookup(&dst).filter(|p| p.state == PEER_DIRECT) {
            nat::rewrite_tc(ctx, flow, new, false)?;
            stats::count_forwarded(counted.forward_id, counted.backend, flow.l3_len);
            let (action, _) = peer::deliver(ctx, &dst, p, true)?;
            return Ok((action, Reason::RedirectTc));
        }
    }
    let sends_itself = fib.rc == FIB_SUCCESS as i64 || fib.rc == FIB_NO_NEIGH as i64;
    nat::rewrite_tc(ctx, flow, new, sends_itself)?;
    stats::count_forwarded(counted.forward_id, counted.backend, flow.l3_len);
    match fib.rc as u32 {
        FIB_SUCCESS if fib.rc >= 0 => {
            // The next packets of this direction take the fast path (fastpath.rs).
            // Not for a SYN, FIN or RST: the fast path never takes those, and the next
            // packet of an opening connection caches it anyway. A new flow's entry went in
            // with it, unless peers are on (above).
            if flow.frag == FRAG_NONE && !opens_or_closes(flow) {
                let entry =
                    if peer::enabled() { conntrack::entry_of(plan, flow) } else { conntrack::tracked_entry(plan) };
                if let Some(entry) = entry {
                    // The hop worked out before the commit, unless peers are on.
                    let hop = if hop_at_commit.len_ok != 0 {
                        hop_at_commit
                    } else {
                        NextHopToCache {
                            len_ok: route::check_len(ctx, flow),
                            xdp_ok: route::xdp_can_send(ingress, fib.ifindex),
                        }
                    };
                    conntrack::cache_next_hop(entry, flow, new, fib, hop);
                }
            }
            l2::set_macs_tc(ctx, fib.dmac, fib.smac)?;
            Ok((route::tc_redirect(fib.ifindex), Reason::RedirectTc))
        }
        FIB_NO_NEIGH if fib.rc >= 0 => {
            // SAFETY: helper call; a null neighbour lets the kernel resolve it.
            let action = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
            Ok((action, Reason::FibNoNeigh))
        }
        FIB_FRAG_NEEDED if fib.rc >= 0 => {
            // IPv4 without DF, larger than the egress MTU: only the stack fragments. Its
            // source is this host's (SNAT), which the stack takes only from a device with
            // accept_local: the loopback device, where forwarder turns it on (nothing else
            // arrives there), not the interface it came from. lo's address is all zeros.
            l2::set_macs_tc(ctx, [0; 6], fib.smac)?;
            // SAFETY: helper call.
            let action = unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) } as i32;
            Ok((action, Reason::FibFragNeeded))
        }
        _ => Ok((TC_ACT_OK, Reason::FibToStack)),
    }
}

/// A TCP segment with SYN, FIN or RST, which the fast path never takes.
#[inline(always)]
fn opens_or_closes(flow: &Flow) -> bool {
    flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
}

/// A packet that is not a forward's: when it is addressed to a peer, it goes straight there.
#[inline(always)]
fn to_peer_or(ctx: &TcContext, reason: Reason) -> verdict::Outcome {
    if matches!(reason, Reason::NoRule | Reason::NotTcpUdp) && peer::enabled() {
        if let Ok(dst) = parse::parse_l3_dst(ctx) {
            if let Some(p) = peer::lookup(&dst) {
                return peer::deliver(ctx, &dst, p, true);
            }
        }
    }
    Err(reason)
}

/// Host traffic leaving an interface: replies of backends on this host are rewritten
/// back to the listen address (host.rs); packets to a peer go straight to it instead of
/// the gateway the route names.
#[classifier]
pub fn forwarder_tc_egress(ctx: TcContext) -> i32 {
    let flags = global::flags();
    if flags & GLOBAL_HAS_HOST_BACKENDS != 0 {
        if let Some(w) = work::this_cpu() {
            let mut outcome = verdict::unpack(host::reply_out_of_line(ctx.skb.skb, w));
            if outcome == Err(Reason::IcmpError) {
                outcome = verdict::unpack(icmp::translate(ctx.skb.skb, true, w));
            }
            // Anything else is host traffic, not counted (as without host backends).
            if !matches!(outcome, Err(Reason::NoRule | Reason::IcmpError)) {
                let action = verdict::tc(outcome);
                if action != TC_ACT_OK {
                    return action;
                }
            }
        }
    }
    if flags & GLOBAL_HAS_PEERS == 0 || peer::already_delivered(&ctx) {
        return TC_ACT_OK;
    }
    match parse::parse_l3_dst(&ctx) {
        Ok(dst) => match peer::lookup(&dst) {
            Some(p) => peer::deliver(&ctx, &dst, p, false).map(|(action, _)| action).unwrap_or(TC_ACT_OK),
            None => TC_ACT_OK,
        },
        Err(_) => TC_ACT_OK,
    }
}
