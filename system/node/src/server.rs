//! The node's shared state and its lifecycle: connect (lazily, so the node starts while a
//! backend is down and reports it in /readyz), spawn the background tasks (fan-out
//! subscriber, outbox relay, health checks, presence), serve HTTP and WebSocket, and drain
//! gracefully on shutdown.

use chatstream_protocol::events::EventBody;
use chatstream_protocol::frames::Via;
use chatstream_protocol::{EventEnvelope, ServerFrame};
use chatstream_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, RwLock};

use crate::config::{FanoutMode, NodeConfig, PublishMode};
use crate::events::{EventContext, EventSink};
use crate::fanout::{self, FanoutEnvelope};
use crate::hub::{Hub, Outbound};
use crate::kafka::{self, AsyncPublisher};
use crate::metrics as m;
use crate::streams::Streams;
use crate::{clock, http};

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

/// Each backend's last health check.
#[derive(Default)]
pub struct Health {
    pub postgres: AtomicBool,
    pub migrated: Arc<AtomicBool>,
    pub redis: AtomicBool,
    pub kafka: AtomicBool,
    pub fanout_subscribed: Arc<AtomicBool>,
    pub relay: Arc<AtomicBool>,
}

/// A Redis connection that is made lazily and remade after failures.
pub struct RedisHandle {
    client: redis::Client,
    manager: RwLock<Option<ConnectionManager>>,
}

impl RedisHandle {
    pub async fn conn(&self) -> Result<ConnectionManager, String> {
        if let Some(m) = self.manager.read().await.as_ref() {
            return Ok(m.clone());
        }
        let mut slot = self.manager.write().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(2);
        let m = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(|e| format!("redis unreachable: {e}"))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }
}

/// Conversation members, cached briefly (membership rarely changes; sends are hot).
/// A conversation's members and when they were read.
type CachedMembers = (Arc<Vec<String>>, Instant);

#[derive(Default)]
pub struct MemberCache {
    entries: Mutex<HashMap<String, CachedMembers>>,
}

const MEMBER_TTL: Duration = Duration::from_secs(5);

/// Longest a Redis call on a client's path may take.
pub const REDIS_OP_TIMEOUT: Duration = Duration::from_secs(1);

impl MemberCache {
    pub async fn get(
        &self,
        store: &Store,
        conversation: &str,
    ) -> Result<Arc<Vec<String>>, chatstream_store::StoreError> {
        if let Ok(map) = self.entries.lock() {
            if let Some((members, at)) = map.get(conversation) {
                if at.elapsed() < MEMBER_TTL {
                    return Ok(members.clone());
                }
            }
        }
        let members = Arc::new(store.members(conversation).await?);
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > 100_000 {
                map.clear();
            }
            map.insert(conversation.to_string(), (members.clone(), Instant::now()));
        }
        Ok(members)
    }
}

pub struct NodeState {
    pub cfg: NodeConfig,
    pub store: Store,
    pub redis: RedisHandle,
    pub hub: Hub,
    pub events: Arc<EventSink>,
    pub members: MemberCache,
    pub health: Health,
    pub metrics: PrometheusHandle,
    pub streams: Streams,
    pub shutdown: watch::Receiver<bool>,
}

impl NodeState {
    /// Publishes a fan-out envelope; failures are counted and logged (clients resync).
    /// Bounded in time: a dead Redis must not hold up the connection that sent.
    pub async fn fanout(&self, env: FanoutEnvelope) {
        let publish = async {
            let mut c = self.redis.conn().await?;
            fanout::publish(&mut c, &env).await
        };
        let result = tokio::time::timeout(REDIS_OP_TIMEOUT, publish)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {REDIS_OP_TIMEOUT:?}")));
        if let Err(e) = result {
            metrics::counter!(m::FANOUT_FAILED).increment(1);
            tracing::warn!(error = %e, "fan-out failed; recipients will catch up by sync");
        }
    }

    /// Delivers a fan-out envelope to this node's connections, and reports DELIVERED for
    /// each recipient reached (other than the sender).
    pub async fn deliver_envelope(self: &Arc<Self>, env: FanoutEnvelope) {
        let except = (env.origin_node == self.cfg.node_id)
            .then_some(env.origin_conn)
            .flatten();
        let frame: Outbound = Arc::from(env.frame.as_str());
        let reached = self.hub.deliver(&env.recipients, &frame, except);
        metrics::counter!(m::FANOUT_DELIVERED).increment(reached.len() as u64);
        let Some(receipt) = env.receipt else { return };
        for user in reached.into_iter().filter(|u| *u != receipt.sender_id) {
            self.report_delivered(&receipt, &user).await;
        }
    }

    async fn report_delivered(self: &Arc<Self>, r: &fanout::Receipt, recipient: &str) {
        let now = clock::now_ms();
        let status = ServerFrame::Status {
            conversation_id: r.conversation_id.clone(),
            message_id: Some(r.message_id.clone()),
            seq: r.seq,
            user_id: recipient.to_string(),
            status: chatstream_protocol::frames::MessageStatus::Delivered,
            ts_ms: now,
        };
        self.fanout(FanoutEnvelope {
            origin_node: self.cfg.node_id.clone(),
            origin_conn: None,
            recipients: vec![r.sender_id.clone()],
            frame: status.encode(),
            receipt: None,
        })
        .await;
        let ctx = EventContext {
            tenant: r.tenant.clone(),
            trace_id: r.trace_id.clone(),
            conversation_id: Some(r.conversation_id.clone()),
            user_id: Some(recipient.to_string()),
            message_id: Some(r.message_id.clone()),
            ..Default::default()
        };
        let e = self.events.envelope(
            &ctx,
            EventBody::MessageStatus(chatstream_protocol::events::MessageStatusChanged {
                message_id: Some(r.message_id.clone()),
                conversation_id: r.conversation_id.clone(),
                seq: r.seq,
                user_id: recipient.to_string(),
                status: chatstream_protocol::frames::MessageStatus::Delivered,
            }),
        );
        self.events.emit(e).await;
    }

    /// Kafka fan-out mode: deliver a CHAT_MESSAGE event to local members.
    async fn deliver_chat_event(self: &Arc<Self>, e: EventEnvelope) {
        let EventBody::ChatMessage(msg) = &e.body else {
            return;
        };
        let members = match self.members.get(&self.store, &msg.conversation_id).await {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(error = %err, "members unavailable; kafka fan-out skipped");
                return;
            }
        };
        let frame = ServerFrame::Msg {
            message_id: msg.message_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            sender_id: msg.sender_id.clone(),
            body: msg.body.clone(),
            created_at_ms: msg.created_at_ms,
            trace_id: e.trace_id.clone(),
            via: Via::Live,
        };
        let env = FanoutEnvelope {
            origin_node: e.source_node.clone(),
            origin_conn: None,
            recipients: members
                .iter()
                .filter(|u| **u != msg.sender_id)
                .cloned()
                .collect(),
            frame: frame.encode(),
            receipt: Some(fanout::Receipt {
                sender_id: msg.sender_id.clone(),
                conversation_id: msg.conversation_id.clone(),
                message_id: msg.message_id.clone(),
                seq: msg.seq,
                tenant: e.tenant.clone(),
                trace_id: e.trace_id.clone(),
            }),
        };
        self.deliver_envelope(env).await;
    }

    pub fn is_ready(&self) -> bool {
        let h = &self.health;
        let relay_ok = self.cfg.publish_mode != PublishMode::Outbox
            || !self.cfg.outbox_relay
            || h.relay.load(Ordering::Relaxed);
        h.postgres.load(Ordering::Relaxed)
            && h.migrated.load(Ordering::Relaxed)
            && h.redis.load(Ordering::Relaxed)
            && h.kafka.load(Ordering::Relaxed)
            && h.fanout_subscribed.load(Ordering::Relaxed)
            && relay_ok
    }
}

async fn check_kafka(bootstrap: String) -> bool {
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: Result<BaseConsumer, _> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("socket.timeout.ms", "2000")
            .create();
        c.ok()
            .and_then(|c| {
                c.fetch_metadata(Some("chat-events"), Duration::from_secs(2))
                    .ok()
            })
            .is_some_and(|md| !md.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}

/// Health checks every second (Kafka every 3 s), and migrations once PostgreSQL answers.
async fn run_health(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = 0u64;
    loop {
        let h = &state.health;
        let pg = state.store.ping().await.is_ok();
        h.postgres.store(pg, Ordering::Relaxed);
        if pg && !h.migrated.load(Ordering::Relaxed) {
            match state.store.migrate().await {
                Ok(()) => {
                    h.migrated.store(true, Ordering::Relaxed);
                    tracing::info!("database migrated");
                }
                Err(e) => tracing::error!(error = %e, "migration failed"),
            }
        }
        let redis_ok = match state.redis.conn().await {
            Ok(mut c) => redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            Err(_) => false,
        };
        h.redis.store(redis_ok, Ordering::Relaxed);
        if tick % 3 == 0 {
            h.kafka.store(
                check_kafka(state.cfg.kafka_bootstrap.clone()).await,
                Ordering::Relaxed,
            );
            if pg {
                if let Ok(n) = state.store.outbox_backlog().await {
                    metrics::gauge!(m::OUTBOX_BACKLOG).set(n as f64);
                }
            }
        }
        metrics::gauge!(m::CONNECTIONS).set(state.hub.connection_count() as f64);
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Keeps this node's connected users marked online in Redis (for offline notifications):
/// a sorted set per user of "<node>:<conn>" scored by expiry, refreshed every 20 s.
async fn run_presence(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let snapshot = state.hub.snapshot();
        if !snapshot.is_empty() {
            if let Ok(mut c) = state.redis.conn().await {
                let expiry = clock::now_ms() + 60_000;
                let mut pipe = redis::pipe();
                for (user, conn) in &snapshot {
                    pipe.zadd(
                        presence_key(user),
                        format!("{}:{conn}", state.cfg.node_id),
                        expiry,
                    )
                    .ignore();
                }
                let _: redis::RedisResult<()> = pipe.query_async(&mut c).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(20)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

pub fn presence_key(user: &str) -> String {
    format!("chatstream:presence:{user}")
}

/// Runs a node on `listener` until `signal` resolves, then drains: connections are told
/// to reconnect elsewhere and closed, in-flight work finishes, producers flush.
pub async fn run(
    cfg: NodeConfig,
    listener: TcpListener,
    metrics: PrometheusHandle,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    cfg.validate()?;
    let store = Store::connect_lazy(&cfg.postgres_url, cfg.pg_max_connections)?;
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| NodeError::Redis {
        url: cfg.redis_url.clone(),
        message: e.to_string(),
    })?;
    let async_publisher = AsyncPublisher::new(&cfg.kafka_bootstrap)?;
    let relay_poke = Arc::new(Notify::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let events = EventSink::new(
        cfg.publish_mode,
        cfg.node_id.clone(),
        store.clone(),
        async_publisher.clone(),
        relay_poke.clone(),
    );
    let state = Arc::new(NodeState {
        streams: Streams::new(cfg.stream.clone()),
        cfg,
        store: store.clone(),
        redis: RedisHandle {
            client: client.clone(),
            manager: RwLock::new(None),
        },
        hub: Hub::default(),
        events,
        members: MemberCache::default(),
        health: Health::default(),
        metrics,
        shutdown: shutdown_rx.clone(),
    });

    tokio::spawn(run_health(state.clone(), shutdown_rx.clone()));
    tokio::spawn(run_presence(state.clone(), shutdown_rx.clone()));
    {
        let s = state.clone();
        let connected = state.health.fanout_subscribed.clone();
        let rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let deliverer = s.clone();
            fanout::run_subscriber(
                client,
                connected,
                move |env| {
                    let d = deliverer.clone();
                    tokio::spawn(async move { d.deliver_envelope(env).await });
                },
                rx,
            )
            .await;
        });
    }
    if state.cfg.fanout_mode == FanoutMode::Kafka {
        let s = state.clone();
        let rx = shutdown_rx.clone();
        let bootstrap = state.cfg.kafka_bootstrap.clone();
        let node_id = state.cfg.node_id.clone();
        tokio::spawn(async move {
            let deliver = |e: EventEnvelope| {
                let s = s.clone();
                async move { s.deliver_chat_event(e).await }
            };
            if let Err(e) = kafka::run_chat_consumer(bootstrap, node_id, deliver, rx).await {
                tracing::error!(error = %e, "kafka fan-out consumer stopped");
            }
        });
    }
    let relay = if state.cfg.publish_mode == PublishMode::Outbox && state.cfg.outbox_relay {
        let producer = kafka::reliable_producer(&state.cfg.kafka_bootstrap)?;
        let s = state.clone();
        let rx = shutdown_rx.clone();
        let poke = relay_poke.clone();
        let healthy = state.health.relay.clone();
        healthy.store(true, Ordering::Relaxed);
        Some(tokio::spawn(kafka::run_relay(
            s.store.clone(),
            s.health.migrated.clone(),
            producer,
            s.cfg.relay_batch,
            poke,
            healthy,
            rx,
        )))
    } else {
        None
    };

    let app = http::router(state.clone());
    let drain_state = state.clone();
    let drain_timeout = Duration::from_millis(state.cfg.drain_timeout_ms);
    tracing::info!(node = %state.cfg.node_id, addr = ?listener.local_addr().ok(), publish = ?state.cfg.publish_mode, fanout = ?state.cfg.fanout_mode, "chatstream node serving");
    let graceful = async move {
        signal.await;
        tracing::info!("shutdown requested: draining connections");
        let _ = shutdown_tx.send(true);
        let deadline = Instant::now() + drain_timeout;
        while drain_state.hub.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await
        .map_err(NodeError::Serve)?;
    if let Some(relay) = relay {
        // The relay finishes its current batch; rows it did not publish stay for the others.
        let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
    }
    let publisher = async_publisher.clone();
    let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
    tracing::info!("node stopped");
    Ok(())
}
