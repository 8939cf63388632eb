//! The durable state: one JSON file in the state directory, replaced
//! atomically (temp file, fsync, rename, fsync of the directory) on every
//! decision, and a lock file that keeps a second arbiter off the directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::view::{Member, View, VmState};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";
const TEMP_FILE: &str = "state.json.tmp";
const LOCK_FILE: &str = "lock";
/// The version of the state file's layout, stored in its `format` field.
pub const STATE_FORMAT: u32 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "state file {} is corrupt: {detail}. The arbiter will not start rather than forget its \
         decisions: restore the file, or remove it only if no server of any VM it names is \
         still running",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    /// Two arbiters deciding from one directory would each grant a view
    /// its own winner.
    #[error(
        "state directory {} is in use by another arbiter (the lock on {} is held)",
        dir.display(),
        lock.display()
    )]
    Locked { dir: PathBuf, lock: PathBuf },
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    vms: BTreeMap<String, VmRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmRecord {
    view: View,
    acknowledged: bool,
    decided: Vec<Decision>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    view: u64,
    winner: Member,
}

/// An open, locked state directory. The lock lasts as long as this value.
#[derive(Debug)]
pub(crate) struct StateDir {
    dir: PathBuf,
    file: PathBuf,
    temp: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Locks `dir` (creating it if needed) and reads the decisions in it.
    pub fn open(dir: &Path) -> Result<(StateDir, BTreeMap<String, VmState>), StoreError> {
        fs::create_dir_all(dir).map_err(io_failed("create", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_failed("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_owned(),
                    lock: lock_path,
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_failed("lock", &lock_path)(e)),
        }
        let store = StateDir {
            dir: dir.to_owned(),
            file: dir.join(STATE_FILE),
            temp: dir.join(TEMP_FILE),
            _lock: lock,
        };
        // A temp file is a save that never reached its rename, so its
        // decision was never answered and must not be taken.
        match fs::remove_file(&store.temp) {
            Ok(()) => warn!(path = %store.temp.display(), "removed an unfinished save"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failed("remove", &store.temp)(e)),
        }
        let bytes = match fs::read(&store.file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                info!(dir = %dir.display(), "no state file yet: starting with no views");
                return Ok((store, BTreeMap::new()));
            }
            Err(e) => return Err(io_failed("read", &store.file)(e)),
        };
        let vms = parse(&bytes).map_err(|detail| StoreError::Corrupt {
            path: store.file.clone(),
            detail,
        })?;
        info!(path = %store.file.display(), vms = vms.len(), "state loaded");
        Ok((store, vms))
    }

    /// Makes `vms` the durable state; when this returns Ok, it survives a
    /// crash of the arbiter or the machine.
    pub fn save(&self, vms: &BTreeMap<String, VmState>) -> Result<(), StoreError> {
        let file = StateFile {
            format: STATE_FORMAT,
            vms: vms
                .iter()
                .map(|(vm, state)| {
                    let record = VmRecord {
                        view: state.view.clone(),
                        acknowledged: state.acknowledged,
                        decided: state
                            .decided
                            .iter()
                            .map(|(&view, winner)| Decision {
                                view,
                                winner: winner.clone(),
                            })
                            .collect(),
                    };
                    (vm.clone(), record)
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Io {
            action: "encode the state for",
            path: self.file.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        let mut temp = File::create(&self.temp).map_err(io_failed("create", &self.temp))?;
        temp.write_all(&bytes)
            .map_err(io_failed("write", &self.temp))?;
        temp.sync_all().map_err(io_failed("fsync", &self.temp))?;
        drop(temp);
        fs::rename(&self.temp, &self.file).map_err(io_failed("rename over", &self.file))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_failed("fsync", &self.dir))?;
        Ok(())
    }
}

fn io_failed(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<String, VmState>, String> {
    let format: FormatOnly =
        serde_json::from_slice(bytes).map_err(|e| format!("not a state file: {e}"))?;
    if format.format != STATE_FORMAT {
        return Err(format!(
            "it has format {}, this arbiter reads format {STATE_FORMAT}",
            format.format
        ));
    }
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut vms = BTreeMap::new();
    for (vm, record) in file.vms {
        let mut decided = BTreeMap::new();
        for d in record.decided {
            if decided.insert(d.view, d.winner).is_some() {
                return Err(format!(
                    "VM {vm:?}: two winners recorded for view {}",
                    d.view
                ));
            }
        }
        let state = VmState {
            view: record.view,
            acknowledged: record.acknowledged,
            decided,
        };
        state.check().map_err(|e| format!("VM {vm:?}: {e}"))?;
        vms.insert(vm, state);
    }
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn sample() -> BTreeMap<String, VmState> {
        let a = Member {
            id: "a".into(),
            service_addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            log_addr: Some(SocketAddr::from(([127, 0, 0, 1], 6000))),
        };
        let mut state = VmState {
            view: View {
                number: 3,
                primary: Some(a.clone()),
                backup: None,
            },
            acknowledged: true,
            decided: BTreeMap::new(),
        };
        state.decided.insert(2, a);
        BTreeMap::from([("vm \"1\"".to_owned(), state)])
    }

    #[test]
    fn saved_state_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vms) = StateDir::open(dir.path()).unwrap();
        assert!(vms.is_empty());
        store.save(&sample()).unwrap();
        drop(store);
        let (_store, vms) = StateDir::open(dir.path()).unwrap();
        assert_eq!(vms, sample());
    }

    #[test]
    fn second_opener_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateDir::open(dir.path()).unwrap();
        let err = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[test]
    fn unfinished_save_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TEMP_FILE), b"half a decision").unwrap();
        let (_store, vms) = StateDir::open(dir.path()).unwrap();
        assert!(vms.is_empty());
        assert!(!dir.path().join(TEMP_FILE).exists());
    }

    #[test]
    fn corruption_is_named() {
        let cases: &[(&str, &str)] = &[
            ("{\"format\": 1, \"vms\": {", "EOF"),
            ("[1, 2]", "not a state file"),
            ("{\"format\": 7, \"vms\": {}}", "format 7"),
            (
                "{\"format\": 1, \"vms\": {}, \"extra\": 1}",
                "unknown field `extra`",
            ),
            (
                "{\"format\": 1, \"vms\": {\"x\": {\"view\": {\"number\": 2, \"primary\": null, \
                 \"backup\": null}, \"acknowledged\": false, \"decided\": []}}}",
                "view 2 has no primary",
            ),
        ];
        for (text, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(STATE_FILE), text).unwrap();
            let err = StateDir::open(dir.path()).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            assert!(message.contains(STATE_FILE), "{message}");
        }
    }
}
