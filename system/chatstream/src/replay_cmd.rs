//! `chatstream replay ...`, `chatstream lag`, `chatstream audit ...`, `chatstream search`:
//! reading history and projections back, from the command line. `lag` counts the topics
//! the group consumes (its committed offsets and its members' assignments) unless told.

use anyhow::{bail, Context, Result};
use chatstream_replay::{self as replay, Range, ResetTo};
use chatstream_workers::consumer::{Handler, RecordMeta};
use chatstream_workers::handlers::{Analytics, Audit, Search};
use chatstream_workers::{bulk, queries};

const BATCH: usize = 5_000;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

use crate::workers_cmd::open_store;

#[derive(Args)]
pub struct Endpoints {
    #[arg(
        long,
        env = "CHATSTREAM_KAFKA_BOOTSTRAP",
        default_value = "127.0.0.1:29011,127.0.0.1:29012,127.0.0.1:29013",
        global = true
    )]
    pub kafka_bootstrap: String,
    #[arg(
        long,
        env = "CHATSTREAM_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:29060/chatstream",
        global = true
    )]
    pub postgres_url: String,
}

#[derive(Subcommand)]
pub enum ReplayCommand {
    /// One stream session's events in order (JSON lines).
    Timeline { session_id: String },
    /// Every event of a topic at or after a time (Unix ms or RFC 3339), up to the end
    /// offsets captured at the start (JSON lines; a progress bar on stderr).
    From {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        since: String,
    },
    /// Records of one partition in [from, to) (JSON lines).
    Offsets {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partition: i32,
        #[arg(long)]
        from: i64,
        #[arg(long)]
        to: i64,
    },
    /// Rebuild a projection (audit, search or analytics) from scratch from Kafka, as a
    /// replay (events marked replayed), and print its digest.
    Rebuild { projection: String },
    /// Print a projection's digest (compare a rebuilt one with the live one).
    Digest { projection: String },
    /// Start a new consumer group at the earliest offsets (it then backfills everything).
    Backfill {
        #[arg(long)]
        group: String,
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
    },
    /// Move an idle group to the earliest offsets or to a time; refused while it is active.
    Reset {
        #[arg(long)]
        group: String,
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Unix ms or RFC 3339; earliest when absent.
        #[arg(long)]
        to_time: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// A user's events, newest first.
    User {
        id: String,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// A conversation's events, in order.
    Conversation {
        id: String,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// STREAM_ERROR events of the last N hours.
    Errors {
        #[arg(long, default_value_t = 24)]
        hours: i64,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Event counts by type.
    Counts,
    /// Per-minute volume, error rate and latency percentiles (analytics worker).
    Minutes {
        #[arg(long, default_value_t = 1)]
        hours: i64,
    },
}

pub fn parse_time(s: &str) -> Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).with_context(|| {
        format!("{s:?} is neither Unix milliseconds nor RFC 3339 (2026-11-25T08:00:00Z)")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

fn bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

/// A replayed record as JSON: where it was, when, and its event (null if not JSON).
pub fn record_json(r: &replay::Replayed) -> serde_json::Value {
    let value = r
        .payload
        .as_deref()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .unwrap_or(serde_json::Value::Null);
    serde_json::json!({ "partition": r.partition, "offset": r.offset, "timestamp_ms": r.timestamp_ms, "event": value })
}

fn print_record(r: &replay::Replayed) {
    println!("{}", record_json(r));
}

fn print_records(bootstrap: &str, topic: &str, ranges: &[Range]) -> Result<u64> {
    let total: u64 = ranges.iter().map(|r| r.len() as u64).sum();
    let pb = bar(total);
    let n = replay::read(
        bootstrap,
        topic,
        ranges,
        Duration::from_secs(3600),
        |r| print_record(&r),
        |done, _| pb.set_position(done),
    )?;
    pb.finish_and_clear();
    eprintln!("replayed {n} records of {topic} ({total} in range)");
    Ok(n)
}

/// Empties a projection (and its processed markers) and replays its topics into it.
pub async fn rebuild(bootstrap: &str, postgres_url: &str, projection: &str) -> Result<(u64, f64)> {
    let store = open_store(postgres_url).await?;
    let pool = store.pool().clone();
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
        other => bail!("unknown projection {other:?}; use audit, search or analytics"),
    };
    for t in tables {
        sqlx::query(&format!("TRUNCATE {t}")).execute(&pool).await?;
    }
    sqlx::query("DELETE FROM processed_events WHERE consumer_group = $1")
        .bind(&group)
        .execute(&pool)
        .await?;
    let started = Instant::now();
    let mut total = 0u64;
    for topic in &topics {
        let ranges = replay::ranges_all(bootstrap, topic)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<replay::Replayed>(10_000);
        let (b, t, r) = (bootstrap.to_string(), topic.clone(), ranges.clone());
        let reader = tokio::task::spawn_blocking(move || {
            let pb = bar(r.iter().map(|x| x.len() as u64).sum());
            let n = replay::read(
                &b,
                &t,
                &r,
                Duration::from_secs(3600),
                |rec| {
                    let _ = tx.blocking_send(rec);
                },
                |done, _| pb.set_position(done),
            );
            pb.finish_and_clear();
            n
        });
        // Audit and search are written in bulk (thousands of rows per statement);
        // analytics goes event by event through its live handler (it aggregates).
        let mut batch: Vec<(chatstream_protocol::EventEnvelope, i32, i64)> =
            Vec::with_capacity(BATCH);
        loop {
            let next = rx.recv().await;
            let done = next.is_none();
            if let Some(rec) = next {
                let Some(event) = rec.event() else { continue };
                if projection == "analytics" {
                    let meta = RecordMeta {
                        topic: topic.clone(),
                        partition: rec.partition,
                        offset: rec.offset,
                    };
                    let handler = Analytics {
                        pool: pool.clone(),
                        group: group.clone(),
                        unsafe_no_dedupe: false,
                    };
                    if let Err(e) = handler.handle(&event, &meta).await {
                        tracing::warn!(error = %e, offset = rec.offset, "event skipped during rebuild");
                    }
                    continue;
                }
                batch.push((event, rec.partition, rec.offset));
            }
            if batch.len() >= BATCH || (done && !batch.is_empty()) {
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
                        bulk::audit(&pool, &rows).await?;
                    }
                    _ => {
                        let events: Vec<_> = batch.drain(..).map(|(e, _, _)| e).collect();
                        bulk::search(&pool, &events).await?;
                    }
                }
            }
            if done {
                break;
            }
        }
        total += reader.await??;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

pub async fn run_replay(cmd: ReplayCommand, ep: Endpoints) -> Result<()> {
    let b = ep.kafka_bootstrap.clone();
    match cmd {
        ReplayCommand::Timeline { session_id } => {
            let events =
                tokio::task::spawn_blocking(move || replay::session_timeline(&b, &session_id))
                    .await??;
            for e in &events {
                println!("{}", e.to_json());
            }
            eprintln!("{} events", events.len());
        }
        ReplayCommand::From { topic, since } => {
            let since = parse_time(&since)?;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let ranges = replay::ranges_from_timestamp(&b, &topic, since)?;
                let pb = bar(ranges.iter().map(|r| r.len() as u64).sum());
                let n = replay::read_since(
                    &b,
                    &topic,
                    since,
                    Duration::from_secs(3600),
                    |r| print_record(&r),
                    |done, _| pb.set_position(done),
                )?;
                pb.finish_and_clear();
                eprintln!("replayed {n} records of {topic} at or after {since}");
                Ok(())
            })
            .await??;
        }
        ReplayCommand::Offsets {
            topic,
            partition,
            from,
            to,
        } => {
            if to < from {
                bail!("--to ({to}) is before --from ({from})");
            }
            tokio::task::spawn_blocking(move || -> Result<()> {
                print_records(
                    &b,
                    &topic,
                    &[Range {
                        partition,
                        from,
                        to,
                    }],
                )?;
                Ok(())
            })
            .await??;
        }
        ReplayCommand::Rebuild { projection } => {
            let (n, secs) = rebuild(&b, &ep.postgres_url, &projection).await?;
            let store = open_store(&ep.postgres_url).await?;
            let digest = queries::digest(store.pool(), &projection).await?;
            println!(
                "{}",
                serde_json::json!({ "projection": projection, "events": n, "seconds": secs, "events_per_s": n as f64 / secs.max(1e-9), "digest": digest })
            );
        }
        ReplayCommand::Digest { projection } => {
            let store = open_store(&ep.postgres_url).await?;
            println!("{}", queries::digest(store.pool(), &projection).await?);
        }
        ReplayCommand::Backfill { group, topics } => {
            let out = tokio::task::spawn_blocking(move || {
                replay::reset_group(&b, &group, &topics, ResetTo::Earliest)
            })
            .await??;
            println!("{}", serde_json::json!({ "committed": out }));
        }
        ReplayCommand::Reset {
            group,
            topics,
            to_time,
        } => {
            let to = match to_time {
                Some(t) => ResetTo::Timestamp(parse_time(&t)?),
                None => ResetTo::Earliest,
            };
            let out =
                tokio::task::spawn_blocking(move || replay::reset_group(&b, &group, &topics, to))
                    .await??;
            println!("{}", serde_json::json!({ "committed": out }));
        }
    }
    Ok(())
}

/// The topics `group` consumes: those it has committed offsets for, and those its
/// members are assigned right now (a group that has not committed yet). Kafka's internal
/// topics are left out.
pub fn group_topics(bootstrap: &str, group: &str) -> Result<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    const TIMEOUT: Duration = Duration::from_secs(10);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let md = c.fetch_metadata(None, TIMEOUT)?;
    let mut all = TopicPartitionList::new();
    for t in md.topics() {
        if t.name().starts_with("__") || t.error().is_some() {
            continue;
        }
        for p in t.partitions() {
            all.add_partition(t.name(), p.id());
        }
    }
    // The coordinator may be loading or moving (a broker restarted): retry briefly.
    let mut tries = 0;
    let committed = loop {
        match c.committed_offsets(all.clone(), TIMEOUT) {
            Ok(t) => break t,
            Err(e) if tries < 10 => {
                tracing::debug!(error = %e, "reading committed offsets; retrying");
                tries += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e).context("reading the group's committed offsets"),
        }
    };
    let mut topics: std::collections::BTreeSet<String> = committed
        .elements()
        .iter()
        .filter(|e| matches!(e.offset(), Offset::Offset(_)))
        .map(|e| e.topic().to_string())
        .collect();
    let groups = c.fetch_group_list(Some(group), TIMEOUT)?;
    for g in groups.groups().iter().filter(|g| g.name() == group) {
        if g.protocol_type() != "consumer" {
            continue;
        }
        for m in g.members() {
            if let Some(assigned) = m.assignment().and_then(assigned_topics) {
                topics.extend(assigned);
            }
        }
    }
    Ok(topics.into_iter().collect())
}

/// Topic names in a consumer-protocol assignment (version i16, then an array of (topic:
/// string i16-prefixed, partitions: array of i32), then user data); None if malformed.
pub fn assigned_topics(bytes: &[u8]) -> Option<Vec<String>> {
    let mut at = 2usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let i32_at = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let count = i32_at(take(4)?);
    let mut out = Vec::new();
    for _ in 0..count.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let name = std::str::from_utf8(take(usize::try_from(len).ok()?)?).ok()?;
        let partitions = i32_at(take(4)?);
        take(4 * usize::try_from(partitions.max(0)).ok()?)?;
        out.push(name.to_string());
    }
    Some(out)
}

/// `chatstream lag --group G [--topics ...]`: the group's lag per partition and in total,
/// on the topics given or else on the topics the group consumes ([`group_topics`]).
pub async fn run_lag(group: String, topics: Vec<String>, ep: Endpoints) -> Result<()> {
    let b = ep.kafka_bootstrap;
    let lags = tokio::task::spawn_blocking(move || -> Result<Vec<replay::PartitionLag>> {
        let topics = if topics.is_empty() {
            let found = group_topics(&b, &group)?;
            if found.is_empty() {
                eprintln!(
                    "group {group} has no committed offsets and no members: nothing to count"
                );
            }
            found
        } else {
            topics
        };
        Ok(replay::lag(&b, &group, &topics)?)
    })
    .await??;
    let total: i64 = lags.iter().map(|l| l.lag).sum();
    for l in &lags {
        println!(
            "{:<28} {:>3}  committed {:>10}  end {:>10}  lag {:>8}",
            l.topic,
            l.partition,
            l.committed.map_or("-".to_string(), |c| c.to_string()),
            l.end,
            l.lag
        );
    }
    println!("total lag {total}");
    Ok(())
}

pub async fn run_audit(cmd: AuditCommand, ep: Endpoints) -> Result<()> {
    let store = open_store(&ep.postgres_url).await?;
    let pool = store.pool();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let out = match cmd {
        AuditCommand::User { id, limit } => {
            serde_json::to_value(queries::audit_by_user(pool, &id, limit).await?)?
        }
        AuditCommand::Conversation { id, limit } => {
            serde_json::to_value(queries::audit_by_conversation(pool, &id, limit).await?)?
        }
        AuditCommand::Errors { hours, limit } => {
            serde_json::to_value(queries::audit_errors(pool, hours, now, limit).await?)?
        }
        AuditCommand::Minutes { hours } => serde_json::to_value(
            queries::analytics_minutes(pool, now - hours * 3_600_000, 10_000).await?,
        )?,
        AuditCommand::Counts => serde_json::to_value(
            queries::audit_counts(pool)
                .await?
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub async fn run_search(tenant: String, query: String, limit: i64, ep: Endpoints) -> Result<()> {
    let store = open_store(&ep.postgres_url).await?;
    let hits = queries::search(store.pool(), &tenant, &query, limit).await?;
    println!("{}", serde_json::to_string_pretty(&hits)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_name_their_topics() {
        // version 1; two topics: "chat-events" [0, 3], "x" []; 4 bytes of user data.
        let mut b = vec![0, 1, 0, 0, 0, 2];
        b.extend([0, 11]);
        b.extend(b"chat-events");
        b.extend([0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]);
        b.extend([0, 1, b'x', 0, 0, 0, 0]);
        b.extend([0, 0, 0, 0]);
        assert_eq!(
            assigned_topics(&b),
            Some(vec!["chat-events".to_string(), "x".to_string()])
        );
        assert_eq!(assigned_topics(&b[..9]), None, "truncated");
        assert_eq!(assigned_topics(&[]), None);
    }
}
