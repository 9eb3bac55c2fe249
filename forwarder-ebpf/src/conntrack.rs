//! Connection tracking: lookup of known flows, forward-rule match of new ones, and the
//! commit of a new flow (source-port choice and both direction entries).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use forwarder_common::{
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CtKey, CtValue, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, FWD_FLAG_INGRESS,
    FwdKey, FwdValue, PROTO_TCP, Reason, SNAT_OFF,
    conntrack::{CT_ANSWERED, CT_SEEN_SYN, bits_of_tcp_flags},
};

use crate::{
    maps::{CtScratch, FWD_CT, FWD_GLOBAL, FWD_RULES, FWD_SCRATCH},
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
    /// A tracked flow: rewrite as its entry says.
    Tracked { entry: &'static CtValue },
    /// First packet of a flow for this forward (the rule, in the map).
    New { fwd: &'static FwdValue },
}

const EEXIST: i32 = -17;
/// Refresh `last_seen` at most once a second: a write per packet would bounce the entry's
/// cache line between CPUs.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// Source ports tried for a new flow before giving up.
const PORT_ATTEMPTS: u32 = 8;

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

#[inline(always)]
pub fn classify(flow: &Flow) -> Result<Plan, Reason> {
    let key = ct_key(flow.family, flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    if let Some(entry) = FWD_CT.get_ptr_mut(&key) {
        // SAFETY: map value pointer from a successful lookup.
        let entry = unsafe { &mut *entry };
        let now = unsafe { bpf_ktime_get_ns() };
        if now.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            entry.last_seen_ns = now;
        }
        // State bits change a few times per connection: write only then.
        let answered = if entry.direction == CT_DIR_REPLY { CT_ANSWERED } else { 0 };
        let bits = entry.state | answered | bits_of_tcp_flags(flow.tcp_flags);
        if bits != entry.state {
            entry.state = bits;
        }
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

/// Port number (host order) for attempt `i` of a flow with hash `h`, inside [min, max].
#[inline(always)]
fn pick_port(h: u32, i: u32, min: u16, max: u16) -> u16 {
    let span = (max as u32).wrapping_sub(min as u32).wrapping_add(1);
    let span = if span == 0 || max < min { 1 } else { span };
    // Odd stride, coprime with most spans, spreads retries away from a busy neighbour.
    let offset = h.wrapping_add(i.wrapping_mul(7919)) % span;
    (min as u32 + offset) as u16
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
        _pad: [0; 6],
        // SAFETY: helper without arguments.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
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
    *key = ct_key(flow.family, flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    if FWD_CT.insert(&*key, &*value, BPF_ANY as u64).is_err() {
        *key = ct_key(flow.family, new.dst, new.src, new.dport, new.sport, flow.proto);
        let _ = FWD_CT.remove(&*key);
        return Err(Reason::ConntrackFull);
    }
    stats::count_new_conn(fwd.forward_id);
    Ok(())
}
