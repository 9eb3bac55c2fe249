//! Leaving nothing behind when the bench is stopped. Every sandbox is a [`BenchTopo`] whose
//! drop removes its namespaces, programs, processes, pins and cgroup; errors and panics
//! unwind through those drops. A signal (Ctrl-C, SIGTERM, SIGHUP) would end the process
//! without them, so [`install`] takes the signals to a thread of their own: the first one
//! sets a flag that the workloads check between steps (they fail with "interrupted" and
//! unwind like any error), and a second signal, or no unwinding within
//! [`FORCE_AFTER`], removes the sandboxes still registered here by name and exits.
//!
//! [`BenchTopo`]: super::topology::BenchTopo

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use nix::sys::signal::{SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Tags of the sandboxes that exist now (forwarder_tests' `Chain` names its namespaces
/// `fwt-{tag}-{c,s,r}`, its daemon's pins `/sys/fs/bpf/fwt-{tag}` and its cgroup `fwt-{tag}`).
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// How long the workloads get to unwind after the first signal.
const FORCE_AFTER: Duration = Duration::from_secs(30);

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread started after it (child
/// processes start with an empty mask: std resets it), and handles them on a thread of
/// their own. Call before any other thread exists.
pub fn install() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    std::thread::Builder::new().name("bench-signals".into()).spawn(move || {
        let Ok(first) = set.wait() else { return };
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("bench: {first}: stopping; the sandboxes are removed as the workloads unwind (again to force)");
        // A second signal, or unwinding that takes too long: remove what is left by name.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(set.wait().ok());
        });
        let _ = rx.recv_timeout(FORCE_AFTER);
        eprintln!("bench: removing the remaining sandboxes");
        force_cleanup();
        std::process::exit(130);
    })?;
    Ok(())
}

/// Whether a signal asked the bench to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fails with "interrupted" once a signal asked the bench to stop.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A sandbox's registration: present from its creation until it has been removed. Keep it
/// as the last field of the sandbox, so it drops after the namespaces.
pub struct Registration(String);

impl Registration {
    pub fn new(tag: &str) -> Self {
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).insert(tag.to_string());
        Self(tag.to_string())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
    }
}

/// Kills what runs in the registered sandboxes' namespaces (forwarder, socat, iperf3), then
/// removes the namespaces, the daemons' pins, cgroups and scratch directories.
fn force_cleanup() {
    let tags: Vec<String> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
    for tag in tags {
        let namespaces = ["c", "s", "r"].map(|end| format!("fwt-{tag}-{end}"));
        for ns in &namespaces {
            let pids = Command::new("ip").args(["netns", "pids", ns]).stderr(Stdio::null()).output();
            for pid in pids.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>()
                    && pid != std::process::id() as i32
                {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for ns in &namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}"));
        forwarder::pins::remove(&pins);
        forwarder::status::remove(&pins);
        if let Some(root) = forwarder::system::cgroup2_mount() {
            let _ = std::fs::remove_dir(root.join(format!("fwt-{tag}")));
        }
        // The daemons' scratch directories (forwarder_tests::Daemon::scratch_dir).
        let scratch_prefix = format!("forwarder-test-{tag}-");
        for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&scratch_prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    // The BPF_PROG_TEST_RUN instance pins under fwb-{tag} with a tag of this process's own
    // (forwarder_tests::unique_tag: "{pid % 100000}x{n}").
    let ours = format!("fwb-{}x", std::process::id() % 100_000);
    for entry in std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&ours) {
            forwarder::pins::remove(&entry.path());
        }
    }
}
