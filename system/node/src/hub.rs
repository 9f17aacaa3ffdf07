//! The node's local connection registry: which users are connected here, through which
//! connections, and the queue that feeds each connection's socket writer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, Notify};

pub type ConnId = u64;

/// An encoded frame, shared by every connection it goes to.
pub type Outbound = Arc<str>;

/// Frames waiting for one connection's writer; past this the client is too slow and is
/// disconnected (it recovers what it missed with `sync`).
pub const OUTBOUND_QUEUE: usize = 1024;

struct Entry {
    id: ConnId,
    tx: mpsc::Sender<Outbound>,
    kick: Arc<Notify>,
}

/// A registered connection's handles.
pub struct Registration {
    pub id: ConnId,
    pub rx: mpsc::Receiver<Outbound>,
    pub tx: mpsc::Sender<Outbound>,
    /// Notified when the hub wants this connection closed (slow consumer).
    pub kick: Arc<Notify>,
}

#[derive(Default)]
pub struct Hub {
    users: RwLock<HashMap<String, Vec<Entry>>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn register(&self, user: &str) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let kick = Arc::new(Notify::new());
        let entry = Entry {
            id,
            tx: tx.clone(),
            kick: kick.clone(),
        };
        if let Ok(mut users) = self.users.write() {
            users.entry(user.to_string()).or_default().push(entry);
        }
        Registration { id, rx, tx, kick }
    }

    pub fn unregister(&self, user: &str, id: ConnId) {
        if let Ok(mut users) = self.users.write() {
            if let Some(list) = users.get_mut(user) {
                list.retain(|e| e.id != id);
                if list.is_empty() {
                    users.remove(user);
                }
            }
        }
    }

    /// Queues `frame` for every local connection of `users` (but `except`). Returns the
    /// users it reached on at least one connection.
    pub fn deliver(
        &self,
        users: &[String],
        frame: &Outbound,
        except: Option<ConnId>,
    ) -> Vec<String> {
        let mut reached = Vec::new();
        let Ok(map) = self.users.read() else {
            return reached;
        };
        for user in users {
            let Some(list) = map.get(user) else { continue };
            let mut any = false;
            for e in list.iter().filter(|e| Some(e.id) != except) {
                match e.tx.try_send(frame.clone()) {
                    Ok(()) => any = true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("chatstream_slow_consumer_disconnects_total")
                            .increment(1);
                        e.kick.notify_one();
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            if any {
                reached.push(user.clone());
            }
        }
        reached
    }

    pub fn is_local(&self, user: &str) -> bool {
        self.users
            .read()
            .map(|m| m.contains_key(user))
            .unwrap_or(false)
    }

    pub fn connection_count(&self) -> usize {
        self.users
            .read()
            .map(|m| m.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    /// Every (user, connection) here, for presence refreshes.
    pub fn snapshot(&self) -> Vec<(String, ConnId)> {
        self.users
            .read()
            .map(|m| {
                m.iter()
                    .flat_map(|(u, l)| l.iter().map(move |e| (u.clone(), e.id)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_every_connection_but_the_excepted_one() {
        let hub = Hub::default();
        let mut a1 = hub.register("a");
        let mut a2 = hub.register("a");
        let frame: Outbound = Arc::from("x");
        let reached = hub.deliver(&["a".into(), "b".into()], &frame, Some(a1.id));
        assert_eq!(reached, vec!["a".to_string()]);
        assert_eq!(a2.rx.recv().await.as_deref(), Some("x"));
        assert!(a1.rx.try_recv().is_err());
        hub.unregister("a", a1.id);
        hub.unregister("a", a2.id);
        assert_eq!(hub.connection_count(), 0);
        assert!(!hub.is_local("a"));
    }
}
