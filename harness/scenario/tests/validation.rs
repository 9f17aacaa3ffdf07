//! Parsing and validation through the public API: defaults, located serde errors, and one
//! test per semantic rule that checks the key path and the position of its diagnostic.

use squall_scenario::{
    parse_str, Check, Checker, Diagnostic, Distribution, FanoutMode, FaultAction, HttpEndpoint,
    Mix, OpKind, Placement, Rate, Scenario, ScenarioError, WorkerKind,
};
use std::time::Duration;

const NAME: &str = "name: test\n";
const LOAD: &str = "\
load:
  users: 100
  conversations:
    count: 10
    members: { uniform: { min: 2, max: 5 } }
  rate: 50
  duration: 5m
";

/// A valid scenario plus `sections` appended at the top level.
fn with(sections: &str) -> String {
    format!("{NAME}{LOAD}{sections}")
}

/// A valid scenario whose load section is replaced.
fn with_load(load: &str) -> String {
    format!("{NAME}{load}")
}

fn parse(text: &str) -> Scenario {
    parse_str(text, "test.yaml").unwrap_or_else(|error| panic!("{error}\n---\n{text}"))
}

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    match parse_str(text, "test.yaml") {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(ScenarioError::Invalid { diagnostics, .. }) => diagnostics,
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// Line and column of the first occurrence of `needle` (1-based).
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(index, line)| line.find(needle).map(|column| (index + 1, column + 1)))
        .unwrap_or_else(|| panic!("`{needle}` is not in:\n{text}"))
}

/// Asserts a diagnostic at `path` that sits where `needle` (the offending key) starts and
/// whose message contains `message_part`.
#[track_caller]
fn assert_problem(text: &str, path: &str, needle: &str, message_part: &str) {
    let found = diagnostics(text);
    let Some(diagnostic) = found.iter().find(|diagnostic| diagnostic.path == path) else {
        panic!("no diagnostic at `{path}`; got:\n{}", render(&found));
    };
    assert_eq!(
        (diagnostic.line, diagnostic.column),
        position_of(text, needle),
        "position of {diagnostic}"
    );
    assert!(
        diagnostic.message.contains(message_part) || diagnostic.expected.contains(message_part),
        "`{message_part}` not in {diagnostic}"
    );
    assert!(
        !diagnostic.expected.is_empty(),
        "{diagnostic} names no expected form"
    );
}

fn render(found: &[Diagnostic]) -> String {
    found
        .iter()
        .map(|diagnostic| format!("{diagnostic}\n"))
        .collect()
}

// ---- good scenarios and defaults ----

#[test]
fn a_minimal_scenario_gets_every_default() {
    let scenario = parse(&with(""));
    assert_eq!(scenario.name, "test");
    assert_eq!(scenario.description, "");
    assert_eq!(scenario.seed, 1);
    let topology = &scenario.topology;
    assert_eq!((topology.nodes, topology.stack.partitions), (1, 6));
    assert_eq!(topology.stack.start_timeout, Duration::from_secs(120));
    assert_eq!(topology.node, Default::default());
    assert!(topology.workers.enabled);
    assert_eq!(
        topology.workers.only,
        vec![WorkerKind::Audit, WorkerKind::Analytics, WorkerKind::Search]
    );
    assert_eq!(
        (topology.workers.concurrency, topology.workers.sla_ms),
        (1, None)
    );
    let load = &scenario.load;
    assert_eq!((load.users, load.tenants, load.max_in_flight), (100, 1, 64));
    assert_eq!(load.conversations.placement, Placement::Spread);
    assert_eq!(load.rate, Rate::Constant(50.0));
    assert_eq!(load.mix, Mix::default());
    assert_eq!(load.mix.weights()[0], (OpKind::Chat, 1.0));
    assert!(load.mix.weights()[1..]
        .iter()
        .all(|(_, weight)| *weight == 0.0));
    assert_eq!(load.message_size, Distribution::Fixed(200));
    assert_eq!(
        (load.warmup, load.duration),
        (Duration::ZERO, Duration::from_secs(300))
    );
    assert_eq!(
        (load.connect_rate, load.ack_timeout),
        (500.0, Duration::from_secs(10))
    );
    assert!(scenario.http.is_empty() && scenario.faults.is_empty() && scenario.checks.is_empty());
}

#[test]
fn a_partial_mix_leaves_other_kinds_at_zero() {
    let scenario = parse(&with_load(
        "load:\n  users: 10\n  conversations: { count: 1, members: { fixed: 2 } }\n  rate: 5\n  duration: 1m\n  mix: { stream: 2, read: 1 }\n",
    ));
    assert_eq!(
        scenario.load.mix.weights(),
        [
            (OpKind::Chat, 0.0),
            (OpKind::Stream, 2.0),
            (OpKind::Typing, 0.0),
            (OpKind::Read, 1.0),
            (OpKind::Sync, 0.0),
            (OpKind::Reconnect, 0.0)
        ]
    );
}

#[test]
fn node_settings_serialise_only_what_is_set() {
    let scenario = parse(&with(
        "topology:\n  node:\n    fanout_mode: kafka\n    stream: { chunks: 3 }\n    sabotage: { skip_outbox: true }\n",
    ));
    assert_eq!(scenario.topology.node.fanout_mode, Some(FanoutMode::Kafka));
    let yaml = serde_yaml::to_string(&scenario.topology.node).unwrap();
    assert_eq!(
        yaml,
        "fanout_mode: kafka\nstream:\n  chunks: 3\nsabotage:\n  skip_outbox: true\n"
    );
}

#[test]
fn a_parsed_scenario_serialises_to_an_equal_scenario() {
    let text = with(
        "faults:\n  - { at: 10s, duration: 5s, kind: kill_node, node: 1 }\nchecks:\n  - lost == 0\n  - { checker: duplicates }\nhttp:\n  - { endpoint: readyz, rate: 1 }\n",
    );
    let scenario = parse(&text);
    let again = parse(&serde_yaml::to_string(&scenario).unwrap());
    assert_eq!(again, scenario);
    assert_eq!(scenario.faults[0].action, FaultAction::KillNode { node: 1 });
    assert_eq!(scenario.http[0].endpoint, HttpEndpoint::Readyz);
    assert!(matches!(
        scenario.checks[1],
        Check::Checker(Checker::Duplicates { .. })
    ));
}

#[test]
fn load_file_reads_and_reports_missing_files() {
    let path = std::env::temp_dir().join(format!("squall-scenario-{}.yaml", std::process::id()));
    std::fs::write(&path, with("")).unwrap();
    assert_eq!(squall_scenario::load_file(&path).unwrap().name, "test");
    std::fs::remove_file(&path).unwrap();
    let missing = squall_scenario::load_file(&path).unwrap_err();
    assert!(matches!(missing, ScenarioError::Read { .. }), "{missing}");
}

// ---- serde errors ----

#[test]
fn an_unknown_nested_key_is_named_and_located() {
    let text = with_load(
        "load:\n  users: 100\n  conversations:\n    count: 10\n    members:\n      uniform:\n        min: 2\n        maks: 5\n  rate: 50\n  duration: 5m\n",
    );
    let found = diagnostics(&text);
    assert_eq!(found.len(), 1, "{}", render(&found));
    let diagnostic = &found[0];
    assert_eq!(diagnostic.path, "load.conversations.members.uniform.maks");
    assert_eq!((diagnostic.line, diagnostic.column), (9, 9));
    assert_eq!(diagnostic.message, "unknown field `maks`");
    assert_eq!(diagnostic.expected, "`min` or `max`");
}

#[test]
fn an_unknown_top_level_key_lists_the_known_ones() {
    let text = with("chekcs: []\n");
    assert_problem(&text, "chekcs", "chekcs", "`checks`");
}

#[test]
fn a_wrong_type_is_located_at_its_key() {
    let text = with_load("load:\n  users: lots\n  conversations: { count: 1, members: { fixed: 2 } }\n  rate: 5\n  duration: 1m\n");
    assert_problem(
        &text,
        "load.users",
        "users",
        "invalid type: string \"lots\"",
    );
    let text = with("topology:\n  workers:\n    enabled: sometimes\n");
    assert_problem(&text, "topology.workers.enabled", "enabled", "a boolean");
}

#[test]
fn a_malformed_duration_names_the_accepted_form() {
    let text = with_load(
        "load:\n  users: 10\n  conversations: { count: 1, members: { fixed: 2 } }\n  rate: 5\n  duration: 5 minutes\n",
    );
    assert_problem(&text, "load.duration", "duration", "\"30s\"");
}

#[test]
fn a_missing_required_key_is_reported() {
    let text = "name: test\nload:\n  users: 10\n  rate: 5\n  duration: 1m\n";
    assert_problem(
        text,
        "load.conversations",
        "load",
        "missing field `conversations`",
    );
}

#[test]
fn a_misplaced_fault_key_is_named_with_its_kind() {
    let text = with("faults:\n  - at: 1m\n    duration: 10s\n    kind: cut_kafka\n    node: 2\n");
    assert_problem(&text, "faults[0].node", "node: 2", "for kind `cut_kafka`");
    let text = with("faults:\n  - at: 1m\n    duration: 10s\n    kind: kill_broker\n");
    assert_problem(
        &text,
        "faults[0].broker",
        "at: 1m",
        "missing field `broker`",
    );
}

#[test]
fn a_malformed_gate_is_located_with_the_grammar_hint() {
    let text = with("checks:\n  - lost == 0\n  - p99(delivery) < 100\n");
    assert_problem(
        &text,
        "checks[1]",
        "p99(delivery)",
        "a duration like `100ms`",
    );
}

#[test]
fn serde_errors_in_different_sections_are_all_reported() {
    let text = with_load(
        "\
load:
  users: 100
  conversations: { count: 10, members: { fixed: 2 } }
  rate: 50
  duration: 5m
  warmpu: 10s
topology:
  nodes: many
faults:
  - { at: 1s, duration: 1s, kind: explode }
  - { at: 1s, duration: 1s, kind: kill_node, node: 1 }
  - { at: 1s, duration: 1s, kind: cut_kafka, extra: 1 }
checks:
  - lost = 0
  - { checker: order }
  - { checker: replay, projections: [audit, graph] }
",
    );
    let found = diagnostics(&text);
    let paths: Vec<&str> = found
        .iter()
        .map(|diagnostic| diagnostic.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "load.warmpu",
            "topology.nodes",
            "faults[0].kind",
            "faults[2].extra",
            "checks[0]",
            "checks[2]"
        ],
        "{}",
        render(&found)
    );
    let lines: Vec<usize> = found.iter().map(|diagnostic| diagnostic.line).collect();
    assert_eq!(lines, [7, 9, 11, 13, 15, 17]);
}

#[test]
fn invalid_yaml_is_one_located_diagnostic() {
    let found = diagnostics("name: test\nload:\n  users: 1\n\trate: 5\n");
    assert_eq!(found.len(), 1, "{}", render(&found));
    assert_eq!(found[0].line, 4, "{}", render(&found));
    assert!(
        found[0].message.contains("tab character"),
        "{}",
        render(&found)
    );
}

#[test]
fn the_error_lists_every_diagnostic_as_file_line_column() {
    let text = with("topology:\n  nodes: 0\n  stack:\n    partitions: 100\n");
    let error = parse_str(&text, "scenarios/x.yaml").unwrap_err();
    assert_eq!(
        error.to_string(),
        "scenarios/x.yaml:10:3: topology.nodes: 0 is out of range; expected a value in 1..=16\n\
         scenarios/x.yaml:12:5: topology.stack.partitions: 100 is out of range; expected a value in 1..=64"
    );
}

// ---- semantic rules: scenario and topology ----

#[test]
fn the_name_must_be_a_slug() {
    for name in ["Upper", "-lead", "under_score", "", &"a".repeat(65)] {
        let text = format!("name: '{name}'\n{LOAD}");
        assert_problem(&text, "name", "name", "not a valid scenario name");
    }
    parse(&format!("name: '{}'\n{LOAD}", "a".repeat(64)));
}

#[test]
fn topology_sizes_are_bounded() {
    assert_problem(
        &with("topology:\n  nodes: 17\n"),
        "topology.nodes",
        "nodes",
        "1..=16",
    );
    assert_problem(
        &with("topology:\n  stack: { partitions: 0 }\n"),
        "topology.stack.partitions",
        "partitions",
        "1..=64",
    );
    assert_problem(
        &with("topology:\n  stack: { start_timeout: 0s }\n"),
        "topology.stack.start_timeout",
        "start_timeout",
        "positive",
    );
    assert_problem(
        &with("topology:\n  stack: { links: direct }\nfaults:\n  - { kind: kill_node, node: 1, at: 5s, duration: 2s }\n  - { kind: cut_kafka, at: 8s, duration: 2s }\n"),
        "faults[1].kind",
        "kind: cut_kafka",
        "runs without proxies",
    );
    parse(&with("topology:\n  stack: { links: direct }\nfaults:\n  - { kind: kill_broker, broker: 2, at: 5s, duration: 2s }\n"));
    assert_problem(
        &with("topology:\n  workers: { concurrency: 33 }\n"),
        "topology.workers.concurrency",
        "concurrency",
        "1..=32",
    );
    assert_problem(
        &with("topology:\n  workers: { sla_ms: 0 }\n"),
        "topology.workers.sla_ms",
        "sla_ms",
        "positive",
    );
    assert_problem(
        &with("topology:\n  workers: { commit_interval_ms: 0 }\n"),
        "topology.workers.commit_interval_ms",
        "commit_interval_ms",
        "positive",
    );
}

#[test]
fn enabled_workers_need_a_list_without_repeats() {
    assert_problem(
        &with("topology:\n  workers:\n    only: []\n"),
        "topology.workers.only",
        "only",
        "enabled: false",
    );
    parse(&with(
        "topology:\n  workers:\n    enabled: false\n    only: []\n",
    ));
    let text =
        with("topology:\n  workers:\n    only:\n      - audit\n      - search\n      - audit\n");
    let found = diagnostics(&text);
    assert_eq!(found.len(), 1, "{}", render(&found));
    assert_eq!(found[0].path, "topology.workers.only[2]");
    // The position is that of the third item.
    assert_eq!((found[0].line, found[0].column), (14, 9));
    assert!(found[0].message.contains("listed twice"));
}

#[test]
fn node_settings_follow_the_node_rules() {
    let text =
        with("topology:\n  node:\n    max_frame_bytes: 2048\n    hard_frame_cap_bytes: 1024\n");
    assert_problem(
        &text,
        "topology.node.max_frame_bytes",
        "max_frame_bytes",
        "hard_frame_cap_bytes",
    );
    assert_problem(
        &with("topology:\n  node: { max_frame_bytes: 0 }\n"),
        "topology.node.max_frame_bytes",
        "max_frame_bytes",
        "zero",
    );
    assert_problem(
        &with("topology:\n  node: { rate_limit_per_s: 0 }\n"),
        "topology.node.rate_limit_per_s",
        "rate_limit_per_s",
        "zero",
    );
    assert_problem(
        &with("topology:\n  node: { rate_limit_burst: 0 }\n"),
        "topology.node.rate_limit_burst",
        "rate_limit_burst",
        "zero",
    );
    assert_problem(
        &with("topology:\n  node: { pg_max_connections: 0 }\n"),
        "topology.node.pg_max_connections",
        "pg_max_connections",
        "zero",
    );
    assert_problem(
        &with("topology:\n  node: { relay_batch: 0 }\n"),
        "topology.node.relay_batch",
        "relay_batch",
        ">= 1",
    );
    assert_problem(
        &with("topology:\n  node: { kafka_linger_ms: 5000 }\n"),
        "topology.node.kafka_linger_ms",
        "kafka_linger_ms",
        "0 to 1000",
    );
    assert_problem(
        &with("topology:\n  node: { sync_limit: -5 }\n"),
        "topology.node.sync_limit",
        "sync_limit",
        ">= 1",
    );
    let stream = with("topology:\n  node:\n    stream:\n      chunks: 0\n      words_per_chunk: 0\n      error_rate: 1.5\n");
    assert_problem(&stream, "topology.node.stream.chunks", "chunks", ">= 1");
    assert_problem(
        &stream,
        "topology.node.stream.words_per_chunk",
        "words_per_chunk",
        ">= 1",
    );
    assert_problem(
        &stream,
        "topology.node.stream.error_rate",
        "error_rate",
        "0..=1",
    );
}

// ---- semantic rules: load ----

fn load_with(users: &str, extra: &str) -> String {
    with_load(&format!(
        "load:\n  users: {users}\n  conversations:\n    count: 10\n    members: {{ uniform: {{ min: 2, max: 5 }} }}\n  rate: 50\n  duration: 5m\n{extra}"
    ))
}

#[test]
fn users_and_tenants_are_bounded() {
    assert_problem(&load_with("0", ""), "load.users", "users", "1..=200000");
    assert_problem(
        &load_with("200001", ""),
        "load.users",
        "users",
        "1..=200000",
    );
    assert_problem(
        &load_with("10", "  tenants: 11\n"),
        "load.tenants",
        "tenants",
        "at most `load.users`",
    );
    assert_problem(
        &load_with("10", "  tenants: 0\n"),
        "load.tenants",
        "tenants",
        "at least 1",
    );
}

#[test]
fn conversations_fit_in_a_tenant() {
    let text = with_load("load:\n  users: 10\n  conversations:\n    count: 0\n    members: { fixed: 2 }\n  rate: 5\n  duration: 1m\n");
    assert_problem(&text, "load.conversations.count", "count", "at least 1");
    // 100 users over 40 tenants: 3 per tenant at most, but conversations may have 5.
    let text = load_with("100", "  tenants: 40\n");
    assert_problem(
        &text,
        "load.conversations.members.uniform.max",
        "max: 5",
        "1..=3",
    );
    let text = with_load("load:\n  users: 10\n  conversations:\n    count: 1\n    members: { fixed: 0 }\n  rate: 5\n  duration: 1m\n");
    assert_problem(
        &text,
        "load.conversations.members.fixed",
        "fixed",
        "can be 0",
    );
    let text = with_load(
        "load:\n  users: 10\n  conversations:\n    count: 1\n    members:\n      weighted:\n        - { value: 2, weight: 1 }\n        - { value: 20, weight: 1 }\n  rate: 5\n  duration: 1m\n",
    );
    assert_problem(
        &text,
        "load.conversations.members.weighted[1].value",
        "value: 20",
        "can be 20",
    );
}

#[test]
fn distributions_must_be_well_formed() {
    let members = |members: &str| {
        with_load(&format!(
            "load:\n  users: 1000\n  conversations:\n    count: 1\n    members: {members}\n  rate: 5\n  duration: 1m\n"
        ))
    };
    assert_problem(
        &members("{ uniform: { min: 5, max: 2 } }"),
        "load.conversations.members.uniform.min",
        "min",
        "min <= max",
    );
    assert_problem(
        &members("{ weighted: [] }"),
        "load.conversations.members.weighted",
        "weighted",
        "at least one",
    );
    assert_problem(
        &members("{ weighted: [ { value: 2, weight: 0 } ] }"),
        "load.conversations.members.weighted[0].weight",
        "weight: 0",
        "greater than 0",
    );
    assert_problem(
        &members("{ lognormal: { median: 5, sigma: 0, max: 50 } }"),
        "load.conversations.members.lognormal.sigma",
        "sigma",
        "greater than 0",
    );
    assert_problem(
        &members("{ lognormal: { median: 50, sigma: 1, max: 5 } }"),
        "load.conversations.members.lognormal.max",
        "max",
        "max >= median",
    );
    assert_problem(
        &members("{ lognormal: { median: 0, sigma: 1, max: 5 } }"),
        "load.conversations.members.lognormal.median",
        "median",
        "at least 1",
    );
    assert_problem(
        &members("{ fixed: 1, uniform: { min: 1, max: 2 } }"),
        "load.conversations.members",
        "members",
        "exactly one",
    );
}

#[test]
fn message_sizes_are_bounded() {
    let text = load_with(
        "10",
        "  message_size: { lognormal: { median: 200, sigma: 1, max: 2000000 } }\n",
    );
    assert_problem(
        &text,
        "load.message_size.lognormal.max",
        "max: 2000000",
        "1..=1048576",
    );
}

#[test]
fn the_mix_needs_a_positive_weight() {
    assert_problem(
        &load_with("10", "  mix: { chat: 0 }\n"),
        "load.mix",
        "mix",
        "all weights are zero",
    );
    assert_problem(
        &load_with("10", "  mix: { chat: 1, typing: -1 }\n"),
        "load.mix.typing",
        "typing",
        ">= 0",
    );
}

#[test]
fn durations_and_rates_of_the_load_are_bounded() {
    let duration = |duration: &str| {
        with_load(&format!(
            "load:\n  users: 10\n  conversations: {{ count: 1, members: {{ fixed: 2 }} }}\n  rate: 5\n  duration: {duration}\n"
        ))
    };
    assert_problem(&duration("0s"), "load.duration", "duration", "above 0s");
    assert_problem(&duration("25h"), "load.duration", "duration", "at most 24h");
    assert_problem(
        &load_with("10", "  warmup: 25h\n"),
        "load.warmup",
        "warmup",
        "24h",
    );
    assert_problem(
        &load_with("10", "  connect_rate: 0\n"),
        "load.connect_rate",
        "connect_rate",
        "greater than 0",
    );
    assert_problem(
        &load_with("10", "  ack_timeout: 0s\n"),
        "load.ack_timeout",
        "ack_timeout",
        "positive",
    );
    assert_problem(
        &load_with("10", "  max_in_flight: 0\n"),
        "load.max_in_flight",
        "max_in_flight",
        "at least 1",
    );
}

fn rate_of(rate: &str) -> String {
    with_load(&format!(
        "load:\n  users: 10\n  conversations: {{ count: 1, members: {{ fixed: 2 }} }}\n  warmup: 1m\n  duration: 4m\n  rate: {rate}\n"
    ))
}

#[test]
fn a_constant_rate_must_be_positive() {
    assert_problem(&rate_of("0"), "load.rate", "rate", "greater than 0");
    assert_problem(&rate_of("-3"), "load.rate", "rate", "greater than 0");
}

#[test]
fn phases_must_fit_in_warmup_plus_duration() {
    let fits = parse(&rate_of(
        "\n    - { hold: 1m, rate: 10 }\n    - { ramp: 4m, from: 10, to: 100 }\n",
    ));
    assert_eq!(fits.load.rate.phases_length(), Duration::from_secs(300));
    let overlong = rate_of("\n    - { hold: 1m, rate: 10 }\n    - { ramp: 3m, from: 10, to: 100 }\n    - { hold: 2m, rate: 100 }\n");
    assert_problem(
        &overlong,
        "load.rate[2].hold",
        "hold: 2m",
        "warmup + duration is 5m",
    );
}

#[test]
fn phases_need_lengths_and_a_positive_rate() {
    assert_problem(&rate_of("[]"), "load.rate", "rate", "at least one phase");
    assert_problem(
        &rate_of("\n    - { hold: 1m, rate: 0 }\n    - { ramp: 1m, from: 0, to: 0 }\n"),
        "load.rate",
        "rate",
        "every phase has a rate of 0",
    );
    assert_problem(
        &rate_of("\n    - { hold: 0s, rate: 4 }\n"),
        "load.rate[0].hold",
        "hold",
        "positive",
    );
    assert_problem(
        &rate_of("\n    - { ramp: 1m, from: -1, to: 4 }\n"),
        "load.rate[0].from",
        "from",
        ">= 0",
    );
    assert_problem(
        &rate_of("\n    - { hold: 1m, rate: 4, to: 5 }\n"),
        "load.rate[0]",
        "{ hold",
        "`hold` goes with `rate`",
    );
}

// ---- semantic rules: http ----

#[test]
fn http_traffic_is_positive_and_needs_its_worker() {
    assert_problem(
        &with("http:\n  - { endpoint: readyz, rate: 0 }\n"),
        "http[0].rate",
        "rate: 0",
        "greater than 0",
    );
    assert_problem(
        &with("http:\n  - { endpoint: history, rate: 1, timeout: 0s }\n"),
        "http[0].timeout",
        "timeout",
        "positive",
    );
    let disabled = with("topology:\n  workers: { enabled: false }\nhttp:\n  - { endpoint: chat, rate: 1 }\n  - { endpoint: audit_user, rate: 1 }\n");
    assert_problem(
        &disabled,
        "http[1].endpoint",
        "endpoint: audit_user",
        "audit worker",
    );
    let without_search = with("topology:\n  workers: { only: [audit] }\nhttp:\n  - { endpoint: search, rate: 1 }\n  - { endpoint: audit_counts, rate: 1 }\n");
    assert_problem(
        &without_search,
        "http[0].endpoint",
        "endpoint: search",
        "`search` in `topology.workers.only`",
    );
    assert_eq!(diagnostics(&without_search).len(), 1);
}

// ---- semantic rules: faults ----

fn faults(list: &str) -> String {
    with(&format!("topology:\n  nodes: 3\nfaults:\n{list}"))
}

#[test]
fn fault_targets_must_exist() {
    assert_problem(
        &faults("  - { at: 1m, duration: 5s, kind: kill_node, node: 4 }\n"),
        "faults[0].node",
        "node: 4",
        "1..=3",
    );
    assert_problem(
        &faults("  - { at: 1m, duration: 5s, kind: pause_node, node: 0 }\n"),
        "faults[0].node",
        "node: 0",
        "1..=3",
    );
    assert_problem(
        &faults("  - { at: 1m, duration: 5s, kind: kill_broker, broker: 4 }\n"),
        "faults[0].broker",
        "broker: 4",
        "1..=3",
    );
    let same = faults("  - { at: 1m, duration: 5s, kind: partition_one_way, from: 2, to: 2 }\n");
    assert_problem(&same, "faults[0].to", "to: 2", "two different brokers");
    let unknown = faults("  - { at: 1m, duration: 5s, kind: partition_one_way, from: 0, to: 2 }\n");
    assert_problem(&unknown, "faults[0].from", "from", "1..=3");
}

#[test]
fn worker_faults_need_workers() {
    let text = with("topology:\n  workers: { enabled: false }\nfaults:\n  - { at: 1m, duration: 5s, kind: term_workers }\n");
    assert_problem(&text, "faults[0].kind", "kind", "workers.enabled: true");
}

#[test]
fn every_fault_needs_a_positive_duration() {
    let text = faults("  - at: 1m\n    kind: redis_down\n");
    assert_problem(&text, "faults[0].duration", "at: 1m", "needs one");
    assert_problem(
        &faults("  - { at: 1m, duration: 0s, kind: cut_kafka }\n"),
        "faults[0].duration",
        "duration: 0s",
        "positive",
    );
}

#[test]
fn repeat_and_random_are_exclusive_and_must_not_overlap() {
    let both = faults("  - at: 1m\n    duration: 5s\n    repeat: { every: 1m, count: 2 }\n    random: { count: 2, within: 1m }\n    kind: cut_kafka\n");
    assert_problem(&both, "faults[0].random", "random", "not both");
    let overlapping = faults("  - at: 1m\n    duration: 30s\n    repeat: { every: 30s, count: 2 }\n    kind: cut_kafka\n");
    assert_problem(
        &overlapping,
        "faults[0].repeat.every",
        "every",
        "longer than `duration`",
    );
    let none = faults("  - at: 1m\n    duration: 30s\n    repeat: { every: 40s, count: 0 }\n    kind: cut_kafka\n");
    assert_problem(&none, "faults[0].repeat.count", "count: 0", "at least 1");
    let crowded = faults("  - at: 1m\n    duration: 30s\n    random: { count: 3, within: 90s }\n    kind: cut_kafka\n");
    assert_problem(
        &crowded,
        "faults[0].random.within",
        "within",
        "count × duration",
    );
    let empty = faults("  - at: 1m\n    duration: 30s\n    random: { count: 0, within: 90s }\n    kind: cut_kafka\n");
    assert_problem(&empty, "faults[0].random.count", "count: 0", "at least 1");
}

#[test]
fn fault_windows_must_end_within_the_load() {
    // The load lasts 5m after the warm-up.
    let late = faults("  - { at: 4m, duration: 2m, kind: isolate_controller }\n");
    assert_problem(
        &late,
        "faults[0].at",
        "at: 4m",
        "past the end of the load (5m)",
    );
    let repeated = faults(
        "  - at: 1m\n    duration: 10s\n    repeat: { every: 1m, count: 5 }\n    kind: cut_kafka\n",
    );
    assert_problem(&repeated, "faults[0].repeat", "repeat", "until 5m10s");
    let random = faults("  - at: 2m\n    duration: 10s\n    random: { count: 2, within: 4m }\n    kind: cut_kafka\n");
    assert_problem(&random, "faults[0].random", "random", "past the end");
    parse(&faults(
        "  - at: 1m\n    duration: 10s\n    repeat: { every: 1m, count: 4 }\n    kind: cut_kafka\n",
    ));
}

#[test]
fn toxics_need_a_link_and_sane_attributes() {
    let toxic = |attributes: &str| {
        faults(&format!(
            "  - at: 1m\n    duration: 10s\n    kind: toxic\n{attributes}"
        ))
    };
    assert_problem(
        &toxic("    link: ''\n    toxic: { type: timeout, timeout_ms: 0 }\n"),
        "faults[0].link",
        "link",
        "is empty",
    );
    assert_problem(
        &toxic("    link: redis\n    toxicity: 1.5\n    toxic: { type: timeout, timeout_ms: 0 }\n"),
        "faults[0].toxicity",
        "toxicity",
        "0..=1",
    );
    assert_problem(
        &toxic("    link: redis\n    toxic:\n      type: bandwidth\n      rate_kb: 0\n"),
        "faults[0].toxic.rate_kb",
        "rate_kb",
        "positive",
    );
    assert_problem(
        &toxic("    link: redis\n    toxic:\n      type: slicer\n      average_size: 0\n"),
        "faults[0].toxic.average_size",
        "average_size",
        "positive",
    );
}

// ---- semantic rules: checks ----

#[test]
fn worker_checkers_need_workers() {
    let disabled = with(
        "topology:\n  workers: { enabled: false }\nchecks:\n  - { checker: delivery }\n  - { checker: replay }\n  - { checker: lag, max: 10, within: 30s }\n  - lag(chatstream-audit) < 100\n",
    );
    assert_problem(
        &disabled,
        "checks[1].checker",
        "checker: replay",
        "workers.enabled: true",
    );
    assert_problem(
        &disabled,
        "checks[2].checker",
        "checker: lag",
        "workers.enabled: true",
    );
    assert_problem(&disabled, "checks[3]", "lag(", "workers.enabled: true");
    assert_eq!(diagnostics(&disabled).len(), 3);
}

#[test]
fn replayed_projections_need_their_workers() {
    let text = with("topology:\n  workers: { only: [audit, alerts] }\nchecks:\n  - checker: replay\n    projections: [audit, search]\n");
    assert_problem(
        &text,
        "checks[0].projections",
        "projections",
        "search projection",
    );
    let empty = with("checks:\n  - checker: replay\n    projections: []\n");
    assert_problem(
        &empty,
        "checks[0].projections",
        "projections",
        "at least one",
    );
}

#[test]
fn checker_options_are_bounded() {
    let duplicates = with("checks:\n  - checker: duplicates\n    max_fraction: 2\n    paths: []\n");
    assert_problem(
        &duplicates,
        "checks[0].max_fraction",
        "max_fraction",
        "0..=1",
    );
    assert_problem(&duplicates, "checks[0].paths", "paths", "at least one");
    let audit = with("topology:\n  workers: { only: [search] }\nchecks:\n  - checker: duplicates\n    paths: [live, audit]\n");
    assert_problem(&audit, "checks[0].paths", "paths", "audit worker");
    let lag = with("checks:\n  - { checker: lag, max: 0, within: 0s }\n");
    assert_problem(&lag, "checks[0].within", "within", "positive");
    let slo = with("checks:\n  - checker: slo\n    metric: ''\n    percentile: 0\n    max: 0s\n");
    assert_problem(&slo, "checks[0].metric", "metric", "is empty");
    assert_problem(&slo, "checks[0].percentile", "percentile", "(0, 100]");
    assert_problem(&slo, "checks[0].max", "max: 0s", "positive");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let text = "\
name: Not_A_Slug
topology:
  nodes: 2
load:
  users: 10
  tenants: 20
  conversations:
    count: 0
    members: { fixed: 2 }
  rate: 0
  duration: 1m
faults:
  - { at: 30s, duration: 1m, kind: kill_node, node: 3 }
checks:
  - { checker: slo, metric: delivery, percentile: 101, max: 1s }
";
    let found = diagnostics(text);
    let summary: Vec<(usize, &str)> = found
        .iter()
        .map(|diagnostic| (diagnostic.line, diagnostic.path.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "name"),
            (6, "load.tenants"),
            (8, "load.conversations.count"),
            // With 20 tenants for 10 users a tenant holds 1 user, so 2 members cannot fit.
            (9, "load.conversations.members.fixed"),
            (10, "load.rate"),
            (13, "faults[0].at"),
            (13, "faults[0].node"),
            (15, "checks[0].percentile"),
        ],
        "{}",
        render(&found)
    );
}

#[test]
fn slow_consumers_need_a_share_and_a_pause_shorter_than_the_period() {
    let ok = parse(&with_load(&format!(
        "{LOAD}  slow_consumers: {{ share: 0.25, pause: 8s, every: 15s }}\n"
    )));
    let slow = ok.load.slow_consumers.clone().expect("slow consumers");
    assert_eq!(slow.pause, Duration::from_secs(8));
    assert_eq!(slow.count(100), 25);
    assert!(ok.load.recovery, "the recovery phase is on by default");
    let text = with_load(&format!(
        "{LOAD}  slow_consumers: {{ share: 1.5, pause: 8s, every: 15s }}\n"
    ));
    assert_problem(
        &text,
        "load.slow_consumers.share",
        "share",
        "not a share of the users",
    );
    let text = with_load(&format!(
        "{LOAD}  slow_consumers: {{ share: 0.1, pause: 20s, every: 15s }}\n"
    ));
    assert_problem(
        &text,
        "load.slow_consumers.every",
        "every",
        "not longer than the pause",
    );
}

#[test]
fn streams_can_require_every_stream_to_complete() {
    let s = parse(&with(
        "checks:\n  - { checker: streams, require_complete: true }\n",
    ));
    assert_eq!(
        s.checks,
        vec![Check::Checker(Checker::Streams {
            require_complete: true
        })]
    );
}
