//! What was read back after the run ([`Readback`]: the chat events on Kafka, the audit
//! table's rows) and the no-loss-downstream checker: every acknowledged message id is on
//! Kafka exactly once (after dedupe by event id; several event ids for one message are
//! `double_published`) and in the audit table exactly once (`audit_duplicates`
//! otherwise); Kafka chat messages in this run's conversations that no ack names and that
//! no delivery explains are `phantom`. An incomplete readback answers unknown.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::facts::{anomaly, Facts, MsgId};
use crate::verdict::{Evidence, Example, Timeline, Validity, Verdict};

/// One record read from the chat events topic (`CHAT_MESSAGE` events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaEvent {
    pub event_id: String,
    pub message_id: Option<String>,
    pub conversation_id: Option<String>,
    pub seq: Option<i64>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One row of the audit table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub event_id: String,
    pub message_id: Option<String>,
}

/// Everything read back once after the run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Readback {
    /// Records of the chat events topic (one per record read: a record written twice
    /// appears twice).
    pub chat_events: Vec<KafkaEvent>,
    pub audit_rows: Vec<AuditRow>,
    /// The readback reached the end offsets (and the whole table).
    pub complete: bool,
    /// Projection digests, live and rebuilt by replaying the topics from the start.
    #[serde(default)]
    pub replay: Vec<ReplayDigest>,
    /// How each partition of the chat events topic was read: from where to where.
    /// (Absent in readbacks saved before it was recorded.)
    #[serde(default)]
    pub partitions: Vec<PartitionRead>,
}

/// One partition of the chat events topic as the readback read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRead {
    pub partition: i32,
    /// The partition's earliest offset (its start) and end offset when the read began.
    pub low: i64,
    pub high: i64,
    /// The first and last offsets actually read (None: nothing read).
    pub first: Option<i64>,
    pub last: Option<i64>,
}

impl PartitionRead {
    /// Read from the partition's start to its end (or the partition was empty).
    pub fn whole(&self) -> bool {
        self.low >= self.high
            || (self.first == Some(self.low) && self.last.is_some_and(|l| l + 1 >= self.high))
    }
}

/// One projection's digest as the live workers built it, and as a replay of the topics
/// from the start into an emptied projection rebuilt it (or why that could not be done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayDigest {
    pub projection: String,
    pub live: Option<String>,
    pub rebuilt: Option<String>,
    pub events: u64,
    pub error: Option<String>,
}

impl KafkaEvent {
    fn place(&self) -> String {
        format!("{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

const MISSING_KAFKA: &str = "missing_in_kafka";
const MISSING_AUDIT: &str = "missing_in_audit";
const DOUBLE: &str = "double_published";
const AUDIT_DUP: &str = "audit_duplicates";
const PHANTOM: &str = "phantom";
const SEQ: &str = "kafka_seq_mismatch";

/// Acked message ids (in MsgId order) and how many acks had none.
pub(crate) fn acked_mids(f: &Facts) -> (Vec<(&str, MsgId)>, u64) {
    let mut out = Vec::new();
    let mut without = 0;
    for (i, s) in f.sends().iter().enumerate() {
        if s.acked() {
            match f.mid(i as MsgId) {
                Some(mid) => out.push((mid, i as MsgId)),
                None => without += 1,
            }
        }
    }
    (out, without)
}

/// Whether a Kafka event belongs to this run: its conversation is one of the header's
/// (events without a conversation id are taken as the run's).
pub(crate) fn run_conversations(f: &Facts) -> HashMap<&str, u32> {
    f.header()
        .conversations
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i as u32))
        .collect()
}

/// Checks that every acknowledged message reached Kafka and the audit table exactly once.
pub fn no_loss_downstream(f: &Facts, rb: &Readback) -> Verdict {
    let mut ev = Evidence::new("no_loss_downstream");
    ev.kinds(&[
        MISSING_KAFKA,
        MISSING_AUDIT,
        DOUBLE,
        AUDIT_DUP,
        PHANTOM,
        SEQ,
    ]);
    let convs = run_conversations(f);
    let (acked, acked_without_mid) = acked_mids(f);
    let acked_set: HashMap<&str, MsgId> = acked.iter().copied().collect();

    let mut kafka: HashMap<&str, Vec<&KafkaEvent>> = HashMap::new();
    let mut without_message_id = 0u64;
    for e in &rb.chat_events {
        match &e.message_id {
            Some(mid) => kafka.entry(mid.as_str()).or_default().push(e),
            None => without_message_id += 1,
        }
    }
    let mut audit: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for r in &rb.audit_rows {
        if let Some(mid) = &r.message_id {
            audit
                .entry(mid.as_str())
                .or_default()
                .insert(r.event_id.as_str());
        }
    }

    let (mut missing_kafka, mut missing_audit, mut double, mut audit_dup, mut seq_mismatch) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for &(mid, m) in &acked {
        let s = f.send(m);
        let seq = s.and_then(|s| s.seq());
        let conv = s.and_then(|s| s.c());
        match kafka.get(mid) {
            None => {
                missing_kafka += 1;
                if ev.wants(MISSING_KAFKA) {
                    ev.example(
                        MISSING_KAFKA,
                        send_example(
                            f,
                            m,
                            mid,
                            "acked but not on the chat events topic (acked_not_in_kafka)".into(),
                        ),
                    );
                }
            }
            Some(evs) => {
                let ids: BTreeSet<&str> = evs.iter().map(|e| e.event_id.as_str()).collect();
                if ids.len() > 1 {
                    double += 1;
                    if ev.wants(DOUBLE) {
                        let places: Vec<String> = evs
                            .iter()
                            .map(|e| format!("{} event {}", e.place(), e.event_id))
                            .collect();
                        ev.example(
                            DOUBLE,
                            send_example(
                                f,
                                m,
                                mid,
                                format!(
                                    "published as {} distinct events: {}",
                                    ids.len(),
                                    places.join(", ")
                                ),
                            ),
                        );
                    }
                }
                let wrong = evs.iter().find(|e| {
                    (e.seq.is_some() && e.seq != seq)
                        || e.conversation_id
                            .as_deref()
                            .is_some_and(|c| convs.get(c).copied() != conv)
                });
                if let Some(e) = wrong {
                    seq_mismatch += 1;
                    if ev.wants(SEQ) {
                        ev.example(
                            SEQ,
                            send_example(
                                f,
                                m,
                                mid,
                                format!(
                                    "acked as seq {} in c{} but {} says seq {:?} in {:?}",
                                    seq.unwrap_or(0),
                                    conv.unwrap_or(u32::MAX),
                                    e.place(),
                                    e.seq,
                                    e.conversation_id
                                ),
                            ),
                        );
                    }
                }
            }
        }
        match audit.get(mid) {
            None => {
                missing_audit += 1;
                if ev.wants(MISSING_AUDIT) {
                    ev.example(
                        MISSING_AUDIT,
                        send_example(f, m, mid, "acked but not in the audit table".into()),
                    );
                }
            }
            Some(ids) if ids.len() > 1 => {
                audit_dup += 1;
                if ev.wants(AUDIT_DUP) {
                    let ids: Vec<&str> = ids.iter().copied().collect();
                    ev.example(
                        AUDIT_DUP,
                        send_example(
                            f,
                            m,
                            mid,
                            format!(
                                "{} audit rows with distinct event ids: {}",
                                ids.len(),
                                ids.join(", ")
                            ),
                        ),
                    );
                }
            }
            Some(_) => {}
        }
    }

    // Kafka messages no ack names: explained when a delivery of an unacknowledged send
    // carried the same (conversation, seq); phantom otherwise.
    let mut unacked_seen: HashSet<(u32, i64)> = HashSet::new();
    for (&(_, c), list) in f.deliveries() {
        for d in list {
            if let Some(s) = f.send(d.m) {
                if s.invoked() && !s.acked() && s.c() == Some(c) {
                    unacked_seen.insert((c, d.s));
                }
            }
        }
    }
    let (mut unacked_in_kafka, mut foreign, mut phantom) = (0u64, 0u64, 0u64);
    let mut phantoms: Vec<(&str, &KafkaEvent)> = Vec::new();
    for (mid, evs) in &kafka {
        if acked_set.contains_key(mid) {
            continue;
        }
        let Some(first) = evs.first() else { continue };
        let c = match first.conversation_id.as_deref() {
            Some(id) => match convs.get(id) {
                Some(&c) => Some(c),
                None => {
                    foreign += 1;
                    continue;
                }
            },
            None => None,
        };
        let explained = match (c, first.seq) {
            (Some(c), Some(s)) => unacked_seen.contains(&(c, s)),
            _ => false,
        };
        if explained {
            unacked_in_kafka += 1;
        } else {
            phantom += 1;
            phantoms.push((mid, first));
        }
    }
    phantoms.sort_by_key(|(_, e)| (&e.topic, e.partition, e.offset));
    for (mid, e) in phantoms {
        if !ev.wants(PHANTOM) {
            break;
        }
        ev.example(
            PHANTOM,
            Example {
                id: mid.to_string(),
                what: format!(
                    "{} (event {}) is a chat message in {:?} seq {:?} that no ack names and no delivery explains",
                    e.place(),
                    e.event_id,
                    e.conversation_id,
                    e.seq
                ),
                timeline: Vec::new(),
            },
        );
    }

    let n_acked = acked.len() as u64 + acked_without_mid;
    for (k, v) in [
        ("acked", n_acked),
        ("acked_without_mid", acked_without_mid),
        ("kafka_records", rb.chat_events.len() as u64),
        ("kafka_without_message_id", without_message_id),
        ("audit_rows", rb.audit_rows.len() as u64),
        ("missing_in_kafka", missing_kafka),
        ("acked_not_in_kafka", missing_kafka),
        ("missing_in_audit", missing_audit),
        ("double_published", double),
        ("audit_duplicates", audit_dup),
        ("phantom", phantom),
        ("kafka_seq_mismatch", seq_mismatch),
        ("unacked_in_kafka", unacked_in_kafka),
        ("foreign_messages", foreign),
        ("partitions_read", rb.partitions.len() as u64),
        (
            "partitions_read_whole",
            rb.partitions.iter().filter(|p| p.whole()).count() as u64,
        ),
    ] {
        ev.set(k, v);
    }
    let violations = missing_kafka + missing_audit + double + audit_dup + phantom + seq_mismatch;
    let mut summary = format!(
        "{n_acked} acked: missing in kafka {missing_kafka}, missing in audit {missing_audit}, \
         double published {double}, audit duplicates {audit_dup}, phantom {phantom}, \
         kafka seq mismatch {seq_mismatch} ({} kafka records, {} audit rows, {unacked_in_kafka} unacked messages found)",
        rb.chat_events.len(),
        rb.audit_rows.len()
    );
    let partial: Vec<String> = rb
        .partitions
        .iter()
        .filter(|p| !p.whole())
        .map(|p| {
            format!(
                "{}: offsets {}..{} read {:?}..{:?}",
                p.partition, p.low, p.high, p.first, p.last
            )
        })
        .collect();
    let valid = if !rb.complete {
        summary = format!("unknown: the readback did not reach the end offsets; {summary}");
        Validity::Unknown
    } else if !partial.is_empty() && violations == 0 {
        summary = format!(
            "unknown: partitions not read from start to end ({}); {summary}",
            partial.join(", ")
        );
        Validity::Unknown
    } else if violations > 0 {
        Validity::Invalid
    } else if acked_without_mid > 0 {
        summary = format!("unknown: {acked_without_mid} acks carry no message id; {summary}");
        Validity::Unknown
    } else if let Some(reason) = f.anomaly_reason(&[
        anomaly::UNKNOWN_PROCESS,
        anomaly::CONVERSATION_OUT_OF_RANGE,
        anomaly::SEND_ID_REUSED,
    ]) {
        summary = format!("unknown: {reason}; {summary}");
        Validity::Unknown
    } else if n_acked == 0 {
        summary = format!("unknown: no acknowledged message to look for; {summary}");
        Validity::Unknown
    } else {
        Validity::Valid
    };
    ev.verdict(valid, summary)
}

fn send_example(f: &Facts, m: MsgId, mid: &str, what: String) -> Example {
    let mut tl = Timeline::new();
    f.timeline_send(m, &mut tl);
    Example {
        id: mid.to_string(),
        what: format!("{what} (client_msg_id {})", f.msg_name(m)),
        timeline: tl.finish(),
    }
}

/// Audit rows per message id (of the messages in `keep`), for the duplicates checker.
pub(crate) fn audit_rows_per_message(
    rb: &Readback,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<&str, Vec<&AuditRow>> {
    let mut out: BTreeMap<&str, Vec<&AuditRow>> = BTreeMap::new();
    for r in &rb.audit_rows {
        if let Some(mid) = r.message_id.as_deref() {
            if keep(mid) {
                out.entry(mid).or_default().push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::H;

    fn ke(event_id: &str, mid: &str, conv: &str, seq: i64, offset: i64) -> KafkaEvent {
        KafkaEvent {
            event_id: event_id.into(),
            message_id: Some(mid.into()),
            conversation_id: Some(conv.into()),
            seq: Some(seq),
            topic: "chat-events".into(),
            partition: 0,
            offset,
        }
    }

    fn ar(event_id: &str, mid: &str) -> AuditRow {
        AuditRow {
            event_id: event_id.into(),
            message_id: Some(mid.into()),
        }
    }

    /// Two acked messages (mids ma, mb) and one unknown-outcome message delivered as seq 3.
    fn history() -> H {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "ma");
        h.send(20, 0, 0, "0-2").ok(21, 0, 0, "0-2", 2, "mb");
        h.send(30, 0, 0, "0-3").info(40, 0, 0, "0-3");
        h.deliver(35, 1, 0, 3, "0-3", 0, squall_history::Via::Live);
        h
    }

    fn good() -> Readback {
        Readback {
            chat_events: vec![
                ke("e1", "ma", "conv0", 1, 0),
                ke("e1", "ma", "conv0", 1, 1), // the same event twice: at-least-once, fine
                ke("e2", "mb", "conv0", 2, 2),
                ke("e3", "mc", "conv0", 3, 3), // the unknown-outcome message, stored
                ke("e9", "other", "elsewhere", 1, 4),
            ],
            audit_rows: vec![ar("e1", "ma"), ar("e2", "mb"), ar("e3", "mc")],
            complete: true,
            replay: Vec::new(),
            partitions: Vec::new(),
        }
    }

    fn ids(v: &Verdict) -> Vec<&str> {
        v.examples.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn passes_when_every_acked_message_is_on_kafka_and_audited_once() {
        let v = no_loss_downstream(&history().facts(), &good());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["unacked_in_kafka"], 1);
        assert_eq!(v.counts["foreign_messages"], 1);
    }

    #[test]
    fn missing_in_kafka_and_in_audit() {
        let mut rb = good();
        rb.chat_events
            .retain(|e| e.message_id.as_deref() != Some("mb"));
        rb.audit_rows
            .retain(|r| r.message_id.as_deref() != Some("ma"));
        let v = no_loss_downstream(&history().facts(), &rb);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(
            (v.counts["missing_in_kafka"], v.counts["missing_in_audit"]),
            (1, 1)
        );
        assert_eq!(v.counts["acked_not_in_kafka"], 1);
        assert_eq!(ids(&v), vec!["mb", "ma"]);
        assert!(v.examples[0].what.contains("0-2"));
        assert!(v.examples[0]
            .timeline
            .iter()
            .any(|l| l.contains("ok send m=0-2 seq=2")));
    }

    #[test]
    fn double_published_and_audit_duplicates() {
        let mut rb = good();
        rb.chat_events.push(ke("e2b", "mb", "conv0", 2, 9));
        rb.audit_rows.push(ar("e1x", "ma"));
        rb.audit_rows.push(ar("e1", "ma")); // same event id again: deduped
        let v = no_loss_downstream(&history().facts(), &rb);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(
            (v.counts["double_published"], v.counts["audit_duplicates"]),
            (1, 1)
        );
        assert_eq!(ids(&v), vec!["mb", "ma"]);
        assert!(v.examples[0].what.contains("chat-events[0]@9"));
    }

    #[test]
    fn phantom_messages_no_ack_names() {
        let mut rb = good();
        rb.chat_events.push(ke("e7", "ghost", "conv0", 7, 10));
        let v = no_loss_downstream(&history().facts(), &rb);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["phantom"], 1);
        assert_eq!(ids(&v), vec!["ghost"]);
    }

    #[test]
    fn kafka_seq_disagreeing_with_the_ack() {
        let mut rb = good();
        rb.chat_events[2].seq = Some(5);
        let v = no_loss_downstream(&history().facts(), &rb);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["kafka_seq_mismatch"], 1);
        assert_eq!(ids(&v), vec!["mb"]);
    }

    #[test]
    fn incomplete_readback_is_unknown() {
        let mut rb = good();
        rb.complete = false;
        let v = no_loss_downstream(&history().facts(), &rb);
        assert_eq!(v.valid, Validity::Unknown);
        assert!(v.summary.starts_with("unknown: the readback"));
    }

    #[test]
    fn readback_round_trips_as_json() {
        let rb = good();
        let back: Readback = serde_json::from_str(&serde_json::to_string(&rb).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(back, rb);
    }
}
