//! Turning latency histograms and failover timings into the table and JSON lines we print.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::raft::TempDir;

/// Latencies are recorded in microseconds, from 1 µs up to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// One target's results: the write load, and the failover trials if they were run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub target: String,
    pub ops: u64,
    pub ops_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub failover: Option<FailoverSummary>,
}

impl Summary {
    /// `elapsed` is the measured window (after warm-up); errors are not in `hist`.
    pub fn new(target: &str, hist: &Histogram<u64>, errors: u64, elapsed: Duration) -> Self {
        let ops = hist.len();
        let secs = elapsed.as_secs_f64();
        let q = |quantile: f64| {
            if ops == 0 {
                0
            } else {
                hist.value_at_quantile(quantile)
            }
        };
        Self {
            target: target.to_owned(),
            ops,
            ops_per_second: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if ops == 0 { 0 } else { hist.max() },
            errors,
            failover: None,
        }
    }
}

/// Time from SIGKILL of the leader to the first write acknowledged through a survivor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailoverSummary {
    pub failover_trials: usize,
    pub failover_median_ms: f64,
    pub failover_p90_ms: f64,
    pub failover_max_ms: f64,
}

impl FailoverSummary {
    pub fn new(times: &[Duration]) -> Option<Self> {
        if times.is_empty() {
            return None;
        }
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        Some(Self {
            failover_trials: sorted.len(),
            failover_median_ms: ms(nearest_rank(&sorted, 0.5)),
            failover_p90_ms: ms(nearest_rank(&sorted, 0.9)),
            failover_max_ms: ms(sorted[sorted.len() - 1]),
        })
    }
}

/// The nearest-rank percentile of a sorted, non-empty slice: the smallest value such that at
/// least `q` of the values are at or below it.
pub(crate) fn nearest_rank(sorted: &[Duration], q: f64) -> Duration {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Shoal against etcd: throughput and p99 ratios (shoal / etcd).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    pub ratio: &'static str,
    pub throughput: f64,
    pub p99: f64,
}

impl Ratio {
    pub fn new(shoal: &Summary, etcd: &Summary) -> Self {
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        Self {
            ratio: "shoal/etcd",
            throughput: div(shoal.ops_per_second, etcd.ops_per_second),
            p99: div(shoal.p99_us as f64, etcd.p99_us as f64),
        }
    }
}

/// A latency in the unit that keeps it readable: µs below 1 ms, ms below 1 s, else s.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// The human-readable table: one row per target, then failover times and the ratio.
pub fn table(summaries: &[Summary], ratio: Option<&Ratio>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "target", "ops", "ops/s", "p50", "p90", "p99", "p99.9", "max", "errors"
    );
    for s in summaries {
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            s.target,
            s.ops,
            s.ops_per_second,
            fmt_us(s.p50_us),
            fmt_us(s.p90_us),
            fmt_us(s.p99_us),
            fmt_us(s.p999_us),
            fmt_us(s.max_us),
            s.errors
        );
    }
    for s in summaries {
        if let Some(f) = &s.failover {
            let _ = writeln!(
                out,
                "failover {}: {} trials, median {:.1}ms, p90 {:.1}ms, max {:.1}ms",
                s.target,
                f.failover_trials,
                f.failover_median_ms,
                f.failover_p90_ms,
                f.failover_max_ms
            );
        }
    }
    if let Some(r) = ratio {
        let _ = writeln!(
            out,
            "shoal/etcd: throughput x{:.2}, p99 x{:.2}",
            r.throughput, r.p99
        );
    }
    out
}

/// The end of a scenario run in a scratch directory: on success its summary as one JSON line
/// (`--json`) or as `print` lays it out; on failure the directory is kept for its logs and the
/// error returned. `tag` names the scenario in the message.
pub fn finish<S: Serialize>(
    tag: &str,
    dir: TempDir,
    res: anyhow::Result<S>,
    json: bool,
    print: impl FnOnce(&S),
) -> anyhow::Result<()> {
    match res {
        Ok(s) => {
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print(&s);
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("[{tag}] kept {} for its logs", dir.path().display());
            dir.keep();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_of(values: impl IntoIterator<Item = u64>, errors: u64, secs: u64) -> Summary {
        let mut h = new_histogram();
        for v in values {
            h.record(v).unwrap();
        }
        Summary::new("etcd", &h, errors, Duration::from_secs(secs))
    }

    #[test]
    fn percentiles_of_a_uniform_spread() {
        // 1..=1000 µs: each percentile is the value of its rank, within the 3-digit precision.
        let s = summary_of(1..=1000, 7, 10);
        assert_eq!(s.ops, 1000);
        assert!((s.ops_per_second - 100.0).abs() < 1e-9);
        assert_eq!(s.p50_us, 500);
        assert_eq!(s.p90_us, 900);
        assert_eq!(s.p99_us, 990);
        assert_eq!(s.p999_us, 999);
        assert_eq!(s.max_us, 1000);
        assert_eq!(s.errors, 7);
    }

    #[test]
    fn a_slow_tail_shows_only_in_the_high_percentiles() {
        let s = summary_of(std::iter::repeat_n(200, 990).chain([50_000; 10]), 0, 1);
        assert_eq!(s.p50_us, 200);
        assert_eq!(s.p99_us, 200);
        assert!(s.p999_us >= 49_950 && s.p999_us <= 50_050, "{}", s.p999_us);
        assert!(s.max_us >= 49_950 && s.max_us <= 50_050, "{}", s.max_us);
    }

    #[test]
    fn empty_histogram_reports_zeros_not_garbage() {
        let s = summary_of([], 3, 5);
        assert_eq!(
            (s.ops, s.p50_us, s.p99_us, s.max_us, s.errors),
            (0, 0, 0, 0, 3)
        );
        assert_eq!(s.ops_per_second, 0.0);
    }

    #[test]
    fn json_line_has_the_documented_fields() {
        let mut s = summary_of([100, 200, 300], 0, 1);
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "target",
            "ops",
            "ops_per_second",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "errors",
        ] {
            assert!(keys.contains(&k), "missing {k} in {v}");
        }
        assert!(!keys.contains(&"failover_trials"));
        s.failover = FailoverSummary::new(&[Duration::from_millis(1500)]);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["failover_median_ms"], 1500.0);
        assert_eq!(v["failover_trials"], 1);
    }

    #[test]
    fn failover_percentiles_use_nearest_rank() {
        let times: Vec<Duration> = (1..=10).rev().map(Duration::from_millis).collect();
        let f = FailoverSummary::new(&times).unwrap();
        assert_eq!(f.failover_trials, 10);
        assert_eq!(f.failover_median_ms, 5.0);
        assert_eq!(f.failover_p90_ms, 9.0);
        assert_eq!(f.failover_max_ms, 10.0);
        assert!(FailoverSummary::new(&[]).is_none());
    }

    #[test]
    fn latencies_format_in_a_readable_unit() {
        assert_eq!(fmt_us(0), "0µs");
        assert_eq!(fmt_us(999), "999µs");
        assert_eq!(fmt_us(1_000), "1.00ms");
        assert_eq!(fmt_us(12_345), "12.35ms");
        assert_eq!(fmt_us(2_500_000), "2.50s");
    }

    #[test]
    fn ratio_and_table() {
        let mut etcd = summary_of(std::iter::repeat_n(1000, 100), 0, 1);
        let mut shoal = summary_of(std::iter::repeat_n(2000, 200), 1, 1);
        shoal.target = "shoal".into();
        etcd.failover = FailoverSummary::new(&[Duration::from_millis(1200)]);
        let r = Ratio::new(&shoal, &etcd);
        assert!((r.throughput - 2.0).abs() < 1e-9);
        assert!((r.p99 - 2.0).abs() < 0.01);
        let t = table(&[etcd, shoal], Some(&r));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(
            lines[1].starts_with("etcd ") && lines[1].contains("1.00ms"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("shoal ") && lines[2].ends_with(" 1"),
            "{t}"
        );
        assert!(
            lines[3].contains("failover etcd: 1 trials, median 1200.0ms"),
            "{t}"
        );
        assert!(lines[4].contains("throughput x2.00"), "{t}");
    }
}
