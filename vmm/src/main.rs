//! `ftvm`: the one command a user needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use ftvm::guest_image::GUEST_ELF;
use ftvm::memory::parse_size;
use ftvm::net_backend::NetBackend;
use ftvm::runloop::{run_live, LiveIo, RunLimits, StopReason};
use ftvm::stop::StopSignal;
use ftvm::vm::{Vm, VmConfig};

#[derive(Parser)]
#[command(name = "ftvm", version, about = "A fault-tolerant virtual machine on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and serve its clients (the embedded KV guest by default).
    Run(RunArgs),
    /// Talk to the guest's key-value service.
    Kv(ftvm::kv::KvArgs),
    /// Measure throughput, latency and exit rates.
    Bench(ftvm::bench::BenchArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest ELF image; the embedded guest when omitted.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest memory size (for example 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Host UDP address on which the guest's service is reachable.
    #[arg(long, default_value = "127.0.0.1:7000")]
    service: SocketAddr,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// PIT tick rate the guest is asked to program.
    #[arg(long, default_value_t = ftvm::boot::DEFAULT_TICK_HZ)]
    tick_hz: u32,
    /// The KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Write the run's counters as JSON to this file when it ends.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match cli.command {
        Command::Run(args) => match cmd_run(&args) {
            Ok(code) => code,
            Err(message) => {
                eprintln!("ftvm: {message}");
                ExitCode::from(1)
            }
        },
        Command::Kv(args) => ExitCode::from(ftvm::kv::run(&args) as u8),
        Command::Bench(args) => match ftvm::bench::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("ftvm bench: {message}");
                ExitCode::from(1)
            }
        },
    }
}

/// SIGINT and SIGTERM become a stop request. They are blocked in every
/// thread (threads inherit the mask, so this runs before any is spawned)
/// and taken by one waiting thread, so that no handler runs in the middle
/// of the run loop.
fn stop_on_signals(stop: StopSignal) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().map_err(|e| format!("cannot block SIGINT/SIGTERM: {e}"))?;
    std::thread::Builder::new()
        .name("ftvm-signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig} received, stopping");
                stop.request();
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

fn cmd_run(args: &RunArgs) -> Result<ExitCode, String> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = match &args.kernel {
        Some(path) => std::fs::read(path).map_err(|e| format!("cannot read guest image {}: {e}", path.display()))?,
        None => GUEST_ELF.to_vec(),
    };
    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => return Err(format!("--timeout {t} must be a positive number of seconds")),
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let config = VmConfig {
        mem_size: args.mem,
        tick_hz: args.tick_hz,
        kvm_device: args.kvm_device.clone(),
    };
    let mut vm = Vm::new(&image, config).map_err(|e| e.to_string())?;
    let net = NetBackend::bind(args.service).map_err(|e| e.to_string())?;
    let console: Box<dyn std::io::Write + Send> = match &args.serial {
        Some(path) => Box::new(
            std::fs::File::create(path).map_err(|e| format!("cannot create the serial file {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    eprintln!(
        "ftvm: booting the guest ({} MiB), service on {}",
        args.mem >> 20,
        net.local_addr()
    );
    let mut io = LiveIo {
        net: Some(net),
        console,
    };
    let limits = RunLimits { stop, timeout };
    let summary = run_live(&mut vm, &mut io, &limits).map_err(|e| e.to_string())?;
    let e = &summary.exits;
    eprintln!(
        "ftvm: stopped ({:?}) after {:.1} s: {} exits (pio {}, mmio {}, hlt {}), {} interrupts, {} packets in, {} frames out",
        summary.reason,
        summary.elapsed_secs,
        e.synchronous,
        e.pio,
        e.mmio,
        e.hlt,
        summary.interrupts_injected,
        summary.packets_delivered,
        summary.frames_transmitted
    );
    if let Some(path) = &args.stats_json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(match summary.reason {
        StopReason::GuestError(code) => {
            eprintln!("ftvm: the guest stopped with error code {code} (its console says why)");
            ExitCode::from(2)
        }
        StopReason::PowerOff | StopReason::Requested | StopReason::Timeout => ExitCode::SUCCESS,
    })
}
