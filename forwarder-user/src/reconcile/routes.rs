//! Keeps the fast path's cached next hops honest: every routing, neighbour, link or address
//! change the kernel announces on rtnetlink ([`crate::netlink::Events`]) bumps the route
//! generation (`FWD_ROUTE_GEN`), so each connection's next packet takes the full path with a
//! fresh FIB lookup. Without this watch a cached next hop still expires after
//! `NH_MAX_AGE_JIFFIES` (about a second). The same stream tells the peer watch which
//! neighbour entries changed.

use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    netlink::{self, Neighbour},
    state::State,
};

/// What the peer watch hears from the stream.
#[derive(Debug)]
pub enum NeighbourNews {
    /// These entries changed (a deleted one has state NONE).
    Changed(Vec<Neighbour>),
    /// Events were lost: read every entry again.
    Lost,
}

/// Subscribes and runs the watch as a tokio task: each batch of events bumps the route
/// generation once (then `on_bump` runs); neighbour changes go to the returned channel.
/// The task ends at `stop`, when the receiver is dropped, or when the stream ends.
pub fn spawn(
    pin: PathBuf,
    stop: CancellationToken,
    on_bump: impl Fn() + Send + 'static,
) -> Result<mpsc::UnboundedReceiver<NeighbourNews>, netlink::Error> {
    let mut events = netlink::Events::subscribe()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(batch) = tokio::select! {
            _ = stop.cancelled() => return,
            batch = events.next() => batch,
        } {
            if batch.changed {
                match State::open(&pin).and_then(|s| s.bump_route_generation()) {
                    Ok(generation) => {
                        on_bump();
                        debug!(generation, "routes or neighbours changed: cached next hops invalidated");
                    }
                    Err(e) => warn!("route generation: {e}"),
                }
            }
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
        warn!("route watch stopped (the rtnetlink stream ended); cached next hops now expire by age only");
    });
    Ok(rx)
}
