//! An instance's bpffs directory: which maps are pinned there, the lock that keeps two
//! instances apart, opening and removing pins, and mounting bpffs where it is missing.
//!
//! Everything an instance creates lives under its pin directory: the maps (`FWD_*`, named as
//! in the kernel object) and the links (`link_*`).

use std::{fs::File, path::Path};

use aya::maps::MapData;
use forwarder_common::{
    FWD_ALLOW, FWD_BACKENDS, FWD_BE_STATS, FWD_CT_V4, FWD_DENY, FWD_FIB_MEMO, FWD_FLOW_CACHE, FWD_FLOW_CACHE_TC,
    FWD_FLOW_CACHE6, FWD_FLOW_CACHE6_TC, FWD_FRAG_V1, FWD_FWD_DENIED, FWD_FWD_STATS, FWD_GLOBAL_V2, FWD_IFACES,
    FWD_LOC_UDP_V2, FWD_LOCAL_CONN, FWD_MAGLEV, FWD_META_V2, FWD_PEER_STATS, FWD_PEERS, FWD_PORT_RANGES, FWD_REASONS,
    FWD_ROUTE_FLAGS, FWD_ROUTE_GEN, FWD_RULES_V2, FWD_TX_PORTS,
};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Default bpffs directory of an instance's pinned state.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/forwarder";

/// Directory under the pin path whose flock serialises changes (reloads, live edits).
pub const EDIT_LOCK_DIR: &str = "edit";

/// The object's maps that are pinned: the state that outlives a process and that the next
/// instance adopts. A map of the object must be here or in [`UNPINNED_MAPS`]
/// (tests/object_maps.rs reads the embedded object and checks it).
pub const PINNED_MAPS: [&str; 23] = [
    FWD_RULES_V2,
    FWD_PORT_RANGES,
    FWD_BACKENDS,
    FWD_MAGLEV,
    FWD_BE_STATS,
    FWD_ALLOW,
    FWD_DENY,
    FWD_CT_V4,
    FWD_ROUTE_GEN,
    FWD_ROUTE_FLAGS,
    FWD_FWD_STATS,
    FWD_FWD_DENIED,
    FWD_REASONS,
    FWD_IFACES,
    FWD_TX_PORTS,
    FWD_GLOBAL_V2,
    FWD_META_V2,
    FWD_LOCAL_CONN,
    FWD_LOC_UDP_V2,
    FWD_PEERS,
    FWD_PEER_STATS,
    FWD_FRAG_V1,
    // Per-CPU scratch of the connection commit; pinned by earlier versions, kept so.
    "FWD_SCRATCH",
];

/// The object's maps that belong to one loaded program set: per-CPU scratch, caches that
/// start empty, and aya's own maps. Each new instance gets fresh ones.
pub const UNPINNED_MAPS: [&str; 8] = [
    // Copies of connection entries (XDP's and TC's, IPv4 and IPv6); a new instance starts
    // them empty.
    FWD_FLOW_CACHE,
    FWD_FLOW_CACHE_TC,
    FWD_FLOW_CACHE6,
    FWD_FLOW_CACHE6_TC,
    // The last FIB answers per CPU, likewise.
    FWD_FIB_MEMO,
    // Per-CPU working memory of a packet's path.
    "FWD_WORK",
    // Per-CPU token buckets of the ICMP errors the forwarder sends.
    "FWD_ICMP_RATE",
    // aya-log's ring buffer.
    "AYA_LOGS",
];

/// An exclusive lock on a pin directory, so two instances never share one.
pub struct PinLock {
    _dir: Flock<File>,
}

impl PinLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        mount_default_bpffs(dir);
        check_bpffs(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::PinPath { path: dir.display().to_string(), message: e.to_string() })?;
        let locked = Flock::lock(File::open(dir)?, FlockArg::LockExclusiveNonblock).map_err(|_| Error::PinPath {
            path: dir.display().to_string(),
            message: "another forwarder instance uses this pin path (choose another --pin-path)".into(),
        })?;
        Ok(Self { _dir: locked })
    }
}

/// Held while a change is applied (see [`lock_edits`]).
pub struct EditLock {
    _f: Flock<File>,
}

/// Serialises changes between the daemon's reloads and CLI edits; blocks until the other
/// editor is done.
pub fn lock_edits(dir: &Path) -> Result<EditLock> {
    let dir = dir.join(EDIT_LOCK_DIR);
    let _ = std::fs::create_dir(&dir);
    let locked = Flock::lock(File::open(&dir)?, FlockArg::LockExclusive).map_err(|(_, e)| Error::Io(e.into()))?;
    Ok(EditLock { _f: locked })
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf when a pin path below it is asked for and nothing is mounted
/// there yet (as Cilium's agent does); other places are left to the operator.
pub fn mount_default_bpffs(dir: &Path) {
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
pub fn check_bpffs(dir: &Path) -> Result<()> {
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
pub fn open_map(dir: &Path, name: &str) -> Result<MapData> {
    check_bpffs(dir)?;
    MapData::from_pin(dir.join(name)).map_err(|e| Error::PinPath {
        path: dir.join(name).display().to_string(),
        message: format!("{e} (is `forwarder run` running with this --pin-path?)"),
    })
}

/// Unpins a link: once no process holds it, the kernel detaches the program.
pub fn unpin_link(path: &Path) {
    if path.exists()
        && let Err(e) = std::fs::remove_file(path)
    {
        warn!(path = %path.display(), "unpinning link: {e}");
    }
}

/// Removes everything forwarder pins under `dir` (links first), then `dir` and its `edit`
/// lock directory.
pub fn remove(dir: &Path) {
    let entries: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().collect();
    for prefix in ["link_", "FWD_"] {
        for e in &entries {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir.join(EDIT_LOCK_DIR));
    let _ = std::fs::remove_dir(dir);
}
