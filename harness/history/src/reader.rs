//! Reading a history back: the header, then the operations in the order they were
//! written, streamed (a long run's history does not fit in memory as `Op`s comfortably).

use flate2::read::MultiGzDecoder;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::model::{Header, Op, FORMAT, VERSION};
use crate::{HistoryError, Result};

/// Streams the operations of one history file.
pub struct HistoryReader {
    path: String,
    lines: std::io::Lines<BufReader<MultiGzDecoder<std::fs::File>>>,
    line_no: u64,
}

/// Opens a history file and reads its header.
pub fn read(path: &Path) -> Result<(Header, HistoryReader)> {
    let display = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| HistoryError::Io {
        what: "opening",
        path: display.clone(),
        source,
    })?;
    let mut lines = BufReader::with_capacity(1 << 20, MultiGzDecoder::new(file)).lines();
    let first = lines
        .next()
        .ok_or_else(|| HistoryError::Format {
            path: display.clone(),
            message: "empty file: no header".into(),
        })?
        .map_err(|source| HistoryError::Io {
            what: "reading",
            path: display.clone(),
            source,
        })?;
    let header: Header = serde_json::from_str(&first).map_err(|source| HistoryError::Decode {
        path: display.clone(),
        line: 1,
        source,
    })?;
    if header.format != FORMAT || header.version > VERSION {
        return Err(HistoryError::Format {
            path: display,
            message: format!(
                "format {} version {} (this squall reads {FORMAT} up to version {VERSION})",
                header.format, header.version
            ),
        });
    }
    Ok((
        header,
        HistoryReader {
            path: display,
            lines,
            line_no: 1,
        },
    ))
}

impl Iterator for HistoryReader {
    type Item = Result<Op>;

    fn next(&mut self) -> Option<Result<Op>> {
        let line = match self.lines.next()? {
            Ok(l) => l,
            // A run killed mid-write leaves a truncated gzip stream: what came before it
            // is still the history, so the end of readable data ends the iteration.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(source) => {
                return Some(Err(HistoryError::Io {
                    what: "reading",
                    path: self.path.clone(),
                    source,
                }))
            }
        };
        self.line_no += 1;
        Some(
            serde_json::from_str(&line).map_err(|source| HistoryError::Decode {
                path: self.path.clone(),
                line: self.line_no,
                source,
            }),
        )
    }
}
