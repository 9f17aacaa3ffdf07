//! Shared helpers of chatstream's real-stack test binaries (`nodes`, `workers`, `replay`):
//! tokens, spawning `chatstream node` / `chatstream workers` processes, WebSocket clients,
//! producing and reading Kafka records, dead letters, lag waits, metric scraping.
//! Each binary uses a part of it, hence `allow(dead_code)`.
#![allow(dead_code)]

use anyhow::{anyhow, bail, ensure, Context, Result};
use chatstream_protocol::auth::{self, Claims};
use chatstream_protocol::frames::ErrorCode;
use chatstream_protocol::{ClientFrame, EventBody, EventEnvelope, ServerFrame};
use futures::{SinkExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use squall_stack::testing::eventually;
use squall_stack::Stack;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "squall-test-secret";

pub const TENANT: &str = "acme";

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

pub fn uuid_like() -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", ns)
}

pub fn token(user: &str, ttl_s: i64) -> String {
    token_in(TENANT, user, ttl_s)
}

/// A token for `user` of `tenant`.
pub fn token_in(tenant: &str, user: &str, ttl_s: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    auth::sign(
        SECRET.as_bytes(),
        &Claims {
            sub: user.into(),
            tenant: tenant.into(),
            exp: (now + ttl_s).max(0) as u64,
        },
    )
    .unwrap_or_default()
}

/// The `chatstream` binary under test: this build's, unless CHATSTREAM_TEST_BIN names another.
pub fn chatstream_bin() -> String {
    std::env::var("CHATSTREAM_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_chatstream").to_string())
}

/// Each node's log goes to `target/tmp/node-logs/<id>.log` (appended), out of the test output.
pub fn node_log(id: &str) -> Result<std::fs::File> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-logs");
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{id}.log")))?)
}

/// A `chatstream node` process, stopped (SIGKILL) when dropped.
pub struct Node {
    pub child: Child,
    pub addr: String,
    pub id: String,
}

/// Starts `chatstream <args>` (stderr to its log) and reads the address from the
/// "listening" line it prints first.
pub async fn spawn_chatstream(args: Vec<String>, log_id: &str) -> Result<(Child, String)> {
    spawn_chatstream_logging(args, log_id, DEFAULT_LOG_FILTER).await
}

pub const DEFAULT_LOG_FILTER: &str = "info,librdkafka=warn,rdkafka=warn,sqlx=warn";

/// `spawn_chatstream` with a log filter of the test's choice (RUST_LOG).
pub async fn spawn_chatstream_logging(
    args: Vec<String>,
    log_id: &str,
    log_filter: &str,
) -> Result<(Child, String)> {
    let mut child = Command::new(chatstream_bin())
        .args(&args)
        .env("RUST_LOG", log_filter)
        .stdout(Stdio::piped())
        .stderr(node_log(log_id)?)
        .spawn()
        .with_context(|| {
            format!(
                "spawning chatstream {}",
                args.first().cloned().unwrap_or_default()
            )
        })?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("first line of {log_id}: {line:?}"))?;
    let addr = v["addr"]
        .as_str()
        .ok_or_else(|| anyhow!("no addr in {line}"))?
        .to_string();
    Ok((child, addr))
}

pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl Node {
    pub async fn start(stack: &Stack, id: &str, extra: &[&str]) -> Result<Node> {
        Self::start_logging(stack, id, extra, DEFAULT_LOG_FILTER).await
    }

    pub async fn start_logging(
        stack: &Stack,
        id: &str,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<Node> {
        let node = Self::spawn_logging(stack, id, extra, log_filter).await?;
        node.wait_ready(Duration::from_secs(60)).await?;
        Ok(node)
    }

    /// Starts a node without waiting for it to be ready (one whose relay is stuck on a
    /// batch never reports ready).
    pub async fn spawn(stack: &Stack, id: &str, extra: &[&str]) -> Result<Node> {
        Self::spawn_logging(stack, id, extra, DEFAULT_LOG_FILTER).await
    }

    async fn spawn_logging(
        stack: &Stack,
        id: &str,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<Node> {
        let e = stack.endpoints();
        let mut args = strings(&["node", "--node-id", id, "--listen", "127.0.0.1:0"]);
        args.extend(strings(&[
            "--postgres-url",
            &e.postgres_url,
            "--redis-url",
            &e.redis_url,
        ]));
        args.extend(strings(&[
            "--kafka-bootstrap",
            &e.kafka_bootstrap,
            "--token-secret",
            SECRET,
        ]));
        args.extend(strings(extra));
        let (child, addr) = spawn_chatstream_logging(args, id, log_filter).await?;
        Ok(Node {
            child,
            addr,
            id: id.to_string(),
        })
    }

    pub async fn readyz(&self) -> Result<(u16, serde_json::Value)> {
        let r = reqwest::get(format!("http://{}/readyz", self.addr)).await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.readyz().await {
                Ok((200, _)) => return Ok(()),
                Ok((_, body)) if start.elapsed() > timeout => {
                    bail!("{} not ready: {body}", self.id)
                }
                Err(e) if start.elapsed() > timeout => bail!("{} not ready: {e}", self.id),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Waits until /readyz answers 503 and reports `backend` down.
    pub async fn wait_unready(&self, backend: &str, timeout: Duration) -> Result<()> {
        eventually(
            &format!("readyz reports {backend} down"),
            timeout,
            || async {
                let (code, body) = self.readyz().await?;
                ensure!(
                    code == 503 && body[backend] == false,
                    "readyz says {code} {body}"
                );
                Ok(())
            },
        )
        .await
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `chatstream workers` process, stopped (SIGKILL) when dropped.
pub struct Workers {
    pub child: Child,
    pub addr: String,
}

impl Workers {
    pub async fn start(
        stack: &Stack,
        only: &str,
        group_prefix: &str,
        extra: &[&str],
    ) -> Result<Workers> {
        let e = stack.endpoints();
        let mut args = strings(&["workers", "--only", only, "--group-prefix", group_prefix]);
        args.extend(strings(&[
            "--postgres-url",
            &e.postgres_url,
            "--kafka-bootstrap",
            &e.kafka_bootstrap,
        ]));
        args.extend(strings(extra));
        let (child, addr) = spawn_chatstream(args, &format!("workers-{group_prefix}")).await?;
        Ok(Workers { child, addr })
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(&mut self) -> Result<std::process::ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        wait_exit(&mut self.child, Duration::from_secs(30)).await
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        ensure!(
            start.elapsed() < timeout,
            "process did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `group` has no lag on `topics`.
pub async fn caught_up(
    stack: &Stack,
    group: &str,
    topics: &[&str],
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let (b, g, t) = (
            stack.endpoints().kafka_bootstrap,
            group.to_string(),
            strings(topics),
        );
        let lags =
            tokio::task::spawn_blocking(move || chatstream_replay::lag(&b, &g, &t)).await??;
        let total: i64 = lags.iter().map(|l| l.lag).sum();
        if total == 0 && lags.iter().all(|l| l.committed.is_some() || l.end == 0) {
            return Ok(());
        }
        ensure!(
            start.elapsed() < timeout,
            "{group} still lags {total} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn producer(stack: &Stack) -> Result<rdkafka::producer::FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", stack.endpoints().kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()?)
}

pub async fn produce(
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    ts: Option<i64>,
) -> Result<(i32, i64)> {
    let mut r = rdkafka::producer::FutureRecord::to(topic)
        .key(key)
        .payload(payload);
    if let Some(ts) = ts {
        r = r.timestamp(ts);
    }
    let d = p
        .send(r, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow!("produce to {topic}: {e}"))?;
    Ok((d.partition, d.offset))
}

pub fn chat_event(conversation: &str, body: &str, ts_ms: i64) -> EventEnvelope {
    let id = unique("evt");
    EventEnvelope {
        id: id.clone(),
        version: chatstream_protocol::EVENT_VERSION,
        timestamp: "2026-01-01T00:00:00.000Z".into(),
        timestamp_ms: ts_ms,
        tenant: TENANT.into(),
        trace_id: "t".into(),
        source_node: "test".into(),
        conversation_id: Some(conversation.into()),
        session_id: None,
        user_id: Some("alice".into()),
        message_id: Some(id.clone()),
        replayed: false,
        body: EventBody::ChatMessage(chatstream_protocol::events::ChatMessage {
            message_id: id,
            client_msg_id: unique("c"),
            conversation_id: conversation.into(),
            sender_id: "alice".into(),
            seq: 1,
            body: body.into(),
            created_at_ms: ts_ms,
        }),
    }
}

pub async fn pg(stack: &Stack) -> Result<sqlx::PgPool> {
    Ok(sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?)
}

pub async fn create_conversation(
    node: &Node,
    creator: &str,
    id: &str,
    members: &[&str],
) -> Result<()> {
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/conversations", node.addr))
        .bearer_auth(token(creator, 600))
        .json(&serde_json::json!({ "id": id, "members": members }))
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 201,
        "create conversation: {} {}",
        r.status(),
        r.text().await?
    );
    Ok(())
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
}

impl Client {
    pub async fn connect(node: &Node, user: &str) -> Result<Client> {
        Self::connect_with(node, user, &token(user, 600)).await
    }

    /// Connects `user` of `tenant` (the other helpers use TENANT).
    pub async fn connect_in(node: &Node, tenant: &str, user: &str) -> Result<Client> {
        Self::connect_with(
            node,
            &format!("{user}@{tenant}"),
            &token_in(tenant, user, 600),
        )
        .await
    }

    pub async fn connect_with(node: &Node, user: &str, token: &str) -> Result<Client> {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", node.addr))
                .await?;
        let mut c = Client {
            ws,
            user: user.to_string(),
        };
        let hello = c.recv().await?;
        ensure!(
            matches!(hello, ServerFrame::Hello { .. }),
            "expected hello, got {hello:?}"
        );
        Ok(c)
    }

    pub async fn send(&mut self, f: &ClientFrame) -> Result<()> {
        self.ws.send(Message::text(f.encode())).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    pub async fn recv(&mut self) -> Result<ServerFrame> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .map_err(|_| anyhow!("{}: no frame within 10 s", self.user))?
                .ok_or_else(|| anyhow!("{}: connection closed", self.user))??;
            match m {
                Message::Text(t) => return Ok(ServerFrame::decode(&t)?),
                Message::Close(c) => bail!("{}: closed: {c:?}", self.user),
                _ => continue,
            }
        }
    }

    /// Reads frames until `pick` returns Some (frames it ignores are skipped).
    pub async fn until<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> Result<T> {
        loop {
            let f = self.recv().await?;
            if let Some(t) = pick(&f) {
                return Ok(t);
            }
        }
    }

    pub async fn send_msg(
        &mut self,
        conv: &str,
        client_msg_id: &str,
        body: &str,
    ) -> Result<(i64, bool)> {
        self.send(&ClientFrame::Send {
            conversation_id: conv.into(),
            client_msg_id: client_msg_id.into(),
            body: body.into(),
        })
        .await?;
        let cid = client_msg_id.to_string();
        self.until(|f| match f {
            ServerFrame::Ack {
                client_msg_id,
                seq,
                duplicate,
                ..
            } if *client_msg_id == cid => Some(Ok((*seq, *duplicate))),
            ServerFrame::Error {
                ref_id: Some(r),
                code,
                message,
                ..
            } if *r == cid => Some(Err(anyhow!("{code:?}: {message}"))),
            _ => None,
        })
        .await?
    }

    /// Sends a message and returns its ack as (conversation_id, message_id, seq, duplicate).
    pub async fn send_for_ack(
        &mut self,
        conv: &str,
        client_msg_id: &str,
        body: &str,
    ) -> Result<(String, String, i64, bool)> {
        self.send(&ClientFrame::Send {
            conversation_id: conv.into(),
            client_msg_id: client_msg_id.into(),
            body: body.into(),
        })
        .await?;
        let cid = client_msg_id.to_string();
        self.until(|f| match f {
            ServerFrame::Ack {
                client_msg_id,
                conversation_id,
                message_id,
                seq,
                duplicate,
                ..
            } if *client_msg_id == cid => Some(Ok((
                conversation_id.clone(),
                message_id.clone(),
                *seq,
                *duplicate,
            ))),
            ServerFrame::Error {
                ref_id: Some(r),
                code,
                message,
                ..
            } if *r == cid => Some(Err(anyhow!("{code:?}: {message}"))),
            _ => None,
        })
        .await?
    }

    /// Sends a ping and waits for the pong: proves the connection still serves.
    pub async fn still_serves(&mut self) -> Result<()> {
        let nonce = 4242;
        self.send(&ClientFrame::Ping { nonce: Some(nonce) }).await?;
        self.until(|f| {
            matches!(f, ServerFrame::Pong { nonce: Some(n), .. } if *n == nonce).then_some(())
        })
        .await
    }

    pub async fn expect_error(&mut self, code: ErrorCode) -> Result<String> {
        self.until(|f| match f {
            ServerFrame::Error {
                code: c, message, ..
            } if *c == code => Some(message.clone()),
            _ => None,
        })
        .await
    }
}

/// Every decodable event of `topic`, all partitions, from the beginning to the end
/// offsets taken at the start.
pub async fn read_events(bootstrap: &str, topic: &str) -> Result<Vec<EventEnvelope>> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<EventEnvelope>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in &parts {
            let (_, high) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10))?;
            ends.insert(*p, high);
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut pos: BTreeMap<i32, i64> = parts.iter().map(|p| (*p, 0)).collect();
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while pos.iter().any(|(p, o)| *o < ends[p]) && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(300)) {
                let m = m?;
                pos.insert(m.partition(), m.offset() + 1);
                if let Some(e) = m.payload().and_then(|b| EventEnvelope::from_slice(b).ok()) {
                    events.push(e);
                }
            }
        }
        Ok(events)
    })
    .await?
}

/// Waits until every message id in `ids` has its CHAT_MESSAGE event on chat-events.
pub async fn wait_published(
    stack: &Stack,
    ids: &[String],
    timeout: Duration,
    what: &str,
) -> Result<()> {
    let bootstrap = stack.endpoints().kafka_bootstrap;
    eventually(what, timeout, || async {
        let published = chat_event_ids(&bootstrap).await?;
        let missing = ids.iter().filter(|id| !published.contains_key(*id)).count();
        ensure!(
            missing == 0,
            "{missing} of {} not on chat-events",
            ids.len()
        );
        Ok(())
    })
    .await
}

/// Messages of chat-events as (message id → count).
pub async fn chat_event_ids(bootstrap: &str) -> Result<BTreeMap<String, usize>> {
    let mut ids = BTreeMap::new();
    for e in read_events(bootstrap, "chat-events").await? {
        if let EventBody::ChatMessage(c) = e.body {
            *ids.entry(c.message_id).or_default() += 1;
        }
    }
    Ok(ids)
}

/// The type names of `session`'s events on stream-events, in order, once `done` holds.
pub async fn session_events(
    bootstrap: &str,
    session: &str,
    done: impl Fn(&[String]) -> bool,
) -> Result<Vec<String>> {
    let start = Instant::now();
    loop {
        let types: Vec<String> = read_events(bootstrap, "stream-events")
            .await?
            .into_iter()
            .filter(|e| e.session_id.as_deref() == Some(session))
            .map(|e| e.body.type_name().to_string())
            .collect();
        if done(&types) || start.elapsed() > Duration::from_secs(20) {
            return Ok(types);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A dead letter: its payload and headers.
pub type DeadLetter = (Vec<u8>, BTreeMap<String, String>);

/// Every record of chat-events-dlq (to its current end) with its headers.
pub async fn dead_letters(bootstrap: &str) -> Result<Vec<DeadLetter>> {
    let b = bootstrap.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<DeadLetter>> {
        let ranges = chatstream_replay::ranges_all(&b, "chat-events-dlq")?;
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", unique("dlq"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for r in &ranges {
            tpl.add_partition_offset("chat-events-dlq", r.partition, Offset::Offset(r.from))?;
        }
        c.assign(&tpl)?;
        let total: i64 = ranges.iter().map(|r| r.len()).sum();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (out.len() as i64) < total && Instant::now() < deadline {
            if let Some(m) = c.poll(Duration::from_millis(300)) {
                let m = m?;
                let mut h = BTreeMap::new();
                if let Some(hs) = m.headers() {
                    use rdkafka::message::Headers;
                    for hd in hs.iter() {
                        h.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push((m.payload().unwrap_or_default().to_vec(), h));
            }
        }
        Ok(out)
    })
    .await?
}

pub fn stream_event(session: &str, body: EventBody, replayed: bool) -> EventEnvelope {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    EventEnvelope {
        id: unique("evt"),
        version: chatstream_protocol::EVENT_VERSION,
        timestamp: "2026-11-25T09:00:00.000Z".into(),
        timestamp_ms: now,
        tenant: TENANT.into(),
        trace_id: "t".into(),
        source_node: "test".into(),
        conversation_id: Some("c".into()),
        session_id: Some(session.into()),
        user_id: Some("alice".into()),
        message_id: Some("m".into()),
        replayed,
        body,
    }
}

pub fn completed(session: &str, latency_ms: u64) -> EventBody {
    EventBody::StreamCompleted(chatstream_protocol::events::StreamCompleted {
        session_id: session.into(),
        message_id: "m".into(),
        conversation_id: "c".into(),
        total_chunks: 2,
        content_length: 10,
        total_latency_ms: latency_ms,
        words: 2,
        tokens_used: 3,
        response: "hello world ".into(),
    })
}

// ---------------------------------------------------------------------------------------
// Redis outages, identities, membership, ordering, publish mode none, TCP_NODELAY.
/// Every record of `topic` from the beginning to the end offsets taken at the start, as
/// raw JSON (so event types this test binary does not know are seen too).
pub async fn read_raw_events(bootstrap: &str, topic: &str) -> Result<Vec<serde_json::Value>> {
    let b = bootstrap.to_string();
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<serde_json::Value>> {
        let ranges = chatstream_replay::ranges_all(&b, &t)?;
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", unique("raw"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            tpl.add_partition_offset(&t, r.partition, Offset::Offset(r.from))?;
            ends.insert(r.partition, r.from + r.len());
        }
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        c.assign(&tpl)?;
        let mut pos: BTreeMap<i32, i64> = BTreeMap::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ends
            .iter()
            .any(|(p, e)| pos.get(p).copied().unwrap_or(0) < *e)
            && Instant::now() < deadline
        {
            if let Some(m) = c.poll(Duration::from_millis(300)) {
                let m = m?;
                pos.insert(m.partition(), m.offset() + 1);
                if let Some(v) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                {
                    out.push(v);
                }
            }
        }
        Ok(out)
    })
    .await?
}

pub async fn post_json(
    node: &Node,
    path: &str,
    as_user: &str,
    body: serde_json::Value,
) -> Result<(u16, serde_json::Value)> {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", node.addr))
        .bearer_auth(token(as_user, 600))
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// Slow, silent and abusive clients.
/// Writes a node config of `yaml` for test `name` and returns its path.
pub fn node_config(name: &str, yaml: &str) -> Result<String> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    Ok(path.display().to_string())
}

/// The sum of a Prometheus metric's samples on `node` (0 when absent).
pub async fn metric(node: &Node, name: &str) -> Result<f64> {
    let text = reqwest::get(format!("http://{}/metrics", node.addr))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
