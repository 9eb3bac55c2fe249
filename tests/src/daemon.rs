//! A `forwarder run` process inside a namespace, stopped (SIGTERM) and cleaned on drop.

use std::{
    io::Write as _,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Netns, run_ok};

/// The `forwarder` binary under test: $FORWARDER_BIN, else the debug build of the target
/// directory this test binary was built in (`target/debug/deps/TEST` → `target/debug`, so a
/// `CARGO_TARGET_DIR` elsewhere works), else the workspace's `target/debug`.
pub fn forwarder_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FORWARDER_BIN") {
        return PathBuf::from(bin);
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().skip(1).take(2).map(|dir| dir.join("forwarder")).find(|bin| bin.is_file()));
    beside_exe.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/forwarder"))
}

/// How long a daemon may take to come up before a test gives up on it.
pub const COME_UP_WITHIN: Duration = Duration::from_secs(90);

pub struct Daemon {
    child: Option<Child>,
    /// The cgroup the local-forward hooks attach to: the test's own, never the host's root.
    pub cgroup: crate::Cgroup,
    pub pin_path: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
    /// The test's scratch directory (config, log), held to be removed on drop (after the pins).
    _scratch: tempfile::TempDir,
    ns_path: String,
    extra: Vec<String>,
    /// Set by [`Daemon::start_exact`]: the whole command line instead of the usual one.
    exact: Option<ExactCommand>,
    /// Set by [`Daemon::start_notified`]: the sd_notify socket; readiness is its READY=1.
    notify_socket: Option<PathBuf>,
}

struct ExactCommand {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

/// A command line run exactly as given, e.g. a container's command and args with its
/// mounts mapped to test paths. `pin_path`, `config_path` and `cgroup` are those the
/// command line names: the guard waits on, cleans up and queries them.
pub struct ExactLaunch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited, as in a container).
    pub env: Vec<(String, String)>,
    pub pin_path: PathBuf,
    pub config_path: PathBuf,
    pub cgroup: crate::Cgroup,
    /// The scratch directory the command line's files live in ([`Daemon::scratch_dir`]);
    /// the daemon keeps its log there and removes it on drop.
    pub scratch: tempfile::TempDir,
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
        let dir = Self::scratch_dir(tag)?;
        let config_path = dir.path().join("forwarder.toml");
        std::fs::File::create(&config_path)?.write_all(config.as_bytes())?;
        let log_path = dir.path().join("forwarder.log");
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}"));
        let mut d = Self {
            child: None,
            cgroup,
            pin_path,
            config_path,
            log_path,
            _scratch: dir,
            ns_path: ns.path(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            exact: None,
            notify_socket: None,
        };
        d.launch()?;
        Ok(d)
    }

    /// [`Daemon::start`] under a service manager's readiness protocol: `NOTIFY_SOCKET` names
    /// a datagram socket of the test's, and this returns as soon as `READY=1` arrives there
    /// (not when the status file appears), with the socket for the messages that follow.
    pub fn start_notified(ns: &Netns, tag: &str, config: &str) -> Result<(Self, UnixDatagram)> {
        let dir = Self::scratch_dir(tag)?;
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path)?;
        socket.set_read_timeout(Some(COME_UP_WITHIN))?;
        let mut d = Self {
            child: None,
            cgroup: crate::Cgroup::new(tag)?,
            pin_path: PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}")),
            config_path: dir.path().join("forwarder.toml"),
            log_path: dir.path().join("forwarder.log"),
            _scratch: dir,
            ns_path: ns.path(),
            extra: Vec::new(),
            exact: None,
            notify_socket: Some(socket_path),
        };
        std::fs::write(&d.config_path, config)?;
        d.launch()?;
        let ready = Self::next_notification(&socket).with_context(|| d.log())?;
        if !ready.lines().any(|l| l == "READY=1") {
            bail!("first notification is not READY=1: {ready:?}\n{}", d.log());
        }
        Ok((d, socket))
    }

    /// The next sd_notify message on `socket` (waits up to its read timeout). A signal
    /// delivered to the test process meanwhile (EINTR: std does not retry `recv`) is not
    /// the end of the wait.
    pub fn next_notification(socket: &UnixDatagram) -> Result<String> {
        let mut buf = [0u8; 4096];
        let n = loop {
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.context("no sd_notify message")?,
            }
        };
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// A fresh scratch directory for the test tagged `tag` (`forwarder-test-TAG-*` in the
    /// temp dir, so that a forced clean-up finds it), removed when dropped.
    pub fn scratch_dir(tag: &str) -> Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new().prefix(&format!("forwarder-test-{tag}-")).tempdir()?)
    }

    /// Starts `launch.argv` in `ns` exactly as given (no arguments added); returns once the
    /// instance has applied its config, like [`Daemon::start`].
    pub fn start_exact(ns: &Netns, launch: ExactLaunch) -> Result<Self> {
        let dir = launch.scratch;
        let mut d = Self {
            child: None,
            cgroup: launch.cgroup,
            pin_path: launch.pin_path,
            config_path: launch.config_path,
            log_path: dir.path().join("forwarder.log"),
            _scratch: dir,
            ns_path: ns.path(),
            extra: Vec::new(),
            exact: Some(ExactCommand { argv: launch.argv, env: launch.env }),
            notify_socket: None,
        };
        d.launch()?;
        Ok(d)
    }

    /// The process id of the running instance.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts `forwarder run` and waits until it has applied its config (it writes its
    /// status file, with its pid, as the last set-up step).
    pub fn launch(&mut self) -> Result<()> {
        let bin = forwarder_bin();
        if !bin.exists() {
            bail!("{} is missing: run `cargo build -p forwarder-user` first (scripts/test.sh does)", bin.display());
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path)).arg("--");
        if let Some(ExactCommand { argv, env }) = &self.exact {
            // Both streams in the log, as a container's stdout and stderr both go to its log.
            cmd.args(argv).env_clear().envs(env.iter().cloned()).stdout(log.try_clone()?);
        } else {
            cmd.arg(&bin)
                .args(["--log-level", "debug", "run", "--config"])
                .arg(&self.config_path)
                .arg("--pin-path")
                .arg(&self.pin_path)
                .arg("--cgroup")
                .arg(&self.cgroup.path)
                .args(&self.extra)
                .stdout(Stdio::null());
        }
        if let Some(socket) = &self.notify_socket {
            cmd.env("NOTIFY_SOCKET", socket);
        }
        let child = cmd.stderr(log).spawn()?;
        self.child = Some(child);
        if self.notify_socket.is_some() {
            // The caller waits for READY=1 instead.
            return Ok(());
        }
        let status_file = forwarder::status::path_for(&self.pin_path);
        // Readiness is the status file; the deadline only bounds a failure. Loading the
        // programs runs the verifier, which on a loaded 2-core machine takes tens of seconds.
        let deadline = Instant::now() + COME_UP_WITHIN;
        loop {
            let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
            let written = std::fs::read(&status_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|v| v["pid"].as_u64() == Some(pid as u64) && v["state"] != "starting")
                .unwrap_or(false);
            if written {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("forwarder exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("forwarder did not come up:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the process dies without any clean-up.
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends a signal to the running process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// Replaces the config file the way kubelet updates a mounted ConfigMap: the new content
    /// goes to a fresh file and a symlink is swapped onto the config path atomically.
    pub fn replace_config(&self, text: &str) -> Result<()> {
        let dir = self.config_path.parent().context("config dir")?;
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let data = dir.join(format!("..data-{n}"));
        std::fs::write(&data, text)?;
        let tmp = dir.join(format!("..swap-{n}"));
        std::os::unix::fs::symlink(&data, &tmp)?;
        std::fs::rename(&tmp, &self.config_path)?;
        Ok(())
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
        forwarder::pins::remove(&self.pin_path);
        forwarder::status::remove(&self.pin_path);
    }
}
