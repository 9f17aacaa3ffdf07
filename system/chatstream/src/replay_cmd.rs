//! `chatstream replay ...`, `chatstream lag`, `chatstream audit ...`, `chatstream search`:
//! reading history and projections back, from the command line. The work is the replay
//! and workers crates'; this module parses arguments, draws progress and prints.

use anyhow::{bail, Result};
use chatstream_replay::{self as replay, parse_time, Range, ResetTo};
use chatstream_workers::queries;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

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
    Rebuild {
        projection: String,
        /// Connections writing at once for audit and search, each writer owning a share
        /// of the partitions (1 to 8); analytics always writes with one.
        #[arg(long, default_value_t = replay::rebuild::WRITERS)]
        writers: usize,
        /// Audit and search: empty the table and refill it with the live workers'
        /// statements (the path before the bulk load into a shadow table, to compare).
        #[arg(long)]
        in_place: bool,
    },
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

fn print_record(r: &replay::Replayed) {
    println!("{}", r.to_json());
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

/// A progress bar for one topic of a rebuild.
struct Bar(ProgressBar);

impl replay::Progress for Bar {
    fn position(&self, done: u64) {
        self.0.set_position(done);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
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
        ReplayCommand::Rebuild {
            projection,
            writers,
            in_place,
        } => {
            let store = open_store(&ep.postgres_url, "chatstream-replay").await?;
            let options = replay::rebuild::Options { writers, in_place };
            let rebuilt = replay::rebuild_with(&b, store.pool(), &projection, options, |total| {
                Bar(bar(total))
            })
            .await?;
            let (n, secs) = (rebuilt.events, rebuilt.seconds);
            let digest = queries::digest(store.pool(), &projection).await?;
            println!(
                "{}",
                serde_json::json!({
                    "projection": projection, "writers": writers, "in_place": in_place,
                    "events": n, "seconds": secs, "events_per_s": n as f64 / secs.max(1e-9),
                    "load_s": rebuilt.load_seconds, "index_s": rebuilt.index_seconds, "swap_s": rebuilt.swap_seconds,
                    "digest": digest
                })
            );
        }
        ReplayCommand::Digest { projection } => {
            let store = open_store(&ep.postgres_url, "chatstream-replay").await?;
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

/// `chatstream lag --group G [--topics ...]`: the group's lag per partition and in total,
/// on the topics given or else on the topics the group consumes (`replay::group_topics`).
pub async fn run_lag(group: String, topics: Vec<String>, ep: Endpoints) -> Result<()> {
    let b = ep.kafka_bootstrap;
    let lags = tokio::task::spawn_blocking(move || -> Result<Vec<replay::PartitionLag>> {
        let topics = if topics.is_empty() {
            let found = replay::group_topics(&b, &group)?;
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
    let store = open_store(&ep.postgres_url, "chatstream-replay").await?;
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
    let store = open_store(&ep.postgres_url, "chatstream-replay").await?;
    let hits = queries::search(store.pool(), &tenant, &query, limit).await?;
    println!("{}", serde_json::to_string_pretty(&hits)?);
    Ok(())
}
