//! ICMP and ICMPv6 errors the forwarder sends itself, about a forward's packet it will not
//! forward: time exceeded (TTL / hop limit ≤ 1), fragmentation needed / packet too big
//! (larger than the egress MTU), destination unreachable (`unreachable` and `prohibit`
//! routes). A router with DNAT answers these from its own address, and netfilter turns the
//! quoted packet back into what the client sent; here the packet path decides before any
//! rewrite (`request`, nothing is committed to the connection table) and the packet becomes
//! its own answer (`send`): trimmed to the quote, new IP and ICMP headers pushed in front,
//! sent back to its sender from the address it was sent to (the listen address).
//!
//! The quote is the packet as it arrived: RFC 792 asks for the IP header and 8 bytes, Linux
//! quotes up to 576 bytes of IPv4 in all; RFC 4443 asks for as much as fits in 1280 bytes.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_RECOMPUTE_CSUM, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{
        bpf_csum_diff, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail,
        bpf_skb_load_bytes,
    },
    programs::TcContext,
};
use forwarder_common::{
    CT_DIR_REPLY, FAMILY_V6, Reason,
    csum::{fold, sum4},
};

use crate::{
    conntrack::{Plan, Tuple},
    csum::{looks_partial, sum_addr},
    maps::FWD_ICMP_RATE,
    parse::{ETH_LEN, FRAG_NONE, Flow, IPV4_LEN, IPV6_LEN, L3_OFF, PROTO_ICMP, PROTO_ICMPV6},
    route::{self, FIB_BLACKHOLE, FIB_FRAG_NEEDED, FIB_NO_NEIGH, FIB_PROHIBIT, FIB_SUCCESS, FIB_UNREACHABLE, Fib},
    verdict::{Outcome, pack},
    work::Work,
};

/// Bytes of the original packet an IPv4 error quotes at most: 576 in all, as Linux.
const QUOTE_MAX_V4: u16 = 576 - IPV4_LEN as u16 - ICMP_LEN as u16;
/// ICMPv6: as much as fits in the IPv6 minimum MTU (RFC 4443 2.4 (c)).
const QUOTE_MAX_V6: u16 = 1280 - IPV6_LEN as u16 - ICMP_LEN as u16;
const ICMP_LEN: usize = 8;
/// The quote is summed by `bpf_csum_diff` in chunks of at most this (the helper's limit).
const CHUNK: usize = 512;
/// The quote's copy: the IPv6 maximum, rounded up, plus a chunk of slack past any offset
/// the summing loop may read (the verifier checks the largest chunk at every offset).
pub const QUOTE_BUF: usize = IPV6_LEN + 3 * CHUNK + 24;
/// Ethernet, IPv6 and ICMP headers: the most the answer puts in front of the quote.
const HDR_MAX: usize = ETH_LEN + IPV6_LEN + ICMP_LEN;
/// TTL / hop limit of the answers (the stack's default).
const ANSWER_TTL: u8 = 64;
/// The ICMP rate limit, per CPU: one answer per interval, bursts of up to `ICMP_BURST`
/// (the kernel's `icmp_msgs_per_sec` and `icmp_msgs_burst` defaults). Like the kernel,
/// "too big" is exempt: path-MTU discovery must not stall.
const ICMP_INTERVAL_NS: u64 = 1_000_000;
const ICMP_BURST: u64 = 50;

/// What to answer a packet with (filled in by the packet path, read by `send`), in per-CPU
/// working memory: the quote's copy is far larger than the stack.
#[repr(C)]
pub struct IcmpAnswer {
    /// The sender of the packet: the answer's destination.
    pub client: [u8; 16],
    /// The answer's source: the address the packet was sent to.
    pub from: [u8; 16],
    /// The four bytes after the ICMP checksum (the MTU of "too big"), host order.
    pub info: u32,
    /// Reason code the packet is counted under.
    pub reason: u32,
    /// Bytes of the packet quoted (from its IP header on).
    pub quote_len: u16,
    pub family: u8,
    /// ICMP type and code; type 0 (never an error): no answer, the packet is dropped.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// IPv4 TOS of the packet (the answer keeps its TOS bits, as Linux).
    pub tos: u8,
    /// Offset in the quote of the L4 checksum when it holds a CHECKSUM_PARTIAL seed, else 0.
    pub partial_off: u8,
    /// Whether the kernel's ICMP rate limit would apply to this answer.
    pub limited: u8,
    pub hdr: [u8; HDR_MAX],
    pub quote: [u8; QUOTE_BUF],
}

/// Why a packet is answered.
#[derive(Clone, Copy)]
pub enum Why {
    /// TTL / hop limit ≤ 1.
    TtlExpired,
    /// Larger than the next hop's MTU (the MTU), and may not be fragmented here.
    TooBig(u16),
    /// A route of this `bpf_fib_lookup` answer: unreachable, prohibit, blackhole.
    Route(i64),
    /// A new connection for a forward with no backend taking new ones: port unreachable,
    /// what a host without the service answers (connect() fails with ECONNREFUSED).
    NoBackend,
}

/// The address an answer about this packet comes from: the one it was sent to (a listen
/// address, or the SNAT address a backend answers), which is this host's. A backend's
/// packet with SNAT off is addressed to the client itself: its answer comes from the
/// listen address the client dialled.
#[inline(always)]
fn answer_source(plan: &Plan, flow: &Flow) -> [u8; 16] {
    match plan {
        Plan::Tracked { entry } if entry.direction == CT_DIR_REPLY && entry.new_dst_addr == flow.dst => {
            entry.new_src_addr
        }
        _ => flow.dst,
    }
}

/// Records the answer to `flow` in `a` and returns the reason the packet is counted under;
/// the TC entry point then calls [`send`]. Nothing of the packet is changed yet.
#[inline(always)]
pub fn request(a: &mut IcmpAnswer, plan: &Plan, flow: &Flow, why: Why) -> Reason {
    request_from(a, answer_source(plan, flow), flow, why)
}

/// [`request`] with the answer's source given: `from`, an address of this host.
#[inline(always)]
pub fn request_from(a: &mut IcmpAnswer, from: [u8; 16], flow: &Flow, why: Why) -> Reason {
    let v6 = flow.is_v6();
    let (reason, icmp_type, icmp_code, info, limited) = match (why, v6) {
        (Why::TtlExpired, false) => (Reason::IcmpTimeExceeded, 11, 0, 0, true),
        (Why::TtlExpired, true) => (Reason::IcmpTimeExceeded, 3, 0, 0, true),
        (Why::TooBig(mtu), false) => (Reason::IcmpTooBig, 3, 4, mtu as u32, false),
        (Why::TooBig(mtu), true) => (Reason::IcmpTooBig, 2, 0, mtu as u32, false),
        // Host unreachable / communication administratively prohibited (ip_error).
        (Why::Route(FIB_UNREACHABLE_I), false) => (Reason::IcmpUnreachable, 3, 1, 0, true),
        (Why::Route(FIB_PROHIBIT_I), false) => (Reason::IcmpUnreachable, 3, 13, 0, true),
        // No route / administratively prohibited (ip6_pkt_discard, ip6_pkt_prohibit).
        (Why::Route(FIB_UNREACHABLE_I), true) => (Reason::IcmpUnreachable, 1, 0, 0, true),
        (Why::Route(FIB_PROHIBIT_I), true) => (Reason::IcmpUnreachable, 1, 1, 0, true),
        // Blackhole: dropped without an answer.
        (Why::Route(_), _) => (Reason::IcmpUnreachable, 0, 0, 0, false),
        // Port unreachable (IPv6: destination unreachable, port unreachable).
        (Why::NoBackend, false) => (Reason::NoBackend, 3, 3, 0, true),
        (Why::NoBackend, true) => (Reason::NoBackend, 1, 4, 0, true),
    };
    a.client = flow.src;
    a.from = from;
    a.info = info;
    a.reason = reason as u32;
    let max = if v6 { QUOTE_MAX_V6 } else { QUOTE_MAX_V4 };
    a.quote_len = if flow.l3_len < max { flow.l3_len } else { max };
    a.family = flow.family;
    a.icmp_type = icmp_type;
    a.icmp_code = icmp_code;
    a.tos = flow.tos;
    a.partial_off = if looks_partial(flow) { (flow.l4_check_off() - L3_OFF) as u8 } else { 0 };
    a.limited = limited as u8;
    reason
}

const FIB_UNREACHABLE_I: i64 = FIB_UNREACHABLE as i64;
const FIB_PROHIBIT_I: i64 = FIB_PROHIBIT as i64;

/// The answer a FIB result calls for, before the packet is committed or rewritten: "too
/// big" for a packet that may not be fragmented here (IPv6, IPv4 with DF; an IPv4 packet
/// without DF goes on to the stack, which fragments it), destination unreachable for
/// `unreachable`, `prohibit` and `blackhole` routes. Returns the packet's reason.
#[inline(always)]
pub fn after_fib(ctx: &TcContext, a: &mut IcmpAnswer, plan: &Plan, flow: &Flow, fib: &Fib) -> Option<Reason> {
    let rc = fib.rc;
    if rc == FIB_FRAG_NEEDED as i64 {
        // The DF bit (read here: only this case needs it); unreadable counts as set.
        let df = flow.is_v6() || ctx.load::<u8>(L3_OFF + 6).map(|b| b & 0x40 != 0).unwrap_or(true);
        return if df { Some(request(a, plan, flow, Why::TooBig(fib.mtu))) } else { None };
    }
    if rc == FIB_UNREACHABLE as i64 || rc == FIB_PROHIBIT as i64 || rc == FIB_BLACKHOLE as i64 {
        return Some(request(a, plan, flow, Why::Route(rc)));
    }
    None
}

/// Builds and sends the answer [`request`] recorded in `w.answer` (`w`: the program run's
/// working memory). Out of line, beside the TCP/UDP path and the ICMP translation (see
/// tc.rs).
#[inline(never)]
pub fn send(skb: *mut __sk_buff, w: &mut Work) -> u64 {
    pack(try_send(&TcContext::new(skb), w))
}

/// A source the stack would answer: not unspecified, loopback or multicast (nor IPv4's
/// class E and broadcast), as RFC 1812 4.3.2.7 and RFC 4443 2.4 (e) ask.
#[inline(always)]
fn answerable(v6: bool, a: &[u8; 16]) -> bool {
    if !v6 {
        return a[0] != 0 && a[0] != 127 && a[0] < 224;
    }
    let mut zero_head = true;
    let mut i = 0;
    while i < 15 {
        zero_head &= a[i] == 0;
        i += 1;
    }
    a[0] != 0xff && !(zero_head && a[15] <= 1)
}

/// Takes a token from this CPU's bucket; false when the limit holds the answer back.
#[inline(always)]
fn rate_allows() -> bool {
    let Some(b) = FWD_ICMP_RATE.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU slot, used by this program run only.
    let b = unsafe { &mut *b };
    // SAFETY: helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = ICMP_BURST * ICMP_INTERVAL_NS;
    let mut credit = b.credit_ns.saturating_add(now.wrapping_sub(b.last_ns));
    if credit > cap {
        credit = cap;
    }
    b.last_ns = now;
    if credit < ICMP_INTERVAL_NS {
        b.credit_ns = credit;
        b.suppressed += 1;
        return false;
    }
    b.credit_ns = credit - ICMP_INTERVAL_NS;
    true
}

/// One's-complement sum (folded, network order) of `buf[start..end)`: both multiples of 4,
/// `end - start` at most three chunks; bytes past the data must be zero.
#[inline(always)]
fn sum_span(buf: *mut u8, start: usize, end: usize) -> Result<u16, Reason> {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 3 {
        let off = start + i * CHUNK;
        if off >= end || off > QUOTE_BUF - CHUNK {
            break;
        }
        let mut n = end - off;
        if n > CHUNK {
            n = CHUNK;
        }
        // SAFETY: buf is QUOTE_BUF bytes of map memory; off + n <= QUOTE_BUF (checked above).
        let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.add(off) as *mut u32, n as u32, sum) };
        if r < 0 {
            return Err(Reason::RewriteFailed);
        }
        sum = r as u32;
        i += 1;
    }
    // The helper sums native-order words; the folded sum byte-swapped is the network-order
    // sum (RFC 1071: the sum is independent of byte order up to a swap).
    Ok(fold(sum).swap_bytes())
}

#[inline(always)]
fn put(hdr: &mut [u8; HDR_MAX], at: usize, bytes: &[u8]) {
    let mut i = 0;
    while i < bytes.len() {
        hdr[at + i] = bytes[i];
        i += 1;
    }
}

#[inline(always)]
fn try_send(ctx: &TcContext, w: &mut Work) -> Outcome {
    let a = &mut w.answer;
    let reason = Reason::from_code(a.reason).unwrap_or(Reason::IcmpTimeExceeded);
    let v6 = a.family == FAMILY_V6;
    if a.icmp_type == 0 || !answerable(v6, &a.client) || (a.limited != 0 && !rate_allows()) {
        return Err(reason);
    }
    let ip_len = if v6 { IPV6_LEN } else { IPV4_LEN };
    let q = a.quote_len as usize;
    if q < ip_len + 8 || q > QUOTE_MAX_V6 as usize {
        return Err(reason);
    }
    let fail = |_| Reason::RewriteFailed;

    // The quote's sum, from a copy (the skb may be non-linear): the IP header apart from
    // the rest, for the checksum-offload correction below.
    let buf = a.quote.as_mut_ptr();
    // SAFETY: q <= QUOTE_BUF - 4; the helper reads the skb, linear or not.
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, L3_OFF as u32, buf as *mut _, q as u32) } != 0 {
        return Err(Reason::RewriteFailed);
    }
    // SAFETY: q + 4 <= QUOTE_BUF: zero padding up to the next word for the sums.
    unsafe { core::ptr::write_unaligned(buf.add(q) as *mut u32, 0) };
    let padded = (q + 3) & !3;
    let head = sum_span(buf, 0, ip_len)?;
    let mut rest = sum_span(buf, ip_len, padded)?;
    if a.partial_off != 0 {
        // CHECKSUM_PARTIAL: the L4 checksum field holds the pseudo-header seed, and the
        // skb keeps its offload state (no helper clears it); whatever sends the answer
        // (the NIC, or skb_checksum_help) completes the quoted L4 checksum over the quote,
        // from the L4 header to the end. The ICMP checksum is computed over the quote as
        // it will leave: with that completed value in place of the seed.
        let off = (a.partial_off as usize) & 0x3f;
        let seed = u16::from_be_bytes([a.quote[off], a.quote[off + 1]]);
        let mut done = !rest;
        if done == 0 {
            done = 0xffff;
        }
        rest = fold(rest as u32 + (!seed) as u32 + done as u32);
    }
    let quote_sum = head as u32 + rest as u32;

    // The original frame's addresses: the fallback next hop is the way the packet came.
    let macs: [u8; 12] = ctx.load(0).map_err(fail)?;

    // Trim to the quote (this also resets GSO state), then room for the new headers.
    let frame_len = ETH_LEN + q;
    if ctx.len() as usize != frame_len {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, frame_len as u32, 0) } != 0 {
            return Err(Reason::RewriteFailed);
        }
    }
    let push = (ip_len + ICMP_LEN) as i32;
    ctx.adjust_room(push, BPF_ADJ_ROOM_MAC, 0).map_err(fail)?;

    // Back towards the sender.
    let icmp_len = (ICMP_LEN + q) as u16;
    let total = icmp_len + ip_len as u16;
    let proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    w.flow = Flow {
        family: a.family,
        src: a.from,
        dst: a.client,
        sport: [0; 2],
        dport: [0; 2],
        proto,
        ttl: ANSWER_TTL,
        tos: 0,
        l3_len: total,
        l4_check: 0,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_payload: 0,
        frag: FRAG_NONE,
        l4_off: (L3_OFF + ip_len) as u8,
        frag_id: 0,
    };
    w.to = Tuple { src: a.from, dst: a.client, sport: [0; 2], dport: [0; 2] };
    // SAFETY: reading a context field.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    route::lookup(ctx, ingress, &w.flow, &w.to, false, total, &mut w.params, &mut w.fib);
    let fib = &w.fib;
    let a = &mut w.answer;
    let routed = fib.rc == FIB_SUCCESS as i64;
    let (dmac, smac) = if routed {
        (fib.dmac, fib.smac)
    } else {
        (
            [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]],
            [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]],
        )
    };

    // Headers: Ethernet, IP, ICMP.
    let h = &mut a.hdr;
    put(h, 0, &dmac);
    put(h, 6, &smac);
    put(h, 12, if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let info = a.info.to_be_bytes();
    let mut icmp_sum = ((a.icmp_type as u32) << 8 | a.icmp_code as u32) + sum4(info) + quote_sum;
    let l3 = ETH_LEN;
    if v6 {
        put(h, l3, &[0x60, 0, 0, 0]);
        put(h, l3 + 4, &icmp_len.to_be_bytes());
        put(h, l3 + 6, &[PROTO_ICMPV6, ANSWER_TTL]);
        put(h, l3 + 8, &a.from);
        put(h, l3 + 24, &a.client);
        // Pseudo header: addresses, upper-layer length, next header.
        icmp_sum += sum_addr(&a.from, true) + sum_addr(&a.client, true) + icmp_len as u32 + PROTO_ICMPV6 as u32;
    } else {
        // SAFETY: helper call.
        let id = (unsafe { bpf_get_prandom_u32() } as u16).to_be_bytes();
        // Linux: the packet's TOS bits with precedence "internetwork control".
        let tos = (a.tos & 0x1e) | 0xc0;
        let len = total.to_be_bytes();
        let (f, c) = (&a.from, &a.client);
        let mut ip = [
            0x45, tos, len[0], len[1], id[0], id[1], 0, 0, ANSWER_TTL, PROTO_ICMP, 0, 0, f[0], f[1], f[2], f[3], c[0],
            c[1], c[2], c[3],
        ];
        let mut s = 0u32;
        let mut i = 0;
        while i < IPV4_LEN {
            s += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
            i += 2;
        }
        let check = (!fold(s)).to_be_bytes();
        ip[10] = check[0];
        ip[11] = check[1];
        put(h, l3, &ip);
    }
    let icmp = l3 + ip_len;
    let check = (!fold(icmp_sum)).to_be_bytes();
    put(h, icmp, &[a.icmp_type, a.icmp_code, check[0], check[1], info[0], info[1], info[2], info[3]]);

    // The Ethernet header is not covered by a CHECKSUM_COMPLETE sum; the rest is.
    let macs_new: &[u8; ETH_LEN] = {
        // SAFETY: hdr holds at least ETH_LEN bytes.
        unsafe { &*(h.as_ptr() as *const [u8; ETH_LEN]) }
    };
    ctx.store(0, macs_new, 0).map_err(fail)?;
    let csum = BPF_F_RECOMPUTE_CSUM as u64;
    if v6 {
        // SAFETY: hdr holds ETH_LEN + IPV6_LEN + ICMP_LEN bytes.
        let hdrs = unsafe { &*(h.as_ptr().add(ETH_LEN) as *const [u8; IPV6_LEN + ICMP_LEN]) };
        ctx.store(ETH_LEN, hdrs, csum).map_err(fail)?;
    } else {
        // SAFETY: as above, IPv4.
        let hdrs = unsafe { &*(h.as_ptr().add(ETH_LEN) as *const [u8; IPV4_LEN + ICMP_LEN]) };
        ctx.store(ETH_LEN, hdrs, csum).map_err(fail)?;
    }

    let action = if routed {
        // SAFETY: helper call.
        unsafe { bpf_redirect(fib.ifindex, 0) }
    } else if fib.rc == FIB_NO_NEIGH as i64 {
        // SAFETY: helper call; a null neighbour lets the kernel resolve it.
        unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) }
    } else {
        // No route back: the way the packet came, to the next hop it came from.
        // SAFETY: helper call.
        unsafe { bpf_redirect(ingress, 0) }
    };
    Ok((action as i32, reason))
}
