//! The consumer lag recovery checker, over lag samples taken during the run (per
//! consumer group): after the last fault heals, every group must be at most `max` at
//! some sample within `within_us` and stay at most `max` after that. With no faults the
//! reference point is the end (the last sample): every group must end at most `max`.

use std::collections::{BTreeMap, BTreeSet};

use crate::verdict::{fmt_t, Evidence, Example, Validity, Verdict, MAX_TIMELINE_LINES};

const NOT_RECOVERED: &str = "not_recovered";
const RELAPSED: &str = "relapsed";
const NO_SAMPLES: &str = "no_samples";

/// Checks that every consumer group's lag came back under `max` in time and stayed there.
pub fn lag(
    samples: &[(u64, BTreeMap<String, f64>)],
    faults_end_us: Option<u64>,
    max: u64,
    within_us: u64,
) -> Verdict {
    let mut ev = Evidence::new("lag");
    ev.kinds(&[NOT_RECOVERED, RELAPSED, NO_SAMPLES]);
    let mut order: Vec<&(u64, BTreeMap<String, f64>)> = samples.iter().collect();
    order.sort_by_key(|s| s.0);
    let groups: BTreeSet<&str> = order
        .iter()
        .flat_map(|s| s.1.keys().map(String::as_str))
        .collect();
    let Some(last_t) = order.last().map(|s| s.0) else {
        return ev.verdict(Validity::Unknown, "unknown: no lag samples".into());
    };
    let from = faults_end_us.unwrap_or_else(|| last_t.saturating_sub(within_us));
    let until = from.saturating_add(within_us);
    ev.window((from, until));
    let limit = max as f64;
    let under = |v: f64| v <= limit; // NaN is never under

    let (mut recovered, mut not_recovered, mut relapsed, mut no_samples) = (0u64, 0u64, 0u64, 0u64);
    let mut slowest_recovery = 0u64;
    let mut bad: Vec<String> = Vec::new();
    for g in &groups {
        let series: Vec<(u64, f64)> = order
            .iter()
            .filter(|s| s.0 >= from)
            .filter_map(|s| s.1.get(*g).map(|v| (s.0, *v)))
            .collect();
        let timeline = || {
            let mut lines: Vec<String> = series
                .iter()
                .take(MAX_TIMELINE_LINES - 1)
                .map(|(t, v)| format!("{} lag {g} = {v}", fmt_t(*t)))
                .collect();
            if series.len() >= MAX_TIMELINE_LINES {
                if let Some((t, v)) = series.last() {
                    lines.push(format!(
                        "... {} {} lag {g} = {v} (last)",
                        series.len() - lines.len(),
                        fmt_t(*t)
                    ));
                }
            }
            lines
        };
        let Some(&(lt, lv)) = series.last() else {
            no_samples += 1;
            ev.example(
                NO_SAMPLES,
                Example {
                    id: g.to_string(),
                    what: format!("no lag sample for {g} at or after {}", fmt_t(from)),
                    timeline: Vec::new(),
                },
            );
            continue;
        };
        // Settled: from the sample after the last one over the bound, every sample is
        // under it. A backlog that only appears after the fault heals (a relay catching
        // up) counts from when it is gone, not from a quiet moment before it.
        let last_over = series.iter().rposition(|&(_, v)| !under(v));
        let settled_at = match last_over {
            None => Some(from),
            Some(j) => series.get(j + 1).map(|s| s.0),
        };
        match settled_at {
            Some(r) if r <= until => {
                slowest_recovery = slowest_recovery.max(r - from);
            }
            Some(r) => {
                // Under the bound at some point in time, then over it again: a relapse.
                let was_under = series.iter().position(|&(t, v)| t <= until && under(v));
                if let Some(i) = was_under.filter(|i| last_over.is_some_and(|j| j > *i)) {
                    let (pt, pv) = series[i..].iter().copied().fold((0, f64::MIN), |a, b| {
                        if b.1 > a.1 {
                            b
                        } else {
                            a
                        }
                    });
                    relapsed += 1;
                    bad.push(format!("{g} (rose to {pv})"));
                    ev.example(
                        RELAPSED,
                        Example {
                            id: g.to_string(),
                            what: format!(
                                "lag of {g} was at most {max} at {} but rose to {pv} at {} and settled only at {} (bound {}); last value {lv}",
                                fmt_t(series[i].0),
                                fmt_t(pt),
                                fmt_t(r),
                                fmt_t(until)
                            ),
                            timeline: timeline(),
                        },
                    );
                } else {
                    not_recovered += 1;
                    bad.push(format!("{g} (settled at {})", fmt_t(r)));
                    ev.example(
                        NOT_RECOVERED,
                        Example {
                            id: g.to_string(),
                            what: format!(
                                "lag of {g} was not at most {max} from {} to {}, only from {}; last value {lv} at {}",
                                fmt_t(from),
                                fmt_t(until),
                                fmt_t(r),
                                fmt_t(lt)
                            ),
                            timeline: timeline(),
                        },
                    );
                }
                continue;
            }
            None => {
                not_recovered += 1;
                bad.push(format!("{g} (last {lv})"));
                ev.example(
                    NOT_RECOVERED,
                    Example {
                        id: g.to_string(),
                        what: format!(
                            "lag of {g} was not at most {max} at the end; last value {lv} at {} (bound {})",
                            fmt_t(lt),
                            fmt_t(until)
                        ),
                        timeline: timeline(),
                    },
                );
                continue;
            }
        }
        recovered += 1;
    }
    for (k, v) in [
        ("groups", groups.len() as u64),
        ("recovered", recovered),
        ("not_recovered", not_recovered),
        ("relapsed", relapsed),
        ("groups_without_samples", no_samples),
        ("slowest_recovery_us", slowest_recovery),
        ("max", max),
        ("samples", samples.len() as u64),
    ] {
        ev.set(k, v);
    }
    let reference = match faults_end_us {
        Some(t) => format!("the last fault healed at {}", fmt_t(t)),
        None => "no faults: judged at the end".into(),
    };
    let mut summary = format!(
        "{recovered} of {} groups at most {max} within {}s and after ({reference}){}",
        groups.len(),
        within_us as f64 / 1e6,
        if bad.is_empty() {
            String::new()
        } else {
            format!("; not recovered: {}", bad.join(", "))
        }
    );
    let valid = if not_recovered + relapsed > 0 {
        Validity::Invalid
    } else if no_samples > 0 || groups.is_empty() {
        summary = format!(
            "unknown: {no_samples} groups without samples after the reference point; {summary}"
        );
        Validity::Unknown
    } else {
        Validity::Valid
    };
    ev.verdict(valid, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every second 0..=10 s with lags from `f(group, second)`.
    fn samples(f: impl Fn(&str, u64) -> f64) -> Vec<(u64, BTreeMap<String, f64>)> {
        (0..=10u64)
            .map(|s| {
                let m = ["g1", "g2"]
                    .iter()
                    .map(|g| (g.to_string(), f(g, s)))
                    .collect();
                (s * 1_000_000, m)
            })
            .collect()
    }

    #[test]
    fn passes_when_every_group_recovers_in_time_and_stays_down() {
        let s = samples(|g, s| if g == "g2" && s < 6 { 5000.0 } else { 10.0 });
        let v = lag(&s, Some(4_000_000), 100, 3_000_000);
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["slowest_recovery_us"], 2_000_000);
        assert_eq!(v.windows, vec![(4_000_000, 7_000_000)]);
    }

    #[test]
    fn a_group_that_does_not_recover_within_the_time_is_named_with_its_last_value() {
        let s = samples(|g, s| if g == "g2" && s < 9 { 5000.0 } else { 10.0 });
        let v = lag(&s, Some(4_000_000), 100, 3_000_000);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["not_recovered"], 1);
        assert_eq!(v.examples[0].id, "g2");
        assert!(
            v.examples[0].what.contains("last value 10"),
            "{}",
            v.examples[0].what
        );
    }

    #[test]
    fn a_group_that_rises_again_after_recovering() {
        let s = samples(|g, s| if g == "g1" && s == 9 { 500.0 } else { 10.0 });
        let v = lag(&s, Some(4_000_000), 100, 3_000_000);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["relapsed"], 1);
        assert_eq!(v.examples[0].id, "g1");
        assert!(v.examples[0].what.contains("rose to 500"));
    }

    #[test]
    fn without_faults_every_group_must_end_under_the_limit() {
        let s = samples(|g, s| if g == "g1" && s > 3 { 1e6 } else { 1.0 });
        let v = lag(&s, None, 100, 2_000_000);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.examples[0].id, "g1");
        assert!(
            v.examples[0].what.contains("last value 1000000"),
            "{}",
            v.examples[0].what
        );
        assert_eq!(
            lag(&samples(|_, _| 1.0), None, 100, 2_000_000).valid,
            Validity::Valid
        );
    }

    #[test]
    fn a_backlog_that_appears_after_the_heal_counts_from_when_it_is_gone() {
        // A relay publishing what piled up during a Kafka cut: quiet at the heal, a peak
        // a few seconds later, gone well within the time.
        let s = samples(|g, s| {
            if g == "g1" && (5..=7).contains(&s) {
                1500.0
            } else {
                10.0
            }
        });
        let v = lag(&s, Some(4_000_000), 100, 5_000_000);
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["slowest_recovery_us"], 4_000_000);
    }

    #[test]
    fn no_samples_is_unknown() {
        assert_eq!(lag(&[], None, 1, 1).valid, Validity::Unknown);
        let s = samples(|_, _| 1.0);
        let v = lag(&s, Some(20_000_000), 100, 1_000_000);
        assert_eq!(v.valid, Validity::Unknown, "{}", v.summary);
    }
}
