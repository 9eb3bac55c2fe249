//! The packet generator: the bench object's `bench_trafficgen` run with BPF_PROG_TEST_RUN in
//! live-frames mode from a thread in the client namespace, as xdp-trafficgen does (Debian's
//! xdp-trafficgen does not load on this kernel). Each repetition sends one small UDP frame
//! with full checksums out of c0 (XDP_TX); the program varies the source port over N flows.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;

use super::{
    stats::thread_cpu_time,
    topology::{BenchTopo, load_bench_object, load_xdp},
};

/// Ethernet + IPv4 + UDP header the program rewrites on every frame.
const HEADER_LEN: usize = 14 + 20 + 8;
/// Payload that makes a minimum-size (60-byte, FCS excluded) Ethernet frame.
const PAYLOAD_LEN: usize = 18;
/// First source port; flow k uses BASE_SPORT + k.
const BASE_SPORT: u16 = 10_000;
/// Every live-frames call sets up and tears down a page pool, which sleeps: calls of a few
/// frames would leave the CPU idle and understate the rate. So calls last about CALL_TIME
/// each, sized from the rate measured so far.
const CALL_TIME: Duration = Duration::from_millis(200);
const FIRST_CALL: u32 = 65_536;
/// Frames per live batch (the kernel's default NAPI budget).
const BATCH: u32 = 64;

pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
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
        let client = forwarder_tests::topo::CLIENT_ADDR.parse::<std::net::Ipv4Addr>()?.octets();
        let frame = udp_frame(topo.client_mac, topo.router_client_mac, (client, BASE_SPORT), target)?;
        let mut ebpf = load_bench_object()?;
        let mut config = [0u8; 48];
        config[..HEADER_LEN].copy_from_slice(&frame[..HEADER_LEN]);
        config[44..48].copy_from_slice(&flows.max(1).to_ne_bytes());
        let mut gen_config: Array<_, [u8; 48]> = Array::try_from(ebpf.map_mut("BENCH_GEN").context("BENCH_GEN")?)?;
        gen_config.set(0, config, 0)?;
        load_xdp(&mut ebpf, "bench_trafficgen")?;
        Ok(Self { ebpf, frame })
    }

    /// Sends frames as fast as one thread can for `duration`.
    pub fn run(&self, topo: &BenchTopo, duration: Duration) -> Result<Offered> {
        let prog: &Xdp = self.ebpf.program("bench_trafficgen").context("generator program")?.try_into()?;
        let frame = &self.frame;
        let ifindex = topo.client_ifindex;
        topo.chain.client.run_scoped(move || -> Result<Offered> {
            let ctx = super::testrun::xdp_md(frame.len(), ifindex);
            let cpu_start = thread_cpu_time();
            let start = Instant::now();
            let mut frames = 0u64;
            let mut per_call = FIRST_CALL;
            while let Some(remaining) = duration.checked_sub(start.elapsed()) {
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
                per_call = (rate * remaining.min(CALL_TIME).as_secs_f64()).clamp(FIRST_CALL as f64, 1e8) as u32;
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
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.0, dst.0, ttl).udp(src.1, dst.1);
    let payload = [0u8; PAYLOAD_LEN];
    let mut frame = Vec::with_capacity(builder.size(PAYLOAD_LEN));
    builder.write(&mut frame, &payload)?;
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
}
