//! Every map of the kernel side, declared in one place. Layouts: forwarder-common/src/maps.rs
//! and docs/maps.md. Sizes are defaults; the loader resizes some of them from the config.
//! Each static is named exactly as its map: the name it is pinned by, and adopted by.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use forwarder_common::{
    BackendKey, BackendValue, CtKey, CtValue, DEFAULT_CT_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FORWARDS,
    FIB_MEMO_SLOTS, FLOW_CACHE_SLOTS, FRAG_ENTRIES, FibMemoSlot, FlowCacheSlot, FlowCacheSlot6, FragKey, FragValue,
    FwdKey, FwdMeta, FwdStats, FwdValue, GlobalConfig, IfaceConfig, LOCAL_SOCKET_ENTRIES, LocalOrig, LocalUdpKey,
    LocalUdpOrig, MAX_IFACES, MAX_PEERS, MaglevTable, PeerKey, PeerStats, PeerValue, PortRanges, REASON_SLOTS,
    SOURCE_LIST_ENTRIES, SourceKey,
};

#[map(name = "FWD_RULES_V2")]
pub static FWD_RULES_V2: HashMap<FwdKey, FwdValue> = HashMap::with_max_entries(DEFAULT_MAX_FORWARDS, 0);

/// Allocated as userspace writes it: most listen addresses have no range.
#[map(name = "FWD_PORT_RANGES")]
pub static FWD_PORT_RANGES: HashMap<FwdKey, PortRanges> =
    HashMap::with_max_entries(DEFAULT_MAX_FORWARDS, BPF_F_NO_PREALLOC);

#[map(name = "FWD_BACKENDS")]
pub static FWD_BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Tables are allocated as userspace writes them: most forwards have none (one backend).
#[map(name = "FWD_MAGLEV")]
pub static FWD_MAGLEV: HashMap<u32, MaglevTable> = HashMap::with_max_entries(DEFAULT_MAX_FORWARDS, BPF_F_NO_PREALLOC);

#[map(name = "FWD_BE_STATS")]
pub static FWD_BE_STATS: PerCpuArray<FwdStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS + 1, 0);

#[map(name = "FWD_ALLOW")]
pub static FWD_ALLOW: LpmTrie<SourceKey, u8> = LpmTrie::with_max_entries(SOURCE_LIST_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "FWD_DENY")]
pub static FWD_DENY: LpmTrie<SourceKey, u8> = LpmTrie::with_max_entries(SOURCE_LIST_ENTRIES, BPF_F_NO_PREALLOC);

/// A plain (not LRU) hash: when full, new flows are refused and counted, and established
/// ones are never evicted; userspace expires idle connections.
#[map(name = "FWD_CT_V4")]
pub static FWD_CT_V4: HashMap<CtKey, CtValue> = HashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// Route generation (index 0), bumped by userspace on every route, neighbour, link, address
/// or config change; cached next hops of another generation are not used.
#[map(name = "FWD_ROUTE_GEN")]
pub static FWD_ROUTE_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Routing facts from userspace (index 0, `ROUTE_*` bits; see forwarder_common).
#[map(name = "FWD_ROUTE_FLAGS")]
pub static FWD_ROUTE_FLAGS: Array<u32> = Array::with_max_entries(1, 0);

/// This CPU's FIB memo (forwarder_common::FibMemoSlot; kernel-internal, see route).
#[map(name = "FWD_FIB_MEMO")]
pub static FWD_FIB_MEMO: PerCpuArray<FibMemoSlot> = PerCpuArray::with_max_entries(FIB_MEMO_SLOTS, 0);

/// This CPU's flow cache (forwarder_common::FlowCacheSlot; kernel-internal, see fastpath).
#[map(name = "FWD_FLOW_CACHE")]
pub static FWD_FLOW_CACHE: PerCpuArray<FlowCacheSlot> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// This CPU's flow cache of the TC fast path (see fastpath): XDP's own slots serve only
/// next hops XDP can send to.
#[map(name = "FWD_FLOW_CACHE_TC")]
pub static FWD_FLOW_CACHE_TC: PerCpuArray<FlowCacheSlot> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The IPv6 flow caches of XDP and TC (forwarder_common::FlowCacheSlot6; see fastpath6).
#[map(name = "FWD_FLOW_CACHE6")]
pub static FWD_FLOW_CACHE6: PerCpuArray<FlowCacheSlot6> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

#[map(name = "FWD_FLOW_CACHE6_TC")]
pub static FWD_FLOW_CACHE6_TC: PerCpuArray<FlowCacheSlot6> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

#[map(name = "FWD_FWD_STATS")]
pub static FWD_FWD_STATS: PerCpuArray<FwdStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_FORWARDS + 1, 0);

/// New connections refused by a forward's source lists, per forward id.
#[map(name = "FWD_FWD_DENIED")]
pub static FWD_FWD_DENIED: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_FORWARDS + 1, 0);

#[map(name = "FWD_REASONS")]
pub static FWD_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_SLOTS, 0);

#[map(name = "FWD_IFACES")]
pub static FWD_IFACES: HashMap<u32, IfaceConfig> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map(name = "FWD_TX_PORTS")]
pub static FWD_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

#[map(name = "FWD_GLOBAL_V2")]
pub static FWD_GLOBAL_V2: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map(name = "FWD_META_V2")]
pub static FWD_META_V2: Array<FwdMeta> = Array::with_max_entries(DEFAULT_MAX_FORWARDS + 1, 0);

/// Per-CPU scratch for building conntrack entries off the 512-byte stack (kernel-internal).
#[repr(C)]
pub struct CtScratch {
    pub key: CtKey,
    pub value: CtValue,
    /// A second key: the other entry of a connection being dropped or adopted.
    pub other: CtKey,
}

#[map(name = "FWD_SCRATCH")]
pub static FWD_SCRATCH: PerCpuArray<CtScratch> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "FWD_LOCAL_CONN")]
pub static FWD_LOCAL_CONN: LruHashMap<u64, LocalOrig> = LruHashMap::with_max_entries(LOCAL_SOCKET_ENTRIES, 0);

#[map(name = "FWD_LOC_UDP_V2")]
pub static FWD_LOC_UDP_V2: LruHashMap<LocalUdpKey, LocalUdpOrig> =
    LruHashMap::with_max_entries(LOCAL_SOCKET_ENTRIES, 0);

/// The ports of fragmented datagrams, recorded by their first fragments for the later
/// ones (see frag.rs). LRU: a record outlives its datagram's last fragment until it is the
/// least recently used.
#[map(name = "FWD_FRAG_V1")]
pub static FWD_FRAG_V1: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(FRAG_ENTRIES, 0);

#[map(name = "FWD_PEERS")]
pub static FWD_PEERS: HashMap<PeerKey, PeerValue> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "FWD_PEER_STATS")]
pub static FWD_PEER_STATS: PerCpuArray<PeerStats> = PerCpuArray::with_max_entries(MAX_PEERS + 1, 0);

/// Per-CPU token bucket of the ICMP errors the programs send (icmp_reply.rs,
/// kernel-internal).
#[repr(C)]
pub struct IcmpRate {
    /// Credit in nanoseconds, at most a burst's worth of intervals.
    pub credit_ns: u64,
    pub last_ns: u64,
    /// Answers held back by the limit on this CPU (their packets dropped unanswered).
    pub suppressed: u64,
}

#[map(name = "FWD_ICMP_RATE")]
pub static FWD_ICMP_RATE: PerCpuArray<IcmpRate> = PerCpuArray::with_max_entries(1, 0);
