//! The node's shared state: the one `NodeState` every handler, connection and background
//! task holds (configuration, backends, hub, caches, health flags, shutdown signal). It
//! depends only on the node's leaf parts, never on what serves or drives it, so the
//! connection loop, the commands, the HTTP API and the stream sessions can all use it
//! without importing each other.

use chatstream_store::{Membership, Store, StoreError};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Notify};

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
/// An entry read when it is older than half the TTL is queued for a background read, and
/// served meanwhile; one refresher task reads what is queued every [`REFRESH_TICK`], many
/// conversations in one statement. So a busy conversation never waits for its membership,
/// and the entries a burst of traffic filled together are read again together in one
/// statement, on one pooled connection. Only an entry nobody read for a whole TTL (or never)
/// is fetched while a sender waits. Before this, every entry such a burst had filled expired
/// together every 5 s, and that moment's sends queued for the pool behind a thousand
/// membership reads (the node bench's p99 at 10,000/s spiked every 5 s).
///
/// Those reads a sender waits for (a cold or expired entry, or [`MemberCache::refresh`])
/// are made by one loader task: each of its statements reads every conversation asked for
/// since the last one began, so a thousand senders arriving at once (a node's first
/// second, a reconnect storm) cost a few statements on one connection, not a thousand on
/// the pool the append batchers share. A waiter is answered by a read that began after
/// it asked.
#[derive(Default)]
pub struct MemberCache {
    shared: Arc<CacheShared>,
}

#[derive(Default)]
struct CacheShared {
    inner: Mutex<CacheInner>,
    /// Bumped by every invalidation: a read that started before one does not cache what
    /// it read (it may predate the change that was announced).
    invalidations: AtomicU64,
    refresher_started: AtomicBool,
    loader_started: AtomicBool,
    /// Wakes the loader when a sender asks for a conversation.
    loader_wake: Arc<Notify>,
}

/// A membership as a sender waits for it (None: no such conversation).
type Loaded = Result<Option<Arc<Membership>>, StoreError>;

#[derive(Default)]
struct CacheInner {
    entries: HashMap<String, CachedMembership>,
    /// Conversations queued for the refresher.
    due: Vec<String>,
    /// Conversations senders wait for, with their waiters, for the loader's next read.
    wanted: HashMap<String, Vec<oneshot::Sender<Loaded>>>,
}

struct CachedMembership {
    members: Arc<Membership>,
    fetched: Instant,
    queued: bool,
}

const MEMBER_TTL: Duration = Duration::from_secs(5);
/// How often the refresher reads what is queued.
const REFRESH_TICK: Duration = Duration::from_millis(200);
/// Conversations per refresher statement.
const REFRESH_CHUNK: usize = 500;
/// A loader statement not answered within this has met a black-holed link: its waiters
/// are refused (they retry), and the loader goes on with the next read.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries held at most; past this the cache starts over.
const MEMBER_ENTRIES: usize = 100_000;

impl CachedMembership {
    fn new(members: Arc<Membership>) -> CachedMembership {
        CachedMembership {
            members,
            fetched: Instant::now(),
            queued: false,
        }
    }
}

impl CacheShared {
    /// Caches `read` for each conversation of `ids` (absent: the conversation is gone),
    /// unless a membership change was announced since `epoch`.
    fn store_reads(&self, ids: &[String], mut read: HashMap<String, Membership>, epoch: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let current = self.invalidations.load(Ordering::Acquire) == epoch;
        for id in ids {
            match read.remove(id) {
                Some(m) if current => {
                    inner
                        .entries
                        .insert(id.clone(), CachedMembership::new(Arc::new(m)));
                }
                None if current => {
                    inner.entries.remove(id);
                }
                // Queued again by its next read.
                _ => unqueue(&mut inner, id),
            }
        }
    }

    /// Caches what the loader read for `ids` (unless a membership change was announced
    /// since `epoch`) and returns each one's answer; a conversation not found is gone, and
    /// dropped as an announced change would drop it.
    fn store_loaded(
        &self,
        ids: &[String],
        mut read: HashMap<String, Membership>,
        epoch: u64,
    ) -> Vec<Option<Arc<Membership>>> {
        let answers: Vec<Option<Arc<Membership>>> =
            ids.iter().map(|id| read.remove(id).map(Arc::new)).collect();
        let mut gone = false;
        if let Ok(mut inner) = self.inner.lock() {
            if inner.entries.len() > MEMBER_ENTRIES {
                inner.entries.clear();
            }
            let current = self.invalidations.load(Ordering::Acquire) == epoch;
            for (id, answer) in ids.iter().zip(&answers) {
                match answer {
                    Some(m) if current => {
                        inner
                            .entries
                            .insert(id.clone(), CachedMembership::new(m.clone()));
                    }
                    Some(_) => {}
                    None => {
                        inner.entries.remove(id);
                        gone = true;
                    }
                }
            }
        }
        if gone {
            // A read in flight may have found it still there: it must not cache that.
            self.invalidations.fetch_add(1, Ordering::AcqRel);
        }
        answers
    }

    /// Lets the next read of each of `ids` queue it again.
    fn unqueue_all(&self, ids: &[String]) {
        if let Ok(mut inner) = self.inner.lock() {
            for id in ids {
                unqueue(&mut inner, id);
            }
        }
    }
}

fn unqueue(inner: &mut CacheInner, id: &str) {
    if let Some(entry) = inner.entries.get_mut(id) {
        entry.queued = false;
    }
}

/// Reads the queued memberships every tick, until the cache is dropped.
async fn refresh_memberships(shared: Weak<CacheShared>, store: Store) {
    loop {
        tokio::time::sleep(REFRESH_TICK).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let due = match shared.inner.lock() {
            Ok(mut inner) => std::mem::take(&mut inner.due),
            Err(_) => return,
        };
        for ids in due.chunks(REFRESH_CHUNK) {
            let epoch = shared.invalidations.load(Ordering::Acquire);
            match store.memberships(ids).await {
                Ok(read) => shared.store_reads(ids, read, epoch),
                // Served until their TTL; a read after that fetches them itself.
                Err(e) => {
                    tracing::debug!(error = %e, conversations = ids.len(), "membership refresh failed");
                    shared.unqueue_all(ids);
                }
            }
        }
    }
}

/// Reads what senders wait for, as soon as they ask, until the cache is dropped: each
/// statement takes every conversation asked for since the last one began.
async fn load_memberships(shared: Weak<CacheShared>, wake: Arc<Notify>, store: Store) {
    loop {
        let wanted = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let Ok(mut inner) = shared.inner.lock() else {
                return;
            };
            std::mem::take(&mut inner.wanted)
        };
        if wanted.is_empty() {
            // A request made since the take left a permit: this returns at once.
            wake.notified().await;
            continue;
        }
        let mut wanted = wanted;
        let ids: Vec<String> = wanted.keys().cloned().collect();
        for ids in ids.chunks(REFRESH_CHUNK) {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let epoch = shared.invalidations.load(Ordering::Acquire);
            let read = tokio::time::timeout(LOAD_TIMEOUT, store.memberships(ids))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "a membership read was not answered within {LOAD_TIMEOUT:?}"
                    )))
                });
            match read {
                Ok(read) => {
                    let answers = shared.store_loaded(ids, read, epoch);
                    for (id, answer) in ids.iter().zip(answers) {
                        for waiter in wanted.remove(id).unwrap_or_default() {
                            let _ = waiter.send(Ok(answer.clone()));
                        }
                    }
                }
                Err(e) => {
                    for id in ids {
                        for waiter in wanted.remove(id).unwrap_or_default() {
                            let _ = waiter.send(Err(e.shared()));
                        }
                    }
                }
            }
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

    /// A fresh enough cached entry, queued for the refresher once it is half its TTL old.
    fn cached(&self, store: &Store, conversation: &str) -> Option<Arc<Membership>> {
        let mut inner = self.shared.inner.lock().ok()?;
        let CacheInner { entries, due, .. } = &mut *inner;
        let entry = entries.get_mut(conversation)?;
        let age = entry.fetched.elapsed();
        if age >= MEMBER_TTL {
            return None;
        }
        if age >= MEMBER_TTL / 2 && !entry.queued {
            entry.queued = true;
            due.push(conversation.to_string());
            if !self.shared.refresher_started.swap(true, Ordering::AcqRel) {
                tokio::spawn(refresh_memberships(
                    Arc::downgrade(&self.shared),
                    store.clone(),
                ));
            }
        }
        Some(entry.members.clone())
    }

    /// Reads the membership from the database, bypassing (and updating) the cache: through
    /// the loader, with whatever else senders are waiting for.
    pub async fn refresh(&self, store: &Store, conversation: &str) -> Loaded {
        let (waiter, answer) = oneshot::channel();
        match self.shared.inner.lock() {
            Ok(mut inner) => inner
                .wanted
                .entry(conversation.to_string())
                .or_default()
                .push(waiter),
            Err(_) => {
                return Err(StoreError::Failed(
                    "the membership cache is poisoned".into(),
                ))
            }
        }
        if !self.shared.loader_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(load_memberships(
                Arc::downgrade(&self.shared),
                self.shared.loader_wake.clone(),
                store.clone(),
            ));
        }
        self.shared.loader_wake.notify_one();
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the membership loader stopped before answering".into(),
            ))
        })
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
        self.shared.invalidations.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut inner) = self.shared.inner.lock() {
            inner.entries.remove(conversation);
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
