//! The node's shared state: the one `NodeState` every handler, connection and background
//! task holds (configuration, backends, hub, caches, health flags, shutdown signal). It
//! depends only on the node's leaf parts, never on what serves or drives it, so the
//! connection loop, the commands, the HTTP API and the stream sessions can all use it
//! without importing each other.

use chatstream_store::{Membership, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::events::EventSink;
use crate::fanout::FanoutPublisher;
use crate::generator::Generator;
use crate::hub::Hub;
use crate::inflight::InFlight;
use crate::redis_link::RedisLink;

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
    pub generator: Generator,
    pub shutdown: watch::Receiver<bool>,
    /// Tasks a draining node waits for (generators, resumes, notifications).
    pub work: InFlight,
}
