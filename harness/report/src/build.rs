//! Turning what was read from a run directory ([`RunDir`]) into the [`Report`] model:
//! percentiles from the saved histograms, the measured window's throughput from the
//! per-second series, fault windows from the history, resource use and lines over time
//! from the signals, and the overall outcome from the verdicts. Pure: no I/O here.

use hdrhistogram::Histogram;
use serde::Serialize;
use squall_check::Validity;
use std::collections::BTreeMap;

use crate::inputs::{self, RunDir, SignalPoint};
use crate::model::*;

/// Percentiles of the curve stored per metric (p50 .. p99.99).
pub const CURVE_PERCENTILES: [f64; 21] = [
    50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 93.0, 95.0, 97.0, 98.0, 99.0, 99.3, 99.5, 99.7, 99.8,
    99.9, 99.93, 99.95, 99.97, 99.99,
];

/// The node metric preferred for connections per node.
pub const CONNECTIONS_METRIC: &str = "chatstream_connections";
pub const OUTBOX_BACKLOG_METRIC: &str = "chatstream_outbox_backlog";

/// A serde enum's name as written in YAML/JSON (`cross_node`, `outbox`).
fn serde_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Rounds to microsecond precision so report.json does not carry float noise.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Builds the report. `environment` is the one to record (preserved or detected).
pub fn build(dir: &RunDir, environment: Environment) -> Report {
    let mut notes = Vec::new();
    let scenario = &dir.scenario;
    let run = dir.run.clone().unwrap_or_default();
    let inputs_present: BTreeMap<String, bool> = [
        (inputs::SCENARIO, true),
        (squall_history::FILE_NAME, dir.history.is_some()),
        (inputs::RUN, dir.run.is_some()),
        (inputs::SERIES, dir.series.is_some()),
        (inputs::HISTOGRAMS, dir.histograms.is_some()),
        (inputs::SIGNALS, dir.signals.is_some()),
        (inputs::VERDICTS, dir.verdicts.is_some()),
        (inputs::READBACK, dir.readback_present),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (name, present) in &inputs_present {
        if !present && name != inputs::READBACK {
            notes.push(format!("{name} is missing from the run directory"));
        }
    }
    if dir.signals_skipped > 0 {
        notes.push(format!(
            "{} line(s) of {} did not parse and were skipped",
            dir.signals_skipped,
            inputs::SIGNALS
        ));
    }
    if environment.source == "preserved" {
        notes.push(
            "environment preserved from the report.json rendered when the run finished".into(),
        );
    }

    let phases = dir
        .history
        .as_ref()
        .map(|h| {
            let at = |name: &str| h.phases.get(name).map(|t| round6(secs(*t)));
            Phases {
                connected_s: at("connected"),
                load_start_s: at("load_start"),
                load_end_s: at("load_end"),
                drained_s: at("drained"),
                interrupted_s: at("interrupted"),
            }
        })
        .unwrap_or_default();
    let interrupted = run.interrupted || phases.interrupted_s.is_some();

    let run_info = RunInfo {
        run_id: run
            .run_id
            .clone()
            .or_else(|| dir.history.as_ref().map(|h| h.run_id.clone()))
            .unwrap_or_else(|| {
                dir.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
        origin_wall_ms: dir.history.as_ref().map(|h| h.origin_wall_ms),
        started_at: dir.history.as_ref().map(|h| rfc3339_ms(h.origin_wall_ms)),
        interrupted,
        setup_s: run.setup_s,
        history_records: run
            .history_records
            .or_else(|| dir.history.as_ref().map(|h| h.records)),
        history_bytes: run.history_bytes,
        inputs: inputs_present,
    };

    let scenario_info = ScenarioInfo {
        name: scenario.name.clone(),
        description: scenario.description.trim().to_string(),
        seed: scenario.seed,
        sha256: dir.scenario_sha256.clone(),
        checks: scenario.checks.len(),
        faults: scenario.faults.len(),
    };

    let checks = dir.verdicts.clone().unwrap_or_default();
    let outcome = outcome(dir.verdicts.as_deref(), interrupted);

    let topo = &scenario.topology;
    let topology = TopologyInfo {
        nodes: topo.nodes,
        publish_mode: topo
            .node
            .publish_mode
            .as_ref()
            .map(serde_name)
            .unwrap_or_else(|| "default".into()),
        fanout_mode: topo
            .node
            .fanout_mode
            .as_ref()
            .map(serde_name)
            .unwrap_or_else(|| "default".into()),
        partitions: topo.stack.partitions,
        workers: if topo.workers.enabled {
            topo.workers
                .only
                .iter()
                .map(|w| w.name().to_string())
                .collect()
        } else {
            Vec::new()
        },
        worker_concurrency: topo.workers.concurrency,
        sabotage: topo.node.sabotage.keys().cloned().collect(),
    };

    let series: Vec<SecondEntry> = dir
        .series
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let c = |k: &str| p.counters.get(k).copied().unwrap_or(0);
            SecondEntry {
                second: p.second,
                measuring: p.measuring,
                sent: c("sends_invoked"),
                acked: c("sends_acked"),
                delivered: c("delivered_live") + c("delivered_sync"),
                counters: p.counters.clone(),
                latency: p.latency.clone(),
            }
        })
        .collect();

    let load = LoadInfo {
        asked: asked(scenario),
        achieved: achieved(&series, &run, &mut notes),
    };

    let latency = latency(dir, &run);

    let faults = faults(dir, &phases, &mut notes);

    let (resources, timeseries) = signals(dir.signals.as_deref().unwrap_or_default(), &mut notes);

    Report {
        schema_version: SCHEMA_VERSION,
        squall_version: env!("CARGO_PKG_VERSION").to_string(),
        run: run_info,
        scenario: scenario_info,
        outcome,
        environment,
        topology,
        load,
        phases,
        latency,
        series,
        faults,
        checks,
        resources,
        timeseries,
        notes,
    }
}

fn outcome(verdicts: Option<&[squall_check::Verdict]>, interrupted: bool) -> Outcome {
    let Some(verdicts) = verdicts else {
        return Outcome {
            result: RunResult::Fail,
            valid: 0,
            invalid: 0,
            unknown: 0,
            reason:
                "no verdicts.json: the run was not checked (stopped or aborted before checking)"
                    .into(),
        };
    };
    let count = |v: Validity| verdicts.iter().filter(|x| x.valid == v).count();
    let (valid, invalid, unknown) = (
        count(Validity::Valid),
        count(Validity::Invalid),
        count(Validity::Unknown),
    );
    let failing: Vec<&str> = verdicts
        .iter()
        .filter(|v| v.valid != Validity::Valid)
        .map(|v| v.checker.as_str())
        .collect();
    let (result, reason) = if verdicts.is_empty() {
        (RunResult::Fail, "no checks were evaluated".to_string())
    } else if !failing.is_empty() {
        (
            RunResult::Fail,
            format!(
                "{invalid} invalid, {unknown} unknown of {} checks: {}",
                verdicts.len(),
                failing.join("; ")
            ),
        )
    } else if interrupted {
        (RunResult::Fail, "the run was interrupted".to_string())
    } else {
        (RunResult::Pass, format!("all {valid} checks valid"))
    };
    Outcome {
        result,
        valid,
        invalid,
        unknown,
        reason,
    }
}

fn asked(scenario: &squall_scenario::Scenario) -> LoadAsked {
    let load = &scenario.load;
    let duration_s = load.duration.as_secs_f64();
    let measured_ops =
        load.rate.expected_count(load.total()) - load.rate.expected_count(load.warmup);
    let ops_per_s = if duration_s > 0.0 {
        measured_ops / duration_s
    } else {
        0.0
    };
    let weights = load.mix.weights();
    let total_weight: f64 = weights.iter().map(|(_, w)| w).sum();
    let mix: BTreeMap<String, f64> = weights
        .iter()
        .filter(|(_, w)| *w > 0.0)
        .map(|(k, w)| {
            (
                k.name().to_string(),
                round6(w / total_weight.max(f64::MIN_POSITIVE)),
            )
        })
        .collect();
    let chat = mix.get("chat").copied().unwrap_or(0.0);
    let mut http_per_s = BTreeMap::new();
    for h in &scenario.http {
        *http_per_s.entry(serde_name(&h.endpoint)).or_insert(0.0) += h.rate;
    }
    LoadAsked {
        users: load.users,
        tenants: load.tenants,
        conversations: load.conversations.count,
        warmup_s: load.warmup.as_secs_f64(),
        duration_s,
        ops_per_s: round3(ops_per_s),
        sends_per_s: round3(ops_per_s * chat),
        expected_ops_total: round3(load.rate.expected_count(load.total())),
        mix,
        http_per_s,
    }
}

fn achieved(
    series: &[SecondEntry],
    run: &inputs::RunJson,
    notes: &mut Vec<String>,
) -> LoadAchieved {
    let mut window: Vec<&SecondEntry> = series.iter().filter(|s| s.measuring).collect();
    if window.is_empty() && !series.is_empty() {
        notes.push(
            "no second of series.json is marked measuring: throughput is over the whole series"
                .into(),
        );
        window = series.iter().collect();
    }
    let sum = |f: &dyn Fn(&SecondEntry) -> u64| window.iter().map(|s| f(s)).sum::<u64>();
    let measured_s = window.len() as f64;
    let per_s = |n: u64| {
        if measured_s > 0.0 {
            round3(n as f64 / measured_s)
        } else {
            0.0
        }
    };
    let sends_invoked = sum(&|s| s.sent);
    let sends_acked = sum(&|s| s.acked);
    let deliveries = sum(&|s| s.delivered);
    let counter = |k: &'static str| move |s: &SecondEntry| s.counters.get(k).copied().unwrap_or(0);
    LoadAchieved {
        measured_s,
        sends_invoked_per_s: per_s(sends_invoked),
        sends_acked_per_s: per_s(sends_acked),
        deliveries_per_s: per_s(deliveries),
        live_deliveries_per_s: per_s(sum(&counter("delivered_live"))),
        sends_invoked,
        sends_acked,
        sends_failed: sum(&counter("sends_failed")),
        sends_unknown: sum(&counter("sends_unknown")),
        deliveries,
        arrivals: run.arrivals,
        counters: run.counters.clone(),
    }
}

fn from_histogram(h: &Histogram<u64>) -> LatencyStats {
    LatencyStats {
        source: "histograms".into(),
        count: h.len(),
        mean_us: round3(h.mean()),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        p9999_us: Some(h.value_at_quantile(0.9999)),
        max_us: h.max(),
        curve: if h.is_empty() {
            Vec::new()
        } else {
            CURVE_PERCENTILES
                .iter()
                .map(|p| [*p, h.value_at_quantile(p / 100.0) as f64])
                .collect()
        },
    }
}

fn latency(dir: &RunDir, run: &inputs::RunJson) -> BTreeMap<String, LatencyStats> {
    let mut out: BTreeMap<String, LatencyStats> = dir
        .histograms
        .iter()
        .flatten()
        .map(|(k, h)| (k.clone(), from_histogram(h)))
        .collect();
    for (k, s) in &run.latency_us {
        out.entry(k.clone()).or_insert_with(|| LatencyStats {
            source: "run.json".into(),
            count: s.count,
            mean_us: round3(s.mean_us),
            p50_us: s.p50_us,
            p90_us: s.p90_us,
            p99_us: s.p99_us,
            p999_us: s.p999_us,
            p9999_us: None,
            max_us: s.max_us,
            curve: Vec::new(),
        });
    }
    out
}

fn faults(dir: &RunDir, phases: &Phases, notes: &mut Vec<String>) -> Vec<FaultWindow> {
    let Some(history) = &dir.history else {
        return Vec::new();
    };
    let rel = |t: f64| phases.load_start_s.map(|l| round6(t - l));
    let mut out = Vec::new();
    for f in history.faults.values() {
        let Some(start_us) = f.start_us else {
            notes.push(format!(
                "fault {} ({} {}) has an end but no start in the history; left out",
                f.id, f.kind, f.target
            ));
            continue;
        };
        let start_s = round6(secs(start_us));
        let end_s = f.end_us.map(|t| round6(secs(t)));
        let outcome = match f.end_kind {
            None => "open",
            Some(squall_history::Kind::Ok) => "healed",
            Some(squall_history::Kind::Fail) => "failed",
            Some(_) => "uncertain",
        };
        out.push(FaultWindow {
            id: f.id,
            kind: f.kind.clone(),
            target: f.target.clone(),
            start_s,
            end_s,
            duration_s: end_s.map(|e| round6(e - start_s)),
            start_after_load_s: rel(start_s),
            end_after_load_s: end_s.and_then(rel),
            outcome: outcome.into(),
            error: f.error.clone(),
        });
    }
    out
}

/// The base name of a Prometheus sample key (`name{labels}` → `name`).
fn base_name(key: &str) -> &str {
    key.split('{').next().unwrap_or(key)
}

/// Sum of the samples of `metric` (any labels) in one source's samples.
fn metric_sum(samples: &BTreeMap<String, f64>, metric: &str) -> Option<f64> {
    let mut found = None;
    for (k, v) in samples {
        if base_name(k) == metric {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The connection gauge the nodes export: `chatstream_connections` if present, else any
/// `chatstream_*connections*` sample that is not a counter or histogram part.
fn connections_metric(points: &[SignalPoint]) -> Option<String> {
    let mut candidates: Vec<String> = points
        .iter()
        .flat_map(|p| p.metrics.iter())
        .filter(|(src, _)| src.starts_with("node"))
        .flat_map(|(_, m)| m.keys())
        .map(|k| base_name(k).to_string())
        .filter(|k| {
            k.starts_with("chatstream_")
                && k.contains("connections")
                && !["_total", "_count", "_sum", "_bucket"]
                    .iter()
                    .any(|s| k.ends_with(s))
        })
        .collect();
    candidates.sort();
    candidates.dedup();
    if candidates.iter().any(|c| c == CONNECTIONS_METRIC) {
        return Some(CONNECTIONS_METRIC.into());
    }
    candidates.into_iter().next()
}

fn push(lines: &mut Lines, name: &str, t: f64, v: f64) {
    if v.is_finite() {
        lines
            .lines
            .entry(name.to_string())
            .or_default()
            .push([round3(t), round6(v)]);
    }
}

fn signals(points: &[SignalPoint], notes: &mut Vec<String>) -> (Resources, TimeSeries) {
    let mut resources = Resources {
        samples: points.len(),
        ..Resources::default()
    };
    let mut ts = TimeSeries {
        consumer_lag: Lines {
            unit: "messages".into(),
            ..Lines::default()
        },
        outbox_backlog: Lines {
            unit: "rows".into(),
            ..Lines::default()
        },
        connections: Lines {
            unit: "connections".into(),
            ..Lines::default()
        },
        connections_metric: connections_metric(points),
        cpu: Lines {
            unit: "cores".into(),
            ..Lines::default()
        },
        rss_bytes: Lines {
            unit: "bytes".into(),
            ..Lines::default()
        },
    };
    let mut sums: BTreeMap<String, (f64, u128)> = BTreeMap::new();
    for p in points {
        for (name, s) in &p.processes {
            let u = resources.processes.entry(name.clone()).or_default();
            u.samples += 1;
            u.cpu_max = u.cpu_max.max(s.cpu);
            u.rss_max_bytes = u.rss_max_bytes.max(s.rss_bytes);
            let sum = sums.entry(name.clone()).or_default();
            sum.0 += s.cpu;
            sum.1 += u128::from(s.rss_bytes);
            push(&mut ts.cpu, name, p.t, s.cpu);
            push(&mut ts.rss_bytes, name, p.t, s.rss_bytes as f64);
        }
        for (group, lag) in &p.lag {
            push(&mut ts.consumer_lag, group, p.t, *lag);
        }
        for (source, samples) in &p.metrics {
            if let Some(v) = metric_sum(samples, OUTBOX_BACKLOG_METRIC) {
                push(&mut ts.outbox_backlog, source, p.t, v);
            }
            if let Some(metric) = &ts.connections_metric {
                if let Some(v) = metric_sum(samples, metric) {
                    push(&mut ts.connections, source, p.t, v);
                }
            }
        }
        for source in &p.unreachable {
            *resources.unreachable_s.entry(source.clone()).or_default() += 1;
        }
        if let Some(u) = p.kafka_under_replicated {
            let m = resources.kafka_under_replicated_max.get_or_insert(0);
            *m = (*m).max(u);
        }
    }
    for (name, u) in &mut resources.processes {
        if let Some((cpu, rss)) = sums.get(name) {
            let n = u.samples.max(1);
            u.cpu_mean = round6(cpu / n as f64);
            u.cpu_max = round6(u.cpu_max);
            u.rss_mean_bytes = (rss / n as u128) as u64;
        }
    }
    if !points.is_empty() {
        if ts.connections_metric.is_none() {
            notes.push(
                "the nodes export no chatstream_*connections* gauge: no connections per node"
                    .into(),
            );
        }
        if ts.outbox_backlog.lines.is_empty() {
            notes.push(format!("no node exported {OUTBOX_BACKLOG_METRIC}"));
        }
    }
    (resources, ts)
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_unix_ms() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_666_697_424), "2026-11-26T04:18:17.424Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn sums_labelled_samples() {
        let mut m = BTreeMap::new();
        m.insert("chatstream_outbox_backlog".to_string(), 2.0);
        m.insert("chatstream_outbox_backlog{shard=\"1\"}".to_string(), 3.0);
        m.insert("chatstream_outbox_backlog_total".to_string(), 100.0);
        assert_eq!(metric_sum(&m, OUTBOX_BACKLOG_METRIC), Some(5.0));
        assert_eq!(metric_sum(&m, "chatstream_connections"), None);
    }
}
