//! Renders the hand-made run directory `tests/fixtures/run1/` (copied into a temporary
//! directory, with its `history.jsonl.gz` written here through `squall_history::Writer`,
//! so the fixture holds text files only) and checks every report file: report.json
//! parses back with its schema version, faults and verdicts; junit.xml is well-formed
//! with one test case per verdict; report.html is self-contained and holds every chart;
//! summary.md is short. Also: a directory with nothing but the scenario still renders,
//! re-rendering is stable, and newer schema versions are refused.

use squall_history::{ConversationInfo, Header, Kind, UserInfo, Value, Writer, HARNESS, NEMESIS};
use squall_report::{load_report, render_run_dir, ReportError, RunResult, CHART_NAMES};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run1")
}

fn copy_fixture(to: &Path) {
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Phases, one send, and one fault (kill_node node-2 from 2.0 s to 3.0 s; load starts at 1.0 s).
fn write_history(dir: &Path) {
    let header = Header {
        format: squall_history::FORMAT.into(),
        version: squall_history::VERSION,
        run_id: "fixture-20260101T000000Z".into(),
        scenario: "fixture".into(),
        seed: 7,
        origin_wall_ms: 1_767_225_600_000,
        nodes: vec!["ws-node-1".into(), "ws-node-2".into()],
        users: (0..4)
            .map(|i| UserInfo {
                id: format!("u{i}"),
                tenant: "t0".into(),
                node: (i % 2 + 1) as u16,
            })
            .collect(),
        conversations: vec![ConversationInfo {
            id: "c0".into(),
            tenant: "t0".into(),
            members: vec![0, 1],
        }],
    };
    let origin = Instant::now();
    let (writer, rec) =
        Writer::create(&dir.join(squall_history::FILE_NAME), &header, origin).unwrap();
    let at = |ms: u64| origin + Duration::from_millis(ms);
    let phase = |name: &str| Value::Phase { name: name.into() };
    let fault = || Value::Fault {
        id: 0,
        kind: "kill_node".into(),
        target: "node-2".into(),
        err: None,
    };
    rec.record_at(at(200), HARNESS, Kind::Info, phase("connected"));
    rec.record_at(at(1000), HARNESS, Kind::Info, phase("load_start"));
    rec.record_at(
        at(1500),
        0,
        Kind::Invoke,
        Value::Send {
            c: 0,
            m: "m1".into(),
            due: Some(1_500_000),
            size: Some(40),
            seq: None,
            mid: None,
            dup: None,
            err: None,
        },
    );
    rec.record_at(at(2000), NEMESIS, Kind::Invoke, fault());
    rec.record_at(at(3000), NEMESIS, Kind::Ok, fault());
    rec.record_at(at(5000), HARNESS, Kind::Info, phase("load_end"));
    rec.record_at(at(5200), HARNESS, Kind::Info, phase("drained"));
    drop(rec);
    writer.finish().unwrap();
}

fn rendered() -> (tempfile::TempDir, squall_report::RenderedReport) {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(tmp.path());
    write_history(tmp.path());
    let out = render_run_dir(tmp.path()).unwrap();
    (tmp, out)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

#[test]
fn report_json_round_trips_with_faults_and_verdicts() {
    let (tmp, out) = rendered();
    let names: Vec<String> = out
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["report.json", "summary.md", "report.html", "junit.xml"]
    );
    let r = load_report(&tmp.path().join("report.json")).unwrap();
    assert_eq!(r, out.report);
    assert_eq!(r.schema_version, 1);
    assert!(!r.squall_version.is_empty());
    assert_eq!(r.scenario.name, "fixture");
    assert_eq!(r.scenario.seed, 7);
    assert_eq!(r.scenario.sha256.len(), 64);
    let bytes = std::fs::read(tmp.path().join("scenario.yaml")).unwrap();
    assert_eq!(r.scenario.sha256, squall_report::inputs::sha256_hex(&bytes));
    assert_eq!(r.run.run_id, "fixture-20260101T000000Z");
    assert_eq!(
        r.run.started_at.as_deref(),
        Some("2026-01-01T00:00:00.000Z")
    );

    // Faults: real window from the history, since the origin and since the load start.
    assert_eq!(r.faults.len(), 1);
    let f = &r.faults[0];
    assert_eq!(
        (f.id, f.kind.as_str(), f.target.as_str()),
        (0, "kill_node", "node-2")
    );
    assert!((f.start_s - 2.0).abs() < 0.01 && (f.end_s.unwrap() - 3.0).abs() < 0.01);
    assert!((f.start_after_load_s.unwrap() - 1.0).abs() < 0.01);
    assert!((f.end_after_load_s.unwrap() - 2.0).abs() < 0.01);
    assert_eq!(f.outcome, "healed");
    assert!((r.phases.load_start_s.unwrap() - 1.0).abs() < 0.01);

    // Verdicts and the outcome.
    assert_eq!(r.checks.len(), 3);
    assert_eq!(r.checks[1].examples.len(), 1);
    assert_eq!(r.outcome.result, RunResult::Fail);
    assert_eq!(
        (r.outcome.valid, r.outcome.invalid, r.outcome.unknown),
        (1, 1, 1)
    );

    // Topology and load, asked and achieved (4 measured seconds of 8 sends).
    assert_eq!(r.topology.nodes, 2);
    assert_eq!(r.topology.publish_mode, "outbox");
    assert_eq!(r.topology.workers, ["audit"]);
    assert!((r.load.asked.ops_per_s - 10.0).abs() < 1e-9);
    assert!((r.load.asked.sends_per_s - 8.0).abs() < 1e-9);
    assert_eq!(r.load.achieved.measured_s, 4.0);
    assert_eq!(r.load.achieved.sends_invoked, 32);
    assert!((r.load.achieved.sends_invoked_per_s - 8.0).abs() < 1e-9);
    assert_eq!(r.load.achieved.deliveries, 65);

    // Percentiles from the histograms, with the run.json fallback.
    assert_eq!(r.latency["send_ack"].source, "histograms");
    assert!(r.latency["send_ack"].curve.len() > 10);
    assert!(r.latency["send_ack"].p99_us >= r.latency["send_ack"].p50_us);
    assert_eq!(r.latency["reconnect_resync"].source, "run.json");
    assert_eq!(r.latency["reconnect_resync"].p99_us, 21_000);

    // Series and signals.
    assert_eq!(r.series.len(), 7);
    assert_eq!(r.series[2].latency["send_ack"].p99_us, 90_000);
    assert_eq!(r.resources.samples, 7);
    assert_eq!(r.resources.processes["node-2"].samples, 6);
    assert!((r.resources.processes["node-1"].cpu_max - 0.11).abs() < 1e-9);
    assert_eq!(r.resources.unreachable_s["node-2"], 1);
    assert_eq!(
        r.timeseries.connections_metric.as_deref(),
        Some("chatstream_connections")
    );
    assert_eq!(r.timeseries.connections.lines["node-1"].len(), 7);
    assert_eq!(r.timeseries.outbox_backlog.lines.len(), 2);
    assert_eq!(r.timeseries.consumer_lag.lines["chatstream-audit"].len(), 7);
    assert!(
        r.notes.iter().any(|n| n.contains("signals.jsonl")),
        "{:?}",
        r.notes
    );
}

/// A tiny XML well-formedness check: tags balance, attributes are quoted, text holds no
/// raw `<` and every `&` starts an entity.
fn check_well_formed(xml: &str) -> Result<(), String> {
    let body = xml
        .strip_prefix("<?xml")
        .and_then(|s| s.split_once("?>"))
        .map(|(_, rest)| rest)
        .ok_or("no XML declaration")?;
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    let mut roots = 0;
    while let Some(open) = rest.find('<') {
        check_text(&rest[..open])?;
        let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
        let tag = &rest[open + 1..close];
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack
                .pop()
                .ok_or(format!("</{name}> without an opening tag"))?;
            if top != name.trim() {
                return Err(format!("</{name}> closes <{top}>"));
            }
        } else {
            let self_closing = tag.ends_with('/');
            let inner = tag.trim_end_matches('/');
            let name = inner
                .split_whitespace()
                .next()
                .ok_or("empty tag")?
                .to_string();
            let attrs = &inner[name.len()..];
            if attrs.matches('"').count() % 2 != 0 || attrs.contains('<') {
                return Err(format!("bad attributes in <{tag}>"));
            }
            check_text(&attrs.replace('"', ""))?;
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    check_text(rest)?;
    if !stack.is_empty() {
        return Err(format!("unclosed: {stack:?}"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(())
}

fn check_text(text: &str) -> Result<(), String> {
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..text.len().min(i + 8)];
        if !["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
            .iter()
            .any(|e| entity.starts_with(e))
        {
            return Err(format!("bare & at {entity:?}"));
        }
    }
    if text.contains('>') && text.trim().starts_with('>') {
        return Err("stray >".into());
    }
    Ok(())
}

#[test]
fn junit_has_one_case_per_verdict_and_is_well_formed() {
    let (tmp, _) = rendered();
    let xml = read(tmp.path(), "junit.xml");
    check_well_formed(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    assert_eq!(xml.matches("<testsuite ").count(), 1);
    assert!(
        xml.contains(r#"<testsuite name="squall.fixture" tests="3" failures="2""#),
        "{xml}"
    );
    assert!(xml.contains(" time=\""));
    assert_eq!(xml.matches("<testcase ").count(), 3);
    assert_eq!(xml.matches(r#"classname="squall.fixture""#).count(), 3);
    assert_eq!(xml.matches("<failure ").count(), 2);
    // The invalid verdict: its summary (escaped) and its example's timeline.
    assert!(xml.contains(r#"<testcase name="order""#));
    assert!(xml.contains("1 live order inversion &lt;seq 5 before seq 4&gt; &amp; 0 gaps"));
    assert!(xml.contains("deliver seq=4 &lt;live&gt; &amp; late"));
    // The unknown gate fails too, its name escaped.
    assert!(xml.contains(r#"name="p99(send_ack) &lt; 50ms outside faults""#));
    assert!(xml.contains(r#"type="unknown""#));
    assert!(xml.contains(r#"<testcase name="delivery" classname="squall.fixture" time="0"/>"#));
}

/// The `<svg ...>...</svg>` element whose `data-chart` is `name`.
fn chart<'a>(html: &'a str, name: &str) -> &'a str {
    let attr = format!(r#"data-chart="{name}""#);
    let at = html
        .find(&attr)
        .unwrap_or_else(|| panic!("no chart {name}"));
    let start = html[..at].rfind("<svg").unwrap();
    let end = html[at..].find("</svg>").unwrap() + at;
    &html[start..end]
}

#[test]
fn html_is_self_contained_and_has_every_chart() {
    let (tmp, _) = rendered();
    let html = read(tmp.path(), "report.html");
    assert!(html.starts_with("<!DOCTYPE html>"));
    // No network: no scheme anywhere (the fixture holds no URL, so not even in text), no
    // script, no linked stylesheet, no CSS url() or @import.
    for needle in [
        "http://", "https://", "<script", "<link", "url(http", "@import", "src=",
    ] {
        assert!(!html.contains(needle), "report.html contains {needle}");
    }
    for href in html.match_indices("href=\"").map(|(i, _)| &html[i + 6..]) {
        assert!(
            href.starts_with('#'),
            "external link: {}",
            &href[..40.min(href.len())]
        );
    }
    for name in CHART_NAMES {
        assert_eq!(
            html.matches(&format!(r#"data-chart="{name}""#)).count(),
            1,
            "chart {name}"
        );
        let svg = chart(&html, name);
        assert!(svg.contains(r#"class="chart"#), "{name} has class chart");
        let lines = svg.matches("<polyline").count() + svg.matches("<path").count();
        if name == "latency_distribution_http" {
            // readyz traffic is asked, but the fixture's histograms hold none: no data.
            assert_eq!(lines, 0);
            assert!(svg.contains("no data"));
        } else {
            assert!(lines >= 1, "chart {name} has no line");
            assert!(svg.contains("class=\"tick\""), "chart {name} has ticks");
            assert!(
                svg.contains("class=\"legend\""),
                "chart {name} has a legend"
            );
        }
    }
    // Fault windows are shaded and labelled on the time charts.
    for name in [
        "throughput",
        "latency_send_ack",
        "latency_delivery",
        "connections",
    ] {
        let svg = chart(&html, name);
        assert!(
            svg.contains("#0 kill_node node-2"),
            "{name} has the fault label"
        );
        assert!(svg.contains(r#"class="band""#), "{name} has the fault band");
    }
    // The checks with their evidence, the scenario escaped in a <pre>.
    assert!(html.contains("<details open><summary>evidence"));
    assert!(html.contains("deliver seq=4 &lt;live&gt; &amp; late"));
    assert!(html.contains("&quot;p99(send_ack) &lt; 50ms outside faults&quot;"));
}

#[test]
fn summary_is_short_and_complete() {
    let (tmp, _) = rendered();
    let md = read(tmp.path(), "summary.md");
    assert!(md.lines().count() < 80, "{} lines", md.lines().count());
    assert!(md.starts_with("## squall `fixture`: **FAIL**"));
    assert!(md.contains("| order | FAIL |"));
    assert!(md.contains("| p99(send_ack) < 50ms outside faults | UNKNOWN |"));
    assert!(md.contains("| send_ack |"));
    assert!(md.contains("| chat sends | 8.0 | 8.0 invoked, 8.0 acked |"));
    assert!(md.contains("| 0 | kill_node | node-2 | +1.00 s → +2.00 s | 1.00 s | healed |"));
    assert!(md.contains("### Top resource users"));
}

#[test]
fn rerendering_is_stable_and_keeps_the_environment() {
    let (tmp, first) = rendered();
    assert_eq!(first.report.environment.source, "detected");
    let second = render_run_dir(tmp.path()).unwrap();
    assert_eq!(second.report.environment.source, "preserved");
    assert_eq!(
        second.report.environment.cores,
        first.report.environment.cores
    );
    let json = read(tmp.path(), "report.json");
    let third = render_run_dir(tmp.path()).unwrap();
    assert_eq!(third.report, second.report);
    assert_eq!(read(tmp.path(), "report.json"), json);
}

#[test]
fn a_directory_with_only_the_scenario_still_renders() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("scenario.yaml"),
        tmp.path().join("scenario.yaml"),
    )
    .unwrap();
    let out = render_run_dir(tmp.path()).unwrap();
    let r = &out.report;
    assert_eq!(r.outcome.result, RunResult::Fail);
    assert!(r.outcome.reason.contains("verdicts.json"));
    assert!(r.faults.is_empty() && r.series.is_empty() && r.checks.is_empty());
    assert!(r
        .notes
        .iter()
        .any(|n| n.contains("history.jsonl.gz is missing")));
    let html = read(tmp.path(), "report.html");
    for name in CHART_NAMES {
        assert!(chart(&html, name).contains("no data"), "{name}");
    }
    let xml = read(tmp.path(), "junit.xml");
    check_well_formed(&xml).unwrap();
    assert!(xml.contains(r#"tests="1" failures="1""#));
    assert!(xml.contains(r#"<testcase name="verdicts""#));
}

#[test]
fn bad_inputs_are_errors_and_newer_schemas_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        render_run_dir(tmp.path()),
        Err(ReportError::Io { .. })
    ));
    copy_fixture(tmp.path());
    std::fs::write(tmp.path().join("verdicts.json"), "[{").unwrap();
    let err = render_run_dir(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("verdicts.json"), "{err}");

    let path = tmp.path().join("newer.json");
    std::fs::write(&path, r#"{"schema_version": 99}"#).unwrap();
    assert!(matches!(
        load_report(&path),
        Err(ReportError::Schema { found: 99, .. })
    ));
}

#[test]
fn the_well_formedness_check_catches_mistakes() {
    let decl = r#"<?xml version="1.0"?>"#;
    assert!(check_well_formed(&format!("{decl}<a><b/></a>")).is_ok());
    assert!(check_well_formed(&format!("{decl}<a><b></a></b>")).is_err());
    assert!(check_well_formed(&format!("{decl}<a>x & y</a>")).is_err());
    assert!(check_well_formed(&format!("{decl}<a x=\"1></a>")).is_err());
    assert!(check_well_formed(&format!("{decl}<a></a><b></b>")).is_err());
    assert!(check_well_formed(&format!("{decl}<a>")).is_err());
}
