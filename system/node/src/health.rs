//! Health: each backend's checks (PostgreSQL every second, with migrations once it
//! answers; Kafka every 3 s when the node needs it) and the readiness /readyz reports,
//! which holds only when every path a send takes works.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::config::{FanoutMode, PublishMode};
use crate::metrics as m;
use crate::state::NodeState;

impl NodeState {
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

/// The Kafka health check's client, kept for the node's life: a new client per check
/// (every 3 s) cost each broker a connection, an API-version exchange and a metadata
/// request, and the node a set of librdkafka threads, every time.
type KafkaProbe = Arc<rdkafka::consumer::BaseConsumer>;

fn kafka_probe(bootstrap: &str) -> Option<KafkaProbe> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("socket.timeout.ms", "2000")
        // Back within a second of the brokers' return (librdkafka's default backs off to 10 s).
        .set("reconnect.backoff.max.ms", "1000")
        .create()
        .map_err(|e| tracing::warn!(error = %e, "cannot create the Kafka health probe"))
        .ok()
        .map(Arc::new)
}

async fn check_kafka(probe: KafkaProbe) -> bool {
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        probe
            .fetch_metadata(Some("chat-events"), Duration::from_secs(2))
            .is_ok_and(|md| !md.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}

/// Health checks every second (Kafka every 3 s, when the node needs it), and migrations
/// once PostgreSQL answers. Redis is watched by its link's prober and the subscriber.
pub(crate) async fn run_health(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = 0u64;
    let mut probe: Option<KafkaProbe> = None;
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
                if probe.is_none() {
                    probe = kafka_probe(&state.cfg.kafka_bootstrap);
                }
                let ok = match &probe {
                    Some(p) => check_kafka(p.clone()).await,
                    None => false,
                };
                h.kafka.store(ok, Ordering::Relaxed);
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
