//! The offered load over time (`load.rate`): a constant, or phases laid end to end from the
//! start of the warm-up. Owns its YAML forms, the instantaneous rate and its integral.
//!
//! A phase is either `{ hold: 5m, rate: 400 }` (a constant rate for that long) or
//! `{ ramp: 2m, from: 50, to: 400 }` (a linear change). A step is simply the next `hold` at
//! a new rate. After the last phase its final rate holds until the run ends.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Operations (messages and other actions) started per second, across all users.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Rate {
    /// The same rate from the start of the warm-up to the end.
    Constant(f64),
    /// Phases laid end to end from t = 0 (the start of the warm-up).
    Phases(Vec<Phase>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, try_from = "PhaseFields")]
pub enum Phase {
    Hold {
        #[serde(with = "crate::duration")]
        hold: Duration,
        rate: f64,
    },
    Ramp {
        #[serde(with = "crate::duration")]
        ramp: Duration,
        from: f64,
        to: f64,
    },
}

pub const PHASE_FORMS: &str = "`{ hold: <duration>, rate: <per second> }` or `{ ramp: <duration>, from: <per second>, to: <per second> }`";

/// Every key a phase may have; which combination is present decides the kind, so a
/// mistake gets a message about phases rather than about untagged enums.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseFields {
    #[serde(default, with = "crate::duration::option")]
    hold: Option<Duration>,
    rate: Option<f64>,
    #[serde(default, with = "crate::duration::option")]
    ramp: Option<Duration>,
    from: Option<f64>,
    to: Option<f64>,
}

impl TryFrom<PhaseFields> for Phase {
    type Error = String;

    fn try_from(fields: PhaseFields) -> Result<Self, Self::Error> {
        match fields {
            PhaseFields {
                hold: Some(hold),
                rate: Some(rate),
                ramp: None,
                from: None,
                to: None,
            } => Ok(Phase::Hold { hold, rate }),
            PhaseFields {
                hold: None,
                rate: None,
                ramp: Some(ramp),
                from: Some(from),
                to: Some(to),
            } => Ok(Phase::Ramp { ramp, from, to }),
            _ => Err(format!(
                "a phase mixes or misses keys (`hold` goes with `rate`; `ramp` with `from` and `to`); expected {PHASE_FORMS}"
            )),
        }
    }
}

impl Phase {
    pub fn length(&self) -> Duration {
        match self {
            Phase::Hold { hold, .. } => *hold,
            Phase::Ramp { ramp, .. } => *ramp,
        }
    }

    /// The rate `elapsed` into this phase (clamped to the phase).
    fn rate_after(&self, elapsed: Duration) -> f64 {
        match self {
            Phase::Hold { rate, .. } => *rate,
            Phase::Ramp { ramp, from, to } => {
                if ramp.is_zero() {
                    return *to;
                }
                let fraction = (elapsed.as_secs_f64() / ramp.as_secs_f64()).clamp(0.0, 1.0);
                from + (to - from) * fraction
            }
        }
    }

    /// Operations expected in the first `elapsed` of this phase (clamped to the phase).
    fn count_within(&self, elapsed: Duration) -> f64 {
        let elapsed = elapsed.min(self.length());
        let seconds = elapsed.as_secs_f64();
        match self {
            Phase::Hold { rate, .. } => rate * seconds,
            // The area of a trapezoid: the mean of the two end rates times the width.
            Phase::Ramp { from, .. } => (from + self.rate_after(elapsed)) / 2.0 * seconds,
        }
    }

    fn final_rate(&self) -> f64 {
        match self {
            Phase::Hold { rate, .. } => *rate,
            Phase::Ramp { to, .. } => *to,
        }
    }

    /// Every rate this phase states, with the key that states it (for validation).
    pub(crate) fn stated_rates(&self) -> Vec<(&'static str, f64)> {
        match self {
            Phase::Hold { rate, .. } => vec![("rate", *rate)],
            Phase::Ramp { from, to, .. } => vec![("from", *from), ("to", *to)],
        }
    }
}

impl Rate {
    /// The instantaneous rate `t` after the start of the warm-up.
    pub fn at(&self, t: Duration) -> f64 {
        match self {
            Rate::Constant(rate) => *rate,
            Rate::Phases(phases) => {
                let mut start = Duration::ZERO;
                for phase in phases {
                    let end = start.saturating_add(phase.length());
                    if t < end {
                        return phase.rate_after(t - start);
                    }
                    start = end;
                }
                phases.last().map_or(0.0, Phase::final_rate)
            }
        }
    }

    /// Operations expected from the start of the warm-up to `total` after it: the integral
    /// of [`Rate::at`].
    pub fn expected_count(&self, total: Duration) -> f64 {
        match self {
            Rate::Constant(rate) => rate * total.as_secs_f64(),
            Rate::Phases(phases) => {
                let mut count = 0.0;
                let mut start = Duration::ZERO;
                for phase in phases {
                    if total <= start {
                        return count;
                    }
                    count += phase.count_within(total - start);
                    start = start.saturating_add(phase.length());
                }
                let tail = total.saturating_sub(start);
                count + phases.last().map_or(0.0, Phase::final_rate) * tail.as_secs_f64()
            }
        }
    }

    /// How long the stated phases last (zero for a constant rate).
    pub fn phases_length(&self) -> Duration {
        match self {
            Rate::Constant(_) => Duration::ZERO,
            Rate::Phases(phases) => phases.iter().fold(Duration::ZERO, |total, phase| {
                total.saturating_add(phase.length())
            }),
        }
    }

    /// The highest rate reached at any time.
    pub fn peak(&self) -> f64 {
        match self {
            Rate::Constant(rate) => *rate,
            Rate::Phases(phases) => phases
                .iter()
                .flat_map(|phase| phase.stated_rates())
                .map(|(_, rate)| rate)
                .fold(0.0, f64::max),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;

        impl<'de> Visitor<'de> for RateVisitor {
            type Value = Rate;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a number of operations per second, or a list of phases, each {PHASE_FORMS}"
                )
            }

            fn visit_f64<E: de::Error>(self, rate: f64) -> Result<Rate, E> {
                Ok(Rate::Constant(rate))
            }

            fn visit_u64<E: de::Error>(self, rate: u64) -> Result<Rate, E> {
                Ok(Rate::Constant(rate as f64))
            }

            fn visit_i64<E: de::Error>(self, rate: i64) -> Result<Rate, E> {
                Ok(Rate::Constant(rate as f64))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Rate, A::Error> {
                Vec::<Phase>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(Rate::Phases)
            }
        }

        deserializer.deserialize_any(RateVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-9
    }

    #[test]
    fn a_constant_rate_is_flat_and_integrates_linearly() {
        let rate = Rate::Constant(50.0);
        assert_eq!(rate.at(secs(0)), 50.0);
        assert_eq!(rate.at(secs(3600)), 50.0);
        assert!(close(rate.expected_count(secs(60)), 3000.0));
        assert_eq!(rate.phases_length(), Duration::ZERO);
    }

    #[test]
    fn hold_then_ramp_then_the_last_rate_holds() {
        let rate = Rate::Phases(vec![
            Phase::Hold {
                hold: secs(10),
                rate: 10.0,
            },
            Phase::Ramp {
                ramp: secs(20),
                from: 10.0,
                to: 50.0,
            },
        ]);
        assert_eq!(rate.at(secs(0)), 10.0);
        assert_eq!(rate.at(secs(9)), 10.0);
        assert!(close(rate.at(secs(10)), 10.0));
        assert!(close(rate.at(secs(20)), 30.0));
        assert!(close(rate.at(secs(30)), 50.0));
        assert!(close(rate.at(secs(100)), 50.0));
        // 10 s at 10/s, then a ramp averaging 30/s for 20 s, then 50/s.
        assert!(close(rate.expected_count(secs(10)), 100.0));
        assert!(close(rate.expected_count(secs(20)), 100.0 + 200.0));
        assert!(close(rate.expected_count(secs(30)), 100.0 + 600.0));
        assert!(close(rate.expected_count(secs(40)), 100.0 + 600.0 + 500.0));
        assert_eq!(rate.phases_length(), secs(30));
        assert_eq!(rate.peak(), 50.0);
    }

    #[test]
    fn parses_a_number_or_phases() {
        let constant: Rate = serde_yaml::from_str("250").unwrap();
        assert_eq!(constant, Rate::Constant(250.0));
        let phases: Rate =
            serde_yaml::from_str("[{hold: 30s, rate: 5}, {ramp: 1m, from: 5, to: 7.5}]").unwrap();
        assert_eq!(
            phases,
            Rate::Phases(vec![
                Phase::Hold {
                    hold: secs(30),
                    rate: 5.0
                },
                Phase::Ramp {
                    ramp: secs(60),
                    from: 5.0,
                    to: 7.5
                }
            ])
        );
        assert_eq!(
            serde_yaml::to_string(&phases).unwrap(),
            "- hold: 30s\n  rate: 5.0\n- ramp: 1m\n  from: 5.0\n  to: 7.5\n"
        );
    }

    #[test]
    fn rejects_phases_that_mix_forms() {
        for text in [
            "[{hold: 30s}]",
            "[{hold: 30s, rate: 1, to: 3}]",
            "[{ramp: 1m, from: 1}]",
            "[{step: 3}]",
            "fast",
        ] {
            assert!(serde_yaml::from_str::<Rate>(text).is_err(), "{text}");
        }
    }
}
