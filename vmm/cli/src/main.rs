//! `ftvm`: the one command a user needs.

mod kv;
mod pair;

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use ftvm_core::host::capture::Capture;
use ftvm_core::host::emitter::Emitter;
use ftvm_core::host::net_backend::NetBackend;
use ftvm_core::live::record::Recorder;
use ftvm_core::live::{EntrySink, Live};
use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::machine::memory::parse_size;
use ftvm_core::replay::{FileSource, Replay};
use ftvm_core::run::run_loop::{self, RunError, RunSummary, StopReason};
use ftvm_core::run::stop::StopSignal;
use ftvm_core::run::vm::{Vm, VmConfig};
use logchannel::{image_hash, LogHeader, LogReader, LogWriter, ReplayConfig};

/// The exit status of a replay that diverged.
const EXIT_DIVERGED: u8 = 3;
const DEFAULT_DIGEST_INTERVAL: u64 = 4096;
const VM_ID: &str = "ftvm";
/// A few dozen milliseconds of a loaded guest's log on this platform.
const DEFAULT_WINDOW_ENTRIES: u64 = 256;
/// Half the 10 ms the backup is meant to stay within at p99: the primary
/// notices the lag only at its next exit, up to a few ms of guest work later.
const DEFAULT_MAX_LAG_MS: f64 = 5.0;
/// Every output flushes the log anyway, so a longer delay only spares the
/// writes (and the backup's wake-ups) of entries between outputs; measured:
/// FT overhead 0.76 at 0.2 ms, 0.85-0.88 at 2 ms (BENCHMARKS.md).
const DEFAULT_BATCH_DELAY_MS: f64 = 2.0;

#[derive(Parser)]
#[command(
    name = "ftvm",
    version,
    about = "A fault-tolerant virtual machine on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and serve its clients (the embedded KV guest by default).
    Run(RunArgs),
    /// Like `run`, and write every nondeterministic input to a log.
    Record(RecordArgs),
    /// Run a guest from a log alone and check it reproduces the recording.
    Replay(ReplayArgs),
    /// Inspect and edit logs.
    #[command(subcommand)]
    Log(LogCommand),
    /// Run the guest as the primary of a fault-tolerant pair.
    Primary(PrimaryArgs),
    /// Follow a primary as its backup, and take over when it fails.
    Backup(BackupArgs),
    /// The test-and-set and view service that primaries and backups use.
    Arbiter(arbiter::cli::ArbiterArgs),
    /// Start an arbiter, a primary and a backup, SIGKILL the primary
    /// mid-load, and check that no acknowledged write was lost.
    Demo(ftvm_harness::demo::DemoArgs),
    /// Talk to the guest's key-value service.
    Kv(kv::KvArgs),
    /// Measure throughput, latency and exit rates.
    Bench(ftvm_harness::bench::BenchArgs),
}

#[derive(clap::Args)]
struct GuestArgs {
    /// Guest ELF image; the embedded guest when omitted.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Write the frames the guest transmits to this pcap file.
    #[arg(long)]
    capture: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Guest memory size (for example 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Host UDP address on which the guest's service is reachable.
    #[arg(long, default_value = "127.0.0.1:7000")]
    service: SocketAddr,
    /// Stop after this many seconds.
    #[arg(long, alias = "duration")]
    timeout: Option<f64>,
    /// PIT tick rate the guest is asked to program.
    #[arg(long, default_value_t = ftvm_core::machine::boot::DEFAULT_TICK_HZ)]
    tick_hz: u32,
    /// Write the run's counters as JSON to this file when it ends.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RecordArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The log to write.
    #[arg(long)]
    log: PathBuf,
    /// Synchronous exits between periodic digests (0: none).
    #[arg(long, default_value_t = DEFAULT_DIGEST_INTERVAL)]
    digest_interval: u64,
    /// Bring the memory hash up to date at every output check, not only at
    /// periodic digests (slower: see BENCHMARKS.md).
    #[arg(long)]
    output_memory_hash: bool,
}

#[derive(clap::Args)]
struct ReplayArgs {
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

#[derive(clap::Args)]
struct FtArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Guest memory size (for example 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// The VM this pair runs, as the arbiter knows it.
    #[arg(long, default_value = VM_ID)]
    vm_id: String,
    /// This server's id at the arbiter (one per process incarnation).
    #[arg(long)]
    id: Option<String>,
    /// The arbiter's address.
    #[arg(long)]
    arbiter: SocketAddr,
    /// Where this server serves the guest's clients while it is primary.
    #[arg(long)]
    service: SocketAddr,
    /// Silence on the log channel after which the peer is declared failed.
    #[arg(long, default_value_t = 300)]
    failure_timeout_ms: u64,
    /// Append events (role, status, failover) as JSON lines to this file.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Synchronous exits between periodic digests; primary and backup must agree.
    #[arg(long, default_value_t = DEFAULT_DIGEST_INTERVAL)]
    digest_interval: u64,
    /// PIT tick rate the guest is asked to program.
    #[arg(long, default_value_t = ftvm_core::machine::boot::DEFAULT_TICK_HZ)]
    tick_hz: u32,
    /// Log entries in flight (sent, not acknowledged) before the primary
    /// waits for its backup; bounds how far the backup can lag.
    #[arg(long, default_value_t = DEFAULT_WINDOW_ENTRIES)]
    window_entries: u64,
    /// How far behind the backup may replay (the age of the oldest log entry
    /// it has not replayed) before the primary waits for it at its next
    /// exit; 0 turns the bound off.
    #[arg(long, default_value_t = DEFAULT_MAX_LAG_MS)]
    max_lag_ms: f64,
    /// How long a log entry may wait to be sent with later ones (an
    /// output's entries go at once); below --max-lag-ms.
    #[arg(long, default_value_t = DEFAULT_BATCH_DELAY_MS)]
    batch_delay_ms: f64,
}

#[derive(clap::Args)]
struct PrimaryArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Where the log channel listens for the backup.
    #[arg(long)]
    log_listen: SocketAddr,
    /// The log channel address the arbiter gives backups, when they must
    /// reach it through something (a proxy, a NAT) rather than directly.
    #[arg(long)]
    log_advertise: Option<SocketAddr>,
    /// Seconds to wait for a backup before giving up.
    #[arg(long, default_value_t = 60.0)]
    backup_wait: f64,
}

#[derive(clap::Args)]
struct BackupArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Seconds to wait to be named backup and to reach the primary.
    #[arg(long, default_value_t = 60.0)]
    primary_wait: f64,
}

#[derive(Subcommand)]
enum LogCommand {
    /// List a log, one entry a line (`--json`: JSON lines, header first).
    Dump {
        log: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Turn JSON lines (as `dump --json` writes them) back into a log.
    Load {
        jsonl: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
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
    let result = match cli.command {
        Command::Run(args) => cmd_run(&args, None),
        Command::Record(args) => cmd_run(
            &args.run,
            Some((&args.log, args.digest_interval, args.output_memory_hash)),
        ),
        Command::Replay(args) => cmd_replay(&args),
        Command::Log(LogCommand::Dump { log, json }) => cmd_dump(&log, json),
        Command::Log(LogCommand::Load { jsonl, output }) => cmd_load(&jsonl, &output),
        Command::Primary(args) => pair::cmd_primary(&args),
        Command::Backup(args) => pair::cmd_backup(&args),
        Command::Arbiter(args) => cmd_arbiter(&args),
        Command::Demo(args) => ftvm_harness::demo::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Kv(args) => return ExitCode::from(kv::run(&args) as u8),
        Command::Bench(args) => ftvm_harness::bench::run(&args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|message| {
        eprintln!("ftvm: {message}");
        ExitCode::from(1)
    })
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
    set.thread_block()
        .map_err(|e| format!("cannot block SIGINT/SIGTERM: {e}"))?;
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

fn seconds(arg: &str, value: Option<f64>) -> Result<Option<Duration>, String> {
    match value {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            Err(format!("{arg} {t} must be a positive number of seconds"))
        }
        Some(t) => Ok(Some(Duration::from_secs_f64(t))),
        None => Ok(None),
    }
}

fn read_image(guest: &GuestArgs) -> Result<Vec<u8>, String> {
    match &guest.kernel {
        Some(path) => std::fs::read(path)
            .map_err(|e| format!("cannot read guest image {}: {e}", path.display())),
        None => Ok(GUEST_ELF.to_vec()),
    }
}

fn console(guest: &GuestArgs) -> Result<Box<dyn Write + Send>, String> {
    Ok(match &guest.serial {
        Some(path) => Box::new(
            File::create(path)
                .map_err(|e| format!("cannot create the serial file {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    })
}

fn capture(guest: &GuestArgs) -> Result<Option<Capture>, String> {
    guest
        .capture
        .as_ref()
        .map(|p| {
            Capture::create(p)
                .map_err(|e| format!("cannot create the capture {}: {e}", p.display()))
        })
        .transpose()
}

fn print_summary(summary: &RunSummary) {
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
}

fn exit_for(reason: Option<StopReason>) -> ExitCode {
    match reason {
        Some(StopReason::GuestError(code)) => {
            eprintln!("ftvm: the guest stopped with error code {code} (its console says why)");
            ExitCode::from(2)
        }
        _ => ExitCode::SUCCESS,
    }
}

fn cmd_run(args: &RunArgs, log: Option<(&PathBuf, u64, bool)>) -> Result<ExitCode, String> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = read_image(&args.guest)?;
    let timeout = seconds("--timeout", args.timeout)?;
    let config = VmConfig {
        mem_size: args.mem,
        tick_hz: args.tick_hz,
        kvm_device: args.guest.kvm_device.clone(),
        patching: true,
    };
    let mut vm = Vm::new(&image, config).map_err(|e| e.to_string())?;
    let net = NetBackend::bind(args.service).map_err(|e| e.to_string())?;
    let sink: Option<Box<dyn EntrySink>> = match log {
        Some((path, digest_interval, output_memory)) => {
            let mut extra = std::collections::BTreeMap::new();
            if output_memory {
                extra.insert(
                    ftvm_core::live::record::OUTPUT_MEMORY_KEY.to_string(),
                    "refresh".to_string(),
                );
            }
            let header = LogHeader::new(
                VM_ID,
                image_hash(&image),
                args.mem,
                ReplayConfig {
                    digest_interval,
                    tick_hz: args.tick_hz,
                    patching: true,
                    extra: Default::default(),
                },
            );
            Some(Box::new(
                Recorder::create(path, &header).map_err(|e| e.to_string())?,
            ))
        }
        None => None,
    };
    let recording = sink.is_some();
    eprintln!(
        "ftvm: booting the guest ({} MiB), service on {}{}",
        args.mem >> 20,
        net.local_addr(),
        log.map(|(p, _, _)| format!(", recording to {}", p.display()))
            .unwrap_or_default()
    );
    let net = Arc::new(net);
    let emitter = Emitter {
        net: Some(net.clone()),
        console: console(&args.guest)?,
        capture: capture(&args.guest)?,
        served: Default::default(),
    };
    let mut live = Live::new(Some(net), Box::new(emitter), sink, stop.clone(), timeout);
    let result = run_loop::run(&mut vm, &mut live, &stop, recording);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            if let Some(sink) = live.sink_mut() {
                if let Err(close) = sink.abort(&e.to_string()) {
                    eprintln!("ftvm: closing the log failed too: {close}");
                }
            }
            return Err(e.to_string());
        }
    };
    print_summary(&summary);
    if let Some(line) = live.sink_mut().and_then(|s| s.report()) {
        eprintln!("ftvm: {line}");
    }
    if let Some(path) = &args.stats_json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(exit_for(summary.reason))
}

fn open_log(path: &Path) -> Result<LogReader<BufReader<File>>, String> {
    let file =
        File::open(path).map_err(|e| format!("cannot open the log {}: {e}", path.display()))?;
    LogReader::new(BufReader::with_capacity(1 << 16, file))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn cmd_replay(args: &ReplayArgs) -> Result<ExitCode, String> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let reader = open_log(&args.log)?;
    let header = reader.header().clone();
    let image = read_image(&args.guest)?;
    if image_hash(&image) != header.guest_image_hash {
        return Err(format!(
            "{} was recorded with another guest image (log: sha256 {}, this image: sha256 {}); pass the recorded image with --kernel",
            args.log.display(),
            hex(&header.guest_image_hash),
            hex(&image_hash(&image))
        ));
    }
    if let Some(mem) = args.mem.filter(|m| *m != header.mem_size) {
        return Err(format!(
            "{} was recorded with {} bytes of guest memory, not {mem}",
            args.log.display(),
            header.mem_size
        ));
    }
    if !header.config.patching && !args.no_patch {
        return Err(format!(
            "{} was recorded without patching, which replay cannot reproduce",
            args.log.display()
        ));
    }
    let timeout = seconds("--timeout", args.timeout)?;
    let config = VmConfig {
        mem_size: header.mem_size,
        tick_hz: header.config.tick_hz,
        kvm_device: args.guest.kvm_device.clone(),
        patching: !args.no_patch,
    };
    let mut vm = Vm::new(&image, config).map_err(|e| e.to_string())?;
    let mut replay = Replay::new(
        FileSource::new(reader),
        header.config.digest_interval,
        ftvm_core::live::record::output_memory(&header.config),
        console(&args.guest)?,
        capture(&args.guest)?,
        stop.clone(),
    );
    if let Some(t) = timeout {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(t);
            stop.request();
        });
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
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(RunError::Diverged(d)) => {
            eprintln!("ftvm replay: DIVERGED after {elapsed:.2} s\n{d}");
            Ok(ExitCode::from(EXIT_DIVERGED))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn cmd_arbiter(args: &arbiter::cli::ArbiterArgs) -> Result<ExitCode, String> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let flag = flag.clone();
        std::thread::spawn(move || {
            let _ = stop.wake().recv();
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    eprintln!(
        "ftvm arbiter: listening on {}, state in {}",
        args.listen,
        args.state.display()
    );
    arbiter::cli::run(args, flag).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cmd_dump(path: &Path, json: bool) -> Result<ExitCode, String> {
    let mut reader = open_log(path)?;
    let header = reader.header().clone();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let write_err = |e: std::io::Error| format!("writing the listing failed: {e}");
    if json {
        let mut entries = Vec::new();
        let mut failure = None;
        for entry in reader.by_ref() {
            match entry {
                Ok(e) => entries.push(e),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        logchannel::to_json_lines(&mut out, &header, &entries).map_err(|e| e.to_string())?;
        out.flush().map_err(write_err)?;
        if let Some(e) = failure {
            return Err(format!("{}: {e}", path.display()));
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "log {}: format {}, vm {}, image sha256 {}, memory {} bytes, digest every {} exits, tick {} Hz, patching {}",
        path.display(),
        header.format_version,
        header.vm_id,
        hex(&header.guest_image_hash),
        header.mem_size,
        header.config.digest_interval,
        header.config.tick_hz,
        header.config.patching
    )
    .map_err(write_err)?;
    for entry in reader.by_ref() {
        match entry {
            Ok(e) => writeln!(out, "{e}").map_err(write_err)?,
            Err(e) => {
                out.flush().map_err(write_err)?;
                return Err(format!("{}: {e}", path.display()));
            }
        }
    }
    writeln!(out, "{}", reader.stats()).map_err(write_err)?;
    out.flush().map_err(write_err)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_load(jsonl: &Path, output: &Path) -> Result<ExitCode, String> {
    let file = File::open(jsonl).map_err(|e| format!("cannot open {}: {e}", jsonl.display()))?;
    let (header, entries) = logchannel::from_json_lines(BufReader::new(file))
        .map_err(|e| format!("{}: {e}", jsonl.display()))?;
    let out =
        File::create(output).map_err(|e| format!("cannot create {}: {e}", output.display()))?;
    let mut writer = LogWriter::new(BufWriter::new(out), &header).map_err(|e| e.to_string())?;
    let mut count = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", jsonl.display()))?;
        writer
            .append_entry(&entry)
            .map_err(|e| format!("{}: entry #{}: {e}", jsonl.display(), entry.seq))?;
        count += 1;
    }
    let mut out = writer.into_inner().map_err(|e| e.to_string())?;
    out.flush()
        .map_err(|e| format!("writing {} failed: {e}", output.display()))?;
    eprintln!(
        "ftvm log load: {count} entries written to {}",
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}
