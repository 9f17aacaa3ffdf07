//! What a person watching a run sees: a live line each second (elapsed, then over the
//! last 5 s sent/s, delivered/s, p99s and errors; consumer lag, connections) drawn with
//! indicatif on a terminal, a plain log line every 10 s elsewhere, nothing with `--quiet`; and the
//! final summary table, also written as `run.json` with the histograms and series.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use squall_history::WriteStats;
use squall_load::metrics::names;
use squall_load::{Metrics, Outcome, SecondPoint, Summary};
use squall_scenario::Scenario;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

use super::signals::SignalPoint;

pub struct Display {
    task: tokio::task::JoinHandle<()>,
    bar: ProgressBar,
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// Rates and p99s over the last few seconds: one second's point alone swings between
/// nothing and double when the machine is starved (see `Metrics::recent_rates`).
const RECENT_S: usize = 5;

fn line(signals: &SignalPoint, metrics: &Metrics) -> String {
    let rates = metrics.recent_rates(RECENT_S);
    let c = |k: &str| rates.get(k).copied().unwrap_or(0.0).round() as u64;
    let p99 = |k: &str| {
        metrics
            .recent_p99(k, RECENT_S)
            .map(ms)
            .unwrap_or_else(|| "-".into())
    };
    let lag: f64 = signals.lag.values().sum();
    format!(
        "sent/s {} ack/s {} delivered/s {} | p99 ack {} ms, delivery {} ms | errors {} unknown {} | lag {} | connected {}{}",
        c("sends_invoked"),
        c("sends_acked"),
        c("delivered_live") + c("delivered_sync"),
        p99(names::SEND_ACK),
        p99(names::DELIVERY),
        c("server_errors") + c("sends_failed"),
        c("sends_unknown"),
        lag as u64,
        c("connected"),
        if signals.unreachable.is_empty() { String::new() } else { format!(" | unreachable: {}", signals.unreachable.join(",")) },
    )
}

impl Display {
    pub fn start(
        scenario: &Scenario,
        mut points: watch::Receiver<Option<SecondPoint>>,
        signals: Arc<Mutex<SignalPoint>>,
        metrics: Arc<Metrics>,
        quiet: bool,
    ) -> Display {
        let total = (scenario.load.warmup + scenario.load.duration).as_secs();
        let terminal = std::io::stderr().is_terminal();
        let bar = if quiet || !terminal {
            ProgressBar::hidden()
        } else {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        };
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            let mut measured = 0u64;
            while points.changed().await.is_ok() {
                let Some(p) = points.borrow_and_update().clone() else {
                    continue;
                };
                let sig = signals.lock().map(|s| s.clone()).unwrap_or_default();
                let text = line(&sig, &metrics);
                if p.counters.get("sends_invoked").copied().unwrap_or(0) > 0 || measured > 0 {
                    measured += 1;
                    shown.set_position(measured.min(total));
                }
                shown.set_message(text.clone());
                if !quiet && !terminal && p.second % 10 == 0 {
                    tracing::info!("t={}s {text}", p.second);
                }
            }
        });
        Display { task, bar }
    }

    pub async fn finish(self) {
        let _ = self.task.await;
        self.bar.finish_and_clear();
    }
}

/// The headline of a run: written to `run.json` and printed as a table.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub scenario: String,
    pub run_dir: String,
    pub nodes: usize,
    pub users: u32,
    pub conversations: u32,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub setup_s: f64,
    pub interrupted: bool,
    pub arrivals: u64,
    pub counters: BTreeMap<String, u64>,
    pub latency_us: BTreeMap<String, Summary>,
    pub history_records: u64,
    pub history_bytes: u64,
    pub history_late_records: u64,
}

impl RunSummary {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        scenario: &Scenario,
        run_id: &str,
        run_dir: &Path,
        outcome: &Outcome,
        metrics: &Metrics,
        history: &WriteStats,
        nodes: usize,
    ) -> RunSummary {
        RunSummary {
            run_id: run_id.into(),
            scenario: scenario.name.clone(),
            run_dir: run_dir.display().to_string(),
            nodes,
            users: scenario.load.users,
            conversations: scenario.load.conversations.count,
            warmup_s: scenario.load.warmup.as_secs_f64(),
            duration_s: scenario.load.duration.as_secs_f64(),
            setup_s: outcome.setup.as_secs_f64(),
            interrupted: outcome.interrupted,
            arrivals: outcome.arrivals,
            counters: metrics.counters.snapshot(),
            latency_us: metrics.summaries(),
            history_records: history.records,
            history_bytes: history.bytes_on_disk,
            history_late_records: history.late,
        }
    }

    /// `run.json`, `histograms.json` (V2+deflate, base64, mergeable) and `series.json`.
    pub fn write(&self, run_dir: &Path, metrics: &Metrics) -> Result<()> {
        let write = |name: &str, value: &dyn erased::Json| -> Result<()> {
            let path = run_dir.join(name);
            std::fs::write(&path, value.to_json()?)
                .with_context(|| format!("writing {}", path.display()))
        };
        write("run.json", self)?;
        write("histograms.json", &metrics.encoded_histograms())?;
        write("series.json", &metrics.series())?;
        Ok(())
    }

    pub fn render(&self) -> String {
        let c = |k: &str| self.counters.get(k).copied().unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nrun {}: {} nodes, {} users, {} conversations; {:.0} s measured after {:.0} s warm-up (set-up {:.1} s){}",
            self.run_id,
            self.nodes,
            self.users,
            self.conversations,
            self.duration_s,
            self.warmup_s,
            self.setup_s,
            if self.interrupted { "; INTERRUPTED" } else { "" }
        );
        let _ = writeln!(
            out,
            "  sends      {} invoked, {} acked ({} duplicate acks), {} failed, {} unknown, {} not sent (in-flight limit)",
            c("sends_invoked"),
            c("sends_acked"),
            c("sends_duplicate_acks"),
            c("sends_failed"),
            c("sends_unknown"),
            c("sends_dropped_in_flight_limit")
        );
        let _ = writeln!(
            out,
            "  deliveries {} live, {} by sync",
            c("delivered_live"),
            c("delivered_sync")
        );
        let _ = writeln!(
            out,
            "  streams    {} started, {} completed, {} failed, {} chunks",
            c("streams_started"),
            c("streams_completed"),
            c("streams_failed"),
            c("chunks")
        );
        let _ = writeln!(
            out,
            "  other      {} typing, {} reads, {} syncs, {} HTTP ok, {} HTTP failed, {} server errors, {} reconnects ({} after a lost connection)",
            c("typing"),
            c("reads"),
            c("syncs"),
            c("http_ok"),
            c("http_failed"),
            c("server_errors"),
            c("reconnects"),
            c("disconnects")
        );
        if c("abuse_sent") > 0 {
            let _ = writeln!(
                out,
                "  bad input  {} sent, {} answered as documented, {} not",
                c("abuse_sent"),
                c("abuse_answered"),
                c("abuse_unanswered")
            );
        }
        let _ = writeln!(out, "  latency (ms, from the intended time)    count      p50      p90      p99    p99.9      max");
        for (name, s) in &self.latency_us {
            let _ = writeln!(
                out,
                "    {:<36} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
                name,
                s.count,
                ms(s.p50_us),
                ms(s.p90_us),
                ms(s.p99_us),
                ms(s.p999_us),
                ms(s.max_us)
            );
        }
        let _ = writeln!(
            out,
            "  history    {} records, {:.1} MiB ({:.1} B/record)",
            self.history_records,
            self.history_bytes as f64 / (1024.0 * 1024.0),
            self.history_bytes as f64 / self.history_records.max(1) as f64
        );
        let _ = write!(out, "  files      {}/ (run.json, history.jsonl.gz, signals.jsonl, series.json, histograms.json, logs/)", self.run_dir);
        out
    }
}

/// Serialising through one closure without naming every type.
mod erased {
    pub trait Json {
        fn to_json(&self) -> anyhow::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> anyhow::Result<String> {
            Ok(serde_json::to_string_pretty(self)?)
        }
    }
}
