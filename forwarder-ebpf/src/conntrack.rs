//! Connection tracking: lookup of known flows, forward-rule match of new ones, and the
//! commit of a new flow (source-port choice and both direction entries).

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns, bpf_loop},
};
use aya_log_ebpf::debug;
use forwarder_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKey, CtValue, FAMILY_V4, FWD_FLAG_HOST_BACKEND, FWD_FLAG_INGRESS, FwdKey,
    FwdValue, GlobalConfig, PROTO_TCP, Reason, SNAT_AUTO, SNAT_FIXED, SNAT_OFF,
    conntrack::{
        CT_ASSURED, CT_HOST_BACKEND, CT_NH_XDP, CT_SEQ_KNOWN, EARLY_DROP_MIN_AGE_NS, LAST_SEEN_SLACK_NS, PortRange,
        Step, TCP_ACK, TCP_ESTABLISHED, TCP_FIN, TCP_RST, TCP_SYN, TCP_SYN_SENT, UDP_REPLIED, UDP_UNREPLIED, is_reopen,
        pick_port, rst_acceptable, segment_end, seq_after, tcp_step,
    },
    csum::{TTL_DECREMENT_DELTA, add_deltas, delta},
    next_hop_current,
};

use crate::{
    backend::{self, Chosen},
    csum::sum_addr,
    maps::{CtScratch, FWD_CT_V4, FWD_GLOBAL_V2, FWD_ROUTE_GEN, FWD_SCRATCH},
    parse::{FRAG_LATER, Flow, Words16, copy_addr},
    route::Fib,
    rules,
    sock::host_socket,
    sources::{self, SourceLookup},
    stats,
};

/// An address + port tuple of one direction (network order; IPv4 in the first 4 bytes).
/// 8-aligned, as [`Flow`](crate::parse::Flow), so its addresses are copied in words.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}
const _: () = assert!(align_of::<Tuple>() == 8);

/// What to do with a matching packet.
pub enum Plan {
    /// A tracked flow: rewrite as its entry says (a map value: the fast path's cache is
    /// written through it).
    Tracked { entry: &'static mut CtValue },
    /// First packet of a flow for this forward (the rule, in the map), and the backend
    /// chosen for it.
    New { fwd: &'static FwdValue, backend: Chosen },
}

const EEXIST: i32 = -17;
/// Refresh `last_seen` at most once a second: a write per packet would bounce the entry's
/// cache line between CPUs.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// Source ports of the range tried for a new flow (after the client's own) before an early
/// drop or giving up: all distinct (see `pick_port`), so with a fraction f of the range in
/// use a new flow finds no free port with probability f^32 (0.1% at 80% full). Attempts
/// past the first cost only while ports collide.
const PORT_ATTEMPTS: u32 = 32;

#[inline(always)]
pub fn ct_key(family: u8, src: [u8; 16], dst: [u8; 16], sport: [u8; 2], dport: [u8; 2], proto: u8) -> CtKey {
    CtKey {
        src_addr: src,
        dst_addr: dst,
        src_port_be: u16::from_ne_bytes(sport),
        dst_port_be: u16::from_ne_bytes(dport),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The key of an IPv4 flow, built from whole 64-bit words: field by field, the compiler
/// clears the twelve unused address bytes with calls to a byte-loop memset subprogram.
/// Addresses and ports as they sit in the packet (network order, read as native words).
#[inline(always)]
pub fn ct_key_v4(src: u32, dst: u32, ports: u32, proto: u8) -> CtKey {
    let words: [u64; 5] =
        [src as u64, 0, dst as u64, 0, ports as u64 | (proto as u64) << 32 | (FAMILY_V4 as u64) << 40];
    // SAFETY: CtKey is repr(C), 40 bytes without implicit padding, any bytes valid; BPF is
    // little-endian (bpfel), so the words lay the fields out in order: src, zeros, dst,
    // zeros, source port, destination port, protocol, family, padding.
    unsafe { core::mem::transmute::<[u64; 5], CtKey>(words) }
}

/// The forward key of an IPv4 destination, from whole words (see [`ct_key_v4`]).
#[inline(always)]
pub fn fwd_key_v4(dst: u32, dport: [u8; 2], proto: u8) -> FwdKey {
    let tail = u16::from_ne_bytes(dport) as u32 | (proto as u32) << 16 | (FAMILY_V4 as u32) << 24;
    // SAFETY: FwdKey is repr(C), 20 bytes without implicit padding, any bytes valid; the
    // little-endian words lay out address, zeros, port, protocol, family.
    unsafe { core::mem::transmute::<[u32; 5], FwdKey>([dst, 0, 0, 0, tail]) }
}

/// The key of a parsed flow's own direction.
#[inline(always)]
pub fn flow_key(flow: &Flow) -> CtKey {
    if flow.is_v6() {
        return ct_key(flow.family, flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    }
    let word = |a: &[u8; 16]| u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    let ports = u32::from_ne_bytes([flow.sport[0], flow.sport[1], flow.dport[0], flow.dport[1]]);
    ct_key_v4(word(&flow.src), word(&flow.dst), ports, flow.proto)
}

/// The entry at `key`.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<&'static mut CtValue> {
    // SAFETY: map value pointer from a successful lookup.
    Some(unsafe { &mut *FWD_CT_V4.get_ptr_mut(key)? })
}

/// Refreshes the entry's last-seen time: a packet of its direction is being handled.
#[inline(always)]
pub fn touch(entry: &mut CtValue) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
}

/// Tracked flow, new flow of a forward, or no match. `untracked`: the caller has already
/// looked the flow up in the connection table and found nothing. A tracked connection's
/// state is not touched here (see [`track`]). `room`: for the source-list lookup.
#[inline(always)]
pub fn classify(flow: &Flow, untracked: bool, room: &mut SourceLookup) -> Result<Plan, Reason> {
    let key = flow_key(flow);
    if let Some(entry) = if untracked { None } else { lookup(&key) } {
        touch(entry);
        return Ok(Plan::Tracked { entry });
    }
    let mut fkey =
        FwdKey { addr: flow.dst, port_be: u16::from_ne_bytes(flow.dport), proto: flow.proto, family: flow.family };
    match rules::lookup(&mut fkey) {
        Some(fwd) if fwd.flags & FWD_FLAG_INGRESS != 0 => {
            // Only a SYN opens a TCP connection (a SYN-ACK to a listen port answers a
            // connection of the host's own, from that port).
            if flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
                return Err(Reason::TcpNotSyn);
            }
            if !sources::admits(fwd, flow.family, &flow.src, room) {
                stats::count_source_denied(fwd.forward_id);
                return Err(Reason::SourceDenied);
            }
            let hash = || backend::hash_of(&flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
            Ok(Plan::New { fwd, backend: backend::choose(fwd, hash, u16::from_ne_bytes(flow.dport))? })
        }
        _ => Err(Reason::NoRule),
    }
}

/// What a packet of a tracked connection does to it: netfilter's TCP state machine (a new
/// SYN on a closed connection reopens it with the same mapping; an RST outside the window
/// and segments the state does not allow are refused), UDP's first answer, and this
/// direction's sequence. Runs once per packet, by the program that forwards it.
#[inline(always)]
pub fn track(entry: &mut CtValue, flow: &Flow) -> Result<(), Reason> {
    let reply = entry.direction == CT_DIR_REPLY;
    if flow.proto != PROTO_TCP {
        if reply && entry.state == UDP_UNREPLIED {
            set_connection_state(entry, flow, UDP_REPLIED, CT_ASSURED, false);
        }
        return Ok(());
    }
    let old = entry.state;
    let seq_known = entry.flags & CT_SEQ_KNOWN != 0;
    let new = match tcp_step(old, reply, flow.tcp_flags) {
        Step::Invalid => return Err(Reason::CtInvalid),
        Step::Ignore => return Ok(()),
        Step::To(new) => new,
    };
    // Once the handshake is done, only an RST near its sender's sequence ends the
    // connection. During the handshake an RST may carry the acknowledgement of a SYN-ACK
    // it refuses instead (RFC 793: a client answers a SYN-ACK for another connection on
    // its tuple, a backend's leftover, with <SEQ=SEG.ACK><CTL=RST>): it must reach the
    // backend, or every retry meets the same leftover.
    if flow.tcp_flags & TCP_RST != 0
        && entry.flags & CT_ASSURED != 0
        && !rst_acceptable(flow.tcp_seq, entry.seq_end, seq_known)
    {
        return Err(Reason::RstOutOfWindow);
    }
    let reopen = is_reopen(old, new);
    let assured = entry.flags & CT_ASSURED;
    let flags = if reopen {
        0
    } else if new == TCP_ESTABLISHED {
        CT_ASSURED
    } else {
        assured
    };
    if new != old || flags != assured {
        set_connection_state(entry, flow, new, flags, reopen);
    }
    record_seq(entry, flow);
    Ok(())
}

/// Records the end of this segment as the direction's highest sequence when it is.
#[inline(always)]
pub fn record_seq(entry: &mut CtValue, flow: &Flow) {
    let end = segment_end(flow.tcp_seq, flow.tcp_payload as u32, flow.tcp_flags);
    if entry.flags & CT_SEQ_KNOWN == 0 || seq_after(end, entry.seq_end) {
        entry.seq_end = end;
        entry.flags |= CT_SEQ_KNOWN;
    }
}

/// Writes a connection's state and flags into this entry and its other direction's.
/// `reopen` forgets both directions' sequences; a backend on this host stays one.
#[inline(always)]
fn set_connection_state(entry: &mut CtValue, flow: &Flow, state: u8, flags: u8, reopen: bool) {
    let keep = CT_HOST_BACKEND | CT_NH_XDP | if reopen { 0 } else { CT_SEQ_KNOWN };
    entry.state = state;
    entry.flags = flags | (entry.flags & keep);
    if reopen {
        // A new connection on the old mapping (netfilter makes a new conntrack): a new age.
        // SAFETY: helper without arguments.
        entry.created_ns = unsafe { bpf_ktime_get_ns() };
    }
    let Some(scratch) = FWD_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot, used by this program run only.
    let other = unsafe { &mut (*scratch).other };
    set_other_direction(other, entry, flow.family, flow.proto);
    if let Some(peer) = FWD_CT_V4.get_ptr_mut(&*other) {
        // SAFETY: map value pointer from a successful lookup.
        let peer = unsafe { &mut *peer };
        peer.state = state;
        peer.flags = flags | (peer.flags & keep);
        peer.created_ns = entry.created_ns;
    }
}

/// Writes into `key` the key of the other direction of the connection `entry` belongs
/// to: its rewritten tuple, reversed. Field by field, in place: a whole key built and then
/// copied would pass through the stack, which the bpf_loop steps that call this have
/// little of.
#[inline(always)]
fn set_other_direction(key: &mut CtKey, entry: &CtValue, family: u8, proto: u8) {
    key.src_addr = entry.new_dst_addr;
    key.dst_addr = entry.new_src_addr;
    key.src_port_be = entry.new_dst_port_be;
    key.dst_port_be = entry.new_src_port_be;
    key.proto = proto;
    key.family = family;
    key._pad = [0; 2];
}

#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    // Every address word counts: IPv6 flows that differ only in their upper bits must not
    // all compete for the same few source ports.
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
    let fold =
        |a: &[u8; 16]| word(a, 0) ^ word(a, 1).rotate_left(7) ^ word(a, 2).rotate_left(14) ^ word(a, 3).rotate_left(21);
    let (a, b) = (fold(&flow.src), fold(&flow.dst));
    let c = (u16::from_ne_bytes(flow.sport) as u32) << 16 | u16::from_ne_bytes(flow.dport) as u32;
    // Every input bit reaches every output bit, so consecutive client ports spread over
    // the whole SNAT range instead of clustering.
    forwarder_common::maglev::fmix32(a ^ b.rotate_left(13) ^ c.wrapping_mul(0x9e37_79b1))
}

/// Whether the connection whose entry sits at `key` may give way to a new one (unassured,
/// and old enough: see [`early_drop_age`]).
#[inline(always)]
fn droppable_at(key: &CtKey, now: u64) -> bool {
    // SAFETY: read at once.
    match unsafe { FWD_CT_V4.get(key) } {
        Some(e) => e.flags & CT_ASSURED == 0 && now.wrapping_sub(e.last_seen_ns) >= early_drop_age(key.proto),
        None => false,
    }
}

/// The least idle time of an unassured connection dropped early. A UDP flow's copies in
/// the flow cache may serve it for up to ~3 s without refreshing its entry, so UDP waits
/// until no copy can be current; TCP copies serve established connections only.
#[inline(always)]
fn early_drop_age(proto: u8) -> u64 {
    if proto == PROTO_TCP { EARLY_DROP_MIN_AGE_NS } else { LAST_SEEN_SLACK_NS + EARLY_DROP_MIN_AGE_NS }
}

/// Removes the connection whose entry sits at `key` (both its entries), counted as an
/// early drop; `other` is scratch for its other key.
#[inline(always)]
fn early_drop(key: &CtKey, other: &mut CtKey) {
    // SAFETY: copied out at once.
    let Some(e) = (unsafe { FWD_CT_V4.get(key) }) else { return };
    set_other_direction(other, e, key.family, key.proto);
    let _ = FWD_CT_V4.remove(&*other);
    let _ = FWD_CT_V4.remove(key);
    stats::count_reason(Reason::EarlyDrop);
}

/// Whom a planned packet is counted for: its forward id and its backend's index.
#[derive(Clone, Copy)]
pub struct Counted {
    pub forward_id: u32,
    pub backend: u32,
}

/// Where a planned packet goes (into `to`) and, for a new flow, whether SNAT wants the
/// route's source; returns whom it counts for.
#[inline(always)]
pub fn target_of(plan: &Plan, flow: &Flow, to: &mut Tuple) -> (Counted, bool) {
    match plan {
        Plan::Tracked { entry } => {
            to.src = entry.new_src_addr;
            to.dst = entry.new_dst_addr;
            to.sport = entry.new_src_port_be.to_ne_bytes();
            to.dport = entry.new_dst_port_be.to_ne_bytes();
            (Counted { forward_id: entry.forward_id, backend: entry.backend_index() }, false)
        }
        Plan::New { fwd, backend } => {
            to.src = flow.src;
            to.dst = backend.addr;
            to.sport = flow.sport;
            to.dport = backend.port_be.to_ne_bytes();
            (Counted { forward_id: fwd.forward_id, backend: backend.index }, fwd.snat_mode == SNAT_AUTO)
        }
    }
}

/// Commits the packet to the connection table: a tracked connection's state moves on
/// ([`track`]), a new flow is recorded. Leaves the tuple to rewrite to in `new`.
/// Called once per packet, by the program that goes on to forward it. `cache_new`: for a
/// new flow, the next hop to cache (none when its `len_ok` is 0), written into its original
/// entry before that is inserted (no lookup of the entry again after it); a tracked
/// connection's caller caches its next hop itself ([`cache_next_hop`]). It is read from the
/// program's working memory after the SNAT port walk: a value kept in a register across
/// the walk, one on one path and another on the other, would make the verifier walk it
/// twice.
#[inline(always)]
pub fn commit<C: EbpfContext>(
    ctx: &C,
    plan: &mut Plan,
    flow: &Flow,
    fib: &Fib,
    to: &Tuple,
    new: &mut Tuple,
    cache_new: &NextHopToCache,
) -> Result<(), Reason> {
    match plan {
        Plan::Tracked { entry } => {
            // A later fragment carries no TCP flags or sequence: it moves no state (its
            // first fragment did).
            if flow.frag != FRAG_LATER {
                track(entry, flow)?;
            }
            *new = *to;
            Ok(())
        }
        Plan::New { fwd, backend } => {
            let snat_src = match fwd.snat_mode {
                SNAT_FIXED => &fwd.snat_addr,
                // Route's preferred source; for a backend on this host (no forwarding
                // answer) the address the client reached, which is ours too.
                _ if fib.src != [0; 16] => &fib.src,
                _ => &flow.dst,
            };
            commit_new(ctx, flow, fwd, backend.index, to, snat_src, new, fib, cache_new)?;
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

/// Records a new flow in both directions and returns the tuple its packets are rewritten
/// to. `to` holds the chosen backend (`target_of`), whose counter index is `backend_index`:
/// read from the tuple, not through `Chosen`'s pointer, which points into one map or
/// another and would make the verifier walk the commit once for each. `snat_src` is the
/// source address for SNAT (ignored when the forward has SNAT off,
/// or its backend is on this host: the backend sees the client, and the destination is
/// `host::delivery_addr`).
/// Keys and values are built in a per-CPU scratch slot: the stack (512 bytes) is too small
/// for them next to the FIB parameters.
///
/// The reply entry goes in first: it reserves the source port (the client's own when that
/// reply tuple is free, as netfilter keeps it; else a walk of the range), skipping ports
/// a host socket holds, and taking the port of an unassured connection (early drop) when
/// none is free. The original-direction entry follows with BPF_NOEXIST: should another CPU
/// have committed the same flow meanwhile, this one drops its reservation and adopts that
/// entry's translation, so a flow never becomes two.
#[inline(always)]
pub fn commit_new<C: EbpfContext>(
    ctx: &C,
    flow: &Flow,
    fwd: &FwdValue,
    backend_index: u32,
    to: &Tuple,
    snat_src: &[u8; 16],
    new: &mut Tuple,
    fib: &Fib,
    cache: &NextHopToCache,
) -> Result<(), Reason> {
    if flow.proto != PROTO_TCP
        && host_socket(ctx.as_ptr(), flow.proto, flow.family, &flow.src, &flow.dst, flow.sport, flow.dport, true)
    {
        return Err(Reason::HostSocket);
    }
    let scratch = FWD_SCRATCH.get_ptr_mut(0).ok_or(Reason::ConntrackFull)?;
    // SAFETY: per-CPU slot, used by this program run only.
    let CtScratch { key, value, other } = unsafe { &mut *scratch };
    let host = fwd.flags & FWD_FLAG_HOST_BACKEND != 0;
    // 8-aligned, so it is copied in words (see parse::Words16).
    let backend = Words16(if host { *crate::host::delivery_addr(fwd, flow) } else { to.dst });
    let bport = to.dport;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    *value = CtValue {
        new_src_addr: flow.dst,
        new_dst_addr: flow.src,
        new_src_port_be: u16::from_ne_bytes(flow.dport),
        new_dst_port_be: u16::from_ne_bytes(flow.sport),
        forward_id: fwd.forward_id,
        direction: CT_DIR_REPLY,
        state: if flow.proto == PROTO_TCP { TCP_SYN_SENT } else { UDP_UNREPLIED },
        nh_l3_delta: 0,
        nh_ifindex: 0,
        last_seen_ns: now,
        nh_dmac: [0; 6],
        nh_smac: [0; 6],
        nh_l4_delta: 0,
        nh_len_ok: 0,
        nh_gen: 0,
        nh_jiffies: 0,
        seq_end: 0,
        flags: if host { CT_HOST_BACKEND } else { 0 },
        backend: [0; 3],
        created_ns: now,
    };
    value.set_backend_index(backend_index);

    if fwd.snat_mode == SNAT_OFF || host {
        *key = ct_key(flow.family, backend.0, flow.src, bport, flow.sport, flow.proto);
        match FWD_CT_V4.insert(&*key, &*value, BPF_NOEXIST as u64) {
            Ok(()) => {}
            // The same flow committed by another CPU: the original entry below adopts it.
            Err(EEXIST) if same_reply(key, value) => {}
            // Another forward's connection to this backend from the same client tuple (the
            // config refuses two SNAT-off forwards to one backend), or a stale one.
            Err(EEXIST) if droppable_at(key, now) => {
                early_drop(key, other);
                FWD_CT_V4.insert(&*key, &*value, BPF_NOEXIST as u64).map_err(|_| Reason::PortsExhausted)?;
            }
            Err(EEXIST) => return Err(Reason::PortsExhausted),
            Err(_) => return Err(Reason::ConntrackFull),
        }
        copy_addr(&mut new.src, &flow.src);
        new.dst = backend.0;
        new.sport = flow.sport;
        new.dport = bport;
    } else {
        let range = match FWD_GLOBAL_V2.get(0) {
            Some(g) => g.snat_ports(),
            None => GlobalConfig::default().snat_ports(),
        };
        // Copied before the walk: a pointer live across it (into the rule, the FIB answer
        // or the flow) would make the verifier walk it once for each.
        copy_addr(&mut new.src, snat_src);
        *key = ct_key(flow.family, backend.0, new.src, bport, [0; 2], flow.proto);
        let port = reserve_port(ctx, flow, range, now)?;
        new.dst = backend.0;
        new.sport = port;
        new.dport = bport;
    }

    value.direction = CT_DIR_ORIGINAL;
    copy_addr(&mut value.new_src_addr, &new.src);
    copy_addr(&mut value.new_dst_addr, &new.dst);
    value.new_src_port_be = u16::from_ne_bytes(new.sport);
    value.new_dst_port_be = u16::from_ne_bytes(new.dport);
    if flow.proto == PROTO_TCP {
        value.seq_end = segment_end(flow.tcp_seq, flow.tcp_payload as u32, flow.tcp_flags);
        value.flags |= CT_SEQ_KNOWN;
    }
    // SAFETY: a field of this CPU's working memory, read (again) after the walk.
    let hop = unsafe { core::ptr::read_volatile(cache) };
    if hop.len_ok != 0 {
        // Not yet in the table: no other program reads it, so no ordering of the stores.
        // It ages from the FIB's answer (which may come from the FIB memo).
        let clock = (route_generation(), fib.looked_up);
        write_next_hop(value, flow, new, fib, hop, clock);
        value.nh_ifindex = fib.ifindex;
    }
    *other = flow_key(flow);
    match FWD_CT_V4.insert(&*other, &*value, BPF_NOEXIST as u64) {
        Ok(()) => {
            stats::count_new_conn(fwd.forward_id, backend_index);
            Ok(())
        }
        Err(e) => {
            // Another CPU won (EEXIST): its translation is the flow's. Either way the
            // reservation made above goes (the winner's reply entry is its own).
            let _ = FWD_CT_V4.remove(&*key);
            if e != EEXIST {
                return Err(Reason::ConntrackFull);
            }
            // SAFETY: copied out at once.
            let winner = unsafe { FWD_CT_V4.get(&*other) }.ok_or(Reason::ConntrackFull)?;
            new.src = winner.new_src_addr;
            new.dst = winner.new_dst_addr;
            new.sport = winner.new_src_port_be.to_ne_bytes();
            new.dport = winner.new_dst_port_be.to_ne_bytes();
            Ok(())
        }
    }
}

/// The reply entry at `key` is the one `value` would be (the same flow, committed by
/// another CPU at the same time).
#[inline(always)]
fn same_reply(key: &CtKey, value: &CtValue) -> bool {
    // SAFETY: read at once.
    match unsafe { FWD_CT_V4.get(key) } {
        Some(e) => {
            e.new_src_addr == value.new_src_addr
                && e.new_dst_addr == value.new_dst_addr
                && e.new_src_port_be == value.new_src_port_be
                && e.new_dst_port_be == value.new_dst_port_be
        }
        None => false,
    }
}

/// Chooses the SNAT source port of a new flow by inserting its reply entry (`key`, whose
/// destination port is filled in here, and `value`, both in the per-CPU scratch): the
/// client's port when the range has it and that reply tuple is free, else up to
/// [`PORT_ATTEMPTS`] distinct ports of the range; ports a host socket uses are skipped;
/// with none free, an unassured connection found on the way gives its port up. Returns
/// the port (network order). The two walks run under bpf_loop: the verifier checks each
/// step once instead of every unrolled attempt.
#[inline(always)]
fn reserve_port<C: EbpfContext>(ctx: &C, flow: &Flow, range: PortRange, now: u64) -> Result<[u8; 2], Reason> {
    if range.size() == 0 {
        return Err(Reason::PortsExhausted);
    }
    let mut walk = PortWalk {
        ctx: ctx.as_ptr(),
        now,
        h: flow_hash(flow),
        client_port: u16::from_be_bytes(flow.sport),
        port: 0,
        range,
        status: WALK_NOTHING,
    };
    let walk_ptr = &mut walk as *mut PortWalk as *mut core::ffi::c_void;
    // SAFETY: static callbacks, a context on this stack that outlives the calls.
    unsafe { bpf_loop(PORT_ATTEMPTS + 1, free_port_step as *mut _, walk_ptr, 0) };
    if walk.status == WALK_NOTHING || walk.status == WALK_FULL {
        // SAFETY: as above.
        unsafe { bpf_loop(PORT_ATTEMPTS + 1, early_drop_step as *mut _, walk_ptr, 0) };
    }
    match walk.status {
        WALK_FOUND if walk.port != 0 => Ok(walk.port.to_be_bytes()),
        WALK_FULL => Err(Reason::ConntrackFull),
        _ => Err(Reason::PortsExhausted),
    }
}

const WALK_NOTHING: u32 = 0;
const WALK_FOUND: u32 = 1;
const WALK_FULL: u32 = 2;

/// The state of a port walk, shared with its bpf_loop steps.
#[repr(C)]
struct PortWalk {
    /// The program's context (for the socket lookups).
    ctx: *mut core::ffi::c_void,
    now: u64,
    h: u32,
    client_port: u16,
    /// The port reserved (host order) once `status` is `WALK_FOUND`.
    port: u16,
    range: PortRange,
    status: u32,
}

impl PortWalk {
    /// Attempt `i`'s port: the client's own first (0: not in the range, skipped).
    #[inline(always)]
    fn candidate(&self, i: u32) -> u16 {
        if i == 0 {
            if self.range.contains(self.client_port) { self.client_port } else { 0 }
        } else {
            pick_port(self.h, i - 1, &self.range)
        }
    }
}

/// One attempt at a free port: the reply entry inserted if the tuple is free and no host
/// socket uses it. Returns 1 (stop) once found, or when the table is full.
#[inline(never)]
extern "C" fn free_port_step(i: u32, walk: *mut core::ffi::c_void) -> i64 {
    // SAFETY: the PortWalk reserve_port passed.
    let walk = unsafe { &mut *(walk as *mut PortWalk) };
    let Some(scratch) = FWD_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU slot, used by this program run only.
    let CtScratch { key, value, .. } = unsafe { &mut *scratch };
    let port = walk.candidate(i);
    if port == 0 {
        return 0;
    }
    let port_be = port.to_be_bytes();
    key.dst_port_be = u16::from_ne_bytes(port_be);
    if host_socket(walk.ctx, key.proto, key.family, &key.src_addr, &key.dst_addr, bport_of(key), port_be, false) {
        return 0;
    }
    match FWD_CT_V4.insert(&*key, &*value, BPF_NOEXIST as u64) {
        Ok(()) => {
            walk.port = port;
            walk.status = WALK_FOUND;
            1
        }
        Err(EEXIST) => 0,
        Err(_) => {
            walk.status = WALK_FULL;
            1
        }
    }
}

/// One attempt at an early drop: the connection holding attempt `i`'s port gives it up if
/// it may (unassured, idle long enough), and the new reply entry takes it. Returns 1
/// (stop) once that was tried.
#[inline(never)]
extern "C" fn early_drop_step(i: u32, walk: *mut core::ffi::c_void) -> i64 {
    // SAFETY: the PortWalk reserve_port passed.
    let walk = unsafe { &mut *(walk as *mut PortWalk) };
    let Some(scratch) = FWD_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU slot, used by this program run only.
    let CtScratch { key, value, other } = unsafe { &mut *scratch };
    let port = walk.candidate(i);
    if port == 0 {
        return 0;
    }
    let port_be = port.to_be_bytes();
    key.dst_port_be = u16::from_ne_bytes(port_be);
    if !droppable_at(key, walk.now) {
        return 0;
    }
    early_drop(key, other);
    match FWD_CT_V4.insert(&*key, &*value, BPF_NOEXIST as u64) {
        Ok(()) => {
            walk.port = port;
            walk.status = WALK_FOUND;
        }
        Err(EEXIST) => walk.status = WALK_NOTHING,
        Err(_) => walk.status = WALK_FULL,
    }
    1
}

#[inline(always)]
fn bport_of(key: &CtKey) -> [u8; 2] {
    key.src_port_be.to_ne_bytes()
}

/// The entry of a tracked connection (none for a new flow).
#[inline(always)]
pub fn tracked_entry(plan: Plan) -> Option<&'static mut CtValue> {
    match plan {
        Plan::Tracked { entry } => Some(entry),
        Plan::New { .. } => None,
    }
}

/// The connection-table entry of a flow the full path has just handled: the tracked entry,
/// or the one `commit_new` has just written (or adopted).
#[inline(always)]
pub fn entry_of(plan: Plan, flow: &Flow) -> Option<&'static mut CtValue> {
    tracked_entry(plan).or_else(|| {
        let key = flow_key(flow);
        // SAFETY: map value pointer from a successful lookup.
        FWD_CT_V4.get_ptr_mut(&key).map(|e| unsafe { &mut *e })
    })
}

/// A next hop to keep in a connection's entry beside the FIB's answer: `len_ok`, the
/// length the FIB has just passed (a GSO packet's segment's at TC; 0: none to keep);
/// `xdp_ok`, XDP can send to the egress (`CT_NH_XDP`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHopToCache {
    pub len_ok: u16,
    pub xdp_ok: bool,
}

/// Keeps the next hop the full path has just found (and the checksum deltas of the
/// rewrite) in a live entry, so the next packets of this direction skip the FIB lookup
/// (see fastpath, fastpath6), from XDP's full path and TC's. `ifindex` is written last, so
/// the fast path, which runs only when it is non-zero, never sees a next hop half written.
#[inline(always)]
pub fn cache_next_hop(entry: &mut CtValue, flow: &Flow, new: &Tuple, fib: &Fib, hop: NextHopToCache) {
    let generation = route_generation();
    // SAFETY: helper without arguments (inlined by the verifier).
    let now = unsafe { bpf_jiffies64() } as u32;
    // The FIB has just passed this length; a still-current entry for the same egress keeps
    // the larger length it passed before.
    let current = entry.nh_ifindex == fib.ifindex && next_hop_current(entry.nh_gen, entry.nh_jiffies, generation, now);
    let len_ok = if current && entry.nh_len_ok > hop.len_ok { entry.nh_len_ok } else { hop.len_ok };
    // SAFETY: a map value; volatile so the stores keep their order (see above).
    unsafe {
        core::ptr::write_volatile(&mut entry.nh_ifindex, 0);
    }
    // It ages from the FIB's answer (which may come from the FIB memo, route::lookup_memo).
    write_next_hop(entry, flow, new, fib, NextHopToCache { len_ok, ..hop }, (generation, fib.looked_up));
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&mut entry.nh_ifindex, fib.ifindex);
    }
}

/// The next hop's fields but its `ifindex`, for an entry no other program sees yet
/// ([`commit_new`]'s, then `nh_ifindex` is set plainly) or under [`cache_next_hop`]'s
/// ordering. `clock`: the route generation and jiffies it was looked up under.
#[inline(always)]
fn write_next_hop(entry: &mut CtValue, flow: &Flow, new: &Tuple, fib: &Fib, hop: NextHopToCache, clock: (u32, u32)) {
    // IPv6: all 16 address bytes enter the L4 pseudo header; the L3 delta goes unused.
    let v6 = flow.is_v6();
    let old_addrs = sum_addr(&flow.src, v6) + sum_addr(&flow.dst, v6);
    let new_addrs = sum_addr(&new.src, v6) + sum_addr(&new.dst, v6);
    let ports = |p: [u8; 2], q: [u8; 2]| u16::from_be_bytes(p) as u32 + u16::from_be_bytes(q) as u32;
    entry.nh_l3_delta = add_deltas(delta(old_addrs, new_addrs), TTL_DECREMENT_DELTA);
    entry.nh_l4_delta = delta(old_addrs + ports(flow.sport, flow.dport), new_addrs + ports(new.sport, new.dport));
    entry.nh_dmac = fib.dmac;
    entry.nh_smac = fib.smac;
    entry.nh_len_ok = hop.len_ok;
    entry.nh_gen = clock.0;
    entry.nh_jiffies = clock.1;
    entry.flags = (entry.flags & !CT_NH_XDP) | if hop.xdp_ok { CT_NH_XDP } else { 0 };
}

/// The current route generation (0 until userspace sets one).
#[inline(always)]
pub fn route_generation() -> u32 {
    FWD_ROUTE_GEN.get(0).copied().unwrap_or(0)
}
