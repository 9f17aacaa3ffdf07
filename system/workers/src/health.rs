//! The stuck-partition watch: which partitions of which consumer groups make no progress.
//!
//! A partition is stuck when, for longer than the threshold, either its consumer keeps
//! retrying an event there (fed by the consumer loop), or the group has lag on it while its
//! committed offset does not move (fed by the lag reporter, so a partition nobody consumes
//! shows too). The workers process turns red on `/readyz` naming each stuck partition and
//! exports `chatstream_worker_partition_stuck{group,topic,partition}` (1 stuck, 0 not);
//! `/healthz` stays the liveness check.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Gauge: 1 while a partition is stuck, 0 otherwise (per group, topic, partition).
pub const STUCK_GAUGE: &str = "chatstream_worker_partition_stuck";

type Key = (String, String, i32);

#[derive(Debug, Clone)]
struct Retrying {
    since: Instant,
    offset: i64,
    attempts: u32,
    error: String,
}

#[derive(Debug, Clone)]
struct Lagging {
    committed: Option<i64>,
    lag: i64,
    /// Since when the committed offset has stayed where it is while lag remained.
    unchanged_since: Instant,
}

#[derive(Debug, Default, Clone)]
struct State {
    retrying: Option<Retrying>,
    lagging: Option<Lagging>,
}

/// A partition past the threshold, as `/readyz` names it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StuckPartition {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// What is wrong: the event being retried and its error, or the lag that does not move.
    pub reason: String,
    /// How long it has been so, in seconds.
    pub for_s: f64,
}

/// Shared by every consumer of the process and its lag reporter.
#[derive(Debug)]
pub struct PartitionWatch {
    stuck_after: Duration,
    parts: Mutex<BTreeMap<Key, State>>,
}

impl PartitionWatch {
    pub fn new(stuck_after: Duration) -> Self {
        PartitionWatch {
            stuck_after,
            parts: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn stuck_after(&self) -> Duration {
        self.stuck_after
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<Key, State>) -> T) -> Option<T> {
        self.parts.lock().ok().map(|mut p| f(&mut p))
    }

    /// The consumer failed at `offset` again (`attempts` so far). The clock starts at the
    /// first failure of that offset.
    #[allow(clippy::too_many_arguments)]
    pub fn retrying(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        offset: i64,
        attempts: u32,
        error: &str,
        now: Instant,
    ) {
        self.with(|p| {
            let s = p
                .entry((group.to_string(), topic.to_string(), partition))
                .or_default();
            let since = match &s.retrying {
                Some(r) if r.offset == offset => r.since,
                _ => now,
            };
            s.retrying = Some(Retrying {
                since,
                offset,
                attempts,
                error: error.to_string(),
            });
        });
    }

    /// The retried event was handled (or dead-lettered), or the partition went elsewhere.
    pub fn retry_over(&self, group: &str, topic: &str, partition: i32) {
        self.with(|p| {
            if let Some(s) = p.get_mut(&(group.to_string(), topic.to_string(), partition)) {
                s.retrying = None;
            }
        });
    }

    /// The group's committed offset and lag on a partition, as last measured.
    pub fn observe_lag(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        committed: Option<i64>,
        lag: i64,
        now: Instant,
    ) {
        self.with(|p| {
            let s = p
                .entry((group.to_string(), topic.to_string(), partition))
                .or_default();
            let unchanged_since = match &s.lagging {
                Some(l) if lag > 0 && l.lag > 0 && l.committed == committed => l.unchanged_since,
                _ => now,
            };
            s.lagging = Some(Lagging {
                committed,
                lag,
                unchanged_since,
            });
        });
    }

    /// Every known partition with whether it is stuck now (for the gauge).
    pub fn states(&self, now: Instant) -> Vec<(String, String, i32, Option<StuckPartition>)> {
        self.with(|p| {
            p.iter()
                .map(|((g, t, part), s)| {
                    (g.clone(), t.clone(), *part, self.judge(g, t, *part, s, now))
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// The partitions stuck now.
    pub fn stuck(&self, now: Instant) -> Vec<StuckPartition> {
        self.states(now)
            .into_iter()
            .filter_map(|(_, _, _, s)| s)
            .collect()
    }

    fn judge(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        s: &State,
        now: Instant,
    ) -> Option<StuckPartition> {
        // Both can hold at once (a retried event also leaves lag behind): the retry says
        // more, so it leads; the duration is the longer of the two.
        let mut worst: Option<(Duration, String)> = None;
        if let Some(r) = &s.retrying {
            let d = now.saturating_duration_since(r.since);
            if d >= self.stuck_after {
                worst = Some((
                    d,
                    format!(
                        "retrying offset {} ({} attempts): {}",
                        r.offset, r.attempts, r.error
                    ),
                ));
            }
        }
        if let Some(l) = &s.lagging {
            let d = now.saturating_duration_since(l.unchanged_since);
            if l.lag > 0 && d >= self.stuck_after {
                let at = l.committed.map_or("nothing committed".to_string(), |c| {
                    format!("committed {c}")
                });
                let lag = format!("lag {} and no progress ({at})", l.lag);
                worst = Some(match worst {
                    Some((w, reason)) => (w.max(d), format!("{reason}; {lag}")),
                    None => (d, lag),
                });
            }
        }
        worst.map(|(d, reason)| StuckPartition {
            group: group.to_string(),
            topic: topic.to_string(),
            partition,
            reason,
            for_s: (d.as_secs_f64() * 10.0).round() / 10.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_longer_than_the_threshold_is_stuck_until_it_is_over() {
        let w = PartitionWatch::new(Duration::from_secs(10));
        let t0 = Instant::now();
        w.retrying("g", "t", 3, 41, 1, "boom", t0);
        w.retrying("g", "t", 3, 41, 4, "boom", t0 + Duration::from_secs(9));
        assert!(w.stuck(t0 + Duration::from_secs(9)).is_empty());
        // Lag that does not move as well: the retry still leads the reason.
        w.observe_lag("g", "t", 3, Some(41), 1, t0);
        w.observe_lag("g", "t", 3, Some(41), 1, t0 + Duration::from_secs(11));
        let s = w.stuck(t0 + Duration::from_secs(11));
        assert_eq!(s.len(), 1);
        assert!(
            s[0].reason.starts_with("retrying offset 41"),
            "{}",
            s[0].reason
        );
        assert_eq!((s[0].group.as_str(), s[0].partition), ("g", 3));
        assert!(s[0].reason.contains("offset 41") && s[0].reason.contains("boom"));
        // A new offset failing starts its own clock.
        w.retrying("g", "t", 3, 42, 1, "boom", t0 + Duration::from_secs(12));
        w.observe_lag("g", "t", 3, Some(42), 1, t0 + Duration::from_secs(12));
        assert!(w.stuck(t0 + Duration::from_secs(13)).is_empty());
        w.retry_over("g", "t", 3);
        w.observe_lag("g", "t", 3, Some(43), 0, t0 + Duration::from_secs(13));
        assert!(w.stuck(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn lag_without_progress_is_stuck_and_progress_or_no_lag_is_not() {
        let w = PartitionWatch::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        w.observe_lag("g", "t", 0, Some(5), 3, at(0));
        w.observe_lag("g", "t", 0, Some(5), 3, at(11));
        let s = w.stuck(at(11));
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].reason.contains("lag 3"));
        // It moved: not stuck, and the clock starts again.
        w.observe_lag("g", "t", 0, Some(6), 2, at(12));
        assert!(w.stuck(at(20)).is_empty());
        // Caught up: never stuck however long the offset stays.
        w.observe_lag("g", "t", 1, Some(9), 0, at(0));
        w.observe_lag("g", "t", 1, Some(9), 0, at(100));
        assert!(w.stuck(at(100)).iter().all(|s| s.partition != 1));
        // Nothing committed and lag: stuck too once past the threshold.
        w.observe_lag("g", "t", 2, None, 7, at(0));
        w.observe_lag("g", "t", 2, None, 7, at(30));
        assert!(w
            .stuck(at(30))
            .iter()
            .any(|s| s.partition == 2 && s.reason.contains("nothing committed")));
        assert_eq!(w.states(at(30)).len(), 3);
    }
}
