//! Prometheus text exposition on /metrics, and /healthz, /readyz, served by the daemon on
//! `--metrics-addr` (loopback by default). The figures are those of `forwarder stats`, read
//! from the same pinned maps, plus the daemon's own counters.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{daemon::DaemonCounters, stats};

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

pub async fn serve(listener: tokio::net::TcpListener, pin: PathBuf, counters: Arc<DaemonCounters>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let (pin, counters) = (pin.clone(), counters.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (code, content_type, body) = match path {
                "/metrics" => match render(&pin, &counters) {
                    Ok(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
                    Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
                },
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if counters.ready.load(Ordering::SeqCst) => ("200 OK", "text/plain", "ready\n".to_string()),
                "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(pin: &Path, c: &DaemonCounters) -> crate::error::Result<String> {
    let s = stats::read(pin)?;
    let mut out = String::new();
    for (metric, help, get) in [
        (
            "forwarder_forward_packets_total",
            "Packets rewritten for a forward, both directions.",
            (|f: &stats::ForwardCounters| f.packets) as fn(&stats::ForwardCounters) -> u64,
        ),
        ("forwarder_forward_bytes_total", "L3 bytes rewritten for a forward.", |f| f.bytes),
        ("forwarder_forward_new_connections_total", "Connections created from interface traffic.", |f| {
            f.new_connections
        }),
        ("forwarder_forward_local_connections_total", "Connections of local programs (cgroup hooks).", |f| {
            f.local_connections
        }),
    ] {
        family(&mut out, metric, "counter", help);
        for f in &s.forwards {
            let _ = writeln!(out, "{metric}{{forward=\"{}\",protocol=\"{}\"}} {}", label(&f.name), f.protocol, get(f));
        }
    }
    family(
        &mut out,
        "forwarder_packets_total",
        "counter",
        "Packets by what happened to them (reason code; kind forwarded|peer|icmp|passed|dropped; kind event counts connection-table events, not packets).",
    );
    for r in &s.reasons {
        let _ = writeln!(out, "forwarder_packets_total{{reason=\"{}\",kind=\"{}\"}} {}", r.reason, r.kind, r.packets);
    }
    for (metric, help, get) in [
        (
            "forwarder_peer_direct_packets_total",
            "Packets sent straight to a peer.",
            (|p: &stats::PeerCounters| p.direct_packets) as fn(&stats::PeerCounters) -> u64,
        ),
        ("forwarder_peer_direct_bytes_total", "Bytes sent straight to a peer.", |p| p.direct_bytes),
        ("forwarder_peer_fallback_packets_total", "Packets for a peer left to normal routing.", |p| p.fallback_packets),
    ] {
        family(&mut out, metric, "counter", help);
        for p in &s.peers {
            let _ = writeln!(out, "{metric}{{peer=\"{}\"}} {}", p.address, get(p));
        }
    }
    family(
        &mut out,
        "forwarder_peer_direct",
        "gauge",
        "1 while the peer answers its neighbour and gets traffic directly.",
    );
    for p in &s.peers {
        let _ = writeln!(out, "forwarder_peer_direct{{peer=\"{}\"}} {}", p.address, u8::from(p.state == "direct"));
    }
    let gauges = [
        (
            "forwarder_conntrack_entries",
            "Entries in the connection table (two per connection).",
            c.ct_entries.load(Ordering::Relaxed),
        ),
        ("forwarder_conntrack_capacity", "Size of the connection table.", c.ct_capacity.load(Ordering::Relaxed)),
        ("forwarder_ready", "1 once the config is applied.", u64::from(c.ready.load(Ordering::Relaxed))),
    ];
    for (name, help, v) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    let fill = c.ct_entries.load(Ordering::Relaxed) as f64 / c.ct_capacity.load(Ordering::Relaxed).max(1) as f64;
    family(&mut out, "forwarder_conntrack_fill_ratio", "gauge", "Connection table fill, 0 to 1.");
    let _ = writeln!(out, "forwarder_conntrack_fill_ratio {fill}");
    for (name, help, v) in [
        (
            "forwarder_conntrack_expired_total",
            "Connections removed after their idle timeout.",
            c.ct_expired.load(Ordering::Relaxed),
        ),
        (
            "forwarder_reloads_total",
            "Reloads attempted (SIGHUP or config file change).",
            c.reloads.load(Ordering::Relaxed),
        ),
        (
            "forwarder_reload_failures_total",
            "Reloads refused; the running state stayed as it was.",
            c.reload_failures.load(Ordering::Relaxed),
        ),
        (
            "forwarder_route_changes_total",
            "Batches of route, neighbour, link or address changes that invalidated cached next hops.",
            c.route_changes.load(Ordering::Relaxed),
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    Ok(out)
}
