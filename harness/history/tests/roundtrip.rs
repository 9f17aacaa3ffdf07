//! Writing a history and reading it back: every record, in order, with its header; the
//! size per record of a realistic message workload (the README quotes it).

use squall_history::*;
use std::time::{Duration, Instant};

fn header() -> Header {
    Header {
        format: FORMAT.into(),
        version: VERSION,
        run_id: "test".into(),
        scenario: "unit".into(),
        seed: 7,
        origin_wall_ms: 1_700_000_000_000,
        nodes: vec!["http://127.0.0.1:1".into()],
        users: (0..100)
            .map(|i| UserInfo {
                id: format!("u{i}"),
                tenant: "t".into(),
                node: 1,
            })
            .collect(),
        conversations: vec![ConversationInfo {
            id: "c0".into(),
            tenant: "t".into(),
            members: vec![0, 1, 2, 3, 4],
        }],
    }
}

#[test]
fn what_is_written_is_read_back_in_order() {
    let dir = std::env::temp_dir().join(format!("squall-history-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(FILE_NAME);
    let origin = Instant::now();
    let (writer, rec) = Writer::create(&path, &header(), origin).unwrap();
    // A message workload: invoke + ok per send, four deliveries per message.
    let messages = 20_000u32;
    let mut expected = Vec::new();
    for n in 0..messages {
        let sender = n % 100;
        let m = format!("{sender}-{n}");
        let at = origin + Duration::from_micros(u64::from(n) * 200);
        let ops = [
            (
                sender,
                Kind::Invoke,
                Value::Send {
                    c: 0,
                    m: m.clone(),
                    due: Some(u64::from(n) * 200),
                    size: Some(200),
                    seq: None,
                    mid: None,
                    dup: None,
                    err: None,
                },
            ),
            (
                sender,
                Kind::Ok,
                Value::Send {
                    c: 0,
                    m: m.clone(),
                    due: None,
                    size: None,
                    seq: Some(i64::from(n) + 1),
                    mid: Some("0190f5d2-7a4b-7c3e-9d1f-2b3c4d5e6f70".into()),
                    dup: Some(false),
                    err: None,
                },
            ),
        ];
        for (p, k, v) in ops {
            rec.record_at(at, p, k, v.clone());
            expected.push((p, k, v));
        }
        for r in 1..=4 {
            let v = Value::Deliver {
                c: 0,
                s: i64::from(n) + 1,
                m: m.clone(),
                from: sender,
                via: Via::Live,
            };
            rec.record_at(at, (sender + r) % 100, Kind::Ok, v.clone());
            expected.push(((sender + r) % 100, Kind::Ok, v));
        }
    }
    let stats = writer.finish().unwrap();
    assert_eq!(stats.records, expected.len() as u64);
    rec.record(
        0,
        Kind::Info,
        Value::Phase {
            name: "late".into(),
        },
    );
    let (h, ops) = read(&path).unwrap();
    assert_eq!(h, header());
    let ops: Vec<Op> = ops.collect::<Result<_>>().unwrap();
    assert_eq!(ops.len(), expected.len());
    for (op, (p, k, v)) in ops.iter().zip(&expected) {
        assert_eq!((&op.p, &op.k, &op.v), (p, k, v));
    }
    assert!(ops.windows(2).all(|w| w[0].t <= w[1].t));
    let per_record = stats.bytes_on_disk as f64 / stats.records as f64;
    eprintln!(
        "history: {} records, {:.1} B/record uncompressed, {:.1} B/record on disk",
        stats.records,
        stats.bytes_uncompressed as f64 / stats.records as f64,
        per_record
    );
    // The README's size statement rests on this bound.
    assert!(per_record < 40.0, "{per_record} B/record");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_foreign_file_is_refused_with_its_name() {
    let dir = std::env::temp_dir().join(format!("squall-history-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("not-a-history.gz");
    std::fs::write(&path, b"plain text").unwrap();
    let err = read(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("not-a-history.gz"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_2_records_round_trip_and_version_1_is_still_read() {
    let dir = std::env::temp_dir().join(format!("squall-history-v2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(FILE_NAME);
    let origin = Instant::now();
    let (writer, rec) = Writer::create(&path, &header(), origin).unwrap();
    let records = [
        (3, Kind::Invoke, Value::Stall { ms: 8000 }),
        (3, Kind::Ok, Value::Stall { ms: 8000 }),
        (
            RECOVERY,
            Kind::Invoke,
            Value::RecoveryRead {
                c: 0,
                u: 2,
                last: None,
                n: None,
                err: None,
            },
        ),
        (
            RECOVERY,
            Kind::Ok,
            Value::RecoveryMsg {
                c: 0,
                s: 1,
                m: "1-0".into(),
                from: 1,
            },
        ),
        (
            RECOVERY,
            Kind::Ok,
            Value::RecoveryRead {
                c: 0,
                u: 2,
                last: Some(1),
                n: Some(1),
                err: None,
            },
        ),
    ];
    for (p, k, v) in &records {
        rec.record(*p, *k, v.clone());
    }
    writer.finish().unwrap();
    let (_, ops) = read(&path).unwrap();
    let ops: Vec<Op> = ops.collect::<Result<_>>().unwrap();
    let got: Vec<(u32, Kind, Value)> = ops.into_iter().map(|o| (o.p, o.k, o.v)).collect();
    assert_eq!(got, records.to_vec());
    // A version-1 file (what older squalls wrote) is still read.
    let mut old = header();
    old.version = 1;
    let v1 = dir.join("v1.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&v1).unwrap(),
        flate2::Compression::fast(),
    );
    use std::io::Write;
    writeln!(gz, "{}", serde_json::to_string(&old).unwrap()).unwrap();
    writeln!(
        gz,
        r#"{{"t":5,"p":0,"k":"ok","v":{{"f":"deliver","c":0,"s":1,"m":"1-0","from":1,"via":"live"}}}}"#
    )
    .unwrap();
    gz.finish().unwrap();
    let (h, ops) = read(&v1).unwrap();
    assert_eq!(h.version, 1);
    assert_eq!(ops.count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
