//! A `forwarder run` process inside a namespace, stopped (SIGTERM) and cleaned on drop.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Netns, run_ok};

/// The `forwarder` binary under test: $FORWARDER_BIN, else the workspace's debug build.
pub fn forwarder_bin() -> PathBuf {
    std::env::var_os("FORWARDER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/forwarder"))
}

pub struct Daemon {
    child: Option<Child>,
    /// The cgroup the local-forward hooks attach to: the test's own, never the host's root.
    pub cgroup: crate::Cgroup,
    pub pin_path: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    ns_path: String,
}

impl Daemon {
    /// Writes `config` to a temp file and starts `forwarder run` in `ns`; returns once the
    /// instance has pinned its maps (its last set-up step).
    pub fn start(ns: &Netns, tag: &str, config: &str) -> Result<Self> {
        Self::start_with(ns, tag, config, &[])
    }

    /// [`Daemon::start`] with extra `forwarder run` arguments.
    pub fn start_with(ns: &Netns, tag: &str, config: &str, extra: &[&str]) -> Result<Self> {
        let cgroup = crate::Cgroup::new(tag)?;
        let dir = std::env::temp_dir().join(format!("forwarder-test-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("forwarder.toml");
        std::fs::File::create(&config_path)?.write_all(config.as_bytes())?;
        let log_path = dir.join("forwarder.log");
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}"));
        let bin = forwarder_bin();
        if !bin.exists() {
            bail!("{} is missing: run `cargo build -p forwarder-user` first (scripts/test.sh does)", bin.display());
        }
        let child = ns
            .cmd(bin.to_str().context("path")?)
            .args(["--log-level", "debug", "run", "--config"])
            .arg(&config_path)
            .arg("--pin-path")
            .arg(&pin_path)
            .arg("--cgroup")
            .arg(&cgroup.path)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?;
        let mut d = Self { child: Some(child), cgroup, pin_path, config_path, log_path, ns_path: ns.path() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.pin_path.join(forwarder_common::MAP_FORWARD_META).exists() {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("forwarder exited with {status}:\n{}", d.log());
            }
            if Instant::now() > deadline {
                bail!("forwarder did not come up:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `forwarder ARGS... --pin-path PIN` in the instance's namespace; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        run_ok(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", self.ns_path))
                .arg("--")
                .arg(forwarder_bin())
                .args(args)
                .arg("--pin-path")
                .arg(&self.pin_path),
        )
    }

    /// `forwarder stats --json` of this instance.
    pub fn stats(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["stats", "--json"])?)?)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("forwarder ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        forwarder::loader::remove_pins(&self.pin_path);
        if let Some(dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
