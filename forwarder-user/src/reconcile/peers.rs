//! Same-switch peers while the daemon runs: each peer's state follows the kernel's neighbour
//! entry for it (direct while it answers ARP/ND, fallback otherwise). Neighbour changes
//! arrive as rtnetlink events ([`super::routes`]); peers in fallback are probed so that the
//! kernel resolves them again; a live `peer add` or `forward add` that needs TC egress gets
//! it attached here.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use forwarder_common::PEER_PROBE_MARK;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{SharedInstance, routes::NeighbourNews};
use crate::{
    config::Config,
    loader::Instance,
    netlink::{self, NeighbourState},
    telemetry::DaemonCounters,
};

/// How often peers in fallback are probed and the peer table is checked for live edits.
pub const PEER_WATCH: Duration = Duration::from_millis(500);

/// The peer watch as a task, until `stop`: acts on each batch of neighbour news as it
/// arrives, and every [`PEER_WATCH`] probes, re-reads the table when due, and attaches TC
/// egress that live edits need. Errors are logged and counted; the watch goes on.
pub async fn run(
    inst: SharedInstance,
    config: watch::Receiver<Arc<Config>>,
    mut news: Option<mpsc::UnboundedReceiver<NeighbourNews>>,
    counters: Arc<DaemonCounters>,
    stop: CancellationToken,
) {
    let mut watch = Some(PeerWatch::new(news.is_some()));
    let mut tick = tokio::time::interval(PEER_WATCH);
    loop {
        let heard = tokio::select! {
            _ = stop.cancelled() => return,
            n = async { match news.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match n {
                    Some(n) => Some(n),
                    None => {
                        warn!("peer watch: the neighbour events stopped; neighbour entries are now read every {PEER_WATCH:?}");
                        news = None;
                        watch = Some(PeerWatch::new(false));
                        continue;
                    }
                }
            }
            _ = tick.tick() => None,
        };
        let is_tick = heard.is_none();
        let mut w = watch.take().unwrap_or_else(|| PeerWatch::new(news.is_some()));
        let (inst, cfg) = (inst.clone(), config.borrow().clone());
        let done = super::blocking(move || {
            if let Some(n) = heard {
                w.heard(n);
            }
            let mut inst = super::lock(&inst);
            let peers = w.update(&mut inst, &cfg, is_tick);
            let host = if is_tick { super::watch_host_backends(&mut inst, &cfg) } else { Ok(()) };
            Ok((w, peers.and(host)))
        })
        .await;
        match done {
            Ok((w, result)) => {
                watch = Some(w);
                if let Err(e) = result {
                    counters.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!("peer watch: {e:#}");
                }
            }
            // A panic lost the watch's view of the neighbour table: the next pass reads it whole.
            Err(e) => {
                counters.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!("peer watch: {e:#}");
            }
        }
    }
}

/// Sends one datagram to the peer's discard port, marked so that the egress program sends
/// it direct even in fallback: the kernel then resolves the peer's neighbour entry again.
pub fn send_probe(address: IpAddr, interface: &str) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let sock = match address {
        IpAddr::V4(_) => UdpSocket::bind("0.0.0.0:0")?,
        IpAddr::V6(_) => UdpSocket::bind("[::]:0")?,
    };
    setsockopt(&sock, sockopt::Mark, &PEER_PROBE_MARK)?;
    setsockopt(&sock, sockopt::BindToDevice, &std::ffi::OsString::from(interface))?;
    sock.send_to(b"forwarder peer probe", SocketAddr::new(address, 9))?;
    Ok(())
}

/// Keeps each peer's state in step with its neighbour entry, probes peers in fallback, and
/// attaches the egress program where a live `peer add` put a peer. Neighbour states come
/// from rtnetlink events (a change is acted on as it arrives); the whole table is read
/// again when events were lost, and every [`PEER_RESYNC`] ticks as a safety net (every
/// tick when there is no event stream). No process is started.
pub struct PeerWatch {
    /// The kernel's neighbour entries, by (device, address).
    neighbours: std::collections::HashMap<(u32, std::net::IpAddr), NeighbourState>,
    /// Ticks until the next full read; 0: read at the next update.
    resync_in: u32,
    resync_every: u32,
}

/// Peer-watch ticks between two full reads of the neighbour table while events arrive.
const PEER_RESYNC: u32 = 20;

impl PeerWatch {
    pub fn new(events: bool) -> Self {
        Self { neighbours: Default::default(), resync_in: 0, resync_every: if events { PEER_RESYNC } else { 1 } }
    }

    /// Takes in what the event stream said.
    pub fn heard(&mut self, news: NeighbourNews) {
        match news {
            NeighbourNews::Changed(changed) => {
                for n in changed {
                    self.neighbours.insert((n.ifindex, n.address), n.state);
                }
            }
            NeighbourNews::Lost => self.resync_in = 0,
        }
    }

    /// Brings the peers' states in line with the neighbour table; `tick`: the periodic call
    /// (counts towards the next full read, probes peers in fallback).
    pub fn update(&mut self, inst: &mut Instance, cfg: &Config, tick: bool) -> anyhow::Result<()> {
        if self.resync_in == 0 {
            let all = netlink::neighbours()?;
            self.neighbours = all.into_iter().map(|n| ((n.ifindex, n.address), n.state)).collect();
            self.resync_in = self.resync_every;
        }
        if tick {
            self.resync_in -= 1;
        }
        let state = inst.state()?;
        for p in &state.peers()? {
            if !inst.egress.contains(&p.interface) {
                inst.attach_egress(&p.interface)?;
                for i in &cfg.interfaces {
                    inst.attach_egress(&i.name)?;
                }
            }
            let neigh = self.neighbours.get(&(p.ifindex, p.address)).copied();
            let direct = netlink::usable(neigh);
            if direct != p.direct {
                state.set_peer_state(p, direct)?;
                let cause = if tick { "periodic check" } else { "neighbour event" };
                info!(peer = %p.address, interface = %p.interface, neighbour = ?neigh.map(netlink::state_name), cause,
                    "peer {}", if direct { "direct" } else { "in fallback (normal routing)" });
            }
            if !direct
                && tick
                && let Err(e) = send_probe(p.address, &p.interface)
            {
                warn!(peer = %p.address, "probe: {e}");
            }
        }
        Ok(())
    }
}
