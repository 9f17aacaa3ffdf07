//! System signals on the run's time axis, sampled every second into `signals.jsonl`: CPU
//! and RSS of every process the run knows (from /proc, squall itself included), each
//! node's and the workers' `/metrics` (chatstream_* samples, consumer lag per group),
//! Redis memory and ops (INFO over a plain socket), and Kafka's under-replicated
//! partitions (metadata through the client proxies).

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use squall_stack::proc_cpu::{
    children_files, process_table, ticks_per_second, tree_ticks_between, tree_ticks_by_pid,
    tree_ticks_direct_by_pid,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A process to watch, by pid.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: i32,
}

/// What to scrape.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Kept current by the run (a restarted process has a new pid).
    pub processes: Arc<Mutex<Vec<Watched>>>,
    /// (name, base URL) of nodes and workers.
    pub metrics: Vec<(String, String)>,
    /// host:port of Redis (through its proxy, as clients see it).
    pub redis: Option<String>,
    pub kafka_bootstrap: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessSample {
    /// Share of one core used since the previous sample (1.0 = one full core).
    pub cpu: f64,
    pub rss_bytes: u64,
}

/// One second of signals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignalPoint {
    /// Seconds since the run's origin.
    pub t: f64,
    pub processes: BTreeMap<String, ProcessSample>,
    /// Per scraped process: chatstream_* samples (`name{labels}` → value).
    pub metrics: BTreeMap<String, BTreeMap<String, f64>>,
    /// Consumer lag summed per group (from the workers' chatstream_consumer_lag).
    pub lag: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redis: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_under_replicated: Option<u32>,
    /// Sources that did not answer this second.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// CPU ticks of the process tree, process by process (see `tree_ticks`; from `table`
/// when given, else read directly), and the process's own RSS in bytes (backends share
/// PostgreSQL's buffers: summing their RSS would count them again).
fn read_proc(
    pid: i32,
    table: Option<&HashMap<i32, (i32, u64)>>,
    watched: &HashSet<i32>,
) -> Option<(HashMap<i32, u64>, u64)> {
    let ticks = match table {
        Some(table) => {
            table.get(&pid)?;
            tree_ticks_by_pid(pid, table, watched)
        }
        None => tree_ticks_direct_by_pid(pid, watched)?,
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((ticks, rss_kb * 1024))
}

/// Parses Prometheus text, keeping chatstream_* samples (histogram buckets dropped).
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("chatstream_") && !l.contains("_bucket{"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sums `chatstream_consumer_lag{group=...}` per group.
pub fn lag_per_group(samples: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, v) in samples {
        if let Some(labels) = k.strip_prefix("chatstream_consumer_lag{") {
            if let Some(group) = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("group=\""))
                .and_then(|g| g.split('"').next())
            {
                *out.entry(group.to_string()).or_insert(0.0) += v;
            }
        }
    }
    out
}

async fn redis_info(addr: &str) -> Option<BTreeMap<String, f64>> {
    let mut s = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(b"*1\r\n$4\r\nINFO\r\n").await.ok()?;
    let mut buf = Vec::with_capacity(8192);
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            // A bulk reply: `$<len>\r\n<body>\r\n`.
            let text = String::from_utf8_lossy(&buf);
            if let Some((len, _)) = text.strip_prefix('$').and_then(|t| t.split_once("\r\n")) {
                let len: usize = len.parse().ok()?;
                if buf.len() >= len + len.to_string().len() + 5 {
                    break;
                }
            }
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_millis(500), read)
        .await
        .ok()??;
    let text = String::from_utf8_lossy(&buf);
    let wanted = [
        "used_memory",
        "instantaneous_ops_per_sec",
        "connected_clients",
        "pubsub_channels",
    ];
    Some(
        text.lines()
            .filter_map(|l| l.trim_end().split_once(':'))
            .filter(|(k, _)| wanted.contains(k))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

fn under_replicated(bootstrap: &str) -> Option<u32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create()
        .ok()?;
    let md = consumer.fetch_metadata(None, Duration::from_secs(2)).ok()?;
    Some(
        md.topics()
            .iter()
            .filter(|t| !t.name().starts_with("__"))
            .flat_map(|t| t.partitions())
            .filter(|p| p.isr().len() < p.replicas().len())
            .count() as u32,
    )
}

/// The sampler's handle: the latest point (for live progress) and the task.
pub struct Sampler {
    pub latest: Arc<Mutex<SignalPoint>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Samples every second into `<run_dir>/signals.jsonl` until `finish`.
    pub fn start(sources: Sources, origin: Instant, run_dir: &Path) -> std::io::Result<Sampler> {
        let path = run_dir.join("signals.jsonl");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let latest = Arc::new(Mutex::new(SignalPoint::default()));
        let (stop, mut stopped) = watch::channel(false);
        let shared = latest.clone();
        let task = tokio::spawn(async move {
            let client = match reqwest::Client::builder()
                .timeout(Duration::from_millis(800))
                .build()
            {
                Ok(c) => c,
                Err(_) => return,
            };
            let me = Watched {
                name: "squall".into(),
                pid: std::process::id() as i32,
            };
            let direct = children_files();
            let mut previous: BTreeMap<String, (HashMap<i32, u64>, Instant)> = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut kafka_every = 0u32;
            let mut last_urp = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let now = Instant::now();
                let mut point = SignalPoint {
                    t: now.duration_since(origin).as_secs_f64(),
                    ..Default::default()
                };
                let processes: Vec<Watched> = sources
                    .processes
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default();
                let table = (!direct).then(process_table);
                let watched: HashSet<i32> = processes
                    .iter()
                    .chain(std::iter::once(&me))
                    .map(|w| w.pid)
                    .collect();
                for w in processes.iter().chain(std::iter::once(&me)) {
                    if let Some((ticks, rss)) = read_proc(w.pid, table.as_ref(), &watched) {
                        let cpu = previous
                            .get(&w.name)
                            .map(|(t0, at)| {
                                tree_ticks_between(t0, &ticks) as f64
                                    / ticks_per_second()
                                    / now.duration_since(*at).as_secs_f64().max(0.001)
                            })
                            .unwrap_or(0.0);
                        previous.insert(w.name.clone(), (ticks, now));
                        point.processes.insert(
                            w.name.clone(),
                            ProcessSample {
                                cpu,
                                rss_bytes: rss,
                            },
                        );
                    }
                }
                let scrapes = sources.metrics.iter().map(|(name, url)| {
                    let client = client.clone();
                    async move {
                        let text = match client.get(format!("{url}/metrics")).send().await {
                            Ok(r) => r.text().await.ok(),
                            Err(_) => None,
                        };
                        (name.clone(), text)
                    }
                });
                for (name, text) in futures::future::join_all(scrapes).await {
                    match text {
                        Some(t) => {
                            let samples = parse_prometheus(&t);
                            for (g, v) in lag_per_group(&samples) {
                                *point.lag.entry(g).or_insert(0.0) += v;
                            }
                            point.metrics.insert(name, samples);
                        }
                        None => point.unreachable.push(name),
                    }
                }
                if let Some(addr) = &sources.redis {
                    match redis_info(addr).await {
                        Some(info) => point.redis = info,
                        None => point.unreachable.push("redis".into()),
                    }
                }
                if let Some(bootstrap) = &sources.kafka_bootstrap {
                    if kafka_every % 5 == 0 {
                        let b = bootstrap.clone();
                        last_urp = tokio::task::spawn_blocking(move || under_replicated(&b))
                            .await
                            .ok()
                            .flatten();
                    }
                    kafka_every += 1;
                    point.kafka_under_replicated = last_urp;
                }
                if let Ok(line) = serde_json::to_string(&point) {
                    let _ = writeln!(file, "{line}");
                    let _ = file.flush();
                }
                if let Ok(mut l) = shared.lock() {
                    *l = point;
                }
            }
            let _ = file.flush();
        });
        Ok(Sampler { latest, stop, task })
    }

    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples_and_lag_per_group() {
        let text = "# HELP x\nchatstream_consumer_lag{group=\"chatstream-audit\",topic=\"chat-events\",partition=\"0\"} 5\n\
chatstream_consumer_lag{group=\"chatstream-audit\",topic=\"chat-events\",partition=\"1\"} 7\n\
chatstream_consumer_lag{group=\"chatstream-search\",topic=\"chat-events\",partition=\"0\"} 1\n\
chatstream_send_seconds_bucket{le=\"0.1\"} 3\nchatstream_send_seconds_count 9\nother_metric 1\n";
        let s = parse_prometheus(text);
        assert_eq!(s.len(), 4);
        assert_eq!(s["chatstream_send_seconds_count"], 9.0);
        let lag = lag_per_group(&s);
        assert_eq!(lag["chatstream-audit"], 12.0);
        assert_eq!(lag["chatstream-search"], 1.0);
    }

    #[test]
    fn a_watched_process_reads_its_tree_and_rss() {
        let me = std::process::id() as i32;
        let none = HashSet::new();
        assert!(read_proc(me, None, &none).is_some_and(|(_, rss)| rss > 0));
        let table = process_table();
        assert!(read_proc(me, Some(&table), &none).is_some());
        assert!(read_proc(i32::MAX, Some(&table), &none).is_none());
    }
}
