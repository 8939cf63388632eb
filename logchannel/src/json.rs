//! A log as JSON lines: the header on the first line, then one entry per
//! line, so that a log can be read, grepped and edited with ordinary tools
//! and loaded back (`ftvm log dump --json`, `ftvm log load`).
//!
//! Bit patterns (RIPs, TSC values, random numbers, hashes, registers) are
//! `"0x…"` strings, because JSON tools commonly read numbers as doubles and
//! would round them; byte strings (packets, the image hash) are plain hex.
//! Reading also accepts plain numbers for them. Blank lines are skipped.

use crate::entry::{Entry, Event};
use crate::file::{LogHeader, FORMAT_VERSION};
use std::borrow::Borrow;
use std::io::{self, BufRead, Write};
use thiserror::Error;

/// Line numbers count from 1.
#[derive(Debug, Error)]
pub enum JsonError {
    #[error("the input is empty: its first line must be the log header")]
    MissingHeader,
    #[error("line {line}: {message}")]
    Parse { line: u64, message: String },
    #[error("line {line}: unsupported log format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        line: u64,
        found: u32,
        supported: u32,
    },
    #[error("line {line}: entry has sequence number {found}, expected {expected}")]
    Sequence {
        line: u64,
        expected: u64,
        found: u64,
    },
    #[error("line {line}: entry {seq} comes after the End entry")]
    AfterEnd { line: u64, seq: u64 },
    #[error("line {line}: reading failed: {source}")]
    Read { line: u64, source: io::Error },
    #[error("writing JSON lines failed: {0}")]
    Write(#[source] io::Error),
}

/// Writes `header` and `entries` as JSON lines and flushes. The entries are
/// written as given; their order is the caller's (a reader's) business.
pub fn to_json_lines<W, I>(mut out: W, header: &LogHeader, entries: I) -> Result<(), JsonError>
where
    W: Write,
    I: IntoIterator,
    I::Item: Borrow<Entry>,
{
    write_line(&mut out, header)?;
    for entry in entries {
        write_line(&mut out, entry.borrow())?;
    }
    out.flush().map_err(JsonError::Write)
}

fn write_line<W: Write, T: serde::Serialize>(out: &mut W, value: &T) -> Result<(), JsonError> {
    serde_json::to_writer(&mut *out, value).map_err(|e| JsonError::Write(e.into()))?;
    out.write_all(b"\n").map_err(JsonError::Write)
}

/// Reads the header line and returns it with an iterator over the entries,
/// which checks that sequence numbers run on from 1 and that nothing follows
/// an End entry. A missing End entry is not an error here (a dump of an
/// unfinished log has none); [`JsonEntries::ended`] tells.
pub fn from_json_lines<R: BufRead>(input: R) -> Result<(LogHeader, JsonEntries<R>), JsonError> {
    let mut lines = Lines {
        inner: input.lines(),
        line: 0,
    };
    let Some(text) = lines.next_text()? else {
        return Err(JsonError::MissingHeader);
    };
    let line = lines.line;
    let header: LogHeader = parse(line, &text)?;
    if header.format_version != FORMAT_VERSION {
        return Err(JsonError::UnsupportedVersion {
            line,
            found: header.format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok((
        header,
        JsonEntries {
            lines,
            next_seq: 1,
            ended: false,
            done: false,
        },
    ))
}

fn parse<T: serde::de::DeserializeOwned>(line: u64, text: &str) -> Result<T, JsonError> {
    serde_json::from_str(text).map_err(|e| JsonError::Parse {
        line,
        message: e.to_string(),
    })
}

struct Lines<R> {
    inner: io::Lines<R>,
    line: u64,
}

impl<R: BufRead> Lines<R> {
    /// The next line that is not blank.
    fn next_text(&mut self) -> Result<Option<String>, JsonError> {
        for text in self.inner.by_ref() {
            self.line += 1;
            let text = text.map_err(|source| JsonError::Read {
                line: self.line,
                source,
            })?;
            if !text.trim().is_empty() {
                return Ok(Some(text));
            }
        }
        Ok(None)
    }
}

/// The entries of a JSON-lines log. Yields entries up to the first error,
/// then the error, then ends.
pub struct JsonEntries<R> {
    lines: Lines<R>,
    next_seq: u64,
    ended: bool,
    done: bool,
}

impl<R: BufRead> JsonEntries<R> {
    /// Whether an End entry has been read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn next_entry(&mut self) -> Result<Option<Entry>, JsonError> {
        let Some(text) = self.lines.next_text()? else {
            return Ok(None);
        };
        let line = self.lines.line;
        let entry: Entry = parse(line, &text)?;
        if self.ended {
            return Err(JsonError::AfterEnd {
                line,
                seq: entry.seq,
            });
        }
        if entry.seq != self.next_seq {
            return Err(JsonError::Sequence {
                line,
                expected: self.next_seq,
                found: entry.seq,
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        self.ended = matches!(entry.event, Event::End { .. });
        Ok(Some(entry))
    }
}

impl<R: BufRead> Iterator for JsonEntries<R> {
    type Item = Result<Entry, JsonError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_entry().transpose();
        self.done = !matches!(item, Some(Ok(_)));
        item
    }
}
