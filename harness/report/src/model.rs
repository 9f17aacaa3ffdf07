//! The `report.json` model (schema version [`SCHEMA_VERSION`]): every type that is
//! serialised into it, and nothing else. Every field is documented, with its unit, in
//! `reports/README.md`; a change a reader of an older version would misread bumps
//! [`SCHEMA_VERSION`]. Times are seconds since the run's origin (`t = 0` of the history)
//! unless a name says otherwise; latencies are integer microseconds (`_us`).

use serde::{Deserialize, Serialize};
use squall_check::Verdict;
use std::collections::BTreeMap;

/// Bumped on any change to the meaning or shape of an existing field.
pub const SCHEMA_VERSION: u32 = 1;

/// The whole of `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    /// The version of the squall that rendered the report.
    pub squall_version: String,
    pub run: RunInfo,
    pub scenario: ScenarioInfo,
    pub outcome: Outcome,
    pub environment: Environment,
    pub topology: TopologyInfo,
    pub load: LoadInfo,
    pub phases: Phases,
    /// Per latency metric (`send_ack`, `delivery`, `http_history`, ...), the measured window.
    pub latency: BTreeMap<String, LatencyStats>,
    /// One entry per second of the run, from `series.json`.
    pub series: Vec<SecondEntry>,
    /// Every fault the nemesis injected, with its real window, in id order.
    pub faults: Vec<FaultWindow>,
    /// The verdicts of `verdicts.json`, in the scenario's order of checks.
    pub checks: Vec<Verdict>,
    pub resources: Resources,
    pub timeseries: TimeSeries,
    /// What the renderer could not find or had to assume, one sentence each.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run directory's name, `<scenario>-<UTC timestamp>`.
    pub run_id: String,
    /// Unix milliseconds at `t = 0`, from the history header.
    pub origin_wall_ms: Option<i64>,
    /// `origin_wall_ms` as RFC 3339 UTC (`2026-11-26T04:18:17.424Z`).
    pub started_at: Option<String>,
    /// Whether the load was stopped early (Ctrl-C, a guardrail).
    pub interrupted: bool,
    /// Seconds spent creating conversations before the load.
    pub setup_s: Option<f64>,
    pub history_records: Option<u64>,
    pub history_bytes: Option<u64>,
    /// Which of the run directory's input files were present.
    pub inputs: BTreeMap<String, bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioInfo {
    pub name: String,
    pub description: String,
    pub seed: u64,
    /// Lower-case hex SHA-256 of the bytes of the run directory's `scenario.yaml`.
    pub sha256: String,
    /// How many checks (checkers and gates) the scenario states.
    pub checks: usize,
    /// How many fault entries the scenario states (before repeats are expanded).
    pub faults: usize,
}

/// pass or fail of the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    Pass,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// `pass` only when verdicts exist, every one is valid and the run was not interrupted.
    pub result: RunResult,
    pub valid: usize,
    pub invalid: usize,
    pub unknown: usize,
    /// Why the result is what it is, one line.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// `detected` (when this report was rendered) or `preserved` (from the report.json
    /// already in the run directory, rendered when the run finished).
    pub source: String,
    /// `std::thread::available_parallelism`.
    pub cores: Option<u32>,
    /// MemTotal of /proc/meminfo, in bytes.
    pub memory_bytes: Option<u64>,
    /// `std::env::consts::OS`, with PRETTY_NAME of /etc/os-release when there is one.
    pub os: String,
    /// /proc/sys/kernel/osrelease.
    pub kernel: Option<String>,
    /// `git rev-parse HEAD` in the working directory.
    pub git_commit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopologyInfo {
    pub nodes: u32,
    /// `outbox`, `async`, `none`, or `default` (the node's own default).
    pub publish_mode: String,
    /// `redis`, `kafka`, or `default`.
    pub fanout_mode: String,
    /// Partitions of every chatstream topic.
    pub partitions: i32,
    /// The worker kinds that run (empty when workers are disabled).
    pub workers: Vec<String>,
    /// Processes per worker kind.
    pub worker_concurrency: u32,
    /// Names of the sabotage switches set (deliberately broken properties).
    pub sabotage: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadInfo {
    pub asked: LoadAsked,
    pub achieved: LoadAchieved,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadAsked {
    pub users: u32,
    pub tenants: u32,
    pub conversations: u32,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Operations of every kind per second over the measured window: the scenario's rate
    /// integrated from the end of the warm-up to its end, divided by the duration.
    pub ops_per_s: f64,
    /// `ops_per_s` times the chat share of the mix: chat messages asked per second.
    pub sends_per_s: f64,
    /// Operations expected over warm-up plus duration (`rate.expected_count(total)`).
    pub expected_ops_total: f64,
    /// The mix's weights normalised to fractions (`chat`, `stream`, ...).
    pub mix: BTreeMap<String, f64>,
    /// Per HTTP endpoint, requests asked per second.
    pub http_per_s: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadAchieved {
    /// Seconds of `series.json` marked `measuring` (the measured window).
    pub measured_s: f64,
    pub sends_invoked_per_s: f64,
    pub sends_acked_per_s: f64,
    /// Live plus sync deliveries per second.
    pub deliveries_per_s: f64,
    /// Live deliveries per second: the throughput figure `squall compare` judges (sync
    /// deliveries rise and fall with resyncs, duplicates included).
    #[serde(default)]
    pub live_deliveries_per_s: f64,
    /// Totals over the measured window.
    pub sends_invoked: u64,
    pub sends_acked: u64,
    pub sends_failed: u64,
    pub sends_unknown: u64,
    pub deliveries: u64,
    /// Operations started over the whole run (warm-up included), from run.json.
    pub arrivals: Option<u64>,
    /// run.json's whole-run counters, as written.
    pub counters: BTreeMap<String, u64>,
}

/// The harness's phase boundaries, seconds since the origin (absent when not recorded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    pub connected_s: Option<f64>,
    pub load_start_s: Option<f64>,
    pub load_end_s: Option<f64>,
    pub drained_s: Option<f64>,
    pub interrupted_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// `histograms` (the saved HdrHistogram) or `run.json` (its summary; no p99.99, no curve).
    pub source: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub p9999_us: Option<u64>,
    pub max_us: u64,
    /// `[percentile, µs]` pairs from p50 to p99.99 (histograms only).
    pub curve: Vec<[f64; 2]>,
}

/// One latency's summary within one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecondLatency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondEntry {
    /// The second `[second, second + 1)` since the origin.
    pub second: u64,
    /// Inside the measured window.
    pub measuring: bool,
    /// sends_invoked in that second.
    pub sent: u64,
    /// sends_acked in that second.
    pub acked: u64,
    /// delivered_live + delivered_sync in that second.
    pub delivered: u64,
    /// Every counter's increase in that second (`connected` is a gauge: its value).
    pub counters: BTreeMap<String, u64>,
    pub latency: BTreeMap<String, SecondLatency>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultWindow {
    pub id: u32,
    pub kind: String,
    pub target: String,
    /// Real start (the nemesis's invoke), seconds since the origin.
    pub start_s: f64,
    /// Real end (its ok, fail or info), seconds since the origin; absent when it never ended.
    pub end_s: Option<f64>,
    pub duration_s: Option<f64>,
    /// `start_s` minus `phases.load_start_s` (the scenario's `at` is measured from there).
    pub start_after_load_s: Option<f64>,
    pub end_after_load_s: Option<f64>,
    /// `healed` (ok), `failed` (fail), `uncertain` (info) or `open` (no end recorded).
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Samples (seconds) in `signals.jsonl`.
    pub samples: usize,
    pub processes: BTreeMap<String, ProcessUse>,
    /// Per source (a node, the workers), seconds in which it did not answer.
    pub unreachable_s: BTreeMap<String, u64>,
    /// Maximum Kafka under-replicated partitions seen.
    pub kafka_under_replicated_max: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessUse {
    pub samples: usize,
    /// CPU in cores (1.0 = one core busy), mean and maximum over the samples.
    pub cpu_mean: f64,
    pub cpu_max: f64,
    pub rss_max_bytes: u64,
    pub rss_mean_bytes: u64,
}

/// Lines over time from the signals: `lines` maps a line's name to `[t, value]` points, `t`
/// seconds since the origin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lines {
    pub unit: String,
    pub lines: BTreeMap<String, Vec<[f64; 2]>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeSeries {
    /// Summed consumer lag per group (messages).
    pub consumer_lag: Lines,
    /// `chatstream_outbox_backlog` per node (rows).
    pub outbox_backlog: Lines,
    /// The connection gauge per node, when the nodes export one.
    pub connections: Lines,
    /// The node metric `connections` was read from; absent when none was found.
    pub connections_metric: Option<String>,
    /// CPU per process (cores).
    pub cpu: Lines,
    /// RSS per process (bytes).
    pub rss_bytes: Lines,
}
