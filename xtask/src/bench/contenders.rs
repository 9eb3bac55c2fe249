//! The contenders: each a way to get the client's traffic to the server through the router,
//! set up on a fresh [`BenchTopo`] and torn down with it.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
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
    IPERF_BACKEND_PORT, IPERF_LISTEN_PORT, ROUTER_CLIENT_ADDR_V6, ROUTER_SERVER_ADDR_V6, SERVER_ADDR_V6, SNAT_ADDR,
    SYN_BACKEND_PORT, SYN_LISTEN_PORT, UDP_BACKEND_PORT, UDP_LISTEN_PORT, attach_tc_ingress, load_bench_object,
    load_xdp, udp_backend_addresses,
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
    RedirectOnlyGeneric,
    RedirectOnlyTc,
}

impl Contender {
    pub const ALL: [Contender; 10] = [
        Contender::KernelRouting,
        Contender::Iptables,
        Contender::Nftables,
        Contender::Socat,
        Contender::ForwarderTc,
        Contender::ForwarderXdpGeneric,
        Contender::ForwarderXdpNative,
        Contender::RedirectOnly,
        Contender::RedirectOnlyGeneric,
        Contender::RedirectOnlyTc,
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
            Contender::RedirectOnlyGeneric => "redirect-only-generic",
            Contender::RedirectOnlyTc => "redirect-only-tc",
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
            Contender::RedirectOnlyGeneric => {
                "redirect-only XDP in generic mode (the floor of any generic-XDP program)"
            }
            Contender::RedirectOnlyTc => "redirect-only TC ingress, bpf_redirect_peer (the floor of any TC program)",
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
            Contender::RedirectOnlyGeneric | Contender::RedirectOnlyTc => Some(
                "TCP figures n/a: a floor of the packet-rate figures, the ceiling's program (two MAC addresses and a \
                 redirect) in generic XDP or at TC ingress: the least any program in that place costs on this path, \
                 so forwarder's figures in the same mode less these are what forwarder's program adds.",
            ),
            _ => None,
        }
    }

    pub fn carries_tcp(self) -> bool {
        self.limitation().is_none()
    }

    /// Whether the new-flows workload (a SYN flood through the router, never answered)
    /// measures this contender: all but socat, a userspace proxy whose kernel answers each
    /// SYN itself, so the SYNs never reach the server (it cannot keep up with the flood
    /// anyway). The redirect-only ceiling forwards SYNs as any frame.
    pub fn forwards_syns(self) -> bool {
        self != Contender::Socat
    }

    /// Whether the IPv6 UDP workloads measure this contender: all but socat (a userspace
    /// proxy, a thousand times off the others' rates over IPv4 already).
    pub fn carries_ipv6(self) -> bool {
        self != Contender::Socat
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }

    pub fn addressing(self) -> Addressing {
        match self {
            Contender::KernelRouting
            | Contender::RedirectOnly
            | Contender::RedirectOnlyGeneric
            | Contender::RedirectOnlyTc => Addressing::Direct,
            _ => Addressing::Forward,
        }
    }

    /// Contenders of the many-backends workload: those that spread one forward over several
    /// backends (iptables by `statistic --mode nth`, forwarder by its Maglev table).
    pub const MANY_BACKENDS: [Contender; 3] =
        [Contender::Iptables, Contender::ForwarderTc, Contender::ForwarderXdpNative];

    /// Sets the contender up on `topo` with `rules`: the bench's forwards, more backends for
    /// its UDP forward, unused forwards for rule scaling (ignored by contenders without
    /// rules).
    pub fn start(self, topo: &BenchTopo, rules: Rules) -> Result<Running> {
        if rules.udp_backends > 1 {
            if !Self::MANY_BACKENDS.contains(&self) {
                bail!("{} has no several backends in this bench", self.id());
            }
            topo.add_server_addresses(&udp_backend_addresses(rules.udp_backends))?;
        }
        let router = &topo.chain.router;
        let mut running = Running::default();
        match self {
            Contender::KernelRouting => {}
            Contender::Iptables => {
                run_with_stdin(&mut router.cmd("iptables-restore"), &iptables_rules(rules))?;
                run_with_stdin(&mut router.cmd("ip6tables-restore"), &ip6tables_rules())?;
            }
            Contender::Nftables => {
                run_with_stdin(router.cmd("nft").args(["-f", "-"]), &nft_rules(rules)?)?;
            }
            Contender::Socat => running.processes = start_socat(router)?,
            Contender::ForwarderTc => {
                running.daemon = Some(Daemon::start(router, &topo.chain.tag, &forwarder_config("off", rules))?);
            }
            Contender::ForwarderXdpGeneric => {
                let config = forwarder_config("generic", rules);
                running.daemon = Some(Daemon::start(router, &topo.chain.tag, &config)?);
            }
            Contender::ForwarderXdpNative => {
                let config = forwarder_config("native", rules);
                running.daemon = Some(Daemon::start(router, &topo.chain.tag, &config)?);
            }
            Contender::RedirectOnly | Contender::RedirectOnlyGeneric | Contender::RedirectOnlyTc => {
                let (server_mac, router_mac, egress) =
                    (topo.server_mac, topo.router_server_mac, topo.router_server_ifindex);
                let place = match self {
                    Contender::RedirectOnly => Some(XdpMode::Driver),
                    Contender::RedirectOnlyGeneric => Some(XdpMode::Skb),
                    _ => None,
                };
                running.ceiling = Some(router.run(move || match place {
                    Some(mode) => attach_redirect_only(server_mac, router_mac, egress, mode),
                    None => attach_redirect_only_tc(server_mac, router_mac, egress),
                })??);
            }
        }
        Ok(running)
    }

    /// Empties the contender's connection table (between the new-flows workload's rounds):
    /// conntrack's in the router namespace for iptables and nftables (`conntrack -F`),
    /// forwarder's through its pinned maps (as `forwarder conntrack flush`); the others keep
    /// no connections.
    pub fn forget_connections(self, topo: &BenchTopo, running: &Running) -> Result<()> {
        match self {
            Contender::Iptables | Contender::Nftables => {
                run_ok(topo.chain.router.cmd("conntrack").args(["-F"]))?;
            }
            Contender::ForwarderTc | Contender::ForwarderXdpGeneric | Contender::ForwarderXdpNative => {
                let daemon = running.daemon.as_ref().context("forwarder runs without its daemon")?;
                forwarder::connections::flush(&daemon.pin_path, None)?;
            }
            Contender::KernelRouting
            | Contender::Socat
            | Contender::RedirectOnly
            | Contender::RedirectOnlyGeneric
            | Contender::RedirectOnlyTc => {}
        }
        Ok(())
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

/// What a contender installs: the bench's forwards, the UDP one with `udp_backends`
/// backends, and `extra_forwards` unused forwards of `extra_backends` backends each (rule
/// scaling). `redirect_into_veths`: forwarder's XDP native mode may XDP-redirect into the
/// veths (`redirect = "xdp"`), as on [`BenchTopo::new`]'s topology; otherwise it keeps its
/// default (`auto`), as it must on veths with their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub udp_backends: usize,
    pub extra_forwards: usize,
    pub extra_backends: usize,
    pub redirect_into_veths: bool,
}

impl Rules {
    /// The bench's forwards, one backend each.
    pub const BENCH: Rules = Rules { udp_backends: 1, extra_forwards: 0, extra_backends: 1, redirect_into_veths: true };

    /// [`Rules::BENCH`] for a topology with the veths' defaults.
    pub const VETH_DEFAULTS: Rules = Rules { redirect_into_veths: false, ..Rules::BENCH };

    /// The bench's forwards and `extra` unused forwards of one backend each.
    pub fn scaled(extra: usize) -> Self {
        Rules { extra_forwards: extra, ..Self::BENCH }
    }

    /// Backends of every forward together (what `limits.max_backends` must hold).
    pub fn total_backends(&self) -> usize {
        FORWARDS.len() - 1 + self.udp_backends + self.extra_forwards * self.extra_backends + FORWARDS_V6
    }
}

/// Forwards of the rule-scaling runs besides the bench's own: distinct (address, port) pairs
/// on 198.51.100.0/24 that no traffic matches.
pub fn extra_forwards(count: usize) -> impl Iterator<Item = (Ipv4Addr, u16)> {
    const PORTS_PER_ADDR: usize = 60_000;
    (0..count)
        .map(|i| (Ipv4Addr::new(198, 51, 100, 1 + (i / PORTS_PER_ADDR) as u8), 1024 + (i % PORTS_PER_ADDR) as u16))
}

/// Backends of unused forward number `forward`: one is the server's discard port, as
/// before; several are 203.0.113.100 and up, on a port that varies with the forward (so
/// forwards do not share backends, as distinct services would not).
pub fn extra_backends(forward: usize, count: usize) -> Vec<(Ipv4Addr, u16)> {
    if count == 1 {
        return vec![(SERVER_ADDR.parse().expect("literal address"), 9)];
    }
    let port = 1024 + (forward % 60_000) as u16;
    (0..count).map(|j| (Ipv4Addr::new(203, 0, 113, u8::try_from(100 + j).expect("few backends")), port)).collect()
}

/// The bench's forwards: (protocol, listen port, backend port).
pub const FORWARDS: [(&str, u16, u16); 5] = [
    ("udp", UDP_LISTEN_PORT, UDP_BACKEND_PORT),
    ("tcp", IPERF_LISTEN_PORT, IPERF_BACKEND_PORT),
    ("tcp", ECHO_LISTEN_PORT, ECHO_BACKEND_PORT),
    ("tcp", CHURN_LISTEN_PORT, CHURN_BACKEND_PORT),
    ("tcp", SYN_LISTEN_PORT, SYN_BACKEND_PORT),
];

/// The bench's IPv6 forward: UDP, the IPv4 one's ports, router to server over IPv6.
pub const FORWARDS_V6: usize = 1;

/// Backends of the bench's forward to `backend_port`: the UDP forward's are on the server's
/// first `rules.udp_backends` addresses; every other has the server's one address.
fn bench_backends(rules: Rules, backend_port: u16) -> Vec<(Ipv4Addr, u16)> {
    let count = if backend_port == UDP_BACKEND_PORT { rules.udp_backends } else { 1 };
    udp_backend_addresses(count).into_iter().map(|a| (a, backend_port)).collect()
}

/// One `[[forward]]` table: `backend = ` for one backend (the form of a config without
/// several), `[[forward.backends]]` tables (weight 1) for more.
fn write_forward(
    c: &mut String,
    name: &str,
    proto: &str,
    listen: impl std::fmt::Display,
    snat: bool,
    backends: &[(Ipv4Addr, u16)],
) {
    let _ = writeln!(c, "[[forward]]\nname = \"{name}\"\nprotocol = \"{proto}\"\nlisten = \"{listen}\"");
    if snat {
        let _ = writeln!(c, "snat = \"auto\"");
    }
    match backends {
        [(addr, port)] => {
            let _ = writeln!(c, "backend = \"{addr}:{port}\"");
        }
        several => {
            for (addr, port) in several {
                let _ = writeln!(c, "[[forward.backends]]\naddress = \"{addr}:{port}\"");
            }
        }
    }
    c.push('\n');
}

/// forwarder's config: the bench's forwards and the unused ones of `rules`, on both router
/// devices. In native mode XDP may redirect into the veths (unless `rules` says otherwise):
/// on the bench's topology every receiver runs XDP or has GRO on.
pub fn forwarder_config(xdp: &str, rules: Rules) -> String {
    let redirect = if xdp == "native" && rules.redirect_into_veths { "xdp" } else { "auto" };
    let mut c = String::new();
    for dev in [ROUTER_CLIENT_DEV, ROUTER_SERVER_DEV] {
        let _ = writeln!(c, "[[interface]]\nname = \"{dev}\"\nxdp = \"{xdp}\"\nredirect = \"{redirect}\"\n");
    }
    let max_forwards = FORWARDS.len() + FORWARDS_V6 + rules.extra_forwards;
    let _ = writeln!(c, "[limits]\nmax_forwards = {max_forwards}");
    // The backend maps are sized for one backend per forward by default.
    if rules.total_backends() > (forwarder_common::DEFAULT_MAX_BACKENDS as usize).max(max_forwards) {
        let _ = writeln!(c, "max_backends = {}", rules.total_backends());
    }
    c.push('\n');
    for (proto, listen, backend) in FORWARDS {
        let listen_at = format!("{ROUTER_CLIENT_ADDR}:{listen}");
        write_forward(&mut c, &format!("{proto}{listen}"), proto, listen_at, true, &bench_backends(rules, backend));
    }
    let _ = writeln!(
        c,
        "[[forward]]\nname = \"udp6\"\nprotocol = \"udp\"\nlisten = \"[{ROUTER_CLIENT_ADDR_V6}]:{UDP_LISTEN_PORT}\"\n\
         snat = \"auto\"\nbackend = \"[{SERVER_ADDR_V6}]:{UDP_BACKEND_PORT}\"\n"
    );
    for (i, (addr, port)) in extra_forwards(rules.extra_forwards).enumerate() {
        write_forward(
            &mut c,
            &format!("x{i}"),
            "udp",
            format!("{addr}:{port}"),
            false,
            &extra_backends(i, rules.extra_backends),
        );
    }
    c
}

/// iptables-restore lines that DNAT what `matcher` matches to `backends`: one rule for one
/// backend, else netfilter's round robin, a rule per backend with `statistic --mode nth`
/// (the k-th of n rules takes every (n-k)-th of the new connections the rules before it
/// left, so each backend gets 1/n).
fn dnat_rules(r: &mut String, matcher: &str, backends: &[(Ipv4Addr, u16)]) {
    let n = backends.len();
    for (k, (addr, port)) in backends.iter().enumerate() {
        let nth =
            if k + 1 < n { format!(" -m statistic --mode nth --every {} --packet 0", n - k) } else { String::new() };
        let _ = writeln!(r, "-A PREROUTING {matcher}{nth} -j DNAT --to-destination {addr}:{port}");
    }
}

/// The same forwards as iptables-restore input: DNAT rules per forward (see [`dnat_rules`]),
/// one SNAT rule.
pub fn iptables_rules(rules: Rules) -> String {
    let mut r = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    for (proto, listen, backend) in FORWARDS {
        dnat_rules(
            &mut r,
            &format!("-d {ROUTER_CLIENT_ADDR}/32 -p {proto} --dport {listen}"),
            &bench_backends(rules, backend),
        );
    }
    for (i, (addr, port)) in extra_forwards(rules.extra_forwards).enumerate() {
        dnat_rules(&mut r, &format!("-d {addr}/32 -p udp --dport {port}"), &extra_backends(i, rules.extra_backends));
    }
    let _ = writeln!(r, "-A POSTROUTING -o {ROUTER_SERVER_DEV} -j SNAT --to-source {SNAT_ADDR}\nCOMMIT");
    r
}

/// The IPv6 forward as ip6tables-restore input: DNAT and SNAT, as for IPv4.
pub fn ip6tables_rules() -> String {
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         -A PREROUTING -d {ROUTER_CLIENT_ADDR_V6}/128 -p udp --dport {UDP_LISTEN_PORT} -j DNAT --to-destination \
         [{SERVER_ADDR_V6}]:{UDP_BACKEND_PORT}\n\
         -A POSTROUTING -o {ROUTER_SERVER_DEV} -j SNAT --to-source {ROUTER_SERVER_ADDR_V6}\nCOMMIT\n"
    )
}

/// The same forwards as an nft script: one DNAT rule each (as iptables, no map), one SNAT
/// rule. One backend per forward only: the bench spreads over several with iptables.
pub fn nft_rules(rules: Rules) -> Result<String> {
    ensure!(rules.udp_backends == 1 && rules.extra_backends == 1, "nftables: one backend per forward only");
    let mut r = String::from(
        "table ip bench {\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n",
    );
    for (proto, listen, backend) in FORWARDS {
        let _ = writeln!(r, "  ip daddr {ROUTER_CLIENT_ADDR} {proto} dport {listen} dnat to {SERVER_ADDR}:{backend}");
    }
    for (addr, port) in extra_forwards(rules.extra_forwards) {
        let _ = writeln!(r, "  ip daddr {addr} udp dport {port} dnat to {SERVER_ADDR}:9");
    }
    let _ = write!(
        r,
        " }}\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"{ROUTER_SERVER_DEV}\" snat to {SNAT_ADDR}\n }}\n}}\n"
    );
    let _ = write!(
        r,
        "table ip6 bench6 {{\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
         ip6 daddr {ROUTER_CLIENT_ADDR_V6} udp dport {UDP_LISTEN_PORT} dnat to [{SERVER_ADDR_V6}]:{UDP_BACKEND_PORT}\n \
         }}\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  \
         oifname \"{ROUTER_SERVER_DEV}\" snat to {ROUTER_SERVER_ADDR_V6}\n }}\n}}\n"
    );
    Ok(r)
}

/// socat on the router: one process per forward, as an `ssh -L` or a sidecar proxy would be,
/// but for the new-flows workload's (see [`Contender::forwards_syns`]).
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
fn attach_redirect_only(server_mac: [u8; 6], router_mac: [u8; 6], egress: u32, mode: XdpMode) -> Result<Ebpf> {
    let mut ebpf = load_bench_object()?;
    set_next_hop(&mut ebpf, server_mac, router_mac)?;
    DevMap::try_from(ebpf.map_mut("BENCH_TX").context("BENCH_TX")?)?
        .set(0, egress, None, 0)
        .map_err(|e| anyhow::anyhow!("devmap: {e}"))?;
    load_xdp(&mut ebpf, "bench_redirect_only")?.attach(ROUTER_CLIENT_DEV, mode)?;
    Ok(ebpf)
}

/// Runs in the router namespace: the TC floor at the client side's ingress, sending into
/// the server's veth (`egress`, whose far end is in the server namespace) with
/// bpf_redirect_peer.
fn attach_redirect_only_tc(server_mac: [u8; 6], router_mac: [u8; 6], egress: u32) -> Result<Ebpf> {
    let mut ebpf = load_bench_object()?;
    set_next_hop(&mut ebpf, server_mac, router_mac)?;
    Array::<_, u32>::try_from(ebpf.map_mut("BENCH_TC_EGRESS").context("BENCH_TC_EGRESS")?)?.set(0, egress, 0)?;
    attach_tc_ingress(&mut ebpf, "bench_redirect_only_tc", ROUTER_CLIENT_DEV)?;
    Ok(ebpf)
}

/// The next hop's Ethernet header for the redirect-only programs: destination, source.
fn set_next_hop(ebpf: &mut Ebpf, server_mac: [u8; 6], router_mac: [u8; 6]) -> Result<()> {
    let mut l2 = [0u8; 12];
    l2[..6].copy_from_slice(&server_mac);
    l2[6..].copy_from_slice(&router_mac);
    Array::<_, [u8; 12]>::try_from(ebpf.map_mut("BENCH_L2").context("BENCH_L2")?)?.set(0, l2, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_sets_have_one_rule_per_forward() {
        let rules = Rules::scaled(5);
        assert_eq!(iptables_rules(rules).matches("-j DNAT").count(), FORWARDS.len() + 5);
        assert_eq!(nft_rules(rules).unwrap().matches(" dnat to ").count(), FORWARDS.len() + FORWARDS_V6 + 5);
        assert_eq!(ip6tables_rules().matches("-j DNAT").count(), FORWARDS_V6);
        let cfg = forwarder::config::Config::parse(&forwarder_config("native", rules)).unwrap();
        assert_eq!(cfg.forwards.len(), FORWARDS.len() + FORWARDS_V6 + 5);
        assert!(cfg.forwards.iter().all(|f| f.backends.len() == 1));
        assert_eq!(cfg.forwards.iter().filter(|f| f.listen.is_ipv6()).count(), FORWARDS_V6);
    }

    /// Which backend iptables' nth rules give each of `connections` new connections: every
    /// rule counts the connections that reach it and matches every `every`-th.
    fn nth_round_robin(rules: &str, connections: usize) -> Vec<String> {
        let parsed: Vec<(Option<usize>, String)> = rules
            .lines()
            .filter(|l| l.contains(&format!("--dport {UDP_LISTEN_PORT} ")))
            .map(|l| {
                let every = l.split_once("--every ").map(|(_, r)| r.split(' ').next().unwrap().parse().unwrap());
                (every, l.rsplit(' ').next().unwrap().to_string())
            })
            .collect();
        let mut seen = vec![0usize; parsed.len()];
        (0..connections)
            .map(|_| {
                for (k, (every, to)) in parsed.iter().enumerate() {
                    seen[k] += 1;
                    if every.is_none_or(|e| (seen[k] - 1).is_multiple_of(e)) {
                        return to.clone();
                    }
                }
                panic!("no rule matched")
            })
            .collect()
    }

    #[test]
    fn sixteen_backends_config_parses_and_iptables_spreads_evenly() {
        let rules = Rules { udp_backends: 16, ..Rules::BENCH };
        let cfg = forwarder::config::Config::parse(&forwarder_config("native", rules)).unwrap();
        let udp = cfg.forwards.iter().find(|f| f.listen.port() == UDP_LISTEN_PORT).unwrap();
        let addresses: std::collections::HashSet<_> = udp.backends.iter().map(|b| b.address).collect();
        assert_eq!(addresses.len(), 16);
        assert!(udp.backends.iter().all(|b| b.weight == 1 && b.address.port() == UDP_BACKEND_PORT));
        assert!(
            addresses.iter().all(|a| matches!(a.ip(), std::net::IpAddr::V4(v4) if v4.octets()[..3] == [203, 0, 113]))
        );
        assert!(cfg.forwards.iter().filter(|f| f.listen.port() != UDP_LISTEN_PORT).all(|f| f.backends.len() == 1));
        let iptables = iptables_rules(rules);
        assert_eq!(iptables.matches("-j DNAT").count(), FORWARDS.len() - 1 + 16);
        let mut per_backend: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for to in nth_round_robin(&iptables, 16 * 10) {
            *per_backend.entry(to).or_default() += 1;
        }
        assert_eq!(per_backend.len(), 16);
        assert!(per_backend.values().all(|n| *n == 10), "{per_backend:?}");
        assert!(nft_rules(rules).is_err(), "nftables is not a many-backends contender");
    }

    #[test]
    fn hundred_thousand_forwards_of_four_backends_parse_under_limits() {
        let own = FORWARDS.len() + FORWARDS_V6;
        let rules = Rules { extra_forwards: 100_000 - own, extra_backends: 4, ..Rules::BENCH };
        let text = forwarder_config("native", rules);
        let cfg = forwarder::config::Config::parse(&text).unwrap();
        assert_eq!(cfg.forwards.len(), 100_000);
        assert_eq!(cfg.max_backends as usize, rules.total_backends());
        let four: Vec<_> = cfg.forwards.iter().filter(|f| f.backends.len() == 4).collect();
        assert_eq!(four.len(), 100_000 - own);
        // Distinct within each forward, all on 203.0.113.0/24.
        assert!(
            four.iter()
                .all(|f| f.backends.iter().map(|b| b.address).collect::<std::collections::HashSet<_>>().len() == 4)
        );
        assert!(four.iter().flat_map(|f| &f.backends).all(|b| b.address.to_string().starts_with("203.0.113.")));
        // Without the raised limit forwards of four backends are refused once they exceed
        // the default (one backend per forward, at least 16384): 5000 of them do.
        let over_default = Rules { extra_forwards: 5_000, ..rules };
        let text = forwarder_config("native", over_default);
        assert!(text.contains(&format!("max_backends = {}\n", over_default.total_backends())));
        let unlimited = text.replace(&format!("max_backends = {}\n", over_default.total_backends()), "");
        let err = forwarder::config::Config::parse(&unlimited).unwrap_err().to_string();
        assert!(err.contains("limits.max_backends"), "{err}");
        let iptables = iptables_rules(rules);
        assert_eq!(iptables.matches("-j DNAT").count(), FORWARDS.len() + 4 * (100_000 - own));
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
