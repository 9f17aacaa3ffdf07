//! The `docker` stack provider (cargo feature `docker`): starts the topology of
//! docker-compose.yml with testcontainers on a Docker engine — the official images
//! (apache/kafka, redis, postgres, Toxiproxy), three Kafka brokers in one KRaft quorum
//! (combined mode) with the compose file's settings, and every link through a Toxiproxy
//! proxy that carries the compose file's name — and hands back the node-independent
//! endpoints (`Endpoints`: Kafka bootstrap, Redis, PostgreSQL, Toxiproxy API), the ones a
//! `--target` run is given. It owns the containers and networks it creates: `down`
//! removes them; a `DockerStack` dropped without `down` (an early return, a panic)
//! removes them from `Drop`.
//!
//! The layout is the compose file's: Toxiproxy sits on the stack's network and on one
//! network per broker (`<name>-from-j`); broker j is on `from-j` only and resolves each
//! peer's names (`kafka-i.replication.squall`, `kafka-i.controller.squall`) to Toxiproxy's
//! address on `from-j`, where the proxies `kafka-j-to-i-replication` and
//! `kafka-j-to-i-controller` listen. So every direction between two brokers is a proxy of
//! its own and can be cut alone, as in the local stack. Two things differ from the compose
//! file, both so that several stacks can share one engine: names carry a unique prefix,
//! and the proxies' ports are published on ports the engine picks (each broker advertises
//! its client proxy's published port), with addresses the engine assigns.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use sqlx::Connection;
use testcontainers::bollard::models::{NetworkConnectRequest, NetworkCreateRequest};
use testcontainers::bollard::Docker;
use testcontainers::core::client::docker_client_instance;
use testcontainers::core::{Host, IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, ImageExt};

use crate::error::StackError;
use crate::kafka;
use crate::links::{self, controller_host, replication_host, Link, LinkKind};
use crate::plan::{PortPlan, DEFAULT_BASE_PORT, DEFAULT_BROKERS};
use crate::stack::Endpoints;
use crate::stores;
use crate::topics;
use crate::toxiproxy::ToxiproxyClient;

/// The images of docker-compose.yml (a test keeps the two in step).
pub const KAFKA_IMAGE: (&str, &str) = ("apache/kafka", "4.1.1");
pub const REDIS_IMAGE: (&str, &str) = ("redis", "7");
pub const POSTGRES_IMAGE: (&str, &str) = ("postgres", "15");
pub const TOXIPROXY_IMAGE: (&str, &str) = ("ghcr.io/shopify/toxiproxy", "2.12.0");

/// The compose file's KRaft cluster id.
pub const CLUSTER_ID: &str = "c3F1YWxsLWNvbXBvc2UtMQ";

/// Label put on every container and network, valued with the stack's name, so that what
/// a killed run left behind can be found: `docker ps -a --filter label=org.squall.stack`.
pub const LABEL: &str = "org.squall.stack";

/// Where the engine is looked for when DOCKER_HOST is not set.
pub const DEFAULT_ENGINE: &str = "unix:///var/run/docker.sock";

/// Everything that can go wrong with the docker provider.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("no Docker engine answers at {endpoint}: {message} (start one, or point DOCKER_HOST at one)")]
    NoEngine { endpoint: String, message: String },

    #[error("docker engine: {what}: {message}")]
    Engine { what: String, message: String },

    #[error("container {name} ({image}) did not start: {message}")]
    Container {
        name: String,
        image: String,
        message: String,
    },

    #[error("{name} did not become healthy within {secs} s: {last_error}{logs}")]
    NotHealthy {
        name: String,
        secs: u64,
        last_error: String,
        /// The last lines of the containers' logs, when one of them stopped.
        logs: String,
    },

    #[error(transparent)]
    Stack(#[from] StackError),
}

pub type Result<T, E = DockerError> = std::result::Result<T, E>;

fn engine_error(what: impl Into<String>, e: impl std::fmt::Display) -> DockerError {
    DockerError::Engine {
        what: what.into(),
        message: e.to_string(),
    }
}

/// How to start a stack on Docker.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Prefix of every container and network name; unique per stack on the engine.
    pub name: String,
    pub partitions: i32,
    /// How long the servers may take to pass their health checks once their containers
    /// run (pulling the images is not counted).
    pub start_timeout: Duration,
}

impl DockerConfig {
    /// A config whose name is `prefix` made unique by the process id and the time.
    pub fn new(prefix: &str) -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        DockerConfig {
            name: format!("{prefix}-{}-{ms}", std::process::id()),
            partitions: topics::DEFAULT_PARTITIONS,
            start_timeout: Duration::from_secs(180),
        }
    }
}

/// The engine squall talks to, as a person would name it: DOCKER_HOST, else the default
/// socket.
pub fn engine_endpoint() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENGINE.to_string())
}

/// Pings the engine testcontainers would use (DOCKER_HOST, its properties file, else the
/// default socket); returns where it answered, or `NoEngine` saying where none did.
pub async fn engine() -> Result<String> {
    let endpoint = engine_endpoint();
    let no_engine = |message: String| DockerError::NoEngine {
        endpoint: endpoint.clone(),
        message,
    };
    let docker = docker_client_instance()
        .await
        .map_err(|e| no_engine(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(5), docker.ping()).await {
        Ok(Ok(_)) => Ok(endpoint),
        Ok(Err(e)) => Err(no_engine(e.to_string())),
        Err(_) => Err(no_engine("no answer to /_ping within 5 s".into())),
    }
}

/// The ports inside the containers: the compose file's, which are the default port plan.
pub fn compose_plan() -> Result<PortPlan> {
    Ok(PortPlan::from_base(DEFAULT_BASE_PORT, DEFAULT_BROKERS)?)
}

/// Toxiproxy's arguments (the compose file's, less `-config`: the proxies are created
/// through the API once Toxiproxy's addresses on the brokers' networks are known).
pub fn toxiproxy_cmd(plan: &PortPlan) -> Vec<String> {
    ["-host", "0.0.0.0", "-port", &plan.toxiproxy_api.to_string()]
        .map(String::from)
        .to_vec()
}

/// Redis's command line, as in the compose file.
pub fn redis_cmd(plan: &PortPlan) -> Vec<String> {
    [
        "redis-server",
        "--port",
        &plan.redis.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .map(String::from)
    .to_vec()
}

/// PostgreSQL's command line, as in the compose file.
pub fn postgres_cmd(plan: &PortPlan) -> Vec<String> {
    [
        "postgres",
        "-p",
        &plan.postgres.to_string(),
        "-c",
        "max_connections=200",
    ]
    .map(String::from)
    .to_vec()
}

/// Container names of one stack: `<stack>-<service>`, the service named as in the compose
/// file (`toxiproxy`, `redis`, `postgres`, `kafka-i`).
fn container_name(stack: &str, service: &str) -> String {
    format!("{stack}-{service}")
}

/// The network broker `id` lives on, with Toxiproxy.
fn broker_network(stack: &str, id: u8) -> String {
    format!("{stack}-from-{id}")
}

/// The Toxiproxy proxies of a stack: the compose file's names and listening ports; the
/// peer proxies listen on Toxiproxy's address on the network of the broker they carry
/// traffic from (`from_ips[j - 1]` for broker j); upstreams name the stack's containers.
pub fn proxies(stack: &str, plan: &PortPlan, from_ips: &[Ipv4Addr]) -> Result<Vec<Link>> {
    let any = Ipv4Addr::UNSPECIFIED;
    links::all_links(plan)
        .into_iter()
        .map(|mut l| {
            let (listen_ip, upstream) = match l.kind {
                LinkKind::KafkaClient { broker } => {
                    let b = plan.broker(broker)?;
                    (
                        any,
                        format!(
                            "{}:{}",
                            container_name(stack, &format!("kafka-{broker}")),
                            b.client
                        ),
                    )
                }
                LinkKind::Replication { from, to } | LinkKind::Controller { from, to } => {
                    let ip = from_ips
                        .get(usize::from(from) - 1)
                        .copied()
                        .ok_or_else(|| {
                            StackError::InvalidPlan(format!(
                                "no Toxiproxy address on the network of kafka-{from}"
                            ))
                        })?;
                    (
                        ip,
                        format!(
                            "{}:{}",
                            container_name(stack, &format!("kafka-{to}")),
                            l.port
                        ),
                    )
                }
                LinkKind::Redis => (
                    any,
                    format!("{}:{}", container_name(stack, "redis"), plan.redis),
                ),
                LinkKind::Postgres => (
                    any,
                    format!("{}:{}", container_name(stack, "postgres"), plan.postgres),
                ),
            };
            l.listen_ip = listen_ip;
            l.upstream = upstream;
            Ok(l)
        })
        .collect()
}

/// The environment of broker `id`, as docker-compose.yml sets it, except that the client
/// listener is advertised at `client_host:client_port` (the published port of the
/// broker's client proxy).
pub fn kafka_env(
    plan: &PortPlan,
    id: u8,
    partitions: i32,
    client_host: &str,
    client_port: u16,
) -> Result<Vec<(String, String)>> {
    let me = plan.broker(id)?;
    let voters = (1..=plan.broker_count())
        .map(|i| {
            let b = plan.broker(i)?;
            Ok(format!("{i}@{}:{}", controller_host(i), b.controller))
        })
        .collect::<Result<Vec<_>>>()?
        .join(",");
    let env = [
        ("CLUSTER_ID", CLUSTER_ID.to_string()),
        ("KAFKA_NODE_ID", id.to_string()),
        ("KAFKA_PROCESS_ROLES", "broker,controller".into()),
        ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER".into()),
        ("KAFKA_INTER_BROKER_LISTENER_NAME", "INTERNAL".into()),
        (
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
            "CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT".into(),
        ),
        ("KAFKA_CONTROLLER_QUORUM_VOTERS", voters),
        (
            "KAFKA_LISTENERS",
            format!(
                "CLIENT://0.0.0.0:{},INTERNAL://0.0.0.0:{},CONTROLLER://0.0.0.0:{}",
                me.client, me.replication, me.controller
            ),
        ),
        (
            "KAFKA_ADVERTISED_LISTENERS",
            format!(
                "CLIENT://{client_host}:{client_port},INTERNAL://{}:{},CONTROLLER://{}:{}",
                replication_host(id),
                me.replication,
                controller_host(id),
                me.controller
            ),
        ),
        ("KAFKA_NUM_PARTITIONS", partitions.to_string()),
        (
            "KAFKA_DEFAULT_REPLICATION_FACTOR",
            topics::REPLICATION_FACTOR.to_string(),
        ),
        (
            "KAFKA_MIN_INSYNC_REPLICAS",
            topics::MIN_INSYNC_REPLICAS.to_string(),
        ),
        ("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false".into()),
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3".into()),
        ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "3".into()),
        ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "2".into()),
        ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false".into()),
        ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0".into()),
        ("KAFKA_REPLICA_LAG_TIME_MAX_MS", "10000".into()),
        ("KAFKA_BROKER_SESSION_TIMEOUT_MS", "9000".into()),
        ("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m".into()),
    ];
    Ok(env.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// The names broker `id` resolves from its hosts file: its own to itself, each peer's to
/// Toxiproxy's address on the broker's network (`toxiproxy_ip`).
pub fn kafka_hosts(plan: &PortPlan, id: u8, toxiproxy_ip: Ipv4Addr) -> Vec<(String, IpAddr)> {
    (1..=plan.broker_count())
        .flat_map(|i| {
            let ip = if i == id {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V4(toxiproxy_ip)
            };
            [(replication_host(i), ip), (controller_host(i), ip)]
        })
        .collect()
}

/// What the stack created on the engine, removed by `remove` (or, failing that, `Drop`).
struct Owned {
    docker: Docker,
    /// Service name (as in the compose file) and its container, alive as long as the stack.
    containers: Vec<(String, ContainerAsync<GenericImage>)>,
    networks: Vec<String>,
}

impl Owned {
    fn container(&self, service: &str) -> Option<&ContainerAsync<GenericImage>> {
        self.containers
            .iter()
            .find(|(n, _)| n == service)
            .map(|(_, c)| c)
    }

    /// Removes every container, then every network; goes on past failures and reports
    /// the first.
    async fn remove(&mut self) -> Result<()> {
        let mut first = None;
        for (service, c) in self.containers.drain(..) {
            let id = c.id().to_string();
            if let Err(e) = c.rm().await {
                tracing::warn!(%service, %id, error = %e, "removing container");
                first.get_or_insert(engine_error(format!("removing container {id}"), e));
            }
        }
        for n in std::mem::take(&mut self.networks) {
            if let Err(e) = self.docker.remove_network(&n).await {
                tracing::warn!(network = %n, error = %e, "removing network");
                first.get_or_insert(engine_error(format!("removing network {n}"), e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.containers.is_empty() && self.networks.is_empty() {
            return;
        }
        // testcontainers removes each container when its handle is dropped.
        self.containers.clear();
        if self.networks.is_empty() {
            return;
        }
        // A drop cannot await: the networks are removed from a thread with a runtime of
        // its own, waited for, so nothing is left behind when the stack is gone.
        let networks = std::mem::take(&mut self.networks);
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
                for n in &networks {
                    if let Err(e) = docker.remove_network(n).await {
                        return Err(format!(
                            "{e}; remove what is left with `docker network rm {}`",
                            networks.join(" ")
                        ));
                    }
                }
                Ok(())
            })
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("removing the stack's networks: {e}"),
            Err(_) => tracing::warn!("removing the stack's networks: the thread panicked"),
        }
    }
}

/// A stack running on Docker, started by `up`.
pub struct DockerStack {
    name: String,
    endpoints: Endpoints,
    toxiproxy: ToxiproxyClient,
    owned: Owned,
}

/// The host the published ports answer on, as clients should dial it. "localhost" is
/// pinned to IPv4: the brokers advertise it, and an engine without IPv6 publishes on
/// 0.0.0.0 only.
fn client_host(host: &str) -> String {
    if host == "localhost" {
        Ipv4Addr::LOCALHOST.to_string()
    } else {
        host.to_string()
    }
}

/// The last `n` lines of a container's output (stdout and stderr).
async fn log_tail(c: &ContainerAsync<GenericImage>, n: usize) -> String {
    let mut text = String::new();
    if let Ok(out) = c.stdout_to_vec().await {
        text.push_str(&String::from_utf8_lossy(&out));
    }
    if let Ok(err) = c.stderr_to_vec().await {
        text.push_str(&String::from_utf8_lossy(&err));
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `check` until it passes; fails at `timeout`, or at once when one of `watched`
/// (service names) is no longer running, with the last lines of its logs.
async fn wait_healthy<F, Fut>(
    owned: &Owned,
    name: &str,
    timeout: Duration,
    watched: &[&str],
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let start = Instant::now();
    loop {
        for service in watched {
            if let Some(c) = owned.container(service) {
                if matches!(c.is_running().await, Ok(false)) {
                    return Err(DockerError::NotHealthy {
                        name: name.to_string(),
                        secs: timeout.as_secs(),
                        last_error: format!("container {service} stopped"),
                        logs: format!(
                            "; last lines of {service}'s log:\n{}",
                            log_tail(c, 15).await
                        ),
                    });
                }
            }
        }
        let last_error = match check().await {
            Ok(()) => {
                tracing::info!(%name, elapsed_ms = start.elapsed().as_millis() as u64, "healthy");
                return Ok(());
            }
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            return Err(DockerError::NotHealthy {
                name: name.to_string(),
                secs: timeout.as_secs(),
                last_error,
                logs: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn start_container(
    service: &str,
    request: ContainerRequest<GenericImage>,
    image: (&str, &str),
) -> Result<(String, ContainerAsync<GenericImage>)> {
    tracing::info!(%service, image = %format!("{}:{}", image.0, image.1), "starting container");
    let c = request.start().await.map_err(|e| DockerError::Container {
        name: service.to_string(),
        image: format!("{}:{}", image.0, image.1),
        message: e.to_string(),
    })?;
    Ok((service.to_string(), c))
}

/// `SELECT 1` on the chatstream database (the image creates it: POSTGRES_DB).
async fn postgres_answers(url: &str) -> std::result::Result<(), String> {
    let check = async {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .map_err(|e| e.to_string())?;
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if one == 1 {
            Ok(())
        } else {
            Err(format!("SELECT 1 returned {one}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
}

impl DockerStack {
    /// Starts the compose topology: networks, Toxiproxy with every proxy, Redis,
    /// PostgreSQL, three brokers; waits for real health checks through the proxies
    /// (Redis PING, PostgreSQL `SELECT 1`, three brokers in the metadata) and creates the
    /// seed topics. On failure everything created is removed and the error says what
    /// failed.
    pub async fn up(config: DockerConfig) -> Result<DockerStack> {
        engine().await?;
        let docker = docker_client_instance()
            .await
            .map_err(|e| engine_error("connecting", e))?;
        let mut owned = Owned {
            docker,
            containers: Vec::new(),
            networks: Vec::new(),
        };
        match Self::start(&config, &mut owned).await {
            Ok((endpoints, toxiproxy)) => Ok(DockerStack {
                name: config.name,
                endpoints,
                toxiproxy,
                owned,
            }),
            Err(e) => {
                tracing::error!(error = %e, "docker stack start failed; removing what was created");
                if let Err(rm) = owned.remove().await {
                    tracing::error!(error = %rm, "removing the failed stack");
                }
                Err(e)
            }
        }
    }

    async fn create_network(owned: &mut Owned, name: &str, stack: &str) -> Result<()> {
        owned
            .docker
            .create_network(NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([(LABEL.to_string(), stack.to_string())])),
                ..Default::default()
            })
            .await
            .map_err(|e| engine_error(format!("creating network {name}"), e))?;
        owned.networks.push(name.to_string());
        Ok(())
    }

    async fn start(
        config: &DockerConfig,
        owned: &mut Owned,
    ) -> Result<(Endpoints, ToxiproxyClient)> {
        let stack = config.name.as_str();
        let plan = compose_plan()?;
        let timeout = config.start_timeout;
        let label = |r: ContainerRequest<GenericImage>| r.with_label(LABEL, stack);

        Self::create_network(owned, stack, stack).await?;
        for id in 1..=plan.broker_count() {
            Self::create_network(owned, &broker_network(stack, id), stack).await?;
        }

        // Toxiproxy, Redis and PostgreSQL, as the compose file runs them (pulled and
        // started side by side).
        let mut toxiproxy_image = GenericImage::new(TOXIPROXY_IMAGE.0, TOXIPROXY_IMAGE.1)
            .with_exposed_port(plan.toxiproxy_api.tcp())
            .with_wait_for(WaitFor::Nothing);
        for b in &plan.brokers {
            toxiproxy_image = toxiproxy_image.with_exposed_port(b.client_proxy.tcp());
        }
        let toxiproxy_image = toxiproxy_image
            .with_exposed_port(plan.redis_proxy.tcp())
            .with_exposed_port(plan.postgres_proxy.tcp());
        let toxiproxy = stores::TOXIPROXY_ENV.iter().fold(
            toxiproxy_image.with_cmd(toxiproxy_cmd(&plan)),
            |image, (key, value)| image.with_env_var(*key, *value),
        );
        let toxiproxy = label(
            toxiproxy
                .with_network(stack)
                .with_container_name(container_name(stack, "toxiproxy")),
        );
        let redis = label(
            GenericImage::new(REDIS_IMAGE.0, REDIS_IMAGE.1)
                .with_wait_for(WaitFor::Nothing)
                .with_cmd(redis_cmd(&plan))
                .with_network(stack)
                .with_container_name(container_name(stack, "redis")),
        );
        let postgres = label(
            GenericImage::new(POSTGRES_IMAGE.0, POSTGRES_IMAGE.1)
                .with_wait_for(WaitFor::Nothing)
                .with_cmd(postgres_cmd(&plan))
                .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                .with_env_var("POSTGRES_DB", stores::DATABASE)
                .with_network(stack)
                .with_container_name(container_name(stack, "postgres")),
        );
        let started = futures::future::join3(
            start_container("toxiproxy", toxiproxy, TOXIPROXY_IMAGE),
            start_container("redis", redis, REDIS_IMAGE),
            start_container("postgres", postgres, POSTGRES_IMAGE),
        )
        .await;
        // Whatever started is owned (and so removed on failure) before any error is looked at.
        let mut failed = None;
        for s in [started.0, started.1, started.2] {
            match s {
                Ok(c) => owned.containers.push(c),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }

        // Toxiproxy joins each broker's network; its address there is where that
        // broker's peer proxies listen.
        let toxiproxy_id = owned
            .container("toxiproxy")
            .map(|c| c.id().to_string())
            .ok_or_else(|| engine_error("toxiproxy", "no container"))?;
        let mut from_ips = Vec::new();
        for id in 1..=plan.broker_count() {
            let network = broker_network(stack, id);
            owned
                .docker
                .connect_network(
                    &network,
                    NetworkConnectRequest {
                        container: toxiproxy_id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| engine_error(format!("connecting Toxiproxy to {network}"), e))?;
        }
        let inspected = owned
            .docker
            .inspect_container(&toxiproxy_id, None)
            .await
            .map_err(|e| engine_error("inspecting the Toxiproxy container", e))?;
        let networks = inspected
            .network_settings
            .and_then(|s| s.networks)
            .unwrap_or_default();
        for id in 1..=plan.broker_count() {
            let network = broker_network(stack, id);
            let ip = networks
                .get(&network)
                .and_then(|e| e.ip_address.as_deref())
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .ok_or_else(|| {
                    engine_error(
                        "inspecting the Toxiproxy container",
                        format!("no IPv4 address on {network}"),
                    )
                })?;
            from_ips.push(ip);
        }

        let (host, api_port, client_ports, redis_port, postgres_port) = {
            let c = owned
                .container("toxiproxy")
                .ok_or_else(|| engine_error("toxiproxy", "no container"))?;
            let published = |port: u16| async move {
                c.get_host_port_ipv4(port.tcp())
                    .await
                    .map_err(|e| engine_error(format!("published port of {port}"), e))
            };
            let host = client_host(
                &c.get_host()
                    .await
                    .map_err(|e| engine_error("the engine's host", e))?
                    .to_string(),
            );
            let mut client_ports = Vec::new();
            for b in &plan.brokers {
                client_ports.push(published(b.client_proxy).await?);
            }
            (
                host,
                published(plan.toxiproxy_api).await?,
                client_ports,
                published(plan.redis_proxy).await?,
                published(plan.postgres_proxy).await?,
            )
        };
        let toxiproxy = ToxiproxyClient::new(&format!("{host}:{api_port}"))?;
        {
            let client = toxiproxy.clone();
            wait_healthy(owned, "toxiproxy", timeout, &["toxiproxy"], || {
                let c = client.clone();
                async move { c.version().await.map(|_| ()).map_err(|e| e.to_string()) }
            })
            .await?;
        }
        toxiproxy
            .populate(&proxies(stack, &plan, &from_ips)?)
            .await?;

        // The brokers, each on its own network with its hosts file pointing its peers'
        // names at Toxiproxy.
        let mut brokers = Vec::new();
        for (idx, toxiproxy_ip) in from_ips.iter().enumerate() {
            let id = idx as u8 + 1;
            let mut image = GenericImage::new(KAFKA_IMAGE.0, KAFKA_IMAGE.1)
                .with_wait_for(WaitFor::Nothing)
                .with_network(broker_network(stack, id))
                .with_container_name(container_name(stack, &format!("kafka-{id}")))
                .with_hostname(format!("kafka-{id}"));
            for (k, v) in kafka_env(&plan, id, config.partitions, &host, client_ports[idx])? {
                image = image.with_env_var(k, v);
            }
            for (name, ip) in kafka_hosts(&plan, id, *toxiproxy_ip) {
                image = image.with_host(name, Host::Addr(ip));
            }
            let service = format!("kafka-{id}");
            brokers.push(async move { start_container(&service, label(image), KAFKA_IMAGE).await });
        }
        for r in join_all(brokers).await {
            match r {
                Ok(c) => owned.containers.push(c),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }

        let endpoints = Endpoints {
            kafka_bootstrap: client_ports
                .iter()
                .map(|p| format!("{host}:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            redis_url: format!("redis://{host}:{redis_port}/"),
            postgres_url: format!(
                "postgres://postgres@{host}:{postgres_port}/{}",
                stores::DATABASE
            ),
            toxiproxy_api: format!("http://{host}:{api_port}"),
        };
        let redis_url = endpoints.redis_url.clone();
        wait_healthy(owned, "redis", timeout, &["toxiproxy", "redis"], || {
            let url = redis_url.clone();
            async move {
                stores::redis_ping(&url, Duration::from_secs(2))
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await?;
        let postgres_url = endpoints.postgres_url.clone();
        wait_healthy(
            owned,
            "postgres",
            timeout,
            &["toxiproxy", "postgres"],
            || {
                let url = postgres_url.clone();
                async move { postgres_answers(&url).await }
            },
        )
        .await?;
        let broker_services: Vec<String> = (1..=plan.broker_count())
            .map(|i| format!("kafka-{i}"))
            .collect();
        let watched: Vec<&str> = broker_services.iter().map(String::as_str).collect();
        let bootstrap = endpoints.kafka_bootstrap.clone();
        let expected = plan.broker_count() as usize;
        wait_healthy(owned, "kafka", timeout, &watched, || {
            let bootstrap = bootstrap.clone();
            async move {
                let view = kafka::cluster_view(bootstrap, Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())?;
                if view.brokers.len() == expected {
                    Ok(())
                } else {
                    Err(format!(
                        "metadata lists brokers {:?}, expected {expected}",
                        view.brokers
                    ))
                }
            }
        })
        .await?;
        let specs = topics::all_topics();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let partitions = config.partitions;
        wait_healthy(owned, "seed topics", timeout, &watched, || {
            let (bootstrap, specs, names) = (bootstrap.clone(), specs.clone(), names.clone());
            async move {
                kafka::create_topics(&bootstrap, &specs, partitions)
                    .await
                    .map_err(|e| e.to_string())?;
                let view = kafka::cluster_view(bootstrap, Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())?;
                kafka::topics_ready(&view, &names, partitions).map_err(|e| e.to_string())
            }
        })
        .await?;
        tracing::info!(%stack, bootstrap = %endpoints.kafka_bootstrap, "docker stack up");
        Ok((endpoints, toxiproxy))
    }

    /// The stack's unique name (prefix of its containers and networks).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where clients connect: the published ports of the proxies.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn toxiproxy(&self) -> &ToxiproxyClient {
        &self.toxiproxy
    }

    /// Writes each container's output to `<dir>/<service>.log` (the compose file's
    /// service names), for the run's post-mortem.
    pub async fn save_logs(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
        for (service, c) in &self.owned.containers {
            let mut text = c.stdout_to_vec().await.unwrap_or_default();
            text.extend(c.stderr_to_vec().await.unwrap_or_default());
            let path = dir.join(format!("{service}.log"));
            std::fs::write(&path, text)
                .map_err(|e| StackError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Removes every container and network of the stack.
    pub async fn down(mut self) -> Result<()> {
        self.owned.remove().await
    }
}

#[cfg(test)]
mod tests {
    //! The provider against docker-compose.yml and docker/toxiproxy.json: the same images,
    //! commands, broker settings, hosts and proxies (no engine needed).

    use super::*;
    use serde_yaml::Value;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn repo_file(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(name)
    }

    fn compose() -> Value {
        let text = std::fs::read_to_string(repo_file("docker-compose.yml")).unwrap();
        let mut v: Value = serde_yaml::from_str(&text).unwrap();
        v.apply_merge().unwrap();
        v
    }

    fn text(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => panic!("not a scalar: {other:?}"),
        }
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_sequence().unwrap().iter().map(text).collect()
    }

    /// The compose file's address of Toxiproxy on broker j's network.
    fn compose_ip(j: u8) -> Ipv4Addr {
        Ipv4Addr::new(172, 28, j, 100)
    }

    #[test]
    fn images_and_commands_are_the_compose_files() {
        let c = compose();
        let s = &c["services"];
        let image = |(n, t): (&str, &str)| format!("{n}:{t}");
        assert_eq!(text(&s["toxiproxy"]["image"]), image(TOXIPROXY_IMAGE));
        assert_eq!(text(&s["redis"]["image"]), image(REDIS_IMAGE));
        assert_eq!(text(&s["postgres"]["image"]), image(POSTGRES_IMAGE));
        for i in 1..=3 {
            assert_eq!(
                text(&s[format!("kafka-{i}").as_str()]["image"]),
                image(KAFKA_IMAGE)
            );
        }
        let plan = compose_plan().unwrap();
        assert_eq!(strings(&s["redis"]["command"]), redis_cmd(&plan));
        assert_eq!(strings(&s["postgres"]["command"]), postgres_cmd(&plan));
        let toxi = strings(&s["toxiproxy"]["command"]);
        assert_eq!(toxi[..4], toxiproxy_cmd(&plan)[..]);
        for (key, value) in stores::TOXIPROXY_ENV {
            assert_eq!(text(&s["toxiproxy"]["environment"][*key]), *value);
        }
        assert_eq!(
            text(&s["postgres"]["environment"]["POSTGRES_DB"]),
            stores::DATABASE
        );
    }

    #[test]
    fn broker_settings_and_hosts_are_the_compose_files() {
        let c = compose();
        let plan = compose_plan().unwrap();
        for id in 1..=3u8 {
            let svc = &c["services"][format!("kafka-{id}").as_str()];
            let want: BTreeMap<String, String> = svc["environment"]
                .as_mapping()
                .unwrap()
                .iter()
                .map(|(k, v)| (text(k), text(v)))
                .collect();
            // The compose file advertises the client proxy at its fixed published port.
            let client_port = plan.broker(id).unwrap().client_proxy;
            let got: BTreeMap<String, String> = kafka_env(&plan, id, 6, "127.0.0.1", client_port)
                .unwrap()
                .into_iter()
                .collect();
            assert_eq!(got, want, "kafka-{id} environment");

            let want_hosts: BTreeMap<String, String> = strings(&svc["extra_hosts"])
                .iter()
                .map(|h| {
                    let (name, ip) = h.split_once(':').unwrap();
                    (name.to_string(), ip.to_string())
                })
                .collect();
            let got_hosts: BTreeMap<String, String> = kafka_hosts(&plan, id, compose_ip(id))
                .into_iter()
                .map(|(n, ip)| (n, ip.to_string()))
                .collect();
            assert_eq!(got_hosts, want_hosts, "kafka-{id} extra_hosts");
        }
    }

    #[test]
    fn proxies_are_the_compose_files() {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo_file("docker/toxiproxy.json")).unwrap(),
        )
        .unwrap();
        let want: BTreeMap<String, (String, String)> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    (
                        p["listen"].as_str().unwrap().to_string(),
                        p["upstream"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
        let plan = compose_plan().unwrap();
        let ips: Vec<Ipv4Addr> = (1..=3).map(compose_ip).collect();
        let got: BTreeMap<String, (String, String)> = proxies("st", &plan, &ips)
            .unwrap()
            .into_iter()
            .map(|l| {
                let upstream = l.upstream.strip_prefix("st-").unwrap().to_string();
                (l.name.clone(), (l.listen(), upstream))
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn names_are_unique_per_stack() {
        let a = DockerConfig::new("squall");
        std::thread::sleep(Duration::from_millis(2));
        let b = DockerConfig::new("squall");
        assert_ne!(a.name, b.name);
        assert!(a.name.starts_with("squall-"));
        assert_eq!(broker_network(&a.name, 2), format!("{}-from-2", a.name));
    }

    #[test]
    fn an_absent_engine_is_named() {
        let e = DockerError::NoEngine {
            endpoint: DEFAULT_ENGINE.into(),
            message: "connection refused".into(),
        };
        let s = e.to_string();
        assert!(
            s.contains("no Docker engine answers at unix:///var/run/docker.sock"),
            "{s}"
        );
        assert!(s.contains("DOCKER_HOST"), "{s}");
    }
}
