//! Active health checks of backends while the daemon runs (`[forward.health]`): each
//! backend is probed every `interval` (a TCP connect, or a UDP datagram that must get any
//! answer, within `timeout`); `fall` failures in a row take it out of new connections,
//! `rise` successes bring it back. Its state lives in `FWD_BACKENDS` (`BACKEND_DOWN`), so
//! `status`, `forward list` and `/metrics` read it from the maps; its established
//! connections are never touched.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Config, Health, HealthKind},
    state::State,
    telemetry::DaemonCounters,
};

/// How often due checks are started and finished ones read.
const TICK: Duration = Duration::from_millis(50);

/// What a UDP probe sends: any answer counts.
const UDP_PROBE: &[u8] = b"forwarder health check\n";

/// One backend's check: counts of consecutive outcomes against rise and fall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    pub up: bool,
    successes: u32,
    failures: u32,
}

impl Tracker {
    pub fn new(up: bool) -> Self {
        Tracker { up, successes: 0, failures: 0 }
    }

    /// Counts one probe's outcome; returns the new state when it changes.
    pub fn record(&mut self, ok: bool, health: &Health) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        if self.up && self.failures >= health.fall as u32 {
            self.up = false;
            return Some(false);
        }
        if !self.up && self.successes >= health.rise as u32 {
            self.up = true;
            return Some(true);
        }
        None
    }
}

/// A backend being checked: by forward name and address.
type Key = (String, SocketAddr);

struct Check {
    health: Health,
    tracker: Tracker,
    next: Instant,
    busy: bool,
}

/// One probe: whether the backend answered within the timeout.
pub async fn probe(kind: HealthKind, backend: SocketAddr, timeout: Duration) -> bool {
    let attempt = async {
        match kind {
            HealthKind::Tcp => tokio::net::TcpStream::connect(backend).await.is_ok(),
            HealthKind::Udp => {
                let bind: SocketAddr = if backend.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else { return false };
                if socket.connect(backend).await.is_err() || socket.send(UDP_PROBE).await.is_err() {
                    return false;
                }
                // An ICMP port unreachable arrives as an error of the receive.
                let mut buf = [0u8; 512];
                socket.recv(&mut buf).await.is_ok()
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
}

/// The health checks as a task, until `stop`: the checked backends follow the applied
/// config; a change of state is written to the maps, logged and counted on error.
pub async fn run(
    pin_path: PathBuf,
    config: watch::Receiver<Arc<Config>>,
    counters: Arc<DaemonCounters>,
    stop: CancellationToken,
) {
    let mut checks: HashMap<Key, Check> = HashMap::new();
    let mut probes: JoinSet<(Key, bool)> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    let mut applied: Option<Arc<Config>> = None;
    let mut wanted: HashMap<Key, Health> = HashMap::new();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            Some(done) = probes.join_next() => {
                let Ok((key, ok)) = done else { continue };
                let Some(check) = checks.get_mut(&key) else { continue };
                check.busy = false;
                if let Some(up) = check.tracker.record(ok, &check.health) {
                    let (pin, (name, backend)) = (pin_path.clone(), key.clone());
                    let written = super::blocking(move || mark(&pin, &name, backend, up)).await;
                    match written {
                        Ok(()) if up => info!(forward = %key.0, backend = %key.1, "backend up: takes new connections"),
                        Ok(()) => warn!(forward = %key.0, backend = %key.1,
                            "backend down: failed its health checks, takes no new connections"),
                        Err(e) => {
                            counters.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            warn!(forward = %key.0, backend = %key.1, "health state not recorded: {e:#}");
                            // Tried again at the next transition's probe.
                            check.tracker.up = !up;
                        }
                    }
                }
                continue;
            }
        }
        // The checked backends, read again only when a reload publishes a new config (a
        // walk of 100k forwards every tick would cost a core).
        let cfg = config.borrow().clone();
        if !applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, &cfg)) {
            wanted = checked_backends(&cfg);
            applied = Some(cfg);
            checks.retain(|k, c| wanted.get(k).is_some_and(|h| *h == c.health));
        }
        let down = if wanted.keys().any(|k| !checks.contains_key(k)) {
            let pin = pin_path.clone();
            super::blocking(move || down_backends(&pin)).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let now = Instant::now();
        for (key, health) in wanted.iter().map(|(k, h)| (k.clone(), *h)) {
            let check = checks.entry(key.clone()).or_insert_with(|| Check {
                health,
                // A new backend starts up (as a DNAT target is): checks take it out. One
                // already down (a daemon restarted on its pinned state) needs rise.
                tracker: Tracker::new(!down.contains(&key)),
                next: now,
                busy: false,
            });
            if check.busy || check.next > now {
                continue;
            }
            check.busy = true;
            check.next = now + Duration::from_millis(health.interval_ms as u64);
            let timeout = Duration::from_millis(health.timeout_ms as u64);
            probes.spawn(async move {
                let ok = probe(health.kind, key.1, timeout).await;
                (key, ok)
            });
        }
    }
}

/// Every backend with health checks in `cfg`, with its forward's checks.
fn checked_backends(cfg: &Config) -> HashMap<Key, Health> {
    let mut wanted = HashMap::new();
    for f in &cfg.forwards {
        if let Some(h) = f.health {
            for b in &f.backends {
                wanted.insert((f.name.clone(), *b.address), h);
            }
        }
    }
    wanted
}

/// The backends the maps hold as down.
fn down_backends(pin: &std::path::Path) -> anyhow::Result<Vec<Key>> {
    let state = State::open(pin)?;
    let stored = state.stored_backends()?;
    let mut out = Vec::new();
    for (id, f) in state.forwards()? {
        for (_, v) in stored.get(&id).map(Vec::as_slice).unwrap_or_default() {
            if v.state & forwarder_common::BACKEND_DOWN != 0 {
                out.push((f.name.clone(), *crate::backends::backend_of(v, f.listen.span).address));
            }
        }
    }
    Ok(out)
}

/// Records a backend's state in the maps (under the edit lock, as every change).
fn mark(pin: &std::path::Path, forward: &str, backend: SocketAddr, up: bool) -> anyhow::Result<()> {
    let state = State::open(pin)?;
    let _edit = state.lock_edits()?;
    let Some((id, _)) = state.forwards()?.into_iter().find(|(_, f)| f.name == forward) else { return Ok(()) };
    let stored = state.stored_backends()?;
    let Some((slot, _)) = stored
        .get(&id)
        .and_then(|l| l.iter().find(|(_, v)| *crate::backends::backend_of(v, 0).address == backend).copied())
    else {
        return Ok(());
    };
    state.set_backend_down(id, slot, !up)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_take_a_backend_out_and_rise_successes_bring_it_back() {
        let h = Health { kind: HealthKind::Tcp, interval_ms: 1000, timeout_ms: 500, rise: 3, fall: 2 };
        let mut t = Tracker::new(true);
        assert_eq!(t.record(false, &h), None);
        assert_eq!(t.record(true, &h), None, "a success resets the failures");
        assert_eq!(t.record(false, &h), None);
        assert_eq!(t.record(false, &h), Some(false));
        assert_eq!(t.record(false, &h), None, "already down");
        assert_eq!((t.record(true, &h), t.record(true, &h)), (None, None));
        assert_eq!(t.record(true, &h), Some(true));
    }
}
