//! The semantic rules of a scenario: values out of range and combinations that cannot run.
//! Every rule reports the key path of the offending key; every problem is collected, none
//! stops the others.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::check::{Check, Checker, DuplicatePath};
use crate::distribution::Distribution;
use crate::duration::Readable;
use crate::error::Problem;
use crate::fault::{Fault, FaultAction, ToxicKind};
use crate::gate::MetricRef;
use crate::load::{Load, SlowConsumers};
use crate::rate::Rate;
use crate::scenario::Scenario;
use crate::topology::{Links, NodeSettings, Topology, Workers};

pub const MAX_NAME_LENGTH: usize = 64;
pub const MAX_NODES: u32 = 16;
pub const MAX_PARTITIONS: i32 = 64;
pub const MAX_WORKER_CONCURRENCY: u32 = 32;
pub const MAX_USERS: u32 = 200_000;
pub const MAX_MESSAGE_BYTES: u64 = 1_048_576;
pub const MAX_RUN_LENGTH: Duration = Duration::from_secs(24 * 3600);
pub const BROKERS: u8 = 3;

const WORKERS_ENABLED: &str = "`topology.workers.enabled: true`";

impl Scenario {
    /// Every rule this scenario breaks (empty when it is valid).
    pub fn validate(&self) -> Vec<Problem> {
        let mut rules = Rules::default();
        rules.name(&self.name);
        rules.topology(&self.topology);
        rules.load(&self.load);
        rules.http(self);
        rules.faults(self);
        rules.checks(self);
        rules.problems
    }
}

#[derive(Default)]
struct Rules {
    problems: Vec<Problem>,
}

impl Rules {
    fn add(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        expected: impl Into<String>,
    ) {
        self.problems.push(Problem::new(path, message, expected));
    }

    fn positive_duration(&mut self, path: &str, value: Duration) {
        if value.is_zero() {
            self.add(path, "is zero", "a positive duration");
        }
    }

    fn in_range<T: PartialOrd + std::fmt::Display>(
        &mut self,
        path: &str,
        value: T,
        low: T,
        high: T,
    ) {
        if value < low || value > high {
            self.add(
                path,
                format!("{value} is out of range"),
                format!("a value in {low}..={high}"),
            );
        }
    }

    fn positive_rate(&mut self, path: &str, rate: f64) {
        if !(rate.is_finite() && rate > 0.0) {
            self.add(
                path,
                format!("{rate} is not a positive rate"),
                "a number greater than 0 (per second)",
            );
        }
    }

    fn name(&mut self, name: &str) {
        let well_formed = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !well_formed || name.len() > MAX_NAME_LENGTH {
            self.add(
                "name",
                format!("`{name}` is not a valid scenario name"),
                format!("lower-case letters, digits and `-`, starting with a letter or digit, at most {MAX_NAME_LENGTH} characters"),
            );
        }
    }

    fn topology(&mut self, topology: &Topology) {
        self.in_range("topology.nodes", topology.nodes, 1, MAX_NODES);
        self.in_range(
            "topology.stack.partitions",
            topology.stack.partitions,
            1,
            MAX_PARTITIONS,
        );
        self.positive_duration("topology.stack.start_timeout", topology.stack.start_timeout);
        self.node_settings(&topology.node);
        self.workers(&topology.workers);
    }

    fn node_settings(&mut self, node: &NodeSettings) {
        if node.max_frame_bytes == Some(0) {
            self.add(
                "topology.node.max_frame_bytes",
                "is zero",
                "a positive number of bytes",
            );
        }
        if let (Some(frame), Some(cap)) = (node.max_frame_bytes, node.hard_frame_cap_bytes) {
            if frame > cap {
                self.add(
                    "topology.node.max_frame_bytes",
                    format!("{frame} exceeds hard_frame_cap_bytes ({cap})"),
                    "max_frame_bytes <= hard_frame_cap_bytes",
                );
            }
        }
        for (key, value) in [
            ("rate_limit_per_s", node.rate_limit_per_s),
            ("rate_limit_burst", node.rate_limit_burst),
            ("pg_max_connections", node.pg_max_connections),
        ] {
            if value == Some(0) {
                self.add(
                    format!("topology.node.{key}"),
                    "is zero",
                    "a positive number",
                );
            }
        }
        if node.max_unsent_bytes == Some(0) {
            self.add(
                "topology.node.max_unsent_bytes",
                "is zero",
                "a positive number of bytes",
            );
        }
        if let Some(linger) = node.kafka_linger_ms.filter(|ms| *ms > 1_000) {
            self.add(
                "topology.node.kafka_linger_ms",
                format!("{linger} is more than 1000"),
                "a number of milliseconds from 0 to 1000",
            );
        }
        if node.write_stall_timeout_ms == Some(0) {
            self.add(
                "topology.node.write_stall_timeout_ms",
                "is zero",
                "a positive number of milliseconds",
            );
        }
        for (key, value) in [
            ("relay_batch", node.relay_batch),
            ("sync_limit", node.sync_limit),
        ] {
            if let Some(value) = value.filter(|value| *value < 1) {
                self.add(
                    format!("topology.node.{key}"),
                    format!("{value} is not positive"),
                    "a number >= 1",
                );
            }
        }
        if let Some(stream) = &node.stream {
            if let Some(chunks) = stream.chunks.filter(|chunks| *chunks < 1) {
                self.add(
                    "topology.node.stream.chunks",
                    format!("{chunks} is not positive"),
                    "a number >= 1",
                );
            }
            if stream.words_per_chunk == Some(0) {
                self.add(
                    "topology.node.stream.words_per_chunk",
                    "is zero",
                    "a number >= 1",
                );
            }
            if let Some(error_rate) = stream.error_rate.filter(|rate| !(0.0..=1.0).contains(rate)) {
                self.add(
                    "topology.node.stream.error_rate",
                    format!("{error_rate} is not a probability"),
                    "a number in 0..=1",
                );
            }
        }
    }

    fn workers(&mut self, workers: &Workers) {
        self.in_range(
            "topology.workers.concurrency",
            workers.concurrency,
            1,
            MAX_WORKER_CONCURRENCY,
        );
        if workers.enabled && workers.only.is_empty() {
            self.add(
                "topology.workers.only",
                "lists no worker while workers are enabled",
                "at least one of audit, analytics, search, alerts, export (or `enabled: false`)",
            );
        }
        let mut seen = BTreeSet::new();
        for (index, kind) in workers.only.iter().enumerate() {
            if !seen.insert(*kind) {
                self.add(
                    format!("topology.workers.only[{index}]"),
                    format!("`{}` is listed twice", kind.name()),
                    "each worker at most once",
                );
            }
        }
        for (key, value) in [
            ("sla_ms", workers.sla_ms),
            ("commit_interval_ms", workers.commit_interval_ms),
        ] {
            if value == Some(0) {
                self.add(
                    format!("topology.workers.{key}"),
                    "is zero",
                    "a positive number of milliseconds",
                );
            }
        }
    }

    fn load(&mut self, load: &Load) {
        self.in_range("load.users", load.users, 1, MAX_USERS);
        if load.tenants == 0 || load.tenants > load.users {
            self.add(
                "load.tenants",
                format!("{} tenants for {} users", load.tenants, load.users),
                "at least 1 and at most `load.users` tenants",
            );
        }
        if load.conversations.count == 0 {
            self.add(
                "load.conversations.count",
                "is zero",
                "at least 1 conversation",
            );
        }
        let members_per_tenant = u64::from(load.users_per_tenant());
        self.distribution(
            "load.conversations.members",
            &load.conversations.members,
            1,
            members_per_tenant,
            "users in a tenant (users / tenants, rounded up)",
        );
        self.distribution(
            "load.message_size",
            &load.message_size,
            1,
            MAX_MESSAGE_BYTES,
            "bytes",
        );
        self.mix(load);
        if load.duration.is_zero() || load.duration > MAX_RUN_LENGTH {
            self.add(
                "load.duration",
                format!(
                    "{} is not a usable measured duration",
                    Readable(load.duration)
                ),
                "a duration above 0s and at most 24h",
            );
        }
        if load.warmup > MAX_RUN_LENGTH {
            self.add(
                "load.warmup",
                format!("{} is longer than 24h", Readable(load.warmup)),
                "at most 24h",
            );
        }
        self.rate(&load.rate, load.total());
        self.positive_rate("load.connect_rate", load.connect_rate);
        self.positive_duration("load.ack_timeout", load.ack_timeout);
        for (i, a) in load.abuse.iter().enumerate() {
            self.positive_rate(&format!("load.abuse[{i}].rate"), a.rate);
        }
        if let Some(slow) = &load.slow_consumers {
            self.slow_consumers(slow, load.duration);
        }
        if load.max_in_flight == 0 {
            self.add(
                "load.max_in_flight",
                "is zero",
                "at least 1 operation in flight per user",
            );
        }
    }

    /// Checks a distribution on its own and that all its values lie in `low..=high`,
    /// pointing at the key that states the offending bound.
    fn slow_consumers(&mut self, slow: &SlowConsumers, duration: Duration) {
        if !(slow.share > 0.0 && slow.share <= 1.0) {
            self.add(
                "load.slow_consumers.share",
                format!("{} is not a share of the users", slow.share),
                "a number in (0, 1]",
            );
        }
        self.positive_duration("load.slow_consumers.pause", slow.pause);
        if slow.every <= slow.pause {
            self.add(
                "load.slow_consumers.every",
                format!(
                    "{} is not longer than the pause ({})",
                    Readable(slow.every),
                    Readable(slow.pause)
                ),
                "a duration longer than `pause`",
            );
        } else if slow.pause > duration {
            self.add(
                "load.slow_consumers.pause",
                format!(
                    "{} is longer than load.duration ({})",
                    Readable(slow.pause),
                    Readable(duration)
                ),
                "a pause that fits inside `load.duration`",
            );
        }
    }

    fn distribution(
        &mut self,
        path: &str,
        distribution: &Distribution,
        low: u64,
        high: u64,
        unit: &str,
    ) {
        let in_bounds = format!("every value in {low}..={high} ({unit})");
        match distribution {
            Distribution::Fixed(_) => {}
            Distribution::Uniform { min, max } => {
                if min > max {
                    self.add(
                        format!("{path}.uniform.min"),
                        format!("min {min} exceeds max {max}"),
                        "min <= max",
                    );
                    return;
                }
            }
            Distribution::Weighted(entries) => {
                if entries.is_empty() {
                    self.add(
                        format!("{path}.weighted"),
                        "has no values",
                        "at least one `{ value, weight }`",
                    );
                    return;
                }
                for (index, entry) in entries.iter().enumerate() {
                    if !(entry.weight.is_finite() && entry.weight > 0.0) {
                        self.add(
                            format!("{path}.weighted[{index}].weight"),
                            format!("{} is not a positive weight", entry.weight),
                            "a weight greater than 0",
                        );
                    }
                }
            }
            Distribution::Lognormal { median, sigma, max } => {
                if !(sigma.is_finite() && *sigma > 0.0) {
                    self.add(
                        format!("{path}.lognormal.sigma"),
                        format!("{sigma} is not positive"),
                        "a sigma greater than 0",
                    );
                }
                if *median == 0 {
                    self.add(
                        format!("{path}.lognormal.median"),
                        "is zero",
                        "a median of at least 1",
                    );
                }
                if max < median {
                    self.add(
                        format!("{path}.lognormal.max"),
                        format!("max {max} is below the median {median}"),
                        "max >= median",
                    );
                    return;
                }
            }
        }
        let offending_key =
            |which_end: &str, out_of_bounds: &dyn Fn(u64) -> bool| match distribution {
                Distribution::Fixed(_) => format!("{path}.fixed"),
                Distribution::Uniform { .. } => format!("{path}.uniform.{which_end}"),
                Distribution::Weighted(entries) => {
                    match entries.iter().position(|entry| out_of_bounds(entry.value)) {
                        Some(index) => format!("{path}.weighted[{index}].value"),
                        None => format!("{path}.weighted"),
                    }
                }
                Distribution::Lognormal { .. } => format!("{path}.lognormal.max"),
            };
        if distribution.min() < low {
            let key = offending_key("min", &|value| value < low);
            self.add(
                key,
                format!("can be {}", distribution.min()),
                in_bounds.clone(),
            );
        }
        if distribution.max() > high {
            let key = offending_key("max", &|value| value > high);
            self.add(key, format!("can be {}", distribution.max()), in_bounds);
        }
    }

    fn mix(&mut self, load: &Load) {
        let mut total = 0.0;
        for (kind, weight) in load.mix.weights() {
            if !(weight.is_finite() && weight >= 0.0) {
                self.add(
                    format!("load.mix.{}", kind.name()),
                    format!("{weight} is not a weight"),
                    "a number >= 0",
                );
            } else {
                total += weight;
            }
        }
        if total <= 0.0 {
            self.add(
                "load.mix",
                "all weights are zero",
                "at least one operation kind with a weight above 0",
            );
        }
    }

    fn rate(&mut self, rate: &Rate, total: Duration) {
        match rate {
            Rate::Constant(value) => self.positive_rate("load.rate", *value),
            Rate::Phases(phases) => {
                if phases.is_empty() {
                    self.add(
                        "load.rate",
                        "has no phases",
                        "a number, or at least one phase",
                    );
                    return;
                }
                let mut any_positive = false;
                let mut end = Duration::ZERO;
                let mut reported_overrun = false;
                for (index, phase) in phases.iter().enumerate() {
                    let length_key = match phase {
                        crate::rate::Phase::Hold { .. } => "hold",
                        crate::rate::Phase::Ramp { .. } => "ramp",
                    };
                    self.positive_duration(
                        &format!("load.rate[{index}].{length_key}"),
                        phase.length(),
                    );
                    for (key, value) in phase.stated_rates() {
                        if !(value.is_finite() && value >= 0.0) {
                            self.add(
                                format!("load.rate[{index}].{key}"),
                                format!("{value} is not a rate"),
                                "a number >= 0 (per second)",
                            );
                        }
                        any_positive |= value > 0.0;
                    }
                    end = end.saturating_add(phase.length());
                    if end > total && !reported_overrun {
                        reported_overrun = true;
                        self.add(
                            format!("load.rate[{index}].{length_key}"),
                            format!(
                                "the phases run to {} but warmup + duration is {}",
                                Readable(rate.phases_length()),
                                Readable(total)
                            ),
                            "phases that end by the end of warmup + duration (the last rate then holds)",
                        );
                    }
                }
                if !any_positive {
                    self.add(
                        "load.rate",
                        "every phase has a rate of 0",
                        "at least one phase with a rate above 0",
                    );
                }
            }
        }
    }

    fn http(&mut self, scenario: &Scenario) {
        let workers = &scenario.topology.workers;
        for (index, traffic) in scenario.http.iter().enumerate() {
            let path = format!("http[{index}]");
            self.positive_rate(&format!("{path}.rate"), traffic.rate);
            self.positive_duration(&format!("{path}.timeout"), traffic.timeout);
            if let Some(worker) = traffic.endpoint.served_by() {
                if !workers.runs(worker) {
                    self.add(
                        format!("{path}.endpoint"),
                        format!(
                            "this endpoint is served by the {} worker, which does not run",
                            worker.name()
                        ),
                        format!(
                            "{WORKERS_ENABLED} with `{}` in `topology.workers.only`",
                            worker.name()
                        ),
                    );
                }
            }
        }
    }

    fn faults(&mut self, scenario: &Scenario) {
        for (index, fault) in scenario.faults.iter().enumerate() {
            self.fault(scenario, &format!("faults[{index}]"), fault);
        }
    }

    fn fault(&mut self, scenario: &Scenario, path: &str, fault: &Fault) {
        let nodes = scenario.topology.nodes;
        let kind = fault.action.kind();
        if scenario.topology.stack.links == Links::Direct && kind.needs_proxies() {
            self.add(
                format!("{path}.kind"),
                format!(
                    "`{}` cuts or degrades a link, but `topology.stack.links: direct` runs without proxies",
                    kind.name()
                ),
                "`links: proxied` (the default), or only process faults (kill_*, term_*, pause_*)",
            );
        }
        match &fault.action {
            FaultAction::KillNode { node }
            | FaultAction::TermNode { node }
            | FaultAction::PauseNode { node } => {
                if *node == 0 || *node > nodes {
                    self.add(
                        format!("{path}.node"),
                        format!("node {node} does not exist (topology.nodes is {nodes})"),
                        format!("a node number in 1..={nodes}"),
                    );
                }
            }
            FaultAction::KillBroker { broker } | FaultAction::IsolateBroker { broker } => {
                self.broker(&format!("{path}.broker"), *broker)
            }
            FaultAction::PartitionOneWay { from, to } => {
                self.broker(&format!("{path}.from"), *from);
                self.broker(&format!("{path}.to"), *to);
                if from == to {
                    self.add(
                        format!("{path}.to"),
                        format!("a broker cannot be cut from itself (from and to are both {to})"),
                        "two different brokers",
                    );
                }
            }
            FaultAction::Toxic {
                link,
                toxicity,
                toxic,
                ..
            } => {
                if link.trim().is_empty() {
                    self.add(
                        format!("{path}.link"),
                        "is empty",
                        "a link name such as `redis`, `postgres` or `kafka-1-client`",
                    );
                }
                if !(0.0..=1.0).contains(toxicity) {
                    self.add(
                        format!("{path}.toxicity"),
                        format!("{toxicity} is not a probability"),
                        "a number in 0..=1",
                    );
                }
                match toxic {
                    ToxicKind::Bandwidth { rate_kb: 0 } => self.add(
                        format!("{path}.toxic.rate_kb"),
                        "is zero",
                        "a positive rate (a stalled link is `type: timeout`)",
                    ),
                    ToxicKind::Slicer {
                        average_size: 0, ..
                    } => self.add(
                        format!("{path}.toxic.average_size"),
                        "is zero",
                        "a positive number of bytes",
                    ),
                    _ => {}
                }
            }
            FaultAction::KillWorkers {}
            | FaultAction::TermWorkers {}
            | FaultAction::PauseWorkers {}
            | FaultAction::IsolateController {}
            | FaultAction::CutKafka {}
            | FaultAction::RedisDown { .. }
            | FaultAction::PostgresDown { .. } => {}
        }
        let kind = fault.action.kind();
        if kind.targets_workers() && !scenario.topology.workers.enabled {
            self.add(
                format!("{path}.kind"),
                format!("`{kind}` needs worker processes, but workers are disabled"),
                WORKERS_ENABLED,
            );
        }
        let Some(length) = fault.duration else {
            self.add(
                format!("{path}.duration"),
                format!("is missing; every fault kind is healed or restarted after its duration, so `{kind}` needs one"),
                "a duration like `30s`",
            );
            return;
        };
        self.positive_duration(&format!("{path}.duration"), length);
        if fault.repeat.is_some() && fault.random.is_some() {
            self.add(
                format!("{path}.random"),
                "is given together with `repeat`",
                "either `repeat` or `random`, not both",
            );
            return;
        }
        if let Some(repeat) = &fault.repeat {
            if repeat.count == 0 {
                self.add(
                    format!("{path}.repeat.count"),
                    "is zero",
                    "at least 1 occurrence",
                );
            }
            if repeat.every <= length {
                self.add(
                    format!("{path}.repeat.every"),
                    format!(
                        "{} does not exceed the fault's duration {}",
                        Readable(repeat.every),
                        Readable(length)
                    ),
                    "an interval longer than `duration`, so occurrences do not overlap",
                );
            }
        }
        if let Some(random) = &fault.random {
            if random.count == 0 {
                self.add(
                    format!("{path}.random.count"),
                    "is zero",
                    "at least 1 occurrence",
                );
            } else if random.within <= length.saturating_mul(random.count) {
                self.add(
                    format!("{path}.random.within"),
                    format!(
                        "{} cannot hold {} non-overlapping occurrences of {}",
                        Readable(random.within),
                        random.count,
                        Readable(length)
                    ),
                    "a span longer than count × duration",
                );
            }
        }
        let limit = scenario.load.duration;
        if fault.latest_end() > limit {
            let offending_key = if fault.repeat.is_some() {
                "repeat"
            } else if fault.random.is_some() {
                "random"
            } else {
                "at"
            };
            self.add(
                format!("{path}.{offending_key}"),
                format!(
                    "the fault can last until {} after the warm-up, past the end of the load ({})",
                    Readable(fault.latest_end()),
                    Readable(limit)
                ),
                "every fault window inside `load.duration` (`at` counts from the end of the warm-up)",
            );
        }
    }

    fn broker(&mut self, path: &str, broker: u8) {
        if broker == 0 || broker > BROKERS {
            self.add(
                path,
                format!("broker {broker} does not exist"),
                format!("a broker number in 1..={BROKERS}"),
            );
        }
    }

    fn checks(&mut self, scenario: &Scenario) {
        let workers = &scenario.topology.workers;
        for (index, check) in scenario.checks.iter().enumerate() {
            let path = format!("checks[{index}]");
            match check {
                Check::Gate(gate) => {
                    if matches!(gate.metric, MetricRef::Lag(_)) && !workers.enabled {
                        self.add(
                            path,
                            format!(
                                "`{}` judges consumer lag, but workers are disabled",
                                gate.text
                            ),
                            WORKERS_ENABLED,
                        );
                    }
                }
                Check::Checker(checker) => self.checker(scenario, &path, checker),
            }
        }
    }

    fn checker(&mut self, scenario: &Scenario, path: &str, checker: &Checker) {
        let workers = &scenario.topology.workers;
        let needs_workers = matches!(checker, Checker::Replay { .. } | Checker::Lag { .. });
        if needs_workers && !workers.enabled {
            self.add(
                format!("{path}.checker"),
                format!(
                    "the {} checker needs worker processes, but workers are disabled",
                    checker.name()
                ),
                WORKERS_ENABLED,
            );
        }
        match checker {
            Checker::Duplicates {
                max_fraction,
                paths,
            } => {
                if !(0.0..=1.0).contains(max_fraction) {
                    self.add(
                        format!("{path}.max_fraction"),
                        format!("{max_fraction} is not a fraction"),
                        "a number in 0..=1",
                    );
                }
                if paths.is_empty() {
                    self.add(
                        format!("{path}.paths"),
                        "lists no path",
                        "at least one of live, sync, kafka, audit",
                    );
                }
                if paths.contains(&DuplicatePath::Audit)
                    && workers.enabled
                    && !workers.runs(crate::topology::WorkerKind::Audit)
                {
                    self.add(
                        format!("{path}.paths"),
                        "includes `audit`, but the audit worker does not run",
                        "`audit` in `topology.workers.only`, or `audit` left out of `paths`",
                    );
                }
            }
            Checker::Replay { projections } => {
                if projections.is_empty() {
                    self.add(
                        format!("{path}.projections"),
                        "lists no projection",
                        "at least one of audit, search, analytics",
                    );
                }
                if workers.enabled {
                    for projection in projections {
                        if !workers.runs(projection.worker()) {
                            self.add(
                                format!("{path}.projections"),
                                format!(
                                    "the {} projection's worker does not run",
                                    projection.worker().name()
                                ),
                                "only projections whose workers are in `topology.workers.only`",
                            );
                        }
                    }
                }
            }
            Checker::Lag { within, .. } => {
                self.positive_duration(&format!("{path}.within"), *within)
            }
            Checker::Slo {
                metric,
                percentile,
                max,
                ..
            } => {
                if metric.trim().is_empty() {
                    self.add(
                        format!("{path}.metric"),
                        "is empty",
                        "a latency metric such as `delivery`",
                    );
                }
                if !(*percentile > 0.0 && *percentile <= 100.0) {
                    self.add(
                        format!("{path}.percentile"),
                        format!("{percentile} is not a percentile"),
                        "a number in (0, 100]",
                    );
                }
                self.positive_duration(&format!("{path}.max"), *max);
            }
            Checker::Delivery {}
            | Checker::NoLossDownstream {}
            | Checker::Order {}
            | Checker::Streams { .. } => {}
        }
    }
}
