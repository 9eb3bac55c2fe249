//! The established-flow fast path (IPv4), for XDP and for TC ingress: a packet of a
//! tracked connection whose entry holds a current next hop is rewritten with the entry's
//! precomputed checksum deltas and redirected, without the full parse, the forward lookup
//! or the FIB lookup.
//!
//! Two tiers. The first is this CPU's flow cache: a slot found by indexing, without the
//! connection table's hash lookup (the largest part of this path's cost), that holds a copy
//! of the entry's rewrite and next hop. The second is the entry itself, which (re)fills the
//! slot. A slot is only as current as the entry's next hop it was copied from (the same
//! generation and age); a TCP slot serves only plain segments of an established connection
//! whose sequence is less than `SEQ_SYNC_BYTES` past the one the entry recorded, so the
//! entry keeps each direction's sequence (for its RST check) within that much, and a copy
//! of a closed connection does not serve the next one on its tuple. The entry tier records
//! sequences; a packet that would move the connection's state (SYN, FIN, RST, the
//! handshake's last ACK, a first UDP answer) and anything unusual about the packet go to
//! the full path (conntrack::track), which also fills the entry's next hop in
//! (conntrack::cache_next_hop).
//!
//! XDP and TC differ in three ways. XDP writes the packet directly with the combined
//! deltas, and leaves a locally sent segment whose checksum is still a CHECKSUM_PARTIAL
//! seed to TC; TC writes directly too when the skb's checksums were verified
//! (CHECKSUM_UNNECESSARY), and otherwise through the skb helpers, which keep
//! CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right; it measures a GSO packet by its
//! segments. XDP uses only next hops its redirect can reach (`CT_NH_XDP`); TC any. Each
//! has its own flow cache.

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_QUERY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_level, bpf_jiffies64},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use forwarder_common::{
    CT_DIR_REPLY, CtValue, FLOW_CACHE_WAYS, FWD_FLAG_INGRESS, FlowCacheSlot, PROTO_TCP, PROTO_UDP, Reason,
    conntrack::{
        CT_NH_XDP, CT_SEQ_KNOWN, SEQ_SYNC_BYTES, TCP_FIN, TCP_RST, TCP_SYN, UDP_UNREPLIED, segment_end, seq_after,
        tcp_keeps_state,
    },
    csum::{apply_delta, ipv4_pseudo_seed, wsum_diff},
    flow_cache_bucket, next_hop_current,
};

use crate::{
    conntrack::{ct_key_v4, fwd_key_v4, route_generation},
    ctx::{Packet, read, read_words, write},
    maps::{FWD_CT_V4, FWD_FLOW_CACHE, FWD_FLOW_CACHE_TC, FWD_TX_PORTS},
    parse::{ETH_LEN, IPV4_CHECK_OFF, IPV4_SRC_OFF, IPV4_TTL_OFF, L3_OFF, L4_OFF_V4},
    rules, stats,
    verdict::Outcome,
};

/// What the fast path found for a packet.
pub(crate) enum Hit {
    /// A current copy of the packet's connection (a flow cache slot, filled from the entry
    /// when `how` is the entry tier's reason).
    Slot(&'static FlowCacheSlot, Reason),
    /// An IPv4 TCP/UDP packet of no tracked connection for a forward's listen address: a
    /// new flow (the full path need not look it up in the connection table again).
    Untracked,
    /// An IPv4 TCP/UDP packet of no connection and no forward: not ours (host traffic pays
    /// two lookups, without the full parse).
    NoMatch,
    /// XDP: a forward's packet whose checksum is a CHECKSUM_PARTIAL seed; only TC can
    /// finish it, so XDP hands it over without the full path's work.
    ToTc,
    /// Everything else: the full path decides.
    Full,
}

/// The fast paths' answers below 2^32 (a packed outcome is above).
pub const NOT_CACHED_NO_MATCH: u32 = 0;
pub const NOT_CACHED_UNTRACKED: u32 = 1;
pub const NOT_CACHED_FULL: u32 = 2;
pub const NOT_CACHED_TO_TC: u32 = 3;

#[inline(always)]
pub(crate) fn answer(hit: Result<Hit, Reason>, send: impl FnOnce(&FlowCacheSlot, Reason) -> Outcome) -> u64 {
    match hit {
        Ok(Hit::Slot(slot, how)) => crate::verdict::pack(send(slot, how)),
        Ok(Hit::NoMatch) => NOT_CACHED_NO_MATCH as u64,
        Ok(Hit::Untracked) => NOT_CACHED_UNTRACKED as u64,
        Ok(Hit::ToTc) => NOT_CACHED_TO_TC as u64,
        Ok(Hit::Full) | Err(_) => NOT_CACHED_FULL as u64,
    }
}

/// The XDP fast path in its own frame (its stack and the full path's would not fit in
/// one): a packed outcome (verdict::pack, at least 2^32) when it handled the packet, else
/// a `NOT_CACHED_*` code.
#[inline(never)]
pub fn try_cached_out_of_line(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = XdpContext::new(raw);
    let Ok(Some(h)) = headers(&ctx, false) else {
        return NOT_CACHED_FULL as u64;
    };
    answer(find::<false>(&h, &FWD_FLOW_CACHE), |s, how| send_xdp(&ctx, &h, s, how))
}

/// The TC fast path, likewise (TC never sees `NOT_CACHED_TO_TC`).
#[inline(never)]
pub fn try_cached_tc_out_of_line(raw: *mut aya_ebpf::bindings::__sk_buff) -> u64 {
    let ctx = TcContext::new(raw);
    let Some(gso_size) = tc_gso_size(raw) else {
        return NOT_CACHED_FULL as u64;
    };
    let Ok(Some(mut h)) = headers(&ctx, true) else {
        return NOT_CACHED_FULL as u64;
    };
    h.len = segment_len(h.len, h.hdr_len, gso_size);
    answer(find::<true>(&h, &FWD_FLOW_CACHE_TC), |s, how| send_tc(&ctx, &h, s, how))
}

/// The gso_size of an skb the TC fast paths may take; `None` when skb->vlan_tci holds a
/// tag (l2::untagged_tc's to judge).
#[inline(always)]
pub(crate) fn tc_gso_size(raw: *mut aya_ebpf::bindings::__sk_buff) -> Option<usize> {
    // SAFETY: reading context fields.
    let (vlan, gso_size) = unsafe { ((*raw).vlan_present, (*raw).gso_size) };
    if vlan != 0 { None } else { Some(gso_size as usize) }
}

/// The length a next hop must pass for a packet of IP length `len` with `hdr_len` header
/// bytes: a GSO packet leaves as segments of its headers and gso_size bytes each.
#[inline(always)]
pub(crate) fn segment_len(len: usize, hdr_len: usize, gso_size: usize) -> usize {
    if gso_size != 0 && hdr_len + gso_size < len { hdr_len + gso_size } else { len }
}

const ETH_P_IP: [u8; 2] = [0x08, 0x00];

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// The headers of a packet the fast path may take, read in place. Addresses and ports are
/// kept as the native-endian words of their bytes in the packet (as in [`FlowCacheSlot`]):
/// as words they are a few registers, as byte arrays a dozen values spilled to the stack.
struct Headers {
    src: u32,
    dst: u32,
    /// Source port then destination port.
    ports: u32,
    proto: u8,
    ttl: u8,
    tot_len: usize,
    /// The length the next hop must pass: the IP length, or a GSO packet's segment's.
    len: usize,
    /// IP and TCP/UDP header bytes.
    hdr_len: usize,
    /// Offset of the L4 checksum, and its value.
    check_off: usize,
    l4_check: u16,
    tcp_flags: u8,
    /// TCP sequence (host order) and the sequence just past this segment.
    seq: u32,
    seq_end: u32,
    /// The L4 checksum is a CHECKSUM_PARTIAL seed (see csum::looks_partial).
    partial: bool,
}

impl Headers {
    /// UDP without a checksum (zero): it stays without one.
    #[inline(always)]
    fn no_udp_check(&self) -> bool {
        self.proto == PROTO_UDP && self.l4_check == 0
    }
}

#[inline(always)]
fn word<P: Packet>(ctx: &P, offset: usize) -> Result<u32, Reason> {
    read_words::<1, P>(ctx, offset).map(|[w]| w)
}

/// The headers of a plain IPv4 TCP/UDP packet, or `None` for the cases parse.rs takes
/// apart and the fast path leaves to it. Only the headers need be linear; the IP length
/// is checked against the whole packet (an skb's paged data included).
#[inline(always)]
fn headers<P: Packet>(ctx: &P, partial_ok: bool) -> Result<Option<Headers>, Reason> {
    if read::<2, _>(ctx, 12)? != ETH_P_IP {
        return Ok(None);
    }
    // Version 4 without options, not a fragment (DF may be set), TCP or UDP, TTL to spare.
    let ver_tos: [u8; 4] = read(ctx, L3_OFF)?;
    let frag_ttl_proto: [u8; 4] = read(ctx, L3_OFF + 6)?;
    let proto = frag_ttl_proto[3];
    if ver_tos[0] != 0x45
        || (frag_ttl_proto[0] & 0x3f) | frag_ttl_proto[1] != 0
        || frag_ttl_proto[2] <= 1
        || (proto != PROTO_TCP && proto != PROTO_UDP)
    {
        return Ok(None);
    }
    let tot_len = be16([ver_tos[2], ver_tos[3]]) as usize;
    if tot_len < L4_OFF_V4 - L3_OFF || tot_len + ETH_LEN > ctx.len() {
        return Ok(None);
    }
    let l4_len = tot_len - (L4_OFF_V4 - L3_OFF);
    let (check_off, l4_hdr, tcp_flags, seq, seq_end) = if proto == PROTO_TCP {
        let seq = u32::from_be_bytes(read(ctx, L4_OFF_V4 + 4)?);
        let tcp: [u8; 2] = read(ctx, L4_OFF_V4 + 12)?;
        let data_off = (tcp[0] >> 4) as usize * 4;
        if l4_len < 20 || data_off < 20 || data_off > l4_len {
            return Ok(None);
        }
        (L4_OFF_V4 + 16, data_off, tcp[1], seq, segment_end(seq, (l4_len - data_off) as u32, tcp[1]))
    } else {
        let udp_len = be16(read(ctx, L4_OFF_V4 + 4)?) as usize;
        if l4_len < 8 || udp_len < 8 || udp_len > l4_len {
            return Ok(None);
        }
        (L4_OFF_V4 + 6, 8, 0, 0, 0)
    };
    let mut h = Headers {
        src: word(ctx, IPV4_SRC_OFF)?,
        dst: word(ctx, IPV4_SRC_OFF + 4)?,
        ports: word(ctx, L4_OFF_V4)?,
        proto,
        ttl: frag_ttl_proto[2],
        tot_len,
        len: tot_len,
        hdr_len: L4_OFF_V4 - L3_OFF + l4_hdr,
        check_off,
        l4_check: be16(read(ctx, check_off)?),
        tcp_flags,
        seq,
        seq_end,
        partial: false,
    };
    // A CHECKSUM_PARTIAL seed needs TC's checksum helpers (TC's rewrite keeps it right).
    if !partial_ok {
        let seed = ipv4_pseudo_seed(h.src.to_ne_bytes(), h.dst.to_ne_bytes(), proto, l4_len as u16);
        h.partial = !h.no_udp_check() && h.l4_check == seed;
    }
    Ok(Some(h))
}

/// The two tiers (see the module's text); `TC` picks the program's rules, `cache` its flow
/// cache.
#[inline(always)]
fn find<const TC: bool>(h: &Headers, cache: &'static PerCpuArray<FlowCacheSlot>) -> Result<Hit, Reason> {
    let (src, dst, ports, proto) = (h.src, h.dst, h.ports, h.proto);
    let (cache_reason, entry_reason) = if TC {
        (Reason::RedirectTcFlowCache, Reason::RedirectTcCached)
    } else {
        (Reason::RedirectXdpFlowCache, Reason::RedirectXdpCached)
    };
    let generation = route_generation();
    // SAFETY: inlined helper without arguments.
    let now = unsafe { bpf_jiffies64() } as u32;
    let serves = |s: &FlowCacheSlot| {
        s.holds(src, dst, ports, proto)
            && s.current(generation, now)
            && h.len <= s.len_ok as usize
            && (proto != PROTO_TCP
                || tcp_keeps_state(s.state, h.tcp_flags) && h.seq.wrapping_sub(s.seq) < SEQ_SYNC_BYTES)
    };
    // A SYN, FIN or RST moves its connection's state: no slot serves it, so its bucket is
    // not even located (the per-CPU array's pointer to a random bucket is a cache miss of
    // its own, and the bucket's four lines are cold for a new connection).
    let moves = proto == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
    // TC: such a packet always takes the full path, which looks the connection up itself;
    // looking it up here too would only add to a short connection's cost.
    if TC && moves {
        return Ok(Hit::Full);
    }
    // Kept for the copy below, which only such a packet gets (a moving one takes the full path).
    let slots = if !h.partial && !moves {
        let Some([s0, s1, s2, s3]) = bucket(cache, flow_cache_bucket(src, dst, ports, proto)) else {
            return Ok(Hit::Full);
        };
        if serves(s0) {
            return Ok(Hit::Slot(s0, cache_reason));
        }
        if serves(s1) {
            return Ok(Hit::Slot(s1, cache_reason));
        }
        if serves(s2) {
            return Ok(Hit::Slot(s2, cache_reason));
        }
        if serves(s3) {
            return Ok(Hit::Slot(s3, cache_reason));
        }
        Some([s0, s1, s2, s3])
    } else {
        None
    };

    let key = ct_key_v4(src, dst, ports, proto);
    let Some(entry) = FWD_CT_V4.get_ptr_mut(&key) else {
        let p = ports.to_ne_bytes();
        let mut rule = fwd_key_v4(dst, [p[2], p[3]], proto);
        return Ok(match rules::lookup(&mut rule) {
            Some(f) if f.flags & FWD_FLAG_INGRESS != 0 => {
                if h.partial {
                    Hit::ToTc
                } else {
                    Hit::Untracked
                }
            }
            _ => Hit::NoMatch,
        });
    };
    if h.partial {
        return Ok(Hit::ToTc);
    }
    // SAFETY: map value pointer from a successful lookup.
    let entry = unsafe { &mut *entry };
    // SAFETY: a map value; read once, see conntrack::cache_next_hop.
    let ifindex = unsafe { core::ptr::read_volatile(&entry.nh_ifindex) };
    let (nh_gen, nh_jiffies) = (entry.nh_gen, entry.nh_jiffies);
    if ifindex == 0
        || !next_hop_current(nh_gen, nh_jiffies, generation, now)
        || h.len > entry.nh_len_ok as usize
        || (!TC && entry.flags & CT_NH_XDP == 0)
        || moves_state(entry, h)
    {
        return Ok(Hit::Full);
    }
    // The slot counts a backend index of 16 bits; a connection of a larger one takes the
    // full path.
    let backend = entry.backend_index();
    if backend > u16::MAX as u32 {
        return Ok(Hit::Full);
    }
    if proto == PROTO_TCP && (entry.flags & CT_SEQ_KNOWN == 0 || seq_after(h.seq_end, entry.seq_end)) {
        entry.seq_end = h.seq_end;
        entry.flags |= CT_SEQ_KNOWN;
    }
    let Some([s0, s1, s2, s3]) = slots else {
        return Ok(Hit::Full);
    };
    // The first slot that holds no other flow's current copy: four flows of a bucket all
    // stay, a fifth takes turns in the last slot.
    let free = |s: &FlowCacheSlot| s.free_for(src, dst, ports, proto, generation, now);
    let slot = if free(s0) {
        s0
    } else if free(s1) {
        s1
    } else if free(s2) {
        s2
    } else {
        s3
    };
    // The slot, field by field and arrays byte by byte: a struct or array copy would be a
    // call to a byte-loop memmove.
    let (a, b) = (&entry.new_src_addr, &entry.new_dst_addr);
    let (sp, dp) = (entry.new_src_port_be.to_ne_bytes(), entry.new_dst_port_be.to_ne_bytes());
    let word = u32::from_ne_bytes;
    slot.src = src;
    slot.dst = dst;
    slot.ports = ports;
    slot.proto = proto;
    slot.state = entry.state;
    slot.l3_delta = entry.nh_l3_delta;
    slot.l4_delta = entry.nh_l4_delta;
    slot.new_src = word([a[0], a[1], a[2], a[3]]);
    slot.new_dst = word([b[0], b[1], b[2], b[3]]);
    slot.new_ports = word([sp[0], sp[1], dp[0], dp[1]]);
    slot.forward_id = entry.forward_id;
    slot.ifindex = ifindex;
    slot.generation = nh_gen as u16;
    slot.backend = backend as u16;
    slot.jiffies = nh_jiffies;
    slot.len_ok = entry.nh_len_ok;
    slot.seq = h.seq;
    let (d, m) = (&entry.nh_dmac, &entry.nh_smac);
    slot.dmac = [d[0], d[1], d[2], d[3], d[4], d[5]];
    slot.smac = [m[0], m[1], m[2], m[3], m[4], m[5]];
    // The full path on another CPU may have rewritten this next hop meanwhile (it clears
    // nh_ifindex first, then writes the fields, generation and jiffies, then nh_ifindex):
    // a copy mixing two next hops must not be kept, nor used.
    // SAFETY: map value fields, read again from memory.
    let settled = unsafe {
        core::ptr::read_volatile(&entry.nh_ifindex) == ifindex
            && core::ptr::read_volatile(&entry.nh_gen) == nh_gen
            && core::ptr::read_volatile(&entry.nh_jiffies) == nh_jiffies
            && (TC || core::ptr::read_volatile(&entry.flags) & CT_NH_XDP != 0)
    };
    if !settled {
        slot.ifindex = 0;
        return Ok(Hit::Full);
    }
    Ok(Hit::Slot(slot, entry_reason))
}

/// The [`FLOW_CACHE_WAYS`] slots of the bucket that starts at `first` (IPv4 or IPv6).
#[inline(always)]
pub(crate) fn bucket<T>(cache: &'static PerCpuArray<T>, first: u32) -> Option<[&'static mut T; 4]> {
    const _: () = assert!(FLOW_CACHE_WAYS == 4);
    let (Some(a), Some(b), Some(c), Some(d)) = (
        cache.get_ptr_mut(first),
        cache.get_ptr_mut(first + 1),
        cache.get_ptr_mut(first + 2),
        cache.get_ptr_mut(first + 3),
    ) else {
        return None;
    };
    // SAFETY: distinct per-CPU slots, used by one program run at a time.
    Some(unsafe { [&mut *a, &mut *b, &mut *c, &mut *d] })
}

/// Whether the packet would move its connection's state (the full path's conntrack::track
/// does that): a TCP segment other than a plain one of an established connection, the
/// first answer of a UDP flow.
#[inline(always)]
fn moves_state(entry: &CtValue, h: &Headers) -> bool {
    moves_state_of(entry, h.proto, h.tcp_flags)
}

/// [`moves_state`] of a packet's protocol and TCP flags (IPv4 or IPv6).
#[inline(always)]
pub(crate) fn moves_state_of(entry: &CtValue, proto: u8, tcp_flags: u8) -> bool {
    if proto == PROTO_TCP {
        !tcp_keeps_state(entry.state, tcp_flags)
    } else {
        entry.direction == CT_DIR_REPLY && entry.state == UDP_UNREPLIED
    }
}

/// Rewrites the packet as `s` says, counts it for its forward and redirects it through the
/// devmap; `how` is the tier that found it.
#[inline(always)]
fn send_xdp(ctx: &XdpContext, h: &Headers, s: &FlowCacheSlot, how: Reason) -> Outcome {
    // The packet was read up to past every offset written, so this cannot fail; were it to,
    // a half-rewritten packet must not go on.
    if rewrite_direct(ctx, h, s).is_err() {
        return Err(Reason::RewriteFailed);
    }
    stats::count_forwarded(s.forward_id, s.backend as u32, h.tot_len as u16);
    let action = FWD_TX_PORTS.redirect(s.ifindex, 0).unwrap_or_else(|a| a);
    Ok((action as i32, how))
}

/// The rewrite by direct writes with the slot's combined checksum deltas (RFC 1624): XDP's,
/// and TC's for an skb whose checksums are full ones (see [`checksum_verified`]).
#[inline(always)]
fn rewrite_direct<P: Packet>(ctx: &P, h: &Headers, s: &FlowCacheSlot) -> Result<(), Reason> {
    if !h.no_udp_check() {
        let mut c = apply_delta(h.l4_check, s.l4_delta);
        if h.proto == PROTO_UDP && c == 0 {
            c = 0xffff; // a computed zero is sent as all ones; zero means "no checksum"
        }
        write(ctx, h.check_off, c.to_be_bytes())?;
    }
    rewrite_but_l4_check(ctx, h, s)
}

/// Everything but the L4 checksum, by direct writes: the IPv4 header with its checksum
/// (whose sum stays what it was, so a CHECKSUM_COMPLETE sum need not follow it), the
/// ports and the MAC addresses.
#[inline(always)]
fn rewrite_but_l4_check<P: Packet>(ctx: &P, h: &Headers, s: &FlowCacheSlot) -> Result<(), Reason> {
    let ip_check = apply_delta(be16(read(ctx, IPV4_CHECK_OFF)?), s.l3_delta);
    write(ctx, IPV4_CHECK_OFF, ip_check.to_be_bytes())?;
    write(ctx, IPV4_TTL_OFF, [h.ttl - 1])?;
    write(ctx, IPV4_SRC_OFF, s.new_src.to_ne_bytes())?;
    write(ctx, IPV4_SRC_OFF + 4, s.new_dst.to_ne_bytes())?;
    write(ctx, L4_OFF_V4, s.new_ports.to_ne_bytes())?;
    let (m, n) = (&s.dmac, &s.smac);
    write(ctx, 0, [m[0], m[1], m[2], m[3], m[4], m[5], n[0], n[1], n[2], n[3], n[4], n[5]])
}

/// TC's [`send_xdp`]: `bpf_redirect` (or `bpf_redirect_peer`) takes any egress.
#[inline(always)]
fn send_tc(ctx: &TcContext, h: &Headers, s: &FlowCacheSlot, how: Reason) -> Outcome {
    // A helper that fails may have written part of the packet: it must not go on.
    let rewritten = if checksum_verified(ctx) { rewrite_direct(ctx, h, s) } else { rewrite_tc(ctx, h, s) };
    if rewritten.is_err() {
        return Err(Reason::RewriteFailed);
    }
    stats::count_forwarded(s.forward_id, s.backend as u32, h.tot_len as u16);
    Ok((crate::route::tc_redirect(s.ifindex), how))
}

/// Whether the skb is CHECKSUM_UNNECESSARY: its checksums were verified and are full ones
/// in the packet, and nothing in the skb follows the packet's bytes (no CHECKSUM_PARTIAL
/// seed whose rest the device adds, no CHECKSUM_COMPLETE sum), so the direct writes that
/// keep them valid are all it takes, without four helper calls. What a NIC verified
/// arrives so; a locally sent segment (CHECKSUM_PARTIAL), a GRO packet (likewise), a
/// CHECKSUM_COMPLETE one and an unverified one take the helpers.
#[inline(always)]
pub(crate) fn checksum_verified(ctx: &TcContext) -> bool {
    // SAFETY: a helper that only reads the skb's checksum state.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_QUERY as u64) >= 0 }
}

/// TC's rewrite of an skb whose checksums may be anything: the L4 checksum through the skb
/// helpers, by two differences, the addresses' (part of the pseudo header, which a
/// CHECKSUM_PARTIAL seed holds and a CHECKSUM_COMPLETE sum must follow) and the ports'
/// (which a seed leaves to the device); the rest by direct writes, whose changes leave
/// every sum the skb keeps as it was (a helper call each cost more than the write).
#[inline(always)]
fn rewrite_tc(ctx: &TcContext, h: &Headers, s: &FlowCacheSlot) -> Result<(), Reason> {
    let mangled = if h.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let failed = |_| Reason::RewriteFailed;
    let addrs = wsum_diff([h.src, h.dst], [s.new_src, s.new_dst]);
    ctx.l4_csum_replace(h.check_off, 0, addrs, BPF_F_PSEUDO_HDR as u64 | mangled).map_err(failed)?;
    let ports = wsum_diff([h.ports], [s.new_ports]);
    ctx.l4_csum_replace(h.check_off, 0, ports, mangled).map_err(failed)?;
    rewrite_but_l4_check(ctx, h, s)
}
