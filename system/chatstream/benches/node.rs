//! Node benchmarks on the real stack (not timed tests): memory per idle WebSocket
//! connection, and frames per second per core on the node's hot path (ping/pong: decode,
//! rate limit, encode, socket write) and on the send path (PostgreSQL append + outbox row +
//! Redis fan-out + ack). "Per core" divides frames by the node process's CPU seconds
//! (utime + stime from /proc), so it holds on a noisy shared machine.
//!
//!     cargo bench -p chatstream --bench node          # CHATSTREAM_BENCH_BASE_PORT=29900

use anyhow::{anyhow, Context, Result};
use chatstream_protocol::auth::{self, Claims};
use chatstream_protocol::{ClientFrame, ServerFrame};
use futures::{SinkExt, StreamExt};
use squall_stack::{PortPlan, Stack, StackConfig};
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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

struct NodeProc(Child, String);

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_node(stack: &Stack, config: &std::path::Path) -> Result<NodeProc> {
    let e = stack.endpoints();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatstream"))
        .args([
            "node",
            "--config",
            &config.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--postgres-url",
            &e.postgres_url,
            "--redis-url",
            &e.redis_url,
            "--kafka-bootstrap",
            &e.kafka_bootstrap,
        ])
        .args(["--token-secret", SECRET])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
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

async fn connect(addr: &str, user: &str) -> Result<Ws> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={}", token(user))).await?;
    ws.next().await.ok_or_else(|| anyhow!("no hello"))??;
    Ok(ws)
}

async fn idle_memory(node: &NodeProc, n: usize) -> Result<f64> {
    let pid = node.0.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proc_field(pid, "VmRSS:")?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(connect(&node.1, &format!("idle-{i}")).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = proc_field(pid, "VmRSS:")?;
    drop(conns);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
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

fn send(c: usize, i: u64) -> ClientFrame {
    ClientFrame::Send {
        conversation_id: format!("bench-conv-{c}"),
        client_msg_id: format!("b-{c}-{i}-{}", std::process::id()),
        body: "a benchmark message of about sixty bytes, typical of chat text".into(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would too: only run when asked.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let base = std::env::var("CHATSTREAM_BENCH_BASE_PORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(29900u16);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let stack = Stack::up(StackConfig::new(
        dir.join("bench-stack"),
        PortPlan::from_base(base, 3)?,
    ))
    .await
    .context("stack")?;
    let config = dir.join("bench-node.yaml");
    std::fs::write(&config, "node_id: bench-1\nrate_limit_per_s: 1000000\nrate_limit_burst: 1000000\npg_max_connections: 32\n")?;
    let result = async {
        let node = start_node(&stack, &config).await?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        println!("machine: {cores} cores; node and load generator share them");
        let per_conn_kib = idle_memory(&node, 2000).await?;
        println!("idle connections: 2000, node RSS per connection {per_conn_kib:.1} KiB");
        for (name, make, setup, window) in [("ping/pong", ping as fn(usize, u64) -> ClientFrame, false, 64), ("send+ack", send, true, 16)] {
            let (frames, wall, cpu) = throughput(&node, 16, window, 10, make, setup).await?;
            println!(
                "{name:<10} {frames} frames in {wall:.1} s = {:.0} frames/s; node CPU {cpu:.1} s = {:.0} frames per CPU-second (per core)",
                frames as f64 / wall,
                frames as f64 / cpu.max(0.001)
            );
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    stack.down(false).await?;
    result
}
