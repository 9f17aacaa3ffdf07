//! The delivery checker (Jepsen's total-queue, per recipient): every acknowledged message
//! reached every other member of its conversation at least once, live or by sync.
//!
//! A member is required only if it was connected at some point after the ack (a
//! connection open then or later, up to the end of the history); members whose
//! connections had all ended for good before the ack are exempt (counted). Messages are
//! classified: `lost` (acked, missing at a required recipient; the same as
//! `acked_but_never_seen`), `sync_refused` (acked, missing at a required recipient whose
//! every sync of the conversation started after the ack was refused or left unanswered —
//! an overloaded system saying "retry later" — so the history cannot tell a loss from a
//! delivery the run ended before; the verdict is then unknown, not valid), `recovered` (outcome unknown yet delivered to someone),
//! `unexpected` (delivered but never invoked by anyone), `duplicated` (delivered more than
//! once to one recipient), plus consistency violations: `seq_mismatch` (a delivery whose
//! (c, s) disagrees with the ack, or with other deliveries of an unacked message),
//! `ack_seq_conflict` / `ack_mid_conflict` (two acks of one client_msg_id disagree),
//! `sender_mismatch` (a delivery names another sender), `non_member_deliveries` and
//! `failed_but_delivered` (a definite refusal that was stored after all).
//!
//! Store level, from the recovery phase (fresh connections that read every conversation
//! from seq 0 after the faults healed; their reads are never counted as a member's
//! delivery, so they cannot mask a live loss): `lost_at_store` (acked, absent from the
//! completed recovery read of its conversation), `store_seq_mismatch` (read back at
//! another seq than acked), `stored_twice` (one client_msg_id at two seqs),
//! `failed_but_stored` (a definite refusal read back). A lost (member, message) pair whose
//! message the recovery read found is a delivery loss (`lost_but_stored`), one whose
//! message it did not find a store loss. A conversation whose recovery read did not
//! complete leaves its messages unverified at the store (the verdict is then unknown).

use std::collections::HashMap;

use crate::facts::{anomaly, Facts, MsgId};
use crate::verdict::{fmt_secs, fmt_t, ppm, Evidence, Example, Timeline, Validity, Verdict};

const LOST: &str = "lost";
const SYNC_REFUSED: &str = "sync_refused";
const SEQ_MISMATCH: &str = "seq_mismatch";
const ACK_CONFLICT: &str = "ack_conflict";
const UNEXPECTED: &str = "unexpected";
const FAILED_DELIVERED: &str = "failed_but_delivered";
const NON_MEMBER: &str = "non_member";
const SENDER_MISMATCH: &str = "sender_mismatch";
const LOST_AT_STORE: &str = "lost_at_store";
const STORE_MISMATCH: &str = "store_mismatch";

/// Checks that every acknowledged message reached every required recipient.
pub fn delivery(f: &Facts) -> Verdict {
    let mut ev = Evidence::new("delivery");
    ev.kinds(&[
        LOST,
        SYNC_REFUSED,
        SEQ_MISMATCH,
        ACK_CONFLICT,
        UNEXPECTED,
        FAILED_DELIVERED,
        NON_MEMBER,
        SENDER_MISMATCH,
        LOST_AT_STORE,
        STORE_MISMATCH,
    ]);
    let sends = f.sends();
    let mut delivered = vec![false; sends.len()];

    // Every delivery once: who got what, and whether it agrees with the ack.
    let mut deliveries = 0u64;
    let mut unexpected_deliveries = 0u64;
    let mut seq_mismatch = 0u64;
    let mut non_member = 0u64;
    let mut unacked_ref: HashMap<MsgId, (u32, u32, i64)> = HashMap::new();
    for (&(r, c), list) in f.deliveries() {
        let member = f.is_member(r, c);
        for d in list {
            deliveries += 1;
            let i = d.m as usize;
            let Some(s) = sends.get(i) else { continue };
            delivered[i] = true;
            if !s.invoked() && !s.acked() {
                unexpected_deliveries += 1;
                continue;
            }
            if !member {
                non_member += 1;
                if ev.wants(NON_MEMBER) {
                    let mut tl = Timeline::new();
                    f.timeline_send(d.m, &mut tl);
                    f.timeline_deliveries_to(r, c, |x| x.m == d.m, &mut tl);
                    ev.example(
                        NON_MEMBER,
                        Example {
                            id: f.msg_name(d.m),
                            what: format!(
                                "delivered to {}, not a member of {}",
                                f.who(r),
                                f.conv_name(c)
                            ),
                            timeline: tl.finish(),
                        },
                    );
                }
            }
            match (s.seq(), s.c()) {
                (Some(seq), Some(sc)) => {
                    if sc != c || seq != d.s {
                        seq_mismatch += 1;
                        if ev.wants(SEQ_MISMATCH) {
                            let mut tl = Timeline::new();
                            f.timeline_send(d.m, &mut tl);
                            f.timeline_deliveries_to(r, c, |x| x.m == d.m, &mut tl);
                            ev.example(
                                SEQ_MISMATCH,
                                Example {
                                    id: f.msg_name(d.m),
                                    what: format!(
                                        "acked as seq {seq} in c{sc} but delivered to {} as seq {} in c{c} at {}",
                                        f.who(r),
                                        d.s,
                                        fmt_t(d.t)
                                    ),
                                    timeline: tl.finish(),
                                },
                            );
                        }
                    }
                }
                _ => {
                    let first = *unacked_ref.entry(d.m).or_insert((r, c, d.s));
                    if (first.1, first.2) != (c, d.s) {
                        seq_mismatch += 1;
                        if ev.wants(SEQ_MISMATCH) {
                            let mut tl = Timeline::new();
                            f.timeline_send(d.m, &mut tl);
                            f.timeline_deliveries_to(first.0, first.1, |x| x.m == d.m, &mut tl);
                            f.timeline_deliveries_to(r, c, |x| x.m == d.m, &mut tl);
                            ev.example(
                                SEQ_MISMATCH,
                                Example {
                                    id: f.msg_name(d.m),
                                    what: format!(
                                        "not acked; delivered to {} as seq {} in c{} but to {} as seq {} in c{c}",
                                        f.who(first.0),
                                        first.2,
                                        first.1,
                                        f.who(r),
                                        d.s
                                    ),
                                    timeline: tl.finish(),
                                },
                            );
                        }
                    }
                }
            }
        }
    }
    drop(unacked_ref);

    // Outcomes per message.
    let (mut invoked, mut acked, mut failed, mut unknown, mut recovered) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut unexpected, mut failed_but_delivered) = (0u64, 0u64);
    for (i, s) in sends.iter().enumerate() {
        let m = i as MsgId;
        if s.invoked() {
            invoked += 1;
        }
        if s.acked() {
            acked += 1;
        } else if s.outcome_unknown() {
            unknown += 1;
            if delivered[i] {
                recovered += 1;
            }
        } else if s.failed() {
            failed += 1;
            if delivered[i] {
                failed_but_delivered += 1;
                if ev.wants(FAILED_DELIVERED) {
                    let mut tl = Timeline::new();
                    f.timeline_send(m, &mut tl);
                    if let Some(c) = s.c() {
                        f.timeline_deliveries_of_msg(m, c, &mut tl);
                    }
                    ev.example(
                        FAILED_DELIVERED,
                        Example {
                            id: f.msg_name(m),
                            what:
                                "the send failed (a definite refusal) yet the message was delivered"
                                    .into(),
                            timeline: tl.finish(),
                        },
                    );
                }
            }
        } else if !s.invoked() {
            unexpected += 1;
            if ev.wants(UNEXPECTED) {
                let mut tl = Timeline::new();
                let mut whom = Vec::new();
                for (&(r, c), list) in f.deliveries() {
                    if list.iter().any(|d| d.m == m) {
                        f.timeline_deliveries_to(r, c, |d| d.m == m, &mut tl);
                        whom.push(f.who(r));
                    }
                }
                for (&c, list) in f.recovery_msgs_all() {
                    if list.iter().any(|x| x.m == m) {
                        f.timeline_recovery(c, Some(m), &mut tl);
                        whom.push(format!("the recovery read of {}", f.conv_name(c)));
                    }
                }
                ev.example(
                    UNEXPECTED,
                    Example {
                        id: f.msg_name(m),
                        what: format!("delivered to {} but never sent by anyone", whom.join(", ")),
                        timeline: tl.finish(),
                    },
                );
            }
        }
    }
    drop(delivered);

    // Acks that disagree with each other.
    let (mut ack_seq_conflict, mut ack_mid_conflict) = (0u64, 0u64);
    let mut last: Option<MsgId> = None;
    for e in f.all_send_events() {
        if last == Some(e.m) || e.k != squall_history::Kind::Ok {
            continue;
        }
        let Some(s) = f.send(e.m) else { continue };
        let seq_differs = e.seq.is_some() && e.seq != s.seq();
        if seq_differs || e.mid_differs {
            last = Some(e.m);
            if seq_differs {
                ack_seq_conflict += 1;
            } else {
                ack_mid_conflict += 1;
            }
            if ev.wants(ACK_CONFLICT) {
                let mut tl = Timeline::new();
                f.timeline_send(e.m, &mut tl);
                ev.example(
                    ACK_CONFLICT,
                    Example {
                        id: f.msg_name(e.m),
                        what: if seq_differs {
                            format!(
                                "acked with seq {} and again with seq {}",
                                s.seq().unwrap_or(0),
                                e.seq.unwrap_or(0)
                            )
                        } else {
                            format!(
                                "acked twice with different message ids ({} first)",
                                f.mid(e.m).unwrap_or("-")
                            )
                        },
                        timeline: tl.finish(),
                    },
                );
            }
        }
    }

    let sender_mismatch = f.sender_mismatches().len() as u64;
    for x in f.sender_mismatches() {
        if !ev.wants(SENDER_MISMATCH) {
            break;
        }
        let mut tl = Timeline::new();
        f.timeline_send(x.m, &mut tl);
        f.timeline_deliveries_to(x.recipient, x.c, |d| d.m == x.m, &mut tl);
        let sender = f.send(x.m).and_then(|s| s.sender()).unwrap_or(u32::MAX);
        ev.example(
            SENDER_MISMATCH,
            Example {
                id: f.msg_name(x.m),
                what: format!(
                    "sent by {} but delivered to {} as from {}",
                    f.who(sender),
                    f.who(x.recipient),
                    f.who(x.from)
                ),
                timeline: tl.finish(),
            },
        );
    }

    // Required recipients, conversation by conversation (one recipient's counts at a time).
    let mut by_conv: Vec<Vec<MsgId>> = vec![Vec::new(); f.n_conversations()];
    for (i, s) in sends.iter().enumerate() {
        if let (true, Some(c)) = (s.acked(), s.c()) {
            if let Some(v) = by_conv.get_mut(c as usize) {
                v.push(i as MsgId);
            }
        }
    }
    let (mut required, mut exempt, mut lost, mut once, mut duplicated) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut sync_refused, mut late_unsynced) = (0u64, 0u64);
    let mut lost_msgs: Vec<MsgId> = Vec::new();
    for (c, msgs) in by_conv.iter().enumerate() {
        let c = c as u32;
        if msgs.is_empty() {
            continue;
        }
        for &r in f.members(c) {
            let list = f.deliveries_of(r, c);
            let mut got: HashMap<MsgId, u32> = HashMap::with_capacity(list.len());
            for d in list {
                *got.entry(d.m).or_insert(0) += 1;
            }
            for &m in msgs {
                let Some(s) = f.send(m) else { continue };
                if s.sender() == Some(r) {
                    continue;
                }
                let ok_t = s.ok_t().unwrap_or(0);
                if !f.connected_after(r, ok_t) {
                    exempt += 1;
                    continue;
                }
                let times = got.get(&m).copied().unwrap_or(0);
                // Acked only after its ack timeout (an info before the ok) and after the
                // recipient's last sync began: only a live frame could still bring it, and
                // the run may end first (the final resync waits for the sends that are
                // answered in time, not for these). Judged at the store, not here.
                if times == 0 && s.infos() > 0 && catch_up_after(f, r, c, ok_t) == CatchUp::NotTried
                {
                    late_unsynced += 1;
                    continue;
                }
                required += 1;
                match times {
                    0 if catch_up_after(f, r, c, ok_t) == CatchUp::Refused => {
                        sync_refused += 1;
                        if ev.wants(SYNC_REFUSED) {
                            ev.example(SYNC_REFUSED, sync_refused_example(f, m, r, c));
                        }
                    }
                    0 => {
                        lost += 1;
                        if lost_msgs.last() != Some(&m) {
                            lost_msgs.push(m);
                        }
                        if ev.wants(LOST) {
                            ev.example(LOST, lost_example(f, m, r, c));
                        }
                    }
                    1 => once += 1,
                    _ => duplicated += 1,
                }
            }
        }
    }
    lost_msgs.sort_unstable();
    lost_msgs.dedup();
    let store = store_level(f, &by_conv, &mut ev);
    let lost_but_stored = lost_msgs
        .iter()
        .filter(|m| store.stored.contains(m))
        .count() as u64;

    for (k, v) in [
        ("deliveries", deliveries),
        ("messages_invoked", invoked),
        ("acked", acked),
        ("failed", failed),
        ("unknown_outcome", unknown),
        ("recovered", recovered),
        ("required_deliveries", required),
        ("exempt", exempt),
        ("acked_late_after_last_sync", late_unsynced),
        ("lost", lost),
        ("acked_but_never_seen", lost),
        ("sync_refused", sync_refused),
        ("lost_messages", lost_msgs.len() as u64),
        ("delivered_exactly_once", once),
        ("delivered_exactly_once_ppm", ppm(once, required)),
        ("duplicated", duplicated),
        ("unexpected", unexpected),
        ("unexpected_deliveries", unexpected_deliveries),
        ("seq_mismatch", seq_mismatch),
        ("ack_seq_conflict", ack_seq_conflict),
        ("ack_mid_conflict", ack_mid_conflict),
        ("sender_mismatch", sender_mismatch),
        ("non_member_deliveries", non_member),
        ("failed_but_delivered", failed_but_delivered),
        ("recovery_conversations_read", store.read),
        ("recovery_conversations_unread", store.unread),
        ("recovery_messages_read", store.messages),
        ("store_verified", store.verified),
        ("store_unverified", store.unverified),
        ("lost_at_store", store.lost),
        ("lost_but_stored", lost_but_stored),
        ("store_seq_mismatch", store.seq_mismatch),
        ("stored_twice", store.twice),
        ("failed_but_stored", store.failed_stored),
        ("unknown_outcome_stored", store.unknown_stored),
    ] {
        ev.set(k, v);
    }
    let violations = lost
        + unexpected
        + seq_mismatch
        + ack_seq_conflict
        + ack_mid_conflict
        + sender_mismatch
        + non_member
        + failed_but_delivered
        + store.lost
        + store.seq_mismatch
        + store.twice
        + store.failed_stored;
    let mut summary = format!(
        "{acked} acked of {invoked} sent (failed {failed}, unknown {unknown}, recovered {recovered}); \
         {required} required deliveries: lost {lost} ({} messages), not delivered with every sync after the ack refused {sync_refused}, \
         duplicated {duplicated}, exactly once {:.4}%; unexpected {unexpected}, seq_mismatch {seq_mismatch}, exempt {exempt} \
         (+{late_unsynced} acked after their timeout and the recipient's last sync)",
        lost_msgs.len(),
        ppm(once, required) as f64 / 10_000.0,
    );
    let other =
        ack_seq_conflict + ack_mid_conflict + sender_mismatch + non_member + failed_but_delivered;
    if other > 0 {
        summary.push_str(&format!(
            ", ack conflicts {}, sender mismatches {sender_mismatch}, non-member deliveries {non_member}, failed but delivered {failed_but_delivered}",
            ack_seq_conflict + ack_mid_conflict
        ));
    }
    if f.has_recovery() {
        summary.push_str(&format!(
            "; store (recovery read of {} conversations, {} unread): {} acked verified, lost at store {}, \
             lost live but stored {lost_but_stored}, seq mismatch {}, stored twice {}, failed but stored {}",
            store.read, store.unread, store.verified, store.lost, store.seq_mismatch, store.twice,
            store.failed_stored
        ));
    } else {
        summary.push_str("; no recovery read in this history (store not judged)");
    }
    let valid = if violations > 0 {
        Validity::Invalid
    } else if let Some(reason) = f.anomaly_reason(&[
        anomaly::UNKNOWN_PROCESS,
        anomaly::CONVERSATION_OUT_OF_RANGE,
        anomaly::SEND_OUTCOME_WITHOUT_INVOKE,
        anomaly::SEND_ID_REUSED,
    ]) {
        summary = format!("unknown: {reason}; {summary}");
        Validity::Unknown
    } else if acked == 0 {
        summary = format!("unknown: no acknowledged message to check; {summary}");
        Validity::Unknown
    } else if store.unverified > 0 {
        summary = format!(
            "unknown: {} acked messages in {} conversations the recovery phase could not read; {summary}",
            store.unverified, store.unread
        );
        Validity::Unknown
    } else if sync_refused > 0 {
        summary = format!(
            "unknown: {sync_refused} (recipient, message) pairs not delivered, each recipient's every sync after the ack refused or unanswered; {summary}"
        );
        Validity::Unknown
    } else {
        Validity::Valid
    };
    ev.verdict(valid, summary)
}

/// How a recipient's syncs of one conversation went from a time on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// A sync started then was answered in full: whatever it did not bring was not there.
    Completed,
    /// Syncs started then, none answered in full (refused, or cut off or still open when
    /// the history ends).
    Refused,
    /// No sync started then: live delivery was the only way.
    NotTried,
}

fn catch_up_after(f: &Facts, r: u32, c: u32, t: u64) -> CatchUp {
    use squall_history::Kind;
    let mut pending: Option<u64> = None;
    let mut refused = false;
    for s in f.syncs(r, c) {
        match s.k {
            Kind::Invoke => pending = Some(s.t),
            Kind::Ok => {
                if pending.take().is_some_and(|started| started >= t) {
                    return CatchUp::Completed;
                }
            }
            Kind::Fail | Kind::Info => {
                refused |= pending.take().is_some_and(|started| started >= t);
            }
        }
    }
    refused |= pending.is_some_and(|started| started >= t);
    if refused {
        CatchUp::Refused
    } else {
        CatchUp::NotTried
    }
}

/// The timeline of acked message `m` as recipient `r` of conversation `c` lived it (its
/// send, `r`'s connections and syncs from then on, the message's deliveries), with its
/// seq and ack time.
fn undelivered_timeline(f: &Facts, m: MsgId, r: u32, c: u32) -> (Timeline, i64, u64) {
    let mut tl = Timeline::new();
    f.timeline_send(m, &mut tl);
    let (from, seq, ok_t) = match f.send(m) {
        Some(s) => (
            s.invoke_t().or(s.ok_t()).unwrap_or(0),
            s.seq().unwrap_or(0),
            s.ok_t().unwrap_or(0),
        ),
        None => (0, 0, 0),
    };
    f.timeline_connections(r, from, &mut tl);
    f.timeline_syncs(r, c, from, &mut tl);
    f.timeline_deliveries_of_msg(m, c, &mut tl);
    (tl, seq, ok_t)
}

fn sync_refused_example(f: &Facts, m: MsgId, r: u32, c: u32) -> Example {
    let (tl, seq, ok_t) = undelivered_timeline(f, m, r, c);
    Example {
        id: f.msg_name(m),
        what: format!(
            "acked as seq {seq} in {} at {}, not delivered to {}, whose every sync after the ack was refused or unanswered",
            f.conv_name(c),
            fmt_secs(ok_t),
            f.who(r),
        ),
        timeline: tl.finish(),
    }
}

/// What the recovery phase's reads say about the store.
#[derive(Default)]
struct Store {
    /// Acked messages the recovery read found.
    stored: std::collections::HashSet<MsgId>,
    read: u64,
    unread: u64,
    messages: u64,
    verified: u64,
    unverified: u64,
    lost: u64,
    seq_mismatch: u64,
    twice: u64,
    failed_stored: u64,
    unknown_stored: u64,
}

/// Judges every acked message against the recovery read of its conversation, and every
/// message read back against what the history says of its send.
fn store_level(f: &Facts, by_conv: &[Vec<MsgId>], ev: &mut Evidence) -> Store {
    let mut st = Store::default();
    if !f.has_recovery() {
        return st;
    }
    for c in 0..f.n_conversations() as u32 {
        let complete = f.recovery_complete(c);
        if complete {
            st.read += 1;
        }
        let msgs = f.recovery_msgs(c);
        st.messages += msgs.len() as u64;
        // m -> the seqs it was read back at (a retry stored twice shows up here).
        let mut found: HashMap<MsgId, Vec<i64>> = HashMap::with_capacity(msgs.len());
        for x in msgs {
            let seqs = found.entry(x.m).or_default();
            if !seqs.contains(&x.s) {
                seqs.push(x.s);
            }
        }
        for (&m, seqs) in &found {
            let Some(s) = f.send(m) else { continue };
            if seqs.len() > 1 {
                st.twice += 1;
                if ev.wants(STORE_MISMATCH) {
                    let mut tl = Timeline::new();
                    f.timeline_send(m, &mut tl);
                    f.timeline_recovery(c, Some(m), &mut tl);
                    ev.example(
                        STORE_MISMATCH,
                        Example {
                            id: f.msg_name(m),
                            what: format!(
                                "stored twice in {}: read back at seqs {seqs:?}",
                                f.conv_name(c)
                            ),
                            timeline: tl.finish(),
                        },
                    );
                }
            }
            if s.failed() {
                st.failed_stored += 1;
                if ev.wants(STORE_MISMATCH) {
                    let mut tl = Timeline::new();
                    f.timeline_send(m, &mut tl);
                    f.timeline_recovery(c, Some(m), &mut tl);
                    ev.example(
                        STORE_MISMATCH,
                        Example {
                            id: f.msg_name(m),
                            what: "the send failed (a definite refusal) yet the recovery read found it stored".into(),
                            timeline: tl.finish(),
                        },
                    );
                }
            } else if s.outcome_unknown() {
                st.unknown_stored += 1;
            }
        }
        let Some(acked) = by_conv.get(c as usize) else {
            continue;
        };
        if acked.is_empty() {
            continue;
        }
        if !complete {
            st.unread += 1;
            st.unverified += acked.len() as u64;
            continue;
        }
        for &m in acked {
            let Some(s) = f.send(m) else { continue };
            match found.get(&m) {
                Some(seqs) => {
                    st.stored.insert(m);
                    st.verified += 1;
                    if s.seq().is_some_and(|q| !seqs.contains(&q)) {
                        st.seq_mismatch += 1;
                        if ev.wants(STORE_MISMATCH) {
                            let mut tl = Timeline::new();
                            f.timeline_send(m, &mut tl);
                            f.timeline_recovery(c, Some(m), &mut tl);
                            ev.example(
                                STORE_MISMATCH,
                                Example {
                                    id: f.msg_name(m),
                                    what: format!(
                                        "acked as seq {} in {} but read back at seq {seqs:?}",
                                        s.seq().unwrap_or(0),
                                        f.conv_name(c)
                                    ),
                                    timeline: tl.finish(),
                                },
                            );
                        }
                    }
                }
                None => {
                    st.lost += 1;
                    if ev.wants(LOST_AT_STORE) {
                        let mut tl = Timeline::new();
                        f.timeline_send(m, &mut tl);
                        f.timeline_recovery(c, None, &mut tl);
                        ev.example(
                            LOST_AT_STORE,
                            Example {
                                id: f.msg_name(m),
                                what: format!(
                                    "acked as seq {} in {} at {} but absent from the recovery read of the conversation",
                                    s.seq().unwrap_or(0),
                                    f.conv_name(c),
                                    fmt_secs(s.ok_t().unwrap_or(0))
                                ),
                                timeline: tl.finish(),
                            },
                        );
                    }
                }
            }
        }
    }
    st
}

fn lost_example(f: &Facts, m: MsgId, r: u32, c: u32) -> Example {
    let (mut tl, seq, ok_t) = undelivered_timeline(f, m, r, c);
    f.timeline_recovery(c, Some(m), &mut tl);
    let stored = f.recovery_msgs(c).iter().any(|x| x.m == m);
    let synced_after = f
        .syncs(r, c)
        .iter()
        .any(|e| e.k == squall_history::Kind::Ok && e.t >= ok_t);
    Example {
        id: f.msg_name(m),
        what: format!(
            "acked as seq {seq} in {} at {} but never delivered to {}{}{}",
            f.conv_name(c),
            fmt_secs(ok_t),
            f.who(r),
            if synced_after {
                " (not even by a sync completed after the ack)"
            } else {
                ""
            },
            if stored {
                "; the recovery read found it stored: lost in delivery, not at the store"
            } else if f.recovery_complete(c) {
                "; absent from the recovery read too: lost at the store"
            } else {
                ""
            }
        ),
        timeline: tl.finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::H;
    use squall_history::Via::{Live, Sync};

    /// Three users in one conversation, all connected from the start.
    fn base() -> H {
        let mut h = H::new(3, &[&[0, 1, 2]]);
        h.connect(0, 0).connect(0, 1).connect(0, 2);
        h
    }

    fn ids(v: &Verdict) -> Vec<String> {
        v.examples.iter().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn passes_when_every_member_got_every_acked_message() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        // One recipient missed it live and got it by sync after a reconnect.
        h.send(20, 1, 0, "1-1").ok(21, 1, 0, "1-1", 2, "b");
        h.deliver(22, 0, 0, 2, "1-1", 1, Live);
        h.disconnect(21, 2).connect(30, 2).sync(30, 2, 0, 1);
        h.deliver(31, 2, 0, 2, "1-1", 1, Sync)
            .sync_ok(31, 2, 0, 1, 2, 1);
        // A failed send delivered to nobody and an unknown one delivered (recovered).
        h.send(40, 0, 0, "0-2").fail(41, 0, 0, "0-2");
        h.send(50, 0, 0, "0-3").info(60, 0, 0, "0-3");
        h.deliver(55, 1, 0, 3, "0-3", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["acked"], 2);
        assert_eq!(v.counts["required_deliveries"], 4);
        assert_eq!(v.counts["delivered_exactly_once"], 4);
        assert_eq!(v.counts["recovered"], 1);
        assert_eq!(v.counts["failed"], 1);
        assert_eq!(v.counts["lost"], 0);
        assert!(v.examples.is_empty());
    }

    #[test]
    fn a_member_gone_for_good_before_the_ack_is_exempt() {
        let mut h = base();
        h.disconnect(5, 2);
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["exempt"], 1);
    }

    #[test]
    fn a_late_ack_after_the_recipients_last_sync_is_not_owed_but_one_before_a_sync_is() {
        let mut h = base();
        // Both recipients' last syncs begin before the late ack of 0-1: neither is owed it
        // (only a live frame could still bring it); u1 gets it anyway.
        h.sync(20, 1, 0, 0).sync_ok(21, 1, 0, 0, 0, 0);
        h.sync(20, 2, 0, 0).sync_ok(21, 2, 0, 0, 0, 0);
        h.send(10, 0, 0, "0-1")
            .info(15, 0, 0, "0-1")
            .ok(30, 0, 0, "0-1", 1, "a");
        h.deliver(31, 1, 0, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["acked_late_after_last_sync"], 1);
        assert_eq!(v.counts["required_deliveries"], 1);
        // A late ack followed by a sync that does not bring it: lost.
        h.sync(40, 2, 0, 0).sync_ok(41, 2, 0, 0, 0, 0);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid, "{}", v.summary);
        assert_eq!(v.counts["lost"], 1);
        // An ack in time with no sync after it is owed all the same (live was the way).
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.counts["lost"], 1, "{}", v.summary);
    }

    #[test]
    fn lost_names_message_and_recipient_with_a_timeline() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live);
        // u2 drops after the ack, comes back, syncs, and still never sees it.
        h.disconnect(20, 2)
            .connect(30, 2)
            .sync(30, 2, 0, 0)
            .sync_ok(31, 2, 0, 0, 0, 0);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["lost"], 1);
        assert_eq!(v.counts["acked_but_never_seen"], 1);
        assert_eq!(ids(&v), vec!["0-1"]);
        let e = &v.examples[0];
        assert!(e.what.contains("user u2 (p=2)"), "{}", e.what);
        assert!(e.what.contains("not even by a sync"), "{}", e.what);
        assert!(
            e.timeline.iter().any(|l| l.contains("ok send m=0-1 seq=1")),
            "{:?}",
            e.timeline
        );
        assert!(
            e.timeline
                .iter()
                .any(|l| l.contains("user u2 (p=2) info disconnect")),
            "{:?}",
            e.timeline
        );
        assert!(
            e.timeline
                .iter()
                .any(|l| l.contains("user u1 (p=1) ok deliver")),
            "{:?}",
            e.timeline
        );
        assert_eq!(
            e.timeline[0],
            "t=0.010000s user u0 (p=0) invoke send m=0-1 c=0 due=0.010000s"
        );
    }

    #[test]
    fn unexpected_delivery_of_a_message_nobody_sent() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        h.deliver(13, 1, 0, 2, "0-77", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["unexpected"], 1);
        assert_eq!(ids(&v), vec!["0-77"]);
        assert!(v.examples[0].what.contains("user u1 (p=1)"));
    }

    #[test]
    fn seq_mismatch_between_ack_and_delivery() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 4, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["seq_mismatch"], 1);
        assert_eq!(ids(&v), vec!["0-1"]);
        assert!(
            v.examples[0].what.contains("as seq 4"),
            "{}",
            v.examples[0].what
        );
    }

    #[test]
    fn seq_mismatch_between_deliveries_of_an_unacked_message() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").info(20, 0, 0, "0-1");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 2, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["seq_mismatch"], 1);
        assert_eq!(ids(&v), vec!["0-1"]);
    }

    #[test]
    fn two_acks_with_different_seqs_for_one_client_msg_id() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.send(12, 0, 0, "0-1").ok(13, 0, 0, "0-1", 2, "b");
        h.deliver(14, 1, 0, 1, "0-1", 0, Live)
            .deliver(14, 2, 0, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["ack_seq_conflict"], 1);
        assert_eq!(ids(&v), vec!["0-1"]);
        assert!(v.examples[0].what.contains("seq 1 and again with seq 2"));
    }

    #[test]
    fn a_failed_send_that_was_delivered() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").fail(11, 0, 0, "0-1");
        h.deliver(14, 1, 0, 1, "0-1", 0, Live);
        h.send(20, 0, 0, "0-2").ok(21, 0, 0, "0-2", 2, "b");
        h.deliver(22, 1, 0, 2, "0-2", 0, Live)
            .deliver(22, 2, 0, 2, "0-2", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["failed_but_delivered"], 1);
        assert_eq!(ids(&v), vec!["0-1"]);
    }

    #[test]
    fn deliveries_to_non_members_and_with_the_wrong_sender() {
        let mut h = H::new(3, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1).connect(0, 2);
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 2, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["non_member_deliveries"], 1);
        assert_eq!(v.counts["sender_mismatch"], 1);
        assert!(v
            .examples
            .iter()
            .any(|e| e.id == "0-1" && e.what.contains("not a member")));
        assert!(v
            .examples
            .iter()
            .any(|e| e.id == "0-1" && e.what.contains("as from user u2")));
    }

    #[test]
    fn duplicates_are_counted_but_not_a_violation() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(13, 1, 0, 1, "0-1", 0, Sync);
        h.deliver(12, 2, 0, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["duplicated"], 1);
        assert_eq!(v.counts["delivered_exactly_once_ppm"], 500_000);
    }

    #[test]
    fn an_inconsistent_history_is_unknown_never_valid() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        h.deliver(13, 1, 9, 1, "0-1", 0, Live);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Unknown);
        assert!(
            v.summary.contains("conversation_out_of_range"),
            "{}",
            v.summary
        );
        let empty = delivery(&base().facts());
        assert_eq!(empty.valid, Validity::Unknown);
    }

    #[test]
    fn the_recovery_read_verifies_the_store() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        h.send(20, 0, 0, "0-2").info(30, 0, 0, "0-2");
        h.recovery(100, 0, 1, &[(1, "0-1"), (2, "0-2")]);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["store_verified"], 1);
        assert_eq!(v.counts["recovery_conversations_read"], 1);
        assert_eq!(v.counts["unknown_outcome_stored"], 1);
        assert_eq!(v.counts["lost_at_store"], 0);
    }

    #[test]
    fn an_acked_message_missing_from_the_recovery_read_is_lost_at_the_store() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        h.send(20, 0, 0, "0-2").ok(21, 0, 0, "0-2", 2, "b");
        h.deliver(22, 1, 0, 2, "0-2", 0, Live)
            .deliver(22, 2, 0, 2, "0-2", 0, Live);
        h.recovery(100, 0, 1, &[(1, "0-1")]);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid, "{}", v.summary);
        assert_eq!(v.counts["lost_at_store"], 1);
        assert_eq!(v.counts["lost"], 0, "every member got it live");
        assert_eq!(ids(&v), vec!["0-2"]);
        assert!(v.examples[0].what.contains("absent from the recovery read"));
        assert!(
            v.examples[0]
                .timeline
                .iter()
                .any(|l| l.contains("recovery ok recovery_read c=0")),
            "{:?}",
            v.examples[0].timeline
        );
    }

    #[test]
    fn a_recovery_read_never_masks_a_live_loss() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live);
        // u2 stayed connected and never got it; the recovery read (as u2) finds it.
        h.recovery(100, 0, 2, &[(1, "0-1")]);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid, "{}", v.summary);
        assert_eq!(v.counts["lost"], 1);
        assert_eq!(v.counts["lost_but_stored"], 1);
        assert_eq!(v.counts["lost_at_store"], 0);
        assert!(
            v.examples[0]
                .what
                .contains("lost in delivery, not at the store"),
            "{}",
            v.examples[0].what
        );
    }

    #[test]
    fn a_failed_send_read_back_and_a_retry_stored_twice_are_violations() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").fail(11, 0, 0, "0-1");
        h.send(20, 0, 0, "0-2").ok(21, 0, 0, "0-2", 2, "b");
        h.deliver(22, 1, 0, 2, "0-2", 0, Live)
            .deliver(22, 2, 0, 2, "0-2", 0, Live);
        h.recovery(100, 0, 1, &[(1, "0-1"), (2, "0-2"), (3, "0-2")]);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid, "{}", v.summary);
        assert_eq!(v.counts["failed_but_stored"], 1);
        assert_eq!(v.counts["stored_twice"], 1);
        let mut got = ids(&v);
        got.sort();
        assert_eq!(got, vec!["0-1", "0-2"]);
    }

    #[test]
    fn a_conversation_the_recovery_could_not_read_is_unknown() {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live)
            .deliver(12, 2, 0, 1, "0-1", 0, Live);
        h.recovery_fail(100, 0, 1);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Unknown, "{}", v.summary);
        assert_eq!(v.counts["store_unverified"], 1);
        assert!(v.summary.contains("could not read"), "{}", v.summary);
    }

    /// u2 misses the message live (dropped after the ack) and reconnects; what its syncs
    /// after the ack did decides between lost and not judged.
    fn missed_live_by_u2() -> H {
        let mut h = base();
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "a");
        h.deliver(12, 1, 0, 1, "0-1", 0, Live);
        h.disconnect(20, 2).connect(30, 2);
        h
    }

    #[test]
    fn a_recipient_whose_every_sync_was_refused_is_unknown_not_lost() {
        let mut h = missed_live_by_u2();
        // A sync before the ack answered in full says nothing about the message.
        h.sync(5, 2, 0, 0).sync_ok(6, 2, 0, 0, 0, 0);
        h.sync(30, 2, 0, 0)
            .sync_fail(31, 2, 0, 0, "unavailable: postgres pool timed out")
            .sync(40, 2, 0, 0);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Unknown, "{}", v.summary);
        assert_eq!(v.counts["lost"], 0);
        assert_eq!(v.counts["sync_refused"], 1);
        assert!(v.summary.contains("refused or unanswered"), "{}", v.summary);
        let e = &v.examples[0];
        assert!(e.what.contains("user u2 (p=2)"), "{}", e.what);
        assert!(
            e.timeline.iter().any(|l| l.contains("fail sync c=0")),
            "{:?}",
            e.timeline
        );
    }

    #[test]
    fn a_refused_sync_followed_by_one_answered_in_full_is_lost() {
        let mut h = missed_live_by_u2();
        h.sync(30, 2, 0, 0)
            .sync_fail(31, 2, 0, 0, "unavailable")
            .sync(40, 2, 0, 0)
            .sync_ok(41, 2, 0, 0, 0, 0);
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid, "{}", v.summary);
        assert_eq!(v.counts["lost"], 1);
        assert_eq!(v.counts["sync_refused"], 0);
    }

    #[test]
    fn a_recipient_that_never_synced_after_the_ack_is_lost() {
        let mut h = missed_live_by_u2();
        h.sync(5, 2, 0, 0).sync_fail(6, 2, 0, 0, "unavailable");
        let v = delivery(&h.facts());
        assert_eq!(v.valid, Validity::Invalid, "{}", v.summary);
        assert_eq!(v.counts["lost"], 1);
        assert_eq!(v.counts["sync_refused"], 0);
    }
}
