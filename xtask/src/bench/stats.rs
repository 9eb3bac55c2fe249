//! The harness's own arithmetic and parsing: summaries over repetitions, percentiles of
//! latency samples, CPU accounting from /proc/PID/stat and iperf3's JSON. Pure functions, unit
//! tested on the host.

use anyhow::{Context as _, Result};
use serde::Serialize;

/// A figure over several repetitions: the median is the reported value; min and max show the
/// spread, so a reader sees when a ratio is within noise.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Summary {
    /// None for no samples (a figure that could not be measured).
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            median: median_of_sorted(&sorted),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            samples: samples.to_vec(),
        })
    }

    /// The largest distance from the median to either end, as a fraction of the median.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            return 0.0;
        }
        (self.max - self.median).max(self.median - self.min) / self.median.abs()
    }
}

fn median_of_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

pub fn median(samples: &[f64]) -> Option<f64> {
    Summary::of(samples).map(|s| s.median)
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples: the smallest sample with at
/// least p% of the samples at or below it, so p99 of 100 samples is the 99th smallest.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// utime + stime of a task, in clock ticks, from its /proc/PID/stat line.
pub fn task_ticks(stat_line: &str) -> Result<u64> {
    Ok(stat_fields(stat_line, &[14, 15])?.iter().sum())
}

/// [`task_ticks`] plus cutime + cstime: the time of the children it has waited for.
pub fn task_ticks_with_children(stat_line: &str) -> Result<u64> {
    Ok(stat_fields(stat_line, &[14, 15, 16, 17])?.iter().sum())
}

/// Numeric fields (numbered as in proc(5)) of a /proc/PID/stat line. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last ')'.
fn stat_fields(stat_line: &str, numbers: &[usize]) -> Result<Vec<u64>> {
    let rest = stat_line.rsplit_once(')').context("no ')' in the stat line")?.1;
    // After the name: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime(14) stime(15) cutime(16) cstime(17).
    let f: Vec<&str> = rest.split_whitespace().collect();
    numbers
        .iter()
        .map(|&n| f.get(n - 3).with_context(|| format!("stat line has no field {n}"))?.parse().context("stat field"))
        .collect()
}

/// Thread CPU time of the calling thread.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// USER_HZ, the unit of /proc/stat.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Received throughput (bits/s) from `iperf3 --json` output of the client.
pub fn iperf3_received_bps(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 JSON has no end.sum_received.bits_per_second")
}

/// `value / reference`, when both exist and the reference is not zero.
pub fn ratio(value: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (value, reference) {
        (Some(v), Some(r)) if r != 0.0 => Some(v / r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN]), None);
    }

    #[test]
    fn spread_is_the_larger_distance_from_the_median() {
        let s = Summary::of(&[90.0, 100.0, 130.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (90.0, 100.0, 130.0));
        assert!((s.spread() - 0.30).abs() < 1e-12);
        assert_eq!(Summary::of(&[0.0, 0.0]).unwrap().spread(), 0.0);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50.0));
        assert_eq!(percentile(&samples, 99.0), Some(99.0));
        assert_eq!(percentile(&samples, 100.0), Some(100.0));
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn task_ticks_after_an_awkward_name() {
        let line = "1234 (soc at) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 3 4 20 0 1 0 99 1000 50";
        assert_eq!(task_ticks(line).unwrap(), 325);
        assert_eq!(task_ticks_with_children(line).unwrap(), 325 + 3 + 4);
        assert!(task_ticks("1234 (x) S 1").is_err());
        assert!(task_ticks("no name").is_err());
    }

    #[test]
    fn iperf3_json() {
        let ok =
            r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.5e9},"sum_received":{"bits_per_second":2.4e9}}}"#;
        assert_eq!(iperf3_received_bps(ok).unwrap(), 2.4e9);
        let err = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert!(iperf3_received_bps(err).unwrap_err().to_string().contains("unable to connect"));
        assert!(iperf3_received_bps("iperf3: error").is_err());
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(4.0), Some(2.0)), Some(2.0));
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }
}
