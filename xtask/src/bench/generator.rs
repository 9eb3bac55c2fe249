//! The packet generator: the bench object's `bench_trafficgen` run with BPF_PROG_TEST_RUN in
//! live-frames mode from a thread in the client namespace, as xdp-trafficgen does (Debian's
//! xdp-trafficgen does not load on this kernel). Each repetition sends one small UDP frame
//! with full checksums out of c0 (XDP_TX); the program varies the source port over N flows.
//! For the new-flows workload it sends TCP SYNs instead, each from a source (address, port)
//! of its own: the ports 1024..=65535, then the same from the client subnet's next address.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use etherparse::{PacketBuilder, PacketBuilderStep, TcpOptionElement, UdpHeader};

use super::{
    stats::thread_cpu_time,
    topology::{BenchTopo, load_bench_object, load_xdp},
};

/// Ethernet + IPv4 + UDP header the program rewrites on every frame.
const HEADER_LEN: usize = 14 + 20 + 8;
/// Ethernet + IPv4 + TCP with the MSS option: the SYN's header, rewritten on every frame.
const SYN_HEADER_LEN: usize = 14 + 20 + 24;
/// Ethernet + IPv6 + UDP header the program rewrites on every frame of the IPv6 workload.
const UDP6_HEADER_LEN: usize = 14 + 40 + 8;
/// The generator's config as the program reads it (`GenConfig` of forwarder-bench.rs):
/// header template (up to 62 bytes, in 64), flows, ports per source address, kind, padding.
const CONFIG_LEN: usize = 80;
const KIND_UDP: u32 = 0;
const KIND_TCP: u32 = 1;
const KIND_UDP6: u32 = 2;
/// Minimum Ethernet frame, FCS excluded.
const MIN_FRAME: usize = 60;
/// Payload that makes a minimum-size (60-byte, FCS excluded) Ethernet frame.
const PAYLOAD_LEN: usize = 18;
/// First source port; flow k uses BASE_SPORT + k.
const BASE_SPORT: u16 = 10_000;
/// Source ports of the SYNs: 1024..=65535 from each source address.
const SYN_FIRST_SPORT: u16 = 1024;
pub const SYN_PORTS: u32 = 65_536 - SYN_FIRST_SPORT as u32;
/// Last byte of the SYNs' last source address: the client's /24 up to .254 (.255 is its
/// broadcast address). The router routes the subnet out of its client veth, so every one
/// passes its reverse-path check.
const SYN_LAST_HOST: u8 = 254;
/// Every live-frames call sets up and tears down a page pool, which sleeps: calls of a few
/// frames would leave the CPU idle and understate the rate. So calls last about CALL_TIME
/// each, sized from the rate measured so far.
const CALL_TIME: Duration = Duration::from_millis(200);
const FIRST_CALL: u32 = 65_536;
/// The SYN generator's first call: a router that NATs them may take tens of µs per SYN once
/// the SNAT ports fill, and a first call of [`FIRST_CALL`] frames would then run for seconds,
/// far past the workload's duration.
const FIRST_CALL_SYNS: u32 = 4096;
/// SYNs per repetition at most: fewer than forwarder's SNAT ports toward the one backend
/// (36,280 with the default ephemeral range; netfilter has 64,512), so the figures are the
/// cost of new flows the router can take, not of running out of ports (where each further
/// SYN makes the NAT search the whole port range and then drops it).
pub const SYN_BUDGET: u64 = 30_000;
/// Frames per live batch (the kernel's default NAPI budget).
const BATCH: u32 = 64;

pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
    /// Frames of the first live-frames call, and the fewest of any call.
    first_call: u32,
    /// Frames per run at most (the SYNs' [`SYN_BUDGET`]).
    budget: Option<u64>,
}

/// What one generator run offered.
#[derive(Clone, Copy, Debug)]
pub struct Offered {
    pub frames: u64,
    pub elapsed: Duration,
    /// CPU time of the generator thread. Under tick accounting this includes the softirq
    /// work that runs in its context: the whole XDP or netfilter path of its frames.
    pub cpu: Duration,
}

impl Generator {
    /// A generator of `flows` UDP flows from the client to `target` (address, port).
    pub fn new(topo: &BenchTopo, target: ([u8; 4], u16), flows: u32) -> Result<Self> {
        let client = client_address()?;
        let frame = udp_frame(topo.client_mac, topo.router_client_mac, (client, BASE_SPORT), target)?;
        Self::load(frame, KIND_UDP, flows.max(1), flows.max(1), FIRST_CALL, None)
    }

    /// [`Generator::new`] over IPv6: `flows` UDP flows from the client's IPv6 address
    /// ([`CLIENT_ADDR_V6`](super::topology::CLIENT_ADDR_V6)) to `target`.
    pub fn new_v6(topo: &BenchTopo, target: ([u8; 16], u16), flows: u32) -> Result<Self> {
        let client: std::net::Ipv6Addr = super::topology::CLIENT_ADDR_V6.parse()?;
        let frame = udp6_frame(topo.client_mac, topo.router_client_mac, (client.octets(), BASE_SPORT), target)?;
        Self::load(frame, KIND_UDP6, flows.max(1), flows.max(1), FIRST_CALL, None)
    }

    /// A generator of TCP SYNs from the client's subnet to `target`, each from a source
    /// (address, port) of its own, [`Generator::syn_flows`] of them before one repeats.
    pub fn syns(topo: &BenchTopo, target: ([u8; 4], u16)) -> Result<Self> {
        let client = client_address()?;
        let frame = syn_frame(topo.client_mac, topo.router_client_mac, (client, SYN_FIRST_SPORT), target)?;
        Self::load(frame, KIND_TCP, Self::syn_flows()?, SYN_PORTS, FIRST_CALL_SYNS, Some(SYN_BUDGET))
    }

    /// Distinct SYNs: every source port of every source address from the client's up.
    pub fn syn_flows() -> Result<u32> {
        let addresses = u32::from(SYN_LAST_HOST.saturating_sub(client_address()?[3])) + 1;
        Ok(addresses * SYN_PORTS)
    }

    fn load(frame: Vec<u8>, kind: u32, flows: u32, ports: u32, first_call: u32, budget: Option<u64>) -> Result<Self> {
        let header_len = match kind {
            KIND_TCP => SYN_HEADER_LEN,
            KIND_UDP6 => UDP6_HEADER_LEN,
            _ => HEADER_LEN,
        };
        let mut ebpf = load_bench_object()?;
        let mut config = [0u8; CONFIG_LEN];
        config[..header_len].copy_from_slice(&frame[..header_len]);
        for (at, v) in [(64, flows), (68, ports), (72, kind)] {
            config[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        }
        let mut gen_config: Array<_, [u8; CONFIG_LEN]> =
            Array::try_from(ebpf.map_mut("BENCH_GEN").context("BENCH_GEN")?)?;
        gen_config.set(0, config, 0)?;
        load_xdp(&mut ebpf, "bench_trafficgen")?;
        Ok(Self { ebpf, frame, first_call, budget })
    }

    /// Starts the flows over: the next frame is the first run's first again.
    pub fn rewind(&mut self) -> Result<()> {
        let map = self.ebpf.map_mut("BENCH_GEN_SEQ").context("BENCH_GEN_SEQ")?;
        let mut seq: Array<_, u64> = Array::try_from(map)?;
        seq.set(0, 0, 0).context("rewinding the generator")?;
        Ok(())
    }

    /// Sends frames as fast as one thread can for `duration` (or until its budget is sent).
    pub fn run(&self, topo: &BenchTopo, duration: Duration) -> Result<Offered> {
        let prog: &Xdp = self.ebpf.program("bench_trafficgen").context("generator program")?.try_into()?;
        let (frame, first_call, budget) = (&self.frame, self.first_call, self.budget.unwrap_or(u64::MAX));
        let ifindex = topo.client_ifindex;
        topo.chain.client.run_scoped(move || -> Result<Offered> {
            let ctx = super::testrun::xdp_md(frame.len(), ifindex);
            let cpu_start = thread_cpu_time();
            let start = Instant::now();
            let mut frames = 0u64;
            let mut next_call = first_call;
            while let Some(remaining) = duration.checked_sub(start.elapsed()) {
                let per_call = next_call.min(budget.saturating_sub(frames).min(u32::MAX as u64) as u32);
                if per_call == 0 {
                    break;
                }
                prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat: per_call,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..TestRunOptions::default()
                })
                .context("live-frames test run")?;
                frames += per_call as u64;
                let rate = frames as f64 / start.elapsed().as_secs_f64();
                next_call = (rate * remaining.min(CALL_TIME).as_secs_f64()).clamp(first_call as f64, 1e8) as u32;
            }
            Ok(Offered { frames, elapsed: start.elapsed(), cpu: thread_cpu_time() - cpu_start })
        })?
    }
}

/// A minimum-size UDP frame with full IPv4 and UDP checksums (etherparse computes them).
pub fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Result<Vec<u8>> {
    udp_frame_ttl(src_mac, dst_mac, src, dst, 64)
}

/// [`udp_frame`] with the given TTL.
pub fn udp_frame_ttl(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
) -> Result<Vec<u8>> {
    with_payload(PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.0, dst.0, ttl).udp(src.1, dst.1))
}

/// [`udp_frame`] over IPv6 (hop limit 64): the same payload, so 80 bytes.
pub fn udp6_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> Result<Vec<u8>> {
    udp6_frame_hops(src_mac, dst_mac, src, dst, 64)
}

/// [`udp6_frame`] with the given hop limit.
pub fn udp6_frame_hops(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    hops: u8,
) -> Result<Vec<u8>> {
    with_payload(PacketBuilder::ethernet2(src_mac, dst_mac).ipv6(src.0, dst.0, hops).udp(src.1, dst.1))
}

/// The frame `builder` describes with the bench's zero payload (checksums computed).
fn with_payload(builder: PacketBuilderStep<UdpHeader>) -> Result<Vec<u8>> {
    let payload = [0u8; PAYLOAD_LEN];
    let mut frame = Vec::with_capacity(builder.size(PAYLOAD_LEN));
    builder.write(&mut frame, &payload)?;
    Ok(frame)
}

fn client_address() -> Result<[u8; 4]> {
    Ok(forwarder_tests::topo::CLIENT_ADDR.parse::<std::net::Ipv4Addr>()?.octets())
}

/// A TCP SYN (with the MSS option, as real ones carry) with full IPv4 and TCP checksums,
/// padded with zeros to a minimum-size Ethernet frame as a NIC pads it.
pub fn syn_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1, 64_240)
        .syn()
        .options(&[TcpOptionElement::MaximumSegmentSize(1460)])
        .map_err(|e| anyhow::anyhow!("TCP options: {e:?}"))?;
    let mut frame = Vec::with_capacity(MIN_FRAME);
    builder.write(&mut frame, &[])?;
    frame.resize(frame.len().max(MIN_FRAME), 0);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    #[test]
    fn frame_is_minimum_size_with_valid_checksums() {
        let f = udp_frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], ([192, 0, 2, 2], BASE_SPORT), ([192, 0, 2, 1], 7000))
            .unwrap();
        assert_eq!(f.len(), 60);
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
        assert_eq!(ip.header().destination(), [192, 0, 2, 1]);
        let Some(TransportSlice::Udp(udp)) = &p.transport else { panic!("not UDP") };
        assert_eq!((udp.source_port(), udp.destination_port()), (BASE_SPORT, 7000));
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let udp_header = udp.to_header();
        assert_eq!(udp_header.checksum, udp_header.calc_checksum_ipv4(&header, udp.payload()).unwrap());
    }

    #[test]
    fn syn_is_minimum_size_with_valid_checksums() {
        let f =
            syn_frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], ([192, 0, 2, 2], 1024), ([192, 0, 2, 1], 9000)).unwrap();
        assert_eq!(f.len(), 60);
        // The header the program rewrites is all of the IPv4 packet; the rest is padding.
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize + 14, SYN_HEADER_LEN);
        assert!(f[SYN_HEADER_LEN..].iter().all(|b| *b == 0));
        assert_eq!(checked_syn(&f), ([192, 0, 2, 2], 1024, 9000));
    }

    /// A SYN's source address, source and destination ports, once its checksums and flags
    /// are checked.
    fn checked_syn(frame: &[u8]) -> ([u8; 4], u16, u16) {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else { panic!("not TCP") };
        assert!(tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin());
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let tcp_header = tcp.to_header();
        assert_eq!(tcp_header.checksum, tcp_header.calc_checksum_ipv4(&header, tcp.payload()).unwrap());
        (header.source, tcp.source_port(), tcp.destination_port())
    }

    /// The program's rewrite (run here without live frames, output read back): each frame
    /// a new source port, past `ports` of them the next source address, checksums valid.
    /// Needs root, as the other tests that load programs.
    #[test]
    fn generator_program_rewrites_syns_with_valid_checksums() {
        use aya::programs::{TestRun, TestRunOptions, Xdp};
        let template =
            syn_frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], ([192, 0, 2, 2], 1024), ([192, 0, 2, 1], 9000)).unwrap();
        let generator = Generator::load(template.clone(), KIND_TCP, 6, 2, 1, None).unwrap();
        let prog: &Xdp = generator.ebpf.program("bench_trafficgen").unwrap().try_into().unwrap();
        let mut sources = Vec::new();
        for _ in 0..7 {
            let mut out = vec![0u8; template.len()];
            // The input differs from the template: the program writes every header byte.
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&[0xee; 60]),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .unwrap();
            assert_eq!(r.return_value, 3, "XDP_TX");
            let (source, sport, dport) = checked_syn(&out);
            assert_eq!((&source[..3], dport), (&[192, 0, 2][..], 9000));
            sources.push((source[3], sport));
        }
        assert_eq!(sources, [(2, 1024), (2, 1025), (3, 1024), (3, 1025), (4, 1024), (4, 1025), (2, 1024)]);
    }

    /// The IPv6 UDP generator: each frame the next source port, the UDP checksum valid.
    #[test]
    fn generator_program_rewrites_ipv6_udp_with_valid_checksums() {
        use aya::programs::{TestRun, TestRunOptions, Xdp};
        let (src, dst) = (
            [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        );
        let template = udp6_frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], (src, BASE_SPORT), (dst, 7000)).unwrap();
        assert_eq!(template.len(), 80);
        let generator = Generator::load(template.clone(), KIND_UDP6, 3, 3, 1, None).unwrap();
        let prog: &Xdp = generator.ebpf.program("bench_trafficgen").unwrap().try_into().unwrap();
        // The header differs from the template (the program writes every header byte); the
        // payload, which it leaves as it is, is the template's.
        let mut input = template.clone();
        input[..UDP6_HEADER_LEN].fill(0xee);
        let mut ports = Vec::new();
        for _ in 0..4 {
            let mut out = vec![0u8; template.len()];
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&input),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .unwrap();
            assert_eq!(r.return_value, 3, "XDP_TX");
            let p = SlicedPacket::from_ethernet(&out).unwrap();
            let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
            let Some(TransportSlice::Udp(udp)) = &p.transport else { panic!("not UDP") };
            let header = ip.header().to_header();
            assert_eq!((header.source, header.destination, udp.destination_port()), (src, dst, 7000));
            let udp_header = udp.to_header();
            assert_eq!(udp_header.checksum, udp_header.calc_checksum_ipv6(&header, udp.payload()).unwrap());
            ports.push(udp.source_port());
        }
        assert_eq!(ports, [BASE_SPORT, BASE_SPORT + 1, BASE_SPORT + 2, BASE_SPORT]);
    }

    #[test]
    fn syns_cover_the_client_subnet_past_64k_tuples() {
        // From 192.0.2.2 to .254: 253 addresses of 64512 ports each.
        assert_eq!(Generator::syn_flows().unwrap(), 253 * 64_512);
        assert_eq!(SYN_PORTS, 64_512);
    }
}
