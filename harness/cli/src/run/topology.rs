//! The system under test as a run sees it: either processes this run starts and owns
//! (`chatstream node` × N and `chatstream workers`, release binaries, ports from the run's
//! port plan, logs in the run directory) on a local stack, or the endpoints of a
//! deployment Squall did not start (`--target`). Owned processes are stopped by pid at
//! the end, on error and on Ctrl-C; they can also be signalled, killed and restarted
//! (the nemesis needs that).

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use squall_scenario::{Scenario, WorkerKind};
use squall_stack::process::{self, Launch, ProcessRecord, StopSignal};

use super::alerts::AlertSink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Ports of the processes a run starts, beside the stack's own plan.
#[derive(Debug, Clone, Copy)]
pub struct RunPorts {
    /// Node i (from 1) listens on `nodes_base + i`.
    pub nodes_base: u16,
    pub workers: u16,
    pub webhook: u16,
}

impl RunPorts {
    /// Offsets +100.. of the stack's base port (the stack uses +0..+61).
    pub fn from_base(base: u16) -> Result<RunPorts> {
        let nodes_base = base.checked_add(100).context("base port too high")?;
        Ok(RunPorts {
            nodes_base,
            workers: base.checked_add(130).context("base port too high")?,
            webhook: base.checked_add(131).context("base port too high")?,
        })
    }
}

/// Endpoints of a deployment (`--target FILE`, YAML or JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetEndpoints {
    /// Node base URLs, e.g. `http://127.0.0.1:8081`.
    pub nodes: Vec<String>,
    #[serde(default)]
    pub workers_api: Option<String>,
    pub kafka_bootstrap: String,
    pub redis_url: String,
    pub postgres_url: String,
    #[serde(default)]
    pub toxiproxy_api: Option<String>,
    #[serde(default = "default_secret")]
    pub token_secret: String,
}

pub fn default_secret() -> String {
    "squall-dev-secret".into()
}

impl TargetEndpoints {
    pub fn load(path: &Path) -> Result<TargetEndpoints> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading target file {}", path.display()))?;
        let t: TargetEndpoints = serde_yaml::from_str(&text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default();
            anyhow::anyhow!(
                "{}{at}: {e}; expected keys nodes (list of URLs), workers_api, kafka_bootstrap, redis_url, postgres_url, toxiproxy_api, token_secret",
                path.display()
            )
        })?;
        if t.nodes.is_empty() {
            bail!("{}: `nodes` lists no node URL", path.display());
        }
        Ok(t)
    }
}

/// A process the run started, with what it takes to start it again.
#[derive(Debug, Clone)]
pub struct OwnedProcess {
    pub record: ProcessRecord,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its HTTP base URL (`/readyz`, `/metrics`).
    pub url: String,
}

impl OwnedProcess {
    fn start(
        name: &str,
        program: &Path,
        args: Vec<String>,
        log: PathBuf,
        url: String,
    ) -> Result<Self> {
        let record = process::spawn(Launch {
            name,
            program,
            args: args.clone(),
            log,
            cwd: None,
            user: None,
            env: &[],
            stop_signal: StopSignal::Term,
        })
        .with_context(|| format!("starting {name}"))?;
        Ok(OwnedProcess {
            record,
            program: program.to_path_buf(),
            args,
            url,
        })
    }

    pub fn alive(&self) -> bool {
        process::is_alive(&self.record)
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        process::signal(&self.record, signal)
            .with_context(|| format!("signalling {}", self.record.name))
    }

    /// Starts it again with the same program, arguments and log (appended).
    pub fn restart(&mut self) -> Result<()> {
        let again = OwnedProcess::start(
            &self.record.name,
            &self.program,
            self.args.clone(),
            self.record.log.clone(),
            self.url.clone(),
        )?;
        *self = again;
        Ok(())
    }

    pub async fn stop(&self, grace: Duration) -> Result<()> {
        process::stop(&self.record, grace)
            .await
            .with_context(|| format!("stopping {} (pid {})", self.record.name, self.record.pid))
    }
}

/// The chatstream processes of a run (empty in `--target` mode).
pub struct Topology {
    pub nodes: Vec<OwnedProcess>,
    pub workers: Option<OwnedProcess>,
    pub node_urls: Vec<String>,
    pub workers_api: Option<String>,
    pub token_secret: String,
    /// The alerts webhook the started workers post to.
    pub alerts: Option<AlertSink>,
}

/// Where the backends are, as the nodes and workers should reach them.
pub struct Backends {
    pub postgres_url: String,
    pub redis_url: String,
    pub kafka_bootstrap: String,
}

/// Finds the chatstream binary: the flag, else beside squall's own executable, else
/// target/release.
pub fn chatstream_binary(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--chatstream {} is not a file", p.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("chatstream"));
        }
    }
    candidates.push(PathBuf::from("target/release/chatstream"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no chatstream binary at {}; build it with `cargo build --release -p chatstream` or pass --chatstream",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
            )
        })
}

fn worker_name(w: &WorkerKind) -> String {
    serde_json::to_value(w)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{w:?}").to_lowercase())
}

impl Topology {
    pub fn target(t: &TargetEndpoints) -> Topology {
        Topology {
            nodes: Vec::new(),
            workers: None,
            node_urls: t
                .nodes
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            workers_api: t.workers_api.clone(),
            token_secret: t.token_secret.clone(),
            alerts: None,
        }
    }

    /// Starts the scenario's nodes and workers; on any failure stops what it started.
    pub async fn start(
        scenario: &Scenario,
        binary: &Path,
        backends: &Backends,
        ports: RunPorts,
        run_dir: &Path,
    ) -> Result<Topology> {
        let logs = run_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let secret = default_secret();
        let mut topo = Topology {
            nodes: Vec::new(),
            workers: None,
            node_urls: Vec::new(),
            workers_api: None,
            token_secret: secret.clone(),
            alerts: None,
        };
        let result = topo
            .start_all(scenario, binary, backends, ports, run_dir, &logs)
            .await;
        if let Err(e) = result {
            topo.stop().await;
            return Err(e);
        }
        Ok(topo)
    }

    async fn start_all(
        &mut self,
        scenario: &Scenario,
        binary: &Path,
        backends: &Backends,
        ports: RunPorts,
        run_dir: &Path,
        logs: &Path,
    ) -> Result<()> {
        let topology = &scenario.topology;
        for i in 1..=topology.nodes {
            let id = format!("node-{i}");
            let port = ports.nodes_base + i as u16;
            let mut config =
                serde_yaml::to_value(&topology.node).context("encoding node settings")?;
            let map = config
                .as_mapping_mut()
                .context("node settings are not a mapping")?;
            for (k, v) in [
                ("node_id", id.clone()),
                ("listen", format!("127.0.0.1:{port}")),
                ("postgres_url", backends.postgres_url.clone()),
                ("redis_url", backends.redis_url.clone()),
                ("kafka_bootstrap", backends.kafka_bootstrap.clone()),
                ("token_secret", self.token_secret.clone()),
            ] {
                map.insert(k.into(), v.into());
            }
            let config_path = run_dir.join(format!("{id}.yaml"));
            std::fs::write(&config_path, serde_yaml::to_string(&config)?)
                .with_context(|| format!("writing {}", config_path.display()))?;
            let url = format!("http://127.0.0.1:{port}");
            let node = OwnedProcess::start(
                &id,
                binary,
                vec![
                    "node".into(),
                    "--config".into(),
                    config_path.display().to_string(),
                ],
                logs.join(format!("{id}.log")),
                url.clone(),
            )?;
            self.nodes.push(node);
            self.node_urls.push(url);
        }
        if topology.workers.enabled && !topology.workers.only.is_empty() {
            let w = &topology.workers;
            if w.only.contains(&WorkerKind::Alerts) {
                let sink = AlertSink::start(ports.webhook, run_dir).await?;
                tracing::info!("alerts webhook on http://{}/alerts", sink.addr);
                self.alerts = Some(sink);
            }
            let url = format!("http://127.0.0.1:{}", ports.workers);
            let mut args = vec![
                "workers".to_string(),
                "--only".into(),
                w.only.iter().map(worker_name).collect::<Vec<_>>().join(","),
                "--concurrency".into(),
                w.concurrency.to_string(),
                "--postgres-url".into(),
                backends.postgres_url.clone(),
                "--kafka-bootstrap".into(),
                backends.kafka_bootstrap.clone(),
                "--listen".into(),
                format!("127.0.0.1:{}", ports.workers),
                "--export-dir".into(),
                run_dir.join("exports").display().to_string(),
                "--webhook".into(),
                format!("http://127.0.0.1:{}/alerts", ports.webhook),
            ];
            if let Some(sla) = w.sla_ms {
                args.extend(["--sla-ms".into(), sla.to_string()]);
            }
            if let Some(ms) = w.commit_interval_ms {
                args.extend(["--commit-interval-ms".into(), ms.to_string()]);
            }
            for (switch, value) in &w.sabotage {
                match value {
                    serde_yaml::Value::Bool(true) => args.push(format!("--{switch}")),
                    serde_yaml::Value::Bool(false) | serde_yaml::Value::Null => {}
                    serde_yaml::Value::String(s) => args.extend([format!("--{switch}"), s.clone()]),
                    other => args.extend([
                        format!("--{switch}"),
                        serde_yaml::to_string(other)?.trim().to_string(),
                    ]),
                }
            }
            self.workers = Some(OwnedProcess::start(
                "workers",
                binary,
                args,
                logs.join("workers.log"),
                url.clone(),
            )?);
            self.workers_api = Some(url);
        }
        self.wait_ready(Duration::from_secs(90)).await
    }

    /// Waits for every node's `/readyz` (200) and the workers' `/healthz`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        wait_ready_of(self.readiness_of(&all, self.workers.is_some()), timeout).await
    }

    /// What [`wait_ready_of`] polls for the nodes `nodes` (and the workers): each process's
    /// record and its readiness URL, so the wait needs no lock on the topology.
    pub fn readiness_of(&self, nodes: &[usize], workers: bool) -> Vec<(ProcessRecord, String)> {
        nodes
            .iter()
            .filter_map(|&i| self.nodes.get(i))
            .map(|n| (n.record.clone(), format!("{}/readyz", n.url)))
            .chain(
                self.workers
                    .iter()
                    .filter(|_| workers)
                    .map(|w| (w.record.clone(), format!("{}/healthz", w.url))),
            )
            .collect()
    }

    /// Every process this run owns (nodes, then workers).
    pub fn processes(&self) -> Vec<&OwnedProcess> {
        self.nodes.iter().chain(self.workers.iter()).collect()
    }

    /// Stops everything this run started, by pid: SIGTERM, then SIGKILL after the grace.
    pub async fn stop(&self) {
        for p in self.processes() {
            // A paused process cannot act on SIGTERM.
            let _ = p.signal(Signal::SIGCONT);
        }
        let stops = self.processes().into_iter().map(|p| async move {
            if let Err(e) = p.stop(Duration::from_secs(15)).await {
                tracing::error!("{e:#}");
            }
        });
        futures::future::join_all(stops).await;
        if let Some(sink) = &self.alerts {
            let taken = sink.stop();
            tracing::info!(
                "alerts webhook took {} alert(s) ({} distinct) → {}",
                taken.received,
                taken.distinct,
                sink.path.display()
            );
        }
    }
}

/// Waits until every process of `waiting` answers its readiness URL with 200; fails at once
/// when one of them exits, and after `timeout` naming the last answer that was not ready.
pub async fn wait_ready_of(waiting: Vec<(ProcessRecord, String)>, timeout: Duration) -> Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut waiting = waiting;
    let mut last = String::new();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for (record, url) in waiting {
            if !process::is_alive(&record) {
                bail!(
                    "{} exited during start; its log ({}) ends:\n{}",
                    record.name,
                    record.log.display(),
                    process::log_tail(&record.log, 15)
                );
            }
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    last = format!(
                        "{url}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    still.push((record, url));
                }
                Err(e) => {
                    last = format!("{url}: {e}");
                    still.push((record, url));
                }
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("not ready within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
