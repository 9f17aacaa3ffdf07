//! Projection rebuilds: a projection (audit, search or analytics) emptied, with its
//! processed markers, and filled again from every record of its topics, as a replay
//! (events marked replayed), thousands of events a statement: audit and search in bulk,
//! analytics through its live handler's batch path (it aggregates, so it keeps the live
//! code's sums and markers).

use chatstream_protocol::EventEnvelope;
use chatstream_workers::bulk;
use chatstream_workers::consumer::{Handler, RecordMeta};
use chatstream_workers::handlers::{Analytics, Audit, Search};
use sqlx::PgPool;
use std::time::{Duration, Instant};

use crate::{ranges_all, read, ReplayError, Replayed};

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

/// Empties `projection` (and its processed markers) and replays its topics into it;
/// `progress` is called with each topic's record count before it is read.
pub async fn rebuild<P: Progress>(
    bootstrap: &str,
    pool: &PgPool,
    projection: &str,
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
        total += rebuild_topic(bootstrap, pool, projection, &group, topic, &progress).await?;
    }
    Ok(Rebuilt {
        events: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Replays one topic into the projection: a blocking reader feeds a channel the
/// projection's writer drains, so reading and writing overlap.
async fn rebuild_topic<P: Progress>(
    bootstrap: &str,
    pool: &PgPool,
    projection: &str,
    group: &str,
    topic: &str,
    progress: &impl Fn(u64) -> P,
) -> Result<u64, RebuildError> {
    let ranges = ranges_all(bootstrap, topic)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Replayed>(10_000);
    let (b, t, r) = (bootstrap.to_string(), topic.to_string(), ranges.clone());
    let shown = progress(r.iter().map(|x| x.len() as u64).sum());
    let reader = tokio::task::spawn_blocking(move || {
        let n = read(
            &b,
            &t,
            &r,
            Duration::from_secs(3600),
            |rec| {
                let _ = tx.blocking_send(rec);
            },
            |done, _| shown.position(done),
        );
        shown.finish();
        n
    });
    let mut batch: Vec<(EventEnvelope, i32, i64)> = Vec::with_capacity(BATCH);
    loop {
        let next = rx.recv().await;
        let done = next.is_none();
        if let Some(rec) = next {
            let Some(event) = rec.event() else { continue };
            batch.push((event, rec.partition, rec.offset));
        }
        if batch.len() >= BATCH || (done && !batch.is_empty()) {
            write_batch(pool, projection, topic, group, &mut batch).await?;
        }
        if done {
            break;
        }
    }
    Ok(reader.await??)
}

/// Writes (and empties) a batch: audit and search in one statement each, analytics through
/// its live handler's batch path (one transaction, markers included; a batch it refuses
/// goes event by event, and an event refused alone is skipped with a warning).
async fn write_batch(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    group: &str,
    batch: &mut Vec<(EventEnvelope, i32, i64)>,
) -> Result<(), sqlx::Error> {
    match projection {
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
