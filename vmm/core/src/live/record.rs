//! The recorder: the log a live run writes (`ftvm record`), one entry per
//! nondeterministic input, digest and output, closed with an End entry
//! however the run stops.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use logchannel::{Event, LogHeader, LogStats, LogWriter, Position};

use crate::live::EntrySink;
use crate::run::run_loop::{RunError, StopReason};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot create the log {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the log {path}: {source}")]
    Start {
        path: PathBuf,
        source: logchannel::LogError,
    },
}

/// The `ReplayConfig.extra` key that says output checks refresh the memory
/// hash (value `refresh`); without it they use the last digest's.
pub const OUTPUT_MEMORY_KEY: &str = "output_memory";

pub fn output_memory(config: &logchannel::ReplayConfig) -> bool {
    config
        .extra
        .get(OUTPUT_MEMORY_KEY)
        .is_some_and(|v| v == "refresh")
}

pub struct Recorder {
    writer: Option<LogWriter<BufWriter<File>>>,
    digest_interval: u64,
    output_memory: bool,
    last_pos: Position,
    stats: LogStats,
}

impl EntrySink for Recorder {
    fn log(&mut self, pos: Position, event: Event) -> Result<u64, RunError> {
        match &mut self.writer {
            Some(w) => {
                let seq = w.append(pos, event)?;
                self.last_pos = pos;
                Ok(seq)
            }
            None => Ok(0),
        }
    }

    fn output_memory(&self) -> bool {
        self.output_memory
    }

    fn digest_due(&self, pos: Position) -> bool {
        crate::run::digest::periodic_due(self.digest_interval, pos.exits)
    }

    fn flush(&mut self) -> Result<(), RunError> {
        if let Some(w) = &mut self.writer {
            w.flush()?;
        }
        Ok(())
    }

    /// Writes the End entry and syncs the file.
    fn end(&mut self, pos: Position, reason: StopReason) -> Result<(), RunError> {
        self.close(pos, format!("{reason:?}"))
    }

    /// Ends the log at the last logged position.
    fn abort(&mut self, why: &str) -> Result<(), RunError> {
        if self.writer.is_none() {
            return Ok(());
        }
        self.close(self.last_pos, format!("aborted: {why}"))
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "log: {} entries, {} bytes",
            self.stats.entries(),
            self.stats.total_bytes
        ))
    }
}

impl Recorder {
    pub fn create(path: &Path, header: &LogHeader) -> Result<Self, RecordError> {
        let file = File::create(path).map_err(|source| RecordError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let writer =
            LogWriter::new(BufWriter::with_capacity(1 << 16, file), header).map_err(|source| {
                RecordError::Start {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        Ok(Recorder {
            writer: Some(writer),
            digest_interval: header.config.digest_interval,
            output_memory: output_memory(&header.config),
            last_pos: Position { exits: 0, rip: 0 },
            stats: LogStats::default(),
        })
    }

    fn close(&mut self, pos: Position, reason: String) -> Result<(), RunError> {
        if let Some(w) = self.writer.take() {
            self.stats = w.stats().clone();
            let mut out = w.finish(pos, reason)?;
            use std::io::Write;
            out.flush().map_err(logchannel::LogError::Write)?;
            out.get_ref()
                .sync_all()
                .map_err(logchannel::LogError::Write)?;
        }
        Ok(())
    }
}
