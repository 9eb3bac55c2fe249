//! forwarder's userspace: config, loader, maps and counters. The `forwarder` binary is a thin
//! CLI over this library; the tests drive the same library.

pub mod backends;
pub mod cli;
pub mod config;
pub mod connections;
pub mod daemon;
pub mod error;
pub mod loader;
pub mod maps;
pub mod netlink;
pub mod notify;
pub mod pins;
pub mod reconcile;
pub mod state;
pub mod status;
pub mod sys;
pub mod system;
pub mod telemetry;

/// The kernel-side object, built by build.rs and embedded so the binary is self-contained.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));

/// Helper programs of `cargo xtask bench` (forwarder-ebpf/src/bin/forwarder-bench.rs): the
/// redirect-only ceiling, the live-frames packet generator and the counting sink. Never loaded
/// by `forwarder` itself.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-bench"));
