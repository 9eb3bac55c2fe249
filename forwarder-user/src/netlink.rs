//! Everything forwarder asks the kernel's rtnetlink about, in one place: links (index, kind,
//! up), the namespace's addresses, neighbour entries, policy rules, and one event stream of
//! the route, rule, neighbour, link and address groups.
//!
//! One-shot questions are blocking (the loader and the reconciler are synchronous): a
//! request on a fresh `NETLINK_ROUTE` socket (`netlink-sys`), messages built and parsed
//! with `netlink-packet-route`. The event stream is asynchronous: an `rtnetlink` multicast
//! connection, its connection future run as a tokio task. Nothing here starts a process:
//! forwarder needs no `ip` (iproute2) at run time.

use std::net::IpAddr;

use futures_util::StreamExt;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
pub use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    rule::{RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// What can go wrong talking to rtnetlink.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {request}: {source}")]
    Kernel { request: &'static str, source: std::io::Error },
    #[error("netlink {request}: cannot parse the kernel's answer: {message}")]
    Decode { request: &'static str, message: String },
    #[error("netlink {request}: {message}")]
    Dump { request: &'static str, message: String },
    #[error("interface {0} not found in this network namespace")]
    NoSuchLink(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A network device of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "bridge", ...; None for a plain device (a NIC driver's).
    pub kind: Option<String>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// `IFLA_LINK_NETNSID` is present: the device's peer (a veth's other end) lives in
    /// another network namespace.
    pub peer_elsewhere: bool,
}

impl Link {
    /// A veth's far end only takes XDP frames if it runs XDP or GRO.
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    /// A veth whose other end is in another namespace: TC may send into that end's ingress
    /// directly (`bpf_redirect_peer`, which refuses a peer in the same namespace).
    pub fn is_veth_to_elsewhere(&self) -> bool {
        self.is_veth() && self.peer_elsewhere
    }
}

/// A neighbour (ARP / ND) entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub address: IpAddr,
    pub state: NeighbourState,
}

/// The neighbour state as `ip neigh` names it ("REACHABLE", "FAILED", ...): what the logs say.
pub fn state_name(state: NeighbourState) -> &'static str {
    match state {
        NeighbourState::Incomplete => "INCOMPLETE",
        NeighbourState::Reachable => "REACHABLE",
        NeighbourState::Stale => "STALE",
        NeighbourState::Delay => "DELAY",
        NeighbourState::Probe => "PROBE",
        NeighbourState::Failed => "FAILED",
        NeighbourState::Noarp => "NOARP",
        NeighbourState::Permanent => "PERMANENT",
        NeighbourState::None => "NONE",
        _ => "OTHER",
    }
}

/// Whether a neighbour in `state` can take packets now (None: no entry). STALE/DELAY/PROBE
/// entries are usable: the kernel confirms them as they are used and marks them FAILED if
/// the peer has gone.
pub fn usable(state: Option<NeighbourState>) -> bool {
    matches!(
        state,
        Some(
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        )
    )
}

/// Sends one request and collects the answers (every part of a dump).
fn request(request: &'static str, msg: RouteNetlinkMessage, dump: bool) -> Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
    socket.bind_auto().map_err(Error::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(Error::Socket)?;
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    nl.header.sequence_number = 1;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    socket.send(&buf, 0).map_err(|source| Error::Kernel { request, source })?;
    let mut out = Vec::new();
    loop {
        let (bytes, _) = socket.recv_from_full().map_err(|source| Error::Kernel { request, source })?;
        let mut offset = 0;
        while offset < bytes.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                .map_err(|e| Error::Decode { request, message: e.to_string() })?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => {
                    out.push(m);
                    if !dump {
                        return Ok(out);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => {
                        return Err(Error::Kernel { request, source: std::io::Error::from_raw_os_error(-code.get()) });
                    }
                    None => return Ok(out), // an acknowledgement
                },
                NetlinkPayload::Overrun(_) => {
                    return Err(Error::Dump { request, message: "the kernel's answer overran the buffer".into() });
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn link_of(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        peer_elsewhere: false,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::LinkNetNsId(_) => link.peer_elsewhere = true,
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|i| match i {
                    LinkInfo::Kind(InfoKind::Other(k)) => Some(k),
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    link
}

/// The device called `name` (RTM_GETLINK by name).
pub fn link(name: &str) -> Result<Link> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    get_link(msg, || name.to_string())
}

/// The device with index `index` (RTM_GETLINK by index).
pub fn link_by_index(index: u32) -> Result<Link> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    get_link(msg, || format!("with index {index}"))
}

/// One RTM_GETLINK; `what` names the device asked for when there is none.
fn get_link(msg: LinkMessage, what: impl FnOnce() -> String) -> Result<Link> {
    match request("get link", RouteNetlinkMessage::GetLink(msg), false) {
        Ok(answers) => answers
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(l)),
                _ => None,
            })
            .ok_or_else(|| Error::NoSuchLink(what())),
        Err(Error::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            Err(Error::NoSuchLink(what()))
        }
        Err(e) => Err(e),
    }
}

/// Every device of this namespace.
pub fn links() -> Result<Vec<Link>> {
    Ok(request("dump links", RouteNetlinkMessage::GetLink(LinkMessage::default()), true)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(link_of(l)),
            _ => None,
        })
        .collect())
}

/// Every address configured in this network namespace, sorted, without duplicates.
pub fn addresses() -> Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> =
        request("dump addresses", RouteNetlinkMessage::GetAddress(AddressMessage::default()), true)?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .flat_map(|a| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS the far end on a
                // point-to-point link); IPv6 sends only IFA_ADDRESS.
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                local.or_else(|| {
                    a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })
            })
            .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The neighbour entry of a RTM_NEWNEIGH/RTM_DELNEIGH message (a deleted one has no state).
fn neighbour_of(msg: &NeighbourMessage, deleted: bool) -> Option<Neighbour> {
    let address = msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let state = if deleted { NeighbourState::None } else { msg.header.state };
    Some(Neighbour { ifindex: msg.header.ifindex, address, state })
}

fn neighbours_of(msgs: impl IntoIterator<Item = RouteNetlinkMessage>) -> Vec<Neighbour> {
    msgs.into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => neighbour_of(&n, false),
            _ => None,
        })
        .collect()
}

/// Every IPv4 and IPv6 neighbour entry.
pub fn neighbours() -> Result<Vec<Neighbour>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        out.extend(neighbours_of(request("dump neighbours", RouteNetlinkMessage::GetNeighbour(msg), true)?));
    }
    Ok(out)
}

/// The kernel's neighbour state for `address` on device `ifindex`, if it has an entry.
pub fn neighbour_state(address: IpAddr, ifindex: u32) -> Result<Option<NeighbourState>> {
    Ok(neighbours()?.into_iter().find(|n| n.address == address && n.ifindex == ifindex).map(|n| n.state))
}

/// Whether a policy rule of this namespace (IPv4 or IPv6) matches on L4 ports (`ip rule ...
/// sport` / `dport`): then the FIB's answer may differ between two flows of the same
/// addresses.
pub fn rules_match_ports() -> Result<bool> {
    // One dump of every family's rules (AF_UNSPEC): asking for AF_INET6 by name fails with
    // EAFNOSUPPORT on a host booted without IPv6, which has no IPv6 rules to find.
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Unspec;
    let rules = request("dump rules", RouteNetlinkMessage::GetRule(msg), true)?;
    Ok(rules.iter().any(|m| matches!(m, RouteNetlinkMessage::NewRule(r) if rule_matches_ports(r))))
}

fn rule_matches_ports(rule: &RuleMessage) -> bool {
    rule.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::SourcePortRange(_) | RuleAttribute::DestinationPortRange(_)))
}

/// What one read of the event stream saw.
#[derive(Debug, Default)]
pub struct Batch {
    /// A route, rule, neighbour, link or address changed: cached next hops are stale.
    pub changed: bool,
    /// A policy rule was added or removed (RTM_NEWRULE / RTM_DELRULE).
    pub rules: bool,
    /// Events were lost (the socket's queue overflowed): whatever is derived from the
    /// kernel's state must be read again. `changed` is set too.
    pub lost: bool,
    /// A device was added, changed, moved or removed (RTM_NEWLINK / RTM_DELLINK; a veth end
    /// that moves to another namespace leaves as a RTM_DELLINK of this one).
    pub links: bool,
    /// Neighbour entries that changed, in order (a deleted one with state NONE).
    pub neighbours: Vec<Neighbour>,
}

/// The rtnetlink event stream of this namespace: route, rule, neighbour, link and address
/// groups.
pub struct Events {
    messages: futures_channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl Events {
    /// Subscribes; the connection runs as a tokio task (call inside a runtime).
    pub fn subscribe() -> Result<Self> {
        use rtnetlink::MulticastGroup::*;
        let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
            Link, Neigh, Ipv4Ifaddr, Ipv6Ifaddr, Ipv4Route, Ipv6Route, Ipv4Rule, Ipv6Rule,
        ])
        .map_err(Error::Socket)?;
        tokio::spawn(conn);
        Ok(Self { messages })
    }

    /// Waits for the next events and takes every one already queued with them; None when
    /// the stream has ended.
    pub async fn next(&mut self) -> Option<Batch> {
        let first = self.messages.next().await?;
        let mut batch = Batch::default();
        classify(first.0, &mut batch);
        while let Ok((msg, _)) = self.messages.try_recv() {
            classify(msg, &mut batch);
        }
        Some(batch)
    }
}

/// Sorts one event into `batch`.
fn classify(msg: NetlinkMessage<RouteNetlinkMessage>, batch: &mut Batch) {
    match msg.payload {
        NetlinkPayload::Overrun(_) => {
            batch.lost = true;
            batch.changed = true;
        }
        NetlinkPayload::InnerMessage(m) => {
            use RouteNetlinkMessage::*;
            match &m {
                NewNeighbour(n) => batch.neighbours.extend(neighbour_of(n, false)),
                DelNeighbour(n) => batch.neighbours.extend(neighbour_of(n, true)),
                NewLink(_) | DelLink(_) => batch.links = true,
                NewRule(_) | DelRule(_) => batch.rules = true,
                _ => {}
            }
            if matches!(
                m,
                NewNeighbour(_)
                    | DelNeighbour(_)
                    | NewRoute(_)
                    | DelRoute(_)
                    | NewLink(_)
                    | DelLink(_)
                    | NewAddress(_)
                    | DelAddress(_)
                    | NewRule(_)
                    | DelRule(_)
            ) {
                batch.changed = true;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_that_take_packets() {
        use NeighbourState::*;
        for s in [Reachable, Stale, Delay, Probe, Permanent, Noarp] {
            assert!(usable(Some(s)), "{s:?}");
        }
        for s in [Some(Failed), Some(Incomplete), Some(None), Some(Other(0x80)), Option::None] {
            assert!(!usable(s), "{s:?}");
        }
        assert_eq!(state_name(Reachable), "REACHABLE");
        assert_eq!(state_name(Failed), "FAILED");
    }

    fn neigh_msg(ifindex: u32, dst: NeighbourAddress, state: NeighbourState) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.ifindex = ifindex;
        m.header.state = state;
        m.attributes.push(NeighbourAttribute::Destination(dst));
        m
    }

    #[test]
    fn events_are_sorted_into_a_batch() {
        let mut batch = Batch::default();
        let v4 = "198.51.100.20".parse().unwrap();
        let v6: std::net::Ipv6Addr = "2001:db8::20".parse().unwrap();
        classify(
            NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(neigh_msg(
                3,
                NeighbourAddress::Inet(v4),
                NeighbourState::Reachable,
            ))),
            &mut batch,
        );
        classify(
            NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(neigh_msg(
                4,
                NeighbourAddress::Inet6(v6),
                NeighbourState::Stale,
            ))),
            &mut batch,
        );
        assert!(batch.changed && !batch.lost && !batch.links);
        assert_eq!(
            batch.neighbours,
            vec![
                Neighbour { ifindex: 3, address: IpAddr::V4(v4), state: NeighbourState::Reachable },
                Neighbour { ifindex: 4, address: IpAddr::V6(v6), state: NeighbourState::None },
            ]
        );

        let mut batch = Batch::default();
        classify(NetlinkMessage::from(RouteNetlinkMessage::NewLink(LinkMessage::default())), &mut batch);
        assert!(batch.changed && batch.links && batch.neighbours.is_empty());

        let mut batch = Batch::default();
        classify(NetlinkMessage::from(RouteNetlinkMessage::DelLink(LinkMessage::default())), &mut batch);
        assert!(batch.changed && batch.links);

        let mut batch = Batch::default();
        classify(NetlinkMessage::from(RouteNetlinkMessage::NewAddress(AddressMessage::default())), &mut batch);
        assert!(batch.changed && !batch.links);

        let mut batch = Batch::default();
        classify(NetlinkMessage::from(RouteNetlinkMessage::DelRule(RuleMessage::default())), &mut batch);
        assert!(batch.changed && batch.rules && !batch.links);

        let mut batch = Batch::default();
        classify(NetlinkMessage::new(Default::default(), NetlinkPayload::Overrun(Vec::new())), &mut batch);
        assert!(batch.changed && batch.lost);
    }

    #[test]
    fn rules_with_port_ranges_are_told_apart() {
        use netlink_packet_route::rule::RulePortRange;
        let mut rule = RuleMessage::default();
        rule.attributes.push(RuleAttribute::Table(100));
        assert!(!rule_matches_ports(&rule));
        for a in [
            RuleAttribute::SourcePortRange(RulePortRange { start: 40000, end: 40999 }),
            RuleAttribute::DestinationPortRange(RulePortRange { start: 53, end: 53 }),
        ] {
            let mut with = rule.clone();
            with.attributes.push(a);
            assert!(rule_matches_ports(&with));
        }
    }

    #[test]
    fn a_link_is_found_by_index() {
        // Every namespace's loopback device has index 1.
        let lo = link_by_index(1).unwrap();
        assert_eq!((lo.index, lo.name.as_str(), lo.is_veth()), (1, "lo", false));
        assert!(matches!(link_by_index(u32::MAX >> 1), Err(Error::NoSuchLink(_))));
    }

    #[test]
    fn link_kind_comes_from_link_info() {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.header.flags = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName("fwd-a".into()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]));
        let l = link_of(m);
        assert_eq!((l.index, l.name.as_str(), l.up, l.is_veth()), (7, "fwd-a", true, true));
        // Its peer in this namespace: no IFLA_LINK_NETNSID, no redirect into the peer.
        assert!(!l.is_veth_to_elsewhere());
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]));
        m.attributes.push(LinkAttribute::LinkNetNsId(3));
        assert!(link_of(m).is_veth_to_elsewhere(), "a veth to another namespace");
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Vxlan)]));
        m.attributes.push(LinkAttribute::LinkNetNsId(3));
        assert!(!link_of(m).is_veth_to_elsewhere(), "only a veth has a peer to send into");
        assert!(!link_of(LinkMessage::default()).is_veth());
    }
}
