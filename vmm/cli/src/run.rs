//! `ftvm run` and `ftvm record`: a live guest serving its clients, with or
//! without a log of its nondeterministic inputs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use ftvm_core::host::emitter::Emitter;
use ftvm_core::host::net_backend::NetBackend;
use ftvm_core::live::record::{recording_config, Recorder};
use ftvm_core::live::{EntrySink, Live};
use ftvm_core::machine::workload::Workload;
use ftvm_core::run::run_loop::{self, RunSummary, StopReason};
use ftvm_core::run::stop::StopSignal;
use ftvm_core::run::vm::{Vm, VmConfig};
use logchannel::{image_hash, LogHeader};

use crate::args::{parse_mem, parse_tick_hz, seconds, GuestArgs, DEFAULT_DIGEST_INTERVAL, VM_ID};
use crate::exit_codes;
use crate::stop::stop_on_signals;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Guest memory size (for example 64M, 1G): 2M to 3G, a multiple of 4K.
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    mem: u64,
    /// Host UDP address on which the guest's service is reachable (the
    /// workloads that serve KV).
    #[arg(long, default_value = "127.0.0.1:7000")]
    service: SocketAddr,
    /// What the embedded guest runs: kv-user (the KV service, its hot
    /// path at CPL3), kv (all of it at CPL0), race, spin, kv-race or
    /// spin-user (spin at CPL3) (docs/guest-abi.md). Default: kv-user, or
    /// kv with --kernel.
    #[arg(long)]
    workload: Option<Workload>,
    /// Stop after this many seconds.
    #[arg(long, alias = "duration")]
    timeout: Option<f64>,
    /// PIT tick rate the guest is asked to program (19 to 596591 Hz).
    #[arg(long, default_value_t = ftvm_core::machine::boot::DEFAULT_TICK_HZ, value_parser = parse_tick_hz)]
    tick_hz: u32,
    /// Write the run's counters as JSON to this file when it ends.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RecordArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The log to write.
    #[arg(long)]
    log: PathBuf,
    /// Synchronous exits between periodic digests (0: none).
    #[arg(long, default_value_t = DEFAULT_DIGEST_INTERVAL)]
    digest_interval: u64,
    /// Bring the memory hash up to date at every output check, not only at
    /// periodic digests, so that a change in guest memory is caught at the
    /// next output (slower: see BENCHMARKS.md). Stored in the log header
    /// (`output_memory` = `refresh`); replay does the same.
    #[arg(long)]
    output_memory_hash: bool,
}

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    serve(args, None)
}

pub fn record(args: &RecordArgs) -> Result<ExitCode> {
    serve(&args.run, Some(args))
}

fn serve(args: &RunArgs, record: Option<&RecordArgs>) -> Result<ExitCode> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = args.guest.image()?;
    let workload = args.guest.workload(args.workload);
    let timeout = seconds("--timeout", args.timeout)?;
    let config = VmConfig {
        mem_size: args.mem,
        tick_hz: args.tick_hz,
        kvm_device: args.guest.kvm_device.clone(),
        patching: true,
        workload,
    };
    let mut vm = Vm::new(&image, config)?;
    // A workload that serves nobody takes no port.
    let net = if workload.serves_kv() {
        Some(Arc::new(NetBackend::bind(args.service)?))
    } else {
        None
    };
    let sink: Option<Box<dyn EntrySink>> = match record {
        Some(record) => {
            let header = LogHeader::new(
                VM_ID,
                image_hash(&image),
                args.mem,
                recording_config(
                    record.digest_interval,
                    args.tick_hz,
                    workload,
                    record.output_memory_hash,
                ),
            );
            Some(Box::new(Recorder::create(&record.log, &header)?))
        }
        None => None,
    };
    let recording = sink.is_some();
    eprintln!(
        "ftvm: booting the guest ({} MiB, workload {}){}{}",
        args.mem >> 20,
        workload,
        net.as_ref()
            .map(|n| format!(", service on {}", n.local_addr()))
            .unwrap_or_default(),
        record
            .map(|r| format!(", recording to {}", r.log.display()))
            .unwrap_or_default()
    );
    let emitter = Emitter {
        net: net.clone(),
        console: args.guest.console()?,
        capture: args.guest.capture()?,
        served: Default::default(),
    };
    let mut live = Live::new(net, Box::new(emitter), sink, stop.clone(), timeout);
    let summary = match run_loop::run(&mut vm, &mut live, &stop, recording) {
        Ok(s) => s,
        Err(e) => {
            if let Some(sink) = live.sink_mut() {
                if let Err(close) = sink.abort(&e.to_string()) {
                    eprintln!("ftvm: closing the log failed too: {close}");
                }
            }
            return Err(e.into());
        }
    };
    print_summary(&summary);
    if let Some(line) = live.sink_mut().and_then(|s| s.report()) {
        eprintln!("ftvm: {line}");
    }
    if let Some(path) = &args.stats_json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(exit_for(summary.reason))
}

pub fn print_summary(summary: &RunSummary) {
    let e = &summary.exits;
    eprintln!(
        "ftvm: stopped ({:?}) after {:.1} s: {} exits (pio {}, mmio {}, hlt {}, trapped {}), {} interrupts, {} packets in, {} frames out",
        summary.reason.unwrap_or(StopReason::Requested),
        summary.elapsed_secs,
        e.synchronous,
        e.pio,
        e.mmio,
        e.hlt,
        e.trapped,
        summary.interrupts_injected,
        summary.packets_delivered,
        summary.frames_transmitted
    );
    let b = &summary.between;
    if b.deliveries > 0 {
        eprintln!(
            "ftvm: {} deliveries between two exits ({} kicks)",
            b.deliveries, b.kicks
        );
    }
}

/// The exit status of a run that ended without an error of the VMM's.
pub fn exit_for(reason: Option<StopReason>) -> ExitCode {
    match reason {
        Some(StopReason::GuestError(code)) => {
            eprintln!("ftvm: the guest stopped with error code {code} (its console says why)");
            ExitCode::from(exit_codes::GUEST_ERROR)
        }
        _ => ExitCode::SUCCESS,
    }
}
