//! `squall run <scenario.yaml>`: validates the scenario, brings up the topology it names
//! (the local stack, or a running one, or a `--target` deployment; then the nodes and
//! workers it owns), plans the load from the seed, runs it while sampling signals,
//! records the history, stops everything it started (also on error and Ctrl-C), and
//! writes the run directory and a summary.

mod progress;
// pub mod readback; (wired once squall-check exports Readback)
mod signals;
pub mod topology;

use anyhow::{Context, Result};
use clap::Args;
use squall_history::{ConversationInfo, Header, UserInfo, Writer, FORMAT, VERSION};
use squall_load::{Metrics, Population, Target};
use squall_scenario::Scenario;
use squall_stack::plan::{DEFAULT_BASE_PORT, DEFAULT_BROKERS};
use squall_stack::{PortPlan, Stack, StackConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

use signals::{Sampler, Sources, Watched};
use topology::{Backends, RunPorts, TargetEndpoints, Topology};

#[derive(Args)]
pub struct RunArgs {
    /// The scenario file (see scenarios/REFERENCE.md).
    scenario: PathBuf,
    /// Where run directories are created (`<dir>/<scenario>-<timestamp>/`).
    #[arg(long, default_value = "reports")]
    reports_dir: PathBuf,
    /// First port of the port plan: the stack uses +0..+61, nodes +101.., workers +130.
    #[arg(long, env = "SQUALL_BASE_PORT", default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Reuse the stack running in this directory (`squall stack up --run-dir DIR`)
    /// instead of starting one; it is left running at the end.
    #[arg(long, conflicts_with = "target")]
    stack_dir: Option<PathBuf>,
    /// Drive a deployment Squall did not start (YAML: nodes, workers_api,
    /// kafka_bootstrap, redis_url, postgres_url, toxiproxy_api, token_secret); starts nothing.
    #[arg(long)]
    target: Option<PathBuf>,
    /// The chatstream binary (default: beside squall, else target/release/chatstream).
    #[arg(long, env = "SQUALL_CHATSTREAM")]
    chatstream: Option<PathBuf>,
    /// Keep the stack's data directory (Kafka, PostgreSQL files) for a post-mortem.
    #[arg(long)]
    keep_stack: bool,
    /// No progress display (CI); the summary is still printed.
    #[arg(long)]
    quiet: bool,
}

/// A short, sortable UTC timestamp for run directory names.
fn timestamp() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

fn create_run_dir(reports: &Path, name: &str) -> Result<PathBuf> {
    let base = reports.join(format!("{name}-{}", timestamp()));
    let mut dir = base.clone();
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = PathBuf::from(format!("{}-{n}", base.display()));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating run directory {}", dir.display()))?;
    Ok(dir)
}

/// The stack a run uses, and whether the run owns it.
enum StackUse {
    Owned(Stack),
    Reused(Stack),
    None,
}

impl StackUse {
    fn stack(&self) -> Option<&Stack> {
        match self {
            StackUse::Owned(s) | StackUse::Reused(s) => Some(s),
            StackUse::None => None,
        }
    }
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let scenario = match squall_scenario::load_file(&args.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("squall: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let run_dir = std::path::absolute(create_run_dir(&args.reports_dir, &scenario.name)?)?;
    std::fs::copy(&args.scenario, run_dir.join("scenario.yaml"))
        .with_context(|| format!("copying {} into the run directory", args.scenario.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nsquall: interrupted: ending the load, stopping what this run started");
            let _ = stop_tx.send(true);
        }
    });
    tracing::info!(run_dir = %run_dir.display(), "run {}", scenario.name);

    // The stack first: its start cannot be abandoned half-way, so Ctrl-C is looked at after.
    let stack = if let Some(t) = &args.target {
        let _ = TargetEndpoints::load(t)?;
        StackUse::None
    } else if let Some(dir) = &args.stack_dir {
        StackUse::Reused(Stack::attach(dir).with_context(|| format!("attaching to the stack in {}", dir.display()))?)
    } else {
        let plan = PortPlan::from_base(args.base_port, DEFAULT_BROKERS)?;
        let mut config = StackConfig::new(run_dir.join("stack"), plan);
        config.partitions = scenario.topology.stack.partitions;
        config.start_timeout = scenario.topology.stack.start_timeout;
        let started = Instant::now();
        let stack = Stack::up(config).await.context("starting the local stack")?;
        tracing::info!("stack up in {:.1} s", started.elapsed().as_secs_f64());
        StackUse::Owned(stack)
    };
    let result = run_on_stack(&args, &scenario, &run_dir, &stack, stop_rx).await;
    let teardown = teardown_stack(stack, &run_dir, args.keep_stack).await;
    if let Err(e) = &teardown {
        eprintln!("squall: {e:#}");
    }
    match result {
        Ok(code) if teardown.is_ok() => Ok(code),
        Ok(_) => Ok(ExitCode::from(2)),
        Err(e) => {
            eprintln!("squall: the run could not be carried out: {e:#}\n  run directory: {}", run_dir.display());
            Ok(ExitCode::from(2))
        }
    }
}

async fn teardown_stack(stack: StackUse, run_dir: &Path, keep: bool) -> Result<()> {
    let StackUse::Owned(stack) = stack else {
        return Ok(());
    };
    // The servers' logs belong to the run; their data does not (unless kept).
    let logs = run_dir.join("logs");
    let _ = std::fs::create_dir_all(&logs);
    for p in &stack.state().processes {
        let _ = std::fs::copy(&p.log, logs.join(format!("{}.log", p.name)));
    }
    stack.down(keep).await.context("stopping the stack")?;
    Ok(())
}

async fn run_on_stack(
    args: &RunArgs,
    scenario: &Scenario,
    run_dir: &Path,
    stack: &StackUse,
    stop: watch::Receiver<bool>,
) -> Result<ExitCode> {
    let (topology, backends) = match (&args.target, stack.stack()) {
        (Some(t), _) => {
            let t = TargetEndpoints::load(t)?;
            let b = Backends {
                postgres_url: t.postgres_url.clone(),
                redis_url: t.redis_url.clone(),
                kafka_bootstrap: t.kafka_bootstrap.clone(),
            };
            (Topology::target(&t), b)
        }
        (None, Some(stack)) => {
            let e = stack.endpoints();
            let backends = Backends {
                postgres_url: e.postgres_url,
                redis_url: e.redis_url,
                kafka_bootstrap: e.kafka_bootstrap,
            };
            let binary = topology::chatstream_binary(args.chatstream.as_deref())?;
            let ports = RunPorts::from_base(stack.plan().toxiproxy_api)?;
            let started = Instant::now();
            let topo = Topology::start(scenario, &binary, &backends, ports, run_dir).await?;
            tracing::info!(
                "{} node(s){} ready in {:.1} s",
                topo.nodes.len(),
                if topo.workers.is_some() { " and workers" } else { "" },
                started.elapsed().as_secs_f64()
            );
            (topo, backends)
        }
        (None, None) => anyhow::bail!("no stack and no target"),
    };
    let result = drive(scenario, run_dir, stack, &topology, &backends, args.quiet, stop).await;
    topology.stop().await;
    result
}

async fn drive(
    scenario: &Scenario,
    run_dir: &Path,
    stack: &StackUse,
    topology: &Topology,
    backends: &Backends,
    quiet: bool,
    stop: watch::Receiver<bool>,
) -> Result<ExitCode> {
    let run_id = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| scenario.name.clone());
    // Ids unique per run, so a reused database never mixes two runs' users.
    let tag = format!("r{:x}", SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() % 0xfffff);
    let population = Population::plan(scenario, topology.node_urls.len(), &tag);
    let origin = Instant::now();
    let origin_wall_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        run_id: run_id.clone(),
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        origin_wall_ms,
        nodes: topology.node_urls.clone(),
        users: population
            .users
            .iter()
            .map(|u| UserInfo { id: u.id.clone(), tenant: u.tenant.clone(), node: u.home as u16 + 1 })
            .collect(),
        conversations: population
            .conversations
            .iter()
            .map(|c| ConversationInfo { id: c.id.clone(), tenant: c.tenant.clone(), members: c.members.clone() })
            .collect(),
    };
    let (writer, rec) = Writer::create(&run_dir.join(squall_history::FILE_NAME), &header, origin)?;

    let mut sources = Sources {
        processes: topology
            .processes()
            .iter()
            .map(|p| Watched { name: p.record.name.clone(), pid: p.record.pid })
            .collect(),
        metrics: topology
            .nodes
            .iter()
            .map(|n| (n.record.name.clone(), n.url.clone()))
            .chain(topology.workers.iter().map(|w| ("workers".to_string(), w.url.clone())))
            .collect(),
        redis: backends.redis_url.strip_prefix("redis://").map(|r| r.trim_end_matches('/').to_string()),
        kafka_bootstrap: Some(backends.kafka_bootstrap.clone()),
    };
    if topology.nodes.is_empty() {
        // --target: scrape what the target names.
        sources.metrics = topology
            .node_urls
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("node-{}", i + 1), u.clone()))
            .chain(topology.workers_api.iter().map(|w| ("workers".to_string(), w.clone())))
            .collect();
    }
    if let Some(stack) = stack.stack() {
        sources.processes.extend(
            stack.state().processes.iter().map(|p| Watched { name: p.name.clone(), pid: p.pid }),
        );
    }
    let sampler = Sampler::start(sources, origin, run_dir).context("starting the signal sampler")?;

    let metrics = Arc::new(Metrics::default());
    let (progress_tx, progress_rx) = watch::channel(None);
    let display = progress::Display::start(
        scenario,
        progress_rx,
        sampler.latest.clone(),
        metrics.clone(),
        quiet,
    );
    let target = Target {
        nodes: topology.node_urls.clone(),
        workers_api: topology.workers_api.clone(),
        token_secret: topology.token_secret.clone(),
    };
    let outcome = squall_load::run(scenario, &population, &target, rec, metrics.clone(), progress_tx, stop).await;
    display.finish().await;
    sampler.finish().await;
    let history = writer.finish()?;
    let outcome = outcome?;
    let summary = progress::RunSummary::build(scenario, &run_id, run_dir, &outcome, &metrics, &history, topology.node_urls.len());
    summary.write(run_dir, &metrics)?;
    println!("{}", summary.render());
    if outcome.interrupted {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
