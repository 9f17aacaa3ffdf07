//! chatstream-store: PostgreSQL access for chatstream nodes — conversations and
//! membership, messages with a per-conversation sequence number (idempotent on the sender's
//! client message id), and the transactional outbox with its sharded relay claim.

mod outbox;

pub use outbox::{shard_of, OutboxRow, PendingEvent, OUTBOX_SHARDS};

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{user} is not a member of conversation {conversation}")]
    NotMember { user: String, conversation: String },
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Connection-level trouble (as opposed to a query the database refused).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Database(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub message_id: String,
    pub conversation_id: String,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: String,
    pub trace_id: String,
    pub node_id: String,
    pub created_at_ms: i64,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub message_id: String,
    pub conversation_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: String,
    pub trace_id: String,
    pub created_at_ms: i64,
}

/// The outcome of an append: the stored message, and whether it was already there.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: StoredMessage,
    pub duplicate: bool,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

fn stored(row: &sqlx::postgres::PgRow) -> Result<StoredMessage> {
    Ok(StoredMessage {
        message_id: row.try_get("id")?,
        conversation_id: row.try_get("conversation_id")?,
        seq: row.try_get("seq")?,
        sender_id: row.try_get("sender_id")?,
        client_msg_id: row.try_get("client_msg_id")?,
        body: row.try_get("body")?,
        trace_id: row.try_get("trace_id")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

const MESSAGE_COLUMNS: &str =
    "id, conversation_id, seq, sender_id, client_msg_id, body, trace_id, created_at_ms";

impl Store {
    /// A lazily connecting pool: a node starts (and reports not ready) while PostgreSQL is
    /// down, and recovers by itself when it returns.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Store> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        Ok(Store { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Creates the conversation (if new) and adds `members` (those already in stay).
    pub async fn create_conversation(
        &self,
        tenant: &str,
        id: &str,
        members: &[String],
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO conversations (id, tenant, created_at_ms) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING")
            .bind(id)
            .bind(tenant)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id, joined_at_ms)
             SELECT $1, u, $3 FROM UNNEST($2::text[]) AS u ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(members)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The conversation's tenant, if it exists.
    pub async fn conversation_tenant(&self, id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT tenant FROM conversations WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn members(&self, conversation_id: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM conversation_members WHERE conversation_id = $1 ORDER BY user_id",
        )
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM conversation_members WHERE conversation_id = $1 AND user_id = $2)",
        )
        .bind(conversation_id)
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Appends a message with the conversation's next seq, in one transaction with the
    /// outbox rows `events` builds for it (none in async publish mode). A retry with the
    /// same (sender, client_msg_id) returns the stored message and writes nothing.
    pub async fn append_message<F>(&self, msg: &NewMessage, events: F) -> Result<Appended>
    where
        F: FnOnce(&StoredMessage) -> Vec<OutboxRow>,
    {
        // Four round trips: BEGIN, seq, message + outbox rows in one statement, COMMIT.
        // A retry is found by the unique (sender, client_msg_id) key, not by a read first.
        let mut tx = self.pool.begin().await?;
        // The row lock on the conversation serialises appends per conversation: seqs are
        // dense and in commit order. Membership is checked in the same statement.
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations c SET last_seq = c.last_seq + 1
             FROM conversation_members m
             WHERE c.id = $1 AND m.conversation_id = c.id AND m.user_id = $2
             RETURNING c.last_seq",
        )
        .bind(&msg.conversation_id)
        .bind(&msg.sender_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(seq) = seq else {
            return Err(StoreError::NotMember {
                user: msg.sender_id.clone(),
                conversation: msg.conversation_id.clone(),
            });
        };
        let message = StoredMessage {
            message_id: msg.message_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq,
            sender_id: msg.sender_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            body: msg.body.clone(),
            trace_id: msg.trace_id.clone(),
            created_at_ms: msg.created_at_ms,
        };
        let rows = events(&message);
        let inserted = outbox::insert_message_with_events(&mut tx, msg, seq, &rows).await?;
        if !inserted {
            // A retry (or a concurrent retry that won): undo our seq bump, return the first.
            tx.rollback().await?;
            let existing = self
                .find_by_client_id(&msg.sender_id, &msg.client_msg_id)
                .await?
                .ok_or_else(|| {
                    StoreError::Unavailable("message vanished after a conflict".into())
                })?;
            return Ok(Appended {
                message: existing,
                duplicate: true,
            });
        }
        tx.commit().await?;
        Ok(Appended {
            message,
            duplicate: false,
        })
    }

    pub async fn find_by_client_id(
        &self,
        sender_id: &str,
        client_msg_id: &str,
    ) -> Result<Option<StoredMessage>> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = $1 AND client_msg_id = $2"
        ))
        .bind(sender_id)
        .bind(client_msg_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(stored).transpose()
    }

    /// Up to `limit` messages with seq > `after_seq`, in seq order.
    pub async fn messages_after(
        &self,
        conversation_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(conversation_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored).collect()
    }

    /// Records that `user` read up to `up_to_seq` (never moves backwards).
    pub async fn mark_read(
        &self,
        conversation_id: &str,
        user_id: &str,
        up_to_seq: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE conversation_members SET last_read_seq = GREATEST(last_read_seq, $3)
             WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation_id)
        .bind(user_id)
        .bind(up_to_seq)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Queues events outside a message transaction (status, stream events in outbox mode).
    pub async fn enqueue(&self, rows: &[OutboxRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        outbox::insert(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Publishes one shard's oldest pending events with `publish`, holding the shard's
    /// advisory lock; marks them published only if `publish` succeeded. Returns how many
    /// were published (0 when another relay holds the shard or nothing is pending).
    pub async fn relay_shard<F, Fut, E>(
        &self,
        shard: i32,
        limit: i64,
        now_ms: i64,
        publish: F,
    ) -> Result<Result<usize, E>>
    where
        F: FnOnce(Vec<PendingEvent>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), E>>,
    {
        outbox::relay_shard(&self.pool, shard, limit, now_ms, publish).await
    }

    /// Pending (unpublished) outbox rows, for readiness and metrics.
    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at_ms IS NULL")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Deletes rows published before `before_ms`.
    pub async fn prune_outbox(&self, before_ms: i64) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM outbox WHERE published_at_ms IS NOT NULL AND published_at_ms < $1",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
