//! Fragments of forwarded datagrams (IPv4 MF/offset, IPv6 fragment header), in the TC
//! program (XDP hands them over, see xdp.rs). The first fragment carries the L4 header: it
//! is classified, committed and rewritten like any packet (its L4 checksum covers the whole
//! datagram, and the incremental update for the pseudo header and ports applies all the
//! same), and records its ports in `FWD_FRAG_V1` under the datagram's original addresses,
//! protocol and identification. A later fragment has no L4 header: it finds its ports
//! there, its connection by them, and gets its L3 header rewritten only.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use forwarder_common::{FRAG_MAX_AGE_NS, FragKey, FragValue, Reason};

use crate::{
    maps::FWD_FRAG_V1,
    parse::{FRAG_LATER, FRAG_NONE, Flow},
};

/// The key of the datagram `flow` is a fragment of, in `key` (per-CPU working memory).
#[inline(always)]
fn key_of(flow: &Flow, key: &mut FragKey) {
    key.src_addr = flow.src;
    key.dst_addr = flow.dst;
    key.id = flow.frag_id;
    key.proto = flow.proto;
    key.family = flow.family;
    key._pad = [0; 2];
}

/// Records a first fragment's ports for its later fragments. Called after the fragment
/// was committed and before it is rewritten (the record is under the original tuple).
/// A record of an earlier datagram with the same identification is replaced.
#[inline(always)]
pub fn record(flow: &Flow, key: &mut FragKey) -> Result<(), Reason> {
    key_of(flow, key);
    let value = FragValue {
        src_port_be: u16::from_ne_bytes(flow.sport),
        dst_port_be: u16::from_ne_bytes(flow.dport),
        _pad: 0,
        // SAFETY: helper without arguments.
        first_ns: unsafe { bpf_ktime_get_ns() },
    };
    FWD_FRAG_V1.insert(key, &value, BPF_ANY as u64).map_err(|_| Reason::FragmentMapFull)
}

/// Fills a later fragment's ports in from its first fragment's record; `FragmentUnknown`
/// without a record younger than `FRAG_MAX_AGE_NS` (the first fragment has not come, or
/// is no forward's): such a fragment is passed untouched, never rewritten by a guess.
#[inline(always)]
pub fn ports_of_later(flow: &mut Flow, key: &mut FragKey) -> Result<(), Reason> {
    key_of(flow, key);
    // SAFETY: the value is copied out at once.
    let Some(v) = (unsafe { FWD_FRAG_V1.get(key) }) else { return Err(Reason::FragmentUnknown) };
    let (sport, dport, first_ns) = (v.src_port_be, v.dst_port_be, v.first_ns);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(first_ns) >= FRAG_MAX_AGE_NS {
        return Err(Reason::FragmentUnknown);
    }
    flow.sport = sport.to_ne_bytes();
    flow.dport = dport.to_ne_bytes();
    Ok(())
}

/// The reason a fragment that classify did not take is counted under: a later fragment is
/// `FragmentUnknown` (its record named no live connection), a first fragment of no
/// forward `Fragment`, as before fragments were translated.
#[inline(always)]
pub fn not_ours(flow: &Flow, reason: Reason) -> Reason {
    match flow.frag {
        FRAG_NONE => reason,
        FRAG_LATER => Reason::FragmentUnknown,
        _ if reason == Reason::NoRule => Reason::Fragment,
        _ => reason,
    }
}
