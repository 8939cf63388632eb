//! How a replay that raised no error ended: reproduced to the end of its
//! log, or stopped before it (and then it never claims that everything
//! matched).

use std::fmt;

use serde::Serialize;

use crate::run::run_loop::StopReason;

/// How a replay that raised no error ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// The replay applied every entry up to the log's `end` entry and every
    /// digest and output matched. `cut_short` is the `end` entry's reason
    /// when the recording stopped where no final digest could be taken
    /// (between two exits, or because it failed), so the state at the end
    /// was not compared.
    Reproduced {
        exits: u64,
        entries: u64,
        cut_short: Option<String>,
    },
    /// The replay was stopped (SIGINT, SIGTERM, `--timeout`) before the end
    /// of its log: what it applied matched, the rest was not checked.
    Stopped {
        reason: StopReason,
        exits: u64,
        applied: u64,
        /// The log's entry count, when the replay knows it (a file).
        total: Option<u64>,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Verdict::Reproduced {
                exits,
                entries,
                cut_short: None,
            } => write!(
                f,
                "{exits} exits replayed, all {entries} entries applied; every digest and output matched"
            ),
            Verdict::Reproduced {
                exits,
                entries,
                cut_short: Some(reason),
            } => write!(
                f,
                "{exits} exits replayed, all {entries} entries applied and every digest and output in the log matched; the recording was cut short (its end entry says {reason:?}), so the log has no final digest and the state at its end was not compared"
            ),
            Verdict::Stopped {
                reason,
                exits,
                applied,
                total,
            } => {
                write!(f, "STOPPED ({reason:?}) before the end of the log: ")?;
                match total {
                    Some(total) => write!(f, "{applied} of {total} entries applied")?,
                    None => write!(f, "{applied} entries applied")?,
                }
                write!(
                    f,
                    ", exit {exits} reached; the entries applied matched, the rest of the log was not checked"
                )
            }
        }
    }
}
