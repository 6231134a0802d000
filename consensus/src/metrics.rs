//! Peer RPC latency histograms in Prometheus' format, fed by the transport.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Latency of outgoing peer RPCs, by RPC name.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    by_rpc: Mutex<BTreeMap<&'static str, std::sync::Arc<Histogram>>>,
}

impl RpcMetrics {
    pub fn observe(&self, rpc: &'static str, d: Duration) {
        let h = self
            .by_rpc
            .lock()
            .expect("metrics lock")
            .entry(rpc)
            .or_default()
            .clone();
        h.observe(d);
    }

    pub fn prometheus_text(&self) -> String {
        let name = "shoal_peer_rpc_duration_seconds";
        let mut out =
            format!("# HELP {name} Latency of outgoing peer RPCs.\n# TYPE {name} histogram\n");
        for (rpc, h) in self.by_rpc.lock().expect("metrics lock").iter() {
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i].load(Ordering::Relaxed);
                out.push_str(&format!(
                    "{name}_bucket{{rpc=\"{rpc}\",le=\"{b}\"}} {cumulative}\n"
                ));
            }
            let count = h.count.load(Ordering::Relaxed);
            out.push_str(&format!(
                "{name}_bucket{{rpc=\"{rpc}\",le=\"+Inf\"}} {count}\n"
            ));
            out.push_str(&format!(
                "{name}_sum{{rpc=\"{rpc}\"}} {}\n",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            ));
            out.push_str(&format!("{name}_count{{rpc=\"{rpc}\"}} {count}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_everything() {
        let m = RpcMetrics::default();
        m.observe("vote", Duration::from_micros(50));
        m.observe("vote", Duration::from_millis(3));
        m.observe("vote", Duration::from_secs(10));
        let text = m.prometheus_text();
        assert!(
            text.contains("shoal_peer_rpc_duration_seconds_bucket{rpc=\"vote\",le=\"0.0001\"} 1")
        );
        assert!(
            text.contains("shoal_peer_rpc_duration_seconds_bucket{rpc=\"vote\",le=\"0.005\"} 2")
        );
        assert!(text.contains("shoal_peer_rpc_duration_seconds_bucket{rpc=\"vote\",le=\"+Inf\"} 3"));
        assert!(text.contains("shoal_peer_rpc_duration_seconds_count{rpc=\"vote\"} 3"));
    }
}
