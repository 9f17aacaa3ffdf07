//! Group commit for message appends: sends from many connections share one transaction.
//!
//! An [`AppendBatcher`] runs a few batcher tasks; a conversation always goes to the same one
//! (hashed by id), so a conversation's appends — and a connection's own appends to it — stay
//! in one FIFO queue and get their seqs in the order they were submitted. Each batcher takes
//! what is queued (up to `max_batch`; under load it lingers briefly for more) and writes it
//! in one transaction of five round trips, whatever the batch size:
//!
//! 1. `BEGIN`;
//! 2. lock the batch's conversation rows, sorted by id (every batcher on every node locks in
//!    the same order, so batches cannot deadlock one another; a deadlock or serialization
//!    failure anyway retries the batch);
//! 3. with a snapshot taken after the locks: membership of every sender and the messages
//!    already stored under every idempotency key, in one statement;
//! 4. dense seqs assigned per conversation in Rust, each message's
//!    [`AppendHooks::in_order`] run in seq order (it builds the outbox rows, and the node
//!    takes its fan-out place there), then messages, outbox rows and the conversations'
//!    `last_seq` in one statement;
//! 5. `COMMIT`; then each message's [`AppendHooks::committed`] runs, in seq order (the
//!    node fills its fan-out place there, at once for the whole batch), and every waiter
//!    is answered.
//!
//! Outcomes are per message: a sender that is not a member gets `NotMember`, a retried key
//! gets the stored message (`duplicate: true`, and no seq is taken for it; a key twice in
//! one batch is stored once and both get that message). A database failure fails every
//! waiter of the batch with the same error (nothing of it was committed, or the outcome is
//! unknown and a retry with the same key finds it): nobody is acknowledged for something
//! that was not stored.

use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::outbox::{shard_of, OutboxRow};
use crate::{Appended, NewMessage, Result, StoreError, StoredMessage};

/// What the submitter of an append does at the batch's two moments.
pub trait AppendHooks: Send {
    /// The message's seq is known; runs in seq order per conversation, before the commit,
    /// and returns the outbox rows to write with the message (the node takes its fan-out
    /// place here). May run more than once for one message (the batch is retried after a
    /// deadlock or a concurrent insert of the same key): the last run counts. Not run for a
    /// message that is not stored (not a member, or a retry of a stored key).
    fn in_order(&mut self, msg: &StoredMessage) -> Vec<OutboxRow>;

    /// The batch committed (or failed): runs on the batcher, in seq order, before the
    /// waiter is answered. Nothing here may wait (the node fills its fan-out place).
    fn committed(&mut self, _outcome: &Result<Appended>) {}
}

impl<F> AppendHooks for F
where
    F: FnMut(&StoredMessage) -> Vec<OutboxRow> + Send,
{
    fn in_order(&mut self, msg: &StoredMessage) -> Vec<OutboxRow> {
        self(msg)
    }
}

/// How appends are grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSettings {
    /// Batcher tasks (each writes one transaction at a time, on one pooled connection).
    pub batchers: usize,
    /// Messages per transaction at most.
    pub max_batch: usize,
    /// How long a batcher under load waits to fill a batch (not at all when its previous
    /// batch held a single message: a quiet system answers at once).
    pub linger: Duration,
    /// Appends waiting per batcher; past this `submit` waits (backpressure on the sender).
    pub queue: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            batchers: 2,
            max_batch: 256,
            linger: Duration::from_millis(1),
            queue: 4096,
        }
    }
}

/// A batch that could not be written this time but may be on a fresh try.
const MAX_ATTEMPTS: u32 = 5;
/// A batch not written within this is failed (a black-holed PostgreSQL link).
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

struct Job {
    msg: NewMessage,
    hooks: Box<dyn AppendHooks>,
    done: oneshot::Sender<Result<Appended>>,
}

/// The handle that queues appends for the batcher tasks; cheap to clone.
#[derive(Clone)]
pub struct AppendBatcher {
    queues: Arc<[mpsc::Sender<Job>]>,
}

/// An append on its way: resolves once its batch has committed (or failed).
pub struct PendingAppend {
    rx: Option<oneshot::Receiver<Result<Appended>>>,
}

impl PendingAppend {
    pub async fn wait(self) -> Result<Appended> {
        let Some(rx) = self.rx else {
            return Err(StoreError::Unavailable(
                "the append batcher is stopped".into(),
            ));
        };
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the append batcher stopped before answering; the outcome is unknown".into(),
            ))
        })
    }
}

impl AppendBatcher {
    /// Starts the batcher tasks on the current tokio runtime.
    pub fn start(pool: PgPool, settings: BatchSettings) -> AppendBatcher {
        let batchers = settings.batchers.max(1);
        let queues: Vec<mpsc::Sender<Job>> = (0..batchers)
            .map(|_| {
                let (tx, rx) = mpsc::channel(settings.queue.max(1));
                tokio::spawn(run_batcher(pool.clone(), rx, settings.clone()));
                tx
            })
            .collect();
        AppendBatcher {
            queues: queues.into(),
        }
    }

    /// Queues an append (waits only while its batcher's queue is full). Appends submitted
    /// one after another to one conversation get increasing seqs in that order.
    pub async fn submit(&self, msg: NewMessage, hooks: Box<dyn AppendHooks>) -> PendingAppend {
        // shard_of spreads over OUTBOX_SHARDS; fold it onto the batchers.
        let i = shard_of(&msg.conversation_id) as usize % self.queues.len();
        let (done, rx) = oneshot::channel();
        let job = Job { msg, hooks, done };
        match self.queues[i].send(job).await {
            Ok(()) => PendingAppend { rx: Some(rx) },
            Err(_) => PendingAppend { rx: None },
        }
    }
}

async fn run_batcher(pool: PgPool, mut rx: mpsc::Receiver<Job>, settings: BatchSettings) {
    let max = settings.max_batch.max(1);
    let mut jobs: Vec<Job> = Vec::with_capacity(max);
    let mut busy = false;
    loop {
        let Some(first) = rx.recv().await else { return };
        jobs.push(first);
        while jobs.len() < max {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Under load (the last batch was shared) a short wait fills the batch: fewer,
        // larger transactions cost PostgreSQL and the proxies less per message.
        if busy && jobs.len() < max && !settings.linger.is_zero() {
            let until = Instant::now() + settings.linger;
            while jobs.len() < max {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(j)) => jobs.push(j),
                    _ => break,
                }
            }
        }
        busy = jobs.len() > 1;
        tracing::trace!(messages = jobs.len(), "append batch");
        if let Some(down) = commit(&pool, &mut jobs).await {
            // PostgreSQL is away: what is queued would wait its turn only to fail the same
            // way (seconds each batch); it is refused now and its senders retry.
            while let Ok(job) = rx.try_recv() {
                finish(job, Err(shared(&down)));
            }
        }
    }
}

/// Runs the job's `committed` hook, then answers its waiter.
fn finish(mut job: Job, outcome: Result<Appended>) {
    // A panicking hook loses its own waiter's answer only (it gets "unknown outcome").
    if std::panic::catch_unwind(AssertUnwindSafe(|| job.hooks.committed(&outcome))).is_ok() {
        let _ = job.done.send(outcome);
    }
}

/// Writes `jobs` (retrying what may succeed on a fresh try) and answers every waiter.
/// Returns the error when the batch failed because PostgreSQL is unreachable.
async fn commit(pool: &PgPool, jobs: &mut Vec<Job>) -> Option<StoreError> {
    let mut attempt = 1;
    let outcome = loop {
        let tried = tokio::time::timeout(BATCH_TIMEOUT, write_batch(pool, jobs)).await;
        let failure = match tried {
            Ok(Ok(outcomes)) => break Ok(outcomes),
            Ok(Err(e)) => e,
            Err(_) => StoreError::Unavailable(format!(
                "an append batch was not written within {BATCH_TIMEOUT:?}; its outcome is unknown"
            )),
        };
        if attempt < MAX_ATTEMPTS && retryable(&failure) {
            tracing::debug!(error = %failure, attempt, "append batch retried");
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(u64::from(attempt))).await;
            continue;
        }
        break Err(failure);
    };
    let mut down = None;
    let outcomes: Vec<Result<Appended>> = match outcome {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::warn!(error = %e, messages = jobs.len(), "append batch failed; nothing of it acknowledged");
            let outcomes = jobs.iter().map(|_| Err(shared(&e))).collect();
            if e.is_unavailable() {
                down = Some(shared(&e));
            }
            outcomes
        }
    };
    for (job, outcome) in jobs.drain(..).zip(outcomes) {
        finish(job, outcome);
    }
    down
}

/// The error every waiter of a failed batch gets: the one the node maps the same way
/// (unavailable stays unavailable, anything else is a storage failure).
fn shared(e: &StoreError) -> StoreError {
    if e.is_unavailable() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Failed(e.to_string())
    }
}

/// Deadlocks and serialization failures, and a key another node stored concurrently.
fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001"))
        }
        StoreError::Conflict => true,
        _ => false,
    }
}

/// What became of one message of the batch.
enum Outcome {
    NotMember,
    /// Stored before (a retry).
    Stored(StoredMessage),
    /// The same key as an earlier message of this batch.
    SameAs(usize),
    New(StoredMessage),
}

/// One attempt at writing the batch; the outcome of each message, in `jobs` order.
async fn write_batch(pool: &PgPool, jobs: &mut [Job]) -> Result<Vec<Result<Appended>>> {
    let mut tx = pool.begin().await?;

    let mut ids: Vec<&str> = jobs
        .iter()
        .map(|j| j.msg.conversation_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // Locked in id order (the sort happens below the row locks): no two batches deadlock.
    let locked = sqlx::query(
        "SELECT id, tenant, last_seq FROM conversations WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut conversations: HashMap<String, (String, i64)> = HashMap::with_capacity(locked.len());
    for row in &locked {
        conversations.insert(
            row.try_get("id")?,
            (row.try_get("tenant")?, row.try_get("last_seq")?),
        );
    }

    // A statement of its own, so its snapshot is taken after the locks: a membership
    // change or a same-key append that committed while we waited is seen.
    let checks = sqlx::query(
        "SELECT r.i, (m.user_id IS NOT NULL) AS member,
                e.id, e.seq, e.body, e.trace_id, e.created_at_ms
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
              WITH ORDINALITY AS r(conversation_id, tenant, sender_id, client_msg_id, i)
         LEFT JOIN conversation_members m
                ON m.conversation_id = r.conversation_id AND m.tenant = r.tenant
               AND m.user_id = r.sender_id
         LEFT JOIN messages e
                ON e.tenant = r.tenant AND e.sender_id = r.sender_id
               AND e.conversation_id = r.conversation_id AND e.client_msg_id = r.client_msg_id",
    )
    .bind(column(jobs, |m| &m.conversation_id))
    .bind(column(jobs, |m| &m.tenant))
    .bind(column(jobs, |m| &m.sender_id))
    .bind(column(jobs, |m| &m.client_msg_id));
    let checks = checks.fetch_all(&mut *tx).await?;
    let mut member = vec![false; jobs.len()];
    let mut stored: Vec<Option<StoredMessage>> = vec![None; jobs.len()];
    for row in &checks {
        let i: i64 = row.try_get("i")?;
        let Some(i) = usize::try_from(i - 1).ok().filter(|i| *i < jobs.len()) else {
            continue;
        };
        member[i] = row.try_get("member")?;
        let existing: Option<String> = row.try_get("id")?;
        if let Some(message_id) = existing {
            let m = &jobs[i].msg;
            stored[i] = Some(StoredMessage {
                message_id,
                conversation_id: m.conversation_id.clone(),
                seq: row.try_get("seq")?,
                sender_id: m.sender_id.clone(),
                client_msg_id: m.client_msg_id.clone(),
                body: row.try_get("body")?,
                trace_id: row.try_get("trace_id")?,
                created_at_ms: row.try_get("created_at_ms")?,
            });
        }
    }

    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut first_with_key: HashMap<(&str, &str, &str, &str), usize> = HashMap::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    let mut new_rows = NewRows::default();
    for (i, job) in jobs.iter_mut().enumerate() {
        let m = &job.msg;
        let owner = conversations.get(&m.conversation_id);
        if !member[i] || owner.is_none_or(|(tenant, _)| *tenant != m.tenant) {
            outcomes.push(Outcome::NotMember);
            continue;
        }
        if let Some(s) = stored[i].take() {
            outcomes.push(Outcome::Stored(s));
            continue;
        }
        let key = (
            m.tenant.as_str(),
            m.sender_id.as_str(),
            m.conversation_id.as_str(),
            m.client_msg_id.as_str(),
        );
        if let Some(first) = first_with_key.get(&key) {
            outcomes.push(Outcome::SameAs(*first));
            continue;
        }
        first_with_key.insert(key, i);
        let seq = last_seq
            .entry(m.conversation_id.as_str())
            .or_insert_with(|| owner.map(|(_, s)| *s).unwrap_or(0));
        *seq += 1;
        let message = StoredMessage {
            message_id: m.message_id.clone(),
            conversation_id: m.conversation_id.clone(),
            seq: *seq,
            sender_id: m.sender_id.clone(),
            client_msg_id: m.client_msg_id.clone(),
            body: m.body.clone(),
            trace_id: m.trace_id.clone(),
            created_at_ms: m.created_at_ms,
        };
        // A panicking callback fails this batch, not the batcher.
        let rows = std::panic::catch_unwind(AssertUnwindSafe(|| job.hooks.in_order(&message)))
            .map_err(|_| StoreError::Failed("an append's in-order callback panicked".into()))?;
        new_rows.push(m, *seq, rows);
        outcomes.push(Outcome::New(message));
    }

    if new_rows.messages > 0 {
        let (conv_ids, conv_seqs): (Vec<&str>, Vec<i64>) = last_seq.into_iter().unzip();
        let inserted: i64 = sqlx::query_scalar(
            "WITH m AS (
                INSERT INTO messages (id, conversation_id, seq, sender_id, client_msg_id, body,
                                      trace_id, node_id, created_at_ms, tenant)
                SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                                     $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[])
                ON CONFLICT (tenant, sender_id, conversation_id, client_msg_id) DO NOTHING
                RETURNING 1
             ), o AS (
                INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms)
                SELECT * FROM UNNEST($11::text[], $12::int[], $13::text[], $14::text[],
                                     $15::text[], $16::text[], $17::bigint[])
                ON CONFLICT (event_id) DO NOTHING
             ), c AS (
                UPDATE conversations SET last_seq = u.last_seq
                FROM UNNEST($18::text[], $19::bigint[]) AS u(id, last_seq)
                WHERE conversations.id = u.id
             )
             SELECT count(*) FROM m",
        )
        .bind(&new_rows.id)
        .bind(&new_rows.conversation_id)
        .bind(&new_rows.seq)
        .bind(&new_rows.sender_id)
        .bind(&new_rows.client_msg_id)
        .bind(&new_rows.body)
        .bind(&new_rows.trace_id)
        .bind(&new_rows.node_id)
        .bind(&new_rows.created_at_ms)
        .bind(&new_rows.tenant)
        .bind(&new_rows.event_id)
        .bind(&new_rows.shard)
        .bind(&new_rows.topic)
        .bind(&new_rows.key)
        .bind(&new_rows.payload)
        .bind(&new_rows.event_node_id)
        .bind(&new_rows.event_created_at_ms)
        .bind(&conv_ids)
        .bind(&conv_seqs)
        .fetch_one(&mut *tx)
        .await?;
        if inserted != new_rows.messages as i64 {
            // A key stored by another node after our check could not have been (it takes
            // the same conversation lock); should it happen anyway, no seq is burnt: the
            // batch is undone and tried again, and the retry finds the stored message.
            tx.rollback().await?;
            return Err(StoreError::Conflict);
        }
    }
    tx.commit().await?;

    let mut answers: Vec<Result<Appended>> = Vec::with_capacity(outcomes.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        let m = &jobs[i].msg;
        answers.push(match outcome {
            Outcome::NotMember => Err(StoreError::NotMember {
                user: m.sender_id.clone(),
                conversation: m.conversation_id.clone(),
            }),
            Outcome::Stored(s) => Ok(Appended {
                message: s.clone(),
                duplicate: true,
            }),
            Outcome::New(s) => Ok(Appended {
                message: s.clone(),
                duplicate: false,
            }),
            Outcome::SameAs(first) => match &outcomes[*first] {
                Outcome::New(s) => Ok(Appended {
                    message: s.clone(),
                    duplicate: true,
                }),
                // Only a new message is recorded as the first holder of a key.
                _ => Err(StoreError::Failed("append batch bookkeeping".into())),
            },
        });
    }
    Ok(answers)
}

fn column(jobs: &[Job], f: fn(&NewMessage) -> &String) -> Vec<&str> {
    jobs.iter().map(|j| f(&j.msg).as_str()).collect()
}

/// Columns of the messages and outbox rows a batch inserts.
#[derive(Default)]
struct NewRows<'a> {
    messages: usize,
    id: Vec<&'a str>,
    conversation_id: Vec<&'a str>,
    seq: Vec<i64>,
    sender_id: Vec<&'a str>,
    client_msg_id: Vec<&'a str>,
    body: Vec<&'a str>,
    trace_id: Vec<&'a str>,
    node_id: Vec<&'a str>,
    created_at_ms: Vec<i64>,
    tenant: Vec<&'a str>,
    event_id: Vec<String>,
    shard: Vec<i32>,
    topic: Vec<String>,
    key: Vec<String>,
    payload: Vec<String>,
    event_node_id: Vec<String>,
    event_created_at_ms: Vec<i64>,
}

impl<'a> NewRows<'a> {
    fn push(&mut self, m: &'a NewMessage, seq: i64, rows: Vec<OutboxRow>) {
        self.messages += 1;
        self.id.push(&m.message_id);
        self.conversation_id.push(&m.conversation_id);
        self.seq.push(seq);
        self.sender_id.push(&m.sender_id);
        self.client_msg_id.push(&m.client_msg_id);
        self.body.push(&m.body);
        self.trace_id.push(&m.trace_id);
        self.node_id.push(&m.node_id);
        self.created_at_ms.push(m.created_at_ms);
        self.tenant.push(&m.tenant);
        for r in rows {
            self.shard.push(shard_of(&r.key));
            self.event_id.push(r.event_id);
            self.topic.push(r.topic);
            self.key.push(r.key);
            self.payload.push(r.payload);
            self.event_node_id.push(r.node_id);
            self.event_created_at_ms.push(r.created_at_ms);
        }
    }
}
