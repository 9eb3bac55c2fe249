//! `forwarder status`: what the running daemon attached (a small JSON file it keeps under
//! /run/forwarder) together with the live fill levels of its pinned maps.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    loader::{Attached, Instance},
    state::State,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// "starting" from the moment the daemon holds its pin path until every program is
    /// attached and the config applied, then "running" (files of older versions: running).
    #[serde(default = "running")]
    pub state: String,
    pub pid: u32,
    pub config: String,
    pub pin_path: String,
    pub interfaces: Vec<AttachedInfo>,
    pub egress_interfaces: Vec<String>,
    pub local_cgroup: Option<String>,
    #[serde(deserialize_with = "programs_of_any_version")]
    pub programs: Vec<ProgramInfo>,
    pub adopted: bool,
}

/// A loaded program: its name in the object and its kernel id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramInfo {
    pub name: String,
    pub id: u32,
}

/// Status files of older versions list programs as `[name, id]` pairs.
fn programs_of_any_version<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<ProgramInfo>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        Object(ProgramInfo),
        Pair(String, u32),
    }
    Ok(Vec::<Any>::deserialize(d)?
        .into_iter()
        .map(|p| match p {
            Any::Object(p) => p,
            Any::Pair(name, id) => ProgramInfo { name, id },
        })
        .collect())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachedInfo {
    pub name: String,
    pub ifindex: u32,
    pub xdp: String,
    pub xdp_egress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Whether the daemon that wrote the status is still alive.
    pub daemon_running: bool,
    pub daemon: Option<DaemonStatus>,
    pub maps: Vec<MapFill>,
    pub conntrack_entries: usize,
    pub conntrack_connections: usize,
    pub forwards: usize,
    pub peers: usize,
    /// Every forward's backends and whether each takes new connections.
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub forward: String,
    pub address: String,
    pub weight: u32,
    /// "up", "down" (failed its health checks) or "drained" (weight 0).
    pub state: &'static str,
}

/// The daemon's status file for a pin path.
pub fn path_for(pin: &Path) -> PathBuf {
    let name: String =
        pin.display().to_string().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    PathBuf::from("/run/forwarder").join(format!("{name}.json"))
}

fn running() -> String {
    "running".to_string()
}

/// What `stats` and `status` say about the daemon of a pin path.
pub fn daemon_state(pin: &Path) -> &'static str {
    let Some(d) = std::fs::read(path_for(pin)).ok().and_then(|b| serde_json::from_slice::<DaemonStatus>(&b).ok())
    else {
        return "unknown";
    };
    if !Path::new(&format!("/proc/{}", d.pid)).exists() {
        "not running"
    } else if d.state == "starting" {
        "starting"
    } else {
        "running"
    }
}

/// The status of a daemon that holds its pin path but has not attached or applied
/// anything yet.
pub fn write_starting(pin_path: &Path, config_path: &Path) -> Result<()> {
    store(
        pin_path,
        &DaemonStatus {
            state: "starting".to_string(),
            pid: std::process::id(),
            config: config_path.display().to_string(),
            pin_path: pin_path.display().to_string(),
            interfaces: Vec::new(),
            egress_interfaces: Vec::new(),
            local_cgroup: None,
            programs: Vec::new(),
            adopted: false,
        },
    )
}

/// The status of a running daemon: what it attached.
pub fn write(pin_path: &Path, config_path: &Path, inst: &Instance) -> Result<()> {
    let s = DaemonStatus {
        state: running(),
        pid: std::process::id(),
        config: config_path.display().to_string(),
        pin_path: pin_path.display().to_string(),
        interfaces: inst.attached.iter().map(info).collect(),
        egress_interfaces: inst.egress.iter().cloned().collect(),
        local_cgroup: inst.local_cgroup.as_ref().map(|p| p.display().to_string()),
        programs: inst.program_ids().into_iter().map(|(name, id)| ProgramInfo { name, id }).collect(),
        adopted: inst.adopted,
    };
    store(pin_path, &s)
}

fn store(pin: &Path, s: &DaemonStatus) -> Result<()> {
    let path = path_for(pin);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s).expect("serialisable"))?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

fn info(a: &Attached) -> AttachedInfo {
    AttachedInfo { name: a.name.clone(), ifindex: a.ifindex, xdp: a.xdp.to_string(), xdp_egress: a.xdp_egress }
}

pub fn remove(pin: &Path) {
    let _ = std::fs::remove_file(path_for(pin));
}

/// Removes a pin path's status file when dropped.
pub struct RemovedOnDrop(pub PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

pub fn read(pin: &Path) -> Result<Status> {
    let state = State::open(pin)?;
    let daemon: Option<DaemonStatus> = std::fs::read(path_for(pin)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let daemon_running = daemon.as_ref().map(|d| Path::new(&format!("/proc/{}", d.pid)).exists()).unwrap_or(false);
    let ct = state.conntrack()?;
    let all_forwards = state.forwards()?;
    let forwards = all_forwards.len();
    let peers = state.peers()?.len();
    let stored = state.stored_backends()?;
    let mut backends = Vec::new();
    for (id, f) in &all_forwards {
        for (_, v) in stored.get(id).map(Vec::as_slice).unwrap_or_default() {
            let b = crate::telemetry::counters::BackendCounters::of(v, 0, Default::default(), 0);
            backends.push(BackendStatus {
                forward: f.name.clone(),
                address: b.address,
                weight: b.weight,
                state: b.state,
            });
        }
    }
    let maps = vec![
        MapFill {
            map: forwarder_common::FWD_CT_V4,
            entries: ct.len(),
            capacity: state.capacity(forwarder_common::FWD_CT_V4)?,
        },
        MapFill {
            map: forwarder_common::FWD_META_V2,
            entries: forwards,
            capacity: state.capacity(forwarder_common::FWD_META_V2)? - 1,
        },
        MapFill {
            map: forwarder_common::FWD_BACKENDS,
            entries: backends.len(),
            capacity: state.capacity(forwarder_common::FWD_BACKENDS)?,
        },
        MapFill {
            map: forwarder_common::FWD_PEERS,
            entries: peers,
            capacity: state.capacity(forwarder_common::FWD_PEERS)?,
        },
    ];
    let conns = ct.iter().filter(|(_, v)| v.direction == forwarder_common::CT_DIR_ORIGINAL).count();
    Ok(Status {
        daemon_running,
        daemon,
        maps,
        conntrack_entries: ct.len(),
        conntrack_connections: conns,
        forwards,
        peers,
        backends,
    })
}

pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match &s.daemon {
        Some(d) => {
            let _ = writeln!(
                out,
                "daemon: pid {} ({}), config {}, pin path {}{}",
                d.pid,
                match (s.daemon_running, d.state.as_str()) {
                    (false, _) => "not running: state left pinned",
                    (true, "starting") => "starting: programs not attached yet",
                    _ => "running",
                },
                d.config,
                d.pin_path,
                if d.adopted { ", adopted earlier state" } else { "" }
            );
            for i in &d.interfaces {
                if i.ifindex == 0 {
                    // Optional, or deleted: the daemon attaches it when it appears.
                    let _ = writeln!(out, "interface {:<12} missing (attached when it appears)", i.name);
                    continue;
                }
                let _ = writeln!(
                    out,
                    "interface {:<12} ifindex {:<4} xdp {:<8} xdp-redirect-into {}",
                    i.name, i.ifindex, i.xdp, i.xdp_egress
                );
            }
            if !d.egress_interfaces.is_empty() {
                let _ = writeln!(out, "peer egress on: {}", d.egress_interfaces.join(", "));
            }
            if let Some(c) = &d.local_cgroup {
                let _ = writeln!(out, "local forwards: cgroup {c}");
            }
            for p in &d.programs {
                let _ = writeln!(out, "program {:<24} id {}", p.name, p.id);
            }
        }
        None => {
            let _ = writeln!(out, "daemon: no status file (state is pinned, no daemon recorded)");
        }
    }
    for m in &s.maps {
        let pct = if m.capacity > 0 { m.entries as f64 * 100.0 / m.capacity as f64 } else { 0.0 };
        let _ = writeln!(out, "map {:<14} {:>8} / {:<8} ({pct:.1}% full)", m.map, m.entries, m.capacity);
    }
    let _ = writeln!(out, "conntrack: {} connections ({} entries)", s.conntrack_connections, s.conntrack_entries);
    // Backends worth a line: of forwards with several, or not taking new connections.
    let several: std::collections::HashSet<&str> = s
        .backends
        .iter()
        .filter(|b| s.backends.iter().filter(|o| o.forward == b.forward).count() > 1 || b.state != "up")
        .map(|b| b.forward.as_str())
        .collect();
    for b in s.backends.iter().filter(|b| several.contains(b.forward.as_str())) {
        let _ = writeln!(out, "backend {:<20} {:<26} weight {:<5} {}", b.forward, b.address, b.weight, b.state);
    }
    out
}
