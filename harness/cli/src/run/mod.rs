//! `squall run <scenario.yaml>`: validates the scenario, brings up the topology it names
//! (the local stack, or a running one, or a `--target` deployment; then the nodes and
//! workers it owns), plans the load from the seed, runs it while sampling signals,
//! records the history, stops everything it started (also on error and Ctrl-C), and
//! writes the run directory and a summary.

/// Like eprintln!/println!, but a closed stream (a parent that went away) is not a panic:
/// a run that cannot print must still stop what it started.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
macro_rules! show {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

pub mod alerts;
mod nemesis;
mod pipeline;
mod progress;
mod provider;
pub mod readback;
mod recovery;
mod signals;
pub mod topology;
pub mod verdicts;

use anyhow::{Context, Result};
use clap::Args;
use squall_history::{ConversationInfo, Header, UserInfo, Writer, FORMAT, VERSION};
use squall_load::{Metrics, Population, Target};
use squall_scenario::{Links, Scenario};
use squall_stack::links::LinkMode;
use squall_stack::plan::{DEFAULT_BASE_PORT, DEFAULT_BROKERS};
use squall_stack::toxiproxy::ToxiproxyClient;
use squall_stack::{PortPlan, Stack, StackConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex};

use provider::{DockerStack, Provider};
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
    /// What starts the stack: `local` (installed binaries on 127.0.0.1) or `docker` (the
    /// docker-compose.yml topology from official images with testcontainers, on the engine
    /// at DOCKER_HOST or /var/run/docker.sock; containers removed at the end; needs squall
    /// built with `--features docker`; kill_broker and isolate_controller are refused there).
    #[arg(long, value_enum, default_value_t = Provider::Local, conflicts_with_all = ["stack_dir", "target"])]
    provider: Provider,
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

impl RunArgs {
    /// The scenario file.
    pub fn scenario(&self) -> &Path {
        &self.scenario
    }
}

/// Resolves on SIGINT (Ctrl-C), SIGTERM or SIGHUP, naming it.
async fn termination_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return "Ctrl-C";
    };
    tokio::select! {
        _ = int.recv() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
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
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating run directory {}", dir.display()))?;
    Ok(dir)
}

/// The stack a run uses, and whether the run owns it.
enum StackUse {
    Owned(Arc<Mutex<Stack>>),
    Reused(Arc<Mutex<Stack>>),
    /// Containers this run started (`--provider docker`): endpoints only, no processes.
    Docker(DockerStack),
    None,
}

impl StackUse {
    fn stack(&self) -> Option<&Arc<Mutex<Stack>>> {
        match self {
            StackUse::Owned(s) | StackUse::Reused(s) => Some(s),
            StackUse::Docker(_) | StackUse::None => None,
        }
    }

    /// Where clients reach the stack's servers, and the base port of the run's own
    /// processes (nodes, workers).
    async fn endpoints(&self, base_port: u16) -> Option<(squall_stack::Endpoints, u16)> {
        match self {
            StackUse::Owned(s) | StackUse::Reused(s) => {
                let s = s.lock().await;
                Some((s.endpoints(), s.plan().toxiproxy_api))
            }
            StackUse::Docker(d) => Some((d.endpoints().clone(), base_port)),
            StackUse::None => None,
        }
    }
}

/// Why a run was cut short, when it was: Ctrl-C or a guardrail (the stack broke in a way
/// the scenario did not ask for). Either way the run exits 2.
#[derive(Clone)]
pub struct Abort {
    tx: Arc<watch::Sender<bool>>,
    reason: Arc<std::sync::Mutex<Option<String>>>,
}

impl Abort {
    fn new() -> (Abort, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (
            Abort {
                tx: Arc::new(tx),
                reason: Arc::default(),
            },
            rx,
        )
    }

    pub fn abort(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                say!("\nsquall: aborting: {reason}");
                *r = Some(reason);
            }
        }
        let _ = self.tx.send(true);
    }

    fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// The stack the run drives: none (`--target`), one started elsewhere (`--stack-dir`), the
/// docker topology, or a local stack started in the run directory.
async fn start_stack(
    args: &RunArgs,
    scenario: &Scenario,
    planned: &[nemesis::Planned],
    targeted: bool,
    run_dir: &Path,
) -> Result<StackUse> {
    let docker = args.provider == Provider::Docker;
    Ok(if targeted {
        StackUse::None
    } else if let Some(dir) = &args.stack_dir {
        let s = Stack::attach(dir)
            .with_context(|| format!("attaching to the stack in {}", dir.display()))?;
        if s.link_mode() == LinkMode::Direct {
            if let Some(p) = planned.iter().find(|p| p.action.kind().needs_proxies()) {
                anyhow::bail!(
                    "fault {} cuts or degrades a link, but the stack in {} has direct links (no proxies); start one with proxied links (`squall stack up` without --links direct)",
                    p.action.kind().name(),
                    dir.display()
                );
            }
        }
        StackUse::Reused(Arc::new(Mutex::new(s)))
    } else if docker {
        if scenario.topology.stack.links == Links::Direct {
            anyhow::bail!("`topology.stack.links: direct` is for the local stack; the docker topology always has its proxies");
        }
        let started = Instant::now();
        let stack = DockerStack::start(scenario).await?;
        tracing::info!(
            "docker stack up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        StackUse::Docker(stack)
    } else {
        let plan = PortPlan::from_base(args.base_port, DEFAULT_BROKERS)?;
        let mut config = StackConfig::new(run_dir.join("stack"), plan);
        config.partitions = scenario.topology.stack.partitions;
        config.start_timeout = scenario.topology.stack.start_timeout;
        config.links = match scenario.topology.stack.links {
            Links::Proxied => LinkMode::Proxied,
            Links::Direct => LinkMode::Direct,
        };
        let started = Instant::now();
        let stack = Stack::up(config)
            .await
            .context("starting the local stack")?;
        tracing::info!("stack up in {:.1} s", started.elapsed().as_secs_f64());
        StackUse::Owned(Arc::new(Mutex::new(stack)))
    })
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let scenario = match squall_scenario::load_file(&args.scenario) {
        Ok(s) => s,
        Err(e) => {
            say!("squall: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let planned = nemesis::plan(&scenario);
    let docker = args.provider == Provider::Docker;
    if docker && !provider::DOCKER_BUILT_IN {
        say!("squall: {}", provider::MISSING_FEATURE);
        return Ok(ExitCode::from(2));
    }
    if docker {
        if let Err(e) = provider::check_faults(&planned) {
            say!("squall: {}: {e:#}", args.scenario.display());
            return Ok(ExitCode::from(2));
        }
    }
    let owns = args.target.is_none();
    let target_file = match &args.target {
        Some(t) => Some(TargetEndpoints::load(t)?),
        None => None,
    };
    let has_toxiproxy = owns
        || target_file
            .as_ref()
            .is_some_and(|t| t.toxiproxy_api.is_some());
    if let Err(e) = nemesis::check_feasible(&planned, owns, owns && !docker, has_toxiproxy) {
        say!("squall: {}: {e:#}", args.scenario.display());
        return Ok(ExitCode::from(2));
    }
    let run_dir = std::path::absolute(create_run_dir(&args.reports_dir, &scenario.name)?)?;
    std::fs::copy(&args.scenario, run_dir.join("scenario.yaml"))
        .with_context(|| format!("copying {} into the run directory", args.scenario.display()))?;
    let (abort, stop_rx) = Abort::new();
    {
        let abort = abort.clone();
        tokio::spawn(async move {
            let name = termination_signal().await;
            abort.abort(format!(
                "interrupted ({name}): ending the load, healing every fault, stopping what this run started"
            ));
        });
    }
    tracing::info!(run_dir = %run_dir.display(), "run {}", scenario.name);

    // The stack first: its start cannot be abandoned half-way, so Ctrl-C is looked at after.
    let stack = match start_stack(&args, &scenario, &planned, target_file.is_some(), &run_dir).await
    {
        Ok(stack) => stack,
        Err(e) => {
            // Nothing ran: a directory holding only the scenario's copy would read as a run.
            let fate = if std::fs::remove_dir_all(&run_dir).is_ok() {
                "removed"
            } else {
                "left as it is"
            };
            return Err(e.context(format!(
                "no run: the stack did not start (run directory {} {fate})",
                run_dir.display()
            )));
        }
    };
    let result = if *stop_rx.borrow() {
        Err(anyhow::anyhow!("interrupted while the stack started"))
    } else {
        run_on_stack(
            &args,
            &scenario,
            planned,
            target_file,
            &run_dir,
            &stack,
            abort.clone(),
            stop_rx,
        )
        .await
    };
    // Links healed whatever happened (a reused stack is left as it was found: whole).
    if !scenario.faults.is_empty() {
        if let Some(s) = stack.stack() {
            if let Err(e) = s.lock().await.heal().await {
                say!("squall: healing the stack's links: {e:#}");
            }
        }
    }
    let teardown = teardown_stack(stack, &run_dir, args.keep_stack).await;
    if let Err(e) = &teardown {
        say!("squall: {e:#}");
    }
    match result {
        Ok(_) if abort.reason().is_some() => {
            say!(
                "squall: the run was cut short: {}\n  run directory: {}",
                abort.reason().unwrap_or_default(),
                run_dir.display()
            );
            Ok(ExitCode::from(2))
        }
        Ok(code) if teardown.is_ok() => Ok(code),
        Ok(_) => Ok(ExitCode::from(2)),
        Err(e) => {
            say!(
                "squall: the run could not be carried out: {e:#}\n  run directory: {}",
                run_dir.display()
            );
            Ok(ExitCode::from(2))
        }
    }
}

async fn teardown_stack(stack: StackUse, run_dir: &Path, keep: bool) -> Result<()> {
    let stack = match stack {
        StackUse::Owned(stack) => stack,
        StackUse::Docker(docker) => {
            // The containers' output belongs to the run; the containers do not.
            if let Err(e) = docker.save_logs(&run_dir.join("logs")).await {
                say!("squall: saving the containers' logs: {e:#}");
            }
            return docker.down().await;
        }
        StackUse::Reused(_) | StackUse::None => return Ok(()),
    };
    let stack = Arc::try_unwrap(stack)
        .map_err(|_| anyhow::anyhow!("the stack is still in use"))?
        .into_inner();
    // The servers' logs belong to the run; their data does not (unless kept).
    let logs = run_dir.join("logs");
    let _ = std::fs::create_dir_all(&logs);
    for p in &stack.state().processes {
        let _ = std::fs::copy(&p.log, logs.join(format!("{}.log", p.name)));
    }
    stack.down(keep).await.context("stopping the stack")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_on_stack(
    args: &RunArgs,
    scenario: &Scenario,
    planned: Vec<nemesis::Planned>,
    target_file: Option<TargetEndpoints>,
    run_dir: &Path,
    stack: &StackUse,
    abort: Abort,
    stop: watch::Receiver<bool>,
) -> Result<ExitCode> {
    let stack_endpoints = stack.endpoints(args.base_port).await;
    let (topology, backends, toxiproxy_api) = match (&target_file, stack_endpoints) {
        (Some(t), _) => {
            let b = Backends {
                postgres_url: t.postgres_url.clone(),
                redis_url: t.redis_url.clone(),
                kafka_bootstrap: t.kafka_bootstrap.clone(),
            };
            (Topology::target(t), b, t.toxiproxy_api.clone())
        }
        (None, Some((e, base))) => {
            let backends = Backends {
                postgres_url: e.postgres_url,
                redis_url: e.redis_url,
                kafka_bootstrap: e.kafka_bootstrap,
            };
            let binary = topology::chatstream_binary(args.chatstream.as_deref())?;
            let ports = RunPorts::from_base(base)?;
            let started = Instant::now();
            let topo = Topology::start(scenario, &binary, &backends, ports, run_dir).await?;
            tracing::info!(
                "{} node(s){} ready in {:.1} s",
                topo.nodes.len(),
                if topo.workers.is_some() {
                    " and workers"
                } else {
                    ""
                },
                started.elapsed().as_secs_f64()
            );
            (topo, backends, Some(e.toxiproxy_api))
        }
        (None, None) => anyhow::bail!("no stack and no target"),
    };
    let toxiproxy = match toxiproxy_api {
        Some(api) => Some(
            ToxiproxyClient::new(api.trim_start_matches("http://")).context("Toxiproxy client")?,
        ),
        None => None,
    };
    let topology = Arc::new(Mutex::new(topology));
    let targets = Arc::new(nemesis::Targets {
        topology: topology.clone(),
        stack: stack.stack().cloned(),
        toxiproxy,
        expected_down: Default::default(),
    });
    let result = drive(
        scenario, planned, targets, run_dir, &backends, args.quiet, abort, stop,
    )
    .await;
    topology.lock().await.stop().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    scenario: &Scenario,
    planned: Vec<nemesis::Planned>,
    targets: Arc<nemesis::Targets>,
    run_dir: &Path,
    backends: &Backends,
    quiet: bool,
    abort: Abort,
    stop: watch::Receiver<bool>,
) -> Result<ExitCode> {
    let run_id = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| scenario.name.clone());
    // Ids unique per run, so a reused database never mixes two runs' users.
    let tag = format!(
        "r{:x}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() % 0xfff_ffff
    );
    let (node_urls, workers_api, token_secret) = {
        let t = targets.topology.lock().await;
        (
            t.node_urls.clone(),
            t.workers_api.clone(),
            t.token_secret.clone(),
        )
    };
    let population = Population::plan(scenario, node_urls.len(), &tag);
    let origin = Instant::now();
    let origin_wall_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        run_id: run_id.clone(),
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        origin_wall_ms,
        nodes: node_urls.clone(),
        users: population
            .users
            .iter()
            .map(|u| UserInfo {
                id: u.id.clone(),
                tenant: u.tenant.clone(),
                node: u.home as u16 + 1,
            })
            .collect(),
        conversations: population
            .conversations
            .iter()
            .map(|c| ConversationInfo {
                id: c.id.clone(),
                tenant: c.tenant.clone(),
                members: c.members.clone(),
            })
            .collect(),
    };
    let (writer, rec) = Writer::create(&run_dir.join(squall_history::FILE_NAME), &header, origin)?;

    let watched = Arc::new(std::sync::Mutex::new(watch_list(&targets).await));
    let sources = Sources {
        processes: watched.clone(),
        metrics: node_urls
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("node-{}", i + 1), u.clone()))
            .chain(
                workers_api
                    .iter()
                    .map(|w| ("workers".to_string(), w.clone())),
            )
            .collect(),
        redis: backends
            .redis_url
            .strip_prefix("redis://")
            .map(|r| r.trim_end_matches('/').to_string()),
        kafka_bootstrap: Some(backends.kafka_bootstrap.clone()),
    };
    let sampler =
        Sampler::start(sources, origin, run_dir).context("starting the signal sampler")?;
    let watchdog = tokio::spawn(watchdog(
        targets.clone(),
        watched,
        abort.clone(),
        stop.clone(),
    ));

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
        nodes: node_urls.clone(),
        workers_api: workers_api.clone(),
        token_secret,
    };
    let (measure_tx, measure_rx) = tokio::sync::oneshot::channel();
    let nemesis = {
        let (targets, rec, stop) = (targets.clone(), rec.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(measure_start) = measure_rx.await else {
                return Ok(());
            };
            nemesis::run(planned, targets, rec, measure_start, stop).await
        })
    };
    let probe = if pipeline::applies(scenario) {
        // Its queries wait on a busy database by design: their slowness is not news.
        let options = backends
            .postgres_url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map(sqlx::ConnectOptions::disable_statement_logging);
        match options.map(|o| {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .acquire_slow_level(log::LevelFilter::Off)
                .connect_lazy_with(o)
        }) {
            Ok(pool) => pipeline::Probe::start(metrics.clone(), pool),
            Err(e) => {
                tracing::warn!("no audit pipeline probe: {e}");
                None
            }
        }
    } else {
        None
    };
    let outcome = squall_load::run(
        scenario,
        &population,
        &target,
        rec.clone(),
        metrics.clone(),
        progress_tx,
        stop.clone(),
        Some(measure_tx),
    )
    .await;
    match nemesis.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => abort.abort(format!("guardrail: {e:#}")),
        Err(e) => abort.abort(format!("the nemesis failed: {e}")),
    }
    watchdog.abort();
    if let Some(probe) = probe {
        probe.finish(std::time::Duration::from_secs(30)).await;
    }
    display.finish().await;
    // Every fault has healed (the nemesis is done): fresh clients read every conversation.
    if matches!(&outcome, Ok(o) if !o.interrupted) && abort.reason().is_none() {
        recovery::run(
            scenario,
            &population,
            &target,
            &metrics,
            rec.clone(),
            stop.clone(),
        )
        .await;
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            sampler.finish().await;
            let _ = writer.finish();
            return Err(e.into());
        }
    };
    let history = writer.finish()?;
    let summary = progress::RunSummary::build(
        scenario,
        &run_id,
        run_dir,
        &outcome,
        &metrics,
        &history,
        node_urls.len(),
    );
    summary.write(run_dir, &metrics)?;
    show!("{}", summary.render());
    if outcome.interrupted || abort.reason().is_some() {
        sampler.finish().await;
        return Ok(ExitCode::from(2));
    }
    // Signals go on being sampled while the system catches up (consumer lag recovery).
    if needs_readback(scenario) {
        let source = readback::Source {
            kafka_bootstrap: backends.kafka_bootstrap.clone(),
            postgres_url: Some(backends.postgres_url.clone()),
            conversations: population
                .conversations
                .iter()
                .map(|c| c.id.clone())
                .collect(),
            acked: acked_message_ids(run_dir)?,
            timeout: std::time::Duration::from_secs(60),
        };
        let mut rb = readback::collect(&source).await;
        if let (Ok(rb), Some(projections)) = (&mut rb, replay_projections(scenario)) {
            rb.replay = replay(&targets, backends, &sampler, &projections).await;
        }
        if let Ok(rb) = &rb {
            readback::save(rb, run_dir)?;
        }
        if let Err(e) = rb {
            sampler.finish().await;
            return Err(e.context("reading back Kafka and the audit table"));
        }
    }
    if let Some((max, within)) = lag_bound(scenario) {
        // Keep sampling while the groups catch up: until every group's lag is under the
        // bound for a few samples in a row, or the check's time is up.
        let deadline = Instant::now() + within;
        let mut calm = 0;
        while Instant::now() < deadline && calm < 3 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let ok = sampler
                .latest
                .lock()
                .map(|s| !s.lag.is_empty() && s.lag.values().all(|v| *v <= max as f64))
                .unwrap_or(false);
            calm = if ok { calm + 1 } else { 0 };
        }
    }
    sampler.finish().await;
    let record = verdicts::RunRecord::load(run_dir)?;
    let judged = verdicts::evaluate(scenario, &record);
    verdicts::save(&judged, run_dir)?;
    show!("{}", verdicts::render(&judged));
    render_report(run_dir);
    Ok(if verdicts::all_valid(&judged) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn replay_projections(scenario: &Scenario) -> Option<Vec<String>> {
    scenario.checks.iter().find_map(|c| match c {
        squall_scenario::Check::Checker(squall_scenario::Checker::Replay { projections }) => {
            Some(verdicts::projection_names(projections))
        }
        _ => None,
    })
}

/// Waits for every consumer group to drain, stops the workers (their projections must
/// not move while they are digested and rebuilt), then has chatstream's replay rebuild
/// each projection from the topics.
async fn replay(
    targets: &nemesis::Targets,
    backends: &Backends,
    sampler: &Sampler,
    projections: &[String],
) -> Vec<squall_check::ReplayDigest> {
    let failed = |why: String| {
        projections
            .iter()
            .map(|p| squall_check::ReplayDigest {
                projection: p.clone(),
                live: None,
                rebuilt: None,
                events: 0,
                error: Some(why.clone()),
            })
            .collect()
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let lag: f64 = sampler
            .latest
            .lock()
            .map(|s| s.lag.values().sum())
            .unwrap_or(f64::MAX);
        if lag == 0.0 {
            break;
        }
        if Instant::now() >= deadline {
            return failed(format!(
                "the consumer groups did not drain within 90 s (lag {lag})"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let program = {
        let topo = targets.topology.lock().await;
        let Some(workers) = &topo.workers else {
            return failed(
                "no workers process of this run to stop (replay needs the workers squall started)"
                    .into(),
            );
        };
        targets.mark_down(&workers.record.name, true);
        if let Err(e) = workers.stop(std::time::Duration::from_secs(15)).await {
            return failed(format!("{e:#}"));
        }
        workers.program.clone()
    };
    readback::replay_digests(
        &program,
        &backends.kafka_bootstrap,
        &backends.postgres_url,
        projections,
    )
    .await
}

/// Lag checks judge recovery after the load: the bound and how long to keep sampling.
fn lag_bound(scenario: &Scenario) -> Option<(u64, std::time::Duration)> {
    use squall_scenario::{Check, Checker, GateScope, MetricRef, Threshold};
    scenario.checks.iter().find_map(|c| match c {
        Check::Checker(Checker::Lag { max, within }) => Some((*max, *within)),
        Check::Gate(g) => match (&g.metric, &g.threshold, &g.scope) {
            (MetricRef::Lag(_), Threshold::Number(n), GateScope::WithinAfterFaults(d)) => {
                Some((*n as u64, *d))
            }
            (MetricRef::Lag(_), Threshold::Number(n), _) => {
                Some((*n as u64, std::time::Duration::from_secs(30)))
            }
            _ => None,
        },
        _ => None,
    })
}

/// Whether any check needs what the system made durable (Kafka, the audit table).
fn needs_readback(scenario: &Scenario) -> bool {
    use squall_scenario::{Check, Checker, DuplicatePath};
    scenario.checks.iter().any(|c| match c {
        Check::Checker(Checker::NoLossDownstream {} | Checker::Replay { .. }) => true,
        Check::Checker(Checker::Duplicates { paths, .. }) => paths
            .iter()
            .any(|p| matches!(p, DuplicatePath::Kafka | DuplicatePath::Audit)),
        _ => false,
    })
}

fn acked_message_ids(run_dir: &Path) -> Result<std::collections::HashSet<String>> {
    let (_, ops) = squall_history::read(&run_dir.join(squall_history::FILE_NAME))?;
    let mut out = std::collections::HashSet::new();
    for op in ops {
        let op = op?;
        if let (squall_history::Kind::Ok, squall_history::Value::Send { mid: Some(mid), .. }) =
            (op.k, op.v)
        {
            out.insert(mid);
        }
    }
    Ok(out)
}

/// Every process the run knows, by name and current pid (restarts change pids).
async fn watch_list(targets: &nemesis::Targets) -> Vec<Watched> {
    let mut out: Vec<Watched> = targets
        .topology
        .lock()
        .await
        .processes()
        .iter()
        .map(|p| Watched {
            name: p.record.name.clone(),
            pid: p.record.pid,
        })
        .collect();
    if let Some(stack) = &targets.stack {
        out.extend(
            stack
                .lock()
                .await
                .state()
                .processes
                .iter()
                .map(|p| Watched {
                    name: p.name.clone(),
                    pid: p.pid,
                }),
        );
    }
    out
}

/// Guardrail: a process of the run that dies without a fault asking for it (twice in a
/// row, a second apart) aborts the run; also keeps the sampler's pids current.
async fn watchdog(
    targets: Arc<nemesis::Targets>,
    watched: Arc<std::sync::Mutex<Vec<Watched>>>,
    abort: Abort,
    mut stop: watch::Receiver<bool>,
) {
    let mut suspicious: std::collections::BTreeSet<String> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        let expected_down = targets.expected_down();
        let mut dead = Vec::new();
        if let Ok(topo) = targets.topology.try_lock() {
            for p in topo.processes() {
                if !p.alive() && !expected_down.contains(&p.record.name) {
                    dead.push(p.record.name.clone());
                }
            }
            let mut list: Vec<Watched> = topo
                .processes()
                .iter()
                .map(|p| Watched {
                    name: p.record.name.clone(),
                    pid: p.record.pid,
                })
                .collect();
            drop(topo);
            if let Some(stack) = &targets.stack {
                if let Ok(s) = stack.try_lock() {
                    for p in &s.state().processes {
                        if !squall_stack::process::is_alive(p) && !expected_down.contains(&p.name) {
                            dead.push(p.name.clone());
                        }
                        list.push(Watched {
                            name: p.name.clone(),
                            pid: p.pid,
                        });
                    }
                }
            }
            if let Ok(mut w) = watched.lock() {
                *w = list;
            }
        }
        let now: std::collections::BTreeSet<String> = dead.into_iter().collect();
        let confirmed: Vec<&String> = now.intersection(&suspicious).collect();
        if !confirmed.is_empty() {
            abort.abort(format!(
                "guardrail: {} died without a fault asking for it; the stack is not in the state the scenario intended",
                confirmed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
            return;
        }
        suspicious = now;
    }
}

/// `squall check <run-dir>`: the verdicts of a finished run, recomputed from its files.
pub fn check(run_dir: &Path) -> Result<ExitCode> {
    let scenario =
        squall_scenario::load_file(&run_dir.join("scenario.yaml")).with_context(|| {
            format!(
                "{} is not a run directory (no valid scenario.yaml)",
                run_dir.display()
            )
        })?;
    let record = verdicts::RunRecord::load(run_dir)?;
    let judged = verdicts::evaluate(&scenario, &record);
    verdicts::save(&judged, run_dir)?;
    show!(
        "run {} (scenario {}):\n{}",
        run_dir.display(),
        scenario.name,
        verdicts::render(&judged)
    );
    Ok(if verdicts::all_valid(&judged) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Writes report.json, summary.md, report.html and junit.xml; a report that cannot be
/// rendered is said, not fatal (the verdicts stand, `squall report` can retry).
fn render_report(run_dir: &Path) -> Option<squall_report::RenderedReport> {
    match squall_report::render_run_dir(run_dir) {
        Ok(r) => {
            show!("  report     {}", run_dir.join("report.html").display());
            Some(r)
        }
        Err(e) => {
            say!("squall: rendering the report of {}: {e}", run_dir.display());
            None
        }
    }
}

/// `squall report <run-dir>`.
pub fn report(run_dir: &Path) -> Result<ExitCode> {
    let rendered = squall_report::render_run_dir(run_dir)
        .with_context(|| format!("rendering {}", run_dir.display()))?;
    for f in &rendered.files {
        show!("{}", f.display());
    }
    show!("{}", rendered.report.outcome.reason);
    Ok(match rendered.report.outcome.result {
        squall_report::RunResult::Pass => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}
