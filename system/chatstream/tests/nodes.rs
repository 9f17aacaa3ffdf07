//! `chatstream node` on the real stack (three Kafka brokers, Redis, PostgreSQL, Toxiproxy):
//! real node processes and real WebSocket clients. One stack for the binary
//! (libtest-mimic, tests one at a time, stopped by pid at the end); processes are started
//! per test and stopped by pid. Shared helpers: `common/mod.rs`.
//! Ports: CHATSTREAM_TEST_BASE_PORT (default 29700) for the stack. CHATSTREAM_TEST_BIN
//! runs another `chatstream` binary (an older build, to see a new test fail on it).

mod common;

use anyhow::{anyhow, bail, ensure, Context, Result};
use chatstream_protocol::auth::{self, Claims};
use chatstream_protocol::frames::{ErrorCode, MessageStatus, StreamOutcome, Via};
use chatstream_protocol::{ClientFrame, EventBody, ServerFrame};
use common::*;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use squall_stack::testing::{eventually, SharedStack};
use squall_stack::toxiproxy::Toxic;
use squall_stack::{stack_test, Stack};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

// ---------------------------------------------------------------------------------------
async fn clients_on_different_nodes_exchange_messages(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    let (seq, dup) = alice.send_msg(&conv, "a-1", "hello bob").await?;
    ensure!(seq == 1 && !dup, "seq {seq} dup {dup}");
    let got = bob
        .until(|f| match f {
            ServerFrame::Msg {
                body,
                seq,
                via: Via::Live,
                sender_id,
                ..
            } => Some((body.clone(), *seq, sender_id.clone())),
            _ => None,
        })
        .await?;
    ensure!(
        got == ("hello bob".to_string(), 1, "alice".to_string()),
        "{got:?}"
    );
    alice
        .until(|f| matches!(f, ServerFrame::Status { status: MessageStatus::Delivered, user_id, seq: 1, .. } if user_id == "bob").then_some(()))
        .await
        .context("DELIVERED back to alice")?;
    bob.send(&ClientFrame::Read {
        conversation_id: conv.clone(),
        up_to_seq: 1,
    })
    .await?;
    alice
        .until(|f| matches!(f, ServerFrame::Status { status: MessageStatus::Read, user_id, seq: 1, .. } if user_id == "bob").then_some(()))
        .await
        .context("READ back to alice")?;
    bob.send(&ClientFrame::Typing {
        conversation_id: conv.clone(),
        is_typing: true,
    })
    .await?;
    alice
        .until(|f| {
            matches!(f, ServerFrame::Typing { user_id, is_typing: true, .. } if user_id == "bob")
                .then_some(())
        })
        .await
        .context("typing to alice")?;
    let (seq2, _) = bob.send_msg(&conv, "b-1", "hi alice").await?;
    ensure!(seq2 == 2, "second message got seq {seq2}");
    alice
        .until(|f| matches!(f, ServerFrame::Msg { seq: 2, .. }).then_some(()))
        .await?;
    Ok(())
}

async fn retried_send_is_stored_once(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut a1 = Client::connect(&n1, "alice").await?;
    let (seq, dup) = a1.send_msg(&conv, "retry-me", "once").await?;
    ensure!(!dup);
    // The same send again, on the same node and after a reconnect to another node.
    let (seq_again, dup_again) = a1.send_msg(&conv, "retry-me", "once").await?;
    let mut a2 = Client::connect(&n2, "alice").await?;
    let (seq_elsewhere, dup_elsewhere) = a2.send_msg(&conv, "retry-me", "once").await?;
    ensure!(
        seq == seq_again && seq == seq_elsewhere,
        "seqs {seq} {seq_again} {seq_elsewhere}"
    );
    ensure!(
        dup_again && dup_elsewhere,
        "retries not flagged as duplicates"
    );
    let history: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "http://{}/api/conversations/{conv}/messages",
            n2.addr
        ))
        .bearer_auth(token("alice", 60))
        .send()
        .await?
        .json()
        .await?;
    let n = history["messages"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(n == 1, "stored {n} times: {history}");
    Ok(())
}

async fn sync_returns_what_a_client_missed(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for i in 1..=5 {
        alice
            .send_msg(&conv, &format!("m{i}"), &format!("body {i}"))
            .await?;
    }
    let mut bob = Client::connect(&n2, "bob").await?;
    bob.send(&ClientFrame::Sync {
        conversation_id: conv.clone(),
        after_seq: 2,
        limit: None,
    })
    .await?;
    let mut seqs = Vec::new();
    loop {
        match bob.recv().await? {
            ServerFrame::Msg {
                seq,
                via: Via::Sync,
                ..
            } => seqs.push(seq),
            ServerFrame::SyncDone { last_seq, more, .. } => {
                ensure!(last_seq == 5 && !more, "sync_done {last_seq} {more}");
                break;
            }
            _ => {}
        }
    }
    ensure!(seqs == [3, 4, 5], "synced {seqs:?}");
    Ok(())
}

async fn non_members_can_neither_send_nor_read(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut carol = Client::connect(&n1, "carol").await?;
    carol
        .send(&ClientFrame::Send {
            conversation_id: conv.clone(),
            client_msg_id: "c1".into(),
            body: "let me in".into(),
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    carol
        .send(&ClientFrame::Sync {
            conversation_id: conv.clone(),
            after_seq: 0,
            limit: None,
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    carol
        .send(&ClientFrame::Read {
            conversation_id: conv.clone(),
            up_to_seq: 1,
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    carol.still_serves().await?;
    let r = reqwest::Client::new()
        .get(format!(
            "http://{}/api/conversations/{conv}/messages",
            n1.addr
        ))
        .bearer_auth(token("carol", 60))
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 403,
        "history for a non-member: {}",
        r.status()
    );
    Ok(())
}

/// A membership change nobody announced (made in the database, behind the nodes' backs)
/// reaches live delivery within the cache's TTL: the entry a busy conversation keeps
/// reading is served from the cache, but read again in the background, so it is neither
/// kept forever nor read while a sender waits.
async fn unannounced_membership_change_reaches_live_delivery_within_the_ttl(
    stack: &mut Stack,
) -> Result<()> {
    const TTL: Duration = Duration::from_secs(5);
    let n1 = Node::start(stack, "mc-1", &[]).await?;
    let pool = pg(stack).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n1, "bob").await?;
    alice.send_msg(&conv, "m0", "before").await?;
    bob.until(|f| matches!(f, ServerFrame::Msg { seq: 1, .. }).then_some(()))
        .await?;
    sqlx::query("DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = 'bob'")
        .bind(&conv)
        .execute(&pool)
        .await?;
    let removed = tokio::time::Instant::now();
    // Alice keeps the conversation busy (its entry read every 100 ms) for two TTLs.
    let mut sent_at: Vec<(i64, Duration)> = Vec::new();
    let mut i = 1;
    while removed.elapsed() < TTL * 2 {
        let (seq, _) = alice.send_msg(&conv, &format!("m{i}"), "after").await?;
        sent_at.push((seq, removed.elapsed()));
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_seq = sent_at.last().map(|(s, _)| *s).unwrap_or(1);
    alice.send_msg(&conv, "end", "end").await?;
    let mut live: Vec<i64> = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), bob.recv()).await {
            Ok(Ok(ServerFrame::Msg { seq, .. })) => live.push(seq),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    let last_live = live.iter().copied().max().unwrap_or(1);
    let sent = |seq: i64| sent_at.iter().find(|(s, _)| *s == seq).map(|(_, t)| *t);
    ensure!(
        last_live < last_seq,
        "bob, removed {:?} before the last send, still got every message live: {live:?}",
        sent(last_seq)
    );
    let stale_for = sent(last_live).unwrap_or_default();
    ensure!(
        stale_for <= TTL + Duration::from_secs(1),
        "bob got messages live for {stale_for:?} after his removal (the cache's TTL is {TTL:?}): {live:?}"
    );
    Ok(())
}

async fn bad_input_gets_error_frames_and_the_connection_stays(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send_raw(Message::text("{this is not json")).await?;
    c.expect_error(ErrorCode::MalformedFrame).await?;
    c.still_serves().await?;
    c.send_raw(Message::text(r#"{"v":1,"type":"teleport","to":"mars"}"#))
        .await?;
    let msg = c.expect_error(ErrorCode::UnknownType).await?;
    ensure!(msg.contains("teleport"), "{msg}");
    c.send_raw(Message::text(r#"{"v":9,"type":"ping"}"#))
        .await?;
    c.expect_error(ErrorCode::UnsupportedVersion).await?;
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await?;
    c.expect_error(ErrorCode::MalformedFrame).await?;
    let huge = ClientFrame::Send {
        conversation_id: conv.clone(),
        client_msg_id: "big".into(),
        body: "x".repeat(70 * 1024),
    };
    c.send(&huge).await?;
    let msg = c.expect_error(ErrorCode::FrameTooLarge).await?;
    ensure!(msg.contains("65536"), "{msg}");
    c.still_serves().await?;
    // Nothing already accepted is lost: a message sent before the flood is still there.
    let (seq, _) = c.send_msg(&conv, "before-flood", "kept").await?;
    for i in 0..300 {
        c.send(&ClientFrame::Ping { nonce: Some(i) }).await?;
    }
    let wait = c
        .until(|f| match f {
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            } => Some(*retry_after_ms),
            _ => None,
        })
        .await?;
    ensure!(
        wait.is_some_and(|w| w > 0),
        "rate_limited without retry_after_ms"
    );
    // A refused send names itself: the client knows that one was not stored.
    for i in 0..50 {
        c.send(&ClientFrame::Send {
            conversation_id: conv.clone(),
            client_msg_id: format!("flooded-{i}"),
            body: "refused or stored".into(),
        })
        .await?;
    }
    c.until(|f| match f {
        ServerFrame::Error {
            code: ErrorCode::RateLimited,
            ref_id: Some(r),
            ..
        } if r.starts_with("flooded-") => Some(()),
        _ => None,
    })
    .await
    .context("no rate_limited error named the send it refused")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.still_serves().await?;
    c.send(&ClientFrame::Sync {
        conversation_id: conv,
        after_seq: 0,
        limit: None,
    })
    .await?;
    c.until(|f| matches!(f, ServerFrame::Msg { seq: s, .. } if *s == seq).then_some(()))
        .await?;
    Ok(())
}

async fn bad_tokens_close_with_a_reason(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let forged = auth::sign(
        b"not-the-secret",
        &Claims {
            sub: "mallory".into(),
            tenant: TENANT.into(),
            exp: u64::MAX / 2,
        },
    )?;
    for (what, t) in [
        ("expired", token("alice", -10)),
        ("forged", forged),
        ("garbage", "abc".to_string()),
    ] {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?token={t}", n1.addr)).await?;
        let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await?
            .ok_or_else(|| anyhow!("{what}: no frame"))??;
        let Message::Text(text) = first else {
            bail!("{what}: expected an error frame, got {first:?}")
        };
        let frame = ServerFrame::decode(&text)?;
        ensure!(
            matches!(
                frame,
                ServerFrame::Error {
                    code: ErrorCode::Unauthorized,
                    ..
                }
            ),
            "{what}: {frame:?}"
        );
        let close = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await?
            .ok_or_else(|| anyhow!("{what}: no close"))??;
        match close {
            Message::Close(Some(cf)) => ensure!(
                u16::from(cf.code) == 4401 && !cf.reason.is_empty(),
                "{what}: close {cf:?}"
            ),
            other => bail!("{what}: expected close, got {other:?}"),
        }
    }
    Ok(())
}

/// The advisory lock id of outbox shard `s` (`chatstream_store`'s ADVISORY_BASE + s).
const OUTBOX_LOCK_BASE: i64 = 0x5157_4c4c_0000;

/// How many of `shards` some PostgreSQL session holds the relay lock of.
async fn shards_locked(pool: &sqlx::PgPool, shards: &BTreeSet<i32>) -> Result<i64> {
    let ids: Vec<i64> = shards
        .iter()
        .map(|s| OUTBOX_LOCK_BASE + i64::from(*s))
        .collect();
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT (classid::bigint << 32) | objid::bigint) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 1
           AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?)
}

/// Unpublished CHAT_MESSAGE outbox rows of `convs`.
async fn chat_rows_pending(pool: &sqlx::PgPool, convs: &[String]) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at_ms IS NULL AND key = ANY($1)
         AND payload::jsonb->>'type' = 'CHAT_MESSAGE'",
    )
    .bind(convs)
    .fetch_one(pool)
    .await?)
}

/// A CHAT_MESSAGE record read back: (partition, offset, conversation, message id, seq).
type ChatRecord = (i32, i64, String, String, i64);

/// The high watermarks of chat-events `partitions`, through `bootstrap`.
async fn chat_ends(bootstrap: &str, partitions: Vec<i32>) -> Result<BTreeMap<i32, i64>> {
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || -> Result<BTreeMap<i32, i64>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        let mut ends = BTreeMap::new();
        for p in partitions {
            let (_, high) = c.fetch_watermarks("chat-events", p, Duration::from_secs(10))?;
            ends.insert(p, high);
        }
        Ok(ends)
    })
    .await?
}

/// The CHAT_MESSAGE records of `convs` on chat-events from `from` (partition → offset) up
/// to the partitions' ends as of now, in offset order per partition. Only the partitions
/// of `from` are asked for, through `bootstrap` (so a broker left out of both is never
/// needed).
async fn chat_records(
    bootstrap: &str,
    from: &BTreeMap<i32, i64>,
    convs: &BTreeSet<String>,
) -> Result<Vec<ChatRecord>> {
    let ends = chat_ends(bootstrap, from.keys().copied().collect()).await?;
    let (bootstrap, from, convs) = (bootstrap.to_string(), from.clone(), convs.clone());
    tokio::task::spawn_blocking(move || -> Result<Vec<ChatRecord>> {
        // A group id only because assigning needs one: nothing is committed.
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("mid-batch-reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut next = BTreeMap::new();
        for (p, o) in &from {
            if ends[p] > *o {
                tpl.add_partition_offset("chat-events", *p, rdkafka::Offset::Offset(*o))?;
                next.insert(*p, *o);
            }
        }
        let mut out = Vec::new();
        if next.is_empty() {
            return Ok(out);
        }
        c.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while next.iter().any(|(p, o)| *o < ends[p]) {
            ensure!(
                Instant::now() < deadline,
                "chat-events not read to {ends:?} within 60 s (at {next:?})"
            );
            let Some(m) = c.poll(Duration::from_millis(300)) else {
                continue;
            };
            let m = m?;
            use rdkafka::message::Message as _;
            next.insert(m.partition(), m.offset() + 1);
            let Some(e) = m
                .payload()
                .and_then(|b| chatstream_protocol::EventEnvelope::from_slice(b).ok())
            else {
                continue;
            };
            if let EventBody::ChatMessage(msg) = e.body {
                if convs.contains(&msg.conversation_id) {
                    out.push((
                        m.partition(),
                        m.offset(),
                        msg.conversation_id,
                        msg.message_id,
                        msg.seq,
                    ));
                }
            }
        }
        out.sort_by_key(|r| (r.0, r.1));
        Ok(out)
    })
    .await?
}

/// A relay killed (`kill -9`) while it holds its shard locks in the middle of a batch:
/// part of the batch is on Kafka, none of it marked published. Another node takes the
/// shards over and publishes the batch again: every message reaches chat-events, each
/// conversation's seqs in increasing order once duplicates are dropped, and the
/// duplicates are exactly what at-least-once allows (the part the dead relay had landed,
/// at most once more each).
///
/// Deterministic: the batch spans conversations whose partitions are led by different
/// brokers, and the client link of one broker (X) is black-holed before the relay starts,
/// so its batch lands on the other brokers and hangs on X (well inside the producer's
/// 30 s message timeout, when the node is killed).
async fn relay_killed_mid_batch_is_taken_over_in_key_order(stack: &mut Stack) -> Result<()> {
    const PER_CONV: usize = 40;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    // Conversations on partitions led by X and by the others (the nodes' partitioner is
    // the Java client's murmur2, so a key's partition is computed).
    let view = stack.cluster_view_from(1).await?;
    let parts = view
        .topics
        .get("chat-events")
        .ok_or_else(|| anyhow!("no chat-events in {view:?}"))?
        .clone();
    let leader_of = |conv: &str| {
        let p = chatstream_replay::partition_for_key(conv, parts.len() as i32);
        (p, parts.iter().find(|x| x.partition == p).map(|x| x.leader))
    };
    let first = unique("mid");
    let x = leader_of(&first)
        .1
        .filter(|l| *l > 0)
        .ok_or_else(|| anyhow!("no leader for {first}'s partition: {parts:?}"))?;
    let (mut on_x, mut elsewhere) = (Vec::new(), Vec::new());
    for i in 0..500 {
        let conv = format!("{first}-{i}");
        match leader_of(&conv).1 {
            Some(l) if l == x && on_x.len() < 3 => on_x.push(conv),
            Some(l) if l > 0 && l != x && elsewhere.len() < 3 => elsewhere.push(conv),
            _ => {}
        }
    }
    ensure!(
        on_x.len() == 3 && elsewhere.len() == 3,
        "no conversations on both sides of kafka-{x}: {on_x:?} {elsewhere:?}"
    );
    let convs: Vec<String> = on_x.iter().chain(&elsewhere).cloned().collect();
    let conv_set: BTreeSet<String> = convs.iter().cloned().collect();
    let shards: BTreeSet<i32> = convs
        .iter()
        .map(|c| chatstream_store::shard_of(c))
        .collect();

    // The backlog: written by a node that runs no relay, which then goes away.
    let pool = pg(stack).await?;
    let mut acked: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    {
        let w = Node::start(stack, &unique("mid-w"), &["--no-relay"]).await?;
        for conv in &convs {
            create_conversation(&w, "alice", conv, &["alice", "bob"]).await?;
            // A connection per conversation: 40 sends stay inside the rate limit's burst.
            let mut alice = Client::connect(&w, "alice").await?;
            for i in 0..PER_CONV {
                let (_, id, seq, _) = alice
                    .send_for_ack(conv, &format!("m{i}"), "published once or twice, in order")
                    .await?;
                acked.entry(conv.clone()).or_default().push((id, seq));
            }
        }
    }
    let total = (convs.len() * PER_CONV) as i64;
    ensure!(
        chat_rows_pending(&pool, &convs).await? == total,
        "the backlog is not all pending before the relay starts"
    );
    let landed_expected = elsewhere.len() * PER_CONV;
    let start: BTreeMap<i32, i64> =
        chat_ends(&bootstrap, parts.iter().map(|p| p.partition).collect()).await?;
    // Only the brokers other than X: reading must never wait on X's black hole.
    let not_x: String = (1..=3u8)
        .filter(|b| i32::from(*b) != x)
        .map(|b| {
            stack
                .plan()
                .broker(b)
                .map(|p| format!("127.0.0.1:{}", p.client_proxy))
        })
        .collect::<Result<Vec<_>, _>>()?
        .join(",");
    let start_not_x: BTreeMap<i32, i64> = start
        .iter()
        .filter(|(p, _)| parts.iter().any(|x2| x2.partition == **p && x2.leader != x))
        .map(|(p, o)| (*p, *o))
        .collect();

    let x_link = format!("kafka-{x}-client");
    stack
        .toxiproxy()
        .add_toxic(&x_link, &Toxic::timeout("upstream", 0))
        .await?;
    let mut a = Node::spawn(stack, &unique("mid-a"), &[]).await?;
    let spawned = Instant::now();
    // Mid-batch: the shards locked, the part of the batch for the other brokers on Kafka,
    // nothing marked published.
    let (locked, landed) = loop {
        let locked = shards_locked(&pool, &shards).await?;
        let landed = chat_records(&not_x, &start_not_x, &conv_set).await?.len();
        let pending = chat_rows_pending(&pool, &convs).await?;
        ensure!(
            pending == total,
            "{} rows marked published while kafka-{x} was black-holed",
            total - pending
        );
        if locked == shards.len() as i64 && landed >= landed_expected {
            break (locked, landed);
        }
        ensure!(
            spawned.elapsed() < Duration::from_secs(20),
            "not caught mid-batch 20 s after the relay started: {locked} of {} shards locked, {landed} of {landed_expected} records landed",
            shards.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "  kill -9 {} {:.1} s after it started: {locked} shards locked, {landed} of the batch's {total} records on Kafka, {total} rows unpublished",
        a.id,
        spawned.elapsed().as_secs_f64()
    );
    a.kill9();
    let pending = chat_rows_pending(&pool, &convs).await?;
    ensure!(
        pending == total,
        "the relay settled {} rows before it died: not killed mid-batch",
        total - pending
    );
    stack
        .toxiproxy()
        .remove_toxic(&x_link, "timeout_upstream")
        .await?;
    // Its session ended with it, and its locks with the session.
    eventually(
        "the dead relay's shard locks released",
        Duration::from_secs(10),
        || async {
            let n = shards_locked(&pool, &shards).await?;
            ensure!(n == 0, "{n} shards still locked");
            Ok(())
        },
    )
    .await?;
    let _b = Node::start(stack, &unique("mid-b"), &[]).await?;
    eventually(
        "the other node published the batch",
        Duration::from_secs(30),
        || async {
            let n = chat_rows_pending(&pool, &convs).await?;
            ensure!(n == 0, "{n} rows still unpublished");
            Ok(())
        },
    )
    .await?;

    let records = chat_records(&bootstrap, &start, &conv_set).await?;
    let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *copies.entry(r.3.as_str()).or_default() += 1;
    }
    for (conv, msgs) in &acked {
        let missing: Vec<&str> = msgs
            .iter()
            .filter(|(id, _)| !copies.contains_key(id.as_str()))
            .map(|(id, _)| id.as_str())
            .collect();
        ensure!(
            missing.is_empty(),
            "{} acknowledged messages of {conv} missing from chat-events: {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        // Per key (one partition): the seqs in increasing order once duplicates are
        // dropped, every acked one; the raw sequence restarts at most once (the takeover).
        let seqs: Vec<i64> = records
            .iter()
            .filter(|r| r.2 == *conv)
            .map(|r| r.4)
            .collect();
        let mut seen = HashSet::new();
        let first_copies: Vec<i64> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
        let acked_seqs: Vec<i64> = msgs.iter().map(|(_, s)| *s).collect();
        ensure!(
            first_copies == acked_seqs,
            "{conv}: seqs on chat-events once duplicates are dropped {first_copies:?}, acked {acked_seqs:?}"
        );
        let restarts = seqs.windows(2).filter(|w| w[1] <= w[0]).count();
        ensure!(
            restarts <= 1,
            "{conv}: the seqs go back {restarts} times: {seqs:?}"
        );
    }
    let doubled: BTreeSet<&str> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let most = copies.values().copied().max().unwrap_or(0);
    let duplicates = records.len() - copies.len();
    eprintln!(
        "  {} records for {} messages: {duplicates} duplicates ({} messages twice, at most {most} copies); {landed} had landed before the kill",
        records.len(),
        copies.len(),
        doubled.len()
    );
    // At least once, and no more than the design allows: what the dead relay landed is
    // sent again (its rows were never marked), once; nothing else is doubled.
    ensure!(most <= 2, "a message is on chat-events {most} times");
    let landed_ids: Vec<&str> = elsewhere
        .iter()
        .flat_map(|c| acked[c].iter().map(|(id, _)| id.as_str()))
        .collect();
    let not_doubled = landed_ids
        .iter()
        .filter(|id| !doubled.contains(*id))
        .count();
    ensure!(
        not_doubled == 0,
        "{not_doubled} messages the dead relay had landed were not sent again"
    );
    ensure!(
        duplicates >= landed && duplicates <= total as usize,
        "{duplicates} duplicates: expected between the {landed} landed before the kill and the batch's {total}"
    );
    Ok(())
}

async fn stream_resumed_on_another_node_delivers_every_chunk(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv.clone(),
        prompt: "tell me about replay".into(),
    })
    .await?;
    let session = c
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    let mut seen: Vec<i64> = Vec::new();
    while seen.len() < 4 {
        if let ServerFrame::Chunk { index, .. } = c.recv().await? {
            seen.push(index);
        }
    }
    drop(c); // the client goes away mid-stream
    let last = *seen.last().unwrap_or(&-1);
    let mut c2 = Client::connect(&n2, "alice").await?;
    c2.send(&ClientFrame::Resume {
        session_id: session.clone(),
        after_index: last,
    })
    .await?;
    let total = loop {
        match c2.recv().await? {
            ServerFrame::Chunk { index, .. } => seen.push(index),
            ServerFrame::StreamEnd {
                outcome: StreamOutcome::Completed,
                total_chunks,
                ..
            } => break total_chunks,
            ServerFrame::StreamEnd { outcome, error, .. } => {
                bail!("stream ended {outcome:?}: {error:?}")
            }
            _ => {}
        }
    };
    let expected: Vec<i64> = (0..total).collect();
    ensure!(
        seen == expected,
        "chunks seen {seen:?}, expected 0..{total}"
    );
    let unique_count = seen.iter().collect::<HashSet<_>>().len();
    ensure!(unique_count == seen.len(), "duplicated chunks");
    // The session's timeline on stream-events, in order (one partition per session key).
    let types = session_events(&stack.endpoints().kafka_bootstrap, &session, |t| {
        t.iter().any(|x| x == "RECOVERY_ATTEMPT") && t.iter().any(|x| x == "STREAM_COMPLETED")
    })
    .await?;
    let chunks = types.iter().filter(|t| *t == "CHUNK_RECEIVED").count() as i64;
    ensure!(
        types.first().map(String::as_str) == Some("SESSION_STARTED"),
        "timeline {types:?}"
    );
    ensure!(
        chunks == total,
        "{chunks} CHUNK_RECEIVED events for {total} chunks"
    );
    ensure!(
        types.iter().any(|t| t == "STREAM_COMPLETED")
            && types.iter().any(|t| t == "RECOVERY_ATTEMPT"),
        "timeline {types:?}"
    );
    // A session that does not exist is a clear not_found.
    c2.send(&ClientFrame::Resume {
        session_id: "no-such-session".into(),
        after_index: -1,
    })
    .await?;
    c2.expect_error(ErrorCode::NotFound).await?;
    Ok(())
}

async fn failing_stream_ends_failed_with_stream_error(stack: &mut Stack) -> Result<()> {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("failing-stream.yaml");
    std::fs::write(&config, "stream:\n  error_rate: 1.0\n  pace_ms: 10\n")?;
    let n1 = Node::start(
        stack,
        "fail-1",
        &["--config", &config.display().to_string()],
    )
    .await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv,
        prompt: "this one fails".into(),
    })
    .await?;
    let session = c
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    let (outcome, error) = c
        .until(|f| match f {
            ServerFrame::StreamEnd { outcome, error, .. } => Some((*outcome, error.clone())),
            _ => None,
        })
        .await?;
    ensure!(
        outcome == StreamOutcome::Failed && error.is_some(),
        "{outcome:?} {error:?}"
    );
    let types = session_events(&stack.endpoints().kafka_bootstrap, &session, |t| {
        t.iter().any(|x| x == "STREAM_ERROR")
    })
    .await?;
    ensure!(
        types.iter().any(|t| t == "STREAM_ERROR"),
        "no STREAM_ERROR in {types:?}"
    );
    ensure!(
        !types.iter().any(|t| t == "STREAM_COMPLETED"),
        "a failed stream reported completion: {types:?}"
    );
    Ok(())
}

async fn readyz_follows_redis_and_the_node_recovers(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    stack.cut("redis").await?;
    n1.wait_unready("redis", Duration::from_secs(15)).await?;
    // PostgreSQL is up: a send is still stored and acknowledged.
    let mut alice = Client::connect(&n1, "alice").await?;
    let (seq, _) = alice
        .send_msg(&conv, "during-redis-cut", "stored anyway")
        .await?;
    stack.restore("redis").await?;
    n1.wait_ready(Duration::from_secs(30))
        .await
        .context("node did not recover after redis returned")?;
    let mut bob = Client::connect(&n1, "bob").await?;
    bob.send(&ClientFrame::Sync {
        conversation_id: conv,
        after_seq: 0,
        limit: None,
    })
    .await?;
    bob.until(|f| matches!(f, ServerFrame::Msg { seq: s, .. } if *s == seq).then_some(()))
        .await?;
    Ok(())
}

async fn kafka_fanout_mode_delivers_across_nodes(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "kf-1", &["--fanout-mode", "kafka"]).await?;
    let n2 = Node::start(stack, "kf-2", &["--fanout-mode", "kafka"]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    // No wait: a Kafka fan-out node is ready only once its consumer holds its partitions.
    let (seq, _) = alice.send_msg(&conv, "kafka-1", "through kafka").await?;
    let got = bob
        .until(|f| match f {
            ServerFrame::Msg {
                seq: s,
                body,
                via: Via::Live,
                ..
            } if *s == seq => Some(body.clone()),
            _ => None,
        })
        .await
        .context("bob did not get the message through the kafka fan-out")?;
    ensure!(got == "through kafka");
    alice
        .until(|f| matches!(f, ServerFrame::Status { status: MessageStatus::Delivered, user_id, .. } if user_id == "bob").then_some(()))
        .await
        .context("DELIVERED in kafka mode")?;
    Ok(())
}

async fn async_mode_publishes_without_the_outbox(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "async-1", &["--publish-mode", "async"]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for i in 0..10 {
        alice
            .send_msg(&conv, &format!("as{i}"), "fire and forget")
            .await?;
    }
    let pool = sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE key = $1")
        .bind(&conv)
        .fetch_one(&pool)
        .await?;
    ensure!(rows == 0, "async mode wrote {rows} outbox rows");
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1")
        .bind(&conv)
        .fetch_all(&pool)
        .await?;
    wait_published(
        stack,
        &ids,
        Duration::from_secs(20),
        "async events did not arrive",
    )
    .await
}

async fn kafka_outage_is_reported_and_the_outbox_catches_up(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "ko-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for b in 1..=3 {
        stack.cut(&format!("kafka-{b}-client")).await?;
    }
    n1.wait_unready("kafka", Duration::from_secs(20)).await?;
    // Outbox mode keeps Kafka off the user's path: sends are still acknowledged.
    for i in 0..5 {
        alice
            .send_msg(&conv, &format!("ko{i}"), "while kafka is away")
            .await?;
    }
    for b in 1..=3 {
        stack.restore(&format!("kafka-{b}-client")).await?;
    }
    n1.wait_ready(Duration::from_secs(60))
        .await
        .context("node did not recover after kafka returned")?;
    let pool = sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?;
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1")
        .bind(&conv)
        .fetch_all(&pool)
        .await?;
    wait_published(
        stack,
        &ids,
        Duration::from_secs(60),
        "outbox rows were not published after kafka returned",
    )
    .await
}

async fn postgres_outage_gives_unavailable_and_recovers(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "pg-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    alice.send_msg(&conv, "pg-before", "stored").await?;
    stack.cut("postgres").await?;
    alice
        .send(&ClientFrame::Send {
            conversation_id: conv.clone(),
            client_msg_id: "pg-during".into(),
            body: "refused".into(),
        })
        .await?;
    let msg = alice.expect_error(ErrorCode::Unavailable).await?;
    ensure!(msg.contains("nothing was stored"), "{msg}");
    alice.still_serves().await?;
    n1.wait_unready("postgres", Duration::from_secs(20)).await?;
    stack.restore("postgres").await?;
    n1.wait_ready(Duration::from_secs(30)).await?;
    // The refused send was not stored; retrying it now works and gets the next seq.
    let start = Instant::now();
    let seq = loop {
        match alice.send_msg(&conv, "pg-during", "refused").await {
            Ok((seq, _)) => break seq,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                eprintln!("  retry after restore: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    ensure!(seq == 2, "seq after the outage is {seq}");
    Ok(())
}

/// The membership reads senders wait for go through one loader task; a read that meets a
/// black-holed PostgreSQL link is given up after the loader's timeout, its senders are
/// refused `unavailable`, and once the link is back the next cold conversation is read and
/// its send stored. (Without the timeout the loader would wait on the lost answer forever,
/// and no cold conversation of the node would be read again.)
async fn a_membership_read_lost_to_a_black_hole_is_refused_and_the_loader_goes_on(
    stack: &mut Stack,
) -> Result<()> {
    let n1 = Node::start(stack, "pgbh-1", &[]).await?;
    let n2 = Node::start(stack, "pgbh-2", &[]).await?;
    // Made through the other node: n1 has never read either membership.
    let (conv_a, conv_b) = (unique("conv-a"), unique("conv-b"));
    create_conversation(&n2, "alice", &conv_a, &["alice"]).await?;
    create_conversation(&n2, "alice", &conv_b, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    black_hole(stack, "postgres", true).await?;
    alice
        .send(&ClientFrame::Send {
            conversation_id: conv_a.clone(),
            client_msg_id: "bh-a".into(),
            body: "its membership read is lost".into(),
        })
        .await?;
    let sent = Instant::now();
    let refused = loop {
        ensure!(
            sent.elapsed() < Duration::from_secs(25),
            "no answer to a send whose membership read was lost within 25 s"
        );
        match alice.recv().await {
            Ok(ServerFrame::Error {
                code: ErrorCode::Unavailable,
                message,
                ..
            }) => break message,
            Ok(_) => {}
            Err(e) if e.to_string().contains("no frame within") => {}
            Err(e) => return Err(e),
        }
    };
    eprintln!(
        "  refused after {:.1} s: {refused}",
        sent.elapsed().as_secs_f64()
    );
    black_hole(stack, "postgres", false).await?;
    let restored = Instant::now();
    let seq = loop {
        match alice
            .send_msg(&conv_b, "bh-b", "read after the link is back")
            .await
        {
            Ok((seq, _)) => break seq,
            Err(e) if restored.elapsed() < Duration::from_secs(30) => {
                eprintln!("  retry after the link is back: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(e.context("a cold conversation was not read after the link came back"))
            }
        }
    };
    ensure!(seq == 1, "seq {seq} for the first message of {conv_b}");
    eprintln!(
        "  a cold conversation stored {:.1} s after the link came back",
        restored.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A pooled connection PostgreSQL closed while it sat idle is noticed at acquire (the pool
/// pings connections idle for `PING_IF_IDLE_FOR`, not busy ones) and replaced: the send
/// that acquires it is stored and acknowledged, not refused.
async fn idle_pooled_connections_postgres_closed_are_replaced(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "pool-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for i in 0..3 {
        alice.send_msg(&conv, &format!("warm-{i}"), "warm").await?;
    }
    let admin = pg(stack).await?;
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&n1.id)
    .fetch_all(&admin)
    .await?;
    ensure!(
        !terminated.is_empty() && terminated.iter().all(|t| *t),
        "the node's pooled connections were not all terminated: {terminated:?}"
    );
    // Longer than PING_IF_IDLE_FOR: every dead connection still pooled has sat idle since
    // (one a background task used meanwhile failed and was dropped).
    tokio::time::sleep(chatstream_store::PING_IF_IDLE_FOR + Duration::from_millis(500)).await;
    let (seq, _) = alice
        .send_msg(&conv, "after-terminate", "stored")
        .await
        .context("the first send after PostgreSQL closed the node's idle connections")?;
    ensure!(seq == 4, "seq after the terminated connections is {seq}");
    Ok(())
}

async fn sigterm_drains_connections(stack: &mut Stack) -> Result<()> {
    let mut n1 = Node::start(stack, "drain-1", &[]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(n1.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    c.expect_error(ErrorCode::ShuttingDown).await?;
    let close = tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await?;
    match close {
        Some(Ok(Message::Close(Some(cf)))) => ensure!(u16::from(cf.code) == 1012, "close {cf:?}"),
        other => bail!("expected a close frame, got {other:?}"),
    }
    let start = Instant::now();
    loop {
        if let Some(status) = n1.child.try_wait()? {
            ensure!(status.success(), "node exited with {status}");
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "node did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// How Redis goes away in an outage test.
#[derive(Clone, Copy, Debug)]
enum RedisFault {
    /// The link is disabled: open connections are closed, new ones refused.
    Refused,
    /// A timeout toxic (timeout 0) both ways: connections open, nothing ever comes back.
    BlackHole,
}

/// Black-holes (or lets through again) both directions of a proxied link: what is sent is
/// dropped and the connections stay open.
async fn black_hole(stack: &Stack, proxy: &str, on: bool) -> Result<()> {
    for stream in ["upstream", "downstream"] {
        if on {
            stack
                .toxiproxy()
                .add_toxic(proxy, &Toxic::timeout(stream, 0))
                .await?;
        } else {
            stack
                .toxiproxy()
                .remove_toxic(proxy, &format!("timeout_{stream}"))
                .await?;
        }
    }
    Ok(())
}

async fn redis_fault(stack: &Stack, fault: RedisFault, on: bool) -> Result<()> {
    match (fault, on) {
        (RedisFault::Refused, true) => stack.cut("redis").await?,
        (RedisFault::Refused, false) => stack.restore("redis").await?,
        (RedisFault::BlackHole, on) => black_hole(stack, "redis", on).await?,
    }
    Ok(())
}

/// The `p` quantile (0..=1) of sorted durations.
fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Sends at `per_s` for `duration`, open loop (a send is due on its tick whatever the
/// acks do), and returns every send->ack latency once all are acknowledged.
async fn paced_sends(
    c: &mut Client,
    conv: &str,
    prefix: &str,
    per_s: u32,
    duration: Duration,
) -> Result<Vec<Duration>> {
    let interval = Duration::from_secs(1) / per_s;
    let start = Instant::now();
    let sending_until = start + duration;
    let give_up = sending_until + Duration::from_secs(20);
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut i = 0u32;
    let mut next_due = start;
    while next_due < sending_until || !in_flight.is_empty() {
        ensure!(
            Instant::now() < give_up,
            "{} sends not acknowledged 20 s after the last",
            in_flight.len()
        );
        tokio::select! {
            _ = tokio::time::sleep_until(next_due.into()), if next_due < sending_until => {
                let cid = format!("{prefix}-{i}");
                let sent = Instant::now();
                c.send(&ClientFrame::Send {
                    conversation_id: conv.into(),
                    client_msg_id: cid.clone(),
                    body: "paced".into(),
                })
                .await?;
                in_flight.insert(cid, sent);
                i += 1;
                next_due = start + interval * i;
            }
            frame = c.recv() => match frame? {
                ServerFrame::Ack { client_msg_id, .. } => {
                    if let Some(sent) = in_flight.remove(&client_msg_id) {
                        latencies.push(sent.elapsed());
                    }
                }
                ServerFrame::Error { ref_id: Some(r), code, message, .. } if in_flight.contains_key(&r) => {
                    bail!("send {r}: {code:?} {message}")
                }
                _ => {}
            }
        }
    }
    latencies.sort();
    Ok(latencies)
}

fn latency_summary(l: &[Duration]) -> String {
    format!(
        "{} sends, p50 {:?}, p95 {:?}, p99 {:?}, max {:?}",
        l.len(),
        quantile(l, 0.5),
        quantile(l, 0.95),
        quantile(l, 0.99),
        l.last().copied().unwrap_or_default()
    )
}

/// Waits (until `deadline`) for a live `msg` of `conv` with `seq` on `c`.
async fn live_by(c: &mut Client, conv: &str, seq: i64, deadline: Instant) -> Result<()> {
    let wait = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(
        wait,
        c.until(|f| {
            matches!(f, ServerFrame::Msg { conversation_id, seq: s, via: Via::Live, .. } if conversation_id == conv && *s == seq)
                .then_some(())
        }),
    )
    .await
    .map_err(|_| anyhow!("{}: no live msg {seq} of {conv} in time", c.user))?
}

/// The presence keys Redis holds for `user` (any key layout that names the user).
async fn presence_keys(stack: &Stack, user: &str) -> Result<Vec<String>> {
    let client = redis::Client::open(stack.endpoints().redis_url)?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await??;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("chatstream:presence:*{user}*"))
        .query_async(&mut conn)
        .await?;
    Ok(keys)
}

/// A sender at 40 msg/s on node 1, its peer on node 2; Redis goes away (`fault`) for
/// `outage`, then returns. While it is away sends stay as fast as before and both nodes
/// report it; within 5 s of its return every node is fully working again (readyz, live
/// fan-out, presence, streams with resume), without a restart.
async fn redis_outage(stack: &mut Stack, fault: RedisFault, outage: Duration) -> Result<()> {
    let n1 = Node::start(stack, "ro-1", &[]).await?;
    let n2 = Node::start(stack, "ro-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    let (seq, _) = alice.send_msg(&conv, "before", "live").await?;
    live_by(
        &mut bob,
        &conv,
        seq,
        Instant::now() + Duration::from_secs(5),
    )
    .await?;
    let baseline = paced_sends(&mut alice, &conv, "base", 40, Duration::from_secs(2)).await?;
    eprintln!("  no fault: {}", latency_summary(&baseline));

    redis_fault(stack, fault, true).await?;
    let during = paced_sends(&mut alice, &conv, "out", 40, outage).await?;
    eprintln!(
        "  redis {fault:?} for {outage:?}: {}",
        latency_summary(&during)
    );
    for n in [&n1, &n2] {
        n.wait_unready("redis", Duration::from_secs(3))
            .await
            .with_context(|| format!("{} during the outage", n.id))?;
    }
    redis_fault(stack, fault, false).await?;
    let restored = Instant::now();
    let deadline = restored + Duration::from_secs(5);

    for n in [&n1, &n2] {
        n.wait_ready(deadline.saturating_duration_since(Instant::now()))
            .await
            .with_context(|| format!("{} within 5 s of redis returning", n.id))?;
    }
    eprintln!(
        "  both nodes ready {:.1} s after redis returned",
        restored.elapsed().as_secs_f64()
    );
    // Ready means working: a message sent now reaches the other node live at once.
    let (seq, _) = alice.send_msg(&conv, "after", "live again").await?;
    live_by(
        &mut bob,
        &conv,
        seq,
        Instant::now() + Duration::from_secs(2),
    )
    .await
    .context("live fan-out node-1 -> node-2 once both nodes said ready")?;
    // And the other way: node 2's publish reaches node 1's subscriber live.
    let (back, _) = bob
        .send_msg(&conv, "after-back", "live again, back")
        .await?;
    live_by(
        &mut alice,
        &conv,
        back,
        Instant::now() + Duration::from_secs(2),
    )
    .await
    .context("live fan-out node-2 -> node-1 once both nodes said ready")?;
    // Presence: a connection made now is marked online.
    let dave = unique("dave");
    let mut d = Client::connect(&n2, &dave).await?;
    d.still_serves().await?;
    let keys = presence_keys(stack, &dave).await?;
    ensure!(
        !keys.is_empty(),
        "no presence key for {dave} after recovery"
    );
    // Streams: started on node 1, resumed in full on node 2.
    alice
        .send(&ClientFrame::Stream {
            conversation_id: conv.clone(),
            prompt: "after the outage".into(),
        })
        .await?;
    let session = alice
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(Ok(session_id.clone())),
            ServerFrame::Error { code, message, .. } => {
                Some(Err(anyhow!("stream refused: {code:?} {message}")))
            }
            _ => None,
        })
        .await??;
    ensure!(
        Instant::now() < deadline,
        "everything worked only {:.1} s after redis returned",
        restored.elapsed().as_secs_f64()
    );
    eprintln!(
        "  live, presence and stream start worked {:.1} s after redis returned",
        restored.elapsed().as_secs_f64()
    );
    let mut alice2 = Client::connect(&n2, "alice").await?;
    alice2
        .send(&ClientFrame::Resume {
            session_id: session.clone(),
            after_index: -1,
        })
        .await?;
    let mut chunks = Vec::new();
    let total = loop {
        match alice2.recv().await? {
            ServerFrame::Chunk { index, .. } => chunks.push(index),
            ServerFrame::StreamEnd {
                outcome: StreamOutcome::Completed,
                total_chunks,
                ..
            } => break total_chunks,
            ServerFrame::StreamEnd { outcome, error, .. } => {
                bail!("stream ended {outcome:?}: {error:?}")
            }
            ServerFrame::Error { code, message, .. } => bail!("resume: {code:?} {message}"),
            _ => {}
        }
    };
    ensure!(
        chunks == (0..total).collect::<Vec<_>>(),
        "resumed chunks {chunks:?} of {total}"
    );
    // Sends never waited for Redis while it was away: send->ack stays at its no-fault
    // level, measured just before on the same machine. p50 and p95 within twice the
    // no-fault figure (or 100 / 200 ms, whichever is larger), and p99 under the 1 s a
    // Redis call may take before the link gives up: no send waited for Redis. (Absolute
    // bounds alone flake: this 2-core machine, shared with the brokers and other builds,
    // has seen a no-fault p95 of 266 ms; the defect this guards against made every send
    // wait 1-2 s.)
    let (p50, p95, p99) = (
        quantile(&during, 0.5),
        quantile(&during, 0.95),
        quantile(&during, 0.99),
    );
    let p50_bound = (quantile(&baseline, 0.5) * 2).max(Duration::from_millis(100));
    let p95_bound = (quantile(&baseline, 0.95) * 2).max(Duration::from_millis(200));
    ensure!(
        p50 < p50_bound && p95 < p95_bound && p99 < Duration::from_secs(1),
        "send->ack during the outage: p50 {p50:?}, p95 {p95:?}, p99 {p99:?} (no fault: {})",
        latency_summary(&baseline)
    );
    // Every acknowledged message is stored: a sync returns them all.
    bob.send(&ClientFrame::Sync {
        conversation_id: conv.clone(),
        after_seq: 0,
        limit: None,
    })
    .await?;
    let last = bob
        .until(|f| match f {
            ServerFrame::SyncDone { last_seq, .. } => Some(*last_seq),
            _ => None,
        })
        .await?;
    let acked = (3 + baseline.len() + during.len()) as i64;
    ensure!(
        last == acked,
        "sync ends at {last}, {acked} were acknowledged"
    );
    Ok(())
}

async fn redis_refused_for_4s_sends_stay_fast_and_every_path_recovers(
    stack: &mut Stack,
) -> Result<()> {
    redis_outage(stack, RedisFault::Refused, Duration::from_secs(4)).await
}

async fn redis_black_hole_for_6s_sends_stay_fast_and_every_path_recovers(
    stack: &mut Stack,
) -> Result<()> {
    redis_outage(stack, RedisFault::BlackHole, Duration::from_secs(6)).await
}

/// The idempotency key is (tenant, sender, conversation, client_msg_id), and users of
/// different tenants with the same id are different people: membership, fan-out,
/// presence (notifications) and queries keep them apart.
async fn identities_are_scoped_by_conversation_and_tenant(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "id-1", &[]).await?;
    let n2 = Node::start(stack, "id-2", &[]).await?;
    let conv_a = unique("conv-a");
    let conv_b = unique("conv-b");
    create_conversation(&n1, "alice", &conv_a, &["alice", "bob"]).await?;
    create_conversation(&n1, "alice", &conv_b, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let (c, _, seq, dup) = alice.send_for_ack(&conv_a, "same-id", "to A").await?;
    ensure!(c == conv_a && seq == 1 && !dup, "{c} {seq} {dup}");
    let (c, _, seq, dup) = alice.send_for_ack(&conv_b, "same-id", "to B").await?;
    ensure!(
        c == conv_b && seq == 1 && !dup,
        "the send to B was answered for {c}, seq {seq}, duplicate {dup}"
    );
    let (c, _, seq, dup) = alice.send_for_ack(&conv_b, "same-id", "to B").await?;
    ensure!(
        c == conv_b && seq == 1 && dup,
        "retry in B: {c} {seq} {dup}"
    );
    let history: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "http://{}/api/conversations/{conv_b}/messages",
            n2.addr
        ))
        .bearer_auth(token("alice", 60))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        history["messages"]
            .as_array()
            .is_some_and(|m| m.len() == 1 && m[0]["body"] == "to B"),
        "history of B: {history}"
    );

    // bob of another tenant: not a member, gets nothing, reads nothing.
    let mut bob_acme = Client::connect(&n2, "bob").await?;
    let mut bob_other = Client::connect_in(&n2, "globex", "bob").await?;
    let (seq, _) = alice.send_msg(&conv_a, "for-acme-bob", "acme only").await?;
    live_by(
        &mut bob_acme,
        &conv_a,
        seq,
        Instant::now() + Duration::from_secs(5),
    )
    .await?;
    bob_other
        .send(&ClientFrame::Ping { nonce: Some(77) })
        .await?;
    loop {
        match bob_other.recv().await? {
            ServerFrame::Pong {
                nonce: Some(77), ..
            } => break,
            ServerFrame::Msg { .. } => bail!("bob of globex received acme's message"),
            _ => {}
        }
    }
    bob_other
        .send(&ClientFrame::Sync {
            conversation_id: conv_a.clone(),
            after_seq: 0,
            limit: None,
        })
        .await?;
    bob_other.expect_error(ErrorCode::NotMember).await?;
    bob_other
        .send(&ClientFrame::Send {
            conversation_id: conv_a.clone(),
            client_msg_id: "intruder".into(),
            body: "hi".into(),
        })
        .await?;
    bob_other.expect_error(ErrorCode::NotMember).await?;
    let r = reqwest::Client::new()
        .get(format!(
            "http://{}/api/conversations/{conv_a}/messages",
            n1.addr
        ))
        .bearer_auth(token_in("globex", "bob", 60))
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 403,
        "history of acme's conversation for bob of globex: {}",
        r.status()
    );

    // carol of acme is offline while carol of globex is online: acme's carol is notified.
    // (A name of this test's own: a node killed by an earlier test leaves its users'
    // presence behind until it expires.)
    let carol = unique("carol");
    let conv_c = unique("conv-c");
    create_conversation(&n1, "alice", &conv_c, &["alice", &carol]).await?;
    let mut carol_other = Client::connect_in(&n2, "globex", &carol).await?;
    carol_other.still_serves().await?;
    let (_, message_id, _, _) = alice
        .send_for_ack(&conv_c, "to-carol", "are you there")
        .await?;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    eventually(
        "NOTIFICATION for carol of acme",
        Duration::from_secs(30),
        || async {
            let found = read_raw_events(&bootstrap, "notifications")
                .await?
                .iter()
                .any(|e| {
                    e["tenant"] == TENANT
                        && e["payload"]["user_id"] == carol.as_str()
                        && e["payload"]["related_entity_id"] == message_id.as_str()
                });
            ensure!(found, "not on notifications yet");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

async fn members_in_db(pool: &sqlx::PgPool, conv: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT user_id FROM conversation_members WHERE conversation_id = $1 ORDER BY user_id",
    )
    .bind(conv)
    .fetch_all(pool)
    .await?)
}

/// Only members change a conversation's membership, through an API of its own that emits
/// MEMBERSHIP_CHANGED events (outbox), which the workers take in their stride.
async fn only_members_change_membership(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "mb-1", &[]).await?;
    let pool = pg(stack).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let (status, body) = post_json(
        &n1,
        "/api/conversations",
        "carol",
        serde_json::json!({ "id": conv, "members": ["carol"] }),
    )
    .await?;
    ensure!(
        status == 403 && body["code"] == "not_member",
        "a non-member re-creating the conversation: {status} {body}"
    );
    ensure!(
        members_in_db(&pool, &conv).await? == ["alice", "bob"],
        "membership changed by a non-member"
    );
    let mut carol = Client::connect(&n1, "carol").await?;
    carol
        .send(&ClientFrame::Send {
            conversation_id: conv.clone(),
            client_msg_id: "c1".into(),
            body: "let me in".into(),
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    // Re-creating with the same members is idempotent, for any member.
    for who in ["alice", "bob"] {
        let (status, body) = post_json(
            &n1,
            "/api/conversations",
            who,
            serde_json::json!({ "id": conv, "members": ["bob", "alice"] }),
        )
        .await?;
        ensure!(
            status == 200 || status == 201,
            "{who} re-creating with the same members: {status} {body}"
        );
    }
    // Different members through create: refused, nothing changed.
    let (status, body) = post_json(
        &n1,
        "/api/conversations",
        "alice",
        serde_json::json!({ "id": conv, "members": ["alice", "bob", "carol"] }),
    )
    .await?;
    ensure!(
        status == 409,
        "re-create with other members: {status} {body}"
    );
    ensure!(members_in_db(&pool, &conv).await? == ["alice", "bob"]);
    // The members API: members only.
    let members_path = format!("/api/conversations/{conv}/members");
    let (status, body) = post_json(
        &n1,
        &members_path,
        "carol",
        serde_json::json!({ "add": ["carol"] }),
    )
    .await?;
    ensure!(
        status == 403 && body["code"] == "not_member",
        "a non-member adding herself: {status} {body}"
    );
    ensure!(members_in_db(&pool, &conv).await? == ["alice", "bob"]);
    let (status, body) = post_json(
        &n1,
        &members_path,
        "alice",
        serde_json::json!({ "add": ["carol"], "remove": ["bob"] }),
    )
    .await?;
    ensure!(
        status == 200,
        "alice adding carol, removing bob: {status} {body}"
    );
    ensure!(
        members_in_db(&pool, &conv).await? == ["alice", "carol"],
        "after the change: {body}"
    );
    carol.send_msg(&conv, "c2", "in now").await?;
    let mut bob = Client::connect(&n1, "bob").await?;
    bob.send(&ClientFrame::Send {
        conversation_id: conv.clone(),
        client_msg_id: "b1".into(),
        body: "still here?".into(),
    })
    .await?;
    bob.expect_error(ErrorCode::NotMember).await?;
    // The changes are events on chat-events (keyed by the conversation).
    let bootstrap = stack.endpoints().kafka_bootstrap;
    eventually(
        "MEMBERSHIP_CHANGED events",
        Duration::from_secs(30),
        || async {
            let events: Vec<serde_json::Value> = read_raw_events(&bootstrap, "chat-events")
                .await?
                .into_iter()
                .filter(|e| {
                    e["type"] == "MEMBERSHIP_CHANGED" && e["conversation_id"] == conv.as_str()
                })
                .collect();
            let has = |field: &str, user: &str| {
                events.iter().any(|e| {
                    e["payload"][field]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|u| u == user))
                })
            };
            ensure!(
                has("added", "alice") && has("added", "carol") && has("removed", "bob"),
                "events so far: {events:?}"
            );
            ensure!(
                events.iter().all(|e| e["tenant"] == TENANT),
                "tenant missing: {events:?}"
            );
            Ok(())
        },
    )
    .await?;
    // The workers take the new event type in their stride: audited, nothing dead-lettered.
    let prefix = unique("mb");
    let mut w = Workers::start(stack, "audit,search,analytics", &prefix, &[]).await?;
    for (worker, topics) in [
        (
            "audit",
            &[
                "chat-events",
                "stream-events",
                "message-status-events",
                "notifications",
            ][..],
        ),
        ("search", &["chat-events"][..]),
        ("analytics", &["chat-events", "stream-events"][..]),
    ] {
        caught_up(
            stack,
            &format!("{prefix}-{worker}"),
            topics,
            Duration::from_secs(120),
        )
        .await?;
    }
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE conversation_id = $1 AND event_type = 'MEMBERSHIP_CHANGED'",
    )
    .bind(&conv)
    .fetch_one(&pool)
    .await?;
    ensure!(audited >= 2, "{audited} MEMBERSHIP_CHANGED events audited");
    let dead = dead_letters(&stack.endpoints().kafka_bootstrap).await?;
    ensure!(
        !dead
            .iter()
            .any(|(p, _)| String::from_utf8_lossy(p).contains(conv.as_str())),
        "an event of {conv} was dead-lettered"
    );
    let status = w.stop().await?;
    ensure!(status.success(), "workers exited with {status}");
    Ok(())
}

/// One sender bursts 500 messages; the recipient on another node gets the live ones in
/// strictly increasing seq order (and, with no fault, all of them).
async fn live_messages_arrive_in_seq_order(stack: &mut Stack) -> Result<()> {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("burst.yaml");
    std::fs::write(
        &config,
        "rate_limit_per_s: 100000\nrate_limit_burst: 100000\n",
    )?;
    let config = config.display().to_string();
    let n1 = Node::start(stack, "order-1", &["--config", &config]).await?;
    let n2 = Node::start(stack, "order-2", &["--config", &config]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    const BURST: i64 = 500;
    for i in 0..BURST {
        alice
            .send(&ClientFrame::Send {
                conversation_id: conv.clone(),
                client_msg_id: format!("burst-{i}"),
                body: format!("message {i}"),
            })
            .await?;
    }
    let mut live = Vec::new();
    let start = Instant::now();
    while (live.len() as i64) < BURST && start.elapsed() < Duration::from_secs(60) {
        match tokio::time::timeout(Duration::from_secs(5), bob.recv()).await {
            Ok(Ok(ServerFrame::Msg {
                seq,
                via: Via::Live,
                conversation_id,
                ..
            })) if conversation_id == conv => live.push(seq),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    let out_of_order: Vec<(i64, i64)> = live
        .windows(2)
        .filter(|w| w[1] <= w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    eprintln!(
        "  {} live frames, {} out of order",
        live.len(),
        out_of_order.len()
    );
    ensure!(
        out_of_order.is_empty(),
        "{} live frames out of seq order, first {:?}",
        out_of_order.len(),
        &out_of_order[..out_of_order.len().min(5)]
    );
    ensure!(
        live.len() as i64 == BURST,
        "{} of {BURST} arrived live",
        live.len()
    );
    let mut acked = BTreeSet::new();
    while (acked.len() as i64) < BURST {
        if let ServerFrame::Ack { seq, .. } = alice.recv().await? {
            acked.insert(seq);
        }
    }
    ensure!(
        acked == (1..=BURST).collect::<BTreeSet<_>>(),
        "acks {acked:?}"
    );
    Ok(())
}

/// `publish_mode: none` (YAML or flag): nothing reaches Kafka — no outbox rows, no events,
/// and the node stays ready and fast with every Kafka link cut.
async fn publish_mode_none_keeps_kafka_off_every_path(stack: &mut Stack) -> Result<()> {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("publish-none.yaml");
    std::fs::write(&config, "publish_mode: none\nstream:\n  pace_ms: 10\n")?;
    let id1 = unique("none-1");
    let id2 = unique("none-2");
    let n1 = Node::start(stack, &id1, &["--config", &config.display().to_string()]).await?;
    let n2 = Node::start(stack, &id2, &["--publish-mode", "none"]).await?;
    for n in [&n1, &n2] {
        let (_, body) = n.readyz().await?;
        ensure!(body["publish_mode"] == "none", "{}: {body}", n.id);
    }
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob", "carol"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    for b in 1..=3 {
        stack.cut(&format!("kafka-{b}-client")).await?;
    }
    let mut latencies = Vec::new();
    for i in 0..20 {
        let sent = Instant::now();
        let (seq, _) = alice.send_msg(&conv, &format!("n{i}"), "no kafka").await?;
        latencies.push(sent.elapsed());
        live_by(
            &mut bob,
            &conv,
            seq,
            Instant::now() + Duration::from_secs(5),
        )
        .await?;
    }
    latencies.sort();
    eprintln!(
        "  with every kafka link cut: {}",
        latency_summary(&latencies)
    );
    bob.send(&ClientFrame::Read {
        conversation_id: conv.clone(),
        up_to_seq: 20,
    })
    .await?;
    bob.send(&ClientFrame::Typing {
        conversation_id: conv.clone(),
        is_typing: true,
    })
    .await?;
    alice
        .send(&ClientFrame::Stream {
            conversation_id: conv.clone(),
            prompt: "no kafka please".into(),
        })
        .await?;
    let session = alice
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    alice
        .until(|f| matches!(f, ServerFrame::StreamEnd { .. }).then_some(()))
        .await?;
    // Kafka is not needed: both nodes stay ready past a few health checks.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for n in [&n1, &n2] {
        let (code, body) = n.readyz().await?;
        ensure!(code == 200, "{} with kafka cut: {code} {body}", n.id);
    }
    for b in 1..=3 {
        stack.restore(&format!("kafka-{b}-client")).await?;
    }
    let pool = pg(stack).await?;
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE node_id = $1 OR node_id = $2 OR key = $3 OR key = $4",
    )
    .bind(&id1)
    .bind(&id2)
    .bind(&conv)
    .bind(&session)
    .fetch_one(&pool)
    .await?;
    ensure!(rows == 0, "publish mode none wrote {rows} outbox rows");
    // Give anything that might have been sent some time, then look on every topic.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    for topic in [
        "chat-events",
        "stream-events",
        "message-status-events",
        "typing-events",
        "notifications",
    ] {
        let mine = read_raw_events(&bootstrap, topic)
            .await?
            .into_iter()
            .filter(|e| {
                e["source_node"] == id1.as_str()
                    || e["source_node"] == id2.as_str()
                    || e["conversation_id"] == conv.as_str()
            })
            .count();
        ensure!(mine == 0, "{mine} events on {topic} in publish mode none");
    }
    Ok(())
}

/// Every accepted socket has TCP_NODELAY: the node reads the option back from each
/// accepted socket (getsockopt) and logs it with the peer address; the test finds its own
/// WebSocket connection there, and the node's counter of sockets without it stays at 0.
async fn accepted_sockets_have_tcp_nodelay(stack: &mut Stack) -> Result<()> {
    let id = unique("nodelay");
    let n1 = Node::start_logging(
        stack,
        &id,
        &["--log-format", "json"],
        &format!("{DEFAULT_LOG_FILTER},chatstream_node::server=debug"),
    )
    .await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.still_serves().await?;
    let local = match c.ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr()?.to_string(),
        _ => bail!("expected a plain TCP stream"),
    };
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("node-logs")
        .join(format!("{id}.log"));
    eventually(
        "the node's accept line for our socket",
        Duration::from_secs(5),
        || async {
            let text = std::fs::read_to_string(&log)?;
            let fields = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|v| v["fields"].clone())
                .find(|f| f["peer"] == local.as_str())
                .ok_or_else(|| anyhow!("no accept line for peer {local} in {}", log.display()))?;
            ensure!(fields["tcp_nodelay"] == true, "{fields}");
            Ok(())
        },
    )
    .await?;
    let metrics = reqwest::get(format!("http://{}/metrics", n1.addr))
        .await?
        .text()
        .await?;
    let count = |nodelay: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("chatstream_accepted_sockets_total")
                    && l.contains(&format!("tcp_nodelay=\"{nodelay}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    ensure!(
        count("true") >= 2.0 && count("false") == 0.0,
        "accepted sockets: {} with TCP_NODELAY, {} without",
        count("true"),
        count("false")
    );
    Ok(())
}

/// How a connection ended, as its client saw it.
#[derive(Debug)]
enum Ending {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame.
    Dropped(String),
    /// Still open at the deadline.
    Open,
}

/// Reads everything `c` receives until the connection ends or `within` passes; returns the
/// `msg` frames' seqs it got and how it ended.
async fn read_to_the_end(c: &mut Client, within: Duration) -> (Vec<i64>, Ending) {
    let deadline = Instant::now() + within;
    let mut seqs = Vec::new();
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, c.ws.next()).await {
            Err(_) => return (seqs, Ending::Open),
            Ok(None) => return (seqs, Ending::Dropped("end of stream".into())),
            Ok(Some(Err(e))) => return (seqs, Ending::Dropped(e.to_string())),
            Ok(Some(Ok(Message::Close(cf)))) => {
                return (
                    seqs,
                    Ending::Closed(cf.map(|f| u16::from(f.code)).unwrap_or(1005)),
                )
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Ok(ServerFrame::Msg { seq, .. }) = ServerFrame::decode(&t) {
                    seqs.push(seq);
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Sends `n` messages of ~60 KB to `conv` (each acknowledged before the next).
async fn send_large(c: &mut Client, conv: &str, prefix: &str, n: usize) -> Result<i64> {
    let body = "x".repeat(60_000);
    let mut last = 0;
    for i in 0..n {
        last = c.send_msg(conv, &format!("{prefix}-{i}"), &body).await?.0;
    }
    Ok(last)
}

/// A client that stops reading while ~9.6 MB of live messages are due to it is closed with
/// 4408 once its unsent frames pass the byte bound (nothing is dropped quietly); the
/// sender is unaffected, and a reconnect with `sync` recovers every message — a sync answer
/// of 9 MB streams out at the client's pace without tripping the bound.
async fn a_client_too_slow_to_read_is_closed_with_4408(stack: &mut Stack) -> Result<()> {
    let config = node_config(
        "slow-consumer",
        "rate_limit_per_s: 10000\nrate_limit_burst: 10000\nmax_unsent_bytes: 262144\n",
    )?;
    let n1 = Node::start(stack, "slow-1", &["--config", &config]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n1, "bob").await?;
    // bob reads nothing while alice sends.
    let last = send_large(&mut alice, &conv, "big", 160).await?;
    alice.still_serves().await?;
    let (seqs, ending) = read_to_the_end(&mut bob, Duration::from_secs(30)).await;
    eprintln!("  bob got {} messages, then {ending:?}", seqs.len());
    ensure!(
        matches!(ending, Ending::Closed(4408)),
        "expected close 4408, got {ending:?} after {} of {last} messages",
        seqs.len()
    );
    ensure!(metric(&n1, "chatstream_slow_consumer_disconnects_total").await? >= 1.0);
    let mut bob = Client::connect(&n1, "bob").await?;
    let after = seqs.last().copied().unwrap_or(0);
    bob.send(&ClientFrame::Sync {
        conversation_id: conv.clone(),
        after_seq: after,
        limit: None,
    })
    .await?;
    let mut synced = Vec::new();
    loop {
        match bob.recv().await? {
            ServerFrame::Msg {
                seq,
                via: Via::Sync,
                ..
            } => synced.push(seq),
            ServerFrame::SyncDone { last_seq, .. } => {
                ensure!(last_seq == last, "sync_done at {last_seq}, last is {last}");
                break;
            }
            _ => {}
        }
    }
    ensure!(
        synced == (after + 1..=last).collect::<Vec<_>>(),
        "synced {} messages after {after}, expected up to {last}",
        synced.len()
    );
    Ok(())
}

/// A socket that takes nothing (the client stopped reading, the buffers are full) is
/// dropped after the write stall timeout, even below the byte bound.
async fn a_stalled_socket_is_dropped_after_the_write_stall_timeout(
    stack: &mut Stack,
) -> Result<()> {
    let config = node_config(
        "write-stall",
        "rate_limit_per_s: 10000\nrate_limit_burst: 10000\nmax_unsent_bytes: 67108864\nwrite_stall_timeout_ms: 2000\n",
    )?;
    let n1 = Node::start(stack, "stall-1", &["--config", &config]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n1, "bob").await?;
    send_large(&mut alice, &conv, "stall", 160).await?;
    // Longer than the stall timeout, with the socket's buffers full.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (seqs, ending) = read_to_the_end(&mut bob, Duration::from_secs(30)).await;
    eprintln!("  bob got {} messages, then {ending:?}", seqs.len());
    let Ending::Dropped(how) = ending else {
        bail!("expected the connection dropped, got {ending:?}");
    };
    eprintln!("  the client saw: {how}");
    ensure!(metric(&n1, "chatstream_write_stall_disconnects_total").await? >= 1.0);
    alice.still_serves().await?;
    Ok(())
}

/// A WebSocket connection made by hand, whose frames are read raw: it never answers a
/// ping (a library client queues pongs and may fail writing them before it reads the
/// close frame).
async fn raw_ws(node: &Node, user: &str) -> Result<TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(&node.addr).await?;
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(user, 600),
        node.addr
    );
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    Ok(s)
}

/// Reads raw server frames until a close frame (its code), the end of the stream or
/// `within`; counts the pings seen on the way.
async fn raw_close_code(s: &mut TcpStream, within: Duration) -> Result<(Option<u16>, usize)> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut pings = 0;
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).await.is_err() {
                return Ok::<_, anyhow::Error>((None, pings));
            }
            let opcode = h[0] & 0x0f;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    s.read_exact(&mut l).await?;
                    u64::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    s.read_exact(&mut l).await?;
                    u64::from_be_bytes(l)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).await?;
            match opcode {
                0x8 if payload.len() >= 2 => {
                    return Ok((Some(u16::from_be_bytes([payload[0], payload[1]])), pings))
                }
                0x8 => return Ok((Some(1005), pings)),
                0x9 => pings += 1,
                _ => {}
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| anyhow!("no close within {within:?}"))?
}

/// The node pings every connection; one that answers nothing (no frame, no pong) is closed
/// with 4409 after the idle timeout, one that reads (and so answers pings) stays.
async fn silent_connections_are_closed_after_the_idle_timeout(stack: &mut Stack) -> Result<()> {
    let config = node_config("idle", "ping_interval_ms: 300\nidle_timeout_ms: 1500\n")?;
    let n1 = Node::start(stack, "idle-1", &["--config", &config]).await?;
    let mut silent = raw_ws(&n1, "alice").await?;
    let mut alive = Client::connect(&n1, "bob").await?;
    // `alive` reads for 3 s (its client library answers the pings); `silent` does nothing.
    let mut pings = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match tokio::time::timeout(until - Instant::now(), alive.ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(cf)))) => bail!("the reading client was closed: {cf:?}"),
            Ok(Some(Err(e))) => bail!("the reading client: {e}"),
            Ok(_) | Err(_) => {}
        }
    }
    ensure!(pings >= 3, "{pings} pings in 3 s at a 300 ms interval");
    alive.still_serves().await?;
    let (code, silent_pings) = raw_close_code(&mut silent, Duration::from_secs(5)).await?;
    eprintln!("  the silent client got {silent_pings} pings, then close {code:?}");
    ensure!(code == Some(4409), "the silent client: close {code:?}");
    ensure!(metric(&n1, "chatstream_idle_disconnects_total").await? >= 1.0);
    Ok(())
}

/// A client that keeps exceeding its rate limit for seconds is closed with 1008; a single
/// burst (`bad_input_gets_error_frames_and_the_connection_stays`) is not.
async fn a_client_that_keeps_exceeding_its_rate_limit_is_closed_with_1008(
    stack: &mut Stack,
) -> Result<()> {
    let config = node_config(
        "rate-abuse",
        "rate_limit_per_s: 20\nrate_limit_burst: 20\nrate_limit_close_after_ms: 1500\n",
    )?;
    let n1 = Node::start(stack, "abuse-1", &["--config", &config]).await?;
    let mut c = Client::connect(&n1, "mallory").await?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let ending = loop {
        if started.elapsed() > Duration::from_secs(8) {
            break Ending::Open;
        }
        tokio::select! {
            _ = tick.tick() => {
                if c.send(&ClientFrame::Ping { nonce: None }).await.is_err() {
                    break read_to_the_end(&mut c, Duration::from_secs(5)).await.1;
                }
            }
            m = c.ws.next() => match m {
                Some(Ok(Message::Close(cf))) => {
                    break Ending::Closed(cf.map(|f| u16::from(f.code)).unwrap_or(1005))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Ending::Dropped(e.to_string()),
                None => break Ending::Dropped("end of stream".into()),
            }
        }
    };
    eprintln!(
        "  flooding at 100 frames/s: {ending:?} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    ensure!(matches!(ending, Ending::Closed(1008)), "{ending:?}");
    ensure!(metric(&n1, "chatstream_rate_limit_disconnects_total").await? >= 1.0);
    Ok(())
}

/// Error frames are capped per connection per second: 200 malformed frames at once get at
/// most a second's worth of errors (the rest are counted), and the connection serves on.
async fn error_frames_are_capped_per_connection_per_second(stack: &mut Stack) -> Result<()> {
    let config = node_config(
        "error-cap",
        "rate_limit_per_s: 10000\nrate_limit_burst: 10000\nmax_error_frames_per_s: 10\n",
    )?;
    let n1 = Node::start(stack, "errcap-1", &["--config", &config]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    let started = Instant::now();
    for _ in 0..200 {
        c.send_raw(Message::text("{not json")).await?;
    }
    c.send(&ClientFrame::Ping { nonce: Some(1) }).await?;
    let mut errors = 0;
    loop {
        match c.recv().await? {
            ServerFrame::Error { .. } => errors += 1,
            ServerFrame::Pong { nonce: Some(1), .. } => break,
            _ => {}
        }
    }
    let windows = started.elapsed().as_secs() as usize + 1;
    eprintln!("  200 malformed frames: {errors} error frames in {windows} s window(s)");
    ensure!(
        (1..=10 * (windows + 1)).contains(&errors),
        "{errors} error frames for 200 malformed ones"
    );
    ensure!(metric(&n1, "chatstream_error_frames_suppressed_total").await? >= 150.0);
    // A new second, a new budget.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send_raw(Message::text("{still not json")).await?;
    c.expect_error(ErrorCode::MalformedFrame).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Events of acknowledged actions (issue #10 item 6), NUL characters (item 7), Kafka
// fan-out readiness (item 9), streams whose generator dies (item 10).

/// Every event of `topic` about conversation `conv` or session `session`.
async fn events_about(
    bootstrap: &str,
    topic: &str,
    key: &str,
) -> Result<Vec<chatstream_protocol::EventEnvelope>> {
    Ok(read_events(bootstrap, topic)
        .await?
        .into_iter()
        .filter(|e| {
            e.conversation_id.as_deref() == Some(key) || e.session_id.as_deref() == Some(key)
        })
        .collect())
}

/// Waits for the reader's own READ status: the acknowledgement of its `read`.
async fn read_acked(c: &mut Client, conv: &str, seq: i64) -> Result<()> {
    let me = c.user.clone();
    c.until(|f| {
        matches!(f, ServerFrame::Status { status: MessageStatus::Read, user_id, conversation_id, seq: s, .. }
            if *user_id == me && conversation_id == conv && *s == seq)
        .then_some(())
    })
    .await
    .context("the read was not acknowledged (no READ status of the reader's own)")
}

async fn acknowledged_actions_keep_their_events_through_kill_9(stack: &mut Stack) -> Result<()> {
    // The node publishes nothing itself: what reaches Kafka was durable when it died.
    let mut a = Node::start(stack, &unique("ack-a"), &["--no-relay"]).await?;
    let conv = unique("conv");
    create_conversation(&a, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&a, "alice").await?;
    let (_, message_id, seq, _) = alice
        .send_for_ack(&conv, "k9-send", "acknowledged, then the node dies")
        .await?;
    alice
        .send(&ClientFrame::Read {
            conversation_id: conv.clone(),
            up_to_seq: seq,
        })
        .await?;
    read_acked(&mut alice, &conv, seq).await?;
    alice
        .send(&ClientFrame::Stream {
            conversation_id: conv.clone(),
            prompt: "started, then the node dies".into(),
        })
        .await?;
    let session = alice
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    eprintln!("  kill -9 {} right after the acks", a.id);
    a.kill9();
    let _b = Node::start(stack, &unique("ack-b"), &[]).await?;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    eventually(
        "the send, the read and the stream start are on Kafka",
        Duration::from_secs(30),
        || async {
            let chat = chat_event_ids(&bootstrap).await?;
            ensure!(
                chat.contains_key(&message_id),
                "CHAT_MESSAGE {message_id} missing"
            );
            let read = events_about(&bootstrap, "message-status-events", &conv)
                .await?
                .into_iter()
                .any(|e| {
                    matches!(&e.body, EventBody::MessageStatus(s)
                    if s.status == MessageStatus::Read && s.user_id == "alice" && s.seq == seq)
                });
            ensure!(read, "READ by alice up to {seq} in {conv} missing");
            let started = events_about(&bootstrap, "stream-events", &session)
                .await?
                .into_iter()
                .any(|e| matches!(e.body, EventBody::SessionStarted(_)));
            ensure!(started, "SESSION_STARTED of {session} missing");
            Ok(())
        },
    )
    .await
}

async fn sigterm_publishes_every_event_before_the_node_exits(stack: &mut Stack) -> Result<()> {
    let id = unique("flush");
    let mut n = Node::start(stack, &id, &[]).await?;
    let conv = unique("conv");
    create_conversation(&n, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n, "alice").await?;
    let mut bob = Client::connect(&n, "bob").await?;
    let mut message_ids = BTreeSet::new();
    for i in 0..20 {
        let (_, id, _, _) = alice
            .send_for_ack(&conv, &format!("flush-{i}"), "published before exit")
            .await?;
        message_ids.insert(id);
    }
    // Bob gets each one live, so a DELIVERED event is due for each (the fast path).
    let mut live = 0;
    while live < 20 {
        if let ServerFrame::Msg { via: Via::Live, .. } = bob.recv().await? {
            live += 1;
        }
    }
    bob.send(&ClientFrame::Read {
        conversation_id: conv.clone(),
        up_to_seq: 20,
    })
    .await?;
    // Frames are handled in order: the pong means the read was handled.
    bob.still_serves().await?;
    alice
        .send(&ClientFrame::Stream {
            conversation_id: conv.clone(),
            prompt: "generated while the node drains".into(),
        })
        .await?;
    let session = alice
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(n.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = wait_exit(&mut n.child, Duration::from_secs(60)).await?;
    ensure!(status.success(), "node exited with {status}");
    // No other node runs: what is on Kafka now, the draining node published itself.
    let pool = pg(stack).await?;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at_ms IS NULL AND node_id = $1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await?;
    ensure!(
        pending == 0,
        "{pending} outbox rows of {id} left unpublished"
    );
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let chat = chat_event_ids(&bootstrap).await?;
    let missing = message_ids
        .iter()
        .filter(|m| !chat.contains_key(*m))
        .count();
    ensure!(missing == 0, "{missing} CHAT_MESSAGE events missing");
    let statuses = events_about(&bootstrap, "message-status-events", &conv).await?;
    let delivered: BTreeSet<String> = statuses
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::MessageStatus(s)
                if s.status == MessageStatus::Delivered && s.user_id == "bob" =>
            {
                s.message_id.clone()
            }
            _ => None,
        })
        .collect();
    ensure!(
        delivered == message_ids,
        "DELIVERED to bob for {} of {} messages",
        delivered.len(),
        message_ids.len()
    );
    ensure!(
        statuses
            .iter()
            .any(|e| matches!(&e.body, EventBody::MessageStatus(s)
            if s.status == MessageStatus::Read && s.user_id == "bob" && s.seq == 20)),
        "READ by bob missing"
    );
    let stream = events_about(&bootstrap, "stream-events", &session).await?;
    let planned = stream
        .iter()
        .find_map(|e| match &e.body {
            EventBody::SessionStarted(s) => Some(s.planned_chunks),
            _ => None,
        })
        .ok_or_else(|| anyhow!("SESSION_STARTED of {session} missing"))?;
    let chunks: BTreeSet<i64> = stream
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ChunkReceived(c) => Some(c.chunk_index),
            _ => None,
        })
        .collect();
    ensure!(
        chunks == (0..planned).collect::<BTreeSet<_>>(),
        "CHUNK_RECEIVED for {chunks:?} of {planned} chunks"
    );
    ensure!(
        stream
            .iter()
            .any(|e| matches!(e.body, EventBody::StreamCompleted(_))),
        "the stream generated during the drain has no STREAM_COMPLETED"
    );
    Ok(())
}

async fn nul_characters_are_refused_as_invalid_arguments(stack: &mut Stack) -> Result<()> {
    let n = Node::start(stack, "nul-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n, "alice").await?;
    let refused = alice
        .send_msg(&conv, "nul-body", "before\u{0}after")
        .await
        .err()
        .ok_or_else(|| anyhow!("a body with a NUL character was acknowledged"))?;
    ensure!(
        refused.to_string().starts_with("InvalidArgument") && refused.to_string().contains("body"),
        "{refused}"
    );
    alice
        .send(&ClientFrame::Stream {
            conversation_id: conv.clone(),
            prompt: "nul\u{0}".into(),
        })
        .await?;
    let msg = alice.expect_error(ErrorCode::InvalidArgument).await?;
    ensure!(msg.contains("prompt"), "{msg}");
    alice
        .send(&ClientFrame::Resume {
            session_id: "s\u{0}".into(),
            after_index: -1,
        })
        .await?;
    alice.expect_error(ErrorCode::InvalidArgument).await?;
    alice.still_serves().await?;
    let (seq, _) = alice.send_msg(&conv, "nul-clean", "a clean one").await?;
    ensure!(
        seq == 1,
        "the refused send took a seq: the clean one got {seq}"
    );
    for (path, body) in [
        (
            "/api/conversations".to_string(),
            serde_json::json!({ "id": "c\u{0}", "members": ["alice"] }),
        ),
        (
            format!("/api/conversations/{conv}/members"),
            serde_json::json!({ "add": ["bob\u{0}"] }),
        ),
        (
            "/api/chat".to_string(),
            serde_json::json!({ "conversation_id": conv, "prompt": "p\u{0}" }),
        ),
    ] {
        let (status, answer) = post_json(&n, &path, "alice", body).await?;
        ensure!(
            status == 400 && answer["code"] == "invalid_argument",
            "{path}: {status} {answer}"
        );
    }
    Ok(())
}

async fn kafka_fanout_is_ready_only_once_its_consumer_is_assigned(stack: &mut Stack) -> Result<()> {
    let e = stack.endpoints();
    let sender = Node::start(stack, &unique("kf-send"), &["--fanout-mode", "kafka"]).await?;
    let id = unique("kf-held");
    // A member of the node's group takes every partition, then stops polling: the group
    // cannot rebalance, so the node's consumer gets nothing until this member leaves.
    let (b, group) = (e.kafka_bootstrap.clone(), format!("chatstream-fanout-{id}"));
    let holder = tokio::task::spawn_blocking(move || -> Result<BaseConsumer> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        c.subscribe(&["chat-events"])?;
        let start = Instant::now();
        while c.assignment()?.count() == 0 {
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "holder not assigned"
            );
            let _ = c.poll(Duration::from_millis(200));
        }
        Ok(c)
    })
    .await??;
    let mut args = strings(&["node", "--node-id", &id, "--listen", "127.0.0.1:0"]);
    args.extend(strings(&[
        "--postgres-url",
        &e.postgres_url,
        "--redis-url",
        &e.redis_url,
        "--kafka-bootstrap",
        &e.kafka_bootstrap,
        "--token-secret",
        SECRET,
        "--fanout-mode",
        "kafka",
    ]));
    let (child, addr) = spawn_chatstream_logging(args, &id, DEFAULT_LOG_FILTER).await?;
    let node = Node {
        child,
        addr,
        id: id.clone(),
    };
    eventually(
        "every backend up, the fan-out consumer not assigned, /readyz red",
        Duration::from_secs(60),
        || async {
            let (code, body) = node.readyz().await?;
            ensure!(
                ["postgres", "migrated", "redis", "kafka", "outbox_relay"]
                    .iter()
                    .all(|k| body[*k] == true),
                "{code} {body}"
            );
            ensure!(
                code == 503 && body["fanout_assigned"] == false,
                "{code} {body}"
            );
            Ok(())
        },
    )
    .await?;
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(3) {
        let (code, body) = node.readyz().await?;
        ensure!(
            code == 503 && body["fanout_assigned"] == false,
            "ready while another member still holds the partitions: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The holder leaves (close: revoke, LeaveGroup): the node's consumer is assigned.
    tokio::task::spawn_blocking(move || drop(holder)).await?;
    let green = Instant::now();
    loop {
        let (code, body) = node.readyz().await?;
        if code == 200 {
            ensure!(body["fanout_assigned"] == true, "{body}");
            break;
        }
        ensure!(
            green.elapsed() < Duration::from_secs(60),
            "not ready after the holder left: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "  ready {:.1} s after the holder left",
        green.elapsed().as_secs_f64()
    );
    // Right after green, no wait: a message sent now reaches bob through Kafka.
    let conv = unique("conv");
    let mut bob = Client::connect(&node, "bob").await?;
    create_conversation(&sender, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&sender, "alice").await?;
    let (seq, _) = alice
        .send_msg(&conv, "kf-green", "right after green")
        .await?;
    bob.until(|f| {
        matches!(f, ServerFrame::Msg { seq: s, via: Via::Live, conversation_id, .. }
            if *s == seq && *conversation_id == conv)
        .then_some(())
    })
    .await
    .context("the message sent right after /readyz turned green was not delivered")?;
    Ok(())
}

async fn stream_whose_generator_is_killed_completes_on_another_node(
    stack: &mut Stack,
) -> Result<()> {
    // 30 chunks at 100 ms on the generating node; the other node's own settings differ
    // (20 chunks): the stream must still end as it was started.
    let config = node_config("takeover-stream", "stream:\n  chunks: 30\n  pace_ms: 100\n")?;
    let mut n1 = Node::start(stack, &unique("gen-1"), &["--config", &config]).await?;
    let n2 = Node::start(stack, &unique("gen-2"), &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv.clone(),
        prompt: "outlive your generator".into(),
    })
    .await?;
    let session = c
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    let mut seen: Vec<i64> = Vec::new();
    while seen.len() < 5 {
        if let ServerFrame::Chunk { index, .. } = c.recv().await? {
            seen.push(index);
        }
    }
    eprintln!(
        "  kill -9 {} (the generating node) after chunk {}",
        n1.id, seen[4]
    );
    n1.kill9();
    drop(c);
    let mut c2 = Client::connect(&n2, "alice").await?;
    c2.send(&ClientFrame::Resume {
        session_id: session.clone(),
        after_index: seen[seen.len() - 1],
    })
    .await?;
    let total = loop {
        match c2.recv().await? {
            ServerFrame::Chunk { index, .. } => seen.push(index),
            ServerFrame::StreamEnd {
                outcome: StreamOutcome::Completed,
                total_chunks,
                ..
            } => break total_chunks,
            ServerFrame::StreamEnd { outcome, error, .. } => {
                bail!("stream ended {outcome:?}: {error:?}")
            }
            ServerFrame::Error { code, message, .. } => bail!("resume failed: {code:?}: {message}"),
            _ => {}
        }
    };
    ensure!(total == 30, "ended with {total} chunks, started with 30");
    ensure!(
        seen == (0..total).collect::<Vec<_>>(),
        "chunk indices seen {seen:?}, expected each of 0..{total} once"
    );
    ensure!(
        metric(&n2, "chatstream_stream_takeovers_total").await? >= 1.0,
        "{} did not take the stream over",
        n2.id
    );
    let types = session_events(&stack.endpoints().kafka_bootstrap, &session, |t| {
        t.iter().any(|x| x == "STREAM_COMPLETED")
    })
    .await?;
    ensure!(
        types.iter().filter(|t| *t == "STREAM_COMPLETED").count() == 1,
        "timeline {types:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Group commit of sends (issue #11 item 2): many connections of two nodes send at once to
// shared and separate conversations, with retries of the same client_msg_id mixed in.

/// One acknowledgement a connection got: (conversation, client_msg_id, message_id, seq,
/// duplicate).
type AckSeen = (String, String, String, i64, bool);

/// Reads acks (and live messages of the conversations in `live_of`) until `acks` acks
/// have come or nothing comes for 15 s. Fails on an error frame.
async fn collect_acks(
    c: &mut Client,
    acks: usize,
    live: &mut Vec<(String, i64)>,
) -> Result<Vec<AckSeen>> {
    let mut got = Vec::with_capacity(acks);
    while got.len() < acks {
        let frame = tokio::time::timeout(Duration::from_secs(15), c.recv())
            .await
            .map_err(|_| anyhow!("{}: {} of {acks} acks, then silence", c.user, got.len()))??;
        match frame {
            ServerFrame::Ack {
                conversation_id,
                client_msg_id,
                message_id,
                seq,
                duplicate,
                ..
            } => got.push((conversation_id, client_msg_id, message_id, seq, duplicate)),
            ServerFrame::Msg {
                conversation_id,
                seq,
                via: Via::Live,
                ..
            } => live.push((conversation_id, seq)),
            ServerFrame::Error { code, message, .. } => bail!("{}: {code:?}: {message}", c.user),
            _ => {}
        }
    }
    Ok(got)
}

/// Live messages of each conversation came in strictly increasing seqs.
fn live_in_order(who: &str, live: &[(String, i64)]) -> Result<()> {
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (conv, seq) in live {
        let prev = last.insert(conv.as_str(), *seq).unwrap_or(0);
        ensure!(*seq > prev, "{who}: live seq {seq} of {conv} after {prev}");
    }
    Ok(())
}

async fn concurrent_sends_with_retries(stack: &mut Stack, batching: &str) -> Result<()> {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("group-{batching}.yaml"));
    std::fs::write(
        &config,
        format!("rate_limit_per_s: 100000\nrate_limit_burst: 100000\nsend_batching: {batching}\n"),
    )?;
    let config = config.display().to_string();
    let n1 = Node::start(stack, &unique("group-1"), &["--config", &config]).await?;
    let n2 = Node::start(stack, &unique("group-2"), &["--config", &config]).await?;
    let nodes = [&n1, &n2];
    // Four senders; a shared conversation of all four, two of pairs, one each alone; a
    // watcher (member of every conversation, sending nothing) on each node.
    let users = ["gs-0", "gs-1", "gs-2", "gs-3"];
    let shared_conv = unique("gc-all");
    let pair_a = unique("gc-01");
    let pair_b = unique("gc-23");
    let solo: Vec<String> = users.iter().map(|u| unique(&format!("gc-{u}"))).collect();
    let mut all_members: Vec<&str> = users.to_vec();
    all_members.push("gw");
    create_conversation(&n1, "gs-0", &shared_conv, &all_members).await?;
    create_conversation(&n1, "gs-0", &pair_a, &["gs-0", "gs-1", "gw"]).await?;
    create_conversation(&n2, "gs-2", &pair_b, &["gs-2", "gs-3", "gw"]).await?;
    for (u, conv) in users.iter().zip(&solo) {
        create_conversation(&n1, u, conv, &[u, "gw"]).await?;
    }
    let mut watchers = vec![
        Client::connect(&n1, "gw").await?,
        Client::connect(&n2, "gw").await?,
    ];
    // Each sender pipelines its sends (nothing awaited in between) over its conversations;
    // every 4th send repeats one of its own earlier keys (sometimes the one just sent, so
    // both can fall in one batch), and a second connection of the same user on the other
    // node repeats keys of its own set ("x-") at the same time.
    const SENDS: usize = 150;
    let mut tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let convs: Vec<String> = match i {
            0 | 1 => vec![shared_conv.clone(), pair_a.clone(), solo[i].clone()],
            _ => vec![shared_conv.clone(), pair_b.clone(), solo[i].clone()],
        };
        let home = Client::connect(nodes[i % 2], user).await?;
        let away = Client::connect(nodes[(i + 1) % 2], user).await?;
        let user = user.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut home, mut away) = (home, away);
            // (conversation, key) in the order this connection first sent them.
            let mut order: Vec<(String, String)> = Vec::new();
            let mut frames = Vec::new();
            for n in 0..SENDS {
                let conv = &convs[n % convs.len()];
                let (conv, key) = if n % 4 == 3 {
                    let back = if n % 8 == 3 { 1 } else { 1 + n % 5 };
                    order[order.len() - back.min(order.len())].clone()
                } else {
                    let key = format!("{user}-k{n}");
                    order.push((conv.clone(), key.clone()));
                    (conv.clone(), key)
                };
                frames.push(ClientFrame::Send {
                    conversation_id: conv,
                    client_msg_id: key.clone(),
                    body: format!("{user} {key}"),
                });
            }
            let x_keys: Vec<(String, String)> = (0..20)
                .map(|n| (convs[n % convs.len()].clone(), format!("{user}-x{n}")))
                .collect();
            let send_x = |c: &(String, String)| ClientFrame::Send {
                conversation_id: c.0.clone(),
                client_msg_id: c.1.clone(),
                body: format!("{user} {}", c.1),
            };
            // Interleaved: the x- keys go out on both connections around the same time.
            for (n, f) in frames.iter().enumerate() {
                home.send(f).await?;
                if n % 7 == 0 {
                    let x = &x_keys[(n / 7) % x_keys.len()];
                    home.send(&send_x(x)).await?;
                    away.send(&send_x(x)).await?;
                }
            }
            let home_sent = frames.len() + SENDS.div_ceil(7);
            let away_sent = SENDS.div_ceil(7);
            let mut live = Vec::new();
            let home_acks = collect_acks(&mut home, home_sent, &mut live).await?;
            live_in_order(&format!("{user} (sending)"), &live)?;
            live.clear();
            let away_acks = collect_acks(&mut away, away_sent, &mut live).await?;
            live_in_order(&format!("{user} (retrying)"), &live)?;
            Ok::<_, anyhow::Error>((user, order, home_acks, away_acks))
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    // Every ack of a key names one message; exactly one of them is not a duplicate.
    // (user, conversation, client_msg_id) → every ack's (message id, seq, duplicate).
    type AcksByKey = HashMap<(String, String, String), Vec<(String, i64, bool)>>;
    let mut by_key: AcksByKey = HashMap::new();
    for (user, _, home, away) in &results {
        for (conv, key, id, seq, dup) in home.iter().chain(away) {
            by_key
                .entry((user.clone(), conv.clone(), key.clone()))
                .or_default()
                .push((id.clone(), *seq, *dup));
        }
    }
    for ((user, conv, key), acks) in &by_key {
        let firsts = acks.iter().filter(|a| !a.2).count();
        ensure!(
            firsts == 1,
            "{user} {conv} {key}: {firsts} acks not flagged duplicate: {acks:?}"
        );
        ensure!(
            acks.iter().all(|a| a.0 == acks[0].0 && a.1 == acks[0].1),
            "{user} {conv} {key}: acks name different messages: {acks:?}"
        );
    }
    // A connection's acks of a conversation come in seq order, and its own first sends of
    // a conversation got increasing seqs in the order it sent them.
    for (user, order, home, _) in &results {
        let mut last: HashMap<&str, i64> = HashMap::new();
        for (conv, key, _, seq, dup) in home {
            if *dup || key.contains("-x") {
                continue;
            }
            let prev = last.insert(conv.as_str(), *seq).unwrap_or(0);
            ensure!(
                *seq > prev,
                "{user}: ack of {key} in {conv} has seq {seq} after {prev}"
            );
        }
        let seq_of: HashMap<(&str, &str), i64> = home
            .iter()
            .map(|(c, k, _, s, _)| ((c.as_str(), k.as_str()), *s))
            .collect();
        let mut last: HashMap<&str, i64> = HashMap::new();
        for (conv, key) in order {
            let seq = seq_of
                .get(&(conv.as_str(), key.as_str()))
                .copied()
                .ok_or_else(|| anyhow!("{user}: no ack for {key}"))?;
            let prev = last.insert(conv.as_str(), seq).unwrap_or(0);
            ensure!(
                seq > prev,
                "{user}: {key} in {conv} stored out of send order"
            );
        }
    }
    // Stored once each, seqs dense 1..n per conversation, the acked ids.
    let pool = pg(stack).await?;
    let mut convs: Vec<&String> = vec![&shared_conv, &pair_a, &pair_b];
    convs.extend(&solo);
    let mut stored_total = 0;
    for conv in &convs {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT sender_id, client_msg_id, id, seq FROM messages WHERE conversation_id = $1 ORDER BY seq",
        )
        .bind(conv.as_str())
        .fetch_all(&pool)
        .await?;
        let seqs: Vec<i64> = rows.iter().map(|r| r.3).collect();
        ensure!(
            seqs == (1..=rows.len() as i64).collect::<Vec<_>>(),
            "{conv}: seqs not dense: {seqs:?}"
        );
        let keys: HashSet<(&str, &str)> =
            rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
        ensure!(keys.len() == rows.len(), "{conv}: a key stored twice");
        for (sender, key, id, seq) in &rows {
            let acks = by_key
                .get(&(sender.clone(), conv.to_string(), key.clone()))
                .ok_or_else(|| anyhow!("{conv}: {sender} {key} stored, never acked"))?;
            ensure!(
                acks[0].0 == *id && acks[0].1 == *seq,
                "{conv}: {key} stored as {id}/{seq}, acked as {acks:?}"
            );
        }
        let last_seq: i64 = sqlx::query_scalar("SELECT last_seq FROM conversations WHERE id = $1")
            .bind(conv.as_str())
            .fetch_one(&pool)
            .await?;
        ensure!(
            last_seq == rows.len() as i64,
            "{conv}: last_seq {last_seq}, {} stored",
            rows.len()
        );
        stored_total += rows.len();
    }
    ensure!(
        stored_total == by_key.len(),
        "{stored_total} stored, {} keys acked",
        by_key.len()
    );
    // Each watcher gets every conversation's live messages in strictly increasing seqs.
    // (Not necessarily all of them: two nodes publish one conversation's messages
    // concurrently, and a node refuses a live frame older than one it passed; the client
    // fills such a gap with sync.)
    let mut live_total = 0;
    for w in &mut watchers {
        let mut live = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(3), w.recv()).await {
                Ok(Ok(ServerFrame::Msg {
                    conversation_id,
                    seq,
                    via: Via::Live,
                    ..
                })) => live.push((conversation_id, seq)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
        live_in_order("watcher", &live)?;
        let convs_seen: HashSet<&str> = live.iter().map(|l| l.0.as_str()).collect();
        ensure!(
            convs_seen.len() == convs.len(),
            "a watcher got live messages of {} of {} conversations",
            convs_seen.len(),
            convs.len()
        );
        live_total += live.len();
    }
    eprintln!(
        "  send_batching {batching}: {} keys, {stored_total} stored once each, dense seqs, duplicates answered with the first id, live order held ({live_total} live frames to the two watchers)",
        by_key.len()
    );
    Ok(())
}

async fn concurrent_sends_with_retries_batched(stack: &mut Stack) -> Result<()> {
    concurrent_sends_with_retries(stack, "on").await
}

async fn concurrent_sends_with_retries_unbatched(stack: &mut Stack) -> Result<()> {
    concurrent_sends_with_retries(stack, "off").await
}

/// The relays of a cluster share the outbox shards: each keeps to its fair share (16 over
/// the running relays, rounded up), the shards a stopped relay held are taken by the
/// others, and a relay that starts gets shards given back to it.
async fn relays_share_the_outbox_shards(stack: &mut Stack) -> Result<()> {
    use chatstream_store::{RelayClaim, Store, OUTBOX_SHARDS};
    let store = Store::connect_lazy(&stack.endpoints().postgres_url, 2, "chatstream-test")?;
    store.migrate().await?;
    let held = |claims: &[&RelayClaim]| -> Result<Vec<usize>> {
        let mut all: Vec<i32> = claims.iter().flat_map(|c| c.owned().to_vec()).collect();
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        ensure!(all.len() == total, "a shard is held twice: {all:?}");
        Ok(claims.iter().map(|c| c.owned().len()).collect())
    };
    let (mut a, mut b, mut c) = (
        RelayClaim::new(&store),
        RelayClaim::new(&store),
        RelayClaim::new(&store),
    );
    // The first relay alone takes every shard.
    a.claim().await?;
    ensure!(
        held(&[&a])? == [OUTBOX_SHARDS as usize],
        "alone: {:?}",
        a.owned()
    );
    // Two more start: the first gives back what is over its share (at its next claim),
    // the others take it.
    b.claim().await?;
    c.claim().await?;
    for _ in 0..2 {
        for claim in [&mut a, &mut b, &mut c] {
            claim.claim().await?;
        }
    }
    let shares = held(&[&a, &b, &c])?;
    ensure!(
        shares.iter().sum::<usize>() == OUTBOX_SHARDS as usize
            && shares.iter().all(|n| (4..=6).contains(n)),
        "three relays hold {shares:?}"
    );
    // One stops: the other two take its shards.
    c.release().await;
    for _ in 0..2 {
        for claim in [&mut a, &mut b] {
            claim.claim().await?;
        }
    }
    let shares = held(&[&a, &b])?;
    ensure!(shares == [8, 8], "two relays hold {shares:?}");
    a.release().await;
    b.release().await;
    Ok(())
}

fn main() {
    let shared = SharedStack::new(
        "CHATSTREAM_TEST_BASE_PORT",
        29700,
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chatstream-stack-nodes"),
    );
    let trials = vec![
        stack_test!(
            shared,
            "node::clients_on_different_nodes_exchange_messages",
            clients_on_different_nodes_exchange_messages
        ),
        stack_test!(
            shared,
            "node::retried_send_is_stored_once",
            retried_send_is_stored_once
        ),
        stack_test!(
            shared,
            "node::sync_returns_what_a_client_missed",
            sync_returns_what_a_client_missed
        ),
        stack_test!(
            shared,
            "node::non_members_can_neither_send_nor_read",
            non_members_can_neither_send_nor_read
        ),
        stack_test!(
            shared,
            "node::unannounced_membership_change_reaches_live_delivery_within_the_ttl",
            unannounced_membership_change_reaches_live_delivery_within_the_ttl
        ),
        stack_test!(
            shared,
            "node::bad_input_gets_error_frames_and_the_connection_stays",
            bad_input_gets_error_frames_and_the_connection_stays
        ),
        stack_test!(
            shared,
            "node::bad_tokens_close_with_a_reason",
            bad_tokens_close_with_a_reason
        ),
        stack_test!(
            shared,
            "node::idle_pooled_connections_postgres_closed_are_replaced",
            idle_pooled_connections_postgres_closed_are_replaced
        ),
        stack_test!(
            shared,
            "node::relay_killed_mid_batch_is_taken_over_in_key_order",
            relay_killed_mid_batch_is_taken_over_in_key_order
        ),
        stack_test!(
            shared,
            "node::relays_share_the_outbox_shards",
            relays_share_the_outbox_shards
        ),
        stack_test!(
            shared,
            "node::stream_resumed_on_another_node_delivers_every_chunk",
            stream_resumed_on_another_node_delivers_every_chunk
        ),
        stack_test!(
            shared,
            "node::readyz_follows_redis_and_the_node_recovers",
            readyz_follows_redis_and_the_node_recovers
        ),
        stack_test!(
            shared,
            "node::failing_stream_ends_failed_with_stream_error",
            failing_stream_ends_failed_with_stream_error
        ),
        stack_test!(
            shared,
            "node::kafka_fanout_mode_delivers_across_nodes",
            kafka_fanout_mode_delivers_across_nodes
        ),
        stack_test!(
            shared,
            "node::async_mode_publishes_without_the_outbox",
            async_mode_publishes_without_the_outbox
        ),
        stack_test!(
            shared,
            "node::kafka_outage_is_reported_and_the_outbox_catches_up",
            kafka_outage_is_reported_and_the_outbox_catches_up
        ),
        stack_test!(
            shared,
            "node::postgres_outage_gives_unavailable_and_recovers",
            postgres_outage_gives_unavailable_and_recovers
        ),
        stack_test!(
            shared,
            "node::a_membership_read_lost_to_a_black_hole_is_refused_and_the_loader_goes_on",
            a_membership_read_lost_to_a_black_hole_is_refused_and_the_loader_goes_on
        ),
        stack_test!(
            shared,
            "node::sigterm_drains_connections",
            sigterm_drains_connections
        ),
        stack_test!(
            shared,
            "node::redis_refused_for_4s_sends_stay_fast_and_every_path_recovers",
            redis_refused_for_4s_sends_stay_fast_and_every_path_recovers
        ),
        stack_test!(
            shared,
            "node::redis_black_hole_for_6s_sends_stay_fast_and_every_path_recovers",
            redis_black_hole_for_6s_sends_stay_fast_and_every_path_recovers
        ),
        stack_test!(
            shared,
            "node::identities_are_scoped_by_conversation_and_tenant",
            identities_are_scoped_by_conversation_and_tenant
        ),
        stack_test!(
            shared,
            "node::only_members_change_membership",
            only_members_change_membership
        ),
        stack_test!(
            shared,
            "node::live_messages_arrive_in_seq_order",
            live_messages_arrive_in_seq_order
        ),
        stack_test!(
            shared,
            "node::publish_mode_none_keeps_kafka_off_every_path",
            publish_mode_none_keeps_kafka_off_every_path
        ),
        stack_test!(
            shared,
            "node::accepted_sockets_have_tcp_nodelay",
            accepted_sockets_have_tcp_nodelay
        ),
        stack_test!(
            shared,
            "node::a_client_too_slow_to_read_is_closed_with_4408",
            a_client_too_slow_to_read_is_closed_with_4408
        ),
        stack_test!(
            shared,
            "node::a_stalled_socket_is_dropped_after_the_write_stall_timeout",
            a_stalled_socket_is_dropped_after_the_write_stall_timeout
        ),
        stack_test!(
            shared,
            "node::silent_connections_are_closed_after_the_idle_timeout",
            silent_connections_are_closed_after_the_idle_timeout
        ),
        stack_test!(
            shared,
            "node::a_client_that_keeps_exceeding_its_rate_limit_is_closed_with_1008",
            a_client_that_keeps_exceeding_its_rate_limit_is_closed_with_1008
        ),
        stack_test!(
            shared,
            "node::error_frames_are_capped_per_connection_per_second",
            error_frames_are_capped_per_connection_per_second
        ),
        stack_test!(
            shared,
            "node::acknowledged_actions_keep_their_events_through_kill_9",
            acknowledged_actions_keep_their_events_through_kill_9
        ),
        stack_test!(
            shared,
            "node::sigterm_publishes_every_event_before_the_node_exits",
            sigterm_publishes_every_event_before_the_node_exits
        ),
        stack_test!(
            shared,
            "node::nul_characters_are_refused_as_invalid_arguments",
            nul_characters_are_refused_as_invalid_arguments
        ),
        stack_test!(
            shared,
            "node::kafka_fanout_is_ready_only_once_its_consumer_is_assigned",
            kafka_fanout_is_ready_only_once_its_consumer_is_assigned
        ),
        stack_test!(
            shared,
            "node::stream_whose_generator_is_killed_completes_on_another_node",
            stream_whose_generator_is_killed_completes_on_another_node
        ),
        stack_test!(
            shared,
            "node::concurrent_sends_with_retries_batched",
            concurrent_sends_with_retries_batched
        ),
        stack_test!(
            shared,
            "node::concurrent_sends_with_retries_unbatched",
            concurrent_sends_with_retries_unbatched
        ),
    ];
    shared.run(trials)
}
