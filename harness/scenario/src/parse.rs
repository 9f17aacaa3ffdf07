//! The serde stage of loading a scenario: YAML text to [`Scenario`], with every
//! deserialisation error (unknown key, wrong type, malformed duration or gate) turned into a
//! located [`Diagnostic`].
//!
//! serde stops at the first error. To still report more than one, the document is then
//! read as a plain YAML tree and each top-level section, and each item of the lists, is
//! deserialised on its own: every part that fails adds its own (first) error.

use serde::de::DeserializeOwned;
use serde_yaml::Value;
use std::fmt::Write as _;

use crate::check::Check;
use crate::error::Diagnostic;
use crate::fault::Fault;
use crate::http::HttpTraffic;
use crate::load::Load;
use crate::locate::{Outline, Position};
use crate::scenario::{Scenario, TOP_LEVEL_KEYS};
use crate::topology::Topology;

/// Shown as the path of problems that concern the document as a whole.
pub const DOCUMENT_PATH: &str = "(document)";

const FALLBACK_EXPECTED: &str = "the form described in scenarios/REFERENCE.md";

pub(crate) fn deserialize(text: &str, outline: &Outline) -> Result<Scenario, Vec<Diagnostic>> {
    let first_error = match serde_path_to_error::deserialize::<_, Scenario>(
        serde_yaml::Deserializer::from_str(text),
    ) {
        Ok(scenario) => return Ok(scenario),
        Err(error) => error,
    };
    let serde_position = first_error.inner().location().map(|location| Position {
        line: location.line(),
        column: location.column(),
    });
    let mut first = diagnose(
        render_path(first_error.path()),
        &first_error.inner().to_string(),
        serde_position,
        outline,
    );
    let Ok(document) = serde_yaml::from_str::<Value>(text) else {
        // Malformed YAML: the outline may be wrong past the error, serde_yaml knows where
        // the parser stopped. Nothing after that point can be checked.
        if let Some(position) = serde_position {
            (first.line, first.column) = (position.line, position.column);
        }
        return Err(vec![first]);
    };
    let mut diagnostics = vec![first];
    for diagnostic in diagnose_parts(&document, outline) {
        if diagnostics
            .iter()
            .all(|known| known.path != diagnostic.path)
        {
            diagnostics.push(diagnostic);
        }
    }
    Err(diagnostics)
}

/// Deserialises each section and list item on its own, so that one error does not hide
/// the errors of the other parts.
fn diagnose_parts(document: &Value, outline: &Outline) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let Value::Mapping(sections) = document else {
        return diagnostics;
    };
    for (key, value) in sections {
        let Some(key) = key.as_str() else {
            continue;
        };
        match key {
            "name" | "description" => {
                diagnose_part::<String>(key, value, outline, &mut diagnostics)
            }
            "seed" => diagnose_part::<u64>(key, value, outline, &mut diagnostics),
            "topology" => diagnose_part::<Topology>(key, value, outline, &mut diagnostics),
            "load" => diagnose_part::<Load>(key, value, outline, &mut diagnostics),
            "http" => diagnose_items::<HttpTraffic>(key, value, outline, &mut diagnostics),
            "faults" => diagnose_items::<Fault>(key, value, outline, &mut diagnostics),
            "checks" => diagnose_items::<Check>(key, value, outline, &mut diagnostics),
            unknown => {
                let listed: Vec<String> = TOP_LEVEL_KEYS
                    .iter()
                    .map(|key| format!("`{key}`"))
                    .collect();
                diagnostics.push(diagnose(
                    unknown.to_string(),
                    &format!(
                        "unknown field `{unknown}`, expected one of {}",
                        listed.join(", ")
                    ),
                    None,
                    outline,
                ));
            }
        }
    }
    for required in ["name", "load"] {
        if !sections.contains_key(required) {
            diagnostics.push(diagnose(
                String::new(),
                &format!("missing field `{required}`"),
                None,
                outline,
            ));
        }
    }
    diagnostics
}

fn diagnose_part<T: DeserializeOwned>(
    path: &str,
    value: &Value,
    outline: &Outline,
    diagnostics: &mut Vec<Diagnostic>,
) {
    if let Err(error) = serde_path_to_error::deserialize::<_, T>(value.clone()) {
        let inner_path = render_path(error.path());
        diagnostics.push(diagnose(
            join_path(path, &inner_path),
            &error.inner().to_string(),
            None,
            outline,
        ));
    }
}

fn diagnose_items<T: DeserializeOwned>(
    path: &str,
    value: &Value,
    outline: &Outline,
    diagnostics: &mut Vec<Diagnostic>,
) {
    match value {
        Value::Sequence(items) => {
            for (index, item) in items.iter().enumerate() {
                diagnose_part::<T>(&format!("{path}[{index}]"), item, outline, diagnostics);
            }
        }
        other => diagnose_part::<Vec<T>>(path, other, outline, diagnostics),
    }
}

/// `load` + `conversations.count` → `load.conversations.count`; `faults` + `[2].node` →
/// `faults[2].node`.
fn join_path(prefix: &str, suffix: &str) -> String {
    if prefix.is_empty() || suffix.is_empty() || suffix.starts_with('[') {
        format!("{prefix}{suffix}")
    } else {
        format!("{prefix}.{suffix}")
    }
}

/// The key-path scheme of diagnostics: keys joined by `.`, list indices in brackets. The
/// variant of an externally tagged enum (`uniform` in `members: { uniform: ... }`) is a
/// key in YAML, so it is one in the path too.
fn render_path(path: &serde_path_to_error::Path) -> String {
    let mut rendered = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                let _ = write!(rendered, "[{index}]");
            }
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => {
                rendered = join_path(&rendered, key);
            }
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    rendered
}

/// Builds a diagnostic from a serde message. The position is that of the offending key as
/// the outline finds it (or of its deepest ancestor present, for a missing key): serde_yaml
/// points at the value, or at the start or end of the enclosing mapping. `serde_position`,
/// when serde_yaml gave one, is used for what the outline cannot place: problems of the
/// document as a whole, such as malformed YAML.
fn diagnose(
    path: String,
    raw_message: &str,
    serde_position: Option<Position>,
    outline: &Outline,
) -> Diagnostic {
    let message = strip_path_prefix(&strip_marks(raw_message)).to_string();
    let (problem, expected) = match message
        .split_once("; expected ")
        .or_else(|| message.split_once(", expected "))
    {
        Some((problem, expected)) => (problem.to_string(), humanise_expected(expected)),
        None if message.ends_with(", there are no fields") => (
            message
                .trim_end_matches(", there are no fields")
                .to_string(),
            "no further keys: this form takes none".to_string(),
        ),
        None => {
            let expected = match backticked_after(&message, "missing field `") {
                Some(field) => format!("the key `{field}`, which has no default"),
                None if path.is_empty() => {
                    "a well-formed YAML mapping of the scenario keys".to_string()
                }
                None => FALLBACK_EXPECTED.to_string(),
            };
            (message.clone(), expected)
        }
    };
    let mut path = path;
    // serde_path_to_error already ends the path with an unknown key; a missing key, or a
    // key rejected by a conversion (a fault's kind), is added here.
    if let Some(field) = backticked_after(&problem, "unknown field `")
        .or_else(|| backticked_after(&problem, "missing field `"))
    {
        if !path.ends_with(field) {
            path = join_path(&path, field);
        }
    }
    let outline_position = if path.is_empty() {
        None
    } else {
        outline.locate_within(&path)
    };
    let position = match (outline_position, serde_position) {
        (Some(position), _) => position,
        // A problem of the whole document (malformed YAML): only serde_yaml knows where.
        (None, Some(position)) => position,
        (None, None) => outline.locate(&path),
    };
    Diagnostic {
        line: position.line,
        column: position.column,
        path: if path.is_empty() {
            DOCUMENT_PATH.to_string()
        } else {
            path
        },
        message: problem,
        expected,
    }
}

/// serde names Rust types (`u32`, `struct Load`); a scenario's author thinks in YAML.
fn humanise_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => format!("a whole number >= 0 ({expected})"),
        "i32" | "i64" => format!("a whole number ({expected})"),
        "f32" | "f64" => "a number".to_string(),
        "a string" | "a boolean" | "a sequence" => expected.to_string(),
        _ => match expected.strip_prefix("struct ") {
            Some(name) => format!("a mapping of the {name} keys"),
            None => expected.to_string(),
        },
    }
}

/// The text between `marker` (which ends in a backtick) and the next backtick.
fn backticked_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let start = text.find(marker)? + marker.len();
    let length = text[start..].find('`')?;
    Some(&text[start..start + length])
}

/// Removes serde_yaml's ` at line N column M` suffixes: positions are reported separately.
fn strip_marks(message: &str) -> String {
    let mut result = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(found) = rest.find(" at line ") {
        result.push_str(&rest[..found]);
        let after = &rest[found + " at line ".len()..];
        let digits = |text: &str| {
            text.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len())
        };
        let line_digits = digits(after);
        let column_part = after[line_digits..].strip_prefix(" column ");
        match column_part {
            Some(column_text) if line_digits > 0 && digits(column_text) > 0 => {
                rest = &column_text[digits(column_text)..];
            }
            _ => {
                result.push_str(" at line ");
                rest = after;
            }
        }
    }
    result.push_str(rest);
    result
}

/// Removes the `load.users: ` prefix serde_yaml puts before its messages: the path is
/// reported separately. A prefix is recognised as text without spaces or backticks.
fn strip_path_prefix(message: &str) -> &str {
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.is_empty() && !prefix.contains([' ', '`', '"']) => rest,
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_serde_yaml_decorations() {
        assert_eq!(
            strip_marks("did not find expected key at line 3 column 5, while parsing a block mapping at line 1 column 1"),
            "did not find expected key, while parsing a block mapping"
        );
        assert_eq!(strip_marks("a value at line x"), "a value at line x");
        assert_eq!(
            strip_path_prefix("load.users: invalid type: string"),
            "invalid type: string"
        );
        assert_eq!(
            strip_path_prefix("invalid type: string"),
            "invalid type: string"
        );
        assert_eq!(
            strip_path_prefix("unknown field `x`: y"),
            "unknown field `x`: y"
        );
    }
}
