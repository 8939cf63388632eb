//! `ftvm bench precise`: what interrupts between exits cost. For `race`
//! and `spin-user` (which power off by itself; `spin-user`'s ticks land at
//! CPL3) and `kv-race` (under closed-loop clients):
//! record against run, replay against the recorded time, breakpoint hits
//! and single steps per interrupt delivered between two exits, and log
//! bytes per second.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftvm_core::machine::workload::Workload;
use serde::Serialize;
use serde_json::Value;

use crate::launcher::{Launcher, Role};
use crate::load::{self, serve_under_load};
use crate::report::write_json;
use crate::stats::median;

#[derive(clap::Args)]
pub struct PreciseBenchArgs {
    /// Alternating (run, record, replay) rounds of each workload; every
    /// ratio is the median over them.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Closed-loop clients during the kv-race runs.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds of each kv-race run (race runs to its end, about 3 s).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One workload's figures, each the median over the rounds.
#[derive(Debug, Serialize)]
pub struct WorkloadReport {
    pub workload: String,
    pub rounds: usize,
    /// `race`: wall time recorded / run (the same work); `kv-race`: ops/s
    /// run / recorded. Above 1 is the recording's overhead.
    pub record_over_run: f64,
    pub replay_over_recorded: f64,
    pub deliveries_between_exits: f64,
    pub kicks_per_delivery: f64,
    pub breakpoint_hits_per_delivery: f64,
    pub single_steps_per_delivery: f64,
    pub log_bytes_per_sec: f64,
    /// Every round's (record/run, replay/recorded).
    pub round_ratios: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct PreciseReport {
    pub race: WorkloadReport,
    pub spin_user: WorkloadReport,
    pub kv_race: WorkloadReport,
}

/// A `race` or `spin-user` run's time limit: they power off after about
/// 3 s and 1 s.
const RACE_LIMIT: Duration = Duration::from_secs(120);

/// One round's measurements.
struct Round {
    record_over_run: f64,
    replay_over_recorded: f64,
    deliveries: f64,
    kicks: f64,
    hits: f64,
    steps: f64,
    log_bytes_per_sec: f64,
}

fn number(v: &Value, path: &[&str]) -> Result<f64> {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_f64()
        .with_context(|| format!("no {} in {v}", path.join(".")))
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("bad JSON in {}", path.display()))
}

/// `ftvm run` or `ftvm record --log LOG` of `workload` (one that powers
/// off by itself) to its power-off; its counters.
fn powers_off_once(
    launcher: &Launcher,
    workload: Workload,
    log: Option<&Path>,
    dir: &Path,
) -> Result<Value> {
    let stats = dir.join("stats.json");
    let limit = RACE_LIMIT.as_secs().to_string();
    let mut args: Vec<&std::ffi::OsStr> = Vec::new();
    match log {
        Some(log) => args.extend(["record".as_ref(), "--log".as_ref(), log.as_os_str()]),
        None => args.push("run".as_ref()),
    }
    args.extend([
        "--workload".as_ref(),
        workload.name().as_ref(),
        "--serial".as_ref(),
        "/dev/null".as_ref(),
        "--timeout".as_ref(),
        limit.as_ref(),
        "--stats-json".as_ref(),
        stats.as_os_str(),
    ]);
    let out = launcher.run(&args, RACE_LIMIT + Duration::from_secs(60))?;
    if !out.status.success() {
        bail!(
            "{workload} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    read_json(&stats)
}

/// What a recording and its replay say about delivery between exits.
fn round(recorded: &Value, replayed: &Value, record_over_run: f64, log: &Path) -> Result<Round> {
    let recorded_secs = number(recorded, &["elapsed_secs"])?;
    let deliveries = number(recorded, &["between", "deliveries"])?.max(1.0);
    let log_bytes = std::fs::metadata(log)
        .with_context(|| format!("cannot stat {}", log.display()))?
        .len() as f64;
    Ok(Round {
        record_over_run,
        replay_over_recorded: number(replayed, &["seconds"])? / recorded_secs,
        deliveries,
        kicks: number(recorded, &["between", "kicks"])? / deliveries,
        hits: number(replayed, &["between", "breakpoint_hits"])? / deliveries,
        steps: number(replayed, &["between", "single_steps"])? / deliveries,
        log_bytes_per_sec: log_bytes / recorded_secs,
    })
}

fn summarize(workload: Workload, rounds: Vec<Round>) -> WorkloadReport {
    let pick = |f: fn(&Round) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    let report = WorkloadReport {
        workload: workload.name().into(),
        rounds: rounds.len(),
        record_over_run: pick(|r| r.record_over_run),
        replay_over_recorded: pick(|r| r.replay_over_recorded),
        deliveries_between_exits: pick(|r| r.deliveries),
        kicks_per_delivery: pick(|r| r.kicks),
        breakpoint_hits_per_delivery: pick(|r| r.hits),
        single_steps_per_delivery: pick(|r| r.steps),
        log_bytes_per_sec: pick(|r| r.log_bytes_per_sec),
        round_ratios: rounds
            .iter()
            .map(|r| (r.record_over_run, r.replay_over_recorded))
            .collect(),
    };
    println!(
        "{}: record/run {:.3}, replay/recorded {:.3}; per interrupt between exits ({:.0} a run): {:.1} kicks, {:.1} breakpoint hits, {:.1} single steps; log {:.0} bytes/s",
        report.workload,
        report.record_over_run,
        report.replay_over_recorded,
        report.deliveries_between_exits,
        report.kicks_per_delivery,
        report.breakpoint_hits_per_delivery,
        report.single_steps_per_delivery,
        report.log_bytes_per_sec
    );
    report
}

/// `rounds` of (run, record, replay) of a workload that powers off by
/// itself.
fn powering_off_rounds(
    launcher: &Launcher,
    workload: Workload,
    rounds: usize,
    log: &Path,
    dir: &Path,
) -> Result<WorkloadReport> {
    let mut measured = Vec::new();
    for _ in 0..rounds {
        let run = powers_off_once(launcher, workload, None, dir)?;
        let recorded = powers_off_once(launcher, workload, Some(log), dir)?;
        let replayed = launcher.replay(log, dir)?;
        let over_run =
            number(&recorded, &["elapsed_secs"])? / number(&run, &["elapsed_secs"])?.max(1e-9);
        let r = round(&recorded, &replayed, over_run, log)?;
        println!(
            "  {workload}: record/run {:.3}, replay/recorded {:.3}, {:.0} interrupts between exits",
            r.record_over_run, r.replay_over_recorded, r.deliveries
        );
        measured.push(r);
    }
    Ok(summarize(workload, measured))
}

pub fn bench_precise(args: &PreciseBenchArgs) -> Result<()> {
    let duration = load::duration(args.duration)?;
    let launcher = Launcher::this_executable()?;
    let dir = tempfile::Builder::new()
        .prefix("ftvm-bench-precise-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let log = dir.path().join("recorded.log");
    let rounds = args.rounds.max(1);
    println!(
        "measuring: {rounds} x (run, record, replay) of race and of spin-user, then of kv-race under {} clients for {} s",
        args.clients, args.duration
    );
    let race = powering_off_rounds(&launcher, Workload::Race, rounds, &log, dir.path())?;
    let spin_user = powering_off_rounds(&launcher, Workload::SpinUser, rounds, &log, dir.path())?;
    let mut kv_race = Vec::new();
    let workload = ["--workload", "kv-race"];
    for _ in 0..rounds {
        let run = serve_under_load(
            &launcher,
            Role::Run,
            &workload,
            args.clients,
            duration,
            "64M",
        )?;
        let record = Role::Record { log: log.clone() };
        let recorded =
            serve_under_load(&launcher, record, &workload, args.clients, duration, "64M")?;
        let replayed = launcher.replay(&log, dir.path())?;
        let over_run = run.ops_per_sec / recorded.ops_per_sec.max(f64::MIN_POSITIVE);
        let r = round(&recorded.stats, &replayed, over_run, &log)?;
        println!(
            "  kv-race: run {:.0} ops/s, record {:.0} ops/s, replay/recorded {:.3}, {:.0} interrupts between exits",
            run.ops_per_sec, recorded.ops_per_sec, r.replay_over_recorded, r.deliveries
        );
        kv_race.push(r);
    }
    let report = PreciseReport {
        race,
        spin_user,
        kv_race: summarize(Workload::KvRace, kv_race),
    };
    write_json(args.json.as_deref(), &report)
}
