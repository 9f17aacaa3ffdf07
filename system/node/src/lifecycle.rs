//! The node's lifecycle: start (connect lazily, so the node starts while a backend is
//! down and reports it in /readyz; spawn the background tasks), serve until the signal,
//! then drain and stop without losing an event on the way out. What the background tasks
//! do lives in their own modules (`delivery`, `presence`, `health`, `fanout`, `kafka`).

use chatstream_protocol::EventEnvelope;
use chatstream_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::FutureProducer;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{FanoutMode, NodeConfig, PublishMode};
use crate::direct::DirectPublisher;
use crate::events::EventSink;
use crate::fanout;
use crate::generator::Generator;
use crate::hub::Hub;
use crate::inflight::InFlight;
use crate::kafka::{self, AsyncPublisher};
use crate::redis_link::RedisLink;
use crate::state::{Health, MemberCache, NodeState};
use crate::{health, http, presence, server};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("postgres: {0}")]
    Store(#[from] chatstream_store::StoreError),
    #[error("redis URL {url}: {message}")]
    Redis { url: String, message: String },
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaError),
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

/// A started node: its state, and what stopping it has to finish.
struct Started {
    state: Arc<NodeState>,
    /// The outbox relay's task and producer (outbox mode with the relay on).
    relay: Option<(JoinHandle<()>, FutureProducer)>,
    async_publisher: Option<AsyncPublisher>,
}

/// Runs a node on `listener` until `signal` resolves, then drains: connections are told
/// to reconnect elsewhere and closed, in-flight work finishes (stream generators,
/// resumes, notifications), queued events are written to the outbox and every outbox row
/// this node wrote is published before it returns, producers flush.
pub async fn run(
    cfg: NodeConfig,
    listener: TcpListener,
    metrics: PrometheusHandle,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let (started, shutdown) = start(cfg, metrics)?;
    let state = started.state.clone();
    let drain_timeout = Duration::from_millis(state.cfg.drain_timeout_ms);
    tracing::info!(node = %state.cfg.node_id, addr = ?listener.local_addr().ok(), publish = ?state.cfg.publish_mode, fanout = ?state.cfg.fanout_mode, "chatstream node serving");
    let drain_state = state.clone();
    // The sender lives in (and is dropped with) the graceful future: once the server has
    // stopped, tasks still waiting for a shutdown change see the channel closed.
    let graceful = async move {
        signal.await;
        drain(&drain_state, &shutdown, drain_timeout).await;
    };
    server::serve(listener, http::router(state), graceful)
        .await
        .map_err(NodeError::Serve)?;
    stop(started, drain_timeout).await;
    Ok(())
}

/// Builds the node's state and spawns its background tasks. Nothing here waits for a
/// backend: each connects on first use, and health reports what is down. The sender
/// returned tells every task to shut down.
fn start(
    cfg: NodeConfig,
    metrics: PrometheusHandle,
) -> Result<(Started, watch::Sender<bool>), NodeError> {
    cfg.validate()?;
    crate::sabotage::install(&cfg.sabotage);
    let mut store = Store::connect_lazy(&cfg.postgres_url, cfg.pg_max_connections, &cfg.node_id)?;
    if let Some(settings) = cfg.batch_settings() {
        // Group commit of sends (the send command submits to it when it is there).
        store = store.with_batched_appends(settings);
    }
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| NodeError::Redis {
        url: cfg.redis_url.clone(),
        message: e.to_string(),
    })?;
    // Mode `none` creates no producer at all; typing events use it in the other modes.
    let async_publisher = match cfg.publish_mode {
        PublishMode::None => None,
        PublishMode::Outbox | PublishMode::Async => Some(AsyncPublisher::new(
            &cfg.kafka_bootstrap,
            cfg.kafka_linger(),
        )?),
    };
    // Outbox mode's reliable producers: the relay's, and DELIVERED receipts' (direct). Each
    // keeps one batch in flight; sharing one producer let the two overlap on a partition,
    // which the idempotent producer serves by spinning (see `direct`).
    let reliable = match cfg.publish_mode {
        PublishMode::Outbox => Some(kafka::reliable_producer(
            &cfg.kafka_bootstrap,
            cfg.kafka_linger(),
        )?),
        PublishMode::Async | PublishMode::None => None,
    };
    let direct = match cfg.publish_mode {
        PublishMode::Outbox => {
            let producer = kafka::reliable_producer(&cfg.kafka_bootstrap, cfg.kafka_linger())?;
            let (to_outbox, refused) = tokio::sync::mpsc::unbounded_channel();
            Some((
                DirectPublisher::start(producer, &cfg.node_id, to_outbox),
                refused,
            ))
        }
        PublishMode::Async | PublishMode::None => None,
    };
    let relay_poke = Arc::new(Notify::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let events = EventSink::new(
        cfg.publish_mode,
        cfg.node_id.clone(),
        store.clone(),
        async_publisher.clone(),
        direct,
        relay_poke.clone(),
    );
    let link = RedisLink::new(client.clone());
    let (publisher, publish_queue) = fanout::publish_queue();
    let state = Arc::new(NodeState {
        generator: Generator::new(cfg.stream.clone()),
        hub: Hub::new(cfg.max_unsent_bytes),
        cfg,
        store: store.clone(),
        redis: link.clone(),
        fanout: publisher,
        events,
        members: MemberCache::default(),
        health: Health::default(),
        metrics,
        shutdown: shutdown_rx.clone(),
        work: InFlight::default(),
    });

    tokio::spawn(link.clone().run_prober(shutdown_rx.clone()));
    tokio::spawn(fanout::run_publisher(
        link.clone(),
        publish_queue,
        shutdown_rx.clone(),
    ));
    tokio::spawn(health::run_health(state.clone(), shutdown_rx.clone()));
    tokio::spawn(presence::run_presence(state.clone(), shutdown_rx.clone()));
    {
        let s = state.clone();
        let connected = state.health.fanout_subscribed.clone();
        let rx = shutdown_rx.clone();
        tokio::spawn(fanout::run_subscriber(
            client,
            connected,
            move |env| s.deliver_envelope(env),
            rx,
        ));
    }
    if state.cfg.fanout_mode == FanoutMode::Kafka {
        spawn_kafka_fanout(&state, shutdown_rx.clone());
    }
    let relay = if let Some(producer) = reliable.filter(|_| state.cfg.outbox_relay) {
        let healthy = state.health.relay.clone();
        healthy.store(true, Ordering::Relaxed);
        let task = tokio::spawn(kafka::run_relay(
            state.store.clone(),
            state.health.migrated.clone(),
            producer.clone(),
            kafka::RelayPace {
                batch: state.cfg.relay_batch,
                pass_every: Duration::from_millis(state.cfg.relay_pass_every_ms),
            },
            relay_poke,
            healthy,
            shutdown_rx,
        ));
        Some((task, producer))
    } else {
        None
    };
    let started = Started {
        state,
        relay,
        async_publisher,
    };
    Ok((started, shutdown_tx))
}

/// Kafka fan-out mode: every node consumes chat-events and delivers to its own members.
fn spawn_kafka_fanout(state: &Arc<NodeState>, shutdown: watch::Receiver<bool>) {
    let s = state.clone();
    let bootstrap = state.cfg.kafka_bootstrap.clone();
    let node_id = state.cfg.node_id.clone();
    let assigned = state.health.fanout_assigned.clone();
    tokio::spawn(async move {
        let deliver = |e: EventEnvelope| {
            let s = s.clone();
            async move { s.deliver_chat_event(e).await }
        };
        if let Err(e) =
            kafka::run_chat_consumer(bootstrap, node_id, assigned, deliver, shutdown).await
        {
            tracing::error!(error = %e, "kafka fan-out consumer stopped");
        }
    });
}

/// The first half of shutting down, while the server still runs: every connection is
/// told to reconnect elsewhere, and the node waits (bounded) until they are gone.
async fn drain(state: &NodeState, shutdown: &watch::Sender<bool>, drain_timeout: Duration) {
    tracing::info!("shutdown requested: draining connections");
    let _ = shutdown.send(true);
    let deadline = Instant::now() + drain_timeout;
    while state.hub.connection_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The second half, once the server stopped: work that finishes acknowledged actions
/// (stream generators, notifications, resumes) ends, then every event still queued is
/// written to the outbox, then published.
async fn stop(started: Started, drain_timeout: Duration) {
    let state = started.state;
    let deadline = tokio::time::Instant::now() + drain_timeout.max(Duration::from_secs(1));
    if !state.work.idle(deadline).await {
        tracing::warn!(
            running = state.work.running(),
            "drain timeout: tasks still running (their streams can be resumed on another node)"
        );
    }
    if !state.events.flush(Duration::from_secs(10)).await {
        tracing::error!("queued events could not be written to the outbox (postgres away?)");
    }
    if let Some((relay, producer)) = started.relay {
        // The relay finishes its current batch...
        let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
        // ...then everything this node wrote is published before it exits (rows it could
        // not publish stay for the other nodes' relays).
        let left = kafka::drain_outbox(
            &state.store,
            &producer,
            state.cfg.relay_batch,
            &state.cfg.node_id,
            Duration::from_secs(15),
        )
        .await;
        if left > 0 {
            tracing::warn!(left, "outbox rows of this node left for the other relays");
        }
    }
    if let Some(publisher) = started.async_publisher {
        let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
    }
    tracing::info!("node stopped");
}
