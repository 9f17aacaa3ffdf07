//! The `checks` section: what decides whether a run passed. Each entry is a gate string
//! (see [`crate::gate`]) or a map naming one of the checkers that read the history.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

use crate::gate::Gate;
use crate::topology::WorkerKind;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Check {
    /// `"p99(delivery) < 100ms"`.
    Gate(Gate),
    /// `{ checker: duplicates, max_fraction: 0.001 }`.
    Checker(Checker),
}

/// The checkers, selected by the `checker` key. Checkers without options are empty struct
/// variants rather than unit variants because serde ignores extra keys beside the tag of a
/// unit variant, and an unknown key must be an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "checker", rename_all = "snake_case", deny_unknown_fields)]
pub enum Checker {
    /// Every acknowledged message reached every member connected to the conversation
    /// (live or by sync after a reconnect): at-least-once delivery.
    Delivery {},
    /// Every acknowledged message reached Kafka and every projection downstream.
    NoLossDownstream {},
    /// At most `max_fraction` of messages arrived more than once on the given paths.
    Duplicates {
        #[serde(default)]
        max_fraction: f64,
        #[serde(default = "every_duplicate_path")]
        paths: Vec<DuplicatePath>,
    },
    /// Per-conversation order: sequence numbers increase without gaps, for every member.
    Order {},
    /// Every AI stream completed or failed cleanly, chunks in order, resumes continuous;
    /// with `require_complete`, every followed stream must also complete (a refused
    /// resume, a failed end or a stream that never ended fails the check).
    Streams {
        #[serde(default)]
        require_complete: bool,
    },
    /// Rebuilding the projections from Kafka gives what the workers built live.
    Replay {
        #[serde(default = "every_projection")]
        projections: Vec<Projection>,
    },
    /// Every consumer group's lag fell to at most `max` within `within` after the load.
    Lag {
        max: u64,
        #[serde(with = "crate::duration")]
        within: Duration,
    },
    /// The `percentile` of latency `metric` stayed below `max`.
    Slo {
        metric: String,
        percentile: f64,
        #[serde(with = "crate::duration")]
        max: Duration,
        /// Judge only time outside fault windows.
        #[serde(default)]
        outside_faults: bool,
    },
}

/// Where a duplicate can be observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicatePath {
    /// Real-time delivery to connected members.
    Live,
    /// Messages returned by sync after a reconnect.
    Sync,
    /// Events on the Kafka topics.
    Kafka,
    /// Rows of the audit trail.
    Audit,
}

fn every_duplicate_path() -> Vec<DuplicatePath> {
    vec![
        DuplicatePath::Live,
        DuplicatePath::Sync,
        DuplicatePath::Kafka,
        DuplicatePath::Audit,
    ]
}

/// A projection the workers build from Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    Audit,
    Search,
    Analytics,
}

impl Projection {
    /// The worker that builds this projection.
    pub fn worker(self) -> WorkerKind {
        match self {
            Projection::Audit => WorkerKind::Audit,
            Projection::Search => WorkerKind::Search,
            Projection::Analytics => WorkerKind::Analytics,
        }
    }
}

fn every_projection() -> Vec<Projection> {
    vec![Projection::Audit, Projection::Search, Projection::Analytics]
}

impl Checker {
    pub fn name(&self) -> &'static str {
        match self {
            Checker::Delivery {} => "delivery",
            Checker::NoLossDownstream {} => "no_loss_downstream",
            Checker::Duplicates { .. } => "duplicates",
            Checker::Order {} => "order",
            Checker::Streams { .. } => "streams",
            Checker::Replay { .. } => "replay",
            Checker::Lag { .. } => "lag",
            Checker::Slo { .. } => "slo",
        }
    }
}

/// A string is a gate and a map a checker; deciding by shape (rather than serde's
/// `untagged`, which tries each in turn) keeps the gate parser's own error message.
impl<'de> Deserialize<'de> for Check {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CheckVisitor;

        impl<'de> Visitor<'de> for CheckVisitor {
            type Value = Check;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a gate string like `p99(delivery) < 100ms`, or a checker map like `{ checker: order }`")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Check, E> {
                Gate::parse(text).map(Check::Gate).map_err(E::custom)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Check, A::Error> {
                Checker::deserialize(de::value::MapAccessDeserializer::new(map)).map(Check::Checker)
            }
        }

        deserializer.deserialize_any(CheckVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_gates_and_maps_are_checkers() {
        let checks: Vec<Check> = serde_yaml::from_str(
            "- lost == 0\n- { checker: order }\n- { checker: duplicates, max_fraction: 0.01 }\n- { checker: replay }\n",
        )
        .unwrap();
        assert!(matches!(&checks[0], Check::Gate(gate) if gate.text == "lost == 0"));
        assert_eq!(checks[1], Check::Checker(Checker::Order {}));
        assert_eq!(
            checks[2],
            Check::Checker(Checker::Duplicates {
                max_fraction: 0.01,
                paths: every_duplicate_path()
            })
        );
        assert_eq!(
            checks[3],
            Check::Checker(Checker::Replay {
                projections: every_projection()
            })
        );
        let text = serde_yaml::to_string(&checks).unwrap();
        assert_eq!(serde_yaml::from_str::<Vec<Check>>(&text).unwrap(), checks);
    }

    #[test]
    fn unknown_keys_and_checkers_are_rejected() {
        for text in [
            "{ checker: order, strict: true }",
            "{ checker: ordering }",
            "{ checker: lag, max: 5 }",
            "p99(delivery) < soon",
            "42",
        ] {
            assert!(serde_yaml::from_str::<Check>(text).is_err(), "{text}");
        }
    }
}
