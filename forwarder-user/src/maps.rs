//! From a validated config to map entries: forwards and peers (pure; `state` writes them).

use std::net::{IpAddr, SocketAddr};

use forwarder_common::{
    FAMILY_V4, FAMILY_V6, FWD_FLAG_ALLOW, FWD_FLAG_DENY, FWD_FLAG_HOST_BACKEND, FWD_FLAG_INGRESS, FWD_FLAG_LOCAL,
    FWD_FLAG_PORT_OFFSET, FwdKey, FwdMeta, FwdValue, HEALTH_TCP, HEALTH_UDP, HealthSpec, MAX_PORT_RANGES, PEER_DIRECT,
    PEER_FALLBACK, PeerKey, PeerValue, PortRanges, SNAT_AUTO, SNAT_FIXED, SNAT_OFF, SOURCE_KEY_FIXED_BITS, SourceKey,
    source_prefix_len,
};
use ipnet::IpNet;

use crate::config::{Forward, Health, HealthKind, Protocol, Snat};

pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

pub fn addr_from_bytes(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V6 { IpAddr::from(*bytes) } else { IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]) }
}

/// One forward as the kernel sees it: an id, its metadata, and one or more listen keys
/// (a wildcard listen address becomes one key per local address of its family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardEntries {
    pub id: u32,
    pub keys: Vec<FwdKey>,
    pub value: FwdValue,
    pub meta: FwdMeta,
}

/// The forward's one backend is on this host: a loopback address, or one of
/// `local_addrs` (several backends are never on this host: the config and apply refuse it).
pub fn backend_on_host(f: &Forward, local_addrs: &[IpAddr]) -> bool {
    f.single_backend().is_some_and(|b| b.ip().is_loopback() || local_addrs.contains(&b.ip()))
}

/// Interface traffic cannot reach this forward's backend: UDP to IPv6 loopback (`::1`).
/// A packet from an interface may not carry `::1` as its destination into the stack (RFC
/// 4291; `ip6_rcv_core` drops it), and a datagram socket bound there answers from `::1`,
/// so neither a rewrite nor an assignment to the socket can serve it. Such a forward serves
/// local programs only; its listen port is left to the host on interfaces.
pub fn unreachable_from_interfaces(f: &Forward) -> bool {
    f.protocol == Protocol::Udp && f.single_backend().is_some_and(|b| b.is_ipv6() && b.ip().is_loopback())
}

/// A peer's key in `FWD_PEERS`.
pub fn peer_key(addr: IpAddr) -> PeerKey {
    let (addr, family) = addr_bytes(addr);
    PeerKey { addr, family, _pad: [0; 3] }
}

/// A peer's value in `FWD_PEERS`.
pub fn peer_value(ifindex: u32, peer_id: u32, direct: bool) -> PeerValue {
    PeerValue { ifindex, peer_id, state: if direct { PEER_DIRECT } else { PEER_FALLBACK }, _pad: 0 }
}

/// A forward's health checks as `FWD_META_V2` holds them.
pub fn health_spec(h: Option<Health>) -> HealthSpec {
    match h {
        None => HealthSpec::default(),
        Some(h) => HealthSpec {
            kind: match h.kind {
                HealthKind::Tcp => HEALTH_TCP,
                HealthKind::Udp => HEALTH_UDP,
            },
            rise: h.rise,
            fall: h.fall,
            _pad: 0,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
        },
    }
}

/// The config form of stored health checks.
pub fn health_of(spec: &HealthSpec) -> Option<Health> {
    let kind = match spec.kind {
        HEALTH_TCP => HealthKind::Tcp,
        HEALTH_UDP => HealthKind::Udp,
        _ => return None,
    };
    Some(Health { kind, interval_ms: spec.interval_ms, timeout_ms: spec.timeout_ms, rise: spec.rise, fall: spec.fall })
}

pub fn key_for(proto: u8, listen: SocketAddr) -> FwdKey {
    let (addr, family) = addr_bytes(listen.ip());
    FwdKey { addr, port_be: listen.port().to_be(), proto, family }
}

/// Map entries for `forwards` with their ids. `local_addrs` are this host's addresses, used
/// to expand wildcard listen addresses; an address that another forward names explicitly
/// for the same protocol and port is left to that forward.
pub fn forward_entries(forwards: &[(u32, Forward)], local_addrs: &[IpAddr]) -> Vec<ForwardEntries> {
    let explicit: std::collections::HashSet<FwdKey> = forwards
        .iter()
        .filter(|(_, f)| !f.listen.ip().is_unspecified())
        .map(|(_, f)| key_for(f.protocol.number(), *f.listen))
        .collect();
    forwards
        .iter()
        .map(|(id, f)| {
            let id = *id;
            let proto = f.protocol.number();
            let keys = if f.listen.ip().is_unspecified() {
                local_addrs
                    .iter()
                    .filter(|a| a.is_ipv4() == f.listen.is_ipv4())
                    .map(|a| key_for(proto, SocketAddr::new(*a, f.listen.port())))
                    .filter(|k| !explicit.contains(k))
                    .collect()
            } else {
                vec![key_for(proto, *f.listen)]
            };
            // The first backend until the choice among the backends fills this in.
            let first = f.backends[0].address;
            let (backend_addr, family) = addr_bytes(first.ip());
            let (snat_mode, snat_addr) = match f.snat {
                Snat::Auto => (SNAT_AUTO, [0; 16]),
                Snat::Off => (SNAT_OFF, [0; 16]),
                Snat::Address(a) => (SNAT_FIXED, addr_bytes(a).0),
            };
            let flags = if unreachable_from_interfaces(f) { 0 } else { FWD_FLAG_INGRESS }
                | if f.local { FWD_FLAG_LOCAL } else { 0 }
                | if backend_on_host(f, local_addrs) { FWD_FLAG_HOST_BACKEND } else { 0 }
                | if f.allow.is_empty() { 0 } else { FWD_FLAG_ALLOW }
                | if f.deny.is_empty() { 0 } else { FWD_FLAG_DENY }
                | if first.is_range() { FWD_FLAG_PORT_OFFSET } else { 0 };
            let value = FwdValue {
                backend_addr,
                snat_addr,
                backend_port_be: first.port().to_be(),
                family,
                snat_mode,
                forward_id: id,
                flags,
                backend_index: 0,
                table_id: 0,
                port_span: f.listen.span,
                listen_port_be: f.listen.port().to_be(),
            };
            let mut name = [0u8; 48];
            let n = f.name.len().min(47);
            name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
            let meta = FwdMeta { name, key: key_for(proto, *f.listen), value, health: health_spec(f.health) };
            ForwardEntries { id, keys, value, meta }
        })
        .collect()
}

/// `FWD_PORT_RANGES` entries for the forwards' keys: the listen ranges of each address,
/// protocol and family (key with port 0), ascending. The config allows at most
/// [`MAX_PORT_RANGES`] to reach one address; more is an error here.
pub fn port_range_entries(entries: &[ForwardEntries]) -> Result<Vec<(FwdKey, PortRanges)>, String> {
    // Keyed by the listen address, protocol and family: the key with port 0.
    let mut by_address: std::collections::HashMap<FwdKey, Vec<(u16, u16)>> = Default::default();
    for e in entries.iter().filter(|e| e.value.port_span != 0) {
        for k in &e.keys {
            let first = u16::from_be(k.port_be);
            by_address.entry(FwdKey { port_be: 0, ..*k }).or_default().push((first, first + e.value.port_span));
        }
    }
    by_address
        .into_iter()
        .map(|(key, mut ranges)| {
            if ranges.len() > MAX_PORT_RANGES {
                return Err(format!(
                    "{} port ranges listen on {} (protocol {}): at most {MAX_PORT_RANGES}",
                    ranges.len(),
                    addr_from_bytes(&key.addr, key.family),
                    key.proto
                ));
            }
            ranges.sort_unstable();
            let mut value = PortRanges { count: ranges.len() as u32, ..Default::default() };
            for (i, (first, last)) in ranges.into_iter().enumerate() {
                (value.first[i], value.last[i]) = (first, last);
            }
            Ok((key, value))
        })
        .collect()
}

/// A source-list entry as the LPM tries `FWD_ALLOW` and `FWD_DENY` key it: the prefix
/// length (fixed part included) and the key data.
pub type SourceEntry = (u32, SourceKey);

/// The entry of prefix `net` in the lists of forward `id`.
pub fn source_entry(id: u32, net: &IpNet) -> SourceEntry {
    let (addr, family) = addr_bytes(net.addr());
    (source_prefix_len(u32::from(net.prefix_len())), SourceKey::new(id, family, addr))
}

/// The forward id and prefix of a stored entry (None for one no forwarder wrote).
pub fn source_of_entry(e: &SourceEntry) -> Option<(u32, IpNet)> {
    let (prefix_len, key) = e;
    let bits = u8::try_from(prefix_len.checked_sub(SOURCE_KEY_FIXED_BITS)?).ok()?;
    let net = IpNet::new(addr_from_bytes(&key.addr, key.family), bits).ok()?;
    Some((u32::from_be_bytes(key.forward_id_be), net))
}

/// The entries of every forward's allow list (`allow`) or deny list.
pub fn source_entries(forwards: &[(u32, Forward)], allow: bool) -> Vec<SourceEntry> {
    forwards
        .iter()
        .flat_map(|(id, f)| {
            let list = if allow { &f.allow } else { &f.deny };
            list.iter().map(move |net| source_entry(*id, net))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_hold_both_families() {
        let k4 = peer_key("198.51.100.20".parse().unwrap());
        assert_eq!((&k4.addr[..4], k4.family), (&[198, 51, 100, 20][..], forwarder_common::FAMILY_V4));
        let k6 = peer_key("2001:db8::20".parse().unwrap());
        assert_eq!((k6.addr[0], k6.addr[15], k6.family), (0x20, 0x20, forwarder_common::FAMILY_V6));
    }
    use crate::config::Config;

    #[test]
    fn wildcard_expands_to_local_ipv4_addresses_except_explicit_ones() {
        let cfg = Config::parse(
            r#"
[[forward]]
name = "any"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"
[[forward]]
name = "one"
protocol = "tcp"
listen = "192.0.2.1:3306"
backend = "203.0.113.21:3197"
snat = "off"
"#,
        )
        .unwrap();
        let locals: Vec<IpAddr> =
            vec!["127.0.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let with_ids: Vec<_> = cfg.forwards.iter().cloned().enumerate().map(|(i, f)| (i as u32 + 1, f)).collect();
        let e = forward_entries(&with_ids, &locals);
        assert_eq!(e[0].id, 1);
        assert_eq!(e[0].keys, vec![key_for(6, "127.0.0.1:3306".parse().unwrap())]);
        assert_eq!(e[0].value.snat_mode, SNAT_AUTO);
        assert_eq!(e[0].value.backend_port_be, 3197u16.to_be());
        assert_eq!(&e[0].value.backend_addr[..4], &[203, 0, 113, 20]);
        assert_eq!(e[1].keys, vec![key_for(6, "192.0.2.1:3306".parse().unwrap())]);
        assert_eq!(e[1].value.snat_mode, SNAT_OFF);
        assert_eq!(&e[1].meta.name[..4], b"one\0");
        assert_eq!(e[0].value.flags, FWD_FLAG_INGRESS | FWD_FLAG_LOCAL, "a remote backend");
    }

    #[test]
    fn a_port_range_is_one_rule_per_address_and_a_range_entry() {
        let cfg = Config::parse(
            r#"
[[forward]]
name = "web"
protocol = "tcp"
listen = "0.0.0.0:8000-8099"
backend = "203.0.113.20:9000-9099"
[[forward]]
name = "low"
protocol = "tcp"
listen = "192.0.2.1:7000-7009"
backend = "203.0.113.20:9000"
[[forward]]
name = "one"
protocol = "tcp"
listen = "192.0.2.1:80"
backend = "203.0.113.20:80"
"#,
        )
        .unwrap();
        let locals: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()];
        let with_ids: Vec<_> = cfg.forwards.iter().cloned().enumerate().map(|(i, f)| (i as u32 + 1, f)).collect();
        let e = forward_entries(&with_ids, &locals);
        assert_eq!(e[0].keys.len(), 2, "one key per local address, not per port");
        assert_eq!(e[0].keys[1], key_for(6, "192.0.2.1:8000".parse().unwrap()));
        assert_eq!((e[0].value.port_span, e[0].value.listen_port_be), (99, 8000u16.to_be()));
        assert_ne!(e[0].value.flags & FWD_FLAG_PORT_OFFSET, 0, "a range backend keeps the offset");
        assert_eq!((e[1].value.port_span, e[1].value.flags & FWD_FLAG_PORT_OFFSET), (9, 0), "all to one port");
        assert_eq!(e[2].value.port_span, 0);
        let ranges = port_range_entries(&e).unwrap();
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        let (k, r) = ranges.iter().find(|(k, _)| k.addr[..4] == [192, 0, 2, 1]).unwrap();
        assert_eq!((k.port_be, k.proto, k.family), (0, 6, FAMILY_V4));
        assert_eq!((r.count, &r.first[..2], &r.last[..2]), (2, &[7000, 8000][..], &[7009, 8099][..]), "ascending");
        for (entries, (_, f)) in e.iter().zip(&with_ids) {
            assert_eq!(&crate::state::forward_of_meta(&entries.meta), f, "the stored form gives the forward back");
        }
        assert!(port_range_entries(&e[2..]).unwrap().is_empty());
    }

    #[test]
    fn backends_on_this_host_are_flagged() {
        let cfg = Config::parse(
            r#"
[[forward]]
name = "own"
protocol = "tcp"
listen = "0.0.0.0:3307"
backend = "192.0.2.1:3197"
[[forward]]
name = "lo"
protocol = "udp"
listen = "0.0.0.0:3307"
backend = "127.0.0.1:3197"
local = false
[[forward]]
name = "lo6-tcp"
protocol = "tcp"
listen = "[::]:3307"
backend = "[::1]:3197"
[[forward]]
name = "lo6-udp"
protocol = "udp"
listen = "[::]:3307"
backend = "[::1]:3197"
[[forward]]
name = "remote"
protocol = "tcp"
listen = "0.0.0.0:3308"
backend = "203.0.113.20:3197"
"#,
        )
        .unwrap();
        let locals: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()];
        let with_ids: Vec<_> = cfg.forwards.iter().cloned().enumerate().map(|(i, f)| (i as u32 + 1, f)).collect();
        let flags: Vec<u32> = forward_entries(&with_ids, &locals).iter().map(|e| e.value.flags).collect();
        let (i, l, h) = (FWD_FLAG_INGRESS, FWD_FLAG_LOCAL, FWD_FLAG_HOST_BACKEND);
        assert_eq!(flags, vec![i | l | h, i | h, i | l | h, l | h, i | l], "UDP to ::1 serves local programs only");
    }

    #[test]
    fn source_entries_key_forward_family_and_prefix() {
        let net = |s: &str| crate::config::parse_source_prefix(s).unwrap();
        let (len, key) = source_entry(7, &net("198.51.100.0/25"));
        assert_eq!(len, 40 + 25);
        assert_eq!((key.forward_id_be, key.family), ([0, 0, 0, 7], FAMILY_V4));
        assert_eq!(&key.addr[..5], &[198, 51, 100, 0, 0]);
        let (len, key) = source_entry(0x0102_0304, &net("2001:db8:1::/48"));
        assert_eq!((len, key.forward_id_be, key.family), (40 + 48, [1, 2, 3, 4], FAMILY_V6));
        for (id, s) in [(7, "198.51.100.66/32"), (9, "2001:db8:1::/48"), (1, "0.0.0.0/0")] {
            assert_eq!(source_of_entry(&source_entry(id, &net(s))), Some((id, net(s))));
        }
        assert_eq!(source_of_entry(&(39, SourceKey::default())), None, "shorter than the fixed part");
    }

    #[test]
    fn source_lists_set_their_flags() {
        let cfg = Config::parse(
            "[[forward]]\nname = \"a\"\nprotocol = \"tcp\"\nlisten = \"192.0.2.1:1\"\nbackend = \"203.0.113.2:1\"\n\
             allow = [\"198.51.100.0/25\"]\n\
             [[forward]]\nname = \"d\"\nprotocol = \"tcp\"\nlisten = \"192.0.2.1:2\"\nbackend = \"203.0.113.2:1\"\n\
             deny = [\"198.51.100.0/25\"]\n",
        )
        .unwrap();
        let with_ids: Vec<_> = cfg.forwards.iter().cloned().enumerate().map(|(i, f)| (i as u32 + 1, f)).collect();
        let e = forward_entries(&with_ids, &[]);
        assert_eq!(e[0].value.flags & (FWD_FLAG_ALLOW | FWD_FLAG_DENY), FWD_FLAG_ALLOW);
        assert_eq!(e[1].value.flags & (FWD_FLAG_ALLOW | FWD_FLAG_DENY), FWD_FLAG_DENY);
        assert_eq!(source_entries(&with_ids, true), vec![source_entry(1, &with_ids[0].1.allow[0])]);
        assert_eq!(source_entries(&with_ids, false), vec![source_entry(2, &with_ids[1].1.deny[0])]);
    }
}
