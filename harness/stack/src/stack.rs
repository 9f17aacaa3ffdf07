//! The stack as a whole: `up` (start everything, wait for real health checks, create the
//! seed topics, write the state file), `attach` (from the state file), `status`, `down`,
//! and the disturbances fault injection needs (kill, restart, isolate a broker; cut links).

use futures::future::join_all;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Result, StackError};
use crate::kafka::{self, BrokerOverrides, ClusterView};
use crate::links::{self, Link, LinkMode};
use crate::plan::{PortPlan, LOOPBACK};
use crate::process::{self, ProcessRecord};
use crate::state::{state_path, StackState, STATE_VERSION};
use crate::stores;
use crate::tools::Tools;
use crate::topics;
use crate::toxiproxy::{ProxyState, ToxiproxyClient};

/// Marks a folder as a squall run directory, which `up` and `down` may delete.
const RUN_MARKER: &str = ".squall-run";

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub run_dir: PathBuf,
    pub plan: PortPlan,
    pub partitions: i32,
    /// How long each server may take to pass its health check.
    pub start_timeout: Duration,
    /// server.properties overrides per broker id (tuning, or sabotage in tests).
    pub broker_overrides: BrokerOverrides,
    /// Proxied (every link a Toxiproxy proxy) or direct (no Toxiproxy at all).
    pub links: LinkMode,
}

impl StackConfig {
    pub fn new(run_dir: impl Into<PathBuf>, plan: PortPlan) -> Self {
        StackConfig {
            run_dir: run_dir.into(),
            plan,
            partitions: topics::DEFAULT_PARTITIONS,
            start_timeout: Duration::from_secs(120),
            broker_overrides: BTreeMap::new(),
            links: LinkMode::Proxied,
        }
    }
}

/// Where clients connect: through the proxies, or straight to the servers with direct
/// links.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoints {
    pub kafka_bootstrap: String,
    pub redis_url: String,
    pub postgres_url: String,
    pub toxiproxy_api: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    pub name: String,
    pub pid: i32,
    pub alive: bool,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub name: String,
    pub listen: String,
    pub upstream: String,
    pub enabled: bool,
    pub toxics: Vec<String>,
}

/// What `squall stack status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StackStatus {
    pub run_dir: PathBuf,
    pub endpoints: Endpoints,
    pub processes: Vec<ProcessStatus>,
    pub link_mode: LinkMode,
    /// Empty with `links_error` set when Toxiproxy does not answer (and with direct links).
    pub links: Vec<LinkStatus>,
    pub links_error: Option<String>,
    /// Broker ids in the cluster's metadata, or why it could not be read.
    pub kafka_brokers: std::result::Result<Vec<i32>, String>,
    pub redis: std::result::Result<(), String>,
    pub postgres: std::result::Result<(), String>,
}

impl StackStatus {
    /// Every process alive, every link enabled without toxics, every server answering.
    pub fn healthy(&self) -> bool {
        self.processes.iter().all(|p| p.alive)
            && self.links_error.is_none()
            && self.links.iter().all(|l| l.enabled && l.toxics.is_empty())
            && self.kafka_brokers.as_ref().is_ok_and(|b| {
                b.len()
                    == self
                        .processes
                        .iter()
                        .filter(|p| p.name.starts_with("kafka-"))
                        .count()
            })
            && self.redis.is_ok()
            && self.postgres.is_ok()
    }
}

/// A running stack, started here or attached from its state file.
pub struct Stack {
    state: StackState,
    toxiproxy: ToxiproxyClient,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Fails if any planned address is already bound by someone else.
fn check_ports_free(plan: &PortPlan) -> Result<()> {
    for b in plan.bindings() {
        if let Err(e) = std::net::TcpListener::bind((b.ip, b.port)) {
            return Err(if e.kind() == std::io::ErrorKind::AddrInUse {
                StackError::PortTaken {
                    addr: format!("{}:{}", b.ip, b.port),
                    purpose: b.purpose,
                }
            } else {
                StackError::io(format!("binding {}:{} ({})", b.ip, b.port, b.purpose), e)
            });
        }
    }
    Ok(())
}

/// Makes `run_dir` an empty squall run directory, refusing folders squall did not make.
fn prepare_run_dir(run_dir: &Path) -> Result<()> {
    if run_dir.exists() {
        let is_ours = run_dir.join(RUN_MARKER).exists();
        let is_empty = std::fs::read_dir(run_dir)
            .map_err(|e| StackError::io(format!("reading {}", run_dir.display()), e))?
            .next()
            .is_none();
        if !is_ours && !is_empty {
            return Err(StackError::Command(format!(
                "{} exists and is not a squall run directory (no {RUN_MARKER}); choose an empty or new --run-dir",
                run_dir.display()
            )));
        }
        std::fs::remove_dir_all(run_dir).map_err(|e| {
            StackError::io(
                format!("clearing old run directory {}", run_dir.display()),
                e,
            )
        })?;
    }
    std::fs::create_dir_all(run_dir)
        .map_err(|e| StackError::io(format!("creating {}", run_dir.display()), e))?;
    std::fs::write(run_dir.join(RUN_MARKER), "squall stack run directory\n")
        .map_err(|e| StackError::io(format!("writing marker in {}", run_dir.display()), e))
}

/// Polls `check` until it succeeds, failing early when one of `watched` dies.
async fn wait_healthy<F, Fut>(
    name: &str,
    timeout: Duration,
    log: &Path,
    watched: &[ProcessRecord],
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    loop {
        if let Some(dead) = watched.iter().find(|p| !process::is_alive(p)) {
            return Err(StackError::ProcessDied {
                name: dead.name.clone(),
                status: process::exit_description(dead),
                log: dead.log.clone(),
                tail: process::log_tail(&dead.log, 12),
            });
        }
        let last_error = match check().await {
            Ok(()) => {
                tracing::info!(%name, elapsed_ms = start.elapsed().as_millis() as u64, "healthy");
                return Ok(());
            }
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(StackError::NotHealthy {
                name: name.to_string(),
                secs: timeout.as_secs(),
                last_error,
                log: log.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl Stack {
    /// Starts every server, waits until each answers a real health check, creates the
    /// seed topics and writes the state file. On failure everything started is stopped
    /// (the run directory is kept for its logs) and the error says what failed.
    pub async fn up(config: StackConfig) -> Result<Stack> {
        config.plan.validate()?;
        let tools = Tools::locate()?;
        if let Ok(old) = StackState::load(&config.run_dir) {
            let alive: Vec<String> = old
                .processes
                .iter()
                .filter(|p| process::is_alive(p))
                .map(|p| format!("{}={}", p.name, p.pid))
                .collect();
            if !alive.is_empty() {
                return Err(StackError::AlreadyRunning {
                    state_file: state_path(&config.run_dir),
                    run_dir: config.run_dir.clone(),
                    pids: alive.join(" "),
                });
            }
            tracing::info!(run_dir = %config.run_dir.display(), "replacing the state of a stack whose processes are all gone");
        }
        check_ports_free(&config.plan)?;
        prepare_run_dir(&config.run_dir)?;
        let state = StackState {
            version: STATE_VERSION,
            run_dir: config.run_dir.clone(),
            plan: config.plan.clone(),
            partitions: config.partitions,
            cluster_id: kafka::new_cluster_id()?,
            kafka_version: tools.kafka_version.clone(),
            started_at_ms: unix_ms(),
            processes: Vec::new(),
            link_mode: config.links,
            links: match config.links {
                LinkMode::Proxied => links::all_links(&config.plan),
                LinkMode::Direct => Vec::new(),
            },
        };
        let toxiproxy = ToxiproxyClient::new(&format!("{LOOPBACK}:{}", config.plan.toxiproxy_api))?;
        let mut stack = Stack { state, toxiproxy };
        match stack.start_all(&tools, &config).await {
            Ok(()) => Ok(stack),
            Err(e) => {
                tracing::error!(error = %e, "stack start failed; stopping what was started");
                stack.stop_processes().await;
                // Logs stay for the post-mortem; without a state file the folder is free again.
                let _ = std::fs::remove_file(state_path(&config.run_dir));
                Err(e)
            }
        }
    }

    fn record(&mut self, p: ProcessRecord) -> Result<()> {
        self.state.processes.retain(|old| old.name != p.name);
        self.state.processes.push(p);
        // Saved at every spawn, so `squall stack down` can stop a half-started stack.
        self.state.save()
    }

    async fn start_all(&mut self, tools: &Tools, config: &StackConfig) -> Result<()> {
        let plan = config.plan.clone();
        let run_dir = config.run_dir.clone();
        let timeout = config.start_timeout;

        let mode = self.state.link_mode;
        // What the stores' health checks depend on besides the store itself.
        let mut proxy = Vec::new();
        if mode == LinkMode::Proxied {
            let toxi = stores::launch_toxiproxy(tools, &plan, &run_dir)?;
            self.record(toxi.clone())?;
            let client = self.toxiproxy.clone();
            wait_healthy(
                "toxiproxy",
                timeout,
                &toxi.log,
                std::slice::from_ref(&toxi),
                || {
                    let c = client.clone();
                    async move { c.version().await.map(|_| ()) }
                },
            )
            .await?;
            self.toxiproxy.populate(&self.state.links).await?;
            proxy.push(toxi);
        }

        let redis = stores::launch_redis(tools, &plan, &run_dir)?;
        self.record(redis.clone())?;
        let postgres = stores::launch_postgres(tools, &plan, &run_dir).await?;
        self.record(postgres.clone())?;

        let setup = kafka::ClusterSetup {
            cluster_id: &self.state.cluster_id,
            partitions: config.partitions,
            overrides: &config.broker_overrides,
            links: mode,
        };
        let prepared = join_all(
            (1..=plan.broker_count())
                .map(|id| kafka::prepare_broker(tools, &plan, &run_dir, id, &setup)),
        )
        .await;
        for p in prepared {
            p?;
        }
        let mut brokers = Vec::new();
        for id in 1..=plan.broker_count() {
            let b = kafka::launch_broker(tools, &run_dir, id)?;
            self.record(b.clone())?;
            brokers.push(b);
        }

        let redis_url = plan.redis_url_via(mode);
        wait_healthy(
            "redis",
            timeout,
            &redis.log,
            &[proxy.clone(), vec![redis.clone()]].concat(),
            || stores::redis_ping(&redis_url, Duration::from_secs(2)),
        )
        .await?;
        let postgres_url = plan.postgres_url_via("postgres", mode);
        wait_healthy(
            "postgres",
            timeout,
            &postgres.log,
            &[proxy, vec![postgres.clone()]].concat(),
            || stores::postgres_ready(&postgres_url, Duration::from_secs(5)),
        )
        .await?;
        let bootstrap = plan.kafka_bootstrap_via(mode);
        let expected = plan.broker_count() as usize;
        wait_healthy("kafka", timeout, &brokers[0].log, &brokers, || {
            let bootstrap = bootstrap.clone();
            async move {
                let view = kafka::cluster_view(bootstrap, Duration::from_secs(5)).await?;
                if view.brokers.len() == expected {
                    Ok(())
                } else {
                    Err(StackError::Kafka(format!(
                        "metadata lists brokers {:?}, expected {expected}",
                        view.brokers
                    )))
                }
            }
        })
        .await?;
        let specs = topics::all_topics();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        wait_healthy("seed topics", timeout, &brokers[0].log, &brokers, || {
            let (bootstrap, specs, names) = (bootstrap.clone(), specs.clone(), names.clone());
            async move {
                kafka::create_topics(&bootstrap, &specs, config.partitions).await?;
                let view = kafka::cluster_view(bootstrap, Duration::from_secs(5)).await?;
                kafka::topics_ready(&view, &names, config.partitions)
            }
        })
        .await?;
        self.state.save()
    }

    /// Opens the stack described by `<run_dir>/state.json`.
    pub fn attach(run_dir: &Path) -> Result<Stack> {
        let state = StackState::load(run_dir)?;
        let toxiproxy = ToxiproxyClient::new(&format!("{LOOPBACK}:{}", state.plan.toxiproxy_api))?;
        Ok(Stack { state, toxiproxy })
    }

    pub fn state(&self) -> &StackState {
        &self.state
    }

    pub fn plan(&self) -> &PortPlan {
        &self.state.plan
    }

    pub fn toxiproxy(&self) -> &ToxiproxyClient {
        &self.toxiproxy
    }

    pub fn link_mode(&self) -> LinkMode {
        self.state.link_mode
    }

    /// Each broker's client address (through its proxy unless links are direct), one per
    /// entry.
    pub fn broker_addresses(&self) -> Vec<String> {
        self.state
            .plan
            .brokers
            .iter()
            .map(|b| {
                format!(
                    "{LOOPBACK}:{}",
                    PortPlan::broker_client_port(b, self.link_mode())
                )
            })
            .collect()
    }

    fn kafka_bootstrap(&self) -> String {
        self.state.plan.kafka_bootstrap_via(self.link_mode())
    }

    /// Fails unless links are proxied: a fault on a link that has no proxy would do nothing.
    fn proxied(&self, what: &str) -> Result<()> {
        match self.link_mode() {
            LinkMode::Proxied => Ok(()),
            LinkMode::Direct => Err(StackError::DirectLinks {
                what: what.to_string(),
                run_dir: self.state.run_dir.clone(),
            }),
        }
    }

    /// Creates `specs` (replication 3, the stack's partition count) and waits until every
    /// broker reports them ready.
    pub async fn create_topics(&self, specs: &[topics::TopicSpec]) -> Result<()> {
        let partitions = self.state.partitions;
        kafka::create_topics(&self.kafka_bootstrap(), specs, partitions).await?;
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        kafka::wait_topics_ready(
            &self.broker_addresses(),
            &names,
            partitions,
            Duration::from_secs(60),
        )
        .await
    }

    pub fn endpoints(&self) -> Endpoints {
        let (plan, mode) = (&self.state.plan, self.link_mode());
        Endpoints {
            kafka_bootstrap: plan.kafka_bootstrap_via(mode),
            redis_url: plan.redis_url_via(mode),
            postgres_url: plan.postgres_url_via(stores::DATABASE, mode),
            toxiproxy_api: format!("http://{LOOPBACK}:{}", plan.toxiproxy_api),
        }
    }

    /// Each process, each link and each server's health check, as they are now.
    pub async fn status(&self) -> StackStatus {
        let processes = self
            .state
            .processes
            .iter()
            .map(|p| ProcessStatus {
                name: p.name.clone(),
                pid: p.pid,
                alive: process::is_alive(p),
                log: p.log.clone(),
            })
            .collect();
        let (links, links_error) = match self.link_mode() {
            LinkMode::Direct => (Vec::new(), None),
            LinkMode::Proxied => match self.toxiproxy.proxies().await {
                Ok(proxies) => (self.link_statuses(&proxies), None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            },
        };
        let (plan, mode) = (&self.state.plan, self.link_mode());
        let kafka_brokers = kafka::cluster_view(self.kafka_bootstrap(), Duration::from_secs(5))
            .await
            .map(|v| v.brokers)
            .map_err(|e| e.to_string());
        let redis = stores::redis_ping(&plan.redis_url_via(mode), Duration::from_secs(3))
            .await
            .map_err(|e| e.to_string());
        let postgres = stores::postgres_ready(
            &plan.postgres_url_via("postgres", mode),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string());
        StackStatus {
            run_dir: self.state.run_dir.clone(),
            endpoints: self.endpoints(),
            processes,
            link_mode: self.link_mode(),
            links,
            links_error,
            kafka_brokers,
            redis,
            postgres,
        }
    }

    fn link_statuses(&self, proxies: &BTreeMap<String, ProxyState>) -> Vec<LinkStatus> {
        self.state
            .links
            .iter()
            .map(|l| match proxies.get(&l.name) {
                Some(p) => LinkStatus {
                    name: l.name.clone(),
                    listen: p.listen.clone(),
                    upstream: p.upstream.clone(),
                    enabled: p.enabled,
                    toxics: p
                        .toxics
                        .iter()
                        .map(|t| format!("{}({})", t.kind, t.stream))
                        .collect(),
                },
                None => LinkStatus {
                    name: l.name.clone(),
                    listen: l.listen(),
                    upstream: l.upstream.clone(),
                    enabled: false,
                    toxics: vec!["missing from toxiproxy".into()],
                },
            })
            .collect()
    }

    /// Stops every recorded process: brokers first (in parallel), then the stores, then
    /// Toxiproxy. Never fails; what could not be stopped is logged.
    async fn stop_processes(&self) -> Vec<String> {
        let grace = Duration::from_secs(10);
        let (brokers, others): (Vec<_>, Vec<_>) = self
            .state
            .processes
            .iter()
            .partition(|p| p.name.starts_with("kafka-"));
        let (proxy, stores): (Vec<_>, Vec<_>) =
            others.into_iter().partition(|p| p.name == "toxiproxy");
        let mut stopped = Vec::new();
        for group in [brokers, stores, proxy] {
            let results = join_all(group.iter().map(|p| async move {
                let was_alive = process::is_alive(p);
                (p, was_alive, process::stop(p, grace).await)
            }))
            .await;
            for (p, was_alive, r) in results {
                match r {
                    Ok(()) if was_alive => stopped.push(format!("{} (pid {})", p.name, p.pid)),
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(name = %p.name, pid = p.pid, error = %e, "could not stop")
                    }
                }
            }
        }
        stopped
    }

    /// Re-reads the state file: another process attached to this stack (a `squall run
    /// --stack-dir` whose nemesis restarted a broker) may have recorded new pids.
    pub fn refresh(&mut self) {
        if let Ok(fresh) = StackState::load(&self.state.run_dir) {
            self.state = fresh;
        }
    }

    /// Stops exactly the processes this stack started (by pid, as the state file records
    /// them now) and removes the run directory unless `keep_run_dir`. Returns the
    /// processes that were stopped.
    pub async fn down(mut self, keep_run_dir: bool) -> Result<Vec<String>> {
        self.refresh();
        let stopped = self.stop_processes().await;
        let still: Vec<String> = self
            .state
            .processes
            .iter()
            .filter(|p| process::is_alive(p))
            .map(|p| format!("{}={}", p.name, p.pid))
            .collect();
        if !still.is_empty() {
            return Err(StackError::Command(format!(
                "could not stop {}; the state file is kept so `squall stack down` can be retried",
                still.join(" ")
            )));
        }
        let run_dir = &self.state.run_dir;
        if keep_run_dir {
            let _ = std::fs::remove_file(state_path(run_dir));
        } else if run_dir.join(RUN_MARKER).exists() {
            std::fs::remove_dir_all(run_dir)
                .map_err(|e| StackError::io(format!("removing {}", run_dir.display()), e))?;
        }
        Ok(stopped)
    }

    fn broker_name(&self, id: u8) -> Result<String> {
        self.state.plan.broker(id)?;
        Ok(format!("kafka-{id}"))
    }

    /// kill -9 of broker `id`, as a crash.
    pub async fn kill_broker(&self, id: u8) -> Result<()> {
        let record = self.state.process(&self.broker_name(id)?)?;
        process::kill_now(record).await
    }

    /// Stops broker `id` cleanly (SIGTERM, controlled shutdown).
    pub async fn stop_broker(&self, id: u8) -> Result<()> {
        let record = self.state.process(&self.broker_name(id)?)?;
        process::stop(record, Duration::from_secs(30)).await
    }

    /// Starts broker `id` again from its files and waits until the cluster lists it.
    pub async fn start_broker(&mut self, id: u8, timeout: Duration) -> Result<()> {
        let name = self.broker_name(id)?;
        if process::is_alive(self.state.process(&name)?) {
            return Err(StackError::Command(format!("{name} is already running")));
        }
        let tools = Tools::locate()?;
        let record = kafka::launch_broker(&tools, &self.state.run_dir, id)?;
        self.record(record.clone())?;
        let bootstrap = self.kafka_bootstrap();
        wait_healthy(
            &name,
            timeout,
            &record.log,
            std::slice::from_ref(&record),
            || {
                let bootstrap = bootstrap.clone();
                async move {
                    let view = kafka::cluster_view(bootstrap, Duration::from_secs(5)).await?;
                    if view.brokers.contains(&i32::from(id)) {
                        Ok(())
                    } else {
                        Err(StackError::Kafka(format!(
                            "metadata lists brokers {:?}",
                            view.brokers
                        )))
                    }
                }
            },
        )
        .await
    }

    /// The cluster as broker `id` itself describes it (asked through its client proxy
    /// with a Metadata request to that broker alone: an isolated broker's view is stale,
    /// so views must not be mixed up).
    pub async fn cluster_view_from(&self, id: u8) -> Result<ClusterView> {
        let ports = self.state.plan.broker(id)?;
        crate::kafka_wire::metadata_from(
            &format!(
                "{LOOPBACK}:{}",
                PortPlan::broker_client_port(ports, self.link_mode())
            ),
            i32::from(id),
            Duration::from_secs(5),
        )
        .await
    }

    pub fn link(&self, name: &str) -> Result<&Link> {
        self.state
            .links
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| StackError::Unknown {
                kind: "link",
                name: name.to_string(),
                known: self
                    .state
                    .links
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Cuts a link: its proxy closes its connections and refuses new ones.
    pub async fn cut(&self, link: &str) -> Result<()> {
        self.proxied(&format!("cutting {link}"))?;
        self.link(link)?;
        self.toxiproxy.set_enabled(link, false).await
    }

    pub async fn restore(&self, link: &str) -> Result<()> {
        self.proxied(&format!("restoring {link}"))?;
        self.link(link)?;
        self.toxiproxy.set_enabled(link, true).await
    }

    /// Cuts broker `id` off from every peer, in both directions (replication and
    /// controller traffic). Clients still reach it. Returns the links cut.
    pub async fn isolate_broker(&self, id: u8) -> Result<Vec<String>> {
        self.proxied(&format!("isolating kafka-{id}"))?;
        self.state.plan.broker(id)?;
        let cut = links::isolation_links(&self.state.plan, id);
        for l in &cut {
            self.toxiproxy.set_enabled(&l.name, false).await?;
        }
        Ok(cut.into_iter().map(|l| l.name).collect())
    }

    /// Cuts the traffic broker `from` sends to broker `to`, leaving the other direction up.
    pub async fn partition_one_way(&self, from: u8, to: u8) -> Result<Vec<String>> {
        self.proxied(&format!("cutting kafka-{from} -> kafka-{to}"))?;
        self.state.plan.broker(from)?;
        self.state.plan.broker(to)?;
        let cut = links::one_way_links(&self.state.plan, from, to);
        for l in &cut {
            self.toxiproxy.set_enabled(&l.name, false).await?;
        }
        Ok(cut.into_iter().map(|l| l.name).collect())
    }

    /// Restores every link and removes every toxic (nothing to do with direct links).
    pub async fn heal(&self) -> Result<()> {
        match self.link_mode() {
            LinkMode::Proxied => self.toxiproxy.reset().await,
            LinkMode::Direct => Ok(()),
        }
    }
}
