//! A test cgroup (v2) and processes started inside it and a network namespace.

use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

/// A child cgroup of the cgroup v2 mount, removed on drop (once its processes have exited).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let root = forwarder::system::cgroup2_mount().context("no cgroup v2 mount")?;
        let path = root.join(format!("fwt-{tag}"));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    /// A command that runs `program` inside this cgroup and `ns`.
    pub fn command(&self, ns: &Netns, program: &str) -> Result<Command> {
        let procs = std::fs::OpenOptions::new().write(true).open(self.path.join("cgroup.procs"))?;
        let netns = std::fs::File::open(ns.path())?;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (write, setns) between fork and exec; the
        // files stay open in the parent until the command is dropped.
        unsafe {
            cmd.pre_exec(move || {
                // Writing "0" to cgroup.procs moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
