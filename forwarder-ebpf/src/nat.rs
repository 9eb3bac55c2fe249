//! The address/port rewrite of a packet with its checksums, once by direct writes (RFC 1624
//! incremental updates: XDP, and TC for a verified skb) and once through the kernel's skb
//! helpers (TC), which also know about checksum offload state. IPv4 and IPv6; IPv6 has no
//! header checksum, and its addresses enter the L4 pseudo header with all 16 bytes.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use forwarder_common::{PROTO_UDP, Reason, csum::update};

use crate::{
    conntrack::Tuple,
    csum::sum_addr,
    ctx::{Packet, read, write},
    fastpath::checksum_verified,
    parse::{
        FRAG_LATER, FRAG_NONE, Flow, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, IPV4_TTL_OFF, IPV6_DST_OFF,
        IPV6_HOP_LIMIT_OFF, IPV6_SRC_OFF,
    },
    stats,
};

#[inline(always)]
fn sum2(b: [u8; 2]) -> u32 {
    u16::from_be_bytes(b) as u32
}

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Rewrites addresses and ports to `new` and, when `dec_ttl`, decrements the TTL / hop
/// limit (the packet is being forwarded by us rather than the stack), by direct writes and
/// incremental checksum updates: XDP's rewrite, and TC's for a verified skb
/// (fastpath::checksum_verified). Never a fragment: XDP hands those to TC, and TC rewrites
/// them through the helpers.
#[inline(always)]
pub fn rewrite_direct<P: Packet>(ctx: &P, flow: &Flow, new: &Tuple, dec_ttl: bool) -> Result<(), Reason> {
    let v6 = flow.is_v6();
    let old_addrs = sum_addr(&flow.src, v6) + sum_addr(&flow.dst, v6);
    let new_addrs = sum_addr(&new.src, v6) + sum_addr(&new.dst, v6);
    let new_ttl = flow.ttl.wrapping_sub(dec_ttl as u8);

    if !(flow.proto == PROTO_UDP && flow.l4_check == 0) {
        let old = old_addrs + sum2(flow.sport) + sum2(flow.dport);
        let new_sum = new_addrs + sum2(new.sport) + sum2(new.dport);
        let mut c = update(flow.l4_check, old, new_sum);
        if flow.proto == PROTO_UDP && c == 0 {
            c = 0xffff; // a computed zero is sent as all ones; zero means "no checksum"
        }
        write(ctx, flow.l4_check_off(), c.to_be_bytes())?;
    }
    let l4 = flow.l4_off();
    write(ctx, l4, new.sport)?;
    write(ctx, l4 + 2, new.dport)?;
    if v6 {
        write(ctx, IPV6_HOP_LIMIT_OFF, [new_ttl])?;
        write(ctx, IPV6_SRC_OFF, new.src)?;
        write(ctx, IPV6_DST_OFF, new.dst)?;
    } else {
        let ttl_word = [flow.ttl, flow.proto];
        let ip_check = u16::from_be_bytes(read::<2, _>(ctx, IPV4_CHECK_OFF)?);
        let ip_check = update(ip_check, old_addrs + sum2(ttl_word), new_addrs + sum2([new_ttl, flow.proto]));
        write(ctx, IPV4_TTL_OFF, [new_ttl])?;
        write(ctx, IPV4_CHECK_OFF, ip_check.to_be_bytes())?;
        write(ctx, IPV4_SRC_OFF, v4(&new.src))?;
        write(ctx, IPV4_DST_OFF, v4(&new.dst))?;
    }
    Ok(())
}

/// Replaces an address (4 or 16 bytes) at `off` word by word, keeping the checksums right:
/// `l4` is the L4 (or ICMP) checksum to update, with its helper flags (BPF_F_PSEUDO_HDR
/// when the address is part of that checksum's pseudo header); `ip_check` updates the
/// IPv4 header checksum too. Shared by the NAT and the ICMP translation.
#[inline(always)]
pub fn replace_addr(
    ctx: &TcContext,
    off: usize,
    v6: bool,
    old: &[u8; 16],
    new: &[u8; 16],
    l4: Option<(usize, u64)>,
    ip_check: bool,
) -> Result<(), Reason> {
    let words = if v6 { 4 } else { 1 };
    let mut i = 0;
    while i < words {
        let o = [old[4 * i], old[4 * i + 1], old[4 * i + 2], old[4 * i + 3]];
        let n = [new[4 * i], new[4 * i + 1], new[4 * i + 2], new[4 * i + 3]];
        if o != n {
            let (from, to) = (u32::from_ne_bytes(o) as u64, u32::from_ne_bytes(n) as u64);
            if let Some((check_off, flags)) = l4 {
                ctx.l4_csum_replace(check_off, from, to, flags | 4).map_err(|_| Reason::RewriteFailed)?;
            }
            if ip_check {
                ctx.l3_csum_replace(IPV4_CHECK_OFF, from, to, 4).map_err(|_| Reason::RewriteFailed)?;
            }
            ctx.store(off + 4 * i, &n, 0).map_err(|_| Reason::RewriteFailed)?;
        }
        i += 1;
    }
    Ok(())
}

#[inline(always)]
fn store_port(
    ctx: &TcContext,
    off: usize,
    l4_check_off: usize,
    l4_flags: u64,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), Reason> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (u16::from_ne_bytes(old) as u64, u16::from_ne_bytes(new) as u64);
    ctx.l4_csum_replace(l4_check_off, from, to, l4_flags | 2)
        .and_then(|_| ctx.store(off, &new, 0))
        .map_err(|_| Reason::RewriteFailed)
}

/// Decrements the TTL / hop limit of a packet TC sends itself.
#[inline(always)]
pub fn decrement_ttl_tc(ctx: &TcContext, v6: bool, ttl: u8, proto: u8) -> Result<(), Reason> {
    let new_ttl = ttl.wrapping_sub(1);
    if v6 {
        return ctx.store(IPV6_HOP_LIMIT_OFF, &new_ttl, 0).map_err(|_| Reason::RewriteFailed);
    }
    let old = u16::from_ne_bytes([ttl, proto]) as u64;
    let new = u16::from_ne_bytes([new_ttl, proto]) as u64;
    ctx.l3_csum_replace(IPV4_CHECK_OFF, old, new, 2)
        .and_then(|_| ctx.store(IPV4_TTL_OFF, &new_ttl, 0))
        .map_err(|_| Reason::RewriteFailed)
}

/// TC's rewrite: [`rewrite_direct`] for a whole packet whose checksums were verified, else
/// through the skb helpers, which keep a CHECKSUM_PARTIAL seed and a CHECKSUM_COMPLETE sum
/// right. A first fragment is rewritten like a whole packet: its L4 checksum covers the
/// whole datagram, and the change of the words replaced is the same. A later fragment has
/// no L4 header: its addresses only (and the IPv4 header checksum). A fragment rewritten is
/// counted as `FragmentTranslated`.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, flow: &Flow, new: &Tuple, dec_ttl: bool) -> Result<(), Reason> {
    if flow.frag == FRAG_NONE && checksum_verified(ctx) {
        return rewrite_direct(ctx, flow, new, dec_ttl);
    }
    let v6 = flow.is_v6();
    let l4_check = flow.l4_check_off();
    let has_l4 = flow.frag != FRAG_LATER;
    // UDP: leave a zero ("no checksum") as it is.
    let l4_flags = if flow.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let (src_off, dst_off) = if v6 { (IPV6_SRC_OFF, IPV6_DST_OFF) } else { (IPV4_SRC_OFF, IPV4_DST_OFF) };
    let l4 = if has_l4 { Some((l4_check, l4_flags | BPF_F_PSEUDO_HDR as u64)) } else { None };
    replace_addr(ctx, src_off, v6, &flow.src, &new.src, l4, !v6)?;
    replace_addr(ctx, dst_off, v6, &flow.dst, &new.dst, l4, !v6)?;
    if has_l4 {
        store_port(ctx, flow.l4_off(), l4_check, l4_flags, flow.sport, new.sport)?;
        store_port(ctx, flow.l4_off() + 2, l4_check, l4_flags, flow.dport, new.dport)?;
    }
    if dec_ttl {
        decrement_ttl_tc(ctx, v6, flow.ttl, flow.proto)?;
    }
    if flow.frag != FRAG_NONE {
        stats::count_reason(Reason::FragmentTranslated);
    }
    Ok(())
}
