//! Loading the embedded BPF object, writing the maps, attaching to interfaces and pinning.

use std::{
    collections::HashSet,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, xdp::DevMapHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode, tc},
};
use forwarder_common::{
    CtKey, CtValue, FwdKey, FwdMeta, FwdStats, FwdValue, GlobalConfig, IFACE_XDP_EGRESS_OK, IFACE_XDP_GENERIC,
    IfaceConfig, MAP_CONNTRACK, MAP_FORWARD_META, MAP_FORWARD_STATS, MAP_FORWARDS, MAP_GLOBAL, MAP_IFACES, MAP_PEERS,
    MAP_TX_PORTS, PeerKey, PeerValue,
};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Interface, RedirectMode, XdpMode},
    error::{Error, Result},
    maps::forward_entries,
    system,
};

pub const XDP_PROGRAM: &str = "forwarder_xdp";
pub const TC_INGRESS_PROGRAM: &str = "forwarder_tc_ingress";
pub const TC_EGRESS_PROGRAM: &str = "forwarder_tc_egress";
/// cgroup socket-address hooks of local forwards.
pub const LOCAL_PROGRAMS: [&str; 4] =
    ["forwarder_connect4", "forwarder_getpeername4", "forwarder_sendmsg4", "forwarder_recvmsg4"];

/// Default bpffs directory of an instance's pinned maps.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/forwarder";

/// Map capacities and kernel-side log level, fixed at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub max_forwards: u32,
    pub ct_entries: u32,
    /// aya-log level for the kernel programs: 0 off (default), 5 debug.
    pub bpf_log_level: u8,
}

impl LoadOptions {
    pub fn from_config(cfg: &Config) -> Self {
        Self { max_forwards: cfg.max_forwards, ct_entries: cfg.conntrack.max_entries, bpf_log_level: 0 }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_forwards: forwarder_common::DEFAULT_MAX_FORWARDS,
            ct_entries: forwarder_common::DEFAULT_CT_ENTRIES,
            bpf_log_level: 0,
        }
    }
}

/// One attached interface.
#[derive(Debug)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub xdp: XdpMode,
}

/// A loaded instance: the programs and maps, what is attached, what is pinned. Dropping it
/// detaches everything (aya's links detach on drop).
pub struct Instance {
    pub ebpf: Ebpf,
    pub attached: Vec<Attached>,
    /// cgroup the local-forward hooks are attached to.
    pub local_cgroup: Option<PathBuf>,
    pinned: Option<PathBuf>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

impl Instance {
    /// Loads the embedded object and both programs into the kernel (nothing is attached).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_FORWARDS, opts.max_forwards.max(1))
            .map_max_entries(MAP_FORWARD_STATS, opts.max_forwards + 1)
            .map_max_entries(MAP_FORWARD_META, opts.max_forwards + 1)
            .map_max_entries(MAP_CONNTRACK, opts.ct_entries)
            .override_global(aya_log::LEVEL, &opts.bpf_log_level, true);
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .expect("object has the XDP program")
            .try_into()
            .map_err(prog_err(XDP_PROGRAM))?;
        xdp.load().map_err(prog_err(XDP_PROGRAM))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS_PROGRAM)
            .expect("object has the TC program")
            .try_into()
            .map_err(prog_err(TC_INGRESS_PROGRAM))?;
        tc.load().map_err(prog_err(TC_INGRESS_PROGRAM))?;
        let egress: &mut SchedClassifier = ebpf
            .program_mut(TC_EGRESS_PROGRAM)
            .expect("object has the egress program")
            .try_into()
            .map_err(prog_err(TC_EGRESS_PROGRAM))?;
        egress.load().map_err(prog_err(TC_EGRESS_PROGRAM))?;
        for name in LOCAL_PROGRAMS {
            let p: &mut CgroupSockAddr =
                ebpf.program_mut(name).expect("object has the cgroup programs").try_into().map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
        }
        Ok(Self { ebpf, attached: Vec::new(), local_cgroup: None, pinned: None })
    }

    pub fn xdp(&self) -> &Xdp {
        self.ebpf.program(XDP_PROGRAM).expect("loaded").try_into().expect("XDP program")
    }

    pub fn tc_ingress(&self) -> &SchedClassifier {
        self.ebpf.program(TC_INGRESS_PROGRAM).expect("loaded").try_into().expect("TC program")
    }

    fn map_mut(&mut self, name: &'static str) -> &mut aya::maps::Map {
        self.ebpf.map_mut(name).expect("object declares every map")
    }

    /// Writes global settings and the forwards of `cfg`. Keys of forwards that are no longer
    /// configured are removed, so the call is idempotent.
    pub fn apply_forwards(&mut self, cfg: &Config, local_addrs: &[IpAddr]) -> Result<()> {
        let mut global: Array<_, GlobalConfig> =
            Array::try_from(self.map_mut(MAP_GLOBAL)).map_err(map_err(MAP_GLOBAL))?;
        global
            .set(
                0,
                GlobalConfig {
                    snat_port_min: cfg.conntrack.snat_port_min,
                    snat_port_max: cfg.conntrack.snat_port_max,
                    flags: if cfg.peers.is_empty() { 0 } else { forwarder_common::GLOBAL_HAS_PEERS },
                    netns_cookie: system::netns_cookie()?,
                },
                0,
            )
            .map_err(map_err(MAP_GLOBAL))?;

        let entries = forward_entries(&cfg.forwards, local_addrs);
        let mut rules: HashMap<_, FwdKey, FwdValue> =
            HashMap::try_from(self.map_mut(MAP_FORWARDS)).map_err(map_err(MAP_FORWARDS))?;
        let wanted: HashSet<FwdKey> = entries.iter().flat_map(|e| e.keys.iter().copied()).collect();
        let stale: Vec<FwdKey> = rules.keys().filter_map(|k| k.ok()).filter(|k| !wanted.contains(k)).collect();
        for e in &entries {
            for k in &e.keys {
                rules.insert(k, e.value, 0).map_err(map_err(MAP_FORWARDS))?;
            }
        }
        for k in &stale {
            rules.remove(k).map_err(map_err(MAP_FORWARDS))?;
        }
        let mut meta: Array<_, FwdMeta> =
            Array::try_from(self.map_mut(MAP_FORWARD_META)).map_err(map_err(MAP_FORWARD_META))?;
        for e in &entries {
            meta.set(e.id, e.meta, 0).map_err(map_err(MAP_FORWARD_META))?;
        }
        for id in entries.len() as u32 + 1..meta.len() {
            if meta.get(&id, 0).map(|m| m.name[0] != 0).unwrap_or(false) {
                meta.set(id, FwdMeta::default(), 0).map_err(map_err(MAP_FORWARD_META))?;
            }
        }
        info!(forwards = entries.len(), keys = wanted.len(), "forwards applied");
        Ok(())
    }

    /// Records how XDP may treat `ifindex` as an egress, and makes it a devmap target.
    pub fn set_egress(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let mut ifaces: HashMap<_, u32, IfaceConfig> =
            HashMap::try_from(self.map_mut(MAP_IFACES)).map_err(map_err(MAP_IFACES))?;
        ifaces.insert(ifindex, IfaceConfig { flags }, 0).map_err(map_err(MAP_IFACES))?;
        let mut tx: DevMapHash<_> = DevMapHash::try_from(self.map_mut(MAP_TX_PORTS)).map_err(map_err(MAP_TX_PORTS))?;
        tx.insert(ifindex, ifindex, None, 0)
            .map_err(|e| Error::Interface { name: ifindex.to_string(), message: format!("devmap: {e}") })?;
        Ok(())
    }

    /// Attaches XDP (unless off) and the TC ingress program to an interface.
    pub fn attach(&mut self, iface: &Interface) -> Result<()> {
        let ifindex = system::ifindex(&iface.name)?;
        let is_veth = system::is_veth(&iface.name);
        let mut flags = 0;
        if iface.xdp == XdpMode::Generic {
            flags |= IFACE_XDP_GENERIC;
        }
        let xdp_egress = match iface.redirect {
            RedirectMode::Xdp => true,
            RedirectMode::Tc => false,
            RedirectMode::Auto => !is_veth,
        };
        if xdp_egress {
            flags |= IFACE_XDP_EGRESS_OK;
        }
        self.set_egress(ifindex, flags)?;

        if iface.xdp != XdpMode::Off {
            let mode = if iface.xdp == XdpMode::Native { AyaXdpMode::Driver } else { AyaXdpMode::Skb };
            let xdp: &mut Xdp =
                self.ebpf.program_mut(XDP_PROGRAM).expect("loaded").try_into().map_err(prog_err(XDP_PROGRAM))?;
            xdp.attach(&iface.name, mode).map_err(|e| Error::Interface {
                name: iface.name.clone(),
                message: format!("attaching XDP in {:?} mode: {e}", iface.xdp),
            })?;
        }
        // Only needed on kernels without tcx; harmless (EEXIST) otherwise.
        let _ = tc::qdisc_add_clsact(&iface.name);
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_INGRESS_PROGRAM)
            .expect("loaded")
            .try_into()
            .map_err(prog_err(TC_INGRESS_PROGRAM))?;
        tc.attach(&iface.name, TcAttachType::Ingress).map_err(|e| Error::Interface {
            name: iface.name.clone(),
            message: format!("attaching TC ingress: {e}"),
        })?;
        info!(interface = %iface.name, ifindex, xdp = ?iface.xdp, xdp_egress, veth = is_veth, "attached");
        self.attached.push(Attached { name: iface.name.clone(), ifindex, xdp: iface.xdp });
        Ok(())
    }

    /// Writes the peers of `cfg` (all in fallback until their neighbour answers); returns
    /// (peer, id, ifindex) for the watch.
    pub fn apply_peers(&mut self, cfg: &Config) -> Result<Vec<(crate::config::Peer, u32, u32)>> {
        let mut peers: HashMap<_, PeerKey, PeerValue> =
            HashMap::try_from(self.map_mut(MAP_PEERS)).map_err(map_err(MAP_PEERS))?;
        let mut out = Vec::new();
        for (i, p) in cfg.peers.iter().enumerate() {
            let ifindex = system::ifindex(&p.interface)?;
            let id = i as u32 + 1;
            peers
                .insert(crate::peers::key_for(p.address), crate::peers::value_for(ifindex, id, false), 0)
                .map_err(map_err(MAP_PEERS))?;
            out.push((p.clone(), id, ifindex));
        }
        Ok(out)
    }

    /// Sets one peer's state (direct or fallback).
    pub fn set_peer_state(&mut self, peer: &crate::config::Peer, id: u32, ifindex: u32, direct: bool) -> Result<()> {
        let mut peers: HashMap<_, PeerKey, PeerValue> =
            HashMap::try_from(self.map_mut(MAP_PEERS)).map_err(map_err(MAP_PEERS))?;
        peers
            .insert(crate::peers::key_for(peer.address), crate::peers::value_for(ifindex, id, direct), 0)
            .map_err(map_err(MAP_PEERS))
    }

    /// Attaches the TC egress program (host traffic to peers) to an interface.
    pub fn attach_egress(&mut self, name: &str) -> Result<()> {
        let _ = tc::qdisc_add_clsact(name);
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_EGRESS_PROGRAM)
            .expect("loaded")
            .try_into()
            .map_err(prog_err(TC_EGRESS_PROGRAM))?;
        p.attach(name, TcAttachType::Egress)
            .map_err(|e| Error::Interface { name: name.to_string(), message: format!("attaching TC egress: {e}") })?;
        info!(interface = name, "peer egress attached");
        Ok(())
    }

    /// Attaches the local-forward socket hooks to a cgroup v2 directory (they then apply to
    /// every process in it and below). bpf links stack, so instances and other tools coexist.
    pub fn attach_local(&mut self, cgroup: &Path) -> Result<()> {
        let fd = std::fs::File::open(cgroup).map_err(|e| Error::Interface {
            name: cgroup.display().to_string(),
            message: format!("opening the cgroup: {e}"),
        })?;
        for name in LOCAL_PROGRAMS {
            let p: &mut CgroupSockAddr =
                self.ebpf.program_mut(name).expect("loaded").try_into().map_err(prog_err(name))?;
            // Through a bpf link (kernel >= 5.7) the attachment is multi by nature and the
            // kernel refuses link flags, so the mode must be the default.
            p.attach(&fd, CgroupAttachMode::Single).map_err(|e| Error::Interface {
                name: cgroup.display().to_string(),
                message: format!("attaching {name}: {e:?}"),
            })?;
        }
        info!(cgroup = %cgroup.display(), "local forwards attached");
        self.local_cgroup = Some(cgroup.to_path_buf());
        Ok(())
    }

    /// Pins every map under `dir` (created if missing) for `forwarder stats` and tools.
    pub fn pin_maps(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::PinPath { path: dir.display().to_string(), message: e.to_string() })?;
        for (name, map) in self.ebpf.maps() {
            if name.starts_with('.') || !name.starts_with("FWD_") {
                continue;
            }
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            map.pin(&path).map_err(|e| Error::PinPath { path: path.display().to_string(), message: e.to_string() })?;
            debug!(path = %path.display(), "pinned");
        }
        self.pinned = Some(dir.to_path_buf());
        Ok(())
    }

    /// Removes the pins made by [`Instance::pin_maps`] (the directory too, when empty).
    pub fn unpin(&mut self) {
        if let Some(dir) = self.pinned.take() {
            remove_pins(&dir);
        }
    }

    /// Reads one conntrack entry (tests and diagnostics).
    pub fn conntrack_entry(&self, key: &CtKey) -> Option<CtValue> {
        let map = self.ebpf.map(MAP_CONNTRACK)?;
        let ct: aya::maps::HashMap<_, CtKey, CtValue> = aya::maps::HashMap::try_from(map).ok()?;
        ct.get(key, 0).ok()
    }

    /// Number of entries in the connection table (walks it: diagnostics, not the hot path).
    pub fn conntrack_len(&self) -> usize {
        self.ebpf
            .map(MAP_CONNTRACK)
            .and_then(|m| aya::maps::HashMap::<_, CtKey, CtValue>::try_from(m).ok())
            .map(|ct| ct.keys().count())
            .unwrap_or(0)
    }

    /// Per-forward counters summed over CPUs.
    pub fn forward_stats(&self, id: u32) -> FwdStats {
        let map = self.ebpf.map(MAP_FORWARD_STATS).expect("map");
        let arr: PerCpuArray<_, FwdStats> = PerCpuArray::try_from(map).expect("per-cpu array");
        crate::stats::sum_forward(&arr, id)
    }

    /// A reason counter summed over CPUs.
    pub fn reason_count(&self, reason: forwarder_common::Reason) -> u64 {
        let map = self.ebpf.map(forwarder_common::MAP_REASONS).expect("map");
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map).expect("per-cpu array");
        crate::stats::sum_reason(&arr, reason as u32)
    }

    /// Zeroes the per-reason and per-forward counters and empties the connection table
    /// (test fixtures start from a known state).
    pub fn reset_state(&mut self) -> Result<()> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| Error::Io(e))?;
        for name in [forwarder_common::MAP_REASONS] {
            let mut arr: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map_mut(name)).map_err(map_err(name))?;
            for i in 0..arr.len() {
                arr.set(i, vec![0u64; ncpu].try_into().expect("values"), 0).map_err(map_err(name))?;
            }
        }
        let mut arr: PerCpuArray<_, FwdStats> =
            PerCpuArray::try_from(self.map_mut(MAP_FORWARD_STATS)).map_err(map_err(MAP_FORWARD_STATS))?;
        for i in 0..arr.len().min(64) {
            arr.set(i, vec![FwdStats::default(); ncpu].try_into().expect("values"), 0)
                .map_err(map_err(MAP_FORWARD_STATS))?;
        }
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.map_mut(MAP_CONNTRACK)).map_err(map_err(MAP_CONNTRACK))?;
        let keys: Vec<CtKey> = ct.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = ct.remove(&k);
        }
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.unpin();
    }
}

/// Removes the map pins forwarder makes under `dir`, then `dir` if it is empty.
pub fn remove_pins(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("FWD_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// An exclusive lock on a pin directory, so two instances never share one.
pub struct PinLock {
    _dir: std::fs::File,
}

impl PinLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        mount_default_bpffs(dir);
        check_bpffs(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::PinPath { path: dir.display().to_string(), message: e.to_string() })?;
        let f = std::fs::File::open(dir)?;
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::PinPath {
                path: dir.display().to_string(),
                message: "another forwarder instance uses this pin path (choose another --pin-path)".into(),
            });
        }
        Ok(Self { _dir: f })
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf when a pin path below it is asked for and nothing is mounted
/// there yet (as Cilium's agent does); other places are left to the operator.
fn mount_default_bpffs(dir: &Path) {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || is_bpffs(root) || !root.is_dir() {
        return;
    }
    match nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>) {
        Ok(()) => info!("mounted bpffs at /sys/fs/bpf"),
        Err(e) => warn!("mounting bpffs at /sys/fs/bpf: {e}"),
    }
}

/// Pins need a bpffs. `ip netns exec` remounts /sys in a private mount namespace, hiding the
/// host's /sys/fs/bpf: say so instead of failing obscurely.
fn check_bpffs(dir: &Path) -> Result<()> {
    let probe = if dir.exists() { dir } else { dir.parent().unwrap_or(dir) };
    if is_bpffs(probe) {
        Ok(())
    } else {
        Err(Error::PinPath {
            path: dir.display().to_string(),
            message: format!(
                "{} is not on a bpffs (under `ip netns exec`, /sys is remounted and the host's bpffs hidden: \
                 enter the namespace with `nsenter --net=/run/netns/NAME` instead, or mount bpffs)",
                probe.display()
            ),
        })
    }
}

/// Opens a pinned map of a running instance.
pub fn open_pinned(dir: &Path, name: &str) -> Result<MapData> {
    check_bpffs(dir)?;
    MapData::from_pin(dir.join(name)).map_err(|e| Error::PinPath {
        path: dir.join(name).display().to_string(),
        message: format!("{e} (is `forwarder run` running with this --pin-path?)"),
    })
}

pub fn warn_if_forwarding_disabled() {
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim() == "0").unwrap_or(false) {
        warn!(
            "net.ipv4.ip_forward is 0 in this network namespace: forwarded packets will be dropped by the kernel (sysctl -w net.ipv4.ip_forward=1)"
        );
    }
}
