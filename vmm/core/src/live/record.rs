//! The recorder: the log a live run writes (`ftvm record`), one entry per
//! nondeterministic input, digest and output, closed with an End entry
//! however the run stops.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use logchannel::{Event, LogHeader, LogStats, LogWriter, Position, ReplayConfig};

use crate::live::EntrySink;
use crate::machine::workload::{self, Workload};
use crate::run::digest;
use crate::run::run_loop::{RunError, StopReason, ABORTED_END_PREFIX};

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

/// The settings a recording stores in its header, which its replay must
/// reproduce: the digest interval, the timer rate, patching (always on
/// when recording), the workload when it is not the default one and, with
/// `output_memory_hash`, output checks that refresh the memory hash.
pub fn recording_config(
    digest_interval: u64,
    tick_hz: u32,
    workload: Workload,
    output_memory_hash: bool,
) -> ReplayConfig {
    let mut extra = BTreeMap::new();
    if workload != Workload::default() {
        extra.insert(workload::LOG_KEY.to_string(), workload.name().to_string());
    }
    if output_memory_hash {
        extra.insert(
            digest::OUTPUT_MEMORY_KEY.to_string(),
            digest::OUTPUT_MEMORY_REFRESH.to_string(),
        );
    }
    ReplayConfig {
        digest_interval,
        tick_hz,
        patching: true,
        extra,
    }
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

    /// Writes the End entry and syncs the file. The final digest before it
    /// was logged by the live mode, unless the stop took the vCPU between
    /// two exits, which `reason` then says.
    fn end(&mut self, pos: Position, reason: StopReason) -> Result<(), RunError> {
        self.close(pos, reason.end_reason())
    }

    /// Ends the log at the last logged position, with no final digest: the
    /// `end` entry says the recording was aborted.
    fn abort(&mut self, why: &str) -> Result<(), RunError> {
        if self.writer.is_none() {
            return Ok(());
        }
        self.close(self.last_pos, format!("{ABORTED_END_PREFIX}{why}"))
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
            output_memory: digest::output_memory_refreshed(&header.config),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9, item 4: `--output-memory-hash` built this setting and then
    /// left it out of the header.
    #[test]
    fn the_output_memory_choice_is_in_the_recorded_settings() {
        let on = recording_config(512, 100, Workload::Kv, true);
        assert!(digest::output_memory_refreshed(&on));
        let off = recording_config(512, 100, Workload::Kv, false);
        assert!(!digest::output_memory_refreshed(&off));
        assert!(off.extra.is_empty(), "{off:?}");
        assert_ne!(on, off);
    }

    #[test]
    fn a_workload_other_than_the_default_is_in_the_recorded_settings() {
        let race = recording_config(512, 100, Workload::Race, false);
        assert_eq!(
            race.extra.get(workload::LOG_KEY).map(String::as_str),
            Some("race")
        );
    }
}
