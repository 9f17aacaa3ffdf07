//! Appending to a history: [`Recorder`]s (cheap to clone, one per actor) stamp each
//! operation with the run's monotonic clock and hand it to one writer thread, which
//! encodes JSON lines through gzip into the file, so no actor ever waits on the disk.

use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::model::{Header, Kind, Op, Value};
use crate::{HistoryError, Result};

enum Message {
    Op(Op),
    Close,
}

/// A handle that appends operations; clone one into every task that records.
#[derive(Clone)]
pub struct Recorder {
    origin: Instant,
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
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
        if self.tx.send(Message::Op(op)).is_err() {
            // The writer has finished: the run is over and this record came too late.
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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
    tx: mpsc::Sender<Message>,
    thread: Option<JoinHandle<Result<(u64, u64)>>>,
    dropped: Arc<AtomicU64>,
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
        let (tx, rx) = mpsc::channel::<Message>();
        let display = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("history-writer".into())
            .spawn(move || write_loop(rx, out, line.len() as u64, display))
            .map_err(|e| io_err("starting the writer thread for", e))?;
        let dropped = Arc::new(AtomicU64::new(0));
        let recorder = Recorder {
            origin,
            tx: tx.clone(),
            dropped: dropped.clone(),
        };
        Ok((
            Writer {
                path: path.to_path_buf(),
                tx,
                thread: Some(thread),
                dropped,
            },
            recorder,
        ))
    }

    /// Writes what was recorded so far, closes the file and reports its size. Records
    /// arriving later are counted as `late`, not written.
    pub fn finish(mut self) -> Result<WriteStats> {
        let _ = self.tx.send(Message::Close);
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
            late: self.dropped.load(Ordering::Relaxed),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not finished (an error path): still close the file so what was recorded is readable.
        let _ = self.tx.send(Message::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    rx: mpsc::Receiver<Message>,
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
    let mut line = Vec::with_capacity(256);
    let mut last_flush = std::time::Instant::now();
    loop {
        // A sync flush every second: a run killed mid-way leaves a readable history, and
        // a reader can follow a run in progress.
        let op = match rx.recv_timeout(std::time::Duration::from_secs(1)) {
            Ok(Message::Op(op)) => Some(op),
            Ok(Message::Close) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        };
        if last_flush.elapsed() >= std::time::Duration::from_secs(1) {
            out.flush().map_err(io_err)?;
            last_flush = std::time::Instant::now();
        }
        let Some(op) = op else { continue };
        line.clear();
        // Encoding an Op cannot fail (no maps with non-string keys, no foreign types).
        if serde_json::to_writer(&mut line, &op).is_ok() {
            line.push(b'\n');
            out.write_all(&line).map_err(io_err)?;
            records += 1;
            bytes += line.len() as u64;
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
