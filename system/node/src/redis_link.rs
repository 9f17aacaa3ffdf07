//! The node's command link to Redis: one multiplexed connection shared by every command
//! (fan-out publishes, presence, stream chunks), behind a circuit breaker.
//!
//! Why not redis-rs's `ConnectionManager`: it reconnects only when a command it is still
//! awaiting sees a connection error. Our callers give up after a bounded wait, so against
//! a black-holed link (connection open, nothing answered) no command ever saw an error and
//! the manager kept its dead connection for good; after a refused-connection outage it
//! could likewise be left holding a failed reconnect. Here the link owns the whole
//! lifecycle instead:
//!
//! - a command runs only while the breaker is closed (`is_up`); otherwise it fails at once
//!   with [`RedisLinkError::Down`], so nothing on a client's path ever waits for a dead
//!   Redis;
//! - a command that times out or fails at the connection level opens the breaker and
//!   throws the connection away (a timed-out command may still be answered later, and a
//!   multiplexed connection matches answers to requests by order: reusing it could hand
//!   one command another's answer);
//! - a background prober makes a fresh connection while the breaker is open (every
//!   250 ms) and PINGs it; the first answered PING closes the breaker again. While closed,
//!   it PINGs every 500 ms, so an idle node notices an outage too, and `/readyz` follows.

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

use crate::metrics as m;

/// Longest a command may take before the link is declared dead.
pub const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a new connection (TCP and handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between reconnect attempts while the breaker is open.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// Pause between liveness PINGs while the breaker is closed.
const PING_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisLinkError {
    /// The breaker is open: the command was not sent.
    #[error("redis is unreachable (reconnecting in the background)")]
    Down,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed under the command.
    #[error("redis connection failed: {0}")]
    Connection(String),
    /// Redis answered with an error (the link itself is fine).
    #[error("redis refused the command: {0}")]
    Refused(String),
}

/// The current connection and its generation (bumped on every reconnect).
struct Current {
    conn: Option<MultiplexedConnection>,
    generation: u64,
}

pub struct RedisLink {
    client: redis::Client,
    current: Mutex<Current>,
    up: AtomicBool,
    /// Wakes the prober when a command opened the breaker.
    wake: Notify,
    /// The generation of each connection the prober installed (presence refreshes on it).
    restored: watch::Sender<u64>,
}

/// Whether `e` means the connection (not the command) is broken.
fn is_link_failure(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error() || e.is_timeout() || e.is_connection_dropped()
}

impl RedisLink {
    /// A link that is down until the prober ([`RedisLink::run_prober`]) connects it.
    pub fn new(client: redis::Client) -> Arc<Self> {
        let (restored, _) = watch::channel(0);
        Arc::new(RedisLink {
            client,
            current: Mutex::new(Current {
                conn: None,
                generation: 0,
            }),
            up: AtomicBool::new(false),
            wake: Notify::new(),
            restored,
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Whether commands are being sent (the breaker is closed).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Changes each time a new connection is installed (after start and after outages).
    pub fn restored(&self) -> watch::Receiver<u64> {
        self.restored.subscribe()
    }

    fn connection(&self) -> Option<(MultiplexedConnection, u64)> {
        if !self.is_up() {
            return None;
        }
        let current = self.current.lock().ok()?;
        current.conn.clone().map(|c| (c, current.generation))
    }

    /// Runs `op` on the shared connection, bounded by [`OP_TIMEOUT`]; fails at once while
    /// the breaker is open.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, RedisLinkError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some((conn, generation)) = self.connection() else {
            metrics::counter!(m::REDIS_SKIPPED).increment(1);
            return Err(RedisLinkError::Down);
        };
        match tokio::time::timeout(OP_TIMEOUT, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_link_failure(&e) => {
                let err = RedisLinkError::Connection(e.to_string());
                self.trip(generation, &err);
                Err(err)
            }
            Ok(Err(e)) => Err(RedisLinkError::Refused(e.to_string())),
            Err(_) => {
                let err = RedisLinkError::Timeout(OP_TIMEOUT);
                self.trip(generation, &err);
                Err(err)
            }
        }
    }

    /// Opens the breaker and drops connection `generation` (unless a newer one is in).
    fn trip(&self, generation: u64, why: &RedisLinkError) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if current.generation != generation || current.conn.is_none() {
            return;
        }
        current.conn = None;
        self.up.store(false, Ordering::Relaxed);
        drop(current);
        metrics::counter!(m::REDIS_TRIPS).increment(1);
        tracing::warn!(error = %why, "redis link down: commands are skipped until it answers again");
        self.wake.notify_one();
    }

    fn trip_current(&self, why: &RedisLinkError) {
        let generation = self.current.lock().map(|c| c.generation).unwrap_or(0);
        self.trip(generation, why);
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(OP_TIMEOUT);
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let mut conn = tokio::time::timeout(CONNECT_TIMEOUT + OP_TIMEOUT, connect)
            .await
            .map_err(|_| format!("no connection within {:?}", CONNECT_TIMEOUT + OP_TIMEOUT))?
            .map_err(|e| e.to_string())?;
        let ping = redis::cmd("PING");
        tokio::time::timeout(OP_TIMEOUT, ping.query_async::<String>(&mut conn))
            .await
            .map_err(|_| format!("PING unanswered within {OP_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(conn)
    }

    /// Keeps the link alive: connects while it is down, PINGs while it is up. Runs until
    /// `shutdown`.
    pub async fn run_prober(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut down_since: Option<Instant> = Some(Instant::now());
        let mut last_error = String::new();
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !self.is_up() {
                // Opened by a command (or never up yet): count the outage from now.
                down_since.get_or_insert_with(Instant::now);
            } else {
                let ping =
                    self.run(|mut c| async move {
                        redis::cmd("PING").query_async::<String>(&mut c).await
                    })
                    .await;
                match ping {
                    Ok(_) => {
                        tokio::select! {
                            _ = tokio::time::sleep(PING_EVERY) => {}
                            _ = self.wake.notified() => {}
                            _ = shutdown.changed() => return,
                        }
                        continue;
                    }
                    // Answered with an error (LOADING, ...): not usable either.
                    Err(e @ RedisLinkError::Refused(_)) => self.trip_current(&e),
                    Err(_) => {}
                }
                down_since.get_or_insert_with(Instant::now);
            }
            match self.connect().await {
                Ok(conn) => {
                    let generation = {
                        let Ok(mut current) = self.current.lock() else {
                            return;
                        };
                        current.generation += 1;
                        current.conn = Some(conn);
                        // Under the lock: a trip of this generation cannot come in between.
                        self.up.store(true, Ordering::Relaxed);
                        current.generation
                    };
                    let down_for = down_since.take().map(|t| t.elapsed()).unwrap_or_default();
                    tracing::info!(generation, ?down_for, "redis link up");
                    self.restored.send_replace(generation);
                    last_error.clear();
                }
                Err(e) => {
                    self.up.store(false, Ordering::Relaxed);
                    if e != last_error {
                        tracing::warn!(error = %e, "redis unreachable; retrying every {RETRY_EVERY:?}");
                        last_error = e;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_EVERY) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}
