//! `ftvm bench ft`: what fault tolerance costs and how fast it recovers,
//! measured against real `ftvm` processes (an arbiter, a primary, a backup)
//! and a plain `ftvm run` baseline in the same run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::launcher::{
    free_udp_addr, Cluster, ClusterConfig, Guest, Knobs, Launcher, Role, ServerConfig,
};
use crate::load::{self, closed_loop, paced_loop};
use crate::procstat::{cpu_secs, max_rss_mib};
use crate::report::write_json;
use crate::stats::{median, percentile};
use ftvm_core::host::events::{ServerEvent, ServerRole, Status};
use ftvm_core::machine::workload::Workload;
use ftvm_kvclient::{ClientConfig, KvClient};

const VM_ID: &str = "bench";

#[derive(clap::Args)]
pub struct FtBenchArgs {
    /// Closed-loop clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds of each load on each server, in each round.
    #[arg(long, default_value_t = 4.0)]
    pub duration: f64,
    /// Rounds of the same load on `ftvm run` and then on the pair, all
    /// running throughout; the overhead is the median round's.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Requests per second of the one paced client that measures latency
    /// below saturation, where what FT adds is the output rule's wait.
    #[arg(long, default_value_t = 200.0)]
    pub paced_rate: f64,
    /// Failover trials.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Failure timeout of the log channel, in ms.
    #[arg(long, default_value_t = 300)]
    pub failure_timeout_ms: u64,
    /// Seconds the backup is made to lag, for the memory measurement: it
    /// is stopped (SIGSTOP) for two thirds of the failure timeout at a
    /// time, so that it lags without being declared dead.
    #[arg(long, default_value_t = 3.0)]
    pub lag_secs: f64,
    /// Log entries in flight before the primary waits for its backup
    /// (passed to both; the servers' default when omitted).
    #[arg(long)]
    pub window_entries: Option<u64>,
    /// The backup's replay lag at which the primary waits for it (passed
    /// to both; the servers' default when omitted; 0 turns it off).
    #[arg(long)]
    pub max_lag_ms: Option<f64>,
    /// How long the log channel batches entries (passed to both; the
    /// servers' default when omitted).
    #[arg(long)]
    pub batch_delay_ms: Option<f64>,
    /// Guest memory size.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// The guest workload: `kv-user` (the KV service's hot path at CPL3)
    /// or `kv` (all of it at CPL0).
    #[arg(long, default_value = "kv-user")]
    pub workload: Workload,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// An arbiter, a primary and a backup, each with a time limit, fault
/// tolerant and answering.
fn start_pair(launcher: &Launcher, args: &FtBenchArgs, limit: Duration) -> Result<Cluster> {
    let mut config = ClusterConfig::new(VM_ID, limit);
    config.guest = Guest {
        mem: Some(args.mem.clone()),
        workload: Some(args.workload),
        ..Guest::default()
    };
    config.knobs = Knobs {
        failure_timeout_ms: Some(args.failure_timeout_ms),
        window_entries: args.window_entries,
        max_lag_ms: args.max_lag_ms,
        batch_delay_ms: args.batch_delay_ms,
    };
    let mut pair = Cluster::start(launcher, &config)?;
    pair.wait_fault_tolerant(Duration::from_secs(30))?;
    pair.wait_answering(Duration::from_secs(30))?;
    Ok(pair)
}

#[derive(Debug, Default, Serialize)]
pub struct FailoverTrial {
    pub detection_ms: f64,
    pub test_and_set_ms: f64,
    pub go_live_ms: f64,
    pub first_reply_ms: f64,
}

/// One round: the closed-loop load on `ftvm run`, then on the pair.
#[derive(Debug, Serialize)]
pub struct OverheadRound {
    pub run_ops_per_sec: f64,
    pub ft_ops_per_sec: f64,
    pub ratio: f64,
    /// CPU used under the load, in % of one core.
    pub run_cpu_pct: f64,
    pub primary_cpu_pct: f64,
    pub backup_cpu_pct: f64,
}

/// Request latency without and with FT, pooled over the rounds.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub run_p50_us: f64,
    pub run_p99_us: f64,
    pub ft_p50_us: f64,
    pub ft_p99_us: f64,
    /// FT minus run: what the output rule (and sharing the cores) adds.
    pub added_p50_us: f64,
    pub added_p99_us: f64,
}

impl Latency {
    fn of(run: &[u64], ft: &[u64]) -> Latency {
        let (run_p50_us, run_p99_us) = (percentile(run, 0.50), percentile(run, 0.99));
        let (ft_p50_us, ft_p99_us) = (percentile(ft, 0.50), percentile(ft, 0.99));
        Latency {
            run_p50_us,
            run_p99_us,
            ft_p50_us,
            ft_p99_us,
            added_p50_us: ft_p50_us - run_p50_us,
            added_p99_us: ft_p99_us - run_p99_us,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct FtReport {
    pub clients: usize,
    pub seconds: f64,
    pub paced_rate: f64,
    pub failure_timeout_ms: u64,
    pub rounds: Vec<OverheadRound>,
    /// Medians over the rounds.
    pub run_ops_per_sec: f64,
    pub ft_ops_per_sec: f64,
    pub ft_overhead_ratio: f64,
    /// Under the closed-loop clients, where the guest is saturated.
    pub saturated: Latency,
    /// Under one client paced at `paced_rate`: the output rule's own cost.
    pub paced: Latency,
    /// The saturated pair's primary, over every exit of all its rounds.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub lag_samples: u64,
    /// How long the primary held its outputs for the backup's ack, under
    /// the closed-loop load and under the paced client (the other pair).
    pub hold_p50_ms: f64,
    pub hold_p99_ms: f64,
    pub paced_hold_p50_ms: f64,
    pub paced_hold_p99_ms: f64,
    pub log_mbit_per_sec: f64,
    pub primary_rss_mib: f64,
    pub backup_rss_mib: f64,
    pub lagging_primary_rss_mib: f64,
    pub lagging_backup_rss_mib: f64,
    /// Whether the primary kept its backup through the lagging phase.
    pub lagging_pair_stayed_together: bool,
    pub trials: Vec<FailoverTrial>,
    pub failover_median_ms: f64,
    pub failover_max_ms: f64,
}

/// The primary's latest status line, or one of zeros before its first.
fn status(pair: &Cluster) -> Status {
    pair.primary
        .last_status()
        .unwrap_or_else(|| Status::zero(ServerRole::Primary))
}

/// What one server (or pair) did under the closed-loop load.
struct Saturated {
    ops_per_sec: f64,
    /// Sorted, in ns.
    latencies: Vec<u64>,
    /// CPU each of `pids` used, in % of a core.
    cpu_pct: Vec<f64>,
}

fn saturate(service: SocketAddr, pids: &[u32], args: &FtBenchArgs) -> Result<Saturated> {
    let duration = Duration::from_secs_f64(args.duration);
    let before: Vec<Option<f64>> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let t = Instant::now();
    let load = closed_loop(service, args.clients, duration)?;
    let seconds = t.elapsed().as_secs_f64();
    let cpu_pct = pids
        .iter()
        .zip(before)
        .map(|(&pid, before)| match (before, cpu_secs(pid)) {
            (Some(b), Some(a)) => (a - b) / seconds * 100.0,
            _ => 0.0,
        })
        .collect();
    Ok(Saturated {
        ops_per_sec: load.ops as f64 / seconds,
        latencies: load.latencies,
        cpu_pct,
    })
}

/// One client paced at `--paced-rate`; its latencies, sorted, in ns.
fn pace(service: SocketAddr, args: &FtBenchArgs) -> Result<Vec<u64>> {
    let duration = Duration::from_secs_f64(args.duration);
    let pace = Duration::from_secs_f64(1.0 / args.paced_rate);
    Ok(paced_loop(service, 1, duration, Some(pace))?.latencies)
}

fn merge(into: &mut Vec<u64>, more: &[u64]) {
    into.extend_from_slice(more);
    into.sort_unstable();
}

fn overhead(launcher: &Launcher, args: &FtBenchArgs, report: &mut FtReport) -> Result<()> {
    let duration = Duration::from_secs_f64(args.duration);
    let limit = duration * 4 * args.rounds as u32 + Duration::from_secs(120);
    // Everything runs at once and the load alternates between them, so
    // that a change in the machine's speed (it drifts here by ±15% over
    // minutes) falls on both sides alike. An idle server costs next to
    // nothing: its guest halts, and a backup skips the halts.
    let mut run = ServerConfig::new("run", Role::Run, free_udp_addr()?, limit);
    run.guest.mem = Some(args.mem.clone());
    run.guest.workload = Some(args.workload);
    run.inherit_stderr = true;
    let service = run.address;
    let mut vmm = launcher.start(&run)?;
    vmm.wait_answering(Duration::from_secs(30))?;
    // One pair per load, so that each one's status lines (over every exit
    // and output since it started) are that load's.
    let pair = start_pair(launcher, args, limit)?;
    let paced_pair = start_pair(launcher, args, limit)?;
    let pair_service = pair.primary.address()?;
    let paced_service = paced_pair.primary.address()?;
    let (mut run_sat, mut run_paced, mut ft_sat, mut ft_paced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut loaded = Duration::ZERO;
    let bytes_before = status(&pair).log_bytes;
    for n in 0..args.rounds {
        let run = saturate(service, &[vmm.pid()], args)?;
        let t = Instant::now();
        let ft = saturate(pair_service, &[pair.primary.pid(), pair.backup.pid()], args)
            .map_err(|e| came_apart(&pair, n, args, e))?;
        loaded += t.elapsed();
        merge(&mut run_paced, &pace(service, args)?);
        merge(&mut ft_paced, &pace(paced_service, args)?);
        let round = OverheadRound {
            run_ops_per_sec: run.ops_per_sec,
            ft_ops_per_sec: ft.ops_per_sec,
            ratio: ft.ops_per_sec / run.ops_per_sec.max(f64::MIN_POSITIVE),
            run_cpu_pct: run.cpu_pct[0],
            primary_cpu_pct: ft.cpu_pct[0],
            backup_cpu_pct: ft.cpu_pct[1],
        };
        println!(
            "  round {n}: run {:.0} ops/s ({:.0}% CPU), FT {:.0} ops/s (primary {:.0}% CPU, backup {:.0}%) = {:.3}",
            round.run_ops_per_sec, round.run_cpu_pct, round.ft_ops_per_sec, round.primary_cpu_pct,
            round.backup_cpu_pct, round.ratio
        );
        report.rounds.push(round);
        merge(&mut run_sat, &run.latencies);
        merge(&mut ft_sat, &ft.latencies);
    }
    vmm.stop(Duration::from_secs(10))?;
    // The status lines come every 250 ms: let one cover the load's end.
    std::thread::sleep(ftvm_core::host::events::STATUS_INTERVAL * 2);
    let loaded_status = status(&pair);
    let paced_status = status(&paced_pair);
    report.lag_p50_ms = loaded_status.lag_p50_ms;
    report.lag_p99_ms = loaded_status.lag_p99_ms;
    report.lag_max_ms = loaded_status.lag_max_ms;
    report.lag_samples = loaded_status.lag_samples;
    report.hold_p50_ms = loaded_status.output_hold_p50_ms;
    report.hold_p99_ms = loaded_status.output_hold_p99_ms;
    report.paced_hold_p50_ms = paced_status.output_hold_p50_ms;
    report.paced_hold_p99_ms = paced_status.output_hold_p99_ms;
    report.log_mbit_per_sec = loaded_status.log_bytes.saturating_sub(bytes_before) as f64 * 8.0
        / 1e6
        / loaded.as_secs_f64().max(f64::MIN_POSITIVE);
    let rounds = &report.rounds;
    let med = |f: fn(&OverheadRound) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    report.run_ops_per_sec = med(|r| r.run_ops_per_sec);
    report.ft_ops_per_sec = med(|r| r.ft_ops_per_sec);
    report.ft_overhead_ratio = med(|r| r.ratio);
    report.saturated = Latency::of(&run_sat, &ft_sat);
    report.paced = Latency::of(&run_paced, &ft_paced);
    report.primary_rss_mib = max_rss_mib(pair.primary.pid());
    report.backup_rss_mib = max_rss_mib(pair.backup.pid());

    // Make the backup lag: stop it, again and again, under load, each time
    // for less than the failure timeout; the primary's window and lag bound
    // hold the guest, so neither side's memory may grow.
    let load = {
        let service = pair_service;
        let clients = args.clients;
        let lag = Duration::from_secs_f64(args.lag_secs);
        std::thread::spawn(move || {
            closed_loop_tolerant(service, clients, lag + Duration::from_secs(1))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Duration::from_millis(args.failure_timeout_ms * 2 / 3);
    let lagging = Instant::now();
    while lagging.elapsed() < Duration::from_secs_f64(args.lag_secs) {
        let _ = pair.backup.signal(Signal::SIGSTOP);
        std::thread::sleep(stopped);
        let _ = pair.backup.signal(Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(50));
    }
    report.lagging_primary_rss_mib = max_rss_mib(pair.primary.pid());
    report.lagging_backup_rss_mib = max_rss_mib(pair.backup.pid());
    let _ = load.join();
    report.lagging_pair_stayed_together = !pair
        .primary
        .has_event(|e| matches!(e, ServerEvent::FailureDetected { .. }));
    Ok(())
}

/// A load on the pair that failed: says so when the pair came apart first
/// (one side took the other for failed, so the primary whose address the
/// benchmark's clients use may have left), which a machine busy with other
/// work can cause by starving a server for longer than the failure
/// timeout.
fn came_apart(pair: &Cluster, round: usize, args: &FtBenchArgs, e: anyhow::Error) -> anyhow::Error {
    let detected = [&pair.primary, &pair.backup].into_iter().find_map(|p| {
        p.events().into_iter().find_map(|r| match r.event {
            ServerEvent::FailureDetected { peer, detail } => Some(format!(
                "{} took its {peer:?} for failed ({detail})",
                p.name()
            )),
            _ => None,
        })
    });
    match detected {
        Some(what) => e.context(format!(
            "round {round}: the pair came apart under load: {what}, with a failure timeout of {} ms; on a machine busy with other work, rerun it, or with a longer --failure-timeout-ms",
            args.failure_timeout_ms
        )),
        None => e.context(format!("round {round}: the load on the pair failed")),
    }
}

/// Load that tolerates requests timing out (the primary pauses while the
/// backup is stopped).
fn closed_loop_tolerant(service: SocketAddr, clients: usize, duration: Duration) {
    let deadline = Instant::now() + duration;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let config = ClientConfig {
                    attempt_timeout: Duration::from_millis(200),
                    max_attempts: 3,
                };
                let Ok(mut kv) = KvClient::connect(service, config) else {
                    return;
                };
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let _ = kv.put(
                        format!("lag-{c}-{}", i % 16).as_bytes(),
                        b"0123456789abcdef",
                    );
                    i += 1;
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn failover_trial(launcher: &Launcher, args: &FtBenchArgs, n: usize) -> Result<FailoverTrial> {
    let mut pair = start_pair(launcher, args, Duration::from_secs(60))?;
    measure_failover(&mut pair, n, |_| Ok(()))
}

/// Does `first` (another failure at the same moment), kills `pair`'s
/// primary (SIGKILL) at once, and times the backup's way from that kill to
/// its first reply.
pub(super) fn measure_failover(
    pair: &mut Cluster,
    n: usize,
    first: impl FnOnce(&mut Cluster) -> Result<()>,
) -> Result<FailoverTrial> {
    let backup_service = pair.backup.address()?;
    first(pair)?;
    let kill_ns = ftvm_core::host::events::unix_ns();
    let killed = Instant::now();
    pair.primary.kill();
    // Polled often: the client starts asking the new primary only then.
    pair.backup
        .wait_for(
            "the backup to go live",
            Duration::from_secs(20),
            Duration::from_millis(1),
            |b| Ok(b.has_event(|e| matches!(e, ServerEvent::Live { .. }))),
        )
        .with_context(|| format!("trial {n}"))?;
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(20),
        max_attempts: 500,
    };
    let mut kv = KvClient::connect(backup_service, config)?;
    kv.get(b"failover")
        .with_context(|| format!("trial {n}: the new primary does not answer"))?;
    let first_reply_ms = killed.elapsed().as_secs_f64() * 1000.0;
    let evs = pair.backup.events();
    let at = |name: &str, is: fn(&ServerEvent) -> bool| -> Result<f64> {
        evs.iter()
            .find(|e| is(&e.event))
            .map(|e| e.t_ns.saturating_sub(kill_ns) as f64 / 1e6)
            .with_context(|| format!("trial {n}: no {name} event"))
    };
    Ok(FailoverTrial {
        detection_ms: at("failure_detected", |e| {
            matches!(e, ServerEvent::FailureDetected { .. })
        })?,
        test_and_set_ms: at("tas", |e| matches!(e, ServerEvent::Tas { won: true, .. }))?,
        go_live_ms: at("live", |e| matches!(e, ServerEvent::Live { .. }))?,
        first_reply_ms,
    })
}

pub fn bench_ft(args: &FtBenchArgs) -> Result<()> {
    load::duration(args.duration)?;
    let launcher = Launcher::this_executable()?;
    let mut report = FtReport {
        clients: args.clients,
        seconds: args.duration,
        paced_rate: args.paced_rate,
        failure_timeout_ms: args.failure_timeout_ms,
        ..FtReport::default()
    };
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !(args.paced_rate.is_finite() && args.paced_rate > 0.0) {
        bail!(
            "--paced-rate {} must be a positive number of requests per second",
            args.paced_rate
        );
    }
    println!(
        "measuring: {} rounds of ftvm run vs primary+backup ({} closed-loop clients for {} s, then 1 client at {} req/s for {} s, each), then {} failover trials",
        args.rounds, args.clients, args.duration, args.paced_rate, args.duration, args.trials
    );
    overhead(&launcher, args, &mut report)?;
    for n in 0..args.trials {
        let t = failover_trial(&launcher, args, n)?;
        println!(
            "  trial {n}: detection {:.0} ms, test-and-set {:.0} ms, live {:.0} ms, first reply {:.0} ms",
            t.detection_ms, t.test_and_set_ms, t.go_live_ms, t.first_reply_ms
        );
        report.trials.push(t);
    }
    let mut replies: Vec<f64> = report.trials.iter().map(|t| t.first_reply_ms).collect();
    report.failover_max_ms = replies.iter().cloned().fold(0.0, f64::max);
    report.failover_median_ms = median(&mut replies);
    println!(
        "FT overhead: {:.0} ops/s with primary+backup / {:.0} ops/s run = {:.3}",
        report.ft_ops_per_sec, report.run_ops_per_sec, report.ft_overhead_ratio
    );
    for (what, l) in [
        (
            format!("{} closed-loop clients", args.clients),
            &report.saturated,
        ),
        (
            format!("1 client at {} req/s", args.paced_rate),
            &report.paced,
        ),
    ] {
        println!(
            "latency, {what}: run p50 {:.0} µs p99 {:.0} µs; FT p50 {:.0} µs p99 {:.0} µs; FT adds {:.0} µs at p50, {:.0} µs at p99",
            l.run_p50_us, l.run_p99_us, l.ft_p50_us, l.ft_p99_us, l.added_p50_us, l.added_p99_us
        );
    }
    println!(
        "outputs held for the backup's ack: p50 {:.3} ms p99 {:.3} ms under the closed-loop load; p50 {:.3} ms p99 {:.3} ms under the paced client",
        report.hold_p50_ms, report.hold_p99_ms, report.paced_hold_p50_ms, report.paced_hold_p99_ms
    );
    println!(
        "backup lag at the primary's {} exits under the closed-loop load: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; log bandwidth {:.3} Mbit/s",
        report.lag_samples, report.lag_p50_ms, report.lag_p99_ms, report.lag_max_ms, report.log_mbit_per_sec
    );
    println!(
        "memory (max RSS): primary {:.1} MiB, backup {:.1} MiB; with the backup made to lag for {:.1} s under load: primary {:.1} MiB, backup {:.1} MiB ({})",
        report.primary_rss_mib, report.backup_rss_mib, args.lag_secs, report.lagging_primary_rss_mib, report.lagging_backup_rss_mib,
        if report.lagging_pair_stayed_together { "the pair stayed together" } else { "the primary declared its backup failed" }
    );
    println!(
        "failover (SIGKILL to first reply from the new primary): median {:.0} ms, max {:.0} ms, failure timeout {} ms",
        report.failover_median_ms, report.failover_max_ms, args.failure_timeout_ms
    );
    write_json(args.json.as_deref(), &report)
}
