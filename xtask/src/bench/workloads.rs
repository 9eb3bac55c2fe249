//! The traffic of each figure: UDP packet rate from the generator into the sink, TCP
//! throughput with iperf3, request/response latency and new connections per second against
//! a small echo server in the server namespace.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::{netns::run_ok, topo::SERVER_ADDR};

use super::{
    contenders::{ProcessGroup, wait_listening},
    generator::Generator,
    stats::{iperf3_received_bps, percentile, task_ticks, ticks_per_second},
    topology::{Addressing, BenchTopo, ECHO_BACKEND_PORT, IPERF_BACKEND_PORT},
};

/// Packet rates of one generator run, and the CPU it took.
#[derive(Clone, Copy, Debug)]
pub struct UdpRate {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    /// CPU time per delivered packet of everything that handles the bench's packets: the
    /// generator thread (with the softirq work in its context), ksoftirqd, and the contender's
    /// own processes. Counted per task, so other load on the machine does not enter.
    pub cpu_ns_per_packet: Option<f64>,
}

/// Frames still queued when the generator stops are given this long to arrive.
const DRAIN: Duration = Duration::from_millis(50);

/// `helpers`: process ids of the contender (socat), whose CPU time counts too.
pub fn udp_rate(topo: &BenchTopo, generator: &Generator, duration: Duration, helpers: &[u32]) -> Result<UdpRate> {
    // Warm-up: flows created, caches warm, before anything is counted.
    generator.run(topo, Duration::from_millis(100))?;
    std::thread::sleep(DRAIN);
    let mut tasks = ksoftirqd_pids()?;
    tasks.extend_from_slice(helpers);
    let delivered_before = topo.delivered()?;
    let ticks_before = tasks_ticks(&tasks);
    let offered = generator.run(topo, duration)?;
    std::thread::sleep(DRAIN);
    let ticks = tasks_ticks(&tasks).saturating_sub(ticks_before);
    let delivered = topo.delivered()?.saturating_sub(delivered_before);
    let seconds = offered.elapsed.as_secs_f64();
    let cpu_seconds = offered.cpu.as_secs_f64() + ticks as f64 / ticks_per_second() as f64;
    Ok(UdpRate {
        offered_pps: offered.frames as f64 / seconds,
        delivered_pps: delivered as f64 / seconds,
        cpu_ns_per_packet: (delivered > 0).then(|| cpu_seconds * 1e9 / delivered as f64),
    })
}

/// The per-CPU softirq threads, which take over packet processing under sustained load.
fn ksoftirqd_pids() -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.starts_with("ksoftirqd/")) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// utime + stime (ticks) of the tasks, summed over all their threads.
fn tasks_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|line| task_ticks(&line).ok())
        .sum()
}

/// TCP throughput (bits/s received) of one iperf3 stream from the client to the server.
pub fn tcp_throughput(topo: &BenchTopo, addressing: Addressing, seconds: u32) -> Result<f64> {
    let server = &topo.chain.server;
    let mut iperf_server = server.cmd("iperf3");
    iperf_server.args(["-s", "-1", "-B", SERVER_ADDR, "-p", &IPERF_BACKEND_PORT.to_string()]);
    let _server = ProcessGroup::spawn(iperf_server)?;
    wait_listening(server, IPERF_BACKEND_PORT)?;
    let (addr, port) = addressing.iperf_target();
    let out = run_ok(topo.chain.client.cmd("iperf3").args([
        "-c",
        addr,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
        "--connect-timeout",
        "3000",
        "-J",
    ]))?;
    iperf3_received_bps(&out)
}

const MESSAGE: [u8; 32] = [0x5a; 32];

/// New connections per run, at most. Every connection goes to the same backend, so each
/// takes one of forwarder's default 12,768 SNAT ports (20000-32767), and forwarder frees a
/// closed connection's port only when its conntrack entry is evicted; with 8 port attempts per
/// new flow it refused connections from about 2,300 on in this bench (docs/bench/README.md).
/// Every contender gets the same cap, so the figure is a rate, not a capacity.
const MAX_CONNECTIONS: u64 = 1_500;

/// Request/response latency percentiles (µs) of `round_trips` 32-byte request/responses on
/// one connection to the echo server.
pub fn latency(topo: &BenchTopo, addressing: Addressing, round_trips: usize) -> Result<(f64, f64)> {
    let _server = EchoServer::start(topo)?;
    let target = addressing.echo_target();
    topo.chain.client.run_scoped(move || -> Result<(f64, f64)> {
        let mut s = connect(target).context("latency")?;
        let mut samples = Vec::with_capacity(round_trips);
        for _ in 0..round_trips {
            let start = Instant::now();
            round_trip(&mut s)?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
        Ok((percentile(&samples, 50.0).context("no samples")?, percentile(&samples, 99.0).context("no samples")?))
    })?
}

/// New connections per second: connect, one request/response, close, one after another, for
/// `connect_for` or [`MAX_CONNECTIONS`] connections.
pub fn connection_rate(topo: &BenchTopo, addressing: Addressing, connect_for: Duration) -> Result<f64> {
    let _server = EchoServer::start(topo)?;
    let target = addressing.echo_target();
    topo.chain.client.run_scoped(move || -> Result<f64> {
        let start = Instant::now();
        let mut connections = 0u64;
        while start.elapsed() < connect_for && connections < MAX_CONNECTIONS {
            let mut s = connect(target).with_context(|| format!("connection #{}", connections + 1))?;
            round_trip(&mut s)?;
            connections += 1;
        }
        Ok(connections as f64 / start.elapsed().as_secs_f64())
    })?
}

fn connect(target: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).with_context(|| format!("connect {target}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

fn round_trip(s: &mut TcpStream) -> Result<()> {
    s.write_all(&MESSAGE)?;
    let mut reply = [0u8; MESSAGE.len()];
    s.read_exact(&mut reply).context("echo reply")?;
    if reply != MESSAGE {
        bail!("echo reply differs");
    }
    Ok(())
}

/// A one-thread echo server in the server namespace, one connection at a time (the client
/// makes one at a time). Stopped on drop by shutting the listening socket down, which wakes
/// the blocked accept.
struct EchoServer {
    listener_fd: i32,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(topo: &BenchTopo) -> Result<Self> {
        let listener = topo.chain.server.run(|| TcpListener::bind((SERVER_ADDR, ECHO_BACKEND_PORT)))??;
        let listener_fd = listener.as_raw_fd();
        let thread = std::thread::spawn(move || {
            while let Ok((mut conn, _)) = listener.accept() {
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self { listener_fd, thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // SAFETY: the fd belongs to the listener the thread owns until it returns; shutdown
        // on a listening socket makes the pending accept fail (Linux).
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
