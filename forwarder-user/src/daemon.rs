//! `forwarder run`: set-up (adopting pinned state), then the event loop: signals and
//! config file changes drive reloads; the work that keeps the state current runs as tasks
//! of [`crate::reconcile`] (expiry, health checks, peer watch, route watch) beside the metrics server, all
//! stopped by one cancellation token; then what `--on-exit` says happens to the pins.
//!
//! One concurrency model: tokio tasks on one thread, blocking map, netlink and file work in
//! `spawn_blocking`, the applied config published on a `watch` channel. An error inside the
//! loop or a task is logged and counted (`forwarder_daemon_errors_total`); only a signal
//! ends the loop, so `--on-exit` is always honoured.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
};

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::Config,
    loader::{self, Instance, LoadOptions},
    pins::{self, PinLock},
    reconcile::{self, SharedInstance, Source, config_file::ConfigFile},
    status, system,
    telemetry::DaemonCounters,
};

/// What SIGTERM/SIGINT does to the pinned state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum OnExit {
    /// Detach every program and remove the pins (forwarding stops).
    Detach,
    /// Leave programs attached and maps pinned: forwarding goes on, and the next
    /// `forwarder run` with the same pin path adopts it (rolling restarts, upgrades).
    Keep,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config_path: PathBuf,
    pub pin_path: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub bpf_debug: bool,
    pub on_exit: OnExit,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Selects the config's `[node.NAME]` section.
    pub node_name: Option<String>,
}

impl RunOptions {
    fn source(&self) -> Source {
        Source { config_path: self.config_path.clone(), node_name: self.node_name.clone(), cgroup: self.cgroup.clone() }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let cfg = Config::from_file_for_node(&opts.config_path, opts.node_name.as_deref())?;
    // First of all: a SIGTERM during set-up (a supervisor that gives up, a test that stops
    // at once) must find the handlers, not end the process by the default action with
    // half of the state attached. It is acted on once set-up is done.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) =
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?);
    refuse_private_mounts(&opts)?;
    let _lock = PinLock::acquire(&opts.pin_path)?;
    status::write_starting(&opts.pin_path, &opts.config_path)?;
    // Whichever way run ends, the status file goes (the pins may stay).
    let _status_file = status::RemovedOnDrop(opts.pin_path.clone());
    loader::warn_if_forwarding_disabled();
    let mut load = LoadOptions::from_config(&cfg);
    if opts.bpf_debug {
        load.bpf_log_level = 5; // aya-log: Debug
    }
    let mut inst = Instance::load(&load, &opts.pin_path)?;
    let fresh = !inst.adopted;
    let logger = match aya_log::EbpfLogger::init(&mut inst.ebpf) {
        // SAFETY: the logger owns its ring buffer fd and lives as long as the AsyncFd.
        Ok(l) => Some(
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("kernel log reader: {e}"))?,
        ),
        Err(e) => {
            warn!("kernel-side logs unavailable: {e}");
            None
        }
    };
    let source = opts.source();
    let inst = {
        let (cfg, cgroup) = (cfg.clone(), source.cgroup.clone());
        reconcile::blocking(move || {
            if let Err(e) = reconcile::apply(&mut inst, &cfg, cgroup.as_deref()) {
                // A first start leaves nothing behind; an adopting one leaves the old state running.
                if fresh {
                    inst.detach();
                }
                return Err(e);
            }
            Ok(inst)
        })
        .await?
    };
    let inst: SharedInstance = Arc::new(Mutex::new(inst));
    let counters = Arc::new(DaemonCounters::default());
    counters.ready.store(true, Ordering::SeqCst);
    status::write(&opts.pin_path, &opts.config_path, &reconcile::lock(&inst))?;
    info!(pin_path = %opts.pin_path.display(), adopted = reconcile::lock(&inst).adopted,
        "running; SIGHUP reloads, SIGINT/SIGTERM stops");

    let stop = CancellationToken::new();
    let (applied_tx, applied_rx) = watch::channel(Arc::new(cfg));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reconcile::expiry::run(opts.pin_path.clone(), applied_rx.clone(), counters.clone(), stop.clone()));
    tasks.spawn(reconcile::health::run(opts.pin_path.clone(), applied_rx.clone(), counters.clone(), stop.clone()));
    let neighbour_news = match reconcile::routes::watch(
        opts.pin_path.clone(),
        opts.config_path.clone(),
        inst.clone(),
        counters.clone(),
        stop.clone(),
    ) {
        Ok((rx, watch)) => {
            tasks.spawn(watch);
            Some(rx)
        }
        Err(e) => {
            warn!(
                "route watch unavailable ({e}); cached next hops expire by age only, and veth peer flags \
                     are read again only on reload"
            );
            None
        }
    };
    tasks.spawn(reconcile::peers::run(inst.clone(), applied_rx, neighbour_news, counters.clone(), stop.clone()));
    if let Some(logger) = logger {
        tasks.spawn(kernel_logs(logger, counters.clone(), stop.clone()));
    }
    if let Some(addr) = opts.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}"))?;
        info!(%addr, "metrics on /metrics, health on /healthz and /readyz");
        let (pin, counters, stop) = (opts.pin_path.clone(), counters.clone(), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = crate::telemetry::serve(listener, pin, counters) => {}
            }
        });
    }

    crate::notify::ready(&running_status(&applied_tx.borrow()));
    let mut config_tick = tokio::time::interval(reconcile::config_file::CHECK_EVERY);
    let mut config_file = Some(ConfigFile::new(&opts.config_path));
    loop {
        let reload_now = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { info!("SIGHUP: reloading"); true }
            _ = config_tick.tick() => {
                let mut file = config_file.take().unwrap_or_else(|| ConfigFile::new(&opts.config_path));
                let (file, changed) = reconcile::blocking(move || { let c = file.changed(); Ok((file, c)) })
                    .await
                    .unwrap_or_else(|e| { error!("config file check: {e:#}"); (ConfigFile::new(&opts.config_path), false) });
                config_file = Some(file);
                if changed { info!(path = %opts.config_path.display(), "config file changed: reloading"); }
                changed
            }
        };
        if reload_now {
            if let Some(f) = config_file.as_mut() {
                f.taken();
            }
            reload(&inst, &applied_tx, &source, &opts, &counters).await;
        }
    }
    crate::notify::stopping();
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    // Every task is done: this is the last reference.
    let inst = Arc::into_inner(inst).map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()));
    match (opts.on_exit, inst) {
        (OnExit::Detach, Some(inst)) => {
            info!("stopping: detaching and removing pins");
            inst.detach();
        }
        (OnExit::Detach, None) => {
            warn!("stopping: a task still holds the instance; removing the pins directly");
            loader::restore_sysctls(&opts.pin_path);
            pins::remove(&opts.pin_path);
        }
        (OnExit::Keep, _) => info!("stopping: programs stay attached and state stays pinned for the next instance"),
    }
    Ok(())
}

/// One reload, told to the service manager: the new config applied and published to the
/// tasks, or refused with the running state unchanged. Never ends the loop.
async fn reload(
    inst: &SharedInstance,
    applied: &watch::Sender<Arc<Config>>,
    source: &Source,
    opts: &RunOptions,
    counters: &DaemonCounters,
) {
    counters.reloads.fetch_add(1, Ordering::Relaxed);
    crate::notify::reloading();
    let (work_inst, current, work_source) = (inst.clone(), applied.borrow().clone(), source.clone());
    let result = reconcile::blocking(move || {
        let mut inst = reconcile::lock(&work_inst);
        let new = reconcile::reload(&mut inst, &current, &work_source)?;
        Ok(new)
    })
    .await;
    match result {
        Ok(new) => {
            applied.send_replace(Arc::new(new));
            if let Err(e) = status::write(&opts.pin_path, &opts.config_path, &reconcile::lock(inst)) {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                error!("status file: {e}");
            }
        }
        Err(e) => {
            counters.reload_failures.fetch_add(1, Ordering::Relaxed);
            error!("reload refused, the running state is unchanged: {e:#}");
        }
    }
    crate::notify::ready(&running_status(&applied.borrow()));
}

/// Copies the kernel programs' log records (`--bpf-debug`) into the daemon's log.
async fn kernel_logs(
    mut logger: tokio::io::unix::AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
    counters: Arc<DaemonCounters>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            guard = logger.readable_mut() => match guard {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    error!("kernel log reader stopped: {e}");
                    return;
                }
            }
        }
    }
}

/// Under `ip netns exec` (a private mount namespace with /sys remounted) the host's bpffs
/// and cgroup2 are hidden: pins would go into a bpffs that vanishes with this process and
/// local forwards would have no cgroup. Said before anything is mounted or pinned.
fn refuse_private_mounts(opts: &RunOptions) -> anyhow::Result<()> {
    let hidden = system::hidden_host_mounts();
    let pins_hidden = hidden.iter().any(|(t, _)| *t == "bpf") && pins::check_bpffs(&opts.pin_path).is_err();
    let cgroup_hidden = hidden.iter().any(|(t, _)| *t == "cgroup2") && opts.cgroup.is_none();
    if !pins_hidden && !cgroup_hidden {
        return Ok(());
    }
    let what: Vec<String> = hidden.iter().map(|(t, dir)| format!("{t} at {dir}")).collect();
    anyhow::bail!(
        "this process runs in a private mount namespace where the host's {} are not visible \
         (`ip netns exec` remounts /sys): pins would vanish with the process. Enter the network \
         namespace without a new mount namespace instead: `nsenter --net=/run/netns/NAME forwarder run ...`; \
         or give --pin-path on a bpffs and --cgroup DIR (a cgroup v2 directory) visible here. Nothing was pinned.",
        what.join(" and ")
    )
}

/// The service manager's one-line status of a running instance.
fn running_status(cfg: &Config) -> String {
    format!("forwarding: {} forwards, {} peers", cfg.forwards.len(), cfg.peers.len())
}
