//! Every scenario shipped under `scenarios/` parses and validates, so a change to the model
//! cannot silently break a scenario that CI or a user runs.

use std::path::{Path, PathBuf};

fn yaml_files(directory: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if matches!(
            path.extension().and_then(|extension| extension.to_str()),
            Some("yaml" | "yml")
        ) {
            found.push(path);
        }
    }
}

#[test]
fn every_shipped_scenario_is_valid() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no scenarios under {}", root.display());
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| {
            squall_scenario::load_file(file)
                .err()
                .map(|error| error.to_string())
        })
        .collect();
    assert!(
        failures.is_empty(),
        "invalid shipped scenarios:\n{}",
        failures.join("\n")
    );
}
