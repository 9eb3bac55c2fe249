//! Connection-lifecycle traffic with real sockets: a backend that answers each connection
//! and closes first, clients that open, use and close connections in a loop (churn) and
//! check every answer, and the tally of what failed. Used by `tests/tests/lifecycle.rs` in
//! its own threads and, for programs that must sit in a test cgroup, by `fwt-traffic`.
//!
//! Each connection carries an id chosen by the client (kind, worker, sequence number); the
//! backend answers with that id, so a connection that got another one's packets fails as
//! `wrong` even if TCP let the bytes through.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::Child,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::Netns;

/// Connect, read and write timeout of every client connection: long enough for two SYN
/// retransmissions (after 1 s and 3 s), short enough that a black-holed connection is soon
/// counted. A SYN can meet a TIME_WAIT the backend keeps for the same address and port
/// from an earlier connection whose timestamps came from another host's clock (the router's
/// own connections beside SNATed ones): the backend answers with an ACK, the client resets
/// and retries a second later. That is slow, not lost; `SLOW` counts it apart.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that took longer than this (a SYN retransmission at least) counts as slow.
pub const SLOW: Duration = Duration::from_millis(900);

/// What is said on each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dialogue {
    /// An HTTP/1.1 request with `Connection: close`, as wrk sends it to nginx: the client
    /// sends `GET /ID`, the server answers with ID as the body and closes first; the client
    /// reads to EOF, then closes.
    HttpClose,
    /// MariaDB's order of speech: the server greets, the client sends a query naming ID,
    /// the server answers ID, the client sends `QUIT`, the server closes; the client reads
    /// EOF, then closes.
    Mariadb,
}

const GREETING: &[u8] = b"5.5.5-10.11.6-MariaDB ready\n";

/// Why a client connection failed, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// connect() refused (RST to the SYN).
    Refused,
    /// No answer in time (connect, read or write).
    Timeout,
    /// Reset or aborted after connect.
    Reset,
    /// EOF before the whole answer.
    Short,
    /// An answer that is not this connection's.
    Wrong,
    /// Anything else (address in use, unreachable, ...).
    Other,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Reset => "reset",
            Failure::Short => "short",
            Failure::Wrong => "wrong",
            Failure::Other => "other",
        }
    }

    fn of(e: &std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => Failure::Reset,
            ErrorKind::UnexpectedEof => Failure::Short,
            _ => Failure::Other,
        }
    }
}

/// A failed connection: its kind and what happened, for the report.
#[derive(Debug)]
pub struct Failed {
    pub kind: Failure,
    pub what: String,
}

impl Failed {
    pub fn io(step: &str, e: std::io::Error) -> Self {
        Self { kind: Failure::of(&e), what: format!("{step}: {e}") }
    }
}

/// Failures by kind, with the first few described.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    pub by_kind: BTreeMap<String, u64>,
    pub samples: Vec<String>,
}

impl Tally {
    const SAMPLES: usize = 8;

    pub fn add(&mut self, f: &Failed, id: &str) {
        *self.by_kind.entry(f.kind.name().to_string()).or_default() += 1;
        if self.samples.len() < Self::SAMPLES {
            self.samples.push(format!("{id}: {}", f.what));
        }
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    pub fn merge(&mut self, other: &Tally) {
        for (k, n) in &other.by_kind {
            *self.by_kind.entry(k.clone()).or_default() += n;
        }
        for s in &other.samples {
            if self.samples.len() < Self::SAMPLES {
                self.samples.push(s.clone());
            }
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.total() == 0 {
            return write!(f, "no failures");
        }
        write!(f, "{} failed (", self.total())?;
        for (i, (k, n)) in self.by_kind.iter().enumerate() {
            write!(f, "{}{k} {n}", if i > 0 { ", " } else { "" })?;
        }
        write!(f, "); first: {:?}", self.samples)
    }
}

// ---------------------------------------------------------------------------------------
// Backend

/// A TCP backend in a namespace: `threads` acceptors on one listener, each serving one
/// connection at a time with `dialogue`; stopped and joined on drop.
pub struct Backend {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    errors: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Binds `addr` in `ns` and returns once it listens.
    pub fn start(ns: &Netns, addr: SocketAddr, dialogue: Dialogue, threads: usize) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = ns.run(move || -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            // accept() honours SO_RCVTIMEO: the acceptors wake up to see the stop flag.
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Tally::default()));
        let mut handles = Vec::new();
        for _ in 0..threads {
            let l = listener.try_clone()?;
            let (stop, served, errors, tx) = (stop.clone(), served.clone(), errors.clone(), tx.clone());
            // Accepted sockets belong to the listener's namespace whatever thread accepts,
            // so the acceptors need not enter it.
            handles.push(std::thread::spawn(move || {
                let _ = tx.send(());
                while !stop.load(Ordering::Relaxed) {
                    let s = match l.accept() {
                        Ok((s, _)) => TcpStream::from(s),
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            errors.lock().unwrap().add(&Failed::io("accept", e), "backend");
                            continue;
                        }
                    };
                    match serve(s, dialogue) {
                        Ok(()) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(f) => errors.lock().unwrap().add(&f, "backend"),
                    }
                }
            }));
        }
        drop(tx);
        for _ in 0..threads {
            rx.recv_timeout(Duration::from_secs(5)).context("backend acceptor did not start")?;
        }
        Ok(Self { stop, served, errors, threads: handles })
    }

    /// Connections answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Connections the backend could not finish (the client vanished, ...).
    pub fn errors(&self) -> Tally {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// The backend's side of one connection; it closes first (the stream drops here).
fn serve(s: TcpStream, dialogue: Dialogue) -> Result<(), Failed> {
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| Failed::io("set timeout", e))?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| Failed::io("set timeout", e))?;
    s.set_nodelay(true).map_err(|e| Failed::io("nodelay", e))?;
    let mut w = &s;
    let mut r = BufReader::new(&s);
    match dialogue {
        Dialogue::HttpClose => {
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| Failed::io("read request", e))?;
            let id = line
                .strip_prefix("GET /")
                .and_then(|l| l.split(' ').next())
                .ok_or_else(|| Failed { kind: Failure::Wrong, what: format!("request {line:?}") })?
                .to_string();
            // The rest of the head, so that nothing unread turns the close into a reset.
            loop {
                line.clear();
                let n = r.read_line(&mut line).map_err(|e| Failed::io("read head", e))?;
                if n == 0 || line == "\r\n" {
                    break;
                }
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nServer: fwt\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{id}",
                id.len()
            );
            w.write_all(reply.as_bytes()).map_err(|e| Failed::io("write reply", e))?;
        }
        Dialogue::Mariadb => {
            w.write_all(GREETING).map_err(|e| Failed::io("write greeting", e))?;
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| Failed::io("read query", e))?;
            let id = line
                .strip_prefix("SELECT ")
                .and_then(|l| l.strip_suffix(";\n"))
                .ok_or_else(|| Failed { kind: Failure::Wrong, what: format!("query {line:?}") })?
                .to_string();
            w.write_all(format!("{id}\n").as_bytes()).map_err(|e| Failed::io("write result", e))?;
            line.clear();
            r.read_line(&mut line).map_err(|e| Failed::io("read quit", e))?;
            if line != "QUIT\n" {
                return Err(Failed { kind: Failure::Wrong, what: format!("quit {line:?}") });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Clients

/// One client connection to `to` with `dialogue`, checking that the answer is `id`'s;
/// from `bind` (SO_REUSEADDR) if given. Runs in the calling thread's namespace.
pub fn one_connection(to: SocketAddr, dialogue: Dialogue, id: &str, bind: Option<SocketAddr>) -> Result<(), Failed> {
    let s = connect(to, bind)?;
    client_dialogue(&s, dialogue, id)
}

/// A connected TCP socket to `to`, from `bind` if given (SO_REUSEADDR, as a client that
/// reuses its source port does).
pub fn connect(to: SocketAddr, bind: Option<SocketAddr>) -> Result<TcpStream, Failed> {
    let s = match bind {
        None => TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(|e| Failed::io("connect", e))?,
        Some(from) => {
            let sock = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| Failed::io("socket", e))?;
            sock.set_reuse_address(true).map_err(|e| Failed::io("SO_REUSEADDR", e))?;
            sock.bind(&from.into()).map_err(|e| Failed::io("bind", e))?;
            sock.connect_timeout(&SockAddr::from(to), IO_TIMEOUT).map_err(|e| Failed::io("connect", e))?;
            TcpStream::from(sock)
        }
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| Failed::io("set timeout", e))?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| Failed::io("set timeout", e))?;
    s.set_nodelay(true).map_err(|e| Failed::io("nodelay", e))?;
    Ok(s)
}

/// The client's side of `dialogue` on a connected socket; ends having read EOF (the
/// server closed first), so the caller's close is the second.
pub fn client_dialogue(s: &TcpStream, dialogue: Dialogue, id: &str) -> Result<(), Failed> {
    let mut w = s;
    let mut r = s;
    match dialogue {
        Dialogue::HttpClose => {
            let req = format!("GET /{id} HTTP/1.1\r\nHost: backend\r\nUser-Agent: fwt\r\nConnection: close\r\n\r\n");
            w.write_all(req.as_bytes()).map_err(|e| Failed::io("write request", e))?;
            let mut reply = Vec::new();
            r.read_to_end(&mut reply).map_err(|e| Failed::io("read reply", e))?;
            let reply = String::from_utf8_lossy(&reply);
            let Some((head, body)) = reply.split_once("\r\n\r\n") else {
                return Err(Failed { kind: Failure::Short, what: format!("reply {reply:?}") });
            };
            if !head.starts_with("HTTP/1.1 200 OK") || body != id {
                let kind = if body.len() < id.len() && id.starts_with(body) { Failure::Short } else { Failure::Wrong };
                return Err(Failed { kind, what: format!("reply {reply:?}") });
            }
        }
        Dialogue::Mariadb => {
            let mut greeting = vec![0u8; GREETING.len()];
            r.read_exact(&mut greeting).map_err(|e| Failed::io("read greeting", e))?;
            if greeting != GREETING {
                return Err(Failed { kind: Failure::Wrong, what: format!("greeting {greeting:?}") });
            }
            w.write_all(format!("SELECT {id};\n").as_bytes()).map_err(|e| Failed::io("write query", e))?;
            let want = format!("{id}\n");
            let mut result = vec![0u8; want.len()];
            r.read_exact(&mut result).map_err(|e| Failed::io("read result", e))?;
            if result != want.as_bytes() {
                return Err(Failed {
                    kind: Failure::Wrong,
                    what: format!("result {:?} for {id}", String::from_utf8_lossy(&result)),
                });
            }
            w.write_all(b"QUIT\n").map_err(|e| Failed::io("write quit", e))?;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).map_err(|e| Failed::io("read to close", e))?;
            if !rest.is_empty() {
                return Err(Failed { kind: Failure::Wrong, what: format!("after quit {rest:?}") });
            }
        }
    }
    Ok(())
}

/// How long a churn runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum Until {
    /// For this long, counting completions per window.
    Elapsed { total: Duration, window: Duration },
    /// Until this many connections were made (completed or failed), across all workers.
    Connections(u64),
}

/// A churn: `workers` threads each opening, using and closing connections to `to` one
/// after the other. Ids are `LABEL-WORKER-SEQ`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Churn {
    pub to: SocketAddr,
    pub dialogue: Dialogue,
    pub workers: usize,
    pub until: Until,
    pub label: String,
    /// Stop early after this many failures (a collapsed path would otherwise spend
    /// IO_TIMEOUT on each of thousands of connections).
    pub max_failures: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Completed connections per window (`Until::Elapsed` only).
    pub windows: Vec<u64>,
    pub completed: u64,
    /// Completed connections that took longer than `SLOW`.
    pub slow: u64,
    pub failed: Tally,
    pub elapsed_s: f64,
    /// Set when the churn stopped at `max_failures`.
    pub aborted: bool,
}

impl ChurnReport {
    /// Completions per second of each window.
    pub fn window_rates(&self, window: Duration) -> Vec<f64> {
        self.windows.iter().map(|n| *n as f64 / window.as_secs_f64()).collect()
    }
}

impl Churn {
    /// Runs the churn from the calling thread's namespace (the workers inherit it).
    pub fn run(&self) -> ChurnReport {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let slow = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Tally::default()));
        let failures = Arc::new(AtomicU64::new(0));
        let limit = match self.until {
            Until::Connections(n) => n,
            Until::Elapsed { .. } => u64::MAX,
        };
        let t0 = Instant::now();
        let workers: Vec<JoinHandle<()>> = (0..self.workers)
            .map(|w| {
                let (stop, completed, slow, started, failed, failures) =
                    (stop.clone(), completed.clone(), slow.clone(), started.clone(), failed.clone(), failures.clone());
                let (to, dialogue, label, max_failures) =
                    (self.to, self.dialogue, self.label.clone(), self.max_failures);
                std::thread::spawn(move || {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) && started.fetch_add(1, Ordering::Relaxed) < limit {
                        let id = format!("{label}-{w}-{seq}");
                        seq += 1;
                        let t = Instant::now();
                        match one_connection(to, dialogue, &id, None) {
                            Ok(()) => {
                                completed.fetch_add(1, Ordering::Relaxed);
                                if t.elapsed() > SLOW {
                                    slow.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(f) => {
                                failed.lock().unwrap().add(&f, &id);
                                if failures.fetch_add(1, Ordering::Relaxed) + 1 >= max_failures {
                                    stop.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let mut windows = Vec::new();
        if let Until::Elapsed { total, window } = self.until {
            let n = (total.as_secs_f64() / window.as_secs_f64()).round() as u32;
            let mut before = 0;
            for k in 1..=n {
                let at = t0 + window * k;
                // Sleeping here only measures; it waits for nothing to be ready.
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let now = completed.load(Ordering::Relaxed);
                windows.push(now - before);
                before = now;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        }
        for w in workers {
            w.join().expect("churn worker panicked");
        }
        let failed = failed.lock().unwrap().clone();
        ChurnReport {
            windows,
            completed: completed.load(Ordering::Relaxed),
            slow: slow.load(Ordering::Relaxed),
            aborted: failed.total() >= self.max_failures,
            failed,
            elapsed_s: t0.elapsed().as_secs_f64(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Peer echo: the servers of `fwt-traffic from-port`

/// A TCP server in `ns` on `addr` for one connection: reads to EOF, answers with the peer
/// address it saw, `\n`, and every byte + 1, then closes. Returns once it listens; the
/// thread ends by itself (accept and reads time out), returning the peer.
pub fn peer_echo_tcp(ns: &Netns, addr: SocketAddr) -> Result<JoinHandle<std::io::Result<SocketAddr>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns.spawn(move || {
        let l = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        l.set_reuse_address(true)?;
        l.bind(&addr.into())?;
        l.listen(16)?;
        l.set_read_timeout(Some(Duration::from_secs(10)))?;
        let _ = tx.send(());
        let (s, peer) = l.accept()?;
        let peer = peer.as_socket().ok_or_else(|| std::io::Error::other("peer not IP"))?;
        let mut s = TcpStream::from(s);
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut data = Vec::new();
        s.read_to_end(&mut data)?;
        let mut reply = format!("{peer}\n").into_bytes();
        reply.extend(data.iter().map(|b| b.wrapping_add(1)));
        s.write_all(&reply)?;
        Ok(peer)
    })?;
    rx.recv_timeout(Duration::from_secs(5)).context("TCP peer echo did not start")?;
    Ok(h)
}

/// A UDP server in `ns` on `addr`: answers each datagram with the sender's address, `\n`
/// and every byte + 1, until 3 s pass without one. Returns once bound; the thread returns
/// the datagrams answered.
pub fn peer_echo_udp(ns: &Netns, addr: SocketAddr) -> Result<JoinHandle<std::io::Result<u64>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns.spawn(move || {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = tx.send(());
        let mut buf = [0u8; 2048];
        let mut answered = 0;
        loop {
            let (n, from) = match s.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(answered),
                Err(e) => return Err(e),
            };
            let mut reply = format!("{from}\n").into_bytes();
            reply.extend(buf[..n].iter().map(|b| b.wrapping_add(1)));
            s.send_to(&reply, from)?;
            answered += 1;
        }
    })?;
    rx.recv_timeout(Duration::from_secs(5)).context("UDP peer echo did not start")?;
    Ok(h)
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process killed (SIGKILL) and reaped on drop, e.g. hping3 or a `fwt-traffic`
/// client in a test cgroup (whose cgroup can only go once the process has).
pub struct ChildGuard {
    pub child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn new(what: &str, child: Child) -> Self {
        Self { child: Some(child), what: what.to_string() }
    }

    /// Waits for the process to exit by itself within `within`; returns its output
    /// (stdout must have been piped). Kills it if it does not.
    pub fn wait_output(mut self, within: Duration) -> Result<std::process::Output> {
        let mut child = self.child.take().context("already reaped")?;
        let deadline = Instant::now() + within;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(child.wait_with_output()?);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{} did not finish within {within:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process now; returns whether it was still running (had not died early).
    pub fn kill(mut self) -> Result<bool> {
        let mut child = self.child.take().context("already reaped")?;
        let running = child.try_wait()?.is_none();
        let _ = child.kill();
        child.wait()?;
        Ok(running)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ip -s -j link show dev DEV` in `ns`: the device's received packets.
pub fn rx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"].as_u64().with_context(|| format!("no rx packets of {dev}: {out}"))
}

/// The namespace's TCP and IP counters (`/proc/net/snmp` and `/proc/net/netstat`, e.g.
/// `Tcp:AttemptFails`, `TcpExt:PAWSActive`) that are not zero.
pub fn nonzero_net_counters(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let text = ns.sh("cat /proc/net/snmp /proc/net/netstat")?;
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((group, names)), Some((_, values))) = (names.split_once(": "), values.split_once(": ")) else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v @ 1..) = v.parse::<u64>() {
                out.insert(format!("{group}:{n}"), v);
            }
        }
    }
    Ok(out)
}

/// The namespace's conntrack statistics (`/proc/net/stat/nf_conntrack`, summed over CPUs)
/// that are not zero; empty without conntrack.
pub fn nonzero_conntrack_stats(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let text = ns.sh("cat /proc/net/stat/nf_conntrack 2>/dev/null || true")?;
    let mut lines = text.lines();
    let mut out = BTreeMap::new();
    let Some(head) = lines.next() else { return Ok(out) };
    let names: Vec<&str> = head.split_whitespace().collect();
    for l in lines {
        for (n, v) in names.iter().zip(l.split_whitespace()) {
            // "entries" is the same global figure on every line.
            if *n == "entries" {
                continue;
            }
            *out.entry(n.to_string()).or_default() += u64::from_str_radix(v, 16).unwrap_or(0);
        }
    }
    out.retain(|_, v| *v != 0);
    Ok(out)
}

/// Median of `xs` (the mean of the middle two for an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn tally_counts_by_kind_and_keeps_a_few_samples() {
        let mut t = Tally::default();
        for i in 0..20 {
            t.add(&Failed { kind: if i % 2 == 0 { Failure::Reset } else { Failure::Timeout }, what: "x".into() }, "id");
        }
        assert_eq!(t.total(), 20);
        assert_eq!(t.by_kind["reset"], 10);
        assert_eq!(t.samples.len(), Tally::SAMPLES);
    }
}
