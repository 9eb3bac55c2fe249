//! The `forwarder` command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{
    config::{Config, Forward, Peer},
    daemon::{self, OnExit, RunOptions},
    error::Error,
    loader::{self, DEFAULT_PIN_PATH},
    state::State,
    status, system,
    telemetry::{DEFAULT_METRICS_ADDR, counters as stats},
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
    /// Adopts the state an earlier instance left pinned under --pin-path. SIGHUP or a change
    /// of the config file reloads it.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// bpffs directory for this instance's pinned maps and links (one per instance).
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Turn on the kernel programs' aya-log output at debug level (costly; off by default).
        #[arg(long)]
        bpf_debug: bool,
        /// cgroup v2 directory for the local-forward socket hooks (default: the cgroup v2
        /// mount found in /proc/mounts, i.e. every process of the host).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// What SIGTERM/SIGINT does: `detach` everything (default), or `keep` programs and
        /// state pinned for the next instance.
        #[arg(long, value_enum, default_value = "detach")]
        on_exit: OnExit,
        /// Address for /metrics, /healthz and /readyz; "off" disables.
        #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
        metrics_addr: String,
        /// Adds the config's `[node.NAME]` section (a DaemonSet passes spec.nodeName).
        #[arg(long, env = "FORWARDER_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Validate a config (every node section too); nothing is applied.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Show the result for this node's section.
        #[arg(long, env = "FORWARDER_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Counters of the running instance.
    Stats {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Refresh every second in place, with per-second rates.
        #[arg(long)]
        watch: bool,
    },
    /// Interfaces and modes, program ids, map fill levels, conntrack entries.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove every program and map an instance pinned under --pin-path (forwarding stops).
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Live edits of forwards on the running instance (until the next reload of the file).
    Forward {
        #[command(subcommand)]
        action: ForwardAction,
        #[arg(long, global = true, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Live edits of peers on the running instance (until the next reload of the file).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
        #[arg(long, global = true, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// The connection table of the running instance, as conntrack-tools shows netfilter's.
    Conntrack {
        #[command(subcommand)]
        action: ConntrackAction,
        /// bpffs directory of the instance's pinned maps.
        #[arg(long, global = true, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConntrackAction {
    /// Every connection: original tuple (client -> listen), reply tuple (backend -> the SNAT
    /// address and port it answers to), state ([A]: assured), age and idle seconds.
    List {
        /// Only this forward's connections.
        #[arg(long)]
        forward: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete connections (both directions), of one forward or all: their next packets are
    /// new flows (a TCP segment that is not a SYN is refused), as with `conntrack -F`.
    Flush {
        /// Only this forward's connections.
        #[arg(long)]
        forward: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ForwardAction {
    /// Add a forward (validated like the config file).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        protocol: String,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        backend: String,
        #[arg(long, default_value = "auto")]
        snat: String,
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        local: bool,
    },
    /// Remove a forward by name (its connections follow conntrack.on_forward_removed).
    Del { name: String },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerAction {
    Add {
        #[arg(long)]
        address: String,
        #[arg(long)]
        interface: String,
    },
    Del {
        address: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match cli.command {
        Command::Check { config, node_name } => {
            let cfg = Config::from_file_for_node(&config, node_name.as_deref())?;
            println!(
                "{}: ok ({} interfaces, {} forwards, {} peers)",
                config.display(),
                cfg.interfaces.len(),
                cfg.forwards.len(),
                cfg.peers.len()
            );
            Ok(())
        }
        Command::Stats { pin_path, json, watch } => {
            if watch {
                return stats_watch(&pin_path);
            }
            let snap = stats::read(&pin_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snap)?);
            } else {
                print!("{}", stats::render_table(&snap));
            }
            Ok(())
        }
        Command::Status { pin_path, json } => {
            let s = status::read(&pin_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(())
        }
        Command::Conntrack { action, pin_path } => match action {
            ConntrackAction::List { forward, json } => {
                let conns = crate::connections::list(&pin_path, forward.as_deref())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&conns)?);
                } else {
                    print!("{}", crate::connections::render(&conns));
                }
                Ok(())
            }
            ConntrackAction::Flush { forward, json } => {
                let n = crate::connections::flush(&pin_path, forward.as_deref())?;
                if json {
                    println!("{}", serde_json::json!({ "flushed": n }));
                } else {
                    println!("{n} connections flushed");
                }
                Ok(())
            }
        },
        Command::Detach { pin_path } => {
            loader::check_bpffs(&pin_path)?;
            let _lock = loader::PinLock::acquire(&pin_path)
                .context("a running `forwarder run` holds this pin path: stop it (or let it detach) first")?;
            loader::restore_sysctls(&pin_path);
            loader::remove_pins(&pin_path);
            status::remove(&pin_path);
            println!("detached: {} removed", pin_path.display());
            Ok(())
        }
        Command::Forward { action, pin_path } => forward_cmd(action, &pin_path),
        Command::Peer { action, pin_path } => peer_cmd(action, &pin_path),
        Command::Run { config, pin_path, bpf_debug, cgroup, on_exit, metrics_addr, node_name } => {
            let metrics_addr = match metrics_addr.as_str() {
                "off" => None,
                a => Some(a.parse().with_context(|| format!("--metrics-addr {a}"))?),
            };
            let opts =
                RunOptions { config_path: config, pin_path, cgroup, bpf_debug, on_exit, metrics_addr, node_name };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(daemon::run(opts))
        }
    }
}

/// A forward given on the command line, validated by the config parser itself.
fn forward_from_args(
    name: &str,
    protocol: &str,
    listen: &str,
    backend: &str,
    snat: &str,
    local: bool,
) -> anyhow::Result<Forward> {
    let text = format!(
        "[[forward]]\nname = {}\nprotocol = {}\nlisten = {}\nbackend = {}\nsnat = {}\nlocal = {local}\n",
        toml_str(name),
        toml_str(protocol),
        toml_str(listen),
        toml_str(backend),
        toml_str(snat)
    );
    let cfg = Config::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("config line", "argument line")))?;
    Ok(cfg.forwards.into_iter().next().expect("one forward"))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn forward_cmd(action: ForwardAction, pin: &std::path::Path) -> anyhow::Result<()> {
    let state = State::open(pin)?;
    match action {
        ForwardAction::List { json } => {
            let list = state.forwards()?;
            if json {
                let v: Vec<_> = list.iter().map(|(id, f)| serde_json::json!({"id": id, "forward": f})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (_, f) in list {
                    println!(
                        "{:<20} {:<4} {:<22} -> {:<22} snat {:?} local {}",
                        f.name,
                        format!("{:?}", f.protocol).to_lowercase(),
                        f.listen,
                        f.backend,
                        f.snat,
                        f.local
                    );
                }
            }
            Ok(())
        }
        ForwardAction::Add { name, protocol, listen, backend, snat, local } => {
            let new = forward_from_args(&name, &protocol, &listen, &backend, &snat, local)?;
            let _edit = state.lock_edits()?;
            let mut all: Vec<Forward> = state.forwards()?.into_iter().map(|(_, f)| f).collect();
            if all.iter().any(|f| f.name == new.name) {
                return Err(Error::Invalid(format!("a forward named {:?} exists", new.name)).into());
            }
            if let Some(f) = all.iter().find(|f| f.protocol == new.protocol && f.listen == new.listen) {
                return Err(Error::Invalid(format!(
                    "{} is already the listen address of forward {:?}",
                    new.listen, f.name
                ))
                .into());
            }
            all.push(new);
            let r = state.apply_forwards(&all, &system::local_addresses()?, state.removal_policy()?)?;
            println!("added {}", r.added.join(", "));
            Ok(())
        }
        ForwardAction::Del { name } => {
            let _edit = state.lock_edits()?;
            let mut all: Vec<Forward> = state.forwards()?.into_iter().map(|(_, f)| f).collect();
            let before = all.len();
            all.retain(|f| f.name != name);
            if all.len() == before {
                return Err(Error::Invalid(format!("no forward named {name:?}")).into());
            }
            let r = state.apply_forwards(&all, &system::local_addresses()?, state.removal_policy()?)?;
            println!("removed {name} ({} connections flushed)", r.flushed_connections);
            Ok(())
        }
    }
}

fn peer_cmd(action: PeerAction, pin: &std::path::Path) -> anyhow::Result<()> {
    let state = State::open(pin)?;
    match action {
        PeerAction::List { json } => {
            let list = state.peers()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for p in list {
                    println!("{:<28} {:<12} {}", p.address, p.interface, if p.direct { "direct" } else { "fallback" });
                }
            }
            Ok(())
        }
        PeerAction::Add { address, interface } => {
            let text = format!("[[peer]]\naddress = {}\ninterface = {}\n", toml_str(&address), toml_str(&interface));
            let new = Config::parse(&text)?.peers.remove(0);
            system::ifindex(&new.interface)?;
            let _edit = state.lock_edits()?;
            let mut all: Vec<Peer> =
                state.peers()?.into_iter().map(|p| Peer { address: p.address, interface: p.interface }).collect();
            if all.iter().any(|p| p.address == new.address) {
                return Err(Error::Invalid(format!("peer {} exists", new.address)).into());
            }
            all.push(new);
            state.apply_peers(&all)?;
            println!("added peer {address} on {interface}");
            Ok(())
        }
        PeerAction::Del { address } => {
            let addr: std::net::IpAddr =
                address.parse().map_err(|_| Error::Invalid(format!("{address:?} is not an IP address")))?;
            let _edit = state.lock_edits()?;
            let mut all: Vec<Peer> =
                state.peers()?.into_iter().map(|p| Peer { address: p.address, interface: p.interface }).collect();
            let before = all.len();
            all.retain(|p| p.address != addr);
            if all.len() == before {
                return Err(Error::Invalid(format!("no peer {addr}")).into());
            }
            state.apply_peers(&all)?;
            println!("removed peer {addr}");
            Ok(())
        }
    }
}

/// `stats --watch`: the table refreshed in place every second, with per-second rates.
fn stats_watch(pin: &std::path::Path) -> anyhow::Result<()> {
    let mut prev = stats::read(pin)?;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = stats::read(pin)?;
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{}", stats::render_rates(&prev, &now));
        use std::io::Write as _;
        std::io::stdout().flush()?;
        prev = now;
    }
}
