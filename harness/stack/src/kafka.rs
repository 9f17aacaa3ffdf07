//! The Kafka side of the stack: renders each broker's files (server.properties, its own
//! hosts file, log4j2 config), formats KRaft storage, launches brokers, creates the seed
//! topics, and reads the cluster's view (brokers, leaders, ISRs) through the proxies.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Result, StackError};
use crate::links::{
    controller_host, peer_proxy_ip, replication_host, LinkMode, CONTROLLER_CLASS, REPLICATION_CLASS,
};
use crate::plan::{PortPlan, LOOPBACK};
use crate::process::{self, Launch, ProcessRecord, StopSignal};
use crate::tools::Tools;
use crate::topics::{self, TopicSpec};

/// Overrides of server.properties keys, per broker id.
pub type BrokerOverrides = BTreeMap<u8, BTreeMap<String, String>>;

/// Files of one broker inside the run directory.
#[derive(Debug, Clone)]
pub struct BrokerFiles {
    pub dir: PathBuf,
    pub properties: PathBuf,
    pub hosts: PathBuf,
    pub log4j: PathBuf,
    pub log: PathBuf,
}

impl BrokerFiles {
    pub fn new(run_dir: &Path, id: u8) -> Self {
        let dir = run_dir.join(format!("kafka-{id}"));
        BrokerFiles {
            properties: dir.join("server.properties"),
            hosts: dir.join("hosts"),
            log4j: dir.join("log4j2.properties"),
            log: dir.join("broker.log"),
            dir,
        }
    }
}

/// server.properties for broker `id`: combined broker+controller (KRaft) with three
/// listeners: CLIENT (behind its client proxy), INTERNAL (replication) and CONTROLLER,
/// the last two reached by peers through the per-pair proxies. With direct links the
/// broker advertises its own client listener (and [`hosts_file`] maps peers to it).
pub fn server_properties(
    plan: &PortPlan,
    id: u8,
    data_dir: &Path,
    partitions: i32,
    overrides: Option<&BTreeMap<String, String>>,
    links: LinkMode,
) -> Result<String> {
    let me = plan.broker(id)?;
    let voters = (1..=plan.broker_count())
        .map(|i| {
            format!(
                "{i}@{}:{}",
                controller_host(i),
                plan.brokers[usize::from(i - 1)].controller
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut props: BTreeMap<String, String> = [
        ("process.roles", "broker,controller".to_string()),
        ("node.id", id.to_string()),
        ("controller.quorum.voters", voters),
        ("controller.listener.names", "CONTROLLER".into()),
        ("inter.broker.listener.name", "INTERNAL".into()),
        (
            "listeners",
            format!(
                "CLIENT://{LOOPBACK}:{},INTERNAL://{LOOPBACK}:{},CONTROLLER://{LOOPBACK}:{}",
                me.client, me.replication, me.controller
            ),
        ),
        (
            "advertised.listeners",
            // The controller listener is advertised too: a KRaft leader hands its own
            // endpoint to followers (KIP-853), and without this they would reach it at
            // 127.0.0.1 directly, around the proxies, and a partition would not cut it.
            format!(
                "CLIENT://{LOOPBACK}:{},INTERNAL://{}:{},CONTROLLER://{}:{}",
                PortPlan::broker_client_port(me, links),
                replication_host(id),
                me.replication,
                controller_host(id),
                me.controller
            ),
        ),
        (
            "listener.security.protocol.map",
            "CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT".into(),
        ),
        ("log.dirs", data_dir.display().to_string()),
        ("num.partitions", partitions.to_string()),
        (
            "default.replication.factor",
            topics::REPLICATION_FACTOR.to_string(),
        ),
        (
            "min.insync.replicas",
            topics::MIN_INSYNC_REPLICAS.to_string(),
        ),
        ("unclean.leader.election.enable", "false".into()),
        ("offsets.topic.replication.factor", "3".into()),
        ("transaction.state.log.replication.factor", "3".into()),
        ("transaction.state.log.min.isr", "2".into()),
        (
            "share.coordinator.state.topic.replication.factor",
            "3".into(),
        ),
        ("share.coordinator.state.topic.min.isr", "2".into()),
        // Topics are created on purpose (with their retention); a typo must not make one.
        ("auto.create.topics.enable", "false".into()),
        ("group.initial.rebalance.delay.ms", "0".into()),
        // Faults should show within seconds: a follower that stops fetching leaves the ISR
        // after 10 s (default 30 s), a broker that stops heartbeating is fenced after 9 s.
        ("replica.lag.time.max.ms", "10000".into()),
        ("broker.session.timeout.ms", "9000".into()),
        ("broker.heartbeat.interval.ms", "2000".into()),
        ("num.network.threads", "2".into()),
        ("num.io.threads", "4".into()),
        ("log.retention.check.interval.ms", "60000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(overrides) = overrides {
        props.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut out = format!("# Written by squall for broker {id}; regenerated at every start.\n");
    for (k, v) in props {
        let _ = writeln!(out, "{k}={v}");
    }
    Ok(out)
}

/// The hosts file broker `id` resolves names from (`-Djdk.net.hosts.file`): its own names
/// point at 127.0.0.1, each peer's names at the proxy of the pair (id → peer).
pub fn hosts_file(plan: &PortPlan, id: u8, machine_host_name: &str, links: LinkMode) -> String {
    let mut out = format!(
        "# Broker {id}'s view of the network, written by squall.\n{LOOPBACK} localhost {machine_host_name}\n"
    );
    for peer in 1..=plan.broker_count() {
        let (repl, ctrl) = if peer == id || links == LinkMode::Direct {
            (LOOPBACK, LOOPBACK)
        } else {
            (
                peer_proxy_ip(REPLICATION_CLASS, id, peer),
                peer_proxy_ip(CONTROLLER_CLASS, id, peer),
            )
        };
        let _ = writeln!(out, "{repl} {}", replication_host(peer));
        let _ = writeln!(out, "{ctrl} {}", controller_host(peer));
    }
    out
}

const LOG4J2: &str = "\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.stdout.ref = STDOUT
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
";

/// A random KRaft cluster id: 16 bytes, base64url without padding (22 characters). Like
/// Kafka's own `Uuid.randomUuid`, ids starting with '-' are drawn again: the storage
/// tool's argument parser would read them as an option.
pub fn new_cluster_id() -> Result<String> {
    let mut f = std::fs::File::open("/dev/urandom")
        .map_err(|e| StackError::io("opening /dev/urandom", e))?;
    loop {
        let mut bytes = [0u8; 16];
        std::io::Read::read_exact(&mut f, &mut bytes)
            .map_err(|e| StackError::io("reading /dev/urandom", e))?;
        let id = base64url(&bytes);
        if !id.starts_with('-') {
            return Ok(id);
        }
    }
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn jvm_args(tools: &Tools, files: &BrokerFiles, run_dir: &Path) -> Vec<String> {
    vec![
        "-Xms256m".into(),
        "-Xmx512m".into(),
        "-XX:+UseG1GC".into(),
        "-XX:MaxGCPauseMillis=20".into(),
        "-Djava.awt.headless=true".into(),
        format!("-Djdk.net.hosts.file={}", files.hosts.display()),
        format!("-Dlog4j2.configurationFile={}", files.log4j.display()),
        // Marks the process as this stack's, visible in `ps`.
        format!("-Dsquall.run.dir={}", run_dir.display()),
        "-cp".into(),
        format!("{}/*", tools.kafka_lib.display()),
    ]
}

/// What every broker of one stack is configured with.
pub struct ClusterSetup<'a> {
    pub cluster_id: &'a str,
    pub partitions: i32,
    pub overrides: &'a BrokerOverrides,
    pub links: LinkMode,
}

/// Writes broker `id`'s files and formats its storage (once, on first start).
pub async fn prepare_broker(
    tools: &Tools,
    plan: &PortPlan,
    run_dir: &Path,
    id: u8,
    setup: &ClusterSetup<'_>,
) -> Result<BrokerFiles> {
    let ClusterSetup {
        cluster_id,
        partitions,
        links,
        ..
    } = *setup;
    let overrides = setup.overrides.get(&id);
    let files = BrokerFiles::new(run_dir, id);
    let data = files.dir.join("data");
    std::fs::create_dir_all(&data)
        .map_err(|e| StackError::io(format!("creating {}", data.display()), e))?;
    let host_name = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let write = |path: &Path, text: String| {
        std::fs::write(path, text)
            .map_err(|e| StackError::io(format!("writing {}", path.display()), e))
    };
    write(
        &files.properties,
        server_properties(plan, id, &data, partitions, overrides, links)?,
    )?;
    write(&files.hosts, hosts_file(plan, id, &host_name, links))?;
    write(&files.log4j, LOG4J2.to_string())?;
    if !data.join("meta.properties").exists() {
        let mut args = jvm_args(tools, &files, run_dir);
        args.extend(
            [
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
                cluster_id,
                "-c",
            ]
            .map(String::from),
        );
        args.push(files.properties.display().to_string());
        let out = tokio::process::Command::new(&tools.java)
            .args(&args)
            .output()
            .await
            .map_err(|source| StackError::Spawn {
                name: format!("kafka-{id} storage format"),
                program: tools.java.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(StackError::Kafka(format!(
                "formatting kafka-{id} storage failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    }
    Ok(files)
}

/// Starts broker `id` from files written by [`prepare_broker`].
pub fn launch_broker(tools: &Tools, run_dir: &Path, id: u8) -> Result<ProcessRecord> {
    let files = BrokerFiles::new(run_dir, id);
    let mut args = jvm_args(tools, &files, run_dir);
    args.push("kafka.Kafka".into());
    args.push(files.properties.display().to_string());
    process::spawn(Launch {
        name: &format!("kafka-{id}"),
        program: &tools.java,
        args,
        log: files.log.clone(),
        cwd: Some(&files.dir),
        user: None,
        env: &[],
        stop_signal: StopSignal::Term,
    })
}

/// One partition as some broker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionView {
    pub partition: i32,
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

/// The cluster as one broker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// The broker that answered the metadata request.
    pub answered_by: i32,
    pub brokers: Vec<i32>,
    pub topics: BTreeMap<String, Vec<PartitionView>>,
}

impl ClusterView {
    /// Partitions (topic, partition) led by `broker`.
    pub fn led_by(&self, broker: i32) -> Vec<(String, i32)> {
        self.partitions()
            .filter(|(_, p)| p.leader == broker)
            .map(|(t, p)| (t.to_string(), p.partition))
            .collect()
    }

    /// Partitions whose ISR lacks `broker` although it is a replica.
    pub fn missing_from_isr(&self, broker: i32) -> Vec<(String, i32)> {
        self.partitions()
            .filter(|(_, p)| p.replicas.contains(&broker) && !p.isr.contains(&broker))
            .map(|(t, p)| (t.to_string(), p.partition))
            .collect()
    }

    fn partitions(&self) -> impl Iterator<Item = (&str, &PartitionView)> {
        self.topics
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |p| (t.as_str(), p)))
    }
}

/// Reads the cluster's metadata from the broker(s) at `bootstrap`. The client has no
/// consumer group (a group would connect to the coordinator too), so a fresh client with a
/// single bootstrap broker normally asks that broker; `answered_by` says who did.
pub async fn cluster_view(bootstrap: String, timeout: Duration) -> Result<ClusterView> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("socket.timeout.ms", "5000")
            .create()
            .map_err(|e| {
                StackError::Kafka(format!("creating metadata client for {bootstrap}: {e}"))
            })?;
        let md = consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| StackError::Kafka(format!("metadata from {bootstrap}: {e}")))?;
        let mut brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
        brokers.sort();
        let topics = md
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__"))
            .map(|t| {
                let mut ps: Vec<PartitionView> = t
                    .partitions()
                    .iter()
                    .map(|p| PartitionView {
                        partition: p.id(),
                        leader: p.leader(),
                        replicas: p.replicas().to_vec(),
                        isr: p.isr().to_vec(),
                    })
                    .collect();
                ps.sort_by_key(|p| p.partition);
                (t.name().to_string(), ps)
            })
            .collect();
        Ok(ClusterView {
            answered_by: md.orig_broker_id(),
            brokers,
            topics,
        })
    })
    .await
    .map_err(|e| StackError::Kafka(format!("metadata task failed: {e}")))?
}

fn admin(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| StackError::Kafka(format!("creating admin client for {bootstrap}: {e}")))
}

/// Creates `specs` with `partitions` partitions, replication factor 3 and the durability
/// settings. Topics that already exist are left as they are.
pub async fn create_topics(bootstrap: &str, specs: &[TopicSpec], partitions: i32) -> Result<()> {
    let admin = admin(bootstrap)?;
    let retention: Vec<String> = specs.iter().map(|s| s.retention_ms.to_string()).collect();
    let durability = topics::durability_configs();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention)
        .map(|(s, r)| {
            durability.iter().fold(
                NewTopic::new(
                    &s.name,
                    partitions,
                    TopicReplication::Fixed(topics::REPLICATION_FACTOR),
                )
                .set("retention.ms", r),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &opts)
        .await
        .map_err(|e| StackError::Kafka(format!("creating topics: {e}")))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(StackError::Kafka(format!("creating topic {name}: {code}")))
            }
        }
    }
    Ok(())
}

/// Every topic in `names` has `partitions` partitions, each with a leader and a full ISR.
pub fn topics_ready(view: &ClusterView, names: &[String], partitions: i32) -> Result<()> {
    for name in names {
        let parts = view
            .topics
            .get(name)
            .ok_or_else(|| StackError::Kafka(format!("topic {name} not in metadata yet")))?;
        if parts.len() != partitions as usize
            || parts
                .iter()
                .any(|p| p.leader < 0 || p.isr.len() < topics::REPLICATION_FACTOR as usize)
        {
            return Err(StackError::Kafka(format!(
                "topic {name} is not fully replicated yet: {parts:?}"
            )));
        }
    }
    Ok(())
}

/// Waits until every broker in `brokers` (client addresses) reports `names` as ready:
/// right after creation, brokers learn of a topic at slightly different times.
pub async fn wait_topics_ready(
    brokers: &[String],
    names: &[String],
    partitions: i32,
    timeout: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let mut last = Ok(());
        for b in brokers {
            last = match cluster_view(b.clone(), Duration::from_secs(5)).await {
                Ok(view) => topics_ready(&view, names, partitions),
                Err(e) => Err(e),
            };
            if last.is_err() {
                break;
            }
        }
        match last {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= timeout => {
                return Err(StackError::Kafka(format!(
                    "topics {names:?} not ready within {timeout:?}: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Deletes `names` (missing topics are ignored).
pub async fn delete_topics(bootstrap: &str, names: &[&str]) -> Result<()> {
    let admin = admin(bootstrap)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .delete_topics(names, &opts)
        .await
        .map_err(|e| StackError::Kafka(format!("deleting topics: {e}")))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => {
                return Err(StackError::Kafka(format!("deleting topic {name}: {code}")))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PortPlan {
        PortPlan::from_base(30000, 3).unwrap()
    }

    #[test]
    fn properties_wire_listeners_through_the_plan() {
        let p = server_properties(&plan(), 2, Path::new("/d"), 6, None, LinkMode::Proxied).unwrap();
        assert!(p.contains("node.id=2\n"));
        assert!(p.contains(
            "controller.quorum.voters=1@kafka-1.controller.squall:30041,2@kafka-2.controller.squall:30042,3@kafka-3.controller.squall:30043\n"
        ));
        assert!(p.contains("listeners=CLIENT://127.0.0.1:30022,INTERNAL://127.0.0.1:30032,CONTROLLER://127.0.0.1:30042\n"));
        assert!(p.contains("advertised.listeners=CLIENT://127.0.0.1:30012,INTERNAL://kafka-2.replication.squall:30032,CONTROLLER://kafka-2.controller.squall:30042\n"));
        assert!(p.contains("min.insync.replicas=2\n"));
        assert!(p.contains("default.replication.factor=3\n"));
        assert!(p.contains("unclean.leader.election.enable=false\n"));
    }

    #[test]
    fn overrides_win() {
        let o: BTreeMap<String, String> = [("num.partitions".to_string(), "12".to_string())].into();
        let p =
            server_properties(&plan(), 1, Path::new("/d"), 6, Some(&o), LinkMode::Proxied).unwrap();
        assert!(p.contains("num.partitions=12\n"));
        assert!(!p.contains("num.partitions=6\n"));
    }

    #[test]
    fn each_broker_sees_peers_through_its_own_proxies() {
        let h = hosts_file(&plan(), 1, "box", LinkMode::Proxied);
        assert!(h.contains("127.0.0.1 localhost box\n"));
        assert!(h.contains("127.0.0.1 kafka-1.replication.squall\n"));
        assert!(h.contains("127.10.1.2 kafka-2.replication.squall\n"));
        assert!(h.contains("127.20.1.3 kafka-3.controller.squall\n"));
    }

    #[test]
    fn direct_links_bypass_every_proxy() {
        let p = server_properties(&plan(), 2, Path::new("/d"), 6, None, LinkMode::Direct).unwrap();
        assert!(p.contains("advertised.listeners=CLIENT://127.0.0.1:30022,INTERNAL://kafka-2.replication.squall:30032,CONTROLLER://kafka-2.controller.squall:30042\n"));
        let h = hosts_file(&plan(), 1, "box", LinkMode::Direct);
        assert!(h.contains("127.0.0.1 kafka-2.replication.squall\n"));
        assert!(h.contains("127.0.0.1 kafka-3.controller.squall\n"));
        assert!(!h.contains("127.10."), "{h}");
        assert!(!h.contains("127.20."), "{h}");
    }

    #[test]
    fn cluster_ids_are_22_url_safe_chars() {
        for _ in 0..500 {
            let id = new_cluster_id().unwrap();
            assert_eq!(id.len(), 22);
            assert!(!id.starts_with('-'), "{id} would be read as an option");
            assert!(id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        }
        assert_eq!(base64url(b"Man"), "TWFu");
        assert_eq!(base64url(b"Ma"), "TWE");
    }
}
