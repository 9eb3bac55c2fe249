//! Sandboxes for forwarder's root-only tests, demo and benchmarks: network namespaces joined
//! by veth pairs with documentation addresses, created per test with unique names and
//! removed on every exit path (Drop guards run on panics too).

pub mod capture;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod deb;
pub mod frames;
pub mod image;
pub mod kubelet;
pub mod metrics;
pub mod netns;
pub mod sockets;
pub mod topo;
pub mod traffic;

pub use cgroup::Cgroup;
pub use daemon::{Daemon, ExactLaunch};
pub use kubelet::ConfigMapVolume;
pub use netns::{Netns, unique_tag};
pub use topo::Chain;

/// Polls `ok` every 100 ms; panics naming `what` if it is still false after `within`.
pub fn wait_for(what: &str, within: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
