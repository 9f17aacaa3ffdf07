//! The streams checker: for every AI stream session a user followed (its stream ok, or a
//! resume invoke by it) that ended `completed` for that user, the chunk indices
//! `0..total` each arrived exactly once to that user (`missing`, `repeated` and
//! out-of-range `extra` indices otherwise). Sessions that never ended for the user are
//! `unfinished`: invalid, unless the run was interrupted (then unknown). Sessions that
//! ended `failed`, or whose resume was refused, are counted, not judged — unless the
//! check requires completion ([`streams_required`]): then every followed stream must end
//! `completed` for its follower, and a refused resume (the last word on a session) or a
//! `failed` end is `not_completed`.

use squall_history::Kind;

use crate::facts::{anomaly, Facts, Follow};
use crate::verdict::{ranges, Evidence, Example, Timeline, Validity, Verdict};

const INCOMPLETE: &str = "incomplete";
const UNFINISHED: &str = "unfinished";
const NOT_COMPLETED: &str = "not_completed";

/// Checks stream completeness per (user, session).
pub fn streams(f: &Facts) -> Verdict {
    streams_required(f, false)
}

/// Checks stream completeness; with `require_complete` every followed stream must also
/// have completed for its follower.
pub fn streams_required(f: &Facts, require_complete: bool) -> Verdict {
    let mut ev = Evidence::new("streams");
    ev.kinds(&[INCOMPLETE, UNFINISHED, NOT_COMPLETED]);
    let (mut followed, mut completed, mut failed, mut resume_failed, mut unfinished) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut complete_ok, mut with_missing, mut with_repeats, mut with_extra) =
        (0u64, 0u64, 0u64, 0u64);
    let (mut missing_chunks, mut repeated_chunks, mut resumed) = (0u64, 0u64, 0u64);
    let mut unfollowed = 0u64;
    for (&(u, sid), fo) in f.follows() {
        if !fo.followed() {
            if !fo.chunks.is_empty() || !fo.ends.is_empty() {
                unfollowed += 1;
            }
            continue;
        }
        followed += 1;
        if fo.resumes.iter().any(|r| r.2 == Kind::Invoke && r.1 >= 0) {
            resumed += 1;
        }
        let Some(end) = fo.ends.last() else {
            if fo.resumes.last().is_some_and(|r| r.2 == Kind::Fail) {
                resume_failed += 1;
                if require_complete && ev.wants(NOT_COMPLETED) {
                    ev.example(
                        NOT_COMPLETED,
                        Example {
                            id: f.session_name(sid).to_string(),
                            what: format!(
                                "{}'s resume was refused after {} chunks and the stream never completed for it",
                                f.who(u),
                                fo.chunks.len()
                            ),
                            timeline: timeline(f, u, sid, fo),
                        },
                    );
                }
            } else {
                unfinished += 1;
                if ev.wants(UNFINISHED) {
                    ev.example(
                        UNFINISHED,
                        Example {
                            id: f.session_name(sid).to_string(),
                            what: format!(
                                "{} followed it and never saw it end ({} chunks seen)",
                                f.who(u),
                                fo.chunks.len()
                            ),
                            timeline: timeline(f, u, sid, fo),
                        },
                    );
                }
            }
            continue;
        };
        if &*end.outcome != "completed" {
            failed += 1;
            if require_complete && ev.wants(NOT_COMPLETED) {
                ev.example(
                    NOT_COMPLETED,
                    Example {
                        id: f.session_name(sid).to_string(),
                        what: format!(
                            "ended `{}` for {} after {} chunks",
                            end.outcome,
                            f.who(u),
                            fo.chunks.len()
                        ),
                        timeline: timeline(f, u, sid, fo),
                    },
                );
            }
            continue;
        }
        completed += 1;
        let total = end.total.max(0);
        let n = usize::try_from(total).unwrap_or(0).min(1 << 24);
        let mut counts = vec![0u32; n];
        let mut extra: Vec<i64> = Vec::new();
        for &(_, idx) in &fo.chunks {
            match usize::try_from(idx).ok().and_then(|i| counts.get_mut(i)) {
                Some(c) => *c += 1,
                None => extra.push(idx),
            }
        }
        let missing: Vec<i64> = (0..n)
            .filter(|&i| counts[i] == 0)
            .map(|i| i as i64)
            .collect();
        let repeated: Vec<i64> = (0..n)
            .filter(|&i| counts[i] > 1)
            .map(|i| i as i64)
            .collect();
        extra.sort_unstable();
        extra.dedup();
        if missing.is_empty() && repeated.is_empty() && extra.is_empty() {
            complete_ok += 1;
            continue;
        }
        with_missing += u64::from(!missing.is_empty());
        with_repeats += u64::from(!repeated.is_empty());
        with_extra += u64::from(!extra.is_empty());
        missing_chunks += missing.len() as u64;
        repeated_chunks += repeated.len() as u64;
        if ev.wants(INCOMPLETE) {
            let mut what = vec![format!(
                "{} saw it complete with {total} chunks but",
                f.who(u)
            )];
            if !missing.is_empty() {
                what.push(format!("missing {}", ranges(&missing, 20)));
            }
            if !repeated.is_empty() {
                what.push(format!("repeated {}", ranges(&repeated, 20)));
            }
            if !extra.is_empty() {
                what.push(format!("out of range {}", ranges(&extra, 20)));
            }
            ev.example(
                INCOMPLETE,
                Example {
                    id: f.session_name(sid).to_string(),
                    what: what.join(" "),
                    timeline: timeline(f, u, sid, fo),
                },
            );
        }
    }
    let bad = completed - complete_ok;
    for (k, v) in [
        ("followed", followed),
        ("resumed", resumed),
        ("completed", completed),
        ("complete_and_exact", complete_ok),
        ("incomplete", bad),
        ("with_missing", with_missing),
        ("with_repeats", with_repeats),
        ("with_out_of_range", with_extra),
        ("missing_chunks", missing_chunks),
        ("repeated_chunks", repeated_chunks),
        ("failed", failed),
        ("resume_failed", resume_failed),
        ("unfinished", unfinished),
        ("unfollowed_with_chunks", unfollowed),
        ("unanswered_stream_invokes", f.unanswered_stream_invokes()),
    ] {
        ev.set(k, v);
    }
    let mut summary = format!(
        "{followed} (user, session) streams followed ({resumed} resumed): {completed} completed, \
         {bad} of them with missing ({missing_chunks}) or repeated ({repeated_chunks}) chunks; \
         {failed} failed, {resume_failed} resume refused, {unfinished} unfinished"
    );
    if require_complete {
        summary.push_str("; every followed stream must complete");
    }
    let valid = if bad > 0 || (require_complete && failed + resume_failed > 0) {
        Validity::Invalid
    } else if unfinished > 0 && f.interrupted() {
        summary = format!(
            "unknown: the run was interrupted with {unfinished} streams unfinished; {summary}"
        );
        Validity::Unknown
    } else if unfinished > 0 {
        Validity::Invalid
    } else if let Some(reason) = f.anomaly_reason(&[
        anomaly::UNKNOWN_PROCESS,
        anomaly::STREAM_WITHOUT_SESSION,
        anomaly::STREAM_OK_WITHOUT_INVOKE,
    ]) {
        summary = format!("unknown: {reason}; {summary}");
        Validity::Unknown
    } else if followed == 0 {
        summary = format!("unknown: no stream was followed; {summary}");
        Validity::Unknown
    } else {
        Validity::Valid
    };
    ev.verdict(valid, summary)
}

pub(crate) fn timeline(f: &Facts, u: u32, sid: u32, fo: &Follow) -> Vec<String> {
    let who = f.who(u);
    let name = f.session_name(sid);
    let mut tl = Timeline::new();
    if let Some(s) = &fo.start {
        if let Some(it) = s.invoke_t {
            tl.push(
                it,
                &who,
                format!("invoke stream c={}", fo.c.unwrap_or(u32::MAX)),
            );
        }
        tl.push(
            s.t,
            &who,
            format!(
                "ok stream session={name}{}",
                if s.http { " http" } else { "" }
            ),
        );
    }
    for &(t, after, k) in &fo.resumes {
        let k = if k == Kind::Invoke { "invoke" } else { "fail" };
        tl.push(t, &who, format!("{k} resume session={name} after={after}"));
    }
    f.timeline_connections(
        u,
        fo.start.map_or(0, |s| s.invoke_t.unwrap_or(s.t)),
        &mut tl,
    );
    for &(t, idx) in &fo.chunks {
        tl.push(t, &who, format!("ok chunk session={name} idx={idx}"));
    }
    for e in &fo.ends {
        tl.push(
            e.t,
            &who,
            format!(
                "ok stream_end session={name} outcome={} total={}",
                e.outcome, e.total
            ),
        );
    }
    tl.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::H;

    /// u0 starts session s1 (3 chunks); u1 follows it by resume.
    fn base() -> H {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        h.stream(10, 10, 0, 0).stream_ok(11, 0, 0, "s1");
        h.resume(12, 1, "s1", -1);
        h
    }

    #[test]
    fn passes_when_each_follower_got_every_chunk_once_even_across_a_resume() {
        let mut h = base();
        for i in 0..3 {
            h.chunk(20 + i, 0, "s1", i as i64);
        }
        h.stream_end(30, 0, "s1", "completed", 3);
        h.chunk(20, 1, "s1", 0);
        h.disconnect(21, 1).connect(25, 1).resume(25, 1, "s1", 0);
        h.chunk(26, 1, "s1", 1)
            .chunk(27, 1, "s1", 2)
            .stream_end(30, 1, "s1", "completed", 3);
        let v = streams(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(
            (
                v.counts["followed"],
                v.counts["completed"],
                v.counts["resumed"]
            ),
            (2, 2, 1)
        );
    }

    #[test]
    fn missing_and_repeated_chunks_are_named() {
        let mut h = base();
        h.chunk(20, 0, "s1", 0)
            .chunk(21, 0, "s1", 2)
            .stream_end(30, 0, "s1", "completed", 3);
        h.chunk(20, 1, "s1", 0)
            .chunk(21, 1, "s1", 1)
            .chunk(22, 1, "s1", 1)
            .chunk(23, 1, "s1", 2);
        h.stream_end(30, 1, "s1", "completed", 3);
        let v = streams(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!((v.counts["with_missing"], v.counts["with_repeats"]), (1, 1));
        assert_eq!(v.examples.len(), 2);
        assert!(v.examples.iter().all(|e| e.id == "s1"));
        assert!(
            v.examples[0].what.contains("user u0 (p=0)")
                && v.examples[0].what.contains("missing 1")
        );
        assert!(
            v.examples[1].what.contains("user u1 (p=1)")
                && v.examples[1].what.contains("repeated 1")
        );
        assert!(
            v.examples[0].timeline[0].contains("invoke stream c=0"),
            "{:?}",
            v.examples[0].timeline
        );
    }

    #[test]
    fn out_of_range_chunk_indices() {
        let mut h = base();
        h.chunk(20, 0, "s1", 0)
            .chunk(21, 0, "s1", 1)
            .chunk(22, 0, "s1", 2)
            .chunk(23, 0, "s1", 3);
        h.stream_end(30, 0, "s1", "completed", 3);
        h.stream_end(30, 1, "s1", "failed", 0);
        let v = streams(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!((v.counts["with_out_of_range"], v.counts["failed"]), (1, 1));
        assert!(v.examples[0].what.contains("out of range 3"));
    }

    #[test]
    fn unfinished_is_invalid_unless_interrupted() {
        let mut h = base();
        h.chunk(20, 0, "s1", 0)
            .stream_end(30, 0, "s1", "completed", 1);
        let v = streams(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["unfinished"], 1);
        assert_eq!(v.examples[0].id, "s1");
        assert!(v.examples[0].what.contains("user u1 (p=1)"));
        h.phase(40, "interrupted");
        assert_eq!(streams(&h.facts()).valid, Validity::Unknown);
    }

    #[test]
    fn a_refused_resume_ends_the_follow() {
        let mut h = base();
        h.chunk(20, 0, "s1", 0)
            .stream_end(30, 0, "s1", "completed", 1);
        h.op(
            13,
            1,
            Kind::Fail,
            squall_history::Value::Resume {
                session: "s1".into(),
                after: -1,
            },
        );
        let v = streams(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["resume_failed"], 1);
    }

    #[test]
    fn a_refused_resume_fails_only_when_completion_is_required() {
        let mut h = base();
        for i in 0..3 {
            h.chunk(20 + i, 0, "s1", i as i64);
        }
        h.stream_end(30, 0, "s1", "completed", 3);
        h.chunk(20, 1, "s1", 0);
        h.op(
            40,
            1,
            Kind::Fail,
            squall_history::Value::Resume {
                session: "s1".into(),
                after: 0,
            },
        );
        let lenient = streams(&h.facts());
        assert_eq!(lenient.valid, Validity::Valid, "{}", lenient.summary);
        assert_eq!(lenient.counts["resume_failed"], 1);
        let strict = streams_required(&h.facts(), true);
        assert_eq!(strict.valid, Validity::Invalid, "{}", strict.summary);
        assert_eq!(strict.examples.len(), 1);
        assert_eq!(strict.examples[0].id, "s1");
        assert!(strict.examples[0].what.contains("refused"));
    }
}
