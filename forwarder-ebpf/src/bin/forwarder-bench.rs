//! Helper programs for `cargo xtask bench`, built as a separate object so forwarder's own
//! object stays as it is (this file is picked up by cargo's bin auto-discovery and embedded
//! by forwarder-user's build.rs next to the `forwarder` object):
//!
//! - `bench_redirect_only`: the ceiling. The least an XDP forwarder can do on this path:
//!   set the next hop's Ethernet addresses (so the receiver's stack takes the frame) and
//!   `bpf_redirect_map` it to the one egress in a devmap. No parsing, no state, no rewrite.
//!   The same program attached in generic mode is the floor of any generic-XDP program.
//! - `bench_redirect_only_tc`: the same at TC ingress, the floor of any TC program: the two
//!   MAC addresses, then `bpf_redirect_peer` into the egress veth's far end, as forwarder's
//!   TC path sends into a container (`route::tc_redirect`).
//! - `bench_lookup_redirect_40` and `_16`: the ceiling plus one hash lookup, with a 40-byte
//!   key (forwarder's connection key) and a 16-byte one: the least a forwarder that keeps
//!   per-connection state does per packet, to set the established path's time against.
//! - `bench_trafficgen`: the packet generator, run with BPF_PROG_TEST_RUN live frames (as
//!   xdp-trafficgen does): writes a UDP frame (IPv4 or IPv6, or a TCP SYN) from a template, varies the
//!   source port over N flows (past `ports` flows, the source address's last byte too) and
//!   sends it with XDP_TX. The template is written every time because live-frame pages are
//!   recycled without being reset, and the router may have rewritten them.
//! - `bench_sink` (XDP) and `bench_sink_tc` (TC ingress, for frames sent into the veth's
//!   ingress past its XDP): the receiver. Counts and drops the bench's UDP frames (IPv4 and IPv6) and the SYNs of the
//!   new-flows workload (by destination port), passes the rest (TCP of the other figures).
//!   Having an XDP program also lets the veth take XDP_REDIRECTed frames.
#![no_std]
#![no_main]

#[path = "../ctx.rs"]
#[allow(dead_code)]
mod ctx;

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::bpf_redirect_peer,
    macros::{classifier, map, xdp},
    maps::{Array, DevMap, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use forwarder_common::{Reason, csum};

/// Next-hop Ethernet header for the redirect-only program: destination then source MAC.
#[map(name = "BENCH_L2")]
static BENCH_L2: Array<[u8; 12]> = Array::with_max_entries(1, 0);

/// The redirect-only program's egress (index 0).
#[map(name = "BENCH_TX")]
static BENCH_TX: DevMap = DevMap::with_max_entries(1, 0);

/// The TC floor's egress (index 0): a veth whose far end is in another namespace.
#[map(name = "BENCH_TC_EGRESS")]
static BENCH_TC_EGRESS: Array<u32> = Array::with_max_entries(1, 0);

/// Generator template: the first bytes of the frame with full checksums, Ethernet + IPv4 +
/// UDP (42 bytes), Ethernet + IPv4 + TCP with a 4-byte option (58 bytes) or Ethernet + IPv6 +
/// UDP (62 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    pub header: [u8; HEADER_ROOM],
    /// Number of flows before the pattern repeats.
    pub flows: u32,
    /// Source ports per source address: flow k has the template's port + k % ports and the
    /// template's source address with k / ports added to its last byte (0: all flows vary
    /// the port only).
    pub ports: u32,
    /// 0: UDP, [`GEN_TCP`]: a TCP SYN, [`GEN_UDP6`]: UDP over IPv6.
    pub kind: u32,
    pub _pad: u32,
}

/// The longest template (IPv6 UDP, 62 bytes), rounded up to whole words.
const HEADER_ROOM: usize = 64;
const GEN_TCP: u32 = 1;
const GEN_UDP6: u32 = 2;
const IP_CHECK: usize = 14 + 10;
/// The source address's second word (its last two bytes).
const IP_SADDR_LOW: usize = 14 + 14;
const L4_SPORT: usize = 14 + 20;
const UDP_CHECK: usize = 14 + 20 + 6;
const TCP_CHECK: usize = 14 + 20 + 16;
const UDP6_SPORT: usize = 14 + 40;
const UDP6_CHECK: usize = 14 + 40 + 6;
const _: () = assert!(core::mem::size_of::<GenConfig>() == 80);

#[map(name = "BENCH_GEN")]
static BENCH_GEN: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Frames generated so far (the flow of the next frame). One counter, not one per CPU: the
/// generator is one thread, and should it move to another CPU, a per-CPU count would start
/// the flows over, which the new-flows workload (every SYN a new connection) must not.
#[map(name = "BENCH_GEN_SEQ")]
static BENCH_GEN_SEQ: Array<u64> = Array::with_max_entries(1, 0);

/// Sink: the destination ports counted, [low, high]: index 0 UDP, index 1 TCP.
#[map(name = "BENCH_PORTS")]
static BENCH_PORTS: Array<[u16; 2]> = Array::with_max_entries(2, 0);

/// Sink: frames counted (index 0).
#[map(name = "BENCH_SINK")]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Keys of the lookup programs: 40 bytes (as forwarder's `CtKey`) and 16. Both are built
/// from the frame's IPv4 addresses and UDP ports (words `a`, `b`, `c`): `[a, 0, b, 0, c]`
/// and `[a | b << 32, c]`; the bench inserts the same keys (xtask/src/bench/testrun.rs, `lookup_keys`).
#[map(name = "BENCH_KEY40")]
static BENCH_KEY40: HashMap<[u64; 5], u64> = HashMap::with_max_entries(BENCH_KEY_ENTRIES, 0);

#[map(name = "BENCH_KEY16")]
static BENCH_KEY16: HashMap<[u64; 2], u64> = HashMap::with_max_entries(BENCH_KEY_ENTRIES, 0);

/// As many as forwarder's default connection table, so the bucket array is as large.
const BENCH_KEY_ENTRIES: u32 = forwarder_common::DEFAULT_CT_ENTRIES;

#[xdp]
pub fn bench_redirect_only(ctx: XdpContext) -> u32 {
    redirect(&ctx)
}

#[inline(always)]
fn redirect(ctx: &XdpContext) -> u32 {
    let Some(l2) = BENCH_L2.get(0) else { return XDP_ABORTED };
    if !write_l2(ctx, l2) {
        return XDP_PASS;
    }
    BENCH_TX.redirect(0, 0).unwrap_or(XDP_ABORTED)
}

#[classifier]
pub fn bench_redirect_only_tc(ctx: TcContext) -> i32 {
    let (Some(l2), Some(egress)) = (BENCH_L2.get(0), BENCH_TC_EGRESS.get(0)) else { return TC_ACT_SHOT };
    if !write_l2(&ctx, l2) {
        return TC_ACT_OK;
    }
    // SAFETY: helper call.
    unsafe { bpf_redirect_peer(*egress, 0) as i32 }
}

/// Writes the next hop's Ethernet addresses; false when the frame is too short.
#[inline(always)]
fn write_l2<P: ctx::Packet>(ctx: &P, m: &[u8; 12]) -> bool {
    // Byte by byte: an array copy would be a call to a byte-loop memmove.
    ctx::write(ctx, 0, [m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11]]).is_ok()
}

/// The address and port words of an IPv4 UDP frame without options.
#[inline(always)]
fn tuple_words(ctx: &XdpContext) -> Option<[u64; 3]> {
    let b: [u8; 12] = ctx::read(ctx, 14 + 12).ok()?;
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as u64;
    Some([w(0), w(4), w(8)])
}

#[xdp]
pub fn bench_lookup_redirect_40(ctx: XdpContext) -> u32 {
    let Some([a, b, c]) = tuple_words(&ctx) else { return XDP_PASS };
    if BENCH_KEY40.get_ptr(&[a, 0, b, 0, c]).is_none() {
        return XDP_PASS;
    }
    redirect(&ctx)
}

#[xdp]
pub fn bench_lookup_redirect_16(ctx: XdpContext) -> u32 {
    let Some([a, b, c]) = tuple_words(&ctx) else { return XDP_PASS };
    if BENCH_KEY16.get_ptr(&[a | b << 32, c]).is_none() {
        return XDP_PASS;
    }
    redirect(&ctx)
}

#[xdp]
pub fn bench_trafficgen(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Ok(()) => XDP_TX,
        Err(_) => XDP_ABORTED,
    }
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Result<(), Reason> {
    let cfg = BENCH_GEN.get(0).ok_or(Reason::Malformed)?;
    let seq = BENCH_GEN_SEQ.get_ptr_mut(0).ok_or(Reason::Malformed)?;
    // SAFETY: one generator thread, and a program run is not preempted by another.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    let flow = if cfg.flows > 1 { (n % cfg.flows as u64) as u32 } else { 0 };
    // Eight bytes at a time from explicit bytes: an array copy would be a call to a
    // byte-loop memmove, which would make the generator slower than it needs to be.
    let h = &cfg.header;
    let eight = |o: usize| [h[o], h[o + 1], h[o + 2], h[o + 3], h[o + 4], h[o + 5], h[o + 6], h[o + 7]];
    ctx::write(ctx, 0, eight(0))?;
    ctx::write(ctx, 8, eight(8))?;
    ctx::write(ctx, 16, eight(16))?;
    ctx::write(ctx, 24, eight(24))?;
    ctx::write(ctx, 32, eight(32))?;
    ctx::write(ctx, 40, [h[40], h[41]])?;
    let tcp = cfg.kind == GEN_TCP;
    let udp6 = cfg.kind == GEN_UDP6;
    if tcp || udp6 {
        ctx::write(ctx, 42, eight(42))?;
        ctx::write(ctx, 50, eight(50))?;
    }
    if udp6 {
        ctx::write(ctx, 58, [h[58], h[59], h[60], h[61]])?;
    }
    if flow == 0 {
        return Ok(());
    }
    if udp6 {
        // The source port only (flows never exceed the ports here); the checksum is mandatory.
        let base = u16::from_be_bytes([h[UDP6_SPORT], h[UDP6_SPORT + 1]]);
        let sport = base.wrapping_add(flow as u16);
        ctx::write(ctx, UDP6_SPORT, sport.to_be_bytes())?;
        let old = u16::from_be_bytes([h[UDP6_CHECK], h[UDP6_CHECK + 1]]);
        let mut check = csum::update(old, base as u32, sport as u32);
        if check == 0 {
            check = 0xffff;
        }
        return ctx::write(ctx, UDP6_CHECK, check.to_be_bytes());
    }
    // Checked: a plain `%` or `/` would keep a call to the panic path, which the verifier
    // refuses.
    let (port_step, address_step) = match (flow.checked_rem(cfg.ports), flow.checked_div(cfg.ports)) {
        (Some(r), Some(d)) => (r as u16, d as u16),
        _ => (flow as u16, 0),
    };
    let word = |o: usize| u16::from_be_bytes([h[o], h[o + 1]]);
    let base = word(L4_SPORT);
    let sport = base.wrapping_add(port_step);
    ctx::write(ctx, L4_SPORT, sport.to_be_bytes())?;
    let (mut old_sum, mut new_sum) = (base as u32, sport as u32);
    if address_step != 0 {
        // The last byte of the source address; the IPv4 header checksum and the transport
        // checksum's pseudo header both hold it.
        let saddr = word(IP_SADDR_LOW);
        let new_saddr = saddr.wrapping_add(address_step);
        ctx::write(ctx, IP_SADDR_LOW, new_saddr.to_be_bytes())?;
        let ip_check = csum::update(word(IP_CHECK), saddr as u32, new_saddr as u32);
        ctx::write(ctx, IP_CHECK, ip_check.to_be_bytes())?;
        old_sum += saddr as u32;
        new_sum += new_saddr as u32;
    }
    let at = if tcp { TCP_CHECK } else { UDP_CHECK };
    let mut check = csum::update(word(at), old_sum, new_sum);
    if check == 0 && !tcp {
        check = 0xffff;
    }
    ctx::write(ctx, at, check.to_be_bytes())?;
    Ok(())
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    if sink(&ctx) { XDP_DROP } else { XDP_PASS }
}

/// The same sink at TC ingress, for frames that reach the server's veth without passing
/// its XDP: a router's `bpf_redirect_peer` puts them straight into this device's ingress.
/// What XDP counted and dropped never gets here, so nothing is counted twice.
#[classifier]
pub fn bench_sink_tc(ctx: TcContext) -> i32 {
    if sink(&ctx) { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// Counts a frame of the bench's (see [`is_counted`]); true when it was one.
#[inline(always)]
fn sink<P: ctx::Packet>(ctx: &P) -> bool {
    if !is_counted(ctx).unwrap_or(false) {
        return false;
    }
    if let Some(count) = BENCH_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *count += 1 };
    }
    true
}

/// The bench's UDP frames (IPv4 and IPv6), and TCP segments to the new-flows workload's
/// ports.
#[inline(always)]
fn is_counted<P: ctx::Packet>(ctx: &P) -> Result<bool, Reason> {
    let ethertype: [u8; 2] = ctx::read(ctx, 12)?;
    if ethertype == [0x86, 0xdd] {
        let next_header: [u8; 1] = ctx::read(ctx, 14 + 6)?;
        if next_header[0] != 17 {
            return Ok(false);
        }
        let dport = u16::from_be_bytes(ctx::read(ctx, 14 + 40 + 2)?);
        let ports = BENCH_PORTS.get(0).ok_or(Reason::Malformed)?;
        return Ok(dport >= ports[0] && dport <= ports[1]);
    }
    let ver_ihl: [u8; 1] = ctx::read(ctx, 14)?;
    let proto: [u8; 1] = ctx::read(ctx, 14 + 9)?;
    if ethertype != [0x08, 0x00] || ver_ihl[0] != 0x45 {
        return Ok(false);
    }
    let index = match proto[0] {
        17 => 0,
        6 => 1,
        _ => return Ok(false),
    };
    let dport = u16::from_be_bytes(ctx::read(ctx, 14 + 20 + 2)?);
    let ports = BENCH_PORTS.get(index).ok_or(Reason::Malformed)?;
    Ok(dport >= ports[0] && dport <= ports[1])
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
