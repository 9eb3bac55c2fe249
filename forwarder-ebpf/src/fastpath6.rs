//! The established-flow fast path for IPv6, XDP and TC (fastpath.rs is IPv4's): a plain
//! TCP/UDP packet (no extension header) of a tracked connection whose entry holds a
//! current next hop is rewritten with the entry's L4 checksum delta and redirected,
//! without the full parse, the forward lookup or the FIB lookup. The same two tiers and
//! rules as IPv4's: this CPU's flow cache (FWD_FLOW_CACHE6 / FWD_FLOW_CACHE6_TC, slots of
//! [`FlowCacheSlot6`]), then the connection's entry, which refills a slot; a packet that
//! would move the connection's state, a longer packet than the next hop has passed, and
//! anything unusual go to the full path, which (re)fills the next hop
//! (conntrack::cache_next_hop).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_jiffies64,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use forwarder_common::{
    CtKey, FAMILY_V6, FWD_FLAG_INGRESS, FlowCacheSlot6, FwdKey, PROTO_TCP, PROTO_UDP, Reason,
    conntrack::{
        CT_NH_XDP, CT_SEQ_KNOWN, SEQ_SYNC_BYTES, TCP_FIN, TCP_RST, TCP_SYN, segment_end, seq_after, tcp_keeps_state,
    },
    csum::{add_wsum, apply_delta, hop_limit_diff, ipv6_pseudo_sum_ne, wsum_diff},
    flow_cache_bucket6, next_hop_current,
};

use crate::{
    conntrack::route_generation,
    ctx::{Packet, read, read_words, write},
    fastpath::{
        NOT_CACHED_FULL, NOT_CACHED_NO_MATCH, NOT_CACHED_TO_TC, NOT_CACHED_UNTRACKED, bucket, checksum_verified,
        moves_state_of, segment_len, tc_gso_size,
    },
    maps::{FWD_CT_V4, FWD_FLOW_CACHE6, FWD_FLOW_CACHE6_TC, FWD_TX_PORTS},
    nat::complete_sum_follows_v6,
    parse::{ETH_LEN, IPV6_HOP_LIMIT_OFF, IPV6_LEN, IPV6_SRC_OFF, L3_OFF, L4_OFF_V6, addr_bytes, addr_words},
    rules, stats,
    verdict::{Outcome, pack},
};

/// The packet is IPv6 (an untagged frame's EtherType).
#[inline(always)]
pub fn is_v6<P: Packet>(ctx: &P) -> bool {
    matches!(read::<2, _>(ctx, 12), Ok([0x86, 0xdd]))
}

/// The headers of a plain IPv6 TCP/UDP packet, addresses as the native-endian words of
/// their bytes. Kept in the per-CPU working memory (work.rs): on the stack, beside the
/// entry tier's frame, they would take the call chain past its 512 bytes.
pub struct Headers6 {
    src: [u32; 4],
    dst: [u32; 4],
    ports: u32,
    proto: u8,
    hop_limit: u8,
    /// The IP length (header and payload).
    tot_len: usize,
    /// The length the next hop must pass: the IP length, or a GSO packet's segment's.
    len: usize,
    /// IP and TCP/UDP header bytes.
    hdr_len: usize,
    check_off: usize,
    l4_check: u16,
    tcp_flags: u8,
    /// TCP: this segment's sequence and the one just past it (host order).
    seq: u32,
    seq_end: u32,
    /// The L4 checksum is a CHECKSUM_PARTIAL seed.
    partial: bool,
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Reads a plain IPv6 TCP/UDP packet's headers into `h`; false for the cases the full
/// path takes apart.
#[inline(always)]
fn headers6<P: Packet>(ctx: &P, partial_ok: bool, h: &mut Headers6) -> bool {
    matches!(read_headers6(ctx, partial_ok, h), Ok(true))
}

#[inline(always)]
fn read_headers6<P: Packet>(ctx: &P, partial_ok: bool, h: &mut Headers6) -> Result<bool, Reason> {
    // Version, traffic class, flow label, payload length, next header, hop limit.
    let fixed: [u8; 8] = read(ctx, L3_OFF)?;
    let (payload, proto, hop_limit) = (be16([fixed[4], fixed[5]]) as usize, fixed[6], fixed[7]);
    if fixed[0] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) || hop_limit <= 1 {
        return Ok(false);
    }
    if payload == 0 || IPV6_LEN + payload + ETH_LEN > ctx.len() {
        return Ok(false);
    }
    let (check_off, l4_hdr, tcp_flags, seq, seq_end) = if proto == PROTO_TCP {
        let seq = u32::from_be_bytes(read(ctx, L4_OFF_V6 + 4)?);
        let tcp: [u8; 2] = read(ctx, L4_OFF_V6 + 12)?;
        let data_off = (tcp[0] >> 4) as usize * 4;
        if payload < 20 || data_off < 20 || data_off > payload {
            return Ok(false);
        }
        (L4_OFF_V6 + 16, data_off, tcp[1], seq, segment_end(seq, (payload - data_off) as u32, tcp[1]))
    } else {
        let udp_len = be16(read(ctx, L4_OFF_V6 + 4)?) as usize;
        if payload < 8 || udp_len < 8 || udp_len > payload {
            return Ok(false);
        }
        (L4_OFF_V6 + 6, 8, 0, 0, 0)
    };
    let check: [u8; 2] = read(ctx, check_off)?;
    let l4_check = be16(check);
    // IPv6 UDP must carry a checksum: a zero one is the full path's to judge.
    if proto == PROTO_UDP && l4_check == 0 {
        return Ok(false);
    }
    let (src, dst) = (read_words(ctx, IPV6_SRC_OFF)?, read_words(ctx, IPV6_SRC_OFF + 16)?);
    let mut partial = false;
    if !partial_ok {
        partial = u16::from_ne_bytes(check) == ipv6_pseudo_sum_ne(&src, &dst, proto, payload as u32);
    }
    h.src = src;
    h.dst = dst;
    h.ports = u32::from_ne_bytes(read(ctx, L4_OFF_V6)?);
    h.proto = proto;
    h.hop_limit = hop_limit;
    h.tot_len = IPV6_LEN + payload;
    h.len = IPV6_LEN + payload;
    h.hdr_len = IPV6_LEN + l4_hdr;
    h.check_off = check_off;
    h.l4_check = l4_check;
    h.tcp_flags = tcp_flags;
    h.seq = seq;
    h.seq_end = seq_end;
    h.partial = partial;
    Ok(true)
}

/// What the fast path found: a current copy of the packet's connection (the tier's
/// reason), or a `NOT_CACHED_*` code.
enum Found {
    Slot(&'static FlowCacheSlot6, Reason),
    Code(u32),
}

/// The two tiers, as fastpath's `find`: this CPU's flow cache, then the connection's entry,
/// which (re)fills a slot. `TC` picks the program's rules, `cache` its flow cache.
#[inline(always)]
fn find6<const TC: bool>(h: &Headers6, cache: &'static PerCpuArray<FlowCacheSlot6>) -> Found {
    let (cache_reason, entry_reason) = if TC {
        (Reason::RedirectTcFlowCache, Reason::RedirectTcCached)
    } else {
        (Reason::RedirectXdpFlowCache, Reason::RedirectXdpCached)
    };
    let (ports, proto) = (h.ports, h.proto);
    let generation = route_generation();
    // SAFETY: inlined helper without arguments.
    let now = unsafe { bpf_jiffies64() } as u32;
    // A SYN, FIN or RST moves its connection's state: no slot serves it, so its bucket is
    // not read; TC does not even locate it (see fastpath's `find`).
    let moves = proto == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
    if TC && moves {
        return Found::Code(NOT_CACHED_FULL);
    }
    let Some([s0, s1, s2, s3]) = bucket(cache, flow_cache_bucket6(&h.src, &h.dst, ports, proto)) else {
        return Found::Code(NOT_CACHED_FULL);
    };
    let serves = |s: &FlowCacheSlot6| {
        s.holds(&h.src, &h.dst, ports, proto)
            && s.current(generation, now)
            && h.len <= s.len_ok as usize
            && (proto != PROTO_TCP
                || tcp_keeps_state(s.state, h.tcp_flags) && h.seq.wrapping_sub(s.seq) < SEQ_SYNC_BYTES)
    };
    if !h.partial && !moves {
        if serves(s0) {
            return Found::Slot(s0, cache_reason);
        }
        if serves(s1) {
            return Found::Slot(s1, cache_reason);
        }
        if serves(s2) {
            return Found::Slot(s2, cache_reason);
        }
        if serves(s3) {
            return Found::Slot(s3, cache_reason);
        }
    }
    // As IPv4's: the first slot that holds no other flow's current copy, else the last.
    // (Never filled for a packet that moves its connection's state: no need to read them.)
    let free = |s: &FlowCacheSlot6| s.free_for(&h.src, &h.dst, ports, proto, generation, now);
    let slot = if moves {
        s3
    } else if free(s0) {
        s0
    } else if free(s1) {
        s1
    } else if free(s2) {
        s2
    } else {
        s3
    };
    match fill6::<TC>(h, slot, (generation as u64) << 32 | now as u64) {
        FILLED => Found::Slot(slot, entry_reason),
        code => Found::Code(code),
    }
}

/// [`fill6`]'s answer beside the `NOT_CACHED_*` codes: it filled the slot.
const FILLED: u32 = 8;

/// The entry tier: the connection's entry, when its next hop is current, refills `slot`
/// (the bucket's one [`find6`] chose). Out of line: the
/// connection key and the copy would take the fast path's frame past the stack's 512
/// bytes. `clock`: the route generation (high word) and jiffies (low word).
#[inline(never)]
fn fill6<const TC: bool>(h: &Headers6, slot: &mut FlowCacheSlot6, clock: u64) -> u32 {
    let (generation, now) = ((clock >> 32) as u32, clock as u32);
    let (ports, proto) = (h.ports, h.proto);
    let p = ports.to_ne_bytes();
    let key = CtKey {
        src_addr: addr_bytes(&h.src),
        dst_addr: addr_bytes(&h.dst),
        src_port_be: u16::from_ne_bytes([p[0], p[1]]),
        dst_port_be: u16::from_ne_bytes([p[2], p[3]]),
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    let Some(entry) = FWD_CT_V4.get_ptr_mut(&key) else {
        let mut rule = FwdKey { addr: key.dst_addr, port_be: key.dst_port_be, proto, family: FAMILY_V6 };
        return match rules::lookup(&mut rule) {
            Some(f) if f.flags & FWD_FLAG_INGRESS != 0 => {
                if h.partial {
                    NOT_CACHED_TO_TC
                } else {
                    NOT_CACHED_UNTRACKED
                }
            }
            _ => NOT_CACHED_NO_MATCH,
        };
    };
    if h.partial {
        return NOT_CACHED_TO_TC;
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
        || moves_state_of(entry, proto, h.tcp_flags)
    {
        return NOT_CACHED_FULL;
    }
    // The slot counts a backend index of 16 bits; a connection of a larger one takes the
    // full path.
    let backend = entry.backend_index();
    if backend > u16::MAX as u32 {
        return NOT_CACHED_FULL;
    }
    if proto == PROTO_TCP && (entry.flags & CT_SEQ_KNOWN == 0 || seq_after(h.seq_end, entry.seq_end)) {
        entry.seq_end = h.seq_end;
        entry.flags |= CT_SEQ_KNOWN;
    }
    let (sp, dp) = (entry.new_src_port_be.to_ne_bytes(), entry.new_dst_port_be.to_ne_bytes());
    slot.src = h.src;
    slot.dst = h.dst;
    slot.ports = ports;
    slot.proto = proto;
    slot.state = entry.state;
    slot.new_src = addr_words(&entry.new_src_addr);
    slot.new_dst = addr_words(&entry.new_dst_addr);
    slot.new_ports = u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]);
    slot.forward_id = entry.forward_id;
    slot.ifindex = ifindex;
    slot.generation = nh_gen as u16;
    slot.backend = backend as u16;
    slot.jiffies = nh_jiffies;
    slot.l4_delta = entry.nh_l4_delta;
    slot.len_ok = entry.nh_len_ok;
    slot.seq = h.seq;
    let (d, m) = (&entry.nh_dmac, &entry.nh_smac);
    slot.dmac = [d[0], d[1], d[2], d[3], d[4], d[5]];
    slot.smac = [m[0], m[1], m[2], m[3], m[4], m[5]];
    // Another CPU's full path may have rewritten the next hop meanwhile (see fastpath): a
    // copy mixing two next hops must not be kept, nor used.
    // SAFETY: map value fields, read again from memory.
    let settled = unsafe {
        core::ptr::read_volatile(&entry.nh_ifindex) == ifindex
            && core::ptr::read_volatile(&entry.nh_gen) == nh_gen
            && core::ptr::read_volatile(&entry.nh_jiffies) == nh_jiffies
            && (TC || core::ptr::read_volatile(&entry.flags) & CT_NH_XDP != 0)
    };
    if !settled {
        slot.ifindex = 0;
        return NOT_CACHED_FULL;
    }
    FILLED
}

/// The IPv6 XDP fast path in its own frame: as fastpath::try_cached_out_of_line.
#[inline(never)]
pub fn try_cached6_out_of_line(raw: *mut aya_ebpf::bindings::xdp_md, h: &mut Headers6) -> u64 {
    let ctx = XdpContext::new(raw);
    if !headers6(&ctx, false, h) {
        return NOT_CACHED_FULL as u64;
    }
    match find6::<false>(h, &FWD_FLOW_CACHE6) {
        Found::Slot(slot, how) => pack(send_xdp(&ctx, h, slot, how)),
        Found::Code(code) => code as u64,
    }
}

/// The IPv6 TC fast path in its own frame: as fastpath::try_cached_tc_out_of_line.
#[inline(never)]
pub fn try_cached6_tc_out_of_line(raw: *mut aya_ebpf::bindings::__sk_buff, h: &mut Headers6) -> u64 {
    let ctx = TcContext::new(raw);
    let Some(gso_size) = tc_gso_size(raw) else {
        return NOT_CACHED_FULL as u64;
    };
    if !headers6(&ctx, true, h) {
        return NOT_CACHED_FULL as u64;
    }
    h.len = segment_len(h.len, h.hdr_len, gso_size);
    match find6::<true>(h, &FWD_FLOW_CACHE6_TC) {
        Found::Slot(slot, how) => pack(send_tc(&ctx, h, slot, how)),
        // TC never hands anything on.
        Found::Code(NOT_CACHED_TO_TC) => NOT_CACHED_FULL as u64,
        Found::Code(code) => code as u64,
    }
}

#[inline(always)]
fn macs(s: &FlowCacheSlot6) -> [u8; 12] {
    let (m, n) = (&s.dmac, &s.smac);
    [m[0], m[1], m[2], m[3], m[4], m[5], n[0], n[1], n[2], n[3], n[4], n[5]]
}

#[inline(always)]
fn send_xdp(ctx: &XdpContext, h: &Headers6, s: &FlowCacheSlot6, how: Reason) -> Outcome {
    if rewrite_direct(ctx, h, s).is_err() {
        return Err(Reason::RewriteFailed);
    }
    stats::count_forwarded(s.forward_id, s.backend as u32, h.tot_len as u16);
    let action = FWD_TX_PORTS.redirect(s.ifindex, 0).unwrap_or_else(|a| a);
    Ok((action as i32, how))
}

/// XDP's rewrite, and TC's for a verified skb (fastpath::checksum_verified).
#[inline(always)]
fn rewrite_direct<P: Packet>(ctx: &P, h: &Headers6, s: &FlowCacheSlot6) -> Result<(), Reason> {
    let mut c = apply_delta(h.l4_check, s.l4_delta);
    if h.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    write(ctx, h.check_off, c.to_be_bytes())?;
    rewrite_but_l4_check(ctx, h, s)
}

/// Everything but the L4 checksum, by direct writes: the hop limit, the addresses, the
/// ports and the MAC addresses.
#[inline(always)]
fn rewrite_but_l4_check<P: Packet>(ctx: &P, h: &Headers6, s: &FlowCacheSlot6) -> Result<(), Reason> {
    write(ctx, IPV6_HOP_LIMIT_OFF, [h.hop_limit - 1])?;
    // Word by word: arrays of the slot's words would be built on the stack first.
    let mut i = 0;
    while i < 4 {
        write(ctx, IPV6_SRC_OFF + 4 * i, s.new_src[i].to_ne_bytes())?;
        write(ctx, IPV6_SRC_OFF + 16 + 4 * i, s.new_dst[i].to_ne_bytes())?;
        i += 1;
    }
    write(ctx, L4_OFF_V6, s.new_ports.to_ne_bytes())?;
    write(ctx, 0, macs(s))
}

#[inline(always)]
fn send_tc(ctx: &TcContext, h: &Headers6, s: &FlowCacheSlot6, how: Reason) -> Outcome {
    let rewritten = if checksum_verified(ctx) { rewrite_direct(ctx, h, s) } else { rewrite_tc(ctx, h, s) };
    if rewritten.is_err() {
        return Err(Reason::RewriteFailed);
    }
    stats::count_forwarded(s.forward_id, s.backend as u32, h.tot_len as u16);
    Ok((crate::route::tc_redirect(s.ifindex), how))
}

/// As fastpath's TC rewrite: the L4 checksum through the helpers by the addresses'
/// difference (pseudo header) and the ports', the rest by direct writes.
#[inline(always)]
fn rewrite_tc(ctx: &TcContext, h: &Headers6, s: &FlowCacheSlot6) -> Result<(), Reason> {
    let mangled = if h.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let failed = |_| Reason::RewriteFailed;
    let (o, n, p, q) = (h.src, h.dst, s.new_src, s.new_dst);
    let addrs =
        wsum_diff([o[0], o[1], o[2], o[3], n[0], n[1], n[2], n[3]], [p[0], p[1], p[2], p[3], q[0], q[1], q[2], q[3]]);
    ctx.l4_csum_replace(h.check_off, 0, addrs, BPF_F_PSEUDO_HDR as u64 | mangled).map_err(failed)?;
    let ports = wsum_diff([h.ports], [s.new_ports]);
    ctx.l4_csum_replace(h.check_off, 0, ports, mangled).map_err(failed)?;
    // The addresses' change and the hop limit's (nat::complete_sum_follows_v6).
    complete_sum_follows_v6(ctx, add_wsum(addrs, hop_limit_diff(h.hop_limit)));
    rewrite_but_l4_check(ctx, h, s)
}
