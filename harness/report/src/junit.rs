//! `junit.xml`: the verdicts as one JUnit test suite (`squall.<scenario>`), one test case
//! per verdict, for CI test reporters. Invalid verdicts are failures with the summary and
//! the first examples; unknown verdicts are failures too (a gate that cannot be evaluated
//! fails). A run without verdicts gets one failing `verdicts` case; an interrupted run one
//! failing `run` case, so the file never passes a run the report fails.

use squall_check::{Validity, Verdict};
use std::fmt::Write as _;

use crate::model::Report;
use crate::text::escape_xml;

const EXAMPLES: usize = 3;
const TIMELINE_LINES: usize = 20;

struct Case {
    name: String,
    failure: Option<(String, String, String)>, // (type, message, body)
}

fn case_of(v: &Verdict) -> Case {
    let failure = match v.valid {
        Validity::Valid => None,
        Validity::Invalid => Some(("invalid", v.summary.clone())),
        Validity::Unknown => Some(("unknown", format!("cannot be evaluated: {}", v.summary))),
    }
    .map(|(kind, message)| {
        let mut body = format!("{}\n", v.summary);
        if !v.counts.is_empty() {
            let counts: Vec<String> = v.counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(body, "counts: {}", counts.join(" "));
        }
        for (a, b) in &v.windows {
            let _ = writeln!(
                body,
                "window: {:.3} s .. {:.3} s",
                *a as f64 / 1e6,
                *b as f64 / 1e6
            );
        }
        for e in v.examples.iter().take(EXAMPLES) {
            let _ = writeln!(body, "\nexample {}: {}", e.id, e.what);
            for line in e.timeline.iter().take(TIMELINE_LINES) {
                let _ = writeln!(body, "  {line}");
            }
            if e.timeline.len() > TIMELINE_LINES {
                let _ = writeln!(body, "  … {} more lines", e.timeline.len() - TIMELINE_LINES);
            }
        }
        if v.examples.len() > EXAMPLES {
            let _ = writeln!(
                body,
                "\n… {} more examples in report.html",
                v.examples.len() - EXAMPLES
            );
        }
        (kind.to_string(), message, body)
    });
    Case {
        name: v.checker.clone(),
        failure,
    }
}

pub fn render(r: &Report) -> String {
    let suite = format!("squall.{}", r.scenario.name);
    let mut cases: Vec<Case> = r.checks.iter().map(case_of).collect();
    if !r.run.inputs.get("verdicts.json").copied().unwrap_or(false) {
        cases.push(Case {
            name: "verdicts".into(),
            failure: Some((
                "missing".into(),
                "no verdicts.json: the run was not checked".into(),
                r.outcome.reason.clone(),
            )),
        });
    } else if r.checks.is_empty() {
        cases.push(Case {
            name: "verdicts".into(),
            failure: Some((
                "missing".into(),
                "no checks were evaluated".into(),
                r.outcome.reason.clone(),
            )),
        });
    }
    if r.run.interrupted {
        cases.push(Case {
            name: "run".into(),
            failure: Some((
                "interrupted".into(),
                "the run was interrupted before the end of its load".into(),
                String::new(),
            )),
        });
    }
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let time = r
        .phases
        .drained_s
        .or(r.phases.load_end_s)
        .unwrap_or(r.load.asked.warmup_s + r.load.asked.duration_s);
    let mut o = String::new();
    let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let timestamp = r
        .run
        .started_at
        .as_deref()
        .map(|s| {
            format!(
                r#" timestamp="{}""#,
                escape_xml(&s.chars().take(19).collect::<String>())
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        o,
        r#"<testsuite name="{}" tests="{}" failures="{failures}" errors="0" skipped="0" time="{time:.3}"{timestamp}>"#,
        escape_xml(&suite),
        cases.len(),
    );
    let _ = writeln!(o, "  <properties>");
    let mut props = vec![
        ("run_id", r.run.run_id.clone()),
        ("seed", r.scenario.seed.to_string()),
        ("scenario_sha256", r.scenario.sha256.clone()),
        ("squall_version", r.squall_version.clone()),
        ("result", format!("{:?}", r.outcome.result).to_lowercase()),
    ];
    if let Some(c) = &r.environment.git_commit {
        props.push(("git_commit", c.clone()));
    }
    for (k, v) in props {
        let _ = writeln!(
            o,
            r#"    <property name="{k}" value="{}"/>"#,
            escape_xml(&v)
        );
    }
    let _ = writeln!(o, "  </properties>");
    for c in &cases {
        let open = format!(
            r#"  <testcase name="{}" classname="{}" time="0""#,
            escape_xml(&c.name),
            escape_xml(&suite)
        );
        match &c.failure {
            None => {
                let _ = writeln!(o, "{open}/>");
            }
            Some((kind, message, body)) => {
                let _ = writeln!(o, "{open}>");
                let _ = writeln!(
                    o,
                    r#"    <failure type="{}" message="{}">{}</failure>"#,
                    escape_xml(kind),
                    escape_xml(&message.replace(['\n', '\r'], " ")),
                    escape_xml(body)
                );
                let _ = writeln!(o, "  </testcase>");
            }
        }
    }
    let _ = writeln!(o, "</testsuite>");
    o
}
