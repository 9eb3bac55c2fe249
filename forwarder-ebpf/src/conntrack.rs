//! Connection tracking: lookup of known flows, forward-rule match of new ones, and the
//! commit of a new flow (source-port choice and both direction entries).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
};
use forwarder_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKey, CtValue, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, FAMILY_V4,
    FWD_FLAG_INGRESS, FwdKey, FwdValue, PROTO_TCP, Reason, SNAT_OFF,
    conntrack::{CT_ANSWERED, CT_SEEN_SYN, bits_of_tcp_flags, pick_port},
    csum::{TTL_DECREMENT_DELTA, add_deltas, delta},
    next_hop_current,
};

use crate::{
    csum::sum_addr,
    maps::{CtScratch, FWD_CT, FWD_GLOBAL, FWD_ROUTE_GEN, FWD_RULES, FWD_SCRATCH},
    parse::Flow,
    stats,
};

/// An address + port tuple of one direction (network order; IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// What to do with a matching packet.
pub enum Plan {
    /// A tracked flow: rewrite as its entry says (a map value: the fast path's cache is
    /// written through it).
    Tracked { entry: &'static mut CtValue },
    /// First packet of a flow for this forward (the rule, in the map).
    New { fwd: &'static FwdValue },
}

const EEXIST: i32 = -17;
/// Refresh `last_seen` at most once a second: a write per packet would bounce the entry's
/// cache line between CPUs.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// Source ports tried for a new flow before giving up: all distinct (see `pick_port`), so
/// with a fraction f of the range in use a new flow is refused with probability f^32
/// (0.1% at 80% full; 8 attempts failed 17% of flows there). Attempts past the first cost
/// only while ports collide.
const PORT_ATTEMPTS: u32 = 32;

#[inline(always)]
pub fn ct_key(family: u8, src: [u8; 16], dst: [u8; 16], sport: [u8; 2], dport: [u8; 2], proto: u8) -> CtKey {
    CtKey {
        src_addr: src,
        dst_addr: dst,
        src_port_be: u16::from_ne_bytes(sport),
        dst_port_be: u16::from_ne_bytes(dport),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The key of an IPv4 flow, built from whole 64-bit words: field by field, the compiler
/// clears the twelve unused address bytes with calls to a byte-loop memset subprogram.
/// Addresses and ports as they sit in the packet (network order, read as native words).
#[inline(always)]
pub fn ct_key_v4(src: u32, dst: u32, ports: u32, proto: u8) -> CtKey {
    let words: [u64; 5] =
        [src as u64, 0, dst as u64, 0, ports as u64 | (proto as u64) << 32 | (FAMILY_V4 as u64) << 40];
    // SAFETY: CtKey is repr(C), 40 bytes without implicit padding, any bytes valid; BPF is
    // little-endian (bpfel), so the words lay the fields out in order: src, zeros, dst,
    // zeros, source port, destination port, protocol, family, padding.
    unsafe { core::mem::transmute::<[u64; 5], CtKey>(words) }
}

/// The forward key of an IPv4 destination, from whole words (see [`ct_key_v4`]).
#[inline(always)]
pub fn fwd_key_v4(dst: u32, dport: [u8; 2], proto: u8) -> FwdKey {
    let tail = u16::from_ne_bytes(dport) as u32 | (proto as u32) << 16 | (FAMILY_V4 as u32) << 24;
    // SAFETY: FwdKey is repr(C), 20 bytes without implicit padding, any bytes valid; the
    // little-endian words lay out address, zeros, port, protocol, family.
    unsafe { core::mem::transmute::<[u32; 5], FwdKey>([dst, 0, 0, 0, tail]) }
}

/// The key of a parsed flow's own direction.
#[inline(always)]
pub fn flow_key(flow: &Flow) -> CtKey {
    if flow.is_v6() {
        return ct_key(flow.family, flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    }
    let word = |a: &[u8; 16]| u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    let ports = u32::from_ne_bytes([flow.sport[0], flow.sport[1], flow.dport[0], flow.dport[1]]);
    ct_key_v4(word(&flow.src), word(&flow.dst), ports, flow.proto)
}

/// Tracked flow, new flow of a forward, or no match. `untracked`: the caller has already
/// looked the flow up in the connection table and found nothing.
#[inline(always)]
pub fn classify(flow: &Flow, untracked: bool) -> Result<Plan, Reason> {
    let key = flow_key(flow);
    if let Some(entry) = if untracked { None } else { FWD_CT.get_ptr_mut(&key) } {
        // SAFETY: map value pointer from a successful lookup.
        let entry = unsafe { &mut *entry };
        let now = unsafe { bpf_ktime_get_ns() };
        if now.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            entry.last_seen_ns = now;
        }
        note_state(entry, flow.tcp_flags);
        return Ok(Plan::Tracked { entry });
    }
    let fkey =
        FwdKey { addr: flow.dst, port_be: u16::from_ne_bytes(flow.dport), proto: flow.proto, family: flow.family };
    // SAFETY: the value is copied out at once.
    match unsafe { FWD_RULES.get(&fkey) } {
        Some(fwd) if fwd.flags & FWD_FLAG_INGRESS != 0 => Ok(Plan::New { fwd }),
        _ => Err(Reason::NoRule),
    }
}

/// Records what a packet of this direction says about the connection (TCP flags; any
/// packet of the reply direction means answered). State bits change a few times per
/// connection: the entry is written only then.
#[inline(always)]
pub fn note_state(entry: &mut CtValue, tcp_flags: u8) {
    let answered = if entry.direction == CT_DIR_REPLY { CT_ANSWERED } else { 0 };
    let bits = entry.state | answered | bits_of_tcp_flags(tcp_flags);
    if bits != entry.state {
        entry.state = bits;
    }
}

#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    // Every address word counts: IPv6 flows that differ only in their upper bits must not
    // all compete for the same few source ports.
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
    let fold =
        |a: &[u8; 16]| word(a, 0) ^ word(a, 1).rotate_left(7) ^ word(a, 2).rotate_left(14) ^ word(a, 3).rotate_left(21);
    let (a, b) = (fold(&flow.src), fold(&flow.dst));
    let c = (u16::from_ne_bytes(flow.sport) as u32) << 16 | u16::from_ne_bytes(flow.dport) as u32;
    // MurmurHash3's finaliser: every input bit reaches every output bit, so consecutive
    // client ports spread over the whole SNAT range instead of clustering.
    let mut h = a ^ b.rotate_left(13) ^ c.wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Records a new flow in both directions and returns the tuple its packets are rewritten
/// to. `snat_src` is the source address for SNAT (ignored when the forward has SNAT off).
/// Keys and values are built in a per-CPU scratch slot: the stack (512 bytes) is too small
/// for them next to the FIB parameters.
#[inline(always)]
pub fn commit_new(flow: &Flow, fwd: &FwdValue, snat_src: &[u8; 16], new: &mut Tuple) -> Result<(), Reason> {
    let scratch = FWD_SCRATCH.get_ptr_mut(0).ok_or(Reason::ConntrackFull)?;
    // SAFETY: per-CPU slot, used by this program run only.
    let CtScratch { key, value } = unsafe { &mut *scratch };
    let backend = fwd.backend_addr;
    let bport = fwd.backend_port_be.to_ne_bytes();
    *value = CtValue {
        new_src_addr: flow.dst,
        new_dst_addr: flow.src,
        new_src_port_be: u16::from_ne_bytes(flow.dport),
        new_dst_port_be: u16::from_ne_bytes(flow.sport),
        forward_id: fwd.forward_id,
        direction: CT_DIR_REPLY,
        state: if flow.proto == PROTO_TCP { CT_SEEN_SYN } else { 0 },
        nh_l3_delta: 0,
        nh_ifindex: 0,
        // SAFETY: helper without arguments.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
        nh_dmac: [0; 6],
        nh_smac: [0; 6],
        nh_l4_delta: 0,
        nh_len_ok: 0,
        nh_gen: 0,
        nh_jiffies: 0,
    };

    if fwd.snat_mode == SNAT_OFF {
        *key = ct_key(flow.family, backend, flow.src, bport, flow.sport, flow.proto);
        FWD_CT.insert(&*key, &*value, BPF_ANY as u64).map_err(|_| Reason::ConntrackFull)?;
        new.src = flow.src;
        new.dst = backend;
        new.sport = flow.sport;
        new.dport = bport;
    } else {
        let (min, max) = match FWD_GLOBAL.get(0) {
            Some(g) if g.snat_port_min != 0 => (g.snat_port_min, g.snat_port_max),
            _ => (DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX),
        };
        let h = flow_hash(flow);
        *key = ct_key(flow.family, backend, *snat_src, bport, [0; 2], flow.proto);
        let mut chosen: Option<[u8; 2]> = None;
        let mut i = 0;
        while i < PORT_ATTEMPTS {
            let port = pick_port(h, i, min, max).to_be_bytes();
            key.dst_port_be = u16::from_ne_bytes(port);
            match FWD_CT.insert(&*key, &*value, BPF_NOEXIST as u64) {
                Ok(()) => {
                    chosen = Some(port);
                    break;
                }
                Err(EEXIST) => {}
                Err(_) => return Err(Reason::ConntrackFull),
            }
            i += 1;
        }
        let Some(port) = chosen else {
            return Err(Reason::PortsExhausted);
        };
        new.src = *snat_src;
        new.dst = backend;
        new.sport = port;
        new.dport = bport;
    }

    value.direction = CT_DIR_ORIGINAL;
    value.new_src_addr = new.src;
    value.new_dst_addr = new.dst;
    value.new_src_port_be = u16::from_ne_bytes(new.sport);
    value.new_dst_port_be = u16::from_ne_bytes(new.dport);
    *key = flow_key(flow);
    if FWD_CT.insert(&*key, &*value, BPF_ANY as u64).is_err() {
        *key = ct_key(flow.family, new.dst, new.src, new.dport, new.sport, flow.proto);
        let _ = FWD_CT.remove(&*key);
        return Err(Reason::ConntrackFull);
    }
    stats::count_new_conn(fwd.forward_id);
    Ok(())
}

/// The connection-table entry of a flow the full path has just handled: the tracked entry,
/// or the one `commit_new` has just written.
#[inline(always)]
pub fn entry_of(plan: Plan, flow: &Flow) -> Option<&'static mut CtValue> {
    match plan {
        Plan::Tracked { entry } => Some(entry),
        Plan::New { .. } => {
            let key = flow_key(flow);
            // SAFETY: map value pointer from a successful lookup.
            FWD_CT.get_ptr_mut(&key).map(|e| unsafe { &mut *e })
        }
    }
}

/// Keeps the next hop the full path has just found (and the checksum deltas of the
/// rewrite) in the entry, so the next packets of this direction skip the FIB lookup
/// (see fastpath). IPv4 through XDP only. `ifindex` is written last, so the fast path,
/// which runs only when it is non-zero, never sees a next hop half written.
#[inline(always)]
pub fn cache_next_hop(entry: &mut CtValue, flow: &Flow, new: &Tuple, ifindex: u32, dmac: [u8; 6], smac: [u8; 6]) {
    let generation = route_generation();
    // SAFETY: helper without arguments (inlined by the verifier).
    let now = unsafe { bpf_jiffies64() } as u32;
    // The FIB has just passed this packet's length; a still-current entry for the same
    // egress keeps the larger length it passed before.
    let current = entry.nh_ifindex == ifindex && next_hop_current(entry.nh_gen, entry.nh_jiffies, generation, now);
    let len_ok = if current && entry.nh_len_ok > flow.l3_len { entry.nh_len_ok } else { flow.l3_len };
    let old_addrs = sum_addr(&flow.src, false) + sum_addr(&flow.dst, false);
    let new_addrs = sum_addr(&new.src, false) + sum_addr(&new.dst, false);
    let ports = |p: [u8; 2], q: [u8; 2]| u16::from_be_bytes(p) as u32 + u16::from_be_bytes(q) as u32;
    // SAFETY: a map value; volatile so the stores keep their order (see above).
    unsafe {
        core::ptr::write_volatile(&mut entry.nh_ifindex, 0);
    }
    entry.nh_l3_delta = add_deltas(delta(old_addrs, new_addrs), TTL_DECREMENT_DELTA);
    entry.nh_l4_delta = delta(old_addrs + ports(flow.sport, flow.dport), new_addrs + ports(new.sport, new.dport));
    entry.nh_dmac = dmac;
    entry.nh_smac = smac;
    entry.nh_len_ok = len_ok;
    entry.nh_gen = generation;
    entry.nh_jiffies = now;
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&mut entry.nh_ifindex, ifindex);
    }
}

/// The current route generation (0 until userspace sets one).
#[inline(always)]
pub fn route_generation() -> u32 {
    FWD_ROUTE_GEN.get(0).copied().unwrap_or(0)
}
