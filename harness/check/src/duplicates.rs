//! The duplicates checker: how often one message arrived more than once, per path —
//! `live` (the same recipient got the same message more than once live), `sync` (more
//! than once by sync), `kafka` (one event id read more than once for a message) and
//! `audit` (more than one audit row for a message id) — as counts and fractions, invalid
//! when a path's fraction exceeds the threshold. A message delivered live and again by a
//! sync is expected after a resync: it is counted as `live_and_sync`, not as a duplicate.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::downstream::{
    acked_mids, audit_rows_per_message, run_conversations, KafkaEvent, Readback,
};
use crate::facts::{Facts, MsgId};
use crate::verdict::{fraction, ppm, Evidence, Example, Timeline, Validity, Verdict};

/// Where a duplicate is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Live,
    Sync,
    Kafka,
    Audit,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Live => "live",
            Path::Sync => "sync",
            Path::Kafka => "kafka",
            Path::Audit => "audit",
        }
    }
}

/// One path's result: duplicated / total, or why it could not be measured.
struct PathResult {
    duplicated: u64,
    total: u64,
    unknown: Option<String>,
}

/// Counts duplicates on each of `paths`; invalid when any fraction exceeds `max_fraction`
/// (a fraction in 0..=1). Kafka and audit need the readback (`downstream`).
pub fn duplicates(
    f: &Facts,
    paths: &[Path],
    max_fraction: f64,
    downstream: Option<&Readback>,
) -> Verdict {
    let mut ev = Evidence::new("duplicates");
    let mut paths: Vec<Path> = paths.to_vec();
    paths.sort();
    paths.dedup();
    ev.kinds(&["live", "sync", "kafka", "audit"]);
    let mut results: BTreeMap<Path, PathResult> = BTreeMap::new();

    if paths.contains(&Path::Live) || paths.contains(&Path::Sync) {
        let (live, sync, both) = deliveries(f, &paths, &mut ev);
        ev.set("live_and_sync", both);
        results.insert(Path::Live, live);
        results.insert(Path::Sync, sync);
    }
    if paths.contains(&Path::Kafka) || paths.contains(&Path::Audit) {
        match downstream {
            None => {
                for p in [Path::Kafka, Path::Audit] {
                    results.insert(
                        p,
                        PathResult {
                            duplicated: 0,
                            total: 0,
                            unknown: Some("no readback".into()),
                        },
                    );
                }
            }
            Some(rb) => {
                let (kafka, audit) = downstream_paths(f, rb, &mut ev);
                results.insert(Path::Kafka, kafka);
                results.insert(Path::Audit, audit);
            }
        }
    }

    let mut parts = Vec::new();
    let mut over = Vec::new();
    let mut unknown = Vec::new();
    for p in &paths {
        let Some(r) = results.get(p) else { continue };
        let name = p.name();
        let fr = fraction(r.duplicated, r.total);
        ev.set(format!("{name}_messages"), r.total);
        ev.set(format!("{name}_duplicated"), r.duplicated);
        ev.set(format!("{name}_fraction_ppm"), ppm(r.duplicated, r.total));
        parts.push(format!(
            "{name} {}/{} ({:.4}%)",
            r.duplicated,
            r.total,
            fr * 100.0
        ));
        if fr > max_fraction {
            over.push(name);
        } else if let Some(why) = &r.unknown {
            unknown.push(format!("{name}: {why}"));
        }
    }
    let mut summary = format!(
        "{}; live_and_sync {}; max {:.4}%",
        if parts.is_empty() {
            "no paths".to_string()
        } else {
            parts.join(", ")
        },
        ev.get("live_and_sync"),
        max_fraction * 100.0
    );
    let valid = if !over.is_empty() {
        summary = format!("over the limit on {}; {summary}", over.join(", "));
        Validity::Invalid
    } else if !unknown.is_empty() {
        summary = format!("unknown: {}; {summary}", unknown.join("; "));
        Validity::Unknown
    } else if paths.is_empty() {
        summary = format!("unknown: no paths to check; {summary}");
        Validity::Unknown
    } else if !(0.0..=1.0).contains(&max_fraction) {
        summary =
            format!("unknown: max_fraction {max_fraction} is not a fraction in 0..=1; {summary}");
        Validity::Unknown
    } else {
        Validity::Valid
    };
    ev.verdict(valid, summary)
}

/// Per (recipient, message): deliveries via live and via sync.
fn deliveries(f: &Facts, paths: &[Path], ev: &mut Evidence) -> (PathResult, PathResult, u64) {
    let (mut live_pairs, mut live_dup, mut sync_pairs, mut sync_dup, mut both) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (&(r, c), list) in f.deliveries() {
        let mut counts: HashMap<MsgId, (u32, u32)> = HashMap::with_capacity(list.len());
        for d in list {
            let e = counts.entry(d.m).or_insert((0, 0));
            match d.via {
                squall_history::Via::Live => e.0 += 1,
                squall_history::Via::Sync => e.1 += 1,
            }
        }
        let mut dups: Vec<(MsgId, u32, &'static str)> = Vec::new();
        for (&m, &(l, s)) in &counts {
            if l > 0 {
                live_pairs += 1;
            }
            if s > 0 {
                sync_pairs += 1;
            }
            if l > 0 && s > 0 {
                both += 1;
            }
            if l > 1 {
                live_dup += 1;
                dups.push((m, l, "live"));
            }
            if s > 1 {
                sync_dup += 1;
                dups.push((m, s, "sync"));
            }
        }
        dups.sort_unstable();
        for (m, n, path) in dups {
            let wanted = match path {
                "live" => paths.contains(&Path::Live),
                _ => paths.contains(&Path::Sync),
            };
            if !wanted || !ev.wants(path) {
                continue;
            }
            let mut tl = Timeline::new();
            f.timeline_send(m, &mut tl);
            f.timeline_deliveries_to(r, c, |d| d.m == m, &mut tl);
            ev.example(
                path,
                Example {
                    id: f.msg_name(m),
                    what: format!(
                        "delivered {n} times via {path} to {} in {}",
                        f.who(r),
                        f.conv_name(c)
                    ),
                    timeline: tl.finish(),
                },
            );
        }
    }
    (
        PathResult {
            duplicated: live_dup,
            total: live_pairs,
            unknown: None,
        },
        PathResult {
            duplicated: sync_dup,
            total: sync_pairs,
            unknown: None,
        },
        both,
    )
}

fn downstream_paths(f: &Facts, rb: &Readback, ev: &mut Evidence) -> (PathResult, PathResult) {
    let incomplete = (!rb.complete).then(|| "the readback is incomplete".to_string());
    let convs = run_conversations(f);
    let of_run = |e: &KafkaEvent| {
        e.conversation_id
            .as_deref()
            .is_none_or(|c| convs.contains_key(c))
    };

    // Kafka: per message, the records of each event id.
    let mut per_msg: BTreeMap<&str, BTreeMap<&str, Vec<&KafkaEvent>>> = BTreeMap::new();
    for e in rb.chat_events.iter().filter(|e| of_run(e)) {
        if let Some(mid) = e.message_id.as_deref() {
            per_msg
                .entry(mid)
                .or_default()
                .entry(e.event_id.as_str())
                .or_default()
                .push(e);
        }
    }
    let mut kafka_dup = 0u64;
    for (mid, events) in &per_msg {
        let repeated: Vec<(&&str, &Vec<&KafkaEvent>)> =
            events.iter().filter(|(_, v)| v.len() > 1).collect();
        if repeated.is_empty() {
            continue;
        }
        kafka_dup += 1;
        if ev.wants("kafka") {
            let what: Vec<String> = repeated
                .iter()
                .map(|(id, v)| {
                    let places: Vec<String> = v
                        .iter()
                        .map(|e| format!("{}[{}]@{}", e.topic, e.partition, e.offset))
                        .collect();
                    format!("event {id} read {} times ({})", v.len(), places.join(", "))
                })
                .collect();
            ev.example(
                "kafka",
                Example {
                    id: mid.to_string(),
                    what: what.join("; "),
                    timeline: Vec::new(),
                },
            );
        }
    }

    // Audit: rows per message id, for this run's messages (acked or on Kafka for its conversations).
    let (acked, _) = acked_mids(f);
    let mut known: HashSet<&str> = acked.iter().map(|(mid, _)| *mid).collect();
    known.extend(per_msg.keys().copied());
    let rows = audit_rows_per_message(rb, |mid| known.contains(mid));
    let mut audit_dup = 0u64;
    for (mid, v) in &rows {
        if v.len() > 1 {
            audit_dup += 1;
            if ev.wants("audit") {
                let ids: Vec<&str> = v.iter().map(|r| r.event_id.as_str()).collect();
                ev.example(
                    "audit",
                    Example {
                        id: mid.to_string(),
                        what: format!("{} audit rows (event ids {})", v.len(), ids.join(", ")),
                        timeline: Vec::new(),
                    },
                );
            }
        }
    }
    (
        PathResult {
            duplicated: kafka_dup,
            total: per_msg.len() as u64,
            unknown: incomplete.clone(),
        },
        PathResult {
            duplicated: audit_dup,
            total: rows.len() as u64,
            unknown: incomplete,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downstream::{AuditRow, KafkaEvent};
    use crate::testkit::H;
    use squall_history::Via::{Live, Sync};

    const ALL: &[Path] = &[Path::Live, Path::Sync, Path::Kafka, Path::Audit];

    /// Four acked messages, each delivered once live to u1; u1 resynced and got 0-1 again
    /// by sync (live_and_sync, not a duplicate).
    fn history() -> H {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        for i in 1..=4 {
            let m = format!("0-{i}");
            h.send(10 * i, 0, 0, &m)
                .ok(10 * i + 1, 0, 0, &m, i as i64, &format!("m{i}"));
            h.deliver(10 * i + 2, 1, 0, i as i64, &m, 0, Live);
        }
        h.deliver(60, 1, 0, 1, "0-1", 0, Sync);
        h
    }

    fn readback() -> Readback {
        let ev = |id: &str, mid: &str, offset| KafkaEvent {
            event_id: id.into(),
            message_id: Some(mid.into()),
            conversation_id: Some("conv0".into()),
            seq: None,
            topic: "chat-events".into(),
            partition: 0,
            offset,
        };
        Readback {
            chat_events: (1..=4)
                .map(|i| ev(&format!("e{i}"), &format!("m{i}"), i))
                .collect(),
            audit_rows: (1..=4)
                .map(|i| AuditRow {
                    event_id: format!("e{i}"),
                    message_id: Some(format!("m{i}")),
                })
                .collect(),
            complete: true,
            replay: Vec::new(),
            partitions: Vec::new(),
        }
    }

    #[test]
    fn passes_with_no_duplicates_and_counts_live_and_sync_apart() {
        let v = duplicates(&history().facts(), ALL, 0.0, Some(&readback()));
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["live_and_sync"], 1);
        assert_eq!(v.counts["live_messages"], 4);
        assert_eq!(v.counts["sync_duplicated"], 0);
        assert_eq!(v.counts["kafka_messages"], 4);
    }

    #[test]
    fn live_duplicates_over_the_limit() {
        let mut h = history();
        h.deliver(70, 1, 0, 2, "0-2", 0, Live);
        let f = h.facts();
        let v = duplicates(&f, &[Path::Live], 0.2, None);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["live_duplicated"], 1);
        assert_eq!(v.counts["live_fraction_ppm"], 250_000);
        assert_eq!(v.examples.len(), 1);
        assert_eq!(v.examples[0].id, "0-2");
        assert!(v.examples[0].what.contains("2 times via live to user u1"));
        // Under a looser limit the same history passes.
        assert_eq!(
            duplicates(&f, &[Path::Live], 0.25, None).valid,
            Validity::Valid
        );
    }

    #[test]
    fn sync_duplicates_over_the_limit() {
        let mut h = history();
        h.deliver(61, 1, 0, 1, "0-1", 0, Sync);
        let v = duplicates(&h.facts(), &[Path::Live, Path::Sync], 0.5, None);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(
            (v.counts["sync_duplicated"], v.counts["sync_messages"]),
            (1, 1)
        );
        assert_eq!(v.examples[0].id, "0-1");
    }

    #[test]
    fn kafka_repeats_of_one_event() {
        let mut rb = readback();
        let again = KafkaEvent {
            offset: 9,
            ..rb.chat_events[2].clone()
        };
        rb.chat_events.push(again);
        let v = duplicates(&history().facts(), &[Path::Kafka], 0.0, Some(&rb));
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["kafka_duplicated"], 1);
        assert_eq!(v.examples[0].id, "m3");
        assert!(
            v.examples[0].what.contains("event e3 read 2 times"),
            "{}",
            v.examples[0].what
        );
    }

    #[test]
    fn audit_rows_repeated_for_one_message() {
        let mut rb = readback();
        rb.audit_rows.push(AuditRow {
            event_id: "e4".into(),
            message_id: Some("m4".into()),
        });
        rb.audit_rows.push(AuditRow {
            event_id: "x".into(),
            message_id: Some("not-this-run".into()),
        });
        let v = duplicates(&history().facts(), &[Path::Audit], 0.0, Some(&rb));
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(
            (v.counts["audit_duplicated"], v.counts["audit_messages"]),
            (1, 4)
        );
        assert_eq!(v.examples[0].id, "m4");
    }

    #[test]
    fn downstream_paths_without_a_readback_are_unknown() {
        let v = duplicates(&history().facts(), ALL, 0.0, None);
        assert_eq!(v.valid, Validity::Unknown);
        assert!(v.summary.contains("kafka: no readback"), "{}", v.summary);
        let mut rb = readback();
        rb.complete = false;
        let v = duplicates(&history().facts(), &[Path::Kafka], 0.0, Some(&rb));
        assert_eq!(v.valid, Validity::Unknown);
    }

    #[test]
    fn path_names_are_snake_case() {
        assert_eq!(
            serde_json::to_string(&Path::Kafka).unwrap_or_default(),
            "\"kafka\""
        );
    }
}
