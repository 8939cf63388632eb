//! What one `ftvm` server is, as a type: the command line is built from it
//! in one place, so that a renamed flag is renamed here only.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter::ArbiterAddr;
use ftvm_core::machine::workload::Workload;

/// Which command the server runs.
#[derive(Clone, Debug)]
pub enum Role {
    /// `ftvm arbiter`, keeping its decisions in `state`.
    Arbiter { state: PathBuf },
    /// `ftvm run`.
    Run,
    /// `ftvm record`, writing `log`.
    Record { log: PathBuf },
    /// `ftvm primary`, its log channel on `log_listen`; the arbiter gives
    /// backups `log_advertise` instead when it is set (a proxy's address).
    Primary {
        membership: Membership,
        log_listen: SocketAddr,
        log_advertise: Option<SocketAddr>,
    },
    /// `ftvm backup`.
    Backup { membership: Membership },
}

/// How a primary or backup takes part in its pair.
#[derive(Clone, Debug)]
pub struct Membership {
    /// The built-in arbiter's address, or an etcd cluster's endpoints.
    pub arbiter: ArbiterAddr,
    /// The VM's name at the arbiter.
    pub vm_id: String,
    pub knobs: Knobs,
}

/// The fault-tolerance knobs; each `None` leaves the server's default.
#[derive(Clone, Debug, Default)]
pub struct Knobs {
    pub failure_timeout_ms: Option<u64>,
    pub window_entries: Option<u64>,
    pub max_lag_ms: Option<f64>,
    pub batch_delay_ms: Option<f64>,
}

/// The guest a server runs; `None` leaves the server's default.
#[derive(Clone, Debug, Default)]
pub struct Guest {
    pub kernel: Option<PathBuf>,
    /// Memory size as `ftvm` takes it (`64M`).
    pub mem: Option<String>,
    /// What the embedded guest runs (`--workload`).
    pub workload: Option<Workload>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Its id at the arbiter (primary, backup), and its files' names.
    pub name: String,
    pub role: Role,
    /// `--service`, or an arbiter's `--listen`.
    pub address: SocketAddr,
    /// Where its files go (`<name>.log`, `.serial.txt`, `.events.jsonl`,
    /// `.stats.json`); `None`: a temporary directory that goes with the
    /// process.
    pub dir: Option<PathBuf>,
    pub guest: Guest,
    /// The guest's console to `<name>.serial.txt`; else to /dev/null.
    pub console: bool,
    /// The run's counters to `<name>.stats.json` (`run`, `record`).
    pub stats: bool,
    /// Its stderr to this process's, stdout nowhere (the benchmarks show
    /// the VMM's own summary); else both to `<name>.log`.
    pub inherit_stderr: bool,
    /// `--timeout`: every guest stops by itself, whatever becomes of the
    /// process that started it. An arbiter has none.
    pub time_limit: Duration,
    /// More arguments, after the others.
    pub extra: Vec<OsString>,
}

impl ServerConfig {
    pub fn new(name: &str, role: Role, address: SocketAddr, time_limit: Duration) -> ServerConfig {
        ServerConfig {
            name: name.to_owned(),
            role,
            address,
            dir: None,
            guest: Guest::default(),
            console: false,
            stats: false,
            inherit_stderr: false,
            time_limit,
            extra: Vec::new(),
        }
    }

    /// `ftvm arbiter` on `listen`.
    pub fn arbiter(listen: SocketAddr, state: &Path) -> ServerConfig {
        let role = Role::Arbiter {
            state: state.to_owned(),
        };
        ServerConfig::new("arbiter", role, listen, Duration::ZERO)
    }

    fn file(&self, dir: &Path, suffix: &str) -> PathBuf {
        dir.join(format!("{}.{suffix}", self.name))
    }

    pub(crate) fn log_file(&self, dir: &Path) -> Option<PathBuf> {
        (!self.inherit_stderr).then(|| self.file(dir, "log"))
    }

    pub(crate) fn serial_file(&self, dir: &Path) -> Option<PathBuf> {
        let guest = !matches!(self.role, Role::Arbiter { .. });
        (guest && self.console).then(|| self.file(dir, "serial.txt"))
    }

    pub(crate) fn events_file(&self, dir: &Path) -> Option<PathBuf> {
        matches!(self.role, Role::Primary { .. } | Role::Backup { .. })
            .then(|| self.file(dir, "events.jsonl"))
    }

    pub(crate) fn stats_file(&self, dir: &Path) -> Option<PathBuf> {
        (self.stats && matches!(self.role, Role::Run | Role::Record { .. }))
            .then(|| self.file(dir, "stats.json"))
    }

    /// The command line, its files in `dir`.
    pub(crate) fn args(&self, dir: &Path) -> Vec<OsString> {
        let mut args = Args::default();
        let membership = match &self.role {
            Role::Arbiter { state } => {
                args.word("arbiter");
                args.flag("--listen", self.address.to_string());
                args.flag("--state", state);
                return args.0;
            }
            Role::Run => {
                args.word("run");
                None
            }
            Role::Record { log } => {
                args.word("record");
                args.flag("--log", log);
                None
            }
            Role::Primary {
                membership,
                log_listen,
                log_advertise,
            } => {
                args.word("primary");
                args.flag("--log-listen", log_listen.to_string());
                if let Some(advertise) = log_advertise {
                    args.flag("--log-advertise", advertise.to_string());
                }
                Some(membership)
            }
            Role::Backup { membership } => {
                args.word("backup");
                Some(membership)
            }
        };
        if let Some(m) = membership {
            args.flag("--vm-id", &m.vm_id);
            args.flag("--id", &self.name);
            args.flag("--arbiter", m.arbiter.to_string());
            args.option("--failure-timeout-ms", m.knobs.failure_timeout_ms);
            args.option("--window-entries", m.knobs.window_entries);
            args.option("--max-lag-ms", m.knobs.max_lag_ms);
            args.option("--batch-delay-ms", m.knobs.batch_delay_ms);
        }
        args.flag("--service", self.address.to_string());
        if let Some(kernel) = &self.guest.kernel {
            args.flag("--kernel", kernel);
        }
        args.option("--mem", self.guest.mem.as_ref());
        args.option("--workload", self.guest.workload);
        let serial = self.serial_file(dir);
        args.flag(
            "--serial",
            serial.as_deref().unwrap_or(Path::new("/dev/null")),
        );
        if let Some(events) = self.events_file(dir) {
            args.flag("--events", events);
        }
        if let Some(stats) = self.stats_file(dir) {
            args.flag("--stats-json", stats);
        }
        args.flag("--timeout", self.time_limit.as_secs_f64().to_string());
        args.0.extend(self.extra.iter().cloned());
        args.0
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn word(&mut self, word: &str) {
        self.0.push(word.into());
    }

    fn flag(&mut self, flag: &str, value: impl AsRef<OsStr>) {
        self.0.push(flag.into());
        self.0.push(value.as_ref().to_owned());
    }

    fn option(&mut self, flag: &str, value: Option<impl ToString>) {
        if let Some(value) = value {
            self.flag(flag, value.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(config: &ServerConfig) -> Vec<String> {
        config
            .args(Path::new("/d"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_backup_names_its_pair_its_files_and_its_limit() {
        let membership = Membership {
            arbiter: "127.0.0.1:7100".parse().unwrap(),
            vm_id: "vm".into(),
            knobs: Knobs {
                failure_timeout_ms: Some(300),
                ..Knobs::default()
            },
        };
        let mut config = ServerConfig::new(
            "b",
            Role::Backup { membership },
            "127.0.0.1:7001".parse().unwrap(),
            Duration::from_secs(90),
        );
        config.console = true;
        config.guest.mem = Some("128M".into());
        config.guest.workload = Some(Workload::KvRace);
        assert_eq!(
            words(&config).join(" "),
            "backup --vm-id vm --id b --arbiter 127.0.0.1:7100 --failure-timeout-ms 300 \
             --service 127.0.0.1:7001 --mem 128M --workload kv-race --serial /d/b.serial.txt \
             --events /d/b.events.jsonl --timeout 90"
        );
    }

    #[test]
    fn an_arbiter_has_no_guest_and_no_time_limit() {
        let config = ServerConfig::arbiter("127.0.0.1:7100".parse().unwrap(), Path::new("/s"));
        assert_eq!(
            words(&config).join(" "),
            "arbiter --listen 127.0.0.1:7100 --state /s"
        );
        assert_eq!(config.serial_file(Path::new("/d")), None);
        assert_eq!(config.events_file(Path::new("/d")), None);
    }
}
