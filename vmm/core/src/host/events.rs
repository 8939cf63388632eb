//! The events file of a primary or backup (`--events FILE`): JSON lines, one
//! per thing that happened, with a wall-clock timestamp, for `ftvm demo` and
//! for people reading what a server did. Key events are echoed to stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::host::histogram::Histogram;

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A server's role in its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRole {
    Primary,
    Backup,
}

/// One thing that happened to a primary or backup: the one type that both
/// writes the events file and reads it back (`ftvm demo`, the benchmarks,
/// the end-to-end tests), so that a renamed field breaks the build, not a
/// string match somewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The server took a role in a view; a primary names its backup once
    /// one has connected.
    Role {
        role: ServerRole,
        view: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backup: Option<String>,
    },
    /// The peer fell silent or broke the channel, or its replay stood
    /// still (docs/fault-tolerance.md, "What counts as a failure").
    FailureDetected { peer: ServerRole, detail: String },
    /// The peer stopped on purpose and said goodbye: not a failure.
    PeerLeft { peer: ServerRole, reason: String },
    /// A primary that had not written to its backup for half the failure
    /// timeout (it was paused) asked the arbiter, and is still the primary.
    Confirmed { view: u64 },
    /// Another server holds this one's place in the view: it stops, and
    /// releases nothing more.
    Deposed { view: u64, detail: String },
    /// A backup replayed everything its primary sent and claims the view.
    CaughtUp { view: u64, detail: String },
    /// Test-and-set for `view` was won.
    Tas { view: u64, won: bool },
    /// Test-and-set for `view` was lost: this server stops.
    Lost { view: u64 },
    /// The arbiter could not be reached for `view`: nobody goes live.
    ArbiterUnreachable { view: u64 },
    /// A former backup serves clients as the primary of `view`.
    Live { view: u64 },
    /// The run ended without an error.
    Stopped { reason: String },
    /// The backup's replay parted ways with the primary's log.
    Diverged { detail: String },
    /// A primary began sending its state to the backup `view` names.
    TransferStarted { view: u64, backup: String },
    /// One pre-copy round went out: `pages` pages, `bytes` on the wire so
    /// far in this transfer.
    TransferRound {
        view: u64,
        round: u32,
        pages: u64,
        bytes: u64,
    },
    /// The backup restored the state sent at the cut and verified its
    /// digest: the VM is fault tolerant again. `pause_ms` is how long the
    /// guest stood still at the cut, `transfer_ms` the whole transfer.
    Protected {
        view: u64,
        backup: String,
        rounds: u32,
        pages: u64,
        bytes: u64,
        pause_ms: f64,
        transfer_ms: f64,
    },
    /// A state transfer did not complete; the primary goes on alone, a
    /// joining backup never goes live.
    TransferFailed { view: u64, detail: String },
    /// A joining backup restored its primary's state at exit `exits` and
    /// replays the log from there.
    Restored {
        view: u64,
        exits: u64,
        rounds: u32,
        bytes: u64,
    },
    /// What the server is doing, every [`STATUS_INTERVAL`].
    Status(Status),
}

/// A line of the events file: when, which server, what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub t_ns: u64,
    pub server: String,
    #[serde(flatten)]
    pub event: ServerEvent,
}

/// The status a server reports every [`STATUS_INTERVAL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub role: ServerRole,
    pub view: u64,
    pub exits: u64,
    pub served: u64,
    pub lag_exits: u64,
    pub lag_ms: f64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub lag_samples: u64,
    pub output_hold_p50_ms: f64,
    pub output_hold_p99_ms: f64,
    pub outputs_held: u64,
    pub log_entries: u64,
    pub log_bytes: u64,
    /// A state transfer under way (0: none): its pre-copy round and the
    /// bytes it has sent or received.
    #[serde(default)]
    pub transfer_round: u32,
    #[serde(default)]
    pub transfer_bytes: u64,
}

impl Status {
    /// What a server reports before it has done anything.
    pub fn zero(role: ServerRole) -> Status {
        Status {
            role,
            view: 0,
            exits: 0,
            served: 0,
            lag_exits: 0,
            lag_ms: 0.0,
            lag_p50_ms: 0.0,
            lag_p99_ms: 0.0,
            lag_max_ms: 0.0,
            lag_samples: 0,
            output_hold_p50_ms: 0.0,
            output_hold_p99_ms: 0.0,
            outputs_held: 0,
            log_entries: 0,
            log_bytes: 0,
            transfer_round: 0,
            transfer_bytes: 0,
        }
    }
}

/// The events a server has written to `path` so far. A line still being
/// written is cut short; it is skipped and read next time.
pub fn read_events(path: &Path) -> Vec<EventRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<EventRecord>(l).ok())
        .collect()
}

pub struct Events {
    name: String,
    file: Option<Mutex<File>>,
}

impl Events {
    pub fn open(name: &str, path: Option<&Path>) -> std::io::Result<Arc<Events>> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
            None => None,
        };
        Ok(Arc::new(Events {
            name: name.to_string(),
            file,
        }))
    }

    /// Records `event`; `say` also tells the user on stderr.
    pub fn emit(&self, event: ServerEvent, say: Option<String>) {
        if let Some(line) = say {
            eprintln!("ftvm {}: {line}", self.name);
        }
        let Some(file) = &self.file else { return };
        let record = EventRecord {
            t_ns: unix_ns(),
            server: self.name.clone(),
            event,
        };
        let line = match serde_json::to_string(&record) {
            Ok(line) => line + "\n",
            Err(e) => {
                tracing::warn!("cannot encode an event: {e}");
                return;
            }
        };
        // One write per line, not one per JSON token: cheaper, and a reader
        // never sees half a line.
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!("writing the events file failed: {e}");
        }
    }
}

/// What a server is doing, updated by the run loop and reported every
/// [`STATUS_INTERVAL`] as a `status` event.
#[derive(Default)]
pub struct StatusBoard {
    pub role: AtomicU8,
    pub view: AtomicU64,
    pub exits: AtomicU64,
    pub served: Arc<AtomicU64>,
    pub lag_exits: AtomicU64,
    pub lag_us: AtomicU64,
    /// The lag at every exit of a primary with a backup, since it started.
    pub lag: Histogram,
    /// How long each output of a primary waited for the backup's
    /// acknowledgement (the output rule), since it started.
    pub output_hold: Arc<Histogram>,
    pub log_entries: AtomicU64,
    pub log_bytes: AtomicU64,
    pub transfer_round: std::sync::atomic::AtomicU32,
    pub transfer_bytes: AtomicU64,
}

pub const ROLE_BACKUP: u8 = 0;
pub const ROLE_PRIMARY: u8 = 1;
pub const STATUS_INTERVAL: Duration = Duration::from_millis(250);

impl StatusBoard {
    pub fn status(&self) -> Status {
        let role = if self.role.load(Ordering::Relaxed) == ROLE_PRIMARY {
            ServerRole::Primary
        } else {
            ServerRole::Backup
        };
        Status {
            role,
            view: self.view.load(Ordering::Relaxed),
            exits: self.exits.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            lag_exits: self.lag_exits.load(Ordering::Relaxed),
            lag_ms: self.lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            lag_p50_ms: self.lag.quantile_ms(0.50),
            lag_p99_ms: self.lag.quantile_ms(0.99),
            lag_max_ms: self.lag.max_ms(),
            lag_samples: self.lag.count(),
            output_hold_p50_ms: self.output_hold.quantile_ms(0.50),
            output_hold_p99_ms: self.output_hold.quantile_ms(0.99),
            outputs_held: self.output_hold.count(),
            log_entries: self.log_entries.load(Ordering::Relaxed),
            log_bytes: self.log_bytes.load(Ordering::Relaxed),
            transfer_round: self.transfer_round.load(Ordering::Relaxed),
            transfer_bytes: self.transfer_bytes.load(Ordering::Relaxed),
        }
    }

    /// Writes a `status` event every interval until the process ends.
    pub fn report_periodically(board: Arc<StatusBoard>, events: Arc<Events>) {
        let spawned = std::thread::Builder::new()
            .name("ftvm-status".into())
            .spawn(move || loop {
                std::thread::sleep(STATUS_INTERVAL);
                events.emit(ServerEvent::Status(board.status()), None);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the status reporter: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_back_as_written() {
        let dir = std::env::temp_dir().join(format!("ftvm-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let events = Events::open("vmm1", Some(&path)).expect("open");
        let written = [
            ServerEvent::Role {
                role: ServerRole::Primary,
                view: 2,
                backup: Some("vmm2".into()),
            },
            ServerEvent::Tas { view: 2, won: true },
            ServerEvent::Status(Status {
                lag_ms: 1.5,
                ..Status::zero(ServerRole::Backup)
            }),
        ];
        for e in &written {
            events.emit(e.clone(), None);
        }
        // A line cut short by a crash is skipped, not an error.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"t_ns\": 1, \"event\": \"ro"))
            .expect("append");
        let read: Vec<ServerEvent> = read_events(&path).into_iter().map(|r| r.event).collect();
        assert_eq!(read, written);
        let line = std::fs::read_to_string(&path).expect("read");
        assert!(line.starts_with("{\"t_ns\":"), "{line}");
        assert!(line.contains("\"event\":\"role\""), "{line}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
