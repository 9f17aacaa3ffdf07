//! `chatstream workers`: runs the chosen workers (each its own consumer group) and the
//! retention task, reports consumer lag and stuck partitions per group and partition,
//! serves the workers' HTTP API (`chatstream_workers::api`: health, metrics, the read
//! API) and replay over HTTP (`chatstream_replay::http`), and stops cleanly on SIGTERM,
//! committing what was handled.

use anyhow::{bail, Context, Result};
use chatstream_replay::LagReader;
use chatstream_store::Store;
use chatstream_workers::api::{self, Api};
use chatstream_workers::handlers::{
    Alerts, Analytics, Audit, Export, Search, SearchWithoutIdempotency,
};
use chatstream_workers::health::{PartitionWatch, STUCK_GAUGE};
use chatstream_workers::retention::{run_retention, RetentionPolicy};
use chatstream_workers::{run_worker, Handler, WorkerConfig};
use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const WORKERS: &[&str] = &["audit", "analytics", "search", "alerts", "export"];

#[derive(Args, Clone)]
pub struct WorkersArgs {
    /// Comma-separated workers to run: audit, analytics, search, alerts, export.
    #[arg(long, value_delimiter = ',', default_value = "audit,analytics,search")]
    pub only: Vec<String>,
    /// Consumers per worker in this process (they share the worker's group).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    #[arg(
        long,
        env = "CHATSTREAM_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:29060/chatstream"
    )]
    pub postgres_url: String,
    #[arg(
        long,
        env = "CHATSTREAM_KAFKA_BOOTSTRAP",
        default_value = "127.0.0.1:29011,127.0.0.1:29012,127.0.0.1:29013"
    )]
    pub kafka_bootstrap: String,
    /// Address for /healthz, /metrics and the read API (port 0: any free port, printed).
    #[arg(long, env = "CHATSTREAM_WORKERS_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Alerts: where to POST (required with the alerts worker).
    #[arg(long, env = "CHATSTREAM_ALERT_WEBHOOK")]
    pub webhook: Option<String>,
    /// Alerts: a completed stream slower than this (total latency) is an SLA breach.
    #[arg(long, default_value_t = 10_000)]
    pub sla_ms: u64,
    /// Export: folder for the JSONL training files (one per date).
    #[arg(long, default_value = "exports")]
    pub export_dir: PathBuf,
    /// Consumer group prefix (groups are `<prefix>-<worker>`).
    #[arg(long, default_value = "chatstream")]
    pub group_prefix: String,
    /// Most events the audit, search and analytics workers write in one statement (the
    /// run of one partition's records that arrived together); 1 handles them one by one.
    #[arg(long, default_value_t = chatstream_workers::consumer::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// How often handled offsets are committed (also on revoke and on shutdown). The
    /// group's lag is counted from the committed offsets, so it is at least the events of
    /// one interval. A commit waits until the coordinator has answered the one before it
    /// (at most 10 s): sent every 100 ms regardless, they queued up at a busy coordinator,
    /// the committed offsets fell tens of thousands behind what was handled, and
    /// heartbeats waiting behind them ended a consumer's session.
    #[arg(long, default_value_t = chatstream_workers::consumer::DEFAULT_COMMIT_INTERVAL_MS)]
    pub commit_interval_ms: u64,
    /// Test sabotage: exit right after handling this many events, before committing.
    #[arg(long, hide = true)]
    pub crash_after: Option<u64>,
    /// Test sabotage: the analytics worker forgets which events it counted.
    #[arg(long, hide = true)]
    pub unsafe_no_dedupe: bool,
    /// SABOTAGE (off by default, never for production): every worker commits each event's
    /// offset as soon as it reads it and handles the event only at the next commit tick, so
    /// a kill -9 loses up to `--commit-interval-ms` of events (committed, never handled).
    #[arg(long, hide = true)]
    pub unsafe_commit_before_handle: bool,
    /// SABOTAGE (off by default, never for production): every consumer commits its
    /// handled offsets once, after its first events, and never again (not even when it
    /// stops): nothing is lost, but the committed offsets stand still, so every group's
    /// lag grows with every event and a restart would redeliver all of it.
    #[arg(long, hide = true)]
    pub unsafe_stall_commits: bool,
    /// SABOTAGE (off by default, never for production): the search indexer keeps no
    /// processed marker and appends a message's text to its row on every delivery instead
    /// of upserting it, so a redelivery changes the index (a rebuild differs from it).
    #[arg(long, hide = true)]
    pub unsafe_search_no_idempotency: bool,
    /// Tries of an event the database (or webhook) refuses for good — e.g. SQLSTATE class
    /// 22 or 23, a NUL byte in a text field — before it is dead-lettered with the error.
    #[arg(long, default_value_t = 3)]
    pub permanent_error_tries: u32,
    /// Longest wait between two retries of a failing event (capped exponential backoff
    /// from 1 s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub retry_max_backoff: Duration,
    /// A partition retrying an event, or lagging without progress, for longer than this is
    /// stuck: /readyz turns red naming it, and chatstream_worker_partition_stuck is 1.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub stuck_after: Duration,
    /// How often consumer lag is measured (the lag gauges and the stuck-partition watch).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub lag_interval: Duration,
    /// How often retention runs (0s: never).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub retention_interval: Duration,
    /// Published outbox rows older than this are deleted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub outbox_retention: Duration,
    /// Processed-event markers older than this are deleted. Keep it longer than the
    /// longest retention of the topics the workers read (notifications: 30 days), or a
    /// redelivered old event could be counted twice.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30days")]
    pub processed_retention: Duration,
    /// Test fault injection: the first N pause and seek calls of each consumer fail.
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_fail_partition_ops: u32,
}

impl WorkersArgs {
    pub fn group(&self, worker: &str) -> String {
        format!("{}-{worker}", self.group_prefix)
    }
}

/// Opens the store, waiting (bounded) for PostgreSQL, and migrates it; `name` is its
/// connections' `application_name`.
pub async fn open_store(url: &str, name: &str) -> Result<Store> {
    let store = Store::connect_lazy(url, 16, name).context("postgres URL")?;
    let mut waited = Duration::ZERO;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(store),
            Err(e) if waited < Duration::from_secs(60) => {
                tracing::warn!(error = %e, "postgres not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                waited += Duration::from_secs(1);
            }
            Err(e) => return Err(e).context("migrating the database (is PostgreSQL reachable?)"),
        }
    }
}

/// Publishes consumer lag per group and partition as gauges every `interval`, feeds the
/// stuck-partition watch with it, and publishes which partitions are stuck. One
/// [`LagReader`] per group, kept while it reads (a new one after a failure).
async fn report_lag(
    bootstrap: String,
    groups: Vec<(String, Vec<String>)>,
    watch: Arc<PartitionWatch>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut readers: HashMap<String, Arc<LagReader>> = HashMap::new();
    loop {
        for (group, topics) in &groups {
            let reader = readers.remove(group);
            let (b, g, t) = (bootstrap.clone(), group.clone(), topics.clone());
            let read = tokio::task::spawn_blocking(move || {
                let reader = match reader {
                    Some(r) => r,
                    None => Arc::new(LagReader::new(&b, &g, &t)?),
                };
                reader.read().map(|lags| (reader, lags))
            });
            match read.await {
                Ok(Ok((reader, lags))) => {
                    readers.insert(group.clone(), reader);
                    let now = std::time::Instant::now();
                    for l in lags {
                        watch.observe_lag(group, &l.topic, l.partition, l.committed, l.lag, now);
                        metrics::gauge!("chatstream_consumer_lag", "group" => group.clone(), "topic" => l.topic, "partition" => l.partition.to_string())
                            .set(l.lag as f64);
                    }
                }
                Ok(Err(e)) => tracing::debug!(%group, error = %e, "lag not measured"),
                Err(e) => tracing::debug!(%group, error = %e, "lag task failed"),
            }
        }
        for (group, topic, partition, stuck) in watch.states(std::time::Instant::now()) {
            if let Some(s) = &stuck {
                tracing::warn!(%group, %topic, partition, reason = %s.reason, for_s = s.for_s, "partition stuck");
            }
            metrics::gauge!(STUCK_GAUGE, "group" => group, "topic" => topic, "partition" => partition.to_string())
                .set(if stuck.is_some() { 1.0 } else { 0.0 });
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A running worker and the (group, topics) whose lag is reported.
type Spawned = (
    tokio::task::JoinHandle<Result<(), String>>,
    (String, Vec<String>),
);

fn spawn<H: Handler>(
    args: &WorkersArgs,
    handler: H,
    watch: &Arc<PartitionWatch>,
    shutdown: &watch::Receiver<bool>,
) -> Spawned {
    let mut config = WorkerConfig::new(&args.kafka_bootstrap);
    config.permanent_error_tries = args.permanent_error_tries.max(1);
    config.max_backoff = args.retry_max_backoff.max(config.first_backoff);
    config.watch = Some(watch.clone());
    config.test_fail_partition_ops = args.test_fail_partition_ops;
    config.group = Some(args.group(handler.name()));
    config.concurrency = args.concurrency;
    config.max_batch = args.max_batch.max(1);
    config.crash_after = args.crash_after;
    config.unsafe_commit_before_handle = args.unsafe_commit_before_handle;
    config.unsafe_stall_commits = args.unsafe_stall_commits;
    config.commit_interval = Duration::from_millis(args.commit_interval_ms.max(10));
    let entry = (args.group(handler.name()), handler.topics());
    (
        tokio::spawn(run_worker(config, Arc::new(handler), shutdown.clone())),
        entry,
    )
}

pub async fn run(
    args: WorkersArgs,
    metrics: PrometheusHandle,
    signal: impl std::future::Future<Output = ()>,
) -> Result<()> {
    for w in &args.only {
        if !WORKERS.contains(&w.as_str()) {
            bail!("unknown worker {w:?}; choose from {}", WORKERS.join(", "));
        }
    }
    if args.only.iter().any(|w| w == "alerts") && args.webhook.is_none() {
        bail!("the alerts worker needs --webhook <url> (or CHATSTREAM_ALERT_WEBHOOK)");
    }
    for (on, flag) in [
        (
            args.unsafe_commit_before_handle,
            "--unsafe-commit-before-handle",
        ),
        (
            args.unsafe_search_no_idempotency,
            "--unsafe-search-no-idempotency",
        ),
        (args.unsafe_no_dedupe, "--unsafe-no-dedupe"),
        (args.unsafe_stall_commits, "--unsafe-stall-commits"),
    ] {
        if on {
            tracing::warn!(
                "SABOTAGE {flag} is on: this workers process deliberately breaks a guarantee"
            );
        }
    }
    let store = open_store(&args.postgres_url, "chatstream-workers").await?;
    let pool = store.pool().clone();
    let (tx, rx) = watch::channel(false);
    let watch = Arc::new(PartitionWatch::new(args.stuck_after));
    if args.test_fail_partition_ops > 0 {
        tracing::warn!(
            n = args.test_fail_partition_ops,
            "TEST FAULTS: the first pause and seek calls of each consumer fail"
        );
    }
    let mut tasks = Vec::new();
    let mut groups = Vec::new();
    for w in &args.only {
        let group = args.group(w);
        let (task, entry) = match w.as_str() {
            "audit" => spawn(
                &args,
                Audit {
                    pool: pool.clone(),
                    group,
                },
                &watch,
                &rx,
            ),
            "analytics" => spawn(
                &args,
                Analytics {
                    pool: pool.clone(),
                    group,
                    unsafe_no_dedupe: args.unsafe_no_dedupe,
                },
                &watch,
                &rx,
            ),
            "search" if args.unsafe_search_no_idempotency => spawn(
                &args,
                SearchWithoutIdempotency {
                    pool: pool.clone(),
                    group,
                },
                &watch,
                &rx,
            ),
            "search" => spawn(
                &args,
                Search {
                    pool: pool.clone(),
                    group,
                },
                &watch,
                &rx,
            ),
            "alerts" => spawn(
                &args,
                Alerts {
                    pool: pool.clone(),
                    group,
                    webhook: args.webhook.clone().unwrap_or_default(),
                    sla_ms: args.sla_ms,
                    http: reqwest::Client::new(),
                },
                &watch,
                &rx,
            ),
            _ => spawn(
                &args,
                Export {
                    pool: pool.clone(),
                    group,
                    dir: args.export_dir.clone(),
                },
                &watch,
                &rx,
            ),
        };
        tasks.push(task);
        groups.push(entry);
    }
    tokio::spawn(report_lag(
        args.kafka_bootstrap.clone(),
        groups,
        watch.clone(),
        args.lag_interval.max(Duration::from_millis(100)),
        rx.clone(),
    ));
    tokio::spawn(run_retention(
        store.clone(),
        RetentionPolicy {
            interval: args.retention_interval,
            outbox_age: args.outbox_retention,
            processed_age: args.processed_retention,
            ..RetentionPolicy::default()
        },
        rx.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!(
        "{}",
        serde_json::json!({ "event": "listening", "workers": args.only, "addr": listener.local_addr()?.to_string() })
    );
    let mut server_stop = rx.clone();
    let app = api::router(Api {
        pool,
        metrics,
        watch,
    })
    .merge(chatstream_replay::http::router(&args.kafka_bootstrap));
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.changed().await;
            })
            .await
    });
    signal.await;
    tracing::info!("stopping workers: committing handled offsets");
    let _ = tx.send(true);
    for t in tasks {
        match t.await {
            Ok(Err(e)) => tracing::error!(error = %e, "worker failed"),
            Err(e) => tracing::error!(error = %e, "worker task failed"),
            Ok(Ok(())) => {}
        }
    }
    let _ = server.await;
    Ok(())
}
