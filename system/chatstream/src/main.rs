//! `chatstream`: runs the parts of the system under test. `chatstream node` serves one
//! node; `chatstream workers` runs Kafka workers; `replay`, `lag`, `audit` and `search`
//! read history and projections back; `token` mints a connection token.

mod replay_cmd;
mod workers_cmd;

/// mimalloc instead of glibc malloc: each message is a few short-lived allocations made on
/// one tokio worker and often freed on another, which glibc's per-thread arenas handle
/// with `malloc_consolidate` and `unlink_chunk` (a fifth of the node's CPU in
/// system/docs/perf/send-path.md). Measured by `cargo bench -p chatstream --bench node`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use chatstream_node::config::{FanoutMode, PublishMode};
use chatstream_node::NodeConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "chatstream",
    version,
    about = "chatstream: the multi-node chat system Squall tests"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "CHATSTREAM_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node: WebSocket endpoint /ws, HTTP API, /healthz, /readyz, /metrics.
    /// Settings come from --config (YAML), then environment, then flags.
    Node(NodeArgs),
    /// Run Kafka workers (audit, analytics, search, alerts, export), each its own group.
    Workers(workers_cmd::WorkersArgs),
    /// Replay history: a session's timeline, from a time, an offset range; rebuild a
    /// projection; backfill or reset a consumer group.
    Replay {
        #[command(flatten)]
        endpoints: replay_cmd::Endpoints,
        #[command(subcommand)]
        command: replay_cmd::ReplayCommand,
    },
    /// Consumer lag of a group, per partition.
    Lag {
        #[command(flatten)]
        endpoints: replay_cmd::Endpoints,
        #[arg(long)]
        group: String,
        /// Topics to count; by default those the group consumes (its committed offsets
        /// and its members' assignments).
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
    },
    /// The seeds' audit queries.
    Audit {
        #[command(flatten)]
        endpoints: replay_cmd::Endpoints,
        #[command(subcommand)]
        command: replay_cmd::AuditCommand,
    },
    /// Full-text search over chat messages.
    Search {
        #[command(flatten)]
        endpoints: replay_cmd::Endpoints,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value_t = 20)]
        limit: i64,
        query: String,
    },
    /// Print a signed connection token for a user.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        #[arg(
            long,
            env = "CHATSTREAM_TOKEN_SECRET",
            default_value = "squall-dev-secret"
        )]
        secret: String,
    },
}

#[derive(Args)]
struct NodeArgs {
    /// YAML file with any NodeConfig keys (node_id, listen, postgres_url, stream: {...}, ...).
    #[arg(long, env = "CHATSTREAM_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "CHATSTREAM_NODE_ID")]
    node_id: Option<String>,
    /// Address for HTTP and WebSocket (port 0 picks a free port, printed at start).
    #[arg(long, env = "CHATSTREAM_LISTEN")]
    listen: Option<SocketAddr>,
    #[arg(long, env = "CHATSTREAM_POSTGRES_URL")]
    postgres_url: Option<String>,
    #[arg(long, env = "CHATSTREAM_REDIS_URL")]
    redis_url: Option<String>,
    #[arg(long, env = "CHATSTREAM_KAFKA_BOOTSTRAP")]
    kafka_bootstrap: Option<String>,
    #[arg(long, env = "CHATSTREAM_TOKEN_SECRET")]
    token_secret: Option<String>,
    /// outbox (default: zero loss), async (fire-and-forget, loses events on kill -9) or
    /// none (nothing to Kafka: no outbox rows, no producer; to measure what Kafka costs).
    #[arg(long, env = "CHATSTREAM_PUBLISH_MODE", value_enum)]
    publish_mode: Option<PublishModeArg>,
    /// redis (default) or kafka (every node consumes chat-events).
    #[arg(long, env = "CHATSTREAM_FANOUT_MODE", value_enum)]
    fanout_mode: Option<FanoutModeArg>,
    /// Text frames above this many bytes get a frame_too_large error.
    #[arg(long, env = "CHATSTREAM_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Do not run the outbox relay on this node (other nodes' relays publish its rows).
    #[arg(long, env = "CHATSTREAM_NO_RELAY")]
    no_relay: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum PublishModeArg {
    Outbox,
    Async,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum FanoutModeArg {
    Redis,
    Kafka,
}

impl NodeArgs {
    fn into_config(self) -> Result<NodeConfig> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_yaml_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(v) = self.node_id {
            c.node_id = v;
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.postgres_url {
            c.postgres_url = v;
        }
        if let Some(v) = self.redis_url {
            c.redis_url = v;
        }
        if let Some(v) = self.kafka_bootstrap {
            c.kafka_bootstrap = v;
        }
        if let Some(v) = self.token_secret {
            c.token_secret = v;
        }
        if let Some(v) = self.publish_mode {
            c.publish_mode = match v {
                PublishModeArg::Outbox => PublishMode::Outbox,
                PublishModeArg::Async => PublishMode::Async,
                PublishModeArg::None => PublishMode::None,
            };
        }
        if let Some(v) = self.fanout_mode {
            c.fanout_mode = match v {
                FanoutModeArg::Redis => FanoutMode::Redis,
                FanoutModeArg::Kafka => FanoutMode::Kafka,
            };
        }
        if let Some(v) = self.max_frame_bytes {
            c.max_frame_bytes = v;
        }
        if self.no_relay {
            c.outbox_relay = false;
        }
        c.validate()?;
        Ok(c)
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,sqlx=warn")
    });
    // No colour codes in log files (tests and tools read them).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Node(args) => {
            let config = args.into_config()?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| {
                    format!(
                        "binding {} (is another node on it? use --listen)",
                        config.listen
                    )
                })?;
            let addr = listener.local_addr()?;
            // One line on stdout that tools can wait for.
            println!(
                "{}",
                serde_json::json!({ "event": "listening", "node_id": config.node_id, "addr": addr.to_string() })
            );
            let metrics = chatstream_node::metrics::install()
                .map_err(|e| anyhow::anyhow!("installing metrics: {e}"))?;
            chatstream_node::run(config, listener, metrics, shutdown_signal()).await?;
            Ok(())
        }
        Command::Workers(args) => {
            let metrics = chatstream_node::metrics::install()
                .map_err(|e| anyhow::anyhow!("installing metrics: {e}"))?;
            workers_cmd::run(args, metrics, shutdown_signal()).await
        }
        Command::Replay { endpoints, command } => replay_cmd::run_replay(command, endpoints).await,
        Command::Lag {
            endpoints,
            group,
            topics,
        } => replay_cmd::run_lag(group, topics, endpoints).await,
        Command::Audit { endpoints, command } => replay_cmd::run_audit(command, endpoints).await,
        Command::Search {
            endpoints,
            tenant,
            limit,
            query,
        } => replay_cmd::run_search(tenant, query, limit, endpoints).await,
        Command::Token {
            user,
            tenant,
            ttl,
            secret,
        } => {
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + ttl;
            let claims = chatstream_protocol::auth::Claims {
                sub: user,
                tenant,
                exp,
            };
            println!(
                "{}",
                chatstream_protocol::auth::sign(secret.as_bytes(), &claims)?
            );
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatstream: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
