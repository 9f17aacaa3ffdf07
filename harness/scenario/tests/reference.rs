//! Keeps `scenarios/REFERENCE.md`, `scenarios/examples/every-key.yaml` and the model in step:
//! the example must be a valid scenario, every key it sets must be documented, and every
//! documented key must be set by it (or, for the distribution forms that cannot all stand
//! in one file, by a copy of it with another form swapped in). Enum values listed in the
//! reference must be accepted, and the gate examples must parse (or fail) as documented.

use serde_yaml::Value;
use squall_scenario::{parse_str, Gate};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Places where a distribution stands; its own keys are documented under this name.
const DISTRIBUTION_PLACES: [&str; 2] = ["load.conversations.members", "load.message_size"];
const DISTRIBUTION: &str = "<distribution>";
/// Mappings whose keys are free-form (passed through to the system under test).
const FREE_FORM: [&str; 2] = ["topology.node.sabotage", "topology.workers.sabotage"];
/// The distribution forms every-key.yaml cannot show (it has two places for four forms),
/// swapped into `load.message_size` of a copy.
const OTHER_DISTRIBUTIONS: [&str; 2] = ["{ fixed: 512 }", "{ uniform: { min: 16, max: 4096 } }"];

fn repository_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repository_file(relative))
        .unwrap_or_else(|error| panic!("{relative}: {error}"))
}

fn example_text() -> String {
    read("scenarios/examples/every-key.yaml")
}

fn example_tree() -> Value {
    serde_yaml::from_str(&example_text()).unwrap()
}

fn assert_valid(text: &str, what: &str) {
    if let Err(error) = parse_str(text, what) {
        panic!("{what} is not a valid scenario:\n{error}");
    }
}

// ---- the key paths of a YAML tree ----

fn normalise(path: &str) -> String {
    for place in DISTRIBUTION_PLACES {
        if let Some(rest) = path
            .strip_prefix(place)
            .and_then(|rest| rest.strip_prefix('.'))
        {
            return format!("{DISTRIBUTION}.{rest}");
        }
    }
    path.to_string()
}

fn collect_paths(value: &Value, prefix: &str, paths: &mut BTreeSet<String>) {
    if FREE_FORM.contains(&prefix) {
        return;
    }
    match value {
        Value::Mapping(mapping) => {
            for (key, child) in mapping {
                let key = key
                    .as_str()
                    .unwrap_or_else(|| panic!("non-string key under {prefix}"));
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                paths.insert(normalise(&path));
                collect_paths(child, &path, paths);
            }
        }
        Value::Sequence(items) => {
            for item in items {
                collect_paths(item, &format!("{prefix}[]"), paths);
            }
        }
        _ => {}
    }
}

/// Every key path set by every-key.yaml, and by its copies with the other distribution
/// forms swapped in (each of which must be valid too).
fn example_paths() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let tree = example_tree();
    collect_paths(&tree, "", &mut paths);
    for form in OTHER_DISTRIBUTIONS {
        let mut copy = tree.clone();
        let replacement: Value = serde_yaml::from_str(form).unwrap();
        assert!(substitute(
            &mut copy,
            &segments("load.message_size"),
            &replacement
        ));
        let text = serde_yaml::to_string(&copy).unwrap();
        assert_valid(
            &text,
            &format!("every-key.yaml with load.message_size: {form}"),
        );
        collect_paths(&copy, "", &mut paths);
    }
    paths
}

// ---- the reference's key tables ----

struct DocumentedKey {
    path: String,
    kind: String,
    values: Vec<String>,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn cells(row: &str) -> Vec<&str> {
    row.trim()
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}

/// The rows of the tables whose first header cell is `Key`.
fn documented_keys() -> Vec<DocumentedKey> {
    let mut keys = Vec::new();
    let mut in_key_table = false;
    for line in read("scenarios/REFERENCE.md").lines() {
        if !line.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let row = cells(line);
        if row.first() == Some(&"Key") {
            in_key_table = true;
            continue;
        }
        if !in_key_table || row.first().is_some_and(|cell| cell.starts_with("---")) {
            continue;
        }
        let path = backticked(row[0])
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no `key` in row: {line}"));
        keys.push(DocumentedKey {
            path,
            kind: row.get(1).copied().unwrap_or_default().to_string(),
            values: backticked(row.get(3).copied().unwrap_or_default()),
        });
    }
    keys
}

/// The first backticked cell of every row of the tables whose first header cell is `title`.
fn table_column(title: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut in_table = false;
    for line in read("scenarios/REFERENCE.md").lines() {
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let row = cells(line);
        if row.first() == Some(&title) {
            in_table = true;
        } else if in_table && !row[0].starts_with("---") {
            entries.extend(backticked(row[0]).into_iter().take(1));
        }
    }
    entries
}

// ---- navigating and editing a tree by documented path ----

enum Step {
    Key(String),
    EachItem,
}

fn segments(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let key = part.trim_end_matches("[]");
        steps.push(Step::Key(key.to_string()));
        if part.ends_with("[]") {
            steps.push(Step::EachItem);
        }
    }
    steps
}

/// Every scalar found at `steps` (the items of a list found there included).
fn values_at(value: &Value, steps: &[Step], found: &mut Vec<String>) {
    match (steps.first(), value) {
        (None, Value::Sequence(items)) => {
            items.iter().for_each(|item| values_at(item, steps, found))
        }
        (None, scalar) => found.extend(scalar.as_str().map(str::to_string)),
        (Some(Step::Key(key)), Value::Mapping(mapping)) => {
            if let Some(child) = mapping.get(key.as_str()) {
                values_at(child, &steps[1..], found);
            }
        }
        (Some(Step::EachItem), Value::Sequence(items)) => items
            .iter()
            .for_each(|item| values_at(item, &steps[1..], found)),
        _ => {}
    }
}

/// Replaces the first value found at `steps` (a list there is replaced by a list of one).
fn substitute(value: &mut Value, steps: &[Step], replacement: &Value) -> bool {
    match (steps.first(), value) {
        (None, target) => {
            *target = match target {
                Value::Sequence(_) => Value::Sequence(vec![replacement.clone()]),
                _ => replacement.clone(),
            };
            true
        }
        (Some(Step::Key(key)), Value::Mapping(mapping)) => match mapping.get_mut(key.as_str()) {
            Some(child) => substitute(child, &steps[1..], replacement),
            None => false,
        },
        (Some(Step::EachItem), Value::Sequence(items)) => items
            .iter_mut()
            .any(|item| substitute(item, &steps[1..], replacement)),
        _ => false,
    }
}

// ---- the tests ----

#[test]
fn every_key_example_parses_and_validates() {
    let path = repository_file("scenarios/examples/every-key.yaml");
    if let Err(error) = squall_scenario::load_file(&path) {
        panic!("{error}");
    }
}

#[test]
fn every_key_of_the_example_is_documented() {
    let documented: BTreeSet<String> = documented_keys().into_iter().map(|key| key.path).collect();
    let undocumented: Vec<String> = example_paths().difference(&documented).cloned().collect();
    assert!(
        undocumented.is_empty(),
        "keys set in every-key.yaml but missing from REFERENCE.md: {undocumented:?}"
    );
}

#[test]
fn every_documented_key_is_set_by_the_example() {
    let keys = documented_keys();
    let mut seen = BTreeSet::new();
    let repeated: Vec<&str> = keys
        .iter()
        .filter(|key| !seen.insert(&key.path))
        .map(|key| key.path.as_str())
        .collect();
    assert!(repeated.is_empty(), "documented twice: {repeated:?}");
    let set = example_paths();
    let unset: Vec<&str> = keys
        .iter()
        .map(|key| key.path.as_str())
        .filter(|path| !set.contains(*path))
        .collect();
    assert!(
        unset.is_empty(),
        "keys documented in REFERENCE.md but not set in every-key.yaml (stale docs, or a gap in the example): {unset:?}"
    );
}

/// Drops the faults that act on a link (every kind but kill_*, term_* and pause_*).
fn keep_process_faults(tree: &mut Value) {
    if let Some(Value::Sequence(faults)) = tree.get_mut("faults") {
        faults.retain(|fault| {
            fault
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(|kind| {
                    ["kill_", "term_", "pause_"]
                        .iter()
                        .any(|p| kind.starts_with(p))
                })
        });
    }
}

#[test]
fn every_documented_enum_value_is_accepted_and_no_other() {
    let tree = example_tree();
    let mut checked = 0;
    for key in documented_keys()
        .into_iter()
        .filter(|key| key.kind.starts_with("enum") || key.kind.starts_with("list of enum"))
    {
        assert!(
            !key.values.is_empty(),
            "`{}` is an enum without listed values",
            key.path
        );
        let steps = segments(&key.path);
        let mut present = Vec::new();
        values_at(&tree, &steps, &mut present);
        for value in &key.values {
            checked += 1;
            if present.contains(value) {
                continue;
            }
            let mut copy = tree.clone();
            assert!(
                substitute(&mut copy, &steps, &Value::String(value.clone())),
                "{} not found",
                key.path
            );
            if key.path == "topology.stack.links" && value == "direct" {
                // Direct links have no proxies: only the process faults stay.
                keep_process_faults(&mut copy);
            }
            assert_valid(
                &serde_yaml::to_string(&copy).unwrap(),
                &format!("every-key.yaml with {}: {value}", key.path),
            );
        }
        let mut copy = tree.clone();
        substitute(&mut copy, &steps, &Value::String("no_such_value".into()));
        assert!(
            parse_str(&serde_yaml::to_string(&copy).unwrap(), "copy").is_err(),
            "`{}` accepts values the reference does not list",
            key.path
        );
    }
    assert!(
        checked > 50,
        "only {checked} enum values found: is the Type column still `enum`?"
    );
}

#[test]
fn the_documented_gates_parse_as_documented() {
    let accepted = table_column("Gate");
    assert!(accepted.len() >= 9, "{accepted:?}");
    for gate in &accepted {
        if let Err(error) = Gate::parse(gate) {
            panic!("documented gate `{gate}` is rejected: {error}");
        }
    }
    let rejected = table_column("Rejected gate");
    assert!(rejected.len() >= 5, "{rejected:?}");
    for gate in &rejected {
        assert!(
            Gate::parse(gate).is_err(),
            "`{gate}` is documented as rejected but parses"
        );
    }
}
