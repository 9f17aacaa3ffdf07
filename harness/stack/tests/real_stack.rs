//! Integration tests against the real local stack: three KRaft brokers, Redis, PostgreSQL
//! and Toxiproxy, started once for this binary (libtest-mimic harness, tests run one at a
//! time) and stopped by pid at the end. Each test undoes what it disturbed.
//!
//! Ports: SQUALL_TEST_BASE_PORT (default 29400) for the shared stack, +200 for stacks that
//! tests start (and must fail to start) themselves. The harness is squall_stack::testing.

use anyhow::{bail, ensure, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use squall_stack::kafka::{self, ClusterView};
use squall_stack::stores;
use squall_stack::testing::{eventually, SharedStack};
use squall_stack::topics::TopicSpec;
use squall_stack::toxiproxy::Toxic;
use squall_stack::{alone_test, stack_test, PortPlan, Stack, StackConfig, StackError};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 6;

fn run_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn unique(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{prefix}-{ms}")
}

fn producer(bootstrap: &str) -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("request.timeout.ms", "10000")
        .set("message.timeout.ms", "120000")
        .create()
        .context("creating producer")
}

/// Produces `count` keyed records; `on_half` runs once half of them are acknowledged.
/// Returns the keys that were acknowledged and the number that failed.
async fn produce_keys<H, HF>(
    bootstrap: &str,
    topic: &str,
    prefix: &str,
    count: usize,
    on_half: H,
) -> Result<(Vec<String>, usize)>
where
    H: FnOnce() -> HF,
    HF: Future<Output = Result<()>>,
{
    let producer = producer(bootstrap)?;
    let mut on_half = Some(on_half);
    let mut pending = FuturesUnordered::new();
    let mut acked = Vec::with_capacity(count);
    let mut failed = 0usize;
    let send = |i: usize| {
        let producer = producer.clone();
        let key = format!("{prefix}-{i:06}");
        let topic = topic.to_string();
        async move {
            let r = producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&key),
                    Timeout::Never,
                )
                .await;
            (key, r.is_ok())
        }
    };
    let mut next = 0usize;
    // At most 500 records in flight: enough to keep every partition busy when the fault lands.
    while next < count || !pending.is_empty() {
        while next < count && pending.len() < 500 {
            pending.push(send(next));
            next += 1;
        }
        if let Some((key, ok)) = pending.next().await {
            if ok {
                acked.push(key);
            } else {
                failed += 1;
            }
        }
        if acked.len() >= count / 2 {
            if let Some(h) = on_half.take() {
                h().await?;
            }
        }
    }
    Ok((acked, failed))
}

/// Reads every partition of `topic` from the beginning up to its high watermark.
async fn read_all_keys(bootstrap: &str, topic: &str) -> Result<HashMap<String, usize>> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<HashMap<String, usize>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("squall-test-reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..PARTITIONS {
            let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(30))?;
            ends.insert(p, high);
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut positions: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
        let mut counts = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while positions.iter().any(|(p, pos)| *pos < ends[p]) {
            ensure!(
                Instant::now() < deadline,
                "reading {topic} did not reach the end: {positions:?} of {ends:?}"
            );
            if let Some(msg) = consumer.poll(Duration::from_millis(500)) {
                let msg = msg?;
                positions.insert(msg.partition(), msg.offset() + 1);
                let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
                *counts.entry(key).or_default() += 1;
            }
        }
        Ok(counts)
    })
    .await?
}

async fn new_topic(stack: &Stack, prefix: &str) -> Result<String> {
    let topic = unique(prefix);
    stack
        .create_topics(&[TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }])
        .await?;
    Ok(topic)
}

/// (a) kill -9 a broker half-way through 20,000 acks=all records: every acknowledged
/// record is there exactly once by key, and nothing is duplicated.
async fn acked_records_survive_broker_kill(stack: &mut Stack) -> Result<()> {
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let topic = new_topic(stack, "durability").await?;
    let victim = 2u8;
    let (acked, failed) = produce_keys(&bootstrap, &topic, "rec", 20_000, || async {
        stack.kill_broker(victim).await?;
        eprintln!("  killed kafka-{victim} with SIGKILL half-way");
        Ok(())
    })
    .await?;
    eprintln!(
        "  acked {} records, {} not acknowledged",
        acked.len(),
        failed
    );
    ensure!(acked.len() + failed == 20_000);
    ensure!(
        acked.len() >= 19_000,
        "only {} of 20000 acknowledged with 2 of 3 brokers up",
        acked.len()
    );
    stack.start_broker(victim, Duration::from_secs(120)).await?;
    // Restore what the test disturbed: the restarted broker back in every ISR.
    wait_full_isr(stack, Duration::from_secs(120)).await?;
    let counts = read_all_keys(&bootstrap, &topic).await?;
    let missing: Vec<_> = acked
        .iter()
        .filter(|k| !counts.contains_key(*k))
        .take(5)
        .collect();
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    ensure!(missing.is_empty(), "acknowledged but missing: {missing:?}");
    ensure!(
        doubled.is_empty(),
        "duplicated keys (idempotence broken): {doubled:?}"
    );
    kafka::delete_topics(&bootstrap, &[&topic]).await?;
    Ok(())
}

/// Waits until every broker reports every partition with a leader and a full ISR: a
/// fault test must start from a healthy cluster (a broker just restarted may still be
/// catching up, and leadership cannot move to a replica outside the ISR).
async fn wait_full_isr(stack: &Stack, timeout: Duration) -> Result<()> {
    eventually("every partition fully in sync", timeout, || async move {
        for b in 1..=3u8 {
            let view = stack.cluster_view_from(b).await?;
            for (topic, parts) in &view.topics {
                for p in parts {
                    ensure!(
                        p.leader >= 0 && p.isr.len() == p.replicas.len(),
                        "as kafka-{b} sees it, {topic}/{} has leader {} and ISR {:?} of {:?}",
                        p.partition,
                        p.leader,
                        p.isr,
                        p.replicas
                    );
                }
            }
        }
        Ok(())
    })
    .await
}

fn healthy_views_agree(views: &[ClusterView], isolated: i32) -> Result<()> {
    for v in views {
        let led = v.led_by(isolated);
        ensure!(led.is_empty(), "kafka-{isolated} still leads {led:?}");
    }
    Ok(())
}

/// (b) isolate a broker from its peers in both directions: leadership moves off it,
/// acks=all producing keeps working, and after healing it is back in every ISR.
async fn isolated_broker_loses_leadership_and_rejoins(stack: &mut Stack) -> Result<()> {
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let topic = new_topic(stack, "isolation").await?;
    wait_full_isr(stack, Duration::from_secs(120)).await?;
    // Isolate the broker that leads the most partitions, so leadership has to move.
    let before = stack.cluster_view_from(1).await?;
    let isolated = (1..=3u8)
        .max_by_key(|b| before.led_by(i32::from(*b)).len())
        .unwrap_or(1);
    let others: Vec<u8> = (1..=3u8).filter(|b| *b != isolated).collect();
    ensure!(
        !before.led_by(i32::from(isolated)).is_empty(),
        "no broker leads anything before the fault: {before:?}"
    );
    let cut = stack.isolate_broker(isolated).await?;
    // Clients are cut off too: an isolated broker still believes it leads and would hand
    // clients that reach it its stale metadata (records then wait out their timeout).
    stack.cut(&format!("kafka-{isolated}-client")).await?;
    eprintln!("  isolated kafka-{isolated}: cut {} links", cut.len());
    let stack_ref = &*stack;
    eventually(
        "leadership moved off the isolated broker",
        Duration::from_secs(90),
        || {
            let others = others.clone();
            async move {
                let mut views = Vec::new();
                for b in others {
                    views.push(stack_ref.cluster_view_from(b).await?);
                }
                healthy_views_agree(&views, i32::from(isolated))
            }
        },
    )
    .await?;
    let (acked, failed) =
        produce_keys(&bootstrap, &topic, "iso", 2_000, || async { Ok(()) }).await?;
    ensure!(
        failed == 0 && acked.len() == 2_000,
        "while isolated: {} acked, {failed} failed",
        acked.len()
    );
    stack.heal().await?;
    eventually("healed broker back in every ISR", Duration::from_secs(120), || async move {
        for from in 1..=3u8 {
            let view = stack_ref.cluster_view_from(from).await?;
            let missing = view.missing_from_isr(i32::from(isolated));
            ensure!(missing.is_empty(), "as kafka-{from} sees it, kafka-{isolated} is missing from the ISR of {missing:?}");
        }
        Ok(())
    })
    .await?;
    let counts = read_all_keys(&bootstrap, &topic).await?;
    ensure!(
        acked.iter().all(|k| counts.get(k) == Some(&1)),
        "records produced during the isolation are missing or doubled"
    );
    kafka::delete_topics(&bootstrap, &[&topic]).await?;
    Ok(())
}

/// A one-way partition cuts exactly one direction: the reverse direction keeps working.
async fn one_way_partition_cuts_one_direction(stack: &mut Stack) -> Result<()> {
    let cut = stack.partition_one_way(3, 1).await?;
    ensure!(
        cut == ["kafka-3-to-1-replication", "kafka-3-to-1-controller"],
        "{cut:?}"
    );
    let proxies = stack.toxiproxy().proxies().await?;
    for (name, p) in &proxies {
        let expect_enabled = !cut.contains(name);
        ensure!(
            p.enabled == expect_enabled,
            "{name}: enabled={} expected {expect_enabled}",
            p.enabled
        );
    }
    // The cut direction refuses connections; the reverse one still accepts them.
    let link = stack.link("kafka-3-to-1-replication")?.listen();
    ensure!(
        tokio::net::TcpStream::connect(&link).await.is_err(),
        "{link} still accepts connections"
    );
    let reverse = stack.link("kafka-1-to-3-replication")?.listen();
    tokio::net::TcpStream::connect(&reverse)
        .await
        .with_context(|| format!("reverse link {reverse}"))?;
    Ok(())
}

/// (c) cut client→Redis: the client gets a clear error (not a hang); restore: it works.
async fn redis_cut_gives_clear_error_and_recovers(stack: &mut Stack) -> Result<()> {
    let url = stack.endpoints().redis_url;
    stores::redis_ping(&url, Duration::from_secs(5)).await?;
    stack.cut("redis").await?;
    let started = Instant::now();
    let err = match stores::redis_ping(&url, Duration::from_secs(5)).await {
        Ok(()) => bail!("PING succeeded through a cut link"),
        Err(e) => e.to_string(),
    };
    eprintln!("  error while cut: {err}");
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "the client hung instead of failing: {err}"
    );
    ensure!(
        err.contains("refused") || err.contains("closed") || err.contains("reset"),
        "unclear error: {err}"
    );
    ensure!(
        err.contains(&url),
        "error does not name the endpoint: {err}"
    );
    stack.restore("redis").await?;
    eventually("redis answers again", Duration::from_secs(10), || async {
        Ok(stores::redis_ping(&url, Duration::from_secs(2)).await?)
    })
    .await
}

/// A latency toxic degrades a link by what it says, and removing it restores the link.
async fn latency_toxic_slows_postgres_link(stack: &mut Stack) -> Result<()> {
    let plan = stack.plan().clone();
    let time_query = || async {
        let t = Instant::now();
        stores::postgres_ready(&plan, Duration::from_secs(10)).await?;
        Ok::<_, anyhow::Error>(t.elapsed())
    };
    let baseline = time_query().await?;
    stack
        .toxiproxy()
        .add_toxic("postgres", &Toxic::latency("downstream", 300, 0))
        .await?;
    let slowed = time_query().await?;
    stack
        .toxiproxy()
        .remove_toxic("postgres", "latency_downstream")
        .await?;
    let after = time_query().await?;
    eprintln!(
        "  connect+query: {baseline:?} before, {slowed:?} with 300 ms toxic, {after:?} after"
    );
    ensure!(
        slowed >= Duration::from_millis(300) && slowed > baseline,
        "toxic did not slow the link"
    );
    ensure!(after < slowed, "link still slow after removing the toxic");
    Ok(())
}

/// Starting a second stack in the same run directory is refused and names the running one;
/// a stack in another directory on the same ports is refused with the taken port.
async fn second_start_is_refused(stack: &mut Stack) -> Result<()> {
    let again = StackConfig::new(stack.state().run_dir.clone(), stack.plan().clone());
    match Stack::up(again).await {
        Err(StackError::AlreadyRunning { pids, .. }) => {
            ensure!(pids.contains("kafka-1="), "{pids}")
        }
        Err(e) => bail!("expected AlreadyRunning, got: {e}"),
        Ok(_) => bail!("a second stack started in the same run directory"),
    }
    let elsewhere = StackConfig::new(run_dir("second-stack"), stack.plan().clone());
    match Stack::up(elsewhere).await {
        Err(e @ StackError::PortTaken { .. }) => {
            ensure!(e.to_string().contains("toxiproxy API"), "{e}");
            Ok(())
        }
        Err(e) => bail!("expected PortTaken, got: {e}"),
        Ok(_) => bail!("a second stack started on taken ports"),
    }
}

fn all_ports_free(plan: &PortPlan) -> Result<()> {
    for b in plan.bindings() {
        std::net::TcpListener::bind((b.ip, b.port))
            .with_context(|| format!("{}:{} ({}) is still bound", b.ip, b.port, b.purpose))?;
    }
    Ok(())
}

/// A taken port is named before anything starts.
async fn taken_port_is_named(base: u16) -> Result<()> {
    let plan = PortPlan::from_base(base, 3)?;
    let holder = std::net::TcpListener::bind(("127.0.0.1", plan.redis))?;
    let err = match Stack::up(StackConfig::new(run_dir("port-taken"), plan.clone())).await {
        Ok(s) => {
            s.down(false).await?;
            bail!("the stack started although {} was taken", plan.redis)
        }
        Err(e) => e,
    };
    drop(holder);
    let text = err.to_string();
    ensure!(matches!(err, StackError::PortTaken { .. }), "{text}");
    ensure!(
        text.contains(&format!("127.0.0.1:{}", plan.redis)) && text.contains("redis server"),
        "{text}"
    );
    all_ports_free(&plan)
}

/// A broker that dies during start-up (here: its client port is taken after the port
/// check, so it cannot bind) is named with its log, and every process started so far is
/// stopped.
async fn broker_dying_during_start_leaves_nothing(base: u16) -> Result<()> {
    let plan = PortPlan::from_base(base, 3)?;
    let blocked_port = base + 99;
    let holder = std::net::TcpListener::bind(("127.0.0.1", blocked_port))?;
    let ports = plan.broker(2)?;
    let listeners = format!(
        "CLIENT://127.0.0.1:{blocked_port},INTERNAL://127.0.0.1:{},CONTROLLER://127.0.0.1:{}",
        ports.replication, ports.controller
    );
    let mut config = StackConfig::new(run_dir("broker-dies"), plan.clone());
    config
        .broker_overrides
        .insert(2, [("listeners".to_string(), listeners)].into());
    let result = Stack::up(config).await;
    drop(holder);
    let err = match result {
        Ok(s) => {
            s.down(false).await?;
            bail!("the stack started with a broker that cannot bind its port")
        }
        Err(e) => e,
    };
    let text = err.to_string();
    eprintln!(
        "  start-up error: {}",
        text.lines().next().unwrap_or_default()
    );
    ensure!(
        matches!(err, StackError::ProcessDied { ref name, .. } if name == "kafka-2"),
        "{text}"
    );
    ensure!(
        text.contains(&blocked_port.to_string()) || text.contains("Address already in use"),
        "the error does not show the broker's complaint: {text}"
    );
    ensure!(
        !run_dir("broker-dies").join("state.json").exists(),
        "a state file was left behind"
    );
    all_ports_free(&plan)
}

fn main() {
    let shared = SharedStack::new("SQUALL_TEST_BASE_PORT", 29400, run_dir("shared-stack"));
    let trials = vec![
        alone_test!(shared, "start::taken_port_is_named", taken_port_is_named),
        alone_test!(
            shared,
            "start::broker_dying_during_start_leaves_nothing",
            broker_dying_during_start_leaves_nothing
        ),
        stack_test!(
            shared,
            "start::second_start_is_refused",
            second_start_is_refused
        ),
        stack_test!(
            shared,
            "kafka::acked_records_survive_broker_kill",
            acked_records_survive_broker_kill
        ),
        stack_test!(
            shared,
            "kafka::isolated_broker_loses_leadership_and_rejoins",
            isolated_broker_loses_leadership_and_rejoins
        ),
        stack_test!(
            shared,
            "kafka::one_way_partition_cuts_one_direction",
            one_way_partition_cuts_one_direction
        ),
        stack_test!(
            shared,
            "links::redis_cut_gives_clear_error_and_recovers",
            redis_cut_gives_clear_error_and_recovers
        ),
        stack_test!(
            shared,
            "links::latency_toxic_slows_postgres_link",
            latency_toxic_slows_postgres_link
        ),
    ];
    shared.run(trials)
}
