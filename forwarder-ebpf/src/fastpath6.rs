//! The established-flow fast path for IPv6, XDP and TC (fastpath.rs is IPv4's): a plain
//! TCP/UDP packet (no extension header) of a tracked connection whose entry holds a
//! current next hop is rewritten with the entry's L4 checksum delta and redirected,
//! without the full parse, the forward lookup or the FIB lookup. It has the entry tier
//! only (no flow cache: a slot of two 16-byte addresses each way would be twice IPv4's),
//! and the same rules as IPv4's entry tier: a packet that would move the connection's
//! state, a longer packet than the next hop has passed, and anything unusual go to the
//! full path, which (re)fills the next hop (conntrack::cache_next_hop).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_jiffies64, bpf_redirect},
    programs::{TcContext, XdpContext},
};
use forwarder_common::{
    CtKey, CtValue, FAMILY_V6, FWD_FLAG_INGRESS, FwdKey, PROTO_TCP, PROTO_UDP, Reason,
    conntrack::{CT_NH_XDP, CT_SEQ_KNOWN, segment_end, seq_after},
    csum::{apply_delta, fold, sum4},
    next_hop_current,
};

use crate::{
    conntrack::route_generation,
    ctx::{Packet, read, write},
    fastpath::{
        NOT_CACHED_FULL, NOT_CACHED_NO_MATCH, NOT_CACHED_TO_TC, NOT_CACHED_UNTRACKED, moves_state_of, segment_len,
        tc_gso_size, wsum_diff,
    },
    maps::{FWD_CT_V4, FWD_TX_PORTS},
    parse::{ETH_LEN, IPV6_HOP_LIMIT_OFF, IPV6_LEN, IPV6_SRC_OFF, L3_OFF, L4_OFF_V6},
    rules, stats,
    verdict::{Outcome, pack},
};

/// The packet is IPv6 (an untagged frame's EtherType).
#[inline(always)]
pub fn is_v6<P: Packet>(ctx: &P) -> bool {
    matches!(read::<2, _>(ctx, 12), Ok([0x86, 0xdd]))
}

/// The headers of a plain IPv6 TCP/UDP packet, addresses as the native-endian words of
/// their bytes.
struct Headers6 {
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
    /// TCP: the sequence just past this segment (host order).
    seq_end: u32,
    /// The L4 checksum is a CHECKSUM_PARTIAL seed.
    partial: bool,
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// An address's native-endian words.
#[inline(always)]
fn words_of(b: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

#[inline(always)]
fn words<P: Packet>(ctx: &P, offset: usize) -> Result<[u32; 4], Reason> {
    Ok(words_of(&read(ctx, offset)?))
}

#[inline(always)]
fn headers6<P: Packet>(ctx: &P, partial_ok: bool) -> Result<Option<Headers6>, Reason> {
    // Version, traffic class, flow label, payload length, next header, hop limit.
    let fixed: [u8; 8] = read(ctx, L3_OFF)?;
    let (payload, proto, hop_limit) = (be16([fixed[4], fixed[5]]) as usize, fixed[6], fixed[7]);
    if fixed[0] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) || hop_limit <= 1 {
        return Ok(None);
    }
    if payload == 0 || IPV6_LEN + payload + ETH_LEN > ctx.len() {
        return Ok(None);
    }
    let (check_off, l4_hdr, tcp_flags, seq_end) = if proto == PROTO_TCP {
        let seq = u32::from_be_bytes(read(ctx, L4_OFF_V6 + 4)?);
        let tcp: [u8; 2] = read(ctx, L4_OFF_V6 + 12)?;
        let data_off = (tcp[0] >> 4) as usize * 4;
        if payload < 20 || data_off < 20 || data_off > payload {
            return Ok(None);
        }
        (L4_OFF_V6 + 16, data_off, tcp[1], segment_end(seq, (payload - data_off) as u32, tcp[1]))
    } else {
        let udp_len = be16(read(ctx, L4_OFF_V6 + 4)?) as usize;
        if payload < 8 || udp_len < 8 || udp_len > payload {
            return Ok(None);
        }
        (L4_OFF_V6 + 6, 8, 0, 0)
    };
    let l4_check = be16(read(ctx, check_off)?);
    // IPv6 UDP must carry a checksum: a zero one is the full path's to judge.
    if proto == PROTO_UDP && l4_check == 0 {
        return Ok(None);
    }
    let (src, dst) = (words(ctx, IPV6_SRC_OFF)?, words(ctx, IPV6_SRC_OFF + 16)?);
    let mut partial = false;
    if !partial_ok {
        let mut sum = proto as u32 + payload as u32;
        let mut i = 0;
        while i < 4 {
            sum += sum4(src[i].to_ne_bytes()) + sum4(dst[i].to_ne_bytes());
            i += 1;
        }
        partial = l4_check == fold(sum);
    }
    Ok(Some(Headers6 {
        src,
        dst,
        ports: u32::from_ne_bytes(read(ctx, L4_OFF_V6)?),
        proto,
        hop_limit,
        tot_len: IPV6_LEN + payload,
        len: IPV6_LEN + payload,
        hdr_len: IPV6_LEN + l4_hdr,
        check_off,
        l4_check,
        tcp_flags,
        seq_end,
        partial,
    }))
}

/// What the entry gives the rewrite, copied out of it and checked to be one next hop.
struct NextHop {
    ifindex: u32,
    l4_delta: u16,
    dmac: [u8; 6],
    smac: [u8; 6],
}

enum Found {
    Entry(&'static CtValue, NextHop),
    Code(u32),
}

#[inline(always)]
fn find6<const TC: bool>(h: &Headers6) -> Found {
    let p = h.ports.to_ne_bytes();
    let w = |a: &[u32; 4]| {
        let (x, y, z, v) = (a[0].to_ne_bytes(), a[1].to_ne_bytes(), a[2].to_ne_bytes(), a[3].to_ne_bytes());
        [x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3], z[0], z[1], z[2], z[3], v[0], v[1], v[2], v[3]]
    };
    let key = CtKey {
        src_addr: w(&h.src),
        dst_addr: w(&h.dst),
        src_port_be: u16::from_ne_bytes([p[0], p[1]]),
        dst_port_be: u16::from_ne_bytes([p[2], p[3]]),
        proto: h.proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    let Some(entry) = FWD_CT_V4.get_ptr_mut(&key) else {
        let mut rule = FwdKey { addr: key.dst_addr, port_be: key.dst_port_be, proto: h.proto, family: FAMILY_V6 };
        return Found::Code(match rules::lookup(&mut rule) {
            Some(f) if f.flags & FWD_FLAG_INGRESS != 0 => {
                if h.partial {
                    NOT_CACHED_TO_TC
                } else {
                    NOT_CACHED_UNTRACKED
                }
            }
            _ => NOT_CACHED_NO_MATCH,
        });
    };
    if h.partial {
        return Found::Code(NOT_CACHED_TO_TC);
    }
    // SAFETY: map value pointer from a successful lookup.
    let entry = unsafe { &mut *entry };
    let generation = route_generation();
    // SAFETY: inlined helper without arguments.
    let now = unsafe { bpf_jiffies64() } as u32;
    // SAFETY: a map value; read once, see conntrack::cache_next_hop.
    let ifindex = unsafe { core::ptr::read_volatile(&entry.nh_ifindex) };
    let (nh_gen, nh_jiffies) = (entry.nh_gen, entry.nh_jiffies);
    if ifindex == 0
        || !next_hop_current(nh_gen, nh_jiffies, generation, now)
        || h.len > entry.nh_len_ok as usize
        || (!TC && entry.flags & CT_NH_XDP == 0)
        || moves_state_of(entry, h.proto, h.tcp_flags)
    {
        return Found::Code(NOT_CACHED_FULL);
    }
    if h.proto == PROTO_TCP && (entry.flags & CT_SEQ_KNOWN == 0 || seq_after(h.seq_end, entry.seq_end)) {
        entry.seq_end = h.seq_end;
        entry.flags |= CT_SEQ_KNOWN;
    }
    let (d, m) = (&entry.nh_dmac, &entry.nh_smac);
    let hop = NextHop {
        ifindex,
        l4_delta: entry.nh_l4_delta,
        dmac: [d[0], d[1], d[2], d[3], d[4], d[5]],
        smac: [m[0], m[1], m[2], m[3], m[4], m[5]],
    };
    // Another CPU's full path may have rewritten the next hop meanwhile (see fastpath).
    // SAFETY: map value fields, read again from memory.
    let settled = unsafe {
        core::ptr::read_volatile(&entry.nh_ifindex) == ifindex
            && core::ptr::read_volatile(&entry.nh_gen) == nh_gen
            && core::ptr::read_volatile(&entry.nh_jiffies) == nh_jiffies
    };
    if !settled {
        return Found::Code(NOT_CACHED_FULL);
    }
    Found::Entry(entry, hop)
}

/// The IPv6 XDP fast path in its own frame: as fastpath::try_cached_out_of_line.
#[inline(never)]
pub fn try_cached6_out_of_line(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = XdpContext::new(raw);
    let Ok(Some(h)) = headers6(&ctx, false) else {
        return NOT_CACHED_FULL as u64;
    };
    match find6::<false>(&h) {
        Found::Entry(entry, hop) => pack(send_xdp(&ctx, &h, entry, &hop)),
        Found::Code(code) => code as u64,
    }
}

/// The IPv6 TC fast path in its own frame: as fastpath::try_cached_tc_out_of_line.
#[inline(never)]
pub fn try_cached6_tc_out_of_line(raw: *mut aya_ebpf::bindings::__sk_buff) -> u64 {
    let ctx = TcContext::new(raw);
    let Some(gso_size) = tc_gso_size(raw) else {
        return NOT_CACHED_FULL as u64;
    };
    let Ok(Some(mut h)) = headers6(&ctx, true) else {
        return NOT_CACHED_FULL as u64;
    };
    h.len = segment_len(h.len, h.hdr_len, gso_size);
    match find6::<true>(&h) {
        Found::Entry(entry, hop) => pack(send_tc(&ctx, &h, entry, &hop)),
        // TC never hands anything on.
        Found::Code(NOT_CACHED_TO_TC) => NOT_CACHED_FULL as u64,
        Found::Code(code) => code as u64,
    }
}

#[inline(always)]
fn macs(hop: &NextHop) -> [u8; 12] {
    let (m, n) = (&hop.dmac, &hop.smac);
    [m[0], m[1], m[2], m[3], m[4], m[5], n[0], n[1], n[2], n[3], n[4], n[5]]
}

#[inline(always)]
fn send_xdp(ctx: &XdpContext, h: &Headers6, e: &CtValue, hop: &NextHop) -> Outcome {
    if rewrite_xdp(ctx, h, e, hop).is_err() {
        return Err(Reason::RewriteFailed);
    }
    stats::count_forwarded(e.forward_id, e.backend_index(), h.tot_len as u16);
    let action = FWD_TX_PORTS.redirect(hop.ifindex, 0).unwrap_or_else(|a| a);
    Ok((action as i32, Reason::RedirectXdpCached))
}

#[inline(always)]
fn rewrite_xdp(ctx: &XdpContext, h: &Headers6, e: &CtValue, hop: &NextHop) -> Result<(), Reason> {
    let mut c = apply_delta(h.l4_check, hop.l4_delta);
    if h.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    write(ctx, h.check_off, c.to_be_bytes())?;
    write(ctx, IPV6_HOP_LIMIT_OFF, [h.hop_limit - 1])?;
    write(ctx, IPV6_SRC_OFF, e.new_src_addr)?;
    write(ctx, IPV6_SRC_OFF + 16, e.new_dst_addr)?;
    let (sp, dp) = (e.new_src_port_be.to_ne_bytes(), e.new_dst_port_be.to_ne_bytes());
    write(ctx, L4_OFF_V6, [sp[0], sp[1], dp[0], dp[1]])?;
    write(ctx, 0, macs(hop))
}

#[inline(always)]
fn send_tc(ctx: &TcContext, h: &Headers6, e: &CtValue, hop: &NextHop) -> Outcome {
    if rewrite_tc(ctx, h, e, hop).is_err() {
        return Err(Reason::RewriteFailed);
    }
    stats::count_forwarded(e.forward_id, e.backend_index(), h.tot_len as u16);
    // SAFETY: helper call.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) } as i32;
    Ok((action, Reason::RedirectTcCached))
}

/// As fastpath's TC rewrite: the L4 checksum by the addresses' difference (pseudo header)
/// and the ports', then hop limit, addresses and ports in one store (contiguous), then the
/// MAC addresses.
#[inline(always)]
fn rewrite_tc(ctx: &TcContext, h: &Headers6, e: &CtValue, hop: &NextHop) -> Result<(), Reason> {
    let mangled = if h.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let failed = |_| Reason::RewriteFailed;
    let (a, b) = (&e.new_src_addr, &e.new_dst_addr);
    let (o, n) = (h.src, h.dst);
    let (p, q) = (words_of(a), words_of(b));
    let addrs =
        wsum_diff([o[0], o[1], o[2], o[3], n[0], n[1], n[2], n[3]], [p[0], p[1], p[2], p[3], q[0], q[1], q[2], q[3]]);
    ctx.l4_csum_replace(h.check_off, 0, addrs, BPF_F_PSEUDO_HDR as u64 | mangled).map_err(failed)?;
    let (sp, dp) = (e.new_src_port_be.to_ne_bytes(), e.new_dst_port_be.to_ne_bytes());
    let new_ports = u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]);
    let ports = wsum_diff([h.ports], [new_ports]);
    ctx.l4_csum_replace(h.check_off, 0, ports, mangled).map_err(failed)?;
    let out: [u8; 37] = [
        h.hop_limit - 1,
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
        a[6],
        a[7],
        a[8],
        a[9],
        a[10],
        a[11],
        a[12],
        a[13],
        a[14],
        a[15],
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6],
        b[7],
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15],
        sp[0],
        sp[1],
        dp[0],
        dp[1],
    ];
    ctx.store(IPV6_HOP_LIMIT_OFF, &out, 0).map_err(failed)?;
    ctx.store(0, &macs(hop), 0).map_err(failed)
}
