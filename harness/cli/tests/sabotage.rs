//! Self-validation: a checker that cannot fail is worthless. Each scenario under
//! `scenarios/sabotage/` turns on one chatstream switch that really breaks a property and
//! names the one checker that must catch it. Each test runs the scenario on a shared real
//! stack and requires exit 1 with exactly that checker `invalid` (every other verdict
//! `valid`) and evidence naming concrete ids of this run (client_msg_ids or message ids
//! from the history, or the projection whose digest differs); then it runs the same
//! scenario with the sabotage removed (`topology.node.sabotage` and
//! `topology.workers.sabotage` dropped, `publish_mode: async` back to `outbox`) and
//! requires exit 0 with every verdict valid.
//!
//! The node switches (`drop_every_nth_live`, `reorder_live`, `ack_before_store_every_nth`,
//! `drop_event_every_nth`)
//! are keys of the node's `sabotage:` config map; the worker switches are hidden flags of
//! `chatstream workers`. Base port: `SQUALL_SABOTAGE_TEST_BASE_PORT` (default 30400).

use anyhow::{bail, ensure, Context, Result};
use squall_history::{Kind, Value};
use squall_stack::testing::SharedStack;
use squall_stack::{stack_test, Stack};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn squall() -> &'static str {
    env!("CARGO_BIN_EXE_squall")
}

/// One sabotage: its scenario, the checker that must fail, a count of that checker that
/// must be above zero, and words the failing examples must carry.
struct Case {
    name: &'static str,
    file: &'static str,
    checker: &'static str,
    count: &'static str,
    example_says: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "async_kill",
        file: "scenarios/sabotage/async-kill.yaml",
        checker: "no_loss_downstream",
        count: "missing_in_kafka",
        example_says: "not on the chat events topic",
    },
    Case {
        name: "drop_live",
        file: "scenarios/sabotage/drop-live.yaml",
        checker: "delivery",
        count: "lost",
        example_says: "never delivered",
    },
    Case {
        name: "reorder_live",
        file: "scenarios/sabotage/reorder-live.yaml",
        checker: "order",
        count: "inversions",
        example_says: "live at",
    },
    Case {
        name: "commit_before_handle",
        file: "scenarios/sabotage/commit-before-handle.yaml",
        checker: "no_loss_downstream",
        count: "missing_in_audit",
        example_says: "not in the audit table",
    },
    Case {
        name: "search_no_idempotency",
        file: "scenarios/sabotage/search-no-idempotency.yaml",
        checker: "replay",
        count: "differ",
        example_says: "digest differs",
    },
    Case {
        name: "stalled_commits",
        file: "scenarios/sabotage/stalled-commits.yaml",
        checker: "lag",
        count: "not_recovered",
        example_says: "was not at most 300",
    },
    Case {
        name: "ack_before_store",
        file: "scenarios/sabotage/ack-before-store.yaml",
        checker: "no_loss_downstream",
        count: "missing_in_kafka",
        example_says: "not on the chat events topic",
    },
    Case {
        name: "drop_events",
        file: "scenarios/sabotage/drop-events.yaml",
        checker: "events_dropped == 0",
        count: "value",
        example_says: "",
    },
];

fn case(name: &str) -> Result<&'static Case> {
    CASES
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no sabotage case {name}"))
}

fn work_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("sabotage-tests")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// The one run directory squall created under `reports`.
fn only_run_dir(reports: &Path) -> Result<PathBuf> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(reports)
        .with_context(|| format!("reading {}", reports.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    ensure!(
        dirs.len() == 1,
        "expected one run directory in {}, found {dirs:?}",
        reports.display()
    );
    Ok(dirs[0].clone())
}

/// The scenario with its sabotage removed: `topology.node.sabotage` and
/// `topology.workers.sabotage` dropped, `publish_mode: async` back to `outbox`, and the
/// name suffixed `-off`.
fn without_sabotage(text: &str) -> Result<String> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(text)?;
    let map = doc.as_mapping_mut().context("a scenario is a mapping")?;
    if let Some(serde_yaml::Value::String(name)) = map.get_mut("name") {
        name.push_str("-off");
    }
    if let Some(topology) = map.get_mut("topology").and_then(|t| t.as_mapping_mut()) {
        if let Some(node) = topology.get_mut("node").and_then(|n| n.as_mapping_mut()) {
            node.remove("sabotage");
            if node.get("publish_mode").and_then(|m| m.as_str()) == Some("async") {
                node.insert("publish_mode".into(), "outbox".into());
            }
        }
        if let Some(workers) = topology.get_mut("workers").and_then(|w| w.as_mapping_mut()) {
            workers.remove("sabotage");
        }
    }
    Ok(serde_yaml::to_string(&doc)?)
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    dir: PathBuf,
    verdicts: Vec<serde_json::Value>,
}

impl Ran {
    fn context(&self) -> String {
        let tail: Vec<&str> = self.stderr.lines().rev().take(15).collect();
        format!(
            "exit {:?}; run directory {}\n{}\n{}",
            self.code,
            self.dir.display(),
            self.stdout,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    fn verdict_lines(&self) -> String {
        self.verdicts
            .iter()
            .map(|v| {
                format!(
                    "    {} {}: {}",
                    v["valid"].as_str().unwrap_or("?"),
                    v["checker"].as_str().unwrap_or("?"),
                    v["summary"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn run(stack: &Stack, scenario: &Path, reports: &Path) -> Result<Ran> {
    let out = Command::new(squall())
        .args(["run", "--quiet", "--stack-dir"])
        .arg(&stack.state().run_dir)
        .arg("--reports-dir")
        .arg(reports)
        .arg(scenario)
        .output()
        .context("running squall")?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let dir = only_run_dir(reports).with_context(|| {
        format!(
            "exit {:?}\n{stdout}\n{}",
            out.status.code(),
            stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n")
        )
    })?;
    let verdicts: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("verdicts.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    Ok(Ran {
        code: out.status.code(),
        stdout,
        stderr,
        dir,
        verdicts,
    })
}

/// Client msg ids and message ids this run's history names.
fn history_ids(dir: &Path) -> Result<HashSet<String>> {
    let (_, ops) = squall_history::read(&dir.join(squall_history::FILE_NAME))?;
    let mut ids = HashSet::new();
    for op in ops {
        let op = op?;
        if let Value::Send { m, mid, .. } = op.v {
            if op.k == Kind::Ok {
                if let Some(mid) = mid {
                    ids.insert(mid);
                }
            }
            ids.insert(m);
        }
    }
    Ok(ids)
}

/// The failing verdict's evidence names what was lost or broken: examples of the
/// expected kind whose ids are this run's client_msg_ids or message ids (for `replay`,
/// the projection with both digests).
fn check_evidence(c: &Case, ran: &Ran, failing: &serde_json::Value) -> Result<()> {
    let count = failing["counts"][c.count].as_u64().unwrap_or(0);
    ensure!(
        count > 0,
        "{}: count {} is {count}, expected > 0: {failing}",
        c.checker,
        c.count
    );
    if c.checker.starts_with("events_dropped") {
        // A gate on the nodes' counter: it has no examples. The evidence is in the scraped
        // samples: the drops it summed carry the sabotage's reason, and no other.
        let reasons = dropped_reasons(&ran.dir)?;
        ensure!(
            reasons == [("sabotage".to_string(), count as f64)],
            "events_dropped: the gate summed {count}, but the nodes' samples by reason are {reasons:?} (expected all {count} for reason=\"sabotage\")"
        );
        eprintln!(
            "  evidence: events_dropped = {count}; the nodes' counters by reason: {reasons:?}"
        );
        return Ok(());
    }
    let examples = failing["examples"].as_array().cloned().unwrap_or_default();
    let relevant: Vec<&serde_json::Value> = examples
        .iter()
        .filter(|e| {
            e["what"]
                .as_str()
                .is_some_and(|w| w.contains(c.example_says))
        })
        .collect();
    ensure!(
        !relevant.is_empty(),
        "{}: no example saying {:?}: {failing}",
        c.checker,
        c.example_says
    );
    if c.checker == "replay" {
        ensure!(
            relevant.iter().any(|e| {
                e["id"] == "search"
                    && e["timeline"].as_array().is_some_and(|t| {
                        t.iter()
                            .any(|l| l.as_str().is_some_and(|l| l.starts_with("live ")))
                            && t.iter()
                                .any(|l| l.as_str().is_some_and(|l| l.starts_with("rebuilt ")))
                    })
            }),
            "replay: no example names the search projection with both digests: {failing}"
        );
        return Ok(());
    }
    if c.checker == "lag" {
        // A lag is a consumer group's, not a message's: the example names the group and
        // carries its samples.
        ensure!(
            relevant.iter().any(|e| e["id"] == "chatstream-audit"
                && e["timeline"].as_array().is_some_and(|t| !t.is_empty())),
            "lag: no example names chatstream-audit with its samples: {failing}"
        );
        eprintln!(
            "  evidence: lag {} = {count}; chatstream-audit named",
            c.count
        );
        return Ok(());
    }
    let ids = history_ids(&ran.dir)?;
    let named: Vec<&str> = relevant
        .iter()
        .filter_map(|e| e["id"].as_str())
        .filter(|id| ids.contains(*id))
        .collect();
    ensure!(
        !named.is_empty(),
        "{}: no example names a client_msg_id or message id of this run: {:?}",
        c.checker,
        relevant.iter().map(|e| e["id"].clone()).collect::<Vec<_>>()
    );
    ensure!(
        relevant
            .iter()
            .all(|e| e["timeline"].as_array().is_some_and(|t| !t.is_empty())),
        "{}: an example without its timeline: {failing}",
        c.checker
    );
    eprintln!(
        "  evidence: {} {} = {count}; examples name {}",
        c.checker,
        c.count,
        named.iter().take(5).copied().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Per `reason`, the sum over the nodes of the last (largest) value each node's
/// `chatstream_events_dropped_total` reached in the run's scraped samples (`signals.jsonl`;
/// no node of these scenarios restarts).
fn dropped_reasons(dir: &Path) -> Result<Vec<(String, f64)>> {
    let path = dir.join("signals.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut most: std::collections::BTreeMap<(String, String), f64> = Default::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let point: serde_json::Value = serde_json::from_str(line)?;
        let Some(processes) = point["metrics"].as_object() else {
            continue;
        };
        for (process, metrics) in processes {
            let Some(metrics) = metrics.as_object() else {
                continue;
            };
            for (key, value) in metrics {
                let Some(labels) = key.strip_prefix("chatstream_events_dropped_total{") else {
                    continue;
                };
                let reason = labels
                    .split("reason=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string();
                let v = value.as_f64().unwrap_or(0.0);
                let m = most.entry((reason, process.clone())).or_insert(0.0);
                *m = m.max(v);
            }
        }
    }
    let mut by_reason: std::collections::BTreeMap<String, f64> = Default::default();
    for ((reason, _), v) in most {
        *by_reason.entry(reason).or_insert(0.0) += v;
    }
    Ok(by_reason.into_iter().collect())
}

async fn sabotage_case(stack: &mut Stack, name: &str) -> Result<()> {
    let c = case(name)?;
    let bin = Path::new(squall()).with_file_name("chatstream");
    ensure!(
        bin.is_file(),
        "{} missing: build it first (cargo build -p chatstream)",
        bin.display()
    );
    let work = work_dir(c.name);
    std::fs::create_dir_all(&work)?;
    let file = repository_file(c.file);
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;

    // 1. Sabotaged: exactly the named checker fails, with evidence.
    let ran = run(stack, &file, &work.join("sabotaged"))?;
    eprintln!(
        "  {} (sabotaged): exit {:?}\n{}",
        c.file,
        ran.code,
        ran.verdict_lines()
    );
    ensure!(
        ran.code == Some(1),
        "a sabotaged run must exit 1: {}",
        ran.context()
    );
    ensure!(
        ran.verdicts.len() >= 2,
        "expected the named checker and at least one other: {}",
        ran.verdict_lines()
    );
    let mut failing = None;
    for v in &ran.verdicts {
        let checker = v["checker"].as_str().unwrap_or_default();
        let valid = v["valid"].as_str().unwrap_or_default();
        if checker == c.checker {
            ensure!(
                valid == "invalid",
                "{checker} must be invalid under this sabotage, got {valid}: {}\n{}",
                v["summary"],
                ran.context()
            );
            ensure!(failing.is_none(), "{checker} judged twice");
            failing = Some(v);
        } else {
            ensure!(
                valid == "valid",
                "{checker} must stay valid under this sabotage (only {} may fail), got {valid}: {}\n{}",
                c.checker,
                v["summary"],
                ran.context()
            );
        }
    }
    let Some(failing) = failing else {
        bail!("no {} verdict: {}", c.checker, ran.verdict_lines());
    };
    eprintln!("  failing: {}: {}", c.checker, failing["summary"]);
    check_evidence(c, &ran, failing)?;

    // 2. The same scenario without the sabotage: every check passes.
    let off = work.join(format!("{}-off.yaml", c.name));
    std::fs::write(&off, without_sabotage(&text)?)?;
    let ran = run(stack, &off, &work.join("off"))?;
    eprintln!(
        "  {} (sabotage off): exit {:?}\n{}",
        c.file,
        ran.code,
        ran.verdict_lines()
    );
    ensure!(
        ran.code == Some(0),
        "without the sabotage the run must pass: {}",
        ran.context()
    );
    ensure!(
        !ran.verdicts.is_empty() && ran.verdicts.iter().all(|v| v["valid"] == "valid"),
        "without the sabotage every verdict must be valid:\n{}",
        ran.verdict_lines()
    );
    Ok(())
}

macro_rules! sabotage {
    ($name:ident) => {
        async fn $name(stack: &mut Stack) -> Result<()> {
            sabotage_case(stack, stringify!($name)).await
        }
    };
}

sabotage!(async_kill);
sabotage!(drop_live);
sabotage!(reorder_live);
sabotage!(commit_before_handle);
sabotage!(search_no_idempotency);
sabotage!(ack_before_store);
sabotage!(stalled_commits);
sabotage!(drop_events);

fn main() {
    let shared = SharedStack::new(
        "SQUALL_SABOTAGE_TEST_BASE_PORT",
        30400,
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sabotage-stack"),
    );
    let trials = vec![
        stack_test!(shared, "sabotage::async_kill", async_kill),
        stack_test!(shared, "sabotage::drop_live", drop_live),
        stack_test!(shared, "sabotage::reorder_live", reorder_live),
        stack_test!(
            shared,
            "sabotage::commit_before_handle",
            commit_before_handle
        ),
        stack_test!(
            shared,
            "sabotage::search_no_idempotency",
            search_no_idempotency
        ),
        stack_test!(shared, "sabotage::ack_before_store", ack_before_store),
        stack_test!(shared, "sabotage::stalled_commits", stalled_commits),
        stack_test!(shared, "sabotage::drop_events", drop_events),
    ];
    shared.run(trials);
}
