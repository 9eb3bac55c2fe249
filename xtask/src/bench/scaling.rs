//! Rule scaling: the time to apply N forwards (forwarder's parse + map writes versus
//! `iptables-restore` and `nft -f` of the same rules) and the packet rate with N forwards
//! installed.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::{
    contenders::Contender,
    generator::Generator,
    stats::median,
    topology::BenchTopo,
    workloads::{UdpRate, udp_rate},
};

/// Contenders whose packet rate is measured at each size.
pub const SCALED: [Contender; 3] = [Contender::Iptables, Contender::Nftables, Contender::ForwarderXdpNative];

/// The bench's own forwards (UDP, iperf3, echo, churn) count towards N.
const OWN_FORWARDS: usize = super::contenders::FORWARDS.len();

#[derive(Clone, Debug, Serialize)]
pub struct ApplyTimes {
    pub forwards: usize,
    pub forwarder_seconds: f64,
    pub iptables_restore_seconds: f64,
    pub nft_seconds: f64,
}

pub fn extra_for(forwards: usize) -> usize {
    forwards.saturating_sub(OWN_FORWARDS)
}

/// Times applying `forwards` forwards each way, each on a fresh router namespace.
/// forwarder's figure is what a user waits for: the start-up of `forwarder run` with N
/// forwards (parse, validate, map writes) minus its start-up with the bench's own four,
/// which is the same program loading and attaching.
pub fn apply_times(forwards: usize) -> Result<ApplyTimes> {
    let extra = extra_for(forwards);
    let timed_start = |c: Contender, extra: usize| -> Result<f64> {
        let topo = BenchTopo::new()?;
        let start = Instant::now();
        let _running = c.start(&topo, extra)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let iptables_restore_seconds = timed_start(Contender::Iptables, extra)?;
    let nft_seconds = timed_start(Contender::Nftables, extra)?;
    // Start-up varies by tens of milliseconds: medians of three starts each.
    let median_start = |extra: usize| -> Result<f64> {
        let starts = (0..3).map(|_| timed_start(Contender::ForwarderXdpNative, extra)).collect::<Result<Vec<_>>>()?;
        Ok(median(&starts).unwrap_or(f64::NAN))
    };
    let baseline = median_start(0)?;
    let with_forwards = median_start(extra)?;
    Ok(ApplyTimes {
        forwards,
        forwarder_seconds: (with_forwards - baseline).max(0.0),
        iptables_restore_seconds,
        nft_seconds,
    })
}

/// Packet rate and CPU per packet of `flows` UDP flows through `contender` with `forwards`
/// forwards.
pub fn packet_rate(contender: Contender, forwards: usize, flows: u32, duration: Duration) -> Result<UdpRate> {
    let topo = BenchTopo::new()?;
    let running = contender.start(&topo, extra_for(forwards))?;
    let generator = Generator::new(&topo, contender.addressing().udp_target(), flows)?;
    Ok(udp_rate(&topo, &generator, duration, &running.pids())?)
}
