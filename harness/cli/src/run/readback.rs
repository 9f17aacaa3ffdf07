//! After the load has drained: read back, once, what the system made durable for this
//! run's conversations — the CHAT_MESSAGE events on `chat-events` (every partition from
//! its earliest offset to the end offset taken when reading, through the client proxies;
//! what was read of each partition is saved, so a checker can tell a partial read) and
//! the audit table's rows — waiting (bounded) for the outbox relay and the audit worker to
//! catch up with what was acknowledged. Saved as `readback.json.gz` so `squall check`
//! can re-check the run offline.

use anyhow::{Context, Result};
use chatstream_protocol::events::{EventBody, EventEnvelope};
use flate2::write::GzEncoder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use squall_check::{AuditRow, KafkaEvent, PartitionRead, Readback, ReplayDigest};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

pub const FILE_NAME: &str = "readback.json.gz";
const TOPIC: &str = "chat-events";

/// What to read back and for how long to wait for it.
pub struct Source {
    pub kafka_bootstrap: String,
    /// Set when the audit worker runs.
    pub postgres_url: Option<String>,
    pub conversations: HashSet<String>,
    /// Message ids acknowledged in the run (what to wait for).
    pub acked: HashSet<String>,
    pub timeout: Duration,
}

/// What one read of `chat-events` gave: this run's CHAT_MESSAGE events, what was read of
/// each partition, and whether every partition was read to its end offset.
struct KafkaRead {
    events: Vec<KafkaEvent>,
    partitions: Vec<PartitionRead>,
    complete: bool,
}

/// Reads `chat-events` from every partition's earliest offset to its end offset (both
/// taken before reading), keeping this run's CHAT_MESSAGE events.
fn read_kafka(bootstrap: &str, conversations: &HashSet<String>) -> Result<KafkaRead> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "squall-readback")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // An explicit start offset that is no longer valid must mean the earliest one,
        // never the latest (which would skip the whole partition).
        .set("auto.offset.reset", "earliest")
        .set("log_level", "3")
        .create()
        .context("creating the readback consumer")?;
    let md = consumer
        .fetch_metadata(Some(TOPIC), Duration::from_secs(10))
        .context("reading chat-events metadata")?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    // No partitions means the metadata was not usable (a broker just back, a leader
    // election): an empty read must never pass as a complete one.
    anyhow::ensure!(
        !partitions.is_empty(),
        "the metadata of {TOPIC} names no partition (error: {:?})",
        md.topics().first().and_then(|t| t.error())
    );
    let mut ends = BTreeMap::new();
    let mut reads: BTreeMap<i32, PartitionRead> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(TOPIC, *p, Duration::from_secs(10))
            .with_context(|| format!("offsets of {TOPIC}[{p}]"))?;
        reads.insert(
            *p,
            PartitionRead {
                partition: *p,
                low,
                high,
                first: None,
                last: None,
            },
        );
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(TOPIC, *p, Offset::Offset(low))?;
        }
    }
    consumer.assign(&tpl)?;
    let mut events = Vec::new();
    let mut reached: BTreeMap<i32, bool> = ends.keys().map(|p| (*p, false)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reached.values().any(|r| !r) && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg.context("reading chat-events")?;
        let (p, offset) = (msg.partition(), msg.offset());
        if let Some(r) = reads.get_mut(&p) {
            r.first = Some(r.first.map_or(offset, |f| f.min(offset)));
            r.last = Some(r.last.map_or(offset, |l| l.max(offset)));
        }
        if let Some(end) = ends.get(&p) {
            if offset + 1 >= *end {
                reached.insert(p, true);
            }
        }
        let Some(payload) = msg.payload() else {
            continue;
        };
        let Ok(env) = serde_json::from_slice::<EventEnvelope>(payload) else {
            continue;
        };
        let EventBody::ChatMessage(chat) = &env.body else {
            continue;
        };
        if !conversations.contains(&chat.conversation_id) {
            continue;
        }
        events.push(KafkaEvent {
            event_id: env.id.clone(),
            message_id: Some(chat.message_id.clone()),
            conversation_id: Some(chat.conversation_id.clone()),
            seq: Some(chat.seq),
            topic: TOPIC.into(),
            partition: p,
            offset,
        });
    }
    Ok(KafkaRead {
        events,
        partitions: reads.into_values().collect(),
        complete: reached.values().all(|r| *r),
    })
}

async fn read_audit(pool: &sqlx::PgPool, conversations: &[String]) -> Result<Vec<AuditRow>> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, message_id FROM audit_logs WHERE event_type = 'CHAT_MESSAGE' AND conversation_id = ANY($1)",
    )
    .bind(conversations)
    .fetch_all(pool)
    .await
    .context("reading audit_logs")?;
    Ok(rows
        .into_iter()
        .map(|(event_id, message_id)| AuditRow {
            event_id,
            message_id,
        })
        .collect())
}

fn covers(ids: impl Iterator<Item = Option<String>>, acked: &HashSet<String>) -> bool {
    let seen: HashSet<String> = ids.flatten().collect();
    acked.iter().all(|m| seen.contains(m))
}

/// Waits (up to the timeout) until Kafka and the audit table hold every acked message,
/// then returns the last reading. Missing messages after the wait are the checkers' business.
pub async fn collect(src: &Source) -> Result<Readback> {
    let started = Instant::now();
    let pool = match &src.postgres_url {
        Some(url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .context("connecting to PostgreSQL for the readback")?,
        ),
        None => None,
    };
    let conversations: Vec<String> = src.conversations.iter().cloned().collect();
    loop {
        let (bootstrap, convs) = (src.kafka_bootstrap.clone(), src.conversations.clone());
        let read = tokio::task::spawn_blocking(move || read_kafka(&bootstrap, &convs)).await?;
        let KafkaRead {
            events: chat_events,
            partitions,
            complete: kafka_complete,
        } = match read {
            Ok(r) => r,
            // Metadata not usable yet (a broker just back): ask again while time is left.
            Err(e) if started.elapsed() < src.timeout => {
                tracing::warn!(error = %format!("{e:#}"), "reading chat-events back; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let audit_rows = match &pool {
            Some(pool) => read_audit(pool, &conversations).await?,
            None => Vec::new(),
        };
        let kafka_covers = covers(chat_events.iter().map(|e| e.message_id.clone()), &src.acked);
        let audit_covers =
            pool.is_none() || covers(audit_rows.iter().map(|r| r.message_id.clone()), &src.acked);
        if (kafka_covers && audit_covers) || started.elapsed() >= src.timeout {
            tracing::info!(
                kafka = chat_events.len(),
                audit = audit_rows.len(),
                waited_s = started.elapsed().as_secs_f64(),
                "read back"
            );
            return Ok(Readback {
                chat_events,
                audit_rows,
                complete: kafka_complete,
                replay: Vec::new(),
                partitions,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub fn save(readback: &Readback, run_dir: &Path) -> Result<()> {
    let path = run_dir.join(FILE_NAME);
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut gz = GzEncoder::new(file, flate2::Compression::new(3));
    serde_json::to_writer(&mut gz, readback)?;
    gz.finish()?.flush()?;
    Ok(())
}

pub fn load(run_dir: &Path) -> Result<Readback> {
    let path = run_dir.join(FILE_NAME);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    serde_json::from_reader(flate2::read::GzDecoder::new(file))
        .with_context(|| format!("reading {}", path.display()))
}

/// Digests of `projections` as the live workers built them, then rebuilt by chatstream's
/// own replay (`chatstream replay rebuild`: empties the projection and replays the topics
/// from the start). The workers must be stopped and drained first.
pub async fn replay_digests(
    chatstream: &Path,
    kafka_bootstrap: &str,
    postgres_url: &str,
    projections: &[String],
) -> Vec<ReplayDigest> {
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(chatstream)
            .args(&args)
            .args([
                "--kafka-bootstrap",
                kafka_bootstrap,
                "--postgres-url",
                postgres_url,
            ])
            .output()
            .await
            .map_err(|e| format!("running {}: {e}", chatstream.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`chatstream {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let mut out = Vec::new();
    for p in projections {
        let live = run(vec!["replay".into(), "digest".into(), p.clone()]).await;
        let rebuilt = run(vec!["replay".into(), "rebuild".into(), p.clone()])
            .await
            .and_then(|text| {
                serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap_or_default())
                    .map_err(|e| format!("rebuild output is not JSON ({e}): {text}"))
            });
        let error = live.as_ref().err().or(rebuilt.as_ref().err()).cloned();
        let (digest, events) = match &rebuilt {
            Ok(v) => (
                v["digest"].as_str().map(str::to_string),
                v["events"].as_u64().unwrap_or(0),
            ),
            Err(_) => (None, 0),
        };
        out.push(ReplayDigest {
            projection: p.clone(),
            live: live.ok(),
            rebuilt: digest,
            events,
            error,
        });
    }
    out
}
