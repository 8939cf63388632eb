//! A fault-tolerant pair as a user runs it: an arbiter, a primary and a
//! backup, each a real `ftvm` process on loopback with its own events file,
//! all killed when the cluster is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use ftvm_core::host::events::{EventRecord, ServerEvent, ServerRole};

use super::process::{answers, wait_for, Watched, POLL};
use super::{
    dir_or_temp, free_tcp_addr, free_udp_addr, Guest, Knobs, Launcher, Membership, Process, Proxy,
    Role, ServerConfig,
};

/// How long the arbiter may take to listen, and the primary to take its
/// role, before the cluster gives up starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
        }
    }
}

pub struct Cluster {
    // Dropped, and so killed, in this order: the servers do not see the
    // arbiter go.
    pub primary: Process,
    pub backup: Process,
    pub arbiter: Process,
    /// Between the backup and the primary's log channel, if asked for.
    pub proxy: Option<Proxy>,
    launcher: Launcher,
    arbiter_config: ServerConfig,
    log_listen: SocketAddr,
    _state: tempfile::TempDir,
    _temp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts the arbiter, then the primary, and the backup once the
    /// primary has its role (whoever asks the arbiter first is primary).
    /// The pair is not fault tolerant yet: see
    /// [`wait_fault_tolerant`](Cluster::wait_fault_tolerant).
    pub fn start(launcher: &Launcher, config: &ClusterConfig) -> Result<Cluster> {
        let (dir, temp) = dir_or_temp(config.dir.as_deref(), "ftvm-cluster-")?;
        // Not in `dir`, which may outlive the cluster: a new cluster must not
        // find an old one's decisions.
        let state = tempfile::Builder::new()
            .prefix("ftvm-arbiter-")
            .tempdir()
            .context("cannot create the arbiter's state directory")?;
        let mut arbiter_config = ServerConfig::arbiter(free_tcp_addr()?, state.path());
        arbiter_config.dir = Some(dir.clone());
        let arbiter = start_arbiter(launcher, &arbiter_config)?;
        let log_listen = free_tcp_addr()?;
        let proxy = config.proxy.then(|| Proxy::start(log_listen)).transpose()?;
        let membership = Membership {
            arbiter: arbiter_config.address,
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
        let mut primary = launcher.start(&server(primary_name, primary_role, &config.guest)?)?;
        primary.wait_event("role", START_TIMEOUT, |e| {
            matches!(e, ServerEvent::Role { .. })
        })?;
        let backup_guest = config.backup_guest.as_ref().unwrap_or(&config.guest);
        let backup_role = Role::Backup { membership };
        let backup = launcher.start(&server(backup_name, backup_role, backup_guest)?)?;
        Ok(Cluster {
            primary,
            backup,
            arbiter,
            proxy,
            launcher: launcher.clone(),
            arbiter_config,
            log_listen,
            _state: state,
            _temp: temp,
        })
    }

    pub fn arbiter_addr(&self) -> SocketAddr {
        self.arbiter_config.address
    }

    /// Where the primary's log channel listens (behind the proxy, if any).
    pub fn log_listen(&self) -> SocketAddr {
        self.log_listen
    }

    /// Kills the arbiter, if it still runs, and starts it again on the same
    /// address with the same state.
    pub fn restart_arbiter(&mut self) -> Result<()> {
        self.arbiter.kill();
        self.arbiter = start_arbiter(&self.launcher, &self.arbiter_config)?;
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
    /// running after `grace`; how each ended, by name.
    pub fn stop(&mut self, grace: Duration) -> BTreeMap<String, String> {
        [&mut self.backup, &mut self.primary, &mut self.arbiter]
            .into_iter()
            .map(|p| {
                let _ = p.stop(grace);
                let how = p
                    .exited()
                    .map_or("status unknown".to_owned(), super::describe_exit);
                (p.name().to_owned(), how)
            })
            .collect()
    }
}

impl Watched for Cluster {
    fn died(&mut self) -> Option<String> {
        [&mut self.arbiter, &mut self.primary, &mut self.backup]
            .into_iter()
            .find_map(Process::died)
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
