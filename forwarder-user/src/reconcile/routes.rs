//! Keeps the fast path's cached next hops honest: every routing, neighbour, link or address
//! change the kernel announces on rtnetlink ([`crate::netlink::Events`]) bumps the route
//! generation (`FWD_ROUTE_GEN`), so each connection's next packet takes the full path with a
//! fresh FIB lookup. Without this watch a cached next hop still expires after
//! `NH_MAX_AGE_JIFFIES` (about a second). The same stream tells the peer watch which
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
};

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
/// starts too, for a change between the attach and the subscription.
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
        loop {
            // The flags are read per packet; the bump after a change makes every
            // connection's next packet take the full path with the new flags as well.
            if links && follow_links(&inst, &pin, &config, &counters).await {
                bump("attached interfaces or veth peers changed");
            }
            let batch = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                batch = events.next() => batch,
            };
            let Some(batch) = batch else { break };
            if batch.changed {
                bump("routes, neighbours, links or addresses changed");
            }
            links = batch.links || batch.lost;
            let news = if batch.lost {
                Some(NeighbourNews::Lost)
            } else {
                (!batch.neighbours.is_empty()).then_some(NeighbourNews::Changed(batch.neighbours))
            };
            if let Some(news) = news
                && tx.send(news).is_err()
            {
                return; // the daemon is stopping
            }
        }
        warn!(
            "route watch stopped (the rtnetlink stream ended); cached next hops now expire by age only, \
             and veth peer flags are read again only on reload"
        );
    };
    Ok((rx, task))
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
