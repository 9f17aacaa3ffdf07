//! A small async client for Toxiproxy's HTTP API: create proxies, cut and restore them,
//! add and remove toxics (latency, bandwidth, timeouts), and read their state.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Result, StackError};
use crate::links::Link;

/// A toxic as Toxiproxy describes it (`attributes` depend on `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Toxic {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// "upstream" (client→server) or "downstream" (server→client).
    pub stream: String,
    pub toxicity: f32,
    pub attributes: serde_json::Value,
}

impl Toxic {
    /// Adds `latency_ms` ± `jitter_ms` to data flowing `stream`.
    pub fn latency(stream: &str, latency_ms: u64, jitter_ms: u64) -> Self {
        Toxic {
            name: format!("latency_{stream}"),
            kind: "latency".into(),
            stream: stream.into(),
            toxicity: 1.0,
            attributes: serde_json::json!({ "latency": latency_ms, "jitter": jitter_ms }),
        }
    }

    /// Stops all data and closes the connection after `timeout_ms` (0: hold it forever,
    /// a black hole rather than a refused connection).
    pub fn timeout(stream: &str, timeout_ms: u64) -> Self {
        Toxic {
            name: format!("timeout_{stream}"),
            kind: "timeout".into(),
            stream: stream.into(),
            toxicity: 1.0,
            attributes: serde_json::json!({ "timeout": timeout_ms }),
        }
    }

    /// Limits the rate to `kb_per_s` kilobytes per second.
    pub fn bandwidth(stream: &str, kb_per_s: u64) -> Self {
        Toxic {
            name: format!("bandwidth_{stream}"),
            kind: "bandwidth".into(),
            stream: stream.into(),
            toxicity: 1.0,
            attributes: serde_json::json!({ "rate": kb_per_s }),
        }
    }
}

/// A proxy as Toxiproxy reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyState {
    pub name: String,
    pub listen: String,
    pub upstream: String,
    pub enabled: bool,
    #[serde(default)]
    pub toxics: Vec<Toxic>,
}

/// Talks to one Toxiproxy server.
#[derive(Debug, Clone)]
pub struct ToxiproxyClient {
    base: String,
    http: reqwest::Client,
}

impl ToxiproxyClient {
    pub fn new(api_addr: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent("squall")
            .build()
            .map_err(|e| StackError::Toxiproxy {
                endpoint: api_addr.to_string(),
                message: format!("building HTTP client: {e}"),
            })?;
        Ok(ToxiproxyClient {
            base: format!("http://{api_addr}"),
            http,
        })
    }

    fn err(&self, message: impl Into<String>) -> StackError {
        StackError::Toxiproxy {
            endpoint: self.base.clone(),
            message: message.into(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        let resp = req
            .send()
            .await
            .map_err(|e| self.err(format!("{what}: {e}")))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            Err(self.err(format!("{what}: HTTP {status}: {}", body.trim())))
        }
    }

    /// The server's version string; doubles as a health check.
    pub async fn version(&self) -> Result<String> {
        let resp = self
            .send(
                self.http.get(format!("{}/version", self.base)),
                "GET /version",
            )
            .await?;
        resp.text()
            .await
            .map_err(|e| self.err(format!("reading /version: {e}")))
    }

    /// Creates (or replaces) every proxy in one call.
    pub async fn populate(&self, links: &[Link]) -> Result<()> {
        let body: Vec<_> = links
            .iter()
            .map(|l| {
                serde_json::json!({
                    "name": l.name, "listen": l.listen(), "upstream": l.upstream, "enabled": true
                })
            })
            .collect();
        self.send(
            self.http
                .post(format!("{}/populate", self.base))
                .json(&body),
            "POST /populate",
        )
        .await?;
        Ok(())
    }

    pub async fn proxies(&self) -> Result<BTreeMap<String, ProxyState>> {
        let resp = self
            .send(
                self.http.get(format!("{}/proxies", self.base)),
                "GET /proxies",
            )
            .await?;
        resp.json()
            .await
            .map_err(|e| self.err(format!("decoding /proxies: {e}")))
    }

    /// Enables or disables a proxy. Disabled, it closes its connections and refuses new ones.
    pub async fn set_enabled(&self, proxy: &str, enabled: bool) -> Result<()> {
        self.send(
            self.http
                .post(format!("{}/proxies/{proxy}", self.base))
                .json(&serde_json::json!({ "enabled": enabled })),
            &format!("enabling={enabled} proxy {proxy}"),
        )
        .await?;
        Ok(())
    }

    pub async fn add_toxic(&self, proxy: &str, toxic: &Toxic) -> Result<()> {
        self.send(
            self.http
                .post(format!("{}/proxies/{proxy}/toxics", self.base))
                .json(toxic),
            &format!("adding toxic {} to {proxy}", toxic.name),
        )
        .await?;
        Ok(())
    }

    pub async fn remove_toxic(&self, proxy: &str, toxic: &str) -> Result<()> {
        self.send(
            self.http
                .delete(format!("{}/proxies/{proxy}/toxics/{toxic}", self.base)),
            &format!("removing toxic {toxic} from {proxy}"),
        )
        .await?;
        Ok(())
    }

    /// Re-enables every proxy and removes every toxic.
    pub async fn reset(&self) -> Result<()> {
        self.send(
            self.http.post(format!("{}/reset", self.base)),
            "POST /reset",
        )
        .await?;
        Ok(())
    }
}
