//! Helper programs for `cargo xtask bench`, built as a separate object so forwarder's own
//! object stays as it is (this file is picked up by cargo's bin auto-discovery and embedded
//! by forwarder-user's build.rs next to the `forwarder` object):
//!
//! - `bench_redirect_only`: the ceiling. The least an XDP forwarder can do on this path:
//!   set the next hop's Ethernet addresses (so the receiver's stack takes the frame) and
//!   `bpf_redirect_map` it to the one egress in a devmap. No parsing, no state, no rewrite.
//! - `bench_lookup_redirect_40` and `_16`: the ceiling plus one hash lookup, with a 40-byte
//!   key (forwarder's connection key) and a 16-byte one: the least a forwarder that keeps
//!   per-connection state does per packet, to set the established path's time against.
//! - `bench_trafficgen`: the packet generator, run with BPF_PROG_TEST_RUN live frames (as
//!   xdp-trafficgen does): writes a UDP frame from a template, varies the source port over
//!   N flows and sends it with XDP_TX. The template is written every time because live-frame
//!   pages are recycled without being reset, and the router may have rewritten them.
//! - `bench_sink`: the receiver. Counts and drops the bench's UDP frames, passes the rest
//!   (TCP of the other figures). Having an XDP program also lets the veth take
//!   XDP_REDIRECTed frames.
#![no_std]
#![no_main]

#[path = "../ctx.rs"]
#[allow(dead_code)]
mod ctx;

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, DevMap, HashMap, PerCpuArray},
    programs::XdpContext,
};
use forwarder_common::{Reason, csum};

/// Next-hop Ethernet header for the redirect-only program: destination then source MAC.
#[map(name = "BENCH_L2")]
static BENCH_L2: Array<[u8; 12]> = Array::with_max_entries(1, 0);

/// The redirect-only program's egress (index 0).
#[map(name = "BENCH_TX")]
static BENCH_TX: DevMap = DevMap::with_max_entries(1, 0);

/// Generator template: a complete Ethernet + IPv4 + UDP header with full checksums.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    pub header: [u8; HEADER_LEN],
    pub _pad: [u8; 2],
    /// Number of flows: the source port runs from the template's port upwards.
    pub flows: u32,
}

const HEADER_LEN: usize = 14 + 20 + 8;
const UDP_SPORT: usize = 14 + 20;
const UDP_CHECK: usize = 14 + 20 + 6;
const _: () = assert!(core::mem::size_of::<GenConfig>() == 48);

#[map(name = "BENCH_GEN")]
static BENCH_GEN: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Frames generated so far on each CPU (the flow of the next frame).
#[map(name = "BENCH_GEN_SEQ")]
static BENCH_GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Sink: the UDP destination ports counted, [low, high].
#[map(name = "BENCH_PORTS")]
static BENCH_PORTS: Array<[u16; 2]> = Array::with_max_entries(1, 0);

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
    // Byte by byte: an array copy would be a call to a byte-loop memmove.
    let m = l2;
    if ctx::write(ctx, 0, [m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11]]).is_err() {
        return XDP_PASS;
    }
    BENCH_TX.redirect(0, 0).unwrap_or(XDP_ABORTED)
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
    // SAFETY: per-CPU slot, no concurrent writer.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    let flow = if cfg.flows > 1 { (n % cfg.flows as u64) as u16 } else { 0 };
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
    if flow != 0 {
        let base = u16::from_be_bytes([cfg.header[UDP_SPORT], cfg.header[UDP_SPORT + 1]]);
        let sport = base.wrapping_add(flow);
        let check = u16::from_be_bytes([cfg.header[UDP_CHECK], cfg.header[UDP_CHECK + 1]]);
        let mut check = csum::update(check, base as u32, sport as u32);
        if check == 0 {
            check = 0xffff;
        }
        ctx::write(ctx, UDP_SPORT, sport.to_be_bytes())?;
        ctx::write(ctx, UDP_CHECK, check.to_be_bytes())?;
    }
    Ok(())
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    if is_bench_udp(&ctx).unwrap_or(false) {
        if let Some(count) = BENCH_SINK.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer.
            unsafe { *count += 1 };
        }
        return XDP_DROP;
    }
    XDP_PASS
}

#[inline(always)]
fn is_bench_udp(ctx: &XdpContext) -> Result<bool, Reason> {
    let ethertype: [u8; 2] = ctx::read(ctx, 12)?;
    let ver_ihl: [u8; 1] = ctx::read(ctx, 14)?;
    let proto: [u8; 1] = ctx::read(ctx, 14 + 9)?;
    if ethertype != [0x08, 0x00] || ver_ihl[0] != 0x45 || proto[0] != 17 {
        return Ok(false);
    }
    let dport = u16::from_be_bytes(ctx::read(ctx, 14 + 20 + 2)?);
    let ports = BENCH_PORTS.get(0).ok_or(Reason::Malformed)?;
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
