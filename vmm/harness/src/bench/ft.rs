//! `ftvm bench ft`: what fault tolerance costs and how fast it recovers,
//! measured against real `ftvm` processes (an arbiter, a primary, a backup)
//! and a plain `ftvm run` baseline in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::{
    closed_loop, cpu_secs, free_tcp_port, free_udp_port, max_rss_kib, median, paced_loop,
    percentile, wait_ready, VmmProcess,
};
use ftvm_core::host::events::{read_events, ServerEvent, ServerRole, Status};
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
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(args: &[String], stderr: &Path) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the ftvm binary: {e}"))?;
    let err = std::fs::File::create(stderr)
        .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map(Proc)
        .map_err(|e| {
            format!(
                "cannot start ftvm {}: {e}",
                args.first().map(String::as_str).unwrap_or("")
            )
        })
}

/// An arbiter, a primary and a backup, each with a time limit.
struct Pair {
    /// Held so that the arbiter lives, and dies, with the pair.
    _arbiter: Proc,
    primary: Proc,
    backup: Proc,
    primary_service: SocketAddr,
    primary_events: PathBuf,
    backup_events: PathBuf,
}

impl Pair {
    fn start(dir: &Path, n: usize, args: &FtBenchArgs, limit: Duration) -> Result<Pair, String> {
        let (mem, failure_ms) = (args.mem.as_str(), args.failure_timeout_ms);
        let arbiter_addr = free_tcp_port()?;
        let state = dir.join(format!("arbiter-{n}"));
        let arbiter = spawn(
            &[
                "arbiter".into(),
                "--listen".into(),
                arbiter_addr.to_string(),
                "--state".into(),
                state.to_string_lossy().into_owned(),
            ],
            &dir.join(format!("arbiter-{n}.stderr")),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(arbiter_addr).is_err() {
            if Instant::now() > deadline {
                return Err("the arbiter did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let common = |role: &str, service: SocketAddr, events: &Path| -> Vec<String> {
            let mut a: Vec<String> = vec![
                role.into(),
                "--vm-id".into(),
                VM_ID.into(),
                "--arbiter".into(),
                arbiter_addr.to_string(),
                "--service".into(),
                service.to_string(),
                "--mem".into(),
                mem.into(),
                "--serial".into(),
                "/dev/null".into(),
                "--events".into(),
                events.to_string_lossy().into_owned(),
                "--failure-timeout-ms".into(),
                failure_ms.to_string(),
                "--timeout".into(),
                format!("{:.0}", limit.as_secs_f64()),
            ];
            for (flag, value) in [
                (
                    "--window-entries",
                    args.window_entries.map(|w| w.to_string()),
                ),
                ("--max-lag-ms", args.max_lag_ms.map(|l| l.to_string())),
                (
                    "--batch-delay-ms",
                    args.batch_delay_ms.map(|d| d.to_string()),
                ),
            ] {
                if let Some(value) = value {
                    a.extend([flag.to_string(), value]);
                }
            }
            a
        };
        let primary_service = free_udp_port()?;
        let primary_events = dir.join(format!("primary-{n}.events"));
        let mut p_args = common("primary", primary_service, &primary_events);
        p_args.extend(["--log-listen".into(), free_tcp_port()?.to_string()]);
        let primary = spawn(&p_args, &dir.join(format!("primary-{n}.stderr")))?;
        let backup_events = dir.join(format!("backup-{n}.events"));
        let backup = spawn(
            &common("backup", free_udp_port()?, &backup_events),
            &dir.join(format!("backup-{n}.stderr")),
        )?;
        let pair = Pair {
            _arbiter: arbiter,
            primary,
            backup,
            primary_service,
            primary_events,
            backup_events,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !read_events(&pair.primary_events).iter().any(|e| {
            matches!(
                &e.event,
                ServerEvent::Role {
                    backup: Some(_),
                    ..
                }
            )
        }) {
            if Instant::now() > deadline {
                let tail = |who: &str| {
                    std::fs::read_to_string(dir.join(format!("{who}-{n}.stderr")))
                        .unwrap_or_default()
                };
                return Err(format!(
                    "the pair did not become fault tolerant within 30 s\nprimary:\n{}\nbackup:\n{}",
                    tail("primary"),
                    tail("backup")
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_ready(primary_service, Duration::from_secs(30))?;
        Ok(pair)
    }
}

fn max_rss_mib(pid: u32) -> f64 {
    max_rss_kib(pid).map_or(0.0, |kib| kib as f64 / 1024.0)
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
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
fn status(pair: &Pair) -> Status {
    read_events(&pair.primary_events)
        .into_iter()
        .rev()
        .find_map(|e| match e.event {
            ServerEvent::Status(s) => Some(s),
            _ => None,
        })
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

fn saturate(service: SocketAddr, pids: &[u32], args: &FtBenchArgs) -> Result<Saturated, String> {
    let duration = Duration::from_secs_f64(args.duration);
    let before: Vec<Option<f64>> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let t = Instant::now();
    let (ops, latencies, _) = closed_loop(service, args.clients, duration)?;
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
        ops_per_sec: ops as f64 / seconds,
        latencies,
        cpu_pct,
    })
}

/// One client paced at `--paced-rate`; its latencies, sorted, in ns.
fn pace(service: SocketAddr, args: &FtBenchArgs) -> Result<Vec<u64>, String> {
    let duration = Duration::from_secs_f64(args.duration);
    let pace = Duration::from_secs_f64(1.0 / args.paced_rate);
    Ok(paced_loop(service, 1, duration, Some(pace))?.1)
}

fn merge(into: &mut Vec<u64>, more: &[u64]) {
    into.extend_from_slice(more);
    into.sort_unstable();
}

fn overhead(args: &FtBenchArgs, dir: &Path, report: &mut FtReport) -> Result<(), String> {
    let duration = Duration::from_secs_f64(args.duration);
    let limit = duration * 4 * args.rounds as u32 + Duration::from_secs(120);
    // Everything runs at once and the load alternates between them, so
    // that a change in the machine's speed (it drifts here by ±15% over
    // minutes) falls on both sides alike. An idle server costs next to
    // nothing: its guest halts, and a backup skips the halts.
    let service = free_udp_port()?;
    let vmm = VmmProcess::start(&["run"], service, &args.mem, limit, dir)?;
    wait_ready(service, Duration::from_secs(30))?;
    // One pair per load, so that each one's status lines (over every exit
    // and output since it started) are that load's.
    let pair = Pair::start(dir, 100, args, limit)?;
    let paced_pair = Pair::start(dir, 200, args, limit)?;
    let (mut run_sat, mut run_paced, mut ft_sat, mut ft_paced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut loaded = Duration::ZERO;
    let bytes_before = status(&pair).log_bytes;
    for n in 0..args.rounds {
        let run = saturate(service, &[vmm.pid()], args)?;
        let t = Instant::now();
        let ft = saturate(
            pair.primary_service,
            &[pair.primary.0.id(), pair.backup.0.id()],
            args,
        )?;
        loaded += t.elapsed();
        merge(&mut run_paced, &pace(service, args)?);
        merge(&mut ft_paced, &pace(paced_pair.primary_service, args)?);
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
    vmm.stop()?;
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
    report.primary_rss_mib = max_rss_mib(pair.primary.0.id());
    report.backup_rss_mib = max_rss_mib(pair.backup.0.id());

    // Make the backup lag: stop it, again and again, under load, each time
    // for less than the failure timeout; the primary's window and lag bound
    // hold the guest, so neither side's memory may grow.
    let backup_pid = pair.backup.0.id();
    let load = {
        let service = pair.primary_service;
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
        signal(backup_pid, nix::sys::signal::Signal::SIGSTOP);
        std::thread::sleep(stopped);
        signal(backup_pid, nix::sys::signal::Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(50));
    }
    report.lagging_primary_rss_mib = max_rss_mib(pair.primary.0.id());
    report.lagging_backup_rss_mib = max_rss_mib(backup_pid);
    let _ = load.join();
    report.lagging_pair_stayed_together = !read_events(&pair.primary_events)
        .iter()
        .any(|e| matches!(e.event, ServerEvent::FailureDetected { .. }));
    Ok(())
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

fn failover_trial(args: &FtBenchArgs, dir: &Path, n: usize) -> Result<FailoverTrial, String> {
    let pair = Pair::start(dir, n + 1, args, Duration::from_secs(60))?;
    let mut pair = pair;
    let kill_ns = ftvm_core::host::events::unix_ns();
    let killed = Instant::now();
    let _ = pair.primary.0.kill();
    let _ = pair.primary.0.wait();
    let backup_service = loop {
        let evs = read_events(&pair.backup_events);
        if evs
            .iter()
            .any(|e| matches!(e.event, ServerEvent::Live { .. }))
        {
            break backup_service(&pair)?;
        }
        if killed.elapsed() > Duration::from_secs(20) {
            return Err(format!("trial {n}: the backup did not go live"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(20),
        max_attempts: 500,
    };
    let mut kv = KvClient::connect(backup_service, config).map_err(|e| e.to_string())?;
    kv.get(b"failover")
        .map_err(|e| format!("trial {n}: the new primary does not answer: {e}"))?;
    let first_reply_ms = killed.elapsed().as_secs_f64() * 1000.0;
    let evs = read_events(&pair.backup_events);
    let at = |name: &str, is: fn(&ServerEvent) -> bool| -> Result<f64, String> {
        evs.iter()
            .find(|e| is(&e.event))
            .map(|e| e.t_ns.saturating_sub(kill_ns) as f64 / 1e6)
            .ok_or_else(|| format!("trial {n}: no {name} event"))
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

/// The backup's service address, from its command line.
fn backup_service(pair: &Pair) -> Result<SocketAddr, String> {
    let args: Vec<String> =
        std::fs::read_to_string(format!("/proc/{}/cmdline", pair.backup.0.id()))
            .map_err(|e| e.to_string())?
            .split('\0')
            .map(String::from)
            .collect();
    args.iter()
        .position(|a| a == "--service")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "cannot tell the backup's service address".to_string())
}

pub fn bench_ft(args: &FtBenchArgs) -> Result<(), String> {
    crate::bench::check_duration(args.duration)?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-ft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut report = FtReport {
        clients: args.clients,
        seconds: args.duration,
        paced_rate: args.paced_rate,
        failure_timeout_ms: args.failure_timeout_ms,
        ..FtReport::default()
    };
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    if !(args.paced_rate.is_finite() && args.paced_rate > 0.0) {
        return Err(format!(
            "--paced-rate {} must be a positive number of requests per second",
            args.paced_rate
        ));
    }
    println!(
        "measuring: {} rounds of ftvm run vs primary+backup ({} closed-loop clients for {} s, then 1 client at {} req/s for {} s, each), then {} failover trials",
        args.rounds, args.clients, args.duration, args.paced_rate, args.duration, args.trials
    );
    overhead(args, &dir, &mut report)?;
    for n in 0..args.trials {
        let t = failover_trial(args, &dir, n)?;
        println!(
            "  trial {n}: detection {:.0} ms, test-and-set {:.0} ms, live {:.0} ms, first reply {:.0} ms",
            t.detection_ms, t.test_and_set_ms, t.go_live_ms, t.first_reply_ms
        );
        report.trials.push(t);
    }
    let mut replies: Vec<f64> = report.trials.iter().map(|t| t.first_reply_ms).collect();
    report.failover_max_ms = replies.iter().cloned().fold(0.0, f64::max);
    report.failover_median_ms = median(&mut replies);
    let _ = std::fs::remove_dir_all(&dir);
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
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
