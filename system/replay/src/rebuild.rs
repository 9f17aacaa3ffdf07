//! Projection rebuilds: a projection (audit, search or analytics) emptied, with its
//! processed markers, and filled again from every record of its topics, as a replay
//! (events marked replayed), thousands of events a statement: audit and search in bulk,
//! by a few writers at once (each owning a share of the partitions), analytics through its
//! live handler's batch path with one writer (it aggregates, so it keeps the live code's
//! sums and markers).

use chatstream_protocol::EventEnvelope;
use chatstream_workers::bulk;
use chatstream_workers::consumer::{Handler, RecordMeta};
use chatstream_workers::handlers::{Analytics, Audit, Search};
use sqlx::PgPool;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::{ranges_all, read_records, ReplayError};

/// Rows per bulk statement.
const BATCH: usize = 5_000;

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
#[derive(Debug, Clone, Copy)]
pub struct Rebuilt {
    pub events: u64,
    pub seconds: f64,
}

/// Shows one topic's replay as it goes (the command line draws a progress bar).
pub trait Progress: Send + 'static {
    fn position(&self, done: u64);
    fn finish(&self);
}

/// Writers per topic for audit and search: each owns a share of the partitions (so one
/// key's events are written in order by one writer, as the live workers do) on its own
/// connection. PostgreSQL spends most of a rebuild maintaining indexes, one backend per
/// statement: a few statements at once use the cores the reader leaves.
pub const WRITERS: usize = 3;

/// Empties `projection` (and its processed markers) and replays its topics into it;
/// `progress` is called with each topic's record count before it is read.
pub async fn rebuild<P: Progress>(
    bootstrap: &str,
    pool: &PgPool,
    projection: &str,
    progress: impl Fn(u64) -> P,
) -> Result<Rebuilt, RebuildError> {
    rebuild_with_writers(bootstrap, pool, projection, WRITERS, progress).await
}

/// [`rebuild`] with `writers` statements in flight at once for audit and search (1: one
/// statement at a time); analytics always has one, since its batches update shared
/// per-minute rows that concurrent transactions would lock in different orders.
pub async fn rebuild_with_writers<P: Progress>(
    bootstrap: &str,
    pool: &PgPool,
    projection: &str,
    writers: usize,
    progress: impl Fn(u64) -> P,
) -> Result<Rebuilt, RebuildError> {
    let group = format!("rebuild-{projection}");
    let (tables, topics): (&[&str], Vec<String>) = match projection {
        "audit" => (
            &["audit_logs"],
            Audit {
                pool: pool.clone(),
                group: group.clone(),
            }
            .topics(),
        ),
        "search" => (
            &["search_messages"],
            Search {
                pool: pool.clone(),
                group: group.clone(),
            }
            .topics(),
        ),
        "analytics" => (
            &["analytics_minutes"],
            Analytics {
                pool: pool.clone(),
                group: group.clone(),
                unsafe_no_dedupe: false,
            }
            .topics(),
        ),
        other => return Err(RebuildError::UnknownProjection(other.to_string())),
    };
    let writers = if projection == "analytics" {
        1
    } else {
        writers.max(1)
    };
    for t in tables {
        sqlx::query(&format!("TRUNCATE {t}")).execute(pool).await?;
    }
    sqlx::query("DELETE FROM processed_events WHERE consumer_group = $1")
        .bind(&group)
        .execute(pool)
        .await?;
    let started = Instant::now();
    let mut total = 0u64;
    for topic in &topics {
        let target = Target {
            pool: pool.clone(),
            projection: projection.to_string(),
            topic: topic.clone(),
            group: group.clone(),
        };
        total += rebuild_topic(bootstrap, target, writers, &progress).await?;
    }
    Ok(Rebuilt {
        events: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Where a topic's batches go.
#[derive(Clone)]
struct Target {
    pool: PgPool,
    projection: String,
    topic: String,
    group: String,
}

type Batch = Vec<(EventEnvelope, i32, i64)>;

/// Replays one topic into the projection: a blocking reader decodes each record where the
/// client holds it and hands whole batches to `writers` writer tasks (partition modulo
/// writers), so reading, decoding and writing overlap and nothing crosses a channel one
/// record at a time.
async fn rebuild_topic<P: Progress>(
    bootstrap: &str,
    target: Target,
    writers: usize,
    progress: &impl Fn(u64) -> P,
) -> Result<u64, RebuildError> {
    let ranges = ranges_all(bootstrap, &target.topic)?;
    let mut txs = Vec::with_capacity(writers);
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        // Two batches queued per writer: the next is ready when a statement returns.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(2);
        let target = target.clone();
        txs.push(tx);
        tasks.push(tokio::spawn(async move {
            while let Some(mut batch) = rx.recv().await {
                write_batch(&target, &mut batch).await?;
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    let (b, t, r) = (bootstrap.to_string(), target.topic.clone(), ranges.clone());
    let shown = progress(r.iter().map(|x| x.len() as u64).sum());
    let reader = tokio::task::spawn_blocking(move || {
        let mut pending: Vec<Batch> = (0..writers).map(|_| Vec::with_capacity(BATCH)).collect();
        let n = read_records(
            &b,
            &t,
            &r,
            Duration::from_secs(3600),
            |rec| {
                let Some(event) = rec.event() else {
                    return ControlFlow::Continue(());
                };
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
        n
    });
    let read = reader.await;
    // The writers' errors first: a failed writer also stops the reader.
    for task in tasks {
        task.await??;
    }
    Ok(read??)
}

/// Writes (and empties) a batch: audit and search in one statement each, analytics through
/// its live handler's batch path (one transaction, markers included; a batch it refuses
/// goes event by event, and an event refused alone is skipped with a warning).
async fn write_batch(target: &Target, batch: &mut Batch) -> Result<(), sqlx::Error> {
    let Target {
        pool,
        projection,
        topic,
        group,
    } = target;
    match projection.as_str() {
        "audit" => {
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
        "analytics" => {
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
        _ => {
            let events: Vec<_> = batch.drain(..).map(|(e, _, _)| e).collect();
            bulk::search(pool, &events).await?;
        }
    }
    Ok(())
}
