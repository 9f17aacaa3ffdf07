//! Replay and worker benchmarks on the real stack (not timed tests): events per second
//! replayed from the three-broker cluster (raw, and into the search and audit projections),
//! and each worker's sustained rate (events handled per second over a fixed window).
//!
//!     cargo bench -p chatstream --bench replay       # CHATSTREAM_BENCH_BASE_PORT=29900, BENCH_EVENTS=200000
//!
//! Replay and each rebuild run three times on the same data; the median is reported.
//! `BENCH_WORKERS=0` stops after the replay and rebuild figures, `BENCH_ONLY=produce`
//! after producing; `CHATSTREAM_BENCH_STACK_DIR=DIR` uses the stack `squall stack up
//! --run-dir DIR` started, and leaves it running.

use anyhow::{anyhow, Context, Result};
use chatstream_protocol::events::{ChatMessage, EventBody, SessionStarted, StreamCompleted};
use chatstream_protocol::EventEnvelope;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use squall_stack::{PortPlan, Stack, StackConfig};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn envelope(i: u64, body: EventBody, session: Option<String>) -> EventEnvelope {
    EventEnvelope {
        id: format!("bench-{}-{i}", std::process::id()),
        version: 1,
        timestamp: "2026-11-25T09:00:00.000Z".into(),
        timestamp_ms: 1_795_597_200_000 + i as i64,
        tenant: "bench".into(),
        trace_id: format!("{i:032x}"),
        source_node: "bench".into(),
        conversation_id: Some(format!("conv-{}", i % 500)),
        session_id: session,
        user_id: Some(format!("user-{}", i % 1000)),
        message_id: Some(format!("msg-{i}")),
        replayed: false,
        body,
    }
}

fn chat(i: u64) -> EventEnvelope {
    envelope(
        i,
        EventBody::ChatMessage(ChatMessage {
            message_id: format!("msg-{i}"),
            client_msg_id: format!("c-{i}"),
            conversation_id: format!("conv-{}", i % 500),
            sender_id: format!("user-{}", i % 1000),
            seq: (i / 500) as i64 + 1,
            body: format!("benchmark message {i} about replay order and exact ends"),
            created_at_ms: 1_795_597_200_000 + i as i64,
        }),
        None,
    )
}

async fn produce_all(
    p: &FutureProducer,
    events: impl Iterator<Item = EventEnvelope>,
) -> Result<u64> {
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut n = 0;
    for e in events {
        let p = p.clone();
        pending.push(async move {
            let json = e.to_json();
            p.send(
                FutureRecord::to(e.topic()).key(e.key()).payload(&json),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(err, _)| anyhow!("{err}"))
        });
        n += 1;
        if pending.len() >= 20_000 {
            use futures::StreamExt;
            while let Some(r) = pending.next().await {
                r?;
                if pending.len() < 5_000 {
                    break;
                }
            }
        }
    }
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(n)
}

/// Full replays (and rebuilds of each projection) per bench run; the median is reported.
const RUNS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The 1-minute load average as `load 1.23`, to read beside each figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(|x| format!("load {x}")))
        .unwrap_or_else(|| "load ?".into())
}

/// The decode before issue #11's work on it (what `EventEnvelope::from_slice` did): the
/// whole record into a `serde_json::Value`, then into the envelope.
fn decode_via_value(bytes: &[u8]) -> Option<EventEnvelope> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) > 1 {
        return None;
    }
    let mut e: EventEnvelope = serde_json::from_value(value).ok()?;
    e.replayed = true;
    Some(e)
}

fn chatstream(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatstream"));
    c.args(args).env("RUST_LOG", "warn");
    c
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let base = std::env::var("CHATSTREAM_BENCH_BASE_PORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(29900u16);
    let n: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    // A stack started by `squall stack up --run-dir DIR` is used and left running (to
    // rebuild its data again by hand); otherwise the bench starts and stops its own.
    if let Ok(kept) = std::env::var("CHATSTREAM_BENCH_STACK_DIR") {
        let stack = Stack::attach(std::path::Path::new(&kept)).context("attaching the stack")?;
        return run(&stack, n, &dir).await;
    }
    let stack = Stack::up(StackConfig::new(
        dir.join("bench-replay-stack"),
        PortPlan::from_base(base, 3)?,
    ))
    .await
    .context("stack")?;
    let result = run(&stack, n, &dir).await;
    stack.down(false).await?;
    result
}

async fn run(stack: &Stack, n: u64, dir: &std::path::Path) -> Result<()> {
    let e = stack.endpoints();
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    println!("machine: {cores} cores, shared by three brokers, PostgreSQL, Redis, Toxiproxy and the benchmark");
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &e.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    let t = Instant::now();
    let produced = produce_all(&p, (0..n).map(chat)).await?;
    let secs = t.elapsed().as_secs_f64();
    println!("produce   {produced} CHAT_MESSAGE events (acks=all, idempotent, lz4) in {secs:.1} s = {:.0} events/s", produced as f64 / secs);
    let sessions = n / 20;
    let stream_events = (0..sessions).flat_map(|i| {
        let s = format!("bench-session-{i}");
        [
            envelope(
                10 * n + 2 * i,
                EventBody::SessionStarted(SessionStarted {
                    session_id: s.clone(),
                    message_id: "m".into(),
                    conversation_id: "c".into(),
                    user_id: "u".into(),
                    prompt: format!("prompt {i}"),
                    prompt_length: 8,
                    planned_chunks: 2,
                }),
                Some(s.clone()),
            ),
            envelope(
                10 * n + 2 * i + 1,
                EventBody::StreamCompleted(StreamCompleted {
                    session_id: s.clone(),
                    message_id: "m".into(),
                    conversation_id: "c".into(),
                    total_chunks: 2,
                    content_length: 12,
                    total_latency_ms: 900,
                    words: 2,
                    tokens_used: 3,
                    response: "hello world ".into(),
                }),
                Some(s),
            ),
        ]
    });
    produce_all(&p, stream_events).await?;
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "produce") {
        return Ok(());
    }

    // Raw replay: every chat-events record, decoded, from the three brokers; three full
    // replays of the same data, reported with their median (the machine is shared, so one
    // run says little). Beside each, the path before issue #11's work on it: records
    // copied out of the client, decoded through a `serde_json::Value`.
    let mut rates = Vec::new();
    let mut before = Vec::new();
    for run in 1..=RUNS {
        for old in [true, false] {
            let b = e.kafka_bootstrap.clone();
            let (count, secs) = tokio::task::spawn_blocking(move || -> Result<(u64, f64)> {
                let ranges = chatstream_replay::ranges_all(&b, "chat-events")?;
                let t = Instant::now();
                let mut decoded = 0u64;
                if old {
                    chatstream_replay::read(
                        &b,
                        "chat-events",
                        &ranges,
                        Duration::from_secs(600),
                        |r| {
                            if r.payload.as_deref().and_then(decode_via_value).is_some() {
                                decoded += 1;
                            }
                        },
                        |_, _| {},
                    )?;
                } else {
                    chatstream_replay::read_records(
                        &b,
                        "chat-events",
                        &ranges,
                        Duration::from_secs(600),
                        |r| {
                            if r.event().is_some() {
                                decoded += 1;
                            }
                            std::ops::ControlFlow::Continue(())
                        },
                        |_, _| {},
                    )?;
                }
                Ok((decoded, t.elapsed().as_secs_f64()))
            })
            .await??;
            let rate = count as f64 / secs;
            let what = if old {
                before.push(rate);
                "copied, via Value"
            } else {
                rates.push(rate);
                "lent, one pass    "
            };
            println!(
                "replay    run {run} {what}: {count} events read and decoded in {secs:.2} s = {rate:.0} events/s ({})",
                load_average()
            );
        }
    }
    println!(
        "replay    median of {RUNS}: {:.0} events/s (copied, via Value: {:.0} events/s)",
        median(&mut rates),
        median(&mut before)
    );

    // Each rebuild three times: the bulk load into a shadow table (the default) and the
    // path before it (emptied and refilled in place with the live workers' statements),
    // interleaved on the same data, three writers each.
    for projection in ["search", "audit"] {
        let mut rates = std::collections::BTreeMap::<&str, Vec<f64>>::new();
        for run in 1..=RUNS {
            for how in ["bulk into a shadow", "in place"] {
                let mut args = vec![
                    "replay",
                    "--kafka-bootstrap",
                    &e.kafka_bootstrap,
                    "--postgres-url",
                    &e.postgres_url,
                    "rebuild",
                    projection,
                ];
                if how == "in place" {
                    args.push("--in-place");
                }
                let out = chatstream(&args).output()?;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
                let rate = v["events_per_s"].as_f64().unwrap_or(0.0);
                rates.entry(how).or_default().push(rate);
                println!(
                    "rebuild   {projection:<9} run {run} {how:<18}: {} events in {:.1} s (load {:.1}, indexes {:.1}, swap {:.1}) = {rate:.0} events/s ({}; digest {})",
                    v["events"],
                    v["seconds"].as_f64().unwrap_or(0.0),
                    v["load_s"].as_f64().unwrap_or(0.0),
                    v["index_s"].as_f64().unwrap_or(0.0),
                    v["swap_s"].as_f64().unwrap_or(0.0),
                    load_average(),
                    v["digest"]
                );
            }
        }
        for (how, rates) in &mut rates {
            println!(
                "rebuild   {projection:<9} {how:<18} median of {RUNS}: {:.0} events/s",
                median(rates)
            );
        }
    }
    if std::env::var("BENCH_WORKERS").is_ok_and(|v| v == "0") {
        return Ok(());
    }

    // Each worker from start until caught up (or 30 s): events committed per second,
    // start-up included; with one consumer and with three.
    let export_dir = dir.join("bench-export");
    // The batch path (the default) and one by one (`--max-batch 1`, the path before it)
    // side by side in one run.
    for (worker, concurrency, max_batch) in [
        ("search", 1, 1_000),
        ("search", 1, 1),
        ("audit", 1, 1_000),
        ("audit", 1, 1),
        ("audit", 3, 1_000),
        ("analytics", 1, 1_000),
        ("analytics", 1, 1),
        ("analytics", 3, 1_000),
        ("export", 1, 1),
        ("alerts", 1, 1),
    ] {
        let prefix = format!(
            "bench-{}-{worker}-{concurrency}-{max_batch}",
            std::process::id()
        );
        let dir_arg = export_dir.display().to_string();
        let conc = concurrency.to_string();
        let batch = max_batch.to_string();
        let mut args = vec![
            "workers",
            "--only",
            worker,
            "--group-prefix",
            &prefix,
            "--concurrency",
            &conc,
            "--max-batch",
            &batch,
        ];
        args.extend([
            "--postgres-url",
            &e.postgres_url,
            "--kafka-bootstrap",
            &e.kafka_bootstrap,
            "--commit-interval-ms",
            "200",
        ]);
        if worker == "export" {
            args.extend(["--export-dir", &dir_arg]);
        }
        if worker == "alerts" {
            args.extend([
                "--webhook",
                "http://127.0.0.1:9/unused",
                "--sla-ms",
                "10000",
            ]);
        }
        let started = Instant::now();
        let mut child = chatstream(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?)
            .read_line(&mut line)?;
        let group = format!("{prefix}-{worker}");
        let topics: Vec<String> = if matches!(worker, "export" | "alerts") {
            vec!["stream-events".into()]
        } else {
            vec!["chat-events".into()]
        };
        let (handled, secs) = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (b, g, t) = (e.kafka_bootstrap.clone(), group.clone(), topics.clone());
            let lags =
                tokio::task::spawn_blocking(move || chatstream_replay::lag(&b, &g, &t)).await??;
            let committed: i64 = lags.iter().map(|l| l.committed.unwrap_or(0)).sum();
            let lag: i64 = lags.iter().map(|l| l.lag).sum();
            if lag == 0 || started.elapsed() > Duration::from_secs(30) {
                break (committed, started.elapsed().as_secs_f64());
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        println!("worker    {worker:<9} x{concurrency} batch<={max_batch:<5} {handled} events in {secs:.1} s = {:.0} events/s (start-up included)", handled as f64 / secs);
    }
    Ok(())
}
