//! The TOML config: parsing, validation with errors that name the line and the field, and
//! the validated form the loader applies. Nothing here touches the system.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::Path,
};

use forwarder_common::conntrack::{
    TCP_CLOSE, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_LAST_ACK, TCP_NONE, TCP_STATES, TCP_SYN_RECV,
    TCP_SYN_SENT, TCP_SYN_SENT2, TCP_TIME_WAIT, Timeouts,
};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::error::ConfigError;

mod fast;

/// XDP attach mode of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// The default: native (falling back to generic) on devices whose traffic comes from
    /// the wire, none on a veth, where the TC program is faster: native XDP on a veth takes
    /// GSO from its peer, so a container's TCP is cut into MTU-sized packets, and locally
    /// sent segments (CHECKSUM_PARTIAL) are TC's to finish anyway (docs/bench/results.md).
    Auto,
    /// In the driver (fastest for frames from the wire or another XDP program).
    Native,
    /// In the kernel's generic (skb) path: works on every device.
    Generic,
    /// No XDP: the TC program does everything.
    Off,
}

/// How XDP may send frames *into* this interface when it is the egress of a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// XDP_REDIRECT unless the device is a veth, whose far end drops XDP frames unless it
    /// runs XDP or GRO itself (forwarder cannot see the far end): then TC redirects.
    #[default]
    Auto,
    /// Always XDP_REDIRECT (the operator knows the receiver takes XDP frames).
    Xdp,
    /// Never XDP_REDIRECT into it: TC redirect (bpf_redirect) instead.
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        })
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => forwarder_common::PROTO_TCP,
            Protocol::Udp => forwarder_common::PROTO_UDP,
        }
    }
}

/// Source rewrite of a forward. Written as in the config everywhere (CLI, JSON, text):
/// "auto", "off" or the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snat {
    Auto,
    Off,
    Address(IpAddr),
}

impl std::fmt::Display for Snat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Snat::Auto => f.pad("auto"),
            Snat::Off => f.pad("off"),
            Snat::Address(a) => a.fmt(f),
        }
    }
}

impl std::str::FromStr for Snat {
    type Err = String;
    /// "auto", "off" or a concrete address (its family is checked against the backend's by
    /// [`Forward::new`]).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Snat::Auto),
            "off" => Ok(Snat::Off),
            other => match other.parse::<IpAddr>() {
                Ok(a) if !a.is_unspecified() => Ok(Snat::Address(a)),
                _ => Err(format!("{other:?}: expected \"auto\", \"off\" or an address of the backend's family")),
            },
        }
    }
}

impl serde::Serialize for Snat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A value the config (or the CLI flag of the same name) rejects on its own: the field and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The key of the config (`name`, `listen`, ...), which is also the CLI flag's name.
    pub field: &'static str,
    /// For a key of one of a forward's backends: that backend's position.
    pub backend: Option<usize>,
    pub message: String,
}

fn field_err(field: &'static str, message: String) -> FieldError {
    FieldError { field, backend: None, message }
}

fn backend_err(index: usize, field: &'static str, message: String) -> FieldError {
    FieldError { field, backend: Some(index), message }
}

/// A forward's name: 1 to [`MAX_NAME_LEN`] bytes.
pub fn validate_forward_name(name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(field_err("name", format!("must be 1 to {MAX_NAME_LEN} bytes long")));
    }
    Ok(())
}

/// An address with one port, or a range of ports (`192.0.2.1:8000-8099`, `[2001:db8::1]:80`),
/// as `listen` and backend addresses are written. Dereferences to the address with the
/// first port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketRange {
    /// The address and the first port.
    pub addr: SocketAddr,
    /// Ports after the first: 0 for one port.
    pub span: u16,
}

impl SocketRange {
    pub fn last_port(&self) -> u16 {
        self.addr.port() + self.span
    }

    pub fn is_range(&self) -> bool {
        self.span != 0
    }

    /// The two share a port (whatever their addresses).
    pub fn ports_overlap(&self, other: &SocketRange) -> bool {
        self.addr.port() <= other.last_port() && other.addr.port() <= self.last_port()
    }
}

impl std::ops::Deref for SocketRange {
    type Target = SocketAddr;
    fn deref(&self) -> &SocketAddr {
        &self.addr
    }
}

impl From<SocketAddr> for SocketRange {
    fn from(addr: SocketAddr) -> Self {
        SocketRange { addr, span: 0 }
    }
}

impl std::fmt::Display for SocketRange {
    /// As written in the config: `address:port` or `address:first-last`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.span == 0 {
            return f.pad(&self.addr.to_string());
        }
        f.pad(&format!("{}-{}", self.addr, self.last_port()))
    }
}

impl std::str::FromStr for SocketRange {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let Some((host, ports)) = s.rsplit_once(':') else { return Err(()) };
        let Some((first, last)) = ports.split_once('-') else {
            return Ok(s.parse::<SocketAddr>().map_err(drop)?.into());
        };
        let addr: SocketAddr = format!("{host}:{first}").parse().map_err(drop)?;
        let last: u16 = last.parse().map_err(drop)?;
        let span = last.checked_sub(addr.port()).ok_or(())?;
        Ok(SocketRange { addr, span })
    }
}

impl serde::Serialize for SocketRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An `address:port` or `address:first-last` value of `field` (listen or backend).
pub fn parse_socket_range(field: &'static str, s: &str) -> Result<SocketRange, FieldError> {
    s.parse().map_err(|_| field_err(field, format!("{s:?} is not address:port or address:first-last")))
}

/// A peer's address: an IP address that can be a neighbour.
pub fn parse_peer_address(s: &str) -> Result<IpAddr, FieldError> {
    let address: IpAddr = s.parse().map_err(|_| field_err("address", format!("{s:?} is not an IP address")))?;
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
        return Err(field_err("address", format!("{address} cannot be a peer")));
    }
    Ok(address)
}

/// An interface name as the kernel accepts it.
pub fn validate_ifname(field: &'static str, name: &str) -> Result<(), FieldError> {
    if !valid_ifname(name) {
        return Err(field_err(field, format!("{name:?} is not a valid interface name")));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Interface {
    pub name: String,
    pub xdp: XdpMode,
    pub redirect: RedirectMode,
    /// The daemon starts and reloads while the device is missing, and attaches it when it
    /// appears (a PPP, VPN or container device); otherwise a missing device refuses the
    /// config.
    pub optional: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Forward {
    pub name: String,
    pub protocol: Protocol,
    pub listen: SocketRange,
    /// At least one; `backend = "a:p"` is one of weight 1.
    pub backends: Vec<Backend>,
    pub snat: Snat,
    pub local: bool,
    /// Sources that may use the forward (empty: every source), sorted, without repeats.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<IpNet>,
    /// Sources refused even when `allow` lists them, sorted, without repeats.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<IpNet>,
    /// Active health checks of the backends; None: every backend is taken as up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// One of a forward's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Backend {
    /// One port, or (with a listen range) a range of the same size.
    pub address: SocketRange,
    /// Relative share of new connections; 0 drains the backend (no new connections, its
    /// established ones stay).
    pub weight: u32,
}

/// Backends one forward may have.
pub const MAX_BACKENDS: usize = forwarder_common::MAX_BACKENDS_PER_FORWARD as usize;

/// How a backend's health is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect succeeds.
    Tcp,
    /// A probe datagram gets any answer (an ICMP port unreachable is a failure).
    Udp,
}

/// A forward's active health checks, run by the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    pub kind: HealthKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive successes for a down backend to come back.
    pub rise: u8,
    /// Consecutive failures for an up backend to be taken out.
    pub fall: u8,
}

impl Health {
    /// Checks as written in the config: `kind` (tcp | udp | none: None), `interval` and
    /// `timeout` in seconds, `rise` and `fall` (defaults 2 s, 1 s, 2, 2).
    pub fn new(
        kind: &str,
        interval: Option<f64>,
        timeout: Option<f64>,
        rise: Option<i64>,
        fall: Option<i64>,
    ) -> Result<Option<Self>, FieldError> {
        let kind = match kind {
            "tcp" => HealthKind::Tcp,
            "udp" => HealthKind::Udp,
            "none" => return Ok(None),
            other => return Err(field_err("kind", format!("{other:?}: expected \"tcp\", \"udp\" or \"none\""))),
        };
        let millis = |field: &'static str, v: Option<f64>, default: u32| match v {
            None => Ok(default),
            Some(s) if s.is_finite() && (0.01..=3600.0).contains(&s) => Ok((s * 1000.0).round() as u32),
            Some(s) => Err(field_err(field, format!("{s}: must be between 0.01 and 3600 seconds"))),
        };
        let count = |field: &'static str, v: Option<i64>| match v {
            None => Ok(2),
            Some(n) if (1..=255).contains(&n) => Ok(n as u8),
            Some(n) => Err(field_err(field, format!("{n}: must be between 1 and 255"))),
        };
        let health = Health {
            kind,
            interval_ms: millis("interval", interval, 2000)?,
            timeout_ms: millis("timeout", timeout, 1000)?,
            rise: count("rise", rise)?,
            fall: count("fall", fall)?,
        };
        if health.timeout_ms > health.interval_ms {
            return Err(field_err("timeout", "must not be longer than interval".into()));
        }
        Ok(Some(health))
    }
}

/// `field`'s address: not an IPv4-mapped IPv6 one (an IPv4 forward serves those).
fn not_v4_mapped(field: &'static str, at: SocketAddr) -> Result<(), FieldError> {
    if let Some(v4) = match at.ip() {
        IpAddr::V6(a) => a.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    } {
        return Err(field_err(
            field,
            format!(
                "{} is an IPv4-mapped address: write {v4} (an IPv4 forward also serves programs that dial {} from \
                 dual-stack sockets)",
                at.ip(),
                at.ip()
            ),
        ));
    }
    Ok(())
}

impl Backend {
    /// A backend as written: `address:port` and a weight (None: 1).
    pub fn new(address: &str, weight: Option<i64>) -> Result<Self, FieldError> {
        let address = parse_socket_range("address", address)?;
        if address.port() == 0 || address.ip().is_unspecified() {
            return Err(field_err("address", "needs a concrete address and a port other than 0".into()));
        }
        not_v4_mapped("address", *address)?;
        let weight = match weight {
            None => 1,
            Some(w) if (0..=65_535).contains(&w) => w as u32,
            Some(w) => return Err(field_err("weight", format!("{w}: must be between 0 and 65535"))),
        };
        Ok(Backend { address, weight })
    }
}

impl Forward {
    /// One forward's fields validated on their own, as the config file and `forward add`
    /// check them (checks across forwards, such as duplicate names, are the caller's).
    /// `snat` is the text of the key (None: "auto"). One backend of weight 1.
    pub fn new(
        name: &str,
        protocol: Protocol,
        listen: &str,
        backend: &str,
        snat: Option<&str>,
        local: bool,
    ) -> Result<Self, FieldError> {
        let backend = Backend::new(backend, None).map_err(|e| field_err("backend", e.message))?;
        Self::with_backends(name, protocol, listen, vec![backend], snat, local)
    }

    /// [`Forward::new`] with several backends (no health checks).
    pub fn with_backends(
        name: &str,
        protocol: Protocol,
        listen: &str,
        backends: Vec<Backend>,
        snat: Option<&str>,
        local: bool,
    ) -> Result<Self, FieldError> {
        validate_forward_name(name)?;
        let listen = parse_socket_range("listen", listen)?;
        if listen.port() == 0 {
            return Err(field_err("listen", "port must not be 0".into()));
        }
        not_v4_mapped("listen", *listen)?;
        check_backends(listen, &backends)?;
        let backend = backends[0].address;
        let snat = match snat {
            None => Snat::Auto,
            Some(text) => match text.parse::<Snat>() {
                Ok(Snat::Address(a)) if a.is_ipv4() != backend.is_ipv4() => {
                    return Err(field_err(
                        "snat",
                        format!("{text:?}: expected \"auto\", \"off\" or an address of the backend's family"),
                    ));
                }
                Ok(s) => s,
                Err(message) => return Err(field_err("snat", message)),
            },
        };
        Ok(Forward {
            name: name.to_string(),
            protocol,
            listen,
            backends,
            snat,
            local,
            health: None,
            allow: Vec::new(),
            deny: Vec::new(),
        })
    }

    /// The same rule apart from backends, health checks and source lists: a change of
    /// those keeps the forward's id and connections.
    pub fn same_rule(&self, other: &Forward) -> bool {
        let rule = |f: &Forward| (f.name.clone(), f.protocol, f.listen, f.snat, f.local);
        rule(self) == rule(other)
    }

    /// The forward's one backend, when it has exactly one.
    pub fn single_backend(&self) -> Option<SocketAddr> {
        match self.backends.as_slice() {
            [b] => Some(*b.address),
            _ => None,
        }
    }

    /// The backends as text, `a:p` or `a:p (weight w)` each.
    pub fn backends_text(&self) -> String {
        let one = |b: &Backend| {
            if b.weight == 1 { b.address.to_string() } else { format!("{} (weight {})", b.address, b.weight) }
        };
        self.backends.iter().map(one).collect::<Vec<_>>().join(", ")
    }
}

impl Forward {
    /// Whether the source lists let a new connection from `source` in (what the kernel
    /// checks per new connection): in `allow` if there is one, and not in `deny`.
    pub fn admits_source(&self, source: IpAddr) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&source)))
            && !self.deny.iter().any(|n| n.contains(&source))
    }
}

/// A source-list entry: a prefix in CIDR notation, or a bare address (a host prefix). A
/// prefix with bits set past its length is refused rather than guessed at.
pub fn parse_source_prefix(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("{s:?} is not an address or a prefix (ADDRESS/LENGTH)")),
        },
    };
    if net.trunc() != net {
        return Err(format!("{s:?} has bits set past its prefix length: write {}", net.trunc()));
    }
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        return Err(format!(
            "{s:?} is an IPv4-mapped prefix: write {v4}/{} (IPv4 clients are matched by their IPv4 address)",
            v6.prefix_len() - 96
        ));
    }
    Ok(net)
}

/// The source list of key `field` (allow or deny): every entry parsed, then sorted and
/// without repeats (the stored lists read back in that order). A bad entry is returned
/// with its index.
pub fn parse_source_list<S: AsRef<str>>(field: &'static str, items: &[S]) -> Result<Vec<IpNet>, (usize, FieldError)> {
    let mut list = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        list.push(parse_source_prefix(item.as_ref()).map_err(|message| (i, field_err(field, message)))?);
    }
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

/// A forward's backends checked together: at least one, at most [`MAX_BACKENDS`], of the
/// listen address's family, no two alike, not all of weight 0, and none on loopback when
/// there are several (a backend on this host is delivered to as a forward's only one).
fn check_backends(listen: SocketRange, backends: &[Backend]) -> Result<(), FieldError> {
    if backends.is_empty() {
        return Err(field_err("backend", "a forward needs a backend (or [[forward.backends]])".into()));
    }
    if backends.len() > MAX_BACKENDS {
        return Err(field_err("backends", format!("{} backends: at most {MAX_BACKENDS}", backends.len())));
    }
    let several = backends.len() > 1;
    for (i, b) in backends.iter().enumerate() {
        let at = |field, message| if several { backend_err(i, field, message) } else { field_err("backend", message) };
        if listen.is_ipv6() != b.address.is_ipv6() {
            return Err(at("address", "must be of the same address family as listen (IPv4 or IPv6)".into()));
        }
        if b.address.is_range() && b.address.span != listen.span {
            return Err(at(
                "address",
                format!(
                    "{} is a range of {} ports and listen {listen} of {}: a backend of a port range is one port (all \
                     map to it) or a range of the same size",
                    b.address,
                    b.address.span as u32 + 1,
                    listen.span as u32 + 1
                ),
            ));
        }
        if several && b.address.ip().is_loopback() {
            return Err(at(
                "address",
                format!(
                    "{} is on this host: a forward delivers to a backend on this host only as its one backend",
                    b.address
                ),
            ));
        }
        if let Some(j) = backends[..i].iter().position(|o| o.address == b.address) {
            return Err(at("address", format!("{} is listed twice (also backend {j})", b.address)));
        }
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(field_err(
            "backends",
            "every backend has weight 0: new connections would have nowhere to go".into(),
        ));
    }
    Ok(())
}

/// The listen ports of forwards, for the checks of a new forward's listen against them: a
/// port is one forward's on an address and protocol; port ranges overlap neither each other
/// nor single ports on the address, nor the ports of a wildcard listen of the family (which
/// takes every address); at most [`MAX_PORT_RANGES`] ranges reach one address. A single
/// port on a wildcard and the same port on one address may coexist (the address's forward
/// takes that address). Single ports, the common case, cost one hash lookup each.
#[derive(Default)]
pub struct ListenIndex<'a> {
    /// Single listen ports and their forwards.
    singles: std::collections::HashMap<(Protocol, SocketAddr), &'a str>,
    /// Listen ranges and their forwards, by protocol and address (a wildcard under its own).
    ranges: std::collections::HashMap<(Protocol, IpAddr), Vec<(SocketRange, &'a str)>>,
}

impl ListenIndex<'_> {
    pub fn reserve(&mut self, forwards: usize) {
        self.singles.reserve(forwards);
    }
}

/// Port ranges that reach one listen address per protocol (the kernel's bound).
pub const MAX_PORT_RANGES: usize = forwarder_common::MAX_PORT_RANGES;

impl<'a> ListenIndex<'a> {
    /// Adds the listen of forward `name`, or says (as an error of `listen`) which forward's
    /// ports it overlaps.
    pub fn add(&mut self, name: &'a str, proto: Protocol, listen: SocketRange) -> Result<(), FieldError> {
        let overlap = |other: &str, at: IpAddr| {
            let wildcard =
                if at.is_unspecified() && !listen.ip().is_unspecified() { format!(" ({at})") } else { String::new() };
            field_err("listen", format!("{proto:?} {listen} overlaps the listen ports of forward {other:?}{wildcard}"))
        };
        let wildcard: IpAddr = if listen.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let same_family = |a: &IpAddr| a.is_ipv4() == listen.is_ipv4();
        // Ranges on the address, and on the wildcard (or, for a wildcard, on every address).
        for ((p, at), ranges) in &self.ranges {
            let reaches = *at == listen.ip() || *at == wildcard || (listen.ip().is_unspecified() && same_family(at));
            if *p != proto || !reaches {
                continue;
            }
            if let Some((_, other)) = ranges.iter().find(|(r, _)| r.ports_overlap(&listen)) {
                return Err(overlap(other, *at));
            }
        }
        if !listen.is_range() {
            if let Some(other) = self.singles.get(&(proto, *listen)) {
                return Err(field_err(
                    "listen",
                    format!("{proto:?} {listen} is already the listen address of forward {other:?}"),
                ));
            }
            self.singles.insert((proto, *listen), name);
            return Ok(());
        }
        // A range against the single ports it covers, on its address (a wildcard: on every
        // address of its family).
        if listen.ip().is_unspecified() {
            let taken = self.singles.iter().find(|((p, at), _)| {
                *p == proto && same_family(&at.ip()) && listen.ports_overlap(&SocketRange::from(*at))
            });
            if let Some(((_, at), other)) = taken {
                return Err(overlap(other, at.ip()));
            }
        } else {
            for port in listen.port()..=listen.last_port() {
                for at in [listen.ip(), wildcard] {
                    if let Some(other) = self.singles.get(&(proto, SocketAddr::new(at, port))) {
                        return Err(overlap(other, at));
                    }
                }
            }
        }
        let count = |at: &IpAddr| self.ranges.get(&(proto, *at)).map_or(0, Vec::len);
        let reached = count(&wildcard)
            + if listen.ip().is_unspecified() {
                self.ranges
                    .iter()
                    .filter(|((p, at), _)| *p == proto && same_family(at) && !at.is_unspecified())
                    .map(|(_, r)| r.len())
                    .max()
                    .unwrap_or(0)
            } else {
                count(&listen.ip())
            };
        if reached >= MAX_PORT_RANGES {
            return Err(field_err(
                "listen",
                format!("{proto:?} {listen}: more than {MAX_PORT_RANGES} port ranges would listen on one address"),
            ));
        }
        self.ranges.entry((proto, listen.ip())).or_default().push((listen, name));
        Ok(())
    }
}

/// What happens to the connections of a forward that a reload or `forward del` removes
/// or changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnForwardRemoved {
    /// They keep their translation until they end or idle out (like netfilter's conntrack
    /// after a rule is deleted); only new connections follow the new config.
    #[default]
    Drain,
    /// They are dropped from the connection table at once; their next packets are no
    /// longer translated.
    Flush,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Conntrack {
    pub max_entries: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Leave the host's ephemeral range (`net.ipv4.ip_local_port_range`) out of the SNAT
    /// ports, so forwarded flows and the host's own connections never share a port.
    pub snat_avoid_local_ports: bool,
    pub on_forward_removed: OnForwardRemoved,
    /// Idle timeouts in seconds per TCP state (indexed by `forwarder_common::conntrack::TCP_*`).
    pub tcp_timeouts: [u64; TCP_STATES],
    pub udp_unreplied_timeout: u64,
    pub udp_replied_timeout: u64,
    /// Seconds between two expiry passes over the table.
    pub gc_interval: u64,
}

impl Default for Conntrack {
    fn default() -> Self {
        let (tcp, udp_unreplied, udp_replied) = Timeouts::NETFILTER_SECS;
        Self {
            max_entries: forwarder_common::DEFAULT_CT_ENTRIES,
            snat_port_min: forwarder_common::DEFAULT_SNAT_PORT_MIN,
            snat_port_max: forwarder_common::DEFAULT_SNAT_PORT_MAX,
            snat_avoid_local_ports: true,
            on_forward_removed: OnForwardRemoved::Drain,
            tcp_timeouts: tcp,
            udp_unreplied_timeout: udp_unreplied,
            udp_replied_timeout: udp_replied,
            gc_interval: 5,
        }
    }
}

impl Conntrack {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::from_secs(self.tcp_timeouts, self.udp_unreplied_timeout, self.udp_replied_timeout)
    }
}

/// The timeout keys of `[conntrack]`: each sets the timeout of these TCP states (or of UDP,
/// `UDP_UNREPLIED` / `UDP_REPLIED` marked by 100 + state). A group key (the four of earlier
/// versions) comes before the keys of its single states, which override it.
const TIMEOUT_KEYS: [(&str, &[u8]); 13] = [
    ("tcp_handshake_timeout", &[TCP_NONE, TCP_SYN_SENT, TCP_SYN_RECV, TCP_SYN_SENT2]),
    ("tcp_established_timeout", &[TCP_ESTABLISHED]),
    ("tcp_closing_timeout", &[TCP_FIN_WAIT, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_TIME_WAIT, TCP_CLOSE]),
    ("udp_timeout", &[UDP_KEY_UNREPLIED, UDP_KEY_REPLIED]),
    ("tcp_syn_sent_timeout", &[TCP_SYN_SENT, TCP_SYN_SENT2]),
    ("tcp_syn_recv_timeout", &[TCP_SYN_RECV]),
    ("tcp_fin_wait_timeout", &[TCP_FIN_WAIT]),
    ("tcp_close_wait_timeout", &[TCP_CLOSE_WAIT]),
    ("tcp_last_ack_timeout", &[TCP_LAST_ACK]),
    ("tcp_time_wait_timeout", &[TCP_TIME_WAIT]),
    ("tcp_close_timeout", &[TCP_CLOSE]),
    ("udp_unreplied_timeout", &[UDP_KEY_UNREPLIED]),
    ("udp_replied_timeout", &[UDP_KEY_REPLIED]),
];
const UDP_KEY_UNREPLIED: u8 = 100;
const UDP_KEY_REPLIED: u8 = 101;

/// A same-switch peer reached straight at layer 2.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    pub address: IpAddr,
    pub interface: String,
}

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub forwards: Vec<Forward>,
    pub peers: Vec<Peer>,
    pub conntrack: Conntrack,
    pub max_forwards: u32,
    /// Backends of all forwards together (`limits.max_backends`).
    pub max_backends: u32,
}

// ---- raw (as written) form, with spans for error messages ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    interface: Vec<RawInterface>,
    #[serde(default)]
    forward: Vec<RawForward>,
    #[serde(default)]
    peer: Vec<RawPeer>,
    conntrack: Option<RawConntrack>,
    limits: Option<RawLimits>,
    /// Per-node additions, selected by `--node-name` (a DaemonSet passes the node's name).
    #[serde(default)]
    node: std::collections::BTreeMap<String, RawNode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    interface: Vec<RawInterface>,
    #[serde(default)]
    forward: Vec<RawForward>,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Spanned<String>,
    #[serde(default = "default_xdp")]
    xdp: XdpMode,
    #[serde(default)]
    redirect: RedirectMode,
    #[serde(default)]
    optional: bool,
}

fn default_xdp() -> XdpMode {
    XdpMode::Auto
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    name: Spanned<String>,
    protocol: Protocol,
    listen: Spanned<String>,
    backend: Option<Spanned<String>>,
    backends: Option<Spanned<Vec<RawBackend>>>,
    snat: Option<Spanned<String>>,
    local: Option<bool>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    deny: Option<Spanned<Vec<Spanned<String>>>>,
    health: Option<Spanned<RawHealth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Spanned<String>,
    interval: Option<Spanned<Seconds>>,
    timeout: Option<Spanned<Seconds>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

/// Seconds written as an integer or a fraction.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum Seconds {
    Whole(i64),
    Fraction(f64),
}

impl Seconds {
    fn get(self) -> f64 {
        match self {
            Seconds::Whole(s) => s as f64,
            Seconds::Fraction(s) => s,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    address: Spanned<String>,
    interface: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    max_entries: Option<Spanned<u32>>,
    snat_ports: Option<Spanned<String>>,
    on_forward_removed: Option<OnForwardRemoved>,
    snat_avoid_local_ports: Option<bool>,
    tcp_handshake_timeout: Option<Spanned<u64>>,
    tcp_established_timeout: Option<Spanned<u64>>,
    tcp_closing_timeout: Option<Spanned<u64>>,
    udp_timeout: Option<Spanned<u64>>,
    tcp_syn_sent_timeout: Option<Spanned<u64>>,
    tcp_syn_recv_timeout: Option<Spanned<u64>>,
    tcp_fin_wait_timeout: Option<Spanned<u64>>,
    tcp_close_wait_timeout: Option<Spanned<u64>>,
    tcp_last_ack_timeout: Option<Spanned<u64>>,
    tcp_time_wait_timeout: Option<Spanned<u64>>,
    tcp_close_timeout: Option<Spanned<u64>>,
    udp_unreplied_timeout: Option<Spanned<u64>>,
    udp_replied_timeout: Option<Spanned<u64>>,
    gc_interval: Option<Spanned<u64>>,
}

impl RawConntrack {
    /// The timeout keys' values in [`TIMEOUT_KEYS`] order.
    fn timeouts(&self) -> [&Option<Spanned<u64>>; 13] {
        [
            &self.tcp_handshake_timeout,
            &self.tcp_established_timeout,
            &self.tcp_closing_timeout,
            &self.udp_timeout,
            &self.tcp_syn_sent_timeout,
            &self.tcp_syn_recv_timeout,
            &self.tcp_fin_wait_timeout,
            &self.tcp_close_wait_timeout,
            &self.tcp_last_ack_timeout,
            &self.tcp_time_wait_timeout,
            &self.tcp_close_timeout,
            &self.udp_unreplied_timeout,
            &self.udp_replied_timeout,
        ]
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_forwards: Option<Spanned<u32>>,
    max_backends: Option<Spanned<u32>>,
}

/// Longest forward name the metadata map holds (bytes).
pub const MAX_NAME_LEN: usize = 47;
const IFNAMSIZ: usize = 15;

impl Config {
    /// Backends that two or more local UDP forwards lead to, with those forwards' names.
    /// The answers of such a backend carry the same addresses and ports whichever listen
    /// address a program sent to, so an unconnected socket reaches it through one listen
    /// address at a time (docs/architecture.md, "Local forwards").
    pub fn shared_local_udp_backends(&self) -> Vec<(SocketAddr, Vec<&str>)> {
        // In the order backends first appear; indexed, since a config may hold 100,000s.
        let mut by_backend: Vec<(SocketAddr, Vec<&str>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for f in self.forwards.iter().filter(|f| f.local && f.protocol == Protocol::Udp) {
            for backend in f.backends.iter().map(|b| *b.address) {
                let i = *index.entry(backend).or_insert_with(|| {
                    by_backend.push((backend, Vec::new()));
                    by_backend.len() - 1
                });
                by_backend[i].1.push(&f.name);
            }
        }
        by_backend.retain(|(_, names)| names.len() > 1);
        by_backend
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), source: e })?;
        Self::parse(&text)
    }

    /// Like [`Config::from_file`], with the `[node.NAME]` sections of `node` added.
    pub fn from_file_for_node(path: &Path, node: Option<&str>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), source: e })?;
        Self::parse_for_node(&text, node)
    }

    /// Parses and validates a whole config; the first problem found is returned with its line.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_for_node(text, None)
    }

    /// Parses a config and adds the interfaces, forwards and peers of its `[node.NAME]`
    /// section for `node`. Every node's section is validated (merged with the common part),
    /// so a mistake in another node's section is still refused here.
    pub fn parse_for_node(text: &str, node: Option<&str>) -> Result<Self, ConfigError> {
        let raw = Self::raw(text, true)?;
        for name in raw.node.keys() {
            Self::build(text, &raw, Some(name))?;
        }
        Self::build(text, &raw, node)
    }

    /// The config as written: by the fast path for plain configs if `fast`, else (or if the
    /// fast path gives up) by `toml`.
    fn raw(text: &str, fast: bool) -> Result<RawConfig, ConfigError> {
        match fast.then(|| fast::parse(text)).flatten() {
            Some(raw) => Ok(raw),
            None => toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string())),
        }
    }

    fn build(text: &str, raw: &RawConfig, node: Option<&str>) -> Result<Self, ConfigError> {
        let section = node.and_then(|n| raw.node.get(n).map(|s| (n, s)));
        fn items<'a, T>(
            top: &'a [T],
            what: &'static str,
            section: Option<(&'a str, &'a [T])>,
        ) -> Vec<(Prefix<'a>, &'a T)> {
            let mut v: Vec<(Prefix, &T)> =
                top.iter().enumerate().map(|(index, x)| (Prefix { node: None, what, index }, x)).collect();
            if let Some((n, xs)) = section {
                v.extend(xs.iter().enumerate().map(|(index, x)| (Prefix { node: Some(n), what, index }, x)));
            }
            v
        }
        let iface_items = items(&raw.interface, "interface", section.map(|(n, s)| (n, s.interface.as_slice())));
        let forward_items = items(&raw.forward, "forward", section.map(|(n, s)| (n, s.forward.as_slice())));
        let peer_items = items(&raw.peer, "peer", section.map(|(n, s)| (n, s.peer.as_slice())));
        let err = |span: Range<usize>, field: &str, message: String| ConfigError::Invalid {
            line: line_of(text, span.start),
            field: field.to_string(),
            message,
        };

        let mut interfaces = Vec::new();
        let mut seen_if = HashSet::new();
        for (prefix, ri) in &iface_items {
            let field = format!("{prefix}.name");
            let name = ri.name.get_ref();
            if !valid_ifname(name) {
                return Err(err(ri.name.span(), &field, format!("{name:?} is not a valid interface name")));
            }
            if !seen_if.insert(name.clone()) {
                return Err(err(ri.name.span(), &field, format!("interface {name:?} is listed twice")));
            }
            interfaces.push(Interface {
                name: name.clone(),
                xdp: ri.xdp,
                redirect: ri.redirect,
                optional: ri.optional,
            });
        }

        let mut forwards = Vec::new();
        let mut seen_names = HashSet::with_capacity(forward_items.len());
        let mut listens = ListenIndex::default();
        listens.reserve(forward_items.len());
        // SNAT-off forwards to one backend would share reply tuples (the client's address
        // and port): a client using both at once could not be told apart.
        let mut snat_off_backends = HashSet::new();
        forwards.reserve(forward_items.len());
        for (prefix, rf) in &forward_items {
            let f = |name: &str| format!("{prefix}.{name}");
            let name = rf.name.get_ref();
            let backends_span = match (&rf.backend, &rf.backends) {
                (Some(b), None) => b.span(),
                (None, Some(bs)) => bs.span(),
                (Some(b), Some(_)) => {
                    return Err(err(
                        b.span(),
                        &f("backend"),
                        "give either backend or [[forward.backends]], not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(err(
                        rf.name.span(),
                        &f("backend"),
                        "missing: give backend or [[forward.backends]]".into(),
                    ));
                }
            };
            let raw_backends: Vec<(&Spanned<String>, Option<&Spanned<i64>>)> = match (&rf.backend, &rf.backends) {
                (Some(b), _) => vec![(b, None)],
                (_, Some(bs)) => bs.get_ref().iter().map(|b| (&b.address, b.weight.as_ref())).collect(),
                _ => Vec::new(),
            };
            let single = rf.backend.is_some();
            let backend_field = |i: usize, field: &str| {
                if single { f("backend") } else { f(&format!("backends[{i}].{field}")) }
            };
            let mut backends = Vec::with_capacity(raw_backends.len());
            for (i, (address, weight)) in raw_backends.iter().enumerate() {
                let b = Backend::new(address.get_ref(), weight.map(|w| *w.get_ref())).map_err(|e| {
                    let span = if e.field == "weight" { weight.unwrap().span() } else { address.span() };
                    err(span, &backend_field(i, e.field), e.message)
                })?;
                backends.push(b);
            }
            let mut forward = Forward::with_backends(
                name,
                rf.protocol,
                rf.listen.get_ref(),
                backends,
                rf.snat.as_ref().map(|s| s.get_ref().as_str()),
                rf.local.unwrap_or(true),
            )
            .map_err(|e| {
                if let Some(i) = e.backend {
                    return err(raw_backends[i].0.span(), &backend_field(i, e.field), e.message);
                }
                let span = match e.field {
                    "name" => rf.name.span(),
                    "listen" => rf.listen.span(),
                    "snat" => rf.snat.as_ref().map(|s| s.span()).unwrap_or_else(|| backends_span.clone()),
                    _ => backends_span.clone(),
                };
                err(span, &f(e.field), e.message)
            })?;
            if let Some(h) = &rf.health {
                let rh = h.get_ref();
                forward.health = Health::new(
                    rh.kind.get_ref(),
                    rh.interval.as_ref().map(|s| s.get_ref().get()),
                    rh.timeout.as_ref().map(|s| s.get_ref().get()),
                    rh.rise.as_ref().map(|s| *s.get_ref()),
                    rh.fall.as_ref().map(|s| *s.get_ref()),
                )
                .map_err(|e| {
                    let span = match e.field {
                        "kind" => rh.kind.span(),
                        "interval" => rh.interval.as_ref().map(|s| s.span()).unwrap_or_else(|| h.span()),
                        "timeout" => rh.timeout.as_ref().map(|s| s.span()).unwrap_or_else(|| h.span()),
                        "rise" => rh.rise.as_ref().map(|s| s.span()).unwrap_or_else(|| h.span()),
                        _ => rh.fall.as_ref().map(|s| s.span()).unwrap_or_else(|| h.span()),
                    };
                    err(span, &f(&format!("health.{}", e.field)), e.message)
                })?;
            }
            for (key, raw_list, list) in
                [("allow", &rf.allow, &mut forward.allow), ("deny", &rf.deny, &mut forward.deny)]
            {
                let Some(raw_list) = raw_list else { continue };
                let items = raw_list.get_ref();
                if items.is_empty() {
                    return Err(err(
                        raw_list.span(),
                        &f(key),
                        "an empty list: leave the key out to take every source".into(),
                    ));
                }
                let texts: Vec<&str> = items.iter().map(|i| i.get_ref().as_str()).collect();
                *list = parse_source_list(key, &texts)
                    .map_err(|(i, e)| err(items[i].span(), &format!("{prefix}.{key}[{i}]"), e.message))?;
            }
            if !seen_names.insert(name.as_str()) {
                return Err(err(rf.name.span(), &f("name"), format!("forward name {name:?} is used twice")));
            }
            let snat = forward.snat;
            let taken = (snat == Snat::Off)
                .then(|| forward.backends.iter().find(|b| !snat_off_backends.insert((rf.protocol, b.address))))
                .flatten();
            if let Some(backend) = taken.map(|b| b.address) {
                let span = rf.snat.as_ref().map(|s| s.span()).unwrap_or_else(|| backends_span.clone());
                return Err(err(
                    span,
                    &f("snat"),
                    format!(
                        "another forward with snat = \"off\" has backend {backend} ({:?}): replies could not be told \
                         apart; give one of them SNAT",
                        rf.protocol
                    ),
                ));
            }
            listens
                .add(rf.name.get_ref(), forward.protocol, forward.listen)
                .map_err(|e| err(rf.listen.span(), &f(e.field), e.message))?;
            forwards.push(forward);
        }

        let mut peers: Vec<Peer> = Vec::new();
        for (prefix, rp) in &peer_items {
            let address = parse_peer_address(rp.address.get_ref())
                .map_err(|e| err(rp.address.span(), &format!("{prefix}.{}", e.field), e.message))?;
            if peers.iter().any(|p| p.address == address) {
                return Err(err(
                    rp.address.span(),
                    &format!("{prefix}.address"),
                    format!("peer {address} is listed twice"),
                ));
            }
            let name = rp.interface.get_ref();
            validate_ifname("interface", name)
                .map_err(|e| err(rp.interface.span(), &format!("{prefix}.{}", e.field), e.message))?;
            peers.push(Peer { address, interface: name.clone() });
        }

        let mut conntrack = Conntrack::default();
        if let Some(ct) = &raw.conntrack {
            if let Some(m) = &ct.max_entries {
                if *m.get_ref() < 64 {
                    return Err(err(m.span(), "conntrack.max_entries", "must be at least 64".into()));
                }
                conntrack.max_entries = *m.get_ref();
            }
            if let Some(p) = &ct.snat_ports {
                let (min, max) = parse_port_range(p.get_ref()).ok_or_else(|| {
                    err(
                        p.span(),
                        "conntrack.snat_ports",
                        format!("{:?}: expected \"MIN-MAX\" with 1 <= MIN <= MAX <= 65535", p.get_ref()),
                    )
                })?;
                conntrack.snat_port_min = min;
                conntrack.snat_port_max = max;
            }
            if let Some(p) = ct.on_forward_removed {
                conntrack.on_forward_removed = p;
            }
            if let Some(a) = ct.snat_avoid_local_ports {
                conntrack.snat_avoid_local_ports = a;
            }
            let seconds = |v: &Spanned<u64>, field: &str| {
                if *v.get_ref() == 0 || *v.get_ref() > 365 * 86_400 {
                    return Err(err(
                        v.span(),
                        &format!("conntrack.{field}"),
                        "must be between 1 and 31536000 seconds".into(),
                    ));
                }
                Ok(*v.get_ref())
            };
            for ((field, states), value) in TIMEOUT_KEYS.iter().zip(ct.timeouts()) {
                if let Some(v) = value {
                    let secs = seconds(v, field)?;
                    for &state in *states {
                        match state {
                            UDP_KEY_UNREPLIED => conntrack.udp_unreplied_timeout = secs,
                            UDP_KEY_REPLIED => conntrack.udp_replied_timeout = secs,
                            s => conntrack.tcp_timeouts[s as usize] = secs,
                        }
                    }
                }
            }
            if let Some(v) = &ct.gc_interval {
                conntrack.gc_interval = seconds(v, "gc_interval")?;
            }
        }
        let mut max_forwards = forwarder_common::DEFAULT_MAX_FORWARDS;
        if let Some(m) = raw.limits.as_ref().and_then(|l| l.max_forwards.as_ref()) {
            if *m.get_ref() == 0 || *m.get_ref() > 1_048_576 {
                return Err(err(m.span(), "limits.max_forwards", "must be between 1 and 1048576".into()));
            }
            max_forwards = *m.get_ref();
        }
        if forwards.len() > max_forwards as usize {
            return Err(ConfigError::Invalid {
                line: 1,
                field: "limits.max_forwards".into(),
                message: format!("{} forwards exceed the limit of {max_forwards}", forwards.len()),
            });
        }
        // By default every forward can have one backend, whatever limits.max_forwards says.
        let mut max_backends = forwarder_common::DEFAULT_MAX_BACKENDS.max(max_forwards);
        if let Some(m) = raw.limits.as_ref().and_then(|l| l.max_backends.as_ref()) {
            if *m.get_ref() == 0 || *m.get_ref() > forwarder_common::MAX_BACKEND_INDEX {
                return Err(err(
                    m.span(),
                    "limits.max_backends",
                    format!("must be between 1 and {}", forwarder_common::MAX_BACKEND_INDEX),
                ));
            }
            max_backends = *m.get_ref();
        }
        let backends: usize = forwards.iter().map(|f| f.backends.len()).sum();
        if backends > max_backends as usize {
            return Err(ConfigError::Invalid {
                line: 1,
                field: "limits.max_backends".into(),
                message: format!("{backends} backends exceed the limit of {max_backends}"),
            });
        }
        Ok(Config { interfaces, forwards, peers, conntrack, max_forwards, max_backends })
    }
}

/// The outcome of parsing `text` with the fast path allowed and with `toml` alone, as text
/// (the config's Debug form or the error): the two must always agree. For the tests and
/// the config fuzz target, not an API.
#[doc(hidden)]
pub fn fast_path_outcomes(text: &str) -> (String, String) {
    let run = |fast| match Config::raw(text, fast).and_then(|raw| Config::build(text, &raw, None)) {
        Ok(c) => format!("{c:?}"),
        Err(e) => e.to_string(),
    };
    (run(true), run(false))
}

/// Where an item sits in the config, e.g. `forward[3]` or `node.NAME.peer[0]`: formatted
/// only for error messages.
#[derive(Clone, Copy)]
struct Prefix<'a> {
    node: Option<&'a str>,
    what: &'static str,
    index: usize,
}

impl std::fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.node {
            write!(f, "node.{n}.")?;
        }
        write!(f, "{}[{}]", self.what, self.index)
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty() && name.len() <= IFNAMSIZ && !name.contains('/') && !name.contains(char::is_whitespace)
}

fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIC: &str = r#"
[[interface]]
name = "eth0"
xdp = "native"

[[forward]]
name = "mysql"
protocol = "tcp"
listen = "0.0.0.0:3306"
backend = "203.0.113.20:3197"
snat = "auto"
"#;

    const WEB: &str = r#"
[[forward]]
name = "web"
protocol = "tcp"
listen = "0.0.0.0:8080"

[[forward.backends]]
address = "203.0.113.20:80"
weight = 2
[[forward.backends]]
address = "203.0.113.21:80"

[forward.health]
kind = "tcp"
interval = 2
timeout = 0.5
rise = 3
fall = 2
"#;

    #[test]
    fn several_backends_with_weights_and_health_parse() {
        let c = Config::parse(WEB).unwrap();
        let f = &c.forwards[0];
        let got: Vec<(String, u32)> = f.backends.iter().map(|b| (b.address.to_string(), b.weight)).collect();
        assert_eq!(got, [("203.0.113.20:80".to_string(), 2), ("203.0.113.21:80".to_string(), 1)]);
        let h = f.health.unwrap();
        assert_eq!((h.kind, h.interval_ms, h.timeout_ms, h.rise, h.fall), (HealthKind::Tcp, 2000, 500, 3, 2));
        let none = WEB.replace("kind = \"tcp\"", "kind = \"none\"");
        assert_eq!(Config::parse(&none).unwrap().forwards[0].health, None);
    }

    /// Bad backends and health checks are refused with the line and field of the value.
    #[test]
    fn backend_errors_name_line_and_field() {
        let invalid = |text: &str| match Config::parse(text) {
            Err(ConfigError::Invalid { line, field, message }) => (line, field, message),
            other => panic!("expected an invalid config, got {other:?}"),
        };
        let dup = WEB.replace("203.0.113.21:80", "203.0.113.20:80");
        let (line, field, message) = invalid(&dup);
        assert_eq!((line, field.as_str()), (11, "forward[0].backends[1].address"), "{message}");
        assert!(message.contains("listed twice"), "{message}");
        let (line, field, _) = invalid(&WEB.replace("weight = 2", "weight = -1"));
        assert_eq!((line, field.as_str()), (9, "forward[0].backends[0].weight"));
        let zero = WEB
            .replace("weight = 2", "weight = 0")
            .replace("address = \"203.0.113.21:80\"", "address = \"203.0.113.21:80\"\nweight = 0");
        let (_, field, message) = invalid(&zero);
        assert_eq!(field, "forward[0].backends", "{message}");
        let (_, field, _) = invalid(&WEB.replace("203.0.113.21:80", "[2001:db8::21]:80"));
        assert_eq!(field, "forward[0].backends[1].address");
        let (_, field, _) = invalid(&WEB.replace("203.0.113.21:80", "127.0.0.1:80"));
        assert_eq!(field, "forward[0].backends[1].address");
        let (line, field, _) = invalid(&WEB.replace("kind = \"tcp\"", "kind = \"icmp\""));
        assert_eq!((line, field.as_str()), (14, "forward[0].health.kind"));
        let (_, field, _) = invalid(&WEB.replace("timeout = 0.5", "timeout = 3"));
        assert_eq!(field, "forward[0].health.timeout");
        let (_, field, _) = invalid(&WEB.replace("rise = 3", "rise = 0"));
        assert_eq!(field, "forward[0].health.rise");
        let both = WEB.replace("listen = \"0.0.0.0:8080\"", "listen = \"0.0.0.0:8080\"\nbackend = \"203.0.113.9:80\"");
        let (_, field, _) = invalid(&both);
        assert_eq!(field, "forward[0].backend");
        let many: String = (0..=MAX_BACKENDS)
            .map(|i| format!("[[forward.backends]]\naddress = \"203.0.113.{}:{}\"\n", i % 250 + 1, 1000 + i))
            .collect();
        let (_, field, _) =
            invalid(&format!("[[forward]]\nname = \"w\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:1\"\n{many}"));
        assert_eq!(field, "forward[0].backends");
    }

    #[test]
    fn classic_example_parses() {
        let c = Config::parse(CLASSIC).unwrap();
        assert_eq!(
            c.interfaces,
            vec![Interface {
                name: "eth0".into(),
                xdp: XdpMode::Native,
                redirect: RedirectMode::Auto,
                optional: false
            }]
        );
        let f = &c.forwards[0];
        assert_eq!(f.listen, "0.0.0.0:3306".parse().unwrap());
        assert_eq!(f.backends[0].address, "203.0.113.20:3197".parse().unwrap());
        assert_eq!(f.snat, Snat::Auto);
        assert!(f.local);
        // Without the key an interface gets `auto` (native, or none on a veth).
        let c = Config::parse(&CLASSIC.replace("xdp = \"native\"\n", "")).unwrap();
        assert_eq!(c.interfaces[0].xdp, XdpMode::Auto);
    }

    fn invalid(text: &str) -> (usize, String, String) {
        match Config::parse(text) {
            Err(ConfigError::Invalid { line, field, message }) => (line, field, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn bad_backend_names_line_and_field() {
        let text = CLASSIC.replace("203.0.113.20:3197", "203.0.113.20");
        let (line, field, _) = invalid(&text);
        assert_eq!((line, field.as_str()), (10, "forward[0].backend"));
    }

    #[test]
    fn bad_snat_and_duplicates_are_refused() {
        let (line, field, _) = invalid(&CLASSIC.replace("snat = \"auto\"", "snat = \"sometimes\""));
        assert_eq!((line, field.as_str()), (11, "forward[0].snat"));
        let dup = format!(
            "{CLASSIC}\n[[forward]]\nname = \"mysql\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:1\"\nbackend = \"192.0.2.1:2\"\n"
        );
        let (line, field, _) = invalid(&dup);
        assert_eq!((line, field.as_str()), (14, "forward[1].name"));
        let dup_listen = format!(
            "{CLASSIC}\n[[forward]]\nname = \"b\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:3306\"\nbackend = \"192.0.2.1:2\"\n"
        );
        assert_eq!(invalid(&dup_listen).1, "forward[1].listen");
        let off = CLASSIC.replace("snat = \"auto\"", "snat = \"off\"");
        let shared_backend = format!(
            "{off}\n[[forward]]\nname = \"b\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:3307\"\nbackend = \"203.0.113.20:3197\"\nsnat = \"off\"\n"
        );
        let (line, field, message) = invalid(&shared_backend);
        assert_eq!((line, field.as_str()), (18, "forward[1].snat"), "{message}");
        assert!(message.contains("203.0.113.20:3197"), "{message}");
        // With SNAT on either, or another protocol, they can share it.
        Config::parse(&shared_backend.replacen("snat = \"off\"", "snat = \"auto\"", 1)).unwrap();
        Config::parse(
            &shared_backend.replace(
                "protocol = \"tcp\"\nlisten = \"0.0.0.0:3307\"",
                "protocol = \"udp\"\nlisten = \"0.0.0.0:3307\"",
            ),
        )
        .unwrap();
    }

    #[test]
    fn local_udp_forwards_sharing_a_backend_are_found() {
        let forward = |name: &str, proto: &str, listen: &str, local: bool| {
            format!(
                "\n[[forward]]\nname = \"{name}\"\nprotocol = \"{proto}\"\nlisten = \"{listen}\"\nbackend = \
                 \"203.0.113.20:53\"\nlocal = {local}\n"
            )
        };
        let text = [
            forward("dns", "udp", "127.0.0.1:53", true),
            forward("dns-alt", "udp", "127.0.0.1:5300", true),
            forward("dns-tcp", "tcp", "127.0.0.1:53", true),
            forward("dns-ingress", "udp", "192.0.2.1:53", false),
        ]
        .concat();
        let c = Config::parse(&format!("{CLASSIC}{text}")).unwrap();
        assert_eq!(c.shared_local_udp_backends(), vec![("203.0.113.20:53".parse().unwrap(), vec!["dns", "dns-alt"])]);
        let c = Config::parse(&format!("{CLASSIC}{}", text.replacen("local = true", "local = false", 1))).unwrap();
        assert!(c.shared_local_udp_backends().is_empty(), "TCP and non-local forwards do not count");
    }

    #[test]
    fn ipv4_mapped_addresses_are_refused_with_the_ipv4_address_to_write() {
        let v6 = |listen: &str, backend: &str| {
            format!(
                "{CLASSIC}\n[[forward]]\nname = \"v6\"\nprotocol = \"tcp\"\nlisten = \"{listen}\"\nbackend = \"{backend}\"\n"
            )
        };
        let (_, field, message) = invalid(&v6("[::ffff:127.0.0.1]:3306", "[2001:db8::20]:3197"));
        assert_eq!(field, "forward[1].listen");
        assert!(message.contains("write 127.0.0.1"), "{message}");
        let (_, field, message) = invalid(&v6("[::]:3306", "[::ffff:203.0.113.20]:3197"));
        assert_eq!(field, "forward[1].backend");
        assert!(message.contains("write 203.0.113.20"), "{message}");
        Config::parse(&v6("[::]:3306", "[2001:db8::20]:3197")).unwrap();
    }

    #[test]
    fn timeouts_default_to_netfilters_and_old_keys_set_their_states() {
        use forwarder_common::conntrack::*;
        let c = Config::parse(CLASSIC).unwrap().conntrack;
        assert_eq!(c.timeouts(), Timeouts::netfilter());
        assert!(c.snat_avoid_local_ports);
        assert_eq!((c.snat_port_min, c.snat_port_max), (1024, 65535));
        let c = Config::parse(&format!(
            "{CLASSIC}\n[conntrack]\ntcp_closing_timeout = 7\ntcp_time_wait_timeout = 9\ntcp_handshake_timeout = 11\n\
             udp_timeout = 13\nudp_replied_timeout = 17\ntcp_established_timeout = 19\nsnat_avoid_local_ports = false\n"
        ))
        .unwrap()
        .conntrack;
        let t = |s: u8| c.tcp_timeouts[s as usize];
        assert_eq!((t(TCP_FIN_WAIT), t(TCP_CLOSE_WAIT), t(TCP_LAST_ACK), t(TCP_CLOSE)), (7, 7, 7, 7));
        assert_eq!(t(TCP_TIME_WAIT), 9, "the single state's key wins over its group's");
        assert_eq!((t(TCP_SYN_SENT), t(TCP_SYN_RECV)), (11, 11));
        assert_eq!(t(TCP_ESTABLISHED), 19);
        assert_eq!((c.udp_unreplied_timeout, c.udp_replied_timeout), (13, 17));
        assert!(!c.snat_avoid_local_ports);
        let (_, field, _) = invalid(&format!("{CLASSIC}\n[conntrack]\ntcp_syn_recv_timeout = 0\n"));
        assert_eq!(field, "conntrack.tcp_syn_recv_timeout");
    }

    #[test]
    fn syntax_and_unknown_fields_name_the_line() {
        let e = Config::parse(&CLASSIC.replace("xdp = \"native\"", "xdp = \"turbo\"")).unwrap_err().to_string();
        assert!(e.contains("line 4"), "{e}");
        let e = Config::parse(&CLASSIC.replace("snat = \"auto\"", "snatt = \"auto\"")).unwrap_err().to_string();
        assert!(e.contains("line 11") && e.contains("snatt"), "{e}");
    }

    #[test]
    fn peers_parse_and_are_validated() {
        let c = Config::parse(&format!("{CLASSIC}\n[[peer]]\naddress = \"198.51.100.20\"\ninterface = \"eth0\"\n[[peer]]\naddress = \"2001:db8::20\"\ninterface = \"eth0\"\n")).unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].address, "2001:db8::20".parse::<IpAddr>().unwrap());
        assert_eq!(
            invalid(&format!("{CLASSIC}\n[[peer]]\naddress = \"198.51.100\"\ninterface = \"eth0\"\n")).1,
            "peer[0].address"
        );
        let dup = format!(
            "{CLASSIC}\n[[peer]]\naddress = \"198.51.100.20\"\ninterface = \"eth0\"\n[[peer]]\naddress = \"198.51.100.20\"\ninterface = \"eth1\"\n"
        );
        assert_eq!(
            invalid(&dup),
            (17, "peer[1].address".to_string(), "peer 198.51.100.20 is listed twice".to_string())
        );
    }

    #[test]
    fn node_sections_add_to_the_common_part_and_are_all_validated() {
        let text = format!(
            "{CLASSIC}\n[[node.worker-1.interface]]\nname = \"eth1\"\n[[node.worker-1.peer]]\naddress = \"198.51.100.20\"\ninterface = \"eth1\"\n\
             [[node.worker-2.forward]]\nname = \"w2\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:53\"\nbackend = \"192.0.2.53:53\"\n"
        );
        let w1 = Config::parse_for_node(&text, Some("worker-1")).unwrap();
        assert_eq!(w1.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), vec!["eth0", "eth1"]);
        assert_eq!((w1.peers.len(), w1.forwards.len()), (1, 1));
        let w2 = Config::parse_for_node(&text, Some("worker-2")).unwrap();
        assert_eq!((w2.interfaces.len(), w2.peers.len(), w2.forwards.len()), (1, 0, 2));
        let other = Config::parse_for_node(&text, Some("worker-9")).unwrap();
        assert_eq!(other, Config::parse(&text).unwrap(), "a node without a section gets the common part");
        // A duplicate in worker-2's section is refused even when loading for worker-1.
        let bad = text.replace("name = \"w2\"", "name = \"mysql\"");
        let e = Config::parse_for_node(&bad, Some("worker-1")).unwrap_err().to_string();
        assert!(e.contains("node.worker-2.forward[0].name"), "{e}");
    }

    #[test]
    fn ranges_and_limits() {
        let c = Config::parse(&format!("{CLASSIC}\n[conntrack]\nsnat_ports = \"40000-40010\"\nmax_entries = 1024\n"))
            .unwrap();
        assert_eq!(
            (c.conntrack.snat_port_min, c.conntrack.snat_port_max, c.conntrack.max_entries),
            (40000, 40010, 1024)
        );
        assert_eq!(invalid(&format!("{CLASSIC}\n[conntrack]\nsnat_ports = \"5-4\"\n")).1, "conntrack.snat_ports");
        assert_eq!(
            invalid(&CLASSIC.replace("0.0.0.0:3306", "[::]:3306")).1,
            "forward[0].backend",
            "families must match"
        );
        let v6 = Config::parse(
            &CLASSIC.replace("0.0.0.0:3306", "[::]:3306").replace("203.0.113.20:3197", "[2001:db8::20]:3197"),
        )
        .unwrap();
        assert!(v6.forwards[0].backends[0].address.is_ipv6());
    }

    /// A config of TCP forwards, one per (listen, backend).
    fn forwards(pairs: &[(&str, &str)]) -> String {
        pairs
            .iter()
            .enumerate()
            .map(|(i, (listen, backend))| {
                format!(
                    "[[forward]]\nname = \"f{i}\"\nprotocol = \"tcp\"\nlisten = \"{listen}\"\nbackend = \"{backend}\"\n"
                )
            })
            .collect()
    }

    #[test]
    fn port_ranges_parse_and_show_as_written() {
        let c = Config::parse(&forwards(&[
            ("0.0.0.0:8000-8099", "203.0.113.20:9000-9099"),
            ("0.0.0.0:7000-7009", "203.0.113.20:9000"),
            ("[2001:db8::1]:8000-8099", "[2001:db8::20]:9000-9099"),
            ("192.0.2.1:80-80", "203.0.113.20:8080"),
        ]))
        .unwrap();
        let f = &c.forwards;
        assert_eq!((f[0].listen.port(), f[0].listen.span, f[0].listen.last_port()), (8000, 99, 8099));
        let backend = |i: usize| f[i].backends[0].address;
        assert_eq!((backend(0).port(), backend(0).span), (9000, 99));
        assert_eq!((f[1].listen.span, backend(1).span), (9, 0), "a range to one port");
        assert_eq!(f[0].listen.to_string(), "0.0.0.0:8000-8099");
        assert_eq!(backend(1).to_string(), "203.0.113.20:9000");
        assert_eq!(f[2].listen.to_string(), "[2001:db8::1]:8000-8099");
        assert_eq!(backend(2).to_string(), "[2001:db8::20]:9000-9099");
        assert_eq!(f[3].listen.to_string(), "192.0.2.1:80", "a range of one port is that port");
        assert_eq!(serde_json::to_value(&f[0]).unwrap()["listen"], "0.0.0.0:8000-8099");
        for bad in ["0.0.0.0:8099-8000", "0.0.0.0:8000-", "0.0.0.0:-8000", "0.0.0.0:8000-70000", "0.0.0.0:0-10"] {
            let (line, field, message) = invalid(&forwards(&[(bad, "203.0.113.20:9000")]));
            assert_eq!((line, field.as_str()), (4, "forward[0].listen"), "{bad}: {message}");
        }
    }

    #[test]
    fn a_range_backend_of_another_size_is_refused() {
        let (line, field, message) =
            invalid(&forwards(&[("0.0.0.0:80", "203.0.113.20:80"), ("0.0.0.0:8000-8099", "203.0.113.20:9000-9098")]));
        assert_eq!((line, field.as_str()), (10, "forward[1].backend"), "{message}");
        assert!(message.contains("range of 99 ports") && message.contains("of 100"), "{message}");
        let (_, field, _) = invalid(&forwards(&[("0.0.0.0:8000", "203.0.113.20:9000-9099")]));
        assert_eq!(field, "forward[0].backend", "a range backend needs a listen range");
        let several = r#"
[[forward]]
name = "web"
protocol = "tcp"
listen = "0.0.0.0:8000-8099"
[[forward.backends]]
address = "203.0.113.20:9000-9099"
[[forward.backends]]
address = "203.0.113.21:9000"
[[forward.backends]]
address = "203.0.113.22:9000-9009"
"#;
        let (line, field, message) = invalid(several);
        assert_eq!((line, field.as_str()), (11, "forward[0].backends[2].address"), "{message}");
        let c = Config::parse(&several.replace("9000-9009", "9100-9199")).unwrap();
        let spans: Vec<u16> = c.forwards[0].backends.iter().map(|b| b.address.span).collect();
        assert_eq!(spans, [99, 0, 99], "ranges and single ports mix among backends");
    }

    #[test]
    fn overlapping_listen_ports_are_refused() {
        let refused = |pairs: &[(&str, &str)]| {
            let (line, field, message) = invalid(&forwards(pairs));
            assert_eq!(field, format!("forward[{}].listen", pairs.len() - 1), "{pairs:?}: {message}");
            assert_eq!(line, 4 + 5 * (pairs.len() - 1), "{message}");
            message
        };
        let b = "203.0.113.20:9000";
        let message = refused(&[("192.0.2.1:8000-8099", b), ("192.0.2.1:8099-8100", b)]);
        assert!(message.contains("overlaps the listen ports of forward \"f0\""), "{message}");
        refused(&[("192.0.2.1:8000-8099", b), ("192.0.2.1:8042", b)]);
        refused(&[("192.0.2.1:8042", b), ("192.0.2.1:8000-8099", b)]);
        refused(&[("192.0.2.1:8000-8099", b), ("192.0.2.1:7000-9000", b)]);
        refused(&[("0.0.0.0:8000-8099", b), ("192.0.2.1:8042", b)]);
        refused(&[("192.0.2.1:8042", b), ("0.0.0.0:8000-8099", b)]);
        refused(&[("192.0.2.1:8000-8099", b), ("0.0.0.0:8050", b)]);
        refused(&[("0.0.0.0:8000-8099", b), ("0.0.0.0:8099", b)]);
        let message = refused(&[("192.0.2.1:8000", b), ("192.0.2.1:8000", b)]);
        assert!(message.contains("already the listen address of forward \"f0\""), "{message}");
        let fine = [
            ("192.0.2.1:8000-8099", b),
            ("192.0.2.1:8100-8199", b),
            ("192.0.2.1:7999", b),
            ("192.0.2.2:8000-8099", b),
            ("[::]:8000-8099", "[2001:db8::20]:9000"),
            ("0.0.0.0:8200-8299", b),
            // One port on a wildcard and on an address, as before ranges.
            ("0.0.0.0:3306", b),
            ("192.0.2.1:3306", b),
        ];
        Config::parse(&forwards(&fine)).unwrap();
        let udp = forwards(&[("192.0.2.1:8000-8099", b)])
            + &forwards(&[("192.0.2.1:8000-8099", b)]).replace("f0", "u0").replace("tcp", "udp");
        Config::parse(&udp).expect("another protocol");
    }

    #[test]
    fn at_most_sixteen_port_ranges_reach_one_address() {
        let listens: Vec<String> =
            (0..MAX_PORT_RANGES + 1).map(|i| format!("192.0.2.1:{}-{}", 1000 * (i + 1), 1000 * (i + 1) + 9)).collect();
        let pairs: Vec<(&str, &str)> = listens.iter().map(|l| (l.as_str(), "203.0.113.20:9000")).collect();
        Config::parse(&forwards(&pairs[..MAX_PORT_RANGES])).unwrap();
        let message = refused_listen(&forwards(&pairs), MAX_PORT_RANGES);
        assert!(message.contains("more than 16 port ranges"), "{message}");
        // A wildcard's ranges reach every address of its family.
        let mut mixed = pairs[..MAX_PORT_RANGES].to_vec();
        mixed[0].0 = "0.0.0.0:1000-1009";
        mixed.push(("192.0.2.2:30000-30009", "203.0.113.20:9000"));
        Config::parse(&forwards(&mixed)).expect("16 on 192.0.2.1 and 2 on 192.0.2.2");
        mixed.push(("0.0.0.0:40000-40009", "203.0.113.20:9000"));
        refused_listen(&forwards(&mixed), MAX_PORT_RANGES + 1);
    }

    fn refused_listen(text: &str, index: usize) -> String {
        let (_, field, message) = invalid(text);
        assert_eq!(field, format!("forward[{index}].listen"), "{message}");
        message
    }

    #[test]
    fn source_lists_parse_sorted_with_bare_addresses_as_hosts() {
        let c = Config::parse(&format!(
            "{CLASSIC}allow = [\"2001:db8:1::/48\", \"198.51.100.0/25\", \"198.51.100.0/25\"]\ndeny = [\"198.51.100.66\"]\n"
        ))
        .unwrap();
        let f = &c.forwards[0];
        let text = |l: &[IpNet]| l.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(text(&f.allow), ["198.51.100.0/25", "2001:db8:1::/48"], "sorted, the repeat gone");
        assert_eq!(text(&f.deny), ["198.51.100.66/32"], "a bare address is a host prefix");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(f.admits_source(ip("198.51.100.65")));
        assert!(!f.admits_source(ip("198.51.100.66")), "deny wins over allow");
        assert!(!f.admits_source(ip("198.51.100.130")), "not allowed");
        assert!(f.admits_source(ip("2001:db8:1:ff::9")));
        assert!(Config::parse(CLASSIC).unwrap().forwards[0].admits_source(ip("192.0.2.9")), "no lists: anyone");
        let deny_only = Config::parse(&format!("{CLASSIC}deny = [\"192.0.2.0/24\"]\n")).unwrap();
        assert!(deny_only.forwards[0].admits_source(ip("198.51.100.1")));
        assert!(!deny_only.forwards[0].admits_source(ip("192.0.2.1")));
    }

    #[test]
    fn bad_source_lists_name_line_field_and_entry() {
        let with = |lines: &str| format!("{CLASSIC}{lines}");
        let (line, field, message) =
            invalid(&with("allow = [\"198.51.100.0/25\", \"198.51.100.0/33\"]\ndeny = [\"192.0.2.1\"]\n"));
        assert_eq!((line, field.as_str()), (12, "forward[0].allow[1]"), "{message}");
        assert!(message.contains("198.51.100.0/33"), "{message}");
        let (line, field, message) = invalid(&with("deny = [\n  \"192.0.2.0/24\",\n  \"example.com\",\n]\n"));
        assert_eq!((line, field.as_str()), (14, "forward[0].deny[1]"), "{message}");
        let (_, field, message) = invalid(&with("allow = [\"198.51.100.5/24\"]\n"));
        assert_eq!(field, "forward[0].allow[0]");
        assert!(message.contains("write 198.51.100.0/24"), "host bits are refused, not guessed: {message}");
        let (_, field, message) = invalid(&with("allow = [\"::ffff:198.51.100.0/120\"]\n"));
        assert_eq!(field, "forward[0].allow[0]");
        assert!(message.contains("write 198.51.100.0/24"), "{message}");
        let (line, field, _) = invalid(&with("deny = []\n"));
        assert_eq!(
            (line, field.as_str()),
            (12, "forward[0].deny"),
            "an empty list would read as deny-all or allow-all"
        );
        let e = Config::parse(&with("allow = \"198.51.100.0/25\"\n")).unwrap_err().to_string();
        assert!(e.contains("line 12"), "a string where a list belongs: {e}");
        let node = format!(
            "{CLASSIC}\n[[node.w1.forward]]\nname = \"n\"\nprotocol = \"udp\"\nlisten = \"0.0.0.0:53\"\nbackend = \"192.0.2.53:53\"\nallow = [\"x\"]\n"
        );
        let e = Config::parse_for_node(&node, None).unwrap_err();
        assert!(e.to_string().contains("node.w1.forward[0].allow[0]"), "{e}");
    }

    /// The fast path takes no lists: a config with them is read by `toml`, the same way.
    #[test]
    fn fast_path_leaves_source_lists_to_toml() {
        for extra in ["allow = [\"198.51.100.0/25\"]\n", "deny = [\"198.51.100.66\"]\n", "allow = [\"x\"]\n"] {
            let text = PLAIN.replacen("local = false\n", &format!("local = false\n{extra}"), 1);
            assert!(fast::parse(&text).is_none(), "{extra}");
            let (fast, slow) = outcomes(&text);
            assert_eq!(fast, slow, "{extra}");
        }
    }

    fn outcomes(text: &str) -> (String, String) {
        fast_path_outcomes(text)
    }

    const PLAIN: &str = "[[interface]]\nname = \"eth0\"\nxdp = \"generic\"\nredirect = \"tc\"\noptional = true\n\n\
        [[forward]]\nname = \"web\"\nprotocol = \"tcp\"\nlisten = \"192.0.2.1:80\"\nbackend = \"203.0.113.1:8080\"\n\
        snat = \"198.51.100.7\"\nlocal = false\n\n\
        [[peer]]\naddress = \"198.51.100.20\"\ninterface = \"eth0\"\n\n\
        [conntrack]\nmax_entries = 1024\nsnat_ports = \"40000-40010\"\non_forward_removed = \"flush\"\n\
        tcp_handshake_timeout = 10\ntcp_established_timeout = 3600\ntcp_closing_timeout = 20\nudp_timeout = 30\n\
        gc_interval = 2\n\n[limits]\nmax_forwards = 16\n";

    #[test]
    fn fast_path_takes_plain_configs_and_agrees_with_toml() {
        for text in [CLASSIC, PLAIN, "", "# nothing\n\n"] {
            assert!(fast::parse(text).is_some(), "fast path refused:\n{text}");
            let (fast, slow) = outcomes(text);
            assert_eq!(fast, slow, "{text}");
        }
        let c = Config::parse(PLAIN).unwrap();
        assert_eq!(c.forwards[0].snat, Snat::Address("198.51.100.7".parse().unwrap()));
        assert!(!c.forwards[0].local);
        assert_eq!(
            (c.conntrack.on_forward_removed, c.conntrack.gc_interval, c.max_forwards),
            (OnForwardRemoved::Flush, 2, 16)
        );
        assert_eq!(c.interfaces[0].redirect, RedirectMode::Tc);
        assert!(c.interfaces[0].optional);
    }

    #[test]
    fn fast_path_never_accepts_what_toml_would_read_differently() {
        // (replace, by, whether the fast path takes the result)
        let edits: &[(&str, &str, bool)] = &[
            ("name = \"web\"", "name = \"web\" # a comment", true),
            ("name = \"web\"", "name = \"web\"#a comment", true),
            ("name = \"web\"", "name\t=\t\"web\"\t", true),
            ("name = \"web\"", "  name = \"web\"", true),
            ("name = \"web\"", "name = \"wéb\"", true),
            ("name = \"web\"", "name = \"w\\u0065b\"", false),
            ("name = \"web\"", "name = 'web'", false),
            ("name = \"web\"", "name = \"\"\"web\"\"\"", false),
            ("name = \"web\"", "name = \"web", false),
            ("name = \"web\"", "name = \"web\" \"x\"", false),
            ("name = \"web\"", "\"name\" = \"web\"", false),
            ("name = \"web\"", "forward.name = \"web\"", false),
            ("name = \"web\"", "name = \"web\"\nname = \"web2\"", false),
            ("name = \"web\"", "name = \"\"", true),
            ("name = \"web\"", "name = \"web\x01\"", false),
            ("name = \"web\"", "name=", false),
            ("name = \"web\"", "", false),
            ("name = \"web\"", "nam = \"web\"", false),
            ("protocol = \"tcp\"", "protocol = \"TCP\"", false),
            ("protocol = \"tcp\"", "protocol = 6", false),
            ("local = false", "local = true", true),
            ("local = false", "local = \"false\"", false),
            ("local = false", "local = False", false),
            ("local = false", "local = false#x", false),
            ("xdp = \"generic\"", "xdp = \"turbo\"", false),
            ("xdp = \"generic\"", "xdp = \"auto\"", true),
            ("redirect = \"tc\"", "redirect = \"xdp\"", true),
            ("redirect = \"tc\"", "redirect = \"auto\"", true),
            ("redirect = \"tc\"", "", true),
            ("optional = true", "optional = false", true),
            ("optional = true", "", true),
            ("optional = true", "optional = \"yes\"", false),
            ("xdp = \"generic\"", "", true),
            ("max_entries = 1024", "max_entries = 1024 # entries", true),
            ("max_entries = 1024", "max_entries = 1024#entries", false),
            ("max_entries = 1024", "max_entries = 01024", false),
            ("max_entries = 1024", "max_entries = +1024", false),
            ("max_entries = 1024", "max_entries = -1024", false),
            ("max_entries = 1024", "max_entries = 1_024", false),
            ("max_entries = 1024", "max_entries = 0x400", false),
            ("max_entries = 1024", "max_entries = 1024.0", false),
            ("max_entries = 1024", "max_entries = 0", true),
            ("max_entries = 1024", "max_entries = 4294967296", false),
            ("max_entries = 1024", "max_entries = \"1024\"", false),
            ("udp_timeout = 30", "udp_timeout = 9223372036854775807", true),
            ("udp_timeout = 30", "udp_timeout = 9223372036854775808", false),
            ("on_forward_removed = \"flush\"", "on_forward_removed = \"drain\"", true),
            ("on_forward_removed = \"flush\"", "on_forward_removed = \"keep\"", false),
            ("max_forwards = 16", "max_forwards = 0", true),
            ("max_forwards = 16", "max_forwards = 16\nmax_forwards = 17", false),
            ("max_forwards = 16", "max_forwards = 16\nextra = 1", false),
            ("[limits]", "[limits]\n[limits]", false),
            ("[limits]", "[conntrack]", false),
            ("[limits]", "[[limits]]", false),
            ("[conntrack]", "[conntrack] # the table", true),
            ("[[forward]]", "[[forward]] # a forward", true),
            ("[[forward]]", "[[forward]]#a forward", true),
            ("[[forward]]", "  [[forward]]", true),
            ("[[forward]]", "[[ forward ]]", false),
            ("[[forward]]", "[forward]", false),
            ("[[forward]]", "[[forward]] x", false),
            ("[[forward]]", "[[node.a.forward]]", false),
            ("[[forward]]", "[[forward]]\n[forward.x]", false),
            ("[[interface]]", "top = 1\n[[interface]]", false),
            ("[[interface]]", "\u{feff}[[interface]]", false),
            ("[[peer]]", "# \x7f\n[[peer]]", false),
            ("\n", "\r\n", false),
        ];
        for (from, to, fast_path) in edits {
            let text = PLAIN.replacen(from, to, 1);
            assert_ne!(text, PLAIN, "{from:?} not in PLAIN");
            let (fast, slow) = outcomes(&text);
            assert_eq!(fast, slow, "{from:?} -> {to:?}");
            assert_eq!(fast::parse(&text).is_some(), *fast_path, "{from:?} -> {to:?}");
        }
    }

    fn big_config(n: usize) -> String {
        let mut text = String::from("[limits]\nmax_forwards = 1048576\n");
        for i in 0..n {
            use std::fmt::Write;
            let (a, p) = (1 + i / 60_000, 1024 + i % 60_000);
            let _ = write!(
                text,
                "\n[[forward]]\nname = \"x{i}\"\nprotocol = \"udp\"\nlisten = \"198.51.100.{a}:{p}\"\nbackend = \"203.0.113.2:9\"\n"
            );
        }
        text
    }

    #[test]
    fn a_100k_forward_config_parses_and_errors_name_the_line() {
        let text = big_config(100_000);
        assert!(fast::parse(&text).is_some());
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.forwards.len(), 100_000);
        assert_eq!(c.forwards[99_999].listen, "198.51.100.2:41023".parse().unwrap());
        // The 50,000th forward (index 49,999) starts on line 3 + 6 * 49,999 + 1.
        let header = 3 + 6 * 49_999 + 1;
        let bad = text.replacen(
            "backend = \"203.0.113.2:9\"\n\n[[forward]]\nname = \"x49999\"",
            "backend = \"203.0.113.2:9\"\n\n[[forward]]\nname = \"x49999\"\nsnat = \"sometimes\"",
            1,
        );
        assert_eq!(
            invalid(&bad),
            (
                header + 2,
                "forward[49999].snat".to_string(),
                "\"sometimes\": expected \"auto\", \"off\" or an address of the backend's family".to_string()
            )
        );
        let dup = text.replacen("name = \"x49999\"", "name = \"x7\"", 1);
        assert_eq!(
            invalid(&dup),
            (header + 1, "forward[49999].name".to_string(), "forward name \"x7\" is used twice".to_string())
        );
        // A syntax mistake there is reported by toml, with its line.
        let e = Config::parse(&text.replacen("name = \"x49999\"", "name = x49999", 1)).unwrap_err().to_string();
        assert!(e.contains(&format!("line {}", header + 1)), "{e}");
    }
}
