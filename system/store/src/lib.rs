//! chatstream-store: PostgreSQL access for chatstream nodes — conversations and their
//! tenant-scoped membership (changed only by members, with the change's events in the same
//! transaction), messages with a per-conversation sequence number (idempotent on
//! (tenant, sender, conversation, client message id)), and the transactional outbox with
//! its sharded relay claim (rows Kafka refuses for good moved aside); retention of
//! published outbox rows and processed-event markers (`retention`); group commit of
//! appends from many connections (`batch`); the relay's claim on its shards on a
//! connection of its own (`relay`).

mod batch;
mod outbox;
mod relay;
mod retention;

pub use batch::{
    AppendBatcher, AppendHooks, BatchSettings, PendingAppend, SEQ_MARK, SEQ_PLACEHOLDER,
};
pub use relay::RelayClaim;

pub use outbox::{
    shard_of, OutboxRow, PendingEvent, Refusal, RejectedEvent, Relayed, OUTBOX_SHARDS,
};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;
use std::collections::HashMap;
use std::str::FromStr;
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
    /// A failure shared by every append of a batch (the database refused the batch).
    #[error("postgres: {0}")]
    Failed(String),
}

impl StoreError {
    /// This error for one of several waiters of the same failed statement: unavailable
    /// stays unavailable (the node answers both the same way), anything else is a failure.
    pub fn shared(&self) -> StoreError {
        match self {
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Failed(m) => StoreError::Failed(m.clone()),
            e if e.is_unavailable() => StoreError::Unavailable(e.to_string()),
            e => StoreError::Failed(e.to_string()),
        }
    }

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
    /// The sender's tenant (the conversation's, or the sender is not a member).
    pub tenant: String,
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

/// A conversation's tenant and members (user ids of that tenant), sorted by Rust's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub tenant: String,
    pub members: Vec<String>,
}

impl Membership {
    pub fn contains(&self, tenant: &str, user: &str) -> bool {
        self.tenant == tenant
            && self
                .members
                .binary_search_by(|m| m.as_str().cmp(user))
                .is_ok()
    }
}

/// What `create_conversation` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// It existed with exactly these members, the caller among them: nothing to do.
    AlreadyExists,
    /// It exists with other members (change them with `change_members`).
    MembersDiffer {
        members: Vec<String>,
    },
    /// It exists and the caller is not a member of it (or it is another tenant's).
    NotMember,
}

/// A requested membership change: `actor` of `tenant` adds and removes members.
#[derive(Debug, Clone, Copy)]
pub struct MembershipChange<'a> {
    pub tenant: &'a str,
    pub conversation_id: &'a str,
    pub actor: &'a str,
    pub add: &'a [String],
    pub remove: &'a [String],
    pub now_ms: i64,
}

/// A membership change as applied: who was really added and removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipDelta {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// What `change_members` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOutcome {
    Changed {
        delta: MembershipDelta,
        members: Vec<String>,
    },
    NotFound,
    /// The caller is not a member (or the conversation is another tenant's).
    NotMember,
    /// The change would leave nobody in the conversation: refused.
    WouldBeEmpty,
}

fn sorted_unique(users: &[String]) -> Vec<String> {
    let mut v = users.to_vec();
    v.sort();
    v.dedup();
    v
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Group commit of appends, when the node asked for it (`with_batched_appends`).
    appends: Option<AppendBatcher>,
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

/// The members of `id`, sorted, inside a transaction.
/// Sorted in Rust, not by the database's collation, so binary searches agree with it.
async fn members_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &str,
) -> Result<Vec<String>> {
    let mut members: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM conversation_members WHERE conversation_id = $1")
            .bind(id)
            .fetch_all(&mut **tx)
            .await?;
    members.sort();
    Ok(members)
}

/// How long a pooled connection may sit unused before its next acquire checks it first.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

const MESSAGE_COLUMNS: &str =
    "id, conversation_id, seq, sender_id, client_msg_id, body, trace_id, created_at_ms";

impl Store {
    /// A lazily connecting pool: a node starts (and reports not ready) while PostgreSQL is
    /// down, and recovers by itself when it returns.
    ///
    /// A connection is pinged on acquire only when it sat idle in the pool for a while
    /// ([`PING_IF_IDLE_FOR`]): sqlx pings every connection as it is released already, so a
    /// busy connection's acquire ping was a second round trip per use for nothing — and
    /// worse, under overload the acquire timeout (3 s) fell mid-ping and sqlx then closed
    /// the connection, so an overloaded node lost its connections and every later acquire
    /// had to open a new one (PostgreSQL forks a backend each time): `steady` on a busy
    /// machine collapsed to no acknowledgement at all with ~150 new connections a second.
    /// `application_name` names its connections in `pg_stat_activity`.
    pub fn connect_lazy(url: &str, max_connections: u32, application_name: &str) -> Result<Store> {
        let options = PgConnectOptions::from_str(url)?.application_name(application_name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(3))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        // A dead link (PostgreSQL restarted, a proxy cut it) is dropped here
                        // and the acquire goes on to another connection or a new one.
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        Ok(Store {
            pool,
            appends: None,
        })
    }

    /// Starts the append batchers (on the current tokio runtime): `batched()` then hands
    /// them out. Appends through `append_message` stay one transaction each.
    pub fn with_batched_appends(mut self, settings: BatchSettings) -> Store {
        self.appends = Some(AppendBatcher::start(self.pool.clone(), settings));
        self
    }

    /// The append batchers, if started.
    pub fn batched(&self) -> Option<&AppendBatcher> {
        self.appends.as_ref()
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

    /// Creates conversation `id` of `tenant` with `members` (the creator among them), with
    /// the outbox rows `events` builds for it in the same transaction. If `id` exists,
    /// nothing changes: re-creating with the same members by a member is a no-op, anything
    /// else is refused (membership changes go through `change_members`, members only).
    pub async fn create_conversation<F>(
        &self,
        tenant: &str,
        id: &str,
        creator: &str,
        members: &[String],
        now_ms: i64,
        events: F,
    ) -> Result<CreateOutcome>
    where
        F: FnOnce(&[String]) -> Vec<OutboxRow>,
    {
        let members = sorted_unique(members);
        let mut tx = self.pool.begin().await?;
        // A concurrent creation of the same id waits here for the first to commit.
        let created: Option<String> = sqlx::query_scalar(
            "INSERT INTO conversations (id, tenant, created_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(id)
        .bind(tenant)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        if created.is_none() {
            // Shares the row lock that membership changes and appends take for update.
            let owner: Option<String> =
                sqlx::query_scalar("SELECT tenant FROM conversations WHERE id = $1 FOR SHARE")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let current = members_in(&mut tx, id).await?;
            tx.rollback().await?;
            let caller_in = current
                .binary_search_by(|m| m.as_str().cmp(creator))
                .is_ok();
            return Ok(match owner {
                Some(t) if t == tenant && caller_in => {
                    if current == members {
                        CreateOutcome::AlreadyExists
                    } else {
                        CreateOutcome::MembersDiffer { members: current }
                    }
                }
                _ => CreateOutcome::NotMember,
            });
        }
        sqlx::query(
            "INSERT INTO conversation_members (conversation_id, tenant, user_id, joined_at_ms)
             SELECT $1, $2, u, $4 FROM UNNEST($3::text[]) AS u ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(tenant)
        .bind(&members)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        outbox::insert(&mut tx, &events(&members)).await?;
        tx.commit().await?;
        Ok(CreateOutcome::Created)
    }

    /// Applies `change` if its actor is a member of the conversation, with the outbox rows
    /// `events` builds for the applied change in the same transaction (none when nothing
    /// changed). A user both added and removed is removed.
    pub async fn change_members<F>(
        &self,
        change: &MembershipChange<'_>,
        events: F,
    ) -> Result<ChangeOutcome>
    where
        F: FnOnce(&MembershipDelta) -> Vec<OutboxRow>,
    {
        let MembershipChange {
            tenant,
            conversation_id: id,
            actor,
            add,
            remove,
            now_ms,
        } = *change;
        let mut tx = self.pool.begin().await?;
        // The row lock orders this change with appends (which take it too): a removed
        // member's send either committed before or is refused after.
        let owner: Option<String> =
            sqlx::query_scalar("SELECT tenant FROM conversations WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(owner) = owner else {
            tx.rollback().await?;
            return Ok(ChangeOutcome::NotFound);
        };
        let before = members_in(&mut tx, id).await?;
        if owner != tenant || before.binary_search_by(|m| m.as_str().cmp(actor)).is_err() {
            tx.rollback().await?;
            return Ok(ChangeOutcome::NotMember);
        }
        let remove = sorted_unique(remove);
        let add: Vec<String> = sorted_unique(add)
            .into_iter()
            .filter(|u| remove.binary_search(u).is_err())
            .collect();
        let mut added: Vec<String> = sqlx::query_scalar(
            "INSERT INTO conversation_members (conversation_id, tenant, user_id, joined_at_ms)
             SELECT $1, $2, u, $4 FROM UNNEST($3::text[]) AS u
             ON CONFLICT DO NOTHING RETURNING user_id",
        )
        .bind(id)
        .bind(tenant)
        .bind(&add)
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut removed: Vec<String> = sqlx::query_scalar(
            "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = ANY($2)
             RETURNING user_id",
        )
        .bind(id)
        .bind(&remove)
        .fetch_all(&mut *tx)
        .await?;
        added.sort();
        removed.sort();
        let members = members_in(&mut tx, id).await?;
        if members.is_empty() {
            tx.rollback().await?;
            return Ok(ChangeOutcome::WouldBeEmpty);
        }
        let delta = MembershipDelta { added, removed };
        if !delta.added.is_empty() || !delta.removed.is_empty() {
            outbox::insert(&mut tx, &events(&delta)).await?;
        }
        tx.commit().await?;
        Ok(ChangeOutcome::Changed { delta, members })
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

    /// The conversation's tenant and members, if it exists.
    pub async fn membership(&self, conversation_id: &str) -> Result<Option<Membership>> {
        Ok(self
            .memberships(&[conversation_id.to_string()])
            .await?
            .remove(conversation_id))
    }

    /// The tenant and members of each conversation of `ids` that exists, in one round trip
    /// (nodes read the memberships they cache again every few seconds, many at a time).
    pub async fn memberships(&self, ids: &[String]) -> Result<HashMap<String, Membership>> {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT c.id, c.tenant, m.user_id
             FROM conversations c
             LEFT JOIN conversation_members m
                    ON m.conversation_id = c.id AND m.tenant = c.tenant
             WHERE c.id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<String, Membership> = HashMap::new();
        for (id, tenant, user) in rows {
            let entry = found.entry(id).or_insert_with(|| Membership {
                tenant,
                members: Vec::new(),
            });
            entry.members.extend(user);
        }
        for m in found.values_mut() {
            // Sorted in Rust: `Membership::contains` searches by Rust's order.
            m.members.sort();
        }
        Ok(found)
    }

    pub async fn is_member(
        &self,
        conversation_id: &str,
        tenant: &str,
        user_id: &str,
    ) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM conversation_members
                            WHERE conversation_id = $1 AND tenant = $2 AND user_id = $3)",
        )
        .bind(conversation_id)
        .bind(tenant)
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Appends a message with the conversation's next seq, in one transaction with the
    /// outbox rows `in_order` builds for it (none in async and none publish modes). A retry
    /// with the same (tenant, sender, conversation, client_msg_id) returns the stored
    /// message and writes nothing.
    ///
    /// `in_order` runs inside the transaction after the seq is taken and before the commit,
    /// while the conversation's row lock is held: whatever it does (the node takes its
    /// fan-out place there) happens in seq order across concurrent appends to the
    /// conversation. It also runs for an append that turns out to be a retry.
    pub async fn append_message<F>(&self, msg: &NewMessage, in_order: F) -> Result<Appended>
    where
        F: FnOnce(&StoredMessage) -> Vec<OutboxRow>,
    {
        // Four round trips: BEGIN, seq, message + outbox rows in one statement, COMMIT.
        // A retry is found by the unique idempotency key, not by a read first.
        let mut tx = self.pool.begin().await?;
        // The row lock on the conversation serialises appends per conversation: seqs are
        // dense and in commit order. Membership is checked in the same statement.
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE conversations c SET last_seq = c.last_seq + 1
             FROM conversation_members m
             WHERE c.id = $1 AND c.tenant = $3
               AND m.conversation_id = c.id AND m.tenant = $3 AND m.user_id = $2
             RETURNING c.last_seq",
        )
        .bind(&msg.conversation_id)
        .bind(&msg.sender_id)
        .bind(&msg.tenant)
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
        let rows = in_order(&message);
        let inserted = outbox::insert_message_with_events(&mut tx, msg, seq, &rows).await?;
        if !inserted {
            // A retry (or a concurrent retry that won): undo our seq bump, return the first.
            tx.rollback().await?;
            let existing = self
                .find_by_client_id(
                    &msg.tenant,
                    &msg.sender_id,
                    &msg.conversation_id,
                    &msg.client_msg_id,
                )
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

    /// The message stored under an idempotency key.
    pub async fn find_by_client_id(
        &self,
        tenant: &str,
        sender_id: &str,
        conversation_id: &str,
        client_msg_id: &str,
    ) -> Result<Option<StoredMessage>> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE tenant = $1 AND sender_id = $2 AND conversation_id = $3 AND client_msg_id = $4"
        ))
        .bind(tenant)
        .bind(sender_id)
        .bind(conversation_id)
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
        tenant: &str,
        user_id: &str,
        up_to_seq: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE conversation_members SET last_read_seq = GREATEST(last_read_seq, $4)
             WHERE conversation_id = $1 AND tenant = $2 AND user_id = $3",
        )
        .bind(conversation_id)
        .bind(tenant)
        .bind(user_id)
        .bind(up_to_seq)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records that `user` read up to `up_to_seq` (never moves backwards), with the outbox
    /// rows `events` in the same transaction: a read that is acknowledged has its event.
    /// Returns false (and writes nothing) when the user is not a member.
    pub async fn mark_read_with_events(
        &self,
        conversation_id: &str,
        tenant: &str,
        user_id: &str,
        up_to_seq: i64,
        events: &[OutboxRow],
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE conversation_members SET last_read_seq = GREATEST(last_read_seq, $4)
             WHERE conversation_id = $1 AND tenant = $2 AND user_id = $3",
        )
        .bind(conversation_id)
        .bind(tenant)
        .bind(user_id)
        .bind(up_to_seq)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        outbox::insert(&mut tx, events).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Unpublished outbox rows written by `node_id` (what a draining node waits for).
    pub async fn outbox_pending_for_node(&self, node_id: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE published_at_ms IS NULL AND node_id = $1",
        )
        .bind(node_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Queues events outside a message transaction (status, stream events in outbox mode).
    pub async fn enqueue(&self, rows: &[OutboxRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        outbox::insert(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Publishes one shard's oldest pending events with `publish`, holding the shard's
    /// advisory lock. When `publish` succeeds, the events it names as refused for good
    /// are moved to `outbox_rejected` and the others marked published; when it fails,
    /// nothing changes (the batch is tried again). Returns what was published and moved
    /// aside (nothing when another relay holds the shard or nothing is pending).
    pub async fn relay_shard<F, Fut, E>(
        &self,
        shard: i32,
        limit: i64,
        now_ms: i64,
        publish: F,
    ) -> Result<Result<Relayed, E>>
    where
        F: FnOnce(Vec<PendingEvent>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Vec<Refusal>, E>>,
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
