//! `summary.md`: the run in a size fit for a pull-request comment (well under 60 lines for
//! the shipped scenarios): the headline, the checks, the main latencies, throughput asked
//! against achieved, the faults with their real windows and the top resource users. Long
//! lists are capped with a "... more" line; report.html has everything.

use squall_check::Validity;
use std::fmt::Write as _;

use crate::model::{Report, RunResult};
use crate::text::{bytes, md_cell, ms, offset, secs, validity};

/// Latencies shown first, in this order, when present; every `http_*` follows.
pub const MAIN_LATENCIES: [&str; 6] = [
    "send_ack",
    "delivery",
    "delivery_cross_node",
    "stream_first_chunk",
    "reconnect_resync",
    "pipeline_audit",
];
const MAX_CHECKS: usize = 15;
const MAX_FAULTS: usize = 6;
const MAX_PROCESSES: usize = 5;
const SUMMARY_CHARS: usize = 140;

/// The metrics of the summary's latency table, in order.
pub fn summary_latencies(report: &Report) -> Vec<&str> {
    MAIN_LATENCIES
        .iter()
        .copied()
        .filter(|m| report.latency.contains_key(*m))
        .chain(
            report
                .latency
                .keys()
                .map(String::as_str)
                .filter(|k| k.starts_with("http_")),
        )
        .collect()
}

/// One sentence on the run: where, how big, on what.
pub fn headline_facts(r: &Report) -> String {
    let env = &r.environment;
    let mut parts = vec![
        format!("seed {}", r.scenario.seed),
        format!(
            "{} node(s) (publish {}, fanout {})",
            r.topology.nodes, r.topology.publish_mode, r.topology.fanout_mode
        ),
        format!(
            "{} users, {} conversations",
            r.load.asked.users, r.load.asked.conversations
        ),
        format!(
            "{:.0} s measured after {:.0} s warm-up",
            r.load.asked.duration_s, r.load.asked.warmup_s
        ),
    ];
    let mut machine = Vec::new();
    if let Some(c) = env.cores {
        machine.push(format!("{c} cores"));
    }
    if let Some(m) = env.memory_bytes {
        machine.push(bytes(m));
    }
    if let Some(k) = &env.kernel {
        machine.push(format!("kernel {k}"));
    }
    if !machine.is_empty() {
        parts.push(machine.join(", "));
    }
    if let Some(c) = &env.git_commit {
        parts.push(format!("commit {}", c.chars().take(12).collect::<String>()));
    }
    parts.join("; ")
}

pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let result = match r.outcome.result {
        RunResult::Pass => "PASS",
        RunResult::Fail => "FAIL",
    };
    let _ = writeln!(o, "## squall `{}`: **{result}**", r.scenario.name);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Run `{}`{}: {}. Scenario sha256 `{}`.",
        r.run.run_id,
        r.run
            .started_at
            .as_deref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default(),
        headline_facts(r),
        r.scenario.sha256.chars().take(12).collect::<String>(),
    );
    let _ = writeln!(o, "{}.", md_cell(&r.outcome.reason, 300));

    let _ = writeln!(o);
    let _ = writeln!(o, "### Checks");
    if r.checks.is_empty() {
        let _ = writeln!(o, "No verdicts: the run was not checked.");
    } else {
        let _ = writeln!(o, "| check | result | summary |");
        let _ = writeln!(o, "| --- | --- | --- |");
        // Failing checks first when the list must be cut.
        let mut shown: Vec<_> = r.checks.iter().collect();
        if shown.len() > MAX_CHECKS {
            shown.sort_by_key(|v| v.valid == Validity::Valid);
        }
        for v in shown.iter().take(MAX_CHECKS) {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                md_cell(&v.checker, 60),
                validity(v.valid),
                md_cell(&v.summary, SUMMARY_CHARS)
            );
        }
        if shown.len() > MAX_CHECKS {
            let _ = writeln!(o, "| … {} more (all pass) | | |", shown.len() - MAX_CHECKS);
        }
    }

    let metrics = summary_latencies(r);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "### Latency (ms, measured window, from the intended time)"
    );
    if metrics.is_empty() {
        let _ = writeln!(o, "No latencies were recorded.");
    } else {
        let _ = writeln!(o, "| metric | count | p50 | p99 | p99.9 | max |");
        let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: | ---: |");
        for m in metrics {
            if let Some(s) = r.latency.get(m) {
                let _ = writeln!(
                    o,
                    "| {m} | {} | {} | {} | {} | {} |",
                    s.count,
                    ms(s.p50_us),
                    ms(s.p99_us),
                    ms(s.p999_us),
                    ms(s.max_us)
                );
            }
        }
    }

    let (a, b) = (&r.load.asked, &r.load.achieved);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "### Throughput (per second, measured window of {:.0} s)",
        b.measured_s
    );
    let _ = writeln!(o, "| | asked | achieved |");
    let _ = writeln!(o, "| --- | ---: | ---: |");
    let _ = writeln!(o, "| operations (all kinds) | {:.1} | |", a.ops_per_s);
    if b.measured_s > 0.0 {
        let _ = writeln!(
            o,
            "| chat sends | {:.1} | {:.1} invoked, {:.1} acked |",
            a.sends_per_s, b.sends_invoked_per_s, b.sends_acked_per_s
        );
        let _ = writeln!(o, "| deliveries | | {:.1} |", b.deliveries_per_s);
    } else {
        let _ = writeln!(o, "| chat sends | {:.1} | no series.json |", a.sends_per_s);
    }
    let _ = writeln!(
        o,
        "| sends failed / unknown (total) | | {} / {} |",
        b.sends_failed, b.sends_unknown
    );

    if !r.faults.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "### Faults");
        let _ = writeln!(
            o,
            "| id | kind | target | window since load start | duration | outcome |"
        );
        let _ = writeln!(o, "| ---: | --- | --- | --- | ---: | --- |");
        for f in r.faults.iter().take(MAX_FAULTS) {
            let window = match (f.start_after_load_s, f.end_after_load_s) {
                (Some(s), Some(e)) => format!("{} → {}", offset(s), offset(e)),
                (Some(s), None) => format!("{} → (open)", offset(s)),
                _ => format!(
                    "{} → {} (since origin)",
                    secs(f.start_s),
                    f.end_s.map(secs).unwrap_or_else(|| "(open)".into())
                ),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {window} | {} | {}{} |",
                f.id,
                md_cell(&f.kind, 40),
                md_cell(&f.target, 40),
                f.duration_s.map(secs).unwrap_or_else(|| "–".into()),
                f.outcome,
                f.error
                    .as_deref()
                    .map(|e| format!(": {}", md_cell(e, 60)))
                    .unwrap_or_default()
            );
        }
        if r.faults.len() > MAX_FAULTS {
            let _ = writeln!(o, "| | … {} more | | | | |", r.faults.len() - MAX_FAULTS);
        }
    }

    if !r.resources.processes.is_empty() {
        let mut procs: Vec<_> = r.resources.processes.iter().collect();
        procs.sort_by(|x, y| y.1.cpu_mean.total_cmp(&x.1.cpu_mean).then(x.0.cmp(y.0)));
        let _ = writeln!(o);
        let _ = writeln!(o, "### Top resource users (CPU in cores)");
        let _ = writeln!(o, "| process | CPU mean | CPU max | RSS max |");
        let _ = writeln!(o, "| --- | ---: | ---: | ---: |");
        for (name, u) in procs.iter().take(MAX_PROCESSES) {
            let _ = writeln!(
                o,
                "| {} | {:.2} | {:.2} | {} |",
                md_cell(name, 40),
                u.cpu_mean,
                u.cpu_max,
                bytes(u.rss_max_bytes)
            );
        }
    }

    if !r.notes.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "Notes: {}", md_cell(&r.notes.join("; "), 400));
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Full report: `report.html` (charts, evidence) and `report.json` (schema v{}) in the run directory.",
        r.schema_version
    );
    o
}
