//! Group commit for message appends: sends from many connections share one transaction.
//!
//! An [`AppendBatcher`] runs a few batcher tasks; a conversation always goes to the same one
//! (hashed by id), so a conversation's appends — and a connection's own appends to it — stay
//! in one FIFO queue and get their seqs in the order they were submitted. Each batcher takes
//! what is queued (up to `max_batch`; under load it lingers briefly for more) and writes it
//! in one round trip whatever the batch size: a call of the `chatstream_append_batch`
//! function (migration 0007) outside a transaction block, which
//!
//! 1. locks the batch's conversation rows, sorted by id (every batcher on every node locks
//!    in the same order, so batches cannot deadlock one another; a deadlock or
//!    serialization failure anyway retries the batch);
//! 2. in a statement of its own, so with a snapshot taken after the locks, checks the
//!    membership of every sender and the messages already stored under every idempotency
//!    key, assigns dense seqs per conversation in submission order, and inserts the
//!    messages, their outbox rows and the conversations' `last_seq`;
//! 3. commits as it returns. Then each message's [`AppendHooks::committed`] runs, in seq
//!    order per conversation (the node takes and fills its fan-out place there, at once for
//!    the whole batch), and every waiter is answered.
//!
//! The outbox rows are built before the seqs are known ([`AppendHooks::outbox_rows`]): a
//! payload carries [`SEQ_MARK`] where the seq goes, and the function writes the seq there.
//!
//! Outcomes are per message: a sender that is not a member gets `NotMember`, a retried key
//! gets the stored message (`duplicate: true`, and no seq is taken for it; a key twice in
//! one batch is stored once and both get that message). A database failure fails every
//! waiter of the batch with the same error (nothing of it was committed, or the outcome is
//! unknown and a retry with the same key finds it): nobody is acknowledged for something
//! that was not stored.

use sqlx::postgres::PgPool;
use sqlx::Row;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::outbox::{shard_of, OutboxRow};
use crate::{Appended, NewMessage, Result, StoreError, StoredMessage};

/// The seq a message has while its outbox rows are built, before it gets its own.
pub const SEQ_PLACEHOLDER: i64 = i64::MIN;

/// How [`SEQ_PLACEHOLDER`] reads in a compact JSON payload, as the field `seq`. It can stand
/// nowhere else: inside a JSON string a quote is escaped.
pub const SEQ_MARK: &str = "\"seq\":-9223372036854775808";

/// What the submitter of an append does at the batch's two moments.
pub trait AppendHooks: Send {
    /// The outbox rows to write with the message if it is stored. Runs once, before the
    /// batch is written, with `msg.seq` = [`SEQ_PLACEHOLDER`]: where a payload holds
    /// [`SEQ_MARK`], the message's seq is written in its place.
    fn outbox_rows(&mut self, msg: &StoredMessage) -> Vec<OutboxRow>;

    /// The batch committed (or failed): runs on the batcher, in seq order per
    /// conversation, before the waiter is answered. Nothing here may wait (the node takes
    /// and fills its fan-out place).
    fn committed(&mut self, _outcome: &Result<Appended>) {}
}

impl<F> AppendHooks for F
where
    F: FnMut(&StoredMessage) -> Vec<OutboxRow> + Send,
{
    fn outbox_rows(&mut self, msg: &StoredMessage) -> Vec<OutboxRow> {
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
                finish(job, Err(down.shared()));
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
    let rows = match outbox_rows(jobs) {
        Ok(rows) => rows,
        Err(e) => {
            for job in jobs.drain(..) {
                finish(job, Err(e.shared()));
            }
            return None;
        }
    };
    // The messages alone cross the awaits (a job's hooks are `Send`, not `Sync`).
    let msgs: Vec<&NewMessage> = jobs.iter().map(|j| &j.msg).collect();
    let mut attempt = 1;
    let outcome = loop {
        let tried = tokio::time::timeout(BATCH_TIMEOUT, write_batch(pool, &msgs, &rows)).await;
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
            let outcomes = jobs.iter().map(|_| Err(e.shared())).collect();
            if e.is_unavailable() {
                down = Some(e.shared());
            }
            outcomes
        }
    };
    for (job, outcome) in jobs.drain(..).zip(outcomes) {
        finish(job, outcome);
    }
    down
}

/// Deadlocks and serialization failures, and a key another node stored concurrently (a
/// unique violation: see migration 0007).
fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001" | "23505"))
        }
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

/// The message as its hooks see it before its seq is known.
fn unsequenced(m: &NewMessage) -> StoredMessage {
    StoredMessage {
        message_id: m.message_id.clone(),
        conversation_id: m.conversation_id.clone(),
        seq: SEQ_PLACEHOLDER,
        sender_id: m.sender_id.clone(),
        client_msg_id: m.client_msg_id.clone(),
        body: m.body.clone(),
        trace_id: m.trace_id.clone(),
        created_at_ms: m.created_at_ms,
    }
}

/// Every job's outbox rows, asked of its hooks once (each attempt writes the same rows).
fn outbox_rows(jobs: &mut [Job]) -> Result<Vec<Vec<OutboxRow>>> {
    jobs.iter_mut()
        .map(|job| {
            let msg = unsequenced(&job.msg);
            // A panicking callback fails this batch, not the batcher.
            std::panic::catch_unwind(AssertUnwindSafe(|| job.hooks.outbox_rows(&msg)))
                .map_err(|_| StoreError::Failed("an append's outbox callback panicked".into()))
        })
        .collect()
}

fn bookkeeping() -> StoreError {
    StoreError::Failed("the append batch's answer does not account for every message".into())
}

/// One attempt at writing the batch (one call of `chatstream_append_batch`, migration
/// 0007, outside a transaction block: its answer is the commit); the outcome of each
/// message, in `jobs` order.
async fn write_batch(
    pool: &PgPool,
    msgs: &[&NewMessage],
    rows: &[Vec<OutboxRow>],
) -> Result<Vec<Result<Appended>>> {
    let args = BatchArgs::new(msgs, rows);
    // `fetch_all` reads on to ReadyForQuery, which PostgreSQL sends only after the
    // commit: no waiter is answered for a call whose commit could still fail.
    let answer = sqlx::query(
        "SELECT r_i, r_kind, r_seq, r_message_id, r_body, r_trace_id, r_created_at_ms,
                r_same_as
         FROM chatstream_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9,
                                      $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(&args.conversation_id)
    .bind(&args.tenant)
    .bind(&args.sender_id)
    .bind(&args.client_msg_id)
    .bind(&args.message_id)
    .bind(&args.body)
    .bind(&args.trace_id)
    .bind(&args.node_id)
    .bind(&args.created_at_ms)
    .bind(&args.event_msg)
    .bind(&args.event_id)
    .bind(&args.shard)
    .bind(&args.topic)
    .bind(&args.key)
    .bind(&args.payload)
    .bind(&args.event_node_id)
    .bind(&args.event_created_at_ms)
    .bind(SEQ_MARK)
    .fetch_all(pool)
    .await?;

    let mut outcomes: Vec<Option<Outcome>> = msgs.iter().map(|_| None).collect();
    for row in &answer {
        let i: i64 = row.try_get("r_i")?;
        let index = usize::try_from(i - 1)
            .ok()
            .filter(|i| *i < msgs.len())
            .ok_or_else(bookkeeping)?;
        let m = msgs[index];
        let kind: String = row.try_get("r_kind")?;
        let outcome = match kind.as_str() {
            "n" => Outcome::New(StoredMessage {
                seq: row
                    .try_get::<Option<i64>, _>("r_seq")?
                    .ok_or_else(bookkeeping)?,
                ..unsequenced(m)
            }),
            "d" => Outcome::Stored(StoredMessage {
                message_id: row
                    .try_get::<Option<String>, _>("r_message_id")?
                    .ok_or_else(bookkeeping)?,
                conversation_id: m.conversation_id.clone(),
                seq: row
                    .try_get::<Option<i64>, _>("r_seq")?
                    .ok_or_else(bookkeeping)?,
                sender_id: m.sender_id.clone(),
                client_msg_id: m.client_msg_id.clone(),
                body: row
                    .try_get::<Option<String>, _>("r_body")?
                    .ok_or_else(bookkeeping)?,
                trace_id: row
                    .try_get::<Option<String>, _>("r_trace_id")?
                    .ok_or_else(bookkeeping)?,
                created_at_ms: row
                    .try_get::<Option<i64>, _>("r_created_at_ms")?
                    .ok_or_else(bookkeeping)?,
            }),
            "s" => {
                let first: i64 = row.try_get("r_same_as")?;
                let first = usize::try_from(first - 1)
                    .ok()
                    .filter(|f| *f < index)
                    .ok_or_else(bookkeeping)?;
                Outcome::SameAs(first)
            }
            "x" => Outcome::NotMember,
            _ => return Err(bookkeeping()),
        };
        outcomes[index] = Some(outcome);
    }
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bookkeeping)?;

    let mut answers: Vec<Result<Appended>> = Vec::with_capacity(outcomes.len());
    for (m, outcome) in msgs.iter().zip(&outcomes) {
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
                // Only a new message is the first holder of a key.
                _ => Err(bookkeeping()),
            },
        });
    }
    Ok(answers)
}

/// The columns of one batch's call: its messages, and the outbox rows of each (`event_msg`
/// names the message a row belongs to, from 1).
struct BatchArgs<'a> {
    conversation_id: Vec<&'a str>,
    tenant: Vec<&'a str>,
    sender_id: Vec<&'a str>,
    client_msg_id: Vec<&'a str>,
    message_id: Vec<&'a str>,
    body: Vec<&'a str>,
    trace_id: Vec<&'a str>,
    node_id: Vec<&'a str>,
    created_at_ms: Vec<i64>,
    event_msg: Vec<i64>,
    event_id: Vec<&'a str>,
    shard: Vec<i32>,
    topic: Vec<&'a str>,
    key: Vec<&'a str>,
    payload: Vec<&'a str>,
    event_node_id: Vec<&'a str>,
    event_created_at_ms: Vec<i64>,
}

impl<'a> BatchArgs<'a> {
    fn new(msgs: &[&'a NewMessage], rows: &'a [Vec<OutboxRow>]) -> BatchArgs<'a> {
        let column = |f: fn(&NewMessage) -> &String| -> Vec<&'a str> {
            msgs.iter().map(|m| f(m).as_str()).collect()
        };
        let events = || rows.iter().flatten();
        let event_column = |f: fn(&OutboxRow) -> &String| -> Vec<&'a str> {
            rows.iter().flatten().map(|r| f(r).as_str()).collect()
        };
        BatchArgs {
            conversation_id: column(|m| &m.conversation_id),
            tenant: column(|m| &m.tenant),
            sender_id: column(|m| &m.sender_id),
            client_msg_id: column(|m| &m.client_msg_id),
            message_id: column(|m| &m.message_id),
            body: column(|m| &m.body),
            trace_id: column(|m| &m.trace_id),
            node_id: column(|m| &m.node_id),
            created_at_ms: msgs.iter().map(|m| m.created_at_ms).collect(),
            event_msg: rows
                .iter()
                .enumerate()
                .flat_map(|(i, r)| std::iter::repeat_n(i as i64 + 1, r.len()))
                .collect(),
            event_id: event_column(|r| &r.event_id),
            shard: events().map(|r| shard_of(&r.key)).collect(),
            topic: event_column(|r| &r.topic),
            key: event_column(|r| &r.key),
            payload: event_column(|r| &r.payload),
            event_node_id: event_column(|r| &r.node_id),
            event_created_at_ms: events().map(|r| r.created_at_ms).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seq_mark_is_the_placeholder_as_json_writes_it() {
        assert_eq!(SEQ_MARK, format!("\"seq\":{SEQ_PLACEHOLDER}"));
        #[derive(serde::Serialize)]
        struct Body {
            seq: i64,
        }
        let json = serde_json::to_string(&Body {
            seq: SEQ_PLACEHOLDER,
        })
        .expect("a struct of one integer serializes");
        assert_eq!(json, format!("{{{SEQ_MARK}}}"));
    }
}
