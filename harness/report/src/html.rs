//! `report.html`: one self-contained page (inline CSS, inline SVG from [`crate::svg`], no
//! script, no font, image or stylesheet from anywhere) showing the whole report: the
//! headline and the run's facts, the checks with their evidence in collapsible
//! `<details>`, the faults, charts of throughput, latency over time and latency
//! distributions, connections, consumer lag and outbox backlog, CPU and RSS per process,
//! and the scenario as it was run.

use squall_check::Validity;
use std::fmt::Write as _;

use crate::markdown::{headline_facts, MAIN_LATENCIES};
use crate::model::{Lines, Report, RunResult};
use crate::svg::{self, Band, Chart, Line, Marker, Scale, XKind};
use crate::text::{bytes, escape_xml as esc, ms, num, offset, secs, validity};

/// The `data-chart` names of every chart the page holds, in page order.
pub const CHARTS: [&str; 10] = [
    "throughput",
    "latency_send_ack",
    "latency_delivery",
    "latency_distribution",
    "latency_distribution_http",
    "connections",
    "consumer_lag",
    "outbox_backlog",
    "cpu",
    "rss",
];

const CSS: &str = r#"
:root { --fg: #1d2430; --muted: #5b6472; --line: #e3e6eb; --pass: #1a7f37; --fail: #c62828; --unknown: #b26a00; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg); background: #f6f7f9; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; min-height: 100vh; }
h1 { font-size: 24px; margin: 0 0 6px; }
h2 { font-size: 18px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 6px; }
p { margin: 6px 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px; }
pre { background: #f4f5f7; padding: 10px 12px; border-radius: 6px; overflow-x: auto; white-space: pre; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 12.5px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 700; color: #fff; vertical-align: middle; }
.badge.pass { background: var(--pass); } .badge.fail { background: var(--fail); } .badge.unknown { background: var(--unknown); }
h1 .badge { font-size: 15px; padding: 2px 12px; }
.muted { color: var(--muted); }
.facts { color: var(--muted); }
nav { margin: 10px 0 0; font-size: 13px; }
nav a { color: #1f5fbf; text-decoration: none; margin-right: 12px; }
details { margin: 2px 0; }
details > summary { cursor: pointer; color: #1f5fbf; }
details pre { margin: 6px 0; max-height: 360px; overflow: auto; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 6px 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
figure { margin: 8px 0 18px; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
svg.chart { display: block; width: 100%; height: auto; background: #fff; }
svg.chart text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
svg .grid { stroke: #edf0f3; stroke-width: 1; } svg .grid-x { stroke: #f4f6f8; }
svg .axis { stroke: #8a929e; stroke-width: 1; }
svg .tick { font-size: 11px; fill: #5b6472; }
svg .axis-label { font-size: 12px; fill: #3b4350; }
svg .band-label { font-size: 11px; fill: #b71c1c; font-weight: 600; }
svg .marker { stroke: #6b7380; stroke-width: 1; stroke-dasharray: 2 4; }
svg .marker-label { font-size: 10.5px; fill: #6b7380; }
svg .legend { font-size: 12px; fill: #1d2430; }
svg .note { font-size: 13px; fill: #8a929e; }
.notes li { color: var(--muted); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"#;

fn badge(v: Validity) -> String {
    let class = match v {
        Validity::Valid => "pass",
        Validity::Invalid => "fail",
        Validity::Unknown => "unknown",
    };
    format!(r#"<span class="badge {class}">{}</span>"#, validity(v))
}

/// Shared time axis, fault bands and phase markers of every time chart.
struct TimeFrame {
    range: (f64, f64),
    bands: Vec<Band>,
    markers: Vec<Marker>,
}

impl TimeFrame {
    fn of(r: &Report) -> TimeFrame {
        let mut end: f64 = r
            .series
            .last()
            .map(|s| s.second as f64 + 1.0)
            .unwrap_or(0.0);
        for lines in [&r.timeseries.cpu, &r.timeseries.consumer_lag] {
            for pts in lines.lines.values() {
                if let Some(p) = pts.last() {
                    end = end.max(p[0]);
                }
            }
        }
        for t in [r.phases.load_end_s, r.phases.drained_s]
            .into_iter()
            .flatten()
        {
            end = end.max(t);
        }
        for f in &r.faults {
            end = end.max(f.end_s.unwrap_or(f.start_s));
        }
        if end <= 0.0 {
            end = r.load.asked.warmup_s + r.load.asked.duration_s;
        }
        let end = end.max(1.0);
        let bands = r
            .faults
            .iter()
            .map(|f| Band {
                from: f.start_s,
                to: f.end_s.unwrap_or(end),
                label: format!("#{} {} {}", f.id, f.kind, f.target),
            })
            .collect();
        let markers = [
            (r.phases.load_start_s, "load start"),
            (r.phases.load_end_s, "load end"),
        ]
        .into_iter()
        .filter_map(|(t, label)| {
            t.map(|x| Marker {
                x,
                label: label.into(),
            })
        })
        .collect();
        TimeFrame {
            range: (0.0, end),
            bands,
            markers,
        }
    }

    fn chart(&self, name: &str, title: &str, y_label: &str) -> Chart {
        let mut c = Chart::new(name, title, XKind::Time, y_label);
        c.x_range = Some(self.range);
        c.bands = self.bands.clone();
        c.markers = self.markers.clone();
        c
    }
}

fn lines_of(lines: &Lines, scale: f64) -> Vec<Line> {
    lines
        .lines
        .iter()
        .map(|(name, pts)| Line {
            label: name.clone(),
            points: pts.iter().map(|p| (p[0], p[1] * scale)).collect(),
            dashed: false,
        })
        .collect()
}

fn figure(o: &mut String, title: &str, chart: &Chart, caption: &str) {
    let _ = write!(o, "<figure><h3>{}</h3>{}", esc(title), svg::render(chart));
    if !caption.is_empty() {
        let _ = write!(o, "<figcaption>{}</figcaption>", esc(caption));
    }
    o.push_str("</figure>\n");
}

fn charts(r: &Report, o: &mut String) {
    let frame = TimeFrame::of(r);
    let fault_note = if r.faults.is_empty() {
        ""
    } else {
        " Shaded: fault windows (real start to real end, from the history)."
    };

    // (a) throughput.
    let mut c = frame.chart("throughput", "Throughput", "per second");
    let series_line = |label: &str, f: &dyn Fn(&crate::model::SecondEntry) -> u64| Line {
        label: label.into(),
        points: r
            .series
            .iter()
            .map(|s| (s.second as f64 + 0.5, f(s) as f64))
            .collect(),
        dashed: false,
    };
    c.lines = vec![
        series_line("sent/s", &|s| s.sent),
        series_line("acked/s", &|s| s.acked),
        series_line("delivered/s", &|s| s.delivered),
    ];
    c.empty_note = "no data: series.json is missing or empty".into();
    let _ = writeln!(o, r#"<h2 id="throughput">Throughput</h2>"#);
    figure(
        o,
        "Chat sends and deliveries per second",
        &c,
        &format!(
            "Asked: {} sends/s ({} operations/s of every kind) in the measured window.{fault_note}",
            num(r.load.asked.sends_per_s),
            num(r.load.asked.ops_per_s)
        ),
    );

    // (b) latency over time.
    let _ = writeln!(o, r#"<h2 id="latency-over-time">Latency over time</h2>"#);
    for (name, metric, title) in [
        ("latency_send_ack", "send_ack", "send → ack (send_ack)"),
        (
            "latency_delivery",
            "delivery",
            "send → live delivery (delivery)",
        ),
    ] {
        let mut c = frame.chart(name, title, "ms (log scale)");
        c.y_scale = Scale::Log;
        c.lines = [("p50", 0usize), ("p99", 1), ("p99.9", 2)]
            .iter()
            .map(|(label, which)| Line {
                label: format!("{metric} {label}"),
                points: r
                    .series
                    .iter()
                    .filter_map(|s| {
                        let l = s.latency.get(metric)?;
                        let us = [l.p50_us, l.p99_us, l.p999_us][*which];
                        Some((s.second as f64 + 0.5, us as f64 / 1000.0))
                    })
                    .collect(),
                dashed: *which == 2,
            })
            .collect();
        c.empty_note = format!("no data: no {metric} latency in series.json");
        figure(
            o,
            title,
            &c,
            &format!(
                "Per second, from the intended send time (includes warm-up and drain).{fault_note}"
            ),
        );
    }

    // (c) latency distributions.
    let _ = writeln!(o, r#"<h2 id="latency">Latency distributions</h2>"#);
    let mut c = Chart::new(
        "latency_distribution",
        "Latency by percentile",
        XKind::Percentile,
        "ms (log scale)",
    );
    c.y_scale = Scale::Log;
    c.lines = MAIN_LATENCIES
        .iter()
        .filter_map(|m| {
            let s = r.latency.get(*m)?;
            (!s.curve.is_empty()).then(|| Line {
                label: (*m).to_string(),
                points: s.curve.iter().map(|p| (p[0], p[1] / 1000.0)).collect(),
                dashed: false,
            })
        })
        .collect();
    c.empty_note = "no data: histograms.json is missing or holds none of the main latencies".into();
    figure(
        o,
        "Main latencies by percentile (measured window)",
        &c,
        "From the saved HdrHistograms; x is the percentile on a log scale of 1 − p.",
    );
    let mut c = Chart::new(
        "latency_distribution_http",
        "HTTP latency by percentile",
        XKind::Percentile,
        "ms (log scale)",
    );
    c.y_scale = Scale::Log;
    c.lines = r
        .latency
        .iter()
        .filter(|(k, s)| k.starts_with("http_") && !s.curve.is_empty())
        .map(|(k, s)| Line {
            label: k.clone(),
            points: s.curve.iter().map(|p| (p[0], p[1] / 1000.0)).collect(),
            dashed: false,
        })
        .collect();
    c.empty_note = "no data: no HTTP traffic in this scenario".into();
    figure(o, "HTTP endpoints by percentile (measured window)", &c, "");
    latency_table(r, o);

    // (d) connections.
    let _ = writeln!(o, r#"<h2 id="connections">Connections per node</h2>"#);
    let mut c = frame.chart("connections", "Connections per node", "connections");
    c.lines = lines_of(&r.timeseries.connections, 1.0);
    c.empty_note = if r.resources.samples == 0 {
        "no data: signals.jsonl is missing or empty".into()
    } else {
        "no data: the nodes export no chatstream_*connections* gauge".into()
    };
    figure(
        o,
        "WebSocket connections per node",
        &c,
        &r.timeseries
            .connections_metric
            .as_deref()
            .map(|m| format!("The nodes' {m} gauge, sampled every second.{fault_note}"))
            .unwrap_or_default(),
    );

    // (e) consumer lag and outbox backlog.
    let _ = writeln!(
        o,
        r#"<h2 id="backlog">Consumer lag and outbox backlog</h2>"#
    );
    let mut c = frame.chart("consumer_lag", "Consumer lag per group", "messages");
    c.lines = lines_of(&r.timeseries.consumer_lag, 1.0);
    c.empty_note = "no data: no consumer group reported lag (no workers, or no signals)".into();
    figure(
        o,
        "Consumer lag per group",
        &c,
        &format!(
            "chatstream_consumer_lag summed over topics and partitions per group.{fault_note}"
        ),
    );
    let mut c = frame.chart("outbox_backlog", "Outbox backlog per node", "rows");
    c.lines = lines_of(&r.timeseries.outbox_backlog, 1.0);
    c.empty_note = "no data: no node exported chatstream_outbox_backlog".into();
    figure(
        o,
        "Outbox backlog per node",
        &c,
        &format!("chatstream_outbox_backlog: outbox rows not yet published to Kafka.{fault_note}"),
    );

    // (f) CPU and RSS.
    let _ = writeln!(o, r#"<h2 id="resources">Resources</h2>"#);
    let mut c = frame.chart("cpu", "CPU per process", "cores");
    c.lines = lines_of(&r.timeseries.cpu, 1.0);
    c.empty_note = "no data: signals.jsonl is missing or empty".into();
    figure(
        o,
        "CPU per process",
        &c,
        "1.0 = one core busy for the whole second.",
    );
    let mut c = frame.chart("rss", "RSS per process", "MiB");
    c.lines = lines_of(&r.timeseries.rss_bytes, 1.0 / (1024.0 * 1024.0));
    c.empty_note = "no data: signals.jsonl is missing or empty".into();
    figure(o, "Resident memory per process", &c, "");
    resources_table(r, o);
}

fn latency_table(r: &Report, o: &mut String) {
    if r.latency.is_empty() {
        o.push_str("<p class=\"muted\">No latencies were recorded.</p>\n");
        return;
    }
    o.push_str("<h3>Every latency (ms, measured window, from the intended time)</h3>\n<table><tr><th>metric</th><th class=\"num\">count</th><th class=\"num\">mean</th><th class=\"num\">p50</th><th class=\"num\">p90</th><th class=\"num\">p99</th><th class=\"num\">p99.9</th><th class=\"num\">p99.99</th><th class=\"num\">max</th><th>source</th></tr>\n");
    for (k, s) in &r.latency {
        let _ = writeln!(
            o,
            r#"<tr><td><code>{}</code></td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="muted">{}</td></tr>"#,
            esc(k),
            s.count,
            ms(s.mean_us.round() as u64),
            ms(s.p50_us),
            ms(s.p90_us),
            ms(s.p99_us),
            ms(s.p999_us),
            s.p9999_us.map(ms).unwrap_or_else(|| "–".into()),
            ms(s.max_us),
            esc(&s.source)
        );
    }
    o.push_str("</table>\n");
}

fn resources_table(r: &Report, o: &mut String) {
    if r.resources.processes.is_empty() {
        return;
    }
    let mut procs: Vec<_> = r.resources.processes.iter().collect();
    procs.sort_by(|x, y| y.1.cpu_mean.total_cmp(&x.1.cpu_mean).then(x.0.cmp(y.0)));
    o.push_str("<table><tr><th>process</th><th class=\"num\">samples</th><th class=\"num\">CPU mean (cores)</th><th class=\"num\">CPU max</th><th class=\"num\">RSS mean</th><th class=\"num\">RSS max</th></tr>\n");
    for (name, u) in procs {
        let _ = writeln!(
            o,
            r#"<tr><td>{}</td><td class="num">{}</td><td class="num">{:.3}</td><td class="num">{:.3}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            esc(name),
            u.samples,
            u.cpu_mean,
            u.cpu_max,
            bytes(u.rss_mean_bytes),
            bytes(u.rss_max_bytes)
        );
    }
    o.push_str("</table>\n");
    let res = &r.resources;
    if !res.unreachable_s.is_empty() {
        let parts: Vec<String> = res
            .unreachable_s
            .iter()
            .map(|(k, n)| format!("{k} {n} s"))
            .collect();
        let _ = writeln!(
            o,
            "<p class=\"muted\">Did not answer the metrics scrape: {}.</p>",
            esc(&parts.join(", "))
        );
    }
    if let Some(u) = res.kafka_under_replicated_max {
        let _ = writeln!(
            o,
            "<p class=\"muted\">Kafka under-replicated partitions, maximum seen: {u}.</p>"
        );
    }
}

fn checks(r: &Report, o: &mut String) {
    let _ = writeln!(o, r#"<h2 id="checks">Checks</h2>"#);
    if r.checks.is_empty() {
        let _ = writeln!(o, "<p>No verdicts: {}.</p>", esc(&r.outcome.reason));
        return;
    }
    o.push_str("<table><tr><th>check</th><th>result</th><th>summary and evidence</th></tr>\n");
    for v in &r.checks {
        let _ = write!(
            o,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}",
            esc(&v.checker),
            badge(v.valid),
            esc(&v.summary)
        );
        let has_evidence = !v.counts.is_empty() || !v.examples.is_empty() || !v.windows.is_empty();
        if has_evidence {
            let open = if v.valid == Validity::Valid {
                ""
            } else {
                " open"
            };
            let _ = write!(
                o,
                "<details{open}><summary>evidence: {} count(s), {} example(s)</summary>",
                v.counts.len(),
                v.examples.len()
            );
            if !v.counts.is_empty() {
                let counts: Vec<String> =
                    v.counts.iter().map(|(k, n)| format!("{k} = {n}")).collect();
                let _ = write!(o, "<pre>{}</pre>", esc(&counts.join("\n")));
            }
            for (a, b) in &v.windows {
                let _ = write!(
                    o,
                    "<p class=\"muted\">window: {} to {} since the start of the run</p>",
                    secs(*a as f64 / 1e6),
                    secs(*b as f64 / 1e6)
                );
            }
            for (i, e) in v.examples.iter().enumerate() {
                // The first example of a failing check is open: the reader came for it.
                let open = if i == 0 && v.valid != Validity::Valid {
                    " open"
                } else {
                    ""
                };
                let _ = write!(
                    o,
                    "<details{open}><summary><code>{}</code>: {}</summary><pre>{}</pre></details>",
                    esc(&e.id),
                    esc(&e.what),
                    esc(&e.timeline.join("\n"))
                );
            }
            o.push_str("</details>");
        }
        o.push_str("</td></tr>\n");
    }
    o.push_str("</table>\n");
}

fn faults(r: &Report, o: &mut String) {
    let _ = writeln!(o, r#"<h2 id="faults">Faults</h2>"#);
    if r.faults.is_empty() {
        o.push_str("<p class=\"muted\">No fault was injected.</p>\n");
        return;
    }
    o.push_str("<table><tr><th class=\"num\">id</th><th>kind</th><th>target</th><th class=\"num\">start</th><th class=\"num\">end</th><th class=\"num\">duration</th><th class=\"num\">since load start</th><th>outcome</th></tr>\n");
    for f in &r.faults {
        let rel = match (f.start_after_load_s, f.end_after_load_s) {
            (Some(a), Some(b)) => format!("{} → {}", offset(a), offset(b)),
            (Some(a), None) => format!("{} → open", offset(a)),
            _ => "–".into(),
        };
        let _ = writeln!(
            o,
            r#"<tr><td class="num">{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td>{}{}</td></tr>"#,
            f.id,
            esc(&f.kind),
            esc(&f.target),
            secs(f.start_s),
            f.end_s.map(secs).unwrap_or_else(|| "open".into()),
            f.duration_s.map(secs).unwrap_or_else(|| "–".into()),
            esc(&rel),
            esc(&f.outcome),
            f.error
                .as_deref()
                .map(|e| format!(": {}", esc(e)))
                .unwrap_or_default()
        );
    }
    o.push_str("</table>\n<p class=\"muted\">Times in seconds since the start of the run (the history's origin); the scenario's <code>at</code> is measured from the load start.</p>\n");
}

fn overview(r: &Report, o: &mut String) {
    let (a, b) = (&r.load.asked, &r.load.achieved);
    let env = &r.environment;
    let mut rows: Vec<(&str, String)> = vec![
        ("run", format!("<code>{}</code>", esc(&r.run.run_id))),
        (
            "started",
            esc(r.run.started_at.as_deref().unwrap_or("unknown")),
        ),
        (
            "scenario",
            format!(
                "<code>{}</code>, seed {}, sha256 <code>{}</code>",
                esc(&r.scenario.name),
                r.scenario.seed,
                esc(&r.scenario.sha256)
            ),
        ),
        (
            "topology",
            esc(&format!(
                "{} node(s), publish {}, fanout {}, {} partitions; workers: {} (×{}){}",
                r.topology.nodes,
                r.topology.publish_mode,
                r.topology.fanout_mode,
                r.topology.partitions,
                if r.topology.workers.is_empty() {
                    "none".to_string()
                } else {
                    r.topology.workers.join(", ")
                },
                r.topology.worker_concurrency,
                if r.topology.sabotage.is_empty() {
                    String::new()
                } else {
                    format!("; sabotage: {}", r.topology.sabotage.join(", "))
                }
            )),
        ),
        (
            "load asked",
            esc(&format!(
                "{} users ({} tenants), {} conversations; {} operations/s of which {} chat sends/s; {} s warm-up, {} s measured",
                a.users,
                a.tenants,
                a.conversations,
                num(a.ops_per_s),
                num(a.sends_per_s),
                num(a.warmup_s),
                num(a.duration_s)
            )),
        ),
        (
            "load achieved",
            esc(&format!(
                "over {} measured seconds: {} sends/s invoked, {} acked, {} deliveries/s; {} sends failed, {} unknown",
                num(b.measured_s),
                num(b.sends_invoked_per_s),
                num(b.sends_acked_per_s),
                num(b.deliveries_per_s),
                b.sends_failed,
                b.sends_unknown
            )),
        ),
        (
            "environment",
            esc(&format!(
                "{} cores, {} memory, {}, kernel {} ({})",
                env.cores.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
                env.memory_bytes.map(bytes).unwrap_or_else(|| "?".into()),
                env.os,
                env.kernel.as_deref().unwrap_or("?"),
                env.source
            )),
        ),
        (
            "commit",
            env.git_commit
                .as_deref()
                .map(|c| format!("<code>{}</code>", esc(c)))
                .unwrap_or_else(|| "unknown".into()),
        ),
    ];
    if r.run.interrupted {
        rows.push(("interrupted", "yes: the load was stopped early".into()));
    }
    o.push_str("<dl class=\"kv\">");
    for (k, v) in rows {
        let _ = write!(o, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    }
    o.push_str("</dl>\n");
    if !r.scenario.description.is_empty() {
        let _ = writeln!(o, "<p class=\"muted\">{}</p>", esc(&r.scenario.description));
    }
}

pub fn render(r: &Report, scenario_yaml: &str) -> String {
    let (result, class) = match r.outcome.result {
        RunResult::Pass => ("PASS", "pass"),
        RunResult::Fail => ("FAIL", "fail"),
    };
    let mut o = String::with_capacity(256 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>squall {}: {result}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        esc(&r.scenario.name)
    );
    let _ = writeln!(
        o,
        r#"<h1>squall <code>{}</code> <span class="badge {class}">{result}</span></h1>"#,
        esc(&r.scenario.name)
    );
    let _ = writeln!(o, "<p><strong>{}</strong></p>", esc(&r.outcome.reason));
    let _ = writeln!(o, "<p class=\"facts\">{}</p>", esc(&headline_facts(r)));
    o.push_str("<nav><a href=\"#checks\">checks</a><a href=\"#faults\">faults</a><a href=\"#throughput\">throughput</a><a href=\"#latency-over-time\">latency over time</a><a href=\"#latency\">distributions</a><a href=\"#connections\">connections</a><a href=\"#backlog\">lag and backlog</a><a href=\"#resources\">resources</a><a href=\"#scenario\">scenario</a></nav>\n");
    let _ = writeln!(o, r#"<h2 id="overview">Overview</h2>"#);
    overview(r, &mut o);
    checks(r, &mut o);
    faults(r, &mut o);
    charts(r, &mut o);
    let _ = writeln!(o, r#"<h2 id="scenario">Scenario</h2>"#);
    let _ = writeln!(o, "<pre>{}</pre>", esc(scenario_yaml));
    if !r.notes.is_empty() {
        let _ = writeln!(o, r#"<h2 id="notes">Notes</h2><ul class="notes">"#);
        for n in &r.notes {
            let _ = writeln!(o, "<li>{}</li>", esc(n));
        }
        o.push_str("</ul>\n");
    }
    let _ = writeln!(
        o,
        "<footer>Rendered by squall {} from the run directory (report.json schema v{}).</footer>\n</main>\n</body>\n</html>",
        esc(&r.squall_version),
        r.schema_version
    );
    o
}
