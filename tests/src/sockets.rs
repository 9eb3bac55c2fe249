//! Small TCP and UDP servers and clients the end-to-end tests share: each server binds in
//! a namespace and is returned only once it is bound (no test sleeps for a server), and
//! each client checks every byte it gets back.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};

use crate::netns::Netns;

/// Read timeout of the servers' and clients' connections: a lost path fails the test
/// instead of hanging it.
pub const IO_WAIT: Duration = Duration::from_secs(10);

/// Read and write timeout of the sink and its uploads (large transfers through a narrow
/// path take longer).
pub const UPLOAD_WAIT: Duration = Duration::from_secs(20);

/// Runs a server on a thread in `ns`: `bind` there, then `serve` with what it bound.
/// Returns once `bind` has succeeded (its error otherwise), so clients may start at once.
pub fn serve_in<S: Send + 'static, T: Send + 'static>(
    ns: &Netns,
    what: &str,
    bind: impl FnOnce() -> std::io::Result<S> + Send + 'static,
    serve: impl FnOnce(S) -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let (bound_tx, bound) = mpsc::channel();
    let h = ns.spawn(move || match bind() {
        Ok(socket) => {
            let _ = bound_tx.send(Ok(()));
            serve(socket)
        }
        Err(e) => {
            let _ = bound_tx.send(Err(e.to_string()));
            panic!("bind failed: {e}");
        }
    })?;
    bound
        .recv_timeout(Duration::from_secs(5))
        .with_context(|| format!("{what} did not start"))?
        .map_err(|e| anyhow!("{what}: {e}"))?;
    Ok(h)
}

/// A UDP socket bound to `addr` whose reads give up after `read_timeout` (how a server
/// knows no more datagrams come).
pub fn udp_bound(addr: impl ToSocketAddrs, read_timeout: Duration) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    s.set_read_timeout(Some(read_timeout))?;
    Ok(s)
}

/// A TCP echo server on `addr` for any number of connections, each echoed on a thread of
/// its own until the client closes; the receiver gets each connection's peer address (the
/// address the backend sees).
pub fn tcp_echo(ns: &Netns, addr: SocketAddr) -> Result<mpsc::Receiver<SocketAddr>> {
    let (peer_tx, peers) = mpsc::channel();
    serve_in(
        ns,
        "TCP echo",
        move || TcpListener::bind(addr),
        move |l| {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                if let Ok(peer) = s.peer_addr() {
                    let _ = peer_tx.send(peer);
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        },
    )?;
    Ok(peers)
}

/// A UDP echo server on `addr`: answers every datagram with itself, for the rest of the test.
pub fn udp_echo(ns: &Netns, addr: SocketAddr) -> Result<()> {
    serve_in(
        ns,
        "UDP echo",
        move || UdpSocket::bind(addr),
        |s| {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        },
    )?;
    Ok(())
}

/// An open connection to an echo server, to be exercised later (e.g. across a restart or
/// a flush).
pub struct EchoConn(pub TcpStream);

impl EchoConn {
    /// Connects from `ns` to `to`, giving up after `within`; reads wait up to 3 s.
    pub fn open_in(ns: &Netns, to: SocketAddr, within: Duration) -> std::io::Result<Self> {
        ns.run(move || {
            let s = TcpStream::connect_timeout(&to, within)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(EchoConn(s))
        })
        .map_err(std::io::Error::other)?
    }

    /// Sends `msg` and reads its echo; panics if the echo differs.
    pub fn ping(&mut self, msg: &[u8]) -> std::io::Result<()> {
        self.0.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        self.0.read_exact(&mut back)?;
        assert_eq!(back, msg, "echo");
        Ok(())
    }
}

/// `len` bytes of a pattern that differs from its own shifts, so that a lost, repeated or
/// reordered piece shows.
pub fn pattern_bytes(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| (i % 251) as u8).collect()
}

/// A TCP server for `conns` connections in turn: each sends a 4-byte big-endian length and
/// that many bytes, answered with every byte + 1 (so both directions are checked). Returns
/// the peers it saw.
pub fn plus_one_server(ns: &Netns, addr: SocketAddr, conns: usize) -> Result<JoinHandle<Vec<SocketAddr>>> {
    serve_in(
        ns,
        "TCP plus-one server",
        move || TcpListener::bind(addr),
        move |l| {
            let mut peers = Vec::new();
            for _ in 0..conns {
                let (mut s, peer) = l.accept().unwrap();
                s.set_read_timeout(Some(IO_WAIT)).unwrap();
                peers.push(peer);
                let mut len = [0u8; 4];
                s.read_exact(&mut len).unwrap();
                let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                s.read_exact(&mut buf).unwrap();
                let reply: Vec<u8> = buf.iter().map(|b| b.wrapping_add(1)).collect();
                s.write_all(&reply).unwrap();
            }
            peers
        },
    )
}

/// One exchange with a [`plus_one_server`] at `to` from the calling thread's namespace: `n`
/// pattern bytes out, each + 1 back. Panics naming what failed.
pub fn plus_one_exchange(to: SocketAddr, n: usize) {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect to the plus-one server");
    s.set_read_timeout(Some(IO_WAIT)).unwrap();
    assert_eq!(s.peer_addr().unwrap(), to, "the client sees only the address it dialled");
    let data = pattern_bytes(0, n);
    s.write_all(&(n as u32).to_be_bytes()).unwrap();
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; n];
    s.read_exact(&mut back).expect("the plus-one reply");
    assert!(back.iter().zip(&data).all(|(b, d)| *b == d.wrapping_add(1)), "reply bytes differ");
}

/// A TCP sink for `conns` connections in turn: reads each to EOF and answers the number of
/// bytes read (u64, big-endian). Returns each connection's peer and count.
pub fn tcp_sink(ns: &Netns, addr: SocketAddr, conns: usize) -> Result<JoinHandle<Vec<(SocketAddr, usize)>>> {
    serve_in(
        ns,
        "TCP sink",
        move || TcpListener::bind(addr),
        move |l| {
            let mut seen = Vec::new();
            for _ in 0..conns {
                let (mut s, peer) = l.accept().unwrap();
                s.set_read_timeout(Some(UPLOAD_WAIT)).unwrap();
                let (mut n, mut buf) = (0usize, vec![0u8; 65536]);
                loop {
                    let k = s.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                s.write_all(&(n as u64).to_be_bytes()).unwrap();
                seen.push((peer, n));
            }
            seen
        },
    )
}

/// Uploads `n` bytes to a [`tcp_sink`] at `to` from the calling thread's namespace and
/// half-closes; returns the count the sink answered, and the socket (for its options).
pub fn upload_to_sink(to: SocketAddr, n: usize) -> (usize, TcpStream) {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect to the sink");
    s.set_read_timeout(Some(UPLOAD_WAIT)).unwrap();
    s.set_write_timeout(Some(UPLOAD_WAIT)).unwrap();
    s.write_all(&vec![0x42u8; n]).expect("upload completes");
    s.shutdown(Shutdown::Write).unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).expect("the sink's count");
    (u64::from_be_bytes(count) as usize, s)
}

/// One TCP connection carrying [`pattern_bytes`] from a client to a server that checks
/// every byte, e.g. across a restart of the forwarder in between: the server panics on a
/// reset or a wrong byte, counts what it got, and answers the count once the client
/// half-closes.
pub struct PatternStream {
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    client: JoinHandle<(usize, usize)>,
    server: JoinHandle<usize>,
}

/// What a finished [`PatternStream`] carried.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamTotals {
    pub sent: usize,
    /// The count the server answered the client with.
    pub answered: usize,
    /// The count the server's thread ended with.
    pub received: usize,
}

impl PatternStream {
    /// The client in `client_ns` connects to `to`, which reaches the server listening on
    /// `listen` in `server_ns`, and sends 10,000 bytes every 5 ms (paced, so that the
    /// stream is still flowing while the test acts on the path) until `limit` bytes are
    /// sent or [`PatternStream::finish`] is called.
    pub fn start(
        server_ns: &Netns,
        listen: SocketAddr,
        client_ns: &Netns,
        to: SocketAddr,
        limit: Option<usize>,
    ) -> Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let counted = received.clone();
        let server = serve_in(
            server_ns,
            "pattern stream server",
            move || TcpListener::bind(listen),
            move |l| {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(IO_WAIT)).unwrap();
                let (mut got, mut buf) = (0usize, [0u8; 65536]);
                loop {
                    let n = s.read(&mut buf).expect("no reset while the stream flows");
                    if n == 0 {
                        break;
                    }
                    for (i, b) in buf[..n].iter().enumerate() {
                        assert_eq!(*b, ((got + i) % 251) as u8, "byte {} intact", got + i);
                    }
                    got += n;
                    counted.store(got, Ordering::Relaxed);
                }
                s.write_all(&(got as u64).to_be_bytes()).unwrap();
                got
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_client = stop.clone();
        let limit = limit.unwrap_or(usize::MAX);
        let client = client_ns.spawn(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect the stream");
            s.set_read_timeout(Some(IO_WAIT)).unwrap();
            let mut sent = 0usize;
            while sent < limit && !stop_client.load(Ordering::Relaxed) {
                let chunk = pattern_bytes(sent, 10_000.min(limit - sent));
                s.write_all(&chunk).expect("no reset while the stream flows");
                sent += chunk.len();
                // Pacing: the stream must last while the test restarts things.
                std::thread::sleep(Duration::from_millis(5));
            }
            s.shutdown(Shutdown::Write).unwrap();
            let mut count = [0u8; 8];
            s.read_exact(&mut count).expect("the server's count");
            (sent, u64::from_be_bytes(count) as usize)
        })?;
        Ok(Self { received, stop, client, server })
    }

    /// Bytes the server has checked so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until the server has checked `more` bytes beyond what it had now (the stream
    /// flows on this path), naming `what` if it does not within 10 s.
    pub fn wait_for_more(&self, more: usize, what: &str) {
        let from = self.received();
        crate::wait_for(what, Duration::from_secs(10), || self.received() >= from + more);
    }

    /// Waits until the server has checked `total` bytes (a stream with that limit has all
    /// arrived), naming `what` if it does not within 30 s.
    pub fn wait_for_total(&self, total: usize, what: &str) {
        crate::wait_for(what, Duration::from_secs(30), || self.received() >= total);
    }

    /// Stops the client (if it has not reached its limit), waits for both ends.
    pub fn finish(self) -> StreamTotals {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, answered) = self.client.join().expect("stream client");
        let received = self.server.join().expect("stream server");
        StreamTotals { sent, answered, received }
    }
}
