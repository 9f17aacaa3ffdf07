//! The alerts webhook of a run that starts its own workers: the workers' alerts worker
//! POSTs every STREAM_ERROR and SLA breach to it (with an `Idempotency-Key`), and it takes
//! each (200), keeps it as one JSON line in `<run-dir>/alerts.jsonl` and counts them.
//! Without it the alerts worker retries a refused connection for as long as it takes and
//! its partitions stop, which is the harness's fault, not the system's.

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the webhook took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AlertCounts {
    /// POSTs taken.
    pub received: u64,
    /// Distinct idempotency keys among them (a retried alert comes again with its key).
    pub distinct: u64,
}

#[derive(Default)]
struct Taken {
    counts: AlertCounts,
    keys: HashSet<String>,
}

struct Shared {
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    taken: Mutex<Taken>,
}

/// The webhook, listening until [`AlertSink::stop`] (or dropped with the run's runtime).
pub struct AlertSink {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    pub path: PathBuf,
    pub addr: std::net::SocketAddr,
}

impl AlertSink {
    /// Listens on `127.0.0.1:port`, `POST /alerts`, appending to `<run_dir>/alerts.jsonl`.
    pub async fn start(port: u16, run_dir: &Path) -> Result<AlertSink> {
        let path = run_dir.join("alerts.jsonl");
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let shared = Arc::new(Shared {
            file: Mutex::new(std::io::BufWriter::new(file)),
            taken: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| {
                format!("the alerts webhook cannot listen on 127.0.0.1:{port} (base port + 131); is it taken? choose another --base-port")
            })?;
        let addr = listener
            .local_addr()
            .context("the alerts webhook's address")?;
        let app = Router::new()
            .route("/alerts", post(take))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("alerts webhook stopped: {e}");
            }
        });
        Ok(AlertSink {
            shared,
            server,
            path,
            addr,
        })
    }

    pub fn counts(&self) -> AlertCounts {
        self.shared
            .taken
            .lock()
            .map(|t| t.counts)
            .unwrap_or_default()
    }

    /// Stops listening and flushes the file; returns what it took.
    pub fn stop(&self) -> AlertCounts {
        self.server.abort();
        if let Ok(mut f) = self.shared.file.lock() {
            if let Err(e) = f.flush() {
                tracing::warn!("writing {}: {e}", self.path.display());
            }
        }
        self.counts()
    }
}

async fn take(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: String) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let alert: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        // The worker counts a 4xx other than 408/429 as the alert refused for good.
        Err(_) => return StatusCode::BAD_REQUEST,
    };
    let received_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let line =
        serde_json::json!({ "received_ms": received_ms, "idempotency_key": key, "alert": alert });
    let written = shared
        .file
        .lock()
        .map_err(|_| ())
        .and_then(|mut f| writeln!(f, "{line}").map_err(|_| ()));
    if written.is_err() {
        // Not taken: the worker retries it.
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Ok(mut t) = shared.taken.lock() {
        t.counts.received += 1;
        if t.keys.insert(key) {
            t.counts.distinct += 1;
        }
    }
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_alerts_keeps_each_line_and_counts_retries_apart() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("squall-alerts-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sink = AlertSink::start(0, &dir).await?;
        let url = format!("http://{}/alerts", sink.addr);
        let http = reqwest::Client::new();
        let post = |key: &'static str, body: &'static str| {
            http.post(&url)
                .header("Idempotency-Key", key)
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let alert = r#"{"event_id":"e1","alert":{"kind":"SLA_BREACH"}}"#;
        assert_eq!(post("e1", alert).await?.status(), 200);
        assert_eq!(
            post("e1", alert).await?.status(),
            200,
            "a retry is taken again"
        );
        assert_eq!(post("e2", alert).await?.status(), 200);
        assert_eq!(post("e3", "not json").await?.status(), 400);
        let taken = sink.stop();
        assert_eq!(
            taken,
            AlertCounts {
                received: 3,
                distinct: 2
            }
        );
        let lines = std::fs::read_to_string(&sink.path)?;
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert!(lines.contains(r#""idempotency_key":"e2""#), "{lines}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
