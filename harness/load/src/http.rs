//! HTTP traffic beside the WebSocket load: each endpoint of the scenario's `http` list at
//! its own open-loop rate (requests are due at fixed spacing whatever the answers do, and
//! latency counts from the due time), recorded in the history and in `http_<endpoint>`
//! histograms. `POST /api/chat` starts a stream that the acting user then follows over
//! its WebSocket.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use squall_history::{Kind, Value, HTTP};
use squall_scenario::{HttpEndpoint, Scenario};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::engine::Target;
use crate::plan::Population;
use crate::shared::Shared;
use crate::user::Command;

/// Requests in flight per endpoint before the harness refuses new ones (and says so).
const MAX_IN_FLIGHT: usize = 256;

/// One endpoint's traffic, with everything needed to build its requests.
#[derive(Debug, Clone)]
pub struct HttpStream {
    pub endpoint: HttpEndpoint,
    pub name: String,
    pub rate: f64,
    pub timeout: Duration,
}

/// The HTTP part of a run.
#[derive(Debug, Clone)]
pub struct HttpPlan {
    streams: Vec<HttpStream>,
    seed: u64,
    nodes: Vec<String>,
    workers_api: Option<String>,
    users: Vec<(String, String, usize)>,
    tokens: Vec<String>,
    conversations: Vec<(String, Vec<u32>)>,
}

pub fn endpoint_name(e: &HttpEndpoint) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{e:?}").to_lowercase())
}

impl HttpPlan {
    pub fn from_scenario(
        scenario: &Scenario,
        population: &Population,
        target: &Target,
        tokens: &[String],
    ) -> HttpPlan {
        HttpPlan {
            streams: scenario
                .http
                .iter()
                .map(|h| HttpStream {
                    name: endpoint_name(&h.endpoint),
                    endpoint: h.endpoint.clone(),
                    rate: h.rate,
                    timeout: h.timeout,
                })
                .collect(),
            seed: scenario.seed,
            nodes: target.nodes.clone(),
            workers_api: target.workers_api.clone(),
            users: population
                .users
                .iter()
                .map(|u| (u.id.clone(), u.tenant.clone(), u.home))
                .collect(),
            tokens: tokens.to_vec(),
            conversations: population
                .conversations
                .iter()
                .map(|c| (c.id.clone(), c.members.clone()))
                .collect(),
        }
    }
}

struct Request {
    method: reqwest::Method,
    url: String,
    token: Option<String>,
    body: Option<serde_json::Value>,
    /// For `chat`: who follows the stream, in which conversation.
    follow: Option<(u32, u32)>,
}

fn build(plan: &HttpPlan, stream: &HttpStream, rng: &mut Pcg64, n: u64) -> Option<Request> {
    let (conv_index, (conv_id, members)) = {
        let i = rng.random_range(0..plan.conversations.len().max(1));
        (i as u32, plan.conversations.get(i)?)
    };
    let user = members[rng.random_range(0..members.len())];
    let (user_id, tenant, home) = plan.users.get(user as usize)?;
    let node = plan.nodes.get(home % plan.nodes.len().max(1))?;
    let token = plan.tokens.get(user as usize).cloned();
    let workers = plan.workers_api.clone().unwrap_or_default();
    let get = |url: String, token: Option<String>| Request {
        method: reqwest::Method::GET,
        url,
        token,
        body: None,
        follow: None,
    };
    Some(match stream.endpoint {
        HttpEndpoint::Chat => Request {
            method: reqwest::Method::POST,
            url: format!("{node}/api/chat"),
            token,
            body: Some(
                serde_json::json!({ "conversation_id": conv_id, "prompt": format!("squall http prompt {n}") }),
            ),
            follow: Some((user, conv_index)),
        },
        HttpEndpoint::History => get(
            format!("{node}/api/conversations/{conv_id}/messages?after_seq=0&limit=50"),
            token,
        ),
        HttpEndpoint::Readyz => get(format!("{node}/readyz"), None),
        HttpEndpoint::AuditUser => get(format!("{workers}/api/audit/users/{user_id}"), None),
        HttpEndpoint::AuditConversation => {
            get(format!("{workers}/api/audit/conversations/{conv_id}"), None)
        }
        HttpEndpoint::AuditErrors => get(format!("{workers}/api/audit/errors?hours=1"), None),
        HttpEndpoint::AuditCounts => get(format!("{workers}/api/audit/counts"), None),
        HttpEndpoint::AnalyticsMinutes => {
            get(format!("{workers}/api/analytics/minutes?hours=1"), None)
        }
        HttpEndpoint::Search => get(
            format!("{workers}/api/search?tenant={tenant}&q=squall"),
            None,
        ),
    })
}

/// Starts one task per endpoint; each ends at `end` or when `stop` turns true.
pub fn spawn(
    plan: HttpPlan,
    shared: Arc<Shared>,
    users: Vec<mpsc::UnboundedSender<Command>>,
    start: Instant,
    end: Instant,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let client = match reqwest::Client::builder().tcp_nodelay(true).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("HTTP client: {e}; no HTTP traffic in this run");
            return Vec::new();
        }
    };
    let plan = Arc::new(plan);
    let users = Arc::new(users);
    (0..plan.streams.len())
        .map(|i| {
            let plan = plan.clone();
            let shared = shared.clone();
            let client = client.clone();
            let users = users.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let stream = plan.streams[i].clone();
                let mut rng = Pcg64::seed_from_u64(plan.seed ^ (0x4717 + i as u64));
                let gap = Duration::from_secs_f64(1.0 / stream.rate.max(0.001));
                let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
                let mut due = start;
                let mut n = 0u64;
                while due < end {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.changed() => break,
                    }
                    let Some(req) = build(&plan, &stream, &mut rng, n) else {
                        break;
                    };
                    n += 1;
                    let due_us = shared.rec.micros(due);
                    shared.rec.record(
                        HTTP,
                        Kind::Invoke,
                        Value::Http {
                            ep: stream.name.clone(),
                            due: Some(due_us),
                            status: None,
                            err: None,
                        },
                    );
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        shared
                            .metrics
                            .counters
                            .http_failed
                            .fetch_add(1, Ordering::Relaxed);
                        shared.rec.record(
                            HTTP,
                            Kind::Fail,
                            Value::Http {
                                ep: stream.name.clone(),
                                due: None,
                                status: None,
                                err: Some("harness: in-flight limit reached, not sent".into()),
                            },
                        );
                        due += gap;
                        continue;
                    };
                    let (client, shared, users, name, timeout) = (
                        client.clone(),
                        shared.clone(),
                        users.clone(),
                        stream.name.clone(),
                        stream.timeout,
                    );
                    let this_due = due;
                    tokio::spawn(async move {
                        let _permit = permit;
                        issue(&client, &shared, &users, req, &name, timeout, this_due).await;
                    });
                    due += gap;
                }
            })
        })
        .collect()
}

async fn issue(
    client: &reqwest::Client,
    shared: &Shared,
    users: &[mpsc::UnboundedSender<Command>],
    req: Request,
    name: &str,
    timeout: Duration,
    due: Instant,
) {
    let mut builder = client.request(req.method, &req.url).timeout(timeout);
    if let Some(t) = &req.token {
        builder = builder.bearer_auth(t);
    }
    if let Some(b) = &req.body {
        builder = builder.json(b);
    }
    let counters = &shared.metrics.counters;
    let result = builder.send().await;
    let now = Instant::now();
    match result {
        Ok(r) => {
            let status = r.status();
            let body: Option<serde_json::Value> = r.json().await.ok();
            shared.record_latency(
                &format!("http_{name}"),
                now.saturating_duration_since(due),
                due,
            );
            let kind = if status.is_success() {
                Kind::Ok
            } else {
                Kind::Fail
            };
            if status.is_success() {
                counters.http_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.http_failed.fetch_add(1, Ordering::Relaxed);
            }
            shared.rec.record(
                HTTP,
                kind,
                Value::Http {
                    ep: name.into(),
                    due: None,
                    status: Some(status.as_u16()),
                    err: None,
                },
            );
            if let (true, Some((user, conversation))) = (status.is_success(), req.follow) {
                if let Some(session) = body.as_ref().and_then(|b| b["session_id"].as_str()) {
                    shared.rec.record(
                        user,
                        Kind::Ok,
                        Value::Stream {
                            c: conversation,
                            due: Some(shared.rec.micros(due)),
                            session: Some(session.into()),
                            http: true,
                            err: None,
                        },
                    );
                    if let Some(tx) = users.get(user as usize) {
                        let _ = tx.send(Command::FollowStream {
                            session: session.into(),
                            conversation,
                            due,
                        });
                    }
                }
            }
        }
        Err(e) => {
            counters.http_failed.fetch_add(1, Ordering::Relaxed);
            // A timeout or a lost connection: the request may or may not have been served.
            shared.rec.record(
                HTTP,
                Kind::Info,
                Value::Http {
                    ep: name.into(),
                    due: None,
                    status: None,
                    err: Some(e.to_string()),
                },
            );
        }
    }
}
