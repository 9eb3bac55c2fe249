//! Output: results.json (everything, for machines), results.md (tables with ratios to
//! iptables and to the redirect-only ceiling) and chart.svg (packet rates).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};

use super::{ContenderResult, Figure, MANY_BACKENDS_FIGURES, Results, stats::ratio};

const REFERENCE: &str = "iptables";
const CEILING: &str = "redirect-only";
const README_START: &str = "<!-- bench:start (written by cargo xtask bench) -->";
const README_END: &str = "<!-- bench:end -->";

/// The figures of the headline table (README and the top of results.md).
const HEADLINE: [Figure; 13] = [
    Figure::UdpOneFlowPps,
    Figure::UdpManyFlowsPps,
    Figure::CpuNsPerPacketManyFlows,
    Figure::TcpBitsPerSecond,
    Figure::TcpVethDefaultsBitsPerSecond,
    Figure::LatencyP99Us,
    Figure::ConnectionsPerSecond,
    Figure::ChurnRequestsPerSecond,
    Figure::ChurnMinWindowRequestsPerSecond,
    Figure::ChurnFailedConnections,
    Figure::CpuUsPerConnection,
    Figure::NewFlowsPerSecond,
    Figure::CpuNsPerNewFlow,
];

pub fn write(results: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(results)? + "\n")?;
    std::fs::write(dir.join("results.md"), markdown(results))?;
    std::fs::write(dir.join("chart.svg"), chart(results))?;
    let m = &results.machine;
    std::fs::write(
        dir.join("machine.txt"),
        format!(
            "uname -r: {}\nnproc: {}\nCPU: {}\nload average before the run: {}\n",
            m.kernel, m.cpus, m.cpu_model, m.load_average_before
        ),
    )?;
    Ok(())
}

fn find<'a>(results: &'a Results, id: &str) -> Option<&'a ContenderResult> {
    results.contenders.iter().find(|c| c.id == id)
}

/// The reported value: the median over the repetitions, or for counts their total.
fn value(c: Option<&ContenderResult>, f: Figure) -> Option<f64> {
    c.and_then(|c| c.figures.get(&f)).map(|s| if f.is_count() { s.samples.iter().sum() } else { s.median })
}

fn fmt_value(f: Figure, v: f64) -> String {
    if f.is_count() || v == 0.0 {
        return format!("{v:.0}");
    }
    let v = v * f.scale();
    match v.abs() {
        x if x >= 100.0 => format!("{v:.0}"),
        x if x >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into())
}

/// A row per contender: each headline figure with its ratios to iptables and the ceiling.
pub fn headline_table(results: &Results) -> String {
    let mut t = String::from("| contender |");
    for f in HEADLINE {
        let _ = write!(t, " {} ({}) |", f.heading(), f.unit());
    }
    t.push_str("\n|---|");
    t.push_str(&"---:|".repeat(HEADLINE.len()));
    t.push('\n');
    let reference = find(results, REFERENCE);
    let ceiling = find(results, CEILING);
    for c in &results.contenders {
        let _ = write!(t, "| {} |", c.id);
        for f in HEADLINE {
            match value(Some(c), f) {
                // A count has no ratio: zero is the aim.
                Some(v) if f.is_count() => {
                    let _ = write!(t, " {} |", fmt_value(f, v));
                }
                Some(v) => {
                    let _ = write!(
                        t,
                        " {} ({} ipt, {} ceil) |",
                        fmt_value(f, v),
                        fmt_ratio(ratio(Some(v), value(reference, f))),
                        fmt_ratio(ratio(Some(v), value(ceiling, f)))
                    );
                }
                None => t.push_str(" n/a |"),
            }
        }
        t.push('\n');
    }
    t
}

fn full_table(results: &Results) -> String {
    let mut t = String::from("| figure | unit |");
    for c in &results.contenders {
        let _ = write!(t, " {} |", c.id);
    }
    t.push_str("\n|---|---|");
    t.push_str(&"---:|".repeat(results.contenders.len()));
    t.push('\n');
    for f in Figure::ALL {
        let _ = write!(t, "| {} | {} |", f.heading(), f.unit());
        for c in &results.contenders {
            match c.figures.get(&f) {
                Some(s) if f.is_count() => {
                    let total = fmt_value(f, s.samples.iter().sum());
                    if s.samples.len() > 1 && s.max > 0.0 {
                        let each: Vec<String> = s.samples.iter().map(|v| fmt_value(f, *v)).collect();
                        let _ = write!(t, " {total} ({}) |", each.join("+"));
                    } else {
                        let _ = write!(t, " {total} |");
                    }
                }
                Some(s) => {
                    let _ = write!(t, " {} ±{:.0}% |", fmt_value(f, s.median), s.spread() * 100.0);
                }
                None => t.push_str(" n/a |"),
            }
        }
        t.push('\n');
    }
    t
}

pub fn markdown(r: &Results) -> String {
    let mut md = String::from("# forwarder benchmark\n\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` ({} mode, {} repetitions, {:.0} s). Machine: {} CPUs, {}, kernel {}; load \
         average before the run: {}.\n",
        if r.plan.mode == "quick" { " --quick" } else { "" },
        r.plan.mode,
        r.plan.repetitions,
        r.seconds,
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.kernel,
        r.machine.load_average_before,
    );
    md.push_str(
        "Topology: client ─ veth ─ router ─ veth ─ server in network namespaces, a fresh one per contender and \
         repetition; contenders interleaved, order rotated per repetition. Values are medians; `±` is the largest \
         distance of a repetition from the median; counts (failed connections) are totals over every repetition. \
         Ratios: to iptables DNAT+SNAT (`ipt`) and to the redirect-only XDP ceiling (`ceil`); for CPU and latency, \
         lower is better, so a ratio below 1 is better.\n\n",
    );
    md.push_str("## Headline\n\n");
    md.push_str(&headline_table(r));
    md.push_str("\n## Every figure\n\n");
    md.push_str(&full_table(r));
    let _ = write!(
        md,
        "\nUDP: minimum-size frames (60 bytes) from the bench's own generator (BPF_PROG_TEST_RUN live frames, XDP_TX \
         on the client's veth, one thread), counted and dropped by an XDP sink on the server's veth; \"many flows\" = \
         {} source ports. The offered rate is what the generator injected; where delivered equals offered, the \
         generator (on the same 2 CPUs) was the limit and CPU time per packet is the figure that compares. CPU per \
         packet is the CPU time of the tasks that handle the packets (the generator thread, with the XDP, netfilter \
         and sink work that runs as softirq in its context; ksoftirqd; socat), per packet delivered: the \
         generator's own share is the same for everyone, so the differences are the router's. TCP: one iperf3 stream, {} s, \
         GRO off on the router's veths (on on the client's, as the UDP figures need). TCP, veth defaults: the same \
         stream on a topology of its own where no offload was changed in any namespace (the veths' GRO, GSO and TSO \
         as the kernel creates them) and no sink is attached (an XDP program on the server's veth would take GSO off \
         the router's); forwarder in XDP native mode keeps its default `redirect = \"auto\"` there, since the \
         client's veth neither runs XDP nor has GRO on. New flows: see below. Latency: {} request/responses of 32 \
         bytes on one connection. Connections: connect, one request/response, close, one after another for {} s, \
         with no cap on their number; a connection that fails is counted (`new TCP conn failed`) and the next one \
         tried. Churn: see below.\n",
        r.plan.many_flows, r.plan.iperf_seconds, r.plan.round_trips, r.plan.connect_seconds
    );
    for c in &r.contenders {
        if let Some(l) = c.limitation {
            let _ = writeln!(md, "\n- **{}**: {l}", c.id);
        }
        for e in &c.errors {
            let _ = writeln!(md, "\n- **{}**: {e}", c.id);
        }
    }
    md.push_str(&churn_section(r));
    md.push_str(&new_flows_section(r));
    md.push_str(&ipv6_section(r));
    md.push_str(&floors_section(r));
    md.push_str(&reasons_section(r));
    md.push_str(&many_backends_section(r));
    if let Some(s) = &r.scaling {
        let build = if r.plan.forwarder_release { "" } else { ", debug build of forwarder in quick mode" };
        let k = super::scaling::BACKENDS_PER_FORWARD;
        md.push_str(&format!("\n## Rule scaling\n\nTime to apply N forwards. forwarder: start-up of `forwarder run` with N forwards minus its start-up with the bench's own {} (the difference is parsing, validating and writing the maps){}; iptables-restore / nft -f: the command, one DNAT rule per forward plus one SNAT rule. With {k} backends: the same N forwards (but the bench's own) with {k} backends each on 203.0.113.0/24, a port per forward (`limits.max_backends` raised to hold them); iptables-restore with {k} DNAT rules per forward, netfilter's round robin (`statistic --mode nth`):\n\n", super::contenders::FORWARDS.len() + super::contenders::FORWARDS_V6, build));
        let _ = writeln!(
            md,
            "| forwards | forwarder | forwarder, {k} backends each | iptables-restore | iptables-restore, {k} nth rules \
             each | nft -f |\n|---:|---:|---:|---:|---:|---:|"
        );
        let seconds = |v: Option<f64>| v.map(|v| format!("{v:.3} s")).unwrap_or_else(|| "n/a".into());
        for a in &s.apply {
            let _ = writeln!(
                md,
                "| {} | {:.3} s | {} | {:.3} s | {} | {:.3} s |",
                a.forwards,
                a.forwarder_seconds,
                seconds(a.forwarder_backends_seconds),
                a.iptables_restore_seconds,
                seconds(a.iptables_restore_backends_seconds),
                a.nft_seconds
            );
        }
        let sizes = &r.plan.scaling_sizes;
        md.push_str(&scaling_table(
            "Delivered packet rate (many flows, Mpps) with N forwards installed, and its change from the smallest N",
            sizes,
            &s.packet_rate,
            1e-6,
        ));
        md.push_str(&scaling_table(
            "CPU time per delivered packet (many flows, ns) with N forwards installed",
            sizes,
            &s.cpu_ns_per_packet,
            1.0,
        ));
        for e in &s.errors {
            let _ = writeln!(md, "\n- {e}");
        }
    }
    if r.testrun.is_empty() {
        return md;
    }
    md.push_str(
        "\n## BPF_PROG_TEST_RUN\n\nNanoseconds per packet of the programs alone (UDP, 60 bytes), in a router \
         namespace with routes and neighbours. Single runs: the median of one-packet runs per path; they include \
         the timer's and the syscall's own cost and cold caches (the `timer floor` row is a near-empty program \
         measured the same way). `warm` rows: the marginal cost of one more run back to back on hot caches, from \
         pairs of BPF_PROG_TEST_RUN calls with `repeat` 50 and 250 (the difference of their totals over 200 \
         runs, so what each call pays once is left out), for paths whose output takes the same path again: no \
         match, and an identity forward (backend = listen, SNAT off) for established and reverse, whose rewrite \
         leaves the frame as it was but for TTL (255 in these frames) and MACs (the `IPv6` rows: the same over \
         IPv6, 80-byte frames, hop limit 255); the warm `timer floor` row is \
         the test-run loop's own cost per run, included in every warm row. `lookup + redirect`: the ceiling \
         plus one hash-map lookup that hits (40-byte key as forwarder's connection key, and 16-byte), the least \
         a forwarder with per-connection state does. An established packet takes the fast path (cached next \
         hop, verdict 4).\n\n\
         | program | path | ns/packet | verdict |\n|---|---|---:|---:|\n",
    );
    for t in &r.testrun {
        let _ = writeln!(md, "| {} | {} | {:.1} | {} |", t.program, t.path, t.ns_per_packet, t.verdict);
    }
    md
}

fn scaling_table(
    title: &str,
    sizes: &[usize],
    by_contender: &std::collections::BTreeMap<&'static str, std::collections::BTreeMap<usize, super::stats::Summary>>,
    scale: f64,
) -> String {
    let mut md = format!("\n{title}:\n\n| contender |");
    for n in sizes {
        let _ = write!(md, " {n} |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(sizes.len()));
    md.push('\n');
    for (id, by_n) in by_contender {
        let _ = write!(md, "| {id} |");
        let first = sizes.first().and_then(|n| by_n.get(n)).map(|s| s.median);
        for n in sizes {
            match by_n.get(n) {
                Some(v) => {
                    let change = ratio(Some(v.median), first).map(|q| (q - 1.0) * 100.0).unwrap_or(0.0);
                    let _ = write!(md, " {:.3} ({change:+.0}%) |", v.median * scale);
                }
                None => md.push_str(" n/a |"),
            }
        }
        md.push('\n');
    }
    md
}

/// Horizontal bars of the delivered UDP rates, one group per contender.
pub fn chart(r: &Results) -> String {
    let series = [(Figure::UdpOneFlowPps, "#4e79a7"), (Figure::UdpManyFlowsPps, "#f28e2b")];
    let max = r
        .contenders
        .iter()
        .flat_map(|c| series.iter().filter_map(|(f, _)| value(Some(c), *f)))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let (label_w, bar_w, row_h, top) = (190.0, 480.0, 40.0, 50.0);
    let height = top + row_h * r.contenders.len() as f64 + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Delivered UDP packets/s (Mpps), 60-byte frames</text>\n\
         <rect x=\"{label_w}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{c1}\"/><text x=\"{l1}\" y=\"37\">1 flow</text>\n\
         <rect x=\"{l2}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{c2}\"/><text x=\"{l3}\" y=\"37\">{n} flows</text>\n",
        w = label_w + bar_w + 80.0,
        c1 = series[0].1,
        c2 = series[1].1,
        l1 = label_w + 14.0,
        l2 = label_w + 80.0,
        l3 = label_w + 94.0,
        n = r.plan.many_flows,
    );
    for (i, c) in r.contenders.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">{}</text>", y + 22.0, c.id);
        for (j, (f, color)) in series.iter().enumerate() {
            let v = value(Some(c), *f).unwrap_or(0.0);
            let by = y + 4.0 + j as f64 * 16.0;
            let w = bar_w * v / max;
            let _ = writeln!(
                svg,
                "<rect x=\"{label_w}\" y=\"{by}\" width=\"{w:.1}\" height=\"14\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{:.3}</text>",
                label_w + w + 4.0,
                by + 11.0,
                v * 1e-6
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Replaces the headline table between the README's bench markers (appending the section
/// when the markers are missing).
pub fn update_readme(r: &Results, readme: &Path) -> Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let section = format!(
        "{README_START}\n{}\n{}\nMachine: {} CPUs, {}, kernel {}; {} mode, {} repetitions. Full results, rule \
         scaling and BPF_PROG_TEST_RUN times: [docs/bench/results.md](docs/bench/results.md).\n{README_END}",
        headline_table(r),
        "Each cell: median (ratio to iptables, ratio to the redirect-only ceiling); failed connections: the total \
         over all repetitions. Churn: 32 clients, connect / request / response / server closes, requests/s per \
         window.",
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.kernel,
        r.plan.mode,
        r.plan.repetitions
    );
    let new = match (text.find(README_START), text.find(README_END)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &text[..a], &text[b + README_END.len()..]),
        _ => format!("{}\n\n## Benchmarks\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(readme, new)?;
    Ok(())
}

/// The connection-churn workload: windows, failures and CPU per connection.
fn churn_section(r: &Results) -> String {
    let mut md = String::new();
    if r.contenders.iter().all(|c| c.churn.is_empty()) {
        return md;
    }
    let _ = write!(
        md,
        "\n## Connection churn\n\n{} clients, each connecting, sending a 32-byte request, reading the 32-byte \
         response and the server's close (the server closes first, as HTTP with `Connection: close`), one \
         connection after another for {} s per repetition, on a forward of its own (its SNAT ports and \
         connection entries are not those of the sequential connections). Requests/s are counted per {} s \
         window: the median window and the worst one (median over the repetitions; `worst of all` is the \
         slowest window of any repetition). A connection that does not complete (no handshake, reset, or \
         no response or close within 3 s) is failed: every one is counted, by kind. CPU per connection is the \
         CPU time of the tasks that carry the connections (the client and server threads, with the router's \
         softirq work in their context; ksoftirqd; the contender's processes: socat and the children it \
         reaped, forwarder's daemon) per completed connection: both ends' own TCP work is in every figure, \
         and kernel routing's is that floor.\n\n\
         | contender | req/s, median window | worst window | worst of all | failed | failed by kind | CPU/connection \
         (µs) | completed |\n|---|---:|---:|---:|---:|---|---:|---:|\n",
        r.plan.churn_clients, r.plan.churn_seconds, r.plan.churn_window_seconds
    );
    for c in r.contenders.iter().filter(|c| !c.churn.is_empty()) {
        let runs: Vec<_> = c.churn.iter().map(|run| &run.run).collect();
        let worst = runs.iter().filter_map(|run| run.min_window()).min_by(f64::total_cmp);
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for run in &runs {
            for (k, n) in &run.failures {
                *kinds.entry(k).or_default() += n;
            }
        }
        let show = |f: Figure| value(Some(c), f).map(|v| fmt_value(f, v)).unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.id,
            show(Figure::ChurnRequestsPerSecond),
            show(Figure::ChurnMinWindowRequestsPerSecond),
            worst.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into()),
            runs.iter().map(|run| run.failed).sum::<u64>(),
            if kinds.is_empty() {
                "–".to_string()
            } else {
                kinds.iter().map(|(k, n)| format!("`{k}` {n}")).collect::<Vec<_>>().join(", ")
            },
            show(Figure::CpuUsPerConnection),
            runs.iter().map(|run| run.completed).sum::<u64>(),
        );
    }
    md.push_str(
        "\nRequests/s of every window (failed connections in brackets where there were any), per repetition:\n\n",
    );
    for c in r.contenders.iter().filter(|c| !c.churn.is_empty()) {
        for run in &c.churn {
            let windows: Vec<String> = run
                .run
                .windows
                .iter()
                .map(|w| {
                    if w.failed > 0 {
                        format!("{:.0} [{}]", w.requests_per_second, w.failed)
                    } else {
                        format!("{:.0}", w.requests_per_second)
                    }
                })
                .collect();
            let _ = writeln!(md, "- {} #{}: {}", c.id, run.repetition, windows.join(", "));
        }
    }
    let with_reasons: Vec<_> =
        r.contenders.iter().filter(|c| c.churn.iter().any(|run| !run.reasons.is_empty())).collect();
    if !with_reasons.is_empty() {
        md.push_str(
            "\nHow forwarder handled the churn's packets, from its reason counters over all repetitions \
             (`ports_exhausted` and `conntrack_full`: new connections refused, their packets dropped):\n\n\
             | contender | packets by reason |\n|---|---|\n",
        );
        for c in with_reasons {
            let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
            for run in &c.churn {
                for (k, n) in &run.reasons {
                    *counts.entry(k).or_default() += n;
                }
            }
            let _ = writeln!(md, "| {} | {} |", c.id, reason_shares(&counts));
        }
    }
    md
}

/// The many-backends workload beside the single-backend figures of the same run.
fn many_backends_section(r: &Results) -> String {
    let mut md = String::new();
    let Some(many) = &r.many_backends else { return md };
    let n = many.backends;
    let _ = write!(
        md,
        "\n## Many backends\n\nThe many-flows UDP workload ({} flows) with the UDP forward spread over {n} \
         backends: 203.0.113.20 and the {} addresses after it on the server's veth, where the sink counts (and drops) \
         every backend's frames as it counts the one backend's. forwarder: {n} backends of weight 1, chosen per new \
         flow by its Maglev table; iptables: one DNAT rule per backend with `statistic --mode nth`, netfilter's round \
         robin over new connections. Measured as the single-backend UDP figures, interleaved with them. Ratios: to \
         the same contender's single-backend figure of this run (`1 be`) and to iptables with the same {n} backends \
         (`ipt`); for CPU, lower is better. Flows per backend: new flows each backend took (forwarder's per-backend \
         counters; fewest–most over the {n}, per repetition).\n\n\
         | contender | delivered (Mpps) | offered (Mpps) | CPU/packet (ns) | flows per backend |\n|---|---:|---:|---:|---|\n",
        r.plan.many_flows,
        n.saturating_sub(1)
    );
    let iptables = many.contenders.iter().find(|c| c.id == REFERENCE);
    let of = |c: Option<&super::ManyBackendsContender>, f: Figure| c.and_then(|c| c.figures.get(&f)).map(|s| s.median);
    for c in &many.contenders {
        let _ = write!(md, "| {} ({n} backends) |", c.id);
        for f in MANY_BACKENDS_FIGURES {
            match of(Some(c), f) {
                Some(v) => {
                    let _ = write!(
                        md,
                        " {} ({} 1 be, {} ipt) |",
                        fmt_value(f, v),
                        fmt_ratio(ratio(Some(v), value(find(r, c.id), f))),
                        fmt_ratio(ratio(Some(v), of(iptables, f)))
                    );
                }
                None => md.push_str(" n/a |"),
            }
        }
        let spread: Vec<String> = c
            .flows_per_backend
            .iter()
            .map(|flows| {
                let (min, max) = (flows.iter().min().unwrap_or(&0), flows.iter().max().unwrap_or(&0));
                let carried = flows.iter().filter(|f| **f > 0).count();
                format!("{min}–{max} ({carried} of {} carried flows)", flows.len())
            })
            .collect();
        let _ = writeln!(md, " {} |", if spread.is_empty() { "–".to_string() } else { spread.join("; ") });
    }
    for c in &many.contenders {
        for e in &c.errors {
            let _ = writeln!(md, "\n- **{}** ({n} backends): {e}", c.id);
        }
    }
    md
}

/// The new-flows workload: what it does, and what could fill up in it.
fn new_flows_section(r: &Results) -> String {
    let mut md = String::new();
    let measured: Vec<_> =
        r.contenders.iter().filter(|c| c.figures.contains_key(&Figure::NewFlowsOfferedPerSecond)).collect();
    if measured.is_empty() {
        return md;
    }
    let (seconds, rounds) = (r.plan.new_flow_seconds, r.plan.new_flow_rounds);
    let budget = super::generator::SYN_BUDGET;
    let _ = write!(
        md,
        "\n## New flows\n\nThe router's cost of a new connection: the generator sends minimum-size TCP SYNs (60 \
         bytes, MSS option, valid IPv4 and TCP checksums) to the forward's listen address and port (the server's \
         for kernel routing and the redirect-only ceiling), in {rounds} rounds per repetition, each for at most {seconds} s or until {budget} are sent (fewer than the SNAT ports below, so the \
         figures are the cost of flows the router takes, not of running out of ports), with no warm-up, each \
         from a source (address, port) of its own: ports 1024–65535, then the same from the client subnet's next \
         address (192.0.2.2 to .254). Between rounds, outside the count, the contender's connection table is \
         emptied (`conntrack -F` in the router namespace; forwarder's table as `forwarder conntrack flush` \
         empties it) and the generator starts over, so every round's SYNs are new flows again; the figures are \
         over all rounds (one round lasts a fraction of a second, too short for the CPU time on its own). The server's XDP sink counts the SYNs that arrive and drops them, so none is \
         answered and every one is a new flow for conntrack or forwarder. `new flows/s delivered` is what the sink \
         counted per second, `new flows/s offered` what the generator sent, `new flows dropped` their difference \
         in frames (a total over the repetitions): SYNs lost on the way. `of them, refused by the router veth's \
         ring` counts those the client's veth could not hand to the router veth's receive ring (256 frames; \
         `tx_queue_*_xdp_xmit_errors` in `ethtool -S c0`): lost before the router saw them, when the \
         generator's XDP_TX filled the ring faster than the router's softirq work emptied it. `CPU/new flow` is measured as CPU per \
         packet is (the generator thread with the softirq work in its context, and ksoftirqd), per delivered SYN. \
         socat: n/a, its kernel answers each SYN itself, so no SYN reaches the server.\n",
    );
    let offered_most = measured
        .iter()
        .filter_map(|c| c.figures.get(&Figure::NewFlowsOfferedPerSecond))
        .map(|s| (s.max * seconds).min(budget as f64))
        .fold(0.0f64, f64::max);
    if let Some(t) = &r.connection_tables {
        let conntrack = t.nf_conntrack_max.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into());
        let forwarder_ports = t.forwarder_snat_ports.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into());
        let _ = write!(
            md,
            "\nWhat fills up: every SYN that gets through takes a connection entry, in forwarder's table \
             ({} entries by default) or conntrack's (`nf_conntrack_max` {conntrack} in the router namespace), and \
             under DNAT+SNAT a source port toward the one backend: {} for netfilter (1024–65535), \
             {forwarder_ports} for forwarder (the same range less the router's ephemeral ports, \
             `net.ipv4.ip_local_port_range`, which it leaves to the host's own sockets by default). The generator \
             sends {} distinct SYNs before one repeats. The most offered in one round of this run (the tables are emptied between rounds) was about \
             {:.0}",
            t.forwarder_entries, t.snat_ports, t.distinct_syns, offered_most
        );
        let mut full = Vec::new();
        if offered_most > t.forwarder_snat_ports.unwrap_or(t.snat_ports).min(t.snat_ports) as f64 {
            full.push(
                "more than the SNAT ports: once they are taken, the NAT contenders drop every further SYN \
                 (forwarder counts `ports_exhausted`; netfilter fails to insert the entry), so their delivered rate \
                 is capped near ports / duration and the drops are port exhaustion, not per-flow cost",
            );
        }
        let table = t.forwarder_entries.min(t.nf_conntrack_max.map_or(u32::MAX, |n| n.min(u32::MAX as u64) as u32));
        if offered_most > table as f64 {
            full.push(
                "more than a connection table holds: both sides then early-drop unassured entries (these SYNs' \
                 own) to make room, and may drop SYNs when they cannot",
            );
        }
        if full.is_empty() {
            md.push_str(": within every limit above.\n");
        } else {
            let _ = writeln!(md, ": {}.", full.join("; and "));
        }
    }
    md
}

/// IPv6 against IPv4 per contender: the UDP figures' ratios (CPU per packet: lower is
/// better, so IPv6 at most 1.10× IPv4 is "within 10%").
fn ipv6_section(r: &Results) -> String {
    let mut md = String::new();
    let pairs = [
        (Figure::CpuNsPerPacketOneFlow, Figure::CpuNsPerPacket6OneFlow),
        (Figure::CpuNsPerPacketManyFlows, Figure::CpuNsPerPacket6ManyFlows),
        (Figure::UdpOneFlowPps, Figure::Udp6OneFlowPps),
        (Figure::UdpManyFlowsPps, Figure::Udp6ManyFlowsPps),
    ];
    let measured: Vec<_> =
        r.contenders.iter().filter(|c| pairs.iter().any(|(_, v6)| c.figures.contains_key(v6))).collect();
    if measured.is_empty() {
        return md;
    }
    md.push_str(
        "\n## IPv6 against IPv4\n\nThe UDP workloads again over IPv6 (80-byte frames: the same payload behind a \
         40-byte header; forwarder's forward `[2001:db8:1::1]:7000` → `[2001:db8:2::20]:7001` with SNAT, ip6tables / \
         nft `ip6` DNAT + SNAT for the netfilter contenders), each figure as IPv6 (IPv4, IPv6 / IPv4). socat: not \
         measured.\n\n| contender |",
    );
    for (_, v6) in pairs {
        let _ = write!(md, " {} ({}) |", v6.heading(), v6.unit());
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(pairs.len()));
    md.push('\n');
    for c in measured {
        let _ = write!(md, "| {} |", c.id);
        for (v4, v6) in pairs {
            match (c.figures.get(&v4), c.figures.get(&v6)) {
                (Some(a), Some(b)) => {
                    let _ = write!(
                        md,
                        " {} ({}, {:.2}×) |",
                        fmt_value(v6, b.median),
                        fmt_value(v4, a.median),
                        b.median / a.median
                    );
                }
                (None, Some(b)) => {
                    let _ = write!(md, " {} |", fmt_value(v6, b.median));
                }
                _ => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

/// Each forwarder mode against the redirect-only program in the same place (its floor):
/// what the kernel's path costs with any program there, and what forwarder's adds.
const FLOORS: [(&str, &str); 3] = [
    ("forwarder-tc", "redirect-only-tc"),
    ("forwarder-xdp-generic", "redirect-only-generic"),
    ("forwarder-xdp-native", CEILING),
];

/// The CPU figures set against their floors.
const FLOOR_FIGURES: [Figure; 3] =
    [Figure::CpuNsPerPacketOneFlow, Figure::CpuNsPerPacketManyFlows, Figure::CpuNsPerNewFlow];

/// Forwarder's CPU figures over the floor of their mode, where both ran.
fn floors_section(r: &Results) -> String {
    let mut md = String::new();
    let reference = find(r, REFERENCE);
    for (ours, floor) in FLOORS {
        let (Some(o), Some(f)) = (find(r, ours), find(r, floor)) else { continue };
        if !FLOOR_FIGURES.iter().any(|&fig| value(Some(o), fig).is_some() && value(Some(f), fig).is_some()) {
            continue;
        }
        if md.is_empty() {
            md.push_str(
                "\n## Over each mode's floor\n\nEach forwarder mode beside the redirect-only program in the same \
                 place (two MAC addresses and a redirect: XDP native for native, the same program in generic XDP for \
                 generic, at TC ingress with `bpf_redirect_peer` for TC-only): the floor is what the kernel's path \
                 costs with any program there, its ratio to iptables the least any program in that mode reaches; \
                 `added` is forwarder's program (parsing, lookups, connection tracking, NAT). Each cell: forwarder \
                 (floor, floor / iptables, added).\n\n| mode |",
            );
            for fig in FLOOR_FIGURES {
                let _ = write!(md, " {} ({}) |", fig.heading(), fig.unit());
            }
            md.push_str("\n|---|");
            md.push_str(&"---:|".repeat(FLOOR_FIGURES.len()));
            md.push('\n');
        }
        let _ = write!(md, "| {ours} over {floor} |");
        for fig in FLOOR_FIGURES {
            match (value(Some(o), fig), value(Some(f), fig)) {
                (Some(a), Some(b)) => {
                    let to_ipt = value(reference, fig).map(|i| b / i);
                    let _ = write!(
                        md,
                        " {} ({}, {}, {:+.0}) |",
                        fmt_value(fig, a),
                        fmt_value(fig, b),
                        fmt_ratio(to_ipt),
                        (a - b) * fig.scale()
                    );
                }
                _ => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

/// How forwarder's packets left the router, from its reason counters.
fn reasons_section(r: &Results) -> String {
    let mut md = String::new();
    for c in r.contenders.iter().filter(|c| !c.reasons.is_empty()) {
        if md.is_empty() {
            md.push_str(
                "\n## How forwarder's packets left\n\nfrom its reason counters over all repetitions, for the UDP \
                 figures, the TCP figure with the veth defaults (both directions of the stream) and the new flows: \
                 `redirect_xdp_flow_cache` and `redirect_xdp_cached` are the fast path (flow cache, connection \
                 entry), `redirect_xdp` the full path with a FIB lookup, `xdp_to_tc` packets XDP left to the TC \
                 program (counted again under how TC sent them), `redirect_tc` and any `redirect_tc_…` the TC \
                 program's redirects; `ports_exhausted`, `conntrack_full` and `early_drop` are new connections \
                 refused or entries given up to make room. Every reason the daemon counted is listed, by its \
                 name.\n\n| contender | workload | packets by reason |\n|---|---|---|\n",
            );
        }
        for (workload, counts) in &c.reasons {
            let _ = writeln!(md, "| {} | {workload} | {} |", c.id, reason_shares(counts));
        }
    }
    md
}

/// `name N (share%)`, largest first; `–` when no counter rose.
fn reason_shares(counts: &BTreeMap<&'static str, u64>) -> String {
    if counts.is_empty() {
        return "–".into();
    }
    let total: u64 = counts.values().sum();
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(name, n)| format!("`{name}` {n} ({:.2}%)", **n as f64 * 100.0 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Machine, Plan, stats::Summary};

    fn results() -> Results {
        let contender = |id, pps: f64| ContenderResult {
            id,
            description: "",
            figures: BTreeMap::from([(Figure::UdpOneFlowPps, Summary::of(&[pps, pps * 1.1, pps * 0.9]).unwrap())]),
            errors: vec![],
            limitation: None,
            reasons: BTreeMap::new(),
            churn: vec![],
        };
        Results {
            machine: Machine {
                kernel: "6.18".into(),
                cpus: 2,
                cpu_model: "cpu".into(),
                load_average_before: "0".into(),
            },
            plan: Plan::quick(Some(1)),
            connection_tables: None,
            contenders: vec![
                contender("iptables", 1e6),
                contender("forwarder-xdp-native", 4e6),
                contender("redirect-only", 5e6),
            ],
            many_backends: None,
            scaling: None,
            testrun: vec![],
            seconds: 1.0,
        }
    }

    #[test]
    fn floors_section_sets_each_mode_against_its_floor() {
        let mut r = results();
        assert!(!markdown(&r).contains("## Over each mode's floor"), "no section without a floor's figures");
        let cpu = |c: &mut ContenderResult, v: f64| {
            c.figures.insert(Figure::CpuNsPerNewFlow, Summary::of(&[v]).unwrap());
        };
        cpu(&mut r.contenders[0], 3000.0);
        cpu(&mut r.contenders[1], 1200.0);
        cpu(&mut r.contenders[2], 300.0);
        let md = markdown(&r);
        assert!(md.contains("| forwarder-xdp-native over redirect-only | – | – | 1200 (300, 0.10×, +900) |"), "{md}");
        assert!(!md.contains("forwarder-tc over"), "{md}");
    }

    #[test]
    fn reasons_are_listed_largest_first_with_shares() {
        let counts =
            BTreeMap::from([("redirect_xdp", 1u64), ("redirect_xdp_cached", 9), ("redirect_xdp_flow_cache", 990)]);
        assert_eq!(
            reason_shares(&counts),
            "`redirect_xdp_flow_cache` 990 (99.00%), `redirect_xdp_cached` 9 (0.90%), `redirect_xdp` 1 (0.10%)"
        );
        let mut r = results();
        assert!(!markdown(&r).contains("How forwarder's packets left"), "no section without counts");
        r.contenders[1].reasons.insert("1 flow", counts);
        assert!(markdown(&r).contains("| forwarder-xdp-native | 1 flow | `redirect_xdp_flow_cache` 990 (99.00%)"));
    }

    #[test]
    fn ipv6_section_sets_each_figure_against_ipv4() {
        let mut r = results();
        assert!(!markdown(&r).contains("## IPv6 against IPv4"), "no section without IPv6 figures");
        let c = &mut r.contenders[1];
        c.figures.insert(Figure::CpuNsPerPacketManyFlows, Summary::of(&[200.0]).unwrap());
        c.figures.insert(Figure::CpuNsPerPacket6ManyFlows, Summary::of(&[230.0]).unwrap());
        c.figures.insert(Figure::Udp6OneFlowPps, Summary::of(&[3e6]).unwrap());
        let md = markdown(&r);
        assert!(md.contains("## IPv6 against IPv4"), "{md}");
        let row = md.lines().find(|l| l.starts_with("| forwarder-xdp-native |") && l.contains("1.15×")).unwrap();
        // CPU 1 flow: not measured; many flows 230 against 200; 1 flow 3.00 Mpps against 4.00.
        assert!(row.contains("| – | 230 (200, 1.15×) | 3.00 (4.00, 0.75×) | – |"), "{row}");
    }

    #[test]
    fn failures_are_totals_never_medians() {
        let mut r = results();
        let failed = Summary::of(&[0.0, 0.0, 7.0]).unwrap();
        r.contenders[1].figures.insert(Figure::ChurnFailedConnections, failed);
        let row = headline_table(&r).lines().find(|l| l.starts_with("| forwarder-xdp-native")).unwrap().to_string();
        assert!(row.contains("| 7 |"), "{row}");
        let full = full_table(&r);
        let row = full.lines().find(|l| l.starts_with("| churn failed conns")).unwrap();
        assert!(row.contains("7 (0+0+7)"), "{row}");
    }

    #[test]
    fn churn_section_lists_windows_failures_and_reasons() {
        use crate::bench::{
            ChurnRepetition,
            workloads::{Churn, ChurnWindow},
        };
        let mut r = results();
        assert!(!markdown(&r).contains("## Connection churn"), "no section without churn runs");
        let window = |rps: f64, failed| ChurnWindow { requests_per_second: rps, completed: rps as u64, failed };
        let run = Churn {
            window_seconds: 1.0,
            windows: vec![window(9000.0, 0), window(1000.0, 32), window(0.0, 0)],
            completed: 10_000,
            failed: 32,
            failures: BTreeMap::from([("connect_timeout", 32)]),
            cpu_us_per_connection: Some(50.0),
            server_errors: 0,
        };
        let reasons = BTreeMap::from([("ports_exhausted", 96u64), ("redirect_tc", 904)]);
        r.contenders[1].churn.push(ChurnRepetition { repetition: 1, run, reasons });
        let md = markdown(&r);
        assert!(md.contains("## Connection churn"));
        assert!(
            md.contains("| forwarder-xdp-native | n/a | n/a | 0 | 32 | `connect_timeout` 32 | n/a | 10000 |"),
            "{md}"
        );
        assert!(md.contains("- forwarder-xdp-native #1: 9000, 1000 [32], 0"), "{md}");
        assert!(md.contains("`ports_exhausted` 96 (9.60%)"), "{md}");
    }

    #[test]
    fn headline_has_ratios_to_iptables_and_ceiling() {
        let t = headline_table(&results());
        let row = t.lines().find(|l| l.starts_with("| forwarder-xdp-native")).unwrap();
        assert!(row.contains("4.00 (4.00× ipt, 0.80× ceil)"), "{row}");
        assert!(row.contains("n/a"), "figures not measured say so: {row}");
    }

    #[test]
    fn many_backends_have_ratios_to_one_backend_and_to_iptables() {
        use crate::bench::{ManyBackendsContender, ManyBackendsResult};
        let mut r = results();
        assert!(!markdown(&r).contains("## Many backends"), "no section without the workload");
        for (c, pps) in r.contenders.iter_mut().zip([1e6, 4e6, 5e6]) {
            c.figures.insert(Figure::UdpManyFlowsPps, Summary::of(&[pps]).unwrap());
        }
        let many = |id, pps: f64, flows: Vec<Vec<u64>>| ManyBackendsContender {
            id,
            description: "",
            figures: BTreeMap::from([(Figure::UdpManyFlowsPps, Summary::of(&[pps]).unwrap())]),
            errors: vec![],
            flows_per_backend: flows,
        };
        r.many_backends = Some(ManyBackendsResult {
            backends: 16,
            contenders: vec![
                many("iptables", 0.5e6, vec![]),
                many("forwarder-xdp-native", 3e6, vec![vec![10, 20, 15], vec![0, 30, 15]]),
            ],
        });
        let md = markdown(&r);
        assert!(md.contains("## Many backends"), "{md}");
        let row = md.lines().find(|l| l.starts_with("| forwarder-xdp-native (16 backends)")).unwrap();
        assert!(row.contains("| 3.00 (0.75× 1 be, 6.00× ipt) |"), "{row}");
        assert!(row.contains("| n/a |"), "figures not measured say so: {row}");
        assert!(row.contains("10–20 (3 of 3 carried flows); 0–30 (2 of 3 carried flows)"), "{row}");
        let row = md.lines().find(|l| l.starts_with("| iptables (16 backends)")).unwrap();
        assert!(row.contains("0.50 (0.50× 1 be, 1.00× ipt)") && row.ends_with(" – |"), "{row}");
    }

    #[test]
    fn rule_scaling_lists_several_backends_beside_one() {
        use crate::bench::{ScalingResult, scaling::ApplyTimes};
        let mut r = results();
        let apply = |forwards, backends: Option<f64>| ApplyTimes {
            forwards,
            forwarder_seconds: 0.5,
            iptables_restore_seconds: 9.0,
            nft_seconds: 5.0,
            backends_per_forward: 4,
            forwarder_backends_seconds: backends,
            iptables_restore_backends_seconds: None,
        };
        r.scaling = Some(ScalingResult {
            apply: vec![apply(1000, Some(0.25)), apply(100_000, None)],
            packet_rate: BTreeMap::new(),
            cpu_ns_per_packet: BTreeMap::new(),
            errors: vec![],
        });
        let md = markdown(&r);
        assert!(md.contains("| forwards | forwarder | forwarder, 4 backends each | iptables-restore |"), "{md}");
        assert!(md.contains("| 1000 | 0.500 s | 0.250 s | 9.000 s | n/a | 5.000 s |"), "{md}");
        assert!(md.contains("| 100000 | 0.500 s | n/a | 9.000 s | n/a | 5.000 s |"), "{md}");
    }

    #[test]
    fn readme_section_is_replaced_not_duplicated() {
        let dir = std::env::temp_dir().join(format!("bench-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        std::fs::write(&readme, "# x\n\ntext\n").unwrap();
        update_readme(&results(), &readme).unwrap();
        update_readme(&results(), &readme).unwrap();
        let text = std::fs::read_to_string(&readme).unwrap();
        assert_eq!(text.matches("## Benchmarks").count(), 1);
        assert_eq!(text.matches(README_START).count(), 1);
        assert!(text.starts_with("# x\n\ntext\n"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn chart_is_svg_with_a_bar_per_contender_and_flow_count() {
        let svg = chart(&results());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // One legend swatch starts at the bars' left edge, then two bars per contender.
        assert_eq!(svg.matches("<rect x=\"190\"").count(), 1 + 3 * 2);
    }
}
