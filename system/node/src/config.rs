//! A node's configuration: identity, endpoints and behaviour switches (publish mode,
//! fan-out mode, limits, the stream generator). Read from a YAML file, then overridden by
//! flags and environment in the binary. Unknown keys are errors.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

/// How actions reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// The message and its outbox row commit together; a relay publishes with an
    /// idempotent producer (acks=all). Zero loss, Kafka off the user's latency path.
    #[default]
    Outbox,
    /// The seeds' fire-and-forget `send()` after the commit: fast, loses events on kill -9.
    Async,
    /// Nothing goes to Kafka: no outbox rows, no producer, no relay. For benchmarks that
    /// show what Kafka costs the user's path (workers and replay see nothing).
    None,
}

/// How a message reaches members connected to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FanoutMode {
    /// Redis Pub/Sub, published by the accepting node right after the commit.
    #[default]
    Redis,
    /// Every node consumes chat-events and delivers to its own sockets (seed 003).
    Kafka,
}

/// A switch written `on` / `off` in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    #[default]
    On,
    Off,
}

/// The deterministic generator that stands in for the AI model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub chunks: i64,
    pub words_per_chunk: usize,
    /// Pause between chunks.
    pub pace_ms: u64,
    /// Probability that a session fails part-way (decided per session from the seed).
    pub error_rate: f64,
    pub seed: u64,
    /// How long chunks stay in Redis for `resume`.
    pub cache_ttl_s: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            chunks: 20,
            words_per_chunk: 5,
            pace_ms: 50,
            error_rate: 0.0,
            seed: 42,
            cache_ttl_s: 600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub node_id: String,
    pub listen: SocketAddr,
    pub postgres_url: String,
    pub redis_url: String,
    pub kafka_bootstrap: String,
    /// HMAC secret for connection tokens.
    pub token_secret: String,
    pub publish_mode: PublishMode,
    pub fanout_mode: FanoutMode,
    /// Larger text frames get a `frame_too_large` error (the connection stays open).
    pub max_frame_bytes: usize,
    /// Frames past this hard cap close the connection (protects memory).
    pub hard_frame_cap_bytes: usize,
    pub rate_limit_per_s: u32,
    pub rate_limit_burst: u32,
    /// Run the outbox relay on this node.
    pub outbox_relay: bool,
    pub relay_batch: i64,
    /// Least time between the starts of two relay passes that did not fill a batch, in
    /// milliseconds (0: back to back). Kafka's cost is per request more than per record:
    /// a relay publishing the two rows that came in during its last pass kept the brokers
    /// at a core at 1,000 messages/s; waiting lets each pass carry more. A pass that
    /// fills its batch is followed at once, and a relay idle for longer starts at once.
    pub relay_pass_every_ms: u64,
    /// The producers' `linger.ms`: the reliable one (outbox mode: the relay's and
    /// DELIVERED's) and async mode's (typing events in every mode). Records reach them in
    /// batches already; a short linger costs librdkafka's broker threads waking to serve
    /// their partitions every interval while records are queued.
    pub kafka_linger_ms: u64,
    pub sync_limit: i64,
    pub pg_max_connections: u32,
    /// `on`: sends from every connection are grouped into one transaction per batch (group
    /// commit; seqs still dense per conversation, a client's own sends keep their order),
    /// and a connection reads its next frame while its sends are being stored (acks come
    /// back in the order the sends were read). `off`: one transaction per send, awaited
    /// before the connection's next frame (the earlier path, kept to compare).
    pub send_batching: Switch,
    /// Batcher tasks; a conversation always goes to the same one. Each holds at most one
    /// PostgreSQL connection of the pool at a time (at most half the pool is used so).
    /// Two, not more: each batch has a cost of its own whatever its size (then five
    /// statements, now one call: locks, the batch statement, a commit), and at 10,000
    /// sends/s two batchers' larger batches cost PostgreSQL 71-72 µs per message against
    /// 88-90 with four (two bench runs side by side, README "Batchers").
    pub append_batchers: usize,
    /// Messages per batch transaction at most.
    pub append_batch_max: usize,
    /// How long a batcher under load waits to fill a batch, in microseconds (a batcher
    /// whose last batch held one message does not wait).
    pub append_linger_us: u64,
    /// Sends of one connection being stored at once; past this the connection's next
    /// frame waits.
    pub max_pending_sends: usize,
    /// How long SIGTERM waits for connections to drain.
    pub drain_timeout_ms: u64,
    /// A connection whose unsent frames would exceed this is closed (4408): the node
    /// never drops a frame quietly, the client reconnects and catches up with `sync`.
    pub max_unsent_bytes: usize,
    /// A connection whose socket accepts nothing for this long is dropped (no close frame
    /// can get through a stalled socket).
    pub write_stall_timeout_ms: u64,
    /// The node pings every connection this often (WebSocket ping)...
    pub ping_interval_ms: u64,
    /// ...and closes one it heard nothing from (no frame, no pong) for this long (4409).
    pub idle_timeout_ms: u64,
    /// A client still rate limited after this long (limited again within every second of
    /// it) is closed with 1008.
    pub rate_limit_close_after_ms: u64,
    /// Error frames written per connection per second; past this they are counted
    /// (`chatstream_error_frames_suppressed_total`), not written.
    pub max_error_frames_per_s: u32,
    pub stream: StreamConfig,
    /// Deliberate defects for Squall's self-validation; all off by default.
    pub sabotage: crate::sabotage::Sabotage,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: "node-1".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            postgres_url: "postgres://postgres@127.0.0.1:29060/chatstream".into(),
            redis_url: "redis://127.0.0.1:29050/".into(),
            kafka_bootstrap: "127.0.0.1:29011,127.0.0.1:29012,127.0.0.1:29013".into(),
            token_secret: "squall-dev-secret".into(),
            publish_mode: PublishMode::Outbox,
            fanout_mode: FanoutMode::Redis,
            max_frame_bytes: 64 * 1024,
            hard_frame_cap_bytes: 1024 * 1024,
            rate_limit_per_s: 50,
            rate_limit_burst: 100,
            outbox_relay: true,
            relay_batch: 500,
            relay_pass_every_ms: 10,
            kafka_linger_ms: 20,
            sync_limit: 500,
            pg_max_connections: 16,
            send_batching: Switch::On,
            append_batchers: 2,
            append_batch_max: 256,
            append_linger_us: 1000,
            max_pending_sends: 256,
            drain_timeout_ms: 10_000,
            max_unsent_bytes: 1024 * 1024,
            write_stall_timeout_ms: 10_000,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            rate_limit_close_after_ms: 5_000,
            max_error_frames_per_s: 10,
            stream: StreamConfig::default(),
            sabotage: crate::sabotage::Sabotage::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}{location}: {message} (see `chatstream node --help` for the keys)")]
    Parse {
        path: String,
        location: String,
        message: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// The producers' linger (`kafka_linger_ms`).
    pub fn kafka_linger(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.kafka_linger_ms)
    }

    /// The append batchers' settings; none when `send_batching` is off. The batchers get
    /// at most half the pool (at least one): the rest of the node needs connections too.
    pub fn batch_settings(&self) -> Option<chatstream_store::BatchSettings> {
        let half_pool = (self.pg_max_connections as usize / 2).max(1);
        (self.send_batching == Switch::On).then(|| chatstream_store::BatchSettings {
            batchers: self.append_batchers.min(half_pool),
            max_batch: self.append_batch_max,
            linger: std::time::Duration::from_micros(self.append_linger_us),
            queue: 4096,
        })
    }

    pub fn from_yaml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            location: e
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default(),
            message: e.to_string(),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.node_id.is_empty() {
            problems.push("node_id is empty".to_string());
        }
        if self.token_secret.len() < 8 {
            problems.push("token_secret must have at least 8 bytes".to_string());
        }
        if self.max_frame_bytes == 0 || self.max_frame_bytes > self.hard_frame_cap_bytes {
            problems.push(format!(
                "max_frame_bytes ({}) must be in 1..=hard_frame_cap_bytes ({})",
                self.max_frame_bytes, self.hard_frame_cap_bytes
            ));
        }
        if self.rate_limit_per_s == 0 || self.rate_limit_burst == 0 {
            problems.push("rate limits must be positive".to_string());
        }
        if !(0.0..=1.0).contains(&self.stream.error_rate) {
            problems.push(format!(
                "stream.error_rate {} is not in 0..=1",
                self.stream.error_rate
            ));
        }
        if self.publish_mode == PublishMode::None && self.fanout_mode == FanoutMode::Kafka {
            problems.push(
                "fanout_mode kafka consumes chat-events, which publish_mode none never writes"
                    .to_string(),
            );
        }
        // An outbound msg frame carries a body of up to max_frame_bytes plus its fields.
        if self.max_unsent_bytes < 2 * self.max_frame_bytes {
            problems.push(format!(
                "max_unsent_bytes ({}) must be at least twice max_frame_bytes ({})",
                self.max_unsent_bytes, self.max_frame_bytes
            ));
        }
        if self.write_stall_timeout_ms == 0
            || self.rate_limit_close_after_ms == 0
            || self.max_error_frames_per_s == 0
        {
            problems.push(
                "write_stall_timeout_ms, rate_limit_close_after_ms and max_error_frames_per_s must be positive"
                    .to_string(),
            );
        }
        if self.ping_interval_ms == 0 || self.idle_timeout_ms <= self.ping_interval_ms {
            problems.push(format!(
                "idle_timeout_ms ({}) must be longer than ping_interval_ms ({}), which must be positive",
                self.idle_timeout_ms, self.ping_interval_ms
            ));
        }
        if !(1..=64).contains(&self.append_batchers)
            || !(1..=10_000).contains(&self.append_batch_max)
            || self.max_pending_sends == 0
            || self.append_linger_us > 1_000_000
        {
            problems.push(format!(
                "append_batchers ({}) must be in 1..=64, append_batch_max ({}) in 1..=10000, \
                 max_pending_sends ({}) positive and append_linger_us ({}) at most 1000000",
                self.append_batchers,
                self.append_batch_max,
                self.max_pending_sends,
                self.append_linger_us
            ));
        }
        if self.relay_batch < 1 || self.relay_pass_every_ms > 1_000 || self.kafka_linger_ms > 1_000
        {
            problems.push(format!(
                "relay_batch ({}) must be positive, relay_pass_every_ms ({}) and kafka_linger_ms ({}) at most 1000",
                self.relay_batch, self.relay_pass_every_ms, self.kafka_linger_ms
            ));
        }
        if self.stream.chunks < 1 || self.stream.words_per_chunk == 0 {
            problems.push("stream.chunks and stream.words_per_chunk must be positive".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_overrides_defaults_and_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("cs-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "node_id: node-7\npublish_mode: async\nstream:\n  chunks: 3\n",
        )
        .unwrap();
        let c = NodeConfig::from_yaml_file(&good).unwrap();
        assert_eq!(
            (c.node_id.as_str(), c.publish_mode, c.stream.chunks),
            ("node-7", PublishMode::Async, 3)
        );
        assert_eq!(c.stream.pace_ms, 50);
        let off = dir.join("off.yaml");
        std::fs::write(&off, "send_batching: off\nappend_batchers: 3\n").unwrap();
        let c = NodeConfig::from_yaml_file(&off).unwrap();
        assert_eq!((c.send_batching, c.append_batchers), (Switch::Off, 3));
        assert!(c.batch_settings().is_none() && c.validate().is_ok());
        assert_eq!(
            NodeConfig::default().batch_settings().map(|b| b.batchers),
            Some(2)
        );
        let small_pool = NodeConfig {
            pg_max_connections: 3,
            ..NodeConfig::default()
        };
        assert!(small_pool.validate().is_ok());
        assert_eq!(small_pool.batch_settings().map(|b| b.batchers), Some(1));
        let none = dir.join("none.yaml");
        std::fs::write(&none, "publish_mode: none\n").unwrap();
        let c = NodeConfig::from_yaml_file(&none).unwrap();
        assert_eq!(c.publish_mode, PublishMode::None);
        assert!(c.validate().is_ok());
        let err = NodeConfig {
            fanout_mode: FanoutMode::Kafka,
            ..c
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("publish_mode none"), "{err}");
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "node_id: n\nfanout: kafka\n").unwrap();
        let err = NodeConfig::from_yaml_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.yaml:2") && err.contains("fanout"),
            "{err}"
        );
        let c = NodeConfig {
            max_frame_bytes: 0,
            stream: StreamConfig {
                error_rate: 2.0,
                ..StreamConfig::default()
            },
            ..NodeConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("max_frame_bytes") && err.contains("error_rate"),
            "{err}"
        );
        let relay = NodeConfig {
            relay_pass_every_ms: 5_000,
            ..NodeConfig::default()
        };
        let err = relay.validate().unwrap_err().to_string();
        assert!(err.contains("relay_pass_every_ms (5000)"), "{err}");
    }
}
