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

mod inject;

use inject::{Action, Injector};

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
