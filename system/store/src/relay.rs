//! The outbox relay's hold on its shards, kept on a PostgreSQL connection of its own.
//!
//! A relay claims free shards with session advisory locks (the same lock ids the
//! transaction-scoped claim of [`crate::Store::relay_shard`] uses, so the two exclude each
//! other) on a connection that is not the node's pool. Every running relay also holds a
//! shared lock on one registry key, so each can count the relays and keep to its fair
//! share of the shards (16 over the relays, rounded up): it gives back what it holds beyond
//! that and takes free shards up to it, so the relays of a cluster publish side by side
//! (the first relay to start used to take every shard and publish alone, and fell behind
//! under load while the others idled). It then reads the pending rows of
//! every shard it holds in one statement, publishes them with no transaction open, and
//! marks them in one statement. So a relay waiting on Kafka (slow, or cut off) holds no
//! pooled connection and no transaction: the send path keeps the whole pool. Its shards stay
//! its own while its session lives; when the node dies its session ends and the locks go
//! with it, and another relay claims the shards on its next pass. Whatever this relay loses
//! its connection in the middle of is published again later (at least once; consumers
//! dedupe by event id).

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};
use std::future::Future;
use std::time::Duration;

use crate::outbox::{PendingEvent, Refusal, RejectedEvent, Relayed, ADVISORY_BASE, OUTBOX_SHARDS};
use crate::{Result, Store, StoreError};

/// A statement (or connecting) that takes longer has met a black-holed link: the caller
/// releases the claim and starts over.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded<T>(f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StoreError::Unavailable(format!(
            "relay statement unanswered within {STATEMENT_TIMEOUT:?}"
        ))),
    }
}

/// The registry key (a two-part advisory key: class, 0) every running relay holds shared.
const RELAYS_CLASS: i32 = 0x5157_4c52; // "SQLR"

/// A relay's connection and the shards it holds on it.
pub struct RelayClaim {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    owned: Vec<i32>,
}

/// The shards one of `relays` relays holds at most.
fn fair_share(relays: i64) -> usize {
    let relays = usize::try_from(relays.max(1)).unwrap_or(1);
    (OUTBOX_SHARDS as usize).div_ceil(relays)
}

impl RelayClaim {
    /// A claim on nothing yet; connects on first use, with the store's settings.
    pub fn new(store: &Store) -> RelayClaim {
        RelayClaim {
            options: (*store.pool().connect_options()).clone(),
            conn: None,
            owned: Vec::new(),
        }
    }

    /// The shards held.
    pub fn owned(&self) -> &[i32] {
        &self.owned
    }

    async fn conn(&mut self) -> Result<&mut PgConnection> {
        if self.conn.is_none() {
            self.owned.clear();
            let mut conn = bounded(PgConnection::connect_with(&self.options)).await?;
            bounded(
                sqlx::query("SELECT pg_advisory_lock_shared($1, 0)")
                    .bind(RELAYS_CLASS)
                    .execute(&mut conn),
            )
            .await?;
            self.conn = Some(conn);
        }
        match self.conn.as_mut() {
            Some(c) => Ok(c),
            None => Err(StoreError::Unavailable("relay connection missing".into())),
        }
    }

    /// Keeps this relay to its fair share of the shards: counts the running relays, gives
    /// back the shards it holds beyond its share (call it between passes, when what it
    /// read is settled) and tries to take free ones up to it (a live relay elsewhere keeps
    /// its own). Returns the shards held now.
    pub async fn claim(&mut self) -> Result<&[i32]> {
        self.conn().await?;
        let RelayClaim {
            conn: Some(conn),
            owned,
            ..
        } = self
        else {
            return Err(StoreError::Unavailable("relay connection missing".into()));
        };
        let relays: i64 = bounded(
            sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock'
                   AND classid = $1::int::oid AND objid = 0 AND objsubid = 2
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .bind(RELAYS_CLASS)
            .fetch_one(&mut *conn),
        )
        .await?;
        let share = fair_share(relays);
        if owned.len() > share {
            let extra = owned.split_off(share);
            bounded(
                sqlx::query("SELECT pg_advisory_unlock($2 + s) FROM UNNEST($1::int[]) AS s")
                    .bind(&extra)
                    .bind(ADVISORY_BASE)
                    .execute(&mut *conn),
            )
            .await?;
            tracing::debug!(
                ?extra,
                relays,
                "outbox shards given back to the other relays"
            );
        } else if owned.len() < share {
            // Tried in an order of their own per relay, so relays starting together do not
            // all go for the same shards; one at a time, so none is locked beyond the share.
            let mut free: Vec<i32> = (0..OUTBOX_SHARDS).filter(|s| !owned.contains(s)).collect();
            let start = std::process::id() as usize % free.len().max(1);
            free.rotate_left(start);
            let mut taken = Vec::new();
            for shard in free {
                if owned.len() + taken.len() >= share {
                    break;
                }
                let got: bool = bounded(
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(ADVISORY_BASE + i64::from(shard))
                        .fetch_one(&mut *conn),
                )
                .await?;
                if got {
                    taken.push(shard);
                }
            }
            owned.extend(taken);
            owned.sort_unstable();
        }
        Ok(owned)
    }

    /// The oldest pending events of the shards held (at most `per_shard` of each), in id
    /// order: a key's events (one shard) go out in the order they were committed.
    pub async fn pending(&mut self, per_shard: i64) -> Result<Vec<PendingEvent>> {
        if self.owned.is_empty() {
            return Ok(Vec::new());
        }
        let owned = self.owned.clone();
        let conn = self.conn().await?;
        let rows = bounded(
            sqlx::query(
                "SELECT o.id, o.event_id, o.topic, o.key, o.payload
             FROM UNNEST($1::int[]) AS s,
                  LATERAL (SELECT id, event_id, topic, key, payload FROM outbox
                           WHERE shard = s AND published_at_ms IS NULL
                           ORDER BY id LIMIT $2) AS o
             ORDER BY o.id",
            )
            .bind(&owned)
            .bind(per_shard)
            .fetch_all(conn),
        )
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingEvent {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("key")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    /// After a publish: marks `events` published, except those Kafka refused for good,
    /// which move to `outbox_rejected` (one statement, one transaction).
    pub async fn settle(
        &mut self,
        events: &[PendingEvent],
        refusals: Vec<Refusal>,
        now_ms: i64,
    ) -> Result<Relayed> {
        let refusals: Vec<Refusal> = refusals
            .into_iter()
            .filter(|r| events.iter().any(|e| e.id == r.id))
            .collect();
        let published: Vec<i64> = events
            .iter()
            .map(|e| e.id)
            .filter(|id| !refusals.iter().any(|r| r.id == *id))
            .collect();
        let refused: Vec<i64> = refusals.iter().map(|r| r.id).collect();
        let errors: Vec<&str> = refusals.iter().map(|r| r.error.as_str()).collect();
        let conn = self.conn().await?;
        // Moved, not marked: a refused row must never count as published, and the next
        // pass must not pick it up again.
        bounded(
            sqlx::query(
                "WITH marked AS (
                UPDATE outbox SET published_at_ms = $3 WHERE id = ANY($1)
             ), moved AS (
                DELETE FROM outbox WHERE id = ANY($2)
                RETURNING id, event_id, shard, topic, key, payload, node_id, created_at_ms
             )
             INSERT INTO outbox_rejected (id, event_id, shard, topic, key, payload, node_id,
                                          created_at_ms, rejected_at_ms, error)
             SELECT m.id, m.event_id, m.shard, m.topic, m.key, m.payload, m.node_id,
                    m.created_at_ms, $3, r.error
             FROM moved m JOIN UNNEST($2::bigint[], $4::text[]) AS r(id, error) ON r.id = m.id
             ON CONFLICT (id) DO NOTHING",
            )
            .bind(&published)
            .bind(&refused)
            .bind(now_ms)
            .bind(&errors)
            .execute(conn),
        )
        .await?;
        let rejected = refusals
            .into_iter()
            .filter_map(|r| {
                let e = events.iter().find(|e| e.id == r.id)?;
                Some(RejectedEvent {
                    id: r.id,
                    event_id: e.event_id.clone(),
                    topic: e.topic.clone(),
                    key: e.key.clone(),
                    payload_bytes: e.payload.len(),
                    error: r.error,
                })
            })
            .collect();
        Ok(Relayed {
            published: published.len(),
            rejected,
        })
    }

    /// Gives every shard up (closes the connection: the locks end with the session). For
    /// shutdown, and after an error (the connection may be broken; the next call
    /// reconnects and claims again).
    pub async fn release(&mut self) {
        self.owned.clear();
        if let Some(conn) = self.conn.take() {
            // A black-holed link would hold the close: dropping closes the socket anyway.
            match tokio::time::timeout(Duration::from_secs(1), conn.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "relay connection closed uncleanly"),
                Err(_) => tracing::debug!("relay connection close timed out"),
            }
        }
    }
}
