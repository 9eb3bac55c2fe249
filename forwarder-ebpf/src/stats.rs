//! Per-CPU counters: per forward, and per reason code.

use forwarder_common::Reason;

use crate::maps::{FWD_BE_STATS, FWD_FWD_DENIED, FWD_FWD_STATS, FWD_REASONS};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(slot) = FWD_REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += 1 };
    }
}

/// One rewritten packet of `bytes` (L3 length) for `forward_id` and its connection's
/// backend (index 0: not known, an entry of an older version).
#[inline(always)]
pub fn count_forwarded(forward_id: u32, backend: u32, bytes: u16) {
    if let Some(s) = FWD_FWD_STATS.get_ptr_mut(forward_id) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
        }
    }
    if backend == 0 {
        return;
    }
    if let Some(s) = FWD_BE_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
        }
    }
}

/// A new connection of `forward_id` to its backend `backend`.
#[inline(always)]
pub fn count_new_conn(forward_id: u32, backend: u32) {
    if let Some(s) = FWD_FWD_STATS.get_ptr_mut(forward_id) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { (*s).new_conns += 1 };
    }
    if let Some(s) = FWD_BE_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { (*s).new_conns += 1 };
    }
}

/// A connection (or first UDP datagram) of a local program rewritten by the cgroup hooks.
#[inline(always)]
pub fn count_local_conn(forward_id: u32, backend: u32) {
    if let Some(s) = FWD_FWD_STATS.get_ptr_mut(forward_id) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { (*s).local_conns += 1 };
    }
    if let Some(s) = FWD_BE_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { (*s).local_conns += 1 };
    }
}

/// A new connection of `forward_id` refused by the forward's source lists.
#[inline(always)]
pub fn count_source_denied(forward_id: u32) {
    if let Some(n) = FWD_FWD_DENIED.get_ptr_mut(forward_id) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *n += 1 };
    }
}
