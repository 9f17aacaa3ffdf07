//! The node's shared state: the one `NodeState` every handler, connection and background
//! task holds (configuration, backends, hub, caches, health flags, shutdown signal). It
//! depends only on the node's leaf parts, never on what serves or drives it, so the
//! connection loop, the commands, the HTTP API and the stream sessions can all use it
//! without importing each other.

use chatstream_store::{Membership, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

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
///
/// An entry is read again in the background some time after it was fetched (a random time
/// between half and 95% of the TTL), and served meanwhile: a busy conversation never waits
/// for its membership, and entries fetched together (a node's first second of traffic) do
/// not all fall due at the same moment. Only an entry nobody read for a whole TTL is
/// fetched while a sender waits. At most [`BACKGROUND_READS`] background reads run at a
/// time: the pool hands out connections first come, first served, so a crowd of them
/// would queue the append batchers behind it. Before this, every entry a burst of traffic
/// had filled expired together every 5 s and that moment's sends queued behind a thousand
/// membership reads (the node bench's p99 spiked every 5 s).
pub struct MemberCache {
    entries: Arc<Mutex<HashMap<String, CachedMembership>>>,
    /// Bumped by every invalidation: a read that started before one does not cache what
    /// it read (it may predate the change that was announced).
    invalidations: Arc<AtomicU64>,
    background_reads: Arc<Semaphore>,
}

impl Default for MemberCache {
    fn default() -> Self {
        MemberCache {
            entries: Arc::default(),
            invalidations: Arc::default(),
            background_reads: Arc::new(Semaphore::new(BACKGROUND_READS)),
        }
    }
}

struct CachedMembership {
    members: Arc<Membership>,
    fetched: Instant,
    /// When a read should fetch it again in the background.
    refresh_at: Instant,
    refreshing: bool,
}

const MEMBER_TTL: Duration = Duration::from_secs(5);
/// Background membership reads in flight at most (each holds a pooled connection).
const BACKGROUND_READS: usize = 2;
/// Entries held at most; past this the cache starts over.
const MEMBER_ENTRIES: usize = 100_000;

impl CachedMembership {
    fn new(members: Arc<Membership>) -> CachedMembership {
        let fetched = Instant::now();
        let refresh_after = MEMBER_TTL.mul_f64(rand::random_range(0.5..0.95));
        CachedMembership {
            members,
            fetched,
            refresh_at: fetched + refresh_after,
            refreshing: false,
        }
    }
}

impl MemberCache {
    /// The conversation's membership (None: no such conversation).
    pub async fn get(
        &self,
        store: &Store,
        conversation: &str,
    ) -> Result<Option<Arc<Membership>>, chatstream_store::StoreError> {
        if let Some(members) = self.cached(store, conversation) {
            return Ok(Some(members));
        }
        self.refresh(store, conversation).await
    }

    /// A fresh enough cached entry, starting its background refresh when one is due.
    fn cached(&self, store: &Store, conversation: &str) -> Option<Arc<Membership>> {
        let mut map = self.entries.lock().ok()?;
        let entry = map.get_mut(conversation)?;
        let now = Instant::now();
        if now.duration_since(entry.fetched) >= MEMBER_TTL {
            return None;
        }
        let permit = (now >= entry.refresh_at && !entry.refreshing)
            .then(|| self.background_reads.clone().try_acquire_owned().ok())
            .flatten();
        // No permit: served as it is; a later read starts the refresh.
        if let Some(permit) = permit {
            entry.refreshing = true;
            let (store, entries, invalidations) = (
                store.clone(),
                self.entries.clone(),
                self.invalidations.clone(),
            );
            let conversation = conversation.to_string();
            tokio::spawn(async move {
                let epoch = invalidations.load(Ordering::Acquire);
                let read = store.membership(&conversation).await;
                drop(permit);
                let Ok(mut map) = entries.lock() else { return };
                match read {
                    Ok(Some(m)) if invalidations.load(Ordering::Acquire) == epoch => {
                        map.insert(conversation, CachedMembership::new(Arc::new(m)));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        map.remove(&conversation);
                    }
                    // Served until its TTL; the next read after that fetches it itself.
                    Err(e) => {
                        tracing::debug!(error = %e, conversation, "membership refresh failed");
                        if let Some(entry) = map.get_mut(&conversation) {
                            entry.refreshing = false;
                        }
                    }
                }
            });
        }
        Some(entry.members.clone())
    }

    /// Reads the membership from the database, bypassing (and updating) the cache.
    pub async fn refresh(
        &self,
        store: &Store,
        conversation: &str,
    ) -> Result<Option<Arc<Membership>>, chatstream_store::StoreError> {
        let epoch = self.invalidations.load(Ordering::Acquire);
        let Some(membership) = store.membership(conversation).await? else {
            self.invalidate(conversation);
            return Ok(None);
        };
        let membership = Arc::new(membership);
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > MEMBER_ENTRIES {
                map.clear();
            }
            if self.invalidations.load(Ordering::Acquire) == epoch {
                map.insert(
                    conversation.to_string(),
                    CachedMembership::new(membership.clone()),
                );
            }
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
        self.invalidations.fetch_add(1, Ordering::AcqRel);
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
