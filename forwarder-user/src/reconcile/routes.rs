//! Keeps the fast path's cached next hops honest: every routing, rule, neighbour, link or
//! address change the kernel announces on rtnetlink ([`crate::netlink::Events`]) bumps the
//! route generation (`FWD_ROUTE_GEN`), so each connection's next packet takes the full path
//! with a fresh FIB lookup, and the FIB memo's answers go too. Without this watch a cached
//! next hop still expires after `NH_MAX_AGE_JIFFIES` (about a second). The watch also keeps
//! the routing facts (`FWD_ROUTE_FLAGS`): whether the FIB's answer ignores the ports, from
//! the rules (read again on every rule event) and the multipath hash policies (sysctls,
//! which announce nothing: read every [`FACTS_EVERY`]); it clears them as it stops. The same stream tells the peer watch which
//! neighbour entries changed, and on link changes the attached interfaces are followed: a
//! device deleted and created again under its name is attached again
//! ([`Instance::follow_links`]), and the veths' `IFACE_TC_PEER` is brought in line with
//! where their far ends are now ([`Instance::refresh_tc_peers`]).
//!
//! [`Instance::follow_links`]: crate::loader::Instance::follow_links
//! [`Instance::refresh_tc_peers`]: crate::loader::Instance::refresh_tc_peers

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use forwarder_common::ROUTE_PORTS_IGNORED;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::SharedInstance;
use crate::{
    netlink::{self, Neighbour},
    state::State,
    telemetry::DaemonCounters,
};

/// What the peer watch hears from the stream.
#[derive(Debug)]
pub enum NeighbourNews {
    /// These entries changed (a deleted one has state NONE).
    Changed(Vec<Neighbour>),
    /// Events were lost: read every entry again.
    Lost,
}

/// Subscribes and returns the watch, to be run as a task until `stop` (or until the
/// receiver is dropped or the stream ends): each batch of events bumps the route
/// generation once (counted in `route_changes`); a batch with link events, or with events
/// lost, then has the attached interfaces followed (attached again, peer flags read again;
/// the status file at `config`'s daemon rewritten), with one more bump if any changed;
/// neighbour changes go to the returned channel. The links are read once as the watch
/// starts too, for a change between the attach and the subscription. The routing facts
/// (`FWD_ROUTE_FLAGS`, [`route_facts`]) are written as it starts and whenever they change
/// (rules read again on rule events, sysctls every [`FACTS_EVERY`]), each change with a
/// bump, and cleared as it ends.
pub fn watch(
    pin: PathBuf,
    config: PathBuf,
    inst: SharedInstance,
    counters: Arc<DaemonCounters>,
    stop: CancellationToken,
) -> Result<(mpsc::UnboundedReceiver<NeighbourNews>, impl Future<Output = ()> + Send + 'static), netlink::Error> {
    let mut events = netlink::Events::subscribe()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = async move {
        let bump = |why: &str| match State::open(&pin).and_then(|s| s.bump_route_generation()) {
            Ok(generation) => {
                counters.route_changes.fetch_add(1, Ordering::Relaxed);
                debug!(generation, "{why}: cached next hops invalidated");
            }
            Err(e) => warn!("route generation: {e}"),
        };
        let mut links = true;
        let mut rules = true;
        let mut rules_match_ports = true;
        let mut facts_written: Option<u32> = None;
        let mut facts_tick = tokio::time::interval(FACTS_EVERY);
        facts_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // The flags are read per packet; the bump after a change makes every
            // connection's next packet take the full path with the new flags as well.
            if links && follow_links(&inst, &pin, &config, &counters).await {
                bump("attached interfaces or veth peers changed");
            }
            if rules {
                let dump = super::blocking(|| Ok(netlink::rules_match_ports()?)).await;
                rules_match_ports = dump.unwrap_or_else(|e| {
                    warn!("policy rules: {e:#}");
                    true // unknown: assume the worst
                });
            }
            let facts = route_facts_with(rules_match_ports);
            if facts_written != Some(facts) {
                match State::open(&pin).and_then(|s| s.set_route_flags(facts)) {
                    Ok(()) => {
                        facts_written = Some(facts);
                        debug!(facts, "routing facts");
                        bump("routing facts changed");
                    }
                    Err(e) => warn!("routing facts: {e}"),
                }
            }
            (links, rules) = (false, false);
            let batch = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = facts_tick.tick() => continue,
                batch = events.next() => batch,
            };
            let Some(batch) = batch else {
                warn!(
                    "route watch stopped (the rtnetlink stream ended); cached next hops now expire by age only, \
                     the FIB memo is off, and veth peer flags are read again only on reload"
                );
                break;
            };
            if batch.changed {
                bump("routes, rules, neighbours, links or addresses changed");
            }
            links = batch.links || batch.lost;
            rules = batch.rules || batch.lost;
            let news = if batch.lost {
                Some(NeighbourNews::Lost)
            } else {
                (!batch.neighbours.is_empty()).then_some(NeighbourNews::Changed(batch.neighbours))
            };
            if let Some(news) = news
                && tx.send(news).is_err()
            {
                break; // the daemon is stopping
            }
        }
        // Nobody follows the rules and sysctls any more: the programs stop relying on them.
        if let Err(e) = State::open(&pin).and_then(|s| s.set_route_flags(0)) {
            debug!("routing facts not cleared: {e}");
        }
    };
    Ok((rx, task))
}

/// How often the multipath hash policies (sysctls, which send no event) are read again.
pub const FACTS_EVERY: Duration = Duration::from_secs(1);

/// The `FWD_ROUTE_FLAGS` bits for what the watch knows: `ROUTE_PORTS_IGNORED` unless a
/// policy rule matches ports or a family's multipath hash may take them (`policies`: IPv4's
/// and IPv6's `fib_multipath_hash_policy`; 1 hashes L4 ports, 3 the fields the admin chose,
/// which may be ports; None: unreadable, assumed to take them).
pub fn route_facts(rules_match_ports: bool, policies: [Option<u32>; 2]) -> u32 {
    let hash_takes_ports = policies.iter().any(|p| !matches!(p, Some(0 | 2)));
    if rules_match_ports || hash_takes_ports { 0 } else { ROUTE_PORTS_IGNORED }
}

/// [`route_facts`] of the calling thread's namespace as it is now (for a program set run
/// without the daemon's watch, as the benchmark's BPF_PROG_TEST_RUN part does).
pub fn route_facts_here() -> u32 {
    route_facts_with(netlink::rules_match_ports().unwrap_or(true))
}

/// [`route_facts`] with this namespace's hash policies as they are now.
fn route_facts_with(rules_match_ports: bool) -> u32 {
    route_facts(rules_match_ports, [multipath_policy("ipv4"), multipath_policy("ipv6")])
}

/// This namespace's `net.<family>.fib_multipath_hash_policy`; a kernel without multipath
/// routing has no such sysctl, and hashes nothing (0).
fn multipath_policy(family: &str) -> Option<u32> {
    match std::fs::read_to_string(format!("/proc/sys/net/{family}/fib_multipath_hash_policy")) {
        Ok(s) => s.trim().parse().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
        Err(_) => None,
    }
}

/// [`crate::loader::Instance::follow_links`] and then
/// [`crate::loader::Instance::refresh_tc_peers`] off the event loop's thread; true if
/// anything changed. Errors are logged and counted (an interface that could not be
/// attached again is tried again at the next link event).
async fn follow_links(inst: &SharedInstance, pin: &Path, config: &Path, counters: &Arc<DaemonCounters>) -> bool {
    let (inst, pin, config, counters) = (inst.clone(), pin.to_path_buf(), config.to_path_buf(), counters.clone());
    let work = move || {
        let mut inst = super::lock(&inst);
        let error = |what: &str, e: &dyn std::fmt::Display| {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            warn!("{what}: {e}");
        };
        let relinked = inst.follow_links().unwrap_or_else(|e| {
            error("following the attached interfaces", &e);
            1 // perhaps some were attached again
        });
        if relinked > 0
            && let Err(e) = crate::status::write(&pin, &config, &inst)
        {
            error("status file", &e);
        }
        let moved = inst.refresh_tc_peers().unwrap_or_else(|e| {
            error("veth peer flags", &e);
            0
        });
        Ok(relinked + moved > 0)
    };
    super::blocking(work).await.unwrap_or_else(|e| {
        warn!("following links: {e:#}");
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_ignored_only_when_no_rule_and_no_hash_takes_them() {
        assert_eq!(route_facts(false, [Some(0), Some(0)]), ROUTE_PORTS_IGNORED);
        // L3 and inner-L3 hashes take addresses only.
        assert_eq!(route_facts(false, [Some(2), Some(0)]), ROUTE_PORTS_IGNORED);
        // A rule on ports, an L4 or custom hash in either family, or a policy not read.
        assert_eq!(route_facts(true, [Some(0), Some(0)]), 0);
        assert_eq!(route_facts(false, [Some(1), Some(0)]), 0);
        assert_eq!(route_facts(false, [Some(0), Some(3)]), 0);
        assert_eq!(route_facts(false, [None, Some(0)]), 0);
    }

    #[test]
    fn this_namespace_has_a_multipath_policy() {
        // Read from /proc as the watch does (a value, or 0 without multipath routing).
        for family in ["ipv4", "ipv6"] {
            assert!(multipath_policy(family).is_some_and(|p| p <= 3), "{family}");
        }
    }
}
