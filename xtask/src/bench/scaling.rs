//! Rule scaling: the time to apply N forwards (forwarder's parse + map writes versus
//! `iptables-restore` and `nft -f` of the same rules), the same with several backends per
//! forward, and the packet rate with N forwards installed.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::{
    contenders::{Contender, Rules},
    generator::Generator,
    stats::median,
    topology::BenchTopo,
    workloads::{UdpRate, udp_rate},
};

/// Contenders whose packet rate is measured at each size.
pub const SCALED: [Contender; 3] = [Contender::Iptables, Contender::Nftables, Contender::ForwarderXdpNative];

/// The bench's own forwards (UDP, iperf3, echo, churn, SYNs, UDP over IPv6) count towards N.
const OWN_FORWARDS: usize = super::contenders::FORWARDS.len() + super::contenders::FORWARDS_V6;

#[derive(Clone, Debug, Serialize)]
pub struct ApplyTimes {
    pub forwards: usize,
    pub forwarder_seconds: f64,
    pub iptables_restore_seconds: f64,
    pub nft_seconds: f64,
    /// The same N forwards with [`BACKENDS_PER_FORWARD`] backends each (but the bench's own):
    /// forwarder's start-up minus the same baseline, and iptables-restore of a
    /// `statistic --mode nth` DNAT rule per backend. None where it failed (see the errors).
    pub backends_per_forward: usize,
    pub forwarder_backends_seconds: Option<f64>,
    pub iptables_restore_backends_seconds: Option<f64>,
}

/// Backends of each forward in the several-backends apply time.
pub const BACKENDS_PER_FORWARD: usize = 4;

pub fn extra_for(forwards: usize) -> usize {
    forwards.saturating_sub(OWN_FORWARDS)
}

/// Times applying `forwards` forwards each way, each on a fresh router namespace.
/// forwarder's figure is what a user waits for: the start-up of `forwarder run` with N
/// forwards (parse, validate, map writes) minus its start-up with the bench's own four,
/// which is the same program loading and attaching. The several-backends figures that fail
/// are left out and their error is pushed to `errors`; the others fail the whole.
pub fn apply_times(forwards: usize, errors: &mut Vec<String>) -> Result<ApplyTimes> {
    let extra = extra_for(forwards);
    let plain = Rules::scaled(extra);
    let several = Rules { extra_backends: BACKENDS_PER_FORWARD, ..plain };
    let timed_start = |c: Contender, rules: Rules| -> Result<f64> {
        let topo = BenchTopo::new()?;
        let start = Instant::now();
        let _running = c.start(&topo, rules)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let iptables_restore_seconds = timed_start(Contender::Iptables, plain)?;
    let nft_seconds = timed_start(Contender::Nftables, plain)?;
    // Start-up varies by tens of milliseconds: medians of three starts each.
    let median_start = |rules: Rules| -> Result<f64> {
        let starts = (0..3).map(|_| timed_start(Contender::ForwarderXdpNative, rules)).collect::<Result<Vec<_>>>()?;
        Ok(median(&starts).unwrap_or(f64::NAN))
    };
    let baseline = median_start(Rules::BENCH)?;
    let with_forwards = median_start(plain)?;
    let mut optional = |what: &str, r: Result<f64>| {
        r.map_err(|e| errors.push(format!("{what} with {forwards} forwards of {BACKENDS_PER_FORWARD} backends: {e:#}")))
            .ok()
    };
    let forwarder_backends_seconds =
        optional("forwarder", median_start(several)).map(|with_backends| (with_backends - baseline).max(0.0));
    let iptables_restore_backends_seconds = optional("iptables-restore", timed_start(Contender::Iptables, several));
    Ok(ApplyTimes {
        forwards,
        forwarder_seconds: (with_forwards - baseline).max(0.0),
        iptables_restore_seconds,
        nft_seconds,
        backends_per_forward: BACKENDS_PER_FORWARD,
        forwarder_backends_seconds,
        iptables_restore_backends_seconds,
    })
}

/// Packet rate and CPU per packet of `flows` UDP flows through `contender` with `forwards`
/// forwards.
pub fn packet_rate(contender: Contender, forwards: usize, flows: u32, duration: Duration) -> Result<UdpRate> {
    let topo = BenchTopo::new()?;
    let running = contender.start(&topo, Rules::scaled(extra_for(forwards)))?;
    let generator = Generator::new(&topo, contender.addressing().udp_target(), flows)?;
    udp_rate(&topo, &generator, duration, &running.pids())
}
