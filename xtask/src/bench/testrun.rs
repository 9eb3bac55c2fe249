//! BPF_PROG_TEST_RUN nanoseconds per packet of forwarder's programs on each path (no match,
//! new flow, established, reverse), and of the redirect-only ceiling. Run in a bench
//! router namespace (routes and static neighbours for the FIB lookups), programs loaded but
//! not attached.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::{Array, DevMap},
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::{SlicedPacket, TransportSlice};
use forwarder::{
    config::Config,
    loader::{Instance, LoadOptions},
};
use forwarder_common::IFACE_XDP_EGRESS_OK;
use forwarder_tests::topo::{CLIENT_ADDR, ROUTER_CLIENT_ADDR, ROUTER_CLIENT_DEV, ROUTER_SERVER_ADDR, SERVER_ADDR};
use serde::Serialize;

use super::{
    contenders::forwarder_config,
    generator::udp_frame,
    stats::median,
    topology::{BenchTopo, UDP_BACKEND_PORT, UDP_LISTEN_PORT, load_bench_object, load_xdp},
};

#[derive(Clone, Debug, Serialize)]
pub struct PathTime {
    /// `xdp`, `tc` or `redirect-only`.
    pub program: &'static str,
    pub path: &'static str,
    pub ns_per_packet: f64,
    /// The program's return code on this path (XDP_REDIRECT = 4, TC_ACT_REDIRECT = 7, ...),
    /// so a reader sees which path was timed.
    pub verdict: u32,
}

#[derive(Clone, Copy)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// Times every path with `runs` single runs (the new-flow path with a new flow each run).
pub fn measure(topo: &BenchTopo, runs: u32) -> Result<Vec<PathTime>> {
    let rc = topo.chain.router.ifindex(ROUTER_CLIENT_DEV)?;
    let rs = topo.router_server_ifindex;
    let (client_mac, router_client_mac) = (topo.client_mac, topo.router_client_mac);
    let (server_mac, router_server_mac) = (topo.server_mac, topo.router_server_mac);
    topo.chain.router.run(move || -> Result<Vec<PathTime>> {
        let mut cfg = Config::parse(&forwarder_config("native", 0))?;
        // A forward whose rewrite is the identity (backend = listen, no SNAT): its packets
        // come out as they went in but for TTL and MACs, so `repeat` times the same path
        // again and again, warm (see `warm_runs`).
        let warm_addr = std::net::SocketAddr::from((ip(SERVER_ADDR), WARM_PORT));
        cfg.forwards.push(forwarder::config::Forward {
            name: "warm".into(),
            protocol: forwarder::config::Protocol::Udp,
            listen: warm_addr,
            backend: warm_addr,
            snat: forwarder::config::Snat::Off,
            local: false,
        });
        cfg.max_forwards += 1;
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/fwb-{}", forwarder_tests::unique_tag()));
        let mut inst = Instance::load(&LoadOptions::from_config(&cfg), &pin)?;
        inst.detach_on_drop(true); // pins go even if a measurement fails
        let state = inst.state()?;
        state.set_global(forwarder_common::GlobalConfig {
            snat_port_min: cfg.conntrack.snat_port_min,
            snat_port_max: cfg.conntrack.snat_port_max,
            flags: 0,
            netns_cookie: 0,
        })?;
        state.apply_forwards(&cfg.forwards, &[], forwarder::config::OnForwardRemoved::Drain)?;
        state.set_egress(rc, IFACE_XDP_EGRESS_OK)?;
        state.set_egress(rs, IFACE_XDP_EGRESS_OK)?;
        let client = ip(CLIENT_ADDR);
        let to_forward = (ip(ROUTER_CLIENT_ADDR), UDP_LISTEN_PORT);
        let mut times = Vec::new();
        for hook in [Hook::Xdp, Hook::Tc] {
            state.reset()?;
            let run = |frame: &[u8], ifindex: u32| run_once(&inst, hook, frame, ifindex);
            let frame_from = |sport: u16, dport: u16| {
                udp_frame(client_mac, router_client_mac, (client, sport), (to_forward.0, dport))
            };
            let mut time = |path, (ns, verdict): (f64, u32)| {
                times.push(PathTime { program: hook.name(), path, ns_per_packet: ns, verdict })
            };
            time("no match", median_of_runs(runs, |_| run(&frame_from(40_000, 7777)?, rc))?);
            time("new flow", median_of_runs(runs, |i| run(&frame_from(20_000 + i as u16, to_forward.1)?, rc))?);
            let established = frame_from(30_000, to_forward.1)?;
            let (_, out) = run(&established, rc)?;
            let snat_port = udp_source_port(&out[out.len() - established.len()..])?;
            time("established", median_of_runs(runs, |_| run(&established, rc))?);
            let reply = udp_frame(
                server_mac,
                router_server_mac,
                (ip(SERVER_ADDR), UDP_BACKEND_PORT),
                (ip(ROUTER_SERVER_ADDR), snat_port),
            )?;
            time("reverse", median_of_runs(runs, |_| run(&reply, rs))?);
            time(
                "no match, warm",
                warm_runs(runs, |repeat| run_warm(&inst, hook, &frame_from(40_000, 7777)?, rc, repeat))?,
            );
            let identity = udp_frame(client_mac, router_client_mac, (client, 31_000), (ip(SERVER_ADDR), WARM_PORT))?;
            run(&identity, rc)?;
            time("established, warm", warm_runs(runs, |repeat| run_warm(&inst, hook, &identity, rc, repeat))?);
            let identity_reply =
                udp_frame(server_mac, router_server_mac, (ip(SERVER_ADDR), WARM_PORT), (client, 31_000))?;
            time("reverse, warm", warm_runs(runs, |repeat| run_warm(&inst, hook, &identity_reply, rs, repeat))?);
        }
        let frame = udp_frame(client_mac, router_client_mac, (client, 30_000), to_forward)?;
        times.extend(bench_programs(&frame, rc, rs, runs)?);
        Ok(times)
    })?
}

/// Port of the identity forward (on the server's address) used for the warm figures.
const WARM_PORT: u16 = 4242;
/// Runs per warm measurement: each forwarded run takes one off the TTL (64 in the
/// generator's frames), and the path must stay the same for all of them.
const WARM_REPEAT: u32 = 60;

/// Warm nanoseconds per packet: BPF_PROG_TEST_RUN with `repeat`, so the kernel times
/// `WARM_REPEAT` runs back to back on hot caches and the syscall's own cost is spread over
/// them; median over `runs / 50` calls. Only for paths that leave the frame on the same
/// path (no match; the identity forward's established and reverse packets).
fn warm_runs(runs: u32, mut run: impl FnMut(u32) -> Result<Run>) -> Result<(f64, u32)> {
    let mut samples = Vec::new();
    let mut verdict = 0;
    for _ in 0..(runs / 50).max(5) {
        let r = run(WARM_REPEAT)?;
        samples.push(r.ns);
        verdict = r.verdict;
    }
    Ok((median(&samples).context("no runs")?, verdict))
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

fn ip(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>().expect("literal address").octets()
}

/// Each path is timed one run at a time: with `repeat` the kernel runs the program again on
/// the frame the previous run rewrote, which would time another path. The median of single
/// runs includes the timer's own cost, shown by the `timer floor` row.
fn median_of_runs(runs: u32, mut run: impl FnMut(u32) -> Result<(Run, Vec<u8>)>) -> Result<(f64, u32)> {
    let mut samples = Vec::with_capacity(runs as usize);
    let mut verdict = 0;
    for i in 0..runs {
        let (r, _) = run(i)?;
        samples.push(r.ns);
        verdict = r.verdict;
    }
    Ok((median(&samples).context("no runs")?, verdict))
}

struct Run {
    verdict: u32,
    ns: f64,
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN's ctx_in: the frame arrives on `ifindex`.
pub fn xdp_md(frame_len: usize, ifindex: u32) -> Vec<u8> {
    // { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    [0u32, frame_len as u32, 0, ifindex, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// One BPF_PROG_TEST_RUN of `prog`-like closure on `frame`: (run, output frame).
fn test_run<P: TestRun<Result = aya::programs::TestRunResult> + ?Sized>(
    prog: &P,
    frame: &[u8],
    ctx: &[u8],
) -> Result<(Run, Vec<u8>)>
where
    for<'a> P: TestRun<Opts<'a> = TestRunOptions<'a>>,
{
    test_run_repeat(prog, frame, ctx, 1)
}

/// `repeat` runs in one call; the kernel reports the mean time of one run.
fn test_run_repeat<P: TestRun<Result = aya::programs::TestRunResult> + ?Sized>(
    prog: &P,
    frame: &[u8],
    ctx: &[u8],
    repeat: u32,
) -> Result<(Run, Vec<u8>)>
where
    for<'a> P: TestRun<Opts<'a> = TestRunOptions<'a>>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        repeat,
        ..TestRunOptions::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((Run { verdict: r.return_value, ns: ns(r.duration) }, out))
}

fn run_once(inst: &Instance, hook: Hook, frame: &[u8], ifindex: u32) -> Result<(Run, Vec<u8>)> {
    run_repeat(inst, hook, frame, ifindex, 1)
}

fn run_repeat(inst: &Instance, hook: Hook, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(Run, Vec<u8>)> {
    match hook {
        Hook::Xdp => test_run_repeat(inst.xdp(), frame, &xdp_md(frame.len(), ifindex), repeat),
        Hook::Tc => {
            // struct __sk_buff: ingress_ifindex at byte 36, ifindex at 40.
            let mut ctx = vec![0u8; 44];
            ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
            ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            test_run_repeat(inst.tc_ingress(), frame, &ctx, repeat)
        }
    }
}

fn run_warm(inst: &Instance, hook: Hook, frame: &[u8], ifindex: u32, repeat: u32) -> Result<Run> {
    run_repeat(inst, hook, frame, ifindex, repeat).map(|(r, _)| r)
}

fn udp_source_port(frame: &[u8]) -> Result<u16> {
    match SlicedPacket::from_ethernet(frame)?.transport {
        Some(TransportSlice::Udp(udp)) => Ok(udp.source_port()),
        _ => bail!("rewritten frame is not UDP"),
    }
}

/// The ceiling program on the same frame (it only sets MACs and redirects), and the timer
/// floor: the sink program on a frame it passes after reading the Ethernet type.
fn bench_programs(frame: &[u8], ingress: u32, egress: u32, runs: u32) -> Result<Vec<PathTime>> {
    let mut ebpf = load_bench_object()?;
    Array::<_, [u8; 12]>::try_from(ebpf.map_mut("BENCH_L2").context("BENCH_L2")?)?.set(0, [2u8; 12], 0)?;
    DevMap::try_from(ebpf.map_mut("BENCH_TX").context("BENCH_TX")?)?
        .set(0, egress, None, 0)
        .map_err(|e| anyhow::anyhow!("devmap: {e}"))?;
    load_xdp(&mut ebpf, "bench_redirect_only")?;
    load_xdp(&mut ebpf, "bench_sink")?;
    let ctx = xdp_md(frame.len(), ingress);
    let program = |name: &str| -> Result<&Xdp> { Ok(ebpf.program(name).context("bench program")?.try_into()?) };
    let redirect = program("bench_redirect_only")?;
    let (ns, verdict) = median_of_runs(runs, |_| test_run(redirect, frame, &ctx))?;
    let mut not_ip = frame.to_vec();
    not_ip[12..14].copy_from_slice(&[0x08, 0x06]);
    let sink = program("bench_sink")?;
    let (floor_ns, floor_verdict) = median_of_runs(runs, |_| test_run(sink, &not_ip, &ctx))?;
    let (warm_ns, warm_verdict) = warm_runs(runs, |repeat| Ok(test_run_repeat(redirect, frame, &ctx, repeat)?.0))?;
    let (floor_warm, floor_warm_verdict) =
        warm_runs(runs, |repeat| Ok(test_run_repeat(sink, &not_ip, &ctx, repeat)?.0))?;
    Ok(vec![
        PathTime { program: "redirect-only", path: "any", ns_per_packet: ns, verdict },
        PathTime { program: "redirect-only", path: "any, warm", ns_per_packet: warm_ns, verdict: warm_verdict },
        PathTime {
            program: "timer floor",
            path: "near-empty program",
            ns_per_packet: floor_ns,
            verdict: floor_verdict,
        },
        PathTime {
            program: "timer floor",
            path: "near-empty program, warm",
            ns_per_packet: floor_warm,
            verdict: floor_warm_verdict,
        },
    ])
}
