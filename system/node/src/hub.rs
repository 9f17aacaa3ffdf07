//! The node's local connection registry: which users are connected here (a user is a
//! tenant and a user id: the same id in two tenants is two people), through which
//! connections, and each connection's outlet — the queue that feeds its socket writer.
//!
//! An outlet is bounded in bytes, not frames: a frame is never dropped quietly. Answers to
//! the client's own requests wait for room; frames other tasks deliver that would take the
//! unsent bytes past the bound close the connection instead (4408; the client reconnects
//! and recovers with `sync`). Every frame for a connection goes through its outlet:
//! replies, sync answers, live messages, statuses, stream chunks.
//!
//! Live messages keep each conversation's seq order per connection: the outlet remembers
//! the last live seq it queued per conversation and refuses an older one (it can arrive
//! late when two nodes publish messages of one conversation concurrently); the client sees
//! the gap in seqs and fills it with `sync`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{mpsc, Notify};

use crate::metrics as m;

pub type ConnId = u64;

/// An encoded frame, shared by every connection it goes to: the socket's own text type,
/// so neither queuing nor writing copies it (a clone is a reference count).
pub type Outbound = axum::extract::ws::Utf8Bytes;

/// Conversations an outlet remembers a live seq for; past this it forgets them all (the
/// order filter then starts afresh, which at worst lets one stale frame through).
const LIVE_SEQ_MEMORY: usize = 10_000;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("the connection is closing")]
    Closed,
    #[error("the connection's unsent frames would exceed {0} bytes; it is being closed")]
    Overflow(usize),
}

/// Why the node closes a connection: the WebSocket close code and reason it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// A client that does not read fast enough: its unsent frames passed the byte bound.
pub const SLOW_CONSUMER: CloseReason = CloseReason {
    code: crate::close::CLOSE_SLOW,
    reason: "too slow to read; reconnect and sync",
};

/// One connection's outbound queue.
///
/// Two ways in: `push` never waits (for frames other tasks deliver: live messages,
/// statuses, stream chunks) and closes the connection when the bound is passed; `push_wait`
/// (for answers to the client's own requests: replies, sync, resume) waits for room
/// below half the bound, so a large answer streams out at the client's pace and leaves the
/// other half for pushed frames.
pub struct Outlet {
    tx: mpsc::UnboundedSender<Outbound>,
    queued_bytes: AtomicUsize,
    limit_bytes: usize,
    closed: AtomicBool,
    close_reason: Mutex<Option<CloseReason>>,
    kick: Notify,
    space: Notify,
    live_seqs: Mutex<HashMap<String, i64>>,
    /// Sabotage state: live messages seen, and the one held back.
    sabotage_live: AtomicU64,
    sabotage_held: Mutex<Option<Outbound>>,
}

impl Outlet {
    /// Applies the live-delivery sabotage switches (off by default): Ok(true) when the
    /// frame was dealt with here (dropped or held back), Ok(false) to queue it normally.
    fn sabotaged_live(&self, frame: &Outbound) -> Result<bool, PushError> {
        let s = crate::sabotage::active();
        if s.drop_every_nth_live > 0 {
            let n = self.sabotage_live.fetch_add(1, Ordering::Relaxed) + 1;
            if n % s.drop_every_nth_live == 0 {
                return Ok(true);
            }
        }
        if s.reorder_live {
            let Ok(mut held) = self.sabotage_held.lock() else {
                return Ok(false);
            };
            return match held.take() {
                None => {
                    *held = Some(frame.clone());
                    Ok(true)
                }
                Some(earlier) => {
                    self.push(frame.clone())?;
                    self.push(earlier)?;
                    Ok(true)
                }
            };
        }
        Ok(false)
    }

    fn queue(&self, frame: Outbound, n: usize) -> Result<(), PushError> {
        self.tx.send(frame).map_err(|_| {
            self.queued_bytes.fetch_sub(n, Ordering::Relaxed);
            PushError::Closed
        })
    }

    /// Queues `frame` without waiting; past the byte bound the connection is closed as
    /// too slow instead (the frame is not queued, and nothing after it will be).
    pub fn push(&self, frame: Outbound) -> Result<(), PushError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(PushError::Closed);
        }
        let n = frame.len();
        let queued = self.queued_bytes.fetch_add(n, Ordering::Relaxed) + n;
        if queued > self.limit_bytes {
            self.queued_bytes.fetch_sub(n, Ordering::Relaxed);
            metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
            self.close(SLOW_CONSUMER);
            return Err(PushError::Overflow(self.limit_bytes));
        }
        self.queue(frame, n)
    }

    /// Queues `frame` once the unsent bytes are below half the bound (at once when nothing
    /// is queued); fails only when the connection closes meanwhile.
    pub async fn push_wait(&self, frame: Outbound) -> Result<(), PushError> {
        let n = frame.len();
        loop {
            let room = self.space.notified();
            tokio::pin!(room);
            // Registered before the check, so a write in between still wakes us.
            room.as_mut().enable();
            if self.closed.load(Ordering::Relaxed) {
                return Err(PushError::Closed);
            }
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if queued == 0 || queued + n <= self.limit_bytes / 2 {
                self.queued_bytes.fetch_add(n, Ordering::Relaxed);
                return self.queue(frame, n);
            }
            room.await;
        }
    }

    /// Queues a live `msg` frame of `conversation` at `seq` unless a later seq of it was
    /// already queued here. Ok(false): refused as out of order.
    pub fn push_live(
        &self,
        conversation: &str,
        seq: i64,
        frame: Outbound,
    ) -> Result<bool, PushError> {
        // The lock spans the push so two deliverers cannot interleave check and queue.
        let Ok(mut seqs) = self.live_seqs.lock() else {
            return self.push(frame).map(|()| true);
        };
        if seqs.get(conversation).is_some_and(|last| *last >= seq) {
            metrics::counter!(m::FANOUT_OUT_OF_ORDER).increment(1);
            return Ok(false);
        }
        if !self.sabotaged_live(&frame)? {
            self.push(frame)?;
        }
        if seqs.len() >= LIVE_SEQ_MEMORY {
            seqs.clear();
        }
        seqs.insert(conversation.to_string(), seq);
        Ok(true)
    }

    /// The writer wrote a frame of `n` bytes.
    pub fn written(&self, n: usize) {
        self.queued_bytes.fetch_sub(n, Ordering::Relaxed);
        self.space.notify_waiters();
    }

    /// Whether the connection is closing or gone (nothing more will be queued).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Asks the writer to close the connection with `why` (the first reason given wins);
    /// nothing more is queued.
    pub fn close(&self, why: CloseReason) {
        if let Ok(mut reason) = self.close_reason.lock() {
            if reason.is_none() {
                *reason = Some(why);
            }
        }
        if !self.closed.swap(true, Ordering::Relaxed) {
            // notify_one keeps a permit if the writer is not waiting right now.
            self.kick.notify_one();
        }
        self.space.notify_waiters();
    }

    /// The writer is gone: nothing more is queued and waiting pushers give up.
    pub fn writer_gone(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.space.notify_waiters();
    }

    /// Resolves when the connection is to be closed, with the reason.
    pub async fn closing(&self) -> CloseReason {
        self.kick.notified().await;
        self.close_reason
            .lock()
            .ok()
            .and_then(|r| *r)
            .unwrap_or(SLOW_CONSUMER)
    }
}

struct Entry {
    id: ConnId,
    outlet: Arc<Outlet>,
}

/// A registered connection's handles.
pub struct Registration {
    pub id: ConnId,
    /// What the writer sends, in order.
    pub rx: mpsc::UnboundedReceiver<Outbound>,
    pub outlet: Arc<Outlet>,
}

/// Connections by tenant, then user.
type Users = HashMap<String, HashMap<String, Vec<Entry>>>;

pub struct Hub {
    tenants: RwLock<Users>,
    next_id: AtomicU64,
    outlet_limit_bytes: usize,
}

impl Hub {
    /// A hub whose connections may hold up to `outlet_limit_bytes` of unsent frames.
    pub fn new(outlet_limit_bytes: usize) -> Self {
        Hub {
            tenants: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            outlet_limit_bytes,
        }
    }

    /// A new connection of `user`, its `first` frame (the `hello`) already queued: once it
    /// is listed here, deliveries from other tasks reach it at once, and a live message
    /// could otherwise go out before the `hello` (the nodes test
    /// `retried_send_is_stored_once` saw one, a fan-out of a retried send).
    pub fn register(&self, tenant: &str, user: &str, first: Option<Outbound>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let outlet = Arc::new(Outlet {
            tx,
            queued_bytes: AtomicUsize::new(0),
            limit_bytes: self.outlet_limit_bytes,
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            kick: Notify::new(),
            space: Notify::new(),
            live_seqs: Mutex::new(HashMap::new()),
            sabotage_live: AtomicU64::new(0),
            sabotage_held: Mutex::new(None),
        });
        if let Some(frame) = first {
            // An empty outlet: only a frame larger than the whole bound is refused, and
            // then the connection is closing anyway.
            let _ = outlet.push(frame);
        }
        if let Ok(mut tenants) = self.tenants.write() {
            tenants
                .entry(tenant.to_string())
                .or_default()
                .entry(user.to_string())
                .or_default()
                .push(Entry {
                    id,
                    outlet: outlet.clone(),
                });
        }
        Registration { id, rx, outlet }
    }

    pub fn unregister(&self, tenant: &str, user: &str, id: ConnId) {
        let Ok(mut tenants) = self.tenants.write() else {
            return;
        };
        let Some(users) = tenants.get_mut(tenant) else {
            return;
        };
        if let Some(list) = users.get_mut(user) {
            list.retain(|e| e.id != id);
            if list.is_empty() {
                users.remove(user);
            }
        }
        if users.is_empty() {
            tenants.remove(tenant);
        }
    }

    /// Queues `frame` for every local connection of `users` of `tenant` (but `except`).
    /// With `live_order` (conversation, seq) a connection that already got a later live
    /// message of the conversation is skipped. Returns the users reached on at least one
    /// connection.
    pub fn deliver(
        &self,
        tenant: &str,
        users: &[String],
        frame: &Outbound,
        except: Option<ConnId>,
        live_order: Option<(&str, i64)>,
    ) -> Vec<String> {
        let mut reached = Vec::new();
        let Ok(tenants) = self.tenants.read() else {
            return reached;
        };
        let Some(local) = tenants.get(tenant) else {
            return reached;
        };
        for user in users {
            let Some(list) = local.get(user) else {
                continue;
            };
            let mut any = false;
            for e in list.iter().filter(|e| Some(e.id) != except) {
                let queued = match live_order {
                    Some((conversation, seq)) => {
                        e.outlet.push_live(conversation, seq, frame.clone())
                    }
                    None => e.outlet.push(frame.clone()).map(|()| true),
                };
                any |= queued == Ok(true);
            }
            if any {
                reached.push(user.clone());
            }
        }
        reached
    }

    pub fn is_local(&self, tenant: &str, user: &str) -> bool {
        self.tenants
            .read()
            .map(|t| t.get(tenant).is_some_and(|u| u.contains_key(user)))
            .unwrap_or(false)
    }

    pub fn connection_count(&self) -> usize {
        self.tenants
            .read()
            .map(|t| t.values().flat_map(|u| u.values()).map(Vec::len).sum())
            .unwrap_or(0)
    }

    /// Every (tenant, user, connection) here, for presence refreshes.
    pub fn snapshot(&self) -> Vec<(String, String, ConnId)> {
        self.tenants
            .read()
            .map(|t| {
                t.iter()
                    .flat_map(|(tenant, users)| {
                        users.iter().flat_map(move |(u, l)| {
                            l.iter().map(move |e| (tenant.clone(), u.clone(), e.id))
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_every_connection_of_the_tenant_but_the_excepted_one() {
        let hub = Hub::new(1 << 20);
        let mut a1 = hub.register("t1", "a", None);
        let mut a2 = hub.register("t1", "a", None);
        let mut other_tenant = hub.register("t2", "a", None);
        let frame: Outbound = Outbound::from("x");
        let reached = hub.deliver("t1", &["a".into(), "b".into()], &frame, Some(a1.id), None);
        assert_eq!(reached, vec!["a".to_string()]);
        assert_eq!(a2.rx.recv().await.as_deref(), Some("x"));
        assert!(a1.rx.try_recv().is_err());
        assert!(other_tenant.rx.try_recv().is_err());
        assert!(hub.is_local("t2", "a") && !hub.is_local("t2", "b"));
        hub.unregister("t1", "a", a1.id);
        hub.unregister("t1", "a", a2.id);
        hub.unregister("t2", "a", other_tenant.id);
        assert_eq!(hub.connection_count(), 0);
        assert!(!hub.is_local("t1", "a"));
    }

    #[tokio::test]
    async fn the_first_frame_goes_before_any_delivery() {
        let hub = Hub::new(1 << 20);
        let mut c = hub.register("t", "u", Some(Outbound::from("hello")));
        hub.deliver("t", &["u".to_string()], &Outbound::from("x"), None, None);
        assert_eq!(c.rx.recv().await.as_deref(), Some("hello"));
        assert_eq!(c.rx.recv().await.as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn live_frames_keep_seq_order_per_conversation() {
        let hub = Hub::new(1 << 20);
        let mut c = hub.register("t", "u", None);
        let users = ["u".to_string()];
        for (conv, seq) in [("c1", 2), ("c1", 1), ("c2", 1), ("c1", 3), ("c1", 3)] {
            let frame: Outbound = Outbound::from(format!("{conv}:{seq}"));
            hub.deliver("t", &users, &frame, None, Some((conv, seq)));
        }
        let mut got = Vec::new();
        while let Ok(f) = c.rx.try_recv() {
            got.push(f.to_string());
        }
        assert_eq!(got, ["c1:2", "c2:1", "c1:3"]);
    }

    #[tokio::test]
    async fn a_full_outlet_closes_instead_of_dropping() {
        let hub = Hub::new(10);
        let c = hub.register("t", "u", None);
        assert_eq!(c.outlet.push(Outbound::from("123456")), Ok(()));
        assert_eq!(
            c.outlet.push(Outbound::from("123456")),
            Err(PushError::Overflow(10))
        );
        assert_eq!(c.outlet.closing().await, SLOW_CONSUMER);
        assert_eq!(c.outlet.push(Outbound::from("1")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn push_wait_waits_for_room_below_half_the_bound() {
        let hub = Hub::new(10);
        let mut c = hub.register("t", "u", None);
        c.outlet.push_wait(Outbound::from("1234")).await.unwrap();
        let outlet = c.outlet.clone();
        let waiting = tokio::spawn(async move { outlet.push_wait(Outbound::from("12")).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "4 + 2 bytes is past half of 10");
        let first = c.rx.recv().await.unwrap();
        c.outlet.written(first.len());
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(c.rx.recv().await.as_deref(), Some("12"));
    }
}
