//! The load engine: creates the planned conversations through the API, connects every
//! user (paced), waits at a rendezvous until all are connected, then runs the open-loop
//! pacer — each operation is handed to its user when it is due, whatever the system does
//! — over warm-up and the measured window, drains outstanding acks, and has every user
//! resync once more before closing. A ticker closes each second of the live metrics.

use chatstream_protocol::auth::{self, Claims};
use futures::StreamExt;
use squall_history::{Kind, Recorder, Value, HARNESS};
use squall_scenario::Scenario;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

use crate::http::{self, HttpPlan};
use crate::metrics::{names, Metrics, SecondPoint};
use crate::plan::{Arrivals, Population};
use crate::shared::Shared;
use crate::user::{Command, User, UserSpec};

/// Where the system under test answers.
#[derive(Debug, Clone)]
pub struct Target {
    /// Node base URLs (`http://host:port`), in node order.
    pub nodes: Vec<String>,
    /// The workers' read API (`http://host:port`), when workers run.
    pub workers_api: Option<String>,
    /// The HMAC secret the nodes verify tokens with.
    pub token_secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("setting up the load: {0}")]
    Setup(String),
    #[error("{failed} of {total} users could not connect (first: {first}); are the nodes up and is the token secret right?")]
    Connect {
        failed: usize,
        total: usize,
        first: String,
    },
}

/// What the engine measured, besides the history.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub interrupted: bool,
    /// µs on the run's clock.
    pub load_start_us: u64,
    pub measure_start_us: u64,
    pub load_end_us: u64,
    pub setup: Duration,
    pub arrivals: u64,
}

pub(crate) fn ws_url(http: &str) -> String {
    if let Some(rest) = http.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = http.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        http.to_string()
    }
}

/// Signs a connection token valid for `ttl`.
pub fn token(secret: &str, user: &str, tenant: &str, ttl: Duration) -> Result<String, LoadError> {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + ttl.as_secs();
    auth::sign(
        secret.as_bytes(),
        &Claims {
            sub: user.into(),
            tenant: tenant.into(),
            exp,
        },
    )
    .map_err(|e| LoadError::Setup(format!("signing a token: {e}")))
}

async fn create_conversations(
    client: &reqwest::Client,
    population: &Population,
    target: &Target,
    tokens: &[String],
) -> Result<(), LoadError> {
    let results = futures::stream::iter(population.conversations.iter().map(|conv| {
        let creator = conv.members[0] as usize;
        let node = &target.nodes[population.users[creator].home % target.nodes.len()];
        let body = serde_json::json!({
            "id": conv.id,
            "members": conv.members.iter().map(|&m| population.users[m as usize].id.as_str()).collect::<Vec<_>>(),
        });
        let url = format!("{node}/api/conversations");
        let token = &tokens[creator];
        async move {
            let mut last = String::new();
            for attempt in 0..5u64 {
                match client.post(&url).bearer_auth(token).json(&body).send().await {
                    Ok(r) if r.status().is_success() => return Ok(()),
                    Ok(r) => {
                        let status = r.status();
                        last = format!("{status}: {}", r.text().await.unwrap_or_default());
                        if !status.is_server_error() {
                            break;
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
            Err(LoadError::Setup(format!("creating conversation {} on {url}: {last}", conv.id)))
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    results.into_iter().collect()
}

/// The slow consumers (`load.slow_consumers`), drawn from the seed: user index → the
/// offset of its first stall into the measured window, in `[0, every - pause]`.
pub fn slow_consumers(
    scenario: &Scenario,
    users: usize,
) -> std::collections::BTreeMap<u32, Duration> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut out = std::collections::BTreeMap::new();
    let Some(slow) = &scenario.load.slow_consumers else {
        return out;
    };
    let mut rng = rand_pcg::Pcg64::seed_from_u64(scenario.seed ^ 0x510e_0003);
    let mut all: Vec<u32> = (0..users as u32).collect();
    all.shuffle(&mut rng);
    let slack = slow.every.saturating_sub(slow.pause).as_secs_f64();
    for u in all.into_iter().take(slow.count(users as u32) as usize) {
        out.insert(u, Duration::from_secs_f64(rng.random::<f64>() * slack));
    }
    out
}

/// What the pacer needs besides the schedule.
struct Pacing {
    t0: Instant,
    measure_start: Instant,
    warmup_zero: bool,
    senders: Vec<mpsc::UnboundedSender<Command>>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

/// What the pacer did.
struct Paced {
    arrivals: u64,
    /// Chat sends handed to users (see `run`'s drain).
    chat_dispatched: u64,
    interrupted: bool,
}

/// The open-loop pacer: hands each operation of the schedule to its user when it is due,
/// whatever the system does, and marks the measured window's start in the history.
async fn pace(scenario: Scenario, population: Population, p: Pacing) -> Paced {
    let Pacing {
        t0,
        measure_start,
        warmup_zero,
        senders,
        shared,
        mut stop,
    } = p;
    let metrics = &shared.metrics;
    let rec = &shared.rec;
    let mut arrivals = 0u64;
    // Counted here, not by the users: a send still in a user's queue when the load ends
    // has not been invoked yet, and the drain must wait for it too.
    let mut chat_dispatched = 0u64;
    let mut interrupted = false;
    let mut measuring = false;
    if warmup_zero {
        metrics.set_measuring(true);
        rec.record_at(
            t0,
            HARNESS,
            Kind::Info,
            Value::Phase {
                name: "load_start".into(),
            },
        );
        measuring = true;
    }
    // One timer for the whole schedule, reset for each operation: a timer built and
    // dropped per operation took the runtime's timer lock twice.
    let timer = tokio::time::sleep_until(t0.into());
    tokio::pin!(timer);
    for a in Arrivals::new(&scenario, &population) {
        let due = t0 + a.due;
        if !measuring && due >= measure_start {
            metrics.set_measuring(true);
            rec.record_at(
                measure_start,
                HARNESS,
                Kind::Info,
                Value::Phase {
                    name: "load_start".into(),
                },
            );
            measuring = true;
        }
        let now = Instant::now();
        if due > now + Duration::from_micros(500) {
            timer.as_mut().reset(due.into());
            tokio::select! {
                _ = &mut timer => {}
                _ = stop.changed() => { interrupted = true; break; }
            }
        }
        let now = Instant::now();
        shared.record_latency(
            names::PACER_LATENESS,
            now.saturating_duration_since(due),
            due,
        );
        if let Some(tx) = senders.get(a.user as usize) {
            if tx.send(Command::Op { arrival: a, due }).is_ok()
                && a.kind == squall_scenario::OpKind::Chat
            {
                chat_dispatched += 1;
            }
        }
        arrivals += 1;
    }
    Paced {
        arrivals,
        chat_dispatched,
        interrupted,
    }
}

/// Runs the load of `scenario` against `target`. `stop` turning true (Ctrl-C, a
/// guardrail) ends the schedule early; what was started is still drained and recorded.
/// `measure_start_tx` learns when the measured window (after warm-up) begins: the
/// nemesis times its faults from it.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    scenario: &Scenario,
    population: &Population,
    target: &Target,
    rec: Recorder,
    metrics: Arc<Metrics>,
    progress: watch::Sender<Option<SecondPoint>>,
    mut stop: watch::Receiver<bool>,
    measure_start_tx: Option<tokio::sync::oneshot::Sender<Instant>>,
) -> Result<Outcome, LoadError> {
    let setup_started = Instant::now();
    let load = &scenario.load;
    let ttl = load.warmup + load.duration + Duration::from_secs(3600);
    let tokens = population
        .users
        .iter()
        .map(|u| token(&target.token_secret, &u.id, &u.tenant, ttl))
        .collect::<Result<Vec<_>, _>>()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| LoadError::Setup(format!("HTTP client: {e}")))?;
    create_conversations(&client, population, target, &tokens).await?;

    // The ticker closes one second of metrics at a time, from now to the end of the run.
    let (ticker_stop_tx, mut ticker_stop) = watch::channel(false);
    let ticker = {
        let metrics = metrics.clone();
        let origin = rec.origin();
        tokio::spawn(async move {
            let mut second = origin.elapsed().as_secs();
            loop {
                let next = origin + Duration::from_secs(second + 1);
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => {}
                    _ = ticker_stop.changed() => {
                        let _ = progress.send(Some(metrics.roll_second(second)));
                        break;
                    }
                }
                let point = metrics.roll_second(second);
                let _ = progress.send(Some(point));
                second += 1;
            }
        })
    };

    let mut shared = Shared::new(
        rec.clone(),
        metrics.clone(),
        target.nodes.iter().map(|n| ws_url(n)).collect(),
        population
            .conversations
            .iter()
            .map(|c| c.id.clone())
            .collect(),
        load.ack_timeout,
        load.max_in_flight as usize,
    );
    shared.final_resync = load.final_resync;
    shared.slow = load.slow_consumers.as_ref().map(|s| (s.pause, s.every));
    let stall_offsets = slow_consumers(scenario, population.users.len());
    let shared = Arc::new(shared);
    let memberships = population.memberships();
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel();
    let mut senders = Vec::with_capacity(population.users.len());
    let mut handles = Vec::with_capacity(population.users.len());
    let connect_gap = Duration::from_secs_f64(1.0 / load.connect_rate.max(0.001));
    let mut next_connect = tokio::time::Instant::now();
    for (i, u) in population.users.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        let user = User::new(
            UserSpec {
                index: i as u32,
                id: u.id.clone(),
                token: tokens[i].clone(),
                home: u.home % target.nodes.len(),
                conversations: memberships[i].clone(),
                stall_offset: stall_offsets.get(&(i as u32)).copied(),
            },
            shared.clone(),
        );
        tokio::time::sleep_until(next_connect).await;
        next_connect += connect_gap;
        handles.push(tokio::spawn(user.run(rx, connected_tx.clone())));
    }
    drop(connected_tx);
    // Rendezvous: fan-out is measured only once every member of every conversation is on.
    let mut failed = Vec::new();
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered < population.users.len() {
        match tokio::time::timeout_at(deadline, connected_rx.recv()).await {
            Ok(Some(Ok(_))) => answered += 1,
            Ok(Some(Err(e))) => {
                answered += 1;
                failed.push(e);
            }
            Ok(None) | Err(_) => break,
        }
    }
    if !failed.is_empty() || answered < population.users.len() {
        for tx in &senders {
            let _ = tx.send(Command::Finish);
        }
        let _ = ticker_stop_tx.send(true);
        let _ = ticker.await;
        return Err(LoadError::Connect {
            failed: failed.len() + population.users.len() - answered,
            total: population.users.len(),
            first: failed
                .first()
                .cloned()
                .unwrap_or_else(|| "no answer within 60 s".into()),
        });
    }
    rec.record(
        HARNESS,
        Kind::Info,
        Value::Phase {
            name: "connected".into(),
        },
    );
    let setup = setup_started.elapsed();

    let t0 = Instant::now() + Duration::from_millis(100);
    let measure_start = t0 + load.warmup;
    let load_end = measure_start + load.duration;
    shared.set_window(measure_start, load_end);
    if let Some(tx) = measure_start_tx {
        let _ = tx.send(measure_start);
    }
    let http_tasks = http::spawn(
        HttpPlan::from_scenario(scenario, population, target, &tokens),
        shared.clone(),
        senders.clone(),
        t0,
        load_end,
        stop.clone(),
    );
    let abuse_tasks = if load.abuse.is_empty() {
        Vec::new()
    } else {
        let tenant = population
            .users
            .first()
            .map(|u| u.tenant.clone())
            .unwrap_or_default();
        let abuser = format!(
            "{}-abuser",
            population
                .users
                .first()
                .map(|u| u.id.as_str())
                .unwrap_or("squall")
        );
        let target_ = crate::abuse::AbuseTarget {
            token: token(&target.token_secret, &abuser, &tenant, ttl)?,
            forged_token: token("not-the-secret-of-this-deployment", &abuser, &tenant, ttl)?,
            conversation_id: population
                .conversations
                .first()
                .map(|c| c.id.clone())
                .unwrap_or_default(),
            oversized_bytes: 70 * 1024,
        };
        crate::abuse::spawn(
            &load.abuse,
            target_,
            shared.clone(),
            t0,
            load_end,
            stop.clone(),
        )
    };
    // The pacer runs as a task of its own, on the runtime's worker threads: from the
    // caller's task (the `main` thread's `block_on` in the CLI) every operation's timer
    // woke the main thread through a worker and every hand-over woke a worker again,
    // three threads woken per operation where one will do (a tenth of squall's CPU in a
    // chat load). Its work is unchanged: each operation goes to its user when it is due.
    let pacer = tokio::spawn(pace(
        scenario.clone(),
        population.clone(),
        Pacing {
            t0,
            measure_start,
            warmup_zero: load.warmup.is_zero(),
            senders: senders.clone(),
            shared: shared.clone(),
            stop: stop.clone(),
        },
    ));
    let Paced {
        arrivals,
        chat_dispatched,
        mut interrupted,
    } = match pacer.await {
        Ok(paced) => paced,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => return Err(LoadError::Setup(format!("the pacer's task ended: {e}"))),
    };
    if !interrupted {
        tokio::select! {
            _ = tokio::time::sleep_until(load_end.into()) => {}
            _ = stop.changed() => { interrupted = true; }
        }
    }
    if interrupted {
        rec.record(
            HARNESS,
            Kind::Info,
            Value::Phase {
                name: "interrupted".into(),
            },
        );
    }
    rec.record(
        HARNESS,
        Kind::Info,
        Value::Phase {
            name: "load_end".into(),
        },
    );
    metrics.set_measuring(false);
    for t in http_tasks.into_iter().chain(abuse_tasks) {
        let _ = t.await;
    }

    // Drain: every send gets its answer or reaches its ack timeout.
    let drain_deadline = Instant::now() + load.ack_timeout;
    loop {
        let c = &metrics.counters;
        let settled = c.sends_acked.load(Ordering::Relaxed)
            + c.sends_failed.load(Ordering::Relaxed)
            + c.sends_unknown.load(Ordering::Relaxed)
            + c.sends_dropped_in_flight_limit.load(Ordering::Relaxed);
        let invoked = c.sends_invoked.load(Ordering::Relaxed).max(chat_dispatched);
        if settled >= invoked || Instant::now() >= drain_deadline || interrupted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for tx in &senders {
        let _ = tx.send(Command::Finish);
    }
    drop(senders);
    // Then every send still open gets its outcome (an ack, or its ack timeout) before any
    // user's final resync reads the store: a message acknowledged after a member's last
    // read would otherwise be owed to a member that has already left.
    let settle_deadline = Instant::now() + load.ack_timeout + Duration::from_secs(1);
    loop {
        let c = &metrics.counters;
        let settled = c.sends_acked.load(Ordering::Relaxed)
            + c.sends_failed.load(Ordering::Relaxed)
            + c.sends_unknown.load(Ordering::Relaxed)
            + c.sends_dropped_in_flight_limit.load(Ordering::Relaxed);
        let invoked = c.sends_invoked.load(Ordering::Relaxed).max(chat_dispatched);
        if settled >= invoked || Instant::now() >= settle_deadline || interrupted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.start_final_phase();
    let finish_deadline =
        tokio::time::Instant::now() + shared.finish_timeout + Duration::from_secs(5);
    let mut late = 0usize;
    for h in handles {
        let abort = h.abort_handle();
        if tokio::time::timeout_at(finish_deadline, h).await.is_err() {
            // Bounded: a user still busy past its deadline is stopped, not left running
            // (and recording) behind the rest of the run.
            abort.abort();
            late += 1;
        }
    }
    if late > 0 {
        tracing::warn!("{late} users did not finish their final resync in time; stopped");
    }
    rec.record(
        HARNESS,
        Kind::Info,
        Value::Phase {
            name: "drained".into(),
        },
    );
    let _ = ticker_stop_tx.send(true);
    let _ = ticker.await;
    Ok(Outcome {
        interrupted,
        load_start_us: rec.micros(t0),
        measure_start_us: rec.micros(measure_start),
        load_end_us: rec.micros(load_end),
        setup,
        arrivals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_consumers_are_drawn_from_the_seed_with_offsets_inside_the_period() {
        let text = "name: t\nload:\n  users: 40\n  conversations: { count: 4, members: { fixed: 4 } }\n  rate: 10\n  duration: 1m\n  slow_consumers: { share: 0.25, pause: 8s, every: 15s }\n";
        let scenario = squall_scenario::parse_str(text, "t.yaml").expect("valid");
        let a = slow_consumers(&scenario, 40);
        assert_eq!(a.len(), 10);
        assert!(a.values().all(|o| *o <= Duration::from_secs(7)), "{a:?}");
        assert_eq!(
            a,
            slow_consumers(&scenario, 40),
            "the same seed, the same users"
        );
        let none = squall_scenario::parse_str(
            &text.replace(
                "  slow_consumers: { share: 0.25, pause: 8s, every: 15s }\n",
                "",
            ),
            "t.yaml",
        )
        .expect("valid");
        assert!(slow_consumers(&none, 40).is_empty());
    }
}
