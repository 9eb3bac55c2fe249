//! The Prometheus text exposition (format 0.0.4) of `/metrics`, written by
//! `prometheus-client`. The figures are those of `forwarder stats` ([`Snapshot`]), read from
//! the pinned maps at each scrape, plus the daemon's own ([`DaemonFigures`]).
//!
//! Metric names, labels and types are a contract with dashboards and alerts: the golden
//! list in the tests below fails on any change. Counters are named here without their
//! `_total` suffix, which the encoder appends.

use std::path::Path;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::{
    DaemonCounters, DaemonFigures,
    counters::{self, BackendCounters, ForwardCounters, PeerCounters, Snapshot},
};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Reads the instance pinned at `pin` and writes its exposition.
pub fn render(pin: &Path, c: &DaemonCounters) -> crate::error::Result<String> {
    let snapshot = counters::read(pin)?;
    Ok(encode(snapshot, c.figures()))
}

/// The exposition of one snapshot and the daemon's figures.
pub fn encode(snapshot: Snapshot, daemon: DaemonFigures) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { snapshot, daemon }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    prometheus_text::encode(&mut out, &registry).expect("encoding into a String");
    out
}

/// One scrape's figures; a fresh registry holds it, so nothing is kept between scrapes.
#[derive(Debug)]
struct Scrape {
    snapshot: Snapshot,
    daemon: DaemonFigures,
}

type ForwardField = fn(&ForwardCounters) -> u64;
type PeerField = fn(&PeerCounters) -> u64;

const FORWARD_COUNTERS: [(&str, &str, ForwardField); 5] = [
    ("forwarder_forward_packets", "Packets rewritten for a forward, both directions.", |f| f.packets),
    ("forwarder_forward_bytes", "L3 bytes rewritten for a forward.", |f| f.bytes),
    ("forwarder_forward_new_connections", "Connections created from interface traffic.", |f| f.new_connections),
    ("forwarder_forward_local_connections", "Connections of local programs (cgroup hooks).", |f| f.local_connections),
    (
        "forwarder_forward_source_denied",
        "Packets of new connections the forward's allow/deny lists refused (dropped).",
        |f| f.source_denied,
    ),
];

type BackendField = fn(&BackendCounters) -> u64;

const BACKEND_COUNTERS: [(&str, &str, BackendField); 4] = [
    ("forwarder_backend_packets", "Packets of a backend's connections, both directions.", |b| b.packets),
    ("forwarder_backend_bytes", "L3 bytes of a backend's connections.", |b| b.bytes),
    ("forwarder_backend_new_connections", "Connections from interface traffic sent to a backend.", |b| {
        b.new_connections
    }),
    ("forwarder_backend_local_connections", "Connections of local programs sent to a backend.", |b| {
        b.local_connections
    }),
];

const PEER_COUNTERS: [(&str, &str, PeerField); 3] = [
    ("forwarder_peer_direct_packets", "Packets sent straight to a peer.", |p| p.direct_packets),
    ("forwarder_peer_direct_bytes", "Bytes sent straight to a peer.", |p| p.direct_bytes),
    ("forwarder_peer_fallback_packets", "Packets for a peer left to normal routing.", |p| p.fallback_packets),
];

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (s, d) = (&self.snapshot, &self.daemon);
        for (name, help, get) in FORWARD_COUNTERS {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for f in &s.forwards {
                let labels = [("forward", f.name.as_str()), ("protocol", f.protocol.as_str())];
                ConstCounter::new(get(f)).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, get) in BACKEND_COUNTERS {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for f in &s.forwards {
                for b in &f.backends {
                    let labels = [("forward", f.name.as_str()), ("backend", b.address.as_str())];
                    ConstCounter::new(get(b)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, get) in [
            ("forwarder_backend_up", "1 while a backend passes its health checks (always without checks).", {
                |b: &BackendCounters| u64::from(b.up)
            }
                as BackendField),
            (
                "forwarder_backend_established_connections",
                "A backend's established (TCP) or answered (UDP) connections.",
                { |b: &BackendCounters| b.established_connections },
            ),
            ("forwarder_backend_weight", "A backend's weight (0: drained).", |b: &BackendCounters| b.weight as u64),
        ] {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for f in &s.forwards {
                for b in &f.backends {
                    let labels = [("forward", f.name.as_str()), ("backend", b.address.as_str())];
                    ConstGauge::new(get(b)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = enc.encode_descriptor(
            "forwarder_packets",
            "Packets by what happened to them (reason code; kind forwarded|peer|icmp|passed|dropped; kind event counts connection-table events, not packets).",
            None,
            MetricType::Counter,
        )?;
        for r in &s.reasons {
            let labels = [("reason", r.reason), ("kind", r.kind)];
            ConstCounter::new(r.packets).encode(family.encode_family(&labels)?)?;
        }
        for (name, help, get) in PEER_COUNTERS {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &s.peers {
                ConstCounter::new(get(p)).encode(family.encode_family(&[("peer", p.address.as_str())])?)?;
            }
        }
        let mut family = enc.encode_descriptor(
            "forwarder_peer_direct",
            "1 while the peer answers its neighbour and gets traffic directly.",
            None,
            MetricType::Gauge,
        )?;
        for p in &s.peers {
            let direct = u64::from(p.state == "direct");
            ConstGauge::new(direct).encode(family.encode_family(&[("peer", p.address.as_str())])?)?;
        }
        gauge(
            &mut enc,
            "forwarder_conntrack_entries",
            "Entries in the connection table (two per connection).",
            d.ct_entries,
        )?;
        gauge(&mut enc, "forwarder_conntrack_capacity", "Size of the connection table.", d.ct_capacity)?;
        gauge(&mut enc, "forwarder_ready", "1 once the config is applied.", u64::from(d.ready))?;
        let fill = d.ct_entries as f64 / d.ct_capacity.max(1) as f64;
        gauge(&mut enc, "forwarder_conntrack_fill_ratio", "Connection table fill, 0 to 1.", fill)?;
        counter(
            &mut enc,
            "forwarder_conntrack_expired",
            "Connections removed after their idle timeout.",
            d.ct_expired,
        )?;
        counter(&mut enc, "forwarder_reloads", "Reloads attempted (SIGHUP or config file change).", d.reloads)?;
        counter(
            &mut enc,
            "forwarder_reload_failures",
            "Reloads refused; the running state stayed as it was.",
            d.reload_failures,
        )?;
        counter(
            &mut enc,
            "forwarder_route_changes",
            "Batches of route, neighbour, link or address changes that invalidated cached next hops.",
            d.route_changes,
        )?;
        counter(
            &mut enc,
            "forwarder_daemon_errors",
            "Errors of the daemon's own work (expiry, peer watch, status file), each logged; the daemon went on.",
            d.errors,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::counters::reason_counters;

    fn snapshot() -> Snapshot {
        Snapshot {
            daemon: "running",
            forwards: vec![ForwardCounters {
                id: 1,
                name: "web \"a\\b\"".into(),
                protocol: "tcp".into(),
                listen: "192.0.2.1:80".into(),
                backend: "203.0.113.20:8080".into(),
                snat: "auto".into(),
                local: true,
                packets: 11,
                bytes: 1500,
                new_connections: 3,
                local_connections: 1,
                source_denied: 5,
                backends: vec![BackendCounters {
                    address: "203.0.113.20:8080".into(),
                    weight: 1,
                    up: true,
                    state: "up",
                    packets: 11,
                    bytes: 1500,
                    new_connections: 3,
                    local_connections: 1,
                    established_connections: 2,
                }],
            }],
            peers: vec![PeerCounters {
                id: 1,
                address: "2001:db8::2".into(),
                interface: "eth1".into(),
                ifindex: 4,
                state: "direct",
                direct: true,
                direct_packets: 7,
                direct_bytes: 700,
                fallback_packets: 2,
                fallback_bytes: 200,
            }],
            reasons: reason_counters(u64::from),
        }
    }

    fn figures() -> DaemonFigures {
        DaemonFigures {
            ready: true,
            reloads: 4,
            reload_failures: 1,
            ct_expired: 9,
            ct_entries: 16,
            ct_capacity: 64,
            route_changes: 2,
            errors: 3,
        }
    }

    /// (name of the family's samples, type, label names) of every family, in order.
    fn families(text: &str) -> Vec<(String, String, Vec<String>)> {
        let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                out.push((name.into(), kind.into(), Vec::new()));
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let last = out.last_mut().unwrap();
                assert_eq!(name, last.0, "a sample outside its family: {line}");
                let labels: Vec<String> = line
                    .split_once('{')
                    .map(|(_, l)| l.split("\",").filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.into()).collect())
                    .unwrap_or_default();
                if last.2.is_empty() {
                    last.2 = labels;
                } else {
                    assert_eq!(last.2, labels, "{line}");
                }
            }
        }
        out
    }

    /// The contract with dashboards and alerts: names, types and label names stay.
    #[test]
    fn metric_names_types_and_labels_are_stable() {
        let golden: &[(&str, &str, &[&str])] = &[
            ("forwarder_forward_packets_total", "counter", &["forward", "protocol"]),
            ("forwarder_forward_bytes_total", "counter", &["forward", "protocol"]),
            ("forwarder_forward_new_connections_total", "counter", &["forward", "protocol"]),
            ("forwarder_forward_local_connections_total", "counter", &["forward", "protocol"]),
            ("forwarder_forward_source_denied_total", "counter", &["forward", "protocol"]),
            ("forwarder_backend_packets_total", "counter", &["forward", "backend"]),
            ("forwarder_backend_bytes_total", "counter", &["forward", "backend"]),
            ("forwarder_backend_new_connections_total", "counter", &["forward", "backend"]),
            ("forwarder_backend_local_connections_total", "counter", &["forward", "backend"]),
            ("forwarder_backend_up", "gauge", &["forward", "backend"]),
            ("forwarder_backend_established_connections", "gauge", &["forward", "backend"]),
            ("forwarder_backend_weight", "gauge", &["forward", "backend"]),
            ("forwarder_packets_total", "counter", &["reason", "kind"]),
            ("forwarder_peer_direct_packets_total", "counter", &["peer"]),
            ("forwarder_peer_direct_bytes_total", "counter", &["peer"]),
            ("forwarder_peer_fallback_packets_total", "counter", &["peer"]),
            ("forwarder_peer_direct", "gauge", &["peer"]),
            ("forwarder_conntrack_entries", "gauge", &[]),
            ("forwarder_conntrack_capacity", "gauge", &[]),
            ("forwarder_ready", "gauge", &[]),
            ("forwarder_conntrack_fill_ratio", "gauge", &[]),
            ("forwarder_conntrack_expired_total", "counter", &[]),
            ("forwarder_reloads_total", "counter", &[]),
            ("forwarder_reload_failures_total", "counter", &[]),
            ("forwarder_route_changes_total", "counter", &[]),
            ("forwarder_daemon_errors_total", "counter", &[]),
        ];
        let got = families(&encode(snapshot(), figures()));
        let got: Vec<(&str, &str, Vec<&str>)> =
            got.iter().map(|(n, t, l)| (n.as_str(), t.as_str(), l.iter().map(String::as_str).collect())).collect();
        let want: Vec<(&str, &str, Vec<&str>)> = golden.iter().map(|(n, t, l)| (*n, *t, l.to_vec())).collect();
        assert_eq!(got, want);
        assert!(CONTENT_TYPE.starts_with("text/plain; version=0.0.4"));
    }

    /// Values, label values (escaped), one sample per reason with `Reason::kind()`'s kind.
    #[test]
    fn samples_carry_the_snapshot() {
        let text = encode(snapshot(), figures());
        for line in [
            r#"forwarder_forward_packets_total{forward="web \"a\\b\"",protocol="tcp"} 11"#,
            r#"forwarder_forward_bytes_total{forward="web \"a\\b\"",protocol="tcp"} 1500"#,
            r#"forwarder_forward_new_connections_total{forward="web \"a\\b\"",protocol="tcp"} 3"#,
            r#"forwarder_forward_local_connections_total{forward="web \"a\\b\"",protocol="tcp"} 1"#,
            r#"forwarder_forward_source_denied_total{forward="web \"a\\b\"",protocol="tcp"} 5"#,
            r#"forwarder_peer_direct_packets_total{peer="2001:db8::2"} 7"#,
            r#"forwarder_peer_direct_bytes_total{peer="2001:db8::2"} 700"#,
            r#"forwarder_peer_fallback_packets_total{peer="2001:db8::2"} 2"#,
            r#"forwarder_peer_direct{peer="2001:db8::2"} 1"#,
            "forwarder_conntrack_entries 16",
            "forwarder_conntrack_capacity 64",
            "forwarder_ready 1",
            "forwarder_conntrack_fill_ratio 0.25",
            "forwarder_conntrack_expired_total 9",
            "forwarder_reloads_total 4",
            "forwarder_reload_failures_total 1",
            "forwarder_route_changes_total 2",
            "forwarder_daemon_errors_total 3",
            "# HELP forwarder_ready 1 once the config is applied.",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        for r in forwarder_common::ALL_REASONS {
            let line = format!(r#"forwarder_packets_total{{reason="{}",kind="{}"}} {}"#, r.name(), r.kind(), r as u32);
            assert!(text.lines().any(|l| l == line), "{line} missing");
        }
        assert!(text.contains(r#"reason="peer_direct",kind="peer""#));
        assert!(text.contains(r#"reason="icmp_translated",kind="icmp""#));
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }

    /// No forwards and no peers: the families are still declared, without samples.
    #[test]
    fn empty_instance() {
        let mut s = snapshot();
        s.forwards.clear();
        s.peers.clear();
        let text = encode(s, DaemonFigures::default());
        assert!(text.contains("# TYPE forwarder_forward_packets_total counter\n# HELP"));
        assert!(text.lines().any(|l| l == "forwarder_ready 0"));
        assert!(
            text.lines().any(|l| l == "forwarder_conntrack_fill_ratio 0.0" || l == "forwarder_conntrack_fill_ratio 0")
        );
    }
}
