//! The docker provider end to end, where a Docker engine answers (DOCKER_HOST, else
//! /var/run/docker.sock): starts the compose topology with testcontainers, then a real
//! round trip through the proxies — a Kafka record produced and consumed back, Redis
//! PING, a PostgreSQL query, the Toxiproxy proxies listed with the compose file's names
//! and one of them cut and restored — and removes every container and network. Where no
//! engine answers it prints "skipped: no Docker engine answers at …" and the trial is
//! reported ignored: these machines and CI have no engine, so there it only proves that
//! the provider compiles and that the skip is said.

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::{Arguments, Trial};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::Connection;
use squall_stack::docker::{self, DockerConfig, DockerStack};
use squall_stack::links::all_links;
use squall_stack::stores;
use squall_stack::topics::TopicSpec;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const TRIAL: &str = "docker_stack_round_trip";

fn main() {
    let args = Arguments::from_args();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("docker test: cannot build a tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let trial = match runtime.block_on(docker::engine()) {
        Ok(endpoint) => {
            println!("docker engine at {endpoint}: starting the compose topology");
            Trial::test(TRIAL, move || {
                runtime
                    .block_on(with_stack())
                    .map_err(|e| format!("{e:#}").into())
            })
        }
        Err(e) => {
            println!("skipped: {e}");
            Trial::test(TRIAL, || Ok(())).with_ignored_flag(true)
        }
    };
    libtest_mimic::run(&args, vec![trial]).exit()
}

/// Starts a stack, runs the round trip, and removes the stack whatever happened.
async fn with_stack() -> Result<()> {
    let mut config = DockerConfig::new("squall-test");
    config.partitions = 3;
    let stack = DockerStack::up(config)
        .await
        .context("starting the docker stack")?;
    let result = round_trip(&stack).await;
    if result.is_err() {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(stack.name());
        if stack.save_logs(&dir).await.is_ok() {
            eprintln!("container logs in {}", dir.display());
        }
    }
    let removed = stack.down().await.context("removing the docker stack");
    result.and(removed)
}

async fn round_trip(stack: &DockerStack) -> Result<()> {
    let e = stack.endpoints().clone();
    println!("endpoints: {}", serde_json::to_string(&e)?);

    // Toxiproxy: every proxy of the compose file, by name.
    let proxies = stack.toxiproxy().proxies().await?;
    let names: BTreeSet<String> = proxies.keys().cloned().collect();
    let want: BTreeSet<String> = all_links(&docker::compose_plan()?)
        .into_iter()
        .map(|l| l.name)
        .collect();
    ensure!(names == want, "proxies {names:?}, expected {want:?}");

    // Redis, through its proxy; cut, it refuses; restored, it answers again.
    stores::redis_ping(&e.redis_url, Duration::from_secs(5)).await?;
    stack.toxiproxy().set_enabled("redis", false).await?;
    let cut = stores::redis_ping(&e.redis_url, Duration::from_secs(5)).await;
    stack.toxiproxy().set_enabled("redis", true).await?;
    ensure!(cut.is_err(), "Redis answered through a disabled proxy");
    stores::redis_ping(&e.redis_url, Duration::from_secs(5)).await?;

    // PostgreSQL, through its proxy.
    let mut conn = sqlx::PgConnection::connect(&e.postgres_url)
        .await
        .with_context(|| format!("connecting to {}", e.postgres_url))?;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await?;
    ensure!(db == stores::DATABASE, "connected to database {db}");
    conn.close().await?;

    // Kafka: a record on a topic of its own, produced (acks=all) and read back.
    let topic = format!(
        "squall-docker-test-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    squall_stack::kafka::create_topics(
        &e.kafka_bootstrap,
        &[TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }],
        1,
    )
    .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &e.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()?;
    let delivered = producer
        .send(
            FutureRecord::to(&topic)
                .key("k")
                .payload("through the proxies"),
            Timeout::After(Duration::from_secs(60)),
        )
        .await
        .map_err(|(err, _)| anyhow::anyhow!("producing to {topic}: {err}"))?;
    let (partition, offset) = (delivered.partition, delivered.offset);
    let bootstrap = e.kafka_bootstrap.clone();
    let payload = tokio::task::spawn_blocking(move || -> Result<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "squall-docker-test")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(msg) = consumer.poll(Duration::from_millis(500)) {
                let msg = msg?;
                return Ok(String::from_utf8_lossy(msg.payload().unwrap_or_default()).into());
            }
        }
        bail!("nothing read back from {topic} within 60 s")
    })
    .await??;
    ensure!(payload == "through the proxies", "read back {payload:?}");
    println!("round trip through the docker stack: ok");
    Ok(())
}
