//! `ftvm replay`: a guest run from its log alone, checked against every
//! digest and output the recording saw.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ftvm_core::replay::{FileSource, Replay, Verdict};
use ftvm_core::run::run_loop::{self, RunError};
use ftvm_core::run::stop::StopSignal;
use ftvm_core::run::vm::{Vm, VmConfig};
use logchannel::image_hash;

use crate::args::{parse_mem, seconds, GuestArgs};
use crate::exit_codes;
use crate::log::hex;
use crate::stop::{stop_after, stop_on_signals};

/// `ftvm replay --help` ends with the outcomes; docs/record-replay.md
/// ("Replay's verdict") has every message.
const OUTCOMES: &str = "\
Exit status:
  0  the replay reached the log's end entry and every digest and output
     matched (\"every digest and output matched\"), or, for a recording cut
     short between two exits or aborted, every one the log has matched (it
     says the recording was cut short and its final state not compared)
  1  the log was refused before running: not a log or a bad frame (with the
     byte offset), truncated (no end entry, or no final digest before it
     without a reason that says why), a setting this build does not know,
     another guest image, memory size or no patching; or the replay failed
     for a reason of its own (KVM, a guest fault, a file)
  3  DIVERGED: an entry did not match, or the guest can no longer reach it
     (idle in hlt with nothing to wake it, past its exit, or looping
     between two exits in states that never match an async point's); the
     report names the entry, both states and the last entry that matched
  6  STOPPED (SIGINT, SIGTERM, --timeout) before the end of the log: it says
     how many of the log's entries were applied and the exit reached";

#[derive(clap::Args)]
#[command(after_help = OUTCOMES)]
pub struct ReplayArgs {
    /// The log to replay.
    log: PathBuf,
    #[command(flatten)]
    guest: GuestArgs,
    /// Stop after this many seconds (the replay then exits 6 unless it had
    /// reached the end of the log).
    #[arg(long)]
    timeout: Option<f64>,
    /// Refuse the log unless it was recorded with this much guest memory.
    #[arg(long, value_parser = parse_mem)]
    mem: Option<u64>,
    /// Write the verdict as JSON to this file (exit 0, 3 and 6).
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Test only: run the guest unpatched, to show that replay needs the
    /// patched instructions.
    #[arg(long, hide = true)]
    no_patch: bool,
}

pub fn run(args: &ReplayArgs) -> Result<ExitCode> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let (source, outline) =
        FileSource::open(&args.log).with_context(|| args.log.display().to_string())?;
    let header = outline.header.clone();
    let image = args.guest.image()?;
    if image_hash(&image) != header.guest_image_hash {
        bail!(
            "{} was recorded with another guest image (log: sha256 {}, this image: sha256 {}); pass the recorded image with --kernel",
            args.log.display(),
            hex(&header.guest_image_hash),
            hex(&image_hash(&image))
        );
    }
    if let Some(mem) = args.mem.filter(|m| *m != header.mem_size) {
        bail!(
            "{} was recorded with {} bytes of guest memory, not {mem}",
            args.log.display(),
            header.mem_size
        );
    }
    if !header.config.patching && !args.no_patch {
        bail!(
            "{} was recorded without patching, which replay cannot reproduce",
            args.log.display()
        );
    }
    let timeout = seconds("--timeout", args.timeout)?;
    let config = VmConfig {
        mem_size: header.mem_size,
        tick_hz: header.config.tick_hz,
        kvm_device: args.guest.kvm_device.clone(),
        patching: !args.no_patch,
        workload: outline.settings.workload,
    };
    let mut vm = Vm::new(&image, config)?;
    let mut replay = Replay::new(
        source,
        header.config.digest_interval,
        outline.settings.output_memory,
        args.guest.console()?,
        args.guest.capture()?,
        stop.clone(),
    );
    if let Some(t) = timeout {
        stop_after(&stop, t);
    }
    let started = std::time::Instant::now();
    let result = run_loop::run(&mut vm, &mut replay, &stop, true);
    let elapsed = started.elapsed().as_secs_f64();
    let stats = replay.source.reader().stats().clone();
    eprintln!("ftvm replay: {}", replay.counts);
    eprintln!("ftvm replay: log entries read by kind:\n{stats}");
    let summary = match result {
        Ok(summary) => {
            let b = &summary.between;
            if b.deliveries > 0 {
                eprintln!(
                    "ftvm replay: {} deliveries between two exits, found with {} breakpoint hits ({} in user mode) and {} single steps",
                    b.deliveries, b.breakpoint_hits, b.user_mode_hits, b.single_steps
                );
            }
            summary
        }
        Err(RunError::Diverged(d)) => {
            eprintln!("ftvm replay: DIVERGED after {elapsed:.2} s\n{d}");
            write_summary(
                args,
                serde_json::json!({ "ok": false, "verdict": "diverged" }),
                elapsed,
                &replay,
            )?;
            return Ok(ExitCode::from(exit_codes::DIVERGED));
        }
        Err(e) => return Err(e.into()),
    };
    let verdict = replay.verdict(&summary, Some(outline.entries));
    eprintln!("ftvm replay: {verdict} ({elapsed:.2} s)");
    let reproduced = matches!(verdict, Verdict::Reproduced { .. });
    let mut json = serde_json::to_value(&verdict)?;
    json["between"] = serde_json::to_value(&summary.between)?;
    json["ok"] = reproduced.into();
    json["log_bytes"] = stats.total_bytes.into();
    json["entries"] = outline.entries.into();
    write_summary(args, json, elapsed, &replay)?;
    Ok(if reproduced {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit_codes::REPLAY_STOPPED)
    })
}

/// `--summary-json`: the verdict, the time taken and the counts.
fn write_summary<S: ftvm_core::replay::LogSource>(
    args: &ReplayArgs,
    mut json: serde_json::Value,
    elapsed: f64,
    replay: &Replay<S>,
) -> Result<()> {
    let Some(path) = &args.summary_json else {
        return Ok(());
    };
    json["seconds"] = elapsed.into();
    json["counts"] = serde_json::to_value(&replay.counts)?;
    std::fs::write(path, json.to_string())
        .with_context(|| format!("cannot write {}", path.display()))
}
