//! The topics a consumer group consumes, for lag counted without being told them: those
//! it has committed offsets for, and those its members are assigned right now.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum GroupTopicsError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("reading the group's committed offsets")]
    Committed(#[source] KafkaError),
}

/// The topics `group` consumes: those it has committed offsets for, and those its
/// members are assigned right now (a group that has not committed yet). Kafka's internal
/// topics are left out.
pub fn group_topics(bootstrap: &str, group: &str) -> Result<Vec<String>, GroupTopicsError> {
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
            Err(e) => return Err(GroupTopicsError::Committed(e)),
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
