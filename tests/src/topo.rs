//! client ─ veth ─ router ─ veth ─ server, with documentation addresses:
//!
//! ```text
//! client 192.0.2.2/24 ── c0 ═ rc ── router 192.0.2.1/24 | 203.0.113.1/24 ── rs ═ s0 ── server 203.0.113.20/24
//! ```
//! The client's default route points at the router. The server has no route back to the
//! client unless asked (`server_route_via_router`), so with SNAT off nothing comes back
//! unless it passes the router. The far ends (c0, s0) are left as a container's would be.

use anyhow::Result;

use crate::netns::{Netns, unique_tag};

pub const CLIENT_ADDR: &str = "192.0.2.2";
pub const ROUTER_CLIENT_ADDR: &str = "192.0.2.1";
pub const ROUTER_SERVER_ADDR: &str = "203.0.113.1";
pub const SERVER_ADDR: &str = "203.0.113.20";
/// Router-side device names (inside the router namespace).
pub const ROUTER_CLIENT_DEV: &str = "rc";
pub const ROUTER_SERVER_DEV: &str = "rs";

pub struct Chain {
    pub tag: String,
    // Field order is drop order: the router goes last, after the ends.
    pub client: Netns,
    pub server: Netns,
    pub router: Netns,
}

impl Chain {
    pub fn new() -> Result<Self> {
        let tag = unique_tag();
        let client = Netns::new(&format!("fwt-{tag}-c"))?;
        let server = Netns::new(&format!("fwt-{tag}-s"))?;
        let router = Netns::new(&format!("fwt-{tag}-r"))?;
        router.ip(&["link", "add", ROUTER_CLIENT_DEV, "type", "veth", "peer", "name", "c0", "netns", &client.name])?;
        router.ip(&["link", "add", ROUTER_SERVER_DEV, "type", "veth", "peer", "name", "s0", "netns", &server.name])?;
        router.ip(&["addr", "add", &format!("{ROUTER_CLIENT_ADDR}/24"), "dev", ROUTER_CLIENT_DEV])?;
        router.ip(&["addr", "add", &format!("{ROUTER_SERVER_ADDR}/24"), "dev", ROUTER_SERVER_DEV])?;
        router.ip(&["link", "set", ROUTER_CLIENT_DEV, "up"])?;
        router.ip(&["link", "set", ROUTER_SERVER_DEV, "up"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "c0"])?;
        client.ip(&["link", "set", "c0", "up"])?;
        client.ip(&["route", "add", "default", "via", ROUTER_CLIENT_ADDR])?;
        server.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "s0"])?;
        server.ip(&["link", "set", "s0", "up"])?;
        Ok(Self { tag, client, server, router })
    }

    /// Gives the server a route to the client network through the router (SNAT off).
    pub fn server_route_via_router(&self) -> Result<()> {
        self.server.ip(&["route", "add", "192.0.2.0/24", "via", ROUTER_SERVER_ADDR]).map(|_| ())
    }

    /// The netfilter control of a forward: iptables DNAT of `protocol` to the router's
    /// `listen_port` onto `backend`, and MASQUERADE out of the server's side.
    pub fn iptables_dnat_masquerade(&self, protocol: &str, listen_port: u16, backend: &str) -> Result<()> {
        for rule in [
            format!("-t nat -A PREROUTING -p {protocol} --dport {listen_port} -j DNAT --to-destination {backend}"),
            format!("-t nat -A POSTROUTING -o {ROUTER_SERVER_DEV} -j MASQUERADE"),
        ] {
            crate::netns::run_ok(self.router.cmd("iptables").args(rule.split(' ')))?;
        }
        Ok(())
    }
}

/// The two-ISP same-switch topology of the peer shortcut:
///
/// ```text
///            ┌──────────── switch (bridge br0) ────────────┐
///   A 192.0.2.10/25   GW-A 192.0.2.1/25   GW-B 198.51.100.1/24   B 198.51.100.20/24
///                        │ 203.0.113.1/30         │ 203.0.113.5/30
///                        └──── internet 203.0.113.2 | .6 ────┘
/// ```
/// A's default route is GW-A, B's is GW-B, so without help A → B crosses both ISPs.
pub struct TwoIsp {
    pub tag: String,
    pub a: Netns,
    pub b: Netns,
    pub gw_a: Netns,
    pub gw_b: Netns,
    pub internet: Netns,
    pub switch: Netns,
}

pub const A_ADDR: &str = "192.0.2.10";
pub const B_ADDR: &str = "198.51.100.20";
/// Host-side device of A and B (on the switch).
pub const A_DEV: &str = "a0";
pub const B_DEV: &str = "b0";

impl TwoIsp {
    pub fn new() -> Result<Self> {
        let tag = unique_tag();
        let n = |s: &str| Netns::new(&format!("fwt-{tag}-{s}"));
        let t =
            Self { a: n("a")?, b: n("b")?, gw_a: n("ga")?, gw_b: n("gb")?, internet: n("in")?, switch: n("sw")?, tag };
        t.switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        t.switch.ip(&["link", "set", "br0", "up"])?;
        // Each host's leg on the switch.
        for (ns, dev, port, addr) in [
            (&t.a, A_DEV, "pa", "192.0.2.10/25"),
            (&t.gw_a, "s0", "pga", "192.0.2.1/25"),
            (&t.gw_b, "s0", "pgb", "198.51.100.1/24"),
            (&t.b, B_DEV, "pb", "198.51.100.20/24"),
        ] {
            t.switch.ip(&["link", "add", port, "type", "veth", "peer", "name", dev, "netns", &ns.name])?;
            t.switch.ip(&["link", "set", port, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // The ISPs' uplinks to the internet.
        for (gw, port, gw_addr, in_addr) in
            [(&t.gw_a, "ia", "203.0.113.1/30", "203.0.113.2/30"), (&t.gw_b, "ib", "203.0.113.5/30", "203.0.113.6/30")]
        {
            t.internet.ip(&["link", "add", port, "type", "veth", "peer", "name", "up0", "netns", &gw.name])?;
            t.internet.ip(&["addr", "add", in_addr, "dev", port])?;
            t.internet.ip(&["link", "set", port, "up"])?;
            gw.ip(&["addr", "add", gw_addr, "dev", "up0"])?;
            gw.ip(&["link", "set", "up0", "up"])?;
            gw.sysctl("net.ipv4.ip_forward", "1")?;
        }
        t.internet.sysctl("net.ipv4.ip_forward", "1")?;
        t.gw_a.ip(&["route", "add", "default", "via", "203.0.113.2"])?;
        t.gw_b.ip(&["route", "add", "default", "via", "203.0.113.6"])?;
        t.internet.ip(&["route", "add", "192.0.2.0/25", "via", "203.0.113.1"])?;
        t.internet.ip(&["route", "add", "198.51.100.0/24", "via", "203.0.113.5"])?;
        t.a.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        t.b.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
        Ok(t)
    }

    /// Packets a namespace has forwarded (Ip ForwDatagrams of /proc/net/snmp).
    pub fn forwarded(ns: &Netns) -> Result<u64> {
        let snmp = ns.sh("cat /proc/net/snmp")?;
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "ForwDatagrams")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no ForwDatagrams in /proc/net/snmp"))
    }

    /// Adds IPv6 to the topology: A 2001:db8:a::10/64 (GW-A ::1), B 2001:db8:b::20/64
    /// (GW-B ::1), uplinks 2001:db8:f1::/64 and 2001:db8:f2::/64.
    pub fn with_ipv6(self) -> Result<Self> {
        for (ns, dev, addr) in [
            (&self.a, A_DEV, "2001:db8:a::10/64"),
            (&self.gw_a, "s0", "2001:db8:a::1/64"),
            (&self.gw_b, "s0", "2001:db8:b::1/64"),
            (&self.b, B_DEV, "2001:db8:b::20/64"),
            (&self.gw_a, "up0", "2001:db8:f1::1/64"),
            (&self.internet, "ia", "2001:db8:f1::2/64"),
            (&self.gw_b, "up0", "2001:db8:f2::1/64"),
            (&self.internet, "ib", "2001:db8:f2::2/64"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev, "nodad"])?;
        }
        for ns in [&self.gw_a, &self.gw_b, &self.internet] {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        self.a.ip(&["-6", "route", "add", "default", "via", "2001:db8:a::1"])?;
        self.b.ip(&["-6", "route", "add", "default", "via", "2001:db8:b::1"])?;
        self.gw_a.ip(&["-6", "route", "add", "default", "via", "2001:db8:f1::2"])?;
        self.gw_b.ip(&["-6", "route", "add", "default", "via", "2001:db8:f2::2"])?;
        self.internet.ip(&["-6", "route", "add", "2001:db8:a::/64", "via", "2001:db8:f1::1"])?;
        self.internet.ip(&["-6", "route", "add", "2001:db8:b::/64", "via", "2001:db8:f2::1"])?;
        Ok(self)
    }

    /// IPv6 packets a namespace has forwarded (Ip6OutForwDatagrams of /proc/net/snmp6).
    pub fn forwarded6(ns: &Netns) -> Result<u64> {
        let snmp = ns.sh("cat /proc/net/snmp6")?;
        snmp.lines()
            .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams").map(|v| v.trim().parse().unwrap_or(0)))
            .ok_or_else(|| anyhow::anyhow!("no Ip6OutForwDatagrams"))
    }

    pub fn gateways_forwarded(&self) -> Result<u64> {
        Ok(Self::forwarded(&self.gw_a)? + Self::forwarded(&self.gw_b)?)
    }
}

/// client ─ router ─ mid ─ server, dual stack, for PMTU and TTL-expiry tests: the mid
/// router's link to the server can have a smaller MTU, and packets can expire at mid.
///
/// ```text
/// client 192.0.2.2 2001:db8:1::2 ── rc | router | rm 198.51.100.1 2001:db8:3::1 ──
///   mr 198.51.100.2 2001:db8:3::2 | mid | ms 203.0.113.1 2001:db8:2::1 ── s0 server 203.0.113.20 2001:db8:2::20
/// ```
pub struct Line {
    pub tag: String,
    pub client: Netns,
    pub server: Netns,
    pub mid: Netns,
    pub router: Netns,
}

pub const LINE_ROUTER_V6: &str = "2001:db8:1::1";
pub const LINE_SERVER_V6: &str = "2001:db8:2::20";
pub const LINE_MID_V4: &str = "198.51.100.2";

impl Line {
    /// `mid_mtu`: MTU of mid's interface towards the server (the far end keeps 1500, so
    /// the server's MSS does not reveal the narrow link: only PMTU discovery does).
    pub fn new(mid_mtu: u32) -> Result<Self> {
        let tag = unique_tag();
        let client = Netns::new(&format!("fwt-{tag}-c"))?;
        let server = Netns::new(&format!("fwt-{tag}-s"))?;
        let mid = Netns::new(&format!("fwt-{tag}-m"))?;
        let router = Netns::new(&format!("fwt-{tag}-r"))?;
        router.ip(&["link", "add", "rc", "type", "veth", "peer", "name", "c0", "netns", &client.name])?;
        router.ip(&["link", "add", "rm", "type", "veth", "peer", "name", "mr", "netns", &mid.name])?;
        mid.ip(&["link", "add", "ms", "type", "veth", "peer", "name", "s0", "netns", &server.name])?;
        mid.ip(&["link", "set", "ms", "mtu", &mid_mtu.to_string()])?;
        for (ns, dev, addrs) in [
            (&client, "c0", ["192.0.2.2/24", "2001:db8:1::2/64"]),
            (&router, "rc", ["192.0.2.1/24", "2001:db8:1::1/64"]),
            (&router, "rm", ["198.51.100.1/24", "2001:db8:3::1/64"]),
            (&mid, "mr", ["198.51.100.2/24", "2001:db8:3::2/64"]),
            (&mid, "ms", ["203.0.113.1/24", "2001:db8:2::1/64"]),
            (&server, "s0", ["203.0.113.20/24", "2001:db8:2::20/64"]),
        ] {
            for a in addrs {
                ns.ip(&["addr", "add", a, "dev", dev, "nodad"])?;
            }
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for ns in [&router, &mid] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        client.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"])?;
        router.ip(&["route", "add", "203.0.113.0/24", "via", "198.51.100.2"])?;
        router.ip(&["-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:3::2"])?;
        server.ip(&["route", "add", "default", "via", "203.0.113.1"])?;
        server.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::1"])?;
        Ok(Self { tag, client, server, mid, router })
    }
}
