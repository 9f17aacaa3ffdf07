//! Verdicts: what a checker says ([`Validity`]), the key counts behind it and up to
//! [`MAX_EXAMPLES`] [`Example`]s, each with a human-readable timeline drawn from the
//! history. Also the small helpers the checkers share to collect that evidence
//! ([`Evidence`]) and to write timelines ([`Timeline`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// At most this many examples in one verdict.
pub const MAX_EXAMPLES: usize = 10;
/// At most this many lines in one example's timeline (the last says how many were left out).
pub const MAX_TIMELINE_LINES: usize = 24;

/// Jepsen's three answers: the property held, it was violated, or the checker could not
/// tell (an inconsistent history, missing data): unknown never passes a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validity {
    Valid,
    Invalid,
    Unknown,
}

/// One checker's answer with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub checker: String,
    pub valid: Validity,
    /// One line with the key counts (and, for unknown, the reason).
    pub summary: String,
    pub counts: BTreeMap<String, u64>,
    /// At most [`MAX_EXAMPLES`], spread over the kinds of violation found.
    pub examples: Vec<Example>,
    /// Time windows (µs on the run's clock) the verdict refers to, where relevant.
    pub windows: Vec<(u64, u64)>,
}

/// One violation (or one case worth showing), with the history around it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// What it is about: a client_msg_id, a message id, a stream session, a group.
    pub id: String,
    /// What is wrong, in one sentence.
    pub what: String,
    /// Lines like `t=12.345678s user u3 (p=3) ok send seq=5`, in time order.
    pub timeline: Vec<String>,
}

/// Collects a checker's counts and examples; examples are kept per kind (at most
/// [`MAX_EXAMPLES`] of each) and spread round-robin over the kinds in the verdict.
pub(crate) struct Evidence {
    checker: String,
    counts: BTreeMap<String, u64>,
    kinds: Vec<(&'static str, Vec<Example>)>,
    windows: Vec<(u64, u64)>,
}

impl Evidence {
    pub(crate) fn new(checker: impl Into<String>) -> Evidence {
        Evidence {
            checker: checker.into(),
            counts: BTreeMap::new(),
            kinds: Vec::new(),
            windows: Vec::new(),
        }
    }

    /// Sets a count.
    pub(crate) fn set(&mut self, key: impl Into<String>, n: u64) {
        self.counts.insert(key.into(), n);
    }

    /// Fixes the order kinds of examples are shown in (kinds not named come after).
    pub(crate) fn kinds(&mut self, kinds: &[&'static str]) {
        for k in kinds {
            if !self.kinds.iter().any(|(x, _)| x == k) {
                self.kinds.push((k, Vec::new()));
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> u64 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    pub(crate) fn window(&mut self, w: (u64, u64)) {
        self.windows.push(w);
    }

    /// Whether another example of this kind would be kept (so a checker builds a
    /// timeline only when it will be used).
    pub(crate) fn wants(&self, kind: &str) -> bool {
        self.kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .is_none_or(|(_, v)| v.len() < MAX_EXAMPLES)
    }

    pub(crate) fn example(&mut self, kind: &'static str, e: Example) {
        match self.kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, v)) => {
                if v.len() < MAX_EXAMPLES {
                    v.push(e);
                }
            }
            None => self.kinds.push((kind, vec![e])),
        }
    }

    pub(crate) fn verdict(self, valid: Validity, summary: String) -> Verdict {
        let mut queues: Vec<std::vec::IntoIter<Example>> =
            self.kinds.into_iter().map(|(_, v)| v.into_iter()).collect();
        let mut examples = Vec::new();
        'fill: loop {
            let mut any = false;
            for q in queues.iter_mut() {
                if examples.len() >= MAX_EXAMPLES {
                    break 'fill;
                }
                if let Some(e) = q.next() {
                    examples.push(e);
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        Verdict {
            checker: self.checker,
            valid,
            summary,
            counts: self.counts,
            examples,
            windows: self.windows,
        }
    }
}

/// Lines of a timeline, collected in any order and sorted by time (stable) at the end.
#[derive(Default)]
pub(crate) struct Timeline {
    lines: Vec<(u64, String)>,
}

impl Timeline {
    pub(crate) fn new() -> Timeline {
        Timeline::default()
    }

    /// `t=<seconds>s <who> <text>`.
    pub(crate) fn push(&mut self, t: u64, who: &str, text: impl AsRef<str>) {
        self.lines
            .push((t, format!("{} {who} {}", fmt_t(t), text.as_ref())));
    }

    pub(crate) fn finish(mut self) -> Vec<String> {
        self.lines.sort_by_key(|(t, _)| *t);
        let n = self.lines.len();
        if n > MAX_TIMELINE_LINES {
            let keep = MAX_TIMELINE_LINES - 1;
            let mut out: Vec<String> = self.lines.into_iter().take(keep).map(|(_, l)| l).collect();
            out.push(format!("... {} more lines", n - keep));
            out
        } else {
            self.lines.into_iter().map(|(_, l)| l).collect()
        }
    }
}

/// `t=12.345678s` for a time in µs.
pub(crate) fn fmt_t(t: u64) -> String {
    format!("t={}.{:06}s", t / 1_000_000, t % 1_000_000)
}

/// Seconds with millisecond precision, for summaries.
pub(crate) fn fmt_secs(us: u64) -> String {
    format!("{}.{:03}s", us / 1_000_000, (us % 1_000_000) / 1000)
}

/// `a / b` in parts per million (0 when `b` is 0), for fractions kept in integer counts.
pub(crate) fn ppm(a: u64, b: u64) -> u64 {
    if b == 0 {
        0
    } else {
        ((a as u128 * 1_000_000) / b as u128) as u64
    }
}

/// `a / b` as a float (0 when `b` is 0).
pub(crate) fn fraction(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Sorted integers as ranges: `1-3, 7, 9-10` (at most `max` parts, then `...`).
pub(crate) fn ranges(sorted: &[i64], max: usize) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if parts.len() == max {
            parts.push("...".into());
            break;
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str) -> Example {
        Example {
            id: id.into(),
            what: String::new(),
            timeline: vec![],
        }
    }

    #[test]
    fn examples_are_capped_and_spread_over_kinds() {
        let mut ev = Evidence::new("x");
        for i in 0..20 {
            if ev.wants("a") {
                ev.example("a", ex(&format!("a{i}")));
            }
        }
        ev.example("b", ex("b0"));
        assert!(!ev.wants("a"));
        assert!(ev.wants("b"));
        let v = ev.verdict(Validity::Invalid, "s".into());
        assert_eq!(v.examples.len(), MAX_EXAMPLES);
        assert_eq!(v.examples[0].id, "a0");
        assert_eq!(v.examples[1].id, "b0");
    }

    #[test]
    fn verdict_serialises_validity_in_snake_case() {
        let v = Evidence::new("x").verdict(Validity::Unknown, "why".into());
        let j = serde_json::to_value(&v).unwrap_or_default();
        assert_eq!(j["valid"], "unknown");
        let back: Verdict = serde_json::from_value(j).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, v);
    }

    #[test]
    fn timelines_are_sorted_and_capped() {
        let mut tl = Timeline::new();
        tl.push(2_000_000, "user a (p=0)", "b");
        tl.push(1_500_000, "user a (p=0)", "a");
        assert_eq!(
            tl.finish(),
            vec!["t=1.500000s user a (p=0) a", "t=2.000000s user a (p=0) b"]
        );
        let mut tl = Timeline::new();
        for i in 0..100 {
            tl.push(i, "x", "y");
        }
        let lines = tl.finish();
        assert_eq!(lines.len(), MAX_TIMELINE_LINES);
        assert!(lines[MAX_TIMELINE_LINES - 1].contains("77 more lines"));
    }

    #[test]
    fn ranges_compress() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10], 10), "1-3, 7, 9-10");
        assert_eq!(ranges(&[1, 3, 5], 2), "1, 3, ...");
        assert_eq!(ppm(1, 3), 333_333);
    }
}
