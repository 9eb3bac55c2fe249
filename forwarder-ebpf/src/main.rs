//! forwarder's kernel programs. Entry points only; the work is in one module per concern.
#![no_std]
#![no_main]

pub mod conntrack;
mod csum;
mod ctx;
mod fastpath;
mod frag;
mod host;
mod icmp;
mod icmp_reply;
mod l2;
mod local;
pub mod maps;
mod nat;
pub mod parse;
mod peer;
pub mod route;
mod sock;
mod stats;
mod verdict;
mod work;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, TC_ACT_OK},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use forwarder_common::{
    GLOBAL_HAS_HOST_BACKENDS, GLOBAL_HAS_PEERS, PEER_DIRECT, Reason, SNAT_AUTO, SNAT_FIXED, XDP_META_SKIP,
};

use crate::{
    conntrack::{Plan, Tuple},
    maps::{FWD_GLOBAL_V2, FWD_TX_PORTS},
    parse::{FRAG_FIRST, FRAG_LATER, FRAG_NONE, Flow, L3Dst},
    route::{FIB_FRAG_NEEDED, FIB_NO_NEIGH, FIB_SUCCESS, Fib},
    work::Work,
};

/// Where a planned packet goes (into `to`) and, for a new flow, whether SNAT wants the
/// route's source; returns the forward id.
#[inline(always)]
fn target_of(plan: &Plan, flow: &Flow, to: &mut Tuple) -> (u32, bool) {
    match plan {
        Plan::Tracked { entry } => {
            to.src = entry.new_src_addr;
            to.dst = entry.new_dst_addr;
            to.sport = entry.new_src_port_be.to_ne_bytes();
            to.dport = entry.new_dst_port_be.to_ne_bytes();
            (entry.forward_id, false)
        }
        Plan::New { fwd } => {
            to.src = flow.src;
            to.dst = fwd.backend_addr;
            to.sport = flow.sport;
            to.dport = fwd.backend_port_be.to_ne_bytes();
            (fwd.forward_id, fwd.snat_mode == SNAT_AUTO)
        }
    }
}

/// Commits the packet to the connection table: a tracked connection's state moves on
/// (conntrack::track), a new flow is recorded. Leaves the tuple to rewrite to in `new`.
/// Called once per packet, by the program that goes on to forward it.
#[inline(always)]
pub(crate) fn commit<C: EbpfContext>(
    ctx: &C,
    plan: &mut Plan,
    flow: &Flow,
    fib: &Fib,
    to: &Tuple,
    new: &mut Tuple,
) -> Result<(), Reason> {
    match plan {
        Plan::Tracked { entry } => {
            // A later fragment carries no TCP flags or sequence: it moves no state (its
            // first fragment did).
            if flow.frag != FRAG_LATER {
                conntrack::track(entry, flow)?;
            }
            *new = *to;
            Ok(())
        }
        Plan::New { fwd } => {
            let snat_src = match fwd.snat_mode {
                SNAT_FIXED => &fwd.snat_addr,
                // Route's preferred source; for a backend on this host (no forwarding
                // answer) the address the client reached, which is ours too.
                _ if fib.src != [0; 16] => &fib.src,
                _ => &flow.dst,
            };
            conntrack::commit_new(ctx, flow, fwd, snat_src, new)?;
            log_new_flow(ctx, flow, new);
            Ok(())
        }
    }
}

/// Debug log of a new flow (aya-log; the loader keeps the level at 0 unless asked).
/// Out of line so its stack use stays off the hot path.
#[inline(never)]
fn log_new_flow<C: EbpfContext>(ctx: &C, flow: &Flow, new: &Tuple) {
    debug!(
        ctx,
        "new flow proto {} port {} -> {} now {} -> {} (family {})",
        flow.proto,
        u16::from_be_bytes(flow.sport),
        u16::from_be_bytes(flow.dport),
        u16::from_be_bytes(new.sport),
        u16::from_be_bytes(new.dport),
        flow.family
    );
}

#[xdp]
pub fn forwarder_xdp(ctx: XdpContext) -> u32 {
    let fast = fastpath::try_cached_out_of_line(ctx.ctx);
    if fast >= 1 << 32 {
        return verdict::xdp(&ctx, verdict::unpack(fast));
    }
    let Some(w) = work::this_cpu() else {
        return verdict::xdp(&ctx, Err(Reason::Malformed));
    };
    not_cached(ctx.ctx, fast as u32, w)
}

/// Everything after the fast path, in its own frame (the fast path's stack and the full
/// path's would not fit in one): `how` is what the fast path found (`fastpath::NOT_CACHED_*`).
#[inline(never)]
fn not_cached(raw: *mut aya_ebpf::bindings::xdp_md, how: u32, w: &mut Work) -> u32 {
    let ctx = XdpContext::new(raw);
    let result = match how {
        fastpath::NOT_CACHED_NO_MATCH => Err(Reason::NoRule),
        fastpath::NOT_CACHED_UNTRACKED => try_xdp(&ctx, true, w),
        _ => try_xdp(&ctx, false, w),
    };
    let outcome = match result {
        // Peer delivery needs bpf_redirect_neigh, which only TC has.
        Err(Reason::NoRule | Reason::NotTcpUdp) if to_peer(&ctx) => Err(Reason::XdpToTc),
        // Translating ICMP errors needs the skb helpers: TC does it.
        Err(Reason::IcmpError) => Err(Reason::XdpToTc),
        // A priority tag is the stack's untagged traffic: TC takes it once it is removed.
        Err(Reason::Vlan) if l2::priority_tagged(&ctx) => Err(Reason::XdpToTc),
        other => other,
    };
    verdict::xdp(&ctx, outcome)
}

#[inline(always)]
fn global_flags() -> u32 {
    FWD_GLOBAL_V2.get(0).map(|g| g.flags).unwrap_or(0)
}

#[inline(always)]
fn peers_enabled() -> bool {
    global_flags() & GLOBAL_HAS_PEERS != 0
}

#[inline(always)]
fn to_peer<P: ctx::Packet>(pkt: &P) -> bool {
    peers_enabled() && parse::parse_l3_dst(pkt).ok().and_then(|d| peer::lookup(&d)).is_some()
}

#[inline(always)]
fn l3_dst(addr: [u8; 16], flow: &Flow) -> L3Dst {
    L3Dst { family: flow.family, addr, len: flow.l3_len, ttl: flow.ttl }
}

/// The XDP fast path: it finishes a packet only when it can do all of it (full checksum,
/// FIB answer with a neighbour, an egress that takes XDP frames); otherwise the packet goes
/// untouched to the TC program, so no state is committed twice. IPv4 connections keep the
/// next hop found here for the fast path. `untracked`: the fast path found no connection.
#[inline(always)]
fn try_xdp(ctx: &XdpContext, untracked: bool, w: &mut Work) -> verdict::Outcome {
    parse::parse_flow(ctx, &mut w.flow)?;
    // Fragments of TCP/UDP datagrams are TC's: a later fragment needs its first fragment's
    // record, and in a driver's batch XDP may see a later frame before TC has seen an
    // earlier one; TC, in the stack, takes them in the order they came.
    if w.flow.frag != FRAG_NONE {
        return Err(Reason::XdpToTc);
    }
    let mut plan = conntrack::classify(&w.flow, untracked)?;
    // A backend on this host: TC hands the packet to the stack (see host.rs).
    if host::is_host(&plan) || csum::looks_partial(&w.flow) || w.flow.ttl <= 1 {
        return Err(Reason::XdpToTc);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let (forward_id, want_src) = target_of(&plan, &w.flow, &mut w.to);
    if peers_enabled() && peer::lookup(&l3_dst(w.to.dst, &w.flow)).is_some() {
        return Err(Reason::XdpToTc);
    }
    route::lookup(ctx, ingress, &w.flow, &w.to, want_src, w.flow.l3_len, &mut w.params, &mut w.fib);
    if w.fib.rc != FIB_SUCCESS as i64 || !route::xdp_can_send(ingress, w.fib.ifindex) {
        return Err(Reason::XdpToTc);
    }
    commit(ctx, &mut plan, &w.flow, &w.fib, &w.to, &mut w.new)?;
    if !w.flow.is_v6() {
        if let Some(entry) = conntrack::entry_of(plan, &w.flow) {
            conntrack::cache_next_hop(entry, &w.flow, &w.new, w.fib.ifindex, w.fib.dmac, w.fib.smac);
        }
    }
    nat::rewrite_xdp(ctx, &w.flow, &w.new, true)?;
    l2::set_macs_xdp(ctx, w.fib.dmac, w.fib.smac)?;
    stats::count_forwarded(forward_id, w.flow.l3_len);
    let action = FWD_TX_PORTS.redirect(w.fib.ifindex, 0).unwrap_or_else(|a| a);
    Ok((action as i32, Reason::RedirectXdp))
}

#[classifier]
pub fn forwarder_tc_ingress(ctx: TcContext) -> i32 {
    if xdp_said_skip(&ctx) {
        return TC_ACT_OK;
    }
    let Some(w) = work::this_cpu() else {
        return verdict::tc(Err(Reason::Malformed));
    };
    let mut outcome = verdict::unpack(try_tc_out_of_line(ctx.skb.skb, w));
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

/// The TCP/UDP path in its own frame (see icmp::translate). `Err(IcmpError)`: an ICMP
/// error for icmp::translate; `Err(ToHostBackend)`: a committed packet for a backend on
/// this host, for host::deliver; an ICMP answer's reason: for icmp_reply::send (each in a
/// frame of its own beside this one, with the working memory `w` as this path left it).
#[inline(never)]
fn try_tc_out_of_line(skb: *mut aya_ebpf::bindings::__sk_buff, w: &mut Work) -> u64 {
    verdict::pack(try_tc(&TcContext::new(skb), w))
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
fn try_tc(ctx: &TcContext, w: &mut Work) -> verdict::Outcome {
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
    let mut plan = match conntrack::classify(&w.flow, false) {
        Ok(p) => p,
        Err(r) => return to_peer_or(ctx, frag::not_ours(&w.flow, r)),
    };
    // A later fragment follows its connection; it never opens one.
    if w.flow.frag == FRAG_LATER && !matches!(plan, Plan::Tracked { .. }) {
        return Err(Reason::FragmentUnknown);
    }
    // SAFETY: reading a context field.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let (forward_id, want_src) = target_of(&plan, &w.flow, &mut w.to);
    // A backend on this host: no route, the local stack takes the packet (host.rs). The
    // decision is read again after the commit, never kept in a register across it: a
    // register the verifier sees as 0 on one path and 1 on the other would make it walk
    // the commit twice, past its budget.
    if host::is_host(&plan) {
        if host::is_reply(&plan) {
            return Err(Reason::NoRule);
        }
        host::note(w, forward_id, host::may_need_listener(&plan, &w.flow));
    } else {
        // What the packet cannot do is answered with ICMP from the packet as it arrived,
        // before anything is committed or rewritten (icmp_reply.rs; TC's entry point sends
        // it).
        if w.flow.ttl <= 1 {
            return Err(icmp_reply::request(&mut w.answer, &plan, &w.flow, icmp_reply::Why::TtlExpired));
        }
        let check_len = route::check_len(ctx, &w.flow);
        route::lookup(ctx, ingress, &w.flow, &w.to, want_src, check_len, &mut w.params, &mut w.fib);
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
    commit(ctx, &mut plan, &w.flow, &w.fib, &w.to, &mut w.new)?;
    if w.flow.frag == FRAG_FIRST {
        frag::record(&w.flow, &mut w.frag_key)?;
    }
    if host::is_host(&plan) {
        // Committed: host::deliver, beside this frame, rewrites and hands it over.
        return Err(Reason::ToHostBackend);
    }
    let (flow, new, fib) = (&w.flow, &w.new, &w.fib);
    if peers_enabled() {
        let dst = l3_dst(new.dst, flow);
        if let Some(p) = peer::lookup(&dst).filter(|p| p.state == PEER_DIRECT) {
            nat::rewrite_tc(ctx, flow, new, false)?;
            stats::count_forwarded(forward_id, flow.l3_len);
            let (action, _) = peer::deliver(ctx, &dst, p, true)?;
            return Ok((action, Reason::RedirectTc));
        }
    }
    let sends_itself = fib.rc == FIB_SUCCESS as i64 || fib.rc == FIB_NO_NEIGH as i64;
    nat::rewrite_tc(ctx, flow, new, sends_itself)?;
    stats::count_forwarded(forward_id, flow.l3_len);
    match fib.rc as u32 {
        FIB_SUCCESS if fib.rc >= 0 => {
            l2::set_macs_tc(ctx, fib.dmac, fib.smac)?;
            // SAFETY: helper call.
            let action = unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
            Ok((action, Reason::RedirectTc))
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

/// A packet that is not a forward's: when it is addressed to a peer, it goes straight there.
#[inline(always)]
fn to_peer_or(ctx: &TcContext, reason: Reason) -> verdict::Outcome {
    if matches!(reason, Reason::NoRule | Reason::NotTcpUdp) && peers_enabled() {
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
    let flags = global_flags();
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

/// Cgroup socket hooks return 1 ("allow"): forwarder rewrites, it never refuses a socket.
/// The one exception is a datagram sendmsg refuses (0: EPERM), see `local::sendmsg`.
const SOCK_ALLOW: i32 = 1;
const SOCK_REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn forwarder_connect4(ctx: SockAddrContext) -> i32 {
    local::connect(&ctx, false);
    SOCK_ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn forwarder_connect6(ctx: SockAddrContext) -> i32 {
    local::connect(&ctx, true);
    SOCK_ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn forwarder_getpeername4(ctx: SockAddrContext) -> i32 {
    local::getpeername(&ctx, false);
    SOCK_ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn forwarder_getpeername6(ctx: SockAddrContext) -> i32 {
    local::getpeername(&ctx, true);
    SOCK_ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn forwarder_sendmsg4(ctx: SockAddrContext) -> i32 {
    if local::sendmsg(&ctx, false) { SOCK_ALLOW } else { SOCK_REFUSE }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn forwarder_sendmsg6(ctx: SockAddrContext) -> i32 {
    if local::sendmsg(&ctx, true) { SOCK_ALLOW } else { SOCK_REFUSE }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn forwarder_recvmsg4(ctx: SockAddrContext) -> i32 {
    local::recvmsg(&ctx, false);
    SOCK_ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn forwarder_recvmsg6(ctx: SockAddrContext) -> i32 {
    local::recvmsg(&ctx, true);
    SOCK_ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
