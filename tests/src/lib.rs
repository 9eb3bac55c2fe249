//! Sandboxes for forwarder's root-only tests, demo and benchmarks: network namespaces joined
//! by veth pairs with documentation addresses, created per test with unique names and
//! removed on every exit path (Drop guards run on panics too).

pub mod cgroup;
pub mod daemon;
pub mod netns;
pub mod topo;

pub use cgroup::Cgroup;
pub use daemon::Daemon;
pub use netns::{Netns, unique_tag};
pub use topo::Chain;
