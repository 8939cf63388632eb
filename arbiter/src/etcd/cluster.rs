//! A local etcd cluster on loopback, for the tests, `ftvm demo --etcd` and
//! the benchmarks: real `etcd` processes, each with its own data directory
//! and free-picked ports, which can be killed and restarted one by one,
//! and whose leader can be found.
//!
//! Every member is started by one supervisor thread that lives as long as
//! the cluster: the kernel kills a member when that thread ends
//! (`PR_SET_PDEATHSIG`), so a test that panics or a harness that is killed
//! leaves no etcd behind, and the supervisor kills every member once the
//! cluster's lifetime is over, whatever its owner does.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use thiserror::Error;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::api::EtcdAddr;

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot prepare {}: {source}", path.display())]
    Dir { path: PathBuf, source: io::Error },
    #[error("no free port on loopback: {0}")]
    Port(io::Error),
    #[error("cannot start etcd member {name} ({}): {source}", etcd.display())]
    Spawn {
        name: String,
        etcd: PathBuf,
        source: io::Error,
    },
    #[error("no etcd member reported a leader within {0:?}")]
    NoLeader(Duration),
    #[error("the cluster's lifetime of {0:?} is over: its members were killed")]
    Expired(Duration),
    #[error("the etcd supervisor thread is gone")]
    SupervisorGone,
    #[error("cannot start a thread or runtime: {0}")]
    Thread(io::Error),
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub members: usize,
    /// The `etcd` binary.
    pub etcd: PathBuf,
    /// Where the members' data directories and logs (`NAME.log`) go.
    pub dir: ClusterDir,
    /// etcd's `--heartbeat-interval` and `--election-timeout`.
    pub heartbeat: Duration,
    pub election: Duration,
    /// Every member is killed this long after the cluster started.
    pub lifetime: Duration,
}

#[derive(Clone, Debug)]
pub enum ClusterDir {
    /// A new temporary directory inside this one, removed with the cluster.
    TempIn(PathBuf),
    /// This directory, created if missing and kept.
    At(PathBuf),
}

impl ClusterConfig {
    /// Three members with etcd's default timings, in a temporary
    /// directory.
    pub fn new(lifetime: Duration) -> ClusterConfig {
        ClusterConfig {
            members: 3,
            etcd: PathBuf::from("etcd"),
            dir: ClusterDir::TempIn(std::env::temp_dir()),
            heartbeat: Duration::from_millis(100),
            election: Duration::from_millis(1000),
            lifetime,
        }
    }
}

/// Bounds each status request of [`LocalCluster::leader`].
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a member killed is waited for.
const KILL_WAIT: Duration = Duration::from_secs(5);

struct MemberSpec {
    name: String,
    client_port: u16,
    command: Vec<String>,
    log: PathBuf,
}

enum Request {
    Start(usize, Sender<Result<(), ClusterError>>),
    Kill(usize, Sender<()>),
    Running(usize, Sender<bool>),
}

/// A running cluster (see the module's documentation); dropping it kills
/// every member and removes its temporary directory.
pub struct LocalCluster {
    names: Vec<String>,
    client_ports: Vec<u16>,
    requests: Option<Sender<Request>>,
    supervisor: Option<JoinHandle<()>>,
    runtime: Runtime,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Starts every member; [`LocalCluster::wait_for_leader`] tells when
    /// the cluster can serve.
    pub fn start(config: &ClusterConfig) -> Result<LocalCluster, ClusterError> {
        let (dir, temp) = match &config.dir {
            ClusterDir::At(dir) => (dir.clone(), None),
            ClusterDir::TempIn(parent) => {
                let temp = tempfile::Builder::new()
                    .prefix("ftvm-etcd-")
                    .tempdir_in(parent)
                    .map_err(|source| ClusterError::Dir {
                        path: parent.clone(),
                        source,
                    })?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        fs::create_dir_all(&dir).map_err(|source| ClusterError::Dir {
            path: dir.clone(),
            source,
        })?;
        // Held until every port is picked, so that no two are the same.
        let mut listeners = Vec::new();
        let mut port = || -> Result<u16, ClusterError> {
            let listener = TcpListener::bind("127.0.0.1:0").map_err(ClusterError::Port)?;
            let port = listener.local_addr().map_err(ClusterError::Port)?.port();
            listeners.push(listener);
            Ok(port)
        };
        let mut ports = Vec::new();
        for _ in 0..config.members {
            ports.push((port()?, port()?));
        }
        drop(listeners);
        let names: Vec<String> = (0..config.members).map(|i| format!("etcd{i}")).collect();
        let initial_cluster = names
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("ftvm-{}-{}", std::process::id(), ports[0].0);
        let specs: Vec<MemberSpec> = names
            .iter()
            .zip(&ports)
            .map(|(name, &(client, peer))| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let data = dir.join(name);
                let command = vec![
                    config.etcd.display().to_string(),
                    format!("--name={name}"),
                    format!("--data-dir={}", data.display()),
                    format!("--listen-client-urls={client_url}"),
                    format!("--advertise-client-urls={client_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster={initial_cluster}"),
                    // Ignored by a member restarted on its data directory.
                    "--initial-cluster-state=new".into(),
                    format!("--initial-cluster-token={token}"),
                    format!("--heartbeat-interval={}", config.heartbeat.as_millis()),
                    format!("--election-timeout={}", config.election.as_millis()),
                    // Every ping writes a key: old revisions must go.
                    "--auto-compaction-mode=periodic".into(),
                    "--auto-compaction-retention=10m".into(),
                ];
                MemberSpec {
                    name: name.clone(),
                    client_port: client,
                    command,
                    log: dir.join(format!("{name}.log")),
                }
            })
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ftvm-etcd-status")
            .enable_all()
            .build()
            .map_err(ClusterError::Thread)?;
        let (requests, received) = mpsc::channel();
        let lifetime = config.lifetime;
        let supervisor = thread::Builder::new()
            .name("ftvm-etcd-supervisor".into())
            .spawn(move || supervise(specs, received, lifetime))
            .map_err(ClusterError::Thread)?;
        let cluster = LocalCluster {
            client_ports: ports.iter().map(|&(client, _)| client).collect(),
            names,
            requests: Some(requests),
            supervisor: Some(supervisor),
            runtime,
            dir,
            _temp: temp,
        };
        for member in 0..config.members {
            cluster.restart(member)?;
        }
        info!(endpoints = ?cluster.endpoints(), dir = %cluster.dir.display(), "etcd cluster started");
        Ok(cluster)
    }

    /// Each member's client endpoint, `127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.client_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// The cluster as an arbiter address, with every key under `prefix`.
    pub fn addr(&self, prefix: &str) -> EtcdAddr {
        EtcdAddr {
            endpoints: self.endpoints(),
            prefix: prefix.to_owned(),
        }
    }

    pub fn members(&self) -> usize {
        self.names.len()
    }

    pub fn name(&self, member: usize) -> &str {
        &self.names[member]
    }

    /// Where the members' data directories and logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ask<T>(&self, request: impl FnOnce(Sender<T>) -> Request) -> Result<T, ClusterError> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .as_ref()
            .ok_or(ClusterError::SupervisorGone)?
            .send(request(reply))
            .map_err(|_| ClusterError::SupervisorGone)?;
        answer.recv().map_err(|_| ClusterError::SupervisorGone)
    }

    /// Kills `member` with SIGKILL (as a crash would) and waits for it.
    pub fn kill(&self, member: usize) -> Result<(), ClusterError> {
        self.ask(|reply| Request::Kill(member, reply))
    }

    /// Starts `member` again on its data directory and ports (a member
    /// still running is left alone).
    pub fn restart(&self, member: usize) -> Result<(), ClusterError> {
        self.ask(|reply| Request::Start(member, reply))?
    }

    pub fn is_running(&self, member: usize) -> bool {
        self.ask(|reply| Request::Running(member, reply))
            .unwrap_or(false)
    }

    /// The member that is leader, as the running members report it
    /// (etcd's maintenance status); none while there is no leader.
    pub fn leader(&self) -> Option<usize> {
        let running: Vec<(usize, String)> = (0..self.members())
            .filter(|&m| self.is_running(m))
            .map(|m| (m, self.endpoints()[m].clone()))
            .collect();
        self.runtime.block_on(self_declared_leader(&running))
    }

    /// Waits until a running member is leader, and returns it.
    pub fn wait_for_leader(&self, within: Duration) -> Result<usize, ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(leader) = self.leader() {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NoLeader(within));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The leader among a cluster's client `endpoints` (`HOST:PORT`, in member
/// order), as those that answer report it: for a thread that watches a
/// cluster it does not hold. Each call has a runtime of its own.
pub fn leader_among(endpoints: &[String]) -> Option<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let members: Vec<(usize, String)> = endpoints.iter().cloned().enumerate().collect();
    runtime.block_on(self_declared_leader(&members))
}

/// The member that reports itself leader. Followers may still name a
/// leader that died until they notice; a leader names itself only while
/// it leads (it steps down without a quorum).
async fn self_declared_leader(members: &[(usize, String)]) -> Option<usize> {
    for (member, endpoint) in members {
        if let Some((id, leader)) = status(endpoint).await {
            if id == leader {
                return Some(*member);
            }
        }
    }
    None
}

/// A member's own id and the leader it knows (0: none).
async fn status(endpoint: &str) -> Option<(u64, u64)> {
    let options = ConnectOptions::new()
        .with_timeout(STATUS_TIMEOUT)
        .with_connect_timeout(STATUS_TIMEOUT);
    let asked = async {
        let mut client = Client::connect([format!("http://{endpoint}")], Some(options))
            .await
            .ok()?;
        let status = client.status().await.ok()?;
        Some((status.header()?.member_id(), status.leader()))
    };
    tokio::time::timeout(STATUS_TIMEOUT * 2, asked)
        .await
        .ok()
        .flatten()
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Closing the channel tells the supervisor to kill every member.
        self.requests.take();
        if let Some(supervisor) = self.supervisor.take() {
            if supervisor.join().is_err() {
                warn!("the etcd supervisor panicked");
            }
        }
    }
}

/// The supervisor thread: starts and kills members on request, and kills
/// them all when the cluster is dropped or its lifetime is over.
fn supervise(specs: Vec<MemberSpec>, requests: Receiver<Request>, lifetime: Duration) {
    let end = Instant::now() + lifetime;
    let mut children: Vec<Option<Child>> = specs.iter().map(|_| None).collect();
    let mut expired = false;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let request = if expired {
            requests.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            requests.recv_timeout(left)
        };
        match request {
            Ok(Request::Start(member, reply)) => {
                let started = if expired {
                    Err(ClusterError::Expired(lifetime))
                } else {
                    start_member(&specs[member], &mut children[member])
                };
                let _ = reply.send(started);
            }
            Ok(Request::Kill(member, reply)) => {
                kill_member(&specs[member], &mut children[member]);
                let _ = reply.send(());
            }
            Ok(Request::Running(member, reply)) => {
                let running = match &mut children[member] {
                    Some(child) => matches!(child.try_wait(), Ok(None)),
                    None => false,
                };
                let _ = reply.send(running);
            }
            Err(RecvTimeoutError::Timeout) => {
                warn!(
                    ?lifetime,
                    "the etcd cluster's lifetime is over: killing its members"
                );
                expired = true;
                for (spec, child) in specs.iter().zip(&mut children) {
                    kill_member(spec, child);
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    for (spec, child) in specs.iter().zip(&mut children) {
        kill_member(spec, child);
    }
}

fn start_member(spec: &MemberSpec, slot: &mut Option<Child>) -> Result<(), ClusterError> {
    if let Some(child) = slot {
        if matches!(child.try_wait(), Ok(None)) {
            return Ok(());
        }
    }
    let etcd = PathBuf::from(&spec.command[0]);
    let failed = |source| ClusterError::Spawn {
        name: spec.name.clone(),
        etcd: etcd.clone(),
        source,
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(failed)?;
    let err: File = log.try_clone().map_err(failed)?;
    let mut command = Command::new(&etcd);
    command
        .args(&spec.command[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the
    // parent. The kernel kills the member when the supervisor thread,
    // which started it, ends: with the cluster, or with the process.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    let child = command.spawn().map_err(failed)?;
    info!(member = %spec.name, pid = child.id(), port = spec.client_port, "etcd member started");
    *slot = Some(child);
    Ok(())
}

fn kill_member(spec: &MemberSpec, slot: &mut Option<Child>) {
    let Some(mut child) = slot.take() else {
        return;
    };
    if let Err(e) = child.kill() {
        // Already exited: reaped below.
        if e.kind() != io::ErrorKind::InvalidInput {
            warn!(member = %spec.name, "cannot kill etcd member: {e}");
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                warn!(member = %spec.name, pid = child.id(), "etcd member did not exit after SIGKILL");
                break;
            }
            Err(e) => {
                warn!(member = %spec.name, "cannot wait for etcd member: {e}");
                break;
            }
        }
    }
    info!(member = %spec.name, "etcd member killed");
}
