//! A log file as a replay's source. The file is read once to its end before
//! the replay starts, so that a corrupt, truncated or unfinished log, or one
//! recorded with a setting this build does not know, is refused before the
//! guest runs, and the replay knows how many entries it has to apply.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use logchannel::{DigestReason, Entry, Event, FrameError, LogError, LogHeader, LogReader};

use crate::machine::workload::{self, Workload};
use crate::replay::LogSource;
use crate::run::digest::{OUTPUT_MEMORY_KEY, OUTPUT_MEMORY_REFRESH};
use crate::run::run_loop::{end_without_final_digest, RunError};

#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("cannot open the log: {0}")]
    Open(#[source] std::io::Error),
    /// The file ends before its `end` entry: cut inside a frame, or cleanly
    /// between two.
    #[error("the log is truncated: {0}")]
    Truncated(#[source] LogError),
    /// Not a log, another format version, a bad frame: the error names the
    /// byte offset.
    #[error(transparent)]
    Corrupt(LogError),
    /// The `end` entry is there but the final digest before it is not, and
    /// the entry does not say that the recording stopped where none could
    /// be taken.
    #[error("the log is truncated: its end entry #{seq} at exit {exits} has no final digest before it, and its reason {reason:?} does not say that the recording stopped where none could be taken")]
    NoFinalDigest {
        seq: u64,
        exits: u64,
        reason: String,
    },
    #[error("the log was recorded with the setting {key} = {value:?}, which this build does not know; replay must reproduce every setting, so it refuses the log")]
    UnknownSetting { key: String, value: String },
    #[error("the log's setting {key} = {value:?} has a value this build does not know ({known})")]
    UnknownValue {
        key: String,
        value: String,
        known: String,
    },
}

/// The settings of a log header's `config.extra`, as replay must reproduce
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// Output checks refresh the memory hash (`record
    /// --output-memory-hash`).
    pub output_memory: bool,
    /// What the guest ran (`--workload`); absent: the default.
    pub workload: Workload,
}

/// What replay learns from reading a whole log before it starts.
#[derive(Debug, Clone)]
pub struct LogOutline {
    pub header: LogHeader,
    pub settings: Settings,
    /// Entries in the log, its `end` entry included.
    pub entries: u64,
    /// The `end` entry.
    pub end: Entry,
    /// Whether a final digest precedes the `end` entry at its exit; when it
    /// does not, the `end` entry's reason says why.
    pub final_digest: bool,
}

/// The settings in `header.config.extra`, which must all be settings this
/// build knows, each with a value it knows: replay cannot reproduce a
/// setting it does not know.
pub fn settings(header: &LogHeader) -> Result<Settings, LogFileError> {
    let mut settings = Settings::default();
    for (key, value) in &header.config.extra {
        let unknown_value = |known: String| LogFileError::UnknownValue {
            key: key.clone(),
            value: value.clone(),
            known,
        };
        match key.as_str() {
            OUTPUT_MEMORY_KEY if value == OUTPUT_MEMORY_REFRESH => settings.output_memory = true,
            OUTPUT_MEMORY_KEY => {
                return Err(unknown_value(format!(
                    "the one it knows is {OUTPUT_MEMORY_REFRESH:?}"
                )))
            }
            workload::LOG_KEY => {
                settings.workload = value.parse().map_err(|_| {
                    let names: Vec<String> = Workload::ALL
                        .iter()
                        .map(|w| format!("{:?}", w.name()))
                        .collect();
                    unknown_value(format!("the ones it knows are {}", names.join(", ")))
                })?;
            }
            _ => {
                return Err(LogFileError::UnknownSetting {
                    key: key.clone(),
                    value: value.clone(),
                })
            }
        }
    }
    Ok(settings)
}

/// Reads a whole log and checks that it is complete: every frame sound, an
/// `end` entry last, and a final digest at the `end` entry's exit unless
/// that entry says the recording stopped where none could be taken.
pub fn outline<R: Read>(mut reader: LogReader<R>) -> Result<LogOutline, LogFileError> {
    let header = reader.header().clone();
    let settings = settings(&header)?;
    let mut entries = 0;
    let mut end_digest_at = None;
    for entry in reader.by_ref() {
        let entry = entry.map_err(classify)?;
        entries += 1;
        match &entry.event {
            Event::Digest(d) if d.reason == DigestReason::End => {
                end_digest_at = Some(entry.pos.exits);
            }
            Event::End { reason, .. } => {
                let final_digest = end_digest_at == Some(entry.pos.exits);
                if !final_digest && !end_without_final_digest(reason) {
                    return Err(LogFileError::NoFinalDigest {
                        seq: entry.seq,
                        exits: entry.pos.exits,
                        reason: reason.clone(),
                    });
                }
                return Ok(LogOutline {
                    header,
                    settings,
                    entries,
                    end: entry,
                    final_digest,
                });
            }
            _ => {}
        }
    }
    // The reader yields an error rather than ending without an `end` entry.
    Err(LogFileError::Truncated(LogError::MissingEnd {
        offset: reader.offset(),
        last_seq: entries,
    }))
}

/// A log that stops early is truncated; any other read error means the file
/// is damaged or not a log.
fn classify(e: LogError) -> LogFileError {
    match e {
        LogError::MissingEnd { .. }
        | LogError::Truncated { .. }
        | LogError::Frame(FrameError::Truncated { .. }) => LogFileError::Truncated(e),
        e => LogFileError::Corrupt(e),
    }
}

/// A log file, read entry by entry.
pub struct FileSource<R: Read> {
    reader: LogReader<R>,
    next: Option<Entry>,
}

impl<R: Read> FileSource<R> {
    pub fn new(reader: LogReader<R>) -> Self {
        FileSource { reader, next: None }
    }

    pub fn reader(&self) -> &LogReader<R> {
        &self.reader
    }
}

impl FileSource<BufReader<File>> {
    /// Opens the log at `path`, reads it once to its end to check it (see
    /// [`outline`]), then opens it again for the replay.
    pub fn open(path: &Path) -> Result<(Self, LogOutline), LogFileError> {
        let outline = outline(open_reader(path)?)?;
        Ok((FileSource::new(open_reader(path)?), outline))
    }
}

fn open_reader(path: &Path) -> Result<LogReader<BufReader<File>>, LogFileError> {
    let file = File::open(path).map_err(LogFileError::Open)?;
    LogReader::new(BufReader::with_capacity(1 << 16, file)).map_err(classify)
}

impl<R: Read> LogSource for FileSource<R> {
    fn peek(&mut self, _exits: u64) -> Result<Option<&Entry>, RunError> {
        if self.next.is_none() {
            self.next = match self.reader.next() {
                Some(Ok(e)) => Some(e),
                Some(Err(e)) => return Err(RunError::LogRead(e)),
                None => None,
            };
        }
        Ok(self.next.as_ref())
    }

    fn take(&mut self) -> Option<Entry> {
        self.next.take()
    }

    fn finite(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use logchannel::{Digest, LogWriter, Position, Registers, ReplayConfig};

    use super::*;
    use crate::run::run_loop::StopReason;

    fn header(extra: &[(&str, &str)]) -> LogHeader {
        LogHeader::new(
            "vm-test",
            logchannel::image_hash(b"image"),
            64 << 20,
            ReplayConfig {
                digest_interval: 512,
                tick_hz: 100,
                patching: true,
                extra: extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
    }

    fn at(exits: u64) -> Position {
        Position { exits, rip: 0x1000 }
    }

    fn final_digest() -> Event {
        Event::Digest(Digest {
            reason: DigestReason::End,
            regs: Registers::default(),
            mem_hash: 7,
            dirty_pages: Vec::new(),
            output_hash: None,
        })
    }

    /// A log of `events` (at exits 1, 2, …), closed by an `end` entry with
    /// `end` as its reason when there is one.
    fn log(header: &LogHeader, events: Vec<Event>, end: Option<&str>) -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), header).expect("header");
        let mut exits = 0;
        for (i, event) in events.into_iter().enumerate() {
            exits = i as u64 + 1;
            w.append(at(exits), event).expect("append");
        }
        match end {
            Some(reason) => w.finish(at(exits), reason).expect("finish"),
            None => w.into_inner().expect("flush"),
        }
    }

    fn outline_of(bytes: Vec<u8>) -> Result<LogOutline, LogFileError> {
        outline(LogReader::new(Cursor::new(bytes)).map_err(classify)?)
    }

    fn timeout() -> String {
        StopReason::Timeout.end_reason()
    }

    #[test]
    fn a_complete_log_is_outlined() {
        let h = header(&[]);
        let bytes = log(
            &h,
            vec![Event::Rdtsc { value: 1 }, final_digest()],
            Some(&timeout()),
        );
        let o = outline_of(bytes).expect("complete");
        assert_eq!(o.entries, 3);
        assert!(o.final_digest);
        assert!(!o.settings.output_memory);
        assert_eq!(o.end.seq, 3);
    }

    #[test]
    fn a_log_without_its_final_digest_is_truncated() {
        let h = header(&[]);
        let bytes = log(&h, vec![Event::Rdtsc { value: 1 }], Some(&timeout()));
        let err = outline_of(bytes).expect_err("no final digest");
        assert!(
            matches!(
                err,
                LogFileError::NoFinalDigest {
                    seq: 2,
                    exits: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn a_final_digest_at_another_exit_is_not_the_final_digest() {
        let h = header(&[]);
        let bytes = log(
            &h,
            vec![final_digest(), Event::Rdtsc { value: 1 }],
            Some(&timeout()),
        );
        let err = outline_of(bytes).expect_err("digest one exit early");
        assert!(matches!(err, LogFileError::NoFinalDigest { .. }), "{err}");
    }

    #[test]
    fn a_log_without_its_end_entry_is_truncated() {
        let h = header(&[]);
        let mut bytes = log(&h, vec![Event::Rdtsc { value: 1 }, final_digest()], None);
        let err = outline_of(bytes.clone()).expect_err("no end");
        assert!(matches!(err, LogFileError::Truncated(_)), "{err}");
        assert!(err.to_string().starts_with("the log is truncated"), "{err}");
        bytes.pop();
        let err = outline_of(bytes).expect_err("cut inside a frame");
        assert!(matches!(err, LogFileError::Truncated(_)), "{err}");
    }

    #[test]
    fn a_damaged_log_is_corrupt_with_the_offset() {
        let h = header(&[]);
        let mut bytes = log(
            &h,
            vec![Event::Rdtsc { value: 1 }, final_digest()],
            Some(&timeout()),
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let err = outline_of(bytes).expect_err("bad CRC");
        assert!(matches!(err, LogFileError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("offset"), "{err}");
    }

    #[test]
    fn a_recording_cut_short_says_so_and_needs_no_final_digest() {
        let h = header(&[]);
        for reason in [
            StopReason::RequestedBetweenExits.end_reason(),
            format!(
                "{}the log write failed",
                crate::run::run_loop::ABORTED_END_PREFIX
            ),
        ] {
            let bytes = log(&h, vec![Event::Rdtsc { value: 1 }], Some(&reason));
            let o = outline_of(bytes).expect("cut short is complete");
            assert!(!o.final_digest);
            assert!(matches!(&o.end.event, Event::End { reason: r, .. } if *r == reason));
        }
    }

    #[test]
    fn an_unknown_setting_is_refused_by_name() {
        let h = header(&[("mac", "52:54:00:12:34:56")]);
        let bytes = log(&h, vec![final_digest()], Some(&timeout()));
        let err = outline_of(bytes).expect_err("unknown key");
        assert!(
            matches!(&err, LogFileError::UnknownSetting { key, .. } if key == "mac"),
            "{err}"
        );
        assert!(err.to_string().contains("mac"), "{err}");
    }

    #[test]
    fn the_output_memory_setting_is_read_and_an_unknown_value_refused() {
        let on = header(&[(OUTPUT_MEMORY_KEY, OUTPUT_MEMORY_REFRESH)]);
        assert!(settings(&on).expect("known").output_memory);
        let odd = header(&[(OUTPUT_MEMORY_KEY, "sometimes")]);
        let err = settings(&odd).expect_err("unknown value");
        assert!(matches!(err, LogFileError::UnknownValue { .. }), "{err}");
    }

    #[test]
    fn the_workload_setting_is_read_and_an_unknown_one_refused() {
        assert_eq!(settings(&header(&[])).expect("none").workload, Workload::Kv);
        let race = header(&[(workload::LOG_KEY, "race")]);
        assert_eq!(settings(&race).expect("known").workload, Workload::Race);
        let odd = header(&[(workload::LOG_KEY, "chess")]);
        let err = settings(&odd).expect_err("unknown workload");
        assert!(err.to_string().contains("chess"), "{err}");
    }
}
