//! Connection lifecycle end to end (issue 13): connection churn, thousands of sequential
//! connections, a spoofed SYN flood, the host's own connections from a forward's listen
//! port, local and forwarded churn at once, and a client reusing its source port.
//!
//! Each test runs its scenario twice, each time in a fresh client ─ router ─ server
//! sandbox (forwarder_tests::topo::Chain): first with iptables DNAT + MASQUERADE on the
//! router as the control, then with forwarder, and expects the same at the client's
//! sockets. The churn, whose rates are compared, has its arms take turns window by window. Figures are printed (`--nocapture`); every check is collected and the test fails
//! once at the end, naming all that did not hold.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use forwarder_tests::{
    Chain, Daemon,
    config::{forward, router_interfaces},
    netns::run_ok,
    topo::{ROUTER_CLIENT_ADDR, ROUTER_CLIENT_DEV, ROUTER_SERVER_ADDR, SERVER_ADDR},
    traffic::{
        Backend, ChildGuard, Churn, ChurnReport, Dialogue, Failed, Tally, Until, client_dialogue, connect, median,
        nonzero_conntrack_stats, nonzero_net_counters, one_connection, peer_echo_tcp, peer_echo_udp, rx_packets,
    },
};

const LISTEN_PORT: u16 = 3306;
const BACKEND_PORT: u16 = 3197;
/// The UDP forward of the host-port test.
const UDP_LISTEN_PORT: u16 = 5353;

/// The issue asks for 60 s of churn, in 5 s windows.
const CHURN_TIME: Duration = Duration::from_secs(60);
const CHURN_WINDOW: Duration = Duration::from_secs(5);
/// wrk -c32.
const CHURN_WORKERS: usize = 32;
/// Each forwarder window at least this share of the iptables median window.
const CHURN_MIN_SHARE: f64 = 0.9;

const SEQUENTIAL_CYCLES: u64 = 20_000;

const FLOOD_TIME: Duration = Duration::from_secs(30);
/// Legitimate connections start this long into the flood and spread over the rest of it.
const FLOOD_LEGIT_FROM: Duration = Duration::from_secs(10);
const FLOOD_LEGIT: usize = 100;
/// Right after the flood: 100 connections 20 ms apart (2 s).
const FLOOD_AFTER_GAP: Duration = Duration::from_millis(20);
const FLOOD_MIN_RATE: f64 = 3000.0;
/// hping3's gap between SYNs. hping3 sends far fewer than asked (it sleeps between
/// packets): on an idle 2-core machine u150 gave 3,800/s between two bare namespaces and
/// u50 5,200/s there, 8,300-9,000/s in this test. With u150 the iptables control reached
/// only 2,925/s once, its netfilter sharing the CPUs with hping3; u50 leaves room above
/// FLOOD_MIN_RATE for both arms.
const FLOOD_INTERVAL: &str = "u50";

const MIXED_TIME: Duration = Duration::from_secs(20);

/// The tests of this file take turns even when the harness runs them on parallel threads
/// (scripts/test.sh does): each measures rates or floods a link, and a neighbour's load on
/// a small machine would skew the comparison with its control.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next still runs.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Iptables,
    /// forwarder with XDP native on both interfaces (and TC).
    Forwarder,
    /// forwarder with TC programs only (`xdp = "off"`).
    ForwarderTc,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Iptables => "iptables",
            Via::Forwarder => "forwarder",
            Via::ForwarderTc => "forwarder-tc",
        })
    }
}

fn listen_addr() -> SocketAddr {
    format!("{ROUTER_CLIENT_ADDR}:{LISTEN_PORT}").parse().unwrap()
}

fn backend_addr() -> SocketAddr {
    format!("{SERVER_ADDR}:{BACKEND_PORT}").parse().unwrap()
}

/// A fresh sandbox whose router forwards tcp :3306 to the backend, by iptables or by
/// forwarder (and udp :5353 too when asked).
struct Sandbox {
    // Field order is drop order: the daemon stops before its namespaces go.
    daemon: Option<Daemon>,
    chain: Chain,
}

impl Sandbox {
    fn new(via: Via, udp: bool) -> Self {
        let chain = Chain::new().unwrap();
        let daemon = match via {
            Via::Iptables => {
                let mut rules = vec![
                    format!(
                        "-t nat -A PREROUTING -p tcp --dport {LISTEN_PORT} -j DNAT --to-destination {SERVER_ADDR}:{BACKEND_PORT}"
                    ),
                    "-t nat -A POSTROUTING -o rs -j MASQUERADE".to_string(),
                ];
                if udp {
                    rules.push(format!(
                        "-t nat -A PREROUTING -p udp --dport {UDP_LISTEN_PORT} -j DNAT --to-destination {SERVER_ADDR}:{BACKEND_PORT}"
                    ));
                }
                // Inside the router's namespace only (nsenter --net).
                for r in rules {
                    run_ok(chain.router.cmd("iptables").args(r.split(' '))).unwrap();
                }
                None
            }
            Via::Forwarder => Some(Daemon::start(&chain.router, &chain.tag, &forwarder_config(udp, "native")).unwrap()),
            Via::ForwarderTc => Some(Daemon::start(&chain.router, &chain.tag, &forwarder_config(udp, "off")).unwrap()),
        };
        Self { daemon, chain }
    }

    /// `fwt-traffic ARGS` in the router's namespace; with forwarder inside the daemon's
    /// cgroup, where its local-forward hooks see the program.
    fn router_program(&self, args: &[&str]) -> ChildGuard {
        let bin = env!("CARGO_BIN_EXE_fwt-traffic");
        let mut cmd = match &self.daemon {
            Some(d) => d.cgroup.command(&self.chain.router, bin).unwrap(),
            None => self.chain.router.cmd(bin),
        };
        let child = cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        ChildGuard::new(&format!("fwt-traffic {}", args[0]), child)
    }

    /// What explains a run's figures: the namespaces' TCP counters that tell lost and
    /// refused connections apart, the router's conntrack statistics, and the daemon's
    /// forwards and non-zero reasons.
    fn print_diagnostics(&self) {
        for (name, ns) in
            [("client", &self.chain.client), ("router", &self.chain.router), ("server", &self.chain.server)]
        {
            let counters = nonzero_net_counters(ns).unwrap_or_default();
            let shown: Vec<String> = counters
                .iter()
                .filter(|(k, _)| TELLING_COUNTERS.contains(&k.as_str()))
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!("    {name} tcp: {}", shown.join(", "));
        }
        let ct = nonzero_conntrack_stats(&self.chain.router).unwrap_or_default();
        if !ct.is_empty() {
            println!("    router conntrack: {ct:?}");
        }
        let Some(d) = &self.daemon else { return };
        match d.stats() {
            Ok(s) => {
                for f in s["forwards"].as_array().into_iter().flatten() {
                    println!(
                        "    forward {}: packets {} new_connections {} local_connections {}",
                        f["name"], f["packets"], f["new_connections"], f["local_connections"]
                    );
                }
                let reasons: Vec<String> = s["reasons"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["packets"].as_u64().unwrap_or(0) > 0)
                    .map(|r| format!("{} {}", r["reason"].as_str().unwrap_or("?"), r["packets"]))
                    .collect();
                println!("    reasons: {}", reasons.join(", "));
            }
            Err(e) => println!("    (no stats: {e})"),
        }
    }
}

/// The TCP counters printed after each run.
const TELLING_COUNTERS: &[&str] = &[
    "Tcp:ActiveOpens",
    "Tcp:PassiveOpens",
    "Tcp:AttemptFails",
    "Tcp:EstabResets",
    "Tcp:RetransSegs",
    "Tcp:OutRsts",
    "TcpExt:TCPSynRetrans",
    "TcpExt:PAWSActive",
    "TcpExt:PAWSEstab",
    "TcpExt:TWRecycled",
    "TcpExt:TCPTimeWaitOverflow",
    "TcpExt:ListenOverflows",
    "TcpExt:ListenDrops",
    "TcpExt:SyncookiesSent",
    "TcpExt:SyncookiesRecv",
    "TcpExt:SyncookiesFailed",
    "TcpExt:TCPReqQFullDoCookies",
    "TcpExt:TCPReqQFullDrop",
    "TcpExt:TCPChallengeACK",
    "TcpExt:TCPSYNChallenge",
    "TcpExt:TCPAbortOnData",
    "TcpExt:TCPAbortOnClose",
    "TcpExt:TCPAbortOnTimeout",
];

fn forwarder_config(udp: bool, xdp: &str) -> String {
    let backend = format!("{SERVER_ADDR}:{BACKEND_PORT}");
    let mut c = router_interfaces(xdp) + &forward("mysql", "tcp", format!("0.0.0.0:{LISTEN_PORT}"), &backend);
    c += "snat = \"auto\"\n";
    if udp {
        c += &forward("dns", "udp", format!("0.0.0.0:{UDP_LISTEN_PORT}"), &backend);
        c += "snat = \"auto\"\n";
    }
    c
}

/// Checks collected over a test; it fails once at the end with all that did not hold.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
        if !ok {
            self.0.push(what);
        }
    }

    /// A figure printed beside the checks but not asserted.
    fn note(&self, what: impl std::fmt::Display) {
        println!("  [info, not asserted] {what}");
    }

    fn finish(self) {
        assert!(self.0.is_empty(), "{} check(s) failed:\n  {}", self.0.len(), self.0.join("\n  "));
    }
}

fn parse_report(out: std::process::Output) -> ChurnReport {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fwt-traffic output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

// ---------------------------------------------------------------------------------------
// 1. Churn

/// The churn through each of `vias`, each in its own sandbox, taking turns one window at a
/// time (iptables, forwarder-tc, forwarder XDP native, then again) until each had
/// CHURN_TIME. A 2-core machine's speed drifts by a quarter over a minute; run one after
/// the other, a slow minute for one arm read as its defect (seen in CI: forwarder-tc at 85%
/// of the iptables minute before it, and at 120-150% in the runs around it). Taking turns,
/// each forwarder window is compared with the iptables windows right before and after
/// it, which met the same machine. Each sandbox keeps its state between its turns, so a
/// rate that falls as its tables fill still shows.
fn churn_interleaved(vias: &[Via]) -> Vec<ChurnReport> {
    let sandboxes: Vec<(Via, Sandbox, Backend)> = vias
        .iter()
        .map(|&via| {
            let sb = Sandbox::new(via, false);
            let backend = Backend::start(&sb.chain.server, backend_addr(), Dialogue::HttpClose, 4).unwrap();
            (via, sb, backend)
        })
        .collect();
    let turns = (CHURN_TIME.as_secs_f64() / CHURN_WINDOW.as_secs_f64()).round() as usize;
    let mut reports: Vec<ChurnReport> = vias.iter().map(|_| ChurnReport::default()).collect();
    for turn in 0..turns {
        for ((via, sb, _), total) in sandboxes.iter().zip(reports.iter_mut()) {
            let churn = Churn {
                to: listen_addr(),
                dialogue: Dialogue::HttpClose,
                workers: CHURN_WORKERS,
                until: Until::Elapsed { total: CHURN_WINDOW, window: CHURN_WINDOW },
                label: format!("churn-{via}-{turn}"),
                max_failures: u64::MAX,
            };
            let r = sb.chain.client.run(move || churn.run()).unwrap();
            total.windows.extend(&r.windows);
            total.completed += r.completed;
            total.slow += r.slow;
            total.failed.merge(&r.failed);
            total.elapsed_s += r.elapsed_s;
        }
    }
    for ((via, sb, backend), report) in sandboxes.iter().zip(&reports) {
        println!(
            "churn via {via}: {} completed in {:.1} s ({} slow), {}; backend served {}, backend errors: {}",
            report.completed,
            report.elapsed_s,
            report.slow,
            report.failed,
            backend.served(),
            backend.errors()
        );
        println!(
            "  per {} s window (connections/s): {}",
            CHURN_WINDOW.as_secs(),
            fmt_rates(&report.window_rates(CHURN_WINDOW))
        );
        sb.print_diagnostics();
    }
    reports
}

fn fmt_rates(rates: &[f64]) -> String {
    rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" ")
}

/// What forwarder window `i` is measured against: the mean of the control's windows that
/// ran right before (`i`) and right after (`i + 1`, the last has none) it.
fn control_around(control: &[f64], i: usize) -> f64 {
    let around = &control[i..control.len().min(i + 2)];
    around.iter().sum::<f64>() / around.len() as f64
}

/// 60 s of `Connection: close` churn from 32 clients (server closes first, as nginx does):
/// every 5 s window through forwarder at least 90% of the iptables windows around it,
/// and no failed connection either way.
///
/// Asserted with TC programs, the arrangement for veth interfaces like these. With XDP
/// native on veths every locally sent TCP segment is copied for XDP (veth_xdp_rcv_skb) and
/// then handed to TC for its pending checksum, which costs about a fifth of the churn rate
/// (issue 17, "TCP on veths"): that run must not fail a connection, and its rate is
/// printed beside the others.
#[test]
fn churn_connection_close() {
    let _turn = one_at_a_time();
    let [ipt, fwd, native]: [ChurnReport; 3] =
        churn_interleaved(&[Via::Iptables, Via::ForwarderTc, Via::Forwarder]).try_into().unwrap();
    let ipt_rates = ipt.window_rates(CHURN_WINDOW);
    let ipt_median = median(&ipt_rates);
    let mut c = Checks::default();
    c.check(ipt.failed.total() == 0, format!("iptables: no failed connection ({})", ipt.failed));
    c.check(ipt_median > 0.0, format!("iptables: median window {ipt_median:.0}/s"));
    c.check(fwd.failed.total() == 0, format!("forwarder-tc: no failed connection ({})", fwd.failed));
    c.check(native.failed.total() == 0, format!("forwarder XDP native: no failed connection ({})", native.failed));
    let fwd_rates = fwd.window_rates(CHURN_WINDOW);
    let windows = (CHURN_TIME.as_secs_f64() / CHURN_WINDOW.as_secs_f64()).round() as usize;
    c.check(fwd_rates.len() == windows, format!("forwarder-tc: {} of {windows} windows measured", fwd_rates.len()));
    c.check(ipt_rates.len() == windows, format!("iptables: {} of {windows} windows measured", ipt_rates.len()));
    for (i, r) in fwd_rates.iter().enumerate().take(ipt_rates.len()) {
        let control = control_around(&ipt_rates, i);
        let floor = CHURN_MIN_SHARE * control;
        c.check(
            *r >= floor,
            format!(
                "forwarder-tc window {i}: {r:.0}/s >= {floor:.0}/s ({:.0}% of iptables' {control:.0}/s around it; {:.0}%)",
                CHURN_MIN_SHARE * 100.0,
                100.0 * r / control.max(1.0),
            ),
        );
    }
    c.note(format!(
        "forwarder-tc median window {:.0}/s, {:.0}% of iptables' median {ipt_median:.0}/s",
        median(&fwd_rates),
        100.0 * median(&fwd_rates) / ipt_median.max(1.0)
    ));
    let native_median = median(&native.window_rates(CHURN_WINDOW));
    c.note(format!(
        "forwarder XDP native on veths: median window {native_median:.0}/s, {:.0}% of iptables (issue 17)",
        100.0 * native_median / ipt_median.max(1.0)
    ));
    c.finish();
}

// ---------------------------------------------------------------------------------------
// 2. Sequential

fn sequential_run(via: Via) -> ChurnReport {
    let sb = Sandbox::new(via, false);
    let backend = Backend::start(&sb.chain.server, backend_addr(), Dialogue::Mariadb, 1).unwrap();
    let churn = Churn {
        to: listen_addr(),
        dialogue: Dialogue::Mariadb,
        workers: 1,
        until: Until::Connections(SEQUENTIAL_CYCLES),
        label: format!("seq-{via}"),
        // A broken path would spend IO_TIMEOUT on each of 20,000 cycles.
        max_failures: 20,
    };
    let report = sb.chain.client.run(move || churn.run()).unwrap();
    println!(
        "sequential via {via}: {} of {SEQUENTIAL_CYCLES} cycles completed in {:.1} s ({:.0}/s, {} slow), {}{}; backend served {}, errors: {}",
        report.completed,
        report.elapsed_s,
        report.completed as f64 / report.elapsed_s,
        report.slow,
        report.failed,
        if report.aborted { " (stopped early)" } else { "" },
        backend.served(),
        backend.errors()
    );
    sb.print_diagnostics();
    report
}

/// 20,000 MariaDB-style cycles one after the other (server greets, client queries, client
/// says QUIT, server closes), every one completed.
#[test]
fn sequential_mariadb_cycles() {
    let _turn = one_at_a_time();
    let mut c = Checks::default();
    for via in [Via::Iptables, Via::Forwarder] {
        let r = sequential_run(via);
        c.check(
            r.completed == SEQUENTIAL_CYCLES && r.failed.total() == 0,
            format!("{via}: {} of {SEQUENTIAL_CYCLES} cycles completed, {}", r.completed, r.failed),
        );
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------
// 3. SYN flood

struct FloodReport {
    syn_rate: f64,
    hping_ran_throughout: bool,
    before: Result<(), Failed>,
    during_ok: usize,
    during: Tally,
    after_ok: usize,
    after: Tally,
}

/// Starts `n` legitimate connections from the client, the i-th at `start + i * gap` on
/// its own thread (so that slow failures do not hold up the schedule), each with its
/// answer read; the handle returns how many succeeded and what failed.
fn legit_connections(
    sb: &Sandbox,
    label: &str,
    n: usize,
    start: Instant,
    gap: Duration,
) -> std::thread::JoinHandle<(usize, Tally)> {
    let label = label.to_string();
    sb.chain
        .client
        .spawn(move || {
            let attempts: Vec<_> = (0..n)
                .map(|i| {
                    // Pacing a measurement, not waiting for readiness.
                    std::thread::sleep((start + gap * i as u32).saturating_duration_since(Instant::now()));
                    let id = format!("{label}-{i}");
                    // Threads started here share this thread's namespace.
                    std::thread::spawn(move || (one_connection(listen_addr(), Dialogue::HttpClose, &id, None), id))
                })
                .collect();
            let mut tally = Tally::default();
            let mut ok = 0;
            for a in attempts {
                match a.join().expect("legitimate connection thread") {
                    (Ok(()), _) => ok += 1,
                    (Err(f), id) => tally.add(&f, &id),
                }
            }
            (ok, tally)
        })
        .unwrap()
}

fn flood_run(via: Via) -> FloodReport {
    let sb = Sandbox::new(via, false);
    // Replies to the spoofed sources must not leave the sandbox: the router has no route
    // but its two /24s, and this blackhole drops the rest silently (no ICMP either).
    sb.chain.router.ip(&["route", "add", "blackhole", "default"]).unwrap();
    let backend = Backend::start(&sb.chain.server, backend_addr(), Dialogue::HttpClose, 2).unwrap();
    let before = sb.chain.client.run(|| one_connection(listen_addr(), Dialogue::HttpClose, "before", None)).unwrap();

    let rx0 = rx_packets(&sb.chain.router, ROUTER_CLIENT_DEV).unwrap();
    let t0 = Instant::now();
    // Spoofed SYNs from random sources, sent by the client namespace to the router only
    // (the listen address is on the client's own link).
    let hping = ChildGuard::new(
        "hping3",
        sb.chain
            .client
            .cmd("hping3")
            .args([
                "-S",
                "--rand-source",
                "-p",
                &LISTEN_PORT.to_string(),
                "-i",
                FLOOD_INTERVAL,
                "-q",
                ROUTER_CLIENT_ADDR,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hping3 (scripts/setup.sh installs it)"),
    );
    let gap = (FLOOD_TIME - FLOOD_LEGIT_FROM) / FLOOD_LEGIT as u32;
    let during = legit_connections(&sb, "during", FLOOD_LEGIT, t0 + FLOOD_LEGIT_FROM, gap);
    // The flood's length, measured.
    std::thread::sleep((t0 + FLOOD_TIME).saturating_duration_since(Instant::now()));
    let rx1 = rx_packets(&sb.chain.router, ROUTER_CLIENT_DEV).unwrap();
    let flood_secs = t0.elapsed().as_secs_f64();
    let hping_ran_throughout = hping.kill().unwrap();
    let ct_entries = sb.chain.router.sh("cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || true").unwrap();
    // The legitimate connections' own packets (about 10 each) are a rounding error here.
    let syn_rate = (rx1 - rx0) as f64 / flood_secs;
    // The last ones started just before the end; they finish within IO_TIMEOUTs.
    let (during_ok, during) = during.join().unwrap();

    let (after_ok, after) =
        legit_connections(&sb, "after", FLOOD_LEGIT, Instant::now(), FLOOD_AFTER_GAP).join().unwrap();
    println!(
        "syn flood via {via}: {syn_rate:.0} packets/s into the router for {flood_secs:.1} s; before: {}; \
         during: {during_ok}/{FLOOD_LEGIT} ({during}); after: {after_ok}/{FLOOD_LEGIT} ({after}); backend served {}; \
         router conntrack entries at the flood's end: {}",
        if before.is_ok() { "ok".to_string() } else { format!("{before:?}") },
        backend.served(),
        ct_entries.trim()
    );
    sb.print_diagnostics();
    FloodReport { syn_rate, hping_ran_throughout, before, during_ok, during, after_ok, after }
}

/// A spoofed SYN flood (hping3 --rand-source, >= 3,000 SYN/s for 30 s) toward the listen
/// port: 100 of 100 legitimate connections succeed during it (from 10 s on) and right
/// after it through forwarder.
///
/// The iptables control's legitimate connections are printed, not asserted: at this rate
/// it fails too. Every spoofed SYN becomes a conntrack entry, unreplied for
/// nf_conntrack_tcp_timeout_syn_sent (120 s), and MASQUERADE gives each a port of the
/// router's address towards the one backend; once those ~64,000 ports are taken
/// (after about 16 s at 4,000 SYN/s) nf_nat has no tuple for new connections, legitimate
/// ones included, and drops them (conntrack `insert_failed`/`drop`), until the entries
/// expire two minutes later. (The issue's 1,000 SYN/s for 12 s stays far below that.)
#[test]
fn syn_flood_leaves_room_for_legitimate_connections() {
    let _turn = one_at_a_time();
    let mut c = Checks::default();
    for via in [Via::Iptables, Via::Forwarder] {
        let r = flood_run(via);
        c.check(r.hping_ran_throughout, format!("{via}: hping3 ran the whole flood"));
        c.check(r.syn_rate >= FLOOD_MIN_RATE, format!("{via}: flood of {:.0}/s >= {FLOOD_MIN_RATE:.0}/s", r.syn_rate));
        c.check(r.before.is_ok(), format!("{via}: a connection before the flood ({:?})", r.before.as_ref().err()));
        let during =
            format!("{via}: {}/{FLOOD_LEGIT} legitimate connections during the flood ({})", r.during_ok, r.during);
        let after =
            format!("{via}: {}/{FLOOD_LEGIT} legitimate connections right after the flood ({})", r.after_ok, r.after);
        match via {
            Via::Iptables => {
                c.note(during);
                c.note(after);
            }
            Via::Forwarder | Via::ForwarderTc => {
                c.check(r.during_ok == FLOOD_LEGIT, during);
                c.check(r.after_ok == FLOOD_LEGIT, after);
            }
        }
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------
// 4. The host's own connections from a listen port

/// What the router's own program saw: its local address and the address the server saw,
/// or an error.
fn from_port(sb: &Sandbox, proto: &str, port: u16, to: SocketAddr, bytes: usize) -> serde_json::Value {
    let out = sb
        .router_program(&["from-port", proto, &port.to_string(), &to.to_string(), &bytes.to_string()])
        .wait_output(Duration::from_secs(30))
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fwt-traffic output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

/// A program on the router binds local port 3306 (TCP) and 5353 (UDP), the listen ports of
/// forwards on 0.0.0.0, and talks to a server beyond the router: the server's answers
/// arrive at the router's address with those destination ports, and must reach the
/// program, not the forwards' backends. (With iptables, conntrack knows the connection is
/// the host's own and the PREROUTING DNAT does not apply to its replies.)
#[test]
fn host_connection_from_a_listen_port_is_untouched() {
    let _turn = one_at_a_time();
    let mut c = Checks::default();
    for via in [Via::Iptables, Via::Forwarder] {
        let sb = Sandbox::new(via, true);
        let tcp_server: SocketAddr = format!("{SERVER_ADDR}:3198").parse().unwrap();
        let udp_server: SocketAddr = format!("{SERVER_ADDR}:5400").parse().unwrap();
        let want_saw = |port: u16| format!("{ROUTER_SERVER_ADDR}:{port}");

        let server = peer_echo_tcp(&sb.chain.server, tcp_server).unwrap();
        // 200 kB each way: many segments with destination port 3306 come back.
        let r = from_port(&sb, "tcp", LISTEN_PORT, tcp_server, 200_000);
        let server_result = server.join().unwrap();
        println!("host tcp from :{LISTEN_PORT} via {via}: {r}; server: {server_result:?}");
        c.check(
            r["error"].is_null() && r["server_saw"] == want_saw(LISTEN_PORT),
            format!(
                "{via}: TCP from local port {LISTEN_PORT}, 200 kB both ways, server saw {}: {r}",
                want_saw(LISTEN_PORT)
            ),
        );

        let server = peer_echo_udp(&sb.chain.server, udp_server).unwrap();
        let r = from_port(&sb, "udp", UDP_LISTEN_PORT, udp_server, 20_000);
        let answered = server.join().unwrap();
        println!("host udp from :{UDP_LISTEN_PORT} via {via}: {r}; server answered {answered:?}");
        c.check(
            r["error"].is_null() && r["server_saw"] == want_saw(UDP_LISTEN_PORT),
            format!(
                "{via}: UDP from local port {UDP_LISTEN_PORT}, 20 datagrams echoed, server saw {}: {r}",
                want_saw(UDP_LISTEN_PORT)
            ),
        );

        // The forwards themselves still work beside the host's connections.
        let backend = Backend::start(&sb.chain.server, backend_addr(), Dialogue::HttpClose, 1).unwrap();
        let tcp =
            sb.chain.client.run(|| one_connection(listen_addr(), Dialogue::HttpClose, "forwarded", None)).unwrap();
        drop(backend);
        c.check(
            tcp.is_ok(),
            format!("{via}: a client's TCP connection through the forward on :{LISTEN_PORT} ({tcp:?})"),
        );
        let server = peer_echo_udp(&sb.chain.server, backend_addr()).unwrap();
        let udp = sb.chain.client.run(udp_through_forward).unwrap();
        let _ = server.join();
        c.check(
            udp.as_deref() == Ok(ROUTER_SERVER_ADDR),
            format!("{via}: a client's datagram through the forward on :{UDP_LISTEN_PORT} echoed, from {ROUTER_SERVER_ADDR} ({udp:?})"),
        );
        sb.print_diagnostics();
    }
    c.finish();
}

/// A datagram from the client to the UDP forward's listen address, answered by a peer
/// echo on the backend: the reply must come from the listen address; returns the address
/// (without port) the backend saw.
fn udp_through_forward() -> Result<String, String> {
    let to: SocketAddr = format!("{ROUTER_CLIENT_ADDR}:{UDP_LISTEN_PORT}").parse().unwrap();
    let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.send_to(b"q", to).map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let Some((saw, echo)) = reply.split_once('\n') else { return Err(format!("reply {reply:?}")) };
    if from != to || echo != "r" {
        return Err(format!("reply {reply:?} from {from}"));
    }
    Ok(saw.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or_default())
}

// ---------------------------------------------------------------------------------------
// 5. Local, forwarded and direct churn at once

fn mixed_run(via: Via) -> Vec<(&'static str, ChurnReport)> {
    let sb = Sandbox::new(via, false);
    let backend = Backend::start(&sb.chain.server, backend_addr(), Dialogue::HttpClose, 4).unwrap();
    let spec = |label: &str, to: SocketAddr, workers: usize| Churn {
        to,
        dialogue: Dialogue::HttpClose,
        workers,
        until: Until::Elapsed { total: MIXED_TIME, window: MIXED_TIME },
        label: format!("{label}-{via}"),
        max_failures: u64::MAX,
    };
    // From the router: straight to the backend (no forward involved) and, with forwarder,
    // to localhost:3306 through the local-forward hooks. iptables has no local part:
    // nat OUTPUT DNAT of 127.0.0.1 cannot leave the host (see the README).
    let mut programs = vec![("direct", spec("direct", backend_addr(), 4))];
    if via == Via::Forwarder {
        programs.push(("local", spec("local", format!("127.0.0.1:{LISTEN_PORT}").parse().unwrap(), 4)));
    }
    let running: Vec<(&str, ChildGuard)> = programs
        .iter()
        .map(|(kind, s)| (*kind, sb.router_program(&["churn", &serde_json::to_string(s).unwrap()])))
        .collect();
    let forwarded = spec("forwarded", listen_addr(), 8);
    let mut reports = vec![("forwarded", sb.chain.client.run(move || forwarded.run()).unwrap())];
    for (kind, p) in running {
        reports.push((kind, parse_report(p.wait_output(MIXED_TIME + Duration::from_secs(30)).unwrap())));
    }
    for (kind, r) in &reports {
        println!(
            "mixed via {via}, {kind}: {} completed ({:.0}/s, {} slow), {}",
            r.completed,
            r.completed as f64 / r.elapsed_s,
            r.slow,
            r.failed
        );
    }
    println!("  backend served {}, errors: {}", backend.served(), backend.errors());
    sb.print_diagnostics();
    reports
}

/// Forwarded clients churning through the forward, and at the same time programs on the
/// router churning to the same backend through localhost:3306 (local forward) and
/// directly: every connection gets its own answer (the backend echoes each connection's
/// id) and none fails through forwarder.
///
/// The iptables control must carry connections of every kind; its failures are printed,
/// not asserted. Its direct connections share the router's address and port space with
/// MASQUERADE, which the router's sockets do not see: a direct connection can pick a port
/// whose masqueraded connection the backend still holds in TIME_WAIT (the server closes
/// first), where a SYN with an older timestamp is refused (PAWS) — our reading of why the
/// control has dozens of slow connections per run (a retransmitted SYN) and, once in a
/// CI run (1 of 21,097), a direct one that ran out of its 5 s connect timeout. Forwarder's
/// arm had no slow connection in the same run.
#[test]
fn local_forwarded_and_direct_churn_at_once() {
    let _turn = one_at_a_time();
    let mut c = Checks::default();
    for via in [Via::Iptables, Via::Forwarder] {
        for (kind, r) in mixed_run(via) {
            let what = format!("{via}, {kind}: {} connections with their own answers, {}", r.completed, r.failed);
            match via {
                Via::Iptables => {
                    c.check(r.completed > 0, format!("{via}, {kind}: connections completed ({})", r.completed));
                    c.note(what);
                }
                Via::Forwarder | Via::ForwarderTc => c.check(r.completed > 0 && r.failed.total() == 0, what),
            }
        }
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------
// 6. Reopen from the same source port

/// How the client ends each connection (the server has closed first in both: a client
/// that closed first would hold its own TIME_WAIT and could not connect from the same
/// port to the same address again, with or without a router).
#[derive(Clone, Copy, Debug)]
enum ClientClose {
    /// close(): FIN.
    Fin,
    /// SO_LINGER 0: RST, as connection pools that abort do.
    Reset,
}

const REOPENS: usize = 5;

/// Waits (up to 2 s) until the socket's TCP state is CLOSE: its FIN answered.
fn wait_until_closed(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    const TCP_CLOSE: u8 = 7;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a tcp_info buffer of `len` bytes for the kernel to fill.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc != 0 || info.tcpi_state == TCP_CLOSE {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A client binds a fixed source port (SO_REUSEADDR), connects through the forward,
/// exchanges a request and answer, closes, and at once does it again from the same port,
/// several times in a row; with a FIN and with an RST close.
#[test]
fn reopen_from_the_same_source_port() {
    let _turn = one_at_a_time();
    let mut c = Checks::default();
    for via in [Via::Iptables, Via::Forwarder] {
        let sb = Sandbox::new(via, false);
        let _backend = Backend::start(&sb.chain.server, backend_addr(), Dialogue::HttpClose, 1).unwrap();
        for (close, port) in [(ClientClose::Fin, 30306u16), (ClientClose::Reset, 30307)] {
            let results = sb
                .chain
                .client
                .run(move || {
                    let from: SocketAddr = format!("{}:{port}", forwarder_tests::topo::CLIENT_ADDR).parse().unwrap();
                    (0..REOPENS)
                        .map(|i| {
                            let t = Instant::now();
                            let id = format!("reopen-{port}-{i}");
                            let s = connect(listen_addr(), Some(from))?;
                            client_dialogue(&s, Dialogue::HttpClose, &id)?;
                            if let ClientClose::Reset = close {
                                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).map_err(|e| Failed {
                                    kind: forwarder_tests::traffic::Failure::Other,
                                    what: e.to_string(),
                                })?;
                            } else {
                                // The server closed first; the client's own FIN is answered
                                // by the server's last ACK, and until then the client's
                                // kernel holds the tuple (LAST_ACK: connect from the same
                                // port fails with EADDRNOTAVAIL whatever the router). Wait
                                // for that ACK, not for the router.
                                let _ = s.shutdown(std::net::Shutdown::Write);
                                wait_until_closed(&s);
                            }
                            drop(s);
                            Ok::<Duration, Failed>(t.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap();
            let ok = results.iter().filter(|r| r.is_ok()).count();
            println!("reopen via {via}, {close:?} close, from port {port}: {results:?}");
            c.check(
                ok == REOPENS,
                format!(
                    "{via}: {ok}/{REOPENS} connections from source port {port} reopened at once after a {close:?} close; failures: {:?}",
                    results.iter().filter_map(|r| r.as_ref().err()).collect::<Vec<_>>()
                ),
            );
        }
        sb.print_diagnostics();
    }
    c.finish();
}
