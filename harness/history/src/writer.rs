//! Appending to a history: [`Recorder`]s (cheap to clone, one per actor) stamp each
//! operation with the run's monotonic clock and append it to a shared queue; one writer
//! thread takes the queue in batches and encodes JSON lines through gzip into the file,
//! so no actor ever waits on the disk. The writer wakes a few dozen times a second, not
//! once per record: a wake-up (a futex call on the recording side, a context switch on
//! the writer's) per record cost more than encoding the record.

use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{Header, Kind, Op, Value};
use crate::{HistoryError, Result};

/// How long records may wait in the queue before the writer takes them.
const BATCH_EVERY: Duration = Duration::from_millis(25);
/// Encoded lines handed to gzip at a time (at most; a batch's last lines go when it ends).
const CHUNK: usize = 64 * 1024;
/// How often the gzip stream is flushed to the file.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    ops: Vec<Op>,
    /// Set by `finish` (or the writer's drop): later records are counted, not written.
    closed: bool,
}

/// What recorders and the writer thread share.
#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    closing: Condvar,
    dropped: AtomicU64,
}

impl Queue {
    fn close(&self) {
        // A poisoned lock means a recorder panicked mid-push; the queue is still whole.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed = true;
        self.closing.notify_all();
    }
}

/// A handle that appends operations; clone one into every task that records.
#[derive(Clone)]
pub struct Recorder {
    origin: Instant,
    queue: Arc<Queue>,
}

impl Recorder {
    /// The run's time origin: `t = 0`.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Microseconds since the origin (0 for instants before it).
    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// Records an operation that happened now.
    pub fn record(&self, p: u32, k: Kind, v: Value) {
        self.record_at(Instant::now(), p, k, v);
    }

    /// Records an operation that happened at `at`.
    pub fn record_at(&self, at: Instant, p: u32, k: Kind, v: Value) {
        let op = Op {
            t: self.micros(at),
            p,
            k,
            v,
        };
        let mut state = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.closed {
            // The writer has finished: the run is over and this record came too late.
            drop(state);
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.ops.push(op);
    }
}

/// What the writer wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub records: u64,
    pub bytes_uncompressed: u64,
    pub bytes_on_disk: u64,
    /// Records that arrived after `finish` and were not written.
    pub late: u64,
}

/// Owns the writer thread; `finish` flushes and closes the file.
pub struct Writer {
    path: PathBuf,
    queue: Arc<Queue>,
    thread: Option<JoinHandle<Result<(u64, u64)>>>,
}

impl Writer {
    /// Creates `path` (truncating), writes the header and starts the writer thread.
    pub fn create(path: &Path, header: &Header, origin: Instant) -> Result<(Writer, Recorder)> {
        let io_err = |what: &'static str, source| HistoryError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::create(path).map_err(|e| io_err("creating", e))?;
        // Level 1: the writer must keep up with tens of thousands of records a second on
        // a core shared with the load; the ratio is still about 4:1 on these records.
        let mut out = GzEncoder::new(BufWriter::with_capacity(1 << 20, file), Compression::new(1));
        let mut line = serde_json::to_vec(header).map_err(|e| HistoryError::Format {
            path: path.display().to_string(),
            message: format!("encoding the header: {e}"),
        })?;
        line.push(b'\n');
        out.write_all(&line).map_err(|e| io_err("writing", e))?;
        let queue = Arc::new(Queue::default());
        let display = path.display().to_string();
        let thread_queue = queue.clone();
        let thread = std::thread::Builder::new()
            .name("history-writer".into())
            .spawn(move || write_loop(&thread_queue, out, line.len() as u64, display))
            .map_err(|e| io_err("starting the writer thread for", e))?;
        let recorder = Recorder {
            origin,
            queue: queue.clone(),
        };
        Ok((
            Writer {
                path: path.to_path_buf(),
                queue,
                thread: Some(thread),
            },
            recorder,
        ))
    }

    /// Writes what was recorded so far, closes the file and reports its size. Records
    /// arriving later are counted as `late`, not written.
    pub fn finish(mut self) -> Result<WriteStats> {
        self.queue.close();
        let (records, bytes_uncompressed) = match self.thread.take() {
            Some(t) => t.join().map_err(|_| HistoryError::Format {
                path: self.path.display().to_string(),
                message: "the writer thread panicked".into(),
            })??,
            None => (0, 0),
        };
        let bytes_on_disk = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(WriteStats {
            records,
            bytes_uncompressed,
            bytes_on_disk,
            late: self.queue.dropped.load(Ordering::Relaxed),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not finished (an error path): still close the file so what was recorded is readable.
        self.queue.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    queue: &Queue,
    mut out: GzEncoder<BufWriter<std::fs::File>>,
    header_bytes: u64,
    path: String,
) -> Result<(u64, u64)> {
    let io_err = |source| HistoryError::Io {
        what: "writing",
        path: path.clone(),
        source,
    };
    let mut records = 0u64;
    let mut bytes = header_bytes;
    // A batch's lines are encoded into one buffer and handed to gzip together: flate2
    // zeroes its whole 32 KiB output buffer on every `write` it is given, so a write per
    // line cost more (a memset per record) than compressing the line.
    let mut lines: Vec<u8> = Vec::with_capacity(CHUNK + 1024);
    let mut batch: Vec<Op> = Vec::new();
    let mut last_flush = Instant::now();
    loop {
        let closed = {
            let mut state = queue.state.lock().unwrap_or_else(|e| e.into_inner());
            if !state.closed {
                // Woken early only by `close`; otherwise the records gather for a while.
                state = queue
                    .closing
                    .wait_timeout(state, BATCH_EVERY)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            // Swapped, not drained: both vectors keep their capacity across batches.
            std::mem::swap(&mut state.ops, &mut batch);
            state.closed
        };
        for op in batch.drain(..) {
            let start = lines.len();
            // Encoding an Op cannot fail (no maps with non-string keys, no foreign types);
            // were it to, its partial line is taken back.
            if encode_hot(&mut lines, &op) || serde_json::to_writer(&mut lines, &op).is_ok() {
                lines.push(b'\n');
                records += 1;
                bytes += (lines.len() - start) as u64;
            } else {
                lines.truncate(start);
            }
            if lines.len() >= CHUNK {
                out.write_all(&lines).map_err(io_err)?;
                lines.clear();
            }
        }
        if !lines.is_empty() {
            out.write_all(&lines).map_err(io_err)?;
            lines.clear();
        }
        if closed {
            break;
        }
        // A sync flush every second: a run killed mid-way leaves a readable history, and
        // a reader can follow a run in progress.
        if last_flush.elapsed() >= FLUSH_EVERY {
            out.flush().map_err(io_err)?;
            last_flush = Instant::now();
        }
    }
    let inner = out.finish().map_err(io_err)?;
    inner
        .into_inner()
        .map_err(|e| io_err(e.into_error()))?
        .sync_all()
        .map_err(io_err)?;
    Ok((records, bytes))
}

/// Writes the line of a delivery or of a send's invoke or ok, the records a chat load
/// writes most (five or more per message), byte for byte as serde writes them (the tests
/// compare), and says whether it did; every other record goes to serde. Serde's derived
/// encoding of the internally tagged `Value` was most of the writer's time, a tenth of
/// squall's CPU in a chat load.
fn encode_hot(out: &mut Vec<u8>, op: &Op) -> bool {
    use std::io::Write as _;
    let kind = match op.k {
        Kind::Invoke => "invoke",
        Kind::Ok => "ok",
        Kind::Fail | Kind::Info => return false,
    };
    let start = out.len();
    let _ = write!(
        out,
        r#"{{"t":{},"p":{},"k":"{kind}","v":{{"f":"#,
        op.t, op.p
    );
    let whole = match &op.v {
        Value::Deliver { c, s, m, from, via } => {
            let via = match via {
                crate::model::Via::Live => "live",
                crate::model::Via::Sync => "sync",
            };
            let _ = write!(out, r#""deliver","c":{c},"s":{s},"m":"#);
            plain_str(out, m) && {
                let _ = write!(out, r#","from":{from},"via":"{via}"}}}}"#);
                true
            }
        }
        Value::Send {
            c,
            m,
            due,
            size,
            seq,
            mid,
            dup,
            err: None,
        } => {
            let _ = write!(out, r#""send","c":{c},"m":"#);
            plain_str(out, m) && {
                if let Some(due) = due {
                    let _ = write!(out, r#","due":{due}"#);
                }
                if let Some(size) = size {
                    let _ = write!(out, r#","size":{size}"#);
                }
                if let Some(seq) = seq {
                    let _ = write!(out, r#","seq":{seq}"#);
                }
                let mid_ok = match mid {
                    Some(mid) => {
                        out.extend_from_slice(br#","mid":"#);
                        plain_str(out, mid)
                    }
                    None => true,
                };
                mid_ok && {
                    if let Some(dup) = dup {
                        let _ = write!(out, r#","dup":{dup}"#);
                    }
                    out.extend_from_slice(b"}}");
                    true
                }
            }
        }
        _ => false,
    };
    if !whole {
        out.truncate(start);
    }
    whole
}

/// Writes `s` as a JSON string when it needs no escape, and says whether it did.
fn plain_str(out: &mut Vec<u8>, s: &str) -> bool {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        return false;
    }
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
    true
}

#[cfg(test)]
mod hot_tests {
    use super::*;
    use crate::model::Via;

    #[test]
    fn hot_records_are_written_as_serde_writes_them() {
        let send = |due, size, seq, mid: Option<&str>, dup| Value::Send {
            c: 7,
            m: "12-3".into(),
            due,
            size,
            seq,
            mid: mid.map(str::to_string),
            dup,
            err: None,
        };
        let values = [
            Value::Deliver {
                c: 0,
                s: -1,
                m: "1-2".into(),
                from: u32::MAX,
                via: Via::Live,
            },
            Value::Deliver {
                c: 249,
                s: 123_456,
                m: "x\u{e9}y".into(),
                from: 3,
                via: Via::Sync,
            },
            Value::Deliver {
                c: 1,
                s: 1,
                m: "q\"uote".into(),
                from: 3,
                via: Via::Sync,
            },
            send(Some(5), Some(200), None, None, None),
            send(None, None, Some(9), Some("0193a0b1-7c2e"), Some(false)),
            send(None, None, Some(9), Some("back\\slash"), Some(true)),
            send(None, None, None, None, None),
            Value::Send {
                c: 1,
                m: "a".into(),
                due: None,
                size: None,
                seq: None,
                mid: None,
                dup: None,
                err: Some("refused".into()),
            },
            Value::Typing { c: 3 },
        ];
        let mut hot = 0;
        for v in values {
            for k in [Kind::Invoke, Kind::Ok, Kind::Fail, Kind::Info] {
                let op = Op {
                    t: 1_234_567,
                    p: 42,
                    k,
                    v: v.clone(),
                };
                let mut ours = b"before".to_vec();
                if encode_hot(&mut ours, &op) {
                    hot += 1;
                    let mut theirs = b"before".to_vec();
                    serde_json::to_writer(&mut theirs, &op).expect("encodes");
                    assert_eq!(
                        String::from_utf8_lossy(&ours),
                        String::from_utf8_lossy(&theirs)
                    );
                } else {
                    assert_eq!(ours, b"before", "a refused record leaves nothing behind");
                }
            }
        }
        assert_eq!(hot, 10, "deliveries and plain sends, invoke and ok");
    }
}
