//! Node benchmarks on the real stack (not timed tests): memory per idle WebSocket
//! connection, and frames per second per core on the node's hot path (ping/pong: decode,
//! rate limit, encode, socket write) and on the send path (PostgreSQL append + outbox row +
//! Redis fan-out + ack). "Per core" divides frames by the node process's CPU seconds
//! (utime + stime from /proc), so it holds on a noisy shared machine.
//!
//! The send path is measured twice in one run, old and new side by side, each on a node of
//! its own: `send_batching: off` (one transaction per send, awaited before the connection's
//! next frame) and `on` (group commit, pipelined connections). For each: the closed-loop
//! figure (16 connections, 16 sends in flight each), and two open-loop runs whose latency
//! is counted from each send's intended time (no coordinated omission): 100 connections at
//! 1,000 messages/s in all, and 1,000 connections at 10,000/s. Each open-loop connection is
//! the only member of its conversation (1,000 conversations), so what is measured is the send
//! path (store, outbox, relay to Kafka, ack), not live fan-out to other members. During each
//! open-loop run the outbox backlog is sampled every second, and the messages stored and the
//! events the relay published (the node's `chatstream_outbox_published_total`) within the
//! run are counted.
//!
//! Memory per connection is measured first, each count on a fresh node: 2,000 and 10,000
//! authenticated connections, idle (only their `hello` exchanged) and then active (each in
//! a two-person conversation, having sent two pings and two messages and received the
//! answers and its peer's messages); RSS growth of the node process over the count. The
//! bench raises its open-file limit to the hard limit, which the node inherits.
//!
//!     cargo bench -p chatstream --bench node
//!
//! Environment: `CHATSTREAM_BENCH_BASE_PORT` (29900), `CHATSTREAM_BENCH_SECS` (60: the new
//! path's 10,000/s run; the old path's runs 15 s, it cannot keep up), `CHATSTREAM_BENCH_ONLY`
//! (`on` or `off`: one path only, no memory runs; `memory`: the memory runs only),
//! `CHATSTREAM_BENCH_CONNECTIONS` (10000: the larger memory run),
//! `CHATSTREAM_BENCH_NODE_CONFIG` (more node settings for the send-path runs, YAML lines
//! separated by `\n`), `CHATSTREAM_BENCH_BASELINE_NODE_CONFIG` (the same for the baseline
//! binary's run instead: with a copy of this build as the baseline, two settings side by
//! side),
//! `CHATSTREAM_BENCH_STACK_DIR=<run dir>` (use a stack already up, from `squall stack up
//! --run-dir`, and leave it running; its links as it was started with),
//! `CHATSTREAM_BENCH_LINKS=direct` (the stack this bench starts has no Toxiproxy: the
//! system measured without the proxies' cost; default `proxied`), `CHATSTREAM_BENCH_NODE_WRAPPER` (a command the node
//! runs under, e.g. `heaptrack -o <file>`; the RSS figures are then the wrapper's),
//! `CHATSTREAM_BENCH_HOLD_SECS` (holds the memory runs' connections after each figure), `CHATSTREAM_BENCH_PERF=<dir>` (records `perf` profiles
//! of the node and of the whole machine for 20 s in the middle of the new path's 10,000/s
//! run), `CHATSTREAM_BENCH_BASELINE_BIN=<chatstream binary>` (an earlier build, measured on
//! the new path and in the memory runs beside this one, in the same run on the same stack,
//! on a database of its own that it migrates itself, so a schema change compares too),
//! `CHATSTREAM_BENCH_NODE_LOG` (the nodes' `RUST_LOG`, default `warn`; each node's log goes
//! to `bench-node-<port>-<path><run>.log` beside its config under the target's tmp dir).

use anyhow::{anyhow, Context, Result};
use chatstream_protocol::auth::{self, Claims};
use chatstream_protocol::{ClientFrame, ServerFrame};
use futures::{SinkExt, StreamExt};
use squall_stack::links::LinkMode;
use squall_stack::{proc_cpu, PortPlan, Stack, StackConfig};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "squall-bench-secret";

fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or(0);
    auth::sign(
        SECRET.as_bytes(),
        &Claims {
            sub: user.into(),
            tenant: "bench".into(),
            exp,
        },
    )
    .unwrap_or_default()
}

fn proc_field(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{key} not in /proc/{pid}/status"))
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let (_, ticks) = proc_cpu::read_stat(pid as i32).ok_or_else(|| anyhow!("no process {pid}"))?;
    Ok(ticks as f64 / proc_cpu::ticks_per_second())
}

struct NodeProc(Child, String);

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_node(
    stack: &Stack,
    config: &std::path::Path,
    binary: &std::path::Path,
    postgres_url: &str,
) -> Result<NodeProc> {
    let e = stack.endpoints();
    let wrapper = std::env::var("CHATSTREAM_BENCH_NODE_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = command
        .args([
            "node",
            "--config",
            &config.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--postgres-url",
            postgres_url,
            "--redis-url",
            &e.redis_url,
            "--kafka-bootstrap",
            &e.kafka_bootstrap,
        ])
        .args(["--token-secret", SECRET])
        .env(
            "RUST_LOG",
            std::env::var("CHATSTREAM_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        // Its warnings, for when a run goes wrong (one file per config, the latest node's).
        .stderr(std::fs::File::create(config.with_extension("log"))?)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    // The node's first JSON line names its address (a wrapper may print lines before it).
    let mut reader = BufReader::new(stdout);
    let v: serde_json::Value = loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(anyhow!("the node exited before naming its address"));
        }
        if let Ok(v) = serde_json::from_str(&line) {
            break v;
        }
    };
    // Kept read, so neither the node nor a wrapper dies writing to a closed pipe.
    std::thread::spawn(move || reader.lines().for_each(drop));
    let addr = v["addr"]
        .as_str()
        .ok_or_else(|| anyhow!("no addr"))?
        .to_string();
    let start = Instant::now();
    while reqwest::get(format!("http://{addr}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(anyhow!("node not ready"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(NodeProc(child, addr))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects with a 4 KiB read buffer and TCP_NODELAY: tungstenite's default buffer (128
/// KiB) is zeroed before every read, which would make the load generator, on the same
/// cores as the node, cost more than the node itself.
async fn connect(addr: &str, user: &str) -> Result<Ws> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{addr}/ws?token={}", token(user)),
        Some(config),
        true,
    )
    .await?;
    ws.next().await.ok_or_else(|| anyhow!("no hello"))??;
    Ok(ws)
}

/// Raises this process's open-file limit to its hard limit: the node, spawned from here,
/// inherits it, and the memory runs hold 10,000 sockets on each side. Returns the limit.
fn raise_open_files() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Opens `n` authenticated connections, `parallel` handshakes at a time.
async fn connect_many(addr: &str, prefix: &str, n: usize, parallel: usize) -> Result<Vec<Ws>> {
    let results: Vec<Result<Ws>> = futures::stream::iter(0..n)
        .map(|i| {
            let addr = addr.to_string();
            let user = format!("{prefix}-u{i}");
            async move { connect(&addr, &user).await }
        })
        .buffered(parallel)
        .collect()
        .await;
    results.into_iter().collect()
}

/// With `CHATSTREAM_BENCH_HOLD_SECS`, keeps the connections as they are that long, so the
/// node's heap can be looked at (e.g. `kill -9` it under `heaptrack`: what is still
/// allocated is what they hold).
async fn hold(what: &str, pid: u32) -> Result<()> {
    if let Ok(secs) = std::env::var("CHATSTREAM_BENCH_HOLD_SECS") {
        println!("holding the {what} connections {secs} s; node pid {pid}");
        tokio::time::sleep(Duration::from_secs(secs.parse()?)).await;
    }
    Ok(())
}

/// Node RSS per connection, KiB: idle, and after each connection has been active.
struct ConnMemory {
    idle_kib: f64,
    active_kib: f64,
    active_peak_kib: f64,
    /// Frames of the active phase answered with an error instead of a pong or an ack.
    errors: u64,
}

/// The node's RSS growth per connection, on a node of its own (`node` is fresh: nothing
/// else has touched its heap). Idle: `n` authenticated connections that have only had
/// their `hello`. Active: the same connections, each then a member of a two-person
/// conversation, having sent two pings and two messages (pong and ack back for each, the
/// peer's two messages delivered live); measured once every connection has its answers,
/// and as the peak sampled while they were exchanged. Every figure is (RSS − RSS before
/// the first connection) / `n`.
async fn connection_memory(node: &NodeProc, prefix: &str, n: usize) -> Result<ConnMemory> {
    let pid = node.0.id();
    if n % 2 == 1 {
        return Err(anyhow!("an even number of connections is needed (pairs)"));
    }
    // Conversations first: creating them is HTTP work on the node, not per-connection state.
    create_conversations_of(node, n / 2, |p| {
        let (a, b) = (
            format!("{prefix}-u{}", 2 * p),
            format!("{prefix}-u{}", 2 * p + 1),
        );
        (format!("{prefix}-c{p}"), vec![a, b])
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = proc_field(pid, "VmRSS:")?;
    let conns = connect_many(&node.1, prefix, n, 32).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = proc_field(pid, "VmRSS:")?;
    hold("idle", pid).await?;

    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(rss) = proc_field(pid, "VmRSS:") {
                    peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let prefix_owned = prefix.to_string();
    let exchanged: Vec<Result<(Ws, u64)>> = futures::stream::iter(conns.into_iter().enumerate())
        .map(|(i, mut ws)| {
            let conv = format!("{prefix_owned}-c{}", i / 2);
            async move {
                for k in 0..2u64 {
                    ws.send(Message::text(ClientFrame::Ping { nonce: Some(k) }.encode()))
                        .await?;
                    let frame = ClientFrame::Send {
                        conversation_id: conv.clone(),
                        client_msg_id: format!("m{k}"),
                        body: "a benchmark message of about sixty bytes, typical of chat text"
                            .into(),
                    };
                    ws.send(Message::text(frame.encode())).await?;
                }
                let (mut answers, mut errors) = (0, 0u64);
                while answers < 4 {
                    let next = tokio::time::timeout(Duration::from_secs(60), ws.next()).await;
                    let Ok(Some(Ok(msg))) = next else {
                        return Err(anyhow!("no answer to a ping or a send"));
                    };
                    let Message::Text(t) = msg else { continue };
                    match ServerFrame::decode(&t)? {
                        ServerFrame::Pong { .. } | ServerFrame::Ack { .. } => answers += 1,
                        // An error is an answer too (a send refused on a loaded machine,
                        // `unavailable`): counted and printed, the connection was used.
                        ServerFrame::Error { .. } => {
                            answers += 1;
                            errors += 1;
                        }
                        _ => {}
                    }
                }
                Ok((ws, errors))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut conns: Vec<Ws> = Vec::with_capacity(n);
    let mut errors = 0;
    for r in exchanged {
        let (ws, e) = r?;
        conns.push(ws);
        errors += e;
    }
    // The peers' live messages were queued before the last ack of the pair went out; give
    // the writers a moment to put them on the sockets.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active = proc_field(pid, "VmRSS:")?;
    hold("active", pid).await?;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.await?;
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed).max(active);
    drop(conns);
    let per = |rss: u64| rss.saturating_sub(before) as f64 / n as f64;
    Ok(ConnMemory {
        idle_kib: per(idle),
        active_kib: per(active),
        active_peak_kib: per(peak),
        errors,
    })
}

/// `clients` connections each keep `window` frames in flight for `secs` seconds.
async fn throughput(
    node: &NodeProc,
    clients: usize,
    window: usize,
    secs: u64,
    make: fn(usize, u64) -> ClientFrame,
    conv_setup: bool,
) -> Result<(u64, f64, f64)> {
    let pid = node.0.id();
    if conv_setup {
        let http = reqwest::Client::new();
        for c in 0..clients {
            let user = format!("load-{c}");
            http.post(format!("http://{}/api/conversations", node.1))
                .bearer_auth(token(&user))
                .json(&serde_json::json!({ "id": format!("bench-conv-{c}"), "members": [user] }))
                .send()
                .await?;
        }
    }
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = node.1.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&addr, &format!("load-{c}")).await?;
            let mut sent = 0u64;
            let mut done = 0u64;
            while Instant::now() < deadline {
                while sent - done < window as u64 {
                    ws.send(Message::text(make(c, sent).encode())).await?;
                    sent += 1;
                }
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => match ServerFrame::decode(&t)? {
                        ServerFrame::Pong { .. } | ServerFrame::Ack { .. } => done += 1,
                        ServerFrame::Error { code, message, .. } => {
                            return Err(anyhow!("{code:?}: {message}"))
                        }
                        _ => {}
                    },
                    Some(Ok(_)) => {}
                    _ => return Err(anyhow!("connection lost")),
                }
            }
            Ok::<u64, anyhow::Error>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    Ok((total, wall, cpu))
}

fn ping(_: usize, i: u64) -> ClientFrame {
    ClientFrame::Ping { nonce: Some(i) }
}

/// Which node of this run is measured: keys must not repeat across them (a repeat is a
/// duplicate, answered without a store).
static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn send(c: usize, i: u64) -> ClientFrame {
    let run = RUN.load(std::sync::atomic::Ordering::Relaxed);
    ClientFrame::Send {
        conversation_id: format!("bench-conv-{c}"),
        client_msg_id: format!("b-{c}-{i}-{}-{run}", std::process::id()),
        body: "a benchmark message of about sixty bytes, typical of chat text".into(),
    }
}

/// What an open-loop run measured.
struct OpenLoop {
    offered: u64,
    acked: u64,
    errors: u64,
    secs: f64,
    /// send→ack, from each send's intended time, µs, sorted.
    latencies: Vec<u64>,
    /// The same by the second of the run each send was due in (unsorted within a second):
    /// whether the tail is spread over the run or made by a few bad seconds.
    by_second: Vec<Vec<u64>>,
    /// Wall-clock ms at the run's start, to find a bad second in the servers' logs.
    wall0: i64,
    node_cpu: f64,
    /// Messages stored within the run, and events the node's relay published within it.
    stored: i64,
    published: i64,
    backlog_max: i64,
    backlog_end: i64,
    /// After the run: how long until the backlog was empty.
    drain: Duration,
    /// PostgreSQL commits during the run (every client of the database).
    commits: i64,
    /// CPU seconds each part of the machine used during the run (see [`CpuBudget`]).
    cpu: Vec<(String, f64)>,
}

/// The `q` quantile of `sorted` (µs) in ms.
fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1] as f64 / 1000.0
}

impl OpenLoop {
    fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies, q)
    }

    /// Each second's p99 (ms), with the second's wall-clock start, in run order.
    fn p99_by_second(&self) -> Vec<(i64, f64)> {
        self.by_second
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(s, l)| {
                let mut l = l.clone();
                l.sort_unstable();
                (self.wall0 + 1000 * s as i64, quantile_ms(&l, 0.99))
            })
            .collect()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn commits(pg: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pg)
    .await?)
}

/// Outbox rows still to be published.
async fn outbox_backlog(pg: &sqlx::PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at_ms IS NULL")
            .fetch_one(pg)
            .await?,
    )
}

/// A fresh database `name` beside the one `url` names (dropped first if it exists): its
/// URL and a pool on it.
async fn database_of_its_own(
    pg: &sqlx::PgPool,
    url: &str,
    name: &str,
) -> Result<(String, sqlx::PgPool)> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(pg)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(pg)
        .await?;
    let (server, _) = url
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("no database in {url}"))?;
    let url = format!("{server}/{name}");
    let pool = sqlx::PgPool::connect(&url).await?;
    Ok((url, pool))
}

/// Events the node's relay has published since it started (its own counter).
async fn outbox_published(addr: &str) -> Result<i64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    let name = "chatstream_outbox_published_total";
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as i64)
}

/// Waits until the outbox is empty (at most `within`); how long that took.
async fn drain_outbox(pg: &sqlx::PgPool, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    while outbox_backlog(pg).await? > 0 {
        if start.elapsed() > within {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(start.elapsed())
}

/// Creates conversations `<prefix>-c<i>`, each with `<prefix>-u<i>` as its only member
/// (idempotent).
async fn create_conversations(node: &NodeProc, prefix: &str, n: usize) -> Result<()> {
    create_conversations_of(node, n, |c| {
        (format!("{prefix}-c{c}"), vec![format!("{prefix}-u{c}")])
    })
    .await
}

/// Creates `n` conversations, the `i`th named and peopled by `spec(i)` (id, members; the
/// first member creates it), 16 requests at a time.
async fn create_conversations_of(
    node: &NodeProc,
    n: usize,
    spec: impl Fn(usize) -> (String, Vec<String>),
) -> Result<()> {
    let http = reqwest::Client::new();
    let addr = node.1.clone();
    let results: Vec<Result<()>> = futures::stream::iter((0..n).map(spec))
        .map(|(id, members)| {
            let http = http.clone();
            let addr = addr.clone();
            async move {
                let creator = members.first().cloned().unwrap_or_default();
                let r = http
                    .post(format!("http://{addr}/api/conversations"))
                    .bearer_auth(token(&creator))
                    .json(&serde_json::json!({ "id": id, "members": members }))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err(anyhow!("creating a conversation: {}", r.status()));
                }
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The processes an open-loop run keeps busy, by part: the node, the load generator (this
/// bench), and the stack's servers by kind (`kafka-0`..`kafka-2` as one), each read as its
/// whole process tree; then the rest of the machine (its busy time less the parts'), so
/// the figures say how far the two cores were from being enough.
struct CpuBudget {
    parts: Vec<(String, Vec<i32>)>,
}

impl CpuBudget {
    fn of(stack: &Stack, node_pid: u32) -> CpuBudget {
        let mut parts: Vec<(String, Vec<i32>)> = vec![
            ("node".into(), vec![node_pid as i32]),
            ("load generator".into(), vec![std::process::id() as i32]),
        ];
        for p in &stack.state().processes {
            let kind = p
                .name
                .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
            match parts.iter_mut().find(|(k, _)| k == kind) {
                Some((_, pids)) => pids.push(p.pid),
                None => parts.push((kind.to_string(), vec![p.pid])),
            }
        }
        CpuBudget { parts }
    }

    /// CPU seconds used so far by each part, then by the whole machine.
    fn read(&self) -> (Vec<f64>, f64) {
        let roots: std::collections::HashSet<i32> = self
            .parts
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        let parts = self
            .parts
            .iter()
            .map(|(_, pids)| {
                pids.iter()
                    .filter_map(|p| proc_cpu::tree_cpu_seconds(*p, &roots))
                    .sum()
            })
            .collect();
        (parts, proc_cpu::machine_busy_seconds().unwrap_or(0.0))
    }

    /// What each part used between `before` and now, the rest of the machine last.
    fn since(&self, before: &(Vec<f64>, f64)) -> Vec<(String, f64)> {
        let (now, busy) = self.read();
        let mut used: Vec<(String, f64)> = self
            .parts
            .iter()
            .zip(now.iter().zip(&before.0))
            .map(|((name, _), (b, a))| (name.clone(), (b - a).max(0.0)))
            .collect();
        let ours: f64 = used.iter().map(|(_, s)| s).sum();
        used.push((
            "rest of the machine".into(),
            (busy - before.1 - ours).max(0.0),
        ));
        used
    }
}

/// What an open-loop run runs against: the node, the database it stores in, and the
/// processes whose CPU is counted.
struct RunOn<'a> {
    node: &'a NodeProc,
    pg: &'a sqlx::PgPool,
    budget: CpuBudget,
}

/// `connections` connections (each the only member of its conversation) send `rate`
/// messages/s in all for `secs`, each on a fixed schedule whatever the node does; send→ack
/// is counted from the intended send time. `perf` records profiles half-way through.
async fn open_loop(
    on: &RunOn<'_>,
    prefix: &str,
    connections: usize,
    rate: f64,
    secs: u64,
    perf: Option<PathBuf>,
) -> Result<OpenLoop> {
    let RunOn { node, pg, budget } = on;
    let pg: &sqlx::PgPool = pg;
    create_conversations(node, prefix, connections).await?;
    let mut sockets = Vec::with_capacity(connections);
    for c in 0..connections {
        sockets.push(connect(&node.1, &format!("{prefix}-u{c}")).await?);
    }
    drain_outbox(pg, Duration::from_secs(60)).await?;
    let pid = node.0.id();
    let period = Duration::from_secs_f64(connections as f64 / rate);
    let run = Duration::from_secs(secs);
    let grace = Duration::from_secs(5);
    let cpu0 = cpu_seconds(pid)?;
    let budget0 = budget.read();
    let commits0 = commits(pg).await?;
    let published0 = outbox_published(&node.1).await?;
    let wall0 = now_ms();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(200);
    let end = t0 + run;
    // What the relay published by the end of the sends, by its own counter.
    let published_at_end = {
        let addr = node.1.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(end).await;
            outbox_published(&addr).await
        })
    };
    let mut tasks = Vec::with_capacity(connections);
    for (c, ws) in sockets.into_iter().enumerate() {
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let start = t0 + period.mul_f64(c as f64 / connections as f64);
            let due = |i: u64| start + period * i as u32;
            let mut n = 0u64;
            while due(n) < end {
                n += 1;
            }
            let conv = format!("{prefix}-c{c}");
            let sender = async {
                for i in 0..n {
                    tokio::time::sleep_until(due(i)).await;
                    let frame = ClientFrame::Send {
                        conversation_id: conv.clone(),
                        client_msg_id: format!("{i}"),
                        body: "a benchmark message of about sixty bytes, typical of chat text"
                            .into(),
                    };
                    sink.send(Message::text(frame.encode())).await?;
                }
                Ok::<_, anyhow::Error>(sink)
            };
            let reader = async {
                let mut latencies = Vec::with_capacity(n as usize);
                let mut errors = 0u64;
                let mut answered = 0u64;
                while answered < n {
                    let next = tokio::time::timeout_at(end + grace, stream.next()).await;
                    let Ok(Some(Ok(msg))) = next else { break };
                    let Message::Text(t) = msg else { continue };
                    match ServerFrame::decode(&t)? {
                        ServerFrame::Ack { client_msg_id, .. } => {
                            answered += 1;
                            let i: u64 = client_msg_id.parse()?;
                            let late =
                                tokio::time::Instant::now().saturating_duration_since(due(i));
                            let second = due(i).saturating_duration_since(t0).as_secs();
                            latencies.push((second as usize, late.as_micros() as u64));
                        }
                        ServerFrame::Error { .. } => {
                            answered += 1;
                            errors += 1;
                        }
                        _ => {}
                    }
                }
                Ok::<_, anyhow::Error>((latencies, errors))
            };
            let (sink, read) = tokio::join!(sender, reader);
            let (latencies, errors) = read?;
            drop(sink?);
            Ok::<_, anyhow::Error>((n, latencies, errors))
        }));
    }
    let sampler = {
        let pg = pg.clone();
        tokio::spawn(async move {
            let mut max = 0i64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= end {
                    return max;
                }
                if let Ok(n) = outbox_backlog(&pg).await {
                    max = max.max(n);
                }
            }
        })
    };
    let profiler = perf.map(|dir| {
        tokio::spawn(async move {
            tokio::time::sleep_until(t0 + run / 2 - Duration::from_secs(10)).await;
            record_profiles(&dir, pid).await
        })
    });
    let mut offered = 0;
    let mut latencies = Vec::new();
    let mut by_second: Vec<Vec<u64>> = vec![Vec::new(); secs as usize + 1];
    let mut errors = 0;
    for t in tasks {
        let (n, l, e) = t.await??;
        offered += n;
        for (second, micros) in l {
            if let Some(s) = by_second.get_mut(second) {
                s.push(micros);
            }
            latencies.push(micros);
        }
        errors += e;
    }
    let backlog_max = sampler.await?;
    let node_cpu = cpu_seconds(pid)? - cpu0;
    let cpu = budget.since(&budget0);
    let commits = commits(pg).await? - commits0;
    let wall1 = wall0 + 200 + run.as_millis() as i64;
    let backlog_end = outbox_backlog(pg).await?;
    let published = published_at_end.await?? - published0;
    let conversations: Vec<String> = (0..connections).map(|c| format!("{prefix}-c{c}")).collect();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages
         WHERE conversation_id = ANY($3) AND created_at_ms BETWEEN $1 AND $2",
    )
    .bind(wall0)
    .bind(wall1)
    .bind(&conversations)
    .fetch_one(pg)
    .await?;
    let drain = drain_outbox(pg, Duration::from_secs(120)).await?;
    if let Some(p) = profiler {
        if let Err(e) = p.await? {
            println!("  (profiles not recorded: {e})");
        }
    }
    latencies.sort_unstable();
    Ok(OpenLoop {
        offered,
        acked: latencies.len() as u64,
        errors,
        secs: run.as_secs_f64(),
        latencies,
        by_second,
        wall0: wall0 + 200,
        node_cpu,
        stored,
        published,
        backlog_max,
        backlog_end,
        drain,
        commits,
        cpu,
    })
}

/// `perf record` for 20 s: the node (call graphs) and the whole machine (where the two
/// cores go: node, PostgreSQL, Kafka, Toxiproxy, Redis, the load generator).
async fn record_profiles(dir: &std::path::Path, pid: u32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let node = tokio::process::Command::new("perf")
        .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
        .arg(dir.join("node.perf.data"))
        .args(["--", "sleep", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let system = tokio::process::Command::new("perf")
        .args(["record", "-F", "199", "-a", "-o"])
        .arg(dir.join("system.perf.data"))
        .args(["--", "sleep", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let (a, b) = tokio::join!(node.wait_with_output(), system.wait_with_output());
    if !a?.status.success() || !b?.status.success() {
        return Err(anyhow!("perf record failed"));
    }
    Ok(())
}

fn report(path: &str, name: &str, r: &OpenLoop) {
    println!(
        "{path:<4} {name:<22} offered {:>7.0}/s  acked {:>7.0}/s ({} of {}, {} errors)  send→ack p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms  node CPU {:.1} s ({:.0} msgs per CPU-second)  outbox: stored {:.0}/s, published {:.0}/s, backlog max {} end {} (empty {:.1} s later)  PostgreSQL commits {:.0}/s",
        r.offered as f64 / r.secs,
        r.acked as f64 / r.secs,
        r.acked,
        r.offered,
        r.errors,
        r.quantile_ms(0.5),
        r.quantile_ms(0.99),
        r.quantile_ms(0.999),
        r.quantile_ms(1.0),
        r.node_cpu,
        r.acked as f64 / r.node_cpu.max(0.001),
        r.stored as f64 / r.secs,
        r.published as f64 / r.secs,
        r.backlog_max,
        r.backlog_end,
        r.drain.as_secs_f64(),
        r.commits as f64 / r.secs
    );
    let seconds = r.p99_by_second();
    if seconds.len() > 1 {
        let mut p99s: Vec<f64> = seconds.iter().map(|(_, p)| *p).collect();
        p99s.sort_by(f64::total_cmp);
        let over = p99s.iter().filter(|p| **p > 50.0).count();
        let mut worst = seconds.clone();
        worst.sort_by(|a, b| b.1.total_cmp(&a.1));
        let worst: Vec<String> = worst
            .iter()
            .take(5)
            .map(|(at, p)| format!("{} {p:.1} ms", utc_time(*at)))
            .collect();
        println!(
            "{path:<4} {name:<22} p99 by second: median {:.1} ms, {over} of {} seconds over 50 ms; worst (UTC) {}",
            p99s[p99s.len() / 2],
            p99s.len(),
            worst.join(", ")
        );
        let all: Vec<String> = seconds.iter().map(|(_, p)| format!("{p:.0}")).collect();
        println!(
            "{path:<4} {name:<22} p99 (ms) of each second from {}: {}",
            utc_time(seconds[0].0),
            all.join(" ")
        );
    }
}

/// `HH:MM:SS` of a Unix time in ms, UTC.
fn utc_time(ms: i64) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would too: only run when asked.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let base = env_num("CHATSTREAM_BENCH_BASE_PORT", 29900) as u16;
    let secs = env_num("CHATSTREAM_BENCH_SECS", 60);
    let only = std::env::var("CHATSTREAM_BENCH_ONLY").ok();
    let baseline = std::env::var("CHATSTREAM_BENCH_BASELINE_BIN")
        .ok()
        .map(PathBuf::from);
    let perf = std::env::var("CHATSTREAM_BENCH_PERF")
        .ok()
        .map(PathBuf::from);
    let connections = env_num("CHATSTREAM_BENCH_CONNECTIONS", 10_000) as usize;
    // More node settings for the send-path runs, as YAML lines (`append_batchers: 1\n…`).
    let yaml_lines = |var: &str| {
        std::env::var(var)
            .ok()
            .map(|c| c.replace("\\n", "\n") + "\n")
    };
    let extra_config = yaml_lines("CHATSTREAM_BENCH_NODE_CONFIG").unwrap_or_default();
    let baseline_config =
        yaml_lines("CHATSTREAM_BENCH_BASELINE_NODE_CONFIG").unwrap_or_else(|| extra_config.clone());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let attached = std::env::var("CHATSTREAM_BENCH_STACK_DIR").ok();
    let stack = match &attached {
        Some(run_dir) => Stack::attach(std::path::Path::new(run_dir)).context("attaching")?,
        // Named by the base port: benches of different port ranges share the target dir.
        None => {
            let mut config = StackConfig::new(
                dir.join(format!("bench-stack-{base}")),
                PortPlan::from_base(base, 3)?,
            );
            if std::env::var("CHATSTREAM_BENCH_LINKS").is_ok_and(|l| l == "direct") {
                config.links = LinkMode::Direct;
            }
            Stack::up(config).await.context("stack")?
        }
    };
    let result = async {
        let postgres_url = stack.endpoints().postgres_url;
        let pg = sqlx::PgPool::connect(&postgres_url).await?;
        // A baseline build runs on a database of its own, migrated by itself: a schema
        // change of this build would otherwise be applied under the old code too (or break
        // it), and the two builds' tables would grow into each other's runs.
        let baseline_pg = match &baseline {
            Some(_) => {
                let name = "chatstream_bench_baseline";
                Some(database_of_its_own(&pg, &postgres_url, name).await?)
            }
            None => None,
        };
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        match stack.link_mode() {
            LinkMode::Proxied => println!("machine: {cores} cores; node, load generator, 3 brokers, PostgreSQL, Redis and Toxiproxy share them; every link through its proxy"),
            LinkMode::Direct => println!("machine: {cores} cores; node, load generator, 3 brokers, PostgreSQL and Redis share them; direct links (no Toxiproxy)"),
        }
        let built = PathBuf::from(env!("CARGO_BIN_EXE_chatstream"));
        if only.as_deref().is_none_or(|o| o == "memory") {
            let open_files = raise_open_files()?;
            let config = dir.join(format!("bench-node-{base}-memory.yaml"));
            std::fs::write(
                &config,
                "node_id: bench-memory\nrate_limit_per_s: 1000000\nrate_limit_burst: 1000000\npg_max_connections: 32\nsend_batching: on\n",
            )?;
            // Each count on a fresh node: a heap that already held connections would
            // reuse their freed memory and understate the next figure.
            let tag = std::process::id();
            let binaries = std::iter::once(("this build", &built))
                .chain(baseline.as_ref().map(|b| ("baseline binary", b)));
            for (k, (label, binary)) in binaries.enumerate() {
                let url = match (k, &baseline_pg) {
                    (1, Some((url, _))) => url,
                    _ => &postgres_url,
                };
                for n in [2_000, connections] {
                    let node = start_node(&stack, &config, binary, url).await?;
                    let m = connection_memory(&node, &format!("mem{n}-{k}-{tag}"), n).await?;
                    println!(
                        "{label}: connections: {n} (open-file limit {open_files}), node RSS per connection: idle {:.1} KiB, active {:.1} KiB (peak while active {:.1} KiB; {} of {} active frames answered with an error)",
                        m.idle_kib, m.active_kib, m.active_peak_kib, m.errors, 4 * n
                    );
                    drop(node);
                }
            }
        }
        // (label, send_batching, binary, baseline database): the old path, then the new
        // one, with an earlier build of the new path beside it when one is given.
        let mut runs = vec![("off".to_string(), "off", built.clone(), None)];
        if let (Some(bin), Some(db)) = (baseline.clone(), baseline_pg.as_ref()) {
            runs.push(("on, baseline binary".to_string(), "on", bin, Some(db)));
        }
        runs.push(("on".to_string(), "on", built.clone(), None));
        let mut results = Vec::new();
        for (run, (label, path, binary, db)) in runs.into_iter().enumerate() {
            let (url, pg) = match db {
                Some((url, pool)) => (url, pool),
                None => (&postgres_url, &pg),
            };
            if only.as_deref().is_some_and(|o| o != path) {
                continue;
            }
            RUN.store(run, std::sync::atomic::Ordering::Relaxed);
            let config = dir.join(format!("bench-node-{base}-{path}{run}.yaml"));
            let extra = if db.is_some() { &baseline_config } else { &extra_config };
            std::fs::write(
                &config,
                format!("node_id: bench-{path}\nrate_limit_per_s: 1000000\nrate_limit_burst: 1000000\npg_max_connections: 32\nsend_batching: {path}\n{extra}"),
            )?;
            let node = start_node(&stack, &config, &binary, url).await?;
            println!("send_batching: {path} ({label}: {})", binary.display());
            if path == "on" && binary == built {
                let (frames, wall, cpu) = throughput(&node, 16, 64, 10, ping, false).await?;
                println!(
                    "ping/pong  {frames} frames in {wall:.1} s = {:.0} frames/s; node CPU {cpu:.1} s = {:.0} frames per CPU-second (per core)",
                    frames as f64 / wall,
                    frames as f64 / cpu.max(0.001)
                );
            }
            let (frames, wall, cpu) = throughput(&node, 16, 16, 10, send, true).await?;
            println!(
                "send+ack closed loop, 16 connections x 16 in flight: {frames} in {wall:.1} s = {:.0} messages/s; node CPU {cpu:.1} s = {:.0} per CPU-second",
                frames as f64 / wall,
                frames as f64 / cpu.max(0.001)
            );
            let long = if path == "on" { secs } else { secs.min(15) };
            let tag = format!("{path}{run}x{}", std::process::id());
            let on = RunOn {
                node: &node,
                pg,
                budget: CpuBudget::of(&stack, node.0.id()),
            };
            let r100 = open_loop(
                &on,
                &format!("o100-{tag}"),
                100,
                1_000.0,
                20,
                None,
            )
            .await?;
            report(&label, "100 conns @ 1,000/s", &r100);
            let r1000 = open_loop(
                &on,
                &format!("o1000-{tag}"),
                1000,
                10_000.0,
                long,
                perf.clone().filter(|_| path == "on" && binary == built),
            )
            .await?;
            report(&label, "1,000 conns @ 10,000/s", &r1000);
            results.push((label, frames as f64 / wall, r100, r1000));
            drop(node);
        }
        if results.is_empty() {
            return Ok(());
        }
        println!();
        println!("| send path | closed loop, 16 conns | 100 conns @ 1,000/s: acked/s, p50 / p99 | 1,000 conns @ 10,000/s: acked/s, p50 / p99 / p99.9 | node µs CPU per acked message at 10,000/s | outbox at 10,000/s: published/s, backlog max |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for (path, closed, a, b) in &results {
            println!(
                "| send_batching: {path} | {closed:.0}/s | {:.0}/s, {:.1} / {:.1} ms | {:.0}/s, {:.1} / {:.1} / {:.1} ms | {:.0} | {:.0}/s, {} |",
                a.acked as f64 / a.secs,
                a.quantile_ms(0.5),
                a.quantile_ms(0.99),
                b.acked as f64 / b.secs,
                b.quantile_ms(0.5),
                b.quantile_ms(0.99),
                b.quantile_ms(0.999),
                b.node_cpu * 1e6 / b.acked.max(1) as f64,
                b.published as f64 / b.secs,
                b.backlog_max
            );
        }
        for (path, _, a, b) in &results {
            println!();
            println!("CPU by part, send_batching: {path} ({cores} cores): CPU µs per acknowledged message, and cores busy");
            println!("| part | 100 conns @ 1,000/s: µs per msg, cores | 1,000 conns @ 10,000/s offered: µs per msg, cores | cores 10,000 msgs/s would take at that cost |");
            println!("| --- | ---: | ---: | ---: |");
            let per_msg = |r: &OpenLoop, s: f64| s * 1e6 / r.acked.max(1) as f64;
            let mut totals = [0.0f64; 4];
            for ((part, sa), (_, sb)) in a.cpu.iter().zip(&b.cpu) {
                let row = [per_msg(a, *sa), sa / a.secs, per_msg(b, *sb), sb / b.secs];
                if part != "rest of the machine" {
                    for (t, v) in totals.iter_mut().zip(row) {
                        *t += v;
                    }
                }
                println!(
                    "| {part} | {:.0}, {:.2} | {:.0}, {:.2} | {:.2} |",
                    row[0], row[1], row[2], row[3], row[2] * 1e-2
                );
            }
            println!(
                "| **all parts** | {:.0}, {:.2} | {:.0}, {:.2} | **{:.2}** |",
                totals[0], totals[1], totals[2], totals[3], totals[2] * 1e-2
            );
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    // A stack attached to is someone else's to stop.
    if attached.is_none() {
        stack.down(false).await?;
    }
    result
}
