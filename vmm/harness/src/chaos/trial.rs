//! One trial: a cluster, the clients through their lossy proxies, the
//! schedule's faults injected as they fall due, and what the checks need
//! collected at the end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arbiter::etcd::cluster::ClusterConfig as EtcdConfig;
use arbiter::View;
use nix::sys::signal::Signal;

use super::client::{read_back, run_client, LoadCounts, Routes};
use super::schedule::{Direction, FaultKind, Schedule, ScheduleParams, Target};
use crate::history::{Clock, HistoryOp, Recorder};
use crate::launcher::{
    describe_exit, free_udp_addr, ArbiterKind, Cluster, ClusterArbiter, ClusterConfig,
    ClusterEvents, DatagramFaults, Launcher, Membership, Process, Role, ServerConfig, UdpProxy,
};
use ftvm_core::host::events::ServerEvent;

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

/// With spares, the VM must be fault tolerant again this long after the
/// last fault has healed.
pub const REPROTECT_BOUND: Duration = Duration::from_secs(30);

/// One thing the injector did, as it happened.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Injected {
    /// Milliseconds after the clients started.
    pub t_ms: f64,
    /// The fault of the schedule it belongs to (its index).
    pub fault: usize,
    pub what: String,
}

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
    /// With spares: whether the VM was fault tolerant again in time.
    pub reprotected: Option<bool>,
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
    StartSpare,
    Heal,
    DatagramsOff,
}

struct Injector<'a> {
    cluster: &'a mut Cluster,
    spares: Vec<Process>,
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

    fn log_proxy(&self) -> Option<&crate::launcher::Proxy> {
        self.cluster.proxy.as_ref()
    }

    fn start_spare(&mut self, fault: usize) -> Result<()> {
        self.spares_started += 1;
        let name = format!("spare{}", self.spares_started);
        let role = Role::Backup {
            membership: self.membership.clone(),
        };
        let mut config = ServerConfig::new(&name, role, free_udp_addr()?, self.time_limit);
        config.dir = Some(self.dir.clone());
        let process = self.launcher.start(&config)?;
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
            Action::StartSpare => {
                if let Err(e) = self.start_spare(fault) {
                    self.note(fault, format!("cannot start a spare: {e:#}"));
                }
            }
            Action::Heal => {
                if let Some(p) = self.log_proxy() {
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
        match kind {
            FaultKind::Kill {
                target,
                restart_after_ms,
            } => {
                let killed = self.signal_target(fault, target, Signal::SIGKILL);
                self.last_heal = Instant::now();
                match (target, restart_after_ms) {
                    (Target::Arbiter, Some(after)) => {
                        self.push(now + ms(after), fault, Action::RestartArbiter)
                    }
                    (_, Some(after)) if killed.is_some() => {
                        self.push(now + ms(after), fault, Action::StartSpare)
                    }
                    _ => {}
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
                if let Some(p) = self.log_proxy() {
                    p.partition();
                }
                self.note(fault, "log channel cut".into());
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::CutOneWay { direction, for_ms } => {
                if let Some(p) = self.log_proxy() {
                    p.partition_one_way(direction == Direction::ToPrimary);
                }
                self.note(fault, format!("log channel cut {direction}"));
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Delay { ms: d, for_ms } => {
                if let Some(p) = self.log_proxy() {
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
                if let Some(p) = self.log_proxy() {
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
                if let Some(p) = self.log_proxy() {
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
        }
    }

    /// Runs what is left on the queue, each when it is due.
    fn run_all(&mut self) {
        while let Some(Reverse((at, _, _))) = self.queue.peek().copied() {
            self.run_until(at);
        }
    }

    /// Runs every action due by `until`.
    fn run_until(&mut self, until: Instant) {
        loop {
            let Some(Reverse((at, _, _))) = self.queue.peek().copied() else {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                return;
            };
            if at > until {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                return;
            }
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if let Some(Reverse((_, fault, n))) = self.queue.pop() {
                let action = self.actions[n].clone();
                self.act(fault as usize, action);
            }
        }
    }
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
        std::thread::sleep(settle_until.saturating_duration_since(Instant::now()));
        stop.store(true, Ordering::SeqCst);
    });
    let end_ns = clock.now_ns();
    let healed_ns = start_ns + u64::try_from((injector.last_heal - start).as_nanos()).unwrap_or(0);

    let (finals, reader) = match read_back(
        &arbiter_at,
        &settings.vm_id,
        routes.clone(),
        &recorder,
        Instant::now() + FINAL_READS,
    ) {
        Ok((f, r)) => (f, Some(r)),
        Err(e) => {
            println!("    final reads: {e:#}");
            (BTreeMap::new(), None)
        }
    };
    let final_view = injector.view();
    let reprotected = (p.spares > 0).then(|| wait_reprotected(&mut injector));
    let datagrams = injector
        .proxies
        .iter()
        .map(UdpProxy::counts)
        .fold(Default::default(), add_counts);
    let Injector {
        spares,
        injected,
        killed,
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
        reprotected,
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

/// Whether the arbiter names a backup that runs, within the bound.
fn wait_reprotected(injector: &mut Injector) -> bool {
    let deadline = Instant::now() + REPROTECT_BOUND;
    while Instant::now() < deadline {
        if let Some(backup) = injector.view().and_then(|v| v.backup) {
            let running = injector.process(&backup.id).is_some_and(Process::running);
            if running {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
