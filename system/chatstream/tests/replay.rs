//! Replay and lag on the real stack (three Kafka brokers, Redis, PostgreSQL, Toxiproxy):
//! `chatstream_replay` and `chatstream replay/lag` against real topics and groups. One stack for the binary
//! (libtest-mimic, tests one at a time, stopped by pid at the end); processes are started
//! per test and stopped by pid. Shared helpers: `common/mod.rs`.
//! Ports: CHATSTREAM_TEST_BASE_PORT (default 29700) for the stack. CHATSTREAM_TEST_BIN
//! runs another `chatstream` binary (an older build, to see a new test fail on it).

mod common;

use anyhow::{bail, ensure, Context, Result};
use chatstream_protocol::{ClientFrame, EventBody, ServerFrame};
use common::*;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use squall_stack::testing::SharedStack;
use squall_stack::{stack_test, Stack};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

async fn replay_from_a_time_is_exact(stack: &mut Stack) -> Result<()> {
    let topic = unique("replay");
    stack
        .create_topics(&[squall_stack::topics::TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }])
        .await?;
    let p = producer(stack)?;
    // In the past (brokers refuse timestamps too far in the future), with room after T.
    let t: i64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 600_000;
    let mut expected = BTreeSet::new();
    for i in 0..300i64 {
        // Interleaved: half before T, half at or after, over every partition.
        let (key, ts) = if i % 2 == 0 {
            (format!("before-{i}"), t - 1 - i)
        } else {
            (format!("after-{i}"), t + i)
        };
        if ts >= t {
            expected.insert(key.clone());
        }
        produce(&p, &topic, &key, key.as_bytes(), Some(ts)).await?;
    }
    let b = stack.endpoints().kafka_bootstrap;
    let late_keys: BTreeSet<String> = (0..20).map(|i| format!("late-{i}")).collect();
    // Records produced after the replay fixed its end must not be returned: `read_since`
    // fixes its end before it reads, so the late records are produced (and acknowledged)
    // from its first callback, while it runs.
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let (done, done_rx) = std::sync::mpsc::channel::<Result<()>>();
    let late_producer = p.clone();
    let late_topic = topic.clone();
    let late = tokio::spawn(async move {
        if tokio::task::spawn_blocking(move || go_rx.recv())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            let mut result = Ok(());
            for i in 0..20 {
                if let Err(e) = produce(
                    &late_producer,
                    &late_topic,
                    &format!("late-{i}"),
                    b"late",
                    Some(t + 10_000 + i),
                )
                .await
                {
                    result = Err(e);
                    break;
                }
            }
            let _ = done.send(result);
        }
    });
    let (bb, tt) = (b.clone(), topic.clone());
    let (first, first_count) =
        tokio::task::spawn_blocking(move || -> Result<(Vec<String>, u64)> {
            let mut keys = Vec::new();
            let mut late_in = None;
            let count = chatstream_replay::read_since(
                &bb,
                &tt,
                t,
                Duration::from_secs(60),
                |r| {
                    if late_in.is_none() {
                        let _ = go.send(());
                        late_in = Some(
                            done_rx
                                .recv_timeout(Duration::from_secs(30))
                                .map_err(|e| anyhow::anyhow!("late records not produced: {e}"))
                                .and_then(|r| r),
                        );
                    }
                    keys.push(String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned());
                },
                |_, _| {},
            )?;
            late_in.unwrap_or_else(|| Err(anyhow::anyhow!("read_since returned nothing")))?;
            Ok((keys, count))
        })
        .await??;
    late.await?;
    // Once more, now that the late records exist: they are returned too.
    let (second, second_count) =
        tokio::task::spawn_blocking(move || -> Result<(Vec<String>, u64)> {
            let mut keys = Vec::new();
            let count = chatstream_replay::read_since(
                &b,
                &topic,
                t,
                Duration::from_secs(60),
                |r| keys.push(String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned()),
                |_, _| {},
            )?;
            Ok((keys, count))
        })
        .await??;
    let with_late: BTreeSet<String> = expected.union(&late_keys).cloned().collect();
    for (what, got, count, want) in [
        ("read_since", &first, first_count, &expected),
        (
            "read_since after the late records",
            &second,
            second_count,
            &with_late,
        ),
    ] {
        let got_set: BTreeSet<String> = got.iter().cloned().collect();
        ensure!(
            got.len() == got_set.len(),
            "{what}: {} duplicates",
            got.len() - got_set.len()
        );
        ensure!(
            count == got.len() as u64,
            "{what} says {count} records and handed over {}",
            got.len()
        );
        ensure!(
            got_set == *want,
            "{what} from T returned {} keys, expected {} (extra {:?}, missing {:?})",
            got_set.len(),
            want.len(),
            got_set.difference(want).take(3).collect::<Vec<_>>(),
            want.difference(&got_set).take(3).collect::<Vec<_>>()
        );
        eprintln!(
            "  {what}: {} keys, exactly the {} expected",
            got_set.len(),
            want.len()
        );
    }
    Ok(())
}

async fn session_timeline_matches_what_the_node_emitted(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "timeline-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv,
        prompt: "timeline please".into(),
    })
    .await?;
    let mut session = String::new();
    let mut chunks = Vec::new();
    loop {
        match c.recv().await? {
            ServerFrame::StreamStarted { session_id, .. } => session = session_id,
            ServerFrame::Chunk { index, .. } => chunks.push(index),
            ServerFrame::StreamEnd { .. } => break,
            _ => {}
        }
    }
    let b = stack.endpoints().kafka_bootstrap;
    let start = Instant::now();
    let timeline = loop {
        let (b, s) = (b.clone(), session.clone());
        let events =
            tokio::task::spawn_blocking(move || chatstream_replay::session_timeline(&b, &s))
                .await??;
        if events
            .iter()
            .any(|e| e.body.type_name() == "STREAM_COMPLETED")
            || start.elapsed() > Duration::from_secs(20)
        {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let types: Vec<&str> = timeline.iter().map(|e| e.body.type_name()).collect();
    ensure!(
        types.first() == Some(&"SESSION_STARTED") && types.last() == Some(&"STREAM_COMPLETED"),
        "timeline {types:?}"
    );
    let indices: Vec<i64> = timeline
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ChunkReceived(c) => Some(c.chunk_index),
            _ => None,
        })
        .collect();
    ensure!(
        indices == chunks,
        "timeline chunks {indices:?} but the client saw {chunks:?}"
    );
    ensure!(
        timeline.iter().all(|e| e.replayed),
        "replayed events must be marked"
    );
    Ok(())
}

async fn reset(
    stack: &Stack,
    group: &str,
) -> Result<Vec<(String, i32, i64)>, chatstream_replay::ReplayError> {
    let (b, g) = (stack.endpoints().kafka_bootstrap, group.to_string());
    tokio::task::spawn_blocking(move || {
        chatstream_replay::reset_group(
            &b,
            &g,
            &["chat-events".to_string()],
            chatstream_replay::ResetTo::Earliest,
        )
    })
    .await
    .map_err(|e| chatstream_replay::ReplayError::Invalid(e.to_string()))?
}

async fn an_active_group_cannot_be_reset(stack: &mut Stack) -> Result<()> {
    let p = producer(stack)?;
    for i in 0..10 {
        let e = chat_event(&format!("reset-conv-{i}"), "to be read again", 1_000 + i);
        produce(&p, "chat-events", e.key(), e.to_json().as_bytes(), None).await?;
    }
    let prefix = unique("reset");
    let mut w = Workers::start(stack, "search", &prefix, &[]).await?;
    let group = format!("{prefix}-search");
    caught_up(stack, &group, &["chat-events"], Duration::from_secs(60)).await?;
    match reset(stack, &group).await {
        Err(chatstream_replay::ReplayError::GroupActive { members, .. }) => ensure!(members >= 1),
        other => bail!("reset of an active group was not refused: {other:?}"),
    }
    w.stop().await?;
    let start = Instant::now();
    loop {
        match reset(stack, &group).await {
            Ok(committed) => {
                ensure!(!committed.is_empty());
                break;
            }
            Err(chatstream_replay::ReplayError::GroupActive { .. })
                if start.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (b, g) = (stack.endpoints().kafka_bootstrap, group);
    let lags = tokio::task::spawn_blocking(move || {
        chatstream_replay::lag(&b, &g, &["chat-events".to_string()])
    })
    .await??;
    ensure!(
        lags.iter().map(|l| l.lag).sum::<i64>() > 0,
        "after a reset to earliest the group should lag: {lags:?}"
    );
    Ok(())
}

async fn a_start_offset_deleted_by_retention_is_refused(stack: &mut Stack) -> Result<()> {
    let topic = unique("retained");
    stack
        .create_topics(&[squall_stack::topics::TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }])
        .await?;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let p = producer(stack)?;
    let mut partition = 0;
    for i in 0..20 {
        (partition, _) = produce(&p, &topic, "one-key", format!("r{i}").as_bytes(), None).await?;
    }
    // What retention does, now: the partition's log starts at offset 10.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let mut upto = TopicPartitionList::new();
    upto.add_partition_offset(&topic, partition, Offset::Offset(10))?;
    let deleted = admin.delete_records(&upto, &AdminOptions::new()).await?;
    for e in deleted.elements() {
        ensure!(e.error().is_ok(), "delete records: {:?}", e.error());
    }
    // The CLI refuses at once, naming topic, partition and offset (it used to wait for
    // records that are gone, or skip past them).
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(chatstream_bin())
            .args(["replay", "--kafka-bootstrap", &bootstrap, "offsets"])
            .args(["--topic", &topic, "--partition", &partition.to_string()])
            .args(["--from", "0", "--to", "20"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("a replay from a deleted offset did not end within 60 s")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "exit {}: {stderr}", out.status);
    for needle in [
        topic.as_str(),
        &format!("partition {partition}"),
        "offset 0",
        "deleted",
    ] {
        ensure!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    let (b, t) = (bootstrap.clone(), topic.clone());
    let refused = tokio::task::spawn_blocking(move || {
        let range = chatstream_replay::Range {
            partition,
            from: 0,
            to: 20,
        };
        chatstream_replay::read(&b, &t, &[range], Duration::from_secs(30), |_| {}, |_, _| {})
    })
    .await?;
    match refused {
        Err(chatstream_replay::ReplayError::OffsetDeleted {
            topic: t,
            partition: p,
            offset,
            earliest,
        }) => ensure!(
            t == topic && p == partition && offset == 0 && earliest == 10,
            "{t} {p} {offset} {earliest}"
        ),
        other => bail!("a replay from a deleted offset was not refused: {other:?}"),
    }
    // From the earliest offset left: exactly what is there.
    let (b, t) = (bootstrap.clone(), topic.clone());
    let read = tokio::task::spawn_blocking(move || {
        let range = chatstream_replay::Range {
            partition,
            from: 10,
            to: 20,
        };
        chatstream_replay::read(&b, &t, &[range], Duration::from_secs(30), |_| {}, |_, _| {})
    })
    .await??;
    ensure!(read == 10, "read {read} records from 10..20");
    Ok(())
}

// ---------------------------------------------------------------------------------------

fn main() {
    let shared = SharedStack::new(
        "CHATSTREAM_TEST_BASE_PORT",
        29700,
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chatstream-stack-replay"),
    );
    let trials = vec![
        stack_test!(
            shared,
            "replay::replay_from_a_time_is_exact",
            replay_from_a_time_is_exact
        ),
        stack_test!(
            shared,
            "replay::session_timeline_matches_what_the_node_emitted",
            session_timeline_matches_what_the_node_emitted
        ),
        stack_test!(
            shared,
            "replay::an_active_group_cannot_be_reset",
            an_active_group_cannot_be_reset
        ),
        stack_test!(
            shared,
            "replay::a_start_offset_deleted_by_retention_is_refused",
            a_start_offset_deleted_by_retention_is_refused
        ),
    ];
    shared.run(trials)
}
