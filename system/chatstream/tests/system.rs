//! chatstream on the real stack (three Kafka brokers, Redis, PostgreSQL, Toxiproxy): real
//! `chatstream node` and `chatstream workers` processes, real WebSocket clients, real
//! replays. One stack for the binary (libtest-mimic, tests one at a time); processes are
//! started per test and stopped by pid.
//! Ports: CHATSTREAM_TEST_BASE_PORT (default 29700) for the stack.

use anyhow::{anyhow, bail, ensure, Context, Result};
use chatstream_protocol::auth::{self, Claims};
use chatstream_protocol::frames::{ErrorCode, MessageStatus, StreamOutcome, Via};
use chatstream_protocol::{ClientFrame, EventBody, EventEnvelope, ServerFrame};
use futures::{SinkExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use squall_stack::testing::{eventually, SharedStack};
use squall_stack::{stack_test, Stack};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SECRET: &str = "squall-test-secret";
const TENANT: &str = "acme";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", ns)
}

fn token(user: &str, ttl_s: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    auth::sign(
        SECRET.as_bytes(),
        &Claims {
            sub: user.into(),
            tenant: TENANT.into(),
            exp: (now + ttl_s).max(0) as u64,
        },
    )
    .unwrap_or_default()
}

/// Each node's log goes to `target/tmp/node-logs/<id>.log` (appended), out of the test output.
fn node_log(id: &str) -> Result<std::fs::File> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-logs");
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{id}.log")))?)
}

/// A `chatstream node` process, stopped (SIGKILL) when dropped.
struct Node {
    child: Child,
    addr: String,
    id: String,
}

/// Starts `chatstream <args>` (stderr to its log) and reads the address from the
/// "listening" line it prints first.
async fn spawn_chatstream(args: Vec<String>, log_id: &str) -> Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatstream"))
        .args(&args)
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn,sqlx=warn")
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

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

impl Node {
    async fn start(stack: &Stack, id: &str, extra: &[&str]) -> Result<Node> {
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
        let (child, addr) = spawn_chatstream(args, id).await?;
        let node = Node {
            child,
            addr,
            id: id.to_string(),
        };
        node.wait_ready(Duration::from_secs(60)).await?;
        Ok(node)
    }

    async fn readyz(&self) -> Result<(u16, serde_json::Value)> {
        let r = reqwest::get(format!("http://{}/readyz", self.addr)).await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
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
    async fn wait_unready(&self, backend: &str, timeout: Duration) -> Result<()> {
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

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `chatstream workers` process, stopped (SIGKILL) when dropped.
struct Workers {
    child: Child,
    addr: String,
}

impl Workers {
    async fn start(
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
    async fn stop(&mut self) -> Result<std::process::ExitStatus> {
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

async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
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
async fn caught_up(stack: &Stack, group: &str, topics: &[&str], timeout: Duration) -> Result<()> {
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

fn producer(stack: &Stack) -> Result<rdkafka::producer::FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", stack.endpoints().kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()?)
}

async fn produce(
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

fn chat_event(conversation: &str, body: &str, ts_ms: i64) -> EventEnvelope {
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

async fn pg(stack: &Stack) -> Result<sqlx::PgPool> {
    Ok(sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?)
}

async fn create_conversation(node: &Node, creator: &str, id: &str, members: &[&str]) -> Result<()> {
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

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    user: String,
}

impl Client {
    async fn connect(node: &Node, user: &str) -> Result<Client> {
        Self::connect_with(node, user, &token(user, 600)).await
    }

    async fn connect_with(node: &Node, user: &str, token: &str) -> Result<Client> {
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

    async fn send(&mut self, f: &ClientFrame) -> Result<()> {
        self.ws.send(Message::text(f.encode())).await?;
        Ok(())
    }

    async fn send_raw(&mut self, m: Message) -> Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<ServerFrame> {
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
    async fn until<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> Result<T> {
        loop {
            let f = self.recv().await?;
            if let Some(t) = pick(&f) {
                return Ok(t);
            }
        }
    }

    async fn send_msg(
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

    /// Sends a ping and waits for the pong: proves the connection still serves.
    async fn still_serves(&mut self) -> Result<()> {
        let nonce = 4242;
        self.send(&ClientFrame::Ping { nonce: Some(nonce) }).await?;
        self.until(|f| {
            matches!(f, ServerFrame::Pong { nonce: Some(n), .. } if *n == nonce).then_some(())
        })
        .await
    }

    async fn expect_error(&mut self, code: ErrorCode) -> Result<String> {
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
async fn read_events(bootstrap: &str, topic: &str) -> Result<Vec<EventEnvelope>> {
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
async fn wait_published(
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
async fn chat_event_ids(bootstrap: &str) -> Result<BTreeMap<String, usize>> {
    let mut ids = BTreeMap::new();
    for e in read_events(bootstrap, "chat-events").await? {
        if let EventBody::ChatMessage(c) = e.body {
            *ids.entry(c.message_id).or_default() += 1;
        }
    }
    Ok(ids)
}

/// The type names of `session`'s events on stream-events, in order, once `done` holds.
async fn session_events(
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

// ---------------------------------------------------------------------------------------

async fn clients_on_different_nodes_exchange_messages(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    let (seq, dup) = alice.send_msg(&conv, "a-1", "hello bob").await?;
    ensure!(seq == 1 && !dup, "seq {seq} dup {dup}");
    let got = bob
        .until(|f| match f {
            ServerFrame::Msg {
                body,
                seq,
                via: Via::Live,
                sender_id,
                ..
            } => Some((body.clone(), *seq, sender_id.clone())),
            _ => None,
        })
        .await?;
    ensure!(
        got == ("hello bob".to_string(), 1, "alice".to_string()),
        "{got:?}"
    );
    alice
        .until(|f| matches!(f, ServerFrame::Status { status: MessageStatus::Delivered, user_id, seq: 1, .. } if user_id == "bob").then_some(()))
        .await
        .context("DELIVERED back to alice")?;
    bob.send(&ClientFrame::Read {
        conversation_id: conv.clone(),
        up_to_seq: 1,
    })
    .await?;
    alice
        .until(|f| matches!(f, ServerFrame::Status { status: MessageStatus::Read, user_id, seq: 1, .. } if user_id == "bob").then_some(()))
        .await
        .context("READ back to alice")?;
    bob.send(&ClientFrame::Typing {
        conversation_id: conv.clone(),
        is_typing: true,
    })
    .await?;
    alice
        .until(|f| {
            matches!(f, ServerFrame::Typing { user_id, is_typing: true, .. } if user_id == "bob")
                .then_some(())
        })
        .await
        .context("typing to alice")?;
    let (seq2, _) = bob.send_msg(&conv, "b-1", "hi alice").await?;
    ensure!(seq2 == 2, "second message got seq {seq2}");
    alice
        .until(|f| matches!(f, ServerFrame::Msg { seq: 2, .. }).then_some(()))
        .await?;
    Ok(())
}

async fn retried_send_is_stored_once(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut a1 = Client::connect(&n1, "alice").await?;
    let (seq, dup) = a1.send_msg(&conv, "retry-me", "once").await?;
    ensure!(!dup);
    // The same send again, on the same node and after a reconnect to another node.
    let (seq_again, dup_again) = a1.send_msg(&conv, "retry-me", "once").await?;
    let mut a2 = Client::connect(&n2, "alice").await?;
    let (seq_elsewhere, dup_elsewhere) = a2.send_msg(&conv, "retry-me", "once").await?;
    ensure!(
        seq == seq_again && seq == seq_elsewhere,
        "seqs {seq} {seq_again} {seq_elsewhere}"
    );
    ensure!(
        dup_again && dup_elsewhere,
        "retries not flagged as duplicates"
    );
    let history: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "http://{}/api/conversations/{conv}/messages",
            n2.addr
        ))
        .bearer_auth(token("alice", 60))
        .send()
        .await?
        .json()
        .await?;
    let n = history["messages"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(n == 1, "stored {n} times: {history}");
    Ok(())
}

async fn sync_returns_what_a_client_missed(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for i in 1..=5 {
        alice
            .send_msg(&conv, &format!("m{i}"), &format!("body {i}"))
            .await?;
    }
    let mut bob = Client::connect(&n2, "bob").await?;
    bob.send(&ClientFrame::Sync {
        conversation_id: conv.clone(),
        after_seq: 2,
        limit: None,
    })
    .await?;
    let mut seqs = Vec::new();
    loop {
        match bob.recv().await? {
            ServerFrame::Msg {
                seq,
                via: Via::Sync,
                ..
            } => seqs.push(seq),
            ServerFrame::SyncDone { last_seq, more, .. } => {
                ensure!(last_seq == 5 && !more, "sync_done {last_seq} {more}");
                break;
            }
            _ => {}
        }
    }
    ensure!(seqs == [3, 4, 5], "synced {seqs:?}");
    Ok(())
}

async fn non_members_can_neither_send_nor_read(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut carol = Client::connect(&n1, "carol").await?;
    carol
        .send(&ClientFrame::Send {
            conversation_id: conv.clone(),
            client_msg_id: "c1".into(),
            body: "let me in".into(),
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    carol
        .send(&ClientFrame::Sync {
            conversation_id: conv.clone(),
            after_seq: 0,
            limit: None,
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    carol
        .send(&ClientFrame::Read {
            conversation_id: conv.clone(),
            up_to_seq: 1,
        })
        .await?;
    carol.expect_error(ErrorCode::NotMember).await?;
    carol.still_serves().await?;
    let r = reqwest::Client::new()
        .get(format!(
            "http://{}/api/conversations/{conv}/messages",
            n1.addr
        ))
        .bearer_auth(token("carol", 60))
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 403,
        "history for a non-member: {}",
        r.status()
    );
    Ok(())
}

async fn bad_input_gets_error_frames_and_the_connection_stays(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send_raw(Message::text("{this is not json")).await?;
    c.expect_error(ErrorCode::MalformedFrame).await?;
    c.still_serves().await?;
    c.send_raw(Message::text(r#"{"v":1,"type":"teleport","to":"mars"}"#))
        .await?;
    let msg = c.expect_error(ErrorCode::UnknownType).await?;
    ensure!(msg.contains("teleport"), "{msg}");
    c.send_raw(Message::text(r#"{"v":9,"type":"ping"}"#))
        .await?;
    c.expect_error(ErrorCode::UnsupportedVersion).await?;
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await?;
    c.expect_error(ErrorCode::MalformedFrame).await?;
    let huge = ClientFrame::Send {
        conversation_id: conv.clone(),
        client_msg_id: "big".into(),
        body: "x".repeat(70 * 1024),
    };
    c.send(&huge).await?;
    let msg = c.expect_error(ErrorCode::FrameTooLarge).await?;
    ensure!(msg.contains("65536"), "{msg}");
    c.still_serves().await?;
    // Nothing already accepted is lost: a message sent before the flood is still there.
    let (seq, _) = c.send_msg(&conv, "before-flood", "kept").await?;
    for i in 0..300 {
        c.send(&ClientFrame::Ping { nonce: Some(i) }).await?;
    }
    let wait = c
        .until(|f| match f {
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            } => Some(*retry_after_ms),
            _ => None,
        })
        .await?;
    ensure!(
        wait.is_some_and(|w| w > 0),
        "rate_limited without retry_after_ms"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.still_serves().await?;
    c.send(&ClientFrame::Sync {
        conversation_id: conv,
        after_seq: 0,
        limit: None,
    })
    .await?;
    c.until(|f| matches!(f, ServerFrame::Msg { seq: s, .. } if *s == seq).then_some(()))
        .await?;
    Ok(())
}

async fn bad_tokens_close_with_a_reason(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let forged = auth::sign(
        b"not-the-secret",
        &Claims {
            sub: "mallory".into(),
            tenant: TENANT.into(),
            exp: u64::MAX / 2,
        },
    )?;
    for (what, t) in [
        ("expired", token("alice", -10)),
        ("forged", forged),
        ("garbage", "abc".to_string()),
    ] {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?token={t}", n1.addr)).await?;
        let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await?
            .ok_or_else(|| anyhow!("{what}: no frame"))??;
        let Message::Text(text) = first else {
            bail!("{what}: expected an error frame, got {first:?}")
        };
        let frame = ServerFrame::decode(&text)?;
        ensure!(
            matches!(
                frame,
                ServerFrame::Error {
                    code: ErrorCode::Unauthorized,
                    ..
                }
            ),
            "{what}: {frame:?}"
        );
        let close = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await?
            .ok_or_else(|| anyhow!("{what}: no close"))??;
        match close {
            Message::Close(Some(cf)) => ensure!(
                u16::from(cf.code) == 4401 && !cf.reason.is_empty(),
                "{what}: close {cf:?}"
            ),
            other => bail!("{what}: expected close, got {other:?}"),
        }
    }
    Ok(())
}

async fn killed_node_s_outbox_rows_are_published_by_another(stack: &mut Stack) -> Result<()> {
    let mut a = Node::start(stack, "node-a", &["--no-relay"]).await?;
    let conv = unique("conv");
    create_conversation(&a, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&a, "alice").await?;
    let mut ids = BTreeSet::new();
    for i in 0..50 {
        let cid = format!("k{i}");
        alice.send_msg(&conv, &cid, "survive kill -9").await?;
        ids.insert(cid);
    }
    let pool = sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?;
    let message_ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1")
            .bind(&conv)
            .fetch_all(&pool)
            .await?;
    ensure!(message_ids.len() == 50);
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at_ms IS NULL AND key = $1",
    )
    .bind(&conv)
    .fetch_one(&pool)
    .await?;
    ensure!(
        pending == 50,
        "{pending} rows pending before the kill (node-a runs no relay)"
    );
    eprintln!(
        "  kill -9 node-a (pid {}) with {pending} unpublished rows",
        a.pid()
    );
    a.kill9();
    let _b = Node::start(stack, "node-b", &[]).await?;
    let start = Instant::now();
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE published_at_ms IS NULL AND key = $1",
        )
        .bind(&conv)
        .fetch_one(&pool)
        .await?;
        if pending == 0 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "{pending} rows still unpublished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let published = chat_event_ids(&stack.endpoints().kafka_bootstrap).await?;
    let missing: Vec<_> = message_ids
        .iter()
        .filter(|id| !published.contains_key(*id))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} acknowledged messages missing from chat-events: {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    Ok(())
}

async fn stream_resumed_on_another_node_delivers_every_chunk(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let n2 = Node::start(stack, "node-2", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv.clone(),
        prompt: "tell me about replay".into(),
    })
    .await?;
    let session = c
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    let mut seen: Vec<i64> = Vec::new();
    while seen.len() < 4 {
        if let ServerFrame::Chunk { index, .. } = c.recv().await? {
            seen.push(index);
        }
    }
    drop(c); // the client goes away mid-stream
    let last = *seen.last().unwrap_or(&-1);
    let mut c2 = Client::connect(&n2, "alice").await?;
    c2.send(&ClientFrame::Resume {
        session_id: session.clone(),
        after_index: last,
    })
    .await?;
    let total = loop {
        match c2.recv().await? {
            ServerFrame::Chunk { index, .. } => seen.push(index),
            ServerFrame::StreamEnd {
                outcome: StreamOutcome::Completed,
                total_chunks,
                ..
            } => break total_chunks,
            ServerFrame::StreamEnd { outcome, error, .. } => {
                bail!("stream ended {outcome:?}: {error:?}")
            }
            _ => {}
        }
    };
    let expected: Vec<i64> = (0..total).collect();
    ensure!(
        seen == expected,
        "chunks seen {seen:?}, expected 0..{total}"
    );
    let unique_count = seen.iter().collect::<HashSet<_>>().len();
    ensure!(unique_count == seen.len(), "duplicated chunks");
    // The session's timeline on stream-events, in order (one partition per session key).
    let types = session_events(&stack.endpoints().kafka_bootstrap, &session, |t| {
        t.iter().any(|x| x == "RECOVERY_ATTEMPT") && t.iter().any(|x| x == "STREAM_COMPLETED")
    })
    .await?;
    let chunks = types.iter().filter(|t| *t == "CHUNK_RECEIVED").count() as i64;
    ensure!(
        types.first().map(String::as_str) == Some("SESSION_STARTED"),
        "timeline {types:?}"
    );
    ensure!(
        chunks == total,
        "{chunks} CHUNK_RECEIVED events for {total} chunks"
    );
    ensure!(
        types.iter().any(|t| t == "STREAM_COMPLETED")
            && types.iter().any(|t| t == "RECOVERY_ATTEMPT"),
        "timeline {types:?}"
    );
    // A session that does not exist is a clear not_found.
    c2.send(&ClientFrame::Resume {
        session_id: "no-such-session".into(),
        after_index: -1,
    })
    .await?;
    c2.expect_error(ErrorCode::NotFound).await?;
    Ok(())
}

async fn failing_stream_ends_failed_with_stream_error(stack: &mut Stack) -> Result<()> {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("failing-stream.yaml");
    std::fs::write(&config, "stream:\n  error_rate: 1.0\n  pace_ms: 10\n")?;
    let n1 = Node::start(
        stack,
        "fail-1",
        &["--config", &config.display().to_string()],
    )
    .await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv,
        prompt: "this one fails".into(),
    })
    .await?;
    let session = c
        .until(|f| match f {
            ServerFrame::StreamStarted { session_id, .. } => Some(session_id.clone()),
            _ => None,
        })
        .await?;
    let (outcome, error) = c
        .until(|f| match f {
            ServerFrame::StreamEnd { outcome, error, .. } => Some((*outcome, error.clone())),
            _ => None,
        })
        .await?;
    ensure!(
        outcome == StreamOutcome::Failed && error.is_some(),
        "{outcome:?} {error:?}"
    );
    let types = session_events(&stack.endpoints().kafka_bootstrap, &session, |t| {
        t.iter().any(|x| x == "STREAM_ERROR")
    })
    .await?;
    ensure!(
        types.iter().any(|t| t == "STREAM_ERROR"),
        "no STREAM_ERROR in {types:?}"
    );
    ensure!(
        !types.iter().any(|t| t == "STREAM_COMPLETED"),
        "a failed stream reported completion: {types:?}"
    );
    Ok(())
}

async fn readyz_follows_redis_and_the_node_recovers(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "node-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    stack.cut("redis").await?;
    n1.wait_unready("redis", Duration::from_secs(15)).await?;
    // PostgreSQL is up: a send is still stored and acknowledged.
    let mut alice = Client::connect(&n1, "alice").await?;
    let (seq, _) = alice
        .send_msg(&conv, "during-redis-cut", "stored anyway")
        .await?;
    stack.restore("redis").await?;
    n1.wait_ready(Duration::from_secs(30))
        .await
        .context("node did not recover after redis returned")?;
    let mut bob = Client::connect(&n1, "bob").await?;
    bob.send(&ClientFrame::Sync {
        conversation_id: conv,
        after_seq: 0,
        limit: None,
    })
    .await?;
    bob.until(|f| matches!(f, ServerFrame::Msg { seq: s, .. } if *s == seq).then_some(()))
        .await?;
    Ok(())
}

async fn kafka_fanout_mode_delivers_across_nodes(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "kf-1", &["--fanout-mode", "kafka"]).await?;
    let n2 = Node::start(stack, "kf-2", &["--fanout-mode", "kafka"]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice", "bob"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    let mut bob = Client::connect(&n2, "bob").await?;
    // The fan-out consumers start at the end of chat-events: give them their assignment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (seq, _) = alice.send_msg(&conv, "kafka-1", "through kafka").await?;
    let got = bob
        .until(|f| match f {
            ServerFrame::Msg {
                seq: s,
                body,
                via: Via::Live,
                ..
            } if *s == seq => Some(body.clone()),
            _ => None,
        })
        .await
        .context("bob did not get the message through the kafka fan-out")?;
    ensure!(got == "through kafka");
    alice
        .until(|f| matches!(f, ServerFrame::Status { status: MessageStatus::Delivered, user_id, .. } if user_id == "bob").then_some(()))
        .await
        .context("DELIVERED in kafka mode")?;
    Ok(())
}

async fn async_mode_publishes_without_the_outbox(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "async-1", &["--publish-mode", "async"]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for i in 0..10 {
        alice
            .send_msg(&conv, &format!("as{i}"), "fire and forget")
            .await?;
    }
    let pool = sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE key = $1")
        .bind(&conv)
        .fetch_one(&pool)
        .await?;
    ensure!(rows == 0, "async mode wrote {rows} outbox rows");
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1")
        .bind(&conv)
        .fetch_all(&pool)
        .await?;
    wait_published(
        stack,
        &ids,
        Duration::from_secs(20),
        "async events did not arrive",
    )
    .await
}

async fn kafka_outage_is_reported_and_the_outbox_catches_up(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "ko-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    for b in 1..=3 {
        stack.cut(&format!("kafka-{b}-client")).await?;
    }
    n1.wait_unready("kafka", Duration::from_secs(20)).await?;
    // Outbox mode keeps Kafka off the user's path: sends are still acknowledged.
    for i in 0..5 {
        alice
            .send_msg(&conv, &format!("ko{i}"), "while kafka is away")
            .await?;
    }
    for b in 1..=3 {
        stack.restore(&format!("kafka-{b}-client")).await?;
    }
    n1.wait_ready(Duration::from_secs(60))
        .await
        .context("node did not recover after kafka returned")?;
    let pool = sqlx::PgPool::connect(&stack.endpoints().postgres_url).await?;
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1")
        .bind(&conv)
        .fetch_all(&pool)
        .await?;
    wait_published(
        stack,
        &ids,
        Duration::from_secs(60),
        "outbox rows were not published after kafka returned",
    )
    .await
}

async fn postgres_outage_gives_unavailable_and_recovers(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "pg-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut alice = Client::connect(&n1, "alice").await?;
    alice.send_msg(&conv, "pg-before", "stored").await?;
    stack.cut("postgres").await?;
    alice
        .send(&ClientFrame::Send {
            conversation_id: conv.clone(),
            client_msg_id: "pg-during".into(),
            body: "refused".into(),
        })
        .await?;
    let msg = alice.expect_error(ErrorCode::Unavailable).await?;
    ensure!(msg.contains("nothing was stored"), "{msg}");
    alice.still_serves().await?;
    n1.wait_unready("postgres", Duration::from_secs(20)).await?;
    stack.restore("postgres").await?;
    n1.wait_ready(Duration::from_secs(30)).await?;
    // The refused send was not stored; retrying it now works and gets the next seq.
    let start = Instant::now();
    let seq = loop {
        match alice.send_msg(&conv, "pg-during", "refused").await {
            Ok((seq, _)) => break seq,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                eprintln!("  retry after restore: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    ensure!(seq == 2, "seq after the outage is {seq}");
    Ok(())
}

async fn sigterm_drains_connections(stack: &mut Stack) -> Result<()> {
    let mut n1 = Node::start(stack, "drain-1", &[]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(n1.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    c.expect_error(ErrorCode::ShuttingDown).await?;
    let close = tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await?;
    match close {
        Some(Ok(Message::Close(Some(cf)))) => ensure!(u16::from(cf.code) == 1012, "close {cf:?}"),
        other => bail!("expected a close frame, got {other:?}"),
    }
    let start = Instant::now();
    loop {
        if let Some(status) = n1.child.try_wait()? {
            ensure!(status.success(), "node exited with {status}");
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "node did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A dead letter: its payload and headers.
type DeadLetter = (Vec<u8>, BTreeMap<String, String>);

/// Every record of chat-events-dlq (to its current end) with its headers.
async fn dead_letters(bootstrap: &str) -> Result<Vec<DeadLetter>> {
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
        let out = Command::new(env!("CARGO_BIN_EXE_chatstream"))
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

async fn replay_from_a_time_is_exact(stack: &mut Stack) -> Result<()> {
    let topic = unique("replay");
    stack
        .create_topics(&[squall_stack::topics::TopicSpec {
            name: topic.clone(),
            retention_ms: 3_600_000,
        }])
        .await?;
    let p = producer(stack)?;
    // In the past (brokers refuse timestamps too far in the future), with room after T.
    let t: i64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 600_000;
    let mut expected = BTreeSet::new();
    for i in 0..300i64 {
        // Interleaved: half before T, half at or after, over every partition.
        let (key, ts) = if i % 2 == 0 {
            (format!("before-{i}"), t - 1 - i)
        } else {
            (format!("after-{i}"), t + i)
        };
        if ts >= t {
            expected.insert(key.clone());
        }
        produce(&p, &topic, &key, key.as_bytes(), Some(ts)).await?;
    }
    let b = stack.endpoints().kafka_bootstrap;
    // Records produced after the replay fixed its end must not be returned: produce them
    // from another task while the replay runs, and once before it reads.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let late_producer = p.clone();
    let late_topic = topic.clone();
    let late = tokio::spawn(async move {
        let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
        for i in 0..20 {
            let _ = produce(
                &late_producer,
                &late_topic,
                &format!("late-{i}"),
                b"late",
                Some(t + 10_000 + i),
            )
            .await;
        }
    });
    let got = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let ranges = chatstream_replay::ranges_from_timestamp(&b, &topic, t)?;
        let _ = tx.send(());
        std::thread::sleep(Duration::from_secs(2));
        let mut keys = Vec::new();
        let mut kept = 0;
        chatstream_replay::read(
            &b,
            &topic,
            &ranges,
            Duration::from_secs(60),
            |r| {
                if r.timestamp_ms.is_some_and(|ts| ts >= t) {
                    kept += 1;
                    keys.push(String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned());
                }
            },
            |_, _| {},
        )?;
        // The public entry point gives the same answer (plus the late ones, which now exist).
        let again = chatstream_replay::read_since(
            &b,
            &topic,
            t,
            Duration::from_secs(60),
            |_| {},
            |_, _| {},
        )?;
        ensure!(
            again == kept + 20,
            "read_since after the late records: {again}, expected {}",
            kept + 20
        );
        Ok(keys)
    })
    .await??;
    late.await?;
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    ensure!(got.len() == got_set.len(), "duplicates in the replay");
    ensure!(
        got_set == expected,
        "replay from T returned {} keys, expected {} (extra {:?}, missing {:?})",
        got_set.len(),
        expected.len(),
        got_set.difference(&expected).take(3).collect::<Vec<_>>(),
        expected.difference(&got_set).take(3).collect::<Vec<_>>()
    );
    Ok(())
}

async fn session_timeline_matches_what_the_node_emitted(stack: &mut Stack) -> Result<()> {
    let n1 = Node::start(stack, "timeline-1", &[]).await?;
    let conv = unique("conv");
    create_conversation(&n1, "alice", &conv, &["alice"]).await?;
    let mut c = Client::connect(&n1, "alice").await?;
    c.send(&ClientFrame::Stream {
        conversation_id: conv,
        prompt: "timeline please".into(),
    })
    .await?;
    let mut session = String::new();
    let mut chunks = Vec::new();
    loop {
        match c.recv().await? {
            ServerFrame::StreamStarted { session_id, .. } => session = session_id,
            ServerFrame::Chunk { index, .. } => chunks.push(index),
            ServerFrame::StreamEnd { .. } => break,
            _ => {}
        }
    }
    let b = stack.endpoints().kafka_bootstrap;
    let start = Instant::now();
    let timeline = loop {
        let (b, s) = (b.clone(), session.clone());
        let events =
            tokio::task::spawn_blocking(move || chatstream_replay::session_timeline(&b, &s))
                .await??;
        if events
            .iter()
            .any(|e| e.body.type_name() == "STREAM_COMPLETED")
            || start.elapsed() > Duration::from_secs(20)
        {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let types: Vec<&str> = timeline.iter().map(|e| e.body.type_name()).collect();
    ensure!(
        types.first() == Some(&"SESSION_STARTED") && types.last() == Some(&"STREAM_COMPLETED"),
        "timeline {types:?}"
    );
    let indices: Vec<i64> = timeline
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ChunkReceived(c) => Some(c.chunk_index),
            _ => None,
        })
        .collect();
    ensure!(
        indices == chunks,
        "timeline chunks {indices:?} but the client saw {chunks:?}"
    );
    ensure!(
        timeline.iter().all(|e| e.replayed),
        "replayed events must be marked"
    );
    Ok(())
}

async fn reset(
    stack: &Stack,
    group: &str,
) -> Result<Vec<(String, i32, i64)>, chatstream_replay::ReplayError> {
    let (b, g) = (stack.endpoints().kafka_bootstrap, group.to_string());
    tokio::task::spawn_blocking(move || {
        chatstream_replay::reset_group(
            &b,
            &g,
            &["chat-events".to_string()],
            chatstream_replay::ResetTo::Earliest,
        )
    })
    .await
    .map_err(|e| chatstream_replay::ReplayError::Invalid(e.to_string()))?
}

async fn an_active_group_cannot_be_reset(stack: &mut Stack) -> Result<()> {
    let p = producer(stack)?;
    for i in 0..10 {
        let e = chat_event(&format!("reset-conv-{i}"), "to be read again", 1_000 + i);
        produce(&p, "chat-events", e.key(), e.to_json().as_bytes(), None).await?;
    }
    let prefix = unique("reset");
    let mut w = Workers::start(stack, "search", &prefix, &[]).await?;
    let group = format!("{prefix}-search");
    caught_up(stack, &group, &["chat-events"], Duration::from_secs(60)).await?;
    match reset(stack, &group).await {
        Err(chatstream_replay::ReplayError::GroupActive { members, .. }) => ensure!(members >= 1),
        other => bail!("reset of an active group was not refused: {other:?}"),
    }
    w.stop().await?;
    let start = Instant::now();
    loop {
        match reset(stack, &group).await {
            Ok(committed) => {
                ensure!(!committed.is_empty());
                break;
            }
            Err(chatstream_replay::ReplayError::GroupActive { .. })
                if start.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (b, g) = (stack.endpoints().kafka_bootstrap, group);
    let lags = tokio::task::spawn_blocking(move || {
        chatstream_replay::lag(&b, &g, &["chat-events".to_string()])
    })
    .await??;
    ensure!(
        lags.iter().map(|l| l.lag).sum::<i64>() > 0,
        "after a reset to earliest the group should lag: {lags:?}"
    );
    Ok(())
}

fn stream_event(session: &str, body: EventBody, replayed: bool) -> EventEnvelope {
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

fn completed(session: &str, latency_ms: u64) -> EventBody {
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
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chatstream-stack"),
    );
    let trials = vec![
        stack_test!(
            shared,
            "node::clients_on_different_nodes_exchange_messages",
            clients_on_different_nodes_exchange_messages
        ),
        stack_test!(
            shared,
            "node::retried_send_is_stored_once",
            retried_send_is_stored_once
        ),
        stack_test!(
            shared,
            "node::sync_returns_what_a_client_missed",
            sync_returns_what_a_client_missed
        ),
        stack_test!(
            shared,
            "node::non_members_can_neither_send_nor_read",
            non_members_can_neither_send_nor_read
        ),
        stack_test!(
            shared,
            "node::bad_input_gets_error_frames_and_the_connection_stays",
            bad_input_gets_error_frames_and_the_connection_stays
        ),
        stack_test!(
            shared,
            "node::bad_tokens_close_with_a_reason",
            bad_tokens_close_with_a_reason
        ),
        stack_test!(
            shared,
            "node::killed_node_s_outbox_rows_are_published_by_another",
            killed_node_s_outbox_rows_are_published_by_another
        ),
        stack_test!(
            shared,
            "node::stream_resumed_on_another_node_delivers_every_chunk",
            stream_resumed_on_another_node_delivers_every_chunk
        ),
        stack_test!(
            shared,
            "node::readyz_follows_redis_and_the_node_recovers",
            readyz_follows_redis_and_the_node_recovers
        ),
        stack_test!(
            shared,
            "node::failing_stream_ends_failed_with_stream_error",
            failing_stream_ends_failed_with_stream_error
        ),
        stack_test!(
            shared,
            "node::kafka_fanout_mode_delivers_across_nodes",
            kafka_fanout_mode_delivers_across_nodes
        ),
        stack_test!(
            shared,
            "node::async_mode_publishes_without_the_outbox",
            async_mode_publishes_without_the_outbox
        ),
        stack_test!(
            shared,
            "node::kafka_outage_is_reported_and_the_outbox_catches_up",
            kafka_outage_is_reported_and_the_outbox_catches_up
        ),
        stack_test!(
            shared,
            "node::postgres_outage_gives_unavailable_and_recovers",
            postgres_outage_gives_unavailable_and_recovers
        ),
        stack_test!(
            shared,
            "node::sigterm_drains_connections",
            sigterm_drains_connections
        ),
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
            "replay::replay_from_a_time_is_exact",
            replay_from_a_time_is_exact
        ),
        stack_test!(
            shared,
            "replay::session_timeline_matches_what_the_node_emitted",
            session_timeline_matches_what_the_node_emitted
        ),
        stack_test!(
            shared,
            "replay::an_active_group_cannot_be_reset",
            an_active_group_cannot_be_reset
        ),
    ];
    shared.run(trials)
}
