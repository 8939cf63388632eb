//! A fault-tolerant pair as a user runs it: an arbiter (`ftvm arbiter`, or
//! a local 3-member etcd cluster), a primary and a backup, each a real
//! process on loopback, the servers with their own events files, all killed
//! when the cluster is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use arbiter::etcd::cluster::{ClusterConfig as EtcdConfig, LocalCluster};
use arbiter::ArbiterAddr;

use ftvm_core::host::events::{EventRecord, ServerEvent, ServerRole};

use super::process::{answers, wait_for, Watched, POLL};
use super::{
    dir_or_temp, free_tcp_addr, free_udp_addr, Guest, Knobs, Launcher, Membership, Process, Proxy,
    Role, ServerConfig,
};

/// How long the arbiter may take to listen (etcd: to elect a leader), and
/// the primary to take its role, before the cluster gives up starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The etcd members outlive the servers' time limit by this much, so that
/// they are there for the servers' last requests and the final checks.
const ETCD_EXTRA_LIFETIME: Duration = Duration::from_secs(120);
/// The key prefix a pair on etcd uses.
pub const ETCD_PREFIX: &str = "ftvm";

/// Which arbiter a pair uses.
#[derive(Clone, Debug, Default)]
pub enum ArbiterKind {
    /// `ftvm arbiter`, with a state directory of its own.
    #[default]
    Builtin,
    /// A local etcd cluster started as this says (its lifetime is the
    /// servers' time limit, plus some).
    Etcd(EtcdConfig),
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Where the servers' logs, events and consoles go; `None`: a temporary
    /// directory that goes with the cluster.
    pub dir: Option<PathBuf>,
    /// The VM's name at the arbiter.
    pub vm_id: String,
    /// The primary's and the backup's ids at the arbiter, and their files'
    /// names.
    pub names: [String; 2],
    pub guest: Guest,
    /// The backup's guest where it differs from the primary's.
    pub backup_guest: Option<Guest>,
    pub knobs: Knobs,
    /// Each server's `--timeout`.
    pub time_limit: Duration,
    /// The guests' consoles to `<name>.serial.txt`; else to /dev/null.
    pub consoles: bool,
    /// The log channel through a [`Proxy`] that can cut it.
    pub proxy: bool,
    pub arbiter: ArbiterKind,
    /// The primary's `--backup-wait`: its guest does not run before the
    /// backup has joined (or this long has passed), so that the backup
    /// checks every output from the first. `None`: the guest runs at once
    /// and the backup joins by state transfer when it comes.
    pub backup_wait: Option<Duration>,
    /// More arguments for the backup (`ftvm chaos` gives it a log channel
    /// listener behind a proxy of its own, for when it is primary).
    pub backup_extra: Vec<std::ffi::OsString>,
}

impl ClusterConfig {
    pub fn new(vm_id: &str, time_limit: Duration) -> ClusterConfig {
        ClusterConfig {
            dir: None,
            vm_id: vm_id.to_owned(),
            names: ["primary".into(), "backup".into()],
            guest: Guest::default(),
            backup_guest: None,
            knobs: Knobs::default(),
            time_limit,
            consoles: false,
            proxy: false,
            arbiter: ArbiterKind::Builtin,
            backup_wait: None,
            backup_extra: Vec::new(),
        }
    }
}

/// A pair's arbiter, as it runs.
pub enum ClusterArbiter {
    Builtin {
        process: Box<Process>,
        config: ServerConfig,
        _state: tempfile::TempDir,
    },
    Etcd(LocalCluster),
}

impl ClusterArbiter {
    /// What the servers' `--arbiter` names.
    pub fn addr(&self) -> ArbiterAddr {
        match self {
            ClusterArbiter::Builtin { config, .. } => ArbiterAddr::Builtin(config.address),
            ClusterArbiter::Etcd(etcd) => ArbiterAddr::Etcd(etcd.addr(ETCD_PREFIX)),
        }
    }

    /// The etcd cluster, if the pair runs on one.
    pub fn etcd(&self) -> Option<&LocalCluster> {
        match self {
            ClusterArbiter::Etcd(etcd) => Some(etcd),
            ClusterArbiter::Builtin { .. } => None,
        }
    }

    /// Kills the arbiter: the process, or every etcd member.
    pub fn kill(&mut self) {
        match self {
            ClusterArbiter::Builtin { process, .. } => process.kill(),
            ClusterArbiter::Etcd(etcd) => {
                for member in 0..etcd.members() {
                    if let Err(e) = etcd.kill(member) {
                        tracing::warn!("cannot kill {}: {e}", etcd.name(member));
                    }
                }
            }
        }
    }

    /// For messages: `arbiter 127.0.0.1:7100 (pid 123)`, or the etcd
    /// members' endpoints.
    pub fn describe(&self) -> String {
        match self {
            ClusterArbiter::Builtin {
                process, config, ..
            } => {
                format!("arbiter {} (pid {})", config.address, process.pid())
            }
            ClusterArbiter::Etcd(etcd) => format!(
                "etcd members {} (data and logs in {})",
                etcd.endpoints().join(", "),
                etcd.dir().display()
            ),
        }
    }

    fn start(
        launcher: &Launcher,
        kind: &ArbiterKind,
        dir: &std::path::Path,
        time_limit: Duration,
    ) -> Result<ClusterArbiter> {
        match kind {
            ArbiterKind::Builtin => {
                // Not in `dir`, which may outlive the cluster: a new cluster
                // must not find an old one's decisions.
                let state = tempfile::Builder::new()
                    .prefix("ftvm-arbiter-")
                    .tempdir()
                    .context("cannot create the arbiter's state directory")?;
                let mut config = ServerConfig::arbiter(free_tcp_addr()?, state.path());
                config.dir = Some(dir.to_owned());
                let process = Box::new(start_arbiter(launcher, &config)?);
                Ok(ClusterArbiter::Builtin {
                    process,
                    config,
                    _state: state,
                })
            }
            ArbiterKind::Etcd(config) => {
                let config = EtcdConfig {
                    lifetime: time_limit + ETCD_EXTRA_LIFETIME,
                    ..config.clone()
                };
                let etcd = LocalCluster::start(&config).context("cannot start etcd")?;
                etcd.wait_for_leader(START_TIMEOUT)
                    .context("the etcd cluster elects no leader")?;
                Ok(ClusterArbiter::Etcd(etcd))
            }
        }
    }
}

pub struct Cluster {
    // Dropped, and so killed, in this order: the servers do not see the
    // arbiter go.
    pub primary: Process,
    pub backup: Process,
    pub arbiter: ClusterArbiter,
    /// Between the backup and the primary's log channel, if asked for.
    pub proxy: Option<Proxy>,
    launcher: Launcher,
    log_listen: SocketAddr,
    _temp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts the arbiter, then the primary, and the backup once the
    /// primary has its role (whoever asks the arbiter first is primary).
    /// The pair is not fault tolerant yet: see
    /// [`wait_fault_tolerant`](Cluster::wait_fault_tolerant).
    pub fn start(launcher: &Launcher, config: &ClusterConfig) -> Result<Cluster> {
        let (dir, temp) = dir_or_temp(config.dir.as_deref(), "ftvm-cluster-")?;
        let arbiter = ClusterArbiter::start(launcher, &config.arbiter, &dir, config.time_limit)?;
        let log_listen = free_tcp_addr()?;
        let proxy = config.proxy.then(|| Proxy::start(log_listen)).transpose()?;
        let membership = Membership {
            arbiter: arbiter.addr(),
            vm_id: config.vm_id.clone(),
            knobs: config.knobs.clone(),
        };
        let server = |name: &str, role: Role, guest: &Guest| -> Result<ServerConfig> {
            let mut server = ServerConfig::new(name, role, free_udp_addr()?, config.time_limit);
            server.dir = Some(dir.clone());
            server.guest = guest.clone();
            server.console = config.consoles;
            Ok(server)
        };
        let [primary_name, backup_name] = &config.names;
        let primary_role = Role::Primary {
            membership: membership.clone(),
            log_listen,
            log_advertise: proxy.as_ref().map(Proxy::addr),
        };
        let mut primary_config = server(primary_name, primary_role, &config.guest)?;
        if let Some(wait) = config.backup_wait {
            primary_config.extra.extend([
                "--backup-wait".into(),
                wait.as_secs_f64().to_string().into(),
            ]);
        }
        let mut primary = launcher.start(&primary_config)?;
        primary.wait_event("role", START_TIMEOUT, |e| {
            matches!(e, ServerEvent::Role { .. })
        })?;
        let backup_guest = config.backup_guest.as_ref().unwrap_or(&config.guest);
        let backup_role = Role::Backup { membership };
        let mut backup_config = server(backup_name, backup_role, backup_guest)?;
        backup_config
            .extra
            .extend(config.backup_extra.iter().cloned());
        let backup = launcher.start(&backup_config)?;
        Ok(Cluster {
            primary,
            backup,
            arbiter,
            proxy,
            launcher: launcher.clone(),
            log_listen,
            _temp: temp,
        })
    }

    /// The built-in arbiter's address.
    ///
    /// # Panics
    /// For a pair on etcd, which has no such address (see
    /// [`Cluster::arbiter_at`]).
    pub fn arbiter_addr(&self) -> SocketAddr {
        match &self.arbiter {
            ClusterArbiter::Builtin { config, .. } => config.address,
            ClusterArbiter::Etcd(_) => panic!("a pair on etcd has no built-in arbiter's address"),
        }
    }

    /// What the servers' `--arbiter` names: the built-in arbiter's address
    /// or the etcd cluster's endpoints and prefix.
    pub fn arbiter_at(&self) -> ArbiterAddr {
        self.arbiter.addr()
    }

    /// Where the primary's log channel listens (behind the proxy, if any).
    pub fn log_listen(&self) -> SocketAddr {
        self.log_listen
    }

    /// Kills the arbiter, if it still runs, and starts it again on the same
    /// address with the same state (etcd: every member, on its data).
    pub fn restart_arbiter(&mut self) -> Result<()> {
        self.arbiter.kill();
        match &mut self.arbiter {
            ClusterArbiter::Builtin {
                process, config, ..
            } => **process = start_arbiter(&self.launcher, config)?,
            ClusterArbiter::Etcd(etcd) => {
                for member in 0..etcd.members() {
                    etcd.restart(member)?;
                }
                etcd.wait_for_leader(START_TIMEOUT)?;
            }
        }
        Ok(())
    }

    /// Calls `ready` until it holds; fails if `within` passes first or a
    /// server ends.
    pub fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        ready: impl FnMut(&Cluster) -> Result<bool>,
    ) -> Result<()> {
        wait_for(self, what, within, POLL, ready)
    }

    /// Waits until the primary runs with its backup connected.
    pub fn wait_fault_tolerant(&mut self, within: Duration) -> Result<()> {
        self.wait_for("the pair to be fault tolerant", within, |c| {
            Ok(c.primary.has_event(|e| {
                matches!(
                    e,
                    ServerEvent::Role {
                        backup: Some(_),
                        ..
                    }
                )
            }))
        })
    }

    /// Waits until the primary's guest answers.
    pub fn wait_answering(&mut self, within: Duration) -> Result<()> {
        let mut answered = answers(self.primary.address()?)?;
        self.wait_for("an answer from the primary", within, |_| Ok(answered()))
    }

    /// The primary's and the backup's events so far.
    pub fn events(&self) -> ClusterEvents {
        ClusterEvents(
            [&self.primary, &self.backup]
                .iter()
                .map(|p| (p.name().to_owned(), p.events()))
                .collect(),
        )
    }

    /// SIGTERM to each server, the VMMs first, then SIGKILL to those still
    /// running after `grace`; how each ended, by name. etcd's members are
    /// killed.
    pub fn stop(&mut self, grace: Duration) -> BTreeMap<String, String> {
        let mut processes = vec![&mut self.backup, &mut self.primary];
        match &mut self.arbiter {
            ClusterArbiter::Builtin { process, .. } => processes.push(&mut **process),
            ClusterArbiter::Etcd(_) => {}
        }
        let exits = processes
            .into_iter()
            .map(|p| {
                let _ = p.stop(grace);
                let how = p
                    .exited()
                    .map_or("status unknown".to_owned(), super::describe_exit);
                (p.name().to_owned(), how)
            })
            .collect();
        if let ClusterArbiter::Etcd(_) = self.arbiter {
            self.arbiter.kill();
        }
        exits
    }
}

impl Watched for Cluster {
    /// etcd members are left out: tests kill them on purpose, and etcd
    /// does without a minority of them.
    fn died(&mut self) -> Option<String> {
        let mut processes = vec![&mut self.primary, &mut self.backup];
        if let ClusterArbiter::Builtin { process, .. } = &mut self.arbiter {
            processes.insert(0, &mut **process);
        }
        processes.into_iter().find_map(Process::died)
    }

    fn log_tails(&self) -> String {
        [&self.primary, &self.backup]
            .iter()
            .map(|p| p.log_tails())
            .collect::<Vec<_>>()
            .join("\n  ")
    }
}

fn start_arbiter(launcher: &Launcher, config: &ServerConfig) -> Result<Process> {
    let mut arbiter = launcher.start(config)?;
    let addr = config.address;
    arbiter.wait_for("the arbiter to listen", START_TIMEOUT, POLL, |_| {
        Ok(TcpStream::connect(addr).is_ok())
    })?;
    Ok(arbiter)
}

/// The events of a primary and a backup, by server name.
pub struct ClusterEvents(pub Vec<(String, Vec<EventRecord>)>);

impl ClusterEvents {
    pub fn of(&self, name: &str) -> &[EventRecord] {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&[], |(_, e)| e.as_slice())
    }

    /// Every server that claimed to be primary of a view: by a `role`
    /// event, by going `live`, or by winning test-and-set for view N (which
    /// makes it primary of N + 1). Periodic `status` events are left out:
    /// they sample role and view separately, so one taken mid-change may
    /// pair them wrongly.
    pub fn primaries_per_view(&self) -> BTreeMap<u64, BTreeSet<String>> {
        let mut out: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for (name, list) in &self.0 {
            for e in list {
                let view = match &e.event {
                    ServerEvent::Role {
                        role: ServerRole::Primary,
                        view,
                        ..
                    } => Some(*view),
                    ServerEvent::Live { view } => Some(*view),
                    ServerEvent::Tas { view, won: true } => Some(view + 1),
                    _ => None,
                };
                if let Some(v) = view {
                    out.entry(v).or_default().insert(name.clone());
                }
            }
        }
        out
    }
}
