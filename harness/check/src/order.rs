//! The order checker, per (recipient, conversation):
//! - the seqs seen live on one connection, after dropping repeats, are strictly
//!   increasing (each adjacent decrease is an `inversion`, reported with both seqs and
//!   times). Order is judged per connection: across a reconnect another node may hand
//!   over a message of a concurrent sender that the old connection never got, and the
//!   resync is what makes the client whole (gaps are judged below);
//! - after each reconnect (a connect ok following a disconnect) the user started a sync
//!   of each of its conversations before that connection ended (`missing_resync`; a
//!   connection that ended before syncing and was followed by another reconnect is
//!   `resync_superseded`, judged at that reconnect; so is a last connection still open
//!   when an interrupted run stopped);
//! - by the end of the history the user saw (live, by sync, or as its own ack) every
//!   seq from 1 to the highest seq acked before its last completed sync started: a `gap`
//!   otherwise, naming conversation, recipient and the missing seqs. (Seqs are gapless
//!   per conversation in the store, so everything up to that seq existed when the sync
//!   read it.)

use std::collections::HashSet;

use squall_history::{Kind, Via};

use crate::facts::{anomaly, ConnWhat, Facts};
use crate::verdict::{fmt_t, ranges, Evidence, Example, Timeline, Validity, Verdict};

const INVERSION: &str = "inversion";
const GAP: &str = "gap";
const RESYNC: &str = "missing_resync";

/// Checks live order, resync after reconnect and gap-freedom by the end.
pub fn order(f: &Facts) -> Verdict {
    let mut ev = Evidence::new("order");
    ev.kinds(&[INVERSION, GAP, RESYNC]);
    let inversions = live_order(f, &mut ev);
    let (reconnects, missing_resync, superseded) = resyncs(f, &mut ev);
    let (gaps, gap_seqs, checked, no_sync) = gaps(f, &mut ev);

    for (k, v) in [
        ("inversions", inversions),
        ("reconnects", reconnects),
        ("missing_resync", missing_resync),
        ("resync_superseded", superseded),
        ("gaps", gaps),
        ("missing_seqs", gap_seqs),
        ("pairs_checked_for_gaps", checked),
        ("pairs_without_completed_sync", no_sync),
    ] {
        ev.set(k, v);
    }
    let mut summary = format!(
        "{inversions} live order inversions; {reconnects} reconnects, {missing_resync} without a resync; \
         {gaps} (recipient, conversation) pairs with gaps ({gap_seqs} seqs missing) of {checked} checked \
         ({no_sync} without a completed sync)"
    );
    let valid = if inversions + missing_resync + gaps > 0 {
        Validity::Invalid
    } else if let Some(reason) = f.anomaly_reason(&[
        anomaly::UNKNOWN_PROCESS,
        anomaly::CONVERSATION_OUT_OF_RANGE,
        anomaly::SEND_OUTCOME_WITHOUT_INVOKE,
        anomaly::SEND_ID_REUSED,
        anomaly::CONNECT_WHILE_CONNECTED,
    ]) {
        summary = format!("unknown: {reason}; {summary}");
        Validity::Unknown
    } else if f.deliveries().is_empty() && checked == 0 {
        summary = format!("unknown: no deliveries and no syncs to check; {summary}");
        Validity::Unknown
    } else {
        Validity::Valid
    };
    ev.verdict(valid, summary)
}

fn live_order(f: &Facts, ev: &mut Evidence) -> u64 {
    let mut inversions = 0u64;
    for (&(r, c), list) in f.deliveries() {
        let mut seen: HashSet<i64> = HashSet::new();
        let mut prev: Option<(i64, u64, u32)> = None;
        let starts: Vec<u64> = f
            .connections(r)
            .iter()
            .filter(|e| e.what == ConnWhat::ConnectOk)
            .map(|e| e.t)
            .collect();
        let mut connection = 0usize;
        for d in list.iter().filter(|d| d.via == Via::Live) {
            if !seen.insert(d.s) {
                continue;
            }
            // A new connection starts a new order.
            let now = starts.iter().take_while(|t| **t <= d.t).count();
            if now != connection {
                connection = now;
                prev = None;
            }
            if let Some((ps, pt, pm)) = prev {
                if d.s < ps {
                    inversions += 1;
                    if ev.wants(INVERSION) {
                        let mut tl = Timeline::new();
                        f.timeline_deliveries_to(r, c, |x| x.m == pm || x.m == d.m, &mut tl);
                        ev.example(
                            INVERSION,
                            Example {
                                id: f.msg_name(d.m),
                                what: format!(
                                    "{} in {} got seq {} live at {} after seq {} at {}",
                                    f.who(r),
                                    f.conv_name(c),
                                    d.s,
                                    fmt_t(d.t),
                                    ps,
                                    fmt_t(pt)
                                ),
                                timeline: tl.finish(),
                            },
                        );
                    }
                }
            }
            prev = Some((d.s, d.t, d.m));
        }
    }
    inversions
}

/// (reconnects, missing resyncs, superseded)
fn resyncs(f: &Facts, ev: &mut Evidence) -> (u64, u64, u64) {
    let (mut reconnects, mut missing, mut superseded) = (0u64, 0u64, 0u64);
    for u in 0..f.n_users() as u32 {
        let conns = f.connections(u);
        // Reconnect times, each with the end of that connection.
        let mut recs: Vec<(u64, Option<u64>)> = Vec::new();
        let mut disconnected = false;
        for e in conns {
            match e.what {
                ConnWhat::Disconnect => {
                    disconnected = true;
                    if let Some(last) = recs.last_mut() {
                        if last.1.is_none() {
                            last.1 = Some(e.t);
                        }
                    }
                }
                ConnWhat::ConnectOk => {
                    if let Some(last) = recs.last_mut() {
                        if last.1.is_none() {
                            last.1 = Some(e.t);
                        }
                    }
                    if disconnected {
                        recs.push((e.t, None));
                        disconnected = false;
                    }
                }
                ConnWhat::ConnectInvoke | ConnWhat::ConnectFail => {}
            }
        }
        reconnects += recs.len() as u64;
        for (i, &(start, end)) in recs.iter().enumerate() {
            let end_t = end.unwrap_or(u64::MAX);
            let later = i + 1 < recs.len();
            for &c in f.user_conversations(u) {
                let synced = f
                    .syncs(u, c)
                    .iter()
                    .any(|s| s.k == Kind::Invoke && s.t >= start && s.t <= end_t);
                if synced {
                    continue;
                }
                // Dropped again before it could sync (judged at the next reconnect), or
                // still open when an interrupted run stopped.
                if (end.is_some() && later) || (end.is_none() && f.interrupted()) {
                    superseded += 1;
                    continue;
                }
                missing += 1;
                if ev.wants(RESYNC) {
                    let mut tl = Timeline::new();
                    f.timeline_connections(u, start, &mut tl);
                    f.timeline_syncs(u, c, start, &mut tl);
                    ev.example(
                        RESYNC,
                        Example {
                            id: format!(
                                "{}/{}",
                                f.header()
                                    .users
                                    .get(u as usize)
                                    .map_or("", |x| x.id.as_str()),
                                f.conv_name(c)
                            ),
                            what: format!(
                                "{} reconnected at {} and did not sync {} {}",
                                f.who(u),
                                fmt_t(start),
                                f.conv_name(c),
                                match end {
                                    Some(e) =>
                                        format!("before that connection ended at {}", fmt_t(e)),
                                    None => "by the end of the history".into(),
                                }
                            ),
                            timeline: tl.finish(),
                        },
                    );
                }
            }
        }
    }
    (reconnects, missing, superseded)
}

/// (pairs with gaps, seqs missing, pairs checked, pairs without a completed sync)
fn gaps(f: &Facts, ev: &mut Evidence) -> (u64, u64, u64, u64) {
    // Per conversation: acks as (ok_t, seq, sender), sorted by time, with the running max seq.
    let n = f.n_conversations();
    let mut acks: Vec<Vec<(u64, i64, u32)>> = vec![Vec::new(); n];
    for s in f.sends() {
        if let (Some(t), Some(seq), Some(c), Some(p)) = (s.ok_t(), s.seq(), s.c(), s.sender()) {
            if let Some(v) = acks.get_mut(c as usize) {
                v.push((t, seq, p));
            }
        }
    }
    let mut running_max: Vec<Vec<i64>> = Vec::with_capacity(n);
    for v in acks.iter_mut() {
        v.sort_unstable();
        let mut mx = 0i64;
        running_max.push(
            v.iter()
                .map(|a| {
                    mx = mx.max(a.1);
                    mx
                })
                .collect(),
        );
    }
    let (mut gaps, mut missing_total, mut checked, mut no_sync) = (0u64, 0u64, 0u64, 0u64);
    for u in 0..f.n_users() as u32 {
        for &c in f.user_conversations(u) {
            // The start of the last sync that completed (an invoke answered by an ok).
            let mut pending: Option<u64> = None;
            let mut last_done: Option<u64> = None;
            for s in f.syncs(u, c) {
                match s.k {
                    Kind::Invoke => pending = Some(s.t),
                    Kind::Ok => {
                        if let Some(t) = pending.take() {
                            last_done = Some(t);
                        }
                    }
                    Kind::Fail | Kind::Info => pending = None,
                }
            }
            let Some(since) = last_done else {
                no_sync += 1;
                continue;
            };
            checked += 1;
            let ci = c as usize;
            let (Some(a), Some(mx)) = (acks.get(ci), running_max.get(ci)) else {
                continue;
            };
            let k = a.partition_point(|x| x.0 < since);
            if k == 0 {
                continue;
            }
            let high = mx[k - 1];
            if high <= 0 {
                continue;
            }
            let len = usize::try_from(high).unwrap_or(usize::MAX).min(1 << 32);
            let mut seen = vec![false; len + 1];
            let mut mark = |s: i64| {
                if s >= 1 && s <= high {
                    if let Some(x) = seen.get_mut(s as usize) {
                        *x = true;
                    }
                }
            };
            for d in f.deliveries_of(u, c) {
                mark(d.s);
            }
            for x in a.iter().filter(|x| x.2 == u) {
                mark(x.1);
            }
            let missing: Vec<i64> = (1..=high)
                .filter(|&s| !seen.get(s as usize).copied().unwrap_or(true))
                .collect();
            if missing.is_empty() {
                continue;
            }
            gaps += 1;
            missing_total += missing.len() as u64;
            if ev.wants(GAP) {
                let mut tl = Timeline::new();
                f.timeline_syncs(u, c, 0, &mut tl);
                f.timeline_connections(u, 0, &mut tl);
                let miss: HashSet<i64> = missing.iter().copied().take(64).collect();
                for (&(r, cc), list) in f.deliveries().range((0, c)..) {
                    if cc != c || r == u {
                        continue;
                    }
                    // Show who else got the missing seqs (the first recipient that did).
                    if list.iter().any(|d| miss.contains(&d.s)) {
                        f.timeline_deliveries_to(r, c, |d| miss.contains(&d.s), &mut tl);
                        break;
                    }
                }
                ev.example(
                    GAP,
                    Example {
                        id: format!("{}/{}", f.header().users.get(u as usize).map_or("", |x| x.id.as_str()), f.conv_name(c)),
                        what: format!(
                            "{} never saw seqs {} of {} (acked up to seq {high} before its last completed sync at {})",
                            f.who(u),
                            ranges(&missing, 20),
                            f.conv_name(c),
                            fmt_t(since)
                        ),
                        timeline: tl.finish(),
                    },
                );
            }
        }
    }
    (gaps, missing_total, checked, no_sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::H;
    use squall_history::Via::{Live, Sync};

    /// u0 sends seqs 1..=3 to u1, each acked and delivered live in order; both sync at the end.
    fn base() -> H {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        for i in 1..=3u64 {
            let m = format!("0-{i}");
            h.send(10 * i, 0, 0, &m)
                .ok(10 * i + 1, 0, 0, &m, i as i64, "x");
            h.deliver(10 * i + 2, 1, 0, i as i64, &m, 0, Live);
        }
        h
    }

    fn final_syncs(h: &mut H, ms: u64) {
        h.sync(ms, 0, 0, 3).sync_ok(ms + 1, 0, 0, 3, 3, 0);
        h.sync(ms, 1, 0, 3).sync_ok(ms + 1, 1, 0, 3, 3, 0);
    }

    #[test]
    fn passes_in_order_with_resync_and_no_gaps() {
        let mut h = base();
        // A repeat of seq 2 live is dropped, not an inversion.
        h.deliver(33, 1, 0, 2, "0-2", 0, Live);
        h.disconnect(40, 1)
            .connect(50, 1)
            .sync(50, 1, 0, 3)
            .sync_ok(51, 1, 0, 3, 3, 0);
        final_syncs(&mut h, 100);
        let v = order(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["reconnects"], 1);
        assert_eq!(v.counts["pairs_checked_for_gaps"], 2);
    }

    #[test]
    fn a_reconnect_starts_a_new_order() {
        // Seq 2 live on the first connection, then (after a reconnect to another node)
        // the concurrent sender's seq 1 live: not an inversion of one connection.
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "x");
        h.send(12, 0, 0, "0-2").ok(13, 0, 0, "0-2", 2, "y");
        h.deliver(14, 1, 0, 2, "0-2", 0, Live);
        h.disconnect(15, 1).connect(16, 1);
        h.sync(17, 1, 0, 2).sync_ok(18, 1, 0, 2, 2, 0);
        h.deliver(19, 1, 0, 1, "0-1", 0, Live);
        let v = order(&h.facts());
        assert_eq!(v.counts["inversions"], 0, "{}", v.summary);
    }

    #[test]
    fn inversion_names_both_seqs() {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        h.send(10, 0, 0, "0-1").ok(11, 0, 0, "0-1", 1, "x");
        h.send(12, 0, 0, "0-2").ok(13, 0, 0, "0-2", 2, "y");
        h.deliver(14, 1, 0, 2, "0-2", 0, Live)
            .deliver(15, 1, 0, 1, "0-1", 0, Live);
        let v = order(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["inversions"], 1);
        assert_eq!(v.examples[0].id, "0-1");
        assert!(
            v.examples[0]
                .what
                .contains("got seq 1 live at t=0.015000s after seq 2 at t=0.014000s"),
            "{}",
            v.examples[0].what
        );
        assert_eq!(v.examples[0].timeline.len(), 2);
    }

    #[test]
    fn sync_deliveries_do_not_count_as_inversions() {
        let mut h = base();
        h.deliver(40, 1, 0, 1, "0-1", 0, Sync);
        final_syncs(&mut h, 100);
        assert_eq!(order(&h.facts()).valid, Validity::Valid);
    }

    #[test]
    fn reconnect_without_a_resync() {
        let mut h = base();
        h.disconnect(40, 1).connect(50, 1);
        let v = order(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.counts["missing_resync"], 1);
        assert_eq!(v.examples[0].id, "u1/c0 (conv0)");
        // Dropped again before syncing, then a proper resync: superseded, not missing.
        let mut h = base();
        h.disconnect(40, 1)
            .connect(50, 1)
            .disconnect(51, 1)
            .connect(60, 1)
            .sync(60, 1, 0, 3);
        let v = order(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
        assert_eq!(v.counts["resync_superseded"], 1);
        // A run interrupted right after a reconnect: not held against the system.
        let mut h = base();
        h.disconnect(40, 1).connect(50, 1).phase(51, "interrupted");
        assert_eq!(order(&h.facts()).valid, Validity::Valid);
    }

    #[test]
    fn gap_names_recipient_conversation_and_missing_seqs() {
        let mut h = H::new(2, &[&[0, 1]]);
        h.connect(0, 0).connect(0, 1);
        for i in 1..=5u64 {
            let m = format!("0-{i}");
            h.send(10 * i, 0, 0, &m)
                .ok(10 * i + 1, 0, 0, &m, i as i64, "x");
            if i != 2 && i != 3 {
                h.deliver(10 * i + 2, 1, 0, i as i64, &m, 0, Live);
            }
        }
        // A message acked after u1's last sync started is not required of it.
        h.sync(100, 1, 0, 1).sync_ok(101, 1, 0, 1, 1, 0);
        h.send(100, 0, 0, "0-6").ok(102, 0, 0, "0-6", 6, "x");
        h.sync(110, 0, 0, 6).sync_ok(111, 0, 0, 6, 6, 0);
        let v = order(&h.facts());
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!((v.counts["gaps"], v.counts["missing_seqs"]), (1, 2));
        let e = &v.examples[0];
        assert_eq!(e.id, "u1/c0 (conv0)");
        assert!(
            e.what.contains("never saw seqs 2-3 of c0 (conv0)"),
            "{}",
            e.what
        );
        assert!(e.what.contains("acked up to seq 5"), "{}", e.what);
        // The sender's own acks count as seen.
        assert!(!v.examples.iter().any(|e| e.id.starts_with("u0/")));
    }

    #[test]
    fn an_unfinished_last_sync_does_not_raise_the_bar() {
        let mut h = base();
        h.sync(5, 1, 0, 0).sync_ok(6, 1, 0, 0, 0, 0);
        h.send(40, 0, 0, "0-4").ok(41, 0, 0, "0-4", 4, "x");
        h.sync(50, 1, 0, 3); // never answered: the run ended
        let v = order(&h.facts());
        assert_eq!(v.valid, Validity::Valid, "{}", v.summary);
    }
}
