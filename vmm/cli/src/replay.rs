//! `ftvm replay`: a guest run from its log alone, checked against every
//! digest and output the recording saw.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ftvm_core::machine::memory::parse_size;
use ftvm_core::replay::{FileSource, Replay};
use ftvm_core::run::run_loop::{self, RunError, StopReason};
use ftvm_core::run::stop::StopSignal;
use ftvm_core::run::vm::{Vm, VmConfig};
use logchannel::image_hash;

use crate::args::{seconds, GuestArgs};
use crate::exit_codes;
use crate::log::{hex, open_log};
use crate::stop::{stop_after, stop_on_signals};

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The log to replay.
    log: PathBuf,
    #[command(flatten)]
    guest: GuestArgs,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Refuse the log unless it was recorded with this much guest memory.
    #[arg(long, value_parser = parse_size)]
    mem: Option<u64>,
    /// Write the replay summary as JSON to this file.
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
    let reader = open_log(&args.log)?;
    let header = reader.header().clone();
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
    };
    let mut vm = Vm::new(&image, config)?;
    let mut replay = Replay::new(
        FileSource::new(reader),
        header.config.digest_interval,
        ftvm_core::live::record::output_memory(&header.config),
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
    match result {
        Ok(summary) => {
            eprintln!(
                "ftvm replay: {} exits replayed in {elapsed:.2} s ({:?}); every digest and output matched",
                summary.exits.synchronous,
                summary.reason.unwrap_or(StopReason::EndOfLog)
            );
            if let Some(path) = &args.summary_json {
                let json = serde_json::json!({
                    "ok": true,
                    "exits": summary.exits.synchronous,
                    "seconds": elapsed,
                    "counts": replay.counts,
                    "log_bytes": stats.total_bytes,
                    "entries": stats.entries(),
                });
                std::fs::write(path, json.to_string())
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(RunError::Diverged(d)) => {
            eprintln!("ftvm replay: DIVERGED after {elapsed:.2} s\n{d}");
            Ok(ExitCode::from(exit_codes::DIVERGED))
        }
        Err(e) => Err(e.into()),
    }
}
