//! An instance's state, held in its pinned maps: forwards, peers, settings, counters and the
//! connection table. The daemon and the CLI's live edits both go through here, so the maps
//! are the single source of truth and survive restarts.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, Map, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
    xdp::DevMapHash,
};
use forwarder_common::{
    BACKEND_DOWN, BackendKey, BackendValue, CT_DIR_ORIGINAL, CtKey, CtValue, FAMILY_V6, FWD_ALLOW, FWD_BACKENDS,
    FWD_BE_STATS, FWD_CT_V4, FWD_DENY, FWD_FLAG_HOST_BACKEND, FWD_FLAG_LOCAL, FWD_FLAG_MAGLEV, FWD_FLAG_PORT_OFFSET,
    FWD_FWD_DENIED, FWD_FWD_STATS, FWD_GLOBAL_V2, FWD_IFACES, FWD_MAGLEV, FWD_META_V2, FWD_PEERS, FWD_PORT_RANGES,
    FWD_REASONS, FWD_ROUTE_FLAGS, FWD_ROUTE_GEN, FWD_RULES_V2, FWD_TX_PORTS, FwdKey, FwdMeta, FwdStats, FwdValue,
    GLOBAL_HAS_HOST_BACKENDS, GLOBAL_HAS_PEERS, GLOBAL_HAS_PORT_RANGES, GlobalConfig, IfaceConfig, MaglevTable,
    PEER_DIRECT, PROTO_TCP, PeerKey, PeerValue, PortRanges, Reason, SNAT_AUTO, SNAT_FIXED, SNAT_OFF, SourceKey,
    conntrack::CT_HOST_BACKEND,
};
use ipnet::IpNet;
use tracing::{debug, info};

use crate::{
    backends,
    config::{Forward, OnForwardRemoved, Peer, Protocol, Snat, SocketRange},
    error::{Error, Result},
    maps::{
        SourceEntry, addr_from_bytes, forward_entries, peer_key, peer_value, port_range_entries, source_entries,
        source_of_entry,
    },
    pins::{self, EditLock, check_bpffs},
    sys,
};

/// Connections flushed or kept when forwards go away: see [`OnForwardRemoved`].
pub const GLOBAL_FLUSH_ON_REMOVE: u32 = 1 << 1;
const _: () = assert!(
    GLOBAL_FLUSH_ON_REMOVE & (forwarder_common::GLOBAL_HAS_PEERS | forwarder_common::GLOBAL_LO_ACCEPT_LOCAL) == 0
);

pub struct State {
    dir: PathBuf,
}

/// Names the map in the error of an operation on it: `map.get(&0, 0).on(FWD_GLOBAL_V2)`.
trait OnMap<T> {
    fn on(self, name: &'static str) -> Result<T>;
}

impl<T> OnMap<T> for std::result::Result<T, aya::maps::MapError> {
    fn on(self, name: &'static str) -> Result<T> {
        self.map_err(|source| Error::Map { name, source })
    }
}

/// What an apply changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    pub added: Vec<String>,
    /// Forwards whose rule changed (listen side, SNAT, local): a new id, their old
    /// connections drain or go by the removal policy.
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Forwards that keep their id and connections with new backends, weights or health
    /// checks: only new connections see the change.
    pub updated: Vec<String>,
    pub flushed_connections: usize,
}

/// A peer as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerEntry {
    pub id: u32,
    pub address: IpAddr,
    pub interface: String,
    pub ifindex: u32,
    /// "direct" (the peer answers its neighbour) or "fallback" (normal routing), as in
    /// `stats`; `direct` says the same as a bool.
    pub state: &'static str,
    pub direct: bool,
}

impl PeerEntry {
    /// A peer as `peer list` and `stats` show it, from its map entry.
    pub fn of(k: &PeerKey, v: &PeerValue) -> Self {
        PeerEntry {
            id: v.peer_id,
            address: addr_from_bytes(&k.addr, k.family),
            interface: nix::net::if_::if_indextoname(v.ifindex)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("#{}", v.ifindex)),
            ifindex: v.ifindex,
            state: if v.state == PEER_DIRECT { "direct" } else { "fallback" },
            direct: v.state == PEER_DIRECT,
        }
    }
}

impl State {
    pub fn open(dir: &Path) -> Result<Self> {
        check_bpffs(dir)?;
        if !dir.join(FWD_RULES_V2).exists() {
            return Err(Error::NoInstance {
                path: dir.display().to_string(),
                message: "no forwarder state here (is `forwarder run` running with this --pin-path?)".into(),
            });
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self, name: &'static str) -> Result<Map> {
        Map::from_map_data(pins::open_map(&self.dir, name)?).on(name)
    }

    /// A pinned map as its typed aya map (`HashMap<_, K, V>`, `Array<_, V>`...).
    fn typed<M: TryFrom<Map, Error = aya::maps::MapError>>(&self, name: &'static str) -> Result<M> {
        M::try_from(self.map(name)?).on(name)
    }

    /// Serialises changes between the daemon's reloads and CLI edits.
    pub fn lock_edits(&self) -> Result<EditLock> {
        pins::lock_edits(&self.dir)
    }

    pub fn global(&self) -> Result<GlobalConfig> {
        let a: Array<_, GlobalConfig> = self.typed(FWD_GLOBAL_V2)?;
        a.get(&0, 0).on(FWD_GLOBAL_V2)
    }

    pub fn set_global(&self, g: GlobalConfig) -> Result<()> {
        let mut a: Array<_, GlobalConfig> = self.typed(FWD_GLOBAL_V2)?;
        a.set(0, g, 0).on(FWD_GLOBAL_V2)
    }

    /// Invalidates every next hop the fast path has cached (see docs/maps.md
    /// `FWD_ROUTE_GEN`): after route, neighbour, link, address, interface, forward or peer
    /// changes, the next packet of each connection takes the full path with a FIB lookup.
    pub fn bump_route_generation(&self) -> Result<u32> {
        let mut a: Array<_, u32> = self.typed(FWD_ROUTE_GEN)?;
        let next = a.get(&0, 0).on(FWD_ROUTE_GEN)?.wrapping_add(1);
        a.set(0, next, 0).on(FWD_ROUTE_GEN)?;
        Ok(next)
    }

    pub fn route_generation(&self) -> Result<u32> {
        let a: Array<_, u32> = self.typed(FWD_ROUTE_GEN)?;
        a.get(&0, 0).on(FWD_ROUTE_GEN)
    }

    /// The routing facts the programs may rely on (`FWD_ROUTE_FLAGS`, `ROUTE_*` bits).
    pub fn set_route_flags(&self, flags: u32) -> Result<()> {
        let mut a: Array<_, u32> = self.typed(FWD_ROUTE_FLAGS)?;
        a.set(0, flags, 0).on(FWD_ROUTE_FLAGS)
    }

    pub fn route_flags(&self) -> Result<u32> {
        let a: Array<_, u32> = self.typed(FWD_ROUTE_FLAGS)?;
        a.get(&0, 0).on(FWD_ROUTE_FLAGS)
    }

    fn set_global_flag(&self, flag: u32, on: bool) -> Result<()> {
        let mut g = self.global()?;
        g.flags = if on { g.flags | flag } else { g.flags & !flag };
        self.set_global(g)
    }

    pub fn capacity(&self, name: &'static str) -> Result<u32> {
        Ok(pins::open_map(&self.dir, name)?.info().on(name)?.max_entries())
    }

    /// The configured forwards, by id, with their source lists.
    pub fn forwards(&self) -> Result<Vec<(u32, Forward)>> {
        let mut out = self.forwards_without_source_lists()?;
        for (name, allow) in [(FWD_ALLOW, true), (FWD_DENY, false)] {
            let mut lists: StdHashMap<u32, Vec<IpNet>> = StdHashMap::new();
            for (id, net) in self.source_list_entries(name)?.iter().filter_map(source_of_entry) {
                lists.entry(id).or_default().push(net);
            }
            if lists.is_empty() {
                continue;
            }
            for (id, f) in &mut out {
                let Some(mut list) = lists.remove(id) else { continue };
                // The config's order (see config::parse_source_list), so that an unchanged
                // forward compares equal to its config.
                list.sort_unstable();
                list.dedup();
                if allow {
                    f.allow = list;
                } else {
                    f.deny = list;
                }
            }
        }
        Ok(out)
    }

    /// Every entry of the source-list trie `name` ([`FWD_ALLOW`] or [`FWD_DENY`]).
    fn source_list_entries(&self, name: &'static str) -> Result<Vec<SourceEntry>> {
        let trie: LpmTrie<MapData, SourceKey, u8> = self.typed(name)?;
        let keys: Vec<Key<SourceKey>> = trie.keys().collect::<std::result::Result<_, _>>().on(name)?;
        Ok(keys.iter().map(|k| (k.prefix_len(), k.data())).collect())
    }

    /// What makes the source-list trie `name` hold exactly `wanted`: the entries to add
    /// and the stale ones. Refused when `wanted` does not fit.
    fn plan_source_list(&self, name: &'static str, wanted: Vec<SourceEntry>) -> Result<SourceListChange> {
        let capacity = self.capacity(name)? as usize;
        let wanted: HashSet<SourceEntry> = wanted.into_iter().collect();
        if wanted.len() > capacity {
            return Err(Error::Invalid(format!(
                "the forwards' {} lists have {} entries in all, more than the {capacity} the map holds",
                if name == FWD_ALLOW { "allow" } else { "deny" },
                wanted.len()
            )));
        }
        let present: HashSet<SourceEntry> = self.source_list_entries(name)?.into_iter().collect();
        let add: Vec<SourceEntry> = wanted.difference(&present).copied().collect();
        let stale: Vec<SourceEntry> = present.difference(&wanted).copied().collect();
        // Old and new side by side must fit too; else the stale ones go first.
        let stale_first = present.len() + add.len() > capacity;
        Ok(SourceListChange { name, add, stale, stale_first })
    }

    fn write_source_entries(&self, name: &'static str, entries: &[SourceEntry], insert: bool) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut trie: LpmTrie<MapData, SourceKey, u8> = self.typed(name)?;
        for (prefix_len, data) in entries {
            let key = Key::new(*prefix_len, *data);
            if insert {
                trie.insert(&key, 1, 0).on(name)?;
            } else {
                // Gone meanwhile is as good as removed.
                let _ = trie.remove(&key);
            }
        }
        Ok(())
    }

    fn forwards_without_source_lists(&self) -> Result<Vec<(u32, Forward)>> {
        let stored = self.stored_backends()?;
        let with_backends = |id: u32, m: &FwdMeta| {
            let mut f = forward_of_meta(m);
            if let Some(list) = stored.get(&id) {
                f.backends = list.iter().map(|(_, v)| backends::backend_of(v, f.listen.span)).collect();
            }
            (id, f)
        };
        let data = pins::open_map(&self.dir, FWD_META_V2)?;
        match sys::lookup_all_batched::<u32, FwdMeta>(data.fd().as_fd()) {
            Ok(all) => {
                let mut out: Vec<(u32, Forward)> = all
                    .iter()
                    .filter(|(id, m)| *id != 0 && m.name[0] != 0)
                    .map(|(id, m)| with_backends(*id, m))
                    .collect();
                out.sort_unstable_by_key(|(id, _)| *id);
                return Ok(out);
            }
            Err(e) => debug!("{FWD_META_V2}: batch lookup failed ({e}), reading entry by entry"),
        }
        let meta: Array<_, FwdMeta> = self.typed(FWD_META_V2)?;
        let mut out = Vec::new();
        for id in 1..meta.len() {
            let Ok(m) = meta.get(&id, 0) else { continue };
            if m.name[0] != 0 {
                out.push(with_backends(id, &m));
            }
        }
        Ok(out)
    }

    /// Every forward's stored backends (slot order).
    pub fn stored_backends(&self) -> Result<backends::Stored> {
        let data = pins::open_map(&self.dir, FWD_BACKENDS)?;
        let all = match sys::lookup_all_batched::<BackendKey, BackendValue>(data.fd().as_fd()) {
            Ok(all) => all,
            Err(e) => {
                debug!("{FWD_BACKENDS}: batch lookup failed ({e}), reading entry by entry");
                let m: HashMap<_, BackendKey, BackendValue> = self.typed(FWD_BACKENDS)?;
                m.iter().filter_map(|r| r.ok()).collect()
            }
        };
        Ok(backends::stored_of(all))
    }

    /// The Maglev tables present.
    fn tables(&self) -> Result<backends::Tables> {
        let m: HashMap<_, u32, MaglevTable> = self.typed(FWD_MAGLEV)?;
        Ok(backends::Tables::of(m.iter().filter_map(|r| r.ok()).collect()))
    }

    /// Writes the new tables of `tables` (before any rule refers to them).
    fn write_tables(&self, tables: &backends::Tables) -> Result<()> {
        let mut m: HashMap<_, u32, MaglevTable> = self.typed(FWD_MAGLEV)?;
        for (id, content) in &tables.new {
            m.insert(id, backends::table_value(content), 0).on(FWD_MAGLEV)?;
        }
        Ok(())
    }

    /// Removes the tables no rule refers to any more (after the rules are written).
    fn drop_unreferenced_tables(&self, tables: &backends::Tables) -> Result<()> {
        let mut m: HashMap<_, u32, MaglevTable> = self.typed(FWD_MAGLEV)?;
        for id in tables.unreferenced() {
            let _ = m.remove(&id);
        }
        Ok(())
    }

    /// Marks a backend up or down (health checks) and makes the forward's new connections
    /// choose accordingly; its established connections are untouched. Returns whether the
    /// state changed.
    pub fn set_backend_down(&self, forward_id: u32, slot: u32, down: bool) -> Result<bool> {
        let mut m: HashMap<_, BackendKey, BackendValue> = self.typed(FWD_BACKENDS)?;
        let key = BackendKey { forward_id, slot };
        let Ok(mut v) = m.get(&key, 0) else { return Ok(false) };
        let state = if down { v.state | BACKEND_DOWN } else { v.state & !BACKEND_DOWN };
        if state == v.state {
            return Ok(false);
        }
        v.state = state;
        m.insert(key, v, 0).on(FWD_BACKENDS)?;
        self.rechoose(forward_id)?;
        if down {
            self.forget_closed_connections_of(&HashSet::from([v.index]))?;
        }
        Ok(true)
    }

    /// Removes the closed TCP connections (TIME_WAIT, CLOSE) of these backends. A SYN that
    /// reuses a closed connection's tuple reopens it with the same mapping; for a backend
    /// that takes no new connections it must be a new connection that chooses again, as
    /// netfilter makes a new conntrack (and NAT decision) for it.
    fn forget_closed_connections_of(&self, indices: &HashSet<u32>) -> Result<()> {
        use forwarder_common::conntrack::{TCP_CLOSE, TCP_TIME_WAIT};
        if indices.is_empty() {
            return Ok(());
        }
        let closed: Vec<CtKey> = self
            .conntrack()?
            .into_iter()
            .filter(|(k, v)| {
                k.proto == PROTO_TCP
                    && (v.state == TCP_TIME_WAIT || v.state == TCP_CLOSE)
                    && indices.contains(&v.backend_index())
            })
            .map(|(k, _)| k)
            .collect();
        self.remove_conntrack(&closed)
    }

    /// Rewrites the rules of one forward for its backends' current weights and states.
    fn rechoose(&self, forward_id: u32) -> Result<()> {
        let placed = self.stored_backends()?.remove(&forward_id).unwrap_or_default();
        let mut tables = self.tables()?;
        let mut rules: HashMap<_, FwdKey, FwdValue> = self.typed(FWD_RULES_V2)?;
        let all: Vec<(FwdKey, FwdValue)> = rules.iter().filter_map(|r| r.ok()).collect();
        let choice = backends::choice(&placed);
        let mut updated = Vec::new();
        for (k, mut v) in all {
            if v.forward_id == forward_id {
                backends::apply_choice(&mut v, choice.clone(), &mut tables);
                updated.push((k, v));
            } else if v.flags & FWD_FLAG_MAGLEV != 0 {
                tables.referenced.insert(v.table_id);
            }
        }
        self.write_tables(&tables)?;
        for (k, v) in &updated {
            rules.insert(k, v, 0).on(FWD_RULES_V2)?;
        }
        if let Some((_, v)) = updated.first() {
            let mut meta: Array<_, FwdMeta> = self.typed(FWD_META_V2)?;
            if let Ok(mut m) = meta.get(&forward_id, 0) {
                m.value = *v;
                meta.set(forward_id, m, 0).on(FWD_META_V2)?;
            }
        }
        self.drop_unreferenced_tables(&tables)
    }

    /// Makes the forwards exactly `desired`: unchanged forwards keep their id, counters and
    /// connections; new ones get free ids; the connections of removed or changed forwards
    /// follow `policy`. Rule keys are inserted before stale ones are removed, so every
    /// moment a packet sees either the old or the new rule.
    pub fn apply_forwards(
        &self,
        desired: &[Forward],
        local_addrs: &[IpAddr],
        policy: OnForwardRemoved,
    ) -> Result<ApplyReport> {
        let current = self.forwards()?;
        let capacity = self.capacity(FWD_META_V2)?;
        // Each id's name and source lists before the change: a forward that keeps its id
        // while its lists change refuses (flush) the connections of sources now refused.
        let lists_before: StdHashMap<u32, (String, Vec<IpNet>, Vec<IpNet>)> =
            current.iter().map(|(id, f)| (*id, (f.name.clone(), f.allow.clone(), f.deny.clone()))).collect();
        let ForwardPlan { with_ids, retired, mut report } = plan_forwards(current, desired, capacity)?;

        let mut entries = forward_entries(&with_ids, local_addrs);
        for (e, (_, f)) in entries.iter().zip(&with_ids) {
            if e.value.flags & FWD_FLAG_HOST_BACKEND != 0 && e.value.snat_mode == SNAT_FIXED {
                return Err(Error::Invalid(format!(
                    "forward {:?}: backend {} is on this host, which delivers to it with the client's address as \
                     the source (as REDIRECT does); a fixed snat address cannot apply: use snat = \"auto\" or \"off\"",
                    f.name, f.backends[0].address
                )));
            }
            if let Some(b) = f.backends.iter().find(|b| f.backends.len() > 1 && local_addrs.contains(&b.address.ip())) {
                return Err(Error::Invalid(format!(
                    "forward {:?}: backend {} is on this host: a forward delivers to a backend on this host only as \
                     its one backend",
                    f.name, b.address
                )));
            }
        }
        // Source lists that do not fit are refused before anything is written.
        let source_lists = [
            self.plan_source_list(FWD_ALLOW, source_entries(&with_ids, true))?,
            self.plan_source_list(FWD_DENY, source_entries(&with_ids, false))?,
        ];
        // Backends: slots, counter indices and states kept for those that stay; the rules
        // choose among them.
        let stored = self.stored_backends()?;
        let (placed, fresh) = backends::place(&with_ids, &stored, self.capacity(FWD_BE_STATS)?.saturating_sub(1))
            .map_err(Error::Invalid)?;
        let mut tables = self.tables()?;
        let mut choices = backends::Choices::default();
        for (e, p) in entries.iter_mut().zip(&placed) {
            backends::apply_choice(&mut e.value, choices.of(p), &mut tables);
            e.meta.value = e.value;
        }
        self.zero_backend_stats(&fresh)?;
        self.write_tables(&tables)?;
        let mut backend_map: HashMap<_, BackendKey, BackendValue> = self.typed(FWD_BACKENDS)?;
        let mut wanted_backends = HashSet::new();
        let mut changed_backends: Vec<(BackendKey, BackendValue)> = Vec::new();
        for ((id, _), p) in with_ids.iter().zip(&placed) {
            for (slot, v) in p {
                let key = BackendKey { forward_id: *id, slot: *slot };
                wanted_backends.insert(key);
                let unchanged = stored.get(id).is_some_and(|l| l.iter().any(|(s, c)| s == slot && c == v));
                if !unchanged {
                    changed_backends.push((key, *v));
                }
            }
        }
        let (keys, values): (Vec<BackendKey>, Vec<BackendValue>) = changed_backends.into_iter().unzip();
        let backends_data = pins::open_map(&self.dir, FWD_BACKENDS)?;
        if let Err((done, e)) = sys::update_batch(backends_data.fd().as_fd(), &keys, &values) {
            debug!("{FWD_BACKENDS}: batch update failed ({e}), writing entry by entry");
            for (k, v) in keys[done..].iter().zip(&values[done..]) {
                backend_map.insert(k, v, 0).on(FWD_BACKENDS)?;
            }
        }
        let ranges = port_range_entries(&entries).map_err(Error::Invalid)?;
        // A rule that names a list finds its entries in place; stale entries go once no
        // rule names them.
        for change in &source_lists {
            if change.stale_first {
                self.write_source_entries(change.name, &change.stale, false)?;
            }
            self.write_source_entries(change.name, &change.add, true)?;
        }
        // TC egress rewrites the replies of backends on this host: on before a rule can
        // send it one (re-checked at every apply).
        let host_forwards = entries.iter().any(|e| e.value.flags & FWD_FLAG_HOST_BACKEND != 0);
        if host_forwards {
            self.set_global_flag(GLOBAL_HAS_HOST_BACKENDS, true)?;
        }
        let mut rules: HashMap<_, FwdKey, FwdValue> = self.typed(FWD_RULES_V2)?;
        let rules_data = pins::open_map(&self.dir, FWD_RULES_V2)?;
        let wanted: HashSet<FwdKey> = entries.iter().flat_map(|e| e.keys.iter().copied()).collect();
        let present: Vec<FwdKey> = match sys::lookup_all_batched::<FwdKey, FwdValue>(rules_data.fd().as_fd()) {
            Ok(all) => all.into_iter().map(|(k, _)| k).collect(),
            Err(e) => {
                debug!("{FWD_RULES_V2}: batch lookup failed ({e}), reading key by key");
                rules.keys().filter_map(|k| k.ok()).collect()
            }
        };
        let stale: Vec<FwdKey> = present.into_iter().filter(|k| !wanted.contains(k)).collect();
        let (keys, values): (Vec<FwdKey>, Vec<FwdValue>) =
            entries.iter().flat_map(|e| e.keys.iter().map(|k| (*k, e.value))).unzip();
        if let Err((done, e)) = sys::update_batch(rules_data.fd().as_fd(), &keys, &values) {
            debug!("{FWD_RULES_V2}: batch update failed ({e}), writing entry by entry");
            for (k, v) in keys[done..].iter().zip(&values[done..]) {
                rules.insert(k, v, 0).on(FWD_RULES_V2)?;
            }
        }
        // Ranges name rules by their first port: written after the rules, before the stale
        // rules go; looked up once some forward has one.
        self.apply_port_ranges(&ranges)?;
        if !ranges.is_empty() {
            self.set_global_flag(GLOBAL_HAS_PORT_RANGES, true)?;
        }
        for k in &stale {
            rules.remove(k).on(FWD_RULES_V2)?;
        }
        for change in source_lists.iter().filter(|c| !c.stale_first) {
            self.write_source_entries(change.name, &change.stale, false)?;
        }
        for (id, list) in &stored {
            for (slot, _) in list {
                let key = BackendKey { forward_id: *id, slot: *slot };
                if !wanted_backends.contains(&key) {
                    let _ = backend_map.remove(&key);
                }
            }
        }
        self.drop_unreferenced_tables(&tables)?;
        // Backends that take no new connections now (removed, drained, down).
        let kept: HashSet<u32> = placed.iter().flatten().filter(|(_, v)| takes_new(v)).map(|(_, v)| v.index).collect();
        let out: HashSet<u32> = stored.values().flatten().map(|(_, v)| v.index).filter(|i| !kept.contains(i)).collect();
        self.forget_closed_connections_of(&out)?;
        if ranges.is_empty() {
            self.set_global_flag(GLOBAL_HAS_PORT_RANGES, false)?;
        }
        // Metadata of every desired forward, then cleared slots of the retired ids not reused.
        let live_ids: HashSet<u32> = with_ids.iter().map(|(id, _)| *id).collect();
        let (ids, metas): (Vec<u32>, Vec<FwdMeta>) = entries
            .iter()
            .map(|e| (e.id, e.meta))
            .chain(retired.iter().filter(|id| !live_ids.contains(id)).map(|id| (*id, FwdMeta::default())))
            .unzip();
        let meta_data = pins::open_map(&self.dir, FWD_META_V2)?;
        if let Err((done, e)) = sys::update_batch(meta_data.fd().as_fd(), &ids, &metas) {
            debug!("{FWD_META_V2}: batch update failed ({e}), writing entry by entry");
            let mut meta: Array<_, FwdMeta> = self.typed(FWD_META_V2)?;
            for (id, m) in ids[done..].iter().zip(&metas[done..]) {
                meta.set(*id, m, 0).on(FWD_META_V2)?;
            }
        }
        self.set_global_flag(GLOBAL_FLUSH_ON_REMOVE, policy == OnForwardRemoved::Flush)?;
        if policy == OnForwardRemoved::Flush && !retired.is_empty() {
            report.flushed_connections = self.flush_connections_of(&retired)?;
        }
        if policy == OnForwardRemoved::Flush {
            let relisted: StdHashMap<u32, &Forward> = with_ids
                .iter()
                .filter(|(id, f)| {
                    lists_before
                        .get(id)
                        .is_some_and(|(name, allow, deny)| *name == f.name && (*allow != f.allow || *deny != f.deny))
                })
                .map(|(id, f)| (*id, f))
                .collect();
            if !relisted.is_empty() {
                report.flushed_connections += self.flush_refused_sources(&relisted)?;
            }
        }
        if !host_forwards && self.global()?.flags & GLOBAL_HAS_HOST_BACKENDS != 0 {
            // Off once no connection to a backend on this host is left to drain.
            let draining = self.conntrack()?.iter().any(|(_, v)| v.flags & CT_HOST_BACKEND != 0);
            self.set_global_flag(GLOBAL_HAS_HOST_BACKENDS, draining)?;
        }
        self.bump_route_generation()?;
        if !report.added.is_empty()
            || !report.changed.is_empty()
            || !report.removed.is_empty()
            || !report.updated.is_empty()
        {
            info!(added = %names_for_log(&report.added), changed = %names_for_log(&report.changed),
                removed = %names_for_log(&report.removed), updated = %names_for_log(&report.updated),
                flushed = report.flushed_connections, "forwards applied");
        }
        Ok(report)
    }

    /// Makes `FWD_PORT_RANGES` exactly `desired`.
    fn apply_port_ranges(&self, desired: &[(FwdKey, PortRanges)]) -> Result<()> {
        if desired.is_empty() && !self.dir.join(FWD_PORT_RANGES).exists() {
            // An instance of a version before port ranges: nothing to write.
            return Ok(());
        }
        let mut map: HashMap<_, FwdKey, PortRanges> = self.typed(FWD_PORT_RANGES)?;
        let wanted: HashSet<FwdKey> = desired.iter().map(|(k, _)| *k).collect();
        let stale: Vec<FwdKey> = map.keys().filter_map(|k| k.ok()).filter(|k| !wanted.contains(k)).collect();
        for (k, v) in desired {
            map.insert(k, v, 0).on(FWD_PORT_RANGES)?;
        }
        for k in &stale {
            map.remove(k).on(FWD_PORT_RANGES)?;
        }
        Ok(())
    }

    /// The removal policy recorded by the daemon (CLI edits follow it).
    pub fn removal_policy(&self) -> Result<OnForwardRemoved> {
        Ok(if self.global()?.flags & GLOBAL_FLUSH_ON_REMOVE != 0 {
            OnForwardRemoved::Flush
        } else {
            OnForwardRemoved::Drain
        })
    }

    /// Deletes both entries of every connection of the given forwards; returns connections.
    pub fn flush_connections_of(&self, ids: &[u32]) -> Result<usize> {
        let ids: HashSet<u32> = ids.iter().copied().collect();
        let doomed: Vec<(CtKey, CtValue)> =
            self.conntrack()?.into_iter().filter(|(_, v)| ids.contains(&v.forward_id)).collect();
        self.remove_conntrack(&doomed.iter().map(|(k, _)| *k).collect::<Vec<_>>())?;
        Ok(doomed.iter().filter(|(_, v)| v.direction == CT_DIR_ORIGINAL).count())
    }

    /// Deletes the connections of the given forwards (by id) whose client their source
    /// lists now refuse; returns connections.
    fn flush_refused_sources(&self, forwards: &StdHashMap<u32, &Forward>) -> Result<usize> {
        let entries = self.conntrack()?;
        let mut doomed = Vec::new();
        for (key, (value, reply)) in connections(&entries) {
            let Some(f) = forwards.get(&value.forward_id) else { continue };
            if !f.admits_source(addr_from_bytes(&key.src_addr, key.family)) {
                doomed.push(key);
                doomed.push(reply);
            }
        }
        self.remove_conntrack(&doomed)?;
        Ok(doomed.len() / 2)
    }

    pub fn peers(&self) -> Result<Vec<PeerEntry>> {
        let m: HashMap<_, PeerKey, PeerValue> = self.typed(FWD_PEERS)?;
        let mut out: Vec<PeerEntry> = m.iter().filter_map(|r| r.ok()).map(|(k, v)| PeerEntry::of(&k, &v)).collect();
        out.sort_by_key(|p| p.id);
        Ok(out)
    }

    /// Makes the peers exactly `desired`; a peer that stays keeps its id and state.
    pub fn apply_peers(&self, desired: &[Peer]) -> Result<()> {
        let current = self.peers()?;
        let mut m: HashMap<_, PeerKey, PeerValue> = self.typed(FWD_PEERS)?;
        let mut used: HashSet<u32> = HashSet::new();
        let mut plan = Vec::new();
        for p in desired {
            let ifindex = crate::system::ifindex(&p.interface)?;
            let same = current.iter().find(|c| c.address == p.address && c.ifindex == ifindex);
            plan.push((p, ifindex, same.map(|c| (c.id, c.direct))));
            if let Some(c) = same {
                used.insert(c.id);
            }
        }
        let mut free = (1..=forwarder_common::MAX_PEERS).filter(|id| !used.contains(id));
        for (p, ifindex, kept) in plan {
            let (id, direct) = match kept {
                Some(k) => k,
                None => (free.next().ok_or_else(|| Error::Invalid("too many peers".into()))?, false),
            };
            m.insert(peer_key(p.address), peer_value(ifindex, id, direct), 0).on(FWD_PEERS)?;
        }
        for c in current {
            if !desired.iter().any(|p| p.address == c.address) {
                let _ = m.remove(&peer_key(c.address));
            }
        }
        self.set_global_flag(GLOBAL_HAS_PEERS, !desired.is_empty())?;
        // A destination that became a peer must leave the fast path.
        self.bump_route_generation().map(drop)
    }

    pub fn set_peer_state(&self, peer: &PeerEntry, direct: bool) -> Result<()> {
        let mut m: HashMap<_, PeerKey, PeerValue> = self.typed(FWD_PEERS)?;
        m.insert(peer_key(peer.address), peer_value(peer.ifindex, peer.id, direct), 0).on(FWD_PEERS)?;
        self.bump_route_generation().map(drop)
    }

    /// Records how XDP may treat `ifindex` as an egress, and makes it a devmap target.
    pub fn set_egress(&self, ifindex: u32, flags: u32) -> Result<()> {
        let mut ifaces: HashMap<_, u32, IfaceConfig> = self.typed(FWD_IFACES)?;
        ifaces.insert(ifindex, IfaceConfig { flags }, 0).on(FWD_IFACES)?;
        let mut tx: DevMapHash<_> = self.typed(FWD_TX_PORTS)?;
        tx.insert(ifindex, ifindex, None, 0)
            .map_err(|e| Error::Interface { name: ifindex.to_string(), message: format!("devmap: {e}") })?;
        Ok(())
    }

    /// Forgets an interface [`State::set_egress`] recorded (gone, or left the config).
    pub fn remove_iface(&self, ifindex: u32) -> Result<()> {
        let mut ifaces: HashMap<_, u32, IfaceConfig> = self.typed(FWD_IFACES)?;
        match ifaces.remove(&ifindex) {
            Err(e) if !no_such_key(&e) => return Err(e).on(FWD_IFACES),
            _ => {}
        }
        // The kernel empties a devmap slot of a device it unregisters by itself.
        let mut tx: DevMapHash<_> = self.typed(FWD_TX_PORTS)?;
        match tx.remove(ifindex) {
            Err(e) if !no_such_key(&e) => {
                Err(Error::Interface { name: ifindex.to_string(), message: format!("devmap: {e}") })
            }
            _ => Ok(()),
        }
    }

    /// The interfaces [`State::set_egress`] recorded.
    pub fn iface_indexes(&self) -> Result<Vec<u32>> {
        let ifaces: HashMap<_, u32, IfaceConfig> = self.typed(FWD_IFACES)?;
        ifaces.keys().collect::<std::result::Result<_, _>>().on(FWD_IFACES)
    }

    /// The `IFACE_*` flags recorded for `ifindex`, if it has an entry.
    pub fn iface_flags(&self, ifindex: u32) -> Result<Option<u32>> {
        let ifaces: HashMap<_, u32, IfaceConfig> = self.typed(FWD_IFACES)?;
        match ifaces.get(&ifindex, 0) {
            Ok(c) => Ok(Some(c.flags)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).on(FWD_IFACES),
        }
    }

    /// Rewrites the `IFACE_*` flags of an interface [`State::set_egress`] recorded.
    pub fn set_iface_flags(&self, ifindex: u32, flags: u32) -> Result<()> {
        let mut ifaces: HashMap<_, u32, IfaceConfig> = self.typed(FWD_IFACES)?;
        ifaces.insert(ifindex, IfaceConfig { flags }, 0).on(FWD_IFACES)
    }

    /// Every conntrack entry (diagnostics, expiry), read in batches: the expiry pass reads
    /// the whole table every few seconds, and entry by entry that is two syscalls per entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let data = pins::open_map(&self.dir, FWD_CT_V4)?;
        match sys::lookup_all_batched::<CtKey, CtValue>(data.fd().as_fd()) {
            Ok(all) => return Ok(all),
            Err(e) => debug!("{FWD_CT_V4}: batch lookup failed ({e}), reading entry by entry"),
        }
        let ct: HashMap<_, CtKey, CtValue> = self.typed(FWD_CT_V4)?;
        Ok(ct.iter().filter_map(|r| r.ok()).collect())
    }

    pub fn conntrack_entry(&self, key: &CtKey) -> Option<CtValue> {
        let ct: HashMap<_, CtKey, CtValue> = HashMap::try_from(self.map(FWD_CT_V4).ok()?).ok()?;
        ct.get(key, 0).ok()
    }

    pub fn conntrack_len(&self) -> Result<usize> {
        let ct: HashMap<_, CtKey, CtValue> = self.typed(FWD_CT_V4)?;
        Ok(ct.keys().filter(|k| k.is_ok()).count())
    }

    /// Writes one entry (tests, and tools that age or repair entries).
    pub fn put_conntrack(&self, key: &CtKey, value: &CtValue) -> Result<()> {
        let mut ct: HashMap<_, CtKey, CtValue> = self.typed(FWD_CT_V4)?;
        ct.insert(key, value, 0).on(FWD_CT_V4)
    }

    /// Deletes these entries. Moves the route generation too: the XDP flow cache keeps
    /// copies of entries, which must not outlive them.
    pub fn remove_conntrack(&self, keys: &[CtKey]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let data = pins::open_map(&self.dir, FWD_CT_V4)?;
        // Entries may go meanwhile (the kernel's early drop): the batch call stops at the
        // first missing key, the rest go one by one.
        let done = match sys::delete_batch(data.fd().as_fd(), keys) {
            Ok(()) => keys.len(),
            Err((done, _)) => done,
        };
        let mut ct: HashMap<_, CtKey, CtValue> = self.typed(FWD_CT_V4)?;
        for k in &keys[done.min(keys.len())..] {
            let _ = ct.remove(k);
        }
        if !keys.is_empty() {
            self.bump_route_generation()?;
        }
        Ok(())
    }

    /// Zeroes the reason and per-forward counters and empties the connection table (test
    /// and benchmark fixtures start from a known state).
    pub fn reset(&self) -> Result<()> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| Error::Io(e))?;
        let mut reasons: PerCpuArray<MapData, u64> = self.typed(FWD_REASONS)?;
        for i in 0..reasons.len() {
            reasons.set(i, vec![0u64; ncpu].try_into().expect("one per CPU"), 0).on(FWD_REASONS)?;
        }
        let mut stats: PerCpuArray<MapData, FwdStats> = self.typed(FWD_FWD_STATS)?;
        for i in 0..stats.len() {
            stats.set(i, vec![FwdStats::default(); ncpu].try_into().expect("one per CPU"), 0).on(FWD_FWD_STATS)?;
        }
        let mut denied: PerCpuArray<MapData, u64> = self.typed(FWD_FWD_DENIED)?;
        for i in 0..denied.len() {
            denied.set(i, vec![0u64; ncpu].try_into().expect("one per CPU"), 0).on(FWD_FWD_DENIED)?;
        }
        let keys: Vec<CtKey> = self.conntrack()?.into_iter().map(|(k, _)| k).collect();
        self.remove_conntrack(&keys)
    }

    /// Zeroes the counters of backend indices given to new backends.
    fn zero_backend_stats(&self, indices: &[u32]) -> Result<()> {
        if indices.is_empty() {
            return Ok(());
        }
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| Error::Io(e))?;
        let value_size = ncpu * std::mem::size_of::<FwdStats>().next_multiple_of(8);
        let data = pins::open_map(&self.dir, FWD_BE_STATS)?;
        let zeros = vec![0u8; indices.len() * value_size];
        if let Err((done, e)) = sys::update_batch_bytes(data.fd().as_fd(), indices, &zeros, value_size) {
            debug!("{FWD_BE_STATS}: batch update failed ({e}), writing entry by entry");
            let mut stats: PerCpuArray<MapData, FwdStats> = self.typed(FWD_BE_STATS)?;
            for i in &indices[done..] {
                stats.set(*i, vec![FwdStats::default(); ncpu].try_into().expect("one per CPU"), 0).on(FWD_BE_STATS)?;
            }
        }
        Ok(())
    }

    /// Per-backend counters summed over CPUs, by counter index.
    pub fn backend_stats(&self, index: u32) -> Result<FwdStats> {
        let arr: PerCpuArray<MapData, FwdStats> = self.typed(FWD_BE_STATS)?;
        Ok(sum_forward(&arr, index))
    }

    /// Per-forward counters summed over CPUs.
    pub fn forward_stats(&self, id: u32) -> Result<FwdStats> {
        let arr: PerCpuArray<MapData, FwdStats> = self.typed(FWD_FWD_STATS)?;
        Ok(sum_forward(&arr, id))
    }

    /// New connections of forward `id` its source lists refused, summed over CPUs.
    pub fn forward_source_denied(&self, id: u32) -> Result<u64> {
        let arr: PerCpuArray<MapData, u64> = self.typed(FWD_FWD_DENIED)?;
        Ok(sum_reason(&arr, id))
    }

    /// A reason counter summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        let arr: PerCpuArray<MapData, u64> = self.typed(FWD_REASONS)?;
        Ok(sum_reason(&arr, reason as u32))
    }
}

/// A forward's counters summed over CPUs (zero for an id never used).
pub fn sum_forward<T: std::borrow::Borrow<MapData>>(arr: &PerCpuArray<T, FwdStats>, id: u32) -> FwdStats {
    let mut total = FwdStats::default();
    if let Ok(values) = arr.get(&id, 0) {
        for v in values.iter() {
            total.packets += v.packets;
            total.bytes += v.bytes;
            total.new_conns += v.new_conns;
            total.local_conns += v.local_conns;
        }
    }
    total
}

/// A reason counter summed over CPUs.
pub fn sum_reason<T: std::borrow::Borrow<MapData>>(arr: &PerCpuArray<T, u64>, code: u32) -> u64 {
    arr.get(&code, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// How [`State::apply_forwards`] brings one source-list trie to the desired entries.
struct SourceListChange {
    name: &'static str,
    add: Vec<SourceEntry>,
    stale: Vec<SourceEntry>,
    /// Old and new entries together would not fit: the stale ones are removed first.
    stale_first: bool,
}

/// How [`State::apply_forwards`] gets from the current forwards to the desired ones.
struct ForwardPlan {
    /// Every desired forward with its id.
    with_ids: Vec<(u32, Forward)>,
    /// Ids of current forwards that were removed or changed.
    retired: Vec<u32>,
    report: ApplyReport,
}

/// The backend takes new connections: weight above 0, not down.
fn takes_new(v: &BackendValue) -> bool {
    v.weight > 0 && v.state & BACKEND_DOWN == 0
}

/// Unchanged forwards keep their id; changed and new ones get the lowest ids below
/// `capacity` that no current forward holds (a changed forward's old id keeps draining its
/// connections). Linear in the number of forwards.
fn plan_forwards(current: Vec<(u32, Forward)>, desired: &[Forward], capacity: u32) -> Result<ForwardPlan> {
    let current: BTreeMap<String, (u32, Forward)> =
        current.into_iter().map(|(id, f)| (f.name.clone(), (id, f))).collect();
    let current_ids: HashSet<u32> = current.values().map(|(id, _)| *id).collect();
    let mut free = (1..capacity).filter(|id| !current_ids.contains(id));
    let mut next_free =
        || free.next().ok_or_else(|| Error::Invalid("no free forward id (raise limits.max_forwards)".into()));
    let mut report = ApplyReport::default();
    let mut with_ids = Vec::with_capacity(desired.len());
    let mut retired = Vec::new();
    for f in desired {
        match current.get(&f.name) {
            Some((id, c)) if c == f => with_ids.push((*id, f.clone())),
            Some((id, c)) if c.same_rule(f) => {
                // Backends, weights, health checks or source lists only: the id and
                // connections stay (a source the new lists refuse is flushed below).
                report.updated.push(f.name.clone());
                with_ids.push((*id, f.clone()));
            }
            Some((id, _)) => {
                // Changed: its old connections keep their old rewrite (drain) or go
                // (flush); new connections get a fresh id and the new rule.
                retired.push(*id);
                report.changed.push(f.name.clone());
                with_ids.push((next_free()?, f.clone()));
            }
            None => {
                report.added.push(f.name.clone());
                with_ids.push((next_free()?, f.clone()));
            }
        }
    }
    let desired_names: HashSet<&str> = desired.iter().map(|f| f.name.as_str()).collect();
    for (name, (id, _)) in &current {
        if !desired_names.contains(name.as_str()) {
            retired.push(*id);
            report.removed.push(name.clone());
        }
    }
    Ok(ForwardPlan { with_ids, retired, report })
}

/// The config form of a stored forward.
pub fn forward_of_meta(m: &FwdMeta) -> Forward {
    let name_len = m.name.iter().position(|&b| b == 0).unwrap_or(m.name.len());
    let span = m.value.port_span;
    let listen = SocketRange {
        addr: SocketAddr::new(addr_from_bytes(&m.key.addr, m.key.family), u16::from_be(m.key.port_be)),
        span,
    };
    let backend = SocketRange {
        addr: SocketAddr::new(
            addr_from_bytes(&m.value.backend_addr, m.value.family),
            u16::from_be(m.value.backend_port_be),
        ),
        span: if m.value.flags & FWD_FLAG_PORT_OFFSET != 0 { span } else { 0 },
    };
    let snat = match m.value.snat_mode {
        SNAT_OFF => Snat::Off,
        SNAT_AUTO => Snat::Auto,
        _ => {
            Snat::Address(addr_from_bytes(&m.value.snat_addr, if m.value.family == FAMILY_V6 { FAMILY_V6 } else { 4 }))
        }
    };
    Forward {
        name: String::from_utf8_lossy(&m.name[..name_len]).into_owned(),
        protocol: if m.key.proto == PROTO_TCP { Protocol::Tcp } else { Protocol::Udp },
        listen,
        // The stored backends replace it (`State::forwards`).
        backends: vec![crate::config::Backend { address: backend, weight: 1 }],
        snat,
        local: m.value.flags & FWD_FLAG_LOCAL != 0,
        allow: Vec::new(),
        deny: Vec::new(),
        health: crate::maps::health_of(&m.health),
    }
}

/// Conntrack connections grouped: original-direction key → (its value, reply key).
pub fn connections(entries: &[(CtKey, CtValue)]) -> StdHashMap<CtKey, (CtValue, CtKey)> {
    entries
        .iter()
        .filter(|(_, v)| v.direction == CT_DIR_ORIGINAL)
        .map(|(k, v)| {
            let reply = CtKey {
                src_addr: v.new_dst_addr,
                dst_addr: v.new_src_addr,
                src_port_be: v.new_dst_port_be,
                dst_port_be: v.new_src_port_be,
                proto: k.proto,
                family: k.family,
                _pad: [0; 2],
            };
            (*k, (*v, reply))
        })
        .collect()
}

/// Forward names for a log line: all of a few, the first few and a count of many (a config
/// of 100,000 forwards would otherwise log megabytes).
fn names_for_log(names: &[String]) -> String {
    const NAMED: usize = 16;
    if names.len() <= NAMED {
        return format!("[{}]", names.join(", "));
    }
    format!("[{}, … {} more]", names[..NAMED].join(", "), names.len() - NAMED)
}

/// A delete of a key that is not there (the kernel's ENOENT).
fn no_such_key(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
        || matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(i: u32) -> Forward {
        Forward {
            name: format!("x{i}"),
            protocol: Protocol::Udp,
            listen: SocketAddr::new([198, 51, 100, 1 + (i / 60_000) as u8].into(), 1024 + (i % 60_000) as u16).into(),
            backends: vec![crate::config::Backend { address: "203.0.113.2:9".parse().unwrap(), weight: 1 }],
            snat: Snat::Auto,
            local: true,
            allow: Vec::new(),
            deny: Vec::new(),
            health: None,
        }
    }

    /// Creates a map with a raw BPF_MAP_CREATE and pins it at `path`.
    fn create_pinned_map(path: &Path, map_type: u32, key_size: usize, value_size: usize, max_entries: u32) {
        create_pinned_map_with_flags(path, map_type, key_size, value_size, max_entries, 0);
    }

    /// [`create_pinned_map`] with `map_flags` (an LPM trie needs BPF_F_NO_PREALLOC).
    fn create_pinned_map_with_flags(
        path: &Path,
        map_type: u32,
        key_size: usize,
        value_size: usize,
        max_entries: u32,
        map_flags: u32,
    ) {
        use std::os::unix::ffi::OsStrExt;
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_OBJ_PIN: libc::c_long = 6;
        // union bpf_attr, map_create member: map_type, key_size, value_size, max_entries,
        // map_flags.
        let mut attr = [0u32; 32];
        attr[..5].copy_from_slice(&[map_type, key_size as u32, value_size as u32, max_entries, map_flags]);
        // SAFETY: a zeroed bpf_attr of the advertised size with the map_create fields set.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // union bpf_attr, obj member: pathname (u64), bpf_fd.
        let mut attr = [0u64; 16];
        attr[0] = cpath.as_ptr() as u64;
        attr[1] = fd as u64;
        // SAFETY: as above; cpath outlives the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        assert!(rc == 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
        // SAFETY: fd is ours; the pin keeps the map.
        unsafe { libc::close(fd as i32) };
    }

    /// The maps apply_forwards writes, pinned in a fresh directory on /sys/fs/bpf.
    fn pinned_state(max_forwards: u32) -> (State, PathBuf) {
        const HASH: u32 = 1;
        const ARRAY: u32 = 2;
        // One directory per call: the tests of this binary run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(format!("/sys/fs/bpf/forwarder-unit-{}-{n}", std::process::id()));
        // A fresh machine may have no bpffs mounted yet (the daemon mounts it as it starts).
        crate::pins::mount_default_bpffs(&dir);
        crate::pins::remove(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = std::mem::size_of::<FwdKey>();
        create_pinned_map(&dir.join(FWD_RULES_V2), HASH, size, std::mem::size_of::<FwdValue>(), max_forwards);
        create_pinned_map(&dir.join(FWD_META_V2), ARRAY, 4, std::mem::size_of::<FwdMeta>(), max_forwards + 1);
        create_pinned_map(&dir.join(FWD_GLOBAL_V2), ARRAY, 4, std::mem::size_of::<GlobalConfig>(), 1);
        let backend_size = (std::mem::size_of::<BackendKey>(), std::mem::size_of::<BackendValue>());
        create_pinned_map(&dir.join(FWD_BACKENDS), HASH, backend_size.0, backend_size.1, max_forwards * 2);
        create_pinned_map(&dir.join(FWD_MAGLEV), HASH, 4, std::mem::size_of::<MaglevTable>(), 64);
        const PERCPU_ARRAY: u32 = 6;
        let stats = std::mem::size_of::<FwdStats>();
        create_pinned_map(&dir.join(FWD_BE_STATS), PERCPU_ARRAY, 4, stats, max_forwards * 2 + 1);
        create_pinned_map(&dir.join(FWD_ROUTE_GEN), ARRAY, 4, 4, 1);
        create_pinned_map(
            &dir.join(FWD_CT_V4),
            HASH,
            std::mem::size_of::<CtKey>(),
            std::mem::size_of::<CtValue>(),
            1024,
        );
        const LPM_TRIE: u32 = 11;
        const BPF_F_NO_PREALLOC: u32 = 1;
        for name in [FWD_ALLOW, FWD_DENY] {
            let key_size = 4 + std::mem::size_of::<SourceKey>();
            create_pinned_map_with_flags(&dir.join(name), LPM_TRIE, key_size, 1, 64, BPF_F_NO_PREALLOC);
        }
        (State::open(&dir).unwrap(), dir)
    }

    /// Removes the test's pins on every exit path.
    struct Pins(PathBuf);

    impl Drop for Pins {
        fn drop(&mut self) {
            crate::pins::remove(&self.0);
        }
    }

    /// Batched writes and reads (several batches of 8192) through real pinned maps: add,
    /// re-apply unchanged, reload with a removal and a change. Root (creates BPF maps), as
    /// every test here runs. `--release --nocapture` prints how long the map writes take.
    #[test]
    fn apply_many_forwards_to_pinned_maps() {
        const N: u32 = 30_000;
        let (state, dir) = pinned_state(N + 1);
        let _pins = Pins(dir.clone());
        let desired: Vec<Forward> = (0..N).map(fwd).collect();
        let t = std::time::Instant::now();
        let r = state.apply_forwards(&desired, &[], OnForwardRemoved::Drain).unwrap();
        eprintln!("apply of {N} forwards to empty maps: {:?}", t.elapsed());
        assert_eq!(r.added.len(), N as usize);
        let t = std::time::Instant::now();
        let r = state.apply_forwards(&desired, &[], OnForwardRemoved::Drain).unwrap();
        eprintln!("reapply of the same {N} forwards: {:?}", t.elapsed());
        assert_eq!(r, ApplyReport::default());
        let mut changed = desired.clone();
        changed.remove(0);
        changed[N as usize / 2].local = false;
        let t = std::time::Instant::now();
        let r = state.apply_forwards(&changed, &[], OnForwardRemoved::Flush).unwrap();
        eprintln!("reload with one forward removed and one changed: {:?}", t.elapsed());
        assert_eq!((r.removed.len(), r.changed.len(), r.added.len()), (1, 1, 0));
        let stored = state.forwards().unwrap();
        assert_eq!(stored.len(), N as usize - 1);
        assert!(stored.iter().any(|(id, f)| *id == 1 + N && f == &changed[N as usize / 2]));
        let rules: HashMap<_, FwdKey, FwdValue> = HashMap::try_from(state.map(FWD_RULES_V2).unwrap()).unwrap();
        assert_eq!(rules.keys().count(), N as usize - 1);
    }

    #[test]
    fn plan_keeps_unchanged_ids_and_gives_new_ones_free_ids() {
        let current = vec![(1, fwd(0)), (3, fwd(1)), (4, fwd(2))];
        let mut changed = fwd(1);
        changed.snat = Snat::Off;
        let mut updated = fwd(0);
        updated.backends[0].address = "203.0.113.3:9".parse().unwrap();
        let desired = vec![updated.clone(), changed.clone(), fwd(3)];
        let p = plan_forwards(current, &desired, 8).unwrap();
        // x1 changes: the old id 3 drains, the new rule takes the first free id (2); x3 is
        // new and gets the next one (5, as 3 and 4 are still held); x2 is removed.
        // x0's backend changes: it keeps its id (new connections go to the new backend).
        assert_eq!(p.with_ids, vec![(1, updated), (2, changed), (5, fwd(3))]);
        assert_eq!(p.retired, vec![3, 4]);
        assert_eq!(
            p.report,
            ApplyReport {
                added: vec!["x3".into()],
                changed: vec!["x1".into()],
                removed: vec!["x2".into()],
                updated: vec!["x0".into()],
                flushed_connections: 0
            }
        );
        let e = plan_forwards(vec![(1, fwd(0))], &[fwd(0), fwd(1)], 2).err().unwrap().to_string();
        assert!(e.contains("no free forward id"), "{e}");
    }

    #[test]
    fn plan_for_100k_forwards_is_linear() {
        const N: u32 = 100_000;
        let current: Vec<(u32, Forward)> = (0..N).map(|i| (i + 1, fwd(i))).collect();
        // A reload that keeps all but the first, changes the last and adds one.
        let mut desired: Vec<Forward> = (1..N).map(fwd).collect();
        desired.last_mut().unwrap().local = false;
        desired.push(fwd(N));
        let started = std::time::Instant::now();
        let p = plan_forwards(current, &desired, N + 3).unwrap();
        let took = started.elapsed();
        assert_eq!(p.report.removed, vec!["x0".to_string()]);
        assert_eq!(p.report.changed, vec![format!("x{}", N - 1)]);
        assert_eq!(p.report.added, vec![format!("x{N}")]);
        assert_eq!(p.retired, vec![N, 1]);
        assert_eq!(p.with_ids[0], (2, fwd(1)));
        assert_eq!(p.with_ids[p.with_ids.len() - 2].0, N + 1);
        assert_eq!(p.with_ids[p.with_ids.len() - 1].0, N + 2);
        // The old quadratic diffing made ~5·10^9 name comparisons here; linear takes well under a second.
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    fn net(s: &str) -> IpNet {
        crate::config::parse_source_prefix(s).unwrap()
    }

    /// Source lists go to the tries per forward id and come back from them in the
    /// config's order, so an unchanged forward stays unchanged; edits are diffs, and a
    /// forward's entries go with its id.
    #[test]
    fn source_lists_round_trip_through_the_tries() {
        let (state, dir) = pinned_state(8);
        let _pins = Pins(dir.clone());
        let mut a = fwd(0);
        a.allow = vec![net("198.51.100.0/25"), net("2001:db8:1::/48")];
        a.deny = vec![net("198.51.100.66/32")];
        let mut b = fwd(1);
        b.deny = vec![net("192.0.2.0/24")];
        let desired = vec![a.clone(), b.clone(), fwd(2)];
        let r = state.apply_forwards(&desired, &[], OnForwardRemoved::Drain).unwrap();
        assert_eq!(r.added.len(), 3);
        let stored: Vec<Forward> = state.forwards().unwrap().into_iter().map(|(_, f)| f).collect();
        assert_eq!(stored, desired);
        assert_eq!(state.apply_forwards(&desired, &[], OnForwardRemoved::Drain).unwrap(), ApplyReport::default());
        let rules: HashMap<_, FwdKey, FwdValue> = HashMap::try_from(state.map(FWD_RULES_V2).unwrap()).unwrap();
        let flags = |name: &str| {
            let id = state.forwards().unwrap().into_iter().find(|(_, f)| f.name == name).unwrap().0;
            rules.iter().filter_map(|r| r.ok()).find(|(_, v)| v.forward_id == id).unwrap().1.flags
                & (forwarder_common::FWD_FLAG_ALLOW | forwarder_common::FWD_FLAG_DENY)
        };
        use forwarder_common::{FWD_FLAG_ALLOW, FWD_FLAG_DENY};
        assert_eq!((flags("x0"), flags("x1"), flags("x2")), (FWD_FLAG_ALLOW | FWD_FLAG_DENY, FWD_FLAG_DENY, 0));

        // x0's allow list changes (its id stays), x1 goes: x1's entries and x0's old ones
        // leave the tries.
        a.allow = vec![net("198.51.100.128/25")];
        let r = state.apply_forwards(&[a.clone(), fwd(2)], &[], OnForwardRemoved::Drain).unwrap();
        assert_eq!((r.updated.clone(), r.changed.len(), r.removed.len()), (vec!["x0".to_string()], 0, 1));
        let stored: Vec<Forward> = state.forwards().unwrap().into_iter().map(|(_, f)| f).collect();
        assert_eq!(stored, vec![a.clone(), fwd(2)]);
        let ids: HashSet<u32> = state.forwards().unwrap().into_iter().map(|(id, _)| id).collect();
        for name in [FWD_ALLOW, FWD_DENY] {
            let entries = state.source_list_entries(name).unwrap();
            assert!(entries.iter().filter_map(source_of_entry).all(|(id, _)| ids.contains(&id)), "{name}");
        }
        assert_eq!(state.source_list_entries(FWD_ALLOW).unwrap().len(), 1);
        assert_eq!(state.source_list_entries(FWD_DENY).unwrap().len(), 1);
    }

    /// More entries than a trie holds: refused before anything is written.
    #[test]
    fn source_lists_larger_than_the_trie_are_refused_unchanged() {
        let (state, dir) = pinned_state(8);
        let _pins = Pins(dir.clone());
        let mut a = fwd(0);
        a.allow = (0..65u8).map(|i| net(&format!("198.51.100.{i}"))).collect();
        let e = state.apply_forwards(&[a], &[], OnForwardRemoved::Drain).unwrap_err().to_string();
        assert!(e.contains("65 entries"), "{e}");
        assert!(state.forwards().unwrap().is_empty());
        assert!(state.source_list_entries(FWD_ALLOW).unwrap().is_empty());
    }

    /// With `flush`, a forward whose lists change drops the connections of the sources
    /// they now refuse, and only those.
    #[test]
    fn refused_sources_connections_are_flushed() {
        let (state, dir) = pinned_state(8);
        let _pins = Pins(dir.clone());
        let conn = |src: [u8; 4], sport: u16, id: u32| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&src);
            let key = CtKey { src_addr: a, src_port_be: sport.to_be(), proto: 6, family: 4, ..Default::default() };
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&[203, 0, 113, 20]);
            let value = CtValue {
                new_src_addr: a,
                new_dst_addr: b,
                new_src_port_be: sport.to_be(),
                new_dst_port_be: 9u16.to_be(),
                forward_id: id,
                direction: CT_DIR_ORIGINAL,
                ..Default::default()
            };
            let reply_key = CtKey {
                src_addr: b,
                dst_addr: a,
                src_port_be: 9u16.to_be(),
                dst_port_be: sport.to_be(),
                proto: 6,
                family: 4,
                ..Default::default()
            };
            let reply = CtValue { forward_id: id, direction: forwarder_common::CT_DIR_REPLY, ..Default::default() };
            state.put_conntrack(&key, &value).unwrap();
            state.put_conntrack(&reply_key, &reply).unwrap();
        };
        conn([198, 51, 100, 10], 1000, 1);
        conn([198, 51, 100, 66], 1001, 1);
        conn([198, 51, 100, 66], 1002, 2);
        let mut f = fwd(0);
        f.deny = vec![net("198.51.100.66")];
        let one = std::collections::HashMap::from([(1, &f)]);
        assert_eq!(state.flush_refused_sources(&one).unwrap(), 1);
        let left: Vec<(u32, IpAddr)> = connections(&state.conntrack().unwrap())
            .iter()
            .map(|(k, (v, _))| (v.forward_id, addr_from_bytes(&k.src_addr, k.family)))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(!left.contains(&(1, "198.51.100.66".parse().unwrap())), "{left:?}");
        assert_eq!(state.conntrack_len().unwrap(), 4, "both entries of the refused one went");
    }
}
