//! `squall compare <baseline/report.json> <new/report.json>`: what moved between two runs
//! of a scenario — latency percentiles, achieved throughput, check outcomes — as a table,
//! with tolerances; exit 1 on a regression (a latency grown past its tolerance,
//! throughput fallen past its tolerance, or a check that passed and now fails).

use anyhow::{Context, Result};
use clap::Args;
use squall_report::Report;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct CompareArgs {
    /// The baseline's report.json (e.g. reports/baselines/steady.json).
    baseline: PathBuf,
    /// The new run's report.json (or its run directory).
    new: PathBuf,
    /// How much a p99 (and p99.9) may grow, in percent.
    #[arg(long, default_value_t = 10.0)]
    latency_tolerance: f64,
    /// How much achieved throughput may fall, in percent.
    #[arg(long, default_value_t = 5.0)]
    throughput_tolerance: f64,
    /// Latency metrics judged (others are shown, not judged).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "send_ack,delivery,stream_first_chunk,reconnect_resync"
    )]
    metrics: Vec<String>,
    /// Latencies below this many milliseconds at p99 in both runs are not judged (noise).
    #[arg(long, default_value_t = 1.0)]
    floor_ms: f64,
}

fn load(path: &std::path::Path) -> Result<Report> {
    let file = if path.is_dir() {
        path.join("report.json")
    } else {
        path.to_path_buf()
    };
    squall_report::load_report(&file).with_context(|| format!("reading {}", file.display()))
}

struct Row {
    what: String,
    base: f64,
    new: f64,
    unit: &'static str,
    judged: bool,
    regression: bool,
}

pub fn run(args: CompareArgs) -> Result<ExitCode> {
    let base = load(&args.baseline)?;
    let new = load(&args.new)?;
    let mut rows = Vec::new();
    let lat_tol = 1.0 + args.latency_tolerance / 100.0;
    for (metric, b) in &base.latency {
        let Some(n) = new.latency.get(metric) else {
            continue;
        };
        for (stat, bv, nv) in [
            ("p50", b.p50_us, n.p50_us),
            ("p99", b.p99_us, n.p99_us),
            ("p99.9", b.p999_us, n.p999_us),
        ] {
            let judged = args.metrics.contains(metric)
                && stat != "p50"
                && (bv as f64 / 1000.0 >= args.floor_ms || nv as f64 / 1000.0 >= args.floor_ms);
            rows.push(Row {
                what: format!("{stat}({metric})"),
                base: bv as f64 / 1000.0,
                new: nv as f64 / 1000.0,
                unit: "ms",
                judged,
                regression: judged && nv as f64 > bv as f64 * lat_tol,
            });
        }
    }
    let tp_tol = 1.0 - args.throughput_tolerance / 100.0;
    for (what, b, n) in [
        (
            "acked sends/s",
            base.load.achieved.sends_acked_per_s,
            new.load.achieved.sends_acked_per_s,
        ),
        (
            "live deliveries/s",
            base.load.achieved.live_deliveries_per_s,
            new.load.achieved.live_deliveries_per_s,
        ),
    ] {
        rows.push(Row {
            what: what.into(),
            base: b,
            new: n,
            unit: "/s",
            // A baseline from before a figure existed has nothing to hold it to.
            judged: b > 0.0,
            regression: b > 0.0 && n < b * tp_tol,
        });
    }
    let mut check_regressions = Vec::new();
    for b in &base.checks {
        let now = new.checks.iter().find(|n| n.checker == b.checker);
        let was_ok = b.valid == squall_check::Validity::Valid;
        match now {
            Some(n) if was_ok && n.valid != squall_check::Validity::Valid => check_regressions
                .push(format!(
                    "{}: passed, now {:?}: {}",
                    b.checker, n.valid, n.summary
                )),
            None if was_ok => check_regressions.push(format!("{}: passed, now missing", b.checker)),
            _ => {}
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compare {} (baseline, {}) with {} ({})",
        base.scenario.name, base.run.run_id, new.scenario.name, new.run.run_id
    );
    let _ = writeln!(
        out,
        "  tolerances: latency +{}%, throughput -{}%",
        args.latency_tolerance, args.throughput_tolerance
    );
    let _ = writeln!(
        out,
        "  {:<34} {:>12} {:>12} {:>9}  verdict",
        "what", "baseline", "new", "change"
    );
    for r in &rows {
        let change = if r.base.abs() > f64::EPSILON {
            (r.new - r.base) / r.base * 100.0
        } else {
            0.0
        };
        let verdict = if r.regression {
            "REGRESSION"
        } else if r.judged {
            "ok"
        } else {
            "(not judged)"
        };
        let _ = writeln!(
            out,
            "  {:<34} {:>9.1} {:<2} {:>9.1} {:<2} {:>+8.1}%  {verdict}",
            r.what, r.base, r.unit, r.new, r.unit, change
        );
    }
    for c in &check_regressions {
        let _ = writeln!(out, "  REGRESSION check {c}");
    }
    let regressions = rows.iter().filter(|r| r.regression).count() + check_regressions.len();
    let _ = write!(out, "  {regressions} regression(s)");
    println!("{out}");
    Ok(if regressions == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
