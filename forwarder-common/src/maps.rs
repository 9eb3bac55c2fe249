//! Map names, keys and values. docs/maps.md is the operator-facing copy of this contract.
//! A layout change of a pinned map must come with a new map name.

use core::mem::size_of;

/// Forward rules: [`FwdKey`] -> [`FwdValue`] (hash). `_V2`: the value grew the backend
/// set (a Maglev table), a port range and source lists; the daemon writes every rule from
/// its config, and the loader carries the forwards of an older [`FWD_META`] over.
pub const FWD_RULES_V2: &str = "FWD_RULES_V2";
/// The rules of versions with one backend per forward: [`FwdKey`] -> [`FwdValueV1`]. Only
/// removed.
pub const FWD_RULES: &str = "FWD_RULES";
/// A forward's backends: [`BackendKey`] (forward id, slot) -> [`BackendValue`] (hash of
/// `limits.max_backends`). A backend keeps its slot while it stays in the forward, so
/// edits move only the connections they must.
pub const FWD_BACKENDS: &str = "FWD_BACKENDS";
/// Maglev lookup tables: table id -> [`MaglevTable`] (hash, allocated as used). A table
/// depends only on the slots and weights of a forward's backends that take new
/// connections, so forwards of one shape share one.
pub const FWD_MAGLEV: &str = "FWD_MAGLEV";
/// Per-backend counters: backend index -> [`FwdStats`] (per-CPU array of
/// `limits.max_backends + 1`; index 0 is "none").
pub const FWD_BE_STATS: &str = "FWD_BE_STATS";
/// Source lists of forwards: [`SourceKey`] -> u8 (LPM tries). A new connection of a forward
/// with [`FWD_FLAG_ALLOW`] must match its allow list; one with [`FWD_FLAG_DENY`] must not
/// match its deny list.
pub const FWD_ALLOW: &str = "FWD_ALLOW";
pub const FWD_DENY: &str = "FWD_DENY";
/// Listen port ranges: [`FwdKey`] with port 0 (the listen address, protocol and family) ->
/// [`PortRanges`] (hash of `limits.max_forwards`, allocated as used). Looked up only when
/// the exact port misses in [`FWD_RULES_V2`] and [`GLOBAL_HAS_PORT_RANGES`] is set; the
/// range holding the port names its forward's rule by the range's first port.
pub const FWD_PORT_RANGES: &str = "FWD_PORT_RANGES";
/// Port ranges one listen address may have per protocol (a [`PortRanges`] holds them).
pub const MAX_PORT_RANGES: usize = 16;
/// Default size of [`FWD_BACKENDS`] and [`FWD_BE_STATS`].
pub const DEFAULT_MAX_BACKENDS: u32 = 16_384;
/// Backends one forward may have (a [`MaglevTable`] slot names one in a byte).
pub const MAX_BACKENDS_PER_FORWARD: u32 = 256;
/// Entries of each source-list trie.
pub const SOURCE_LIST_ENTRIES: u32 = 65_536;
/// Connection tracking, both directions of every flow: [`CtKey`] -> [`CtValue`] (hash).
/// `_V4`: the value grew the connection's creation time (`conntrack list` shows its age);
/// `_V3` had grown netfilter's TCP states, flags and sequence tracking (docs/maps.md). The
/// loader migrates entries of a pinned [`FWD_CT_V3`], [`FWD_CT_V2`] or
/// [`FWD_CT`] left by an earlier version.
pub const FWD_CT_V4: &str = "FWD_CT_V4";
/// The connection table with TCP states but no creation time: [`CtKey`] -> [`CtValueV3`].
pub const FWD_CT_V3: &str = "FWD_CT_V3";
/// The connection table with a next-hop cache and state bits: [`CtKey`] -> [`CtValueV2`].
pub const FWD_CT_V2: &str = "FWD_CT_V2";
/// The connection table of versions before the next-hop cache: [`CtKey`] -> [`CtValueV1`].
pub const FWD_CT: &str = "FWD_CT";
/// Route generation: index 0 -> u32 (array of one). Userspace bumps it whenever routes,
/// neighbours, links, addresses or the config change; a connection's cached next hop is
/// used only while the generation it was looked up under is current.
pub const FWD_ROUTE_GEN: &str = "FWD_ROUTE_GEN";
/// Routing facts userspace keeps for the programs: index 0 -> u32 of `ROUTE_*` bits (array
/// of one). The rtnetlink watch of the daemon writes it as the rules and the multipath hash
/// policies change, and clears it as it stops; 0 (nothing known) keeps every use of it off.
pub const FWD_ROUTE_FLAGS: &str = "FWD_ROUTE_FLAGS";
/// [`FWD_ROUTE_FLAGS`] bit: the FIB's answer does not depend on a packet's L4 ports here (no
/// policy rule matches ports, and neither family's multipath hash takes them), so one answer
/// serves every flow between the same two addresses ([`FWD_FIB_MEMO`]).
pub const ROUTE_PORTS_IGNORED: u32 = 1;
/// The FIB memo: slot -> [`FibMemoSlot`] (per-CPU array of [`FIB_MEMO_SLOTS`],
/// kernel-internal, not pinned). The last FIB answer with a neighbour for a (source,
/// destination, ingress) of the full path, so a client's next new connection to the same
/// backend skips the lookup; used only under [`ROUTE_PORTS_IGNORED`] and, like a
/// connection's cached next hop, only in the route generation and [`NH_MAX_AGE_JIFFIES`]
/// it was looked up in.
pub const FWD_FIB_MEMO: &str = "FWD_FIB_MEMO";
/// Slots of [`FWD_FIB_MEMO`] per CPU (direct-mapped, see [`fib_memo_slot`]).
pub const FIB_MEMO_SLOTS: u32 = 256;
const _: () = assert!(FIB_MEMO_SLOTS.is_power_of_two());
/// A cached next hop is looked up again after this many jiffies even without a route
/// change (1 s at HZ=250; 2.5 s at most, at HZ=100). It also bounds how stale
/// `CtValue::last_seen_ns` gets, since the fast path does not refresh it.
pub const NH_MAX_AGE_JIFFIES: u32 = 250;
/// The XDP flow cache: slot -> [`FlowCacheSlot`] (per-CPU array of [`FLOW_CACHE_SLOTS`],
/// kernel-internal, not pinned). A copy of an established IPv4 connection's rewrite and
/// next hop, found by indexing instead of hashing; see [`flow_cache_bucket`].
pub const FWD_FLOW_CACHE: &str = "FWD_FLOW_CACHE";
/// The TC flow cache: as [`FWD_FLOW_CACHE`], for the TC program's fast path (its own, so a
/// slot copied from a next hop only TC can send to never serves XDP).
pub const FWD_FLOW_CACHE_TC: &str = "FWD_FLOW_CACHE_TC";
/// The IPv6 flow caches: as [`FWD_FLOW_CACHE`] and [`FWD_FLOW_CACHE_TC`], of
/// [`FlowCacheSlot6`] (the same number of slots, 112 bytes each: 448 KiB per CPU each).
pub const FWD_FLOW_CACHE6: &str = "FWD_FLOW_CACHE6";
pub const FWD_FLOW_CACHE6_TC: &str = "FWD_FLOW_CACHE6_TC";
/// log2 of [`FLOW_CACHE_SLOTS`].
pub const FLOW_CACHE_BITS: u32 = 12;
/// Slots of the flow cache per CPU (64 bytes each: 256 KiB per CPU).
pub const FLOW_CACHE_SLOTS: u32 = 1 << FLOW_CACHE_BITS;
/// Slots of one bucket ([`flow_cache_bucket`]): a tuple may be cached in any of them.
pub const FLOW_CACHE_WAYS: u32 = 4;
/// Per-forward counters: forward id -> [`FwdStats`] (per-CPU array).
pub const FWD_FWD_STATS: &str = "FWD_FWD_STATS";
/// Per-reason packet counters: [`crate::Reason`] code -> u64 (per-CPU array).
pub const FWD_REASONS: &str = "FWD_REASONS";
/// Per-interface settings for the programs: ifindex -> [`IfaceConfig`] (hash).
pub const FWD_IFACES: &str = "FWD_IFACES";
/// Egress devices XDP may redirect into: ifindex -> ifindex (devmap hash).
pub const FWD_TX_PORTS: &str = "FWD_TX_PORTS";
/// Global settings: index 0 -> [`GlobalConfig`] (array of one). `_V2`: the SNAT range
/// grew a hole; userspace writes the whole value at every start, so the older
/// [`FWD_GLOBAL`] pin is only removed.
pub const FWD_GLOBAL_V2: &str = "FWD_GLOBAL_V2";
pub const FWD_GLOBAL: &str = "FWD_GLOBAL";
/// Connected local sockets whose destination was rewritten: socket cookie -> [`LocalOrig`].
pub const FWD_LOCAL_CONN: &str = "FWD_LOCAL_CONN";
/// Unconnected local UDP sockets: [`LocalUdpKey`] -> [`LocalUdpOrig`]. `_V2`: the value
/// grew the time of the exchange's last datagram (`FWD_LOCAL_UDP_V2` would exceed the 15
/// characters of a map name); the loader carries the entries of a pinned
/// [`FWD_LOCAL_UDP`] over.
pub const FWD_LOC_UDP_V2: &str = "FWD_LOC_UDP_V2";
/// The unconnected-socket map of earlier versions: [`LocalUdpKey`] -> [`LocalOrig`].
pub const FWD_LOCAL_UDP: &str = "FWD_LOCAL_UDP";
/// How long an unconnected socket's exchange with a backend through one listen address
/// must be quiet before the socket may reach that backend through another, when
/// [`GlobalConfig::local_udp_idle_s`] is 0: netfilter's unreplied UDP timeout.
pub const DEFAULT_LOCAL_UDP_IDLE_S: u32 = 30;
/// Entries of each local-socket map.
pub const LOCAL_SOCKET_ENTRIES: u32 = 65_536;
/// Same-switch peers delivered straight at layer 2: [`PeerKey`] -> [`PeerValue`] (hash).
pub const FWD_PEERS: &str = "FWD_PEERS";
/// Per-peer counters: peer id -> [`PeerStats`] (per-CPU array).
pub const FWD_PEER_STATS: &str = "FWD_PEER_STATS";
pub const MAX_PEERS: u32 = 256;
/// Forward metadata of the versions with one backend per forward: id -> [`FwdMetaV1`].
pub const FWD_META: &str = "FWD_META";
/// Fragments of forwarded datagrams: [`FragKey`] -> [`FragValue`] (LRU hash of
/// [`FRAG_ENTRIES`]). A datagram's first fragment, which carries the L4 header, records
/// its ports under the datagram's original addresses, protocol and IP ID; its later
/// fragments, which carry no L4 header, find their connection by them.
pub const FWD_FRAG_V1: &str = "FWD_FRAG_V1";
/// Datagrams in flight whose fragments [`FWD_FRAG_V1`] can follow at once (as Cilium's
/// fragment map); the least recently used record gives way to a new one.
pub const FRAG_ENTRIES: u32 = 8192;
/// A first fragment's record serves later fragments for this long: fragments of one
/// datagram arrive within milliseconds of each other, and a record this young cannot be
/// an earlier datagram's whose IP ID the sender has since reused (IPv4 IDs are 16 bits).
pub const FRAG_MAX_AGE_NS: u64 = 1_000_000_000;

/// Address family tags used in keys (not the socket AF_* numbers).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Default capacities; userspace may resize some of them from the config.
pub const DEFAULT_MAX_FORWARDS: u32 = 4096;
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
pub const MAX_IFACES: u32 = 256;
pub const REASON_SLOTS: u32 = 64;
/// Default SNAT source-port range (as netfilter's MASQUERADE: every unprivileged port).
/// The host's own ephemeral range (`net.ipv4.ip_local_port_range`) is cut out of it at
/// start-up ([`GlobalConfig::snat_hole_min`]), so forwarded flows and the host's own
/// connections never share a port.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65535;

/// A forward's listen side: what a packet's destination must be to match.
/// Wildcard listen addresses (0.0.0.0, ::) are expanded by userspace into one key per
/// local address, so the kernel makes exactly one lookup. 4-aligned (its size and layout
/// as without), so its address is built in words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FwdKey {
    /// Destination address, network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Destination port, network order.
    pub port_be: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(size_of::<FwdKey>() == 20 && align_of::<FwdKey>() == 4);

/// No source rewrite: the backend must route replies back through this host.
pub const SNAT_OFF: u8 = 0;
/// Source becomes the preferred source address of the route to the backend (the egress
/// interface's address), chosen per packet by bpf_fib_lookup.
pub const SNAT_AUTO: u8 = 1;
/// Source becomes [`FwdValue::snat_addr`].
pub const SNAT_FIXED: u8 = 2;

/// Forward applies to traffic arriving on attached interfaces.
pub const FWD_FLAG_INGRESS: u32 = 1 << 0;
/// Forward applies to connections made by programs on this host (cgroup hooks).
pub const FWD_FLAG_LOCAL: u32 = 1 << 1;
/// The backend is on this host (a loopback address, or an address of the namespace when
/// the forward was applied): interface traffic is delivered to the local stack instead of
/// routed, without SNAT, and the replies are rewritten at TC egress (docs/architecture.md,
/// "Backends on this host").
pub const FWD_FLAG_HOST_BACKEND: u32 = 1 << 2;
/// New connections choose among the forward's backends ([`FWD_BACKENDS`]) by the Maglev
/// table [`FwdValue::table_id`]; without it, the one backend in the value takes them.
pub const FWD_FLAG_MAGLEV: u32 = 1 << 3;
/// No backend takes new connections (all down or drained): they are refused and counted
/// as `no_backend`; established connections go on.
pub const FWD_FLAG_NO_BACKEND: u32 = 1 << 4;
/// A port range whose backend in this value is a range of the same size: the backend port
/// is the backend's first port plus the connection's offset into the listen range (a
/// backend chosen by the Maglev table says so itself, [`BACKEND_PORT_OFFSET`]).
pub const FWD_FLAG_PORT_OFFSET: u32 = 1 << 5;
/// The forward has an allow list ([`FWD_ALLOW`]).
pub const FWD_FLAG_ALLOW: u32 = 1 << 6;
/// The forward has a deny list ([`FWD_DENY`]).
pub const FWD_FLAG_DENY: u32 = 1 << 7;

/// What a matching packet is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwdValue {
    /// The backend taking new connections, unless [`FWD_FLAG_MAGLEV`] chooses among several.
    pub backend_addr: [u8; 16],
    /// Source address for [`SNAT_FIXED`], zero otherwise.
    pub snat_addr: [u8; 16],
    pub backend_port_be: u16,
    pub family: u8,
    /// One of `SNAT_*`.
    pub snat_mode: u8,
    /// Index into the per-forward counters; 1-based, 0 means "none".
    pub forward_id: u32,
    /// `FWD_FLAG_*`.
    pub flags: u32,
    /// The backend in this value: its index in [`FWD_BE_STATS`] (0: none).
    pub backend_index: u32,
    /// With [`FWD_FLAG_MAGLEV`]: the key of the forward's table in [`FWD_MAGLEV`].
    pub table_id: u32,
    /// The forward listens on the key's port and the `port_span` ports after it.
    pub port_span: u16,
    /// The first listen port (network order): with [`FWD_FLAG_PORT_OFFSET`], a
    /// connection's offset into the range is its destination port minus this.
    pub listen_port_be: u16,
}
const _: () = assert!(size_of::<FwdValue>() == 56);

/// [`FwdValue`] of the versions with one backend per forward (maps [`FWD_RULES`],
/// [`FWD_META`]). Read once when carrying their forwards over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwdValueV1 {
    pub backend_addr: [u8; 16],
    pub snat_addr: [u8; 16],
    pub backend_port_be: u16,
    pub family: u8,
    pub snat_mode: u8,
    pub forward_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<FwdValueV1>() == 44);

/// The listen port ranges of one address, protocol and family ([`FWD_PORT_RANGES`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRanges {
    /// Ranges in use, from the start of the arrays.
    pub count: u32,
    /// First and last port of each range, host order, inclusive; ascending and disjoint.
    /// The first port is the port of the forward's key in [`FWD_RULES_V2`].
    pub first: [u16; MAX_PORT_RANGES],
    pub last: [u16; MAX_PORT_RANGES],
}
const _: () = assert!(size_of::<PortRanges>() == 68);

impl PortRanges {
    /// The first port of the range holding `port` (host order).
    #[inline(always)]
    pub fn find(&self, port: u16) -> Option<u16> {
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if i as u32 >= self.count || self.first[i] > port {
                return None;
            }
            if port <= self.last[i] {
                return Some(self.first[i]);
            }
            i += 1;
        }
        None
    }
}

/// The backend port (network order) of a connection to `dport_be` through a forward whose
/// listen range starts at `listen_first_be` and whose backend range at `backend_first_be`
/// ([`FWD_FLAG_PORT_OFFSET`]): the offset into the listen range is kept.
#[inline(always)]
pub fn offset_port(backend_first_be: u16, listen_first_be: u16, dport_be: u16) -> u16 {
    let offset = u16::from_be(dport_be).wrapping_sub(u16::from_be(listen_first_be));
    u16::from_be(backend_first_be).wrapping_add(offset).to_be()
}

/// One backend of a forward: the forward's id and the backend's slot in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey {
    pub forward_id: u32,
    pub slot: u32,
}
const _: () = assert!(size_of::<BackendKey>() == 8);

/// The backend is down by its health checks (it takes no new connections).
pub const BACKEND_DOWN: u8 = 1 << 0;
/// The backend is a port range as large as its forward's listen range: its port is its
/// first port plus the connection's offset into the listen range. Written with the
/// backend; the health checks change only [`BACKEND_DOWN`].
pub const BACKEND_PORT_OFFSET: u8 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    pub addr: [u8; 16],
    /// The backend's (first) port, network order.
    pub port_be: u16,
    pub family: u8,
    /// `BACKEND_*` bits, written by the daemon's health checks.
    pub state: u8,
    /// Index in [`FWD_BE_STATS`], unique among all forwards' backends; 1-based.
    pub index: u32,
    /// Relative share of new connections; 0 drains the backend.
    pub weight: u32,
}
const _: () = assert!(size_of::<BackendValue>() == 28);

/// A Maglev table: every slot names the [`BackendKey::slot`] of the backend taking the
/// connections whose tuple hashes there (`crate::maglev`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub slots: [u8; crate::maglev::MAGLEV_TABLE_SIZE as usize],
    pub _pad: [u8; 1],
}
const _: () = assert!(size_of::<MaglevTable>() == 1032);

impl Default for MaglevTable {
    fn default() -> Self {
        Self { slots: [0; crate::maglev::MAGLEV_TABLE_SIZE as usize], _pad: [0] }
    }
}

/// The data of a source-list entry's key: the LPM trie's key is a prefix length (u32, 40
/// plus the address prefix's length) followed by this, so an entry matches one forward's
/// sources of one family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    pub forward_id_be: [u8; 4],
    pub family: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<SourceKey>() == 24);

/// Bits of [`SourceKey`] before the address.
pub const SOURCE_KEY_FIXED_BITS: u32 = 40;

impl SourceKey {
    /// The key data of `addr` (IPv4 in the first four bytes) for forward `forward_id`.
    #[inline(always)]
    pub const fn new(forward_id: u32, family: u8, addr: [u8; 16]) -> Self {
        Self { forward_id_be: forward_id.to_be_bytes(), family, addr, _pad: [0; 3] }
    }
}

/// The LPM prefix length of a source-list entry whose address prefix is `addr_bits` long.
#[inline(always)]
pub const fn source_prefix_len(addr_bits: u32) -> u32 {
    SOURCE_KEY_FIXED_BITS + addr_bits
}

/// Per-forward counters of new connections refused by the forward's source lists:
/// forward id -> u64 (per-CPU array, sized as [`FWD_FWD_STATS`]).
pub const FWD_FWD_DENIED: &str = "FWD_FWD_DENIED";

/// A flow as seen on the wire: the tuple of one direction. 8-aligned (its size and
/// layout as without): the kernel side then builds and copies its addresses in 64-bit
/// words, not byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 40 && align_of::<CtKey>() == 8);

/// Direction of a conntrack entry: the client's packets towards the backend.
pub const CT_DIR_ORIGINAL: u8 = 0;
/// The backend's replies towards the client.
pub const CT_DIR_REPLY: u8 = 1;

/// The rewrite to apply to packets of one direction of a tracked flow, and the next hop
/// the fast path sends them to (IPv4 through XDP; filled in by the full path).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub new_src_addr: [u8; 16],
    pub new_dst_addr: [u8; 16],
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    pub forward_id: u32,
    /// [`CT_DIR_ORIGINAL`] or [`CT_DIR_REPLY`].
    pub direction: u8,
    /// The connection's state, the same in both of its entries: `crate::conntrack::TCP_*`
    /// (netfilter's TCP states) or `UDP_*`.
    pub state: u8,
    /// RFC 1624 deltas of this direction's rewrite (see `crate::csum::delta`): IPv4 header
    /// checksum (addresses and the TTL decrement) and L4 checksum (pseudo header and ports).
    pub nh_l3_delta: u16,
    /// Egress ifindex of the cached next hop; 0 when nothing is cached.
    pub nh_ifindex: u32,
    /// bpf_ktime_get_ns() of the last packet in this direction (refreshed by the full path,
    /// at least every [`NH_MAX_AGE_JIFFIES`] while packets flow).
    pub last_seen_ns: u64,
    pub nh_dmac: [u8; 6],
    pub nh_smac: [u8; 6],
    pub nh_l4_delta: u16,
    /// Largest L3 length the FIB has passed for this next hop (its MTU check): longer
    /// packets take the full path, which checks them (and forwards, or hands them to the
    /// stack for fragmentation or an ICMP "too big").
    pub nh_len_ok: u16,
    /// Route generation ([`FWD_ROUTE_GEN`]) the next hop was looked up under.
    pub nh_gen: u32,
    /// Low 32 bits of jiffies when the next hop was looked up.
    pub nh_jiffies: u32,
    /// TCP: the sequence just past the highest segment seen in this direction (host order),
    /// valid with `crate::conntrack::CT_SEQ_KNOWN`; RSTs are checked against it.
    pub seq_end: u32,
    /// The connection's `crate::conntrack::CT_*` flags (assured), the same in both entries,
    /// and this direction's `CT_SEQ_KNOWN`.
    pub flags: u8,
    /// The connection's backend: its [`BackendValue::index`], 24 bits little-endian (0:
    /// unknown, an entry of a version before several backends).
    pub backend: [u8; 3],
    /// bpf_ktime_get_ns() when the connection was made (or reopened), the same in both
    /// entries; 0 when unknown (carried over from a table that did not record it).
    pub created_ns: u64,
}
const _: () = assert!(size_of::<CtValue>() == 96);

/// Backend indices fit [`CtValue::backend`].
pub const MAX_BACKEND_INDEX: u32 = (1 << 24) - 1;

impl CtValue {
    #[inline(always)]
    pub fn backend_index(&self) -> u32 {
        u32::from_le_bytes([self.backend[0], self.backend[1], self.backend[2], 0])
    }

    #[inline(always)]
    pub fn set_backend_index(&mut self, index: u32) {
        let b = index.to_le_bytes();
        self.backend = [b[0], b[1], b[2]];
    }
}

/// [`CtValue`] of the versions before the creation time (map [`FWD_CT_V3`]). Read
/// once when migrating a pinned table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValueV3 {
    pub new_src_addr: [u8; 16],
    pub new_dst_addr: [u8; 16],
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    pub forward_id: u32,
    pub direction: u8,
    pub state: u8,
    pub nh_l3_delta: u16,
    pub nh_ifindex: u32,
    pub last_seen_ns: u64,
    pub nh_dmac: [u8; 6],
    pub nh_smac: [u8; 6],
    pub nh_l4_delta: u16,
    pub nh_len_ok: u16,
    pub nh_gen: u32,
    pub nh_jiffies: u32,
    pub seq_end: u32,
    pub flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtValueV3>() == 88);

impl CtValueV3 {
    /// This entry as a current one; its creation time is unknown (0).
    pub fn upgrade(&self) -> CtValue {
        CtValue {
            new_src_addr: self.new_src_addr,
            new_dst_addr: self.new_dst_addr,
            new_src_port_be: self.new_src_port_be,
            new_dst_port_be: self.new_dst_port_be,
            forward_id: self.forward_id,
            direction: self.direction,
            state: self.state,
            nh_l3_delta: self.nh_l3_delta,
            nh_ifindex: self.nh_ifindex,
            last_seen_ns: self.last_seen_ns,
            nh_dmac: self.nh_dmac,
            nh_smac: self.nh_smac,
            nh_l4_delta: self.nh_l4_delta,
            nh_len_ok: self.nh_len_ok,
            nh_gen: self.nh_gen,
            nh_jiffies: self.nh_jiffies,
            seq_end: self.seq_end,
            flags: self.flags,
            backend: [0; 3],
            created_ns: 0,
        }
    }
}

/// [`CtValue`] of the versions with a next-hop cache but no TCP states (map
/// [`FWD_CT_V2`]): `state` held per-direction bits ([`V2_SEEN_FIN`], ...). Read once
/// when migrating a pinned table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValueV2 {
    pub new_src_addr: [u8; 16],
    pub new_dst_addr: [u8; 16],
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    pub forward_id: u32,
    pub direction: u8,
    pub state: u8,
    pub nh_l3_delta: u16,
    pub nh_ifindex: u32,
    pub last_seen_ns: u64,
    pub nh_dmac: [u8; 6],
    pub nh_smac: [u8; 6],
    pub nh_l4_delta: u16,
    pub nh_len_ok: u16,
    pub nh_gen: u32,
    pub nh_jiffies: u32,
}
const _: () = assert!(size_of::<CtValueV2>() == 80);

/// [`CtValueV2::state`] bits: a FIN, a RST was seen in this direction; a reply entry saw a
/// packet (the backend answered).
pub const V2_SEEN_FIN: u8 = 1 << 1;
pub const V2_SEEN_RST: u8 = 1 << 2;
pub const V2_ANSWERED: u8 = 1 << 3;

impl CtValueV2 {
    /// This entry as a V3 one, given the state bits of both entries of its connection: the
    /// nearest netfilter state (RST: CLOSE; a FIN: FIN_WAIT;
    /// answered: ESTABLISHED and assured; else SYN_SENT), sequence not yet known.
    pub fn upgrade(&self, is_tcp: bool, connection_bits: u8) -> CtValueV3 {
        use crate::conntrack::*;
        let answered = connection_bits & V2_ANSWERED != 0;
        let (state, flags) = if !is_tcp {
            if answered { (UDP_REPLIED, CT_ASSURED) } else { (UDP_UNREPLIED, 0) }
        } else if connection_bits & V2_SEEN_RST != 0 {
            (TCP_CLOSE, CT_ASSURED * answered as u8)
        } else if connection_bits & V2_SEEN_FIN != 0 {
            (TCP_FIN_WAIT, CT_ASSURED * answered as u8)
        } else if answered {
            (TCP_ESTABLISHED, CT_ASSURED)
        } else {
            (TCP_SYN_SENT, 0)
        };
        CtValueV3 {
            new_src_addr: self.new_src_addr,
            new_dst_addr: self.new_dst_addr,
            new_src_port_be: self.new_src_port_be,
            new_dst_port_be: self.new_dst_port_be,
            forward_id: self.forward_id,
            direction: self.direction,
            state,
            last_seen_ns: self.last_seen_ns,
            flags,
            // The next hop is looked up again.
            ..CtValueV3::default()
        }
    }
}

/// One slot of the FIB memo ([`FWD_FIB_MEMO`]): the FIB's answer (a route with a neighbour)
/// for the inputs it is keyed by; the ports are not among them, which is why the memo needs
/// [`ROUTE_PORTS_IGNORED`]. IPv4 addresses in the first 4 bytes, the rest zero.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FibMemoSlot {
    /// The destination and source the FIB was asked about.
    pub dst: [u8; 16],
    pub src: [u8; 16],
    /// The route's preferred source, when `want_src` (SNAT auto asked for it).
    pub pref_src: [u8; 16],
    /// The device the packet arrived on (part of the question: rules may match it).
    pub ingress: u32,
    /// The answer's egress device; 0: an empty slot.
    pub ifindex: u32,
    /// Route generation ([`FWD_ROUTE_GEN`]) and jiffies (low 32 bits) of the lookup.
    pub generation: u32,
    pub jiffies: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The length the FIB's MTU check passed; a longer packet asks the FIB again.
    pub len_ok: u16,
    pub family: u8,
    pub proto: u8,
    /// IPv4 TOS of the question (rules may match it); 0 for IPv6.
    pub tos: u8,
    pub want_src: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<FibMemoSlot>() == 88 && align_of::<FibMemoSlot>() == 8);

/// The [`FWD_FIB_MEMO`] slot of a (source, destination, ingress, protocol); the addresses as
/// native-endian words ([`FibMemoSlot`]'s bytes read four at a time).
#[inline(always)]
pub fn fib_memo_slot(src: [u32; 4], dst: [u32; 4], ingress: u32, proto: u8) -> u32 {
    let a = src[0] ^ src[1].rotate_left(8) ^ src[2].rotate_left(16) ^ src[3].rotate_left(24);
    let b = dst[0] ^ dst[1].rotate_left(8) ^ dst[2].rotate_left(16) ^ dst[3].rotate_left(24);
    let h = a ^ b.rotate_left(16) ^ ingress.wrapping_mul(0x9e37_79b1) ^ proto as u32;
    crate::maglev::fmix32(h) & (FIB_MEMO_SLOTS - 1)
}

/// One slot of the flow cache ([`FWD_FLOW_CACHE`]): a copy of one direction of a tracked
/// IPv4 connection, made by the XDP fast path from the connection's entry when that entry
/// holds a current next hop. A slot is used only while its key matches the packet, its
/// next hop is still current by the entry's own rules (the same generation and jiffies)
/// and the packet would add no state bit to the entry (a FIN or RST goes to the entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCacheSlot {
    /// Key: the packet's source and destination addresses and its two ports, each as the
    /// native-endian word of its bytes in the packet, and the protocol.
    pub src: u32,
    pub dst: u32,
    pub ports: u32,
    pub proto: u8,
    /// The connection's state when copied (`crate::conntrack::TCP_*`): a TCP slot serves
    /// only an established connection's segments without SYN, FIN or RST.
    pub state: u8,
    /// As [`CtValue::nh_l3_delta`].
    pub l3_delta: u16,
    /// The rewrite: source and destination address, source and destination port (words
    /// as the key's).
    pub new_src: u32,
    pub new_dst: u32,
    pub new_ports: u32,
    pub forward_id: u32,
    /// Egress ifindex; 0 for an empty slot.
    pub ifindex: u32,
    /// The entry's `nh_gen` (its low 16 bits) and `nh_jiffies`: the slot ages with the
    /// entry's next hop.
    pub generation: u16,
    /// The connection's backend index when it fits 16 bits (the entry's otherwise: such a
    /// connection is not copied here).
    pub backend: u16,
    pub jiffies: u32,
    pub l4_delta: u16,
    pub len_ok: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// TCP: the sequence of the packet that filled the slot (host order); the slot serves
    /// only segments less than `conntrack::SEQ_SYNC_BYTES` past it.
    pub seq: u32,
}
const _: () = assert!(size_of::<FlowCacheSlot>() == 64);

impl FlowCacheSlot {
    /// The slot holds a copy for this tuple (words as in the key fields).
    #[inline(always)]
    pub fn holds(&self, src: u32, dst: u32, ports: u32, proto: u8) -> bool {
        self.ifindex != 0 && self.src == src && self.dst == dst && self.ports == ports && self.proto == proto
    }

    /// The copy is as current as its entry's next hop would be ([`next_hop_current`]).
    #[inline(always)]
    pub fn current(&self, generation: u32, now: u32) -> bool {
        copy_current(self.ifindex, self.generation, self.jiffies, generation, now)
    }

    /// A new copy for this tuple may go here: the slot is empty, stale, or this tuple's.
    #[inline(always)]
    pub fn free_for(&self, src: u32, dst: u32, ports: u32, proto: u8, generation: u32, now: u32) -> bool {
        !self.current(generation, now) || self.holds(src, dst, ports, proto)
    }
}

/// [`FlowCacheSlot`] for IPv6 ([`FWD_FLOW_CACHE6`]): the same fields and rules, addresses
/// of four words (each the native-endian word of four of its bytes in the packet), and no
/// header checksum to carry a delta for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCacheSlot6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub ports: u32,
    pub proto: u8,
    pub state: u8,
    pub _pad: u16,
    pub new_src: [u32; 4],
    pub new_dst: [u32; 4],
    pub new_ports: u32,
    pub forward_id: u32,
    /// Egress ifindex; 0 for an empty slot.
    pub ifindex: u32,
    pub generation: u16,
    pub backend: u16,
    pub jiffies: u32,
    pub l4_delta: u16,
    pub len_ok: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub seq: u32,
}
const _: () = assert!(size_of::<FlowCacheSlot6>() == 112);
// The TC fast path stores the rewritten addresses and ports in one piece from the slot, as
// they lie in an IPv6 packet without extension headers.
const _: () = assert!(
    core::mem::offset_of!(FlowCacheSlot6, new_dst) == core::mem::offset_of!(FlowCacheSlot6, new_src) + 16
        && core::mem::offset_of!(FlowCacheSlot6, new_ports) == core::mem::offset_of!(FlowCacheSlot6, new_src) + 32
);

impl FlowCacheSlot6 {
    /// The slot holds a copy for this tuple.
    #[inline(always)]
    pub fn holds(&self, src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8) -> bool {
        self.ifindex != 0 && self.ports == ports && self.src == *src && self.dst == *dst && self.proto == proto
    }

    /// As [`FlowCacheSlot::current`].
    #[inline(always)]
    pub fn current(&self, generation: u32, now: u32) -> bool {
        copy_current(self.ifindex, self.generation, self.jiffies, generation, now)
    }

    /// As [`FlowCacheSlot::free_for`].
    #[inline(always)]
    pub fn free_for(&self, src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8, generation: u32, now: u32) -> bool {
        !self.current(generation, now) || self.holds(src, dst, ports, proto)
    }
}

/// [`flow_cache_bucket`] of an IPv6 tuple: every address word counts (flows that differ
/// only in an address's upper bits still spread). Plain XOR: BPF has no rotate (each one
/// is four instructions), and the mix that follows spreads every bit.
#[inline(always)]
pub fn flow_cache_bucket6(src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8) -> u32 {
    let fold = |a: &[u32; 4]| a[0] ^ a[1] ^ a[2] ^ a[3];
    flow_cache_bucket(fold(src), fold(dst), ports, proto)
}

/// A flow cache slot (of either family) with egress `ifindex`, copied under `generation`
/// (its low 16 bits) at `jiffies`, is in use and as current as its entry's next hop would
/// be ([`next_hop_current`]).
#[inline(always)]
fn copy_current(ifindex: u32, generation: u16, jiffies: u32, now_generation: u32, now: u32) -> bool {
    ifindex != 0 && next_hop_current(generation as u32, jiffies, now_generation & 0xffff, now)
}

/// A next hop looked up under route generation `generation` at `jiffies` (low 32 bits) is
/// still current at `now` under `now_generation`: the same generation, younger than
/// [`NH_MAX_AGE_JIFFIES`].
#[inline(always)]
pub fn next_hop_current(generation: u32, jiffies: u32, now_generation: u32, now: u32) -> bool {
    generation == now_generation && now.wrapping_sub(jiffies) < NH_MAX_AGE_JIFFIES
}

/// The first of the [`FLOW_CACHE_WAYS`] slots (a bucket) where an IPv4 tuple (words as in
/// [`FlowCacheSlot`]) may be cached; a multiple of the ways, the others follow. Four ways,
/// so four flows that hash alike all stay cached; a fifth takes turns with the last (with
/// two ways, 1024 flows left 5-8% of their packets to the entry lookup, as a third flow of
/// a bucket and the one it displaced took turns). Collisions only cost a miss (the key is
/// compared in full), so a sender that picks colliding tuples slows its own flows to the
/// entry lookup, no more.
#[inline(always)]
pub fn flow_cache_bucket(src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    // Every input bit reaches the index bits.
    let h = src ^ dst.rotate_left(16) ^ ports.wrapping_mul(0x9e37_79b1) ^ proto as u32;
    crate::maglev::fmix32(h) & (FLOW_CACHE_SLOTS - FLOW_CACHE_WAYS)
}

/// [`CtValue`] of versions before the next-hop cache (map [`FWD_CT`]), read
/// once when migrating a pinned table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValueV1 {
    pub new_src_addr: [u8; 16],
    pub new_dst_addr: [u8; 16],
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    pub forward_id: u32,
    pub direction: u8,
    pub state: u8,
    pub _pad: [u8; 6],
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValueV1>() == 56);

impl From<CtValueV1> for CtValueV2 {
    /// The same connection, without a cached next hop (V1 state bits are V2's).
    fn from(v: CtValueV1) -> Self {
        CtValueV2 {
            new_src_addr: v.new_src_addr,
            new_dst_addr: v.new_dst_addr,
            new_src_port_be: v.new_src_port_be,
            new_dst_port_be: v.new_dst_port_be,
            forward_id: v.forward_id,
            direction: v.direction,
            state: v.state,
            last_seen_ns: v.last_seen_ns,
            ..CtValueV2::default()
        }
    }
}

/// Per-forward counters (one slot per forward id, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwdStats {
    /// Packets rewritten, both directions.
    pub packets: u64,
    /// Bytes of those packets (L3 length).
    pub bytes: u64,
    /// Connections (flows) created from interface traffic.
    pub new_conns: u64,
    /// Connections made by local programs through the cgroup hooks.
    pub local_conns: u64,
}
const _: () = assert!(size_of::<FwdStats>() == 32);

/// XDP is attached in generic (skb) mode on this interface.
pub const IFACE_XDP_GENERIC: u32 = 1 << 0;
/// Frames may be XDP_REDIRECTed into this interface (its receiver takes XDP frames).
pub const IFACE_XDP_EGRESS_OK: u32 = 1 << 1;
/// A veth whose peer is in another network namespace (a container's): TC sends packets
/// straight into the peer's ingress (`bpf_redirect_peer`), skipping this device's transmit
/// and the peer's backlog queue.
pub const IFACE_TC_PEER: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceConfig {
    /// `IFACE_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<IfaceConfig>() == 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalConfig {
    /// First and last source port for SNAT, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `GLOBAL_*` bits.
    pub flags: u32,
    /// Cookie of the network namespace this instance serves. The cgroup socket hooks see
    /// sockets of every namespace and rewrite only those of this one (0: none).
    pub netns_cookie: u64,
    /// Ports inside `snat_port_min..=snat_port_max` that SNAT never uses (the host's
    /// ephemeral range), host order; none when `snat_hole_min > snat_hole_max`.
    pub snat_hole_min: u16,
    pub snat_hole_max: u16,
    /// Seconds an unconnected local UDP socket's exchange with a backend through one
    /// listen address must be quiet before a datagram to another listen address of the
    /// same backend is let through (`conntrack.udp_unreplied_timeout`); 0:
    /// [`DEFAULT_LOCAL_UDP_IDLE_S`]. This was zero padding before, so a value written by
    /// an earlier version reads as the default.
    pub local_udp_idle_s: u32,
}
const _: () = assert!(size_of::<GlobalConfig>() == 24);

impl GlobalConfig {
    /// The SNAT ports; the default range when none is set.
    #[inline(always)]
    pub fn snat_ports(&self) -> crate::conntrack::PortRange {
        if self.snat_port_min == 0 {
            return crate::conntrack::PortRange {
                min: DEFAULT_SNAT_PORT_MIN,
                max: DEFAULT_SNAT_PORT_MAX,
                hole_min: 1,
                hole_max: 0,
            };
        }
        crate::conntrack::PortRange {
            min: self.snat_port_min,
            max: self.snat_port_max,
            hole_min: self.snat_hole_min,
            hole_max: self.snat_hole_max,
        }
    }
}

/// At least one peer is configured: the fast path looks destinations up in `FWD_PEERS`.
pub const GLOBAL_HAS_PEERS: u32 = 1 << 0;
// Bit 1 is userspace's (`state::GLOBAL_FLUSH_ON_REMOVE`).
/// A forward has its backend on this host, or connections to one are still tracked: the
/// TC egress program looks leaving packets up in the connection table to rewrite the
/// backend's replies. Without it, host traffic leaving an interface costs nothing more.
pub const GLOBAL_HAS_HOST_BACKENDS: u32 = 1 << 2;

/// Some forward listens on a port range: a destination whose exact port has no rule is
/// looked up in [`FWD_PORT_RANGES`]. Without it, a miss costs nothing more.
pub const GLOBAL_HAS_PORT_RANGES: u32 = 1 << 4;

/// Userspace only: forwarder turned `net.ipv4.conf.lo.accept_local` on in this namespace
/// (it was off), and turns it off again when it detaches. IPv4 packets that must be
/// fragmented reach the stack through the loopback device with a local (SNAT) source.
pub const GLOBAL_LO_ACCEPT_LOCAL: u32 = 1 << 3;

/// A loopback address (IPv4 127.0.0.0/8 in the first four bytes, or IPv6 `::1`) of
/// `family` ([`FAMILY_V4`] or [`FAMILY_V6`]): a destination no packet from an interface
/// may carry into the stack (martian), so a backend there is reached through its socket.
#[inline(always)]
pub const fn is_loopback(family: u8, a: &[u8; 16]) -> bool {
    if family == FAMILY_V4 {
        return a[0] == 127;
    }
    let mut i = 0;
    while i < 15 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[15] == 1
}

/// What a local program dialled, kept for getpeername and for UDP replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalOrig {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    pub forward_id: u32,
}
const _: () = assert!(size_of::<LocalOrig>() == 24);

/// An unconnected UDP socket's datagrams to one backend (sendmsg/recvmsg hooks). An IPv4
/// backend reached through a v4-mapped address of a dual-stack socket has an IPv4 key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalUdpKey {
    pub socket_cookie: u64,
    pub backend_addr: [u8; 16],
    pub backend_port_be: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<LocalUdpKey>() == 32);

/// The address an unconnected UDP socket sent to the backend of its [`LocalUdpKey`] under,
/// and when the exchange last saw a datagram either way. The answers of a backend reached
/// through two listen addresses cannot be told apart, so while one exchange is live
/// (younger than [`GlobalConfig::local_udp_idle_s`]) a datagram to the other is refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalUdpOrig {
    pub orig: LocalOrig,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last datagram sent or received.
    pub last_ns: u64,
}
const _: () = assert!(size_of::<LocalUdpOrig>() == 32);

/// What a datagram of an unconnected socket does to the socket's exchange with a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalUdpSend {
    /// To the address the exchange is under: it goes, and the exchange is fresh again.
    Same,
    /// To another address of the same backend after the exchange went quiet: it goes, and
    /// the exchange is under the new address from now on.
    Switch,
    /// To another address of the same backend while the exchange is live: refused, since
    /// the answers to both would come from the same backend address and port.
    Refuse,
}

impl LocalUdpOrig {
    /// The fate of a datagram to `addr`:`port_be` at `now_ns`, for an exchange that must
    /// be quiet for `idle_ns` before it may change address. A clock reading older than the
    /// exchange's (another CPU wrote it meanwhile) counts as live.
    #[inline(always)]
    pub fn on_send(&self, addr: &[u8; 16], port_be: u16, now_ns: u64, idle_ns: u64) -> LocalUdpSend {
        let mut diff = 0u8;
        let mut i = 0;
        while i < 16 {
            diff |= self.orig.addr[i] ^ addr[i];
            i += 1;
        }
        if diff == 0 && self.orig.port_be == port_be {
            LocalUdpSend::Same
        } else if now_ns.saturating_sub(self.last_ns) < idle_ns {
            LocalUdpSend::Refuse
        } else {
            LocalUdpSend::Switch
        }
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291
/// 2.5.5.2), as a 16-byte address field (IPv4 in bytes 0-3); `None` for any other.
#[inline(always)]
pub const fn v4_of_mapped(a: &[u8; 16]) -> Option<[u8; 16]> {
    if a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] != 0 || a[10] != 0xff || a[11] != 0xff {
        return None;
    }
    Some([a[12], a[13], a[14], a[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
}

/// The IPv4-mapped IPv6 address of an IPv4 address field (IPv4 in bytes 0-3).
#[inline(always)]
pub const fn mapped_of_v4(a: &[u8; 16]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// The datagram a fragment belongs to, as on the wire before translation (RFC 791 and
/// RFC 8200: source, destination, protocol and identification tell one datagram's
/// fragments from all others). 8-aligned, as [`CtKey`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Identification, host order: IPv4's 16 bits (upper half zero), or the 32 bits of the
    /// IPv6 fragment header.
    pub id: u32,
    /// The datagram's protocol (IPv6: the fragment header's next header).
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragKey>() == 40 && align_of::<FragKey>() == 8);

/// The L4 ports of a fragmented datagram, read from its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when the first fragment was translated; later fragments use the
    /// record while it is younger than [`FRAG_MAX_AGE_NS`].
    pub first_ns: u64,
}
const _: () = assert!(size_of::<FragValue>() == 16);

/// Forward metadata for operators and CLI edits (never read by the kernel): id ->
/// [`FwdMeta`]. `_V2`: the value grew as [`FwdValue`] did, and the health checks.
pub const FWD_META_V2: &str = "FWD_META_V2";

/// Health checks off ([`HealthSpec::kind`]): every backend is taken as up.
pub const HEALTH_NONE: u8 = 0;
/// A TCP connect must succeed.
pub const HEALTH_TCP: u8 = 1;
/// A probe datagram must get any answer.
pub const HEALTH_UDP: u8 = 2;

/// A forward's active health checks, run by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HealthSpec {
    /// `HEALTH_*`.
    pub kind: u8,
    /// Consecutive successes to come back, failures to be taken out.
    pub rise: u8,
    pub fall: u8,
    pub _pad: u8,
    pub interval_ms: u32,
    pub timeout_ms: u32,
}
const _: () = assert!(size_of::<HealthSpec>() == 12);

/// Operator-facing description of a forward (name, NUL padded); its backends are in
/// [`FWD_BACKENDS`], its source lists in [`FWD_ALLOW`] and [`FWD_DENY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdMeta {
    pub name: [u8; 48],
    pub key: FwdKey,
    pub value: FwdValue,
    pub health: HealthSpec,
}
const _: () = assert!(size_of::<FwdMeta>() == 136);

impl Default for FwdMeta {
    fn default() -> Self {
        Self { name: [0; 48], key: FwdKey::default(), value: FwdValue::default(), health: HealthSpec::default() }
    }
}

/// [`FwdMeta`] of the versions with one backend per forward (map [`FWD_META`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdMetaV1 {
    pub name: [u8; 48],
    pub key: FwdKey,
    pub value: FwdValueV1,
}
const _: () = assert!(size_of::<FwdMetaV1>() == 112);

/// A configured peer's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<PeerKey>() == 20);

/// The peer answers its neighbour (ARP/ND): send to it directly.
pub const PEER_DIRECT: u32 = 1;
/// The peer does not answer: normal routing (through the gateway), counted.
pub const PEER_FALLBACK: u32 = 0;
/// skb mark of userspace's probe datagrams: sent direct even while a peer is in fallback,
/// so the kernel's neighbour subsystem tries to resolve the peer again.
pub const PEER_PROBE_MARK: u32 = 0x4657_5052;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerValue {
    /// Interface the peer is reached on.
    pub ifindex: u32,
    /// Index into the per-peer counters (1-based).
    pub peer_id: u32,
    /// [`PEER_DIRECT`] or [`PEER_FALLBACK`], maintained by userspace from the neighbour state.
    pub state: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PeerValue>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerStats {
    pub direct_packets: u64,
    pub direct_bytes: u64,
    pub fallback_packets: u64,
    pub fallback_bytes: u64,
}
const _: () = assert!(size_of::<PeerStats>() == 32);

/// Magic written by XDP into the frame metadata of a packet it has fully classified as
/// "not ours", so the TC ingress program does not look at it again.
pub const XDP_META_SKIP: u32 = 0x4657_5301;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FwdKey {}
    unsafe impl aya::Pod for FwdValue {}
    unsafe impl aya::Pod for PortRanges {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for CtValueV1 {}
    unsafe impl aya::Pod for CtValueV2 {}
    unsafe impl aya::Pod for CtValueV3 {}
    unsafe impl aya::Pod for FlowCacheSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowCacheSlot6 {}
    unsafe impl aya::Pod for FibMemoSlot {}
    unsafe impl aya::Pod for FwdStats {}
    unsafe impl aya::Pod for IfaceConfig {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for FwdMeta {}
    unsafe impl aya::Pod for LocalOrig {}
    unsafe impl aya::Pod for LocalUdpKey {}
    unsafe impl aya::Pod for LocalUdpOrig {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerValue {}
    unsafe impl aya::Pod for PeerStats {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for HealthSpec {}
    unsafe impl aya::Pod for FwdValueV1 {}
    unsafe impl aya::Pod for FwdMetaV1 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_entries_upgrade_to_the_nearest_state() {
        use crate::conntrack::*;
        let v = CtValueV2 { forward_id: 3, last_seen_ns: 9, nh_ifindex: 5, ..Default::default() };
        let up = |tcp, bits| {
            let n = v.upgrade(tcp, bits);
            assert_eq!((n.forward_id, n.last_seen_ns, n.nh_ifindex), (3, 9, 0), "kept, next hop looked up again");
            (n.state, n.flags)
        };
        assert_eq!(up(true, 1), (TCP_SYN_SENT, 0));
        assert_eq!(up(true, 1 | V2_ANSWERED), (TCP_ESTABLISHED, CT_ASSURED));
        assert_eq!(up(true, V2_ANSWERED | V2_SEEN_FIN), (TCP_FIN_WAIT, CT_ASSURED));
        assert_eq!(up(true, V2_SEEN_RST), (TCP_CLOSE, 0));
        assert_eq!(up(false, 0), (UDP_UNREPLIED, 0));
        assert_eq!(up(false, V2_ANSWERED), (UDP_REPLIED, CT_ASSURED));
    }

    /// Consecutive client ports (the usual many-flows pattern) spread over the buckets.
    #[test]
    fn flow_cache_buckets_spread_consecutive_ports() {
        let word = |b: [u8; 4]| u32::from_ne_bytes(b);
        let (src, dst) = (word([192, 0, 2, 2]), word([203, 0, 113, 20]));
        const WAYS: usize = FLOW_CACHE_WAYS as usize;
        let mut per_bucket = [0u32; FLOW_CACHE_SLOTS as usize / WAYS];
        for port in 20_000u16..21_024 {
            let [a, b] = port.to_be_bytes();
            let first = flow_cache_bucket(src, dst, word([a, b, 0x0c, 0xea]), 17);
            assert!(first.is_multiple_of(FLOW_CACHE_WAYS) && first + FLOW_CACHE_WAYS <= FLOW_CACHE_SLOTS);
            per_bucket[first as usize / WAYS] += 1;
        }
        // A random function leaves 1024 * P(Poisson(1) > 4) = 3.7 buckets with a fifth
        // flow on average (the flows that take turns).
        let crowded = per_bucket.iter().filter(|n| **n > 4).count();
        assert!(crowded < 12, "{crowded} buckets with more than four of 1024 flows");
    }

    #[test]
    fn a_slot_is_free_when_empty_stale_or_the_same_flow() {
        let slot = FlowCacheSlot {
            src: 1,
            dst: 2,
            ports: 3,
            proto: 17,
            ifindex: 4,
            generation: 7,
            jiffies: 1000,
            ..Default::default()
        };
        assert!(slot.holds(1, 2, 3, 17) && !slot.holds(1, 2, 3, 6) && !slot.holds(9, 2, 3, 17));
        assert!(slot.current(7, 1000 + NH_MAX_AGE_JIFFIES - 1));
        assert!(!slot.current(7, 1000 + NH_MAX_AGE_JIFFIES), "too old");
        assert!(!slot.current(8, 1000), "another generation");
        assert!(slot.current(7, 1000u32.wrapping_add(0)), "jiffies wrap like the entry's");
        assert!(!slot.free_for(9, 2, 3, 17, 7, 1001), "another flow's current copy");
        assert!(slot.free_for(1, 2, 3, 17, 7, 1001), "this flow's");
        assert!(slot.free_for(9, 2, 3, 17, 8, 1001), "stale");
        assert!(FlowCacheSlot::default().free_for(9, 2, 3, 17, 0, 0), "empty");
        assert!(!FlowCacheSlot::default().holds(0, 0, 0, 0), "an empty slot holds nothing");
    }

    /// IPv6: consecutive client ports spread as IPv4's do, and flows that differ only in
    /// an address's first word land apart.
    #[test]
    fn ipv6_flow_cache_buckets_spread() {
        let (src, dst) = ([0x0db8_0120, 0, 0, 0x0200_0000], [0x0db8_0120, 0, 0, 0x2000_0000]);
        const WAYS: usize = FLOW_CACHE_WAYS as usize;
        let mut per_bucket = [0u32; FLOW_CACHE_SLOTS as usize / WAYS];
        for port in 20_000u16..21_024 {
            let [a, b] = port.to_be_bytes();
            let first = flow_cache_bucket6(&src, &dst, u32::from_ne_bytes([a, b, 0x1b, 0x58]), 17);
            assert!(first.is_multiple_of(FLOW_CACHE_WAYS) && first + FLOW_CACHE_WAYS <= FLOW_CACHE_SLOTS);
            per_bucket[first as usize / WAYS] += 1;
        }
        let crowded = per_bucket.iter().filter(|n| **n > 4).count();
        assert!(crowded < 12, "{crowded} buckets with more than four of 1024 flows");
        let mut seen = [false; FLOW_CACHE_SLOTS as usize / FLOW_CACHE_WAYS as usize];
        for hi in 0..64u32 {
            seen[(flow_cache_bucket6(&[hi, 0, 0, 1], &dst, 7, 17) / FLOW_CACHE_WAYS) as usize] = true;
        }
        let distinct = seen.iter().filter(|b| **b).count();
        assert!(distinct > 48, "{distinct} buckets for 64 prefixes");
    }

    #[test]
    fn an_ipv6_slot_holds_its_whole_tuple() {
        let (src, dst) = ([1, 2, 3, 4], [5, 6, 7, 8]);
        let slot = FlowCacheSlot6 {
            src,
            dst,
            ports: 9,
            proto: 17,
            ifindex: 4,
            generation: 7,
            jiffies: 1000,
            ..Default::default()
        };
        assert!(slot.holds(&src, &dst, 9, 17));
        for other in [[0, 2, 3, 4], [1, 0, 3, 4], [1, 2, 0, 4], [1, 2, 3, 0]] {
            assert!(!slot.holds(&other, &dst, 9, 17) && !slot.holds(&src, &other, 9, 17), "{other:?}");
        }
        assert!(!slot.holds(&src, &dst, 9, 6) && !slot.holds(&src, &dst, 10, 17));
        assert!(slot.current(7, 1000 + NH_MAX_AGE_JIFFIES - 1) && !slot.current(7, 1000 + NH_MAX_AGE_JIFFIES));
        assert!(!slot.free_for(&[9, 9, 9, 9], &dst, 9, 17, 7, 1001) && slot.free_for(&src, &dst, 9, 17, 7, 1001));
        assert!(slot.free_for(&[9, 9, 9, 9], &dst, 9, 17, 8, 1001), "stale");
        assert!(!FlowCacheSlot6::default().holds(&[0; 4], &[0; 4], 0, 0), "an empty slot holds nothing");
    }

    #[test]
    fn a_port_finds_the_range_holding_it() {
        let mut r = PortRanges { count: 3, ..Default::default() };
        for (i, (first, last)) in [(80, 80), (8000, 8099), (9000, 9001)].into_iter().enumerate() {
            (r.first[i], r.last[i]) = (first, last);
        }
        assert_eq!(r.find(8000), Some(8000));
        assert_eq!(r.find(8042), Some(8000));
        assert_eq!(r.find(8099), Some(8000));
        assert_eq!(r.find(9001), Some(9000));
        assert_eq!(r.find(80), Some(80));
        for outside in [0, 79, 81, 7999, 8100, 8999, 9002, 65535] {
            assert_eq!(r.find(outside), None, "{outside}");
        }
        r.count = 1;
        assert_eq!(r.find(8042), None, "only the ranges in use");
        let full = PortRanges {
            count: MAX_PORT_RANGES as u32,
            first: core::array::from_fn(|i| 1000 * (i as u16 + 1)),
            last: core::array::from_fn(|i| 1000 * (i as u16 + 1) + 9),
        };
        assert_eq!(full.find(16_005), Some(16_000), "the last slot");
        assert_eq!(full.find(16_010), None);
    }

    #[test]
    fn the_backend_port_keeps_the_offset_into_the_range() {
        let be = u16::to_be;
        assert_eq!(offset_port(be(9000), be(8000), be(8042)), be(9042));
        assert_eq!(offset_port(be(9000), be(8000), be(8000)), be(9000));
        assert_eq!(offset_port(be(100), be(65000), be(65535)), be(635));
    }

    #[test]
    fn v4_mapped_addresses_convert_both_ways() {
        let v4 = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        assert_eq!(mapped_of_v4(&v4), mapped);
        assert_eq!(v4_of_mapped(&mapped), Some(v4));
        assert_eq!(mapped_of_v4(&v4), core::net::Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets());
        let compat = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 127, 0, 0, 1];
        assert_eq!(v4_of_mapped(&compat), None, "IPv4-compatible (::a.b.c.d) is not mapped");
        let doc = core::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0xffff, 0x7f00, 1).octets();
        assert_eq!(v4_of_mapped(&doc), None);
        assert_eq!(v4_of_mapped(&[0; 16]), None);
    }

    #[test]
    fn loopback_addresses_are_told_per_family() {
        let v4 = |b: [u8; 4]| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&b);
            a
        };
        assert!(is_loopback(FAMILY_V4, &v4([127, 0, 0, 1])));
        assert!(is_loopback(FAMILY_V4, &v4([127, 1, 2, 3])), "all of 127/8");
        assert!(!is_loopback(FAMILY_V4, &v4([192, 0, 2, 1])));
        assert!(is_loopback(FAMILY_V6, &core::net::Ipv6Addr::LOCALHOST.octets()));
        assert!(!is_loopback(FAMILY_V6, &core::net::Ipv6Addr::UNSPECIFIED.octets()));
        let doc = core::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets();
        assert!(!is_loopback(FAMILY_V6, &doc));
        assert!(!is_loopback(FAMILY_V6, &v4([127, 0, 0, 1])), "an IPv6 address starting 7f00::");
    }

    #[test]
    fn an_exchange_changes_address_only_when_quiet() {
        let a = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut b = a;
        b[3] = 2;
        let e = LocalUdpOrig {
            orig: LocalOrig { addr: a, port_be: 53u16.to_be(), family: 4, ..Default::default() },
            last_ns: 5_000,
        };
        let idle = 1_000;
        assert_eq!(e.on_send(&a, 53u16.to_be(), 5_500, idle), LocalUdpSend::Same);
        assert_eq!(e.on_send(&a, 53u16.to_be(), 99_999, idle), LocalUdpSend::Same, "the same address never waits");
        assert_eq!(e.on_send(&a, 5300u16.to_be(), 5_999, idle), LocalUdpSend::Refuse, "another port, live");
        assert_eq!(e.on_send(&b, 53u16.to_be(), 5_999, idle), LocalUdpSend::Refuse, "another address, live");
        assert_eq!(e.on_send(&b, 53u16.to_be(), 6_000, idle), LocalUdpSend::Switch, "quiet for idle_ns");
        assert_eq!(e.on_send(&b, 53u16.to_be(), 4_000, idle), LocalUdpSend::Refuse, "a clock behind the entry's");
    }
    #[test]
    fn fib_memo_slots_spread_clients_and_backends() {
        // Distinct slots taken by some keys (every slot in range).
        let spread = |slots: &mut dyn Iterator<Item = u32>| {
            let mut taken = [false; FIB_MEMO_SLOTS as usize];
            for i in slots {
                assert!(i < FIB_MEMO_SLOTS);
                taken[i as usize] = true;
            }
            taken.iter().filter(|&&t| t).count()
        };
        let v4 = |a: [u8; 4]| [u32::from_ne_bytes(a), 0, 0, 0];
        let backend = v4([198, 51, 100, 2]);
        // 256 clients of one /24 to one backend, and one client to 256 backends: a random
        // spread of 256 keys over 256 slots fills ~162 of them.
        let clients = spread(&mut (0..=255u8).map(|h| fib_memo_slot(v4([192, 0, 2, h]), backend, 3, 6)));
        assert!(clients > 140, "{clients} slots");
        let client = v4([192, 0, 2, 7]);
        let backends = spread(&mut (0..=255u8).map(|h| fib_memo_slot(client, v4([198, 51, 100, h]), 3, 6)));
        assert!(backends > 140, "{backends} slots");
        // The ingress device and the protocol are part of the question.
        let one = fib_memo_slot(client, backend, 3, 6);
        assert!((4..20).any(|dev| fib_memo_slot(client, backend, dev, 6) != one));
        assert_ne!(fib_memo_slot(client, backend, 3, 17), one);
        // IPv6: every word of both addresses counts.
        for i in 0..8 {
            let word = |w: u32| {
                let mut a =
                    [[0x0db8_0120u32.to_be(), 0, 0, 1u32.to_be()], [0x0db8_0220u32.to_be(), 0, 0, 2u32.to_be()]];
                a[i / 4][i % 4] ^= w << 3;
                fib_memo_slot(a[0], a[1], 3, 6)
            };
            let n = spread(&mut (0..64u32).map(word));
            assert!(n > 30, "word {i}: {n} slots");
        }
    }
}
