//! squall-report: renders a finished run directory (`reports/<scenario>-<timestamp>/`) into
//! its report files, from the saved files alone, so `squall report <run-dir>` can redo them
//! offline at any time:
//!
//! - `report.json`: the [`Report`] model, versioned ([`SCHEMA_VERSION`]), the CI contract;
//!   every field is documented in `reports/README.md`;
//! - `summary.md`: a pull-request-comment-sized summary;
//! - `report.html`: one self-contained page (inline CSS and SVG charts, no network);
//! - `junit.xml`: one test case per verdict, for CI test reporters.
//!
//! Modules: [`inputs`] reads the run directory, [`build`] turns it into the model, and
//! `markdown`, `html` (with `svg` charts) and `junit` render the model.

pub mod build;
mod env;
mod html;
pub mod inputs;
mod junit;
mod markdown;
pub mod model;
mod svg;
mod text;

use std::path::{Path, PathBuf};

pub use model::*;

pub const REPORT_JSON: &str = "report.json";
pub const SUMMARY_MD: &str = "summary.md";
pub const REPORT_HTML: &str = "report.html";
pub const JUNIT_XML: &str = "junit.xml";
/// The `data-chart` names of report.html's charts, in page order.
pub const CHART_NAMES: [&str; 10] = html::CHARTS;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: report schema version {found}; this squall reads up to {SCHEMA_VERSION}", path.display())]
    Schema { path: PathBuf, found: u64 },
    #[error(transparent)]
    Scenario(#[from] squall_scenario::ScenarioError),
    #[error(transparent)]
    History(#[from] squall_history::HistoryError),
}

/// What [`render_run_dir`] produced: the model and the files it wrote.
#[derive(Debug, Clone)]
pub struct RenderedReport {
    pub report: Report,
    pub files: Vec<PathBuf>,
}

/// Reads `run_dir` and builds its [`Report`] without writing anything. The environment is
/// the one of a `report.json` already in the directory (rendered when the run finished)
/// when there is one, else this machine's.
pub fn build_report(run_dir: &Path) -> Result<Report, ReportError> {
    load_and_build(run_dir).map(|(_, report)| report)
}

fn load_and_build(run_dir: &Path) -> Result<(inputs::RunDir, Report), ReportError> {
    let dir = inputs::RunDir::load(run_dir)?;
    let environment = match dir.previous_environment.clone() {
        Some(mut e) => {
            e.source = "preserved".into();
            e
        }
        None => env::detect(),
    };
    let report = build::build(&dir, environment);
    Ok((dir, report))
}

/// Renders every report file of `run_dir` into it: `report.json`, `summary.md`,
/// `report.html` and `junit.xml` (each written to a temporary name, then renamed).
pub fn render_run_dir(run_dir: &Path) -> Result<RenderedReport, ReportError> {
    let (dir, report) = load_and_build(run_dir)?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| ReportError::Parse {
        path: run_dir.join(REPORT_JSON),
        message: format!("encoding the report: {e}"),
    })?;
    let outputs = [
        (REPORT_JSON, json + "\n"),
        (SUMMARY_MD, render_summary(&report)),
        (REPORT_HTML, render_html(&report, &dir.scenario_text)),
        (JUNIT_XML, render_junit(&report)),
    ];
    let mut files = Vec::with_capacity(outputs.len());
    for (name, text) in outputs {
        let path = run_dir.join(name);
        write_atomically(&path, text.as_bytes())?;
        files.push(path);
    }
    Ok(RenderedReport { report, files })
}

/// `summary.md`: sized for a pull-request comment.
pub fn render_summary(report: &Report) -> String {
    markdown::render(report)
}

/// `report.html`: one self-contained page; `scenario_yaml` is shown as it was run.
pub fn render_html(report: &Report, scenario_yaml: &str) -> String {
    html::render(report, scenario_yaml)
}

/// `junit.xml`: one test suite, one test case per verdict.
pub fn render_junit(report: &Report) -> String {
    junit::render(report)
}

/// Reads a `report.json` (a run's, or a baseline), refusing newer schema versions.
pub fn load_report(path: &Path) -> Result<Report, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |e: serde_json::Error| ReportError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(parse)?;
    let version = value
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ReportError::Parse {
            path: path.to_path_buf(),
            message: "no schema_version: not a squall report.json".into(),
        })?;
    if version > u64::from(SCHEMA_VERSION) {
        return Err(ReportError::Schema {
            path: path.to_path_buf(),
            found: version,
        });
    }
    serde_json::from_value(value).map_err(parse)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|source| ReportError::Io {
        what: "writing",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ReportError::Io {
        what: "renaming into place",
        path: path.to_path_buf(),
        source,
    })
}
