//! `ftvm bench`: measurements against real `ftvm` processes, reported so that
//! BENCHMARKS.md can quote them as ratios against a baseline from the same
//! run.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use ftvm_kvclient::{ClientConfig, KvClient};

pub mod channel;
pub mod ft;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(clap::Subcommand)]
pub enum BenchWhat {
    /// Closed-loop KV load against `ftvm run`: ops/s, latency, exit rates.
    Kv(KvBenchArgs),
    /// Record overhead (`record` vs `run`), replay speed (replay vs
    /// recorded wall time, idle and loaded) and log size.
    Record(RecordBenchArgs),
    /// FT overhead (primary+backup vs `run`), the output rule's latency,
    /// backup lag, log bandwidth, memory under lag, failover time.
    Ft(crate::bench::ft::FtBenchArgs),
    /// The log channel alone on loopback: entries per second, and send to
    /// ack with the writer thread against `flush`.
    Channel(crate::bench::channel::ChannelBenchArgs),
}

#[derive(clap::Args)]
pub struct RecordBenchArgs {
    /// Closed-loop clients during the loaded runs.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds of each run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Alternating run/record pairs; the overhead ratio is the median
    /// over them, which keeps a noisy neighbour from deciding it.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Guest memory size.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Record with `--output-memory-hash` (memory hash refreshed at every
    /// output).
    #[arg(long)]
    pub output_memory_hash: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[derive(clap::Args)]
pub struct KvBenchArgs {
    /// Client counts to measure, one run of the VMM each.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub clients: Vec<usize>,
    /// Seconds of load per client count.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Guest memory size passed to `ftvm run`.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct KvPoint {
    pub clients: usize,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub retries: u64,
    /// All synchronous exits of the VMM's run (boot and idle ticks included)
    /// per request it served.
    pub exits_per_request: f64,
    pub exits_per_sec: f64,
    pub vmm_max_rss_mib: f64,
    pub guest_mem_mib: f64,
}

pub(crate) fn free_udp_port() -> Result<SocketAddr, String> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no free UDP port on loopback: {e}"))
}

pub(crate) fn free_tcp_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no free TCP port on loopback: {e}"))
}

/// The peak resident memory of process `pid` (VmHWM), in KiB.
pub(crate) fn max_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time process `pid` has used so far, all its threads, user and
/// system (where KVM's emulation of the guest is counted), in seconds.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system; it has no
    // preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// An `ftvm run` child that is killed if the bench stops early.
pub(crate) struct VmmProcess {
    child: Child,
    stats: PathBuf,
}

impl VmmProcess {
    pub(crate) fn start(
        command: &[&str],
        service: SocketAddr,
        mem: &str,
        limit: Duration,
        dir: &Path,
    ) -> Result<Self, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the ftvm binary: {e}"))?;
        let stats = dir.join(format!("stats-{}.json", service.port()));
        let child = Command::new(exe)
            .args(command)
            .args([
                "--service",
                &service.to_string(),
                "--mem",
                mem,
                "--serial",
                "/dev/null",
            ])
            .arg("--timeout")
            .arg(format!("{:.0}", limit.as_secs_f64()))
            .arg("--stats-json")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start ftvm run: {e}"))?;
        Ok(VmmProcess { child, stats })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn max_rss_kib(&self) -> Option<u64> {
        max_rss_kib(self.child.id())
    }

    /// SIGTERM, then the counters the VMM wrote on its way out.
    pub(crate) fn stop(mut self) -> Result<serde_json::Value, String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    return Err("ftvm run did not stop within 10 s of SIGTERM".into());
                }
            }
        }
        let text = std::fs::read_to_string(&self.stats)
            .map_err(|e| format!("no stats from ftvm run: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("bad stats from ftvm run: {e}"))
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn wait_ready(service: SocketAddr, within: Duration) -> Result<(), String> {
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(200),
        max_attempts: (within.as_millis() / 200).max(1) as u32,
    };
    let mut client = KvClient::connect(service, config).map_err(|e| e.to_string())?;
    client
        .get(b"bench-ready")
        .map(|_| ())
        .map_err(|e| format!("the guest did not answer within {within:?}: {e}"))
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Runs `clients` closed-loop clients (half puts, half gets over 64 keys)
/// for `duration`; returns (ops, latencies in ns sorted, retries).
pub(crate) fn closed_loop(
    service: SocketAddr,
    clients: usize,
    duration: Duration,
) -> Result<(u64, Vec<u64>, u64), String> {
    paced_loop(service, clients, duration, None)
}

/// Like [`closed_loop`], but with `pace` each client starts a request only
/// every `pace` (at once if the last one took longer), so that the server
/// is not saturated and latency is the path's, not the queue's.
pub(crate) fn paced_loop(
    service: SocketAddr,
    clients: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> Result<(u64, Vec<u64>, u64), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for c in 0..clients {
        let stop = stop.clone();
        handles.push(std::thread::spawn(
            move || -> Result<(Vec<u64>, u64), String> {
                let mut client = KvClient::connect(service, ClientConfig::default())
                    .map_err(|e| e.to_string())?;
                let mut lat = Vec::new();
                let mut i = 0u64;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(pace) = pace {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        next = next.max(Instant::now() - pace) + pace;
                    }
                    let key = format!("k{}", (i * 7 + c as u64) % 64);
                    let t = Instant::now();
                    if i.is_multiple_of(2) {
                        client
                            .put(key.as_bytes(), b"0123456789abcdef")
                            .map_err(|e| e.to_string())?;
                    } else {
                        client.get(key.as_bytes()).map_err(|e| e.to_string())?;
                    }
                    lat.push(t.elapsed().as_nanos() as u64);
                    i += 1;
                }
                Ok((lat, client.stats().retries))
            },
        ));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut retries = 0;
    for h in handles {
        let (lat, r) = h
            .join()
            .map_err(|_| "a client thread panicked".to_string())??;
        all.extend(lat);
        retries += r;
    }
    all.sort_unstable();
    Ok((all.len() as u64, all, retries))
}

fn kv_point(args: &KvBenchArgs, clients: usize, dir: &Path) -> Result<KvPoint, String> {
    let service = free_udp_port()?;
    let duration = Duration::from_secs_f64(args.duration);
    let vmm = VmmProcess::start(
        &["run"],
        service,
        &args.mem,
        duration + Duration::from_secs(60),
        dir,
    )?;
    wait_ready(service, Duration::from_secs(30))?;
    let t = Instant::now();
    let (ops, lat, retries) = closed_loop(service, clients, duration)?;
    let seconds = t.elapsed().as_secs_f64();
    let rss_kib = vmm.max_rss_kib().unwrap_or(0);
    let stats = vmm.stop()?;
    let exits = stats["exits"]["synchronous"].as_u64().unwrap_or(0) as f64;
    let served = stats["frames_transmitted"].as_u64().unwrap_or(0).max(1) as f64;
    let elapsed = stats["elapsed_secs"].as_f64().unwrap_or(seconds);
    let mem = ftvm_core::machine::memory::parse_size(&args.mem)?;
    Ok(KvPoint {
        clients,
        seconds,
        ops,
        ops_per_sec: ops as f64 / seconds,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        retries,
        exits_per_request: exits / served,
        exits_per_sec: exits / elapsed,
        vmm_max_rss_mib: rss_kib as f64 / 1024.0,
        guest_mem_mib: (mem >> 20) as f64,
    })
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    match &args.what {
        BenchWhat::Kv(kv) => bench_kv(kv),
        BenchWhat::Record(r) => bench_record(r),
        BenchWhat::Ft(f) => crate::bench::ft::bench_ft(f),
        BenchWhat::Channel(c) => crate::bench::channel::bench_channel(c),
    }
}

pub(crate) fn check_duration(d: f64) -> Result<Duration, String> {
    if !(d.is_finite() && d > 0.0 && d <= 3600.0) {
        return Err(format!("--duration {d} must be in (0, 3600] seconds"));
    }
    Ok(Duration::from_secs_f64(d))
}

/// What one served run measured.
pub(crate) struct Served {
    pub ops_per_sec: f64,
    /// The VMM's counters.
    pub stats: serde_json::Value,
}

/// One `ftvm run` or `ftvm record` under `clients` closed-loop clients (none:
/// idle).
pub(crate) fn serve_under_load(
    command: &[&str],
    clients: usize,
    duration: Duration,
    mem: &str,
    dir: &Path,
) -> Result<Served, String> {
    let service = free_udp_port()?;
    let vmm = VmmProcess::start(
        command,
        service,
        mem,
        duration + Duration::from_secs(60),
        dir,
    )?;
    wait_ready(service, Duration::from_secs(30))?;
    let t = Instant::now();
    let ops = if clients == 0 {
        std::thread::sleep(duration);
        0
    } else {
        closed_loop(service, clients, duration)?.0
    };
    let ops_per_sec = ops as f64 / t.elapsed().as_secs_f64();
    Ok(Served {
        ops_per_sec,
        stats: vmm.stop()?,
    })
}

/// Replays `log` with `ftvm replay`; returns its wall time in seconds.
fn replay_seconds(log: &Path, dir: &Path) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the ftvm binary: {e}"))?;
    let summary = dir.join("replay-summary.json");
    let out = Command::new(exe)
        .arg("replay")
        .arg(log)
        .args([
            "--serial",
            "/dev/null",
            "--timeout",
            "600",
            "--summary-json",
        ])
        .arg(&summary)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run ftvm replay: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "replay of {} failed: {}",
            log.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = std::fs::read_to_string(&summary).map_err(|e| format!("no replay summary: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    v["seconds"]
        .as_f64()
        .ok_or_else(|| "replay summary has no seconds".into())
}

#[derive(Debug, Serialize)]
pub struct RecordReport {
    pub clients: usize,
    pub seconds: f64,
    pub rounds: usize,
    /// Median over the rounds.
    pub run_ops_per_sec: f64,
    pub record_ops_per_sec: f64,
    /// Median of the per-round ratios.
    pub record_overhead_ratio: f64,
    pub round_ratios: Vec<f64>,
    pub loaded_recorded_secs: f64,
    pub loaded_replay_secs: f64,
    pub loaded_replay_ratio: f64,
    pub idle_recorded_secs: f64,
    pub idle_replay_secs: f64,
    pub idle_replay_ratio: f64,
    pub log_bytes: u64,
    pub log_entries: u64,
    pub log_bytes_per_sec: f64,
    pub avg_entry_bytes: f64,
    pub avg_entry_bytes_excluding_packet_payload: f64,
    pub by_kind: Vec<(String, u64, f64)>,
}

fn log_sizes(log: &Path) -> Result<(logchannel::LogStats, u64), String> {
    let file =
        std::fs::File::open(log).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let mut reader =
        logchannel::LogReader::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let mut payload = 0u64;
    for entry in reader.by_ref() {
        if let logchannel::Event::Packet { frame, .. } = entry.map_err(|e| e.to_string())?.event {
            payload += frame.len() as u64;
        }
    }
    Ok((reader.stats().clone(), payload))
}

fn bench_record(args: &RecordBenchArgs) -> Result<(), String> {
    let duration = check_duration(args.duration)?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let loaded_log = dir.join("loaded.log");
    let idle_log = dir.join("idle.log");
    let loaded = loaded_log.to_string_lossy().into_owned();
    let idle = idle_log.to_string_lossy().into_owned();
    let mut record_loaded: Vec<&str> = vec!["record", "--log", &loaded];
    let mut record_idle: Vec<&str> = vec!["record", "--log", &idle];
    if args.output_memory_hash {
        record_loaded.push("--output-memory-hash");
        record_idle.push("--output-memory-hash");
    }
    let rounds = args.rounds.max(1);
    println!(
        "measuring: {rounds} x (run, record), an idle record, two replays ({} s each run)",
        args.duration
    );
    let mut run_rates = Vec::new();
    let mut record_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut record_stats = serde_json::Value::Null;
    for _ in 0..rounds {
        let run_rate =
            serve_under_load(&["run"], args.clients, duration, &args.mem, &dir)?.ops_per_sec;
        let Served {
            ops_per_sec: record_rate,
            stats,
            ..
        } = serve_under_load(&record_loaded, args.clients, duration, &args.mem, &dir)?;
        println!("  round: run {run_rate:.0} ops/s, record {record_rate:.0} ops/s");
        run_rates.push(run_rate);
        record_rates.push(record_rate);
        ratios.push(record_rate / run_rate.max(f64::MIN_POSITIVE));
        record_stats = stats;
    }
    let round_ratios = ratios.clone();
    let idle_stats = serve_under_load(&record_idle, 0, duration, &args.mem, &dir)?.stats;
    let loaded_secs = record_stats["elapsed_secs"].as_f64().unwrap_or(0.0);
    let idle_secs = idle_stats["elapsed_secs"].as_f64().unwrap_or(0.0);
    let loaded_replay = replay_seconds(&loaded_log, &dir)?;
    let idle_replay = replay_seconds(&idle_log, &dir)?;
    let (stats, payload) = log_sizes(&loaded_log)?;
    let entries = stats.entries().max(1);
    let by_kind = stats
        .by_kind
        .iter()
        .map(|(k, s)| (k.to_string(), s.entries, s.average()))
        .collect();
    let report = RecordReport {
        clients: args.clients,
        seconds: args.duration,
        rounds,
        run_ops_per_sec: median(&mut run_rates),
        record_ops_per_sec: median(&mut record_rates),
        record_overhead_ratio: median(&mut ratios),
        round_ratios,
        loaded_recorded_secs: loaded_secs,
        loaded_replay_secs: loaded_replay,
        loaded_replay_ratio: loaded_replay / loaded_secs.max(f64::MIN_POSITIVE),
        idle_recorded_secs: idle_secs,
        idle_replay_secs: idle_replay,
        idle_replay_ratio: idle_replay / idle_secs.max(f64::MIN_POSITIVE),
        log_bytes: stats.total_bytes,
        log_entries: stats.entries(),
        log_bytes_per_sec: stats.total_bytes as f64 / loaded_secs.max(f64::MIN_POSITIVE),
        avg_entry_bytes: stats.total_bytes as f64 / entries as f64,
        avg_entry_bytes_excluding_packet_payload: (stats.total_bytes - payload) as f64
            / entries as f64,
        by_kind,
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "record overhead: median {:.0} ops/s recorded / median {:.0} ops/s run; median ratio {:.3} (rounds: {})",
        report.record_ops_per_sec,
        report.run_ops_per_sec,
        report.record_overhead_ratio,
        report.round_ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "replay speed (loaded): {:.2} s / {:.2} s recorded = {:.3}",
        report.loaded_replay_secs, report.loaded_recorded_secs, report.loaded_replay_ratio
    );
    println!(
        "replay speed (idle):   {:.3} s / {:.2} s recorded = {:.4}",
        report.idle_replay_secs, report.idle_recorded_secs, report.idle_replay_ratio
    );
    println!(
        "log: {} entries, {} bytes, {:.0} bytes/s; {:.2} bytes/entry, {:.2} without packet payloads",
        report.log_entries, report.log_bytes, report.log_bytes_per_sec, report.avg_entry_bytes, report.avg_entry_bytes_excluding_packet_payload
    );
    for (kind, n, avg) in &report.by_kind {
        println!("  {kind:<10} {n:>9} entries {avg:>8.2} bytes each");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn bench_kv(args: &KvBenchArgs) -> Result<(), String> {
    check_duration(args.duration)?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    println!("clients  ops/s     p50 µs   p99 µs   exits/req  exits/s   VMM max RSS (guest mem)");
    let mut points = Vec::new();
    for &clients in &args.clients {
        let p = kv_point(args, clients.max(1), &dir)?;
        println!(
            "{:<8} {:<9.0} {:<8.0} {:<8.0} {:<10.2} {:<9.0} {:.1} MiB ({:.0} MiB)",
            p.clients,
            p.ops_per_sec,
            p.p50_us,
            p.p99_us,
            p.exits_per_request,
            p.exits_per_sec,
            p.vmm_max_rss_mib,
            p.guest_mem_mib
        );
        points.push(p);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&points).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
