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
use squall_stack::testing::{eventually, SharedStack};
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
    // The redelivered backlog arrives in runs: the batch path (one transaction per run,
    // markers included) is what must count each event once.
    let batches = metric_at(
        &second.addr,
        "chatstream_worker_batches_total",
        &[("worker", "analytics")],
    )
    .await?
    .unwrap_or(0.0);
    ensure!(
        batches > 0.0,
        "the restarted worker handled its backlog without a single batch"
    );
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
    // A body COPY's text format must escape, and a message published again with another
    // body (the live upsert keeps the last one; the rebuild must too).
    let conversation = unique("conv");
    let escaped = chat_event(
        &conversation,
        "tab\there, newline\nand \\N, a backslash \\ and \\. alone\r",
        1_001,
    );
    let first = chat_event(&conversation, "first words", 1_002);
    let mut again = first.clone();
    again.id = unique("evt");
    if let EventBody::ChatMessage(m) = &mut again.body {
        m.body = "second words".into();
    }
    for e in [&escaped, &first, &again] {
        produce(&p, "chat-events", e.key(), e.to_json().as_bytes(), None).await?;
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
        let indexes = "SELECT string_agg(indexname || ' ' || indexdef, '; ' ORDER BY indexname)
                       FROM pg_indexes WHERE tablename = $1";
        let indexes_before: String = sqlx::query_scalar(indexes)
            .bind(table)
            .fetch_one(&pool)
            .await?;
        // The table's storage parameters carry over to the rebuilt one (and the shadow's
        // autovacuum, off during the load, is back on).
        sqlx::query(&format!("ALTER TABLE {table} SET (fillfactor = 90)"))
            .execute(&pool)
            .await?;
        // A shadow left by a rebuild that died is dropped by the next one.
        sqlx::query(&format!("CREATE TABLE {table}_rebuild (leftover INT)"))
            .execute(&pool)
            .await?;
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
        // The bulk load swaps a shadow table in: same indexes and constraints, no shadow left.
        let indexes_after: String = sqlx::query_scalar(indexes)
            .bind(table)
            .fetch_one(&pool)
            .await?;
        ensure!(
            indexes_after == indexes_before,
            "{table}'s indexes after the rebuild: {indexes_after}; before: {indexes_before}"
        );
        let shadow: Option<String> =
            sqlx::query_scalar(&format!("SELECT to_regclass('{table}_rebuild')::text"))
                .fetch_one(&pool)
                .await?;
        ensure!(
            shadow.is_none(),
            "the shadow {shadow:?} is left after the swap"
        );
        let options: Option<Vec<String>> =
            sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = $1::regclass")
                .bind(table)
                .fetch_one(&pool)
                .await?;
        ensure!(
            options.as_deref() == Some(&["fillfactor=90".to_string()][..]),
            "{table}'s storage parameters after the rebuild: {options:?}; before: [fillfactor=90]"
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
// Hardening: permanent errors, stuck partitions, the retry/seek path, retention, the
// outbox's refused rows, replay over HTTP, lag per group.

/// GET `http://{addr}{path}`: status and JSON body (null when not JSON).
async fn get_json(addr: &str, path: &str) -> Result<(u16, serde_json::Value)> {
    let r = reqwest::get(format!("http://{addr}{path}")).await?;
    let code = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    ))
}

/// Sum of the samples of metric `name` at `addr` whose labels contain every `labels` pair.
async fn metric_at(addr: &str, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    let mut found = None;
    for l in text.lines() {
        if !(l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])) {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    Ok(found)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn stream_error(session: &str) -> EventBody {
    EventBody::StreamError(chatstream_protocol::events::StreamError {
        session_id: session.into(),
        message_id: "m".into(),
        conversation_id: "c".into(),
        error: "boom".into(),
        error_code: "TEST".into(),
        chunk_index: 1,
    })
}

/// A webhook that answers 503 while `refuse` says so, and records what it took.
struct Hook {
    url: String,
    received: Arc<Mutex<Vec<serde_json::Value>>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn hook(refuse: impl Fn(&serde_json::Value) -> bool + Send + Sync + 'static) -> Result<Hook> {
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let refuse = Arc::new(refuse);
    let app = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let (received, refuse) = (received.clone(), refuse.clone());
                async move {
                    if refuse(&body) {
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
    let url = format!("http://{}/hook", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Hook {
        url,
        received,
        server,
    })
}

/// Item 7: an event PostgreSQL refuses for good (a NUL byte: SQLSTATE 22021 in the search
/// index's text, 22P05 in the audit's JSONB) is tried 3 times, dead-lettered with the
/// error, and the event after it on the same partition is handled. Today's code retries it
/// forever and the partition never moves.
async fn a_permanent_database_error_is_dead_lettered_and_the_partition_moves_on(
    stack: &mut Stack,
) -> Result<()> {
    let conv = unique("conv-nul");
    let bad = chat_event(&conv, "a NUL \u{0} inside", now_ms());
    let good = chat_event(&conv, "findable after the nul", now_ms());
    let p = producer(stack)?;
    let (bp, bo) = produce(&p, "chat-events", bad.key(), bad.to_json().as_bytes(), None).await?;
    let (gp, _) = produce(
        &p,
        "chat-events",
        good.key(),
        good.to_json().as_bytes(),
        None,
    )
    .await?;
    ensure!(bp == gp, "same key, same partition");
    let prefix = unique("nul");
    let mut w = Workers::start(stack, "search,audit", &prefix, &[]).await?;
    let pool = pg(stack).await?;
    let good_id = good.message_id.clone().unwrap_or_default();
    eventually(
        "the event after the refused one is indexed and audited",
        Duration::from_secs(90),
        || async {
            let indexed: i64 =
                sqlx::query_scalar("SELECT count(*) FROM search_messages WHERE message_id = $1")
                    .bind(&good_id)
                    .fetch_one(&pool)
                    .await?;
            let audited: i64 =
                sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE event_id = $1")
                    .bind(&good.id)
                    .fetch_one(&pool)
                    .await?;
            ensure!(
                indexed == 1 && audited == 1,
                "indexed {indexed}, audited {audited}"
            );
            Ok(())
        },
    )
    .await?;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let start = Instant::now();
    let mine = loop {
        let mine: Vec<DeadLetter> = dead_letters(&bootstrap)
            .await?
            .into_iter()
            .filter(|(_, h)| {
                h.get("dlq-source-partition") == Some(&bp.to_string())
                    && h.get("dlq-source-offset") == Some(&bo.to_string())
            })
            .collect();
        if mine.len() >= 2 || start.elapsed() > Duration::from_secs(30) {
            break mine;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for worker in ["search", "audit"] {
        let (payload, h) = mine
            .iter()
            .find(|(_, h)| h.get("dlq-worker").map(String::as_str) == Some(worker))
            .ok_or_else(|| anyhow!("no dead letter from {worker}: {mine:?}"))?;
        ensure!(
            payload == bad.to_json().as_bytes(),
            "the dead letter is the event unchanged"
        );
        let error = h.get("dlq-error").cloned().unwrap_or_default();
        ensure!(
            error.contains("refused 3 times") && error.contains("SQLSTATE 22"),
            "{worker}: dlq-error {error:?}"
        );
        eprintln!("  {worker}: {error}");
    }
    for g in ["search", "audit"] {
        let topics: &[&str] = if g == "search" {
            &["chat-events"]
        } else {
            &[
                "chat-events",
                "stream-events",
                "message-status-events",
                "notifications",
            ]
        };
        caught_up(
            stack,
            &format!("{prefix}-{g}"),
            topics,
            Duration::from_secs(120),
        )
        .await?;
    }
    let status = w.stop().await?;
    ensure!(status.success(), "workers exited with {status}");
    Ok(())
}

/// Item 7: a partition retrying an event longer than --stuck-after turns /readyz red,
/// naming group, topic and partition, and sets chatstream_worker_partition_stuck to 1;
/// /healthz stays 200; once the event goes through, both are back.
async fn a_stuck_partition_turns_readyz_red_naming_it_until_it_moves(
    stack: &mut Stack,
) -> Result<()> {
    let accepting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = accepting.clone();
    let h = hook(move |_| !gate.load(std::sync::atomic::Ordering::SeqCst)).await?;
    let session = unique("s-stuck");
    let e = stream_event(&session, stream_error(&session), false);
    let p = producer(stack)?;
    let (partition, _) =
        produce(&p, "stream-events", e.key(), e.to_json().as_bytes(), None).await?;
    let prefix = unique("stuck");
    let group = format!("{prefix}-alerts");
    let w = Workers::start(
        stack,
        "alerts",
        &prefix,
        &[
            "--webhook",
            &h.url,
            "--stuck-after",
            "3s",
            "--lag-interval",
            "500ms",
            "--retry-max-backoff",
            "1s",
        ],
    )
    .await?;
    let part = partition.to_string();
    let labels = [
        ("group", group.as_str()),
        ("topic", "stream-events"),
        ("partition", part.as_str()),
    ];
    eventually(
        "readyz names the stuck partition",
        Duration::from_secs(60),
        || async {
            let (code, body) = get_json(&w.addr, "/readyz").await?;
            let named = body["stuck"].as_array().is_some_and(|s| {
                s.iter().any(|x| {
                    x["group"] == group.as_str()
                        && x["topic"] == "stream-events"
                        && x["partition"] == partition
                        && x["reason"].as_str().is_some_and(|r| r.contains("503"))
                })
            });
            ensure!(code == 503 && named, "readyz {code} {body}");
            let gauge = metric_at(&w.addr, "chatstream_worker_partition_stuck", &labels).await?;
            ensure!(gauge == Some(1.0), "stuck gauge {gauge:?}");
            Ok(())
        },
    )
    .await?;
    let (health, _) = get_json(&w.addr, "/healthz").await?;
    ensure!(health == 200, "healthz {health} while a partition is stuck");
    accepting.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(
        "readyz is green again once the event went through",
        Duration::from_secs(60),
        || async {
            let (code, body) = get_json(&w.addr, "/readyz").await?;
            ensure!(code == 200 && body["ready"] == true, "readyz {code} {body}");
            let gauge = metric_at(&w.addr, "chatstream_worker_partition_stuck", &labels).await?;
            ensure!(gauge == Some(0.0), "stuck gauge {gauge:?}");
            Ok(())
        },
    )
    .await?;
    caught_up(stack, &group, &["stream-events"], Duration::from_secs(60)).await?;
    let got = h.received.lock().map(|r| r.clone()).unwrap_or_default();
    ensure!(
        got.iter().any(|b| b["event_id"] == e.id.as_str()),
        "the stuck event was never delivered"
    );
    Ok(())
}

/// Item 7: the retry path with its pause and its seek failing (injected, as a broker can
/// make them fail): records fetched and dropped during the retry are read again — every
/// event of the partition is handled, and the committed offset reaches the end. Today's
/// code logs the failed seek, resumes, and skips them for good.
async fn a_failed_pause_and_seek_during_a_retry_skip_nothing(stack: &mut Stack) -> Result<()> {
    let session = unique("s-seek");
    let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, n) = (session.clone(), refusals.clone());
    // The session's first alert is refused twice; everything else is taken.
    let h = hook(move |b| {
        b["alert"]["session_id"] == s.as_str()
            && n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2
    })
    .await?;
    let p = producer(stack)?;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let e = stream_event(&session, stream_error(&session), false);
        produce(&p, "stream-events", e.key(), e.to_json().as_bytes(), None).await?;
        ids.push(e.id);
    }
    let prefix = unique("seek");
    let mut w = Workers::start(
        stack,
        "alerts",
        &prefix,
        &["--webhook", &h.url, "--test-fail-partition-ops", "3"],
    )
    .await?;
    let group = format!("{prefix}-alerts");
    let outcome = caught_up(stack, &group, &["stream-events"], Duration::from_secs(60)).await;
    w.stop().await?;
    let got: std::collections::BTreeSet<String> = h
        .received
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|b| b["event_id"].as_str().map(String::from))
        .collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains(*id)).collect();
    ensure!(
        missing.is_empty(),
        "{} of 10 events after the failed pause and seek were never handled: {missing:?} ({outcome:?})",
        missing.len()
    );
    ensure!(
        refusals.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the retry path was not taken"
    );
    outcome
}

/// Item 8: retention deletes published outbox rows and processed markers past their keep
/// time, keeps newer ones and every pending outbox row, and counts what it deleted.
async fn retention_prunes_published_outbox_rows_and_old_markers(stack: &mut Stack) -> Result<()> {
    // The schema comes with the first workers process.
    let prefix = unique("retention");
    let mut first =
        Workers::start(stack, "search", &prefix, &["--retention-interval", "0s"]).await?;
    first.stop().await?;
    let pool = pg(stack).await?;
    let now = now_ms();
    let hour = 3_600_000;
    let rows = [
        ("old-published", Some(now - 2 * hour)),
        ("new-published", Some(now)),
        ("old-pending", None),
    ];
    let tag = unique("ret");
    for (what, published) in rows {
        sqlx::query(
            "INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms, published_at_ms)
             VALUES ($1, 0, 'retention-test', 'k', '{}', 'test', $2, $3)",
        )
        .bind(format!("{tag}-{what}"))
        .bind(now - 3 * hour)
        .bind(published)
        .execute(&pool)
        .await?;
    }
    for (what, at) in [("old", now - 2 * hour), ("new", now)] {
        sqlx::query(
            "INSERT INTO processed_events (consumer_group, event_id, processed_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(&tag)
        .bind(format!("{tag}-{what}"))
        .bind(at)
        .execute(&pool)
        .await?;
    }
    // Pending outbox rows of this test must not be published by a node: none runs here.
    let mut w = Workers::start(
        stack,
        "search",
        &prefix,
        &[
            "--retention-interval",
            "500ms",
            "--outbox-retention",
            "1h",
            "--processed-retention",
            "1h",
        ],
    )
    .await?;
    eventually(
        "old rows pruned, new ones kept",
        Duration::from_secs(30),
        || async {
            let outbox: Vec<String> = sqlx::query_scalar(
                "SELECT event_id FROM outbox WHERE event_id LIKE $1 ORDER BY event_id",
            )
            .bind(format!("{tag}-%"))
            .fetch_all(&pool)
            .await?;
            let markers: Vec<String> = sqlx::query_scalar(
                "SELECT event_id FROM processed_events WHERE consumer_group = $1 ORDER BY event_id",
            )
            .bind(&tag)
            .fetch_all(&pool)
            .await?;
            ensure!(
                outbox == [format!("{tag}-new-published"), format!("{tag}-old-pending")]
                    && markers == [format!("{tag}-new")],
                "outbox {outbox:?}, markers {markers:?}"
            );
            Ok(())
        },
    )
    .await?;
    for table in ["outbox", "processed_events"] {
        let n = metric_at(
            &w.addr,
            "chatstream_retention_pruned_rows_total",
            &[("table", table)],
        )
        .await?
        .unwrap_or(0.0);
        ensure!(n >= 1.0, "pruned {table} rows counted {n}");
    }
    w.stop().await?;
    sqlx::query("DELETE FROM outbox WHERE event_id LIKE $1")
        .bind(format!("{tag}-%"))
        .execute(&pool)
        .await?;
    Ok(())
}

/// Item 8: outbox rows Kafka refuses for good — one larger than the topic's
/// max.message.bytes (the broker refuses it), one larger than the producer's
/// message.max.bytes (the client refuses it) — are moved to outbox_rejected with the
/// error and counted; the rows after them in the same shard are published. Today's relay
/// retries the batch forever and the shard never moves.
async fn an_outbox_row_kafka_refuses_is_moved_aside_and_its_shard_goes_on(
    stack: &mut Stack,
) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let topic = unique("small-records");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(3))
                .set("max.message.bytes", "100000")
                .set("min.insync.replicas", "2")],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for r in created {
        r.map_err(|(t, e)| anyhow!("creating {t}: {e}"))?;
    }
    // The schema (outbox_rejected) comes with the node's migrations.
    let node = Node::start(stack, "relay-refusals", &[]).await?;
    let pool = pg(stack).await?;
    let key = unique("k");
    let shard = chatstream_store::shard_of(&key);
    let tag = unique("refused");
    let rows = [
        ("1-good", "{\"n\":1}".to_string()),
        ("2-broker-refuses", format!("\"{}\"", "b".repeat(300_000))),
        ("3-client-refuses", format!("\"{}\"", "c".repeat(2_000_000))),
        ("4-good", "{\"n\":4}".to_string()),
    ];
    // One transaction: the relay sees the four rows as one batch of one shard.
    let mut tx = pool.begin().await?;
    for (what, payload) in &rows {
        sqlx::query(
            "INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, 'test', $6)",
        )
        .bind(format!("{tag}-{what}"))
        .bind(shard)
        .bind(&topic)
        .bind(&key)
        .bind(payload)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    eventually("the refused rows are moved aside and the good ones published", Duration::from_secs(60), || async {
        let published: Vec<String> = sqlx::query_scalar(
            "SELECT event_id FROM outbox WHERE event_id LIKE $1 AND published_at_ms IS NOT NULL ORDER BY event_id",
        )
        .bind(format!("{tag}-%"))
        .fetch_all(&pool)
        .await?;
        let rejected: Vec<(String, String)> = sqlx::query_as(
            "SELECT event_id, error FROM outbox_rejected WHERE event_id LIKE $1 ORDER BY event_id",
        )
        .bind(format!("{tag}-%"))
        .fetch_all(&pool)
        .await?;
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE event_id LIKE $1 AND published_at_ms IS NULL",
        )
        .bind(format!("{tag}-%"))
        .fetch_one(&pool)
        .await?;
        ensure!(
            published == [format!("{tag}-1-good"), format!("{tag}-4-good")]
                && rejected.len() == 2
                && pending == 0,
            "published {published:?}, rejected {rejected:?}, pending {pending}"
        );
        for (id, error) in &rejected {
            eprintln!("  {id}: {error}");
        }
        Ok(())
    })
    .await?;
    let on_kafka: i64 = {
        let (b, t) = (bootstrap.clone(), topic.clone());
        tokio::task::spawn_blocking(move || chatstream_replay::ranges_all(&b, &t))
            .await??
            .iter()
            .map(|r| r.len())
            .sum()
    };
    ensure!(
        on_kafka == 2,
        "{on_kafka} records on {topic}, expected the 2 good ones"
    );
    let counted = metric(&node, "chatstream_outbox_rejected_total").await?;
    ensure!(counted >= 2.0, "chatstream_outbox_rejected_total {counted}");
    // The shard keeps going: a later message of the same key is published too.
    sqlx::query(
        "INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms)
         VALUES ($1, $2, $3, $4, '{\"n\":5}', 'test', $5)",
    )
    .bind(format!("{tag}-5-later"))
    .bind(shard)
    .bind(&topic)
    .bind(&key)
    .bind(now_ms())
    .execute(&pool)
    .await?;
    eventually(
        "a later row of the shard is published",
        Duration::from_secs(30),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE event_id = $1 AND published_at_ms IS NOT NULL",
            )
            .bind(format!("{tag}-5-later"))
            .fetch_one(&pool)
            .await?;
            ensure!(n == 1, "not published yet");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// Item 11: replay over HTTP on the workers process — a session's timeline (also at the
/// seeds' /api/debug/replay-session/{id}) and a topic from a time, exact, bounded by
/// max_events and max_wait_ms, with errors for a missing time or an unknown topic.
async fn replay_over_http_answers_timelines_and_topics_within_limits(
    stack: &mut Stack,
) -> Result<()> {
    use chatstream_protocol::events::SessionStarted;
    let p = producer(stack)?;
    let session = unique("s-http");
    let started = EventBody::SessionStarted(SessionStarted {
        session_id: session.clone(),
        message_id: "m".into(),
        conversation_id: "c".into(),
        user_id: "alice".into(),
        prompt: "replay me".into(),
        prompt_length: 9,
        planned_chunks: 2,
    });
    let events = [
        stream_event(&session, started, false),
        stream_event(&session, stream_error(&session), false),
        stream_event(&session, completed(&session, 100), false),
    ];
    for e in &events {
        produce(&p, "stream-events", e.key(), e.to_json().as_bytes(), None).await?;
    }
    let topic = unique("http-replay");
    stack
        .create_topics(&[squall_stack::topics::TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }])
        .await?;
    let t = now_ms() - 600_000;
    let mut after = std::collections::BTreeSet::new();
    for i in 0..40i64 {
        let (key, ts) = if i % 2 == 0 {
            (format!("before-{i}"), t - 1 - i)
        } else {
            (format!("after-{i}"), t + i)
        };
        if ts >= t {
            after.insert(key.clone());
        }
        let payload = serde_json::json!({ "k": key }).to_string();
        produce(&p, &topic, &key, payload.as_bytes(), Some(ts)).await?;
    }
    let prefix = unique("http");
    let mut w = Workers::start(stack, "search", &prefix, &[]).await?;

    let (code, body) = get_json(&w.addr, &format!("/api/replay/sessions/{session}")).await?;
    let types: Vec<&str> = body["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        code == 200
            && types == ["SESSION_STARTED", "STREAM_ERROR", "STREAM_COMPLETED"]
            && body["complete"] == true,
        "timeline {code} {types:?} {body}"
    );
    ensure!(
        body["events"]
            .as_array()
            .is_some_and(|a| a.iter().all(|e| e["replayed"] == true)),
        "replayed events must be marked"
    );
    let (code, seeds) = get_json(&w.addr, &format!("/api/debug/replay-session/{session}")).await?;
    ensure!(
        code == 200 && seeds["events"] == body["events"],
        "debug path: {code} {seeds}"
    );
    let (code, cut) = get_json(
        &w.addr,
        &format!("/api/replay/sessions/{session}?max_events=2"),
    )
    .await?;
    ensure!(
        code == 200 && cut["count"] == 2 && cut["truncated"] == true && cut["complete"] == false,
        "max_events=2: {cut}"
    );

    let (code, body) = get_json(&w.addr, &format!("/api/replay/topics/{topic}?since={t}")).await?;
    let keys: std::collections::BTreeSet<String> = body["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["event"]["k"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        code == 200 && keys == after && body["count"] == 20 && body["complete"] == true,
        "from a time: {code}, {} keys, expected {}: {body}",
        keys.len(),
        after.len()
    );
    let (code, cut) = get_json(
        &w.addr,
        &format!("/api/replay/topics/{topic}?since={t}&max_events=5"),
    )
    .await?;
    ensure!(
        code == 200 && cut["count"].as_i64().is_some_and(|n| n <= 5) && cut["truncated"] == true,
        "max_events=5: {cut}"
    );
    let (code, late) = get_json(
        &w.addr,
        &format!("/api/replay/topics/{topic}?since={t}&max_wait_ms=0"),
    )
    .await?;
    ensure!(
        code == 200 && late["timed_out"] == true && late["complete"] == false,
        "max_wait_ms=0: {late}"
    );
    let (code, _) = get_json(&w.addr, &format!("/api/replay/topics/{topic}")).await?;
    ensure!(code == 400, "no since: {code}");
    let (code, _) = get_json(
        &w.addr,
        &format!("/api/replay/topics/{}?since={t}", unique("nope")),
    )
    .await?;
    ensure!(code == 404, "unknown topic: {code}");
    w.stop().await?;
    Ok(())
}

/// Item 14: `chatstream lag --group G` counts only the topics G consumes: after the search
/// workers drain, 0 (today it also counts stream-events and the rest, which the search
/// group never reads).
async fn lag_counts_only_the_topics_the_group_consumes(stack: &mut Stack) -> Result<()> {
    let p = producer(stack)?;
    let e = chat_event(&unique("conv-lag"), "lag me", now_ms());
    produce(&p, "chat-events", e.key(), e.to_json().as_bytes(), None).await?;
    let s = unique("s-lag");
    let other = stream_event(&s, completed(&s, 10), false);
    produce(
        &p,
        "stream-events",
        other.key(),
        other.to_json().as_bytes(),
        None,
    )
    .await?;
    let prefix = unique("lag");
    let group = format!("{prefix}-search");
    let mut w = Workers::start(stack, "search", &prefix, &[]).await?;
    caught_up(stack, &group, &["chat-events"], Duration::from_secs(60)).await?;
    w.stop().await?;
    let out = Command::new(chatstream_bin())
        .args([
            "lag",
            "--kafka-bootstrap",
            &stack.endpoints().kafka_bootstrap,
        ])
        .args(["--group", &group])
        .env("RUST_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "lag: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.lines().any(|l| l == "total lag 0"),
        "lag of a drained group:\n{stdout}"
    );
    ensure!(
        stdout.lines().any(|l| l.starts_with("chat-events "))
            && !stdout.lines().any(|l| l.starts_with("stream-events")),
        "only chat-events is the search group's:\n{stdout}"
    );
    Ok(())
}

/// Search ranks the newest matches of a word, however many messages hold it: a word in
/// every message is answered from the newest `SEARCH_CANDIDATES` (not by ranking the
/// whole table), by the first step (no index, so no plan from stale statistics), and a
/// rare word is still found in old messages, by the second.
async fn search_ranks_the_newest_matches(stack: &mut Stack) -> Result<()> {
    use chatstream_workers::queries::{search, search_recent, SEARCH_CANDIDATES};
    let store = chatstream_store::Store::connect_lazy(
        &stack.endpoints().postgres_url,
        2,
        "chatstream-test",
    )?;
    store.migrate().await?;
    let pool = store.pool();
    let tenant = unique("search-tenant");
    let n = SEARCH_CANDIDATES + 500;
    // The oldest 500 say the common word three times (the best rank), the newest once; the
    // very oldest also holds a rare word.
    sqlx::query(
        "INSERT INTO search_messages (message_id, tenant, conversation_id, sender_id, seq, body, created_at_ms)
         SELECT $1 || i, $1, 'c', 'u', i, CASE WHEN i <= 500 THEN 'chatter chatter chatter' ELSE 'chatter' END
                || CASE WHEN i = 1 THEN ' zyzzyva' ELSE '' END, i
         FROM generate_series(1, $2::bigint) AS i",
    )
    .bind(&tenant)
    .bind(n)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE search_messages").execute(pool).await?;
    let hits = search(pool, &tenant, "chatter", 10).await?;
    ensure!(
        hits.len() == 10,
        "{} hits for a word in every message",
        hits.len()
    );
    ensure!(
        hits.iter().all(|h| h.seq > 500),
        "the best-ranked hits come from outside the newest {SEARCH_CANDIDATES} matches: {:?}",
        hits.iter().map(|h| h.seq).collect::<Vec<_>>()
    );
    ensure!(
        hits[0].seq == n && hits.windows(2).all(|w| w[0].seq > w[1].seq),
        "equal ranks are not newest first: {:?}",
        hits.iter().map(|h| h.seq).collect::<Vec<_>>()
    );
    ensure!(
        search_recent(pool, &tenant, "chatter", 10).await?.as_ref() == Some(&hits),
        "a word in every message was not answered by the walk from the newest"
    );
    let rare = search(pool, &tenant, "zyzzyva", 10).await?;
    ensure!(
        rare.len() == 1 && rare[0].seq == 1,
        "the rare word's one old message: {rare:?}"
    );
    ensure!(
        search_recent(pool, &tenant, "zyzzyva", 10).await?.is_none(),
        "a rare word was answered without the index"
    );
    sqlx::query("DELETE FROM search_messages WHERE tenant = $1")
        .bind(&tenant)
        .execute(pool)
        .await?;
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
        stack_test!(
            shared,
            "workers::search_ranks_the_newest_matches",
            search_ranks_the_newest_matches
        ),
        stack_test!(
            shared,
            "workers::a_permanent_database_error_is_dead_lettered_and_the_partition_moves_on",
            a_permanent_database_error_is_dead_lettered_and_the_partition_moves_on
        ),
        stack_test!(
            shared,
            "workers::a_stuck_partition_turns_readyz_red_naming_it_until_it_moves",
            a_stuck_partition_turns_readyz_red_naming_it_until_it_moves
        ),
        stack_test!(
            shared,
            "workers::a_failed_pause_and_seek_during_a_retry_skip_nothing",
            a_failed_pause_and_seek_during_a_retry_skip_nothing
        ),
        stack_test!(
            shared,
            "workers::retention_prunes_published_outbox_rows_and_old_markers",
            retention_prunes_published_outbox_rows_and_old_markers
        ),
        stack_test!(
            shared,
            "workers::an_outbox_row_kafka_refuses_is_moved_aside_and_its_shard_goes_on",
            an_outbox_row_kafka_refuses_is_moved_aside_and_its_shard_goes_on
        ),
        stack_test!(
            shared,
            "workers::replay_over_http_answers_timelines_and_topics_within_limits",
            replay_over_http_answers_timelines_and_topics_within_limits
        ),
        stack_test!(
            shared,
            "workers::lag_counts_only_the_topics_the_group_consumes",
            lag_counts_only_the_topics_the_group_consumes
        ),
    ];
    shared.run(trials)
}
