//! What a running instance tells about itself: the counters read from its pinned maps
//! ([`counters`], `forwarder stats`), the daemon's own figures ([`DaemonCounters`]), their
//! Prometheus exposition ([`exposition`]) and the HTTP server of `/metrics`, `/healthz` and
//! `/readyz` ([`server`]).
//!
//! Below it: `state` and `pins` (pinned maps) and `status` (is a daemon running). Above it:
//! `reconcile` (its tasks count into a [`DaemonCounters`]), `daemon` (owns the counters and
//! starts [`serve`]) and `cli` (`stats`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub mod counters;
pub mod exposition;
pub mod server;

pub use server::{DEFAULT_METRICS_ADDR, serve};

/// The daemon's own figures, shared between its loop, the expiry and route watch, and the
/// metrics server.
#[derive(Default, Debug)]
pub struct DaemonCounters {
    /// The config is applied (`/readyz`, `forwarder_ready`).
    pub ready: AtomicBool,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub ct_expired: AtomicU64,
    pub ct_entries: AtomicU64,
    pub ct_capacity: AtomicU64,
    /// Route-generation bumps by the rtnetlink watch.
    pub route_changes: AtomicU64,
    /// Errors of the daemon's own work (expiry passes, peer watch, status file, kernel
    /// logs): each is logged and counted, and the daemon goes on.
    pub errors: AtomicU64,
}

/// One consistent read of [`DaemonCounters`], as the exposition writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DaemonFigures {
    pub ready: bool,
    pub reloads: u64,
    pub reload_failures: u64,
    pub ct_expired: u64,
    pub ct_entries: u64,
    pub ct_capacity: u64,
    pub route_changes: u64,
    pub errors: u64,
}

impl DaemonCounters {
    pub fn figures(&self) -> DaemonFigures {
        DaemonFigures {
            ready: self.ready.load(Ordering::SeqCst),
            reloads: self.reloads.load(Ordering::Relaxed),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
            ct_expired: self.ct_expired.load(Ordering::Relaxed),
            ct_entries: self.ct_entries.load(Ordering::Relaxed),
            ct_capacity: self.ct_capacity.load(Ordering::Relaxed),
            route_changes: self.route_changes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}
