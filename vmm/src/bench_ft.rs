//! `ftvm bench ft`: what fault tolerance costs and how fast it recovers,
//! measured against real `ftvm` processes (an arbiter, a primary, a backup)
//! and a plain `ftvm run` baseline in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::{
    closed_loop, free_tcp_port, free_udp_port, max_rss_kib, percentile, serve_under_load,
    wait_ready,
};
use crate::events::read_events;
use crate::kv::{ClientConfig, KvClient};

const VM_ID: &str = "bench";

#[derive(clap::Args)]
pub struct FtBenchArgs {
    /// Closed-loop clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds of load for the overhead measurement.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Failover trials.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Failure timeout of the log channel, in ms.
    #[arg(long, default_value_t = 300)]
    pub failure_timeout_ms: u64,
    /// Seconds the backup is stopped (SIGSTOP) to make it lag, for the
    /// memory measurement.
    #[arg(long, default_value_t = 3.0)]
    pub lag_secs: f64,
    /// Log entries in flight before the primary waits for its backup
    /// (passed to both; the servers' default when omitted).
    #[arg(long)]
    pub window_entries: Option<u64>,
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
            if let Some(w) = args.window_entries {
                a.extend(["--window-entries".to_string(), w.to_string()]);
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
        while !read_events(&pair.primary_events)
            .iter()
            .any(|e| e["event"] == "role" && e["backup"].is_string())
        {
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

#[derive(Debug, Serialize)]
pub struct FailoverTrial {
    pub detection_ms: f64,
    pub test_and_set_ms: f64,
    pub go_live_ms: f64,
    pub first_reply_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct FtReport {
    pub clients: usize,
    pub seconds: f64,
    pub failure_timeout_ms: u64,
    pub run_ops_per_sec: f64,
    pub ft_ops_per_sec: f64,
    pub ft_overhead_ratio: f64,
    pub run_p50_us: f64,
    pub run_p99_us: f64,
    pub ft_p50_us: f64,
    pub ft_p99_us: f64,
    pub output_rule_p50_us: f64,
    pub output_rule_p99_us: f64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_exits_p99: f64,
    pub log_mbit_per_sec: f64,
    pub primary_rss_mib: f64,
    pub backup_rss_mib: f64,
    pub lagging_primary_rss_mib: f64,
    pub lagging_backup_rss_mib: f64,
    pub trials: Vec<FailoverTrial>,
    pub failover_median_ms: f64,
    pub failover_max_ms: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn status_series(path: &Path, field: &str) -> Vec<f64> {
    read_events(path)
        .iter()
        .filter(|e| e["event"] == "status")
        .filter_map(|e| e[field].as_f64())
        .collect()
}

fn overhead(args: &FtBenchArgs, dir: &Path, report: &mut FtReport) -> Result<(), String> {
    let duration = Duration::from_secs_f64(args.duration);
    let limit = duration * 3 + Duration::from_secs(60);
    let run = serve_under_load(&["run"], args.clients, duration, &args.mem, dir)?;
    let (run_rate, run_lat) = (run.ops_per_sec, run.latencies);
    let pair = Pair::start(dir, 0, args, limit)?;
    let t = Instant::now();
    let (ops, lat, _) = closed_loop(pair.primary_service, args.clients, duration)?;
    let seconds = t.elapsed().as_secs_f64();
    report.run_ops_per_sec = run_rate;
    report.ft_ops_per_sec = ops as f64 / seconds;
    report.ft_overhead_ratio = report.ft_ops_per_sec / run_rate.max(f64::MIN_POSITIVE);
    report.run_p50_us = percentile(&run_lat, 0.50);
    report.run_p99_us = percentile(&run_lat, 0.99);
    report.ft_p50_us = percentile(&lat, 0.50);
    report.ft_p99_us = percentile(&lat, 0.99);
    report.output_rule_p50_us = report.ft_p50_us - report.run_p50_us;
    report.output_rule_p99_us = report.ft_p99_us - report.run_p99_us;
    let lag_ms = status_series(&pair.primary_events, "lag_ms");
    let lag_exits = status_series(&pair.primary_events, "lag_exits");
    let mut lag_sorted: Vec<u64> = lag_ms.iter().map(|ms| (ms * 1000.0) as u64).collect();
    lag_sorted.sort_unstable();
    report.lag_p50_ms = percentile(&lag_sorted, 0.50) / 1000.0;
    report.lag_p99_ms = percentile(&lag_sorted, 0.99) / 1000.0;
    let mut exits_sorted: Vec<u64> = lag_exits.iter().map(|x| *x as u64 * 1000).collect();
    exits_sorted.sort_unstable();
    report.lag_exits_p99 = percentile(&exits_sorted, 0.99);
    let bytes = status_series(&pair.primary_events, "log_bytes");
    if let (Some(first), Some(last)) = (bytes.first(), bytes.last()) {
        let span =
            (bytes.len().saturating_sub(1)) as f64 * crate::events::STATUS_INTERVAL.as_secs_f64();
        report.log_mbit_per_sec = (last - first) * 8.0 / 1e6 / span.max(f64::MIN_POSITIVE);
    }
    report.primary_rss_mib = max_rss_mib(pair.primary.0.id());
    report.backup_rss_mib = max_rss_mib(pair.backup.0.id());

    // Make the backup lag: stop it under load; the primary's window fills
    // and holds the guest, so neither side's memory may grow without bound.
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
    signal(backup_pid, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs_f64(args.lag_secs));
    report.lagging_primary_rss_mib = max_rss_mib(pair.primary.0.id());
    report.lagging_backup_rss_mib = max_rss_mib(backup_pid);
    signal(backup_pid, nix::sys::signal::Signal::SIGCONT);
    let _ = load.join();
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
    let kill_ns = crate::events::unix_ns();
    let killed = Instant::now();
    let _ = pair.primary.0.kill();
    let _ = pair.primary.0.wait();
    let backup_service = loop {
        let evs = read_events(&pair.backup_events);
        if evs.iter().any(|e| e["event"] == "live") {
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
    let at = |name: &str| -> Result<f64, String> {
        evs.iter()
            .find(|e| e["event"] == name)
            .and_then(|e| e["t_ns"].as_u64())
            .map(|t| t.saturating_sub(kill_ns) as f64 / 1e6)
            .ok_or_else(|| format!("trial {n}: no {name} event"))
    };
    Ok(FailoverTrial {
        detection_ms: at("failure_detected")?,
        test_and_set_ms: at("tas")?,
        go_live_ms: at("live")?,
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
        failure_timeout_ms: args.failure_timeout_ms,
        run_ops_per_sec: 0.0,
        ft_ops_per_sec: 0.0,
        ft_overhead_ratio: 0.0,
        run_p50_us: 0.0,
        run_p99_us: 0.0,
        ft_p50_us: 0.0,
        ft_p99_us: 0.0,
        output_rule_p50_us: 0.0,
        output_rule_p99_us: 0.0,
        lag_p50_ms: 0.0,
        lag_p99_ms: 0.0,
        lag_exits_p99: 0.0,
        log_mbit_per_sec: 0.0,
        primary_rss_mib: 0.0,
        backup_rss_mib: 0.0,
        lagging_primary_rss_mib: 0.0,
        lagging_backup_rss_mib: 0.0,
        trials: Vec::new(),
        failover_median_ms: 0.0,
        failover_max_ms: 0.0,
    };
    println!(
        "measuring: ftvm run vs primary+backup ({} clients, {} s each), then {} failover trials",
        args.clients, args.duration, args.trials
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
    println!(
        "latency: run p50 {:.0} µs p99 {:.0} µs; FT p50 {:.0} µs p99 {:.0} µs; output rule adds {:.0} µs at p50, {:.0} µs at p99",
        report.run_p50_us, report.run_p99_us, report.ft_p50_us, report.ft_p99_us, report.output_rule_p50_us, report.output_rule_p99_us
    );
    println!(
        "backup lag: p50 {:.2} ms, p99 {:.2} ms ({:.0} exits at p99); log bandwidth {:.3} Mbit/s",
        report.lag_p50_ms,
        report.lag_p99_ms,
        report.lag_exits_p99 / 1000.0,
        report.log_mbit_per_sec
    );
    println!(
        "memory (max RSS): primary {:.1} MiB, backup {:.1} MiB; with the backup stopped {:.1} s under load: primary {:.1} MiB, backup {:.1} MiB",
        report.primary_rss_mib, report.backup_rss_mib, args.lag_secs, report.lagging_primary_rss_mib, report.lagging_backup_rss_mib
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
