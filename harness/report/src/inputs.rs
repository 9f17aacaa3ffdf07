//! Reading a finished run directory: the scenario (required), and every other file the
//! run leaves (each optional: an absent file becomes a note in the report; a present file
//! that cannot be read is an error, so a report never silently shows half a run). The
//! history is streamed once and reduced to what a report shows: phases and fault windows.

use base64::Engine;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use squall_check::Verdict;
use squall_history::{Kind, Value, HARNESS, NEMESIS};
use squall_scenario::Scenario;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::{Environment, SecondLatency};
use crate::ReportError;

pub const SCENARIO: &str = "scenario.yaml";
pub const RUN: &str = "run.json";
pub const SERIES: &str = "series.json";
pub const HISTOGRAMS: &str = "histograms.json";
pub const SIGNALS: &str = "signals.jsonl";
pub const VERDICTS: &str = "verdicts.json";
pub const READBACK: &str = "readback.json.gz";

/// `run.json`, as `squall run` writes it (every field optional, so older or partial files
/// still read).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RunJson {
    pub run_id: Option<String>,
    pub interrupted: bool,
    pub setup_s: Option<f64>,
    pub arrivals: Option<u64>,
    pub counters: BTreeMap<String, u64>,
    pub latency_us: BTreeMap<String, RunLatency>,
    pub history_records: Option<u64>,
    pub history_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RunLatency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// One second of `series.json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SeriesPoint {
    pub second: u64,
    pub measuring: bool,
    pub latency: BTreeMap<String, SecondLatency>,
    pub counters: BTreeMap<String, u64>,
}

/// One line of `signals.jsonl`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SignalPoint {
    pub t: f64,
    pub processes: BTreeMap<String, ProcessSample>,
    pub metrics: BTreeMap<String, BTreeMap<String, f64>>,
    pub lag: BTreeMap<String, f64>,
    pub kafka_under_replicated: Option<u32>,
    pub unreachable: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProcessSample {
    pub cpu: f64,
    pub rss_bytes: u64,
}

/// A fault as the history tells it (µs since the origin).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRecord {
    pub id: u32,
    pub kind: String,
    pub target: String,
    pub start_us: Option<u64>,
    pub end_us: Option<u64>,
    pub end_kind: Option<Kind>,
    pub error: Option<String>,
}

/// What the report needs from the history.
#[derive(Debug, Clone, Default)]
pub struct HistoryDigest {
    pub run_id: String,
    pub origin_wall_ms: i64,
    pub records: u64,
    /// Phase name → µs of its first occurrence.
    pub phases: BTreeMap<String, u64>,
    pub faults: BTreeMap<u32, FaultRecord>,
}

/// Everything read from one run directory.
pub struct RunDir {
    pub path: PathBuf,
    pub scenario_text: String,
    pub scenario: Scenario,
    pub scenario_sha256: String,
    pub run: Option<RunJson>,
    pub series: Option<Vec<SeriesPoint>>,
    pub histograms: Option<BTreeMap<String, Histogram<u64>>>,
    pub signals: Option<Vec<SignalPoint>>,
    /// Lines of signals.jsonl that did not parse (a run killed mid-write truncates one).
    pub signals_skipped: usize,
    pub verdicts: Option<Vec<Verdict>>,
    pub history: Option<HistoryDigest>,
    pub readback_present: bool,
    /// The environment of a report.json already in the directory, if it has one.
    pub previous_environment: Option<Environment>,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ReportError + 'a {
    move |source| ReportError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn parse_err(path: &Path, message: impl std::fmt::Display) -> ReportError {
    ReportError::Parse {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The text of an optional file: `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, ReportError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ReportError> {
    match read_optional(path)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| parse_err(path, e)),
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl RunDir {
    pub fn load(dir: &Path) -> Result<RunDir, ReportError> {
        let scenario_path = dir.join(SCENARIO);
        let scenario_bytes =
            std::fs::read(&scenario_path).map_err(io_err("reading", &scenario_path))?;
        let scenario_text = String::from_utf8_lossy(&scenario_bytes).into_owned();
        let scenario =
            squall_scenario::parse_str(&scenario_text, &scenario_path.display().to_string())?;
        let (signals, signals_skipped) = match read_optional(&dir.join(SIGNALS))? {
            None => (None, 0),
            Some(text) => {
                let mut points = Vec::new();
                let mut skipped = 0;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<SignalPoint>(line) {
                        Ok(p) => points.push(p),
                        Err(_) => skipped += 1,
                    }
                }
                (Some(points), skipped)
            }
        };
        let history_path = dir.join(squall_history::FILE_NAME);
        let history = if history_path.exists() {
            Some(digest_history(&history_path)?)
        } else {
            None
        };
        let previous_environment = read_optional(&dir.join(crate::REPORT_JSON))?
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| {
                serde_json::from_value::<Environment>(v.get("environment")?.clone()).ok()
            });
        Ok(RunDir {
            path: dir.to_path_buf(),
            scenario_sha256: sha256_hex(&scenario_bytes),
            scenario_text,
            scenario,
            run: read_json(&dir.join(RUN))?,
            series: read_json(&dir.join(SERIES))?,
            histograms: load_histograms(&dir.join(HISTOGRAMS))?,
            signals,
            signals_skipped,
            verdicts: read_json(&dir.join(VERDICTS))?,
            history,
            readback_present: dir.join(READBACK).exists(),
            previous_environment,
        })
    }
}

/// `histograms.json`: metric → base64 of an HdrHistogram V2 (+deflate) serialisation.
fn load_histograms(path: &Path) -> Result<Option<BTreeMap<String, Histogram<u64>>>, ReportError> {
    let Some(encoded) = read_json::<BTreeMap<String, String>>(path)? else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    for (name, text) in encoded {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| parse_err(path, format!("{name}: not base64: {e}")))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut std::io::Cursor::new(bytes))
            .map_err(|e| parse_err(path, format!("{name}: not an HdrHistogram: {e:?}")))?;
        out.insert(name, h);
    }
    Ok(Some(out))
}

/// Streams the history once, keeping the phases and the faults.
fn digest_history(path: &Path) -> Result<HistoryDigest, ReportError> {
    let (header, ops) = squall_history::read(path)?;
    let mut digest = HistoryDigest {
        run_id: header.run_id,
        origin_wall_ms: header.origin_wall_ms,
        ..HistoryDigest::default()
    };
    for op in ops {
        let op = op?;
        digest.records += 1;
        match (op.p, &op.v) {
            (HARNESS, Value::Phase { name }) => {
                digest.phases.entry(name.clone()).or_insert(op.t);
            }
            (
                NEMESIS,
                Value::Fault {
                    id,
                    kind,
                    target,
                    err,
                },
            ) => {
                let f = digest.faults.entry(*id).or_insert_with(|| FaultRecord {
                    id: *id,
                    kind: kind.clone(),
                    target: target.clone(),
                    start_us: None,
                    end_us: None,
                    end_kind: None,
                    error: None,
                });
                if op.k == Kind::Invoke {
                    f.start_us.get_or_insert(op.t);
                } else {
                    f.end_us = Some(op.t);
                    f.end_kind = Some(op.k);
                    if err.is_some() {
                        f.error.clone_from(err);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(digest)
}
