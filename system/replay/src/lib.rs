//! chatstream-replay: reading history back out of Kafka, exactly.
//!
//! Every replay first fixes its end: the high watermark of each partition at the start.
//! It then reads each partition from its start offset up to that end and stops there —
//! not after an idle timeout — so a replay from T returns exactly the events at or after
//! T that existed when it began. Also: one session's timeline (one partition, found with
//! the Java client's murmur2 partitioner the nodes use), offset ranges, consumer-group
//! lag, backfill and reset (refused while the group has active members).
//!
//! A replay never skips silently: asked to start below a partition's earliest offset
//! (records retention already deleted) it refuses with an error naming the topic,
//! partition, offset and the earliest offset left; the reader runs with
//! `auto.offset.reset=error`, so records deleted while it reads are an error too.
//!
//! Built on that reading: `rebuild` (projections rebuilt from their topics), `http`
//! (replay over HTTP, served by the workers process), `groups` (the topics a group
//! consumes) and `time` (the times a replay starts from).

pub mod groups;
pub mod http;
pub mod rebuild;
pub mod shadow;
pub mod time;

pub use groups::{assigned_topics, group_topics, GroupTopicsError};
pub use rebuild::{rebuild, rebuild_with, Progress, RebuildError, Rebuilt};
pub use time::{parse_time, TimeError};

use chatstream_protocol::EventEnvelope;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("consumer group {group} is active ({members} members); stop its consumers before resetting it")]
    GroupActive { group: String, members: usize },
    #[error("{topic} partition {partition}: offset {offset} was deleted by retention (the earliest offset left is {earliest}); replay from {earliest} or later, or from a time")]
    OffsetDeleted {
        topic: String,
        partition: i32,
        offset: i64,
        earliest: i64,
    },
    #[error("replay did not reach the end offsets within {0:?}: {1}")]
    Timeout(Duration, String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ReplayError> = std::result::Result<T, E>;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One partition to read: `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

impl Range {
    pub fn len(&self) -> i64 {
        (self.to - self.from).max(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A record read back, with where it was.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// The event in `payload`, marked as replayed (so side effects are not fired twice).
fn replayed_event(payload: Option<&[u8]>) -> Option<EventEnvelope> {
    let mut e = EventEnvelope::from_slice(payload?).ok()?;
    e.replayed = true;
    Some(e)
}

/// A record as the client holds it, borrowed for the duration of one callback of
/// [`read_records`]: decoding from it copies nothing first.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

impl Record<'_> {
    /// The event, marked as replayed (so side effects are not fired twice).
    pub fn event(&self) -> Option<EventEnvelope> {
        replayed_event(self.payload)
    }

    /// The record with its key and payload copied out.
    pub fn detach(&self) -> Replayed {
        Replayed {
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(<[u8]>::to_vec),
            payload: self.payload.map(<[u8]>::to_vec),
        }
    }
}

impl Replayed {
    /// The event, marked as replayed (so side effects are not fired twice).
    pub fn event(&self) -> Option<EventEnvelope> {
        replayed_event(self.payload.as_deref())
    }

    /// The record as JSON: where it was, when, and its event (null if not JSON).
    pub fn to_json(&self) -> serde_json::Value {
        let value = self
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({ "partition": self.partition, "offset": self.offset, "timestamp_ms": self.timestamp_ms, "event": value })
    }
}

fn reader(bootstrap: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // Never used to commit: reads are by assignment.
        .set("group.id", "chatstream-replay-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Never jump elsewhere when a start offset is gone: that would skip records silently.
        .set("auto.offset.reset", "error")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .set("queued.max.messages.kbytes", "262144")
        // Keep fetching ahead of the caller: a replay reads whole partitions, so the
        // broker fetches should never wait for the queue to drain to the default 100,000.
        .set("queued.min.messages", "1000000")
        .create()?)
}

/// Partition ids of `topic`.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| ReplayError::NoTopic(topic.into()))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(ReplayError::NoTopic(topic.into()));
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort();
    Ok(ids)
}

/// The ranges covering `topic` from timestamp `from_ms` (inclusive) to the current end.
pub fn ranges_from_timestamp(bootstrap: &str, topic: &str, from_ms: i64) -> Result<Vec<Range>> {
    let c = reader(bootstrap)?;
    let mut query = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in partitions(&c, topic)? {
        let (_, high) = c.fetch_watermarks(topic, p, TIMEOUT)?;
        ends.insert(p, high);
        query.add_partition_offset(topic, p, Offset::Offset(from_ms))?;
    }
    let found = c.offsets_for_times(query, TIMEOUT)?;
    let mut out = Vec::new();
    for e in found.elements() {
        let end = ends[&e.partition()];
        // No record at or after the time: nothing to read in this partition.
        let from = match e.offset() {
            Offset::Offset(o) => o,
            _ => end,
        };
        out.push(Range {
            partition: e.partition(),
            from: from.min(end),
            to: end,
        });
    }
    out.sort_by_key(|r| r.partition);
    Ok(out)
}

/// The ranges covering all of `topic` (low to high watermark, as of now).
pub fn ranges_all(bootstrap: &str, topic: &str) -> Result<Vec<Range>> {
    Offsets::connect(bootstrap)?.ranges_all(topic)
}

/// One client for offset lookups, kept by a caller that looks up several topics or one
/// topic more than once: starting a client (connections, first metadata) takes 100-200 ms
/// on a busy machine, a lookup on a started one a few.
pub struct Offsets {
    consumer: BaseConsumer,
}

impl Offsets {
    pub fn connect(bootstrap: &str) -> Result<Offsets> {
        Ok(Offsets {
            consumer: reader(bootstrap)?,
        })
    }

    /// The ranges covering all of `topic` (low to high watermark, as of now).
    pub fn ranges_all(&self, topic: &str) -> Result<Vec<Range>> {
        partitions(&self.consumer, topic)?
            .into_iter()
            .map(|p| {
                let (low, high) = self.consumer.fetch_watermarks(topic, p, TIMEOUT)?;
                Ok(Range {
                    partition: p,
                    from: low,
                    to: high,
                })
            })
            .collect()
    }
}

/// The first of `ranges` that starts below its partition's earliest offset (deleted by
/// retention), as the error that says so.
fn deleted_start(c: &BaseConsumer, topic: &str, ranges: &[&Range]) -> Result<Option<ReplayError>> {
    for r in ranges {
        let (low, _) = c.fetch_watermarks(topic, r.partition, TIMEOUT)?;
        if r.from < low {
            return Ok(Some(ReplayError::OffsetDeleted {
                topic: topic.to_string(),
                partition: r.partition,
                offset: r.from,
                earliest: low,
            }));
        }
    }
    Ok(None)
}

/// Reads exactly `ranges` of `topic`, calling `each` per record and `progress` with
/// (records read, records to read) now and then. Stops when every range is read.
/// A range starting below its partition's earliest offset is refused
/// ([`ReplayError::OffsetDeleted`]) before anything is read.
pub fn read(
    bootstrap: &str,
    topic: &str,
    ranges: &[Range],
    deadline: Duration,
    mut each: impl FnMut(Replayed),
    progress: impl FnMut(u64, u64),
) -> Result<u64> {
    read_records(
        bootstrap,
        topic,
        ranges,
        deadline,
        |r| {
            each(r.detach());
            ControlFlow::Continue(())
        },
        progress,
    )
}

/// [`read`] with each record lent to `each` rather than copied out, and `each` able to
/// stop the replay early (`ControlFlow::Break`: the records read so far are counted).
pub fn read_records(
    bootstrap: &str,
    topic: &str,
    ranges: &[Range],
    deadline: Duration,
    mut each: impl FnMut(Record<'_>) -> ControlFlow<()>,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let total: u64 = ranges.iter().map(|r| r.len() as u64).sum();
    let pending: Vec<&Range> = ranges.iter().filter(|r| !r.is_empty()).collect();
    if pending.is_empty() {
        progress(0, 0);
        return Ok(0);
    }
    let c = reader(bootstrap)?;
    if let Some(deleted) = deleted_start(&c, topic, &pending)? {
        return Err(deleted);
    }
    let mut tpl = TopicPartitionList::new();
    for r in &pending {
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.from))?;
    }
    c.assign(&tpl)?;
    let mut next: BTreeMap<i32, i64> = pending.iter().map(|r| (r.partition, r.from)).collect();
    let ends: BTreeMap<i32, i64> = pending.iter().map(|r| (r.partition, r.to)).collect();
    let started = Instant::now();
    let mut read = 0u64;
    let mut last_report = Instant::now();
    // Partitions with records left to read, kept as `next` moves rather than recounted
    // for every record.
    let mut unfinished = next.iter().filter(|(p, o)| **o < ends[p]).count();
    let timeout = |next: &BTreeMap<i32, i64>| {
        ReplayError::Timeout(deadline, format!("at {next:?}, ends {ends:?}"))
    };
    let mut polls = 0u64;
    while unfinished > 0 {
        // The clock is read on every empty poll but only every 1,024 records: per record
        // it shows at this rate. The first poll reads it too, so a deadline already
        // passed (max_wait_ms=0) cuts the replay before any record.
        polls += 1;
        if polls % 1024 == 1 && started.elapsed() > deadline {
            return Err(timeout(&next));
        }
        let Some(msg) = c.poll(Duration::from_millis(200)) else {
            if started.elapsed() > deadline {
                return Err(timeout(&next));
            }
            continue;
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // Retention deleted records under the reader (auto.offset.reset=error):
                // name where, rather than the client's bare error code.
                let unread: Vec<Range> = pending
                    .iter()
                    .map(|r| Range {
                        partition: r.partition,
                        from: next[&r.partition],
                        to: r.to,
                    })
                    .filter(|r| !r.is_empty())
                    .collect();
                let unread: Vec<&Range> = unread.iter().collect();
                if let Ok(Some(deleted)) = deleted_start(&c, topic, &unread) {
                    return Err(deleted);
                }
                return Err(e.into());
            }
        };
        let p = msg.partition();
        let Some(&end) = ends.get(&p) else { continue };
        if msg.offset() >= end {
            // Past the fixed end: this partition is done; stop fetching it.
            unfinished = unfinished.saturating_add_signed(advance(&mut next, p, end, end));
            let mut done = TopicPartitionList::new();
            done.add_partition(topic, p);
            let _ = c.pause(&done);
            continue;
        }
        unfinished = unfinished.saturating_add_signed(advance(&mut next, p, msg.offset() + 1, end));
        read += 1;
        let flow = each(Record {
            partition: p,
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key: msg.key(),
            payload: msg.payload(),
        });
        if flow.is_break() {
            progress(read, total);
            return Ok(read);
        }
        if read % 1024 == 0 && last_report.elapsed() > Duration::from_millis(200) {
            progress(read, total);
            last_report = Instant::now();
        }
    }
    progress(read, total);
    Ok(read)
}

/// Moves partition `p`'s next offset to `to` (its end being `end`): -1 when that finishes
/// the partition, +1 when it reopens it, 0 otherwise.
fn advance(next: &mut BTreeMap<i32, i64>, p: i32, to: i64, end: i64) -> isize {
    let before = next.insert(p, to).is_some_and(|o| o < end);
    match (before, to < end) {
        (true, false) => -1,
        (false, true) => 1,
        _ => 0,
    }
}

/// Every record of `topic` with a timestamp at or after `since_ms`, up to the end offsets
/// at the start. Reading starts at each partition's offsets-for-times answer (every
/// earlier record is older than `since_ms`); later records may still be older (producer
/// timestamps need not grow within a partition), so they are filtered too.
pub fn read_since(
    bootstrap: &str,
    topic: &str,
    since_ms: i64,
    deadline: Duration,
    mut each: impl FnMut(Replayed),
    progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let ranges = ranges_from_timestamp(bootstrap, topic, since_ms)?;
    let mut kept = 0u64;
    read(
        bootstrap,
        topic,
        &ranges,
        deadline,
        |r| {
            if r.timestamp_ms.is_some_and(|t| t >= since_ms) {
                kept += 1;
                each(r);
            }
        },
        progress,
    )?;
    Ok(kept)
}

/// Kafka's (Java client's) murmur2 of a key.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition the Java partitioner (librdkafka `murmur2_random`) picks for `key`.
pub fn partition_for_key(key: &str, partitions: i32) -> i32 {
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions as u32) as i32
}

/// One stream session's events, in order: the session's partition of stream-events read
/// to its current end, filtered by session id.
pub fn session_timeline(bootstrap: &str, session_id: &str) -> Result<Vec<EventEnvelope>> {
    let topic = chatstream_protocol::events::topic::STREAM_EVENTS;
    let all = ranges_all(bootstrap, topic)?;
    let partition = partition_for_key(session_id, all.len() as i32);
    let range: Vec<Range> = all
        .into_iter()
        .filter(|r| r.partition == partition)
        .collect();
    let mut out = Vec::new();
    read(
        bootstrap,
        topic,
        &range,
        Duration::from_secs(300),
        |r| {
            if let Some(e) = r.event() {
                if e.session_id.as_deref() == Some(session_id) {
                    out.push(e);
                }
            }
        },
        |_, _| {},
    )?;
    Ok(out)
}

/// Per-partition lag of a consumer group on a topic.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// None when the group has committed nothing for the partition.
    pub committed: Option<i64>,
    pub end: i64,
    pub lag: i64,
}

/// The group's committed offsets; the coordinator may be moving or still loading (a fresh
/// cluster, a broker restart), so NotCoordinator-like answers are retried briefly.
fn committed_with_retry(c: &BaseConsumer, tpl: TopicPartitionList) -> Result<TopicPartitionList> {
    let mut attempt = 0;
    loop {
        match c.committed_offsets(tpl.clone(), TIMEOUT) {
            Ok(t) => return Ok(t),
            Err(e) if attempt < 20 => {
                tracing::debug!(error = %e, "reading committed offsets; retrying");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A client in `group`'s name that reads and commits its offsets; it never subscribes.
fn group_client(bootstrap: &str, group: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// The group's lag on `topics`, partition by partition, read once (see [`LagReader`] for
/// reading it again and again).
pub fn lag(bootstrap: &str, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>> {
    LagReader::new(bootstrap, group, topics)?.read()
}

/// Reads one group's lag on one client, as often as asked: its committed offsets and
/// every partition's end (one batched ListOffsets per broker, as `kafka-consumer-groups`
/// does), the two asked for at the same time — whatever is produced between the two
/// answers counts as lag although no consumer is behind. The workers' reporter keeps one
/// per group instead of making a client (and its connections) for every reading every
/// 5 s. (In `steady` the audit group's lag read this way was what it had been: about
/// 550 at the median, its own pace, not the reading's.)
pub struct LagReader {
    consumer: BaseConsumer,
    committed_asked: TopicPartitionList,
    ends_asked: TopicPartitionList,
}

impl LagReader {
    pub fn new(bootstrap: &str, group: &str, topics: &[String]) -> Result<Self> {
        let consumer = group_client(bootstrap, group)?;
        let mut committed_asked = TopicPartitionList::new();
        let mut ends_asked = TopicPartitionList::new();
        for topic in topics {
            for p in partitions(&consumer, topic)? {
                committed_asked.add_partition(topic, p);
                // ListOffsets with the "latest" timestamp: each partition's high watermark.
                ends_asked.add_partition_offset(topic, p, Offset::End)?;
            }
        }
        Ok(LagReader {
            consumer,
            committed_asked,
            ends_asked,
        })
    }

    pub fn read(&self) -> Result<Vec<PartitionLag>> {
        let c = &self.consumer;
        let (committed, ends) = std::thread::scope(|s| {
            let ends = s.spawn(|| c.offsets_for_times(self.ends_asked.clone(), TIMEOUT));
            let committed = committed_with_retry(c, self.committed_asked.clone());
            (committed, ends.join())
        });
        let committed = committed?;
        let ends = ends
            .map_err(|_| ReplayError::Invalid("reading the partitions' ends panicked".into()))??;
        let mut out = Vec::new();
        for e in committed.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            let end = match ends.find_partition(topic, partition).map(|x| x.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => c.fetch_watermarks(topic, partition, TIMEOUT)?.1,
            };
            let committed = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let from = match committed {
                Some(o) => o,
                None => c.fetch_watermarks(topic, partition, TIMEOUT)?.0,
            };
            out.push(PartitionLag {
                topic: topic.to_string(),
                partition,
                committed,
                end,
                lag: end - from,
            });
        }
        Ok(out)
    }
}

/// Active members of a group (0 when idle or unknown).
pub fn group_members(bootstrap: &str, group: &str) -> Result<usize> {
    let c = reader(bootstrap)?;
    let list = c.fetch_group_list(Some(group), TIMEOUT)?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .map(|g| g.members().len())
        .sum())
}

/// Where `reset` moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    Earliest,
    Timestamp(i64),
}

/// Commits new offsets for an idle group on `topics`; an active group is refused. Also
/// used to backfill a new group from the earliest offset. Returns the committed offsets.
pub fn reset_group(
    bootstrap: &str,
    group: &str,
    topics: &[String],
    to: ResetTo,
) -> Result<Vec<(String, i32, i64)>> {
    let members = group_members(bootstrap, group)?;
    if members > 0 {
        return Err(ReplayError::GroupActive {
            group: group.into(),
            members,
        });
    }
    let c = group_client(bootstrap, group)?;
    let mut tpl = TopicPartitionList::new();
    let mut out = Vec::new();
    for topic in topics {
        let ranges = match to {
            ResetTo::Earliest => ranges_all(bootstrap, topic)?,
            ResetTo::Timestamp(ts) => ranges_from_timestamp(bootstrap, topic, ts)?,
        };
        for r in ranges {
            tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.from))?;
            out.push((topic.clone(), r.partition, r.from));
        }
    }
    // The coordinator refuses a standalone commit for a group with members: that
    // refusal is the authoritative "active" answer if one joined since the check.
    match c.commit(&tpl, CommitMode::Sync) {
        Ok(()) => Ok(out),
        Err(e) => match e.rdkafka_error_code() {
            Some(
                rdkafka::types::RDKafkaErrorCode::UnknownMemberId
                | rdkafka::types::RDKafkaErrorCode::IllegalGeneration
                | rdkafka::types::RDKafkaErrorCode::RebalanceInProgress,
            ) => Err(ReplayError::GroupActive {
                group: group.into(),
                members: 1,
            }),
            _ => Err(e.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's own Utils.murmur2 tests (as signed ints there).
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn ranges_report_their_length() {
        assert_eq!(
            Range {
                partition: 0,
                from: 5,
                to: 9
            }
            .len(),
            4
        );
        assert!(Range {
            partition: 0,
            from: 9,
            to: 9
        }
        .is_empty());
    }
}
