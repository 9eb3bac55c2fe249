//! The contenders: each a way to get the client's traffic to the server through the router,
//! set up on a fresh [`BenchTopo`] and torn down with it.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, DevMap},
    programs::XdpMode,
};
use forwarder_tests::{
    Daemon, Netns,
    netns::run_ok,
    topo::{ROUTER_CLIENT_ADDR, ROUTER_CLIENT_DEV, ROUTER_SERVER_DEV, SERVER_ADDR},
};
use serde::Serialize;

use super::topology::{
    Addressing, BenchTopo, CHURN_BACKEND_PORT, CHURN_LISTEN_PORT, ECHO_BACKEND_PORT, ECHO_LISTEN_PORT,
    IPERF_BACKEND_PORT, IPERF_LISTEN_PORT, SNAT_ADDR, UDP_BACKEND_PORT, UDP_LISTEN_PORT, load_bench_object, load_xdp,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    KernelRouting,
    Iptables,
    Nftables,
    Socat,
    ForwarderTc,
    ForwarderXdpGeneric,
    ForwarderXdpNative,
    RedirectOnly,
}

impl Contender {
    pub const ALL: [Contender; 8] = [
        Contender::KernelRouting,
        Contender::Iptables,
        Contender::Nftables,
        Contender::Socat,
        Contender::ForwarderTc,
        Contender::ForwarderXdpGeneric,
        Contender::ForwarderXdpNative,
        Contender::RedirectOnly,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Contender::KernelRouting => "kernel-routing",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
            Contender::Socat => "socat",
            Contender::ForwarderTc => "forwarder-tc",
            Contender::ForwarderXdpGeneric => "forwarder-xdp-generic",
            Contender::ForwarderXdpNative => "forwarder-xdp-native",
            Contender::RedirectOnly => "redirect-only",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Contender::KernelRouting => "kernel routing, no NAT (the floor of work)",
            Contender::Iptables => "iptables DNAT + SNAT (iptables-nft)",
            Contender::Nftables => "nftables DNAT + SNAT",
            Contender::Socat => "socat userspace proxy",
            Contender::ForwarderTc => "forwarder, TC only",
            Contender::ForwarderXdpGeneric => "forwarder, XDP generic",
            Contender::ForwarderXdpNative => "forwarder, XDP native",
            Contender::RedirectOnly => "redirect-only XDP (the ceiling)",
        }
    }

    /// Why some figures cannot exist for this contender, if so.
    pub fn limitation(self) -> Option<&'static str> {
        match self {
            Contender::RedirectOnly => Some(
                "TCP figures n/a: a program that only redirects cannot carry a locally-sent TCP conversation over \
                 veth (the sender's CHECKSUM_PARTIAL state is lost by XDP_REDIRECT, so the server drops every \
                 segment); it is the ceiling of the packet-rate figures.",
            ),
            _ => None,
        }
    }

    pub fn carries_tcp(self) -> bool {
        self.limitation().is_none()
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }

    pub fn addressing(self) -> Addressing {
        match self {
            Contender::KernelRouting | Contender::RedirectOnly => Addressing::Direct,
            _ => Addressing::Forward,
        }
    }

    /// Sets the contender up on `topo`, with `extra_forwards` more forwards or rules than the
    /// bench's own (rule scaling; ignored by contenders without rules).
    pub fn start(self, topo: &BenchTopo, extra_forwards: usize) -> Result<Running> {
        let router = &topo.chain.router;
        let mut running = Running::default();
        match self {
            Contender::KernelRouting => {}
            Contender::Iptables => {
                run_with_stdin(&mut router.cmd("iptables-restore"), &iptables_rules(extra_forwards))?;
            }
            Contender::Nftables => {
                run_with_stdin(router.cmd("nft").args(["-f", "-"]), &nft_rules(extra_forwards))?;
            }
            Contender::Socat => running.processes = start_socat(router)?,
            Contender::ForwarderTc => {
                running.daemon =
                    Some(Daemon::start(router, &topo.chain.tag, &forwarder_config("off", extra_forwards))?);
            }
            Contender::ForwarderXdpGeneric => {
                let config = forwarder_config("generic", extra_forwards);
                running.daemon = Some(Daemon::start(router, &topo.chain.tag, &config)?);
            }
            Contender::ForwarderXdpNative => {
                let config = forwarder_config("native", extra_forwards);
                running.daemon = Some(Daemon::start(router, &topo.chain.tag, &config)?);
            }
            Contender::RedirectOnly => {
                let (server_mac, router_mac, egress) =
                    (topo.server_mac, topo.router_server_mac, topo.router_server_ifindex);
                running.ceiling = Some(router.run(move || attach_redirect_only(server_mac, router_mac, egress))??);
            }
        }
        Ok(running)
    }
}

/// What keeps a contender running; dropping it stops processes and detaches programs.
#[derive(Default)]
pub struct Running {
    pub daemon: Option<Daemon>,
    processes: Vec<ProcessGroup>,
    ceiling: Option<Ebpf>,
}

impl Running {
    /// Process ids of the contender's own processes (socat), whose CPU time is the
    /// contender's.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|p| p.child.id()).collect()
    }

    /// Every process of the contender on the router: socat's, and forwarder's daemon (which
    /// expires connections and frees their SNAT ports).
    pub fn router_pids(&self) -> Vec<u32> {
        let mut pids = self.pids();
        pids.extend(self.daemon.as_ref().and_then(|d| d.pid()));
        pids
    }
}

/// A process started in its own process group, killed with the group on drop (socat forks a
/// child per TCP connection).
pub struct ProcessGroup {
    child: Child,
}

impl ProcessGroup {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let child = cmd
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self { child })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Waits until something in `ns` listens on TCP or UDP `port`.
pub fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let needle = format!(":{port} ");
    while Instant::now() < deadline {
        if run_ok(ns.cmd("ss").args(["-Hlntu"]))?.contains(&needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} in {}", ns.name)
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Forwards of the rule-scaling runs besides the bench's own: distinct (address, port) pairs
/// on 198.51.100.0/24 that no traffic matches.
pub fn extra_forwards(count: usize) -> impl Iterator<Item = (Ipv4Addr, u16)> {
    const PORTS_PER_ADDR: usize = 60_000;
    (0..count)
        .map(|i| (Ipv4Addr::new(198, 51, 100, 1 + (i / PORTS_PER_ADDR) as u8), 1024 + (i % PORTS_PER_ADDR) as u16))
}

/// The bench's forwards: (protocol, listen port, backend port).
pub const FORWARDS: [(&str, u16, u16); 4] = [
    ("udp", UDP_LISTEN_PORT, UDP_BACKEND_PORT),
    ("tcp", IPERF_LISTEN_PORT, IPERF_BACKEND_PORT),
    ("tcp", ECHO_LISTEN_PORT, ECHO_BACKEND_PORT),
    ("tcp", CHURN_LISTEN_PORT, CHURN_BACKEND_PORT),
];

/// forwarder's config: the bench's forwards plus `extra` unused ones, on both router devices.
/// In native mode XDP may redirect into the veths: every receiver here runs XDP or has GRO on.
pub fn forwarder_config(xdp: &str, extra: usize) -> String {
    let redirect = if xdp == "native" { "xdp" } else { "auto" };
    let mut c = String::new();
    for dev in [ROUTER_CLIENT_DEV, ROUTER_SERVER_DEV] {
        let _ = writeln!(c, "[[interface]]\nname = \"{dev}\"\nxdp = \"{xdp}\"\nredirect = \"{redirect}\"\n");
    }
    let _ = writeln!(c, "[limits]\nmax_forwards = {}\n", FORWARDS.len() + extra);
    for (proto, listen, backend) in FORWARDS {
        let _ = writeln!(
            c,
            "[[forward]]\nname = \"{proto}{listen}\"\nprotocol = \"{proto}\"\nlisten = \"{ROUTER_CLIENT_ADDR}:{listen}\"\nbackend = \"{SERVER_ADDR}:{backend}\"\nsnat = \"auto\"\n"
        );
    }
    for (i, (addr, port)) in extra_forwards(extra).enumerate() {
        let _ = writeln!(
            c,
            "[[forward]]\nname = \"x{i}\"\nprotocol = \"udp\"\nlisten = \"{addr}:{port}\"\nbackend = \"{SERVER_ADDR}:9\"\n"
        );
    }
    c
}

/// The same forwards as iptables-restore input: one DNAT rule each, one SNAT rule.
pub fn iptables_rules(extra: usize) -> String {
    let mut r = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    for (proto, listen, backend) in FORWARDS {
        let _ = writeln!(
            r,
            "-A PREROUTING -d {ROUTER_CLIENT_ADDR}/32 -p {proto} --dport {listen} -j DNAT --to-destination {SERVER_ADDR}:{backend}"
        );
    }
    for (addr, port) in extra_forwards(extra) {
        let _ =
            writeln!(r, "-A PREROUTING -d {addr}/32 -p udp --dport {port} -j DNAT --to-destination {SERVER_ADDR}:9");
    }
    let _ = writeln!(r, "-A POSTROUTING -o {ROUTER_SERVER_DEV} -j SNAT --to-source {SNAT_ADDR}\nCOMMIT");
    r
}

/// The same forwards as an nft script: one DNAT rule each (as iptables, no map), one SNAT rule.
pub fn nft_rules(extra: usize) -> String {
    let mut r = String::from(
        "table ip bench {\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n",
    );
    for (proto, listen, backend) in FORWARDS {
        let _ = writeln!(r, "  ip daddr {ROUTER_CLIENT_ADDR} {proto} dport {listen} dnat to {SERVER_ADDR}:{backend}");
    }
    for (addr, port) in extra_forwards(extra) {
        let _ = writeln!(r, "  ip daddr {addr} udp dport {port} dnat to {SERVER_ADDR}:9");
    }
    let _ = write!(
        r,
        " }}\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"{ROUTER_SERVER_DEV}\" snat to {SNAT_ADDR}\n }}\n}}\n"
    );
    r
}

/// socat on the router: one process per forward, as an `ssh -L` or a sidecar proxy would be.
/// UDP one way (`-u`, one socket for every flow): a forking UDP listener would start a
/// process per flow. TCP listeners with the backlog the bench's own servers have (128):
/// socat's default of 5 overflows under the churn workload's 32 clients, and the
/// handshakes it drops become response timeouts.
fn start_socat(router: &Netns) -> Result<Vec<ProcessGroup>> {
    let mut procs = Vec::new();
    let mut udp = router.cmd("socat");
    udp.args([
        "-u",
        &format!("UDP4-RECV:{UDP_LISTEN_PORT},bind={ROUTER_CLIENT_ADDR},rcvbuf=4194304"),
        &format!("UDP4-SENDTO:{SERVER_ADDR}:{UDP_BACKEND_PORT}"),
    ]);
    procs.push(ProcessGroup::spawn(udp)?);
    for (listen, backend) in [
        (IPERF_LISTEN_PORT, IPERF_BACKEND_PORT),
        (ECHO_LISTEN_PORT, ECHO_BACKEND_PORT),
        (CHURN_LISTEN_PORT, CHURN_BACKEND_PORT),
    ] {
        let mut tcp = router.cmd("socat");
        tcp.args([
            &format!("TCP4-LISTEN:{listen},bind={ROUTER_CLIENT_ADDR},fork,reuseaddr,nodelay,backlog=128"),
            &format!("TCP4:{SERVER_ADDR}:{backend},nodelay"),
        ]);
        procs.push(ProcessGroup::spawn(tcp)?);
    }
    for port in [UDP_LISTEN_PORT, IPERF_LISTEN_PORT, ECHO_LISTEN_PORT, CHURN_LISTEN_PORT] {
        wait_listening(router, port)?;
    }
    Ok(procs)
}

/// Runs in the router namespace: the ceiling program on rc, redirecting to rs.
fn attach_redirect_only(server_mac: [u8; 6], router_mac: [u8; 6], egress: u32) -> Result<Ebpf> {
    let mut ebpf = load_bench_object()?;
    let mut l2 = [0u8; 12];
    l2[..6].copy_from_slice(&server_mac);
    l2[6..].copy_from_slice(&router_mac);
    Array::<_, [u8; 12]>::try_from(ebpf.map_mut("BENCH_L2").context("BENCH_L2")?)?.set(0, l2, 0)?;
    DevMap::try_from(ebpf.map_mut("BENCH_TX").context("BENCH_TX")?)?
        .set(0, egress, None, 0)
        .map_err(|e| anyhow::anyhow!("devmap: {e}"))?;
    load_xdp(&mut ebpf, "bench_redirect_only")?.attach(ROUTER_CLIENT_DEV, XdpMode::Driver)?;
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_sets_have_one_rule_per_forward() {
        let extra = 5;
        assert_eq!(iptables_rules(extra).matches("-j DNAT").count(), FORWARDS.len() + extra);
        assert_eq!(nft_rules(extra).matches(" dnat to ").count(), FORWARDS.len() + extra);
        let cfg = forwarder::config::Config::parse(&forwarder_config("native", extra)).unwrap();
        assert_eq!(cfg.forwards.len(), FORWARDS.len() + extra);
    }

    #[test]
    fn extra_forwards_are_distinct() {
        let all: std::collections::HashSet<_> = extra_forwards(100_000).collect();
        assert_eq!(all.len(), 100_000);
        assert!(all.iter().all(|(a, _)| a.octets()[..3] == [198, 51, 100]));
    }

    #[test]
    fn contender_ids_round_trip() {
        for c in Contender::ALL {
            assert_eq!(Contender::from_id(c.id()), Some(c));
        }
    }
}
