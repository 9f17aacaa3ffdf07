//! The at-least-once consumer loop every worker runs on.
//!
//! - Offsets are committed by hand, only past events that were handled (or dead-lettered):
//!   every `commit_interval` (30 ms; on a poll or at the tick), one commit at a time (see
//!   `TickCommits`), and when partitions are revoked and on shutdown.
//! - A transient failure pauses only that partition and retries the event with capped
//!   exponential backoff (1 s, 2 s, ... 30 s) while the loop keeps polling, so the
//!   consumer never stalls into a rebalance; on success the partition is sought to the
//!   event after it and resumed — and only once that seek succeeded: until then it stays
//!   paused and the seek is tried again, so records fetched (and dropped) during the retry
//!   are always read again. Independently, each partition's next offset is tracked: a
//!   record arriving past it (records skipped, whatever the cause) is not handled; the
//!   partition is sought back instead. No offset is committed past an unhandled record.
//! - A poison event (undecodable, unknown version, failing validation) goes to
//!   `<topic>-dlq` with the error and its origin in headers, and the worker moves on.
//! - An event the backend refuses for good (a database "data exception" or "integrity
//!   constraint violation", e.g. a NUL byte in a text or JSONB field: [`HandleError::
//!   Permanent`]) is tried `permanent_error_tries` times with the same backoff, then
//!   dead-lettered with the error, and the partition moves on. Transient errors (a backend
//!   down) are retried for as long as it takes: a stuck partition is reported instead (a
//!   [`PartitionWatch`] behind the workers' `/readyz`).
//! - Handlers make redelivery harmless (idempotent by event id), so a crash between
//!   handling and commit changes nothing.
//! - A worker with a batch path ([`Handler::BATCHES`]) gets every run of one partition's
//!   records that arrived together in one call (one statement or transaction, markers
//!   included, up to `WorkerConfig::max_batch` events); nothing waits to fill a batch. A batch that
//!   fails took no effect and its events go through the one-by-one path above, so the
//!   poison, refused and transient rules are the same either way.
//!
//! Sabotage (off by default, `WorkerConfig::unsafe_commit_before_handle`, the hidden
//! `--unsafe-commit-before-handle` of `chatstream workers`): the loop turns the rule
//! around — each event's offset is committed as soon as the event is read, and the event
//! is handled only at the next commit tick. A kill -9 then loses every event read since
//! the last tick (committed, never handled), which the `no_loss_downstream` checker must
//! catch as acknowledged messages missing from the audit trail.

use chatstream_protocol::EventEnvelope;
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::dlq;
use crate::health::PartitionWatch;

/// Where an event came from.
#[derive(Debug, Clone)]
pub struct RecordMeta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The event changed the projection.
    Applied,
    /// Nothing to do: already applied (a redelivery) or not this worker's kind of event.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// Worth retrying (a backend is down, a webhook timed out).
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (fails validation): dead-lettered.
    #[error("poison: {0}")]
    Poison(String),
    /// The backend refused this event itself (e.g. SQLSTATE class 22 or 23): tried a
    /// bounded number of times (`WorkerConfig::permanent_error_tries`), then dead-lettered.
    #[error("refused: {0}")]
    Permanent(String),
}

/// What a batch of events did to the projection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: u64,
    pub skipped: u64,
}

impl BatchOutcome {
    /// `applied` of a batch of `total` events; the rest were skipped.
    pub fn applied(applied: u64, total: usize) -> Self {
        BatchOutcome {
            applied,
            skipped: (total as u64).saturating_sub(applied),
        }
    }

    pub fn skipped(total: usize) -> Self {
        BatchOutcome::applied(0, total)
    }
}

impl RecordMeta {
    pub fn position(&self) -> crate::bulk::Position<'_> {
        crate::bulk::Position {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// What a worker does with one event, and optionally with a run of them.
pub trait Handler: Send + Sync + 'static {
    /// Whether [`Handler::handle_batch`] is implemented: the loop then hands it every run
    /// of events of one partition that arrived together (up to `WorkerConfig::max_batch`).
    const BATCHES: bool = false;

    /// The worker's name; its consumer group is `chatstream-<name>`.
    fn name(&self) -> &str;
    fn topics(&self) -> Vec<String>;
    fn handle(
        &self,
        event: &EventEnvelope,
        meta: &RecordMeta,
    ) -> impl Future<Output = Result<Handled, HandleError>> + Send;

    /// Handles `events` (one partition, in offset order) all together or not at all (one
    /// statement or one transaction, the processed markers included). On any error nothing
    /// of the batch took effect, and the loop hands the same events to
    /// [`Handler::handle`] one by one, which sorts out the poison, the refused and the
    /// transient: the batch path is only ever a faster way to the same rows.
    fn handle_batch(
        &self,
        _events: &[(EventEnvelope, RecordMeta)],
    ) -> impl Future<Output = Result<BatchOutcome, HandleError>> + Send {
        async {
            Err(HandleError::Transient(
                "this worker has no batch path".into(),
            ))
        }
    }
}

/// The most events one batch takes by default: enough to amortise a round trip over
/// hundreds of events, small enough that one statement stays well under PostgreSQL's
/// bind limits.
pub const DEFAULT_MAX_BATCH: usize = 1_000;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub bootstrap: String,
    /// Consumer group (default `chatstream-<worker>`).
    pub group: Option<String>,
    /// Consumers of this worker in this process (each gets its share of partitions).
    pub concurrency: usize,
    /// Most events handed to [`Handler::handle_batch`] at once; 1 turns batching off.
    pub max_batch: usize,
    pub commit_interval: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Test sabotage: exit the process right after handling this many events, before their
    /// offsets are committed (what a crash at the worst moment does).
    pub crash_after: Option<u64>,
    /// SABOTAGE, never for production: commit each event's offset as soon as it is read
    /// (asynchronously, at most every [`EARLY_COMMIT_EVERY`], and synchronously at each
    /// tick) and handle the events read so far only at the next commit tick, after that
    /// commit. A kill -9 loses the events of up to one `commit_interval`: their offsets are
    /// committed, their effects never happened, and no redelivery brings them back.
    pub unsafe_commit_before_handle: bool,
    /// SABOTAGE, never for production: one commit after the first events handled, then
    /// none (not at shutdown either); the lag grows with every event.
    pub unsafe_stall_commits: bool,
    /// Tries of an event the backend refuses for good ([`HandleError::Permanent`]) before
    /// it is dead-lettered (at least 1).
    pub permanent_error_tries: u32,
    /// Where this worker reports partitions it keeps retrying (the stuck-partition watch).
    pub watch: Option<Arc<PartitionWatch>>,
    /// Test fault injection, never for production: the first N pause and seek calls of
    /// each consumer fail as a broker could make them fail.
    pub test_fail_partition_ops: u32,
}

/// How often handled offsets are committed by default. A group's lag counts from its
/// committed offsets, and a commit is answered in 30-80 ms on a busy machine: with 100 ms
/// between commits the audit group (about 4,000 events/s in `steady`) read 400-750 behind
/// at the median and up to 2,800 at worst; with 30 ms (in effect, as soon as the last one
/// is answered) 330-500 at the median and 740-1,340 at worst (four runs).
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 30;

/// Sabotage only: how often offsets of events just read are committed ahead of handling.
pub const EARLY_COMMIT_EVERY: Duration = Duration::from_millis(10);

impl WorkerConfig {
    pub fn new(bootstrap: &str) -> Self {
        WorkerConfig {
            bootstrap: bootstrap.to_string(),
            group: None,
            concurrency: 1,
            max_batch: DEFAULT_MAX_BATCH,
            commit_interval: Duration::from_millis(DEFAULT_COMMIT_INTERVAL_MS),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            crash_after: None,
            unsafe_commit_before_handle: false,
            unsafe_stall_commits: false,
            permanent_error_tries: 3,
            watch: None,
            test_fail_partition_ops: 0,
        }
    }
}

type PartitionKey = (String, i32);

/// Shared between the loop and the rebalance callback.
#[derive(Default)]
struct Progress {
    /// Next offset to commit, per partition, for events handled.
    handled: BTreeMap<PartitionKey, i64>,
    /// Partitions revoked since the loop last looked.
    revoked: HashSet<PartitionKey>,
}

struct WorkerContext {
    progress: Arc<Mutex<Progress>>,
    worker: String,
    /// Sabotage: no commit on revoke either.
    stall_commits: bool,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let Ok(mut p) = self.progress.lock() else {
                return;
            };
            let mut commit = TopicPartitionList::new();
            for e in tpl.elements() {
                let key = (e.topic().to_string(), e.partition());
                if let Some(next) = p.handled.remove(&key) {
                    let _ =
                        commit.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next));
                }
                p.revoked.insert(key);
            }
            if commit.count() > 0 && !self.stall_commits {
                match consumer.commit(&commit, CommitMode::Sync) {
                    Ok(()) => {
                        tracing::info!(worker = %self.worker, partitions = commit.count(), "committed handled offsets before revoke")
                    }
                    Err(e) => {
                        tracing::warn!(worker = %self.worker, error = %e, "commit on revoke failed; events may be redelivered")
                    }
                }
            }
        }
    }
}

struct Retry {
    msg: OwnedMessage,
    attempt: u32,
    /// How many of the attempts the backend refused the event itself.
    refusals: u32,
    due: Instant,
}

/// Per-partition state of one consumer.
#[derive(Default)]
struct Partitions {
    /// Paused partitions whose event is being retried.
    retries: HashMap<PartitionKey, Retry>,
    /// Paused partitions waiting for a seek to this offset to succeed (then resumed).
    seeks: HashMap<PartitionKey, (i64, u32)>,
    /// The offset expected next: one past the last record handled in this assignment.
    expected: HashMap<PartitionKey, i64>,
    /// Partitions just sought: their first record may lie past the target legitimately
    /// (offsets taken by transaction markers or compaction), since the fetch restarted there.
    sought: HashSet<PartitionKey>,
}

impl Partitions {
    fn forget(&mut self, key: &PartitionKey) {
        self.retries.remove(key);
        self.seeks.remove(key);
        self.expected.remove(key);
        self.sought.remove(key);
    }

    /// Records of this partition that arrive now are dropped (they are read again later).
    fn held(&self, key: &PartitionKey) -> bool {
        self.retries.contains_key(key) || self.seeks.contains_key(key)
    }
}

/// Pause, seek and resume of one consumer's partitions, with the test fault injection.
struct PartitionOps<'a> {
    consumer: &'a StreamConsumer<WorkerContext>,
    fail_next: std::sync::atomic::AtomicU32,
}

impl PartitionOps<'_> {
    fn injected(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.fail_next
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn pause(&self, key: &PartitionKey) -> Result<(), String> {
        if self.injected() {
            return Err("pause failed (injected test fault)".into());
        }
        self.consumer
            .pause(&partition_list(&key.0, key.1))
            .map_err(|e| e.to_string())
    }

    fn seek(&self, key: &PartitionKey, to: i64) -> Result<(), String> {
        if self.injected() {
            return Err("seek failed (injected test fault)".into());
        }
        self.consumer
            .seek(&key.0, key.1, Offset::Offset(to), Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }

    fn resume(&self, key: &PartitionKey) {
        if let Err(e) = self.consumer.resume(&partition_list(&key.0, key.1)) {
            tracing::warn!(topic = %key.0, partition = key.1, error = %e, "resume failed");
        }
    }

    /// Seeks `key` to `to` and resumes it; when the seek fails the partition stays paused
    /// and `parts.seeks` holds it until a later try succeeds.
    fn seek_then_resume(&self, parts: &mut Partitions, key: &PartitionKey, to: i64, worker: &str) {
        match self.seek(key, to) {
            Ok(()) => {
                parts.seeks.remove(key);
                parts.sought.insert(key.clone());
                self.resume(key);
            }
            Err(e) => {
                let tries = parts.seeks.get(key).map_or(0, |(_, n)| *n) + 1;
                if tries == 1 || tries % 20 == 0 {
                    tracing::warn!(%worker, topic = %key.0, partition = key.1, offset = to, tries, error = %e, "seek failed; the partition stays paused until a seek succeeds");
                }
                parts.seeks.insert(key.clone(), (to, tries));
            }
        }
    }
}

/// Runs `concurrency` consumers of `handler` until `shutdown` turns true.
pub async fn run_worker<H: Handler>(
    config: WorkerConfig,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(|e| format!("creating the dead-letter producer: {e}"))?;
    let handled_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for instance in 0..config.concurrency.max(1) {
        let (config, handler, producer, shutdown, handled_total) = (
            config.clone(),
            handler.clone(),
            producer.clone(),
            shutdown.clone(),
            handled_total.clone(),
        );
        tasks.push(tokio::spawn(async move {
            run_instance(instance, config, handler, producer, shutdown, handled_total).await
        }));
    }
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(e) => first_error = first_error.or(Some(e.to_string())),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The handled offsets not committed yet.
fn uncommitted(
    progress: &Mutex<Progress>,
    committed: &HashMap<PartitionKey, i64>,
) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    if let Ok(p) = progress.lock() {
        for ((topic, partition), next) in &p.handled {
            if committed.get(&(topic.clone(), *partition)) != Some(next) {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
        }
    }
    tpl
}

/// Records what a commit that succeeded carried.
fn note_committed(committed: &mut HashMap<PartitionKey, i64>, tpl: &TopicPartitionList) {
    for e in tpl.elements() {
        if let Offset::Offset(o) = e.offset() {
            committed.insert((e.topic().to_string(), e.partition()), o);
        }
    }
}

fn commit_handled(
    consumer: &StreamConsumer<WorkerContext>,
    progress: &Mutex<Progress>,
    committed: &mut HashMap<PartitionKey, i64>,
    mode: CommitMode,
) {
    let tpl = uncommitted(progress, committed);
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => note_committed(committed, &tpl),
        Err(e) => tracing::warn!(error = %e, "offset commit failed; will retry"),
    }
}

/// The handled offsets' commits, at each tick and on a poll once the interval has passed:
/// synchronous, each on a blocking thread, one at a time. Asked while one is unanswered,
/// it sends nothing; the next carries everything handled since. (Asynchronous commits sent
/// every 100 ms regardless queued up at a busy coordinator: the committed offsets fell tens
/// of thousands behind what was handled, and the heartbeats waiting behind them ended a
/// consumer's session.) Recorded only once answered, so a failed one is carried by the next.
struct TickCommits {
    /// Labels the commit metrics.
    worker: String,
    unanswered:
        Option<tokio::task::JoinHandle<(TopicPartitionList, rdkafka::error::KafkaResult<()>)>>,
    last_sent: Option<Instant>,
    /// When the consumer started: the first commit waits the interval from here too.
    started: Instant,
    /// Sabotage: nothing is sent after the first commit.
    stalled: bool,
}

impl TickCommits {
    fn new(worker: &str, stalled: bool) -> Self {
        if stalled {
            tracing::warn!(
                worker,
                "SABOTAGE --unsafe-stall-commits: offsets are committed once, then never again"
            );
        }
        TickCommits {
            worker: worker.to_string(),
            unanswered: None,
            last_sent: None,
            started: Instant::now(),
            stalled,
        }
    }

    /// On a poll: commits only once `interval` has passed since the last commit was sent,
    /// or since the consumer started (a long interval still means few commits, the first
    /// one included: a first poll used to commit at once, so a worker told not to commit
    /// for ten minutes committed its first poll anyway), without waiting for the tick.
    async fn on_poll(
        &mut self,
        interval: Duration,
        consumer: &Arc<StreamConsumer<WorkerContext>>,
        progress: &Mutex<Progress>,
        committed: &mut HashMap<PartitionKey, i64>,
    ) {
        if self.last_sent.unwrap_or(self.started).elapsed() >= interval {
            self.tick(consumer, progress, committed).await;
        }
    }

    async fn tick(
        &mut self,
        consumer: &Arc<StreamConsumer<WorkerContext>>,
        progress: &Mutex<Progress>,
        committed: &mut HashMap<PartitionKey, i64>,
    ) {
        if self.unanswered.as_ref().is_some_and(|h| !h.is_finished())
            || (self.stalled && self.last_sent.is_some())
        {
            return;
        }
        self.settle(committed).await;
        let tpl = uncommitted(progress, committed);
        if tpl.count() == 0 {
            return;
        }
        let consumer = consumer.clone();
        self.last_sent = Some(Instant::now());
        let worker = self.worker.clone();
        self.unanswered = Some(tokio::task::spawn_blocking(move || {
            let asked = Instant::now();
            let result = consumer.commit(&tpl, CommitMode::Sync);
            // Their ratio is the coordinator's mean answer time.
            metrics::counter!("chatstream_worker_commits_total", "worker" => worker.clone())
                .increment(1);
            metrics::counter!("chatstream_worker_commit_wait_ms_total", "worker" => worker)
                .increment(asked.elapsed().as_millis() as u64);
            (tpl, result)
        }));
    }

    /// Waits for the unanswered commit (if any) and records what it carried. Before a
    /// final commit: an older one landing after it would move the offsets back.
    async fn settle(&mut self, committed: &mut HashMap<PartitionKey, i64>) {
        let Some(handle) = self.unanswered.take() else {
            return;
        };
        match handle.await {
            Ok((tpl, Ok(()))) => note_committed(committed, &tpl),
            Ok((_, Err(e))) => {
                tracing::warn!(error = %e, "offset commit failed; the next one carries its offsets")
            }
            Err(e) => tracing::warn!(error = %e, "offset commit task ended abnormally"),
        }
    }
}

/// Outcome of one attempt at an event.
enum Attempt {
    Done,
    /// A transient failure: tried again for as long as it takes.
    Retry(String),
    /// The backend refused the event itself: tried again a bounded number of times.
    Refused(String),
}

/// Copies `msg` to its dead-letter topic with `error`; Done once the dead letter is safe.
async fn dead_letter(
    worker: &str,
    producer: &FutureProducer,
    msg: &OwnedMessage,
    error: String,
) -> Attempt {
    metrics::counter!("chatstream_worker_dead_letters_total", "worker" => worker.to_string())
        .increment(1);
    tracing::warn!(worker, topic = %msg.topic(), partition = msg.partition(), offset = msg.offset(), %error, "dead-lettering event");
    match dlq::send(
        producer,
        worker,
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.payload(),
        &error,
    )
    .await
    {
        Ok(()) => Attempt::Done,
        Err(e) => Attempt::Retry(e),
    }
}

async fn attempt<H: Handler>(
    handler: &H,
    producer: &FutureProducer,
    msg: &OwnedMessage,
) -> Attempt {
    let meta = RecordMeta {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    let worker = handler.name();
    let event = match msg.payload().map(EventEnvelope::from_slice) {
        Some(Ok(e)) => e,
        Some(Err(e)) => return dead_letter(worker, producer, msg, e.to_string()).await,
        None => return dead_letter(worker, producer, msg, "empty payload".into()).await,
    };
    match handler.handle(&event, &meta).await {
        Ok(outcome) => {
            let label = if outcome == Handled::Applied {
                "applied"
            } else {
                "skipped"
            };
            metrics::counter!("chatstream_worker_events_total", "worker" => worker.to_string(), "outcome" => label).increment(1);
            Attempt::Done
        }
        Err(HandleError::Poison(e)) => dead_letter(worker, producer, msg, e).await,
        Err(HandleError::Transient(e)) => Attempt::Retry(e),
        Err(HandleError::Permanent(e)) => Attempt::Refused(e),
    }
}

/// Sabotage only: handles the events read since the last tick, whose offsets are already
/// committed. One that fails transiently is kept for the next tick (its offset stays
/// committed: a crash before then loses it too).
async fn handle_deferred<H: Handler>(
    handler: &H,
    producer: &FutureProducer,
    deferred: &mut Vec<OwnedMessage>,
    count_handled: &impl Fn(),
) {
    let mut again = Vec::new();
    for msg in deferred.drain(..) {
        match attempt(handler, producer, &msg).await {
            Attempt::Done => count_handled(),
            Attempt::Retry(e) | Attempt::Refused(e) => {
                tracing::warn!(worker = handler.name(), topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), error = %e, "failure of an already committed event; trying again next tick");
                again.push(msg);
            }
        }
    }
    *deferred = again;
}

fn partition_list(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

/// The polled records to handle, as runs per partition in offset order. Records of a
/// held partition and records already handled are dropped; a record past the offset
/// expected next (records skipped, whatever the cause) is not handled: its partition is
/// sought back to the expected offset instead. Each admitted record moves the expected
/// offset past itself, so the next record of the run is checked against it.
fn admitted_runs(
    parts: &mut Partitions,
    ops: &PartitionOps<'_>,
    worker: &str,
    polled: Vec<OwnedMessage>,
) -> Vec<(PartitionKey, Vec<OwnedMessage>)> {
    let mut runs: Vec<(PartitionKey, Vec<OwnedMessage>)> = Vec::new();
    for msg in polled {
        let key = (msg.topic().to_string(), msg.partition());
        if parts.held(&key) {
            // Fetched before the pause took effect; read again after the seek.
            continue;
        }
        let just_sought = parts.sought.remove(&key);
        if let Some(&next) = parts.expected.get(&key) {
            if msg.offset() < next {
                // Already handled (a fetch from before a seek back).
                continue;
            }
            if msg.offset() > next && !just_sought {
                metrics::counter!("chatstream_worker_offset_gaps_total", "worker" => worker.to_string()).increment(1);
                tracing::error!(%worker, topic = %key.0, partition = key.1, expected = next, got = msg.offset(), "records skipped; seeking back to the expected offset");
                if let Err(e) = ops.pause(&key) {
                    tracing::warn!(%worker, topic = %key.0, partition = key.1, error = %e, "pause failed; records are dropped until the seek succeeds");
                }
                ops.seek_then_resume(parts, &key, next, worker);
                continue;
            }
        }
        parts.expected.insert(key.clone(), msg.offset() + 1);
        match runs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, run)) => run.push(msg),
            None => runs.push((key, vec![msg])),
        }
    }
    runs
}

/// Hands `run` (each partition's events in order) to the handler's batch path. False when
/// any event in it does not decode or the batch failed: nothing of it took effect, and the
/// caller handles the events another way.
async fn try_batch<'a, H: Handler>(
    handler: &H,
    run: impl IntoIterator<Item = &'a OwnedMessage>,
) -> bool {
    let mut events = Vec::new();
    for msg in run {
        let Some(Ok(event)) = msg.payload().map(EventEnvelope::from_slice) else {
            return false;
        };
        let meta = RecordMeta {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        events.push((event, meta));
    }
    let worker = handler.name().to_string();
    let started = Instant::now();
    let result = handler.handle_batch(&events).await;
    // With chatstream_worker_batches_total: the mean time a batch holds the consumer.
    metrics::counter!("chatstream_worker_batch_us_total", "worker" => worker.clone())
        .increment(started.elapsed().as_micros() as u64);
    match result {
        Ok(outcome) => {
            metrics::counter!("chatstream_worker_events_total", "worker" => worker.clone(), "outcome" => "applied").increment(outcome.applied);
            metrics::counter!("chatstream_worker_events_total", "worker" => worker.clone(), "outcome" => "skipped").increment(outcome.skipped);
            metrics::counter!("chatstream_worker_batches_total", "worker" => worker).increment(1);
            true
        }
        Err(e) => {
            metrics::counter!("chatstream_worker_batch_fallbacks_total", "worker" => worker.clone()).increment(1);
            tracing::debug!(%worker, events = events.len(), error = %e, "batch failed; handling its events another way");
            false
        }
    }
}

async fn run_instance<H: Handler>(
    instance: usize,
    config: WorkerConfig,
    handler: Arc<H>,
    producer: FutureProducer,
    mut shutdown: watch::Receiver<bool>,
    handled_total: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let worker = handler.name().to_string();
    let group = config
        .group
        .clone()
        .unwrap_or_else(|| format!("chatstream-{worker}"));
    let progress = Arc::new(Mutex::new(Progress::default()));
    let context = WorkerContext {
        progress: progress.clone(),
        worker: worker.clone(),
        stall_commits: config.unsafe_stall_commits,
    };
    let consumer: StreamConsumer<WorkerContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("group.id", &group)
        .set("client.id", format!("{worker}-{instance}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "300000")
        .set("socket.nagle.disable", "true")
        // A fetch is answered once 64 KiB are there or after 50 ms, not as soon as one
        // record is: with the default (1 byte) every produce request woke every consumer of
        // its partitions, so the brokers answered hundreds of tiny fetches a second per
        // worker and the workers wrote as many small batches. 50 ms is what a record may
        // now wait in a quiet topic.
        .set("fetch.min.bytes", "65536")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(context)
        .map_err(|e| format!("creating consumer for {worker}: {e}"))?;
    let topics = handler.topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|e| format!("subscribing {worker} to {topics:?}: {e}"))?;
    tracing::info!(%worker, %group, instance, ?topics, "worker consuming");

    let consumer = Arc::new(consumer);
    let mut committed: HashMap<PartitionKey, i64> = HashMap::new();
    let mut tick_commits = TickCommits::new(&worker, config.unsafe_stall_commits);
    let mut parts = Partitions::default();
    let ops = PartitionOps {
        consumer: &consumer,
        fail_next: std::sync::atomic::AtomicU32::new(config.test_fail_partition_ops),
    };
    let tries = config.permanent_error_tries.max(1);
    let mut commit_tick = tokio::time::interval(config.commit_interval);
    let mut seek_tick = tokio::time::interval(Duration::from_millis(250));
    let backoff = |attempt: u32| {
        (config.first_backoff * 2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(config.max_backoff)
    };
    let count_handled = || {
        let n = handled_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if config.crash_after == Some(n) {
            tracing::error!(%worker, handled = n, "crash_after reached: exiting before committing offsets (test sabotage)");
            std::process::exit(86);
        }
    };
    let handled_here = |key: PartitionKey, next: i64| {
        if let Ok(mut p) = progress.lock() {
            p.handled.insert(key, next);
        }
        count_handled();
    };
    let watch_retry = |key: &PartitionKey, r: &Retry, error: &str| {
        if let Some(w) = &config.watch {
            w.retrying(
                &group,
                &key.0,
                key.1,
                r.msg.offset(),
                r.attempt,
                error,
                Instant::now(),
            );
        }
    };
    let watch_over = |key: &PartitionKey| {
        if let Some(w) = &config.watch {
            w.retry_over(&group, &key.0, key.1);
        }
    };
    let drain_revoked = |parts: &mut Partitions, committed: &mut HashMap<PartitionKey, i64>| {
        if let Ok(mut p) = progress.lock() {
            for key in p.revoked.drain() {
                parts.forget(&key);
                committed.remove(&key);
                watch_over(&key);
            }
        }
    };
    // Sabotage only: events read (and committed) but not handled yet.
    let unsafe_mode = config.unsafe_commit_before_handle;
    let mut deferred: Vec<OwnedMessage> = Vec::new();
    let mut last_early_commit = Instant::now();
    if unsafe_mode {
        tracing::warn!(%worker, instance, "SABOTAGE --unsafe-commit-before-handle: offsets are committed before events are handled; a crash loses events");
    }
    loop {
        // Forget partitions this consumer no longer owns.
        drain_revoked(&mut parts, &mut committed);
        let next_due = parts.retries.values().map(|r| r.due).min();
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = commit_tick.tick() => {
                if unsafe_mode {
                    // Sabotage: everything read is committed first, handled after.
                    commit_handled(&consumer, &progress, &mut committed, CommitMode::Sync);
                    handle_deferred(handler.as_ref(), &producer, &mut deferred, &count_handled).await;
                } else {
                    tick_commits.tick(&consumer, &progress, &mut committed).await;
                }
            }
            _ = seek_tick.tick(), if !parts.seeks.is_empty() => {
                let pending: Vec<(PartitionKey, i64)> = parts.seeks.iter().map(|(k, (to, _))| (k.clone(), *to)).collect();
                for (key, to) in pending {
                    ops.seek_then_resume(&mut parts, &key, to, &worker);
                    if !parts.seeks.contains_key(&key) {
                        tracing::info!(%worker, topic = %key.0, partition = key.1, offset = to, "seek succeeded; partition resumed");
                    }
                }
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)).into()), if next_due.is_some() => {
                let due: Vec<PartitionKey> = parts.retries.iter().filter(|(_, r)| r.due <= Instant::now()).map(|(k, _)| k.clone()).collect();
                for key in due {
                    let Some(mut r) = parts.retries.remove(&key) else { continue };
                    let mut outcome = attempt(handler.as_ref(), &producer, &r.msg).await;
                    if let Attempt::Refused(e) = outcome {
                        r.refusals += 1;
                        outcome = if r.refusals >= tries {
                            let error = format!("refused {} times, dead-lettered: {e}", r.refusals);
                            dead_letter(&worker, &producer, &r.msg, error).await
                        } else {
                            Attempt::Refused(e)
                        };
                    }
                    match outcome {
                        Attempt::Done => {
                            let next = r.msg.offset() + 1;
                            handled_here(key.clone(), next);
                            parts.expected.insert(key.clone(), next);
                            watch_over(&key);
                            // Records fetched and dropped during the retry come again from
                            // here; the partition resumes only once the seek succeeded.
                            ops.seek_then_resume(&mut parts, &key, next, &worker);
                            tracing::info!(%worker, topic = %key.0, partition = key.1, attempts = r.attempt + 1, resumed = !parts.seeks.contains_key(&key), "retry over");
                        }
                        Attempt::Retry(e) | Attempt::Refused(e) => {
                            r.attempt += 1;
                            r.due = Instant::now() + backoff(r.attempt);
                            metrics::counter!("chatstream_worker_retries_total", "worker" => worker.clone()).increment(1);
                            tracing::warn!(%worker, topic = %key.0, partition = key.1, offset = r.msg.offset(), attempt = r.attempt, refusals = r.refusals, error = %e, "still failing; next try in {:?}", backoff(r.attempt));
                            watch_retry(&key, &r, &e);
                            parts.retries.insert(key, r);
                        }
                    }
                }
            }
            msg = consumer.recv() => {
                let first = match msg {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        tracing::warn!(%worker, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let mut polled = vec![first];
                if H::BATCHES && !unsafe_mode {
                    // Whatever else is already fetched joins this batch; nothing waits for more.
                    while polled.len() < config.max_batch {
                        match consumer.recv().now_or_never() {
                            Some(Ok(m)) => polled.push(m.detach()),
                            Some(Err(e)) => {
                                tracing::warn!(%worker, error = %e, "consumer error");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                // A rebalance may have run inside recv(): forget what it took away first.
                drain_revoked(&mut parts, &mut committed);
                if !unsafe_mode {
                    // What the polls before this one handled, without waiting for the tick.
                    tick_commits.on_poll(config.commit_interval, &consumer, &progress, &mut committed).await;
                }
                if unsafe_mode {
                    for msg in polled {
                        let key = (msg.topic().to_string(), msg.partition());
                        if parts.held(&key) {
                            continue;
                        }
                        // Sabotage: the offset counts as done the moment the event is read.
                        if let Ok(mut p) = progress.lock() {
                            p.handled.insert(key, msg.offset() + 1);
                        }
                        deferred.push(msg);
                        if last_early_commit.elapsed() >= EARLY_COMMIT_EVERY {
                            commit_handled(&consumer, &progress, &mut committed, CommitMode::Async);
                            last_early_commit = Instant::now();
                        }
                    }
                    continue;
                }
                let runs = admitted_runs(&mut parts, &ops, &worker, polled);
                // Every partition's run in one batch first: a poll then costs one statement,
                // not one per partition, one after another. Only if it fails does each run
                // go alone (and, failing again, event by event).
                let batched = H::BATCHES
                    && runs.len() > 1
                    && try_batch(handler.as_ref(), runs.iter().flat_map(|(_, run)| run)).await;
                if batched {
                    for (key, run) in &runs {
                        for msg in run {
                            handled_here(key.clone(), msg.offset() + 1);
                        }
                    }
                }
                for (key, run) in runs.into_iter().filter(|_| !batched) {
                    if H::BATCHES && run.len() > 1 && try_batch(handler.as_ref(), &run).await {
                        for msg in &run {
                            handled_here(key.clone(), msg.offset() + 1);
                        }
                        continue;
                    }
                    for msg in run {
                        if parts.held(&key) {
                            // An event before it failed: it is read again after the retry.
                            break;
                        }
                        let mut outcome = attempt(handler.as_ref(), &producer, &msg).await;
                        let refused_first = matches!(outcome, Attempt::Refused(_));
                        if let Attempt::Refused(e) = &outcome {
                            if tries <= 1 {
                                outcome = dead_letter(&worker, &producer, &msg, format!("refused 1 time, dead-lettered: {e}")).await;
                            }
                        }
                        match outcome {
                            Attempt::Done => {
                                handled_here(key.clone(), msg.offset() + 1);
                                parts.expected.insert(key.clone(), msg.offset() + 1);
                            }
                            Attempt::Retry(e) | Attempt::Refused(e) => {
                                let refusals = u32::from(refused_first);
                                if let Err(pe) = ops.pause(&key) {
                                    tracing::warn!(%worker, topic = %key.0, partition = key.1, error = %pe, "pause failed; records are dropped until the retry is over and the seek succeeds");
                                }
                                metrics::counter!("chatstream_worker_retries_total", "worker" => worker.clone()).increment(1);
                                tracing::warn!(%worker, topic = %key.0, partition = key.1, offset = msg.offset(), refused = refused_first, error = %e, "event failed; partition paused, retry in {:?}", config.first_backoff);
                                let r = Retry { msg, attempt: 1, refusals, due: Instant::now() + config.first_backoff };
                                watch_retry(&key, &r, &e);
                                parts.retries.insert(key.clone(), r);
                            }
                        }
                    }
                }
                // What this poll handled, at once if no commit is unanswered: waiting for
                // the next poll kept it uncommitted for up to a fetch wait more.
                tick_commits.on_poll(config.commit_interval, &consumer, &progress, &mut committed).await;
            }
        }
    }
    if unsafe_mode {
        handle_deferred(handler.as_ref(), &producer, &mut deferred, &count_handled).await;
    }
    tick_commits.settle(&mut committed).await;
    if !config.unsafe_stall_commits {
        commit_handled(&consumer, &progress, &mut committed, CommitMode::Sync);
    }
    tracing::info!(%worker, instance, "worker stopped; handled offsets committed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_before_handle_is_off_by_default_and_commits_well_inside_a_tick() {
        let c = WorkerConfig::new("127.0.0.1:9092");
        assert!(!c.unsafe_commit_before_handle);
        assert_eq!(c.crash_after, None);
        // Sabotaged, an event is committed within EARLY_COMMIT_EVERY of being read but
        // handled only at the next tick: the gap is what a kill -9 loses.
        assert!(EARLY_COMMIT_EVERY * 3 <= c.commit_interval);
    }
}
