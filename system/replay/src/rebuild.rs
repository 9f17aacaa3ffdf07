//! Projection rebuilds: a projection (audit, search or analytics) made again from every
//! record of its topics, as a replay (events marked replayed).
//!
//! Audit and search are bulk-loaded into a shadow table ([`crate::shadow`]): records read
//! and decoded on one thread, each event's row kept once (the live workers' idempotency,
//! applied by the reader), streamed by COPY over a few connections, the indexes built
//! once at the end, the shadow swapped in for the table; then the records that arrived
//! meanwhile are written into the new table as the live workers write them. Analytics
//! aggregates into shared per-minute rows, so it is emptied (with its processed markers)
//! and refilled in place through its live handler's batch path, one writer.

use chatstream_protocol::EventEnvelope;
use chatstream_workers::bulk;
use chatstream_workers::consumer::{Handler, RecordMeta};
use chatstream_workers::handlers::{Analytics, Audit, Search};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::shadow::Shadow;
use crate::{read_records, Offsets, Range, ReplayError};

/// Events per batch handed from the reader to a writer.
const BATCH: usize = 5_000;

/// At most this many writers: each holds a connection of the pool for a whole topic.
pub const MAX_WRITERS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("unknown projection {0:?}; use audit, search or analytics")]
    UnknownProjection(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Reader(#[from] tokio::task::JoinError),
}

/// How a rebuild went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebuilt {
    pub events: u64,
    pub seconds: f64,
    /// Seconds spent reading the topics into the table (the shadow for a bulk load; the
    /// whole rebuild in place).
    pub load_seconds: f64,
    /// Seconds building the shadow's indexes (0 in place).
    pub index_seconds: f64,
    /// Seconds swapping the shadow in and writing what arrived meanwhile (0 in place).
    pub swap_seconds: f64,
}

/// Shows one topic's replay as it goes (the command line draws a progress bar).
pub trait Progress: Send + 'static {
    fn position(&self, done: u64);
    fn finish(&self);
}

/// Writers per topic for audit and search: each owns a share of the partitions on its own
/// connection, so PostgreSQL parses and stores on as many backends.
pub const WRITERS: usize = 3;

/// Rebuilds `projection` from its topics; `progress` is called with each topic's record
/// count before it is read.
pub async fn rebuild<P: Progress>(
    bootstrap: &str,
    pool: &PgPool,
    projection: &str,
    progress: impl Fn(u64) -> P,
) -> Result<Rebuilt, RebuildError> {
    rebuild_with(bootstrap, pool, projection, Options::default(), progress).await
}

/// How a rebuild writes.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Connections writing at once for audit and search (1 to [`MAX_WRITERS`]); analytics
    /// always has one, since its batches update shared per-minute rows that concurrent
    /// transactions would lock in different orders.
    pub writers: usize,
    /// Audit and search emptied and refilled in place with the live workers' statements
    /// (every index kept up row by row), as analytics always is: the path before the bulk
    /// load, kept to compare with it.
    pub in_place: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            writers: WRITERS,
            in_place: false,
        }
    }
}

/// The projections, and what a rebuild writes each with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projection {
    Audit,
    Search,
    Analytics,
}

impl Projection {
    fn parse(name: &str) -> Result<Projection, RebuildError> {
        match name {
            "audit" => Ok(Projection::Audit),
            "search" => Ok(Projection::Search),
            "analytics" => Ok(Projection::Analytics),
            other => Err(RebuildError::UnknownProjection(other.to_string())),
        }
    }

    fn table(self) -> &'static str {
        match self {
            Projection::Audit => "audit_logs",
            Projection::Search => "search_messages",
            Projection::Analytics => "analytics_minutes",
        }
    }
}

/// [`rebuild`] as `options` say.
pub async fn rebuild_with<P: Progress>(
    bootstrap: &str,
    pool: &PgPool,
    projection: &str,
    options: Options,
    progress: impl Fn(u64) -> P,
) -> Result<Rebuilt, RebuildError> {
    let kind = Projection::parse(projection)?;
    let group = format!("rebuild-{projection}");
    let topics = match kind {
        Projection::Audit => Audit {
            pool: pool.clone(),
            group: group.clone(),
        }
        .topics(),
        Projection::Search => Search {
            pool: pool.clone(),
            group: group.clone(),
        }
        .topics(),
        Projection::Analytics => Analytics {
            pool: pool.clone(),
            group: group.clone(),
            unsafe_no_dedupe: false,
        }
        .topics(),
    };
    let target = |topic: &str| Target {
        pool: pool.clone(),
        kind,
        topic: topic.to_string(),
        group: group.clone(),
    };
    let started = Instant::now();
    let offsets = Offsets::connect(bootstrap)?;
    let writers = options.writers.clamp(1, MAX_WRITERS);
    let mut rebuilt = Rebuilt::default();
    rebuilt.events = if kind == Projection::Analytics || options.in_place {
        let writers = if kind == Projection::Analytics {
            1
        } else {
            writers
        };
        sqlx::query(&format!("TRUNCATE {}", kind.table()))
            .execute(pool)
            .await?;
        sqlx::query("DELETE FROM processed_events WHERE consumer_group = $1")
            .bind(&group)
            .execute(pool)
            .await?;
        let mut total = 0;
        for topic in &topics {
            let ranges = offsets.ranges_all(topic)?;
            total += insert_topic(bootstrap, target(topic), ranges, writers, &progress).await?;
        }
        rebuilt.load_seconds = started.elapsed().as_secs_f64();
        total
    } else {
        let shadow = Shadow::create(pool, kind.table()).await?;
        let mut seen = Seen::default();
        let mut read_to = Vec::with_capacity(topics.len());
        let mut total = 0;
        for topic in &topics {
            let ranges = offsets.ranges_all(topic)?;
            let copy = CopyTarget {
                target: target(topic),
                shadow: shadow.name().to_string(),
            };
            let writer = |rx| tokio::spawn(copy_writer(copy.clone(), rx));
            let (n, back) = read_into(
                bootstrap,
                &copy.target,
                ranges.clone(),
                writers,
                Some(seen),
                writer,
                &progress,
            )
            .await?;
            seen = back.unwrap_or_default();
            total += n;
            read_to.push((topic, ranges));
        }
        seen.apply_later_bodies(pool, shadow.name()).await?;
        rebuilt.load_seconds = started.elapsed().as_secs_f64();
        shadow.build_indexes(pool).await?;
        rebuilt.index_seconds = started.elapsed().as_secs_f64() - rebuilt.load_seconds;
        shadow.swap(pool).await?;
        // Records that arrived after each topic's ends were taken: a live worker may have
        // written them into the table just dropped, so they are written into the new one
        // as the live workers write them (the rows are idempotent).
        for (topic, before) in read_to {
            let now = offsets.ranges_all(topic)?;
            let tail: Vec<Range> = now
                .iter()
                .map(|r| Range {
                    partition: r.partition,
                    from: before
                        .iter()
                        .find(|b| b.partition == r.partition)
                        .map_or(r.from, |b| b.to.max(r.from)),
                    to: r.to,
                })
                .filter(|r| !r.is_empty())
                .collect();
            if !tail.is_empty() {
                total += insert_topic(bootstrap, target(topic), tail, writers, &progress).await?;
            }
        }
        rebuilt.swap_seconds =
            started.elapsed().as_secs_f64() - rebuilt.load_seconds - rebuilt.index_seconds;
        total
    };
    rebuilt.seconds = started.elapsed().as_secs_f64();
    Ok(rebuilt)
}

/// Where a topic's batches go.
#[derive(Clone)]
struct Target {
    pool: PgPool,
    kind: Projection,
    topic: String,
    group: String,
}

/// A topic's rows COPYed into a shadow table.
#[derive(Clone)]
struct CopyTarget {
    target: Target,
    shadow: String,
}

type Batch = Vec<(EventEnvelope, i32, i64)>;

/// The rows already sent to the shadow, by key (event id for audit, message id for
/// search), as 128-bit digests: the live workers write a row once per key (audit keeps
/// the first, search the first with the last body), so the reader does the same. Two
/// distinct keys share a digest with odds of about n²/2¹²⁹ (1e-21 for a billion keys).
#[derive(Default)]
struct Seen {
    keys: HashSet<u128>,
    /// Search only: a repeated message's last body, where it came again.
    later_bodies: HashMap<String, String>,
}

impl Seen {
    fn digest(key: &str) -> u128 {
        let mut low = DefaultHasher::new();
        key.hash(&mut low);
        let mut high = DefaultHasher::new();
        (0xA5u8, key).hash(&mut high);
        (u128::from(high.finish()) << 64) | u128::from(low.finish())
    }

    /// Whether `e` makes a row not written yet (and remembers it).
    fn first_row(&mut self, kind: Projection, e: &EventEnvelope) -> bool {
        match kind {
            Projection::Audit => bulk::audit_row_of(e) && self.keys.insert(Self::digest(&e.id)),
            Projection::Search => match bulk::searchable(e) {
                Some(m) if self.keys.insert(Self::digest(&m.message_id)) => true,
                Some(m) => {
                    self.later_bodies
                        .insert(m.message_id.clone(), m.body.clone());
                    false
                }
                None => false,
            },
            Projection::Analytics => true,
        }
    }

    /// Gives each repeated message its last body, as the live upsert does.
    async fn apply_later_bodies(&self, pool: &PgPool, shadow: &str) -> Result<(), sqlx::Error> {
        if self.later_bodies.is_empty() {
            return Ok(());
        }
        let (ids, bodies): (Vec<&String>, Vec<&String>) = self.later_bodies.iter().unzip();
        sqlx::query(&format!(
            "UPDATE {shadow} s SET body = v.body
             FROM UNNEST($1::text[], $2::text[]) AS v(id, body)
             WHERE s.message_id = v.id AND s.body IS DISTINCT FROM v.body"
        ))
        .bind(ids)
        .bind(bodies)
        .execute(pool)
        .await?;
        Ok(())
    }
}

/// Reads `ranges` of one topic on a blocking thread, decoding each record where the client
/// holds it, and hands whole batches to `writers` writer tasks (partition modulo writers,
/// so one key's events are written in order by one writer, as the live workers do):
/// reading, decoding and writing overlap and nothing crosses a channel one record at a
/// time. With `seen`, an event whose row was already written is left out.
async fn read_into<P: Progress>(
    bootstrap: &str,
    target: &Target,
    ranges: Vec<Range>,
    writers: usize,
    mut seen: Option<Seen>,
    writer: impl Fn(
        tokio::sync::mpsc::Receiver<Batch>,
    ) -> tokio::task::JoinHandle<Result<(), sqlx::Error>>,
    progress: &impl Fn(u64) -> P,
) -> Result<(u64, Option<Seen>), RebuildError> {
    let mut txs = Vec::with_capacity(writers);
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        // Two batches queued per writer: the next is ready when a statement returns.
        let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(2);
        txs.push(tx);
        tasks.push(writer(rx));
    }
    let (b, t, kind) = (bootstrap.to_string(), target.topic.clone(), target.kind);
    let shown = progress(ranges.iter().map(|x| x.len() as u64).sum());
    let reader = tokio::task::spawn_blocking(move || {
        let mut pending: Vec<Batch> = (0..writers).map(|_| Vec::with_capacity(BATCH)).collect();
        let n = read_records(
            &b,
            &t,
            &ranges,
            Duration::from_secs(3600),
            |rec| {
                let Some(event) = rec.event() else {
                    return ControlFlow::Continue(());
                };
                if seen.as_mut().is_some_and(|s| !s.first_row(kind, &event)) {
                    return ControlFlow::Continue(());
                }
                let w = rec.partition.unsigned_abs() as usize % writers;
                pending[w].push((event, rec.partition, rec.offset));
                if pending[w].len() >= BATCH {
                    let full = std::mem::replace(&mut pending[w], Vec::with_capacity(BATCH));
                    // A writer that failed has dropped its receiver: stop reading; its
                    // error is the one reported.
                    if txs[w].blocking_send(full).is_err() {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            },
            |done, _| shown.position(done),
        );
        for (tx, rest) in txs.iter().zip(pending) {
            if !rest.is_empty() {
                let _ = tx.blocking_send(rest);
            }
        }
        shown.finish();
        (n, seen)
    });
    let read = reader.await;
    // The writers' errors first: a failed writer also stops the reader.
    for task in tasks {
        task.await??;
    }
    let (n, seen) = read?;
    Ok((n?, seen))
}

/// One COPY into the shadow for a whole topic: each batch encoded as COPY text and sent.
async fn copy_writer(
    copy: CopyTarget,
    mut rx: tokio::sync::mpsc::Receiver<Batch>,
) -> Result<(), sqlx::Error> {
    use sqlx::postgres::PgPoolCopyExt;
    let Target {
        pool, kind, topic, ..
    } = &copy.target;
    let columns = match kind {
        Projection::Audit => bulk::AUDIT_COLUMNS,
        _ => bulk::SEARCH_COLUMNS,
    };
    let mut sink = pool
        .copy_in_raw(&format!("COPY {} ({columns}) FROM STDIN", copy.shadow))
        .await?;
    let mut text = Vec::with_capacity(1 << 20);
    while let Some(batch) = rx.recv().await {
        text.clear();
        for (e, partition, offset) in &batch {
            match kind {
                Projection::Audit => {
                    let at = bulk::Position {
                        topic,
                        partition: *partition,
                        offset: *offset,
                    };
                    bulk::copy_audit_row(&mut text, e, at)
                        .map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
                }
                _ => {
                    if let Some(m) = bulk::searchable(e) {
                        bulk::copy_search_row(&mut text, e, m);
                    }
                }
            }
        }
        sink.send(text.as_slice()).await?;
    }
    sink.finish().await?;
    Ok(())
}

/// Replays `ranges` of one topic into the projection's table with the live workers'
/// statements.
async fn insert_topic<P: Progress>(
    bootstrap: &str,
    target: Target,
    ranges: Vec<Range>,
    writers: usize,
    progress: &impl Fn(u64) -> P,
) -> Result<u64, RebuildError> {
    let writer = |mut rx: tokio::sync::mpsc::Receiver<Batch>| {
        let target = target.clone();
        tokio::spawn(async move {
            while let Some(mut batch) = rx.recv().await {
                insert_batch(&target, &mut batch).await?;
            }
            Ok(())
        })
    };
    let (n, _) = read_into(bootstrap, &target, ranges, writers, None, writer, progress).await?;
    Ok(n)
}

/// Writes (and empties) a batch: audit and search in one statement each, analytics through
/// its live handler's batch path (one transaction, markers included; a batch it refuses
/// goes event by event, and an event refused alone is skipped with a warning).
async fn insert_batch(target: &Target, batch: &mut Batch) -> Result<(), sqlx::Error> {
    let Target {
        pool,
        kind,
        topic,
        group,
    } = target;
    match kind {
        Projection::Audit => {
            let rows: Vec<_> = batch
                .drain(..)
                .map(|(e, partition, offset)| {
                    (
                        e,
                        bulk::Position {
                            topic,
                            partition,
                            offset,
                        },
                    )
                })
                .collect();
            bulk::audit(pool, &rows).await?;
        }
        Projection::Analytics => {
            let handler = Analytics {
                pool: pool.clone(),
                group: group.to_string(),
                unsafe_no_dedupe: false,
            };
            let events: Vec<(EventEnvelope, RecordMeta)> = batch
                .drain(..)
                .map(|(e, partition, offset)| {
                    let meta = RecordMeta {
                        topic: topic.to_string(),
                        partition,
                        offset,
                    };
                    (e, meta)
                })
                .collect();
            if let Err(e) = handler.handle_batch(&events).await {
                tracing::warn!(error = %e, events = events.len(), "analytics batch refused during rebuild; going event by event");
                for (event, meta) in &events {
                    if let Err(e) = handler.handle(event, meta).await {
                        tracing::warn!(error = %e, offset = meta.offset, "event skipped during rebuild");
                    }
                }
            }
        }
        Projection::Search => {
            let events: Vec<_> = batch.drain(..).map(|(e, _, _)| e).collect();
            bulk::search(pool, &events).await?;
        }
    }
    Ok(())
}
