//! The traffic of each figure: UDP packet rate from the generator into the sink, TCP
//! throughput with iperf3, request/response latency and new connections per second against
//! a small echo server in the server namespace.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use forwarder_tests::{netns::run_ok, topo::SERVER_ADDR};
use serde::Serialize;

use super::{
    cleanup,
    contenders::{ProcessGroup, wait_listening},
    generator::Generator,
    stats::{
        iperf3_received_bps, median, percentile, task_ticks, task_ticks_with_children, thread_cpu_time,
        ticks_per_second,
    },
    topology::{Addressing, BenchTopo, CHURN_BACKEND_PORT, ECHO_BACKEND_PORT, IPERF_BACKEND_PORT},
};

/// Packet rates of one generator run, and the CPU it took.
#[derive(Clone, Copy, Debug)]
pub struct UdpRate {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    /// Frames the generator sent and the sink counted over the run.
    pub offered: u64,
    pub delivered: u64,
    /// Of the frames offered, those the client's veth could not hand to the router's receive
    /// ring ([`BenchTopo::client_ring_refused`]): lost before the router saw them.
    pub refused_at_ring: u64,
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
    Ok(count_frames(topo, generator, duration, helpers)?.rate())
}

/// New flows through the router: the generator's SYNs ([`Generator::syns`]), every one a new
/// connection, measured as [`udp_rate`] measures UDP (delivered = the SYNs the sink counted)
/// but with no warm-up, which would take connection entries and SNAT ports before the count
/// starts. `rounds` runs of at most `duration` each, the same SYNs every round: before each
/// round after the first, `forget` empties the contender's connection table (outside the
/// count) and the generator starts over, so every round is the first round's flows again,
/// new to the router. One round is a fraction of a second (the SYN budget); several make
/// the CPU figure less a matter of where the scheduler's ticks fell.
pub fn new_flow_rate(
    topo: &BenchTopo,
    generator: &mut Generator,
    duration: Duration,
    helpers: &[u32],
    rounds: u32,
    mut forget: impl FnMut() -> Result<()>,
) -> Result<UdpRate> {
    let mut total = FrameCount::default();
    for round in 0..rounds.max(1) {
        if round > 0 {
            forget().context("emptying the connection table between rounds")?;
            generator.rewind()?;
        }
        total += count_frames(topo, generator, duration, helpers)?;
    }
    Ok(total.rate())
}

/// What counted generator runs offered and delivered, over how long, at what CPU time.
#[derive(Clone, Copy, Debug, Default)]
struct FrameCount {
    offered: u64,
    delivered: u64,
    refused_at_ring: u64,
    seconds: f64,
    cpu_seconds: f64,
}

impl std::ops::AddAssign for FrameCount {
    fn add_assign(&mut self, o: Self) {
        self.offered += o.offered;
        self.delivered += o.delivered;
        self.refused_at_ring += o.refused_at_ring;
        self.seconds += o.seconds;
        self.cpu_seconds += o.cpu_seconds;
    }
}

impl FrameCount {
    fn rate(self) -> UdpRate {
        UdpRate {
            offered_pps: self.offered as f64 / self.seconds,
            delivered_pps: self.delivered as f64 / self.seconds,
            offered: self.offered,
            delivered: self.delivered,
            refused_at_ring: self.refused_at_ring,
            cpu_ns_per_packet: (self.delivered > 0).then(|| self.cpu_seconds * 1e9 / self.delivered as f64),
        }
    }
}

/// One counted generator run: frames offered and delivered, and the CPU time of the
/// generator thread, ksoftirqd and `helpers` ([`FrameCount::rate`] makes it per frame).
fn count_frames(topo: &BenchTopo, generator: &Generator, duration: Duration, helpers: &[u32]) -> Result<FrameCount> {
    let mut tasks = ksoftirqd_pids()?;
    tasks.extend_from_slice(helpers);
    let delivered_before = topo.delivered()?;
    let refused_before = topo.client_ring_refused()?;
    let ticks_before = tasks_ticks(&tasks);
    let offered = generator.run(topo, duration)?;
    std::thread::sleep(DRAIN);
    let ticks = tasks_ticks(&tasks).saturating_sub(ticks_before);
    let delivered = topo.delivered()?.saturating_sub(delivered_before);
    Ok(FrameCount {
        offered: offered.frames,
        delivered,
        refused_at_ring: topo.client_ring_refused()?.saturating_sub(refused_before),
        seconds: offered.elapsed.as_secs_f64(),
        cpu_seconds: offered.cpu.as_secs_f64() + ticks as f64 / ticks_per_second() as f64,
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

/// [`tasks_ticks`] plus the time of the children the processes have reaped (socat's process
/// per TCP connection).
fn tasks_ticks_with_children(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|line| task_ticks_with_children(&line).ok())
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

/// New connections made one after another.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionRate {
    /// Connections completed per second of the run (failed attempts' time included).
    pub per_second: f64,
    /// Connections that did not complete (see [`Failure`]).
    pub failed: u64,
}

/// New connections per second: connect, one request/response, client closes, one after
/// another, for `connect_for`, with no cap on their number: every connection to the one
/// backend takes a SNAT port and a connection entry until the contender expires it, and a
/// contender that runs out shows it here. A connection that fails is counted and the next
/// one tried.
pub fn connection_rate(topo: &BenchTopo, addressing: Addressing, connect_for: Duration) -> Result<ConnectionRate> {
    let _server = EchoServer::start(topo)?;
    let target = addressing.echo_target();
    topo.chain.client.run_scoped(move || -> Result<ConnectionRate> {
        let start = Instant::now();
        let (mut completed, mut failed) = (0u64, 0u64);
        while start.elapsed() < connect_for {
            cleanup::check()?;
            match connect(target).and_then(|mut s| round_trip(&mut s)) {
                Ok(()) => completed += 1,
                Err(_) => failed += 1,
            }
        }
        Ok(ConnectionRate { per_second: completed as f64 / start.elapsed().as_secs_f64(), failed })
    })?
}

/// How the connection-churn workload runs.
#[derive(Clone, Copy, Debug)]
pub struct ChurnPlan {
    pub duration: Duration,
    /// Requests/s are counted per window of this length.
    pub window: Duration,
    /// Clients, each making one connection after another.
    pub clients: usize,
}

/// Why a connection failed. Every attempt either completes or fails with one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The handshake was answered with a reset.
    ConnectRefused,
    /// No handshake within [`IO_TIMEOUT`] (SYNs dropped, e.g. for want of a SNAT port).
    ConnectTimeout,
    /// Any other error of `connect`.
    ConnectError,
    /// The connection was reset after the handshake.
    Reset,
    /// No (complete) response within [`IO_TIMEOUT`].
    ResponseTimeout,
    /// The response ended early or differed from the request.
    WrongResponse,
    /// The server did not close after its response within [`IO_TIMEOUT`].
    NoClose,
    /// Any other error on the established connection.
    Other,
}

impl Failure {
    pub const ALL: [Failure; 8] = [
        Failure::ConnectRefused,
        Failure::ConnectTimeout,
        Failure::ConnectError,
        Failure::Reset,
        Failure::ResponseTimeout,
        Failure::WrongResponse,
        Failure::NoClose,
        Failure::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::ConnectRefused => "connect_refused",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::ConnectError => "connect_error",
            Failure::Reset => "reset",
            Failure::ResponseTimeout => "response_timeout",
            Failure::WrongResponse => "wrong_response",
            Failure::NoClose => "no_close",
            Failure::Other => "other",
        }
    }

    fn of_connect(e: &std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionRefused => Failure::ConnectRefused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::ConnectTimeout,
            _ => Failure::ConnectError,
        }
    }

    fn of_io(e: &std::io::Error, timeout: Failure) -> Self {
        match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => Failure::Reset,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => timeout,
            ErrorKind::UnexpectedEof => Failure::WrongResponse,
            _ => Failure::Other,
        }
    }
}

/// One window of the churn workload.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChurnWindow {
    pub requests_per_second: f64,
    pub completed: u64,
    pub failed: u64,
}

/// One churn run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Churn {
    pub window_seconds: f64,
    /// Requests/s of each window in turn (a request per connection).
    pub windows: Vec<ChurnWindow>,
    /// Connections completed and failed, those still in flight when the last window closed
    /// included.
    pub completed: u64,
    pub failed: u64,
    /// Failed connections by [`Failure::name`] (only kinds that occurred).
    pub failures: BTreeMap<&'static str, u64>,
    /// CPU time of the tasks that carry the connections (see [`churn`]) per completed
    /// connection, in µs.
    pub cpu_us_per_connection: Option<f64>,
    /// Connections the server accepted whose request or response failed on its side.
    pub server_errors: u64,
}

impl Churn {
    /// Requests/s of the median window.
    pub fn median_window(&self) -> Option<f64> {
        median(&self.windows.iter().map(|w| w.requests_per_second).collect::<Vec<_>>())
    }

    /// Requests/s of the slowest window.
    pub fn min_window(&self) -> Option<f64> {
        self.windows.iter().map(|w| w.requests_per_second).min_by(f64::total_cmp)
    }
}

/// Per-window counters shared by the clients.
struct Windows {
    start: Instant,
    window: Duration,
    completed: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
    /// After the last window (connections in flight at the end), and failures by kind.
    tail_completed: AtomicU64,
    tail_failed: AtomicU64,
    failures: Vec<AtomicU64>,
}

impl Windows {
    fn new(plan: &ChurnPlan, start: Instant) -> Self {
        let n = (plan.duration.as_secs_f64() / plan.window.as_secs_f64()).round().max(1.0) as usize;
        let counters = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Self {
            start,
            window: plan.window,
            completed: counters(),
            failed: counters(),
            tail_completed: AtomicU64::new(0),
            tail_failed: AtomicU64::new(0),
            failures: Failure::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn end(&self) -> Instant {
        self.start + self.window * self.completed.len() as u32
    }

    fn record(&self, outcome: Result<(), Failure>) {
        self.record_at(self.start.elapsed(), outcome);
    }

    /// Records an outcome at `elapsed` since the start.
    fn record_at(&self, elapsed: Duration, outcome: Result<(), Failure>) {
        let i = (elapsed.as_nanos() / self.window.as_nanos().max(1)) as usize;
        let (windows, tail) = match outcome {
            Ok(()) => (&self.completed, &self.tail_completed),
            Err(f) => {
                self.failures[Failure::ALL.iter().position(|k| *k == f).unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
                (&self.failed, &self.tail_failed)
            }
        };
        windows.get(i).unwrap_or(tail).fetch_add(1, Ordering::Relaxed);
    }

    fn churn(&self) -> Churn {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let seconds = self.window.as_secs_f64();
        let windows: Vec<ChurnWindow> = self
            .completed
            .iter()
            .zip(&self.failed)
            .map(|(c, f)| ChurnWindow {
                requests_per_second: get(c) as f64 / seconds,
                completed: get(c),
                failed: get(f),
            })
            .collect();
        Churn {
            window_seconds: seconds,
            completed: windows.iter().map(|w| w.completed).sum::<u64>() + get(&self.tail_completed),
            failed: windows.iter().map(|w| w.failed).sum::<u64>() + get(&self.tail_failed),
            windows,
            failures: Failure::ALL
                .iter()
                .zip(&self.failures)
                .filter(|(_, n)| get(n) > 0)
                .map(|(f, n)| (f.name(), get(n)))
                .collect(),
            cpu_us_per_connection: None,
            server_errors: 0,
        }
    }
}

/// Connect/response/close timeouts of the churn clients and server. A SYN the router drops
/// is sent again after 1 s, so a connection that needed one retransmission still completes
/// (slowly); one that needed two fails.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Sustained connection churn, as HTTP with `Connection: close`: `plan.clients` clients in
/// the client namespace, each connecting, sending a 32-byte request, reading the 32-byte
/// response and the server's close (the server closes first, so its side keeps the
/// TIME_WAIT), one connection after another for `plan.duration`, against a server with a
/// worker thread per client. Requests/s are counted per window; every connection that does
/// not complete is counted as failed, by kind, and the clients go on.
///
/// CPU per connection is measured as CPU per packet is: the CPU time of the tasks that carry
/// the connections (the client and server threads, with the router's softirq work that runs
/// in their context; ksoftirqd; `router_pids`, the contender's own processes and the socat
/// children they reaped) over the run, per completed connection. It includes both ends' own
/// TCP work, the same for every contender: plain routing's figure is that floor.
pub fn churn(topo: &BenchTopo, addressing: Addressing, plan: ChurnPlan, router_pids: &[u32]) -> Result<Churn> {
    let server = ChurnServer::start(topo, plan.clients)?;
    let target = addressing.churn_target();
    let softirq = ksoftirqd_pids()?;
    let ticks_before = tasks_ticks(&softirq) + tasks_ticks_with_children(router_pids);
    let windows = Windows::new(&plan, Instant::now());
    let client_cpu = topo.chain.client.run_scoped(|| -> Duration {
        // Threads started here are in the client namespace too (they inherit it).
        std::thread::scope(|s| {
            let clients: Vec<_> = (0..plan.clients)
                .map(|_| {
                    s.spawn(|| {
                        let cpu_start = thread_cpu_time();
                        let end = windows.end();
                        while Instant::now() < end && !cleanup::interrupted() {
                            windows.record(churn_connection(target));
                        }
                        thread_cpu_time() - cpu_start
                    })
                })
                .collect();
            clients.into_iter().map(|c| c.join().unwrap_or_default()).sum()
        })
    })?;
    cleanup::check()?;
    let server_errors = server.errors.load(Ordering::Relaxed);
    let server_cpu = server.stop();
    let ticks = (tasks_ticks(&softirq) + tasks_ticks_with_children(router_pids)).saturating_sub(ticks_before);
    let mut result = windows.churn();
    let cpu_seconds = (client_cpu + server_cpu).as_secs_f64() + ticks as f64 / ticks_per_second() as f64;
    result.cpu_us_per_connection = (result.completed > 0).then(|| cpu_seconds * 1e6 / result.completed as f64);
    result.server_errors = server_errors;
    Ok(result)
}

/// One churn connection: connect, request, response, the server's close, then ours.
fn churn_connection(target: SocketAddr) -> Result<(), Failure> {
    let mut s = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(|e| Failure::of_connect(&e))?;
    let io = |e: std::io::Error| Failure::of_io(&e, Failure::Other);
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.write_all(&MESSAGE).map_err(|e| Failure::of_io(&e, Failure::ResponseTimeout))?;
    let mut reply = [0u8; MESSAGE.len()];
    s.read_exact(&mut reply).map_err(|e| Failure::of_io(&e, Failure::ResponseTimeout))?;
    if reply != MESSAGE {
        return Err(Failure::WrongResponse);
    }
    match s.read(&mut reply) {
        Ok(0) => Ok(()),
        Ok(_) => Err(Failure::WrongResponse),
        Err(e) => Err(Failure::of_io(&e, Failure::NoClose)),
    }
}

/// The churn workload's server in the server namespace: worker threads that share one
/// listener, each accepting a connection, reading the request, answering it (an echo) and
/// closing first.
struct ChurnServer {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    workers: Vec<std::thread::JoinHandle<Duration>>,
}

impl ChurnServer {
    fn start(topo: &BenchTopo, workers: usize) -> Result<Self> {
        let listener = Arc::new(topo.chain.server.run(|| TcpListener::bind((SERVER_ADDR, CHURN_BACKEND_PORT)))??);
        let stopping = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let workers = (0..workers)
            .map(|_| {
                let (listener, stopping, errors) = (listener.clone(), stopping.clone(), errors.clone());
                std::thread::spawn(move || {
                    let cpu_start = thread_cpu_time();
                    loop {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                if serve_one(conn).is_err() {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) if stopping.load(Ordering::Relaxed) => break,
                            // A connection reset while queued, or the like: the next one.
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                    thread_cpu_time() - cpu_start
                })
            })
            .collect();
        Ok(Self { listener, stopping, errors, workers })
    }

    /// Stops the workers; returns their CPU time.
    fn stop(mut self) -> Duration {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Duration {
        self.stopping.store(true, Ordering::Relaxed);
        // SAFETY: the listener is open while `self` holds it; shutdown on a listening socket
        // makes every pending and later accept fail (Linux).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        self.workers.drain(..).map(|w| w.join().unwrap_or_default()).sum()
    }
}

impl Drop for ChurnServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The server's side of one churn connection; dropping the stream closes it first.
fn serve_one(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = [0u8; MESSAGE.len()];
    conn.read_exact(&mut request)?;
    conn.write_all(&request)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_add_up_before_the_ratios_are_taken() {
        let mut total = FrameCount::default();
        total += FrameCount { offered: 30_000, delivered: 30_000, refused_at_ring: 0, seconds: 0.1, cpu_seconds: 0.06 };
        total +=
            FrameCount { offered: 10_000, delivered: 9_000, refused_at_ring: 600, seconds: 0.1, cpu_seconds: 0.03 };
        let rate = total.rate();
        assert_eq!((rate.offered, rate.delivered, rate.refused_at_ring), (40_000, 39_000, 600));
        assert!((rate.offered_pps - 200_000.0).abs() < 1e-6);
        assert!((rate.delivered_pps - 195_000.0).abs() < 1e-6);
        // CPU over every delivered frame (0.09 s / 39,000), not a mean of the rounds' own
        // figures (2000 and 3333 ns).
        let ns = rate.cpu_ns_per_packet.expect("frames were delivered");
        assert!((ns - 0.09e9 / 39_000.0).abs() < 1e-6, "{ns}");
        assert_eq!(FrameCount { seconds: 1.0, ..FrameCount::default() }.rate().cpu_ns_per_packet, None);
    }

    fn windows(n: u32) -> Windows {
        let plan =
            ChurnPlan { duration: Duration::from_millis(100) * n, window: Duration::from_millis(100), clients: 1 };
        Windows::new(&plan, Instant::now())
    }

    #[test]
    fn churn_counts_every_outcome_in_its_window_or_the_tail() {
        let w = windows(3);
        assert_eq!(w.completed.len(), 3);
        let at = |ms| Duration::from_millis(ms);
        w.record_at(at(0), Ok(()));
        w.record_at(at(99), Ok(()));
        w.record_at(at(50), Err(Failure::ConnectTimeout));
        w.record_at(at(100), Ok(()));
        w.record_at(at(300), Ok(()));
        w.record_at(at(1000), Err(Failure::NoClose));
        let c = w.churn();
        assert_eq!(c.windows.iter().map(|w| w.completed).collect::<Vec<_>>(), [2, 1, 0]);
        assert_eq!(c.windows.iter().map(|w| w.failed).collect::<Vec<_>>(), [1, 0, 0]);
        assert_eq!(c.windows[0].requests_per_second, 20.0);
        // In flight when the last window closed: in the totals, not in a window.
        assert_eq!((c.completed, c.failed), (4, 2));
        assert_eq!(c.failures, BTreeMap::from([("connect_timeout", 1), ("no_close", 1)]));
        assert_eq!(c.median_window(), Some(10.0));
        assert_eq!(c.min_window(), Some(0.0));
    }

    #[test]
    fn failures_are_classified_by_where_they_happen() {
        let e = |k: ErrorKind| std::io::Error::from(k);
        assert_eq!(Failure::of_connect(&e(ErrorKind::ConnectionRefused)), Failure::ConnectRefused);
        assert_eq!(Failure::of_connect(&e(ErrorKind::TimedOut)), Failure::ConnectTimeout);
        assert_eq!(Failure::of_connect(&e(ErrorKind::HostUnreachable)), Failure::ConnectError);
        assert_eq!(Failure::of_io(&e(ErrorKind::ConnectionReset), Failure::NoClose), Failure::Reset);
        assert_eq!(Failure::of_io(&e(ErrorKind::WouldBlock), Failure::NoClose), Failure::NoClose);
        assert_eq!(Failure::of_io(&e(ErrorKind::UnexpectedEof), Failure::NoClose), Failure::WrongResponse);
        let names: std::collections::BTreeSet<_> = Failure::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), Failure::ALL.len());
    }
}
