//! The latency SLO checker. Latency is measured from the intended (`due`) time the
//! open-loop schedule set, so a stalled system cannot hide behind coordinated omission:
//! `send_ack` (first ack − invoke due), `delivery` (each live delivery − the due of that
//! message's invoke), `stream_first_chunk` (a stream starter's first chunk − the stream's
//! due). The percentile is taken over the measured window (samples due between the
//! `load_start` and `load_end` phases), optionally leaving out samples due inside a fault
//! window; each fault also gets the percentile before it, during it and after it (windows
//! as long as the fault), and a time to recover: the first whole second after its end
//! whose p99 is back under the limit.

use crate::facts::{Facts, MsgId};
use crate::streams;
use crate::verdict::{fmt_secs, fmt_t, Evidence, Example, Timeline, Validity, Verdict};

/// The metrics this checker knows.
pub const METRICS: &[&str] = &["send_ack", "delivery", "stream_first_chunk"];

#[derive(Clone, Copy)]
enum SampleOf {
    Send(MsgId),
    Delivery(MsgId, u32, u32),
    Stream(u32, u32),
}

/// Calls `each(due, latency, what)` for every sample of `metric`; false for an unknown metric.
fn for_each_sample(f: &Facts, metric: &str, mut each: impl FnMut(u64, u64, SampleOf)) -> bool {
    match metric {
        "send_ack" => {
            for (i, s) in f.sends().iter().enumerate() {
                if let (Some(ok), Some(due)) = (s.ok_t(), s.due()) {
                    each(due, ok.saturating_sub(due), SampleOf::Send(i as MsgId));
                }
            }
        }
        "delivery" => {
            let sends = f.sends();
            for (&(r, c), list) in f.deliveries() {
                for d in list.iter().filter(|d| d.via == squall_history::Via::Live) {
                    if let Some(due) = sends.get(d.m as usize).and_then(|s| s.due()) {
                        each(due, d.t.saturating_sub(due), SampleOf::Delivery(d.m, r, c));
                    }
                }
            }
        }
        "stream_first_chunk" => {
            for (&(u, sid), fo) in f.follows() {
                let Some(due) = fo.start.and_then(|s| s.due) else {
                    continue;
                };
                if let Some(first) = fo.chunks.iter().map(|c| c.0).min() {
                    each(due, first.saturating_sub(due), SampleOf::Stream(u, sid));
                }
            }
        }
        _ => return false,
    }
    true
}

/// Nearest-rank percentile (`pct` in (0, 100]) of `v` (reordered); None when empty.
fn percentile(v: &mut [u64], pct: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((pct / 100.0) * v.len() as f64).ceil() as usize;
    let i = rank.clamp(1, v.len()) - 1;
    let (_, x, _) = v.select_nth_unstable(i);
    Some(*x)
}

/// Latencies of the samples (sorted by due) due in `[from, to)`.
fn between(samples: &[(u64, u64)], from: u64, to: u64) -> Vec<u64> {
    let lo = samples.partition_point(|s| s.0 < from);
    let hi = samples.partition_point(|s| s.0 < to);
    samples[lo..hi.max(lo)].iter().map(|s| s.1).collect()
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// Checks that the `percentile` (in percent, e.g. 99.0) of `metric` is at most `max_us`.
pub fn slo(
    f: &Facts,
    metric: &str,
    percentile_pct: f64,
    max_us: u64,
    outside_faults: bool,
) -> Verdict {
    let mut ev = Evidence::new(format!("slo_{metric}"));
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let known = for_each_sample(f, metric, |due, lat, _| samples.push((due, lat)));
    if !known {
        return ev.verdict(
            Validity::Unknown,
            format!(
                "unknown: no metric {metric:?} (known: {})",
                METRICS.join(", ")
            ),
        );
    }
    if !(percentile_pct > 0.0 && percentile_pct <= 100.0) {
        return ev.verdict(
            Validity::Unknown,
            format!("unknown: percentile {percentile_pct} is not in (0, 100]"),
        );
    }
    samples.sort_unstable();
    let mut notes = Vec::new();
    let start = f.phase_t("load_start").unwrap_or_else(|| {
        notes.push("no load_start phase: measured from t=0");
        0
    });
    let end = f
        .phases()
        .iter()
        .find(|p| p.name == "load_end" && p.t >= start)
        .map(|p| p.t)
        .unwrap_or_else(|| {
            notes.push("no load_end phase: measured to the end of the history");
            f.end_t().saturating_add(1)
        });
    let faults = f.fault_windows();
    let in_fault = |due: u64| faults.iter().any(|&(s, e)| due >= s && due < e);

    let mut measured: Vec<u64> = Vec::new();
    let mut excluded = 0u64;
    for &(due, lat) in &samples {
        if due < start || due >= end {
            continue;
        }
        if outside_faults && in_fault(due) {
            excluded += 1;
            continue;
        }
        measured.push(lat);
    }
    let n = measured.len() as u64;
    let value = percentile(&mut measured, percentile_pct);
    drop(measured);
    ev.set("samples", n);
    ev.set("samples_all", samples.len() as u64);
    ev.set("excluded_in_faults", excluded);
    ev.set("max_us", max_us);
    ev.set("percentile_milli", (percentile_pct * 1000.0).round() as u64);
    ev.set("window_start_us", start);
    ev.set("window_end_us", end);
    if let Some(v) = value {
        ev.set("value_us", v);
    }

    // Per fault: before / during / after and the time to recover.
    let mut fault_parts = Vec::new();
    let mut not_recovered = 0u64;
    for (fault, &(fs, fe)) in f.faults().iter().zip(&faults) {
        ev.window((fs, fe));
        let len = fe - fs;
        let id = fault.id;
        let mut part = format!("fault {id} ({} {})", fault.kind, fault.target);
        for (name, from, to) in [
            ("before", fs.saturating_sub(len), fs),
            ("during", fs, fe),
            ("after", fe, fe.saturating_add(len)),
        ] {
            let mut v = between(&samples, from, to);
            match percentile(&mut v, percentile_pct) {
                Some(p) => {
                    ev.set(format!("fault_{id}_{name}_us"), p);
                    part.push_str(&format!(" {name} {}", ms(p)));
                }
                None => part.push_str(&format!(" {name} -")),
            }
        }
        match time_to_recover(&samples, fe, max_us) {
            Some(ttr) => {
                ev.set(format!("fault_{id}_time_to_recover_us"), ttr);
                part.push_str(&format!(", recovered within {}", fmt_secs(ttr + 1_000_000)));
            }
            None => {
                not_recovered += 1;
                ev.set(format!("fault_{id}_not_recovered"), 1);
                part.push_str(", not recovered");
            }
        }
        fault_parts.push(part);
    }
    ev.set("faults", faults.len() as u64);
    ev.set("faults_not_recovered", not_recovered);

    let mut summary = match value {
        Some(v) => format!(
            "{metric} p{percentile_pct} = {} over {n} samples (max {}){}",
            ms(v),
            ms(max_us),
            if outside_faults {
                format!(", {excluded} excluded in faults")
            } else {
                String::new()
            }
        ),
        None => format!("{metric}: no samples in the measured window"),
    };
    if !fault_parts.is_empty() {
        summary.push_str("; ");
        summary.push_str(&fault_parts.join("; "));
    }
    if !notes.is_empty() {
        summary.push_str(&format!(" ({})", notes.join("; ")));
    }
    let valid = match value {
        None => {
            summary = format!("unknown: {summary}");
            Validity::Unknown
        }
        Some(v) if v <= max_us => Validity::Valid,
        Some(_) => {
            slowest(
                f,
                metric,
                start,
                end,
                outside_faults.then_some(&faults[..]),
                &mut ev,
            );
            Validity::Invalid
        }
    };
    ev.verdict(valid, summary)
}

/// The first whole second `[end + k s, end + (k+1) s)` with samples whose p99 is at most
/// `max_us`: `k` seconds, in µs.
fn time_to_recover(samples: &[(u64, u64)], end: u64, max_us: u64) -> Option<u64> {
    const SEC: u64 = 1_000_000;
    let last = samples.last()?.0;
    let mut k = 0u64;
    while end.saturating_add(k * SEC) <= last {
        let from = end + k * SEC;
        let mut v = between(samples, from, from.saturating_add(SEC));
        if let Some(p) = percentile(&mut v, 99.0) {
            if p <= max_us {
                return Some(k * SEC);
            }
        }
        k += 1;
    }
    None
}

/// Examples: the three slowest measured samples.
fn slowest(
    f: &Facts,
    metric: &str,
    start: u64,
    end: u64,
    faults: Option<&[(u64, u64)]>,
    ev: &mut Evidence,
) {
    let mut top: Vec<(u64, u64, SampleOf)> = Vec::new();
    for_each_sample(f, metric, |due, lat, what| {
        if due < start
            || due >= end
            || faults.is_some_and(|fw| fw.iter().any(|&(s, e)| due >= s && due < e))
        {
            return;
        }
        if top.len() < 3 || lat > top[top.len() - 1].1 {
            top.push((due, lat, what));
            top.sort_by_key(|x| std::cmp::Reverse(x.1));
            top.truncate(3);
        }
    });
    for (due, lat, what) in top {
        let mut tl = Timeline::new();
        let (id, whose) = match what {
            SampleOf::Send(m) => {
                f.timeline_send(m, &mut tl);
                (f.msg_name(m), String::new())
            }
            SampleOf::Delivery(m, r, c) => {
                f.timeline_send(m, &mut tl);
                f.timeline_deliveries_to(r, c, |d| d.m == m, &mut tl);
                (f.msg_name(m), format!(" to {}", f.who(r)))
            }
            SampleOf::Stream(u, sid) => {
                let lines = f
                    .follows()
                    .get(&(u, sid))
                    .map(|fo| streams::timeline(f, u, sid, fo));
                return ev.example(
                    "slowest",
                    Example {
                        id: f.session_name(sid).to_string(),
                        what: format!("{metric} {} for {} (due {})", ms(lat), f.who(u), fmt_t(due)),
                        timeline: lines.unwrap_or_default(),
                    },
                );
            }
        };
        ev.example(
            "slowest",
            Example {
                id,
                what: format!("{metric} {}{whose} (due {})", ms(lat), fmt_t(due)),
                timeline: tl.finish(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::H;
    use squall_history::Via::Live;

    /// One message a second from t=1s to t=20s (due on the second), acked after `lat(i)` ms
    /// and delivered live 5 ms after that; load from 1 s to 21 s.
    fn history(lat: impl Fn(u64) -> u64) -> H {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        h.phase(1000, "load_start");
        for i in 1..=20u64 {
            let due = i * 1000;
            let m = format!("0-{i}");
            let l = lat(i);
            h.send_due(due, due, 0, 0, &m)
                .ok(due + l, 0, 0, &m, i as i64, "x");
            h.deliver(due + l + 5, 1, 0, i as i64, &m, 0, Live);
        }
        h.phase(21_000, "load_end");
        h
    }

    #[test]
    fn passes_under_the_limit() {
        let f = history(|_| 10).facts();
        let v = slo(&f, "send_ack", 99.0, 20_000, false);
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!((v.counts["samples"], v.counts["value_us"]), (20, 10_000));
        let v = slo(&f, "delivery", 50.0, 20_000, false);
        assert_eq!((v.valid, v.counts["value_us"]), (Validity::Valid, 15_000));
    }

    #[test]
    fn fails_over_the_limit_naming_the_slowest() {
        let f = history(|i| if i == 7 { 900 } else { 10 }).facts();
        let v = slo(&f, "send_ack", 99.0, 100_000, false);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["value_us"], 900_000);
        assert_eq!(v.examples[0].id, "0-7");
        assert!(
            v.examples[0].what.contains("900.0 ms"),
            "{}",
            v.examples[0].what
        );
        // The median is still fine.
        assert_eq!(
            slo(&f, "send_ack", 50.0, 100_000, false).valid,
            Validity::Valid
        );
    }

    #[test]
    fn samples_due_in_a_fault_can_be_left_out_and_faults_get_before_during_after() {
        // Slow while the fault (5 s..8 s) is on and one second after it.
        let mut h = history(|i| if (5..9).contains(&i) { 2000 } else { 10 });
        h.fault(5000, 8000, 3);
        let f = h.facts();
        let v = slo(&f, "send_ack", 99.0, 100_000, false);
        assert_eq!(v.valid, Validity::Invalid);
        let v = slo(&f, "send_ack", 99.0, 100_000, true);
        assert_eq!(
            v.valid,
            Validity::Invalid,
            "the second after the fault is still slow"
        );
        assert_eq!(v.counts["excluded_in_faults"], 3);
        assert_eq!(v.counts["fault_3_before_us"], 10_000);
        assert_eq!(v.counts["fault_3_during_us"], 2_000_000);
        assert_eq!(v.counts["fault_3_after_us"], 2_000_000);
        assert_eq!(v.counts["fault_3_time_to_recover_us"], 1_000_000);
        assert_eq!(v.windows, vec![(5_000_000, 8_000_000)]);
        let mut h = history(|i| if (5..8).contains(&i) { 2000 } else { 10 });
        h.fault(5000, 8000, 3);
        assert_eq!(
            slo(&h.facts(), "send_ack", 99.0, 100_000, true).valid,
            Validity::Valid
        );
    }

    #[test]
    fn a_fault_that_never_recovers() {
        let mut h = history(|i| if i >= 5 { 2000 } else { 10 });
        h.fault(5000, 8000, 1);
        let v = slo(&h.facts(), "send_ack", 99.0, 100_000, true);
        assert_eq!(v.counts["faults_not_recovered"], 1);
        assert_eq!(v.counts["fault_1_not_recovered"], 1);
        assert!(v.summary.contains("not recovered"));
    }

    #[test]
    fn samples_outside_the_measured_window_do_not_count() {
        let mut h = history(|_| 10);
        h.send_due(500, 500, 0, 0, "0-99")
            .ok(5000, 0, 0, "0-99", 99, "x");
        let v = slo(&h.facts(), "send_ack", 100.0, 20_000, false);
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
    }

    #[test]
    fn stream_first_chunk_is_measured_from_the_stream_due() {
        let mut h = H::new(1, &[&[0]]);
        h.connect(0, 0).phase(0, "load_start");
        h.stream(100, 90, 0, 0)
            .stream_ok(110, 0, 0, "s1")
            .chunk(140, 0, "s1", 0)
            .chunk(150, 0, "s1", 1);
        h.phase(1000, "load_end");
        let v = slo(&h.facts(), "stream_first_chunk", 99.0, 50_000, false);
        assert_eq!(
            (v.valid, v.counts["value_us"]),
            (Validity::Valid, 50_000),
            "{}",
            v.summary
        );
        let v = slo(&h.facts(), "stream_first_chunk", 99.0, 50_000 - 1, false);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.examples[0].id, "s1");
    }

    #[test]
    fn no_samples_or_unknown_metric_is_unknown() {
        let h = H::new(1, &[&[0]]);
        assert_eq!(
            slo(&h.facts(), "send_ack", 99.0, 1, false).valid,
            Validity::Unknown
        );
        assert_eq!(
            slo(&h.facts(), "nope", 99.0, 1, false).valid,
            Validity::Unknown
        );
        assert_eq!(
            slo(&history(|_| 1).facts(), "send_ack", 0.0, 1, false).valid,
            Validity::Unknown
        );
    }

    #[test]
    fn nearest_rank_percentile() {
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&mut v, 99.0), Some(99));
        assert_eq!(percentile(&mut v, 100.0), Some(100));
        assert_eq!(percentile(&mut v, 0.5), Some(1));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
