//! The seed topics and the cluster's durability defaults (replication factor 3,
//! min.insync.replicas 2, no unclean leader election), as the seeds and DESIGN.md set them.

use serde::Serialize;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 60 * MINUTE_MS;

/// One topic with its retention; every topic also gets the cluster's durability settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSpec {
    pub name: String,
    pub retention_ms: u64,
}

pub const REPLICATION_FACTOR: i32 = 3;
pub const MIN_INSYNC_REPLICAS: i32 = 2;
pub const DEFAULT_PARTITIONS: i32 = 6;
/// Dead letters are kept long enough for a person to look at them.
pub const DLQ_RETENTION_MS: u64 = 30 * DAY_MS;

/// The topics the seeds define, with their retention.
pub fn seed_topics() -> Vec<TopicSpec> {
    [
        ("chat-events", 7 * DAY_MS),
        ("stream-events", 7 * DAY_MS),
        ("message-status-events", DAY_MS),
        ("typing-events", MINUTE_MS),
        ("notifications", 30 * DAY_MS),
    ]
    .into_iter()
    .map(|(name, retention_ms)| TopicSpec {
        name: name.to_string(),
        retention_ms,
    })
    .collect()
}

/// Topics that durable consumers (the workers) read, and so have a dead-letter topic.
/// typing-events is ephemeral (60 s) and read only for live fan-out: nothing is dead-lettered.
pub fn consumed_topics() -> Vec<String> {
    seed_topics()
        .into_iter()
        .map(|t| t.name)
        .filter(|n| n != "typing-events")
        .collect()
}

/// The dead-letter topic of `topic`.
pub fn dlq_name(topic: &str) -> String {
    format!("{topic}-dlq")
}

/// Every topic the stack creates: the seed topics and one DLQ per consumed topic.
pub fn all_topics() -> Vec<TopicSpec> {
    let mut out = seed_topics();
    out.extend(consumed_topics().into_iter().map(|t| TopicSpec {
        name: dlq_name(&t),
        retention_ms: DLQ_RETENTION_MS,
    }));
    out
}

/// The per-topic settings beyond retention.
pub fn durability_configs() -> [(&'static str, String); 2] {
    [
        ("min.insync.replicas", MIN_INSYNC_REPLICAS.to_string()),
        ("unclean.leader.election.enable", "false".to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_retention_matches_the_seeds() {
        let t = seed_topics();
        let get = |n: &str| t.iter().find(|x| x.name == n).unwrap().retention_ms;
        assert_eq!(get("chat-events"), 604_800_000);
        assert_eq!(get("stream-events"), 604_800_000);
        assert_eq!(get("message-status-events"), 86_400_000);
        assert_eq!(get("typing-events"), 60_000);
        assert_eq!(get("notifications"), 2_592_000_000);
    }

    #[test]
    fn each_consumed_topic_has_a_dlq() {
        let names: Vec<_> = all_topics().into_iter().map(|t| t.name).collect();
        for t in consumed_topics() {
            assert!(names.contains(&dlq_name(&t)), "{t} has no DLQ");
        }
        assert!(!names.contains(&"typing-events-dlq".to_string()));
        assert_eq!(names.len(), 9);
    }
}
