//! Counters of a running instance, read from its pinned maps (`forwarder stats`): a table
//! for people, JSON for scripts, and the figures of the `/metrics` exposition.

use std::{fmt::Write as _, path::Path};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use forwarder_common::{
    ALL_REASONS, FWD_BE_STATS, FWD_FWD_DENIED, FWD_FWD_STATS, FWD_META_V2, FWD_PEER_STATS, FWD_PEERS, FWD_REASONS,
    FwdMeta, FwdStats, PeerKey, PeerStats, PeerValue,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    pins::open_map,
    state::{sum_forward, sum_reason},
};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ForwardCounters {
    pub id: u32,
    pub name: String,
    pub protocol: String,
    pub listen: String,
    pub backend: String,
    /// "auto", "off" or the address, as in `forward list`.
    pub snat: String,
    pub local: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub local_connections: u64,
    /// Packets of new connections the forward's source lists refused (dropped).
    pub source_denied: u64,
    /// The forward's backends (slot order) with their own counters.
    pub backends: Vec<BackendCounters>,
}

/// One backend of a forward: its packets and connections, and whether it takes new ones.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendCounters {
    pub address: String,
    pub weight: u32,
    /// False while its health checks keep it out of new connections.
    pub up: bool,
    /// "up", "down" (health checks) or "drained" (weight 0).
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub local_connections: u64,
    /// Its connections in the table that are established (TCP) or answered (UDP).
    pub established_connections: u64,
}

impl BackendCounters {
    /// The counters of backend `v` of a forward whose listen range has `listen_span` ports
    /// after its first.
    pub fn of(v: &forwarder_common::BackendValue, listen_span: u16, s: FwdStats, established: u64) -> Self {
        let up = v.state & forwarder_common::BACKEND_DOWN == 0;
        BackendCounters {
            address: crate::backends::backend_of(v, listen_span).address.to_string(),
            weight: v.weight,
            up,
            state: if !up {
                "down"
            } else if v.weight == 0 {
                "drained"
            } else {
                "up"
            },
            packets: s.packets,
            bytes: s.bytes,
            new_connections: s.new_conns,
            local_connections: s.local_conns,
            established_connections: established,
        }
    }
}

/// Established (TCP) or answered (UDP) connections per backend counter index, from the
/// connection table's original-direction entries.
pub fn established_by_backend(
    entries: &[(forwarder_common::CtKey, forwarder_common::CtValue)],
) -> std::collections::HashMap<u32, u64> {
    use forwarder_common::conntrack::{TCP_ESTABLISHED, UDP_REPLIED};
    let mut out = std::collections::HashMap::new();
    for (k, v) in entries {
        let live =
            if k.proto == forwarder_common::PROTO_TCP { v.state == TCP_ESTABLISHED } else { v.state == UDP_REPLIED };
        if v.direction == forwarder_common::CT_DIR_ORIGINAL && live && v.backend_index() != 0 {
            *out.entry(v.backend_index()).or_insert(0) += 1;
        }
    }
    out
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ReasonCounter {
    pub code: u32,
    pub reason: &'static str,
    /// [`forwarder_common::Reason::kind`]: "forwarded" (how rewritten packets left),
    /// "dropped", "passed" (to the stack), "peer", "icmp", or "event" (not packets).
    pub kind: &'static str,
    pub packets: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerCounters {
    pub id: u32,
    pub address: String,
    /// The interface's name, as in `peer list`.
    pub interface: String,
    pub ifindex: u32,
    /// "direct" (the peer answers its neighbour) or "fallback" (normal routing).
    pub state: &'static str,
    /// `state == "direct"`, as in `peer list`.
    pub direct: bool,
    pub direct_packets: u64,
    pub direct_bytes: u64,
    pub fallback_packets: u64,
    pub fallback_bytes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// The daemon of this pin path: "starting" (programs not attached yet), "running",
    /// "not running" (state left pinned) or "unknown" (no status file).
    pub daemon: &'static str,
    pub forwards: Vec<ForwardCounters>,
    pub peers: Vec<PeerCounters>,
    pub reasons: Vec<ReasonCounter>,
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Reads the counters of the instance pinned at `pin_dir`.
pub fn read(pin_dir: &Path) -> Result<Snapshot> {
    let stats: PerCpuArray<MapData, FwdStats> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_map(pin_dir, FWD_FWD_STATS)?))
            .map_err(map_error(FWD_FWD_STATS))?;
    let reasons: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_map(pin_dir, FWD_REASONS)?))
            .map_err(map_error(FWD_REASONS))?;
    let meta: Array<MapData, FwdMeta> =
        Array::try_from(aya::maps::Map::Array(open_map(pin_dir, FWD_META_V2)?)).map_err(map_error(FWD_META_V2))?;
    let denied: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_map(pin_dir, FWD_FWD_DENIED)?))
            .map_err(map_error(FWD_FWD_DENIED))?;

    let state = crate::state::State::open(pin_dir)?;
    let stored = state.stored_backends()?;
    // Best effort: the counters stand without the table (its own figures report its loss).
    let established = state.conntrack().map(|e| established_by_backend(&e)).unwrap_or_default();
    let backend_stats: PerCpuArray<MapData, FwdStats> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_map(pin_dir, FWD_BE_STATS)?))
            .map_err(map_error(FWD_BE_STATS))?;
    let mut forwards = Vec::new();
    for id in 1..meta.len() {
        let Ok(m) = meta.get(&id, 0) else { continue };
        if m.name[0] == 0 {
            continue;
        }
        let name_len = m.name.iter().position(|&b| b == 0).unwrap_or(m.name.len());
        let s = sum_forward(&stats, id);
        let proto = if m.key.proto == forwarder_common::PROTO_TCP { "tcp" } else { "udp" };
        let identity = crate::state::forward_of_meta(&m);
        forwards.push(ForwardCounters {
            id,
            name: String::from_utf8_lossy(&m.name[..name_len]).into_owned(),
            protocol: proto.into(),
            listen: identity.listen.to_string(),
            backend: match stored.get(&id).and_then(|l| l.first()) {
                Some((_, v)) => crate::backends::backend_of(v, identity.listen.span).address,
                None => identity.backends[0].address,
            }
            .to_string(),
            snat: identity.snat.to_string(),
            local: identity.local,
            packets: s.packets,
            bytes: s.bytes,
            new_connections: s.new_conns,
            local_connections: s.local_conns,
            source_denied: sum_reason(&denied, id),
            backends: stored
                .get(&id)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|(_, v)| {
                    let live = established.get(&v.index).copied().unwrap_or(0);
                    BackendCounters::of(v, identity.listen.span, sum_forward(&backend_stats, v.index), live)
                })
                .collect(),
        });
    }
    let peer_map: HashMap<MapData, PeerKey, PeerValue> =
        HashMap::try_from(aya::maps::Map::HashMap(open_map(pin_dir, FWD_PEERS)?)).map_err(map_error(FWD_PEERS))?;
    let peer_stats: PerCpuArray<MapData, PeerStats> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_map(pin_dir, FWD_PEER_STATS)?))
            .map_err(map_error(FWD_PEER_STATS))?;
    let mut peers: Vec<PeerCounters> = peer_map
        .iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| {
            let mut s = PeerStats::default();
            for c in peer_stats.get(&v.peer_id, 0).iter().flat_map(|vals| vals.iter()) {
                s.direct_packets += c.direct_packets;
                s.direct_bytes += c.direct_bytes;
                s.fallback_packets += c.fallback_packets;
                s.fallback_bytes += c.fallback_bytes;
            }
            let peer = crate::state::PeerEntry::of(&k, &v);
            PeerCounters {
                id: peer.id,
                address: peer.address.to_string(),
                interface: peer.interface,
                ifindex: peer.ifindex,
                state: peer.state,
                direct: peer.direct,
                direct_packets: s.direct_packets,
                direct_bytes: s.direct_bytes,
                fallback_packets: s.fallback_packets,
                fallback_bytes: s.fallback_bytes,
            }
        })
        .collect();
    peers.sort_by_key(|p| p.id);
    let reasons = reason_counters(|code| sum_reason(&reasons, code));
    Ok(Snapshot { daemon: crate::status::daemon_state(pin_dir), forwards, peers, reasons })
}

/// Every reason with its packets (`packets(code)`), named and kinded by
/// [`forwarder_common::Reason`] alone.
pub fn reason_counters(packets: impl Fn(u32) -> u64) -> Vec<ReasonCounter> {
    ALL_REASONS
        .iter()
        .map(|r| ReasonCounter { code: *r as u32, reason: r.name(), kind: r.kind(), packets: packets(*r as u32) })
        .collect()
}

/// The human table of `forwarder stats`.
pub fn render_table(s: &Snapshot) -> String {
    let mut out = String::new();
    if s.daemon == "starting" {
        let _ = writeln!(out, "daemon starting: programs not attached yet, nothing is forwarded");
    }
    let _ = writeln!(
        out,
        "{:<20} {:<5} {:<22} {:<22} {:>12} {:>14} {:>10} {:>10} {:>10}",
        "FORWARD", "PROTO", "LISTEN", "BACKEND", "PACKETS", "BYTES", "NEW_CONNS", "LOCAL", "DENIED"
    );
    for f in &s.forwards {
        let _ = writeln!(
            out,
            "{:<20} {:<5} {:<22} {:<22} {:>12} {:>14} {:>10} {:>10} {:>10}",
            f.name,
            f.protocol,
            f.listen,
            f.backend,
            f.packets,
            f.bytes,
            f.new_connections,
            f.local_connections,
            f.source_denied
        );
    }
    if s.forwards.iter().any(|f| f.backends.len() > 1 || f.backends.iter().any(|b| b.state != "up")) {
        let _ = writeln!(
            out,
            "\n{:<20} {:<26} {:>6} {:<8} {:>12} {:>14} {:>10} {:>12}",
            "FORWARD", "BACKEND", "WEIGHT", "STATE", "PACKETS", "BYTES", "NEW_CONNS", "ESTABLISHED"
        );
        for f in &s.forwards {
            for b in &f.backends {
                let _ = writeln!(
                    out,
                    "{:<20} {:<26} {:>6} {:<8} {:>12} {:>14} {:>10} {:>12}",
                    f.name,
                    b.address,
                    b.weight,
                    b.state,
                    b.packets,
                    b.bytes,
                    b.new_connections,
                    b.established_connections
                );
            }
        }
    }
    if !s.peers.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<28} {:<9} {:>12} {:>14} {:>12} {:>14}",
            "PEER", "STATE", "DIRECT_PKTS", "DIRECT_BYTES", "FALLBACK_PKTS", "FALLBACK_BYTES"
        );
        for p in &s.peers {
            let _ = writeln!(
                out,
                "{:<28} {:<9} {:>12} {:>14} {:>12} {:>14}",
                p.address, p.state, p.direct_packets, p.direct_bytes, p.fallback_packets, p.fallback_bytes
            );
        }
    }
    let _ = writeln!(out, "\n{:<18} {:<10} {:>12}", "REASON", "KIND", "PACKETS");
    for r in &s.reasons {
        let _ = writeln!(out, "{:<18} {:<10} {:>12}", r.reason, r.kind, r.packets);
    }
    out
}

/// The `stats --watch` screen: per-second rates between two snapshots, then totals.
pub fn render_rates(prev: &Snapshot, now: &Snapshot) -> String {
    let mut out = String::new();
    let _ =
        writeln!(out, "{:<20} {:>12} {:>14} {:>12}   (per second)", "FORWARD", "PACKETS/s", "BYTES/s", "NEW_CONNS/s");
    for f in &now.forwards {
        let p = prev.forwards.iter().find(|p| p.id == f.id && p.name == f.name);
        let d = |get: fn(&ForwardCounters) -> u64| get(f).saturating_sub(p.map(get).unwrap_or(0));
        let _ = writeln!(
            out,
            "{:<20} {:>12} {:>14} {:>12}",
            f.name,
            d(|x| x.packets),
            d(|x| x.bytes),
            d(|x| x.new_connections)
        );
    }
    let _ = writeln!(out, "\n{:<18} {:<10} {:>12}", "REASON", "KIND", "PACKETS/s");
    for r in &now.reasons {
        let before = prev.reasons.iter().find(|p| p.code == r.code).map(|p| p.packets).unwrap_or(0);
        let rate = r.packets.saturating_sub(before);
        if rate > 0 {
            let _ = writeln!(out, "{:<18} {:<10} {:>12}", r.reason, r.kind, rate);
        }
    }
    let _ = writeln!(out, "\ntotals:\n{}", render_table(now));
    out
}
