//! The established-flow fast path (XDP, IPv4): a packet of a tracked connection whose entry
//! holds a current next hop is rewritten with the entry's precomputed checksum deltas and
//! redirected, without the full parse, the forward lookup or the FIB lookup. Anything
//! else (and anything unusual about the packet) goes to the full path, which also fills
//! the cache in (conntrack::cache_next_hop).

use aya_ebpf::{helpers::bpf_jiffies64, programs::XdpContext};
use forwarder_common::{
    FWD_FLAG_INGRESS, NH_MAX_AGE_JIFFIES, PROTO_TCP, PROTO_UDP, Reason,
    csum::{apply_delta, ipv4_pseudo_seed},
};

use crate::{
    conntrack::{ct_key_v4, fwd_key_v4, note_state, route_generation},
    ctx::{read, write},
    maps::{FWD_CT, FWD_RULES, FWD_TX_PORTS},
    parse::{ETH_LEN, IPV4_CHECK_OFF, IPV4_SRC_OFF, IPV4_TTL_OFF, L3_OFF, L4_OFF_V4},
    stats,
    verdict::Outcome,
};

/// What the fast path made of a packet.
pub enum Fast {
    /// Handled: forwarded from the cache (or, should a write fail, dropped).
    Done(Outcome),
    /// An IPv4 TCP/UDP packet of no tracked connection for a forward's listen address: a
    /// new flow (the full path need not look it up in the connection table again).
    Untracked,
    /// An IPv4 TCP/UDP packet of no connection and no forward: not ours (host traffic pays
    /// two lookups, without the full parse).
    NoMatch,
    /// Everything else: the full path decides.
    Full,
}

const ETH_P_IP: [u8; 2] = [0x08, 0x00];

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
pub fn try_cached(ctx: &XdpContext) -> Fast {
    match forward_cached(ctx) {
        Ok(f) => f,
        Err(_) => Fast::Full,
    }
}

#[inline(always)]
fn forward_cached(ctx: &XdpContext) -> Result<Fast, Reason> {
    if read::<2, _>(ctx, 12)? != ETH_P_IP {
        return Ok(Fast::Full);
    }
    // Version 4 without options, not a fragment (DF may be set), TCP or UDP, TTL to spare:
    // the cases parse.rs takes apart, the fast path leaves to it.
    let ver_tos: [u8; 4] = read(ctx, L3_OFF)?;
    let frag_ttl_proto: [u8; 4] = read(ctx, L3_OFF + 6)?;
    let proto = frag_ttl_proto[3];
    if ver_tos[0] != 0x45
        || (frag_ttl_proto[0] & 0x3f) | frag_ttl_proto[1] != 0
        || frag_ttl_proto[2] <= 1
        || (proto != PROTO_TCP && proto != PROTO_UDP)
    {
        return Ok(Fast::Full);
    }
    let tot_len = be16([ver_tos[2], ver_tos[3]]) as usize;
    if tot_len + ETH_LEN > ctx.data_end() - ctx.data() {
        return Ok(Fast::Full);
    }
    let l4_len = tot_len.wrapping_sub(L4_OFF_V4 - L3_OFF);
    let addrs: [u8; 8] = read(ctx, IPV4_SRC_OFF)?;
    let l4: [u8; 8] = read(ctx, L4_OFF_V4)?;
    let (check_off, flags) = if proto == PROTO_TCP {
        let tcp: [u8; 4] = read(ctx, L4_OFF_V4 + 12)?;
        let data_off = (tcp[0] >> 4) as usize * 4;
        if l4_len < 20 || data_off < 20 || data_off > l4_len {
            return Ok(Fast::Full);
        }
        (L4_OFF_V4 + 16, tcp[1])
    } else {
        let udp_len = be16([l4[4], l4[5]]) as usize;
        if l4_len < 8 || udp_len < 8 || udp_len > l4_len {
            return Ok(Fast::Full);
        }
        (L4_OFF_V4 + 6, 0)
    };

    let word = |b: [u8; 4]| u32::from_ne_bytes(b);
    let (src, dst) = ([addrs[0], addrs[1], addrs[2], addrs[3]], [addrs[4], addrs[5], addrs[6], addrs[7]]);
    let key = ct_key_v4(word(src), word(dst), word([l4[0], l4[1], l4[2], l4[3]]), proto);
    let Some(entry) = FWD_CT.get_ptr_mut(&key) else {
        let rule = fwd_key_v4(word(dst), [l4[2], l4[3]], proto);
        // SAFETY: only the flags are read, at once.
        return Ok(match unsafe { FWD_RULES.get(&rule) } {
            Some(f) if f.flags & FWD_FLAG_INGRESS != 0 => Fast::Untracked,
            _ => Fast::NoMatch,
        });
    };
    // SAFETY: map value pointer from a successful lookup.
    let entry = unsafe { &mut *entry };
    // SAFETY: a map value; read once, see conntrack::cache_next_hop.
    let ifindex = unsafe { core::ptr::read_volatile(&entry.nh_ifindex) };
    // SAFETY: inlined helper without arguments.
    let age = (unsafe { bpf_jiffies64() } as u32).wrapping_sub(entry.nh_jiffies);
    if ifindex == 0
        || age >= NH_MAX_AGE_JIFFIES
        || entry.nh_gen != route_generation()
        || tot_len > entry.nh_len_ok as usize
    {
        return Ok(Fast::Full);
    }
    let l4_check = be16(read(ctx, check_off)?);
    let no_udp_check = proto == PROTO_UDP && l4_check == 0;
    // A CHECKSUM_PARTIAL seed (see csum::looks_partial) needs TC's checksum helpers.
    if !no_udp_check && l4_check == ipv4_pseudo_seed(src, dst, proto, l4_len as u16) {
        return Ok(Fast::Full);
    }
    note_state(entry, flags);
    let ttl = frag_ttl_proto[2] - 1;
    let rewrite = || -> Result<(), Reason> {
        if !no_udp_check {
            let mut c = apply_delta(l4_check, entry.nh_l4_delta);
            if proto == PROTO_UDP && c == 0 {
                c = 0xffff; // a computed zero is sent as all ones; zero means "no checksum"
            }
            write(ctx, check_off, c.to_be_bytes())?;
        }
        let ip_check = apply_delta(be16(read(ctx, IPV4_CHECK_OFF)?), entry.nh_l3_delta);
        write(ctx, IPV4_CHECK_OFF, ip_check.to_be_bytes())?;
        write(ctx, IPV4_TTL_OFF, [ttl])?;
        let (s, d) = (&entry.new_src_addr, &entry.new_dst_addr);
        write(ctx, IPV4_SRC_OFF, [s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]])?;
        let (sp, dp) = (entry.new_src_port_be.to_ne_bytes(), entry.new_dst_port_be.to_ne_bytes());
        write(ctx, L4_OFF_V4, [sp[0], sp[1], dp[0], dp[1]])?;
        let (m, n) = (&entry.nh_dmac, &entry.nh_smac);
        write(ctx, 0, [m[0], m[1], m[2], m[3], m[4], m[5], n[0], n[1], n[2], n[3], n[4], n[5]])
    };
    // The packet was read up to past every offset written, so this cannot fail; were it to,
    // a half-rewritten packet must not go on.
    if rewrite().is_err() {
        return Ok(Fast::Done(Err(Reason::RewriteFailed)));
    }
    stats::count_forwarded(entry.forward_id, tot_len as u16);
    let action = FWD_TX_PORTS.redirect(ifindex, 0).unwrap_or_else(|a| a);
    Ok(Fast::Done(Ok((action as i32, Reason::RedirectXdpCached))))
}
