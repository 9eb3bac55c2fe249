//! The bench's sandbox: forwarder_tests' client ─ router ─ server chain, made ready for
//! packet-rate measurement. A fresh one per contender run, so no contender inherits another's
//! conntrack entries, rules or programs; dropping it removes everything.
//!
//! ```text
//! client 192.0.2.2 ── c0 ═ rc ── router 192.0.2.1 | 203.0.113.1 ── rs ═ s0 ── server 203.0.113.20
//!   generator (live frames, XDP_TX on c0)                            sink (XDP on s0: count + drop)
//! ```
//! - Static neighbours everywhere: no ARP during a run, and XDP's FIB lookups answer at once.
//! - GRO on c0, rc, rs: a veth takes XDP_REDIRECTed (and live-frame XDP_TX) frames only when
//!   it runs XDP or has GRO on; every contender gets the same receivers. The TCP figures turn
//!   GRO off on the router again ([`BenchTopo::router_gro`]): veths start without it, and
//!   forwarder's TC path stalls TCP on GRO-merged packets (see docs/bench/results.md).
//! - The sink on s0 counts the bench's UDP frames and drops them: the delivered rate is
//!   counted where a real server would receive, at a cost that is the same for everyone. It
//!   runs as XDP and again at TC ingress, where frames a router sends with
//!   `bpf_redirect_peer` (forwarder's TC path into a veth to another namespace) arrive
//!   without passing s0's XDP.
//! - The new-flows workload's SYNs go to a TCP forward of their own; the sink counts (and
//!   drops) TCP segments to its ports as it counts the UDP frames, so no SYN is answered.
//! - The TCP figure "veth defaults" runs on a topology made with
//!   [`BenchTopo::with_veth_defaults`]: no offload changed anywhere, and no sink (an XDP
//!   program on s0 would take GSO off its peer rs).
//! - IPv6 beside IPv4 (no DAD, static neighbours, forwarding on in the router): client
//!   2001:db8:1::2 ── router 2001:db8:1::1 | 2001:db8:2::1 ── server 2001:db8:2::20, for the
//!   IPv6 UDP workloads, counted by the sink as the IPv4 ones.
//! - The many-backends workload adds the server addresses 203.0.113.21 and up on s0
//!   ([`BenchTopo::add_server_addresses`]): the sink matches the UDP port, not the address,
//!   so it counts (and drops) the frames of every backend alike.

use super::cleanup;
use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use forwarder_tests::{
    Chain,
    topo::{CLIENT_ADDR, ROUTER_CLIENT_ADDR, ROUTER_CLIENT_DEV, ROUTER_SERVER_ADDR, ROUTER_SERVER_DEV, SERVER_ADDR},
};

/// Ports of the bench's forwards: what the client addresses on the router, and where the
/// server listens. Contenders without NAT are addressed at the server directly.
pub const UDP_LISTEN_PORT: u16 = 7000;
pub const UDP_BACKEND_PORT: u16 = 7001;
pub const IPERF_LISTEN_PORT: u16 = 5201;
pub const IPERF_BACKEND_PORT: u16 = 5202;
pub const ECHO_LISTEN_PORT: u16 = 8000;
pub const ECHO_BACKEND_PORT: u16 = 8001;
/// The connection-churn workload's own forward: its connections take SNAT ports and
/// connection-table entries of their own, not those the sequential connections left.
pub const CHURN_LISTEN_PORT: u16 = 8080;
pub const CHURN_BACKEND_PORT: u16 = 8081;
/// The new-flows workload's forward: SYNs only, counted and dropped by the sink.
pub const SYN_LISTEN_PORT: u16 = 9000;
pub const SYN_BACKEND_PORT: u16 = 9001;

/// The IPv6 addresses of the chain (see the module's picture).
pub const CLIENT_ADDR_V6: &str = "2001:db8:1::2";
pub const ROUTER_CLIENT_ADDR_V6: &str = "2001:db8:1::1";
pub const ROUTER_SERVER_ADDR_V6: &str = "2001:db8:2::1";
pub const SERVER_ADDR_V6: &str = "2001:db8:2::20";

pub const CLIENT_DEV: &str = "c0";
pub const SERVER_DEV: &str = "s0";

pub struct BenchTopo {
    // Field order is drop order: the sink's link goes before the namespaces.
    sink: Option<Ebpf>,
    pub chain: Chain,
    pub client_mac: [u8; 6],
    pub router_client_mac: [u8; 6],
    pub router_server_mac: [u8; 6],
    pub server_mac: [u8; 6],
    pub client_ifindex: u32,
    pub router_server_ifindex: u32,
    /// Last: unregistered once everything above is gone (see [`cleanup`]).
    _registration: cleanup::Registration,
}

impl BenchTopo {
    /// The bench's topology: GRO on where XDP frames arrive, the sink on s0.
    pub fn new() -> Result<Self> {
        Self::make(true)
    }

    /// The veths as they come: no offload changed in any namespace, no sink (so
    /// [`BenchTopo::delivered`] fails). Static neighbours as in [`BenchTopo::new`].
    pub fn with_veth_defaults() -> Result<Self> {
        Self::make(false)
    }

    fn make(bench_offloads: bool) -> Result<Self> {
        cleanup::check()?;
        let chain = Chain::new().context("creating the namespace sandbox")?;
        let registration = cleanup::Registration::new(&chain.tag);
        chain.server_route_via_router()?;
        let client_mac = chain.client.mac(CLIENT_DEV)?;
        let server_mac = chain.server.mac(SERVER_DEV)?;
        let router_client_mac = chain.router.mac(ROUTER_CLIENT_DEV)?;
        let router_server_mac = chain.router.mac(ROUTER_SERVER_DEV)?;
        let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        for (ns, dev, addr) in [
            (&chain.client, CLIENT_DEV, CLIENT_ADDR_V6),
            (&chain.router, ROUTER_CLIENT_DEV, ROUTER_CLIENT_ADDR_V6),
            (&chain.router, ROUTER_SERVER_DEV, ROUTER_SERVER_ADDR_V6),
            (&chain.server, SERVER_DEV, SERVER_ADDR_V6),
        ] {
            ns.ip(&["-6", "addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"])?;
        }
        chain.client.ip(&["-6", "route", "add", "default", "via", ROUTER_CLIENT_ADDR_V6])?;
        chain.server.ip(&["-6", "route", "add", "2001:db8:1::/64", "via", ROUTER_SERVER_ADDR_V6])?;
        chain.router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (ns, addr, lladdr, dev) in [
            (&chain.router, CLIENT_ADDR, mac(client_mac), ROUTER_CLIENT_DEV),
            (&chain.router, SERVER_ADDR, mac(server_mac), ROUTER_SERVER_DEV),
            (&chain.client, ROUTER_CLIENT_ADDR, mac(router_client_mac), CLIENT_DEV),
            (&chain.server, ROUTER_SERVER_ADDR, mac(router_server_mac), SERVER_DEV),
            (&chain.router, CLIENT_ADDR_V6, mac(client_mac), ROUTER_CLIENT_DEV),
            (&chain.router, SERVER_ADDR_V6, mac(server_mac), ROUTER_SERVER_DEV),
            (&chain.client, ROUTER_CLIENT_ADDR_V6, mac(router_client_mac), CLIENT_DEV),
            (&chain.server, ROUTER_SERVER_ADDR_V6, mac(router_server_mac), SERVER_DEV),
        ] {
            ns.ip(&["neigh", "replace", addr, "lladdr", &lladdr, "dev", dev, "nud", "permanent"])?;
        }
        if bench_offloads {
            forwarder_tests::netns::run_ok(chain.client.cmd("ethtool").args(["-K", CLIENT_DEV, "gro", "on"]))?;
        }
        let client_ifindex = chain.client.ifindex(CLIENT_DEV)?;
        let router_server_ifindex = chain.router.ifindex(ROUTER_SERVER_DEV)?;
        let sink = if bench_offloads { Some(chain.server.run(attach_sink)??) } else { None };
        let topo = Self {
            sink,
            chain,
            client_mac,
            router_client_mac,
            router_server_mac,
            server_mac,
            client_ifindex,
            router_server_ifindex,
            _registration: registration,
        };
        if bench_offloads {
            topo.router_gro(true)?;
        }
        Ok(topo)
    }

    /// GRO on or off on both router devices.
    pub fn router_gro(&self, on: bool) -> Result<()> {
        for dev in [ROUTER_CLIENT_DEV, ROUTER_SERVER_DEV] {
            let state = if on { "on" } else { "off" };
            forwarder_tests::netns::run_ok(self.chain.router.cmd("ethtool").args(["-K", dev, "gro", state]))?;
        }
        Ok(())
    }

    /// Puts `addresses` on the server's veth beside [`SERVER_ADDR`], with static neighbours
    /// on the router like the server's own address.
    pub fn add_server_addresses(&self, addresses: &[std::net::Ipv4Addr]) -> Result<()> {
        let server_mac = self.server_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        for a in addresses.iter().map(|a| a.to_string()).filter(|a| a != SERVER_ADDR) {
            self.chain.server.ip(&["addr", "add", &format!("{a}/24"), "dev", SERVER_DEV])?;
            self.chain.router.ip(&[
                "neigh",
                "replace",
                &a,
                "lladdr",
                &server_mac,
                "dev",
                ROUTER_SERVER_DEV,
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// Frames the client's veth could not hand to the router's receive ring so far: the
    /// generator's XDP_TX frames that found the ring (256 frames) full, lost before the
    /// router saw them (`ethtool -S c0`: the peer's `tx_queue_*_xdp_xmit_errors`).
    pub fn client_ring_refused(&self) -> Result<u64> {
        ring_refused(&self.chain.client.sh(&format!("ethtool -S {CLIENT_DEV}"))?)
    }

    /// Bench UDP frames and new-flow SYNs the server's sink has counted so far.
    pub fn delivered(&self) -> Result<u64> {
        let sink = self.sink.as_ref().context("a topology with the veth defaults has no sink")?;
        let map = sink.map("BENCH_SINK").context("sink map")?;
        let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(counts.get(&0, 0)?.iter().sum())
    }
}

/// The sum of a veth's `tx_queue_N_xdp_xmit_errors` in `ethtool -S` output (frames it sent
/// with XDP that its peer's receive ring refused).
fn ring_refused(ethtool_stats: &str) -> Result<u64> {
    let mut total = None;
    for line in ethtool_stats.lines() {
        let Some((name, value)) = line.trim().split_once(':') else { continue };
        if name.starts_with("tx_queue_") && name.ends_with("_xdp_xmit_errors") {
            *total.get_or_insert(0) += value.trim().parse::<u64>().with_context(|| format!("ethtool: {line}"))?;
        }
    }
    total.context("ethtool -S shows no tx_queue_*_xdp_xmit_errors (not a veth?)")
}

/// Loads a fresh copy of the bench helper object (each user gets its own maps).
pub fn load_bench_object() -> Result<Ebpf> {
    Ok(Ebpf::load(forwarder::BENCH_OBJECT)?)
}

/// Loads program `name` of a bench object into the kernel and returns it.
pub fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
    prog.load()?;
    Ok(prog)
}

/// Loads the bench object's TC program `name` and attaches it at `dev`'s ingress (in the
/// calling thread's namespace), with a clsact qdisc if the device has none.
pub fn attach_tc_ingress(ebpf: &mut Ebpf, name: &str, dev: &str) -> Result<()> {
    let _ = aya::programs::tc::qdisc_add_clsact(dev);
    let tc: &mut aya::programs::SchedClassifier =
        ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
    tc.load()?;
    tc.attach(dev, aya::programs::TcAttachType::Ingress).with_context(|| format!("attaching {name} to {dev}"))?;
    Ok(())
}

/// Runs in the server namespace: the counting sink in native mode on s0.
fn attach_sink() -> Result<Ebpf> {
    let mut ebpf = load_bench_object()?;
    let mut ports: Array<_, [u16; 2]> = Array::try_from(ebpf.map_mut("BENCH_PORTS").context("ports map")?)?;
    // Both ports: frames of contenders without NAT arrive still addressed to the listen port.
    ports.set(0, [UDP_LISTEN_PORT, UDP_BACKEND_PORT], 0)?;
    ports.set(1, [SYN_LISTEN_PORT, SYN_BACKEND_PORT], 0)?;
    load_xdp(&mut ebpf, "bench_sink")?.attach(SERVER_DEV, XdpMode::Driver).context("attaching the sink")?;
    // And at TC ingress: a router's bpf_redirect_peer delivers into s0's ingress past XDP.
    attach_tc_ingress(&mut ebpf, "bench_sink_tc", SERVER_DEV)?;
    Ok(ebpf)
}

/// Where a contender's client traffic is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// At the router's forward (NAT contenders).
    Forward,
    /// At the server itself (plain routing and the redirect-only ceiling: no NAT).
    Direct,
}

impl Addressing {
    pub fn udp_target(self) -> ([u8; 4], u16) {
        self.octets_target(UDP_LISTEN_PORT, UDP_BACKEND_PORT)
    }

    /// Where the IPv6 UDP workloads' frames go.
    pub fn udp6_target(self) -> ([u8; 16], u16) {
        let (addr, port) = match self {
            Addressing::Forward => (ROUTER_CLIENT_ADDR_V6, UDP_LISTEN_PORT),
            Addressing::Direct => (SERVER_ADDR_V6, UDP_BACKEND_PORT),
        };
        (addr.parse::<std::net::Ipv6Addr>().expect("literal address").octets(), port)
    }

    /// Where the new-flows workload's SYNs go.
    pub fn syn_target(self) -> ([u8; 4], u16) {
        self.octets_target(SYN_LISTEN_PORT, SYN_BACKEND_PORT)
    }

    /// [`Addressing::target`] as the generator takes it: address octets and port.
    fn octets_target(self, listen_port: u16, backend_port: u16) -> ([u8; 4], u16) {
        match self.target(listen_port, backend_port) {
            std::net::SocketAddr::V4(a) => (a.ip().octets(), a.port()),
            std::net::SocketAddr::V6(_) => unreachable!("IPv4 literals"),
        }
    }

    pub fn iperf_target(self) -> (&'static str, u16) {
        match self {
            Addressing::Forward => (ROUTER_CLIENT_ADDR, IPERF_LISTEN_PORT),
            Addressing::Direct => (SERVER_ADDR, IPERF_BACKEND_PORT),
        }
    }

    pub fn echo_target(self) -> std::net::SocketAddr {
        self.target(ECHO_LISTEN_PORT, ECHO_BACKEND_PORT)
    }

    pub fn churn_target(self) -> std::net::SocketAddr {
        self.target(CHURN_LISTEN_PORT, CHURN_BACKEND_PORT)
    }

    /// The forward on `listen_port` (NAT contenders) or the server on `backend_port`.
    fn target(self, listen_port: u16, backend_port: u16) -> std::net::SocketAddr {
        match self {
            Addressing::Forward => format!("{ROUTER_CLIENT_ADDR}:{listen_port}"),
            Addressing::Direct => format!("{SERVER_ADDR}:{backend_port}"),
        }
        .parse()
        .expect("literal address")
    }
}

/// The addresses of `count` UDP backends on the server: [`SERVER_ADDR`] (203.0.113.20) and
/// the ones after it.
pub fn udp_backend_addresses(count: usize) -> Vec<std::net::Ipv4Addr> {
    let first: std::net::Ipv4Addr = SERVER_ADDR.parse().expect("literal address");
    (0..count).map(|i| std::net::Ipv4Addr::from(u32::from(first) + i as u32)).collect()
}

/// The router's address on the server side (SNAT source of the NAT contenders).
pub const SNAT_ADDR: &str = ROUTER_SERVER_ADDR;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_frames_are_read_from_the_veth_stats() {
        let stats = "NIC statistics:\n     peer_ifindex: 2\n     rx_queue_0_xdp_packets: 9\n     \
                     rx_queue_0_xdp_tx_errors: 5\n     tx_queue_0_xdp_xmit: 1000\n     tx_queue_0_xdp_xmit_errors: 711\n     \
                     tx_queue_1_xdp_xmit_errors: 3\n";
        assert_eq!(ring_refused(stats).unwrap(), 714);
        assert!(ring_refused("NIC statistics:\n     rx_packets: 4\n").is_err());
    }
}
