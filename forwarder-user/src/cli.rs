//! The `forwarder` command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use crate::{
    config::Config,
    loader::{self, DEFAULT_PIN_PATH, Instance, LoadOptions, PinLock},
    stats, system,
};

#[derive(Parser, Debug)]
#[command(name = "forwarder", version, about = "eBPF/XDP fast-path port forwarder (DNAT + SNAT + conntrack)")]
pub struct Cli {
    /// Log filter for forwarder's own logs (error, warn, info, debug, trace or a tracing
    /// filter such as "forwarder=debug").
    #[arg(long, global = true, default_value = "info", env = "FORWARDER_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load, attach to the config's interfaces, apply forwards, run until SIGINT/SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// bpffs directory for this instance's pinned maps (one per instance).
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Turn on the kernel programs' aya-log output at debug level (costly; off by default).
        #[arg(long)]
        bpf_debug: bool,
        /// cgroup v2 directory for the local-forward socket hooks (default: the cgroup v2
        /// mount found in /proc/mounts, i.e. every process of the host).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Validate a config; nothing is applied.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Counters of the running instance.
    Stats {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// How often the peers' neighbour entries are checked.
const PEER_WATCH_MS: u64 = 500;

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match cli.command {
        Command::Check { config } => {
            let cfg = Config::from_file(&config)?;
            println!("{}: ok ({} interfaces, {} forwards)", config.display(), cfg.interfaces.len(), cfg.forwards.len());
            Ok(())
        }
        Command::Stats { pin_path, json } => {
            let snap = stats::read(&pin_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snap)?);
            } else {
                print!("{}", stats::render_table(&snap));
            }
            Ok(())
        }
        Command::Run { config, pin_path, bpf_debug, cgroup } => {
            let cfg = Config::from_file(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run(cfg, pin_path, bpf_debug, cgroup))
        }
    }
}

async fn run(cfg: Config, pin_path: PathBuf, bpf_debug: bool, cgroup: Option<PathBuf>) -> anyhow::Result<()> {
    let _lock = PinLock::acquire(&pin_path)?;
    loader::warn_if_forwarding_disabled();
    let mut opts = LoadOptions::from_config(&cfg);
    if bpf_debug {
        opts.bpf_log_level = 5; // aya-log: Debug
    }
    let mut inst = Instance::load(&opts)?;
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
    let mut peers = Vec::new();
    let setup = async {
        inst.apply_forwards(&cfg, &system::local_addresses()?)?;
        for iface in &cfg.interfaces {
            inst.attach(iface)?;
        }
        peers = inst.apply_peers(&cfg)?;
        let mut egress: Vec<&str> = cfg.peers.iter().map(|p| p.interface.as_str()).collect();
        egress.extend(cfg.interfaces.iter().map(|i| i.name.as_str()));
        egress.sort();
        egress.dedup();
        if !cfg.peers.is_empty() {
            for name in egress {
                inst.attach_egress(name)?;
            }
        }
        if cfg.forwards.iter().any(|f| f.local) {
            let cgroup = cgroup
                .or_else(system::cgroup2_mount)
                .context("no cgroup v2 mount found for local forwards (give --cgroup DIR)")?;
            inst.attach_local(&cgroup)?;
        }
        inst.pin_maps(&pin_path)?;
        anyhow::Ok(())
    };
    if let Err(e) = setup.await {
        // Dropping the instance detaches whatever was attached and removes pins.
        drop(inst);
        loader::remove_pins(&pin_path);
        return Err(e);
    }
    info!(pin_path = %pin_path.display(), "running; SIGINT or SIGTERM stops");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut logger = logger;
    let mut peer_tick = tokio::time::interval(std::time::Duration::from_millis(PEER_WATCH_MS));
    let mut peer_direct = vec![false; peers.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = peer_tick.tick(), if !peers.is_empty() => {
                for ((peer, id, ifindex), was_direct) in peers.iter().zip(peer_direct.iter_mut()) {
                    let state = crate::peers::neighbour_state(peer.address, &peer.interface);
                    let direct = crate::peers::usable(state.as_deref());
                    if direct != *was_direct {
                        inst.set_peer_state(peer, *id, *ifindex, direct)?;
                        info!(peer = %peer.address, interface = %peer.interface, neighbour = ?state,
                            "peer {}", if direct { "direct" } else { "in fallback (normal routing)" });
                        *was_direct = direct;
                    }
                    if !direct {
                        if let Err(e) = crate::peers::send_probe(peer) {
                            warn!(peer = %peer.address, "probe: {e}");
                        }
                    }
                }
            }
            guard = async { match logger.as_mut() { Some(l) => l.readable_mut().await, None => std::future::pending().await } } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    info!("stopping: detaching and removing pins");
    drop(logger);
    drop(inst);
    loader::remove_pins(&pin_path);
    Ok(())
}
