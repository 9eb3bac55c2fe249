//! Connection expiry: a task that walks the connection table every `gc_interval` of the
//! applied config and removes connections idle past their timeout (both entries at once).
//! The datapath never waits on it; a reload that changes the timeouts or the interval takes
//! effect at once.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::Config,
    state::{self, State},
    telemetry::DaemonCounters,
};

/// Runs passes until `stop`; the first one at once.
pub async fn run(
    pin: PathBuf,
    mut config: watch::Receiver<Arc<Config>>,
    counters: Arc<DaemonCounters>,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    loop {
        let (timeouts, interval) = {
            let cfg = config.borrow_and_update();
            (cfg.conntrack.timeouts(), Duration::from_secs(cfg.conntrack.gc_interval.max(1)))
        };
        let pin = pin.clone();
        match super::blocking(move || Ok(expire_once(&State::open(&pin)?, &timeouts)?)).await {
            Ok((expired, left, capacity)) => {
                counters.ct_expired.fetch_add(expired as u64, Ordering::Relaxed);
                counters.ct_entries.store(left as u64, Ordering::Relaxed);
                counters.ct_capacity.store(capacity as u64, Ordering::Relaxed);
                if capacity > 0 && left * 10 >= capacity as usize * 9 {
                    warn!(entries = left, capacity, "connection table over 90% full");
                }
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                warn!("conntrack expiry: {e:#}");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            // New timeouts or interval: a pass under them now.
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

/// One expiry pass; returns (connections expired or dropped early, entries left, capacity).
/// Connections idle past their state's timeout go; then, while the table is over 90% full,
/// unassured connections (handshake never completed, UDP never answered) go too, the
/// longest idle first, down to 80% (netfilter's early_drop, done ahead of need: the
/// kernel side drops them one at a time only where their SNAT ports collide).
pub fn expire_once(
    state: &State,
    timeouts: &forwarder_common::conntrack::Timeouts,
) -> crate::error::Result<(usize, usize, u32)> {
    use forwarder_common::conntrack::{CT_ASSURED, expired};
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    let entries = state.conntrack()?;
    let capacity = state.capacity(forwarder_common::FWD_CT_V4)?;
    let by_key: std::collections::HashMap<_, _> = entries.iter().copied().collect();
    let mut doomed = Vec::new();
    let mut unassured = Vec::new();
    let mut paired = std::collections::HashSet::new();
    for (orig, (v, reply_key)) in state::connections(&entries) {
        let reply = by_key.get(&reply_key);
        paired.insert(reply_key);
        let last = v.last_seen_ns.max(reply.map(|r| r.last_seen_ns).unwrap_or(0));
        let is_tcp = orig.proto == forwarder_common::PROTO_TCP;
        // Both entries carry the connection's state; a transition writes the one the
        // packet hit first, so take the further of the two.
        let st = reply.map(|r| r.state.max(v.state)).unwrap_or(v.state);
        if expired(is_tcp, st, now.saturating_sub(last), timeouts) {
            doomed.push(orig);
            doomed.push(reply_key);
        } else if v.flags & CT_ASSURED == 0 {
            unassured.push((last, orig, reply_key));
        }
    }
    // Reply entries whose original is gone (a half-made flow): expire on their own clock.
    for (k, v) in &entries {
        if v.direction != forwarder_common::CT_DIR_ORIGINAL && !paired.contains(k) {
            let is_tcp = k.proto == forwarder_common::PROTO_TCP;
            if expired(is_tcp, v.state, now.saturating_sub(v.last_seen_ns), timeouts) {
                doomed.push(*k);
            }
        }
    }
    let expired_count = doomed.len() / 2;
    let mut left = entries.len() - doomed.len();
    let high = capacity as usize / 10 * 9;
    let mut early = 0;
    if left > high {
        let low = capacity as usize / 10 * 8;
        unassured.sort_unstable_by_key(|(last, _, _)| *last);
        for (_, orig, reply) in unassured {
            if left <= low {
                break;
            }
            doomed.push(orig);
            doomed.push(reply);
            left -= 2;
            early += 1;
        }
    }
    state.remove_conntrack(&doomed)?;
    if expired_count > 0 {
        info!(expired = expired_count, "idle connections expired");
    }
    if early > 0 {
        warn!(dropped = early, "connection table over 90% full: unassured connections dropped early");
    }
    Ok((expired_count + early, left, capacity))
}
