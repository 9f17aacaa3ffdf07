//! Gates: one-line pass/fail conditions on the run's measurements, written as strings in
//! `checks` (`p99(delivery) < 100ms outside faults`). Owns the grammar, its hand-written
//! parser and the rules on which threshold fits which metric.
//!
//! ```text
//! gate      := metric op threshold [scope]
//! metric    := p<N>(<name>) | max(<name>) | mean(<name>) | lag(<group>) | rate(<name>) | <counter>
//! op        := <  |  <=  |  >  |  >=  |  ==
//! threshold := <number><unit>  |  <number>%  |  <number>        (unit: ns us ms s m h)
//! scope     := outside faults  |  within <duration> after faults
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

use crate::duration::parse_duration;

pub const GATE_FORM: &str =
    "`<metric> <op> <threshold> [scope]`, e.g. `p99(delivery) < 100ms outside faults`";
const METRIC_FORM: &str = "`p<N>(<name>)`, `max(<name>)`, `mean(<name>)`, `lag(<group>)`, `rate(<name>)` or a counter such as `lost`";
const OP_FORM: &str = "one of `<`, `<=`, `>`, `>=`, `==`";
const THRESHOLD_FORM: &str =
    "a number, a number with a unit (`100ms`, `2s`) or a percentage (`0.1%`)";
const SCOPE_FORM: &str = "nothing, `outside faults` or `within <duration> after faults`";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gate {
    pub metric: MetricRef,
    pub op: CmpOp,
    pub threshold: Threshold,
    pub scope: GateScope,
    /// The gate as written (trimmed), for reports.
    pub text: String,
}

/// What a gate measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricRef {
    /// `p99(delivery)`: the `p`-th percentile (0 < p <= 100) of a latency.
    Percentile { p: f64, metric: String },
    /// `max(reconnect)`: the largest latency.
    Max(String),
    /// `mean(stream_first_chunk)`: the mean latency.
    Mean(String),
    /// `lag(chatstream-audit)`: the largest lag of a consumer group, in messages.
    Lag(String),
    /// `rate(delivered)`: a count per second over the judged time.
    Rate(String),
    /// `lost`, `duplicated`, `error_rate`, `unexpected`: a count or a fraction.
    Counter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
        }
    }

    /// Whether `measured <op> threshold` holds.
    pub fn holds(self, measured: f64, threshold: f64) -> bool {
        match self {
            CmpOp::Lt => measured < threshold,
            CmpOp::Le => measured <= threshold,
            CmpOp::Gt => measured > threshold,
            CmpOp::Ge => measured >= threshold,
            CmpOp::Eq => measured == threshold,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// Written with a unit: `100ms`.
    Duration(#[serde(with = "crate::duration")] Duration),
    /// Written with `%`: `0.1%` is stored as 0.1 (percent, not a fraction).
    Percent(f64),
    /// A plain number.
    Number(f64),
}

/// Which part of the measured run a gate judges.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateScope {
    /// The whole measured run (after the warm-up).
    #[default]
    Whole,
    /// Only time when no fault window is open.
    OutsideFaults,
    /// Only the given time after each fault window closes (recovery).
    WithinAfterFaults(#[serde(with = "crate::duration")] Duration),
}

/// Why a gate string was rejected, and the form that would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}; expected {expected}")]
pub struct GateError {
    pub message: String,
    pub expected: String,
}

fn reject<T>(message: impl Into<String>, expected: impl Into<String>) -> Result<T, GateError> {
    Err(GateError {
        message: message.into(),
        expected: expected.into(),
    })
}

impl Gate {
    pub fn parse(input: &str) -> Result<Gate, GateError> {
        let text = input.trim();
        if text.is_empty() {
            return reject("the gate is empty", GATE_FORM);
        }
        let mut cursor = Cursor { text, at: 0 };
        let metric = parse_metric(&mut cursor)?;
        let op = parse_op(&mut cursor)?;
        let threshold = parse_threshold(&mut cursor, op)?;
        // A mismatched threshold is reported before trailing words, so `< 100 ms` is told
        // that its threshold needs a unit rather than that `ms` is unexpected.
        check_threshold_fits(&metric, &threshold)?;
        let scope = parse_scope(&mut cursor)?;
        Ok(Gate {
            metric,
            op,
            threshold,
            scope,
            text: text.to_string(),
        })
    }
}

impl std::str::FromStr for Gate {
    type Err = GateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Gate::parse(text)
    }
}

impl TryFrom<String> for Gate {
    type Error = GateError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Gate::parse(&text)
    }
}

impl From<Gate> for String {
    fn from(gate: Gate) -> Self {
        gate.text
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn take_while(&mut self, accept: impl Fn(char) -> bool) -> &'a str {
        let rest = self.rest();
        let length = rest.find(|c: char| !accept(c)).unwrap_or(rest.len());
        self.at += length;
        &rest[..length]
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    /// The rest of the text for messages, or a note that nothing is left.
    fn shown_rest(&self) -> String {
        match self.rest().trim() {
            "" => "the end of the gate".to_string(),
            rest => format!("`{rest}`"),
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

const FUNCTIONS: [&str; 4] = ["max", "mean", "lag", "rate"];

/// `p99`, `p99.9`, `p50` → the percentile, if `word` has that shape.
fn percentile_label(word: &str) -> Option<&str> {
    word.strip_prefix('p').filter(|digits| {
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
    })
}

fn parse_metric(cursor: &mut Cursor) -> Result<MetricRef, GateError> {
    cursor.skip_space();
    let word = cursor.take_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if word.is_empty() {
        return reject(
            format!("expected a metric, found {}", cursor.shown_rest()),
            METRIC_FORM,
        );
    }
    cursor.skip_space();
    if !cursor.eat("(") {
        if FUNCTIONS.contains(&word) || percentile_label(word).is_some() {
            return reject(
                format!("`{word}` needs the metric it applies to in parentheses"),
                format!("`{word}(<name>)`, e.g. `{word}(delivery)`"),
            );
        }
        let is_identifier =
            word.starts_with(|c: char| c.is_ascii_alphabetic()) && !word.contains('.');
        if !is_identifier {
            return reject(format!("`{word}` is not a metric"), METRIC_FORM);
        }
        return Ok(MetricRef::Counter(word.to_string()));
    }
    cursor.skip_space();
    let name = cursor.take_while(is_name_char);
    cursor.skip_space();
    if name.is_empty() {
        return reject(
            format!("`{word}(` needs a metric name"),
            format!("`{word}(<name>)`"),
        );
    }
    if !cursor.eat(")") {
        return reject(
            format!("`{word}({name}` is missing its closing `)`"),
            format!("`{word}({name})`"),
        );
    }
    let name = name.to_string();
    match word {
        "max" => Ok(MetricRef::Max(name)),
        "mean" => Ok(MetricRef::Mean(name)),
        "lag" => Ok(MetricRef::Lag(name)),
        "rate" => Ok(MetricRef::Rate(name)),
        _ => match percentile_label(word) {
            Some(label) => match label.parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(MetricRef::Percentile { p, metric: name }),
                _ => reject(
                    format!("`{word}` is not a percentile in (0, 100]"),
                    "a percentile like `p50`, `p99` or `p99.9`",
                ),
            },
            None => reject(format!("unknown function `{word}`"), METRIC_FORM),
        },
    }
}

fn parse_op(cursor: &mut Cursor) -> Result<CmpOp, GateError> {
    cursor.skip_space();
    for (token, op) in [
        ("<=", CmpOp::Le),
        (">=", CmpOp::Ge),
        ("==", CmpOp::Eq),
        ("<", CmpOp::Lt),
        (">", CmpOp::Gt),
    ] {
        if cursor.eat(token) {
            return Ok(op);
        }
    }
    reject(
        format!(
            "expected a comparison after the metric, found {}",
            cursor.shown_rest()
        ),
        OP_FORM,
    )
}

fn parse_threshold(cursor: &mut Cursor, op: CmpOp) -> Result<Threshold, GateError> {
    cursor.skip_space();
    let number = cursor.take_while(|c| c.is_ascii_digit() || c == '.');
    if number.is_empty() {
        return reject(
            format!(
                "expected a threshold after `{}`, found {}",
                op.symbol(),
                cursor.shown_rest()
            ),
            format!("{THRESHOLD_FORM}, not negative"),
        );
    }
    let Ok(value) = number.parse::<f64>() else {
        return reject(format!("`{number}` is not a number"), THRESHOLD_FORM);
    };
    let unit = cursor.take_while(|c| c.is_ascii_alphabetic() || c == '%');
    match unit {
        "" => Ok(Threshold::Number(value)),
        "%" if value <= 100.0 => Ok(Threshold::Percent(value)),
        "%" => reject(
            format!("`{number}%` is more than 100%"),
            "a percentage in 0..=100",
        ),
        _ => match parse_duration(&format!("{number}{unit}")) {
            Ok(duration) => Ok(Threshold::Duration(duration)),
            Err(_) => reject(
                format!("unknown unit `{unit}` in `{number}{unit}`"),
                "a unit among ns, us, ms, s, m, h, or `%`",
            ),
        },
    }
}

fn parse_scope(cursor: &mut Cursor) -> Result<GateScope, GateError> {
    let words: Vec<&str> = cursor.rest().split_whitespace().collect();
    match words.as_slice() {
        [] => Ok(GateScope::Whole),
        ["outside", "faults"] => Ok(GateScope::OutsideFaults),
        ["within", length, "after", "faults"] => match parse_duration(length) {
            Ok(duration) if !duration.is_zero() => Ok(GateScope::WithinAfterFaults(duration)),
            Ok(_) => reject(
                "`within 0s after faults` covers no time",
                "a positive duration like `30s`",
            ),
            Err(_) => reject(
                format!("`{length}` is not a duration"),
                "`within <duration> after faults`, e.g. `within 30s after faults`",
            ),
        },
        _ => reject(
            format!("unexpected {} after the threshold", cursor.shown_rest()),
            SCOPE_FORM,
        ),
    }
}

fn check_threshold_fits(metric: &MetricRef, threshold: &Threshold) -> Result<(), GateError> {
    let latency_statistic = match metric {
        MetricRef::Percentile { .. } => Some("a percentile"),
        MetricRef::Max(_) => Some("a maximum"),
        MetricRef::Mean(_) => Some("a mean"),
        _ => None,
    };
    match (metric, threshold) {
        (_, Threshold::Duration(_)) if latency_statistic.is_some() => Ok(()),
        (_, Threshold::Percent(_)) if latency_statistic.is_some() => reject(
            format!(
                "{} of a latency compares with a duration, not a percentage",
                latency_statistic.unwrap_or_default()
            ),
            "a duration like `100ms`",
        ),
        (_, Threshold::Number(_)) if latency_statistic.is_some() => reject(
            format!(
                "{} of a latency needs a unit on its threshold",
                latency_statistic.unwrap_or_default()
            ),
            "a duration like `100ms`",
        ),
        (MetricRef::Lag(_), Threshold::Number(_)) | (MetricRef::Rate(_), Threshold::Number(_)) => {
            Ok(())
        }
        (MetricRef::Lag(_), _) => reject(
            "consumer lag is counted in messages",
            "a plain number like `1000`",
        ),
        (MetricRef::Rate(_), _) => reject(
            "a rate is a plain number per second",
            "a plain number like `900`",
        ),
        (MetricRef::Counter(name), Threshold::Duration(_)) => reject(
            format!("`{name}` is a counter, so a duration threshold does not apply"),
            "a plain number like `0`, or a percentage like `0.1%`",
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn parses_every_form_of_the_grammar() {
        let cases = [
            (
                "p99(delivery) < 100ms",
                MetricRef::Percentile {
                    p: 99.0,
                    metric: "delivery".into(),
                },
                CmpOp::Lt,
                Threshold::Duration(ms(100)),
                GateScope::Whole,
            ),
            (
                "p99.9(send_ack) < 50ms outside faults",
                MetricRef::Percentile {
                    p: 99.9,
                    metric: "send_ack".into(),
                },
                CmpOp::Lt,
                Threshold::Duration(ms(50)),
                GateScope::OutsideFaults,
            ),
            (
                "max(reconnect) <= 2s",
                MetricRef::Max("reconnect".into()),
                CmpOp::Le,
                Threshold::Duration(ms(2000)),
                GateScope::Whole,
            ),
            (
                "mean( stream_first_chunk ) < 300ms",
                MetricRef::Mean("stream_first_chunk".into()),
                CmpOp::Lt,
                Threshold::Duration(ms(300)),
                GateScope::Whole,
            ),
            (
                "error_rate < 0.1%",
                MetricRef::Counter("error_rate".into()),
                CmpOp::Lt,
                Threshold::Percent(0.1),
                GateScope::Whole,
            ),
            (
                "lost == 0",
                MetricRef::Counter("lost".into()),
                CmpOp::Eq,
                Threshold::Number(0.0),
                GateScope::Whole,
            ),
            (
                "duplicated<=10",
                MetricRef::Counter("duplicated".into()),
                CmpOp::Le,
                Threshold::Number(10.0),
                GateScope::Whole,
            ),
            (
                "lag(chatstream-audit) < 1000 within 30s after faults",
                MetricRef::Lag("chatstream-audit".into()),
                CmpOp::Lt,
                Threshold::Number(1000.0),
                GateScope::WithinAfterFaults(ms(30_000)),
            ),
            (
                "  rate(delivered) >= 900  ",
                MetricRef::Rate("delivered".into()),
                CmpOp::Ge,
                Threshold::Number(900.0),
                GateScope::Whole,
            ),
            (
                "unexpected > 0",
                MetricRef::Counter("unexpected".into()),
                CmpOp::Gt,
                Threshold::Number(0.0),
                GateScope::Whole,
            ),
        ];
        for (text, metric, op, threshold, scope) in cases {
            let gate = Gate::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"));
            assert_eq!(
                (gate.metric, gate.op, gate.threshold, gate.scope),
                (metric, op, threshold, scope),
                "{text}"
            );
            assert_eq!(gate.text, text.trim());
        }
    }

    #[test]
    fn rejects_malformed_gates_with_the_expected_form() {
        let cases = [
            ("", "the gate is empty", "<metric>"),
            ("p99(delivery) < 0.1%", "not a percentage", "a duration"),
            ("p99(delivery) < 100", "needs a unit", "a duration"),
            ("lost < 5s", "a counter, so a duration", "a plain number"),
            ("lag(audit) < 5s", "counted in messages", "plain number"),
            ("rate(delivered) > 5%", "per second", "plain number"),
            (
                "p99(delivery) < 100ms always",
                "unexpected `always`",
                "outside faults",
            ),
            (
                "p99(delivery) < 100ms within 30s",
                "unexpected",
                "after faults",
            ),
            (
                "p99(delivery) < 100ms within soon after faults",
                "`soon` is not a duration",
                "within <duration>",
            ),
            ("p99(delivery) = 100ms", "expected a comparison", "`<=`"),
            (
                "p99(delivery) < -5ms",
                "expected a threshold after `<`",
                "not negative",
            ),
            ("p99(delivery) < 100 ms", "needs a unit", "a duration"),
            ("p99(delivery) < 100ks", "unknown unit `ks`", "ms"),
            ("p0(delivery) < 1ms", "not a percentile", "p99"),
            ("p101(delivery) < 1ms", "not a percentile", "p99"),
            (
                "p99 < 100ms",
                "needs the metric it applies to",
                "`p99(<name>)`",
            ),
            (
                "p99(delivery < 100ms",
                "missing its closing",
                "`p99(delivery)`",
            ),
            ("p99() < 100ms", "needs a metric name", "`p99(<name>)`"),
            (
                "median(delivery) < 100ms",
                "unknown function `median`",
                "p<N>",
            ),
            ("< 5", "expected a metric", "counter"),
            ("lost == 150%", "more than 100%", "0..=100"),
            ("1lost == 0", "not a metric", "counter"),
        ];
        for (text, message_part, expected_part) in cases {
            let error = Gate::parse(text).expect_err(text);
            assert!(error.message.contains(message_part), "{text}: {error}");
            assert!(error.expected.contains(expected_part), "{text}: {error}");
        }
    }

    #[test]
    fn serialises_as_its_text() {
        let gate = Gate::parse("lost == 0").unwrap();
        assert_eq!(serde_yaml::to_string(&gate).unwrap(), "lost == 0\n");
        assert_eq!(serde_yaml::from_str::<Gate>("lost == 0").unwrap(), gate);
        assert!(CmpOp::Le.holds(10.0, 10.0) && !CmpOp::Lt.holds(10.0, 10.0));
    }
}
