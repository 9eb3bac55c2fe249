//! forwarder's kernel programs. Entry points only; the work is in one module per concern.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod ctx;
mod l2;
mod local;
mod maps;
mod nat;
mod parse;
mod peer;
mod route;
mod stats;
mod verdict;

use aya_ebpf::{
    EbpfContext,
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use forwarder_common::{FAMILY_V4, GLOBAL_HAS_PEERS, PEER_DIRECT, Reason, SNAT_AUTO, SNAT_FIXED, XDP_META_SKIP};

use crate::{
    conntrack::{Plan, Tuple},
    maps::{FWD_GLOBAL, FWD_TX_PORTS},
    parse::{Ipv4Flow, L3Dst},
    route::{FIB_FRAG_NEEDED, FIB_NO_NEIGH, FIB_SUCCESS, Fib},
};

/// Where a planned packet goes and, for a new flow, which source SNAT should use.
#[inline(always)]
fn target_of(plan: &Plan, flow: &Ipv4Flow) -> (Tuple, u32, bool) {
    match plan {
        Plan::Tracked { new, forward_id } => (*new, *forward_id, false),
        Plan::New { fwd } => {
            let to = Tuple {
                src: flow.src,
                dst: [fwd.backend_addr[0], fwd.backend_addr[1], fwd.backend_addr[2], fwd.backend_addr[3]],
                sport: flow.sport,
                dport: fwd.backend_port_be.to_ne_bytes(),
            };
            (to, fwd.forward_id, fwd.snat_mode == SNAT_AUTO)
        }
    }
}

/// Commits a new flow (if it is one) and returns the tuple to rewrite to.
#[inline(always)]
fn commit<C: EbpfContext>(ctx: &C, plan: &Plan, flow: &Ipv4Flow, fib: &Fib) -> Result<Tuple, Reason> {
    match plan {
        Plan::Tracked { new, .. } => Ok(*new),
        Plan::New { fwd } => {
            let snat_src = match fwd.snat_mode {
                SNAT_FIXED => [fwd.snat_addr[0], fwd.snat_addr[1], fwd.snat_addr[2], fwd.snat_addr[3]],
                // Route's preferred source; for a backend on this host (no forwarding
                // answer) the address the client reached, which is ours too.
                _ if fib.src != [0; 4] => fib.src,
                _ => flow.dst,
            };
            let new = conntrack::commit_new(flow, fwd, snat_src)?;
            log_new_flow(ctx, flow, &new);
            Ok(new)
        }
    }
}

/// Debug log of a new flow (aya-log; the loader keeps the level at 0 unless asked).
/// Out of line so its stack use stays off the hot path.
#[inline(never)]
fn log_new_flow<C: EbpfContext>(ctx: &C, flow: &Ipv4Flow, new: &Tuple) {
    debug!(
        ctx,
        "new flow {}:{} -> {}:{} now {}:{} -> {}:{}",
        u32::from_be_bytes(flow.src),
        u16::from_be_bytes(flow.sport),
        u32::from_be_bytes(flow.dst),
        u16::from_be_bytes(flow.dport),
        u32::from_be_bytes(new.src),
        u16::from_be_bytes(new.sport),
        u32::from_be_bytes(new.dst),
        u16::from_be_bytes(new.dport)
    );
}

#[xdp]
pub fn forwarder_xdp(ctx: XdpContext) -> u32 {
    let outcome = match try_xdp(&ctx) {
        // Peer delivery needs bpf_redirect_neigh, which only TC has.
        Err(Reason::NoRule | Reason::NotTcpUdp | Reason::Ipv6) if to_peer(&ctx) => Err(Reason::XdpToTc),
        other => other,
    };
    verdict::xdp(&ctx, outcome)
}

#[inline(always)]
fn peers_enabled() -> bool {
    FWD_GLOBAL.get(0).map(|g| g.flags & GLOBAL_HAS_PEERS != 0).unwrap_or(false)
}

#[inline(always)]
fn to_peer<P: ctx::Packet>(pkt: &P) -> bool {
    peers_enabled() && parse::parse_l3_dst(pkt).ok().and_then(|d| peer::lookup(&d)).is_some()
}

#[inline(always)]
fn v4_dst(addr: [u8; 4], flow: &Ipv4Flow) -> L3Dst {
    L3Dst {
        family: FAMILY_V4,
        addr: [addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        len: flow.tot_len,
        ttl: flow.ttl,
    }
}

/// The XDP fast path: it finishes a packet only when it can do all of it (full checksum,
/// FIB answer with a neighbour, an egress that takes XDP frames); otherwise the packet goes
/// untouched to the TC program, so no state is committed twice.
#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> verdict::Outcome {
    let flow = parse::parse_ipv4(ctx)?;
    let plan = conntrack::classify(&flow)?;
    if csum::looks_partial(&flow) || flow.ttl <= 1 {
        return Err(Reason::XdpToTc);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let (to, forward_id, want_src) = target_of(&plan, &flow);
    if peers_enabled() && peer::lookup(&v4_dst(to.dst, &flow)).is_some() {
        return Err(Reason::XdpToTc);
    }
    let fib = route::lookup(ctx, ingress, &flow, &to, want_src);
    if fib.rc != FIB_SUCCESS as i64 || !route::xdp_can_send(ingress, fib.ifindex) {
        return Err(Reason::XdpToTc);
    }
    let new = commit(ctx, &plan, &flow, &fib)?;
    nat::rewrite_xdp(ctx, &flow, &new, true)?;
    l2::set_macs_xdp(ctx, fib.dmac, fib.smac)?;
    stats::count_forwarded(forward_id, flow.tot_len);
    let action = FWD_TX_PORTS.redirect(fib.ifindex, 0).unwrap_or_else(|a| a);
    Ok((action as i32, Reason::RedirectXdp))
}

#[classifier]
pub fn forwarder_tc_ingress(ctx: TcContext) -> i32 {
    if xdp_said_skip(&ctx) {
        return TC_ACT_OK;
    }
    let outcome = try_tc(&ctx);
    verdict::tc(outcome)
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

/// Minimum linear bytes the parser needs (Ethernet + IPv4 + TCP header).
const PULL_LEN: u32 = 14 + 20 + 20;

/// The complete path: everything XDP hands over, and everything when XDP is off.
#[inline(always)]
fn try_tc(ctx: &TcContext) -> verdict::Outcome {
    if ctx.data() + (PULL_LEN as usize) > ctx.data_end() && ctx.len() >= PULL_LEN {
        let _ = ctx.pull_data(PULL_LEN);
    }
    let flow = match parse::parse_ipv4(ctx) {
        Ok(f) => f,
        Err(r) => return to_peer_or(ctx, r),
    };
    let plan = match conntrack::classify(&flow) {
        Ok(p) => p,
        Err(r) => return to_peer_or(ctx, r),
    };
    // SAFETY: reading a context field.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let (to, forward_id, want_src) = target_of(&plan, &flow);
    let fib = route::lookup(ctx, ingress, &flow, &to, want_src);
    let new = commit(ctx, &plan, &flow, &fib)?;
    if peers_enabled() {
        let dst = v4_dst(new.dst, &flow);
        if let Some(p) = peer::lookup(&dst).filter(|p| p.state == PEER_DIRECT) {
            nat::rewrite_tc(ctx, &flow, &new, false)?;
            stats::count_forwarded(forward_id, flow.tot_len);
            let (action, _) = peer::deliver(ctx, &dst, p, true)?;
            return Ok((action, Reason::RedirectTc));
        }
    }
    let sends_itself = flow.ttl > 1 && (fib.rc == FIB_SUCCESS as i64 || fib.rc == FIB_NO_NEIGH as i64);
    nat::rewrite_tc(ctx, &flow, &new, sends_itself)?;
    stats::count_forwarded(forward_id, flow.tot_len);
    if flow.ttl <= 1 {
        return Ok((TC_ACT_OK, Reason::TtlToStack));
    }
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
        FIB_FRAG_NEEDED if fib.rc >= 0 => Ok((TC_ACT_OK, Reason::FibFragNeeded)),
        _ => Ok((TC_ACT_OK, Reason::FibToStack)),
    }
}

/// A packet that is not a forward's: when it is addressed to a peer, it goes straight there.
#[inline(always)]
fn to_peer_or(ctx: &TcContext, reason: Reason) -> verdict::Outcome {
    if matches!(reason, Reason::NoRule | Reason::NotTcpUdp | Reason::Ipv6) && peers_enabled() {
        if let Ok(dst) = parse::parse_l3_dst(ctx) {
            if let Some(p) = peer::lookup(&dst) {
                return peer::deliver(ctx, &dst, p, true);
            }
        }
    }
    Err(reason)
}

/// Host traffic leaving an interface: packets to a peer go straight to it instead of the
/// gateway the route names.
#[classifier]
pub fn forwarder_tc_egress(ctx: TcContext) -> i32 {
    if !peers_enabled() || peer::already_delivered(&ctx) {
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
const SOCK_ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn forwarder_connect4(ctx: SockAddrContext) -> i32 {
    local::connect4(&ctx);
    SOCK_ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn forwarder_getpeername4(ctx: SockAddrContext) -> i32 {
    local::getpeername4(&ctx);
    SOCK_ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn forwarder_sendmsg4(ctx: SockAddrContext) -> i32 {
    local::sendmsg4(&ctx);
    SOCK_ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn forwarder_recvmsg4(ctx: SockAddrContext) -> i32 {
    local::recvmsg4(&ctx);
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
