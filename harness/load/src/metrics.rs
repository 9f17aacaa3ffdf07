//! Live measurements of a run: named HdrHistograms of latencies (microseconds) over the
//! measured window, the same per second for charts, and counters. The history stays the
//! record of truth; these are what the terminal shows while the run goes and what the
//! summary and gates read without re-scanning the history.

use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency names recorded by the engine (HTTP endpoints add `http_<endpoint>`).
pub mod names {
    /// Send → ack, from the intended (scheduled) send time.
    pub const SEND_ACK: &str = "send_ack";
    /// Send → ack, from the moment the frame was written (hides queueing in the harness
    /// and coordinated omission; kept beside for comparison).
    pub const SEND_ACK_UNCORRECTED: &str = "send_ack_uncorrected";
    /// Send → live delivery per recipient, from the intended send time.
    pub const DELIVERY: &str = "delivery";
    pub const DELIVERY_SAME_NODE: &str = "delivery_same_node";
    pub const DELIVERY_CROSS_NODE: &str = "delivery_cross_node";
    pub const STREAM_FIRST_CHUNK: &str = "stream_first_chunk";
    pub const STREAM_CHUNK_GAP: &str = "stream_chunk_gap";
    /// Connection lost → every conversation resynced on the new connection.
    pub const RECONNECT_RESYNC: &str = "reconnect_resync";
    pub const CONNECT: &str = "connect";
    pub const SYNC: &str = "sync";
    /// How late the generator itself dispatched an operation (its own lateness).
    pub const PACER_LATENESS: &str = "pacer_lateness";
    /// A message's ack (it and its event are durable) → its audit row visible in
    /// PostgreSQL (sampled by a probe polling the table).
    pub const PIPELINE_AUDIT: &str = "pipeline_audit";
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min with 3 significant digits; values above are clamped, never lost.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// One second's summary of one latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondStat {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Percentiles of a whole histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

pub fn summarize(h: &Histogram<u64>) -> Summary {
    Summary {
        count: h.len(),
        mean_us: h.mean(),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

fn second_stat(h: &Histogram<u64>) -> SecondStat {
    SecondStat {
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

/// A point of the per-second series: the second (since the run's origin), each latency's
/// summary in that second and each counter's increase in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondPoint {
    pub second: u64,
    pub measuring: bool,
    pub latency: BTreeMap<String, SecondStat>,
    pub counters: BTreeMap<String, u64>,
}

/// One latency's histograms, kept together so that a value costs one lookup.
struct Latency {
    /// The measured window's (none until a value due inside it).
    total: Option<Histogram<u64>>,
    /// The current second's.
    second: Histogram<u64>,
}

#[derive(Default)]
struct Book {
    latencies: BTreeMap<String, Latency>,
    series: Vec<SecondPoint>,
    last_counters: BTreeMap<String, u64>,
}

impl Book {
    fn record(&mut self, name: &str, latency: Duration, in_window: bool) {
        let us = (latency.as_micros() as u64).clamp(1, 600_000_000);
        let record = |l: &mut Latency| {
            if in_window {
                let _ = l.total.get_or_insert_with(new_histogram).record(us);
            }
            let _ = l.second.record(us);
        };
        if let Some(l) = self.latencies.get_mut(name) {
            record(l);
            return;
        }
        let mut l = Latency {
            total: None,
            second: new_histogram(),
        };
        record(&mut l);
        self.latencies.insert(name.to_string(), l);
    }
}

/// The run's counters; cheap to bump from any task.
#[derive(Default)]
pub struct Counters {
    pub sends_invoked: AtomicU64,
    pub sends_acked: AtomicU64,
    pub sends_duplicate_acks: AtomicU64,
    pub sends_failed: AtomicU64,
    pub sends_unknown: AtomicU64,
    /// Acks that came after their send's ack timeout (counted unknown before that).
    pub sends_acked_late: AtomicU64,
    pub sends_dropped_in_flight_limit: AtomicU64,
    pub delivered_live: AtomicU64,
    pub delivered_sync: AtomicU64,
    pub server_errors: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    /// Connections after a user's first (planned or after a loss).
    pub reconnects: AtomicU64,
    pub connected: AtomicU64,
    pub streams_started: AtomicU64,
    pub streams_completed: AtomicU64,
    pub streams_failed: AtomicU64,
    pub chunks: AtomicU64,
    pub syncs: AtomicU64,
    pub typing: AtomicU64,
    pub reads: AtomicU64,
    pub http_ok: AtomicU64,
    pub http_failed: AtomicU64,
    pub abuse_sent: AtomicU64,
    pub abuse_answered: AtomicU64,
    pub abuse_unanswered: AtomicU64,
    /// Audit pipeline probe samples: timed, never visible within its limit, not taken
    /// because too many were being followed.
    pub pipeline_seen: AtomicU64,
    pub pipeline_unseen: AtomicU64,
    pub pipeline_skipped: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let pairs: [(&str, &AtomicU64); 30] = [
            ("sends_invoked", &self.sends_invoked),
            ("sends_acked", &self.sends_acked),
            ("sends_duplicate_acks", &self.sends_duplicate_acks),
            ("sends_failed", &self.sends_failed),
            ("sends_unknown", &self.sends_unknown),
            ("sends_acked_late", &self.sends_acked_late),
            (
                "sends_dropped_in_flight_limit",
                &self.sends_dropped_in_flight_limit,
            ),
            ("delivered_live", &self.delivered_live),
            ("delivered_sync", &self.delivered_sync),
            ("server_errors", &self.server_errors),
            ("connects", &self.connects),
            ("connect_failures", &self.connect_failures),
            ("disconnects", &self.disconnects),
            ("reconnects", &self.reconnects),
            ("connected", &self.connected),
            ("streams_started", &self.streams_started),
            ("streams_completed", &self.streams_completed),
            ("streams_failed", &self.streams_failed),
            ("chunks", &self.chunks),
            ("syncs", &self.syncs),
            ("typing", &self.typing),
            ("reads", &self.reads),
            ("http_ok", &self.http_ok),
            ("http_failed", &self.http_failed),
            ("abuse_sent", &self.abuse_sent),
            ("abuse_answered", &self.abuse_answered),
            ("abuse_unanswered", &self.abuse_unanswered),
            ("pipeline_seen", &self.pipeline_seen),
            ("pipeline_unseen", &self.pipeline_unseen),
            ("pipeline_skipped", &self.pipeline_skipped),
        ];
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Gauges are levels, not flows: the series keeps their value, not their increase.
const GAUGES: &[&str] = &["connected"];

/// Latencies and counters of one run.
#[derive(Default)]
pub struct Metrics {
    book: Mutex<Book>,
    measuring: AtomicBool,
    pub counters: Counters,
    /// Fresh acks handed to a downstream probe on request (the audit pipeline's latency).
    pub ack_tap: crate::tap::AckTap,
}

impl Metrics {
    /// Marks the series' seconds as measured (after warm-up, before the end of the load).
    pub fn set_measuring(&self, on: bool) {
        self.measuring.store(on, Ordering::Relaxed);
    }

    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    /// Whole-run histograms take a value only when its operation was due inside the
    /// measured window (so a late answer to an in-window send still counts, and warm-up
    /// does not); the per-second series takes every value.
    pub fn record(&self, name: &str, latency: Duration, in_window: bool) {
        let Ok(mut book) = self.book.lock() else {
            return;
        };
        book.record(name, latency, in_window);
    }

    /// Two values at once (an ack's corrected and uncorrected latency, a delivery's and
    /// its same- or cross-node one): one lock where two were taken per frame.
    pub fn record_pair(&self, a: (&str, Duration), b: (&str, Duration), in_window: bool) {
        let Ok(mut book) = self.book.lock() else {
            return;
        };
        book.record(a.0, a.1, in_window);
        book.record(b.0, b.1, in_window);
    }

    /// Closes the current second: its latencies and counter increases join the series.
    pub fn roll_second(&self, second: u64) -> SecondPoint {
        let counters = self.counters.snapshot();
        let measuring = self.measuring();
        let Ok(mut book) = self.book.lock() else {
            return SecondPoint {
                second,
                measuring,
                latency: BTreeMap::new(),
                counters,
            };
        };
        let latency = book
            .latencies
            .iter_mut()
            .filter(|(_, l)| !l.second.is_empty())
            .map(|(k, l)| {
                let s = second_stat(&l.second);
                l.second.reset();
                (k.clone(), s)
            })
            .collect();
        let deltas = counters
            .iter()
            .map(|(k, v)| {
                if GAUGES.contains(&k.as_str()) {
                    (k.clone(), *v)
                } else {
                    (
                        k.clone(),
                        v - book.last_counters.get(k).copied().unwrap_or(0),
                    )
                }
            })
            .collect();
        book.last_counters = counters;
        let point = SecondPoint {
            second,
            measuring,
            latency,
            counters: deltas,
        };
        book.series.push(point.clone());
        point
    }

    /// Whole-run summaries of every latency.
    pub fn summaries(&self) -> BTreeMap<String, Summary> {
        self.book
            .lock()
            .map(|b| {
                b.latencies
                    .iter()
                    .filter_map(|(k, l)| Some((k.clone(), summarize(l.total.as_ref()?))))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn series(&self) -> Vec<SecondPoint> {
        self.book
            .lock()
            .map(|b| b.series.clone())
            .unwrap_or_default()
    }

    /// Each counter over the last `seconds` points of the series, per second: increases
    /// averaged (the roller can run late on a starved machine and put two seconds' counts
    /// in one point and none in the next), gauges as last seen.
    pub fn recent_rates(&self, seconds: usize) -> BTreeMap<String, f64> {
        let Ok(book) = self.book.lock() else {
            return BTreeMap::new();
        };
        let recent: Vec<&SecondPoint> = book.series.iter().rev().take(seconds.max(1)).collect();
        let mut rates: BTreeMap<String, f64> = BTreeMap::new();
        for p in &recent {
            for (k, v) in &p.counters {
                if !GAUGES.contains(&k.as_str()) {
                    *rates.entry(k.clone()).or_default() += *v as f64 / recent.len() as f64;
                }
            }
        }
        if let Some(last) = recent.first() {
            for g in GAUGES {
                if let Some(v) = last.counters.get(*g) {
                    rates.insert((*g).to_string(), *v as f64);
                }
            }
        }
        rates
    }

    /// The p99 of one latency over the last `seconds` of the series (for live progress).
    pub fn recent_p99(&self, name: &str, seconds: usize) -> Option<u64> {
        let book = self.book.lock().ok()?;
        book.series
            .iter()
            .rev()
            .take(seconds)
            .filter_map(|p| p.latency.get(name).map(|s| s.p99_us))
            .max()
    }

    /// Every whole-run histogram, V2 + deflate, base64: mergeable with other runs' or
    /// other load machines' histograms (`hdrhistogram` reads them back).
    pub fn encoded_histograms(&self) -> BTreeMap<String, String> {
        use base64::Engine;
        let Ok(book) = self.book.lock() else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for (k, h) in book
            .latencies
            .iter()
            .filter_map(|(k, l)| Some((k, l.total.as_ref()?)))
        {
            let mut bytes = Vec::new();
            if V2DeflateSerializer::new().serialize(h, &mut bytes).is_ok() {
                out.insert(
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_rates_average_increases_and_keep_gauges_as_last_seen() {
        let m = Metrics::default();
        // A late roller: one second's point holds two seconds' sends, the next none.
        m.counters.sends_acked.fetch_add(20, Ordering::Relaxed);
        m.counters.connected.fetch_add(5, Ordering::Relaxed);
        m.roll_second(0);
        m.counters.connected.fetch_add(2, Ordering::Relaxed);
        m.roll_second(1);
        let r = m.recent_rates(5);
        assert_eq!(r["sends_acked"], 10.0);
        assert_eq!(r["connected"], 7.0);
        // Only the last `seconds` points count.
        m.roll_second(2);
        assert_eq!(m.recent_rates(2)["sends_acked"], 0.0);
    }

    #[test]
    fn warm_up_stays_out_of_the_totals_but_not_out_of_the_series() {
        let m = Metrics::default();
        m.record(names::SEND_ACK, Duration::from_millis(500), false);
        m.set_measuring(true);
        for ms in 1..=100 {
            m.record(names::SEND_ACK, Duration::from_millis(ms), true);
        }
        m.counters.sends_acked.fetch_add(7, Ordering::Relaxed);
        let p = m.roll_second(0);
        assert_eq!(p.latency[names::SEND_ACK].count, 101);
        assert_eq!(p.counters["sends_acked"], 7);
        let s = &m.summaries()[names::SEND_ACK];
        assert_eq!(s.count, 100);
        assert!(s.max_us < 101_000, "{}", s.max_us);
        assert!((99_000..=100_100).contains(&s.p99_us), "{}", s.p99_us);
        m.counters.sends_acked.fetch_add(2, Ordering::Relaxed);
        assert_eq!(m.roll_second(1).counters["sends_acked"], 2);
        assert_eq!(m.encoded_histograms().len(), 1);
        // A latency seen only outside the window is in the series, not in the totals.
        m.record(names::SYNC, Duration::from_millis(3), false);
        assert_eq!(m.roll_second(2).latency[names::SYNC].count, 1);
        assert!(!m.summaries().contains_key(names::SYNC));
        assert_eq!(m.encoded_histograms().len(), 1);
    }
}
