//! Per-CPU working memory of one program run: the parsed flow, the tuples, the FIB
//! parameters and what the out-of-line parts of a program hand each other. The 512-byte
//! stack cannot hold them all. Each entry point takes this CPU's slot once and passes it
//! down; no module fetches it itself.

use aya_ebpf::{bindings::bpf_fib_lookup, macros::map, maps::PerCpuArray};
use forwarder_common::FragKey;

use crate::{
    conntrack::{NextHopToCache, Tuple},
    fastpath6::Headers6,
    host::Pending,
    icmp::IcmpWork,
    icmp_reply::IcmpAnswer,
    parse::Flow,
    route::Fib,
    sources::SourceLookup,
};

/// The working memory itself (kernel-internal, not pinned).
#[repr(C, align(8))]
pub struct Work {
    /// First, so it is 8-aligned: route::lookup clears it with 64-bit stores.
    pub params: bpf_fib_lookup,
    pub flow: Flow,
    pub to: Tuple,
    pub new: Tuple,
    pub fib: Fib,
    pub icmp: IcmpWork,
    /// The key of a fragment's datagram (frag.rs).
    pub frag_key: FragKey,
    /// A packet for a backend on this host, between its commit and its delivery.
    pub host: Pending,
    /// The ICMP error a packet is answered with (icmp_reply.rs), with a copy of its quote.
    pub answer: IcmpAnswer,
    /// The key of a new connection's source-list lookup (sources.rs).
    pub source: SourceLookup,
    /// An IPv6 packet's headers as the fast path read them (fastpath6.rs).
    pub headers6: Headers6,
    /// The next hop a new flow's original entry goes in with (conntrack::commit).
    pub hop: NextHopToCache,
}

/// Declared here rather than in maps.rs with the others: its value gathers types of the
/// packet path's modules, which themselves use maps.rs.
#[map(name = "FWD_WORK")]
pub static FWD_WORK: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's working memory, for an entry point to pass down. XDP and TC of one packet
/// run one after the other on a CPU, so one slot serves both. Never `None` (a per-CPU
/// array's one slot); the verifier wants the check.
#[inline(always)]
pub fn this_cpu() -> Option<&'static mut Work> {
    let slot = FWD_WORK.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used by one program run at a time.
    Some(unsafe { &mut *slot })
}
