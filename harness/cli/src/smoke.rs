//! `squall smoke`: a bounded produce/consume round trip through the stack's proxies. An
//! idempotent acks=all producer sends records at a fixed open-loop rate (latency counted
//! from each record's intended send time), a consumer reads them back, and the result —
//! acked, lost and duplicated keys, ack and end-to-end latency percentiles — is printed
//! and written to `reports/<run>/smoke.json`.

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use squall_stack::kafka;
use squall_stack::topics::TopicSpec;
use squall_stack::Stack;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Args)]
pub struct SmokeArgs {
    /// Run directory of the stack to use (as given to `squall stack up`).
    #[arg(long, env = "SQUALL_RUN_DIR", default_value = ".squall/stack")]
    run_dir: PathBuf,
    /// Records to produce.
    #[arg(long, default_value_t = 5_000)]
    count: u64,
    /// Intended send rate, records per second (open loop).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Give up after this many seconds, whatever is left.
    #[arg(long, default_value_t = 120)]
    time_limit: u64,
    /// Folder under which `<run>/smoke.json` is written.
    #[arg(long, default_value = "reports")]
    reports_dir: PathBuf,
}

#[derive(Serialize)]
struct Percentiles {
    count: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Serialize)]
struct SmokeReport {
    schema: &'static str,
    run: String,
    cores: usize,
    kafka_bootstrap: String,
    topic: String,
    intended: u64,
    rate_per_s: u64,
    acked: u64,
    failed: u64,
    consumed_unique: u64,
    lost_acked: u64,
    duplicates: u64,
    produce_seconds: f64,
    ack_latency: Percentiles,
    end_to_end_latency: Percentiles,
    passed: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn histogram() -> Result<Histogram<u64>> {
    // microseconds, up to 10 minutes, 3 significant digits
    Histogram::new_with_bounds(1, 600_000_000, 3).context("creating histogram")
}

pub async fn run(args: SmokeArgs) -> Result<ExitCode> {
    if args.count == 0 || args.rate == 0 {
        bail!("--count and --rate must be positive");
    }
    let run_dir = std::path::absolute(&args.run_dir)?;
    let stack = Stack::attach(&run_dir).context("is the stack up? (squall stack up)")?;
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let run = format!("smoke-{}", now_ms());
    let topic = format!("squall-{run}");
    stack
        .create_topics(&[TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }])
        .await?;
    let deadline = Instant::now() + Duration::from_secs(args.time_limit);
    let result = measure(&args, &bootstrap, &topic, &run, deadline).await;
    if let Err(e) = kafka::delete_topics(&bootstrap, &[topic.as_str()]).await {
        tracing::warn!(error = %e, "could not delete the smoke topic");
    }
    let report = result?;
    let dir = args.reports_dir.join(&run);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("smoke.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    print_report(&report);
    println!("report: {}", path.display());
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

const WARMUP_KEY: &str = "warmup";

/// What the consumer side saw.
struct Consumed {
    per_key: HashMap<String, u32>,
    total: u64,
    end_to_end: Histogram<u64>,
}

/// Reads the topic until `target` (sent once production ends) distinct keys arrived or
/// the deadline passes. Runs beside the producer, so end-to-end latency is real.
async fn consume(
    consumer: StreamConsumer,
    mut target: tokio::sync::watch::Receiver<Option<u64>>,
    deadline: Instant,
) -> Result<Consumed> {
    let mut seen = Consumed {
        per_key: HashMap::new(),
        total: 0,
        end_to_end: histogram()?,
    };
    while Instant::now() < deadline {
        if let Some(t) = *target.borrow_and_update() {
            if seen.per_key.len() as u64 >= t {
                break;
            }
        }
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // Transient (a leader moving, metadata catching up): the deadline bounds it.
                tracing::warn!(error = %e, "consumer error; retrying");
                continue;
            }
        };
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        if key == WARMUP_KEY {
            continue;
        }
        if let Some(ts) = msg.timestamp().to_millis() {
            let _ = seen
                .end_to_end
                .record(((now_ms() - ts).max(0) as u64) * 1000);
        }
        seen.total += 1;
        *seen.per_key.entry(key).or_default() += 1;
    }
    Ok(seen)
}

async fn measure(
    args: &SmokeArgs,
    bootstrap: &str,
    topic: &str,
    run: &str,
    deadline: Instant,
) -> Result<SmokeReport> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("squall-{run}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    // Join the group before the clock starts: on a just-started cluster the group
    // coordinator takes seconds to load, which is not end-to-end latency.
    let joined = Instant::now();
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
        if joined.elapsed() > Duration::from_secs(60) || Instant::now() >= deadline {
            bail!("the consumer got no partitions within 60 s (is the group coordinator up?)");
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
    }
    let (target_tx, target_rx) = tokio::sync::watch::channel(None);
    let consumer_task = tokio::spawn(consume(consumer, target_rx, deadline));

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("socket.nagle.disable", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .context("creating producer")?;
    // The first send waits for the producer id and metadata: keep it out of the figures.
    producer
        .send(
            FutureRecord::to(topic).key(WARMUP_KEY).payload("warmup"),
            Timeout::After(Duration::from_secs(60)),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("warm-up record was not acknowledged: {e}"))?;

    let payload = "x".repeat(args.payload_bytes);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now();
    let mut acks = Acks {
        latency: histogram()?,
        acked: 0,
        failed: 0,
        keys: Vec::with_capacity(args.count as usize),
    };
    let mut pending = FuturesUnordered::new();
    for i in 0..args.count {
        if Instant::now() >= deadline {
            break;
        }
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended.into()).await;
        // Take in what is already acknowledged, so the set of pending sends stays small.
        while let Some(Some((key, at, r))) = pending.next().now_or_never() {
            acks.record(key, at, r);
        }
        let key = format!("{run}-{i:08}");
        let producer = producer.clone();
        let payload = payload.clone();
        let topic = topic.to_string();
        pending.push(async move {
            let r = producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Timeout::Never,
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e.to_string());
            (key, intended, r)
        });
    }
    while let Some((key, at, r)) = pending.next().await {
        acks.record(key, at, r);
    }
    let produce_seconds = start.elapsed().as_secs_f64();
    let _ = target_tx.send(Some(acks.acked));
    let consumed = consumer_task.await.context("consumer task")??;

    let lost = acks
        .keys
        .iter()
        .filter(|k| !consumed.per_key.contains_key(*k))
        .count() as u64;
    let duplicates = consumed.total - consumed.per_key.len() as u64;
    Ok(SmokeReport {
        schema: "squall.smoke/v1",
        run: run.to_string(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kafka_bootstrap: bootstrap.to_string(),
        topic: topic.to_string(),
        intended: args.count,
        rate_per_s: args.rate,
        acked: acks.acked,
        failed: acks.failed,
        consumed_unique: consumed.per_key.len() as u64,
        lost_acked: lost,
        duplicates,
        produce_seconds,
        ack_latency: Percentiles::of(&acks.latency),
        end_to_end_latency: Percentiles::of(&consumed.end_to_end),
        passed: lost == 0 && duplicates == 0 && acks.acked == args.count,
    })
}

/// The producer side's outcome.
struct Acks {
    latency: Histogram<u64>,
    acked: u64,
    failed: u64,
    keys: Vec<String>,
}

impl Acks {
    fn record(&mut self, key: String, intended: Instant, result: std::result::Result<(), String>) {
        match result {
            Ok(()) => {
                self.acked += 1;
                let _ = self.latency.record(intended.elapsed().as_micros() as u64);
                self.keys.push(key);
            }
            Err(e) => {
                self.failed += 1;
                tracing::warn!(%key, error = %e, "record not acknowledged");
            }
        }
    }
}

fn print_report(r: &SmokeReport) {
    println!(
        "smoke round trip on {} cores through {}",
        r.cores, r.kafka_bootstrap
    );
    println!(
        "  produced {} of {} at {}/s in {:.1} s (acked {}, failed {})",
        r.acked + r.failed,
        r.intended,
        r.rate_per_s,
        r.produce_seconds,
        r.acked,
        r.failed
    );
    println!(
        "  consumed {} unique keys; acked but missing {}; duplicates {}",
        r.consumed_unique, r.lost_acked, r.duplicates
    );
    let line = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<22} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
        )
    };
    line("ack (from intended)", &r.ack_latency);
    line("end to end", &r.end_to_end_latency);
    println!("  verdict: {}", if r.passed { "PASS" } else { "FAIL" });
}
