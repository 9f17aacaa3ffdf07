//! The `topology` section: how big the stack is (nodes, Kafka partitions), the settings
//! passed to every chatstream node, and which worker processes run.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// Options of the provisioned infrastructure.
    pub stack: StackOptions,
    /// How many chatstream nodes run (1..=16).
    pub nodes: u32,
    /// Settings written into every node's configuration file.
    pub node: NodeSettings,
    /// The Kafka worker processes.
    pub workers: Workers,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            stack: StackOptions::default(),
            nodes: 1,
            node: NodeSettings::default(),
            workers: Workers::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StackOptions {
    /// Partitions of every chatstream topic (1..=64).
    pub partitions: i32,
    /// How long the whole stack may take to become ready.
    #[serde(with = "crate::duration")]
    pub start_timeout: Duration,
    /// `proxied` (every link through Toxiproxy, so faults can cut or slow it) or `direct`
    /// (no proxies: the system measured without their cost; only process faults).
    pub links: Links,
}

/// How the stack's links are wired (see `squall_stack::links::LinkMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Links {
    #[default]
    Proxied,
    Direct,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            partitions: 6,
            start_timeout: Duration::from_secs(120),
            links: Links::Proxied,
        }
    }
}

/// Every chatstream node setting except identity and endpoints. `None` keeps the node's own
/// default and is left out when serialised, so this serialises straight into the node's
/// YAML configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_mode: Option<PublishMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout_mode: Option<FanoutMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_frame_cap_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_relay: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_batch: Option<i64>,
    /// The node's producers' `linger.ms`: how long they hold records to fill a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_linger_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
    /// A connection whose unsent frames would pass this is closed (4408).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unsent_bytes: Option<usize>,
    /// A connection whose socket takes nothing for this long is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_stall_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamSettings>,
    /// Switches of the system under test that deliberately break a property (to prove a
    /// checker catches it); passed to the node as they are.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sabotage: BTreeMap<String, serde_yaml::Value>,
}

/// How actions reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    Outbox,
    Async,
    None,
}

/// How a message reaches members connected to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FanoutMode {
    Redis,
    Kafka,
}

/// The node's stand-in for the AI model that produces stream chunks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words_per_chunk: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workers {
    /// Whether any worker process runs.
    pub enabled: bool,
    /// Which workers run.
    pub only: Vec<WorkerKind>,
    /// Processes per worker kind (1..=32), all in that kind's consumer group.
    pub concurrency: u32,
    /// The alerts worker's SLA threshold; `None` keeps the worker's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sla_ms: Option<u64>,
    /// How often workers commit offsets; `None` keeps the worker's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_interval_ms: Option<u64>,
    /// Switches of the workers that deliberately break a property (chatstream's own
    /// hidden flags, `key: true` → `--key`, `key: value` → `--key value`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sabotage: BTreeMap<String, serde_yaml::Value>,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            enabled: true,
            only: vec![WorkerKind::Audit, WorkerKind::Analytics, WorkerKind::Search],
            concurrency: 1,
            sla_ms: None,
            commit_interval_ms: None,
            sabotage: BTreeMap::new(),
        }
    }
}

impl Workers {
    /// True when the worker of `kind` runs in this scenario.
    pub fn runs(&self, kind: WorkerKind) -> bool {
        self.enabled && self.only.contains(&kind)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerKind {
    Audit,
    Analytics,
    Search,
    Alerts,
    Export,
}

impl WorkerKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkerKind::Audit => "audit",
            WorkerKind::Analytics => "analytics",
            WorkerKind::Search => "search",
            WorkerKind::Alerts => "alerts",
            WorkerKind::Export => "export",
        }
    }
}
