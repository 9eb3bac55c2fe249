//! Backends on this host (`FWD_FLAG_HOST_BACKEND`: a loopback address, or one of the
//! namespace's own): interface traffic is not routed but handed to the local stack, with
//! the destination rewritten and the client's address kept (no SNAT: a locally delivered
//! packet with a local source is a martian to `fib_validate_source`); the backend's
//! replies, which leave by an interface as any host traffic does, are rewritten back at TC
//! egress from the connection's reply entry. docs/architecture.md, "Backends on this
//! host", says why this and not a redirect into the host.
//!
//! A TCP connection to a loopback backend keeps the address the client dialled and gets
//! only the backend's port: a loopback destination is dropped as a martian by the stack
//! (IPv4 without `route_localnet`, IPv6 always), so the handshake's packets are assigned
//! to the backend's listener instead (`sock::assign_listener`); the connection's socket
//! then carries the dialled address as its own, and later packets find it by their tuple.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use forwarder_common::{
    CT_DIR_REPLY, FWD_FLAG_HOST_BACKEND, FwdKey, FwdValue, PROTO_TCP, Reason,
    conntrack::{CT_ASSURED, CT_HOST_BACKEND, TCP_SYN},
    is_loopback,
};

use crate::{
    conntrack::Counted,
    conntrack::{self, Plan, Tuple},
    frag, nat,
    parse::{self, FRAG_FIRST, FRAG_LATER},
    rules, sock, stats,
    verdict::Outcome,
    work::Work,
};

/// The plan is for a backend on this host (a new flow of such a forward, or one of its
/// connections).
#[inline(always)]
pub fn is_host(plan: &Plan) -> bool {
    match plan {
        Plan::Tracked { entry } => entry.flags & CT_HOST_BACKEND != 0,
        Plan::New { fwd, .. } => fwd.flags & FWD_FLAG_HOST_BACKEND != 0,
    }
}

/// A TCP backend on loopback, reached through its listener (see the module's text).
#[inline(always)]
fn through_listener(fwd: &FwdValue, proto: u8) -> bool {
    proto == PROTO_TCP && is_loopback(fwd.family, &fwd.backend_addr)
}

/// The destination address a new flow of a host-backend forward is rewritten to: the
/// backend's, except for a TCP backend on loopback, which keeps the address dialled.
#[inline(always)]
pub fn delivery_addr<'a>(fwd: &'a FwdValue, flow: &'a parse::Flow) -> &'a [u8; 16] {
    if through_listener(fwd, flow.proto) { &flow.dst } else { &fwd.backend_addr }
}

/// Whether this TCP packet may need assigning to a loopback backend's listener: a new
/// connection to a loopback backend, or a packet of a connection still in its handshake (a
/// retransmitted SYN, the last ACK of a handshake answered with a SYN cookie, a SYN
/// reopening the tuple), whose forward [`deliver`] looks up. Established connections'
/// packets find their socket by their tuple.
#[inline(always)]
pub fn may_need_listener(plan: &Plan, flow: &parse::Flow) -> bool {
    if flow.proto != PROTO_TCP {
        return false;
    }
    match plan {
        Plan::New { fwd, .. } => through_listener(fwd, flow.proto),
        Plan::Tracked { entry } => entry.flags & CT_ASSURED == 0 || flow.tcp_flags & TCP_SYN != 0,
    }
}

/// A packet of a backend on this host arriving from an interface in the reply direction:
/// the backend's replies leave by TC egress, so this is not the connection's (a spoofed
/// local source, which the stack drops anyway) and is passed untouched.
#[inline(always)]
pub fn is_reply(plan: &Plan) -> bool {
    matches!(plan, Plan::Tracked { entry } if entry.direction == CT_DIR_REPLY)
}

/// What [`deliver`] needs of a packet from before its commit (per-CPU work area).
#[repr(C)]
pub struct Pending {
    pub forward_id: u32,
    pub backend: u32,
    /// [`may_need_listener`]'s answer.
    pub listener: u8,
}

/// Records the packet's forward and [`may_need_listener`]'s answer for [`deliver`]: in
/// memory the verifier does not track, so the paths before the commit join again.
#[inline(always)]
pub fn note(w: &mut Work, counted: Counted, listener: bool) {
    // SAFETY: fields of this CPU's work area; volatile keeps the values out of registers.
    unsafe {
        core::ptr::write_volatile(&mut w.host.forward_id, counted.forward_id);
        core::ptr::write_volatile(&mut w.host.backend, counted.backend);
        core::ptr::write_volatile(&mut w.host.listener, listener as u8);
    }
}

/// TC ingress, a packet for a backend on this host once committed and tracked as any (in
/// `w.new` the tuple to rewrite to, in `w.host` what [`note`] kept; `w` is the program
/// run's working memory, as the TC path left it): rewritten, assigned
/// to a loopback backend's listener when it may need it, and handed to the local stack
/// (`TC_ACT_OK`), which delivers it. In a frame of its own beside the TC path's, which
/// has no room for the socket lookups' tuples.
#[inline(never)]
pub fn deliver(skb: *mut aya_ebpf::bindings::__sk_buff, w: &mut Work) -> u64 {
    crate::verdict::pack(try_deliver(&TcContext::new(skb), w))
}

#[inline(always)]
fn try_deliver(ctx: &TcContext, w: &mut Work) -> Outcome {
    // SAFETY: fields of this CPU's work area, written by `note` this run.
    let (forward_id, backend, listener) = unsafe {
        (
            core::ptr::read_volatile(&w.host.forward_id),
            core::ptr::read_volatile(&w.host.backend),
            core::ptr::read_volatile(&w.host.listener) != 0,
        )
    };
    let (flow, new) = (&w.flow, &w.new);
    nat::rewrite_tc(ctx, flow, new, false)?;
    if listener {
        // The packet's forward, by the listen address and port it carried.
        let mut key =
            FwdKey { addr: flow.dst, port_be: u16::from_ne_bytes(flow.dport), proto: flow.proto, family: flow.family };
        if let Some(fwd) = rules::lookup(&mut key).filter(|f| through_listener(f, flow.proto)) {
            sock::assign_listener(ctx, flow.family, &flow.src, &new.dst, flow.sport, new.dport, &fwd.backend_addr);
        }
    }
    stats::count_forwarded(forward_id, backend, flow.l3_len);
    Ok((TC_ACT_OK, Reason::ToHostBackend))
}

/// TC egress: a reply of a backend on this host, rewritten as its connection's reply entry
/// says; `Err(NoRule)` for every other packet (not counted). Out of line: its frame is
/// the egress program's largest.
#[inline(never)]
pub fn reply_out_of_line(skb: *mut aya_ebpf::bindings::__sk_buff, w: &mut Work) -> u64 {
    crate::verdict::pack(reply(&TcContext::new(skb), w))
}

#[inline(always)]
fn reply(ctx: &TcContext, w: &mut Work) -> Outcome {
    match parse::parse_flow(ctx, &mut w.flow) {
        Ok(()) => {}
        // An error the host sends about a packet it was handed (a UDP port unreachable).
        Err(Reason::IcmpError) => return Err(Reason::IcmpError),
        Err(_) => return Err(Reason::NoRule),
    }
    // A reply too large for the egress leaves in fragments: later ones by the first's ports.
    if w.flow.frag == FRAG_LATER {
        frag::ports_of_later(&mut w.flow, &mut w.frag_key).map_err(|_| Reason::NoRule)?;
    }
    let Some(entry) = conntrack::lookup(&conntrack::flow_key(&w.flow)) else {
        return Err(Reason::NoRule);
    };
    if entry.flags & CT_HOST_BACKEND == 0 || entry.direction != CT_DIR_REPLY {
        return Err(Reason::NoRule);
    }
    conntrack::touch(entry);
    if w.flow.frag != FRAG_LATER {
        conntrack::track(entry, &w.flow)?;
    }
    if w.flow.frag == FRAG_FIRST {
        frag::record(&w.flow, &mut w.frag_key)?;
    }
    w.new = Tuple {
        src: entry.new_src_addr,
        dst: entry.new_dst_addr,
        sport: entry.new_src_port_be.to_ne_bytes(),
        dport: entry.new_dst_port_be.to_ne_bytes(),
    };
    nat::rewrite_tc(ctx, &w.flow, &w.new, false)?;
    stats::count_forwarded(entry.forward_id, entry.backend_index(), w.flow.l3_len);
    Ok((TC_ACT_OK, Reason::FromHostBackend))
}
