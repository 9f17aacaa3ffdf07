//! The replay checker: replaying the topics from the start into emptied projections
//! (audit, search, analytics) gives the same digests as the projections the live workers
//! built. The digests are taken after the run by the readback (workers stopped, lag 0).

use std::collections::BTreeMap;

use crate::downstream::Readback;
use crate::verdict::{Example, Validity, Verdict};

pub fn replay(rb: &Readback, projections: &[String]) -> Verdict {
    let mut counts = BTreeMap::new();
    let mut examples = Vec::new();
    let mut unknown = Vec::new();
    let mut differ = 0u64;
    for p in projections {
        match rb.replay.iter().find(|d| &d.projection == p) {
            None => unknown.push(format!("{p}: not replayed")),
            Some(d) => match (&d.live, &d.rebuilt, &d.error) {
                (_, _, Some(e)) => unknown.push(format!("{p}: {e}")),
                (Some(live), Some(rebuilt), None) => {
                    counts.insert(format!("{p}_events"), d.events);
                    if live != rebuilt {
                        differ += 1;
                        examples.push(Example {
                            id: p.clone(),
                            what: "digest differs".into(),
                            timeline: vec![
                                format!("live {live}"),
                                format!("rebuilt {rebuilt} from {} events", d.events),
                            ],
                        });
                    }
                }
                _ => unknown.push(format!("{p}: a digest is missing")),
            },
        }
    }
    counts.insert("projections".into(), projections.len() as u64);
    counts.insert("differ".into(), differ);
    let valid = if differ > 0 {
        Validity::Invalid
    } else if !unknown.is_empty() || projections.is_empty() {
        Validity::Unknown
    } else {
        Validity::Valid
    };
    let summary = format!(
        "{} projections replayed from the start: {differ} differ from the live ones{}",
        projections.len(),
        if unknown.is_empty() {
            String::new()
        } else {
            format!("; not judged: {}", unknown.join("; "))
        }
    );
    Verdict {
        checker: "replay".into(),
        valid,
        summary,
        counts,
        examples,
        windows: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downstream::ReplayDigest;

    fn digest(p: &str, live: &str, rebuilt: &str) -> ReplayDigest {
        ReplayDigest {
            projection: p.into(),
            live: Some(live.into()),
            rebuilt: Some(rebuilt.into()),
            events: 10,
            error: None,
        }
    }

    #[test]
    fn equal_digests_pass_and_a_difference_is_named() {
        let ps = vec!["audit".to_string(), "search".to_string()];
        let mut rb = Readback {
            replay: vec![digest("audit", "a", "a"), digest("search", "s", "s")],
            ..Readback::default()
        };
        assert_eq!(replay(&rb, &ps).valid, Validity::Valid);
        rb.replay[1].rebuilt = Some("other".into());
        let v = replay(&rb, &ps);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.examples[0].id, "search");
    }

    #[test]
    fn a_projection_not_replayed_is_unknown() {
        let rb = Readback {
            replay: vec![digest("audit", "a", "a")],
            ..Readback::default()
        };
        assert_eq!(
            replay(&rb, &["audit".into(), "analytics".into()]).valid,
            Validity::Unknown
        );
        let mut rb = rb;
        rb.replay[0].error = Some("rebuild failed".into());
        assert_eq!(replay(&rb, &["audit".into()]).valid, Validity::Unknown);
    }
}
