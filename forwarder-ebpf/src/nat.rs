//! The address/port rewrite of a packet with its checksums, once by direct writes (RFC 1624
//! incremental updates: XDP, and TC for a verified skb) and once with the L4 checksum
//! through the kernel's skb helpers (TC), which also know about checksum offload state.
//! IPv4 and IPv6; IPv6 has no header checksum, and its addresses enter the L4 pseudo header
//! with all 16 bytes.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_update,
    programs::TcContext,
};
use forwarder_common::{
    PROTO_UDP, Reason,
    csum::{add_wsum, hop_limit_diff, update, wsum_diff},
};

use crate::{
    conntrack::Tuple,
    csum::sum_addr,
    ctx::{Packet, read, write},
    fastpath::checksum_verified,
    parse::{
        FRAG_LATER, FRAG_NONE, Flow, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, IPV4_TTL_OFF, IPV6_DST_OFF,
        IPV6_HOP_LIMIT_OFF, IPV6_SRC_OFF, addr_words,
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
    if !(flow.proto == PROTO_UDP && flow.l4_check == 0) {
        let old = sum_addr(&flow.src, v6) + sum_addr(&flow.dst, v6) + sum2(flow.sport) + sum2(flow.dport);
        let new_sum = sum_addr(&new.src, v6) + sum_addr(&new.dst, v6) + sum2(new.sport) + sum2(new.dport);
        let mut c = update(flow.l4_check, old, new_sum);
        if flow.proto == PROTO_UDP && c == 0 {
            c = 0xffff; // a computed zero is sent as all ones; zero means "no checksum"
        }
        write(ctx, flow.l4_check_off(), c.to_be_bytes())?;
    }
    rewrite_but_l4_check(ctx, flow, new, dec_ttl, true)
}

/// Everything but the L4 checksum, by direct writes: the ports (`ports`: the packet has
/// its L4 header), then the addresses and TTL / hop limit, for IPv4 with the header
/// checksum, whose sum then stays what it was (so a CHECKSUM_COMPLETE sum need not follow
/// the IPv4 header).
#[inline(always)]
fn rewrite_but_l4_check<P: Packet>(
    ctx: &P,
    flow: &Flow,
    new: &Tuple,
    dec_ttl: bool,
    ports: bool,
) -> Result<(), Reason> {
    let new_ttl = flow.ttl.wrapping_sub(dec_ttl as u8);
    if ports {
        let l4 = flow.l4_off();
        write(ctx, l4, new.sport)?;
        write(ctx, l4 + 2, new.dport)?;
    }
    if flow.is_v6() {
        write(ctx, IPV6_HOP_LIMIT_OFF, [new_ttl])?;
        write(ctx, IPV6_SRC_OFF, new.src)?;
        write(ctx, IPV6_DST_OFF, new.dst)?;
    } else {
        let old_addrs = sum_addr(&flow.src, false) + sum_addr(&flow.dst, false);
        let new_addrs = sum_addr(&new.src, false) + sum_addr(&new.dst, false);
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
                if v6 && flags & BPF_F_PSEUDO_HDR as u64 != 0 {
                    complete_sum_follows_v6(ctx, wsum_diff([from as u32], [to as u32]));
                }
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

/// IPv6 under CHECKSUM_COMPLETE (a NIC's sum of the whole packet in skb->csum, which the
/// stack checks a delivered packet against): the sum must follow the bytes changed in the
/// IPv6 header, which no header checksum balances as IPv4's does. `bpf_l4_csum_replace`
/// with BPF_F_PSEUDO_HDR takes the addresses' change off the sum as if one did (the
/// kernel's own fix, BPF_F_IPV6 in 6.16, is missing from older kernels), and a direct
/// write or a store changes no sum: `diff` is what the sum lacks, the addresses' change
/// (helper) and the hop limit's (a store). Without CHECKSUM_COMPLETE the helper changes
/// nothing.
#[inline(always)]
pub fn complete_sum_follows_v6(ctx: &TcContext, diff: u64) {
    // SAFETY: helper call on our own skb; it only adds to skb->csum of a COMPLETE skb.
    unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
}

/// Decrements the TTL / hop limit of a packet TC sends itself.
#[inline(always)]
pub fn decrement_ttl_tc(ctx: &TcContext, v6: bool, ttl: u8, proto: u8) -> Result<(), Reason> {
    let new_ttl = ttl.wrapping_sub(1);
    if v6 {
        ctx.store(IPV6_HOP_LIMIT_OFF, &new_ttl, 0).map_err(|_| Reason::RewriteFailed)?;
        complete_sum_follows_v6(ctx, hop_limit_diff(ttl));
        return Ok(());
    }
    let old = u16::from_ne_bytes([ttl, proto]) as u64;
    let new = u16::from_ne_bytes([new_ttl, proto]) as u64;
    ctx.l3_csum_replace(IPV4_CHECK_OFF, old, new, 2)
        .and_then(|_| ctx.store(IPV4_TTL_OFF, &new_ttl, 0))
        .map_err(|_| Reason::RewriteFailed)
}

/// TC's rewrite: [`rewrite_direct`] for a whole packet whose checksums were verified; else
/// the L4 checksum through the skb helpers, which keep a CHECKSUM_PARTIAL seed and a
/// CHECKSUM_COMPLETE sum right, by two differences (the addresses', part of the pseudo
/// header, and the ports', which a seed leaves to the device), and the rest by direct
/// writes, whose changes leave every sum the skb keeps as it was (a helper call per field
/// cost more than the rewrite). A first fragment is rewritten like a whole packet: its L4
/// checksum covers the whole datagram, and the change of the words replaced is the same.
/// A later fragment has no L4 header: its addresses only (and the IPv4 header checksum).
/// A fragment rewritten is counted as `FragmentTranslated`.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, flow: &Flow, new: &Tuple, dec_ttl: bool) -> Result<(), Reason> {
    if flow.frag == FRAG_NONE && checksum_verified(ctx) {
        return rewrite_direct(ctx, flow, new, dec_ttl);
    }
    let has_l4 = flow.frag != FRAG_LATER;
    let v6 = flow.is_v6();
    let addrs_change = flow.src != new.src || flow.dst != new.dst;
    let addrs = if !addrs_change {
        0
    } else {
        let (a, b, c, d) = (addr_words(&flow.src), addr_words(&flow.dst), addr_words(&new.src), addr_words(&new.dst));
        if v6 {
            wsum_diff(
                [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]],
                [c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]],
            )
        } else {
            wsum_diff([a[0], b[0]], [c[0], d[0]])
        }
    };
    if has_l4 {
        let check_off = flow.l4_check_off();
        // UDP: leave a zero ("no checksum") as it is.
        let mangled = if flow.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let failed = |_| Reason::RewriteFailed;
        if addrs_change {
            ctx.l4_csum_replace(check_off, 0, addrs, BPF_F_PSEUDO_HDR as u64 | mangled).map_err(failed)?;
        }
        if flow.sport != new.sport || flow.dport != new.dport {
            let word = |p: [u8; 2], q: [u8; 2]| u32::from_ne_bytes([p[0], p[1], q[0], q[1]]);
            let ports = wsum_diff([word(flow.sport, flow.dport)], [word(new.sport, new.dport)]);
            ctx.l4_csum_replace(check_off, 0, ports, mangled).map_err(failed)?;
        }
    }
    if v6 && (addrs_change || dec_ttl) {
        // The addresses' change and the hop limit's (see complete_sum_follows_v6; a later
        // fragment's sum lacks the addresses' change too, with no helper called).
        let hop = if dec_ttl { hop_limit_diff(flow.ttl) } else { 0 };
        complete_sum_follows_v6(ctx, add_wsum(addrs, hop));
    }
    rewrite_but_l4_check(ctx, flow, new, dec_ttl, has_l4)?;
    if flow.frag != FRAG_NONE {
        stats::count_reason(Reason::FragmentTranslated);
    }
    Ok(())
}
