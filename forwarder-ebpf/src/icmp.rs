//! ICMP and ICMPv6 errors about forwarded connections (destination unreachable,
//! fragmentation needed / packet too big, time exceeded), translated so that path-MTU
//! discovery and traceroute work through the NAT: the outer destination, the quoted
//! (inner) header and all three checksums are rewritten to what the original sender knows,
//! as netfilter does for "related" packets.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use forwarder_common::{FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason, conntrack::CT_HOST_BACKEND, csum::update};

use crate::{
    conntrack::{Tuple, ct_key},
    csum::sum_addr,
    l2,
    maps::FWD_CT_V4,
    nat::{decrement_ttl_tc, replace_addr},
    parse::{FRAG_NONE, Flow, IPPROTO_FRAGMENT, IPV4_DST_OFF, IPV4_SRC_OFF, IPV6_DST_OFF, IPV6_SRC_OFF, parse_l3},
    route::{self, FIB_NO_NEIGH, FIB_SUCCESS},
    verdict::Outcome,
    work::Work,
};

/// Translates an ICMP error whose quoted packet belongs to a tracked connection. Out of
/// line, called beside (not below) the TCP/UDP path: both have many locals and the
/// verifier limits the stack of a call chain to 512 bytes. `egress`: an error the host
/// itself sends about a packet of a backend on this host (TC egress: only such
/// connections', rewritten and left on their way, not routed). `w`: the program run's
/// working memory.
#[inline(never)]
pub fn translate(skb: *mut __sk_buff, egress: bool, w: &mut Work) -> u64 {
    crate::verdict::pack(try_translate(&TcContext::new(skb), egress, w))
}

#[inline(always)]
fn load2(ctx: &TcContext, off: usize) -> Result<[u8; 2], Reason> {
    ctx.load::<[u8; 2]>(off).map_err(|_| Reason::IcmpError)
}

/// Addresses of a translation, in per-CPU working memory (too many for the stack).
#[repr(C)]
pub struct IcmpWork {
    pub osrc: [u8; 16],
    pub odst: [u8; 16],
    pub isrc: [u8; 16],
    pub idst: [u8; 16],
    pub new_isrc: [u8; 16],
    pub new_idst: [u8; 16],
    pub new_osrc: [u8; 16],
}

#[inline(always)]
fn load16(ctx: &TcContext, off: usize, v6: bool, a: &mut [u8; 16]) -> Result<(), Reason> {
    if v6 {
        *a = ctx.load::<[u8; 16]>(off).map_err(|_| Reason::IcmpError)?;
    } else {
        let b = ctx.load::<[u8; 4]>(off).map_err(|_| Reason::IcmpError)?;
        *a = [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    }
    Ok(())
}

/// Replaces 2 bytes inside the ICMP message, keeping the ICMP checksum right.
#[inline(always)]
fn swap2(ctx: &TcContext, off: usize, icmp_check: usize, old: [u8; 2], new: [u8; 2]) -> Result<(), Reason> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(icmp_check, u16::from_ne_bytes(old) as u64, u16::from_ne_bytes(new) as u64, 2)
        .and_then(|_| ctx.store(off, &new, 0))
        .map_err(|_| Reason::RewriteFailed)
}

#[inline(always)]
fn sum2(b: [u8; 2]) -> u32 {
    u16::from_be_bytes(b) as u32
}

#[inline(always)]
fn try_translate(ctx: &TcContext, egress: bool, w: &mut Work) -> Outcome {
    parse_l3(ctx, &mut w.flow).map_err(|_| Reason::IcmpError)?;
    let f = &w.flow;
    if f.frag != FRAG_NONE {
        return Err(Reason::IcmpError);
    }
    let (family, proto, ttl, tos, l3_len, icmp_off) = (f.family, f.proto, f.ttl, f.tos, f.l3_len, f.l4_off());
    let a = &mut w.icmp;
    a.osrc = f.src;
    a.odst = f.dst;
    let v6 = family == FAMILY_V6;
    let icmp_check = icmp_off + 2;
    let inner_l3 = icmp_off + 8;

    // The quoted header: IPv4 without options or IPv6 without extensions but a fragment
    // header, then TCP/UDP. A quoted fragment must be a first one: a later one has no L4
    // header to find its connection by.
    let (iproto, inner_l4, isrc_off, idst_off) = if v6 {
        let vtc = ctx.load::<u8>(inner_l3).map_err(|_| Reason::IcmpError)?;
        if vtc >> 4 != 6 {
            return Err(Reason::IcmpError);
        }
        let nh = ctx.load::<u8>(inner_l3 + 6).map_err(|_| Reason::IcmpError)?;
        if nh == IPPROTO_FRAGMENT {
            // Next header, reserved, offset and M.
            let fh = ctx.load::<[u8; 4]>(inner_l3 + 40).map_err(|_| Reason::IcmpError)?;
            if u16::from_be_bytes([fh[2], fh[3]]) >> 3 != 0 {
                return Err(Reason::IcmpError);
            }
            (fh[0], inner_l3 + 48, inner_l3 + 8, inner_l3 + 24)
        } else {
            (nh, inner_l3 + 40, inner_l3 + 8, inner_l3 + 24)
        }
    } else {
        if ctx.load::<u8>(inner_l3).map_err(|_| Reason::IcmpError)? != 0x45
            || u16::from_be_bytes(load2(ctx, inner_l3 + 6)?) & 0x1fff != 0
        {
            return Err(Reason::IcmpError);
        }
        (ctx.load::<u8>(inner_l3 + 9).map_err(|_| Reason::IcmpError)?, inner_l3 + 20, inner_l3 + 12, inner_l3 + 16)
    };
    if iproto != PROTO_TCP && iproto != PROTO_UDP {
        return Err(Reason::IcmpError);
    }
    load16(ctx, isrc_off, v6, &mut a.isrc)?;
    load16(ctx, idst_off, v6, &mut a.idst)?;
    let isport = load2(ctx, inner_l4)?;
    let idport = load2(ctx, inner_l4 + 2)?;

    // Replies to the quoted packet would travel idst -> isrc: that direction's entry says
    // what the sender of the quoted packet originally used and expects.
    let key = ct_key(family, a.idst, a.isrc, idport, isport, iproto);
    // SAFETY: map value reference valid for this program run.
    let Some(entry) = (unsafe { FWD_CT_V4.get(&key) }) else {
        return Err(Reason::IcmpError);
    };
    if egress && entry.flags & CT_HOST_BACKEND == 0 {
        return Err(Reason::IcmpError);
    }
    a.new_isrc = entry.new_dst_addr;
    a.new_idst = entry.new_src_addr;
    let new_isport = entry.new_dst_port_be.to_ne_bytes();
    let new_idport = entry.new_src_port_be.to_ne_bytes();
    // An error from the far end itself speaks with the address the sender knows it by.
    a.new_osrc = if a.osrc == a.idst { a.new_idst } else { a.osrc };

    // Quoted L4 checksum, when the quote is long enough to hold it.
    let pkt_len = ctx.len() as usize;
    let inner_check_off = inner_l4 + if iproto == PROTO_TCP { 16 } else { 6 };
    if inner_check_off + 2 <= pkt_len {
        let old = load2(ctx, inner_check_off)?;
        if !(iproto == PROTO_UDP && old == [0, 0]) {
            let before = sum_addr(&a.isrc, v6) + sum_addr(&a.idst, v6) + sum2(isport) + sum2(idport);
            let after = sum_addr(&a.new_isrc, v6) + sum_addr(&a.new_idst, v6) + sum2(new_isport) + sum2(new_idport);
            let new = update(u16::from_be_bytes(old), before, after).to_be_bytes();
            swap2(ctx, inner_check_off, icmp_check, old, new)?;
        }
    }
    // Quoted IPv4 header checksum.
    if !v6 {
        let off = inner_l3 + 10;
        let old = load2(ctx, off)?;
        let before = sum_addr(&a.isrc, false) + sum_addr(&a.idst, false);
        let after = sum_addr(&a.new_isrc, false) + sum_addr(&a.new_idst, false);
        swap2(ctx, off, icmp_check, old, update(u16::from_be_bytes(old), before, after).to_be_bytes())?;
    }
    swap2(ctx, inner_l4, icmp_check, isport, new_isport)?;
    swap2(ctx, inner_l4 + 2, icmp_check, idport, new_idport)?;
    replace_addr(ctx, isrc_off, v6, &a.isrc, &a.new_isrc, Some((icmp_check, 0)), false)?;
    replace_addr(ctx, idst_off, v6, &a.idst, &a.new_idst, Some((icmp_check, 0)), false)?;

    // Outer header: ICMPv6's checksum covers the addresses (pseudo header), ICMPv4's not.
    let (osrc_off, odst_off) = if v6 { (IPV6_SRC_OFF, IPV6_DST_OFF) } else { (IPV4_SRC_OFF, IPV4_DST_OFF) };
    let outer_l4 = if v6 { Some((icmp_check, BPF_F_PSEUDO_HDR as u64)) } else { None };
    replace_addr(ctx, osrc_off, v6, &a.osrc, &a.new_osrc, outer_l4, !v6)?;
    // The error goes to the quoted packet's original sender.
    replace_addr(ctx, odst_off, v6, &a.odst, &a.new_isrc, outer_l4, !v6)?;
    if egress {
        // Already leaving by the route to that sender.
        return Ok((TC_ACT_OK, Reason::IcmpTranslated));
    }

    // On towards the original sender.
    w.flow = Flow {
        family,
        src: w.icmp.new_osrc,
        dst: w.icmp.new_isrc,
        sport: [0; 2],
        dport: [0; 2],
        proto,
        ttl,
        tos,
        l3_len,
        l4_check: 0,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_payload: 0,
        frag: FRAG_NONE,
        l4_off: icmp_off as u8,
        frag_id: 0,
    };
    w.to = Tuple { src: w.icmp.new_osrc, dst: w.icmp.new_isrc, sport: [0; 2], dport: [0; 2] };
    // SAFETY: reading a context field.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    route::lookup(ctx, ingress, &w.flow, &w.to, false, 0, &mut w.params, &mut w.fib);
    let fib = &w.fib;
    if ttl <= 1 {
        return Ok((TC_ACT_OK, Reason::IcmpTranslated));
    }
    if fib.rc == FIB_SUCCESS as i64 {
        decrement_ttl_tc(ctx, v6, ttl, proto)?;
        l2::set_macs_tc(ctx, fib.dmac, fib.smac)?;
        // SAFETY: helper call.
        return Ok((unsafe { bpf_redirect(fib.ifindex, 0) } as i32, Reason::IcmpTranslated));
    }
    if fib.rc == FIB_NO_NEIGH as i64 {
        decrement_ttl_tc(ctx, v6, ttl, proto)?;
        // SAFETY: helper call; a null neighbour lets the kernel resolve it.
        return Ok((
            unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32,
            Reason::IcmpTranslated,
        ));
    }
    Ok((TC_ACT_OK, Reason::IcmpTranslated))
}
