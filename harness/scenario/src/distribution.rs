//! Distributions of whole numbers (conversation sizes, message sizes): their YAML forms,
//! their bounds, and sampling from a uniform draw that the caller takes from its own seeded
//! generator (so this crate needs no random number library).

use serde::{Deserialize, Serialize};

/// One key names the form: `{ fixed: 200 }`, `{ uniform: { min: 2, max: 8 } }`,
/// `{ weighted: [ { value: 2, weight: 3 }, ... ] }`, `{ lognormal: { median, sigma, max } }`.
///
/// serde_yaml 0.9 writes and reads externally tagged enums as YAML tags (`!fixed 200`), so
/// the one-key mapping form goes through [`DistributionFields`] instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DistributionFields", into = "DistributionFields")]
pub enum Distribution {
    /// Always this value.
    Fixed(u64),
    /// Every value in `min..=max` equally likely.
    Uniform { min: u64, max: u64 },
    /// Each value with probability proportional to its weight.
    Weighted(Vec<WeightedValue>),
    /// A log-normal with this median and shape `sigma` (the standard deviation of the
    /// logarithm), rounded, and clamped to `1..=max` so that its tail stays bounded.
    Lognormal { median: u64, sigma: f64, max: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedValue {
    pub value: u64,
    pub weight: f64,
}

pub const DISTRIBUTION_FORMS: &str =
    "exactly one of `fixed: <n>`, `uniform: { min, max }`, `weighted: [ { value, weight }, ... ]`, `lognormal: { median, sigma, max }`";

/// Every key a distribution may have; exactly one must be present.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistributionFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fixed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uniform: Option<UniformBounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weighted: Option<Vec<WeightedValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lognormal: Option<LognormalShape>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UniformBounds {
    min: u64,
    max: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LognormalShape {
    median: u64,
    sigma: f64,
    max: u64,
}

impl TryFrom<DistributionFields> for Distribution {
    type Error = String;

    fn try_from(fields: DistributionFields) -> Result<Self, Self::Error> {
        match fields {
            DistributionFields {
                fixed: Some(value),
                uniform: None,
                weighted: None,
                lognormal: None,
            } => Ok(Distribution::Fixed(value)),
            DistributionFields {
                fixed: None,
                uniform: Some(UniformBounds { min, max }),
                weighted: None,
                lognormal: None,
            } => Ok(Distribution::Uniform { min, max }),
            DistributionFields {
                fixed: None,
                uniform: None,
                weighted: Some(entries),
                lognormal: None,
            } => Ok(Distribution::Weighted(entries)),
            DistributionFields {
                fixed: None,
                uniform: None,
                weighted: None,
                lognormal: Some(LognormalShape { median, sigma, max }),
            } => Ok(Distribution::Lognormal { median, sigma, max }),
            _ => Err(format!(
                "a distribution needs exactly one form; expected {DISTRIBUTION_FORMS}"
            )),
        }
    }
}

impl From<Distribution> for DistributionFields {
    fn from(distribution: Distribution) -> Self {
        let mut fields = DistributionFields {
            fixed: None,
            uniform: None,
            weighted: None,
            lognormal: None,
        };
        match distribution {
            Distribution::Fixed(value) => fields.fixed = Some(value),
            Distribution::Uniform { min, max } => fields.uniform = Some(UniformBounds { min, max }),
            Distribution::Weighted(entries) => fields.weighted = Some(entries),
            Distribution::Lognormal { median, sigma, max } => {
                fields.lognormal = Some(LognormalShape { median, sigma, max })
            }
        }
        fields
    }
}

impl Distribution {
    /// The smallest value `sample` can return.
    pub fn min(&self) -> u64 {
        match self {
            Distribution::Fixed(value) => *value,
            Distribution::Uniform { min, .. } => *min,
            Distribution::Weighted(entries) => {
                entries.iter().map(|entry| entry.value).min().unwrap_or(0)
            }
            Distribution::Lognormal { .. } => 1,
        }
    }

    /// The largest value `sample` can return.
    pub fn max(&self) -> u64 {
        match self {
            Distribution::Fixed(value) => *value,
            Distribution::Uniform { max, .. } => *max,
            Distribution::Weighted(entries) => {
                entries.iter().map(|entry| entry.value).max().unwrap_or(0)
            }
            Distribution::Lognormal { max, .. } => (*max).max(1),
        }
    }

    /// Maps `unit`, a uniform draw in `[0, 1)`, to a value of the distribution (inverse
    /// transform sampling). Out-of-range draws are clamped into `[0, 1)`.
    pub fn sample(&self, unit: f64) -> u64 {
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0 - f64::EPSILON)
        };
        match self {
            Distribution::Fixed(value) => *value,
            Distribution::Uniform { min, max } => {
                let (low, high) = ((*min).min(*max), (*min).max(*max));
                let span = (high - low) as f64 + 1.0;
                low.saturating_add((unit * span) as u64).min(high)
            }
            Distribution::Weighted(entries) => sample_weighted(entries, unit),
            Distribution::Lognormal { median, sigma, max } => {
                // unit == 0 would give -inf: the smallest representable draw stands in.
                let z = inverse_normal_cdf(unit.max(f64::MIN_POSITIVE));
                let value = (*median as f64) * (sigma * z).exp();
                let upper = (*max).max(1);
                if value.is_nan() {
                    return upper.min((*median).max(1));
                }
                (value.round().max(1.0) as u64).min(upper)
            }
        }
    }
}

fn sample_weighted(entries: &[WeightedValue], unit: f64) -> u64 {
    let usable = |entry: &&WeightedValue| entry.weight.is_finite() && entry.weight > 0.0;
    let total: f64 = entries
        .iter()
        .filter(usable)
        .map(|entry| entry.weight)
        .sum();
    let mut remaining = unit * total;
    let mut last = 0;
    for entry in entries.iter().filter(usable) {
        if remaining < entry.weight {
            return entry.value;
        }
        remaining -= entry.weight;
        last = entry.value;
    }
    // Rounding can leave a sliver past the last weight; it belongs to the last value.
    last
}

/// The standard normal quantile function, by Peter Acklam's rational approximation
/// (relative error below 1.2e-9), for `p` in (0, 1).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    if p < LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws() -> impl Iterator<Item = f64> {
        (0..10_000).map(|i| f64::from(i) / 10_000.0).chain([
            0.0,
            0.999_999_999_9,
            1.0,
            -1.0,
            f64::NAN,
        ])
    }

    #[test]
    fn every_sample_lies_within_min_and_max() {
        let distributions = [
            Distribution::Fixed(200),
            Distribution::Uniform { min: 2, max: 8 },
            Distribution::Uniform { min: 5, max: 5 },
            Distribution::Weighted(vec![
                WeightedValue {
                    value: 2,
                    weight: 3.0,
                },
                WeightedValue {
                    value: 50,
                    weight: 1.0,
                },
            ]),
            Distribution::Lognormal {
                median: 200,
                sigma: 1.5,
                max: 65_536,
            },
        ];
        for distribution in distributions {
            for unit in draws() {
                let value = distribution.sample(unit);
                assert!(
                    (distribution.min()..=distribution.max()).contains(&value),
                    "{distribution:?} gave {value} for {unit}"
                );
            }
        }
    }

    #[test]
    fn uniform_reaches_both_ends_evenly() {
        let uniform = Distribution::Uniform { min: 1, max: 4 };
        let mut counts = [0u32; 4];
        for unit in (0..4000).map(|i| f64::from(i) / 4000.0) {
            counts[(uniform.sample(unit) - 1) as usize] += 1;
        }
        assert_eq!(counts, [1000; 4]);
    }

    #[test]
    fn weighted_follows_the_weights() {
        let weighted = Distribution::Weighted(vec![
            WeightedValue {
                value: 2,
                weight: 3.0,
            },
            WeightedValue {
                value: 50,
                weight: 1.0,
            },
        ]);
        let twos = (0..4000)
            .filter(|i| weighted.sample(f64::from(*i) / 4000.0) == 2)
            .count();
        assert_eq!(twos, 3000);
    }

    #[test]
    fn parses_and_writes_the_one_key_mapping_form() {
        for (text, distribution) in [
            ("fixed: 200\n", Distribution::Fixed(200)),
            (
                "uniform:\n  min: 2\n  max: 8\n",
                Distribution::Uniform { min: 2, max: 8 },
            ),
            (
                "weighted:\n- value: 2\n  weight: 3.0\n",
                Distribution::Weighted(vec![WeightedValue {
                    value: 2,
                    weight: 3.0,
                }]),
            ),
            (
                "lognormal:\n  median: 200\n  sigma: 1.5\n  max: 4096\n",
                Distribution::Lognormal {
                    median: 200,
                    sigma: 1.5,
                    max: 4096,
                },
            ),
        ] {
            assert_eq!(
                serde_yaml::from_str::<Distribution>(text).unwrap(),
                distribution
            );
            assert_eq!(serde_yaml::to_string(&distribution).unwrap(), text);
        }
        for text in [
            "{}",
            "{fixed: 1, uniform: {min: 1, max: 2}}",
            "{normal: 3}",
            "{uniform: {min: 1}}",
            "7",
        ] {
            assert!(
                serde_yaml::from_str::<Distribution>(text).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn lognormal_is_centred_on_its_median() {
        let lognormal = Distribution::Lognormal {
            median: 200,
            sigma: 1.0,
            max: 1_000_000,
        };
        assert_eq!(lognormal.sample(0.5), 200);
        assert!(lognormal.sample(0.1) < 200 && lognormal.sample(0.9) > 200);
        assert_eq!(lognormal.sample(0.0), 1);
        assert!((inverse_normal_cdf(0.975) - 1.959_964).abs() < 1e-5);
        assert!((inverse_normal_cdf(0.01) + 2.326_348).abs() < 1e-5);
    }
}
