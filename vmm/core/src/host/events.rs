//! The events file of a primary or backup (`--events FILE`): JSON lines, one
//! per thing that happened, with a wall-clock timestamp, for `ftvm demo` and
//! for people reading what a server did. Key events are echoed to stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::host::histogram::Histogram;

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The events a server has written to `path` so far. A line still being
/// written is cut short; it is skipped and read next time.
pub fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
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

    /// Records `event` with `fields` (a JSON object); `say` also tells the
    /// user on stderr.
    pub fn emit(&self, event: &str, fields: Value, say: Option<String>) {
        if let Some(line) = say {
            eprintln!("ftvm {}: {line}", self.name);
        }
        let Some(file) = &self.file else { return };
        let mut record = json!({ "t_ns": unix_ns(), "event": event, "server": self.name });
        if let (Some(obj), Value::Object(extra)) = (record.as_object_mut(), fields) {
            obj.extend(extra);
        }
        // One write per line, not one per JSON token: cheaper, and a reader
        // never sees half a line.
        let line = format!("{record}\n");
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
}

pub const ROLE_BACKUP: u8 = 0;
pub const ROLE_PRIMARY: u8 = 1;
pub const STATUS_INTERVAL: Duration = Duration::from_millis(250);

impl StatusBoard {
    pub fn json(&self) -> Value {
        let role = if self.role.load(Ordering::Relaxed) == ROLE_PRIMARY {
            "primary"
        } else {
            "backup"
        };
        json!({
            "role": role,
            "view": self.view.load(Ordering::Relaxed),
            "exits": self.exits.load(Ordering::Relaxed),
            "served": self.served.load(Ordering::Relaxed),
            "lag_exits": self.lag_exits.load(Ordering::Relaxed),
            "lag_ms": self.lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            "lag_p50_ms": self.lag.quantile_ms(0.50),
            "lag_p99_ms": self.lag.quantile_ms(0.99),
            "lag_max_ms": self.lag.max_ms(),
            "lag_samples": self.lag.count(),
            "output_hold_p50_ms": self.output_hold.quantile_ms(0.50),
            "output_hold_p99_ms": self.output_hold.quantile_ms(0.99),
            "outputs_held": self.output_hold.count(),
            "log_entries": self.log_entries.load(Ordering::Relaxed),
            "log_bytes": self.log_bytes.load(Ordering::Relaxed),
        })
    }

    /// Writes a `status` event every interval until the process ends.
    pub fn report_periodically(board: Arc<StatusBoard>, events: Arc<Events>) {
        let spawned = std::thread::Builder::new()
            .name("ftvm-status".into())
            .spawn(move || loop {
                std::thread::sleep(STATUS_INTERVAL);
                events.emit("status", board.json(), None);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the status reporter: {e}");
        }
    }
}
