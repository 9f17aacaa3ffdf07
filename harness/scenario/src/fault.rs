//! The `faults` section: what the nemesis breaks, when, for how long and how often.
//!
//! A fault is written flat — `{ at: 1m, duration: 20s, kind: kill_node, node: 2 }` — with
//! the action's keys beside the timing keys. serde's `flatten` cannot be combined with
//! `deny_unknown_fields`, so a fault deserialises through [`FaultFields`], which knows every
//! key, and the conversion checks which keys the `kind` takes: unknown and misplaced keys
//! are both rejected.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

use crate::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FaultFields", into = "FaultFields")]
pub struct Fault {
    /// When the (first) occurrence starts, measured from the end of the warm-up.
    pub at: Duration,
    /// How long until the fault is healed, or the process restarted or resumed. Required
    /// by validation for every kind: all of them end.
    pub duration: Option<Duration>,
    /// Occurrences at a fixed interval.
    pub repeat: Option<Repeat>,
    /// Occurrences at times drawn from the scenario seed.
    pub random: Option<RandomTimes>,
    pub action: FaultAction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repeat {
    /// From one start to the next; must exceed the fault's duration.
    #[serde(with = "crate::duration")]
    pub every: Duration,
    /// Occurrences in all, the first at `at`.
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomTimes {
    /// Occurrences in all.
    pub count: u32,
    /// The span `[at, at + within)` that holds every occurrence entirely. It is cut into
    /// `count` equal slices and each occurrence starts at a seeded random time in its
    /// slice early enough to end inside it, so occurrences never overlap.
    #[serde(with = "crate::duration")]
    pub within: Duration,
}

/// Actions without options are empty struct variants, not unit variants: serde ignores
/// extra keys beside the tag of a unit variant, and an unknown key must be an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultAction {
    /// SIGKILL chatstream node `node`; restarted after the duration.
    KillNode { node: u32 },
    /// SIGTERM node `node` (it drains); restarted after the duration.
    TermNode { node: u32 },
    /// SIGSTOP node `node`; SIGCONT after the duration.
    PauseNode { node: u32 },
    /// SIGKILL every worker process; restarted after the duration.
    KillWorkers {},
    /// SIGTERM every worker process; restarted after the duration.
    TermWorkers {},
    /// SIGSTOP every worker process; SIGCONT after the duration.
    PauseWorkers {},
    /// SIGKILL Kafka broker `broker` (1..=3); restarted after the duration.
    KillBroker { broker: u8 },
    /// Cut every link to and from broker `broker` (clients, replication, controller).
    IsolateBroker { broker: u8 },
    /// Cut the links from broker `from` to broker `to` only (replication and controller).
    PartitionOneWay { from: u8, to: u8 },
    /// Cut every broker's link to the KRaft controller listeners.
    IsolateController {},
    /// Cut every client (nodes, workers, Squall) off Kafka; brokers still see each other.
    CutKafka {},
    /// Redis unreachable.
    RedisDown {
        #[serde(default)]
        mode: OutageMode,
    },
    /// PostgreSQL unreachable.
    PostgresDown {
        #[serde(default)]
        mode: OutageMode,
    },
    /// A Toxiproxy toxic on one link.
    Toxic {
        /// The link's name, e.g. `redis`, `postgres`, `kafka-2-client`,
        /// `kafka-1-to-3-replication` (the set is known only when the stack runs).
        link: String,
        #[serde(default)]
        stream: ToxicStream,
        /// Probability that the toxic applies to a connection (0..=1).
        #[serde(default = "full_toxicity")]
        toxicity: f32,
        toxic: ToxicKind,
    },
}

fn full_toxicity() -> f32 {
    1.0
}

/// How an unreachable service looks to its clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutageMode {
    /// Connections are refused at once.
    #[default]
    Refuse,
    /// Connections hang: data is accepted and never answered.
    BlackHole,
}

/// Which direction of a link a toxic acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToxicStream {
    /// Client to server.
    Upstream,
    /// Server to client.
    #[default]
    Downstream,
}

/// Toxiproxy's toxics, with its attribute names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToxicKind {
    Latency {
        latency_ms: u64,
        #[serde(default)]
        jitter_ms: u64,
    },
    Bandwidth {
        rate_kb: u64,
    },
    SlowClose {
        delay_ms: u64,
    },
    Timeout {
        timeout_ms: u64,
    },
    ResetPeer {
        #[serde(default)]
        timeout_ms: u64,
    },
    Slicer {
        average_size: u64,
        #[serde(default)]
        size_variation: u64,
        #[serde(default)]
        delay_us: u64,
    },
    LimitData {
        bytes: u64,
    },
}

/// The name of each fault action, as written in `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    KillNode,
    TermNode,
    PauseNode,
    KillWorkers,
    TermWorkers,
    PauseWorkers,
    KillBroker,
    IsolateBroker,
    PartitionOneWay,
    IsolateController,
    CutKafka,
    RedisDown,
    PostgresDown,
    Toxic,
}

impl FaultKind {
    /// Whether the fault works on a link's proxy (cut, black hole, toxic) rather than on a
    /// process: impossible with `topology.stack.links: direct`.
    pub fn needs_proxies(self) -> bool {
        match self {
            FaultKind::KillNode
            | FaultKind::TermNode
            | FaultKind::PauseNode
            | FaultKind::KillWorkers
            | FaultKind::TermWorkers
            | FaultKind::PauseWorkers
            | FaultKind::KillBroker => false,
            FaultKind::IsolateBroker
            | FaultKind::PartitionOneWay
            | FaultKind::IsolateController
            | FaultKind::CutKafka
            | FaultKind::RedisDown
            | FaultKind::PostgresDown
            | FaultKind::Toxic => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillNode => "kill_node",
            FaultKind::TermNode => "term_node",
            FaultKind::PauseNode => "pause_node",
            FaultKind::KillWorkers => "kill_workers",
            FaultKind::TermWorkers => "term_workers",
            FaultKind::PauseWorkers => "pause_workers",
            FaultKind::KillBroker => "kill_broker",
            FaultKind::IsolateBroker => "isolate_broker",
            FaultKind::PartitionOneWay => "partition_one_way",
            FaultKind::IsolateController => "isolate_controller",
            FaultKind::CutKafka => "cut_kafka",
            FaultKind::RedisDown => "redis_down",
            FaultKind::PostgresDown => "postgres_down",
            FaultKind::Toxic => "toxic",
        }
    }

    /// The action keys this kind takes (required and optional), besides the timing keys.
    pub fn action_keys(self) -> &'static [&'static str] {
        match self {
            FaultKind::KillNode | FaultKind::TermNode | FaultKind::PauseNode => &["node"],
            FaultKind::KillWorkers
            | FaultKind::TermWorkers
            | FaultKind::PauseWorkers
            | FaultKind::IsolateController
            | FaultKind::CutKafka => &[],
            FaultKind::KillBroker | FaultKind::IsolateBroker => &["broker"],
            FaultKind::PartitionOneWay => &["from", "to"],
            FaultKind::RedisDown | FaultKind::PostgresDown => &["mode"],
            FaultKind::Toxic => &["link", "stream", "toxicity", "toxic"],
        }
    }

    /// Whether the fault acts on the worker processes.
    pub fn targets_workers(self) -> bool {
        matches!(
            self,
            FaultKind::KillWorkers | FaultKind::TermWorkers | FaultKind::PauseWorkers
        )
    }

    fn describe_keys(self) -> String {
        let keys = self.action_keys();
        if keys.is_empty() {
            format!(
                "for kind `{}`, only the timing keys `at`, `duration`, `repeat`, `random`",
                self.name()
            )
        } else {
            let listed: Vec<String> = keys.iter().map(|key| format!("`{key}`")).collect();
            format!(
                "for kind `{}`, {} and the timing keys `at`, `duration`, `repeat`, `random`",
                self.name(),
                listed.join(", ")
            )
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FaultAction {
    pub fn kind(&self) -> FaultKind {
        match self {
            FaultAction::KillNode { .. } => FaultKind::KillNode,
            FaultAction::TermNode { .. } => FaultKind::TermNode,
            FaultAction::PauseNode { .. } => FaultKind::PauseNode,
            FaultAction::KillWorkers {} => FaultKind::KillWorkers,
            FaultAction::TermWorkers {} => FaultKind::TermWorkers,
            FaultAction::PauseWorkers {} => FaultKind::PauseWorkers,
            FaultAction::KillBroker { .. } => FaultKind::KillBroker,
            FaultAction::IsolateBroker { .. } => FaultKind::IsolateBroker,
            FaultAction::PartitionOneWay { .. } => FaultKind::PartitionOneWay,
            FaultAction::IsolateController {} => FaultKind::IsolateController,
            FaultAction::CutKafka {} => FaultKind::CutKafka,
            FaultAction::RedisDown { .. } => FaultKind::RedisDown,
            FaultAction::PostgresDown { .. } => FaultKind::PostgresDown,
            FaultAction::Toxic { .. } => FaultKind::Toxic,
        }
    }
}

impl Fault {
    /// Every `(start, end)` of this fault, measured from the end of the warm-up, in order.
    /// Times drawn for `random` depend only on `seed` (the scenario's) and `index` (the
    /// fault's place in the list), so every run of a scenario faults at the same times.
    pub fn windows(&self, seed: u64, index: usize) -> Vec<(Duration, Duration)> {
        let length = self.duration.unwrap_or(Duration::ZERO);
        let starts: Vec<Duration> = if let Some(repeat) = &self.repeat {
            (0..repeat.count)
                .map(|occurrence| {
                    self.at.saturating_add(
                        repeat
                            .every
                            .checked_mul(occurrence)
                            .unwrap_or(Duration::MAX),
                    )
                })
                .collect()
        } else if let Some(random) = &self.random {
            random_starts(self.at, random, length, seed, index)
        } else {
            vec![self.at]
        };
        starts
            .into_iter()
            .map(|start| (start, start.saturating_add(length)))
            .collect()
    }

    /// The latest time any occurrence can end, whatever the seed.
    pub fn latest_end(&self) -> Duration {
        let length = self.duration.unwrap_or(Duration::ZERO);
        if let Some(repeat) = &self.repeat {
            let last_start = repeat
                .every
                .checked_mul(repeat.count.saturating_sub(1))
                .unwrap_or(Duration::MAX);
            self.at.saturating_add(last_start).saturating_add(length)
        } else if let Some(random) = &self.random {
            self.at.saturating_add(random.within.max(length))
        } else {
            self.at.saturating_add(length)
        }
    }
}

fn random_starts(
    at: Duration,
    random: &RandomTimes,
    length: Duration,
    seed: u64,
    index: usize,
) -> Vec<Duration> {
    if random.count == 0 {
        return Vec::new();
    }
    let mut generator = SplitMix64::new(seed, index as u64);
    let slice = random.within / random.count;
    let slack_nanos = u64::try_from(slice.saturating_sub(length).as_nanos()).unwrap_or(u64::MAX);
    (0..random.count)
        .map(|occurrence| {
            let slice_start =
                at.saturating_add(slice.checked_mul(occurrence).unwrap_or(Duration::MAX));
            slice_start.saturating_add(Duration::from_nanos(generator.up_to(slack_nanos)))
        })
        .collect()
}

/// Every key a fault may have, whatever its kind.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFields {
    #[serde(with = "crate::duration")]
    at: Duration,
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repeat: Option<Repeat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    random: Option<RandomTimes>,
    kind: FaultKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    broker: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<OutageMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<ToxicStream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    toxicity: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    toxic: Option<ToxicKind>,
}

impl TryFrom<FaultFields> for Fault {
    type Error = String;

    fn try_from(fields: FaultFields) -> Result<Self, Self::Error> {
        let kind = fields.kind;
        let present = [
            ("node", fields.node.is_some()),
            ("broker", fields.broker.is_some()),
            ("from", fields.from.is_some()),
            ("to", fields.to.is_some()),
            ("mode", fields.mode.is_some()),
            ("link", fields.link.is_some()),
            ("stream", fields.stream.is_some()),
            ("toxicity", fields.toxicity.is_some()),
            ("toxic", fields.toxic.is_some()),
        ];
        if let Some((key, _)) = present
            .iter()
            .find(|(key, is_present)| *is_present && !kind.action_keys().contains(key))
        {
            // Phrased like serde's own message so the diagnostic names the key.
            return Err(format!(
                "unknown field `{key}` for kind `{kind}`; expected {}",
                kind.describe_keys()
            ));
        }
        let required =
            |key: &str| format!("missing field `{key}`; expected {}", kind.describe_keys());
        let action = match kind {
            FaultKind::KillNode => FaultAction::KillNode {
                node: fields.node.ok_or_else(|| required("node"))?,
            },
            FaultKind::TermNode => FaultAction::TermNode {
                node: fields.node.ok_or_else(|| required("node"))?,
            },
            FaultKind::PauseNode => FaultAction::PauseNode {
                node: fields.node.ok_or_else(|| required("node"))?,
            },
            FaultKind::KillWorkers => FaultAction::KillWorkers {},
            FaultKind::TermWorkers => FaultAction::TermWorkers {},
            FaultKind::PauseWorkers => FaultAction::PauseWorkers {},
            FaultKind::KillBroker => FaultAction::KillBroker {
                broker: fields.broker.ok_or_else(|| required("broker"))?,
            },
            FaultKind::IsolateBroker => FaultAction::IsolateBroker {
                broker: fields.broker.ok_or_else(|| required("broker"))?,
            },
            FaultKind::PartitionOneWay => FaultAction::PartitionOneWay {
                from: fields.from.ok_or_else(|| required("from"))?,
                to: fields.to.ok_or_else(|| required("to"))?,
            },
            FaultKind::IsolateController => FaultAction::IsolateController {},
            FaultKind::CutKafka => FaultAction::CutKafka {},
            FaultKind::RedisDown => FaultAction::RedisDown {
                mode: fields.mode.unwrap_or_default(),
            },
            FaultKind::PostgresDown => FaultAction::PostgresDown {
                mode: fields.mode.unwrap_or_default(),
            },
            FaultKind::Toxic => FaultAction::Toxic {
                link: fields.link.ok_or_else(|| required("link"))?,
                stream: fields.stream.unwrap_or_default(),
                toxicity: fields.toxicity.unwrap_or_else(full_toxicity),
                toxic: fields.toxic.ok_or_else(|| required("toxic"))?,
            },
        };
        Ok(Fault {
            at: fields.at,
            duration: fields.duration,
            repeat: fields.repeat,
            random: fields.random,
            action,
        })
    }
}

impl From<Fault> for FaultFields {
    fn from(fault: Fault) -> Self {
        let mut fields = FaultFields {
            at: fault.at,
            duration: fault.duration,
            repeat: fault.repeat,
            random: fault.random,
            kind: fault.action.kind(),
            node: None,
            broker: None,
            from: None,
            to: None,
            mode: None,
            link: None,
            stream: None,
            toxicity: None,
            toxic: None,
        };
        match fault.action {
            FaultAction::KillNode { node }
            | FaultAction::TermNode { node }
            | FaultAction::PauseNode { node } => {
                fields.node = Some(node);
            }
            FaultAction::KillBroker { broker } | FaultAction::IsolateBroker { broker } => {
                fields.broker = Some(broker)
            }
            FaultAction::PartitionOneWay { from, to } => {
                fields.from = Some(from);
                fields.to = Some(to);
            }
            FaultAction::RedisDown { mode } | FaultAction::PostgresDown { mode } => {
                fields.mode = Some(mode)
            }
            FaultAction::Toxic {
                link,
                stream,
                toxicity,
                toxic,
            } => {
                fields.link = Some(link);
                fields.stream = Some(stream);
                fields.toxicity = Some(toxicity);
                fields.toxic = Some(toxic);
            }
            FaultAction::KillWorkers {}
            | FaultAction::TermWorkers {}
            | FaultAction::PauseWorkers {}
            | FaultAction::IsolateController {}
            | FaultAction::CutKafka {} => {}
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    fn fault(text: &str) -> Fault {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn a_flat_fault_parses_and_serialises_back_flat() {
        let kill = fault("{ at: 1m, duration: 20s, kind: kill_node, node: 2 }");
        assert_eq!(kill.action, FaultAction::KillNode { node: 2 });
        assert_eq!(kill.at, secs(60));
        let text = serde_yaml::to_string(&kill).unwrap();
        assert_eq!(text, "at: 1m\nduration: 20s\nkind: kill_node\nnode: 2\n");
        let toxic = fault("{ at: 0s, duration: 5s, kind: toxic, link: redis, toxic: { type: latency, latency_ms: 100 } }");
        assert_eq!(
            toxic.action,
            FaultAction::Toxic {
                link: "redis".into(),
                stream: ToxicStream::Downstream,
                toxicity: 1.0,
                toxic: ToxicKind::Latency {
                    latency_ms: 100,
                    jitter_ms: 0
                }
            }
        );
        assert_eq!(fault(&serde_yaml::to_string(&toxic).unwrap()), toxic);
    }

    #[test]
    fn keys_of_another_kind_and_missing_keys_are_rejected() {
        let misplaced =
            serde_yaml::from_str::<Fault>("{ at: 1s, kind: cut_kafka, node: 2 }").unwrap_err();
        assert!(
            misplaced
                .to_string()
                .contains("unknown field `node` for kind `cut_kafka`"),
            "{misplaced}"
        );
        let missing = serde_yaml::from_str::<Fault>("{ at: 1s, kind: kill_broker }").unwrap_err();
        assert!(
            missing.to_string().contains("missing field `broker`"),
            "{missing}"
        );
        let unknown =
            serde_yaml::from_str::<Fault>("{ at: 1s, kind: cut_kafka, nodes: 2 }").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `nodes`"),
            "{unknown}"
        );
        let bad_toxic = serde_yaml::from_str::<Fault>(
            "{ at: 1s, kind: toxic, link: redis, toxic: { type: latency, latency: 3 } }",
        )
        .unwrap_err();
        assert!(
            bad_toxic.to_string().contains("unknown field `latency`"),
            "{bad_toxic}"
        );
    }

    #[test]
    fn repeat_windows_are_evenly_spaced() {
        let repeated =
            fault("{ at: 10s, duration: 5s, repeat: { every: 30s, count: 3 }, kind: cut_kafka }");
        assert_eq!(
            repeated.windows(1, 0),
            vec![
                (secs(10), secs(15)),
                (secs(40), secs(45)),
                (secs(70), secs(75))
            ]
        );
        assert_eq!(repeated.latest_end(), secs(75));
    }

    #[test]
    fn random_windows_are_deterministic_ordered_and_inside_their_span() {
        let random = fault(
            "{ at: 1m, duration: 10s, random: { count: 4, within: 4m }, kind: pause_workers }",
        );
        let first = random.windows(7, 3);
        assert_eq!(first, random.windows(7, 3));
        assert_ne!(first, random.windows(8, 3));
        assert_ne!(first, random.windows(7, 4));
        assert_eq!(first.len(), 4);
        for (slice, (start, end)) in first.iter().enumerate() {
            let slice_start = secs(60) + secs(60) * slice as u32;
            assert!(
                *start >= slice_start && *end <= slice_start + secs(60),
                "{first:?}"
            );
            assert_eq!(*end - *start, secs(10));
        }
        assert!(first.windows(2).all(|pair| pair[0].1 <= pair[1].0));
        assert_eq!(random.latest_end(), secs(300));
    }
}
