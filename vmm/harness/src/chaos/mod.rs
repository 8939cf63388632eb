//! `ftvm chaos`: a seeded fault campaign. Each trial starts a cluster
//! through the launcher, runs closed-loop clients through lossy UDP
//! proxies, injects the faults its seed draws (kills and restarts, pauses,
//! log channel cuts, stalls and delays, lossy client datagrams, faults at
//! the worst moments) and then checks what the demo checks and more. Trial
//! i of a campaign with seed S has seed S + i, so `--trials 1 --seed S+i`
//! runs it again with the same schedule.

mod client;
mod report;
mod schedule;
mod trial;
mod verdict;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use rand::Rng;

pub use report::{render_svg, CampaignReport};
pub use schedule::{
    Direction, Fault, FaultKind, Schedule, ScheduleParams, Target, TransferFault, MIN_FAULTS,
};
pub use trial::{liveness_bound, reprotect_bound};
pub use verdict::TrialReport;

use crate::launcher::Launcher;

#[derive(clap::Args, Clone, Debug)]
pub struct ChaosArgs {
    /// How many trials, each a cluster of its own.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub trials: u32,
    /// The first trial's seed (random if not given; printed either way);
    /// trial i has seed + i.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of faults per trial, after a second of warm-up; every fault
    /// has healed by then.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Extra `ftvm backup` processes that wait as spares and join by
    /// state transfer when the arbiter names them. Every server that ends
    /// (killed, or exited after a failover or a failed transfer) is
    /// started again as a spare with a fresh id, so the pool stays this
    /// size; each spare also allows the schedule one more fault that
    /// costs a server, and with spares the schedule draws faults during
    /// state transfers. 0: no spares, no restarts.
    #[arg(long, default_value_t = DEFAULT_SPARES, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub spares: u32,
    /// The arbiter on a local 3-member etcd cluster (`etcd` must be
    /// installed); arbiter faults hit its leader.
    #[arg(long)]
    pub etcd: bool,
    /// Where chaos.json, chaos.svg and each trial's files go.
    #[arg(long, default_value = "ftvm-chaos-out")]
    pub out: PathBuf,
    /// Closed-loop KV clients per trial.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub clients: u32,
    /// The servers' --failure-timeout-ms.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(50..=5000))]
    pub failure_timeout_ms: u64,
    /// Print the trials' schedules and stop.
    #[arg(long)]
    pub dry_run: bool,
}

/// Faults start after this.
const WARMUP_MS: u64 = 1000;
const DEFAULT_DURATION: f64 = 10.0;
const DEFAULT_CLIENTS: u32 = 4;
const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 300;
const DEFAULT_SPARES: u32 = 1;

impl ChaosArgs {
    pub fn params(&self) -> Result<ScheduleParams> {
        if !(self.duration.is_finite() && self.duration >= 3.0 && self.duration <= 3600.0) {
            anyhow::bail!("--duration {}: from 3 to 3600 seconds", self.duration);
        }
        Ok(ScheduleParams {
            duration_ms: (self.duration * 1000.0) as u64,
            warmup_ms: WARMUP_MS,
            failure_timeout_ms: self.failure_timeout_ms,
            spares: self.spares,
            etcd: self.etcd,
        })
    }

    /// The command that runs the trial of `seed` alone.
    pub fn reproduce(&self, seed: u64) -> String {
        let mut line = format!("ftvm chaos --trials 1 --seed {seed}");
        if self.duration != DEFAULT_DURATION {
            line += &format!(" --duration {}", self.duration);
        }
        if self.spares != DEFAULT_SPARES {
            line += &format!(" --spares {}", self.spares);
        }
        if self.etcd {
            line += " --etcd";
        }
        if self.clients != DEFAULT_CLIENTS {
            line += &format!(" --clients {}", self.clients);
        }
        if self.failure_timeout_ms != DEFAULT_FAILURE_TIMEOUT_MS {
            line += &format!(" --failure-timeout-ms {}", self.failure_timeout_ms);
        }
        line
    }
}

/// Runs the campaign; the report says whether every trial passed. With
/// `--dry-run`, prints the schedules and returns `None`.
pub fn run(args: &ChaosArgs) -> Result<Option<CampaignReport>> {
    let params = args.params()?;
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    println!(
        "ftvm chaos: seed {seed}, {} trials (seeds {seed} to {}), {} s of faults each, {} clients, failure timeout {} ms, {} spares{}",
        args.trials,
        seed.wrapping_add(u64::from(args.trials) - 1),
        args.duration,
        args.clients,
        args.failure_timeout_ms,
        args.spares,
        if args.etcd { ", arbiter on etcd" } else { "" }
    );
    if args.dry_run {
        for i in 0..args.trials {
            print!(
                "{}",
                Schedule::draw(seed.wrapping_add(u64::from(i)), &params)
            );
        }
        return Ok(None);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let launcher = Launcher::this_executable()?;
    let settings = trial::Settings {
        params: params.clone(),
        clients: args.clients,
        out: args.out.clone(),
        vm_id: "chaos".into(),
    };
    let started = Instant::now();
    let mut results = Vec::new();
    for i in 0..args.trials {
        let trial_seed = seed.wrapping_add(u64::from(i));
        let schedule = Schedule::draw(trial_seed, &params);
        println!("\ntrial {}/{}: {schedule}", i + 1, args.trials);
        let report = match trial::run(&launcher, &settings, schedule.clone()) {
            Ok(run) => verdict::judge(&run, args.failure_timeout_ms),
            Err(e) => TrialReport::not_run(&schedule, &settings, format!("{e:#}")),
        };
        println!("{}", report.line());
        if !report.passed {
            println!("reproduce: {}", args.reproduce(trial_seed));
        }
        results.push(report);
    }
    let report = CampaignReport::new(
        seed,
        args.clients,
        params,
        results,
        started.elapsed().as_secs_f64(),
    );
    let json_path = args.out.join("chaos.json");
    let json = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let svg_path = args.out.join("chaos.svg");
    std::fs::write(&svg_path, render_svg(&report))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    println!();
    print!("{}", report.table());
    for r in report.results.iter().filter(|r| !r.passed) {
        println!("reproduce: {}", args.reproduce(r.seed));
    }
    println!(
        "wrote {} and {}; each trial's files in {}/trial-SEED",
        json_path.display(),
        svg_path.display(),
        args.out.display()
    );
    println!(
        "campaign seed {seed}: {}",
        if report.failed == 0 {
            format!("PASS ({} of {} trials)", report.passed, report.trials)
        } else {
            format!(
                "FAIL ({} of {} trials failed)",
                report.failed, report.trials
            )
        }
    );
    Ok(Some(report))
}
