//! What loading a scenario can fail with: the file could not be read, or it is invalid,
//! with one located [`Diagnostic`] per problem. Also [`Problem`], a rule violation before
//! it is given a position in the text.

use std::fmt;
use std::path::PathBuf;

/// One problem in a scenario file, located at the offending key (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    /// The key path, e.g. `load.conversations.members.max` or `faults[2].node`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// The form that would be accepted.
    pub expected: String,
}

impl fmt::Display for Diagnostic {
    /// `<line>:<column>: <key path>: <problem>; expected <expected form>` (the file name is
    /// added by [`ScenarioError`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}; expected {}",
            self.line, self.column, self.path, self.message, self.expected
        )
    }
}

/// A rule that a parsed scenario breaks, named by key path but not yet located in the text
/// (so scenarios built in code can be validated too: see [`crate::Scenario::validate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    pub expected: String,
}

impl Problem {
    pub fn new(
        path: impl Into<String>,
        message: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
            expected: expected.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}; expected {}",
            self.path, self.message, self.expected
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every problem found, in the order they appear in the file.
    #[error("{}", render_diagnostics(file, diagnostics))]
    Invalid {
        file: String,
        diagnostics: Vec<Diagnostic>,
    },
}

fn render_diagnostics(file: &str, diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|diagnostic| format!("{file}:{diagnostic}"))
        .collect::<Vec<_>>()
        .join("\n")
}
