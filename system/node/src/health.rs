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
pub(crate) async fn run_health(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
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
