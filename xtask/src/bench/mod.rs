//! `cargo xtask bench`: forwarder beside the usual ways of forwarding a port, measured in one
//! run on the same namespace topology, interleaved so drift hits every contender alike.
//! Speed is only ever reported as figures and ratios against peers of the same run.

pub mod cleanup;
pub mod contenders;
pub mod generator;
pub mod report;
pub mod scaling;
pub mod stats;
pub mod testrun;
pub mod topology;
pub mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use anyhow::Result;
use serde::Serialize;

use self::{
    contenders::{Contender, Rules},
    generator::Generator,
    stats::Summary,
    topology::BenchTopo,
    workloads::{Churn, ChurnPlan, churn, connection_rate, latency, new_flow_rate, tcp_throughput, udp_rate},
};

/// How long and how often: `--quick` (about 2 minutes) or full (about half an hour: the churn
/// workload alone is 30 s per TCP contender and repetition).
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub repetitions: usize,
    /// Run the release build of `forwarder` (start-up with 100k forwards is parsing-bound;
    /// quick mode keeps the debug build the tests have already built).
    pub forwarder_release: bool,
    pub udp_seconds: f64,
    pub many_flows: u32,
    /// Backends of the UDP forward in the many-backends workload.
    pub many_backends: usize,
    pub iperf_seconds: u32,
    /// The new-flows workload: how long the SYNs are sent per round at most (the SYN budget
    /// usually ends a round sooner), and rounds per repetition (the connection table emptied
    /// between them).
    pub new_flow_seconds: f64,
    pub new_flow_rounds: u32,
    pub round_trips: usize,
    pub connect_seconds: f64,
    /// Connection churn: how long, the window requests/s are counted in, how many clients.
    pub churn_seconds: f64,
    pub churn_window_seconds: f64,
    pub churn_clients: usize,
    pub scaling_sizes: Vec<usize>,
    pub scaling_udp_seconds: f64,
    /// Single BPF_PROG_TEST_RUN runs per path (fewer than the SNAT ports: each new flow takes one).
    pub testrun_runs: u32,
}

impl Plan {
    pub fn quick(repetitions: Option<usize>) -> Self {
        Self {
            mode: "quick",
            repetitions: repetitions.unwrap_or(2),
            forwarder_release: false,
            udp_seconds: 0.5,
            many_flows: 256,
            many_backends: 16,
            iperf_seconds: 1,
            new_flow_seconds: 0.5,
            new_flow_rounds: 3,
            round_trips: 1000,
            connect_seconds: 0.5,
            churn_seconds: 4.0,
            churn_window_seconds: 1.0,
            churn_clients: 32,
            scaling_sizes: vec![1, 1_000],
            scaling_udp_seconds: 0.5,
            testrun_runs: 1000,
        }
    }

    pub fn full(repetitions: Option<usize>) -> Self {
        Self {
            mode: "full",
            repetitions: repetitions.unwrap_or(5),
            forwarder_release: true,
            udp_seconds: 2.0,
            many_flows: 1024,
            many_backends: 16,
            iperf_seconds: 3,
            new_flow_seconds: 2.0,
            new_flow_rounds: 10,
            round_trips: 5000,
            connect_seconds: 2.0,
            churn_seconds: 30.0,
            churn_window_seconds: 5.0,
            churn_clients: 32,
            scaling_sizes: vec![1, 1_000, 10_000, 100_000],
            scaling_udp_seconds: 1.5,
            testrun_runs: 5000,
        }
    }
}

/// Every per-contender figure: id, heading, unit, whether more is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    UdpOneFlowPps,
    UdpOneFlowOfferedPps,
    UdpManyFlowsPps,
    UdpManyFlowsOfferedPps,
    CpuNsPerPacketOneFlow,
    CpuNsPerPacketManyFlows,
    TcpBitsPerSecond,
    TcpVethDefaultsBitsPerSecond,
    LatencyP50Us,
    LatencyP99Us,
    ConnectionsPerSecond,
    ConnectionsFailed,
    ChurnRequestsPerSecond,
    ChurnMinWindowRequestsPerSecond,
    ChurnFailedConnections,
    CpuUsPerConnection,
    NewFlowsPerSecond,
    NewFlowsOfferedPerSecond,
    CpuNsPerNewFlow,
    NewFlowsDropped,
    NewFlowsRefusedAtRing,
    Udp6OneFlowPps,
    Udp6OneFlowOfferedPps,
    Udp6ManyFlowsPps,
    Udp6ManyFlowsOfferedPps,
    CpuNsPerPacket6OneFlow,
    CpuNsPerPacket6ManyFlows,
}

impl Figure {
    pub const ALL: [Figure; 27] = [
        Figure::UdpOneFlowPps,
        Figure::UdpOneFlowOfferedPps,
        Figure::UdpManyFlowsPps,
        Figure::UdpManyFlowsOfferedPps,
        Figure::CpuNsPerPacketOneFlow,
        Figure::CpuNsPerPacketManyFlows,
        Figure::TcpBitsPerSecond,
        Figure::TcpVethDefaultsBitsPerSecond,
        Figure::LatencyP50Us,
        Figure::LatencyP99Us,
        Figure::ConnectionsPerSecond,
        Figure::ConnectionsFailed,
        Figure::ChurnRequestsPerSecond,
        Figure::ChurnMinWindowRequestsPerSecond,
        Figure::ChurnFailedConnections,
        Figure::CpuUsPerConnection,
        Figure::NewFlowsPerSecond,
        Figure::NewFlowsOfferedPerSecond,
        Figure::CpuNsPerNewFlow,
        Figure::NewFlowsDropped,
        Figure::NewFlowsRefusedAtRing,
        Figure::Udp6OneFlowPps,
        Figure::Udp6OneFlowOfferedPps,
        Figure::Udp6ManyFlowsPps,
        Figure::Udp6ManyFlowsOfferedPps,
        Figure::CpuNsPerPacket6OneFlow,
        Figure::CpuNsPerPacket6ManyFlows,
    ];

    pub fn heading(self) -> &'static str {
        match self {
            Figure::UdpOneFlowPps => "UDP 1 flow, delivered",
            Figure::UdpOneFlowOfferedPps => "UDP 1 flow, offered",
            Figure::UdpManyFlowsPps => "UDP many flows, delivered",
            Figure::UdpManyFlowsOfferedPps => "UDP many flows, offered",
            Figure::CpuNsPerPacketOneFlow => "CPU/packet, 1 flow",
            Figure::CpuNsPerPacketManyFlows => "CPU/packet, many flows",
            Figure::TcpBitsPerSecond => "TCP (iperf3)",
            Figure::TcpVethDefaultsBitsPerSecond => "TCP (iperf3), veth defaults",
            Figure::LatencyP50Us => "RR latency p50",
            Figure::LatencyP99Us => "RR latency p99",
            Figure::ConnectionsPerSecond => "new TCP conn/s",
            Figure::ConnectionsFailed => "new TCP conn failed",
            Figure::ChurnRequestsPerSecond => "churn req/s, median window",
            Figure::ChurnMinWindowRequestsPerSecond => "churn req/s, worst window",
            Figure::ChurnFailedConnections => "churn failed conns",
            Figure::CpuUsPerConnection => "CPU/connection, churn",
            Figure::NewFlowsPerSecond => "new flows/s delivered",
            Figure::NewFlowsOfferedPerSecond => "new flows/s offered",
            Figure::CpuNsPerNewFlow => "CPU/new flow",
            Figure::NewFlowsDropped => "new flows dropped",
            Figure::NewFlowsRefusedAtRing => "of them, refused by the router veth's ring",
            Figure::Udp6OneFlowPps => "IPv6 UDP 1 flow, delivered",
            Figure::Udp6OneFlowOfferedPps => "IPv6 UDP 1 flow, offered",
            Figure::Udp6ManyFlowsPps => "IPv6 UDP many flows, delivered",
            Figure::Udp6ManyFlowsOfferedPps => "IPv6 UDP many flows, offered",
            Figure::CpuNsPerPacket6OneFlow => "IPv6 CPU/packet, 1 flow",
            Figure::CpuNsPerPacket6ManyFlows => "IPv6 CPU/packet, many flows",
        }
    }

    /// Unit after scaling with [`Figure::scale`].
    pub fn unit(self) -> &'static str {
        match self {
            Figure::UdpOneFlowPps
            | Figure::UdpOneFlowOfferedPps
            | Figure::UdpManyFlowsPps
            | Figure::UdpManyFlowsOfferedPps
            | Figure::Udp6OneFlowPps
            | Figure::Udp6OneFlowOfferedPps
            | Figure::Udp6ManyFlowsPps
            | Figure::Udp6ManyFlowsOfferedPps => "Mpps",
            Figure::CpuNsPerPacketOneFlow
            | Figure::CpuNsPerPacketManyFlows
            | Figure::CpuNsPerNewFlow
            | Figure::CpuNsPerPacket6OneFlow
            | Figure::CpuNsPerPacket6ManyFlows => "ns",
            Figure::TcpBitsPerSecond | Figure::TcpVethDefaultsBitsPerSecond => "Gbit/s",
            Figure::NewFlowsPerSecond | Figure::NewFlowsOfferedPerSecond => "kflows/s",
            Figure::LatencyP50Us | Figure::LatencyP99Us | Figure::CpuUsPerConnection => "µs",
            Figure::ConnectionsPerSecond | Figure::ChurnRequestsPerSecond | Figure::ChurnMinWindowRequestsPerSecond => {
                "/s"
            }
            Figure::ConnectionsFailed
            | Figure::ChurnFailedConnections
            | Figure::NewFlowsDropped
            | Figure::NewFlowsRefusedAtRing => "count",
        }
    }

    /// A count of events (failures): reported as the total over the repetitions, never a
    /// median, so that one repetition's failures are not hidden by the others'.
    pub fn is_count(self) -> bool {
        self.unit() == "count"
    }

    pub fn scale(self) -> f64 {
        match self.unit() {
            "Mpps" => 1e-6,
            "Gbit/s" => 1e-9,
            "kflows/s" => 1e-3,
            _ => 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ContenderResult {
    pub id: &'static str,
    pub description: &'static str,
    pub figures: BTreeMap<Figure, Summary>,
    /// Figures that failed in some repetition, with the error.
    pub errors: Vec<String>,
    /// Why some figures are missing by design.
    pub limitation: Option<&'static str>,
    /// forwarder's contenders: how the packets of the UDP workloads, the TCP figure with the
    /// veth defaults and the new-flows workload left the router, by reason code (workload →
    /// reason name → packets, over all repetitions; workloads as in [`REASON_WORKLOADS`]),
    /// from the daemon's counters. Empty for the others.
    pub reasons: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// The connection-churn workload, per repetition: every window and failure.
    pub churn: Vec<ChurnRepetition>,
}

/// One repetition's churn run of one contender.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnRepetition {
    pub repetition: usize,
    #[serde(flatten)]
    pub run: Churn,
    /// forwarder's contenders: how the router handled the packets of the run, by reason code
    /// (`ports_exhausted` and `conntrack_full` are refused new connections).
    pub reasons: BTreeMap<&'static str, u64>,
}

/// The workloads whose reason counters are recorded, by the names the report shows.
pub const REASON_WORKLOADS: [&str; 6] =
    ["1 flow", "many flows", "IPv6 1 flow", "IPv6 many flows", "TCP, veth defaults", "new flows"];

/// Per contender and workload: reason name → packets.
type ReasonCounts = BTreeMap<(Contender, &'static str), BTreeMap<&'static str, u64>>;

/// The many-backends workload: the UDP forward spread over `backends` backends.
#[derive(Clone, Debug, Serialize)]
pub struct ManyBackendsResult {
    pub backends: usize,
    pub contenders: Vec<ManyBackendsContender>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ManyBackendsContender {
    pub id: &'static str,
    pub description: &'static str,
    /// The many-flows figures: delivered and offered packets/s, CPU ns per packet.
    pub figures: BTreeMap<Figure, Summary>,
    pub errors: Vec<String>,
    /// forwarder's contenders: new flows per backend (slot order: the config's), from the
    /// daemon's per-backend counters, per repetition. Empty for iptables.
    pub flows_per_backend: Vec<Vec<u64>>,
}

/// The figures of the many-backends workload.
pub const MANY_BACKENDS_FIGURES: [Figure; 3] =
    [Figure::UdpManyFlowsPps, Figure::UdpManyFlowsOfferedPps, Figure::CpuNsPerPacketManyFlows];

#[derive(Clone, Debug, Serialize)]
pub struct ScalingResult {
    pub apply: Vec<scaling::ApplyTimes>,
    /// contender id → forwards → delivered packets/s (many flows).
    pub packet_rate: BTreeMap<&'static str, BTreeMap<usize, Summary>>,
    /// contender id → forwards → CPU ns per delivered packet (many flows).
    pub cpu_ns_per_packet: BTreeMap<&'static str, BTreeMap<usize, Summary>>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub load_average_before: String,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
                .unwrap_or("unknown")
                .to_string(),
            load_average_before: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
        }
    }
}

/// What the new-flows workload's SYNs can fill on the router: every one that gets through
/// takes a connection entry (forwarder's table, or conntrack's) and, for NAT, a SNAT port
/// toward the one backend.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionTables {
    /// forwarder's connection table with the bench's config (the default size).
    pub forwarder_entries: u32,
    /// `net.netfilter.nf_conntrack_max` as the router namespace sees it (None: unreadable).
    pub nf_conntrack_max: Option<u64>,
    /// SNAT source ports toward one backend (address, port): netfilter's for source ports
    /// from 1024 up, 1024..=65535 ...
    pub snat_ports: u32,
    /// ... and forwarder's: the same default range less the router namespace's ephemeral
    /// ports (`net.ipv4.ip_local_port_range`), which it leaves to the host's own sockets by
    /// default (`snat_avoid_local_ports`). None: the range was unreadable.
    pub forwarder_snat_ports: Option<u32>,
    /// Distinct SYNs the generator sends before one repeats.
    pub distinct_syns: u32,
}

impl ConnectionTables {
    /// Read in the router namespace of `topo`.
    fn read(topo: &BenchTopo) -> Self {
        let sysctl = |path: &'static str| -> Option<Vec<u64>> {
            let text = topo.chain.router.run(move || std::fs::read_to_string(path)).ok()?.ok()?;
            text.split_whitespace().map(|v| v.parse().ok()).collect()
        };
        let (min, max) =
            (u32::from(forwarder_common::DEFAULT_SNAT_PORT_MIN), u32::from(forwarder_common::DEFAULT_SNAT_PORT_MAX));
        let local = sysctl("/proc/sys/net/ipv4/ip_local_port_range");
        Self {
            forwarder_entries: forwarder_common::DEFAULT_CT_ENTRIES,
            nf_conntrack_max: sysctl("/proc/sys/net/netfilter/nf_conntrack_max").and_then(|v| v.first().copied()),
            snat_ports: max - min + 1,
            forwarder_snat_ports: local.and_then(|v| match v[..] {
                [lo, hi] => Some(ports_outside(min, max, lo as u32, hi as u32)),
                _ => None,
            }),
            distinct_syns: Generator::syn_flows().unwrap_or(0),
        }
    }
}

/// Ports of `min..=max` outside `hole_min..=hole_max`.
fn ports_outside(min: u32, max: u32, hole_min: u32, hole_max: u32) -> u32 {
    let overlap = (max.min(hole_max) + 1).saturating_sub(min.max(hole_min));
    (max - min + 1) - overlap
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub plan: Plan,
    /// The new-flows workload's limits (None: it did not run).
    pub connection_tables: Option<ConnectionTables>,
    pub contenders: Vec<ContenderResult>,
    pub many_backends: Option<ManyBackendsResult>,
    pub scaling: Option<ScalingResult>,
    pub testrun: Vec<testrun::PathTime>,
    pub seconds: f64,
}

/// The workloads of the figures part (`--workloads`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    /// UDP over IPv4, one flow and many: packets/s and CPU per packet.
    Udp,
    /// The same over IPv6.
    Ipv6,
    /// TCP with GRO off on the router: iperf3, latency, connections, churn.
    Tcp,
    /// Generated SYNs, each a new connection.
    NewFlows,
    /// iperf3 on veths with their default offloads.
    VethDefaults,
}

impl Workload {
    pub const ALL: [Workload; 5] =
        [Workload::Udp, Workload::Ipv6, Workload::Tcp, Workload::NewFlows, Workload::VethDefaults];
}

/// The parts of a run (`--parts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Every figure of every selected contender (UDP, TCP, latency, connections, churn).
    Figures,
    /// The UDP forward with several backends, for the selected contenders that have them.
    ManyBackends,
    /// Rule scaling: apply times and packet rates with N forwards.
    Scaling,
    /// BPF_PROG_TEST_RUN times per path.
    Testrun,
}

pub struct Options {
    pub plan: Plan,
    pub contenders: Vec<Contender>,
    pub parts: BTreeSet<Part>,
    pub workloads: BTreeSet<Workload>,
    pub out_dir: PathBuf,
    pub update_readme: Option<PathBuf>,
}

pub fn run(opts: Options) -> Result<Results> {
    cleanup::install()?;
    let started = std::time::Instant::now();
    let machine = Machine::describe();
    let plan = opts.plan.clone();
    let mut samples: BTreeMap<(Contender, Figure), Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<Contender, Vec<String>> = BTreeMap::new();
    let mut testrun_samples: BTreeMap<(&'static str, &'static str), (Vec<f64>, u32)> = BTreeMap::new();
    let mut reasons: ReasonCounts = BTreeMap::new();
    let mut churns: BTreeMap<Contender, Vec<ChurnRepetition>> = BTreeMap::new();
    let mut connection_tables = None;
    let many_contenders: Vec<Contender> =
        opts.contenders.iter().copied().filter(|c| Contender::MANY_BACKENDS.contains(c)).collect();
    let mut many = ManyBackendsSamples::default();
    for rep in 0..plan.repetitions {
        let figures = if opts.parts.contains(&Part::Figures) { opts.contenders.as_slice() } else { &[] };
        // Rotate the order each repetition so no contender always runs first or last.
        let n = figures.len();
        for i in 0..n {
            let contender = figures[(i + rep) % n];
            eprintln!("bench: repetition {}/{}: {}", rep + 1, plan.repetitions, contender.id());
            let mut failed = Vec::new();
            let mut collected = Collected {
                samples: &mut samples,
                reasons: &mut reasons,
                churns: &mut churns,
                connection_tables: &mut connection_tables,
            };
            if let Err(e) = measure_contender(contender, &plan, &opts.workloads, rep + 1, &mut collected, &mut failed) {
                eprintln!("bench: {}: {e:#}", contender.id());
                failed.push(format!("{e:#}"));
            }
            // Nothing is written after a signal: a partial run is not a result.
            cleanup::check()?;
            errors
                .entry(contender)
                .or_default()
                .extend(failed.into_iter().map(|e| format!("repetition {}: {e}", rep + 1)));
        }
        if opts.parts.contains(&Part::ManyBackends) {
            let n = many_contenders.len();
            for i in 0..n {
                let contender = many_contenders[(i + rep) % n];
                eprintln!(
                    "bench: repetition {}/{}: {} with {} backends",
                    rep + 1,
                    plan.repetitions,
                    contender.id(),
                    plan.many_backends
                );
                if let Err(e) = measure_many_backends(contender, &plan, &mut many) {
                    eprintln!("bench: {} with {} backends: {e:#}", contender.id(), plan.many_backends);
                    many.errors.entry(contender).or_default().push(format!("repetition {}: {e:#}", rep + 1));
                }
                cleanup::check()?;
            }
        }
        if !opts.parts.contains(&Part::Testrun) {
            continue;
        }
        eprintln!("bench: repetition {}/{}: BPF_PROG_TEST_RUN", rep + 1, plan.repetitions);
        let topo = BenchTopo::new()?;
        for t in testrun::measure(&topo, plan.testrun_runs)? {
            cleanup::check()?;
            let entry = testrun_samples.entry((t.program, t.path)).or_default();
            entry.0.push(t.ns_per_packet);
            entry.1 = t.verdict;
        }
    }
    let contenders = opts
        .contenders
        .iter()
        .filter(|_| opts.parts.contains(&Part::Figures))
        .map(|&c| ContenderResult {
            id: c.id(),
            description: c.describe(),
            figures: Figure::ALL
                .iter()
                .filter_map(|&f| samples.get(&(c, f)).and_then(|s| Summary::of(s)).map(|s| (f, s)))
                .collect(),
            errors: errors.remove(&c).unwrap_or_default(),
            limitation: c.limitation(),
            reasons: REASON_WORKLOADS
                .into_iter()
                .filter_map(|w| reasons.get(&(c, w)).map(|r| (w, r.clone())))
                .collect(),
            churn: churns.remove(&c).unwrap_or_default(),
        })
        .collect();
    let testrun = testrun_samples
        .into_iter()
        .map(|((program, path), (s, verdict))| testrun::PathTime {
            program,
            path,
            ns_per_packet: stats::median(&s).unwrap_or(f64::NAN),
            verdict,
        })
        .collect();
    let many_backends = opts.parts.contains(&Part::ManyBackends).then(|| ManyBackendsResult {
        backends: plan.many_backends,
        contenders: many_contenders.iter().map(|&c| many.result(c)).collect(),
    });
    let scaling = opts.parts.contains(&Part::Scaling).then(|| measure_scaling(&plan));
    cleanup::check()?;
    let results = Results {
        machine,
        plan,
        connection_tables,
        contenders,
        many_backends,
        scaling,
        testrun,
        seconds: started.elapsed().as_secs_f64(),
    };
    report::write(&results, &opts.out_dir)?;
    if let Some(readme) = &opts.update_readme {
        report::update_readme(&results, readme)?;
    }
    Ok(results)
}

/// Where the repetitions' figures go.
struct Collected<'a> {
    samples: &'a mut BTreeMap<(Contender, Figure), Vec<f64>>,
    reasons: &'a mut ReasonCounts,
    churns: &'a mut BTreeMap<Contender, Vec<ChurnRepetition>>,
    connection_tables: &'a mut Option<ConnectionTables>,
}

/// All per-contender figures of one repetition, on a fresh topology. A figure that fails is
/// reported in `errors` and the others are still measured.
fn measure_contender(
    contender: Contender,
    plan: &Plan,
    workloads: &BTreeSet<Workload>,
    repetition: usize,
    collected: &mut Collected,
    errors: &mut Vec<String>,
) -> Result<()> {
    let topo = BenchTopo::new()?;
    let running = contender.start(&topo, Rules::BENCH)?;
    let addressing = contender.addressing();
    let Collected { samples, reasons, churns, connection_tables } = collected;
    let mut record = |f: Figure, v: f64| samples.entry((contender, f)).or_default().push(v);
    let mut attempt = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            eprintln!("bench: {}: {what}: {e:#}", contender.id());
            errors.push(format!("{what}: {e:#}"));
        }
    };
    let udp_time = Duration::from_secs_f64(plan.udp_seconds);
    let v4 = workloads.contains(&Workload::Udp);
    let v6 = workloads.contains(&Workload::Ipv6) && contender.carries_ipv6();
    for (ipv6, workload, flows, delivered, offered, cpu) in [
        (false, "1 flow", 1, Figure::UdpOneFlowPps, Figure::UdpOneFlowOfferedPps, Figure::CpuNsPerPacketOneFlow),
        (
            false,
            "many flows",
            plan.many_flows,
            Figure::UdpManyFlowsPps,
            Figure::UdpManyFlowsOfferedPps,
            Figure::CpuNsPerPacketManyFlows,
        ),
        (true, "IPv6 1 flow", 1, Figure::Udp6OneFlowPps, Figure::Udp6OneFlowOfferedPps, Figure::CpuNsPerPacket6OneFlow),
        (
            true,
            "IPv6 many flows",
            plan.many_flows,
            Figure::Udp6ManyFlowsPps,
            Figure::Udp6ManyFlowsOfferedPps,
            Figure::CpuNsPerPacket6ManyFlows,
        ),
    ] {
        if !(if ipv6 { v6 } else { v4 }) {
            continue;
        }
        cleanup::check()?;
        let generator = if ipv6 {
            Generator::new_v6(&topo, addressing.udp6_target(), flows)?
        } else {
            Generator::new(&topo, addressing.udp_target(), flows)?
        };
        let before = reason_counts(&running);
        let rate = udp_rate(&topo, &generator, udp_time, &running.pids())?;
        if before.is_some() {
            add_reason_deltas(reasons.entry((contender, workload)).or_default(), before, reason_counts(&running));
        }
        record(delivered, rate.delivered_pps);
        record(offered, rate.offered_pps);
        if let Some(ns) = rate.cpu_ns_per_packet {
            record(cpu, ns);
        }
    }
    if contender.carries_tcp() && workloads.contains(&Workload::Tcp) {
        measure_tcp(contender, plan, repetition, &topo, &running, &mut record, &mut attempt, churns)?;
    }
    // Last: the SYNs leave connection entries (and SNAT ports) behind.
    if contender.forwards_syns() && workloads.contains(&Workload::NewFlows) {
        cleanup::check()?;
        // GRO back on the router, as for the UDP figures: the TCP figures turned it off,
        // and without it (or XDP) the router's veth drops the generator's XDP_TX frames.
        topo.router_gro(true)?;
        connection_tables.get_or_insert_with(|| ConnectionTables::read(&topo));
        let before = reason_counts(&running);
        let r = Generator::syns(&topo, addressing.syn_target()).and_then(|mut generator| {
            new_flow_rate(
                &topo,
                &mut generator,
                Duration::from_secs_f64(plan.new_flow_seconds),
                &running.pids(),
                plan.new_flow_rounds,
                || contender.forget_connections(&topo, &running),
            )
        });
        let r = r.map(|rate| {
            record(Figure::NewFlowsPerSecond, rate.delivered_pps);
            record(Figure::NewFlowsOfferedPerSecond, rate.offered_pps);
            record(Figure::NewFlowsDropped, rate.offered.saturating_sub(rate.delivered) as f64);
            record(Figure::NewFlowsRefusedAtRing, rate.refused_at_ring as f64);
            if let Some(ns) = rate.cpu_ns_per_packet {
                record(Figure::CpuNsPerNewFlow, ns);
            }
            if before.is_some() {
                add_reason_deltas(
                    reasons.entry((contender, "new flows")).or_default(),
                    before,
                    reason_counts(&running),
                );
            }
        });
        attempt("new flows", r);
    }
    drop((running, topo));
    if contender.carries_tcp() && workloads.contains(&Workload::VethDefaults) {
        cleanup::check()?;
        let r = tcp_with_veth_defaults(contender, plan).map(|(bps, counts)| {
            record(Figure::TcpVethDefaultsBitsPerSecond, bps);
            if let Some(counts) = counts {
                let into = reasons.entry((contender, "TCP, veth defaults")).or_default();
                for (name, n) in counts {
                    *into.entry(name).or_default() += n;
                }
            }
        });
        attempt("TCP throughput, veth defaults", r);
    }
    Ok(())
}

/// The TCP figures on the bench's topology, GRO off on the router: throughput, latency,
/// connection rate, churn.
#[allow(clippy::too_many_arguments)]
fn measure_tcp(
    contender: Contender,
    plan: &Plan,
    repetition: usize,
    topo: &BenchTopo,
    running: &contenders::Running,
    record: &mut impl FnMut(Figure, f64),
    attempt: &mut impl FnMut(&str, Result<()>),
    churns: &mut BTreeMap<Contender, Vec<ChurnRepetition>>,
) -> Result<()> {
    let addressing = contender.addressing();
    topo.router_gro(false)?;
    cleanup::check()?;
    let r = tcp_throughput(topo, addressing, plan.iperf_seconds).map(|bps| record(Figure::TcpBitsPerSecond, bps));
    attempt("TCP throughput", r);
    cleanup::check()?;
    let r = latency(topo, addressing, plan.round_trips).map(|(p50, p99)| {
        record(Figure::LatencyP50Us, p50);
        record(Figure::LatencyP99Us, p99);
    });
    attempt("latency", r);
    cleanup::check()?;
    let r = connection_rate(topo, addressing, Duration::from_secs_f64(plan.connect_seconds)).map(|rate| {
        record(Figure::ConnectionsPerSecond, rate.per_second);
        record(Figure::ConnectionsFailed, rate.failed as f64);
    });
    attempt("connections", r);
    cleanup::check()?;
    let churn_plan = ChurnPlan {
        duration: Duration::from_secs_f64(plan.churn_seconds),
        window: Duration::from_secs_f64(plan.churn_window_seconds),
        clients: plan.churn_clients,
    };
    let before = reason_counts(running);
    let r = churn(topo, addressing, churn_plan, &running.router_pids()).map(|run| {
        record(Figure::ChurnRequestsPerSecond, run.median_window().unwrap_or(0.0));
        record(Figure::ChurnMinWindowRequestsPerSecond, run.min_window().unwrap_or(0.0));
        record(Figure::ChurnFailedConnections, run.failed as f64);
        if let Some(us) = run.cpu_us_per_connection {
            record(Figure::CpuUsPerConnection, us);
        }
        let mut counts = BTreeMap::new();
        add_reason_deltas(&mut counts, before, reason_counts(running));
        churns.entry(contender).or_default().push(ChurnRepetition { repetition, run, reasons: counts });
    });
    attempt("connection churn", r);
    Ok(())
}

/// One iperf3 stream through `contender` on a fresh topology with the veths' defaults (no
/// offload changed anywhere; forwarder's XDP keeps its default `redirect = "auto"`), and
/// for forwarder's contenders the reason counters' rise over the run.
fn tcp_with_veth_defaults(contender: Contender, plan: &Plan) -> Result<(f64, Option<BTreeMap<&'static str, u64>>)> {
    let topo = BenchTopo::with_veth_defaults()?;
    let running = contender.start(&topo, Rules::VETH_DEFAULTS)?;
    let before = reason_counts(&running);
    let bps = tcp_throughput(&topo, contender.addressing(), plan.iperf_seconds)?;
    let counts = before.is_some().then(|| {
        let mut counts = BTreeMap::new();
        add_reason_deltas(&mut counts, before, reason_counts(&running));
        counts
    });
    Ok((bps, counts))
}

/// The many-backends workload's samples over the repetitions.
#[derive(Default)]
struct ManyBackendsSamples {
    samples: BTreeMap<(Contender, Figure), Vec<f64>>,
    flows_per_backend: BTreeMap<Contender, Vec<Vec<u64>>>,
    errors: BTreeMap<Contender, Vec<String>>,
}

impl ManyBackendsSamples {
    fn result(&mut self, c: Contender) -> ManyBackendsContender {
        ManyBackendsContender {
            id: c.id(),
            description: c.describe(),
            figures: MANY_BACKENDS_FIGURES
                .iter()
                .filter_map(|&f| self.samples.get(&(c, f)).and_then(|s| Summary::of(s)).map(|s| (f, s)))
                .collect(),
            errors: self.errors.remove(&c).unwrap_or_default(),
            flows_per_backend: self.flows_per_backend.remove(&c).unwrap_or_default(),
        }
    }
}

/// The many-flows UDP workload through `contender` with the UDP forward spread over
/// `plan.many_backends` backends, on a fresh topology.
fn measure_many_backends(contender: Contender, plan: &Plan, into: &mut ManyBackendsSamples) -> Result<()> {
    let topo = BenchTopo::new()?;
    let running = contender.start(&topo, Rules { udp_backends: plan.many_backends, ..Rules::BENCH })?;
    let generator = Generator::new(&topo, contender.addressing().udp_target(), plan.many_flows)?;
    let rate = udp_rate(&topo, &generator, Duration::from_secs_f64(plan.udp_seconds), &running.pids())?;
    let mut record = |f: Figure, v: f64| into.samples.entry((contender, f)).or_default().push(v);
    record(Figure::UdpManyFlowsPps, rate.delivered_pps);
    record(Figure::UdpManyFlowsOfferedPps, rate.offered_pps);
    if let Some(ns) = rate.cpu_ns_per_packet {
        record(Figure::CpuNsPerPacketManyFlows, ns);
    }
    if let Some(daemon) = &running.daemon {
        into.flows_per_backend.entry(contender).or_default().push(udp_flows_per_backend(&daemon.pin_path)?);
    }
    Ok(())
}

/// New flows per backend of the bench's UDP forward, in slot order (a fresh daemon's slots
/// are the config's order).
fn udp_flows_per_backend(pin_path: &std::path::Path) -> Result<Vec<u64>> {
    use anyhow::Context as _;
    let state = forwarder::state::State::open(pin_path)?;
    let (id, _) = state
        .forwards()?
        .into_iter()
        .find(|(_, f)| f.listen.port() == topology::UDP_LISTEN_PORT)
        .context("the UDP forward")?;
    let stored = state.stored_backends()?;
    let placed = stored.get(&id).context("the UDP forward's backends")?;
    placed.iter().map(|(_, value)| Ok(state.backend_stats(value.index)?.new_conns)).collect()
}

/// Adds what each reason counter rose by between `before` and `after` to `counts`.
fn add_reason_deltas(
    counts: &mut BTreeMap<&'static str, u64>,
    before: Option<Vec<(&'static str, u64)>>,
    after: Option<Vec<(&'static str, u64)>>,
) {
    if let (Some(before), Some(after)) = (before, after) {
        for ((name, a), (_, b)) in after.iter().zip(&before) {
            if a > b {
                *counts.entry(name).or_default() += a - b;
            }
        }
    }
}

/// The daemon's per-reason counters, for forwarder's contenders.
fn reason_counts(running: &contenders::Running) -> Option<Vec<(&'static str, u64)>> {
    let state = forwarder::state::State::open(&running.daemon.as_ref()?.pin_path).ok()?;
    forwarder_common::ALL_REASONS.iter().map(|r| Some((r.name(), state.reason_count(*r).ok()?))).collect()
}

fn measure_scaling(plan: &Plan) -> ScalingResult {
    let mut result = ScalingResult {
        apply: Vec::new(),
        packet_rate: BTreeMap::new(),
        cpu_ns_per_packet: BTreeMap::new(),
        errors: Vec::new(),
    };
    let mut rates: BTreeMap<(Contender, usize), Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<(Contender, usize), Vec<f64>> = BTreeMap::new();
    for &n in &plan.scaling_sizes {
        if cleanup::interrupted() {
            return result;
        }
        eprintln!("bench: rule scaling: applying {n} forwards");
        match scaling::apply_times(n, &mut result.errors) {
            Ok(t) => result.apply.push(t),
            Err(e) => result.errors.push(format!("applying {n} forwards: {e:#}")),
        }
    }
    // Interleaved like the main figures, the order of sizes rotated every repetition so that
    // drift on a shared machine does not line up with the number of forwards.
    for rep in 0..plan.repetitions {
        let sizes = &plan.scaling_sizes;
        for &n in sizes.iter().cycle().skip(rep % sizes.len().max(1)).take(sizes.len()) {
            for c in scaling::SCALED {
                if cleanup::interrupted() {
                    return result;
                }
                eprintln!("bench: rule scaling {}: {} with {n} forwards", rep + 1, c.id());
                let duration = Duration::from_secs_f64(plan.scaling_udp_seconds);
                match scaling::packet_rate(c, n, plan.many_flows, duration) {
                    Ok(rate) => {
                        rates.entry((c, n)).or_default().push(rate.delivered_pps);
                        cpu.entry((c, n)).or_default().extend(rate.cpu_ns_per_packet);
                    }
                    Err(e) => result.errors.push(format!("{} with {n} forwards: {e:#}", c.id())),
                }
            }
        }
    }
    for (samples, into) in [(rates, &mut result.packet_rate), (cpu, &mut result.cpu_ns_per_packet)] {
        for ((c, n), s) in samples {
            if let Some(summary) = Summary::of(&s) {
                into.entry(c.id()).or_default().insert(n, summary);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::ports_outside;

    #[test]
    fn snat_ports_leave_the_ephemeral_range_out() {
        assert_eq!(ports_outside(1024, 65535, 32768, 60999), 64512 - 28232);
        assert_eq!(ports_outside(1024, 65535, 1, 1023), 64512);
        assert_eq!(ports_outside(1024, 2047, 2000, 65535), 976);
    }
}
