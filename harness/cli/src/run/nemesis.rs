//! The nemesis: injects the scenario's faults at the times its plan sets (from the end of
//! the warm-up; repeats and seeded random times included), each recorded in the history
//! with its real start and end, and heals every one of them — restarts what it killed,
//! resumes what it paused, restores every link — at its end, at the end of the load, and
//! when the run is interrupted. Heals run alongside what follows them, so faults may
//! overlap and depend on each other (a node killed inside a Kafka cut is ready again once
//! the cut heals). It never looks at the load; the load never looks at it.

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use squall_history::{Kind, Recorder, Value, NEMESIS};
use squall_scenario::{FaultAction, OutageMode, Scenario, ToxicKind, ToxicStream};
use squall_stack::plan::{DEFAULT_BASE_PORT, DEFAULT_BROKERS};
use squall_stack::toxiproxy::{Toxic, ToxiproxyClient};
use squall_stack::{PortPlan, Stack};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Mutex};

use super::topology::{wait_ready_of, OwnedProcess, Topology};

/// One occurrence of one fault.
#[derive(Debug, Clone)]
pub struct Planned {
    pub id: u32,
    pub action: FaultAction,
    /// Since the end of the warm-up.
    pub start: Duration,
    pub end: Duration,
}

/// Every occurrence of every fault of the scenario, in start order.
pub fn plan(scenario: &Scenario) -> Vec<Planned> {
    let mut out = Vec::new();
    for (index, fault) in scenario.faults.iter().enumerate() {
        for (start, end) in fault.windows(scenario.seed, index) {
            out.push(Planned {
                id: out.len() as u32,
                action: fault.action.clone(),
                start,
                end,
            });
        }
    }
    out.sort_by_key(|p| (p.start, p.id));
    out
}

/// What the nemesis acts on.
pub struct Targets {
    pub topology: Arc<Mutex<Topology>>,
    /// None in `--target` mode against a deployment without a stack of ours.
    pub stack: Option<Arc<Mutex<Stack>>>,
    /// Toxiproxy of the stack or of the `--target` deployment.
    pub toxiproxy: Option<ToxiproxyClient>,
    /// Processes down on purpose right now (the guardrail leaves them alone).
    pub expected_down: std::sync::Mutex<BTreeSet<String>>,
}

/// A fault in force and how to undo it.
enum Undo {
    Restart(Vec<usize>, bool),
    Resume(Vec<usize>, bool),
    StartBroker(u8),
    Restore(Vec<String>),
    RemoveToxics(Vec<(String, String)>),
}

fn kind_name(a: &FaultAction) -> String {
    serde_json::to_value(a)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_else(|| "fault".into())
}

/// Refuses, before anything starts, faults the run cannot carry out (process faults in
/// `--target` mode, link faults without a Toxiproxy).
pub fn check_feasible(
    planned: &[Planned],
    owns_processes: bool,
    has_stack: bool,
    has_toxiproxy: bool,
) -> Result<()> {
    for p in planned {
        let needs = match &p.action {
            FaultAction::KillNode { .. }
            | FaultAction::TermNode { .. }
            | FaultAction::PauseNode { .. }
            | FaultAction::KillWorkers {}
            | FaultAction::TermWorkers {}
            | FaultAction::PauseWorkers {} => {
                (!owns_processes).then_some("processes this run started (not --target)")
            }
            FaultAction::KillBroker { .. } | FaultAction::IsolateController {} => {
                (!has_stack).then_some("a local stack (not --target)")
            }
            _ => (!has_toxiproxy).then_some("a Toxiproxy API (toxiproxy_api in the target file)"),
        };
        if let Some(what) = needs {
            bail!("fault {} needs {what}", kind_name(&p.action));
        }
    }
    Ok(())
}

async fn wait_dead(p: &OwnedProcess, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while p.alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of the active KRaft controller, from a DescribeQuorum request (Kafka's own
/// `MetadataQuorumCommand`, run with the broker jars the stack uses).
async fn active_controller(bootstrap: &str) -> Result<u8> {
    let tools = squall_stack::tools::Tools::locate().context("locating the Kafka jars")?;
    let out = tokio::process::Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", tools.kafka_lib.display()))
        .args([
            "org.apache.kafka.tools.MetadataQuorumCommand",
            "--bootstrap-server",
            bootstrap,
            "describe",
            "--status",
        ])
        .output()
        .await
        .context("running MetadataQuorumCommand")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("LeaderId:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| {
            format!(
                "no LeaderId in DescribeQuorum output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn toxic_of(kind: &ToxicKind, stream: ToxicStream, toxicity: f32, name: &str) -> Toxic {
    let (type_, attributes) = match kind {
        ToxicKind::Latency {
            latency_ms,
            jitter_ms,
        } => (
            "latency",
            serde_json::json!({ "latency": latency_ms, "jitter": jitter_ms }),
        ),
        ToxicKind::Bandwidth { rate_kb } => ("bandwidth", serde_json::json!({ "rate": rate_kb })),
        ToxicKind::SlowClose { delay_ms } => {
            ("slow_close", serde_json::json!({ "delay": delay_ms }))
        }
        ToxicKind::Timeout { timeout_ms } => {
            ("timeout", serde_json::json!({ "timeout": timeout_ms }))
        }
        ToxicKind::ResetPeer { timeout_ms } => {
            ("reset_peer", serde_json::json!({ "timeout": timeout_ms }))
        }
        ToxicKind::Slicer {
            average_size,
            size_variation,
            delay_us,
        } => (
            "slicer",
            serde_json::json!({ "average_size": average_size, "size_variation": size_variation, "delay": delay_us }),
        ),
        ToxicKind::LimitData { bytes } => ("limit_data", serde_json::json!({ "bytes": bytes })),
    };
    Toxic {
        name: name.into(),
        kind: type_.into(),
        stream: match stream {
            ToxicStream::Upstream => "upstream".into(),
            ToxicStream::Downstream => "downstream".into(),
        },
        toxicity,
        attributes,
    }
}

impl Targets {
    pub fn expected_down(&self) -> BTreeSet<String> {
        self.expected_down
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn mark_down(&self, name: &str, down: bool) {
        if let Ok(mut s) = self.expected_down.lock() {
            if down {
                s.insert(name.to_string());
            } else {
                s.remove(name);
            }
        }
    }

    fn toxiproxy(&self) -> Result<&ToxiproxyClient> {
        self.toxiproxy
            .as_ref()
            .context("no Toxiproxy API for link faults")
    }

    async fn cut(&self, links: Vec<String>) -> Result<Undo> {
        let toxi = self.toxiproxy()?;
        for l in &links {
            toxi.set_enabled(l, false)
                .await
                .with_context(|| format!("cutting {l}"))?;
        }
        Ok(Undo::Restore(links))
    }

    /// The plan that names the broker links: the local stack's; without one (the docker
    /// provider, a `--target` started from docker-compose.yml) the compose file's, whose
    /// proxies carry the same names (they depend on the broker ids only).
    async fn link_plan(&self) -> Result<PortPlan> {
        Ok(match &self.stack {
            Some(stack) => stack.lock().await.plan().clone(),
            None => PortPlan::from_base(DEFAULT_BASE_PORT, DEFAULT_BROKERS)?,
        })
    }

    async fn broker_links(&self, broker: u8) -> Result<Vec<String>> {
        let plan = self.link_plan().await?;
        let mut links: Vec<String> = squall_stack::links::isolation_links(&plan, broker)
            .into_iter()
            .map(|l| l.name)
            .collect();
        // From clients too: a broker clients still reach serves them stale metadata.
        links.push(format!("kafka-{broker}-client"));
        Ok(links)
    }

    async fn signal_processes(
        &self,
        workers: bool,
        node: Option<u32>,
        signal: Signal,
    ) -> Result<(Vec<usize>, String)> {
        let topo = self.topology.lock().await;
        let (procs, target): (Vec<usize>, String) = if workers {
            (
                if topo.workers.is_some() {
                    vec![0]
                } else {
                    Vec::new()
                },
                "workers".into(),
            )
        } else {
            let n = node.unwrap_or(1) as usize;
            (vec![n - 1], format!("node-{n}"))
        };
        for &i in &procs {
            let p = if workers {
                topo.workers.as_ref()
            } else {
                topo.nodes.get(i)
            };
            let p = p.with_context(|| format!("no {target}"))?;
            if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
                self.mark_down(&p.record.name, true);
            }
            p.signal(signal)?;
            if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
                wait_dead(p, Duration::from_secs(30)).await;
            }
        }
        Ok((procs, target))
    }

    /// Starts a fault; returns the target's name and how to undo it.
    async fn inject(&self, action: &FaultAction, id: u32) -> Result<(String, Undo)> {
        Ok(match action {
            FaultAction::KillNode { node } => {
                let (p, t) = self
                    .signal_processes(false, Some(*node), Signal::SIGKILL)
                    .await?;
                (t, Undo::Restart(p, false))
            }
            FaultAction::TermNode { node } => {
                let (p, t) = self
                    .signal_processes(false, Some(*node), Signal::SIGTERM)
                    .await?;
                (t, Undo::Restart(p, false))
            }
            FaultAction::PauseNode { node } => {
                let (p, t) = self
                    .signal_processes(false, Some(*node), Signal::SIGSTOP)
                    .await?;
                (t, Undo::Resume(p, false))
            }
            FaultAction::KillWorkers {} => {
                let (p, t) = self.signal_processes(true, None, Signal::SIGKILL).await?;
                (t, Undo::Restart(p, true))
            }
            FaultAction::TermWorkers {} => {
                let (p, t) = self.signal_processes(true, None, Signal::SIGTERM).await?;
                (t, Undo::Restart(p, true))
            }
            FaultAction::PauseWorkers {} => {
                let (p, t) = self.signal_processes(true, None, Signal::SIGSTOP).await?;
                (t, Undo::Resume(p, true))
            }
            FaultAction::KillBroker { broker } => {
                let stack = self.stack.as_ref().context("no stack")?.lock().await;
                self.mark_down(&format!("kafka-{broker}"), true);
                stack.kill_broker(*broker).await?;
                (format!("kafka-{broker}"), Undo::StartBroker(*broker))
            }
            FaultAction::IsolateBroker { broker } => {
                let links = self.broker_links(*broker).await?;
                (format!("kafka-{broker}"), self.cut(links).await?)
            }
            FaultAction::IsolateController {} => {
                let bootstrap = {
                    let stack = self.stack.as_ref().context("no stack")?.lock().await;
                    stack.endpoints().kafka_bootstrap
                };
                let leader = active_controller(&bootstrap).await?;
                let links = self.broker_links(leader).await?;
                (
                    format!("kafka-{leader} (active controller)"),
                    self.cut(links).await?,
                )
            }
            FaultAction::PartitionOneWay { from, to } => {
                let plan = self.link_plan().await?;
                let links = squall_stack::links::one_way_links(&plan, *from, *to)
                    .into_iter()
                    .map(|l| l.name)
                    .collect();
                (format!("kafka-{from}->kafka-{to}"), self.cut(links).await?)
            }
            FaultAction::CutKafka {} => {
                let links = (1..=squall_scenario::BROKERS)
                    .map(|b| format!("kafka-{b}-client"))
                    .collect();
                ("kafka clients".into(), self.cut(links).await?)
            }
            FaultAction::RedisDown { mode } => {
                ("redis".into(), self.outage("redis", *mode, id).await?)
            }
            FaultAction::PostgresDown { mode } => {
                ("postgres".into(), self.outage("postgres", *mode, id).await?)
            }
            FaultAction::Toxic {
                link,
                stream,
                toxicity,
                toxic,
            } => {
                let name = format!("squall-{id}");
                let t = toxic_of(toxic, *stream, *toxicity, &name);
                self.toxiproxy()?
                    .add_toxic(link, &t)
                    .await
                    .with_context(|| format!("adding {} to {link}", t.kind))?;
                (link.clone(), Undo::RemoveToxics(vec![(link.clone(), name)]))
            }
        })
    }

    async fn outage(&self, link: &str, mode: OutageMode, id: u32) -> Result<Undo> {
        match mode {
            OutageMode::Refuse => self.cut(vec![link.to_string()]).await,
            OutageMode::BlackHole => {
                // Data stops in both directions and connections stay open: a black hole.
                let mut added = Vec::new();
                for stream in [ToxicStream::Upstream, ToxicStream::Downstream] {
                    let name = format!(
                        "squall-{id}-{}",
                        if stream == ToxicStream::Upstream {
                            "up"
                        } else {
                            "down"
                        }
                    );
                    let t = toxic_of(&ToxicKind::Timeout { timeout_ms: 0 }, stream, 1.0, &name);
                    self.toxiproxy()?
                        .add_toxic(link, &t)
                        .await
                        .with_context(|| format!("black-holing {link}"))?;
                    added.push((link.to_string(), name));
                }
                Ok(Undo::RemoveToxics(added))
            }
        }
    }

    async fn heal(&self, undo: Undo) -> Result<()> {
        match undo {
            Undo::Restart(procs, workers) => {
                // Restarted under the lock; their readiness awaited without it, so other
                // faults start and heal meanwhile (a node restarted inside a Kafka cut is
                // ready only once the cut's own heal has run).
                let restarted = {
                    let mut topo = self.topology.lock().await;
                    for &i in &procs {
                        let p = if workers {
                            topo.workers.as_mut()
                        } else {
                            topo.nodes.get_mut(i)
                        };
                        if let Some(p) = p {
                            if !p.alive() {
                                p.restart()?;
                            }
                            self.mark_down(&p.record.name, false);
                        }
                    }
                    topo.readiness_of(if workers { &[] } else { &procs }, workers)
                };
                wait_ready_of(restarted, Duration::from_secs(90)).await?;
            }
            Undo::Resume(procs, workers) => {
                let topo = self.topology.lock().await;
                for i in procs {
                    let p = if workers {
                        topo.workers.as_ref()
                    } else {
                        topo.nodes.get(i)
                    };
                    if let Some(p) = p {
                        p.signal(Signal::SIGCONT)?;
                    }
                }
            }
            Undo::StartBroker(b) => {
                let mut stack = self.stack.as_ref().context("no stack")?.lock().await;
                stack
                    .start_broker(b, Duration::from_secs(120))
                    .await
                    .with_context(|| format!("kafka-{b} did not come back"))?;
                self.mark_down(&format!("kafka-{b}"), false);
            }
            Undo::Restore(links) => {
                let toxi = self.toxiproxy()?;
                for l in links {
                    toxi.set_enabled(&l, true)
                        .await
                        .with_context(|| format!("restoring {l}"))?;
                }
            }
            Undo::RemoveToxics(toxics) => {
                let toxi = self.toxiproxy()?;
                for (link, name) in toxics {
                    toxi.remove_toxic(&link, &name)
                        .await
                        .with_context(|| format!("removing {name} from {link}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Heals one fault and records its real end (ok), or the failure to heal it (fail).
async fn heal_and_record(
    targets: Arc<Targets>,
    rec: Recorder,
    p: Planned,
    target: String,
    undo: Undo,
) -> Result<()> {
    let healed = targets.heal(undo).await;
    let (k, err) = match &healed {
        Ok(()) => (Kind::Ok, None),
        Err(e) => (Kind::Fail, Some(format!("{e:#}"))),
    };
    rec.record(
        NEMESIS,
        k,
        Value::Fault {
            id: p.id,
            kind: kind_name(&p.action),
            target,
            err,
        },
    );
    healed
}

/// Heals under way: each runs as a task of its own, so a heal that waits (a restarted
/// process's readiness) holds back neither later faults nor the heals they depend on.
#[derive(Default)]
struct Heals {
    running: tokio::task::JoinSet<Result<()>>,
}

impl Heals {
    fn start(
        &mut self,
        targets: &Arc<Targets>,
        rec: &Recorder,
        p: &Planned,
        target: String,
        undo: Undo,
    ) {
        self.running.spawn(heal_and_record(
            targets.clone(),
            rec.clone(),
            p.clone(),
            target,
            undo,
        ));
    }

    /// The first failure among the heals that have ended.
    fn failed(&mut self) -> Option<anyhow::Error> {
        while let Some(done) = self.running.try_join_next() {
            if let Some(e) = outcome(done) {
                return Some(e);
            }
        }
        None
    }

    /// Waits for every heal; the first failure.
    async fn finish(&mut self) -> Option<anyhow::Error> {
        let mut first = None;
        while let Some(done) = self.running.join_next().await {
            if let Some(e) = outcome(done) {
                first.get_or_insert(e);
            }
        }
        first
    }
}

fn outcome(done: Result<Result<()>, tokio::task::JoinError>) -> Option<anyhow::Error> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(anyhow::anyhow!("a heal task ended abnormally: {e}")),
    }
}

/// Runs the fault plan from `measure_start` until every fault has ended, or until `stop`
/// turns true (then heals at once). Heals run concurrently with what comes after them
/// (see [`Heals`]). A fault that cannot be healed is a guardrail: the error is returned
/// (the run is then aborted and exits 2).
pub async fn run(
    planned: Vec<Planned>,
    targets: Arc<Targets>,
    rec: Recorder,
    measure_start: Instant,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    // Events: (time, is_start, index).
    let mut events: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        events.push((p.start, true, i));
        events.push((p.end, false, i));
    }
    events.sort_by_key(|(t, start, i)| (*t, *start, *i));
    let mut active: Vec<Option<(String, Undo)>> = (0..planned.len()).map(|_| None).collect();
    let mut heals = Heals::default();
    let mut result = Ok(());
    for (at, is_start, i) in events {
        let when = measure_start + at;
        let stopped = tokio::select! {
            _ = tokio::time::sleep_until(when.into()) => false,
            _ = stop.changed() => true,
        };
        if stopped || *stop.borrow() {
            break;
        }
        if let Some(e) = heals.failed() {
            result = Err(e.context("healing a fault"));
            break;
        }
        let p = &planned[i];
        let kind = kind_name(&p.action);
        if is_start {
            let injected = targets.inject(&p.action, p.id).await;
            match injected {
                Ok((target, undo)) => {
                    tracing::info!(fault = p.id, "{kind} on {target}");
                    rec.record(
                        NEMESIS,
                        Kind::Invoke,
                        Value::Fault {
                            id: p.id,
                            kind,
                            target: target.clone(),
                            err: None,
                        },
                    );
                    active[i] = Some((target, undo));
                }
                Err(e) => {
                    rec.record(
                        NEMESIS,
                        Kind::Invoke,
                        Value::Fault {
                            id: p.id,
                            kind: kind.clone(),
                            target: String::new(),
                            err: None,
                        },
                    );
                    rec.record(
                        NEMESIS,
                        Kind::Fail,
                        Value::Fault {
                            id: p.id,
                            kind,
                            target: String::new(),
                            err: Some(format!("{e:#}")),
                        },
                    );
                    result = Err(e.context("injecting a fault"));
                    break;
                }
            }
        } else if let Some((target, undo)) = active[i].take() {
            heals.start(&targets, &rec, p, target, undo);
        }
    }
    // Whatever happened, nothing stays broken: the faults still in force heal together
    // (one may need another's heal), and every heal is awaited.
    for (i, slot) in active.iter_mut().enumerate() {
        if let Some((target, undo)) = slot.take() {
            heals.start(&targets, &rec, &planned[i], target, undo);
        }
    }
    if let Some(e) = heals.finish().await {
        if result.is_ok() {
            result = Err(e.context("healing a fault"));
        }
    }
    result
}
