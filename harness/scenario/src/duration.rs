//! Durations as scenarios write them: `"500ms"`, `"30s"`, `"3m"`, `"1h"`, or compound
//! `"1m30s"`. Owns the parser, the canonical formatter, and the serde helper modules used
//! with `#[serde(with = "crate::duration")]` (and `crate::duration::option`).

use std::fmt;
use std::time::Duration;

/// The form every duration error names, so messages and REFERENCE.md agree.
pub const EXPECTED_FORM: &str =
    "a duration like \"500ms\", \"30s\", \"3m\" or \"1h\" (units: ns, us, ms, s, m, h)";

const NANOS_PER_UNIT: [(&str, u128); 6] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a duration: {reason}")]
pub struct DurationError {
    pub text: String,
    pub reason: String,
}

/// Parses one or more `<number><unit>` segments, e.g. `"250ms"`, `"1.5s"`, `"1h30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let fail = |reason: &str| DurationError {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(fail("it is empty"));
    }
    let mut rest = trimmed;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return Err(fail("expected a number before the unit"));
        }
        let (number, after_number) = rest.split_at(number_len);
        let unit_len = after_number
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);
        if unit.is_empty() {
            return Err(fail("a unit is missing after the number"));
        }
        let Some(&(_, unit_nanos)) = NANOS_PER_UNIT.iter().find(|(name, _)| *name == unit) else {
            return Err(fail(&format!("unknown unit `{unit}`")));
        };
        total_nanos = total_nanos
            .checked_add(
                segment_nanos(number, unit_nanos)
                    .ok_or_else(|| fail("the number is malformed or too large"))?,
            )
            .ok_or_else(|| fail("it is too large"))?;
        rest = after_unit;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| fail("it is too large"))?;
    // The remainder of a division by 10^9 always fits in u32.
    let sub_nanos =
        u32::try_from(total_nanos % 1_000_000_000).map_err(|_| fail("it is too large"))?;
    Ok(Duration::new(secs, sub_nanos))
}

/// `number` is digits with at most one `.`; integers are exact, fractions are rounded to
/// the nanosecond (so "0.1s" is exactly 100ms).
fn segment_nanos(number: &str, unit_nanos: u128) -> Option<u128> {
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let whole_value: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = whole_value.checked_mul(unit_nanos)?;
    if !fraction.is_empty() {
        // Digits past nanosecond precision of the unit cannot matter; keep 18 at most.
        let kept = &fraction[..fraction.len().min(18)];
        let numerator: u128 = kept.parse().ok()?;
        let denominator = 10u128.pow(u32::try_from(kept.len()).ok()?);
        nanos = nanos.checked_add((numerator * unit_nanos + denominator / 2) / denominator)?;
    }
    Some(nanos)
}

/// A canonical form that parses back to the same duration: whole seconds as hours,
/// minutes and seconds (`90s` → `1m30s`, `7200s` → `2h`), anything finer in the largest
/// unit that divides it exactly (`1500ms`, `250us`).
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if duration.subsec_nanos() == 0 {
        let seconds = duration.as_secs();
        let mut text = String::new();
        for (unit, amount) in [
            ("h", seconds / 3600),
            ("m", seconds % 3600 / 60),
            ("s", seconds % 60),
        ] {
            if amount > 0 {
                text.push_str(&format!("{amount}{unit}"));
            }
        }
        return text;
    }
    for &(unit, unit_nanos) in NANOS_PER_UNIT.iter().rev() {
        if nanos % unit_nanos == 0 {
            return format!("{}{unit}", nanos / unit_nanos);
        }
    }
    format!("{nanos}ns")
}

/// A `Display` wrapper for messages: `Readable(d)` prints `format_duration(d)`.
pub struct Readable(pub Duration);

impl fmt::Display for Readable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTED_FORM)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
        parse_duration(text).map_err(|_| E::invalid_value(serde::de::Unexpected::Str(text), &self))
    }
}

pub fn serialize<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_duration(*duration))
}

pub fn deserialize<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(DurationVisitor)
}

/// The same for `Option<Duration>`; pair it with `#[serde(default)]` so an absent key is
/// `None`, and with `skip_serializing_if = "Option::is_none"`.
pub mod option {
    use super::DurationVisitor;
    use std::fmt;
    use std::time::Duration;

    struct OptionVisitor;

    impl<'de> serde::de::Visitor<'de> for OptionVisitor {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(super::EXPECTED_FORM)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(DurationVisitor).map(Some)
        }
    }

    pub fn serialize<S: serde::Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => super::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        deserializer.deserialize_option(OptionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_compounds() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("3m", Duration::from_secs(180)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.1s", Duration::from_millis(100)),
            ("250us", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_text() {
        for text in ["", "30", "s", "3 m", "3x", "1..5s", "-1s", "1h-5m", "."] {
            assert!(parse_duration(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn formats_canonically_and_round_trips() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3725), "1h2m5s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_nanos(1_000_001), "1000001ns"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration));
        }
    }
}
