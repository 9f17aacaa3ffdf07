//! `squall capacity <scenario>`: steps the offered rate up (each step a whole `squall run`
//! of the scenario with `load.rate` replaced, against one stack started once), repeats
//! each step to tell noise from trend, and stops when the scenario's checks fail in most
//! repeats of a step. Reports the highest sustainable rate (the knee) and the curve —
//! rate against p99 latencies and against CPU per process — as `capacity.json` and a
//! self-contained `capacity.html` chart.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use squall_stack::plan::{DEFAULT_BASE_PORT, DEFAULT_BROKERS};
use squall_stack::{PortPlan, Stack, StackConfig};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

#[derive(Args)]
pub struct CapacityArgs {
    /// The scenario to step (its checks and gates decide whether a step is sustainable).
    scenario: PathBuf,
    /// First offered rate (operations per second).
    #[arg(long, default_value_t = 100.0)]
    start: f64,
    /// Each step multiplies the rate by this factor.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// At most this many steps.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Runs per step; a step is sustainable when most of them pass.
    #[arg(long, default_value_t = 2)]
    repeats: u32,
    /// Measured seconds per run (overrides the scenario's duration).
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    #[arg(long, default_value = "reports")]
    reports_dir: PathBuf,
    #[arg(long, env = "SQUALL_BASE_PORT", default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Reuse a running stack instead of starting one.
    #[arg(long)]
    stack_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    rate: f64,
    repeat: u32,
    passed: bool,
    exit_code: i32,
    run_dir: String,
    achieved_acked_per_s: f64,
    p99_ms: BTreeMap<String, f64>,
    cpu_cores: BTreeMap<String, f64>,
    failed_checks: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Step {
    rate: f64,
    passed: u32,
    runs: u32,
    sustainable: bool,
    median_p99_ms: BTreeMap<String, f64>,
    median_cpu_cores: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct Capacity {
    scenario: String,
    cores: usize,
    repeats: u32,
    duration_s: u64,
    /// The highest offered rate whose runs mostly passed.
    knee_rate: Option<f64>,
    /// The first rate whose runs mostly failed.
    broke_at: Option<f64>,
    steps: Vec<Step>,
    samples: Vec<Sample>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn one_run(
    exe: &Path,
    scenario: &Path,
    stack_dir: &Path,
    reports: &Path,
    rate: f64,
    repeat: u32,
) -> Result<Sample> {
    let out = std::process::Command::new(exe)
        .args(["run", "--quiet", "--reports-dir"])
        .arg(reports)
        .arg("--stack-dir")
        .arg(stack_dir)
        .arg(scenario)
        .output()
        .context("running squall run")?;
    let code = out.status.code().unwrap_or(-1);
    if code == 2 {
        bail!(
            "a step could not be run (exit 2): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let dir = std::fs::read_dir(reports)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("report.json").is_file())
        .max_by_key(|p| {
            p.metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
        .context("no report.json from the step")?;
    let report = squall_report::load_report(&dir.join("report.json"))?;
    Ok(Sample {
        rate,
        repeat,
        passed: code == 0,
        exit_code: code,
        run_dir: dir.display().to_string(),
        achieved_acked_per_s: report.load.achieved.sends_acked_per_s,
        p99_ms: report
            .latency
            .iter()
            .map(|(k, v)| (k.clone(), v.p99_us as f64 / 1000.0))
            .collect(),
        cpu_cores: report
            .resources
            .processes
            .iter()
            .map(|(k, v)| (k.clone(), v.cpu_mean))
            .collect(),
        failed_checks: report
            .checks
            .iter()
            .filter(|c| c.valid != squall_check::Validity::Valid)
            .map(|c| format!("{}: {}", c.checker, c.summary))
            .collect(),
    })
}

pub async fn run(args: CapacityArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let scenario = squall_scenario::parse_str(&text, &args.scenario.display().to_string())?;
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let dir = std::path::absolute(
        args.reports_dir
            .join(format!("capacity-{}-{stamp}", scenario.name)),
    )?;
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let (stack, stack_dir) = match &args.stack_dir {
        Some(d) => (None, d.clone()),
        None => {
            let plan = PortPlan::from_base(args.base_port, DEFAULT_BROKERS)?;
            let stack_dir = dir.join("stack");
            let stack = Stack::up(StackConfig::new(&stack_dir, plan))
                .await
                .context("starting the stack")?;
            (Some(stack), stack_dir)
        }
    };
    let result = sweep(&args, &text, &scenario.name, &dir, &exe, &stack_dir).await;
    if let Some(stack) = stack {
        stack.down(false).await.context("stopping the stack")?;
    }
    let capacity = result?;
    std::fs::write(
        dir.join("capacity.json"),
        serde_json::to_string_pretty(&capacity)?,
    )?;
    std::fs::write(dir.join("capacity.html"), html(&capacity))?;
    println!(
        "capacity of {} on {} cores: knee {} (broke at {}); {}/capacity.html",
        capacity.scenario,
        capacity.cores,
        capacity
            .knee_rate
            .map(|r| format!("{r:.0}/s"))
            .unwrap_or_else(|| "none".into()),
        capacity
            .broke_at
            .map(|r| format!("{r:.0}/s"))
            .unwrap_or_else(|| "not reached".into()),
        dir.display()
    );
    for s in &capacity.steps {
        println!(
            "  rate {:>8.0}/s  {}/{} passed  p99 send_ack {:>8.1} ms  p99 delivery {:>8.1} ms",
            s.rate,
            s.passed,
            s.runs,
            s.median_p99_ms.get("send_ack").copied().unwrap_or(0.0),
            s.median_p99_ms.get("delivery").copied().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn sweep(
    args: &CapacityArgs,
    text: &str,
    name: &str,
    dir: &Path,
    exe: &Path,
    stack_dir: &Path,
) -> Result<Capacity> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(text)?;
    let mut steps = Vec::new();
    let mut samples = Vec::new();
    let mut rate = args.start;
    let (mut knee, mut broke) = (None, None);
    for step in 0..args.steps {
        doc["load"]["rate"] = serde_yaml::Value::from(rate);
        doc["load"]["duration"] = serde_yaml::Value::from(format!("{}s", args.duration_s));
        doc["faults"] = serde_yaml::Value::Sequence(Vec::new());
        let file = dir.join(format!("step-{step}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&doc)?)?;
        let mut runs = Vec::new();
        for repeat in 0..args.repeats {
            eprintln!(
                "capacity: rate {rate:.0}/s, run {} of {}",
                repeat + 1,
                args.repeats
            );
            let s = tokio::task::block_in_place(|| {
                one_run(exe, &file, stack_dir, &dir.join("runs"), rate, repeat)
            })?;
            runs.push(s);
        }
        let passed = runs.iter().filter(|s| s.passed).count() as u32;
        let keys: Vec<String> = runs.iter().flat_map(|s| s.p99_ms.keys().cloned()).collect();
        let median_p99_ms = keys
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    median(
                        runs.iter()
                            .filter_map(|s| s.p99_ms.get(k).copied())
                            .collect(),
                    ),
                )
            })
            .collect();
        let procs: Vec<String> = runs
            .iter()
            .flat_map(|s| s.cpu_cores.keys().cloned())
            .collect();
        let median_cpu_cores = procs
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    median(
                        runs.iter()
                            .filter_map(|s| s.cpu_cores.get(k).copied())
                            .collect(),
                    ),
                )
            })
            .collect();
        let sustainable = passed * 2 > args.repeats;
        steps.push(Step {
            rate,
            passed,
            runs: args.repeats,
            sustainable,
            median_p99_ms,
            median_cpu_cores,
        });
        samples.extend(runs);
        if sustainable {
            knee = Some(rate);
        } else {
            broke = Some(rate);
            break;
        }
        rate *= args.factor;
    }
    Ok(Capacity {
        scenario: name.into(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        repeats: args.repeats,
        duration_s: args.duration_s,
        knee_rate: knee,
        broke_at: broke,
        steps,
        samples,
    })
}

/// One SVG line chart: x = offered rate, one polyline per series.
fn chart(title: &str, unit: &str, series: &BTreeMap<String, Vec<(f64, f64)>>) -> String {
    let (w, h, pad) = (720.0, 300.0, 50.0);
    let xs: Vec<f64> = series.values().flatten().map(|p| p.0).collect();
    let ys: Vec<f64> = series.values().flatten().map(|p| p.1).collect();
    if xs.is_empty() {
        return format!("<p>{title}: no data</p>");
    }
    let (x0, x1) = (0.0, xs.iter().cloned().fold(1.0, f64::max) * 1.05);
    let y1 = ys.iter().cloned().fold(1e-9, f64::max) * 1.1;
    let px = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - y / y1 * (h - 2.0 * pad);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
        "#bcbd22", "#7f7f7f",
    ];
    let mut s = format!(
        r#"<svg class="chart" data-chart="{title}" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<text x="{pad}" y="18" font-size="13">{title}</text>"#);
    let _ = write!(
        s,
        r##"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="#333"/>"##,
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    for i in 0..=4 {
        let yv = y1 * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="4" y="{:.0}">{yv:.1} {unit}</text><line x1="{pad}" x2="{}" y1="{:.0}" y2="{:.0}" stroke="#eee"/>"##,
            py(yv),
            w - pad,
            py(yv),
            py(yv)
        );
        let xv = x1 * i as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{:.0}" y="{}">{xv:.0}/s</text>"#,
            px(xv),
            h - pad + 16.0
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let points: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" fill="{c}">{name}</text>"#,
            w - pad + 4.0 - 120.0,
            pad + 14.0 * i as f64
        );
    }
    s.push_str("</svg>");
    s
}

fn html(c: &Capacity) -> String {
    let mut lat: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut cpu: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &c.steps {
        for k in ["send_ack", "delivery", "delivery_cross_node"] {
            if let Some(v) = s.median_p99_ms.get(k) {
                lat.entry(format!("p99 {k}"))
                    .or_default()
                    .push((s.rate, *v));
            }
        }
        for (k, v) in &s.median_cpu_cores {
            cpu.entry(k.clone()).or_default().push((s.rate, *v));
        }
    }
    let mut rows = String::new();
    for s in &c.steps {
        let _ = write!(
            rows,
            "<tr><td>{:.0}</td><td>{}/{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            s.rate,
            s.passed,
            s.runs,
            if s.sustainable { "yes" } else { "no" },
            s.median_p99_ms.get("send_ack").copied().unwrap_or(0.0),
            s.median_p99_ms.get("delivery").copied().unwrap_or(0.0)
        );
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>capacity {name}</title><style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}</style></head><body>\
<h1>Capacity of {name}</h1><p>{cores} cores, {repeats} runs per step of {d} s. Knee: <b>{knee}</b>; broke at {broke}.</p>\
<table><tr><th>offered rate</th><th>passed</th><th>sustainable</th><th>p99 send→ack ms</th><th>p99 delivery ms</th></tr>{rows}</table>{a}{b}</body></html>",
        name = c.scenario,
        cores = c.cores,
        repeats = c.repeats,
        d = c.duration_s,
        knee = c.knee_rate.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "none".into()),
        broke = c.broke_at.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "not reached".into()),
        a = chart("p99 latency against offered rate", "ms", &lat),
        b = chart("CPU per process against offered rate", "cores", &cpu),
    )
}
