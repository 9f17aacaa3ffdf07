//! Judging a finished run from its directory alone (so `squall run` and `squall check`
//! give the same answer): the history indexed into facts, the readback, the saved
//! histograms, counters and signals; each of the scenario's checks — a checker or a gate
//! — becomes a verdict with its evidence. A check that cannot be evaluated (unknown
//! metric, no samples, no readback) is `unknown`, and unknown fails like invalid.

use anyhow::{Context, Result};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use squall_check::{Facts, FactsBuilder, Readback, Validity, Verdict};
use squall_scenario::{
    Check, Checker, CmpOp, DuplicatePath, Gate, GateScope, MetricRef, Scenario, Threshold,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::readback;
use super::signals::SignalPoint;

pub const FILE_NAME: &str = "verdicts.json";

/// Everything a verdict may be computed from.
pub struct RunRecord {
    pub facts: Facts,
    pub readback: Option<Readback>,
    pub histograms: BTreeMap<String, Histogram<u64>>,
    pub counters: BTreeMap<String, u64>,
    pub measured_s: f64,
    pub signals: Vec<SignalPoint>,
}

impl RunRecord {
    pub fn load(run_dir: &Path) -> Result<RunRecord> {
        let (header, ops) = squall_history::read(&run_dir.join(squall_history::FILE_NAME))?;
        let mut builder = FactsBuilder::new(&header);
        for op in ops {
            builder.push(op?);
        }
        let facts = builder.finish();
        let readback = readback::load(run_dir).ok();
        let histograms = load_histograms(&run_dir.join("histograms.json")).unwrap_or_default();
        let run: serde_json::Value = std::fs::read_to_string(run_dir.join("run.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let counters = run["counters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let measured_s = run["duration_s"].as_f64().unwrap_or(0.0);
        let signals = std::fs::read_to_string(run_dir.join("signals.jsonl"))
            .map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok(RunRecord {
            facts,
            readback,
            histograms,
            counters,
            measured_s,
            signals,
        })
    }
}

fn load_histograms(path: &Path) -> Result<BTreeMap<String, Histogram<u64>>> {
    use base64::Engine;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let encoded: BTreeMap<String, String> = serde_json::from_str(&text)?;
    let mut out = BTreeMap::new();
    for (k, v) in encoded {
        let bytes = base64::engine::general_purpose::STANDARD.decode(v)?;
        let h: Histogram<u64> =
            Deserializer::new().deserialize(&mut std::io::Cursor::new(bytes))?;
        out.insert(k, h);
    }
    Ok(out)
}

/// The checks a scenario without a `checks` section gets: the history-only checkers
/// (streams only when the load starts streams: with none there is nothing to judge).
fn default_checks(scenario: &Scenario) -> Vec<Check> {
    let mut checks = vec![
        Check::Checker(Checker::Delivery {}),
        Check::Checker(Checker::Order {}),
    ];
    let streams = scenario.load.mix.stream > 0.0
        || scenario
            .http
            .iter()
            .any(|h| h.endpoint == squall_scenario::HttpEndpoint::Chat);
    if streams {
        checks.push(Check::Checker(Checker::Streams {
            require_complete: false,
        }));
    }
    checks
}

fn unknown(name: &str, why: &str) -> Verdict {
    Verdict {
        checker: name.into(),
        valid: Validity::Unknown,
        summary: why.into(),
        counts: BTreeMap::new(),
        examples: Vec::new(),
        windows: Vec::new(),
    }
}

fn lag_samples(record: &RunRecord) -> Vec<(u64, BTreeMap<String, f64>)> {
    record
        .signals
        .iter()
        .map(|s| ((s.t * 1e6) as u64, s.lag.clone()))
        .collect()
}

/// The node metric that counts events a node discarded before Kafka or the outbox.
const EVENTS_DROPPED: &str = "chatstream_events_dropped_total";

/// Events the nodes dropped over the run, from their scraped counters: each node's
/// increases summed (a counter that falls was restarted with its process, and counts again
/// from zero). None when no node was ever scraped; a node that never dropped has no sample
/// of the counter at all, which counts as 0.
fn events_dropped(signals: &[SignalPoint]) -> Option<f64> {
    let mut last: BTreeMap<&str, f64> = BTreeMap::new();
    let mut total = 0.0;
    let mut scraped = false;
    for point in signals {
        for (process, metrics) in &point.metrics {
            if !process.starts_with("node") {
                continue;
            }
            scraped = true;
            let now: f64 = metrics
                .iter()
                .filter(|(k, _)| k.starts_with(EVENTS_DROPPED))
                .map(|(_, v)| v)
                .sum();
            let before = last.insert(process, now).unwrap_or(0.0);
            total += if now >= before { now - before } else { now };
        }
    }
    scraped.then_some(total)
}

fn last_fault_end(facts: &Facts) -> Option<u64> {
    facts.faults().iter().filter_map(|f| f.end).max()
}

/// Every check of the scenario, judged.
pub fn evaluate(scenario: &Scenario, record: &RunRecord) -> Vec<Verdict> {
    let checks = if scenario.checks.is_empty() {
        default_checks(scenario)
    } else {
        scenario.checks.clone()
    };
    checks.iter().map(|c| judge(c, record)).collect()
}

fn judge(check: &Check, record: &RunRecord) -> Verdict {
    let facts = &record.facts;
    match check {
        Check::Checker(Checker::Delivery {}) => squall_check::delivery(facts),
        Check::Checker(Checker::Order {}) => squall_check::order(facts),
        Check::Checker(Checker::Streams { require_complete }) => {
            squall_check::streams_required(facts, *require_complete)
        }
        Check::Checker(Checker::NoLossDownstream {}) => match &record.readback {
            Some(rb) => squall_check::no_loss_downstream(facts, rb),
            None => unknown(
                "no_loss_downstream",
                "nothing was read back from Kafka and PostgreSQL for this run",
            ),
        },
        Check::Checker(Checker::Duplicates {
            max_fraction,
            paths,
        }) => {
            let paths: Vec<squall_check::Path> = paths
                .iter()
                .map(|p| match p {
                    DuplicatePath::Live => squall_check::Path::Live,
                    DuplicatePath::Sync => squall_check::Path::Sync,
                    DuplicatePath::Kafka => squall_check::Path::Kafka,
                    DuplicatePath::Audit => squall_check::Path::Audit,
                })
                .collect();
            squall_check::duplicates(facts, &paths, *max_fraction, record.readback.as_ref())
        }
        Check::Checker(Checker::Replay { projections }) => match &record.readback {
            Some(rb) => squall_check::replay(rb, &projection_names(projections)),
            None => unknown("replay", "nothing was read back for this run"),
        },
        Check::Checker(Checker::Lag { max, within }) => squall_check::lag(
            &lag_samples(record),
            last_fault_end(facts),
            *max,
            within.as_micros() as u64,
        ),
        Check::Checker(Checker::Slo {
            metric,
            percentile,
            max,
            outside_faults,
        }) => {
            if squall_check::METRICS.contains(&metric.as_str()) {
                squall_check::slo(
                    facts,
                    metric,
                    *percentile,
                    max.as_micros() as u64,
                    *outside_faults,
                )
            } else {
                let gate = Gate {
                    metric: MetricRef::Percentile {
                        p: *percentile,
                        metric: metric.clone(),
                    },
                    op: CmpOp::Lt,
                    threshold: Threshold::Duration(*max),
                    scope: if *outside_faults {
                        GateScope::OutsideFaults
                    } else {
                        GateScope::Whole
                    },
                    text: format!("p{percentile}({metric}) < {max:?}"),
                };
                gate_verdict(&gate, record)
            }
        }
        Check::Gate(gate) => gate_verdict(gate, record),
    }
}

pub fn projection_names(projections: &[squall_scenario::Projection]) -> Vec<String> {
    projections
        .iter()
        .map(|p| {
            serde_json::to_value(p)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{p:?}").to_lowercase())
        })
        .collect()
}

fn compare(op: CmpOp, value: f64, threshold: f64) -> bool {
    match op {
        CmpOp::Lt => value < threshold,
        CmpOp::Le => value <= threshold,
        CmpOp::Gt => value > threshold,
        CmpOp::Ge => value >= threshold,
        CmpOp::Eq => (value - threshold).abs() < f64::EPSILON,
    }
}

/// A gate's value, in µs for latencies; None with the reason when it cannot be evaluated.
fn gate_value(gate: &Gate, record: &RunRecord) -> Result<f64, String> {
    let facts = &record.facts;
    let counter = |k: &str| record.counters.get(k).copied();
    let latency = |metric: &str, f: &dyn Fn(&Histogram<u64>) -> f64| -> Result<f64, String> {
        match (&gate.scope, record.histograms.get(metric)) {
            (GateScope::Whole, Some(h)) if !h.is_empty() => Ok(f(h)),
            (GateScope::Whole, _) => Err(format!("no samples of `{metric}` in this run")),
            _ => Err(format!(
                "`{metric}` can only be judged over the whole run (history-based metrics: {})",
                squall_check::METRICS.join(", ")
            )),
        }
    };
    match &gate.metric {
        MetricRef::Percentile { p, metric } => {
            if squall_check::METRICS.contains(&metric.as_str()) && gate.scope != GateScope::Whole {
                let outside = match gate.scope {
                    GateScope::OutsideFaults => true,
                    _ => return Err("a percentile gate takes `outside faults` or no scope".into()),
                };
                let v = squall_check::slo(facts, metric, *p, u64::MAX, outside);
                return v.counts.get("value_us").map(|v| *v as f64).ok_or(v.summary);
            }
            latency(metric, &|h| h.value_at_quantile(p / 100.0) as f64)
        }
        MetricRef::Max(metric) => latency(metric, &|h| h.max() as f64),
        MetricRef::Mean(metric) => latency(metric, &|h| h.mean()),
        MetricRef::Counter(name) => {
            let delivery = || squall_check::delivery(facts);
            match name.as_str() {
                "lost" | "sync_refused" | "unexpected" | "duplicated" | "recovered" => {
                    let v = delivery();
                    v.counts
                        .get(name.as_str())
                        .map(|c| *c as f64)
                        .ok_or(format!(
                            "the delivery checker gave no `{name}` count: {}",
                            v.summary
                        ))
                }
                "events_dropped" => events_dropped(&record.signals).ok_or(
                    "no node's metrics were scraped in this run (is a node's /metrics reachable?)"
                        .to_string(),
                ),
                "error_rate" => {
                    let invoked = counter("sends_invoked")
                        .filter(|n| *n > 0)
                        .ok_or("no sends in this run")?;
                    let errors = counter("sends_failed").unwrap_or(0)
                        + counter("sends_unknown").unwrap_or(0);
                    let fraction = errors as f64 / invoked as f64;
                    Ok(if matches!(gate.threshold, Threshold::Percent(_)) {
                        fraction * 100.0
                    } else {
                        fraction
                    })
                }
                other => counter(other)
                    .map(|c| c as f64)
                    .ok_or(format!("no counter `{other}` in this run")),
            }
        }
        MetricRef::Rate(name) => {
            if record.measured_s <= 0.0 {
                return Err("the run has no measured duration".into());
            }
            let count = match name.as_str() {
                "delivered" => {
                    counter("delivered_live").unwrap_or(0) + counter("delivered_sync").unwrap_or(0)
                }
                "acked" | "sent" => counter("sends_acked").unwrap_or(0),
                other => counter(other).ok_or(format!("no counter `{other}` in this run"))?,
            };
            Ok(count as f64 / record.measured_s)
        }
        MetricRef::Lag(group) => {
            let samples: Vec<(u64, f64)> = lag_samples(record)
                .into_iter()
                .filter_map(|(t, m)| m.get(group).map(|v| (t, *v)))
                .collect();
            if samples.is_empty() {
                return Err(format!("no lag samples for group `{group}`"));
            }
            match gate.scope {
                GateScope::WithinAfterFaults(d) => {
                    let end = last_fault_end(facts)
                        .unwrap_or_else(|| samples.last().map(|s| s.0).unwrap_or(0));
                    let at = end + d.as_micros() as u64;
                    // The lag from the first sample at or after `at` on (it must stay there).
                    let after: Vec<f64> = samples
                        .iter()
                        .filter(|(t, _)| *t >= at)
                        .map(|(_, v)| *v)
                        .collect();
                    after
                        .into_iter()
                        .reduce(f64::max)
                        .ok_or(format!("the run ended before {d:?} after the last fault"))
                }
                _ => Ok(samples.iter().map(|s| s.1).fold(0.0, f64::max)),
            }
        }
    }
}

fn threshold_value(t: &Threshold) -> f64 {
    match t {
        Threshold::Duration(d) => d.as_micros() as f64,
        Threshold::Percent(p) | Threshold::Number(p) => *p,
    }
}

fn shown(value: f64, t: &Threshold) -> String {
    match t {
        Threshold::Duration(_) => format!("{:.1} ms", value / 1000.0),
        Threshold::Percent(_) => format!("{value:.3}%"),
        Threshold::Number(_) => format!("{value:.2}"),
    }
}

fn gate_verdict(gate: &Gate, record: &RunRecord) -> Verdict {
    match gate_value(gate, record) {
        Ok(value) => {
            let threshold = threshold_value(&gate.threshold);
            let ok = compare(gate.op, value, threshold);
            let mut counts = BTreeMap::new();
            counts.insert("value".into(), value.round() as u64);
            counts.insert("threshold".into(), threshold.round() as u64);
            Verdict {
                checker: gate.text.clone(),
                valid: if ok {
                    Validity::Valid
                } else {
                    Validity::Invalid
                },
                summary: format!(
                    "{} is {} (must be {} {})",
                    gate.text.split_whitespace().next().unwrap_or(&gate.text),
                    shown(value, &gate.threshold),
                    gate.op.symbol(),
                    shown(threshold, &gate.threshold)
                ),
                counts,
                examples: Vec::new(),
                windows: record.facts.fault_windows(),
            }
        }
        Err(why) => unknown(&gate.text, &format!("cannot be evaluated: {why}")),
    }
}

pub fn save(verdicts: &[Verdict], run_dir: &Path) -> Result<()> {
    let path = run_dir.join(FILE_NAME);
    std::fs::write(&path, serde_json::to_string_pretty(verdicts)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn all_valid(verdicts: &[Verdict]) -> bool {
    verdicts.iter().all(|v| v.valid == Validity::Valid)
}

/// The verdict table of the summary, with the first examples of each failure.
pub fn render(verdicts: &[Verdict]) -> String {
    let mut out = String::from("  checks\n");
    for v in verdicts {
        let mark = match v.valid {
            Validity::Valid => "pass",
            Validity::Invalid => "FAIL",
            Validity::Unknown => "UNKNOWN",
        };
        let _ = writeln!(out, "    {mark:<8} {:<34} {}", v.checker, v.summary);
        if v.valid != Validity::Valid {
            for e in v.examples.iter().take(3) {
                let _ = writeln!(
                    out,
                    "             {} {}: {}",
                    e.what,
                    e.id,
                    e.timeline
                        .iter()
                        .take(4)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: f64, nodes: &[(&str, Option<f64>)]) -> SignalPoint {
        let metrics = nodes
            .iter()
            .map(|(node, dropped)| {
                let mut m = BTreeMap::from([("chatstream_connections".to_string(), 3.0)]);
                if let Some(d) = dropped {
                    m.insert(format!("{EVENTS_DROPPED}{{reason=\"queue_full\"}}"), *d);
                }
                (node.to_string(), m)
            })
            .collect();
        SignalPoint {
            t,
            processes: BTreeMap::new(),
            metrics,
            lag: BTreeMap::new(),
            redis: BTreeMap::new(),
            kafka_under_replicated: None,
            unreachable: Vec::new(),
        }
    }

    #[test]
    fn events_dropped_sums_each_nodes_increases_across_restarts() {
        let signals = [
            point(1.0, &[("node-1", None), ("node-2", Some(5.0))]),
            point(2.0, &[("node-1", Some(10.0)), ("node-2", Some(7.0))]),
            // node-1 restarted: its counter starts again from zero.
            point(3.0, &[("node-1", Some(4.0)), ("node-2", Some(7.0))]),
        ];
        assert_eq!(events_dropped(&signals), Some(10.0 + 4.0 + 7.0));
    }

    #[test]
    fn events_dropped_is_zero_when_no_node_dropped_and_unknown_when_none_was_scraped() {
        let quiet = [
            point(1.0, &[("node-1", None)]),
            point(2.0, &[("node-1", None)]),
        ];
        assert_eq!(events_dropped(&quiet), Some(0.0));
        assert_eq!(events_dropped(&[point(1.0, &[])]), None);
    }
}
