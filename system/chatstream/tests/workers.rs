//! `chatstream workers` on the real stack (three Kafka brokers, Redis, PostgreSQL, Toxiproxy):
//! real workers processes fed by events produced to Kafka. One stack for the binary
//! (libtest-mimic, tests one at a time, stopped by pid at the end); processes are started
//! per test and stopped by pid. Shared helpers: `common/mod.rs`.
//! Ports: CHATSTREAM_TEST_BASE_PORT (default 29700) for the stack. CHATSTREAM_TEST_BIN
//! runs another `chatstream` binary (an older build, to see a new test fail on it).

mod common;

use anyhow::{anyhow, ensure, Result};
use chatstream_protocol::EventBody;
use common::*;
use squall_stack::testing::SharedStack;
use squall_stack::{stack_test, Stack};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn poison_event_goes_to_the_dlq_and_the_worker_continues(stack: &mut Stack) -> Result<()> {
    let p = producer(stack)?;
    let garbage = format!("{{not an event {}", unique("g"));
    let (gp, go) = produce(&p, "chat-events", "poison", garbage.as_bytes(), None).await?;
    let mut newer = serde_json::to_value(chat_event("c-poison", "from the future", 1))?;
    newer["version"] = 99.into();
    produce(
        &p,
        "chat-events",
        "c-poison",
        newer.to_string().as_bytes(),
        None,
    )
    .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let good = chat_event(&unique("conv"), "findable after the poison", now);
    produce(
        &p,
        "chat-events",
        good.key(),
        good.to_json().as_bytes(),
        None,
    )
    .await?;
    let prefix = unique("g");
    let mut w = Workers::start(stack, "search", &prefix, &[]).await?;
    let pool = pg(stack).await?;
    let id = good.message_id.clone().unwrap_or_default();
    let start = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM search_messages WHERE message_id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await?
        == 0
    {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the event after the poison was never indexed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The search API finds it by a word of its body.
    let hits: serde_json::Value = reqwest::get(format!(
        "http://{}/api/search?tenant={TENANT}&q=findable",
        w.addr
    ))
    .await?
    .json()
    .await?;
    ensure!(
        hits["hits"]
            .as_array()
            .is_some_and(|h| h.iter().any(|x| x["message_id"] == id.as_str())),
        "search API did not find the message: {hits}"
    );
    // Partitions are handled independently: wait until both dead letters are there.
    let start = Instant::now();
    let dead = loop {
        let dead = dead_letters(&stack.endpoints().kafka_bootstrap).await?;
        let has_garbage = dead.iter().any(|(p, _)| p == garbage.as_bytes());
        let has_newer = dead
            .iter()
            .any(|(_, h)| h.get("dlq-error").is_some_and(|e| e.contains("version 99")));
        if (has_garbage && has_newer) || start.elapsed() > Duration::from_secs(30) {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (_, h) = dead
        .iter()
        .find(|(payload, _)| payload == garbage.as_bytes())
        .ok_or_else(|| {
            anyhow!(
                "garbage not in chat-events-dlq ({} dead letters)",
                dead.len()
            )
        })?;
    ensure!(
        h.get("dlq-source-topic").map(String::as_str) == Some("chat-events"),
        "{h:?}"
    );
    ensure!(
        h.get("dlq-source-partition") == Some(&gp.to_string())
            && h.get("dlq-source-offset") == Some(&go.to_string()),
        "{h:?} vs {gp}/{go}"
    );
    ensure!(
        h.get("dlq-error")
            .is_some_and(|e| e.contains("undecodable")),
        "{h:?}"
    );
    ensure!(
        dead.iter()
            .any(|(_, h)| h.get("dlq-error").is_some_and(|e| e.contains("version 99"))),
        "the unknown-version event was not dead-lettered"
    );
    let status = w.stop().await?;
    ensure!(status.success(), "workers exited with {status}");
    Ok(())
}

/// Events of one test minute, counted by the analytics worker.
async fn minute_count(pool: &sqlx::PgPool, minute: i64) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(events)::bigint FROM analytics_minutes WHERE minute_ms = $1 AND event_type = 'CHAT_MESSAGE'",
    )
    .bind(minute)
    .fetch_one(pool)
    .await?
    .unwrap_or(0))
}

/// Runs analytics over 40 new events in a fresh minute, crashes it after handling
/// everything but before any commit, restarts it, and returns the minute's count.
async fn crash_and_count(stack: &Stack, sabotage: bool) -> Result<i64> {
    let pool = pg(stack).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let minute: i64 = 60_000 * (1_000_000 + (nanos % 1_000_000) as i64);
    let b = stack.endpoints().kafka_bootstrap;
    let before: i64 = tokio::task::spawn_blocking(move || -> Result<i64> {
        let mut n = 0;
        for t in ["chat-events", "stream-events"] {
            n += chatstream_replay::ranges_all(&b, t)?
                .iter()
                .map(|r| r.len())
                .sum::<i64>();
        }
        Ok(n)
    })
    .await??;
    let p = producer(stack)?;
    for i in 0..40 {
        let e = chat_event(
            &format!("crash-conv-{}", i % 7),
            "count me once",
            minute + i,
        );
        produce(&p, "chat-events", e.key(), e.to_json().as_bytes(), None).await?;
    }
    let prefix = unique("crash");
    let crash_at = (before + 40).to_string();
    let mut extra = vec!["--commit-interval-ms", "600000", "--crash-after", &crash_at];
    if sabotage {
        extra.push("--unsafe-no-dedupe");
    }
    let mut first = Workers::start(stack, "analytics", &prefix, &extra).await?;
    let status = wait_exit(&mut first.child, Duration::from_secs(120)).await?;
    ensure!(
        status.code() == Some(86),
        "the worker did not crash as planned: {status}"
    );
    let counted_before_restart = minute_count(&pool, minute).await?;
    ensure!(
        counted_before_restart == 40,
        "{counted_before_restart} of 40 counted before the crash"
    );
    let restart: Vec<&str> = if sabotage {
        vec!["--unsafe-no-dedupe"]
    } else {
        vec![]
    };
    let mut second = Workers::start(stack, "analytics", &prefix, &restart).await?;
    caught_up(
        stack,
        &format!("{prefix}-analytics"),
        &["chat-events", "stream-events"],
        Duration::from_secs(120),
    )
    .await?;
    second.stop().await?;
    minute_count(&pool, minute).await
}

async fn redelivery_after_a_crash_counts_once(stack: &mut Stack) -> Result<()> {
    let n = crash_and_count(stack, false).await?;
    ensure!(
        n == 40,
        "40 events counted {n} times after a crash between handling and commit"
    );
    // Sabotage: without the processed markers, the same crash double counts.
    let sabotaged = crash_and_count(stack, true).await?;
    ensure!(
        sabotaged > 40,
        "the sabotaged worker counted {sabotaged}: the check cannot fail"
    );
    eprintln!("  deduplicated: 40; sabotaged (no processed markers): {sabotaged}");
    Ok(())
}

async fn rebuilt_projections_equal_the_live_ones(stack: &mut Stack) -> Result<()> {
    // At-least-once: the same event twice (a relay retry does this) must not break either side.
    let twice = chat_event(&unique("conv"), "delivered twice", 1_000);
    let p = producer(stack)?;
    for _ in 0..2 {
        produce(
            &p,
            "chat-events",
            twice.key(),
            twice.to_json().as_bytes(),
            None,
        )
        .await?;
    }
    let session = unique("s-analytics");
    let done = stream_event(&session, completed(&session, 1_234), false);
    produce(
        &p,
        "stream-events",
        done.key(),
        done.to_json().as_bytes(),
        None,
    )
    .await?;
    let prefix = unique("live");
    let mut w = Workers::start(stack, "audit,search,analytics", &prefix, &[]).await?;
    let audit_topics = [
        "chat-events",
        "stream-events",
        "message-status-events",
        "notifications",
    ];
    caught_up(
        stack,
        &format!("{prefix}-audit"),
        &audit_topics,
        Duration::from_secs(120),
    )
    .await?;
    caught_up(
        stack,
        &format!("{prefix}-search"),
        &["chat-events"],
        Duration::from_secs(120),
    )
    .await?;
    caught_up(
        stack,
        &format!("{prefix}-analytics"),
        &["chat-events", "stream-events"],
        Duration::from_secs(120),
    )
    .await?;
    // The read API answers from the live projections.
    let counts: serde_json::Value = reqwest::get(format!("http://{}/api/audit/counts", w.addr))
        .await?
        .json()
        .await?;
    ensure!(
        counts["CHAT_MESSAGE"].as_i64().unwrap_or(0) > 0,
        "audit counts: {counts}"
    );
    let minutes: serde_json::Value = reqwest::get(format!(
        "http://{}/api/analytics/minutes?hours=100000",
        w.addr
    ))
    .await?
    .json()
    .await?;
    ensure!(
        minutes["minutes"].as_array().is_some_and(|m| m
            .iter()
            .any(|x| x["event_type"] == "STREAM_COMPLETED" && x["p50_ms"].is_i64())),
        "no STREAM_COMPLETED minute with a latency percentile: {minutes}"
    );
    w.stop().await?;
    let pool = pg(stack).await?;
    for (projection, table) in [("audit", "audit_logs"), ("search", "search_messages")] {
        let live = chatstream_workers::queries::digest(&pool, projection).await?;
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&pool)
            .await?;
        ensure!(rows > 0, "{projection} is empty: nothing to compare");
        let e = stack.endpoints();
        let out = Command::new(chatstream_bin())
            .args([
                "replay",
                "--kafka-bootstrap",
                &e.kafka_bootstrap,
                "--postgres-url",
                &e.postgres_url,
                "rebuild",
                projection,
            ])
            .env("RUST_LOG", "warn")
            .output()?;
        ensure!(
            out.status.success(),
            "rebuild {projection}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            v["digest"] == live.as_str(),
            "{projection}: rebuilt digest {} differs from live {live} ({rows} rows)",
            v["digest"]
        );
        eprintln!(
            "  {projection}: {rows} rows, same digest live and rebuilt ({} events replayed at {:.0}/s)",
            v["events"],
            v["events_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

async fn alerts_retry_a_failing_webhook_and_export_writes_pairs(stack: &mut Stack) -> Result<()> {
    use chatstream_protocol::events::{SessionStarted, StreamError};
    // A webhook that refuses its first two calls.
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let (received, calls) = (received.clone(), calls.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let (received, calls) = (received.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    if let Ok(mut r) = received.lock() {
                        r.push(body);
                    }
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let s_err = unique("s-err");
    let s_slow = unique("s-slow");
    let s_fast = unique("s-fast");
    let s_replayed = unique("s-replayed");
    let error = |session: &str| {
        EventBody::StreamError(StreamError {
            session_id: session.into(),
            message_id: "m".into(),
            conversation_id: "c".into(),
            error: "boom".into(),
            error_code: "TEST".into(),
            chunk_index: 1,
        })
    };
    let started = EventBody::SessionStarted(SessionStarted {
        session_id: s_fast.clone(),
        message_id: "m".into(),
        conversation_id: "c".into(),
        user_id: "alice".into(),
        prompt: "what is replay?".into(),
        prompt_length: 15,
        planned_chunks: 2,
    });
    let events = [
        stream_event(&s_err, error(&s_err), false),
        stream_event(&s_replayed, error(&s_replayed), true),
        stream_event(&s_slow, completed(&s_slow, 20_000), false),
        stream_event(&s_fast, started, false),
        stream_event(&s_fast, completed(&s_fast, 150), false),
    ];
    let p = producer(stack)?;
    for e in &events {
        produce(&p, "stream-events", e.key(), e.to_json().as_bytes(), None).await?;
    }
    let export_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("export"));
    let prefix = unique("alerts");
    let dir = export_dir.display().to_string();
    let mut w = Workers::start(
        stack,
        "alerts,export",
        &prefix,
        &[
            "--webhook",
            &hook,
            "--export-dir",
            &dir,
            "--sla-ms",
            "10000",
        ],
    )
    .await?;
    caught_up(
        stack,
        &format!("{prefix}-alerts"),
        &["stream-events"],
        Duration::from_secs(120),
    )
    .await?;
    caught_up(
        stack,
        &format!("{prefix}-export"),
        &["stream-events"],
        Duration::from_secs(60),
    )
    .await?;
    w.stop().await?;
    server.abort();
    let got = received.lock().map(|r| r.clone()).unwrap_or_default();
    let sessions: Vec<String> = got
        .iter()
        .filter_map(|b| b["alert"]["session_id"].as_str().map(String::from))
        .collect();
    ensure!(
        sessions.contains(&s_err),
        "STREAM_ERROR not alerted: {sessions:?}"
    );
    ensure!(
        sessions.contains(&s_slow),
        "SLA breach not alerted: {sessions:?}"
    );
    ensure!(!sessions.contains(&s_replayed), "a replayed event alerted");
    ensure!(!sessions.contains(&s_fast), "a fast completion alerted");
    ensure!(
        sessions.iter().filter(|s| **s == s_err).count() == 1,
        "STREAM_ERROR alerted twice: {sessions:?}"
    );
    ensure!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= got.len() + 2,
        "the two refusals were not retried"
    );
    // Export: one JSONL line for the completed session, with its prompt and response.
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&export_dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        lines.extend(text.lines().map(String::from));
    }
    let line = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["session_id"] == s_fast.as_str())
        .ok_or_else(|| anyhow!("no export line for {s_fast} in {} lines", lines.len()))?;
    ensure!(
        line["prompt"] == "what is replay?" && line["response"] == "hello world ",
        "{line}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------

fn main() {
    let shared = SharedStack::new(
        "CHATSTREAM_TEST_BASE_PORT",
        29700,
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chatstream-stack-workers"),
    );
    let trials = vec![
        stack_test!(
            shared,
            "workers::poison_event_goes_to_the_dlq_and_the_worker_continues",
            poison_event_goes_to_the_dlq_and_the_worker_continues
        ),
        stack_test!(
            shared,
            "workers::redelivery_after_a_crash_counts_once",
            redelivery_after_a_crash_counts_once
        ),
        stack_test!(
            shared,
            "workers::alerts_retry_a_failing_webhook_and_export_writes_pairs",
            alerts_retry_a_failing_webhook_and_export_writes_pairs
        ),
        stack_test!(
            shared,
            "workers::rebuilt_projections_equal_the_live_ones",
            rebuilt_projections_equal_the_live_ones
        ),
    ];
    shared.run(trials)
}
