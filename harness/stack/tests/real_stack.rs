//! Integration tests against the real local stack: three KRaft brokers, Redis, PostgreSQL
//! and Toxiproxy, started once for this binary (libtest-mimic harness, tests run one at a
//! time) and stopped by pid at the end. Each test undoes what it disturbed.
//!
//! Ports: SQUALL_TEST_BASE_PORT (default 29400) for the shared stack, +200 for stacks that
//! tests start (and must fail to start) themselves, one at a time. The harness is squall_stack::testing.

use anyhow::{bail, ensure, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::Connection;
use squall_stack::kafka::{self, ClusterView};
use squall_stack::links::LinkMode;
use squall_stack::stores;
use squall_stack::testing::{eventually, SharedStack};
use squall_stack::topics::TopicSpec;
use squall_stack::toxiproxy::Toxic;
use squall_stack::{alone_test, stack_test, PortPlan, Stack, StackConfig, StackError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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

/// A one-way partition cuts exactly one direction, and Kafka shows it: the follower that
/// can no longer fetch from a leader falls out of that leader's ISR (the leader keeps its
/// place in every ISR: its own direction still works), and after healing it is back in
/// every ISR.
async fn one_way_partition_cuts_one_direction(stack: &mut Stack) -> Result<()> {
    let bootstrap = stack.endpoints().kafka_bootstrap;
    let topic = new_topic(stack, "one-way").await?;
    wait_full_isr(stack, Duration::from_secs(120)).await?;
    // Cut the traffic of a follower (`from`) to the broker leading most of the topic
    // (`to`): `from` can no longer fetch what `to` leads.
    let before = stack.cluster_view_from(1).await?;
    let led_in = |view: &ClusterView, b: u8| -> Vec<i32> {
        view.led_by(i32::from(b))
            .into_iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p)
            .collect()
    };
    let to = (1..=3u8)
        .max_by_key(|b| led_in(&before, *b).len())
        .unwrap_or(1);
    let from = if to == 1 { 2 } else { 1 };
    ensure!(
        !led_in(&before, to).is_empty(),
        "kafka-{to} leads nothing of {topic}: {before:?}"
    );
    let cut = stack.partition_one_way(from, to).await?;
    ensure!(
        cut == [
            format!("kafka-{from}-to-{to}-replication"),
            format!("kafka-{from}-to-{to}-controller")
        ],
        "{cut:?}"
    );
    let cut_at = Instant::now();
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
    let link = stack.link(&cut[0])?.listen();
    ensure!(
        tokio::net::TcpStream::connect(&link).await.is_err(),
        "{link} still accepts connections"
    );
    let reverse = stack
        .link(&format!("kafka-{to}-to-{from}-replication"))?
        .listen();
    tokio::net::TcpStream::connect(&reverse)
        .await
        .with_context(|| format!("reverse link {reverse}"))?;
    // A follower at the leader's end offset counts as caught up however long it has not
    // fetched: records keep arriving (acks=1, so producing does not wait for the ISR).
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "1")
        .set("message.timeout.ms", "10000")
        .create()
        .context("creating producer")?;
    let stack_ref = &*stack;
    let mut round = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let shrunk = loop {
        for part in 0..PARTITIONS {
            let key = format!("one-way-{round}-{part}");
            p.send(
                FutureRecord::to(&topic)
                    .partition(part)
                    .key(&key)
                    .payload(&key),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}/{part}: {e}"))?;
        }
        round += 1;
        // As the leader reports it (its ISR changes go through the controller).
        let view = stack_ref.cluster_view_from(to).await?;
        let leader_out = view.missing_from_isr(i32::from(to));
        ensure!(
            leader_out.is_empty(),
            "kafka-{to} (whose own traffic was not cut) left the ISR of {leader_out:?}"
        );
        let shrunk: Vec<(String, i32)> = view
            .missing_from_isr(i32::from(from))
            .into_iter()
            .filter(|(t, part)| {
                view.topics.get(t).is_some_and(|ps| {
                    ps.iter()
                        .any(|x| x.partition == *part && x.leader == i32::from(to))
                })
            })
            .collect();
        if !shrunk.is_empty() {
            break shrunk;
        }
        ensure!(
            Instant::now() < deadline,
            "kafka-{from} still in the ISR of every partition kafka-{to} leads 60 s after the cut ({round} rounds of records): {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "  kafka-{from} out of the ISR of {} partitions kafka-{to} leads ({:?}...) {:.1} s after the cut",
        shrunk.len(),
        &shrunk[..shrunk.len().min(3)],
        cut_at.elapsed().as_secs_f64()
    );
    stack.heal().await?;
    let healed_at = Instant::now();
    let stack_ref = &*stack;
    eventually(
        "healed follower back in every ISR",
        Duration::from_secs(120),
        || async move {
            for b in 1..=3u8 {
                let view = stack_ref.cluster_view_from(b).await?;
                let missing = view.missing_from_isr(i32::from(from));
                ensure!(
                    missing.is_empty(),
                    "as kafka-{b} sees it, kafka-{from} is missing from the ISR of {missing:?}"
                );
            }
            Ok(())
        },
    )
    .await?;
    eprintln!(
        "  kafka-{from} back in every ISR {:.1} s after healing",
        healed_at.elapsed().as_secs_f64()
    );
    kafka::delete_topics(&bootstrap, &[&topic]).await?;
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

/// Times `SELECT 1` on an open connection, `n` times.
async fn time_selects(conn: &mut sqlx::PgConnection, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *conn).await?;
        ensure!(one == 1, "SELECT 1 returned {one}");
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// A latency toxic degrades a link by what it says — no less, and not twice or per
/// packet — and removing it restores the link. Timed on one open connection (one round
/// trip per query: the server's answer is one write, delayed once by the toxic).
async fn latency_toxic_slows_postgres_link(stack: &mut Stack) -> Result<()> {
    const TOXIC: Duration = Duration::from_millis(300);
    let url = stack.plan().postgres_url("postgres");
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    // The statement is prepared and cached first, so each timed query is one round trip.
    time_selects(&mut conn, 3).await?;
    let baseline = time_selects(&mut conn, 5).await?;
    stack
        .toxiproxy()
        .add_toxic("postgres", &Toxic::latency("downstream", 300, 0))
        .await?;
    let slowed = time_selects(&mut conn, 5).await;
    stack
        .toxiproxy()
        .remove_toxic("postgres", "latency_downstream")
        .await?;
    let slowed = slowed?;
    let after = time_selects(&mut conn, 5).await?;
    eprintln!("  SELECT 1: {baseline:?} before, {slowed:?} with a 300 ms toxic, {after:?} after");
    // Every query pays the toxic once...
    ensure!(
        slowed[0] >= TOXIC,
        "a query took {:?} with a {TOXIC:?} toxic",
        slowed[0]
    );
    // ...and only once: the fastest stays under twice the toxic (noise only adds time), and
    // none takes longer than the toxic plus a generous 1.5 s for this shared machine.
    ensure!(
        slowed[0] < TOXIC * 2,
        "the fastest query took {:?} with a {TOXIC:?} toxic: applied more than once",
        slowed[0]
    );
    let slowest = slowed[slowed.len() - 1];
    ensure!(
        slowest < TOXIC + Duration::from_millis(1500),
        "a query took {slowest:?} with a {TOXIC:?} toxic"
    );
    ensure!(
        after[0] < TOXIC && after[0] < slowed[0],
        "link still slow after removing the toxic: {after:?}"
    );
    Ok(())
}

/// A process seen while a start attempt ran: its pid with its start time (a recycled pid
/// is another process) and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    pid: i32,
    start_ticks: u64,
    name: String,
}

/// (parent pid, state, start time in ticks) from /proc/<pid>/stat, None once it is gone.
fn proc_stat(pid: i32) -> Option<(i32, char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) may hold spaces; the fields after its closing ')' are plain.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = fields.get(19)?.parse().ok()?;
    Some((ppid, state, ticks))
}

fn live_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `p` still runs (a zombie or a recycled pid does not count).
fn still_running(p: &Seen) -> bool {
    matches!(proc_stat(p.pid), Some((_, state, ticks)) if ticks == p.start_ticks && state != 'Z' && state != 'X')
}

/// Every running descendant of this test process.
fn descendants() -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let parents: HashMap<i32, i32> = live_pids()
        .into_iter()
        .filter_map(|pid| Some((pid, proc_stat(pid)?.0)))
        .collect();
    parents
        .keys()
        .copied()
        .filter(|pid| {
            let mut p = *pid;
            // Bounded walk up the tree (a pid cycle cannot happen, but a race can mislead).
            for _ in 0..64 {
                match parents.get(&p) {
                    Some(pp) if *pp == me => return true,
                    Some(pp) if *pp > 1 => p = *pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// Runs a stack start `attempt` while recording every process it starts: each new
/// descendant of this test process (not one of `before`'s, nor forked by one of them) and
/// each process the attempt's state file in `run_dir` names, sampled every 20 ms.
async fn watch_attempt<T>(run_dir: &Path, attempt: impl Future<Output = T>) -> (T, BTreeSet<Seen>) {
    let before = descendants();
    let seen = Mutex::new(BTreeSet::new());
    let sample = || {
        let me = std::process::id() as i32;
        let mut new = BTreeSet::new();
        for pid in descendants() {
            // Forked by a process that ran before the attempt (say a PostgreSQL backend of
            // the shared stack): not the attempt's.
            let mut p = pid;
            let mut ours = true;
            for _ in 0..64 {
                if before.contains(&p) {
                    ours = false;
                    break;
                }
                match proc_stat(p) {
                    Some((pp, _, _)) if pp != me && pp > 1 => p = pp,
                    _ => break,
                }
            }
            if let (true, Some((_, _, ticks))) = (ours, proc_stat(pid)) {
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                new.insert(Seen {
                    pid,
                    start_ticks: ticks,
                    name,
                });
            }
        }
        if let Ok(state) = squall_stack::state::StackState::load(run_dir) {
            for r in state.processes {
                new.insert(Seen {
                    pid: r.pid,
                    start_ticks: r.start_ticks,
                    name: r.name,
                });
            }
        }
        if let Ok(mut s) = seen.lock() {
            s.extend(new);
        }
    };
    let result = {
        let watcher = async {
            loop {
                sample();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::pin!(attempt);
        tokio::select! {
            r = &mut attempt => r,
            _ = watcher => unreachable!("the watcher never ends"),
        }
    };
    // And once more after it returned: anything started at the very end counts too.
    sample();
    let seen = seen.into_inner().unwrap_or_default();
    (result, seen)
}

/// Every process in `seen` is gone (waiting up to 10 s: a server's own children, say
/// PostgreSQL's backends, leave just after it).
async fn all_gone(what: &str, seen: &BTreeSet<Seen>) -> Result<()> {
    eventually(
        &format!("every process {what} started is gone"),
        Duration::from_secs(10),
        || async {
            let left: Vec<&Seen> = seen.iter().filter(|p| still_running(p)).collect();
            ensure!(left.is_empty(), "still running: {left:?}");
            Ok(())
        },
    )
    .await
}

/// Starting a second stack in the same run directory is refused and names the running one;
/// a stack in another directory on the same ports is refused with the taken port. Neither
/// attempt leaves a process behind (by pid), and the running stack's servers still run.
async fn second_start_is_refused(stack: &mut Stack) -> Result<()> {
    let again = StackConfig::new(stack.state().run_dir.clone(), stack.plan().clone());
    let (result, seen_again) = watch_attempt(&stack.state().run_dir, Stack::up(again)).await;
    match result {
        Err(StackError::AlreadyRunning { pids, .. }) => {
            ensure!(pids.contains("kafka-1="), "{pids}")
        }
        Err(e) => bail!("expected AlreadyRunning, got: {e}"),
        Ok(_) => bail!("a second stack started in the same run directory"),
    }
    // The running stack's own servers are named by its state file: they are not the
    // attempt's and must still run.
    let running: BTreeSet<i32> = stack.state().processes.iter().map(|p| p.pid).collect();
    let started: BTreeSet<Seen> = seen_again
        .into_iter()
        .filter(|p| !running.contains(&p.pid))
        .collect();
    all_gone("the second start in the same directory", &started).await?;
    let elsewhere = StackConfig::new(run_dir("second-stack"), stack.plan().clone());
    let (result, seen_elsewhere) =
        watch_attempt(&run_dir("second-stack"), Stack::up(elsewhere)).await;
    match result {
        Err(e @ StackError::PortTaken { .. }) => {
            ensure!(e.to_string().contains("toxiproxy API"), "{e}");
        }
        Err(e) => bail!("expected PortTaken, got: {e}"),
        Ok(_) => bail!("a second stack started on taken ports"),
    }
    all_gone("the start on taken ports", &seen_elsewhere).await?;
    let dead: Vec<String> = stack
        .state()
        .processes
        .iter()
        .filter(|p| !squall_stack::process::is_alive(p))
        .map(|p| format!("{}={}", p.name, p.pid))
        .collect();
    ensure!(
        dead.is_empty(),
        "the running stack lost {dead:?} to the refused starts"
    );
    eprintln!(
        "  {} and {} processes seen during the two refused starts, none left; the stack's {} still run",
        started.len(),
        seen_elsewhere.len(),
        running.len()
    );
    Ok(())
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
    let (result, seen) = watch_attempt(
        &run_dir("port-taken"),
        Stack::up(StackConfig::new(run_dir("port-taken"), plan.clone())),
    )
    .await;
    let err = match result {
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
    // Refused before anything starts: the attempt started no process at all.
    ensure!(
        seen.is_empty(),
        "processes started although a port was taken: {seen:?}"
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
    // The broker must get as far as binding its port to die of it: on this loaded shared
    // machine a JVM can take minutes to get there.
    config.start_timeout = Duration::from_secs(400);
    config
        .broker_overrides
        .insert(2, [("listeners".to_string(), listeners)].into());
    let (result, seen) = watch_attempt(&run_dir("broker-dies"), Stack::up(config)).await;
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
    // The attempt did start servers (its state file named them while it ran); each of
    // them, and anything else it started, is gone by pid.
    let names: BTreeSet<&str> = seen.iter().map(|p| p.name.as_str()).collect();
    for server in [
        "toxiproxy",
        "redis",
        "postgres",
        "kafka-1",
        "kafka-2",
        "kafka-3",
    ] {
        ensure!(
            names.contains(server),
            "{server} was never seen running during the attempt: {seen:?}"
        );
    }
    all_gone("the failed start", &seen).await?;
    let pids: BTreeSet<i32> = seen.iter().map(|p| p.pid).collect();
    eprintln!(
        "  {} processes started by the failed start (pids {pids:?}), all gone",
        pids.len()
    );
    all_ports_free(&plan)
}

/// A stack with direct links: no Toxiproxy process and no proxies, every broker telling
/// clients its own client listener, records produced with acks=all (so replication works
/// peer to peer) and read back, a link fault refused by name, nothing left after `down`.
async fn direct_links_bypass_toxiproxy(base: u16) -> Result<()> {
    let plan = PortPlan::from_base(base, 3)?;
    let mut config = StackConfig::new(run_dir("direct-links"), plan.clone());
    config.links = LinkMode::Direct;
    let stack = Stack::up(config).await?;
    let checks = async {
        let names: Vec<&str> = stack
            .state()
            .processes
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        ensure!(
            !names.contains(&"toxiproxy"),
            "toxiproxy started: {names:?}"
        );
        ensure!(stack.state().links.is_empty(), "proxies recorded");
        let bootstrap = stack.endpoints().kafka_bootstrap;
        ensure!(
            bootstrap == plan.kafka_bootstrap_via(LinkMode::Direct),
            "{bootstrap}"
        );
        let metadata_bootstrap = bootstrap.clone();
        let advertised: BTreeSet<u16> = tokio::task::spawn_blocking(move || -> Result<_> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &metadata_bootstrap)
                .create()?;
            let md = consumer.fetch_metadata(None, Duration::from_secs(10))?;
            Ok(md.brokers().iter().map(|b| b.port() as u16).collect())
        })
        .await??;
        let own: BTreeSet<u16> = plan.brokers.iter().map(|b| b.client).collect();
        ensure!(
            advertised == own,
            "brokers advertise {advertised:?}, their listeners are {own:?}"
        );
        let topic = new_topic(&stack, "direct").await?;
        let (acked, failed) =
            produce_keys(&bootstrap, &topic, "direct", 2_000, || async { Ok(()) }).await?;
        ensure!(
            acked.len() == 2_000,
            "{failed} of 2000 records not acknowledged"
        );
        let counts = read_all_keys(&bootstrap, &topic).await?;
        ensure!(
            counts.len() == 2_000,
            "read back {} of 2000 keys",
            counts.len()
        );
        let refused = stack.cut("redis").await;
        ensure!(
            matches!(refused, Err(StackError::DirectLinks { .. })),
            "cutting a link of a direct stack: {refused:?}"
        );
        eprintln!(
            "  refused as it must be: {}",
            refused.err().map(|e| e.to_string()).unwrap_or_default()
        );
        Ok(())
    }
    .await;
    stack.down(false).await?;
    checks?;
    all_ports_free(&plan)
}

fn main() {
    let shared = SharedStack::new("SQUALL_TEST_BASE_PORT", 29400, run_dir("shared-stack"));
    let trials = vec![
        alone_test!(shared, "start::taken_port_is_named", taken_port_is_named),
        alone_test!(
            shared,
            "links::direct_links_bypass_toxiproxy",
            direct_links_bypass_toxiproxy
        ),
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
