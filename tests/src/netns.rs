//! A network namespace guard.

use std::{
    fs::File,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short tag unique to this process and call, for namespace, link, cgroup and pin names.
pub fn unique_tag() -> String {
    format!("{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace (nsenter keeps the mount namespace, so bpffs
    /// pins stay visible, unlike `ip netns exec`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg("--").arg(program);
        c
    }

    pub fn sh(&self, script: &str) -> Result<String> {
        run_ok(self.cmd("sh").args(["-c", script]))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sh(&format!("sysctl -qw {key}={value}")).map(|_| ())
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let handle = self.spawn(f)?;
        handle.join().map_err(|e| anyhow::anyhow!("thread in {} panicked: {e:?}", self.name))
    }

    /// Like [`Netns::run`] without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        let file = File::open(self.path()).with_context(|| format!("open {}", self.path()))?;
        Ok(std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        }))
    }

    /// Like [`Netns::run`] for closures that borrow from the caller (benchmark generators
    /// driving loaded programs).
    pub fn run_scoped<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("open {}", self.path()))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .map_err(|e| anyhow::anyhow!("thread in {} panicked: {e:?}", self.name))
        })
    }

    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["ifindex"].as_u64().map(|i| i as u32).context("ifindex")
    }

    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        parse_mac(v[0]["address"].as_str().context("address")?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad mac {s}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// Runs a command and returns its stdout, or an error with its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out: Output = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
