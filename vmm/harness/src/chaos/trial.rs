//! One trial: a cluster, the clients through their lossy proxies, the
//! schedule's faults injected as they fall due, and what the checks need
//! collected at the end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arbiter::etcd::cluster::ClusterConfig as EtcdConfig;
use arbiter::View;
use nix::sys::signal::Signal;

use super::client::{read_back, run_client, LoadCounts, Routes};
use super::schedule::{
    transfer_silence_ms, Direction, FaultKind, Schedule, ScheduleParams, Target, TransferFault,
};
use crate::history::{Clock, HistoryOp, Recorder};
use crate::launcher::{
    describe_exit, free_tcp_addr, free_udp_addr, ArbiterKind, Cluster, ClusterArbiter,
    ClusterConfig, ClusterEvents, DatagramFaults, Launcher, Membership, Process, Proxy, Role,
    ServerConfig, UdpProxy,
};
use ftvm_core::host::events::{unix_ns, EventRecord, ServerEvent};

/// What every trial of a campaign shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub params: ScheduleParams,
    pub clients: u32,
    pub out: PathBuf,
    pub vm_id: String,
}

/// For the arbiter, the guests' boot and the backup's joining.
const STARTUP: Duration = Duration::from_secs(60);
/// Short, so that a paused arbiter holds up the injector little; the
/// injector then goes by the last view the arbiter gave.
const ARBITER_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a client keeps retrying the request under way when the load
/// ends, and how long the final reads may take in all.
const DRAIN: Duration = Duration::from_secs(10);
const FINAL_READS: Duration = Duration::from_secs(30);
/// How long a worst-moment fault waits for its moment before it strikes
/// anyway.
const MOMENT_WAIT: Duration = Duration::from_secs(2);

/// Once the last fault has healed, the VM must answer a client within
/// this: the failure timeout (a failover the last fault set off), plus
/// time for a test-and-set at a restarted arbiter, a client's round of
/// attempts and its question to the arbiter.
pub fn liveness_bound(failure_timeout_ms: u64) -> Duration {
    Duration::from_millis(failure_timeout_ms + 2000)
}

/// With spares, the primary must report `protected` (a backup restored its
/// state and the log channel runs) this long after the last fault healed,
/// at the latest: the liveness bound (a failover the last fault set off),
/// then twice (a named spare that fails to join, then the next) the
/// arbiter's spare timeout (0.5 s), a killed server's replacement booting
/// and pinging (at most 2.5 s on a loaded machine) and a transfer that
/// gives up on a silent peer (10 failure timeouts, at least 2 s). With the
/// default 300 ms failure timeout: 2.3 + 2 × (0.5 + 2.5 + 3) = 14.3 s.
pub fn reprotect_bound(failure_timeout_ms: u64) -> Duration {
    liveness_bound(failure_timeout_ms)
        + 2 * Duration::from_millis(500 + 2500 + transfer_silence_ms(failure_timeout_ms))
}

/// How long a fault during a transfer waits for a backup to start joining
/// before it is skipped.
const TRANSFER_WAIT: Duration = Duration::from_secs(10);

/// One thing the injector did, as it happened.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Injected {
    /// Milliseconds after the clients started.
    pub t_ms: f64,
    /// The fault of the schedule it belongs to (its index).
    pub fault: usize,
    pub what: String,
}

/// A fault the injector did not inject: it would have cost the last
/// server holding the VM's state while no backup held it (the VM was
/// already unprotected, after a failover or a loss nobody drew), or its
/// moment never came.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    pub t_ms: f64,
    pub fault: usize,
    pub why: String,
}

/// A fault struck during a state transfer (or meant to).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Strike {
    pub fault: usize,
    /// Unix ns.
    pub t_ns: u64,
    pub primary: String,
    /// The backup the view named as it joined.
    pub joiner: Option<String>,
    pub what: String,
    /// When the joining backup connected (unix ns).
    pub connected_ns: u64,
    /// Where the primary's events put the strike (filled in at the end):
    /// `in the handshake` (before its `transfer_started`), `mid-transfer`
    /// (before `protected` or `transfer_failed`), `after the transfer`.
    pub moment: String,
}

impl Strike {
    /// Before the primary reported the joiner protected.
    pub fn hit(&self) -> bool {
        self.moment != AFTER_TRANSFER
    }
}

const AFTER_TRANSFER: &str = "after the transfer";

/// Everything a trial produced, for the checks.
pub struct TrialRun {
    pub schedule: Schedule,
    pub dir: PathBuf,
    pub start_ns: u64,
    pub end_ns: u64,
    /// When the last fault healed (unix ns).
    pub healed_ns: u64,
    pub injected: Vec<Injected>,
    pub ops: Vec<HistoryOp>,
    pub reader: Option<u64>,
    pub finals: crate::demo::load::FinalValues,
    pub events: ClusterEvents,
    pub exits: BTreeMap<String, String>,
    /// The servers we killed on purpose.
    pub killed: Vec<String>,
    pub client_failures: Vec<String>,
    pub gave_up: u64,
    pub final_view: Option<View>,
    /// With spares: how long after the last heal the primary of the final
    /// view reported `protected` (0: it was before), or `None` if it did
    /// not within the bound. `None` without spares.
    pub reprotected_ms: Option<Option<f64>>,
    pub reprotect_bound: Duration,
    pub skipped: Vec<Skipped>,
    pub strikes: Vec<Strike>,
    /// The primary killed mid-transfer: the VM is down by design.
    pub down_by_design: Option<Strike>,
    pub datagrams: crate::launcher::DatagramCounts,
    pub names: BTreeMap<SocketAddr, String>,
}

#[derive(Clone, Debug)]
enum Action {
    /// Starts fault `n` of the schedule.
    Start(FaultKind),
    Kill(String),
    Cont(String),
    RestartArbiter,
    ContArbiter,
    Heal,
    DatagramsOff,
}

struct Injector<'a> {
    cluster: &'a mut Cluster,
    spares: Vec<Process>,
    /// The log channel proxies of the servers started after the first
    /// primary (whose own is the cluster's), by server: whoever is primary,
    /// its log channel goes through one.
    log_proxies: Vec<(String, Proxy)>,
    /// Restart every server that ends as a spare with a fresh id.
    pool: bool,
    /// Servers that ended and were replaced.
    replaced: BTreeSet<String>,
    last_replenish: Instant,
    skipped: Vec<Skipped>,
    strikes: Vec<Strike>,
    down_by_design: Option<Strike>,
    proxies: Vec<UdpProxy>,
    routes: Routes,
    launcher: Launcher,
    membership: Membership,
    dir: PathBuf,
    time_limit: Duration,
    seed: u64,
    spares_started: u32,
    arbiter: std::sync::Arc<dyn arbiter::Arbiter>,
    vm_id: String,
    view: Option<View>,
    failure_timeout: Duration,
    start: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    actions: Vec<Action>,
    injected: Vec<Injected>,
    killed: Vec<String>,
    last_heal: Instant,
}

impl Injector<'_> {
    fn push(&mut self, at: Instant, fault: usize, action: Action) {
        let n = self.actions.len();
        self.actions.push(action);
        self.queue.push(Reverse((at, fault as u64, n)));
    }

    fn note(&mut self, fault: usize, what: String) {
        let t_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        println!("    {:>7.3} s  {what}", t_ms / 1000.0);
        self.injected.push(Injected { t_ms, fault, what });
    }

    /// The arbiter's view now, or the last one it gave.
    fn view(&mut self) -> Option<View> {
        if let Ok(v) = self.arbiter.query(&self.vm_id) {
            self.view = Some(v);
        }
        self.view.clone()
    }

    fn resolve(&mut self, target: Target) -> Option<String> {
        match target {
            Target::Primary => self.view()?.primary.map(|m| m.id),
            Target::Backup => self.view()?.backup.map(|m| m.id),
            Target::Spare => {
                let view = self.view();
                let named = |id: &str| {
                    view.as_ref().is_some_and(|v| {
                        v.primary.as_ref().is_some_and(|m| m.id == id)
                            || v.backup.as_ref().is_some_and(|m| m.id == id)
                    })
                };
                self.spares
                    .iter_mut()
                    .filter_map(|p| p.running().then(|| p.name().to_owned()))
                    .find(|n| !named(n))
            }
            Target::Arbiter => Some("arbiter".into()),
        }
    }

    /// The backup that holds the VM's state, if the VM is protected: the
    /// view's primary runs and reported `protected` for this view and its
    /// backup, with no failure or departure of its backup since, and that
    /// backup runs.
    fn protected(&mut self) -> Option<String> {
        let view = self.view()?;
        let primary = view.primary.as_ref()?.id.clone();
        let backup = view.backup.as_ref()?.id.clone();
        let p = self.process(&primary)?;
        if !p.running() || !protected_in(&p.events(), view.number, &backup) {
            return None;
        }
        self.process(&backup)?.running().then_some(backup)
    }

    /// The log channel proxy in front of `name`'s log listener.
    fn log_proxy_of(&self, name: &str) -> Option<&Proxy> {
        if self.cluster.primary.name() == name {
            return self.cluster.proxy.as_ref();
        }
        self.log_proxies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    /// The current primary's log channel proxy.
    fn primary_log_proxy(&mut self) -> Option<&Proxy> {
        let name = self.resolve(Target::Primary)?;
        self.log_proxy_of(&name)
    }

    /// Starts a spare in the place of every server that has ended.
    fn replenish(&mut self) {
        if !self.pool || self.last_replenish.elapsed() < Duration::from_millis(50) {
            return;
        }
        self.last_replenish = Instant::now();
        let mut ended = Vec::new();
        let replaced = &self.replaced;
        for p in [&mut self.cluster.primary, &mut self.cluster.backup]
            .into_iter()
            .chain(self.spares.iter_mut())
        {
            if !replaced.contains(p.name()) && !p.running() {
                let how = p.exited().map_or("ended".into(), describe_exit);
                ended.push((p.name().to_owned(), how));
            }
        }
        for (name, how) in ended {
            self.replaced.insert(name.clone());
            self.note(usize::MAX, format!("{name} ended ({how})"));
            if let Err(e) = self.start_spare(usize::MAX) {
                self.note(usize::MAX, format!("cannot start a spare: {e:#}"));
            }
        }
    }

    fn skip(&mut self, fault: usize, why: String) {
        let t_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.note(fault, format!("skipped: {why}"));
        self.skipped.push(Skipped { t_ms, fault, why });
    }

    fn process(&mut self, name: &str) -> Option<&mut Process> {
        if self.cluster.primary.name() == name {
            return Some(&mut self.cluster.primary);
        }
        if self.cluster.backup.name() == name {
            return Some(&mut self.cluster.backup);
        }
        self.spares.iter_mut().find(|p| p.name() == name)
    }

    fn signal(&mut self, fault: usize, name: &str, signal: Signal) -> bool {
        let result = match self.process(name) {
            Some(p) => {
                if p.running() {
                    p.signal(signal).map(|()| p.pid())
                } else {
                    Err(anyhow::anyhow!("{name} has ended"))
                }
            }
            None => Err(anyhow::anyhow!("no server {name}")),
        };
        match result {
            Ok(pid) => {
                if signal == Signal::SIGKILL {
                    self.killed.push(name.to_owned());
                }
                self.note(fault, format!("{signal} -> {name} (pid {pid})"));
                true
            }
            Err(e) => {
                self.note(fault, format!("{signal} -> {name}: not sent, {e:#}"));
                false
            }
        }
    }

    fn signal_target(&mut self, fault: usize, target: Target, signal: Signal) -> Option<String> {
        if target == Target::Arbiter {
            return self.signal_arbiter(fault, signal).then(|| "arbiter".into());
        }
        match self.resolve(target) {
            Some(name) => self.signal(fault, &name, signal).then_some(name),
            None => {
                self.note(fault, format!("{signal} -> {target}: the view names none"));
                None
            }
        }
    }

    fn signal_arbiter(&mut self, fault: usize, signal: Signal) -> bool {
        let what = match (&mut self.cluster.arbiter, signal) {
            (ClusterArbiter::Etcd(etcd), Signal::SIGKILL) => match etcd.leader() {
                Some(m) => match etcd.kill(m) {
                    Ok(()) => format!("SIGKILL -> etcd leader {}", etcd.name(m)),
                    Err(e) => format!("SIGKILL -> etcd leader: {e}"),
                },
                None => "SIGKILL -> etcd leader: none elected".into(),
            },
            (ClusterArbiter::Etcd(_), s) => format!("{s} -> etcd: not supported"),
            (ClusterArbiter::Builtin { process, .. }, Signal::SIGKILL) => {
                process.kill();
                format!("SIGKILL -> arbiter (pid {})", process.pid())
            }
            (ClusterArbiter::Builtin { process, .. }, s) => match process.signal(s) {
                Ok(()) => format!("{s} -> arbiter (pid {})", process.pid()),
                Err(e) => format!("{s} -> arbiter: {e:#}"),
            },
        };
        self.note(fault, what);
        true
    }

    fn restart_arbiter(&mut self, fault: usize) {
        let result = match &mut self.cluster.arbiter {
            ClusterArbiter::Etcd(etcd) => (0..etcd.members())
                .filter(|m| !etcd.is_running(*m))
                .try_for_each(|m| etcd.restart(m))
                .map_err(anyhow::Error::from),
            ClusterArbiter::Builtin { .. } => self.cluster.restart_arbiter(),
        };
        match result {
            Ok(()) => self.note(fault, "arbiter restarted".into()),
            Err(e) => self.note(fault, format!("arbiter restart failed: {e:#}")),
        }
    }

    fn start_spare(&mut self, fault: usize) -> Result<()> {
        self.spares_started += 1;
        let name = format!("spare{}", self.spares_started);
        let role = Role::Backup {
            membership: self.membership.clone(),
        };
        let mut config = ServerConfig::new(&name, role, free_udp_addr()?, self.time_limit);
        config.dir = Some(self.dir.clone());
        let (log_proxy, extra) = log_listener()?;
        config.extra = extra;
        let process = self.launcher.start(&config)?;
        self.log_proxies.push((name.clone(), log_proxy));
        let proxy = UdpProxy::start(
            config.address,
            self.seed ^ u64::from(self.spares_started) << 32,
        )?;
        self.routes.add(config.address, proxy.addr(), &name);
        self.proxies.push(proxy);
        self.note(
            fault,
            format!("spare {name} started (pid {})", process.pid()),
        );
        self.spares.push(process);
        Ok(())
    }

    fn set_datagrams(&self, faults: DatagramFaults) {
        for p in &self.proxies {
            p.set_faults(faults);
        }
    }

    /// Does `action`; what it sets off later goes on the queue.
    fn act(&mut self, fault: usize, action: Action) {
        let now = Instant::now();
        let ms = Duration::from_millis;
        match action {
            Action::Kill(name) => {
                self.signal(fault, &name, Signal::SIGKILL);
            }
            Action::Cont(name) => {
                self.signal(fault, &name, Signal::SIGCONT);
                self.last_heal = Instant::now();
            }
            Action::RestartArbiter => {
                self.restart_arbiter(fault);
                self.last_heal = Instant::now();
            }
            Action::ContArbiter => {
                self.signal_arbiter(fault, Signal::SIGCONT);
                self.last_heal = Instant::now();
            }
            Action::Heal => {
                for p in self
                    .cluster
                    .proxy
                    .iter()
                    .chain(self.log_proxies.iter().map(|(_, p)| p))
                {
                    p.heal();
                }
                self.note(fault, "log channel healed".into());
                self.last_heal = Instant::now();
            }
            Action::DatagramsOff => {
                self.set_datagrams(DatagramFaults::default());
                self.note(fault, "client datagrams clean again".into());
                self.last_heal = Instant::now();
            }
            Action::Start(kind) => self.start_fault(fault, kind, now, ms),
        }
    }

    fn start_fault(
        &mut self,
        fault: usize,
        kind: FaultKind,
        now: Instant,
        ms: fn(u64) -> Duration,
    ) {
        if costs_the_primary(&kind) && self.protected().is_none() {
            let view = self
                .view
                .as_ref()
                .map_or("no view".into(), ToString::to_string);
            return self.skip(
                fault,
                format!(
                    "{} would cost the last server holding the VM's state: no backup holds it ({view})",
                    kind.name()
                ),
            );
        }
        match kind {
            FaultKind::Kill {
                target,
                restart_after_ms,
            } => {
                // A killed server comes back as a spare with a fresh id
                // ([`Injector::replenish`]).
                self.signal_target(fault, target, Signal::SIGKILL);
                self.last_heal = Instant::now();
                if let (Target::Arbiter, Some(after)) = (target, restart_after_ms) {
                    self.push(now + ms(after), fault, Action::RestartArbiter)
                }
            }
            FaultKind::Pause { target, for_ms } => {
                if let Some(name) = self.signal_target(fault, target, Signal::SIGSTOP) {
                    let cont = if target == Target::Arbiter {
                        Action::ContArbiter
                    } else {
                        Action::Cont(name)
                    };
                    self.push(now + ms(for_ms), fault, cont);
                }
            }
            FaultKind::Cut { for_ms } => {
                if let Some(p) = self.primary_log_proxy() {
                    p.partition();
                }
                self.note(fault, "log channel cut".into());
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::CutOneWay { direction, for_ms } => {
                if let Some(p) = self.primary_log_proxy() {
                    p.partition_one_way(direction == Direction::ToPrimary);
                }
                self.note(fault, format!("log channel cut {direction}"));
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Delay { ms: d, for_ms } => {
                if let Some(p) = self.primary_log_proxy() {
                    p.delay(ms(d), ms(d));
                }
                self.note(fault, format!("log channel delayed {d} ms each way"));
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Stall { direction, for_ms } => {
                let ways = match direction {
                    None => [true, true],
                    Some(Direction::ToPrimary) => [true, false],
                    Some(Direction::ToBackup) => [false, true],
                };
                if let Some(p) = self.primary_log_proxy() {
                    p.stall(now + ms(for_ms), ways);
                }
                self.note(fault, "log channel stalled".into());
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Datagrams { faults, for_ms } => {
                self.set_datagrams(faults);
                self.note(fault, "client datagrams faulty".into());
                self.push(now + ms(for_ms), fault, Action::DatagramsOff);
            }
            FaultKind::KillPrimaryAfterOutput => {
                let Some(name) = self.resolve(Target::Primary) else {
                    return self.note(fault, "no primary to kill".into());
                };
                let service = self.process(&name).and_then(|p| p.address().ok());
                let proxy = self.proxies.iter().find(|p| Some(p.target()) == service);
                if let Some(proxy) = proxy {
                    let before = proxy.counts().replies;
                    let deadline = Instant::now() + MOMENT_WAIT;
                    while proxy.counts().replies == before && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                self.signal(fault, &name, Signal::SIGKILL);
                self.last_heal = Instant::now();
            }
            FaultKind::KillPrimaryDuringCut { kill_after_ms } => {
                let Some(name) = self.resolve(Target::Primary) else {
                    return self.note(fault, "no primary to kill".into());
                };
                if let Some(p) = self.log_proxy_of(&name) {
                    p.partition();
                }
                self.note(fault, "log channel cut".into());
                self.push(now + ms(kill_after_ms), fault, Action::Kill(name));
                let heal = now + self.failure_timeout * 2;
                self.push(heal, fault, Action::Heal);
            }
            FaultKind::KillPrimaryWhileBackupPaused {
                kill_after_ms,
                for_ms,
            } => {
                let (Some(primary), Some(backup)) =
                    (self.resolve(Target::Primary), self.resolve(Target::Backup))
                else {
                    return self.note(fault, "no pair to fault".into());
                };
                if self.signal(fault, &backup, Signal::SIGSTOP) {
                    self.push(now + ms(for_ms), fault, Action::Cont(backup));
                }
                self.push(now + ms(kill_after_ms), fault, Action::Kill(primary));
            }
            FaultKind::ArbiterDownDuringClaim { down_ms } => {
                let (Some(primary), backup) =
                    (self.resolve(Target::Primary), self.resolve(Target::Backup))
                else {
                    return self.note(fault, "no primary to kill".into());
                };
                self.signal(fault, &primary, Signal::SIGKILL);
                let deadline = Instant::now() + MOMENT_WAIT;
                if let Some(backup) = backup {
                    while Instant::now() < deadline {
                        let claiming = self.process(&backup).is_some_and(|p| {
                            p.has_event(|e| {
                                matches!(
                                    e,
                                    ServerEvent::FailureDetected { .. }
                                        | ServerEvent::CaughtUp { .. }
                                )
                            })
                        });
                        if claiming {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                self.signal_arbiter(fault, Signal::SIGKILL);
                self.push(Instant::now() + ms(down_ms), fault, Action::RestartArbiter);
            }
            FaultKind::DuringTransfer {
                fault: what,
                after_ms,
            } => self.during_transfer(fault, what, after_ms),
        }
    }

    /// Waits for a backup to connect to the primary's log channel (killing
    /// the backup first if the VM is protected, so that the primary brings
    /// up a spare), and strikes `after_ms` later.
    fn during_transfer(&mut self, fault: usize, what: TransferFault, after_ms: u64) {
        let ms = Duration::from_millis;
        let Some(primary) = self.resolve(Target::Primary) else {
            return self.skip(fault, "no primary".into());
        };
        let Some(before) = self.log_proxy_of(&primary).map(Proxy::connections) else {
            return self.skip(fault, format!("{primary} has no log channel proxy"));
        };
        if let Some(backup) = self.protected() {
            self.signal(fault, &backup, Signal::SIGKILL);
        }
        let deadline = Instant::now() + TRANSFER_WAIT;
        loop {
            if self
                .log_proxy_of(&primary)
                .is_some_and(|p| p.connections() > before)
            {
                break;
            }
            if Instant::now() > deadline {
                return self.skip(
                    fault,
                    format!("no backup began joining {primary} within {TRANSFER_WAIT:?}"),
                );
            }
            self.run_due();
            std::thread::sleep(Duration::from_micros(200));
        }
        let connected = Instant::now();
        let connected_ns = unix_ns();
        // The view naming the joiner is older than its connection; the
        // last one the arbiter gave may be older still.
        let joiner = self
            .view()
            .and_then(|v| v.backup)
            .map(|m| m.id)
            .filter(|b| *b != primary)
            .filter(|b| self.process(b).is_some_and(Process::running));
        std::thread::sleep((connected + ms(after_ms)).saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let strike = Strike {
            fault,
            t_ns: unix_ns(),
            primary: primary.clone(),
            joiner: joiner.clone(),
            what: what.to_string(),
            connected_ns,
            moment: String::new(),
        };
        self.note(
            fault,
            format!(
                "{} connected to {primary}'s log channel; {} ms later: {what}",
                joiner.as_deref().unwrap_or("a backup"),
                after_ms
            ),
        );
        let joiner_or_skip = |this: &mut Self| {
            if joiner.is_none() {
                this.note(fault, "the view names no joining backup".into());
            }
            joiner.clone()
        };
        match what {
            TransferFault::KillPrimary => {
                if self.signal(fault, &primary, Signal::SIGKILL) {
                    self.down_by_design = Some(strike.clone());
                }
                self.last_heal = Instant::now();
            }
            TransferFault::PausePrimary { for_ms } => {
                if self.signal(fault, &primary, Signal::SIGSTOP) {
                    self.push(now + ms(for_ms), fault, Action::Cont(primary));
                }
            }
            TransferFault::KillBackup => {
                if let Some(j) = joiner_or_skip(self) {
                    self.signal(fault, &j, Signal::SIGKILL);
                    self.last_heal = Instant::now();
                }
            }
            TransferFault::PauseBackup { for_ms } => {
                if let Some(j) = joiner_or_skip(self) {
                    if self.signal(fault, &j, Signal::SIGSTOP) {
                        self.push(now + ms(for_ms), fault, Action::Cont(j));
                    }
                }
            }
            TransferFault::Stall { direction, for_ms } => {
                let ways = match direction {
                    None => [true, true],
                    Some(Direction::ToPrimary) => [true, false],
                    Some(Direction::ToBackup) => [false, true],
                };
                if let Some(p) = self.log_proxy_of(&primary) {
                    p.stall(now + ms(for_ms), ways);
                }
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            TransferFault::Cut { for_ms } => {
                if let Some(p) = self.log_proxy_of(&primary) {
                    p.partition();
                }
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
        }
        self.strikes.push(strike);
    }

    /// While a fault waits for its moment: what else falls due meanwhile
    /// (an arbiter's restart, a SIGCONT, a heal, a side-lane fault), but
    /// no other fault that waits for a transfer.
    fn run_due(&mut self) {
        self.replenish();
        while let Some(Reverse((at, fault, n))) = self.queue.peek().copied() {
            let waits = matches!(
                self.actions[n],
                Action::Start(FaultKind::DuringTransfer { .. })
            );
            if at > Instant::now() || waits {
                return;
            }
            self.queue.pop();
            let action = self.actions[n].clone();
            self.act(fault as usize, action);
        }
    }

    /// Runs what is left on the queue, each when it is due.
    fn run_all(&mut self) {
        while let Some(Reverse((at, _, _))) = self.queue.peek().copied() {
            self.run_until(at);
        }
    }

    /// Runs every action due by `until`, replacing servers that end
    /// meanwhile.
    fn run_until(&mut self, until: Instant) {
        loop {
            self.replenish();
            let next = self.queue.peek().map(|Reverse((at, _, _))| *at);
            let now = Instant::now();
            match next {
                Some(at) if at <= now => {
                    if let Some(Reverse((_, fault, n))) = self.queue.pop() {
                        let action = self.actions[n].clone();
                        self.act(fault as usize, action);
                    }
                }
                _ if now >= until => return,
                _ => {
                    let wake = next.unwrap_or(until).min(until);
                    let nap = wake.saturating_duration_since(now);
                    std::thread::sleep(nap.min(Duration::from_millis(20)));
                }
            }
        }
    }
}

/// What kills the primary, the one server with the VM's state when the VM
/// is unprotected (a fault during a transfer is chosen for its moment).
fn costs_the_primary(kind: &FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::Kill {
            target: Target::Primary,
            ..
        } | FaultKind::KillPrimaryAfterOutput
            | FaultKind::KillPrimaryDuringCut { .. }
            | FaultKind::KillPrimaryWhileBackupPaused { .. }
            | FaultKind::ArbiterDownDuringClaim { .. }
    )
}

/// Whether a primary's `events` say it is protected in `view` by `backup`:
/// its `protected` for them, and no failure or departure of its backup,
/// failed transfer or deposition since.
fn protected_in(events: &[EventRecord], view: u64, backup: &str) -> bool {
    let Some(at) = events.iter().rposition(|e| {
        matches!(&e.event, ServerEvent::Protected { view: v, backup: b, .. } if *v == view && b == backup)
    }) else {
        return false;
    };
    !events[at + 1..].iter().any(|e| {
        matches!(
            e.event,
            ServerEvent::FailureDetected { .. }
                | ServerEvent::PeerLeft { .. }
                | ServerEvent::TransferFailed { .. }
                | ServerEvent::Deposed { .. }
        )
    })
}

/// When the primary of `view` reported `protected` by `backup` (unix ns),
/// if its events say it still is.
pub fn protected_at(events: &[EventRecord], view: u64, backup: &str) -> Option<u64> {
    protected_in(events, view, backup).then(|| {
        events
            .iter()
            .rev()
            .find(|e| matches!(&e.event, ServerEvent::Protected { view: v, backup: b, .. } if *v == view && b == backup))
            .map_or(0, |e| e.t_ns)
    })
}

/// A log channel listener behind a proxy of its own, as a server's
/// `--log-listen` and `--log-advertise`: whoever becomes primary, the
/// campaign can fault its log channel.
fn log_listener() -> Result<(Proxy, Vec<OsString>)> {
    let listen = free_tcp_addr()?;
    let proxy = Proxy::start(listen)?;
    let args = vec![
        "--log-listen".into(),
        listen.to_string().into(),
        "--log-advertise".into(),
        proxy.addr().to_string().into(),
    ];
    Ok((proxy, args))
}

fn time_limit(p: &ScheduleParams) -> Duration {
    STARTUP * 2 + Duration::from_millis(p.duration_ms) + DRAIN + FINAL_READS
}

/// Runs the trial of `schedule`, its files in `<out>/trial-<seed>`.
pub fn run(launcher: &Launcher, settings: &Settings, schedule: Schedule) -> Result<TrialRun> {
    let p = &settings.params;
    let seed = schedule.seed;
    let dir = settings.out.join(format!("trial-{seed}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let limit = time_limit(p);
    let mut config = ClusterConfig::new(&settings.vm_id, limit);
    config.dir = Some(dir.clone());
    config.names = ["vmm1".into(), "vmm2".into()];
    config.knobs.failure_timeout_ms = Some(p.failure_timeout_ms);
    config.proxy = true;
    let (backup_log_proxy, backup_extra) = log_listener()?;
    config.backup_extra = backup_extra;
    if p.etcd {
        config.arbiter = ArbiterKind::Etcd(EtcdConfig::new(limit));
    }
    let mut cluster = Cluster::start(launcher, &config)?;
    cluster.wait_fault_tolerant(STARTUP)?;
    cluster.wait_answering(STARTUP)?;
    let arbiter_at = cluster.arbiter_at();
    let membership = Membership {
        arbiter: arbiter_at.clone(),
        vm_id: settings.vm_id.clone(),
        knobs: config.knobs.clone(),
    };
    let routes = Routes::default();
    let mut proxies = Vec::new();
    for (i, process) in [&cluster.primary, &cluster.backup].into_iter().enumerate() {
        let service = process.address()?;
        let proxy = UdpProxy::start(service, seed ^ (i as u64 + 1))?;
        routes.add(service, proxy.addr(), process.name());
        proxies.push(proxy);
    }
    let arbiter = arbiter::connect(&arbiter_at, ARBITER_TIMEOUT)
        .context("cannot create the injector's arbiter client")?;
    let recorder = Recorder::new(Clock::start());
    let clock = recorder.clock();
    let mut injector = Injector {
        cluster: &mut cluster,
        spares: Vec::new(),
        log_proxies: vec![(config.names[1].clone(), backup_log_proxy)],
        pool: p.spares > 0,
        replaced: BTreeSet::new(),
        last_replenish: Instant::now(),
        skipped: Vec::new(),
        strikes: Vec::new(),
        down_by_design: None,
        proxies,
        routes: routes.clone(),
        launcher: launcher.clone(),
        membership,
        dir: dir.clone(),
        time_limit: limit,
        seed,
        spares_started: 0,
        arbiter,
        vm_id: settings.vm_id.clone(),
        view: None,
        failure_timeout: Duration::from_millis(p.failure_timeout_ms),
        start: Instant::now(),
        queue: BinaryHeap::new(),
        actions: Vec::new(),
        injected: Vec::new(),
        killed: Vec::new(),
        last_heal: Instant::now(),
    };
    injector.view();
    for _ in 0..p.spares {
        injector.start_spare(usize::MAX)?;
    }
    // The first backup joined by state transfer: the faults start once
    // the primary says so.
    let deadline = Instant::now() + STARTUP;
    while injector.protected().is_none() {
        if Instant::now() > deadline {
            anyhow::bail!("the first backup did not join within {STARTUP:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let stop = AtomicBool::new(false);
    let counts = LoadCounts::default();
    let start = Instant::now();
    let start_ns = clock.now_ns();
    injector.start = start;
    injector.last_heal = start;
    for (i, fault) in schedule.faults.iter().enumerate() {
        let at = start + Duration::from_millis(fault.at_ms);
        injector.push(at, i, Action::Start(fault.kind.clone()));
    }
    let bound = liveness_bound(p.failure_timeout_ms);
    let planned_end = start + Duration::from_millis(p.duration_ms.max(schedule.healed_ms));
    std::thread::scope(|scope| {
        let give_up = planned_end + bound * 4 + DRAIN;
        for n in 0..settings.clients {
            let (arbiter_at, routes, recorder, stop, counts) =
                (&arbiter_at, routes.clone(), &recorder, &stop, &counts);
            let vm_id = &settings.vm_id;
            scope.spawn(move || {
                run_client(
                    arbiter_at,
                    vm_id,
                    routes,
                    seed,
                    n,
                    settings.clients,
                    recorder,
                    stop,
                    give_up,
                    counts,
                )
            });
        }
        injector.run_until(planned_end);
        // Whatever the schedule set off and is still pending (a heal, a
        // restart) comes before the settling time.
        injector.run_all();
        let settle_until = injector.last_heal.max(planned_end) + bound + Duration::from_secs(1);
        injector.run_until(settle_until);
        stop.store(true, Ordering::SeqCst);
    });
    let end_ns = clock.now_ns();
    let healed_ns = start_ns + u64::try_from((injector.last_heal - start).as_nanos()).unwrap_or(0);

    let (finals, reader) = match read_back(
        &arbiter_at,
        &settings.vm_id,
        routes.clone(),
        &recorder,
        // A VM down by design answers nobody: no point waiting long.
        Instant::now()
            + if injector.down_by_design.is_some() {
                Duration::from_secs(3)
            } else {
                FINAL_READS
            },
    ) {
        Ok((f, r)) => (f, Some(r)),
        Err(e) => {
            println!("    final reads: {e:#}");
            (BTreeMap::new(), None)
        }
    };
    let reprotect_bound = reprotect_bound(p.failure_timeout_ms);
    let reprotected_ms = (p.spares > 0 && injector.down_by_design.is_none())
        .then(|| wait_reprotected(&mut injector, reprotect_bound, healed_ns));
    let final_view = injector.view();
    let mut strikes = std::mem::take(&mut injector.strikes);
    for strike in &mut strikes {
        let events = injector
            .process(&strike.primary)
            .map(|p| p.events())
            .unwrap_or_default();
        strike.moment = moment(&events, strike.connected_ns, strike.t_ns).into();
    }
    let mut down_by_design = injector.down_by_design.take();
    if let Some(d) = &mut down_by_design {
        let events = injector
            .process(&d.primary)
            .map(|p| p.events())
            .unwrap_or_default();
        d.moment = moment(&events, d.connected_ns, d.t_ns).into();
    }
    let datagrams = injector
        .proxies
        .iter()
        .map(UdpProxy::counts)
        .fold(Default::default(), add_counts);
    let Injector {
        spares,
        injected,
        killed,
        skipped,
        ..
    } = injector;
    let mut events = cluster.events();
    let mut spares = spares;
    let mut exits = BTreeMap::new();
    for s in &mut spares {
        events.0.push((s.name().to_owned(), s.events()));
        let _ = s.stop(Duration::from_secs(5));
        let how = s.exited().map_or("status unknown".into(), describe_exit);
        exits.insert(s.name().to_owned(), how);
    }
    exits.extend(cluster.stop(Duration::from_secs(5)));
    Ok(TrialRun {
        schedule,
        dir,
        start_ns,
        end_ns,
        healed_ns,
        injected,
        ops: recorder.snapshot(),
        reader,
        finals,
        events,
        exits,
        killed,
        client_failures: counts
            .failures
            .into_inner()
            .unwrap_or_else(|p| p.into_inner()),
        gave_up: counts.gave_up.into_inner(),
        final_view,
        reprotected_ms,
        reprotect_bound,
        skipped,
        strikes,
        down_by_design,
        datagrams,
        names: routes.names(),
    })
}

fn add_counts(
    a: crate::launcher::DatagramCounts,
    b: crate::launcher::DatagramCounts,
) -> crate::launcher::DatagramCounts {
    crate::launcher::DatagramCounts {
        forwarded: a.forwarded + b.forwarded,
        dropped: a.dropped + b.dropped,
        duplicated: a.duplicated + b.duplicated,
        reordered: a.reordered + b.reordered,
        replies: a.replies + b.replies,
    }
}

/// How long after the last heal (`healed_ns`) the primary of the final
/// view reported `protected` (0 if it was before), waiting until `bound`
/// after the heal; `None` if it did not.
fn wait_reprotected(injector: &mut Injector, bound: Duration, healed_ns: u64) -> Option<f64> {
    let deadline = injector.last_heal + bound;
    loop {
        injector.last_replenish = Instant::now() - Duration::from_secs(1);
        injector.replenish();
        if let Some(backup) = injector.protected() {
            let view = injector.view.clone()?;
            let primary = view.primary?.id;
            let events = injector.process(&primary).map(|p| p.events())?;
            let at = protected_at(&events, view.number, &backup)?;
            return Some(at.saturating_sub(healed_ns) as f64 / 1e6);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where a primary's `events` put `t_ns` in the join that began with a
/// connection at `connected_ns`.
fn moment(events: &[EventRecord], connected_ns: u64, t_ns: u64) -> &'static str {
    let first = |wanted: fn(&ServerEvent) -> bool| {
        events
            .iter()
            .find(|e| e.t_ns >= connected_ns && wanted(&e.event))
            .map(|e| e.t_ns)
    };
    let started = first(|e| matches!(e, ServerEvent::TransferStarted { .. }));
    let ended = first(|e| {
        matches!(
            e,
            ServerEvent::Protected { .. } | ServerEvent::TransferFailed { .. }
        )
    });
    if ended.is_some_and(|t| t <= t_ns) {
        AFTER_TRANSFER
    } else if started.is_some_and(|t| t <= t_ns) {
        "mid-transfer"
    } else {
        "in the handshake"
    }
}
