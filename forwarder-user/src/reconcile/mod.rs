//! Makes the kernel state match the config: config → desired state → diff → apply (the
//! forwards' diff is in [`State::apply_forwards`]), on start and on every reload; and the
//! work that keeps it matching while the daemon runs, each a tokio task reading the applied
//! config from a `watch` channel: peer states ([`peers`]), connection expiry ([`expiry`]),
//! route invalidation ([`routes`]). Blocking map and netlink work runs in `spawn_blocking`.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::Context as _;
use forwarder_common::{GLOBAL_HAS_HOST_BACKENDS, GlobalConfig};
use tracing::{info, warn};

use crate::{config::Config, loader::Instance, system};

pub mod config_file;
pub mod expiry;
pub mod health;
pub mod peers;
pub mod routes;

/// The loaded instance, shared by the daemon's loop and its tasks; each holds the lock only
/// inside `spawn_blocking` work.
pub type SharedInstance = Arc<Mutex<Instance>>;

/// Locks the instance; a task that panicked while holding it left the instance usable
/// (every change to it is a whole map write or attach), so poisoning is ignored.
pub fn lock(inst: &SharedInstance) -> MutexGuard<'_, Instance> {
    inst.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs blocking work (map writes, netlink requests, file reads) off the event loop's
/// thread; a panic in it comes back as an error.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| anyhow::anyhow!("blocking task failed: {e}"))?
}

/// Where a reload reads its config from, and where local forwards attach.
#[derive(Clone, Debug)]
pub struct Source {
    pub config_path: PathBuf,
    /// Selects the config's `[node.NAME]` section.
    pub node_name: Option<String>,
    pub cgroup: Option<PathBuf>,
}

/// Makes the kernel state match `cfg`: settings, forwards (a diff: unchanged forwards keep
/// their connections), peers, attachments. Everything that can be checked without
/// changing anything is checked first.
pub fn apply(inst: &mut Instance, cfg: &Config, cgroup: Option<&Path>) -> anyhow::Result<()> {
    let required = cfg.interfaces.iter().filter(|i| !i.optional).map(|i| &i.name);
    for name in required.chain(cfg.peers.iter().map(|p| &p.interface)) {
        system::ifindex(name)?;
    }
    let present = |name: &str| system::ifindex(name).is_ok();
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
    // A few by name; a config of many such forwards gets one line for the rest.
    const SHARED_NAMED: usize = 8;
    let shared = cfg.shared_local_udp_backends();
    if shared.len() > SHARED_NAMED {
        warn!(count = shared.len(), "local UDP forwards share {} backends; the first {SHARED_NAMED}:", shared.len());
    }
    for (backend, names) in shared.into_iter().take(SHARED_NAMED) {
        warn!(
            %backend,
            forwards = names.join(", "),
            "local UDP forwards share a backend: an unconnected socket reaches it through one of their listen \
             addresses at a time (a datagram to another while an exchange is live is refused, reason \
             local_udp_ambiguous); connected sockets are not affected"
        );
    }
    for (name, want) in [
        (forwarder_common::FWD_CT_V4, cfg.conntrack.max_entries),
        (forwarder_common::FWD_META_V2, cfg.max_forwards + 1),
        (forwarder_common::FWD_BACKENDS, cfg.max_backends),
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
    inst.egress_wanted = egress.iter().cloned().collect();
    // A missing (optional) interface gets it when it appears.
    for name in egress.iter().filter(|name| present(name)) {
        inst.attach_egress(name)?;
    }
    for gone in inst.pinned_interfaces() {
        if !cfg.interfaces.iter().any(|i| i.name == gone) {
            inst.detach_interface(&gone);
        }
    }
    for iface in &cfg.interfaces {
        if iface.optional && !present(&iface.name) {
            inst.defer(iface);
        } else {
            inst.attach(iface)?;
        }
    }
    // Entries of interfaces that left the config, or of devices gone while no daemon ran
    // (a stale one would let XDP redirect into a device without forwarder's programs).
    let attached: Vec<u32> = inst.attached.iter().map(|a| a.ifindex).collect();
    for ifindex in state.iface_indexes()? {
        if !attached.contains(&ifindex) {
            state.remove_iface(ifindex)?;
        }
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
        let backend = f.backends[0].address;
        if crate::maps::unreachable_from_interfaces(f) {
            warn!(forward = %f.name, %backend,
                "UDP to IPv6 loopback cannot be reached from interfaces (a packet may not carry ::1 into the \
                 stack): the forward serves local programs only");
        } else if f.protocol == Protocol::Udp && backend.is_ipv4() && backend.ip().is_loopback() {
            let off: Vec<&str> =
                cfg.interfaces.iter().map(|i| i.name.as_str()).filter(|i| !system::route_localnet(i)).collect();
            if !off.is_empty() {
                warn!(forward = %f.name, %backend, interfaces = off.join(", "),
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
pub fn reload(inst: &mut Instance, current: &Config, source: &Source) -> anyhow::Result<Config> {
    let new = Config::from_file_for_node(&source.config_path, source.node_name.as_deref())?;
    if let Err(e) = apply(inst, &new, source.cgroup.as_deref()) {
        warn!("applying the new config failed ({e:#}); restoring the previous one");
        apply(inst, current, source.cgroup.as_deref()).context("restoring the previous config")?;
        return Err(e);
    }
    info!(forwards = new.forwards.len(), peers = new.peers.len(), "reloaded");
    Ok(new)
}

/// Attaches TC egress to every configured interface once a backend on this host appears
/// through a live `forward add` (a reload does it in [`apply`]).
pub fn watch_host_backends(inst: &mut Instance, cfg: &Config) -> anyhow::Result<()> {
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
