//! The node's shared state and its lifecycle: connect (lazily, so the node starts while a
//! backend is down and reports it in /readyz), spawn the background tasks (Redis link
//! prober, fan-out publisher and subscriber, outbox relay, health checks, presence), serve
//! HTTP and WebSocket (every accepted socket with TCP_NODELAY), and drain gracefully on
//! shutdown, losing no event on the way out.

use axum::serve::ListenerExt;
use chatstream_protocol::events::EventBody;
use chatstream_protocol::frames::Via;
use chatstream_protocol::{EventEnvelope, ServerFrame};
use chatstream_store::{Membership, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::config::{FanoutMode, NodeConfig, PublishMode};
use crate::events::{EventContext, EventSink};
use crate::fanout::{self, FanoutEnvelope, FanoutPublisher, LiveOrder};
use crate::hub::{Hub, Outbound};
use crate::inflight::InFlight;
use crate::kafka::{self, AsyncPublisher};
use crate::metrics as m;
use crate::redis_link::RedisLink;
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

/// Each backend's last health check (Redis's command link reports through `RedisLink`).
#[derive(Default)]
pub struct Health {
    pub postgres: AtomicBool,
    pub migrated: Arc<AtomicBool>,
    pub kafka: AtomicBool,
    pub fanout_subscribed: Arc<AtomicBool>,
    pub relay: Arc<AtomicBool>,
    /// Kafka fan-out mode: the chat-events consumer has its partitions, at fixed offsets.
    pub fanout_assigned: Arc<AtomicBool>,
}

/// Conversation memberships, cached briefly (membership rarely changes; sends are hot).
/// Nodes drop an entry when a membership change is announced on the fan-out channel; the
/// TTL bounds staleness when that announcement is lost.
type CachedMembership = (Arc<Membership>, Instant);

#[derive(Default)]
pub struct MemberCache {
    entries: Mutex<HashMap<String, CachedMembership>>,
}

const MEMBER_TTL: Duration = Duration::from_secs(5);

impl MemberCache {
    /// The conversation's membership (None: no such conversation).
    pub async fn get(
        &self,
        store: &Store,
        conversation: &str,
    ) -> Result<Option<Arc<Membership>>, chatstream_store::StoreError> {
        if let Ok(map) = self.entries.lock() {
            if let Some((members, at)) = map.get(conversation) {
                if at.elapsed() < MEMBER_TTL {
                    return Ok(Some(members.clone()));
                }
            }
        }
        self.refresh(store, conversation).await
    }

    /// Reads the membership from the database, bypassing (and updating) the cache.
    pub async fn refresh(
        &self,
        store: &Store,
        conversation: &str,
    ) -> Result<Option<Arc<Membership>>, chatstream_store::StoreError> {
        let Some(membership) = store.membership(conversation).await? else {
            self.invalidate(conversation);
            return Ok(None);
        };
        let membership = Arc::new(membership);
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > 100_000 {
                map.clear();
            }
            map.insert(
                conversation.to_string(),
                (membership.clone(), Instant::now()),
            );
        }
        Ok(Some(membership))
    }

    /// Whether `user` of `tenant` is a member; a cached "no" is checked again against the
    /// database (a member added on another node is let in at once).
    pub async fn is_member(
        &self,
        store: &Store,
        conversation: &str,
        tenant: &str,
        user: &str,
    ) -> Result<Option<Arc<Membership>>, chatstream_store::StoreError> {
        match self.get(store, conversation).await? {
            Some(m) if m.contains(tenant, user) => Ok(Some(m)),
            Some(_) => Ok(self
                .refresh(store, conversation)
                .await?
                .filter(|m| m.contains(tenant, user))),
            None => Ok(None),
        }
    }

    pub fn invalidate(&self, conversation: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(conversation);
        }
    }
}

pub struct NodeState {
    pub cfg: NodeConfig,
    pub store: Store,
    pub redis: Arc<RedisLink>,
    pub fanout: FanoutPublisher,
    pub hub: Hub,
    pub events: Arc<EventSink>,
    pub members: MemberCache,
    pub health: Health,
    pub metrics: PrometheusHandle,
    pub streams: Streams,
    pub shutdown: watch::Receiver<bool>,
    /// Tasks a draining node waits for (generators, resumes, notifications).
    pub work: InFlight,
}

impl NodeState {
    /// Queues a fan-out envelope; never waits (see `fanout`).
    pub fn fanout(&self, env: FanoutEnvelope) {
        self.fanout.publish(env);
    }

    /// Delivers a fan-out envelope to this node's connections, in the order envelopes
    /// arrive (it is called by the subscriber, one at a time), and reports DELIVERED for
    /// each recipient reached (other than the sender).
    pub fn deliver_envelope(&self, env: FanoutEnvelope) {
        if let Some(conversation) = &env.members_changed {
            self.members.invalidate(conversation);
            return;
        }
        let except = (env.origin_node == self.cfg.node_id)
            .then_some(env.origin_conn)
            .flatten();
        let frame: Outbound = Arc::from(env.frame.as_str());
        let order = env
            .live_order
            .as_ref()
            .map(|o| (o.conversation_id.as_str(), o.seq));
        let reached = self
            .hub
            .deliver(&env.tenant, &env.recipients, &frame, except, order);
        metrics::counter!(m::FANOUT_DELIVERED).increment(reached.len() as u64);
        let Some(receipt) = env.receipt else { return };
        for user in reached.into_iter().filter(|u| *u != receipt.sender_id) {
            self.report_delivered(&receipt, &user);
        }
    }

    fn report_delivered(&self, r: &fanout::Receipt, recipient: &str) {
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
            tenant: r.tenant.clone(),
            recipients: vec![r.sender_id.clone()],
            frame: status.encode(),
            live_order: None,
            receipt: None,
            members_changed: None,
        });
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
        self.events.emit_nowait(e);
    }

    /// The envelope that fans a stored message out live to its conversation's members.
    pub fn message_envelope(
        &self,
        msg: &chatstream_store::StoredMessage,
        membership: &Membership,
        origin_conn: Option<crate::hub::ConnId>,
        trace_id: &str,
    ) -> FanoutEnvelope {
        let frame = ServerFrame::Msg {
            message_id: msg.message_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            sender_id: msg.sender_id.clone(),
            body: msg.body.clone(),
            created_at_ms: msg.created_at_ms,
            trace_id: msg.trace_id.clone(),
            via: Via::Live,
        };
        FanoutEnvelope {
            origin_node: self.cfg.node_id.clone(),
            origin_conn,
            tenant: membership.tenant.clone(),
            recipients: membership.members.clone(),
            frame: frame.encode(),
            live_order: Some(LiveOrder {
                conversation_id: msg.conversation_id.clone(),
                seq: msg.seq,
            }),
            receipt: Some(fanout::Receipt {
                sender_id: msg.sender_id.clone(),
                conversation_id: msg.conversation_id.clone(),
                message_id: msg.message_id.clone(),
                seq: msg.seq,
                tenant: membership.tenant.clone(),
                trace_id: trace_id.to_string(),
            }),
            members_changed: None,
        }
    }

    /// Kafka fan-out mode: deliver a CHAT_MESSAGE event to local members.
    async fn deliver_chat_event(&self, e: EventEnvelope) {
        let EventBody::ChatMessage(msg) = &e.body else {
            return;
        };
        let membership = match self.members.get(&self.store, &msg.conversation_id).await {
            Ok(Some(m)) if m.tenant == e.tenant => m,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(error = %err, "members unavailable; kafka fan-out skipped");
                return;
            }
        };
        let stored = chatstream_store::StoredMessage {
            message_id: msg.message_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            sender_id: msg.sender_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            body: msg.body.clone(),
            trace_id: e.trace_id.clone(),
            created_at_ms: msg.created_at_ms,
        };
        let mut env = self.message_envelope(&stored, &membership, None, &e.trace_id);
        env.origin_node = e.source_node.clone();
        env.recipients.retain(|u| *u != msg.sender_id);
        self.deliver_envelope(env);
    }

    /// Whether every Redis path this node needs works: the command link (publish,
    /// presence, streams) and the fan-out subscription.
    pub fn redis_ok(&self) -> bool {
        self.redis.is_up() && self.health.fanout_subscribed.load(Ordering::Relaxed)
    }

    /// Whether this node needs Kafka: to publish (outbox relay, async sends), or to fan
    /// out (kafka mode). Publish mode `none` with Redis fan-out does not.
    pub fn needs_kafka(&self) -> bool {
        self.cfg.publish_mode != PublishMode::None || self.cfg.fanout_mode == FanoutMode::Kafka
    }

    pub fn is_ready(&self) -> bool {
        let h = &self.health;
        let relay_ok = self.cfg.publish_mode != PublishMode::Outbox
            || !self.cfg.outbox_relay
            || h.relay.load(Ordering::Relaxed);
        // A Kafka fan-out node that is not yet assigned would miss messages sent now.
        let fanout_ok =
            self.cfg.fanout_mode != FanoutMode::Kafka || h.fanout_assigned.load(Ordering::Relaxed);
        fanout_ok
            && h.postgres.load(Ordering::Relaxed)
            && h.migrated.load(Ordering::Relaxed)
            && self.redis_ok()
            && (!self.needs_kafka() || h.kafka.load(Ordering::Relaxed))
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

/// Health checks every second (Kafka every 3 s, when the node needs it), and migrations
/// once PostgreSQL answers. Redis is watched by its link's prober and the subscriber.
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
        if tick % 3 == 0 {
            if state.needs_kafka() {
                h.kafka.store(
                    check_kafka(state.cfg.kafka_bootstrap.clone()).await,
                    Ordering::Relaxed,
                );
            }
            if pg && state.cfg.publish_mode == PublishMode::Outbox {
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
/// a sorted set per user of "<node>:<conn>" scored by expiry, refreshed every 20 s and as
/// soon as the Redis link comes back (Redis may have restarted empty).
async fn run_presence(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut restored = state.redis.restored();
    loop {
        let snapshot = state.hub.snapshot();
        if !snapshot.is_empty() && state.redis.is_up() {
            let expiry = clock::now_ms() + 60_000;
            let mut pipe = redis::pipe();
            for (tenant, user, conn) in &snapshot {
                pipe.zadd(
                    presence_key(tenant, user),
                    format!("{}:{conn}", state.cfg.node_id),
                    expiry,
                )
                .ignore();
            }
            if let Err(e) = state
                .redis
                .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await
            {
                tracing::debug!(error = %e, "presence refresh failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(20)) => {}
            changed = restored.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// The presence set of `user` of `tenant`. The tenant is length-prefixed, so no pair of
/// ids can collide whatever characters they hold.
pub fn presence_key(tenant: &str, user: &str) -> String {
    format!("chatstream:presence:{}:{tenant}:{user}", tenant.len())
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
    cfg.validate()?;
    crate::sabotage::install(&cfg.sabotage);
    let mut store = Store::connect_lazy(&cfg.postgres_url, cfg.pg_max_connections)?;
    if let Some(settings) = cfg.batch_settings() {
        // Group commit of sends (conn.rs submits to it when it is there).
        store = store.with_batched_appends(settings);
    }
    let client = redis::Client::open(cfg.redis_url.as_str()).map_err(|e| NodeError::Redis {
        url: cfg.redis_url.clone(),
        message: e.to_string(),
    })?;
    // Mode `none` creates no producer at all; typing events use it in the other modes.
    let async_publisher = match cfg.publish_mode {
        PublishMode::None => None,
        PublishMode::Outbox | PublishMode::Async => {
            Some(AsyncPublisher::new(&cfg.kafka_bootstrap)?)
        }
    };
    let relay_poke = Arc::new(Notify::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let events = EventSink::new(
        cfg.publish_mode,
        cfg.node_id.clone(),
        store.clone(),
        async_publisher.clone(),
        relay_poke.clone(),
    );
    let link = RedisLink::new(client.clone());
    let (publisher, publish_queue) = fanout::publish_queue();
    let state = Arc::new(NodeState {
        streams: Streams::new(cfg.stream.clone()),
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
    tokio::spawn(run_health(state.clone(), shutdown_rx.clone()));
    tokio::spawn(run_presence(state.clone(), shutdown_rx.clone()));
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
        let s = state.clone();
        let rx = shutdown_rx.clone();
        let bootstrap = state.cfg.kafka_bootstrap.clone();
        let node_id = state.cfg.node_id.clone();
        let assigned = state.health.fanout_assigned.clone();
        tokio::spawn(async move {
            let deliver = |e: EventEnvelope| {
                let s = s.clone();
                async move { s.deliver_chat_event(e).await }
            };
            if let Err(e) =
                kafka::run_chat_consumer(bootstrap, node_id, assigned, deliver, rx).await
            {
                tracing::error!(error = %e, "kafka fan-out consumer stopped");
            }
        });
    }
    let mut final_relay = None;
    let relay = if state.cfg.publish_mode == PublishMode::Outbox && state.cfg.outbox_relay {
        let producer = kafka::reliable_producer(&state.cfg.kafka_bootstrap)?;
        final_relay = Some(producer.clone());
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
    // Nagle would hold small frames (acks, live messages) back for the peer's delayed ACK:
    // every accepted socket gets TCP_NODELAY, read back to prove it took.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY on an accepted socket");
        }
        let nodelay = tcp.nodelay().unwrap_or(false);
        metrics::counter!(m::ACCEPTED_SOCKETS, "tcp_nodelay" => if nodelay { "true" } else { "false" })
            .increment(1);
        if let Ok(peer) = tcp.peer_addr() {
            tracing::debug!(%peer, tcp_nodelay = nodelay, "accepted connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await
        .map_err(NodeError::Serve)?;
    // Work that finishes acknowledged actions (stream generators, notifications, resumes)
    // ends, then every event still queued is written to the outbox, then published.
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
    if let Some(relay) = relay {
        // The relay finishes its current batch...
        let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
    }
    if let Some(producer) = final_relay {
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
    if let Some(publisher) = async_publisher {
        let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
    }
    tracing::info!("node stopped");
    Ok(())
}
