//! HTTP traffic beside the WebSocket load: each endpoint of the scenario's `http` list at
//! its own open-loop rate (requests are due at fixed spacing whatever the answers do, and
//! latency counts from the due time), recorded in the history and in `http_<endpoint>`
//! histograms. `POST /api/chat` starts a stream that the acting user then follows over
//! its WebSocket.
//!
//! The requests go through [goose](https://book.goose.rs) 0.19, in this process and on
//! the engine's tokio runtime: one goose scenario per endpoint, whose goose users send
//! that endpoint's requests (so goose's own request metrics count them). Goose's user
//! model is closed (a user runs its transaction again as soon as it returns), so squall
//! keeps the schedule: request `n` of an endpoint is due at `start + n × gap`, and each
//! transaction takes the next `n` from the endpoint's [`Schedule`], sleeps until that
//! request is due, sends it, and records it. An endpoint gets enough goose users
//! (rate × timeout + 2, capped at [`MAX_USERS_PER_ENDPOINT`]) that, with every answer
//! within the timeout, a user is always free when a request falls due; when none is, the
//! request goes out late and its latency still counts from its due time. Squall's
//! HdrHistograms stay the authority for percentiles and gates; goose's own metrics are
//! only logged, at debug level, when the attack ends.

use goose::client::GooseClientBuilder;
use goose::config::GooseConfiguration;
use goose::prelude::{
    GooseAttack, GooseError, GooseMethod, GooseRequest, GooseUser, Scenario, Transaction,
    TransactionFunction, TransactionResult,
};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use squall_history::{Kind, Value, HTTP};
use squall_scenario::{HttpEndpoint, Scenario as SquallScenario};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::engine::Target;
use crate::plan::Population;
use crate::shared::Shared;
use crate::user::Command;

/// Goose users (requests in flight) per endpoint at most; past this, requests queue for a
/// free user and go out late (still measured from their due time).
const MAX_USERS_PER_ENDPOINT: usize = 256;

/// How long a goose user whose endpoint has nothing left to send waits before its
/// transaction returns (goose only ends a user between two transactions).
const IDLE: Duration = Duration::from_millis(50);

/// How often the supervisor looks whether the schedule is done or the run stopped.
const POLL: Duration = Duration::from_millis(50);

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
        scenario: &SquallScenario,
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
                    endpoint: h.endpoint,
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
    method: GooseMethod,
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
        method: GooseMethod::Get,
        url,
        token,
        body: None,
        follow: None,
    };
    Some(match stream.endpoint {
        HttpEndpoint::Chat => Request {
            method: GooseMethod::Post,
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

/// Goose users for an endpoint: enough that every request can be in flight for its whole
/// timeout while the next ones fall due.
fn users_for(stream: &HttpStream) -> usize {
    let in_flight = (stream.rate.max(0.0) * stream.timeout.as_secs_f64()).ceil();
    let in_flight = if in_flight.is_finite() {
        in_flight.min(MAX_USERS_PER_ENDPOINT as f64) as usize
    } else {
        MAX_USERS_PER_ENDPOINT
    };
    (in_flight + 2).clamp(2, MAX_USERS_PER_ENDPOINT)
}

/// Where one endpoint's schedule stands.
struct Cursor {
    /// The index of the next request to hand out.
    next: u64,
    /// Picks each request's conversation and user; drawn in request order under the
    /// lock, so request `n` is the same whichever goose user sends it.
    rng: Pcg64,
    /// Nothing more to hand out (the next request is due at or after the end, or cannot
    /// be built).
    exhausted: bool,
}

/// One endpoint's open-loop schedule, shared by the goose users that serve it.
struct Schedule {
    stream: HttpStream,
    gap: Duration,
    cursor: Mutex<Cursor>,
    /// Requests handed out and not yet settled (waiting for their due time or in flight).
    outstanding: AtomicUsize,
}

/// A request handed to a goose user: settles its [`Schedule::outstanding`] when dropped,
/// whatever happens to the transaction.
struct Claimed<'a> {
    schedule: &'a Schedule,
    due: Instant,
    request: Request,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.schedule.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Schedule {
    fn new(stream: HttpStream, seed: u64, index: usize) -> Schedule {
        Schedule {
            gap: Duration::from_secs_f64(1.0 / stream.rate.max(0.001)),
            stream,
            cursor: Mutex::new(Cursor {
                next: 0,
                rng: Pcg64::seed_from_u64(seed ^ (0x4717 + index as u64)),
                exhausted: false,
            }),
            outstanding: AtomicUsize::new(0),
        }
    }

    fn due(&self, start: Instant, n: u64) -> Option<Instant> {
        start.checked_add(self.gap.checked_mul(u32::try_from(n).ok()?)?)
    }

    /// The next request of the schedule, or `None` once every request due before `end`
    /// has been handed out.
    fn claim(&self, traffic: &Traffic) -> Option<Claimed<'_>> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if cursor.exhausted {
            return None;
        }
        let n = cursor.next;
        let request = match self.due(traffic.start, n) {
            Some(due) if due < traffic.end => {
                build(&traffic.plan, &self.stream, &mut cursor.rng, n).map(|request| (due, request))
            }
            _ => None,
        };
        let Some((due, request)) = request else {
            cursor.exhausted = true;
            return None;
        };
        cursor.next += 1;
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Some(Claimed {
            schedule: self,
            due,
            request,
        })
    }

    /// Every request due before the end has been handed out and settled.
    fn finished(&self, traffic: &Traffic) -> bool {
        let handed_out = {
            let cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
            cursor.exhausted
                || self
                    .due(traffic.start, cursor.next)
                    .is_none_or(|due| due >= traffic.end)
        };
        // Once everything is handed out nothing is added, so `outstanding` only falls.
        handed_out && self.outstanding.load(Ordering::Acquire) == 0
    }
}

/// What the goose transactions share.
struct Traffic {
    plan: HttpPlan,
    shared: Arc<Shared>,
    users: Vec<mpsc::UnboundedSender<Command>>,
    start: Instant,
    end: Instant,
    stop: watch::Receiver<bool>,
    schedules: Vec<Schedule>,
}

impl Traffic {
    fn stopped(&self) -> bool {
        // A closed channel counts as a stop, as it always has here.
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    fn finished(&self) -> bool {
        self.schedules.iter().all(|s| s.finished(self))
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn record_http(
    shared: &Shared,
    kind: Kind,
    ep: &str,
    due: Option<u64>,
    status: Option<u16>,
    err: Option<String>,
) {
    shared.rec.record(
        HTTP,
        kind,
        Value::Http {
            ep: ep.into(),
            due,
            status,
            err,
        },
    );
}

/// The transaction every goose user of endpoint `index` runs, again and again: the next
/// request of the schedule, at its due time.
async fn serve(user: &mut GooseUser, traffic: &Traffic, index: usize) -> TransactionResult {
    let schedule = &traffic.schedules[index];
    let claimed = if traffic.stopped() {
        None
    } else {
        schedule.claim(traffic)
    };
    let Some(claimed) = claimed else {
        // Nothing (more) to send: goose ends the user after this transaction once the
        // supervisor has ended the attack; meanwhile, no busy loop.
        tokio::time::sleep(IDLE).await;
        return Ok(());
    };
    let due = claimed.due;
    tokio::select! {
        _ = tokio::time::sleep_until(due.into()) => {}
        _ = stopped(traffic.stop.clone()) => return Ok(()),
    }
    let shared = &traffic.shared;
    let name = schedule.stream.name.as_str();
    record_http(
        shared,
        Kind::Invoke,
        name,
        Some(shared.rec.micros(due)),
        None,
        None,
    );
    let late = Instant::now().saturating_duration_since(due);
    if late > schedule.stream.timeout {
        // Every goose user of the endpoint was busy until this request's timeout had
        // passed: it is not sent (as the old in-flight limit did), and says why.
        shared
            .metrics
            .counters
            .http_failed
            .fetch_add(1, Ordering::Relaxed);
        record_http(
            shared,
            Kind::Fail,
            name,
            None,
            None,
            Some(format!(
                "harness: all {} goose users busy for {} ms after it was due, not sent",
                users_for(&schedule.stream),
                late.as_millis()
            )),
        );
        return Ok(());
    }
    tokio::select! {
        _ = issue(user, traffic, schedule, &claimed) => {}
        _ = stopped(traffic.stop.clone()) => {
            shared
                .metrics
                .counters
                .http_failed
                .fetch_add(1, Ordering::Relaxed);
            // Sent, maybe served: the run was stopped before the answer came.
            record_http(
                shared,
                Kind::Info,
                name,
                None,
                None,
                Some("harness: run stopped before the answer".into()),
            );
        }
    }
    drop(claimed);
    Ok(())
}

/// Sends one request through the goose user and records what came of it.
async fn issue(
    user: &mut GooseUser,
    traffic: &Traffic,
    schedule: &Schedule,
    claimed: &Claimed<'_>,
) {
    let shared = &traffic.shared;
    let counters = &shared.metrics.counters;
    let name = schedule.stream.name.as_str();
    let (req, due) = (&claimed.request, claimed.due);
    let result = match user.get_request_builder(&req.method, &req.url) {
        Ok(mut builder) => {
            builder = builder.timeout(schedule.stream.timeout);
            if let Some(t) = &req.token {
                builder = builder.bearer_auth(t);
            }
            if let Some(b) = &req.body {
                builder = builder.json(b);
            }
            let request = GooseRequest::builder()
                .method(req.method)
                .name(name)
                .set_request_builder(builder)
                .build();
            user.request(request).await
        }
        Err(e) => Err(e),
    };
    let now = Instant::now();
    let response = match result {
        Ok(goose) => goose.response,
        Err(e) => {
            // Goose refused it before sending (the request could not be built).
            counters.http_failed.fetch_add(1, Ordering::Relaxed);
            record_http(
                shared,
                Kind::Fail,
                name,
                None,
                None,
                Some(format!("harness: {e}")),
            );
            return;
        }
    };
    match response {
        Ok(r) => {
            let status = r.status();
            shared.record_latency(
                &format!("http_{name}"),
                now.saturating_duration_since(due),
                due,
            );
            let body: Option<serde_json::Value> = r.json().await.ok();
            let kind = if status.is_success() {
                counters.http_ok.fetch_add(1, Ordering::Relaxed);
                Kind::Ok
            } else {
                counters.http_failed.fetch_add(1, Ordering::Relaxed);
                Kind::Fail
            };
            record_http(shared, kind, name, None, Some(status.as_u16()), None);
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
                    if let Some(tx) = traffic.users.get(user as usize) {
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
            record_http(shared, Kind::Info, name, None, None, Some(e.to_string()));
        }
    }
}

/// Goose sets a Ctrl-C handler of its own (the `ctrlc` crate) when an attack starts, in
/// place of whatever handled SIGINT: squall's Ctrl-C (end the load, heal the faults, stop
/// what the run started) would never fire, and a second Ctrl-C would exit the process
/// from goose's handler. `ctrlc` takes one handler per process, so squall takes that slot
/// first (goose's later attempt then fails, and goose only logs it) and puts back the
/// SIGINT handler that was there before. A SIGINT that lands in between is raised again,
/// and reaches that handler once it is back.
#[cfg(unix)]
fn keep_sigint_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
        // SAFETY: sigaction with a null new action only reads the current one into a
        // zeroed struct of the right type; putting it back reinstates exactly that.
        let before: Vec<Option<libc::sigaction>> = SIGNALS
            .iter()
            .map(|&sig| unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                (libc::sigaction(sig, std::ptr::null(), &mut old) == 0).then_some(old)
            })
            .collect();
        let taken = ctrlc::set_handler(|| {
            // SAFETY: raise only sends a signal to this thread.
            unsafe {
                libc::raise(libc::SIGINT);
            }
        });
        for (sig, old) in SIGNALS.iter().zip(before) {
            if let Some(old) = old {
                // SAFETY: `old` was read by sigaction for this very signal.
                unsafe {
                    libc::sigaction(*sig, &old, std::ptr::null_mut());
                }
            }
        }
        if let Err(e) = taken {
            tracing::debug!("ctrlc handler slot: {e}");
        }
    });
}

#[cfg(not(unix))]
fn keep_sigint_handler() {}

/// Goose logs through the `log` crate, which squall's tracing subscriber shows: a line per
/// goose user started and stopped, its phases, its scheduler. While an attack runs, and
/// only when `log` is at info or quieter (squall's default), `log`'s level is lowered to
/// warn; a process run at debug level still sees all of goose. Back when dropped.
struct QuietGoose(Option<log::LevelFilter>);

impl QuietGoose {
    fn engage() -> QuietGoose {
        let level = log::max_level();
        if level > log::LevelFilter::Warn && level <= log::LevelFilter::Info {
            log::set_max_level(log::LevelFilter::Warn);
            QuietGoose(Some(level))
        } else {
            QuietGoose(None)
        }
    }
}

impl Drop for QuietGoose {
    fn drop(&mut self) {
        if let Some(level) = self.0 {
            log::set_max_level(level);
        }
    }
}

/// The goose attack: one scenario per endpoint, as many goose users as [`users_for`]
/// says, nothing printed, no report, no Controller, an overall run time as a backstop.
fn attack(traffic: &Arc<Traffic>) -> Result<GooseAttack, GooseError> {
    let users: Vec<usize> = traffic
        .schedules
        .iter()
        .map(|s| users_for(&s.stream))
        .collect();
    let total: usize = users.iter().sum();
    let longest = traffic
        .schedules
        .iter()
        .map(|s| s.stream.timeout)
        .max()
        .unwrap_or_default();
    // Goose's run time counts from when its users are all started; the supervisor ends
    // the attack before, when the schedule is done. Margin for the last answers.
    let run_time =
        traffic.end.saturating_duration_since(Instant::now()) + longest + Duration::from_secs(10);
    let host = traffic
        .plan
        .nodes
        .first()
        .or(traffic.plan.workers_api.as_ref())
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1".into());
    // GooseConfiguration has private fields: no struct literal, fields set one by one.
    let mut configuration = GooseConfiguration::default();
    // Every request carries a full URL: the host only has to be valid.
    configuration.host = Some(host);
    configuration.users = Some(total);
    // All users started within about 50 ms.
    configuration.increase_rate = Some((total * 20).to_string());
    configuration.run_time = Some(run_time.as_secs().max(1).to_string());
    configuration.quiet = 1;
    configuration.no_print_metrics = true;
    configuration.no_error_summary = true;
    configuration.no_transaction_metrics = true;
    configuration.no_scenario_metrics = true;
    configuration.no_telnet = true;
    let client = GooseClientBuilder::new()
        .without_cookies()
        .user_agent(concat!("squall/", env!("CARGO_PKG_VERSION"), " (goose)"))
        .gzip(false)
        .timeout(longest.max(Duration::from_secs(1)));
    let mut attack = GooseAttack::initialize_with_config(configuration)?
        .set_client_builder_without_cookies(client)?;
    for (index, (schedule, users)) in traffic.schedules.iter().zip(users).enumerate() {
        let shared = traffic.clone();
        let function: TransactionFunction = Arc::new(move |user| {
            let traffic = shared.clone();
            Box::pin(async move { serve(user, &traffic, index).await })
        });
        let name = format!("http_{}", schedule.stream.name);
        attack = attack.register_scenario(
            Scenario::new(&name)
                .set_weight(users)?
                .register_transaction(Transaction::new(function).set_name(&name)),
        );
    }
    Ok(attack)
}

/// Starts the HTTP traffic; the task returned ends once every request due before `end`
/// is answered (or timed out), or soon after `stop` turns true.
pub fn spawn(
    plan: HttpPlan,
    shared: Arc<Shared>,
    users: Vec<mpsc::UnboundedSender<Command>>,
    start: Instant,
    end: Instant,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    if plan.streams.is_empty() {
        return Vec::new();
    }
    let schedules = plan
        .streams
        .iter()
        .enumerate()
        .map(|(i, s)| Schedule::new(s.clone(), plan.seed, i))
        .collect();
    let traffic = Arc::new(Traffic {
        plan,
        shared,
        users,
        start,
        end,
        stop,
        schedules,
    });
    let attack = match attack(&traffic) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(
                "HTTP traffic: goose could not be set up: {e}; no HTTP traffic in this run"
            );
            return Vec::new();
        }
    };
    keep_sigint_handler();
    vec![tokio::spawn(supervise(attack, traffic))]
}

/// Runs the attack and ends it when the schedule is done or the run stops.
async fn supervise(attack: GooseAttack, traffic: Arc<Traffic>) {
    let quiet = QuietGoose::engage();
    let mut running = tokio::spawn(attack.execute());
    let mut reason = None;
    let result = loop {
        if reason.is_none() {
            if traffic.stopped() {
                reason = Some("squall: the run stopped");
            } else if traffic.finished() {
                reason = Some("squall: HTTP schedule done");
            }
        }
        // Goose clears its killswitch when its run starts: keep it set until the end.
        if let Some(reason) = reason {
            goose::trigger_killswitch(reason);
        }
        tokio::select! {
            r = &mut running => break r,
            _ = tokio::time::sleep(POLL) => {}
        }
    };
    goose::reset_killswitch();
    drop(quiet);
    match result {
        Ok(Ok(metrics)) => {
            for (name, r) in &metrics.requests {
                tracing::debug!(
                    "goose: {name}: {} ok, {} failed",
                    r.success_count,
                    r.fail_count
                );
            }
            tracing::trace!("goose metrics:\n{metrics}");
        }
        Ok(Err(e)) => tracing::error!("HTTP traffic: goose: {e}"),
        Err(e) => tracing::error!("HTTP traffic: the goose attack failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use squall_history::{ConversationInfo, Header, Op, UserInfo, Writer, FORMAT, VERSION};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Goose's killswitch is process-wide: one attack at a time in this test binary.
    static ONE_ATTACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[test]
    fn users_cover_rate_times_timeout() {
        let stream = |rate: f64, secs: u64| HttpStream {
            endpoint: HttpEndpoint::Readyz,
            name: "readyz".into(),
            rate,
            timeout: Duration::from_secs(secs),
        };
        assert_eq!(users_for(&stream(0.1, 1)), 3);
        assert_eq!(users_for(&stream(2.0, 5)), 12);
        assert_eq!(users_for(&stream(1000.0, 5)), MAX_USERS_PER_ENDPOINT);
    }

    /// A server answering `{}` to every request after `delay`, keeping connections open.
    async fn slow_server(delay: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            tokio::time::sleep(delay).await;
                            let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                            if socket.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    struct Run {
        metrics: Arc<Metrics>,
        ops: Vec<Op>,
        took: Duration,
    }

    /// Runs `rate` GET /readyz a second for `window` against a server answering after
    /// `delay`; `stop_after` turns `stop` true that long after the start.
    async fn run(
        rate: f64,
        timeout: Duration,
        delay: Duration,
        window: Duration,
        stop_after: Option<Duration>,
    ) -> Run {
        let node = slow_server(delay).await;
        let path = std::env::temp_dir().join(format!(
            "squall-http-test-{}-{}.jsonl.gz",
            std::process::id(),
            rate
        ));
        let origin = Instant::now();
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            run_id: "test".into(),
            scenario: "test".into(),
            seed: 1,
            origin_wall_ms: 0,
            nodes: vec![node.clone()],
            users: vec![UserInfo {
                id: "u0".into(),
                tenant: "t0".into(),
                node: 1,
            }],
            conversations: vec![ConversationInfo {
                id: "c0".into(),
                tenant: "t0".into(),
                members: vec![0],
            }],
        };
        let (writer, rec) = Writer::create(&path, &header, origin).unwrap();
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared::new(
            rec,
            metrics.clone(),
            vec![],
            vec!["c0".into()],
            Duration::from_secs(1),
            10,
        ));
        let plan = HttpPlan {
            streams: vec![HttpStream {
                endpoint: HttpEndpoint::Readyz,
                name: "readyz".into(),
                rate,
                timeout,
            }],
            seed: 1,
            nodes: vec![node],
            workers_api: None,
            users: vec![("u0".into(), "t0".into(), 0)],
            tokens: vec![],
            conversations: vec![("c0".into(), vec![0])],
        };
        let start = Instant::now() + Duration::from_millis(500);
        let end = start + window;
        shared.set_window(start, end);
        let (stop_tx, stop) = watch::channel(false);
        if let Some(after) = stop_after {
            tokio::spawn(async move {
                tokio::time::sleep_until((start + after).into()).await;
                let _ = stop_tx.send(true);
                // Keep the sender: a closed channel would count as a stop too.
                std::future::pending::<()>().await;
            });
        } else {
            std::mem::forget(stop_tx);
        }
        let handles = spawn(plan, shared.clone(), vec![], start, end, stop);
        assert_eq!(handles.len(), 1);
        for h in handles {
            tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .expect("the HTTP traffic ends")
                .unwrap();
        }
        let took = start.elapsed();
        drop(shared);
        writer.finish().unwrap();
        let (_, reader) = squall_history::read(&path).unwrap();
        let ops = reader.map(|op| op.unwrap()).collect();
        let _ = std::fs::remove_file(&path);
        Run { metrics, ops, took }
    }

    fn http_ops(ops: &[Op], kind: Kind) -> Vec<&Value> {
        ops.iter()
            .filter(|op| op.p == HTTP && op.k == kind)
            .map(|op| &op.v)
            .collect()
    }

    /// 20 requests a second for 1 s against a server that takes 300 ms: every request
    /// goes out at its due time whatever the earlier ones are doing, so each waits about
    /// 300 ms. A closed loop of 2 users would take 3 s and see latencies grow past 2 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_through_goose() {
        let _one = ONE_ATTACK.lock().await;
        let run = run(
            20.0,
            Duration::from_secs(2),
            Duration::from_millis(300),
            Duration::from_secs(1),
            None,
        )
        .await;
        let summary = run.metrics.summaries()["http_readyz"].clone();
        assert_eq!(summary.count, 20, "{summary:?}");
        assert!(summary.p50_us >= 300_000, "{summary:?}");
        assert!(summary.max_us < 1_200_000, "{summary:?}");
        assert_eq!(run.metrics.counters.http_ok.load(Ordering::Relaxed), 20);
        let invokes = http_ops(&run.ops, Kind::Invoke);
        assert_eq!(invokes.len(), 20);
        assert_eq!(http_ops(&run.ops, Kind::Ok).len(), 20);
        let mut dues: Vec<u64> = invokes
            .iter()
            .filter_map(|v| match v {
                Value::Http { due, .. } => *due,
                _ => None,
            })
            .collect();
        dues.sort_unstable();
        for (n, due) in dues.iter().enumerate() {
            let expected = dues[0] + n as u64 * 50_000;
            assert!(
                due.abs_diff(expected) <= 1,
                "request {n} due at {due}, expected {expected}"
            );
        }
        // Ends soon after the last answer, not at goose's backstop run time.
        assert!(run.took < Duration::from_secs(4), "took {:?}", run.took);
    }

    /// A stop ends the traffic at once: requests in flight are recorded as `info`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_ends_the_attack() {
        let _one = ONE_ATTACK.lock().await;
        let run = run(
            10.0,
            Duration::from_secs(30),
            Duration::from_secs(20),
            Duration::from_secs(10),
            Some(Duration::from_millis(450)),
        )
        .await;
        assert!(run.took < Duration::from_secs(3), "took {:?}", run.took);
        let invokes = http_ops(&run.ops, Kind::Invoke).len();
        assert!((4..=6).contains(&invokes), "{invokes} invoked");
        let infos = http_ops(&run.ops, Kind::Info);
        assert_eq!(infos.len(), invokes);
        assert!(infos.iter().all(|v| matches!(v,
            Value::Http { err: Some(e), .. } if e.contains("run stopped"))));
    }

    /// Goose's own Ctrl-C handler must not replace the one squall listens on.
    #[cfg(unix)]
    #[tokio::test]
    async fn ctrl_c_stays_with_squall() {
        let _one = ONE_ATTACK.lock().await;
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).unwrap();
        keep_sigint_handler();
        // What goose does when its attack starts: refused, the one slot is taken.
        assert!(ctrlc::set_handler(|| {}).is_err());
        // SAFETY: raise only sends SIGINT to this thread; tokio's handler takes it.
        unsafe {
            libc::raise(libc::SIGINT);
        }
        tokio::time::timeout(Duration::from_secs(5), interrupt.recv())
            .await
            .expect("SIGINT reaches the handler that was there before");
    }
}
