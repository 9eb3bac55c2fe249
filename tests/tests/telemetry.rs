//! The telemetry HTTP server: `/metrics`, `/healthz`, `/readyz` answered over HTTP/1.1 with
//! keep-alive, GET and HEAD only (405 otherwise), 404 for unknown paths; the exposition's
//! reason kinds agree with `forwarder stats --json`; `/readyz` follows readiness.
//!
//! No iptables control here: nothing of this exists in iptables; the server is exercised as
//! a client sees it, on the wire, inside the test's namespaces.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use forwarder::telemetry::{DaemonCounters, serve};
use forwarder_tests::{Chain, Daemon, Netns, topo::SERVER_ADDR, unique_tag, wait_for};

const ADDR: &str = "127.0.0.1:9464";

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One request on a kept-alive connection; the answer is read by its Content-Length (none
/// for HEAD), so the next request can follow on the same connection.
fn ask(conn: &mut BufReader<TcpStream>, method: &str, path: &str) -> Answer {
    write!(conn.get_mut(), "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 "), "status line {line:?}");
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        conn.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut a = Answer { status, headers, body: String::new() };
    if method != "HEAD" {
        let len: usize = a.header("content-length").expect("Content-Length").parse().unwrap();
        let mut body = vec![0; len];
        conn.read_exact(&mut body).unwrap();
        a.body = String::from_utf8(body).unwrap();
    }
    a
}

fn connect() -> BufReader<TcpStream> {
    let s = TcpStream::connect(ADDR).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

fn answers(ns: &Netns) -> bool {
    ns.run(|| TcpStream::connect(ADDR).is_ok()).unwrap()
}

fn config() -> String {
    format!(
        "[[interface]]\nname = \"rc\"\nxdp = \"native\"\n\n[[interface]]\nname = \"rs\"\nxdp = \"native\"\n\n\
         [[forward]]\nname = \"web\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:8080\"\nbackend = \"{SERVER_ADDR}:80\"\n"
    )
}

/// The daemon's server, on one kept-alive connection: GET of each endpoint, HEAD (head and
/// length only: the next answer on the connection parses), POST/PUT refused with 405 and
/// `Allow`, unknown paths 404; the exposition parses as Prometheus text and its reason
/// kinds are those of `forwarder stats --json`.
#[test]
fn daemon_endpoints_on_one_connection() {
    let chain = Chain::new().unwrap();
    let d = Daemon::start(&chain.router, &chain.tag, &config()).unwrap();
    wait_for("the metrics port", Duration::from_secs(10), || answers(&chain.router));
    let stats = d.stats().unwrap();
    let (metrics, head_len) = chain
        .router
        .run(|| {
            let mut c = connect();
            let health = ask(&mut c, "GET", "/healthz");
            assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
            let ready = ask(&mut c, "GET", "/readyz");
            assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
            let metrics = ask(&mut c, "GET", "/metrics");
            assert_eq!(metrics.status, 200);
            assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
            let head = ask(&mut c, "HEAD", "/metrics");
            assert_eq!(head.status, 200);
            let head_len: usize = head.header("content-length").expect("HEAD has the length").parse().unwrap();
            for method in ["POST", "PUT", "DELETE"] {
                let refused = ask(&mut c, method, "/metrics");
                assert_eq!(refused.status, 405, "{method}");
                assert_eq!(refused.header("allow"), Some("GET, HEAD"), "{method}");
            }
            let refused = ask(&mut c, "POST", "/readyz");
            assert_eq!(refused.status, 405);
            assert_eq!(ask(&mut c, "GET", "/nope").status, 404);
            assert_eq!(ask(&mut c, "GET", "/").status, 404);
            assert_eq!(ask(&mut c, "GET", "/metrics/x").status, 404);
            // Still the same connection: it answers after all of the above.
            assert_eq!(ask(&mut c, "GET", "/healthz").status, 200);
            (metrics.body, head_len)
        })
        .unwrap();
    // HEAD tells the length GET sends (the figures may move between the two reads, not
    // the set of lines: no traffic runs here).
    assert!(head_len.abs_diff(metrics.len()) < 64, "HEAD {head_len}, GET {}", metrics.len());
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).unwrap();
    let sample = |metric: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{metric} {label:?} missing"))
    };
    assert!(matches!(sample("forwarder_ready", None).value, prometheus_parse::Value::Gauge(1.0)));
    assert!(matches!(
        sample("forwarder_forward_packets_total", Some(("forward", "web"))).value,
        prometheus_parse::Value::Counter(_)
    ));
    for r in stats["reasons"].as_array().unwrap() {
        let (reason, kind) = (r["reason"].as_str().unwrap(), r["kind"].as_str().unwrap());
        let s = sample("forwarder_packets_total", Some(("reason", reason)));
        assert_eq!(s.labels.get("kind"), Some(kind), "{reason}");
    }
    let kind = |reason: &str| {
        stats["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == reason).unwrap()["kind"].clone()
    };
    assert_eq!(kind("peer_direct"), "peer");
    assert_eq!(kind("icmp_translated"), "icmp");
}

/// The server in this process, in its own namespace, for what the daemon does not let a
/// client see: `/readyz` is 503 until the config is applied, then 200 on the same
/// connection; `/metrics` without a pinned instance is a 500 that says why; a connection
/// that sends no request is closed.
#[test]
fn readyz_follows_readiness() {
    let tag = unique_tag();
    let ns = Netns::new(&format!("fwt-{tag}-t")).unwrap();
    let counters = Arc::new(DaemonCounters::default());
    let pin = PathBuf::from(format!("/sys/fs/bpf/fwt-{tag}-none"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_counters = counters.clone();
    let server = ns
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(ADDR).await.unwrap();
                tokio::select! {
                    _ = serve(listener, pin, server_counters) => {}
                    _ = stop_rx => {}
                }
            })
        })
        .unwrap();
    wait_for("the in-process server", Duration::from_secs(10), || answers(&ns));
    let after_ready = counters.clone();
    ns.run(move || {
        let mut c = connect();
        let before = ask(&mut c, "GET", "/readyz");
        assert_eq!((before.status, before.body.as_str()), (503, "not ready\n"));
        assert_eq!(ask(&mut c, "GET", "/healthz").status, 200);
        let metrics = ask(&mut c, "GET", "/metrics");
        assert_eq!(metrics.status, 500);
        assert!(!metrics.body.is_empty());
        after_ready.ready.store(true, Ordering::SeqCst);
        let after = ask(&mut c, "GET", "/readyz");
        assert_eq!((after.status, after.body.as_str()), (200, "ready\n"));
        assert_eq!(ask(&mut c, "HEAD", "/readyz").header("content-length"), Some("6"));

        // Silent client: closed by the server's header timeout (5 s), not held forever.
        let mut silent = TcpStream::connect(ADDR).unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 256];
        let n = silent.read(&mut buf).expect("the server closes an idle connection");
        assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"), "{:?}", &buf[..n]);
    })
    .unwrap();
    stop_tx.send(()).unwrap();
    server.join().unwrap();
}
