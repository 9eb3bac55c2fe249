//! The `forwarder` command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::{
    config::{
        Backend, Config, Forward, ListenIndex, Peer, Protocol, Snat, parse_peer_address, parse_source_list,
        validate_ifname,
    },
    daemon::{self, OnExit, RunOptions},
    error::{Error, Report, exit},
    loader::{self, LoadOptions},
    pins::{self, DEFAULT_PIN_PATH},
    state::State,
    status, system,
    telemetry::{DEFAULT_METRICS_ADDR, counters as stats},
};

#[derive(Parser, Debug)]
#[command(
    name = "forwarder",
    version,
    about = "eBPF/XDP fast-path port forwarder (DNAT + SNAT + conntrack)",
    after_help = "Exit codes: 0 ok, 1 any other failure, 2 usage, 3 invalid config or edit, 4 no running \
                  instance (nothing pinned, or the daemon is gone)."
)]
pub struct Cli {
    /// Log filter for forwarder's own logs (error, warn, info, debug, trace or a tracing
    /// filter such as "forwarder=debug").
    #[arg(long, global = true, default_value = "info", env = "FORWARDER_LOG")]
    pub log_level: String,
    /// Machine-readable output on stdout, of every verb; a failure prints
    /// {"error": {"kind", "message", "line"?, "field"?}} (exit code unchanged).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The pin path of the instance a verb works on (the same option on every verb).
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct PinPathArg {
    /// bpffs directory of the instance's pinned maps and links (one per instance).
    #[arg(long = "pin-path", value_name = "DIR", global = true, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}

/// `--metrics-addr`: an address to listen on, or "off".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(MetricsAddr(None)),
            a => {
                a.parse().map(|a| MetricsAddr(Some(a))).map_err(|_| format!("{a:?}: expected address:port or \"off\""))
            }
        }
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("off"),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load, attach to the config's interfaces, apply forwards, run until SIGINT/SIGTERM.
    /// Adopts the state an earlier instance left pinned under --pin-path. SIGHUP or a change
    /// of the config file reloads it.
    Run {
        /// The TOML config file (README, "Config").
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        pin: PinPathArg,
        /// Turn on the kernel programs' aya-log output at debug level (costly; off by default).
        #[arg(long)]
        bpf_debug: bool,
        /// cgroup v2 directory for the local-forward socket hooks (default: the cgroup v2
        /// mount found in /proc/mounts, i.e. every process of the host).
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
        /// What SIGTERM/SIGINT does: `detach` everything (default), or `keep` programs and
        /// state pinned for the next instance.
        #[arg(long, value_enum, default_value = "detach")]
        on_exit: OnExit,
        /// Address for /metrics, /healthz and /readyz (ADDRESS:PORT); "off" disables.
        #[arg(long, value_name = "ADDR|off", default_value = DEFAULT_METRICS_ADDR)]
        metrics_addr: MetricsAddr,
        /// Adds the config's `[node.NAME]` section (a DaemonSet passes spec.nodeName).
        #[arg(long, env = "FORWARDER_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Validate a config (every node section too); nothing is applied.
    Check {
        /// The TOML config file to validate.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Show the result for this node's section.
        #[arg(long, env = "FORWARDER_NODE_NAME")]
        node_name: Option<String>,
        /// Also load every BPF program into this kernel (with the config's map sizes;
        /// nothing pinned or attached) and show how far the verifier walked each against
        /// its budget of 1,000,000 instructions. Needs the privileges `run` needs.
        #[arg(long)]
        programs: bool,
    },
    /// Counters of the running instance.
    Stats {
        #[command(flatten)]
        pin: PinPathArg,
        /// Refresh every second in place, with per-second rates (with --json: one snapshot
        /// per line, every second).
        #[arg(long)]
        watch: bool,
    },
    /// Interfaces and modes, program ids, map fill levels, conntrack entries. Exits 4 when
    /// the daemon is gone (after printing what is pinned).
    Status {
        #[command(flatten)]
        pin: PinPathArg,
    },
    /// Remove every program and map an instance pinned under --pin-path (forwarding stops).
    Detach {
        #[command(flatten)]
        pin: PinPathArg,
    },
    /// Live edits of forwards on the running instance (until the next reload of the file).
    Forward {
        #[command(subcommand)]
        action: ForwardAction,
        #[command(flatten)]
        pin: PinPathArg,
    },
    /// Live edits of a forward's backends on the running instance (until the next reload
    /// of the file): established connections stay where they are.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
        #[command(flatten)]
        pin: PinPathArg,
    },
    /// Live edits of peers on the running instance (until the next reload of the file).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
        #[command(flatten)]
        pin: PinPathArg,
    },
    /// The connection table of the running instance, as conntrack-tools shows netfilter's.
    Conntrack {
        #[command(subcommand)]
        action: ConntrackAction,
        #[command(flatten)]
        pin: PinPathArg,
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
    },
    /// Delete connections (both directions), of one forward or all: their next packets are
    /// new flows (a TCP segment that is not a SYN is refused), as with `conntrack -F`.
    Flush {
        /// Only this forward's connections.
        #[arg(long)]
        forward: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ForwardAction {
    /// Add a forward (each value validated as the config file's key of the same name).
    Add {
        /// Unique name (1 to 47 bytes), the label of its counters.
        #[arg(long)]
        name: String,
        /// Transport protocol.
        #[arg(long, value_enum)]
        protocol: Protocol,
        /// ADDRESS:PORT or ADDRESS:FIRST-LAST the forward answers on (0.0.0.0 / [::] for every
        /// local address).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// ADDRESS:PORT connections are sent to; repeat for several backends. With a listen
        /// range: one port (all map to it) or a range of the same size (the offset into the
        /// range is kept).
        #[arg(long, value_name = "ADDR:PORT", required = true)]
        backend: Vec<String>,
        /// Weight of each backend in --backend order (default 1 each; 0 drains).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        weight: Vec<i64>,
        /// Source rewrite: "auto" (the egress address), "off", or a fixed address.
        #[arg(long, value_name = "auto|off|ADDR", default_value = "auto")]
        snat: Snat,
        /// Also serve connections opened on this host (cgroup socket hooks).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        local: bool,
        /// A source that may use the forward, ADDRESS or ADDRESS/LENGTH (repeatable): with
        /// any, only the sources listed may.
        #[arg(long, value_name = "CIDR")]
        allow: Vec<String>,
        /// A source refused even when --allow lists it, ADDRESS or ADDRESS/LENGTH
        /// (repeatable).
        #[arg(long, value_name = "CIDR")]
        deny: Vec<String>,
    },
    /// Remove a forward by name (its connections follow conntrack.on_forward_removed).
    Del {
        /// The forward's name.
        name: String,
    },
    /// The forwards in place, with their ids.
    List,
}

#[derive(Subcommand, Debug)]
pub enum BackendAction {
    /// Add a backend to a forward: it takes its share of new connections.
    Add {
        /// The forward's name.
        forward: String,
        /// ADDRESS:PORT of the backend.
        address: String,
        /// Relative share of new connections (0 drains).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        weight: i64,
    },
    /// Remove a backend from a forward: it takes no new connections; its established ones
    /// go on (or are flushed with conntrack.on_forward_removed = "flush").
    Del {
        /// The forward's name.
        forward: String,
        /// ADDRESS:PORT of the backend.
        address: String,
    },
    /// Change a backend's weight; 0 drains it: no new connections, established ones stay.
    SetWeight {
        /// The forward's name.
        forward: String,
        /// ADDRESS:PORT of the backend.
        address: String,
        /// The new relative share of new connections.
        #[arg(allow_negative_numbers = true)]
        weight: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerAction {
    /// Add a same-switch peer reached straight at layer 2.
    Add {
        /// The peer's IP address.
        #[arg(long)]
        address: String,
        /// The interface the peer is reached on.
        #[arg(long)]
        interface: String,
    },
    /// Remove a peer by address.
    Del {
        /// The peer's IP address.
        address: String,
    },
    /// The peers in place and whether each is reached directly.
    List,
}

/// A forward as every verb shows it in JSON: `forward list`, `forward add`, and (with its
/// counters) `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardEntry<'a> {
    pub id: u32,
    /// The first backend (the only one of most forwards), as before several backends.
    pub backend: crate::config::SocketRange,
    #[serde(flatten)]
    pub forward: &'a Forward,
    /// Each backend's state in `backends` order: "up", "down" (by its health checks) or
    /// "drained" (weight 0).
    pub backend_states: Vec<&'static str>,
}

impl<'a> ForwardEntry<'a> {
    /// A forward not (yet) in the maps: its backends' states by their weights.
    pub fn of(id: u32, forward: &'a Forward) -> Self {
        let states = forward.backends.iter().map(|b| if b.weight == 0 { "drained" } else { "up" }).collect();
        ForwardEntry { id, backend: forward.backends[0].address, forward, backend_states: states }
    }
}

/// The forwards in the maps with their backends' states, as `forward list` shows them.
fn stored_forwards(state: &State) -> anyhow::Result<Vec<(u32, Forward, Vec<&'static str>)>> {
    let stored = state.stored_backends()?;
    Ok(state
        .forwards()?
        .into_iter()
        .map(|(id, f)| {
            let list = stored.get(&id).map(Vec::as_slice).unwrap_or_default();
            let states = list
                .iter()
                .map(|(_, v)| crate::telemetry::counters::BackendCounters::of(v, 0, Default::default(), 0).state)
                .collect();
            (id, f, states)
        })
        .collect())
}

/// `name` as stored, in its JSON form.
fn stored_entry(state: &State, name: &str) -> anyhow::Result<serde_json::Value> {
    let all = stored_forwards(state)?;
    let (id, f, states) = all.iter().find(|(_, f, _)| f.name == name).context("the forward just applied")?;
    Ok(serde_json::to_value(ForwardEntry { backend_states: states.clone(), ..ForwardEntry::of(*id, f) })?)
}

/// The `forwarder` command: parses, runs, reports failures (as JSON on stdout with
/// `--json`, else on stderr) and returns the exit code of README's "Command line".
pub fn main() -> ExitCode {
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let text = e.render().to_string();
            let message = text.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
            println!("{}", Report { kind: "usage", message, line: None, field: None }.to_json());
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => e.exit(),
    };
    let json = cli.json;
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let report = Report::of(&e);
            if json {
                println!("{}", report.to_json());
            } else {
                eprintln!("Error: {e:#}");
            }
            ExitCode::from(report.exit_code())
        }
    }
}

fn print_json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a parsed command line; its exit code when it did not fail.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?;
    // Colours only on a terminal: journald, a container's log and a file get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let json = cli.json;
    match cli.command {
        Command::Check { config, node_name, programs } => {
            let cfg = Config::from_file_for_node(&config, node_name.as_deref())?;
            let costs = if programs { Some(loader::verifier_costs(&LoadOptions::from_config(&cfg))?) } else { None };
            if json {
                let mut out = serde_json::json!({
                    "config": config.display().to_string(),
                    "node": node_name,
                    "interfaces": cfg.interfaces.len(),
                    "forwards": cfg.forwards.len(),
                    "peers": cfg.peers.len(),
                });
                if let Some(costs) = &costs {
                    out["programs"] = costs
                        .iter()
                        .map(|c| match &c.walked {
                            Ok(n) => serde_json::json!({ "program": c.program, "instructions_walked": n }),
                            Err(e) => serde_json::json!({ "program": c.program, "refused": e }),
                        })
                        .collect();
                    out["verifier_limit"] = loader::VERIFIER_LIMIT.into();
                }
                print_json(&out)?;
            } else {
                println!(
                    "{}: ok ({} interfaces, {} forwards, {} peers)",
                    config.display(),
                    cfg.interfaces.len(),
                    cfg.forwards.len(),
                    cfg.peers.len()
                );
                for c in costs.iter().flatten() {
                    println!("{c}");
                }
            }
            let refused = costs.iter().flatten().any(|c| c.walked.is_err());
            Ok(if refused { exit::OTHER } else { exit::OK })
        }
        Command::Stats { pin, watch } => {
            State::open(&pin.pin_path)?;
            if watch {
                return stats_watch(&pin.pin_path, json).map(|()| exit::OK);
            }
            let snap = stats::read(&pin.pin_path)?;
            if json {
                print_json(&snap)?;
            } else {
                print!("{}", stats::render_table(&snap));
            }
            Ok(exit::OK)
        }
        Command::Status { pin } => {
            let s = status::read(&pin.pin_path)?;
            if json {
                print_json(&s)?;
            } else {
                print!("{}", status::render(&s));
            }
            Ok(if s.daemon_running { exit::OK } else { exit::NO_INSTANCE })
        }
        Command::Conntrack { action, pin } => conntrack_cmd(action, &pin.pin_path, json).map(|()| exit::OK),
        Command::Detach { pin } => {
            let pin_path = pin.pin_path;
            pins::check_bpffs(&pin_path)?;
            let _lock = pins::PinLock::acquire(&pin_path)
                .context("a running `forwarder run` holds this pin path: stop it (or let it detach) first")?;
            crate::loader::restore_sysctls(&pin_path);
            pins::remove(&pin_path);
            status::remove(&pin_path);
            if json {
                print_json(&serde_json::json!({ "detached": pin_path.display().to_string() }))?;
            } else {
                println!("detached: {} removed", pin_path.display());
            }
            Ok(exit::OK)
        }
        Command::Forward { action, pin } => forward_cmd(action, &pin.pin_path, json).map(|()| exit::OK),
        Command::Peer { action, pin } => peer_cmd(action, &pin.pin_path, json).map(|()| exit::OK),
        Command::Backend { action, pin } => backend_cmd(action, &pin.pin_path, json).map(|()| exit::OK),
        Command::Run { config, pin, bpf_debug, cgroup, on_exit, metrics_addr, node_name } => {
            let opts = RunOptions {
                config_path: config,
                pin_path: pin.pin_path,
                cgroup,
                bpf_debug,
                on_exit,
                metrics_addr: metrics_addr.0,
                node_name,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(daemon::run(opts)).map(|()| exit::OK)
        }
    }
}

/// `conntrack list|flush`.
fn conntrack_cmd(action: ConntrackAction, pin: &std::path::Path, json: bool) -> anyhow::Result<()> {
    match action {
        ConntrackAction::List { forward } => {
            let conns = crate::connections::list(pin, forward.as_deref())?;
            if json {
                print_json(&conns)?;
            } else {
                print!("{}", crate::connections::render(&conns));
            }
        }
        ConntrackAction::Flush { forward } => {
            let n = crate::connections::flush(pin, forward.as_deref())?;
            if json {
                print_json(&serde_json::json!({ "flushed": n }))?;
            } else {
                println!("{n} connections flushed");
            }
        }
    }
    Ok(())
}

/// Forward edits; the arguments are validated before the instance is looked for.
fn forward_cmd(action: ForwardAction, pin: &std::path::Path, json: bool) -> anyhow::Result<()> {
    match action {
        ForwardAction::List => {
            let state = State::open(pin)?;
            let list = stored_forwards(&state)?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|(id, forward, states)| ForwardEntry {
                        backend_states: states.clone(),
                        ..ForwardEntry::of(*id, forward)
                    })
                    .collect();
                print_json(&v)?;
            } else {
                for (_, f, states) in list {
                    let show = f.backends.len() > 1 || states.iter().any(|s| *s != "up");
                    println!(
                        "{:<20} {:<4} {:<22} -> {:<22} snat {} local {}{}",
                        f.name,
                        f.protocol,
                        f.listen.to_string(),
                        f.backends_text(),
                        f.snat,
                        f.local,
                        source_lists_text(&f)
                    );
                    for (b, s) in f.backends.iter().zip(&states).filter(|_| show) {
                        println!("{:<20} backend {:<26} weight {:<5} {}", f.name, b.address.to_string(), b.weight, s);
                    }
                }
            }
            Ok(())
        }
        ForwardAction::Add { name, protocol, listen, backend, weight, snat, local, allow, deny } => {
            if weight.len() > backend.len() {
                return Err(edit("weight", format!("{} weights for {} backends", weight.len(), backend.len())).into());
            }
            let backends = backend
                .iter()
                .enumerate()
                .map(|(i, b)| Backend::new(b, weight.get(i).copied()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| edit(if e.field == "weight" { "weight" } else { "backend" }, e.message))?;
            let mut new = Forward::with_backends(&name, protocol, &listen, backends, Some(&snat.to_string()), local)
                .map_err(Error::from)?;
            new.allow = parse_source_list("allow", &allow).map_err(|(_, e)| Error::from(e))?;
            new.deny = parse_source_list("deny", &deny).map_err(|(_, e)| Error::from(e))?;
            let state = State::open(pin)?;
            let _edit = state.lock_edits()?;
            let mut all: Vec<Forward> = state.forwards()?.into_iter().map(|(_, f)| f).collect();
            if all.iter().any(|f| f.name == new.name) {
                return Err(edit("name", format!("a forward named {:?} exists", new.name)).into());
            }
            let mut listens = ListenIndex::default();
            for f in &all {
                // The forwards in place passed these checks when they were added.
                let _ = listens.add(&f.name, f.protocol, f.listen);
            }
            listens.add(&new.name, new.protocol, new.listen).map_err(|e| edit(e.field, e.message))?;
            all.push(new.clone());
            let r = state.apply_forwards(&all, &system::local_addresses()?, state.removal_policy()?)?;
            if json {
                print_json(&serde_json::json!({ "added": stored_entry(&state, &new.name)? }))?;
            } else {
                println!("added {}", r.added.join(", "));
            }
            Ok(())
        }
        ForwardAction::Del { name } => {
            let state = State::open(pin)?;
            let _edit = state.lock_edits()?;
            let mut all: Vec<Forward> = state.forwards()?.into_iter().map(|(_, f)| f).collect();
            let before = all.len();
            all.retain(|f| f.name != name);
            if all.len() == before {
                return Err(edit("name", format!("no forward named {name:?}")).into());
            }
            let r = state.apply_forwards(&all, &system::local_addresses()?, state.removal_policy()?)?;
            if json {
                print_json(&serde_json::json!({ "removed": name, "flushed_connections": r.flushed_connections }))?;
            } else {
                println!("removed {name} ({} connections flushed)", r.flushed_connections);
            }
            Ok(())
        }
    }
}

/// ` allow A,B deny C` for `forward list`'s line (nothing for a forward without lists).
fn source_lists_text(f: &Forward) -> String {
    let mut out = String::new();
    for (key, list) in [("allow", &f.allow), ("deny", &f.deny)] {
        if !list.is_empty() {
            let items: Vec<String> = list.iter().map(|n| n.to_string()).collect();
            out += &format!(" {key} {}", items.join(","));
        }
    }
    out
}

/// Backend edits: the forward is read, changed and applied whole (so the same checks as
/// the config file's hold), keeping its id and connections.
fn backend_cmd(action: BackendAction, pin: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let (name, address) = match &action {
        BackendAction::Add { forward, address, .. }
        | BackendAction::Del { forward, address }
        | BackendAction::SetWeight { forward, address, .. } => (forward.clone(), address.clone()),
    };
    let address = crate::config::parse_socket_range("address", &address).map_err(Error::from)?;
    let state = State::open(pin)?;
    let _edit = state.lock_edits()?;
    let mut all: Vec<Forward> = state.forwards()?.into_iter().map(|(_, f)| f).collect();
    let f =
        all.iter_mut().find(|f| f.name == name).ok_or_else(|| edit("forward", format!("no forward named {name:?}")))?;
    let at = f.backends.iter().position(|b| b.address == address);
    match (&action, at) {
        (BackendAction::Add { weight, .. }, None) => {
            let b = Backend::new(&address.to_string(), Some(*weight)).map_err(Error::from)?;
            f.backends.push(b);
        }
        (BackendAction::Add { .. }, Some(_)) => {
            return Err(edit("address", format!("{address} is already a backend of {name:?}")).into());
        }
        (_, None) => return Err(edit("address", format!("{address} is not a backend of {name:?}")).into()),
        (BackendAction::Del { .. }, Some(i)) => {
            f.backends.remove(i);
        }
        (BackendAction::SetWeight { weight, .. }, Some(i)) => {
            f.backends[i] = Backend::new(&address.to_string(), Some(*weight)).map_err(Error::from)?;
        }
    }
    let checked = Forward::with_backends(
        &f.name,
        f.protocol,
        &f.listen.to_string(),
        f.backends.clone(),
        Some(&f.snat.to_string()),
        f.local,
    )
    .map_err(Error::from)?;
    // What the checks do not take: health checks and source lists stay as they were.
    let (health, allow, deny) = (f.health, std::mem::take(&mut f.allow), std::mem::take(&mut f.deny));
    *f = Forward { health, allow, deny, ..checked };
    let f = f.clone();
    state.apply_forwards(&all, &system::local_addresses()?, state.removal_policy()?)?;
    if json {
        print_json(&serde_json::json!({ "forward": stored_entry(&state, &f.name)? }))?;
    } else {
        println!("{}: {}", f.name, f.backends_text());
    }
    Ok(())
}

/// A live edit refused because of the value of `field`.
fn edit(field: &'static str, message: String) -> Error {
    Error::Edit { field: Some(field), message }
}

/// Peer edits; the arguments are validated before the instance is looked for.
fn peer_cmd(action: PeerAction, pin: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let stored = |state: &State| -> anyhow::Result<Vec<Peer>> {
        Ok(state.peers()?.into_iter().map(|p| Peer { address: p.address, interface: p.interface }).collect())
    };
    match action {
        PeerAction::List => {
            let state = State::open(pin)?;
            let list = state.peers()?;
            if json {
                print_json(&list)?;
            } else {
                for p in list {
                    println!("{:<28} {:<12} {}", p.address.to_string(), p.interface, p.state);
                }
            }
            Ok(())
        }
        PeerAction::Add { address, interface } => {
            let address = parse_peer_address(&address).map_err(Error::from)?;
            validate_ifname("interface", &interface).map_err(Error::from)?;
            system::ifindex(&interface).map_err(|e| edit("interface", e.to_string()))?;
            let state = State::open(pin)?;
            let _edit = state.lock_edits()?;
            let mut all = stored(&state)?;
            if all.iter().any(|p| p.address == address) {
                return Err(edit("address", format!("peer {address} exists")).into());
            }
            all.push(Peer { address, interface: interface.clone() });
            state.apply_peers(&all)?;
            if json {
                let added = state.peers()?.into_iter().find(|p| p.address == address);
                print_json(&serde_json::json!({ "added": added }))?;
            } else {
                println!("added peer {address} on {interface}");
            }
            Ok(())
        }
        PeerAction::Del { address } => {
            let addr: std::net::IpAddr =
                address.parse().map_err(|_| edit("address", format!("{address:?} is not an IP address")))?;
            let state = State::open(pin)?;
            let _edit = state.lock_edits()?;
            let mut all = stored(&state)?;
            let before = all.len();
            all.retain(|p| p.address != addr);
            if all.len() == before {
                return Err(edit("address", format!("no peer {addr}")).into());
            }
            state.apply_peers(&all)?;
            if json {
                print_json(&serde_json::json!({ "removed": addr }))?;
            } else {
                println!("removed peer {addr}");
            }
            Ok(())
        }
    }
}

/// `stats --watch`: the table refreshed in place every second, with per-second rates; with
/// `json`, one snapshot per line every second.
fn stats_watch(pin: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut prev = stats::read(pin)?;
    if json {
        println!("{}", serde_json::to_string(&prev)?);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = stats::read(pin)?;
        if json {
            println!("{}", serde_json::to_string(&now)?);
        } else {
            // Clear the screen and home the cursor, then draw.
            print!("\x1b[2J\x1b[H{}", stats::render_rates(&prev, &now));
        }
        std::io::stdout().flush()?;
        prev = now;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Every verb and every argument says what it is for in `--help`.
    #[test]
    fn every_argument_and_verb_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, seen: &mut usize) {
            for arg in cmd.get_arguments() {
                *seen += 1;
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing, seen);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let (mut missing, mut seen) = (Vec::new(), 0);
        walk(&cmd, "forwarder", &mut missing, &mut seen);
        assert!(seen > 40, "walked {seen} arguments");
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The spellings users script against still parse, the pin path in every position.
    #[test]
    fn existing_spellings_parse() {
        let parse = |line: &str| Cli::try_parse_from(line.split_whitespace());
        for line in [
            "forwarder forward list --json --pin-path /sys/fs/bpf/x",
            "forwarder forward --pin-path /sys/fs/bpf/x list",
            "forwarder peer list --json",
            "forwarder stats --json --watch --pin-path /p",
            "forwarder status --json --pin-path /p",
            "forwarder detach --pin-path /p",
            "forwarder check --config c.toml --json",
            "forwarder forward add --name a --protocol udp --listen 0.0.0.0:1 --backend 192.0.2.1:2 \
             --snat 198.51.100.1 --local false",
            "forwarder forward add --name a --protocol tcp --listen 0.0.0.0:1 --backend 192.0.2.1:2 \
             --allow 198.51.100.0/25 --allow 2001:db8:1::/48 --deny 198.51.100.66",
            "forwarder run --config c --metrics-addr off --on-exit keep",
        ] {
            parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        let cli = Cli::try_parse_from(["forwarder", "run", "--config", "c", "--metrics-addr", "[::1]:9"]).unwrap();
        let Command::Run { metrics_addr, pin, .. } = cli.command else { panic!() };
        assert_eq!(metrics_addr.to_string(), "[::1]:9");
        assert_eq!(pin.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        for bad in [
            "forwarder run --config c --metrics-addr 9464",
            "forwarder forward add --name a --protocol sctp --listen x --backend y",
            "forwarder forward add --name a --protocol tcp --listen x --backend y --snat 0.0.0.0",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    /// `forward add` reports the flag at fault, with the config's own words.
    #[test]
    fn forward_add_errors_name_the_field() {
        let e = Forward::new("a", Protocol::Tcp, "0.0.0.0:80", "192.0.2.1:0", None, true).unwrap_err();
        assert_eq!(e.field, "backend");
        let e = Forward::new("a", Protocol::Tcp, "[::]:80", "192.0.2.1:8", None, true).unwrap_err();
        assert_eq!(e.field, "backend");
        let e = Forward::new("a", Protocol::Tcp, "0.0.0.0:80", "192.0.2.1:8", Some("2001:db8::1"), true).unwrap_err();
        assert_eq!(e.field, "snat");
        let e = Forward::new("", Protocol::Tcp, "0.0.0.0:80", "192.0.2.1:8", None, true).unwrap_err();
        assert_eq!(e.field, "name");
        let (i, bad) = parse_source_list("deny", &["192.0.2.0/24", "192.0.2.0/99"]).unwrap_err();
        assert_eq!((i, bad.field), (1, "deny"));
        let report = Report::of(&anyhow::Error::from(Error::from(e)));
        assert_eq!((report.kind, report.field.as_deref(), report.exit_code()), ("edit", Some("name"), 3));
        assert!(!report.message.contains("line"), "{}", report.message);
        let f = Forward::new("a", Protocol::Udp, "0.0.0.0:80", "192.0.2.1:8", Some("198.51.100.7"), false).unwrap();
        // Text output: the config's words, padded like any string (no Debug forms).
        assert_eq!(format!("{:<4}|{:<5}|{}", f.protocol, Snat::Off, f.snat), "udp |off  |198.51.100.7");
        assert_eq!(
            serde_json::to_value(ForwardEntry::of(3, &f)).unwrap(),
            serde_json::json!({"id": 3, "name": "a", "protocol": "udp", "listen": "0.0.0.0:80",
                "backend": "192.0.2.1:8", "backends": [{"address": "192.0.2.1:8", "weight": 1}],
                "backend_states": ["up"], "snat": "198.51.100.7", "local": false})
        );
    }

    #[test]
    fn config_errors_report_line_and_field() {
        let e =
            Config::parse("[[forward]]\nname = \"a\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:1\"\nbackend = \"x\"\n")
                .unwrap_err();
        let r = Report::of(&anyhow::Error::from(e).context("while checking"));
        assert_eq!(
            (r.kind, r.line, r.field.as_deref(), r.exit_code()),
            ("config", Some(5), Some("forward[0].backend"), 3)
        );
        let r = Report::of(&anyhow::Error::from(Error::NoInstance { path: "/p".into(), message: "gone".into() }));
        assert_eq!((r.kind, r.exit_code()), ("no_instance", 4));
        let r = Report::of(&anyhow::anyhow!("boom"));
        assert_eq!((r.kind, r.exit_code()), ("error", 1));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json, serde_json::json!({"error": {"kind": "error", "message": "boom"}}));
    }
}
