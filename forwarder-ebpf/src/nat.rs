//! The address/port rewrite of a packet with its checksums, once for XDP (direct writes,
//! RFC 1624 incremental updates) and once for TC (kernel helpers, which also know about
//! checksum offload state).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use forwarder_common::{
    PROTO_UDP, Reason,
    csum::{sum4, update},
};

use crate::{
    conntrack::Tuple,
    ctx::{read, write},
    parse::{IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, IPV4_TTL_OFF, Ipv4Flow, L4_DPORT_OFF, L4_SPORT_OFF},
};

#[inline(always)]
fn sum2(b: [u8; 2]) -> u32 {
    u16::from_be_bytes(b) as u32
}

/// Rewrites addresses and ports to `new` and, when `dec_ttl`, decrements the TTL (the packet
/// is being forwarded by us rather than the stack).
#[inline(always)]
pub fn rewrite_xdp(ctx: &XdpContext, flow: &Ipv4Flow, new: &Tuple, dec_ttl: bool) -> Result<(), Reason> {
    let old_addrs = sum4(flow.src) + sum4(flow.dst);
    let new_addrs = sum4(new.src) + sum4(new.dst);
    let ttl_word = [flow.ttl, flow.proto];
    let new_ttl_word = [flow.ttl.wrapping_sub(dec_ttl as u8), flow.proto];

    let ip_check = u16::from_be_bytes(read::<2, _>(ctx, IPV4_CHECK_OFF)?);
    let ip_check = update(ip_check, old_addrs + sum2(ttl_word), new_addrs + sum2(new_ttl_word));

    let l4_off = flow.l4_check_off();
    if !(flow.proto == PROTO_UDP && flow.l4_check == 0) {
        let old = old_addrs + sum2(flow.sport) + sum2(flow.dport);
        let new_sum = new_addrs + sum2(new.sport) + sum2(new.dport);
        let mut c = update(flow.l4_check, old, new_sum);
        if flow.proto == PROTO_UDP && c == 0 {
            c = 0xffff; // a computed zero is sent as all ones; zero means "no checksum"
        }
        write(ctx, l4_off, c.to_be_bytes())?;
    }
    write(ctx, IPV4_TTL_OFF, [new_ttl_word[0]])?;
    write(ctx, IPV4_CHECK_OFF, ip_check.to_be_bytes())?;
    write(ctx, IPV4_SRC_OFF, new.src)?;
    write(ctx, IPV4_DST_OFF, new.dst)?;
    write(ctx, L4_SPORT_OFF, new.sport)?;
    write(ctx, L4_DPORT_OFF, new.dport)?;
    Ok(())
}

#[inline(always)]
fn store_addr(
    ctx: &TcContext,
    off: usize,
    l4_check_off: usize,
    l4_flags: u64,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), Reason> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64);
    ctx.l4_csum_replace(l4_check_off, from, to, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)
        .and_then(|_| ctx.l3_csum_replace(IPV4_CHECK_OFF, from, to, 4))
        .and_then(|_| ctx.store(off, &new, 0))
        .map_err(|_| Reason::RewriteFailed)
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

/// TC variant of [`rewrite_xdp`], through the skb helpers.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, flow: &Ipv4Flow, new: &Tuple, dec_ttl: bool) -> Result<(), Reason> {
    let l4_off = flow.l4_check_off();
    // UDP: leave a zero ("no checksum") as it is.
    let l4_flags = if flow.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    store_addr(ctx, IPV4_SRC_OFF, l4_off, l4_flags, flow.src, new.src)?;
    store_addr(ctx, IPV4_DST_OFF, l4_off, l4_flags, flow.dst, new.dst)?;
    store_port(ctx, L4_SPORT_OFF, l4_off, l4_flags, flow.sport, new.sport)?;
    store_port(ctx, L4_DPORT_OFF, l4_off, l4_flags, flow.dport, new.dport)?;
    if dec_ttl {
        let old = u16::from_ne_bytes([flow.ttl, flow.proto]) as u64;
        let new_ttl = flow.ttl.wrapping_sub(1);
        let new = u16::from_ne_bytes([new_ttl, flow.proto]) as u64;
        ctx.l3_csum_replace(IPV4_CHECK_OFF, old, new, 2)
            .and_then(|_| ctx.store(IPV4_TTL_OFF, &new_ttl, 0))
            .map_err(|_| Reason::RewriteFailed)?;
    }
    Ok(())
}
