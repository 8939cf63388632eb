//! `ftvm bench record`: what recording costs (`record` against `run`), how
//! fast a log replays, and how large it is.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::launcher::{Launcher, Role};
use ftvm_core::machine::workload::Workload;

use crate::load::{self, serve_under_load, Served};
use crate::report::write_json;
use crate::stats::median;

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
    /// The guest workload: `kv-user` (the KV service's hot path at CPL3)
    /// or `kv` (all of it at CPL0).
    #[arg(long, default_value = "kv-user")]
    pub workload: Workload,
    /// Record with `--output-memory-hash` (memory hash refreshed at every
    /// output).
    #[arg(long)]
    pub output_memory_hash: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
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

/// Replays `log`; returns its wall time in seconds.
fn replay_seconds(launcher: &Launcher, log: &Path, dir: &Path) -> Result<f64> {
    launcher.replay(log, dir)?["seconds"]
        .as_f64()
        .context("replay summary has no seconds")
}

/// The log's statistics, and the bytes of packet payload in it.
fn log_sizes(log: &Path) -> Result<(logchannel::LogStats, u64)> {
    let file =
        std::fs::File::open(log).with_context(|| format!("cannot open {}", log.display()))?;
    let mut reader = logchannel::LogReader::new(std::io::BufReader::new(file))
        .with_context(|| format!("cannot read {}", log.display()))?;
    let mut payload = 0u64;
    for entry in reader.by_ref() {
        let entry = entry.with_context(|| format!("cannot read {}", log.display()))?;
        if let logchannel::Event::Packet { frame, .. } = entry.event {
            payload += frame.len() as u64;
        }
    }
    Ok((reader.stats().clone(), payload))
}

pub fn bench_record(args: &RecordBenchArgs) -> Result<()> {
    let duration = load::duration(args.duration)?;
    let launcher = Launcher::this_executable()?;
    let dir = tempfile::Builder::new()
        .prefix("ftvm-bench-record-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let loaded_log = dir.path().join("loaded.log");
    let idle_log = dir.path().join("idle.log");
    let extra: &[&str] = if args.output_memory_hash {
        &["--output-memory-hash"]
    } else {
        &[]
    };
    let record = |log: &Path| Role::Record {
        log: log.to_owned(),
    };
    let rounds = args.rounds.max(1);
    println!(
        "measuring: {rounds} x (run, record), an idle record, two replays ({} s each run)",
        args.duration
    );
    let mut run_rates = Vec::new();
    let mut record_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut record_stats = serde_json::Value::Null;
    let workload = ["--workload", args.workload.name()];
    let record_extra: Vec<&str> = extra.iter().copied().chain(workload).collect();
    let extra = record_extra.as_slice();
    for _ in 0..rounds {
        let run_rate = serve_under_load(
            &launcher,
            Role::Run,
            &workload,
            args.clients,
            duration,
            &args.mem,
        )?
        .ops_per_sec;
        let Served {
            ops_per_sec: record_rate,
            stats,
            ..
        } = serve_under_load(
            &launcher,
            record(&loaded_log),
            extra,
            args.clients,
            duration,
            &args.mem,
        )?;
        println!("  round: run {run_rate:.0} ops/s, record {record_rate:.0} ops/s");
        run_rates.push(run_rate);
        record_rates.push(record_rate);
        ratios.push(record_rate / run_rate.max(f64::MIN_POSITIVE));
        record_stats = stats;
    }
    let round_ratios = ratios.clone();
    let idle_stats =
        serve_under_load(&launcher, record(&idle_log), extra, 0, duration, &args.mem)?.stats;
    let loaded_secs = record_stats["elapsed_secs"].as_f64().unwrap_or(0.0);
    let idle_secs = idle_stats["elapsed_secs"].as_f64().unwrap_or(0.0);
    let loaded_replay = replay_seconds(&launcher, &loaded_log, dir.path())?;
    let idle_replay = replay_seconds(&launcher, &idle_log, dir.path())?;
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
    write_json(args.json.as_deref(), &report)
}
