//! `forwarder run`: set-up (adopting pinned state), reloads, the peer watch, connection
//! expiry, the metrics endpoint, and what happens at exit.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use forwarder_common::{GLOBAL_HAS_HOST_BACKENDS, GlobalConfig};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    loader::{self, Instance, LoadOptions, PinLock},
    netlink::{self, NeighbourState},
    routewatch::NeighbourNews,
    state::{self, State},
    status, system,
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

/// Counters of the daemon itself (metrics), kept in `telemetry`.
pub use crate::telemetry::DaemonCounters;

/// How often peers in fallback are probed and the peer table is checked for live edits.
const PEER_WATCH: Duration = Duration::from_millis(500);
/// How often the config file is checked for changes (kubelet swaps a symlink; content
/// comparison catches every way a file can change). The content is read only when the
/// file's [`ConfigStamp`] moved, so an idle daemon with 100k forwards does not read
/// megabytes a second.
const CONFIG_WATCH: Duration = Duration::from_secs(1);

/// Every this many checks the content is compared even with an unchanged stamp: two writes
/// of the same length within one tick of the file system's coarse clock can leave the
/// times as they were.
const CONFIG_FULL_CHECK_TICKS: u64 = 30;

/// What changes whenever a file's content may have: which file (device, inode: a swapped
/// symlink or a replaced file), its length, and its modification and change times (ctime
/// moves on every write and cannot be set back, unlike mtime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConfigStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ConfigStamp {
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
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
    status::write_starting(&opts)?;
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
    if let Err(e) = apply_config(&mut inst, &cfg, opts.cgroup.as_deref()) {
        // A first start leaves nothing behind; an adopting one leaves the old state running.
        if fresh {
            inst.detach();
        }
        return Err(e);
    }
    let counters = Arc::new(DaemonCounters::default());
    counters.ready.store(true, Ordering::SeqCst);
    status::write(&opts, &inst, &cfg)?;
    info!(pin_path = %opts.pin_path.display(), adopted = inst.adopted, "running; SIGHUP reloads, SIGINT/SIGTERM stops");

    let stop_threads = Arc::new(AtomicBool::new(false));
    let applied_conntrack = Arc::new(std::sync::Mutex::new(cfg.conntrack.clone()));
    let gc = spawn_expiry(opts.pin_path.clone(), applied_conntrack.clone(), counters.clone(), stop_threads.clone());
    let watch_counters = counters.clone();
    let mut neighbour_news = match crate::routewatch::spawn(opts.pin_path.clone(), move || {
        watch_counters.route_changes.fetch_add(1, Ordering::Relaxed);
    }) {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!("route watch unavailable ({e}); cached next hops expire by age only");
            None
        }
    };
    let mut peers = PeerWatch::new(neighbour_news.is_some());
    if let Some(addr) = opts.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}"))?;
        info!(%addr, "metrics on /metrics, health on /healthz and /readyz");
        tokio::spawn(crate::telemetry::serve(listener, opts.pin_path.clone(), counters.clone()));
    }

    crate::notify::ready(&running_status(&cfg));
    let mut logger = logger;
    let mut peer_tick = tokio::time::interval(PEER_WATCH);
    let mut config_tick = tokio::time::interval(CONFIG_WATCH);
    let mut current = cfg;
    let (mut config_stamp, mut config_ticks) = (ConfigStamp::of(&opts.config_path), 0u64);
    let mut config_text = std::fs::read(&opts.config_path).unwrap_or_default();
    loop {
        let reload_now = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { info!("SIGHUP: reloading"); true }
            _ = config_tick.tick() => {
                let stamp = ConfigStamp::of(&opts.config_path);
                config_ticks += 1;
                let changed = (stamp != config_stamp || config_ticks % CONFIG_FULL_CHECK_TICKS == 0) && {
                    config_stamp = stamp;
                    std::fs::read(&opts.config_path).unwrap_or_default() != config_text
                };
                if changed { info!(path = %opts.config_path.display(), "config file changed: reloading"); }
                changed
            }
            news = async { match neighbour_news.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match news {
                    Some(news) => peers.heard(news),
                    None => {
                        warn!("peer watch: the neighbour events stopped; neighbour entries are now read every {PEER_WATCH:?}");
                        neighbour_news = None;
                        peers = PeerWatch::new(false);
                    }
                }
                if let Err(e) = peers.update(&mut inst, &current, false) { warn!("peer watch: {e:#}"); }
                false
            }
            _ = peer_tick.tick() => {
                if let Err(e) = peers.update(&mut inst, &current, true) { warn!("peer watch: {e:#}"); }
                if let Err(e) = watch_host_backends(&mut inst, &current) { warn!("host backends: {e:#}"); }
                false
            }
            guard = async { match logger.as_mut() { Some(l) => l.readable_mut().await, None => std::future::pending().await } } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                false
            }
        };
        if reload_now {
            config_stamp = ConfigStamp::of(&opts.config_path);
            config_text = std::fs::read(&opts.config_path).unwrap_or_default();
            counters.reloads.fetch_add(1, Ordering::Relaxed);
            crate::notify::reloading();
            match reload(&mut inst, &current, &opts) {
                Ok(new) => {
                    *applied_conntrack.lock().unwrap_or_else(|e| e.into_inner()) = new.conntrack.clone();
                    current = new;
                    status::write(&opts, &inst, &current)?;
                }
                Err(e) => {
                    counters.reload_failures.fetch_add(1, Ordering::Relaxed);
                    error!("reload refused, the running state is unchanged: {e:#}");
                }
            }
            crate::notify::ready(&running_status(&current));
        }
    }
    crate::notify::stopping();
    stop_threads.store(true, Ordering::SeqCst);
    let _ = gc.join();
    drop(neighbour_news); // ends the route watch's task
    drop(logger);
    match opts.on_exit {
        OnExit::Detach => {
            info!("stopping: detaching and removing pins");
            inst.detach();
        }
        OnExit::Keep => info!("stopping: programs stay attached and state stays pinned for the next instance"),
    }
    Ok(())
}

/// Under `ip netns exec` (a private mount namespace with /sys remounted) the host's bpffs
/// and cgroup2 are hidden: pins would go into a bpffs that vanishes with this process and
/// local forwards would have no cgroup. Said before anything is mounted or pinned.
fn refuse_private_mounts(opts: &RunOptions) -> anyhow::Result<()> {
    let hidden = system::hidden_host_mounts();
    let pins_hidden = hidden.iter().any(|(t, _)| *t == "bpf") && loader::check_bpffs(&opts.pin_path).is_err();
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

/// Makes the kernel state match `cfg`: settings, forwards (a diff: unchanged forwards keep
/// their connections), peers, attachments. Everything that can be checked without
/// changing anything is checked first.
pub fn apply_config(inst: &mut Instance, cfg: &Config, cgroup: Option<&Path>) -> anyhow::Result<()> {
    for name in cfg.interfaces.iter().map(|i| &i.name).chain(cfg.peers.iter().map(|p| &p.interface)) {
        system::ifindex(name)?;
    }
    let cgroup = if cfg.forwards.iter().any(|f| f.local) {
        Some(
            cgroup
                .map(Path::to_path_buf)
                .or_else(system::cgroup2_mount)
                .context("no cgroup v2 mount found for local forwards (give --cgroup DIR)")?,
        )
    } else {
        None
    };
    let state = inst.state()?;
    let _edit = state.lock_edits()?;
    let flags = lo_accept_local(state.global()?.flags);
    let (snat_hole_min, snat_hole_max) = snat_hole(&cfg.conntrack)?;
    state.set_global(GlobalConfig {
        snat_port_min: cfg.conntrack.snat_port_min,
        snat_port_max: cfg.conntrack.snat_port_max,
        flags,
        netns_cookie: system::netns_cookie()?,
        snat_hole_min,
        snat_hole_max,
        local_udp_idle_s: u32::try_from(cfg.conntrack.udp_unreplied_timeout).unwrap_or(u32::MAX),
    })?;
    for (backend, names) in cfg.shared_local_udp_backends() {
        warn!(
            %backend,
            forwards = names.join(", "),
            "local UDP forwards share a backend: an unconnected socket reaches it through one of their listen \
             addresses at a time (a datagram to another while an exchange is live is refused, reason \
             local_udp_ambiguous); connected sockets are not affected"
        );
    }
    for (name, want) in [
        (forwarder_common::MAP_CONNTRACK, cfg.conntrack.max_entries),
        (forwarder_common::MAP_FORWARD_META, cfg.max_forwards + 1),
    ] {
        let have = state.capacity(name)?;
        if have != want {
            warn!(map = name, have, want, "map size differs from the config: it changes only after `forwarder detach`");
        }
    }
    let local_addrs = system::local_addresses()?;
    warn_about_host_backends(cfg, &local_addrs);
    state.apply_forwards(&cfg.forwards, &local_addrs, cfg.conntrack.on_forward_removed)?;
    state.apply_peers(&cfg.peers)?;
    // TC egress: host traffic to peers, and the replies of backends on this host (which
    // leave by whichever configured interface routes to the client). Attached before the
    // interfaces' ingress, so no reply of a new connection leaves untranslated.
    let mut egress: Vec<String> = cfg.peers.iter().map(|p| p.interface.clone()).collect();
    if !cfg.peers.is_empty() || state.global()?.flags & GLOBAL_HAS_HOST_BACKENDS != 0 {
        egress.extend(cfg.interfaces.iter().map(|i| i.name.clone()));
    }
    for name in inst.egress.clone() {
        if !egress.contains(&name) {
            inst.detach_egress(&name);
        }
    }
    for name in egress {
        inst.attach_egress(&name)?;
    }
    for gone in inst.pinned_interfaces() {
        if !cfg.interfaces.iter().any(|i| i.name == gone) {
            inst.detach_interface(&gone);
        }
    }
    for iface in &cfg.interfaces {
        inst.attach(iface)?;
    }
    match cgroup {
        Some(dir) => inst.attach_local(&dir)?,
        None => inst.detach_local(),
    }
    // Interfaces may have come or gone as XDP egresses: no cached next hop survives.
    state.bump_route_generation()?;
    Ok(())
}

/// What an operator should know about forwards whose backend is on this host: interface
/// traffic cannot reach UDP on `::1`, and reaches UDP on IPv4 loopback only where
/// `route_localnet` lets a loopback destination in (as with iptables DNAT).
fn warn_about_host_backends(cfg: &Config, local_addrs: &[std::net::IpAddr]) {
    use crate::config::Protocol;
    for f in cfg.forwards.iter().filter(|f| crate::maps::backend_on_host(f, local_addrs)) {
        if crate::maps::unreachable_from_interfaces(f) {
            warn!(forward = %f.name, backend = %f.backend,
                "UDP to IPv6 loopback cannot be reached from interfaces (a packet may not carry ::1 into the \
                 stack): the forward serves local programs only");
        } else if f.protocol == Protocol::Udp && f.backend.is_ipv4() && f.backend.ip().is_loopback() {
            let off: Vec<&str> =
                cfg.interfaces.iter().map(|i| i.name.as_str()).filter(|i| !system::route_localnet(i)).collect();
            if !off.is_empty() {
                warn!(forward = %f.name, backend = %f.backend, interfaces = off.join(", "),
                    "UDP to a loopback backend needs net.ipv4.conf.<interface>.route_localnet = 1 on the \
                     interfaces its clients come by (as iptables DNAT does): without it the kernel drops the \
                     datagrams as martians; bind the backend to the host's address instead");
            }
        }
    }
}

/// IPv4 packets without DF that are larger than their egress MTU are fragmented by the
/// stack: TC rewrites them and hands them over through the loopback device, and with a
/// source of this host's (SNAT) the stack takes them only where `accept_local` is on.
/// Turns it on for lo (only packets the host or a BPF program loops back arrive there) and
/// records in `flags` that it did (`GLOBAL_LO_ACCEPT_LOCAL`), so that the instance that
/// detaches, even after restarts, turns it off again. Returns the new flags.
fn lo_accept_local(flags: u32) -> u32 {
    use forwarder_common::GLOBAL_LO_ACCEPT_LOCAL;
    match system::lo_accept_local() {
        // On already: ours when the flag says so, else the administrator's to keep.
        Ok(true) => flags,
        Ok(false) => match system::set_lo_accept_local(true) {
            Ok(()) => {
                info!(
                    "net.ipv4.conf.lo.accept_local turned on (IPv4 packets the stack must fragment enter through lo)"
                );
                flags | GLOBAL_LO_ACCEPT_LOCAL
            }
            Err(e) => {
                warn!(
                    "net.ipv4.conf.lo.accept_local: {e}; IPv4 packets without DF larger than the egress MTU are dropped"
                );
                flags & !GLOBAL_LO_ACCEPT_LOCAL
            }
        },
        Err(e) => {
            warn!(
                "net.ipv4.conf.lo.accept_local unreadable ({e}); IPv4 packets without DF larger than the egress MTU may be dropped"
            );
            flags
        }
    }
}

/// Reload: the new config is parsed and checked whole; if anything is wrong the running
/// state stays exactly as it was.
fn reload(inst: &mut Instance, current: &Config, opts: &RunOptions) -> anyhow::Result<Config> {
    let new = Config::from_file_for_node(&opts.config_path, opts.node_name.as_deref())?;
    if let Err(e) = apply_config(inst, &new, opts.cgroup.as_deref()) {
        warn!("applying the new config failed ({e:#}); restoring the previous one");
        apply_config(inst, current, opts.cgroup.as_deref()).context("restoring the previous config")?;
        return Err(e);
    }
    info!(forwards = new.forwards.len(), peers = new.peers.len(), "reloaded");
    Ok(new)
}

/// Keeps each peer's state in step with its neighbour entry, probes peers in fallback, and
/// attaches the egress program where a live `peer add` put a peer. Neighbour states come
/// from rtnetlink events (a change is acted on as it arrives); the whole table is read
/// again when events were lost, and every [`PEER_RESYNC`] ticks as a safety net (every
/// tick when there is no event stream). No process is started.
struct PeerWatch {
    /// The kernel's neighbour entries, by (device, address).
    neighbours: std::collections::HashMap<(u32, std::net::IpAddr), NeighbourState>,
    /// Ticks until the next full read; 0: read at the next update.
    resync_in: u32,
    resync_every: u32,
}

/// Peer-watch ticks between two full reads of the neighbour table while events arrive.
const PEER_RESYNC: u32 = 20;

impl PeerWatch {
    fn new(events: bool) -> Self {
        Self { neighbours: Default::default(), resync_in: 0, resync_every: if events { PEER_RESYNC } else { 1 } }
    }

    /// Takes in what the event stream said.
    fn heard(&mut self, news: NeighbourNews) {
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
    fn update(&mut self, inst: &mut Instance, cfg: &Config, tick: bool) -> anyhow::Result<()> {
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
                && let Err(e) = crate::peers::send_probe(p.address, &p.interface)
            {
                warn!(peer = %p.address, "probe: {e}");
            }
        }
        Ok(())
    }
}

/// Attaches TC egress to every configured interface once a backend on this host appears
/// through a live `forward add` (a reload does it in `apply_config`).
fn watch_host_backends(inst: &mut Instance, cfg: &Config) -> anyhow::Result<()> {
    if cfg.interfaces.iter().all(|i| inst.egress.contains(&i.name))
        || inst.state()?.global()?.flags & GLOBAL_HAS_HOST_BACKENDS == 0
    {
        return Ok(());
    }
    for i in &cfg.interfaces {
        inst.attach_egress(&i.name)?;
    }
    Ok(())
}

/// Connection expiry in its own thread: it walks the table at `gc_interval` and removes
/// connections idle past their timeout (both entries at once). The datapath never waits on
/// it.
fn spawn_expiry(
    pin: PathBuf,
    conntrack: Arc<std::sync::Mutex<crate::config::Conntrack>>,
    counters: Arc<DaemonCounters>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut next = std::time::Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if std::time::Instant::now() >= next {
                // The applied config's, read each pass: a reload changes them.
                let (timeouts, interval) = {
                    let ct = conntrack.lock().unwrap_or_else(|e| e.into_inner());
                    (ct.timeouts(), Duration::from_secs(ct.gc_interval))
                };
                next = std::time::Instant::now() + interval;
                match State::open(&pin).and_then(|s| expire_once(&s, &timeouts)) {
                    Ok((expired, left, capacity)) => {
                        counters.ct_expired.fetch_add(expired as u64, Ordering::Relaxed);
                        counters.ct_entries.store(left as u64, Ordering::Relaxed);
                        counters.ct_capacity.store(capacity as u64, Ordering::Relaxed);
                        if capacity > 0 && left * 10 >= capacity as usize * 9 {
                            warn!(entries = left, capacity, "connection table over 90% full");
                        }
                    }
                    Err(e) => warn!("conntrack expiry: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// The ports SNAT leaves out: the host's ephemeral range, unless the config says otherwise
/// (`conntrack.snat_avoid_local_ports`); (1, 0) for none. Refuses a range with nothing left.
fn snat_hole(ct: &crate::config::Conntrack) -> anyhow::Result<(u16, u16)> {
    if !ct.snat_avoid_local_ports {
        return Ok((1, 0));
    }
    let (lo, hi) = system::local_port_range().unwrap_or_else(|e| {
        warn!("reading net.ipv4.ip_local_port_range: {e}; assuming Linux's default 32768-60999");
        (32768, 60999)
    });
    let range = forwarder_common::conntrack::PortRange {
        min: ct.snat_port_min,
        max: ct.snat_port_max,
        hole_min: lo,
        hole_max: hi,
    };
    if range.size() == 0 {
        anyhow::bail!(
            "conntrack.snat_ports {}-{} lies inside the host's ephemeral ports (net.ipv4.ip_local_port_range {lo} {hi}), \
             which SNAT leaves to the host's own connections: choose ports outside it, or set \
             conntrack.snat_avoid_local_ports = false",
            ct.snat_port_min,
            ct.snat_port_max
        );
    }
    Ok((lo, hi))
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
    let capacity = state.capacity(forwarder_common::MAP_CONNTRACK)?;
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

#[cfg(test)]
mod tests {
    use super::ConfigStamp;

    #[test]
    fn a_config_stamp_moves_with_the_content_and_the_file() {
        let dir = std::env::temp_dir().join(format!("fwd-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, other) = (dir.join("forwarder.toml"), dir.join("other.toml"));
        std::fs::write(&path, "a = 1\n").unwrap();
        let first = ConfigStamp::of(&path).unwrap();
        assert_eq!(ConfigStamp::of(&path), Some(first), "unchanged");
        std::thread::sleep(std::time::Duration::from_millis(20)); // past the coarse clock's tick
        std::fs::write(&path, "a = 2\n").unwrap();
        let rewritten = ConfigStamp::of(&path).unwrap();
        assert_ne!(rewritten, first, "same length, new content");
        std::fs::write(&other, "a = 2\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_ne!(ConfigStamp::of(&path).unwrap(), rewritten, "replaced by another file");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ConfigStamp::of(&path), None, "gone");
    }
}
