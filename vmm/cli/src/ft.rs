//! What `ftvm primary` and `ftvm backup` share: the flags of a
//! fault-tolerant server, the log channel they make of them, and how a
//! server's run ends.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter::ArbiterAddr;
use ftvm_core::ft::backup::BackupError;
use ftvm_core::ft::membership::ArbitrationError;
use ftvm_core::ft::transfer::send::JoinHello;
use ftvm_core::host::events::{Events, ServerEvent};
use ftvm_core::machine::workload::Workload;
use ftvm_core::run::run_loop::{RunError, RunSummary};
use ftvm_core::run::vm::{Vm, VmConfig};
use logchannel::{image_hash, ChannelConfig};

use crate::args::{parse_mem, parse_tick_hz, GuestArgs, DEFAULT_DIGEST_INTERVAL, VM_ID};
use crate::exit_codes;
use crate::run::{exit_for, print_summary};

/// A few dozen milliseconds of a loaded guest's log on this platform.
const DEFAULT_WINDOW_ENTRIES: u64 = 256;
/// Half the 10 ms the backup is meant to stay within at p99: the primary
/// notices the lag only at its next exit, up to a few ms of guest work later.
const DEFAULT_MAX_LAG_MS: f64 = 5.0;
/// Every output flushes the log anyway, so a longer delay only spares the
/// writes (and the backup's wake-ups) of entries between outputs; measured:
/// FT overhead 0.76 at 0.2 ms, 0.85-0.88 at 2 ms (BENCHMARKS.md).
const DEFAULT_BATCH_DELAY_MS: f64 = 2.0;

#[derive(clap::Args)]
pub struct FtArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Guest memory size (for example 64M, 1G): 2M to 3G, a multiple of
    /// 4K.
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// What the embedded guest runs: kv-user (the KV service, its hot
    /// path at CPL3), kv (all of it at CPL0), race, spin, kv-race or
    /// spin-user (spin at CPL3) (docs/guest-abi.md); primary and backup
    /// must agree. Default: kv-user, or kv with --kernel.
    #[arg(long)]
    pub workload: Option<Workload>,
    /// The VM this pair runs, as the arbiter knows it.
    #[arg(long, default_value = VM_ID)]
    pub vm_id: String,
    /// This server's id at the arbiter (one per process incarnation).
    #[arg(long)]
    id: Option<String>,
    /// The arbiter: `HOST:PORT` for the built-in one (`ftvm arbiter`), or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` for an etcd cluster (its
    /// client endpoints; keys under PREFIX, `ftvm` if none).
    #[arg(long, value_name = "ADDR")]
    pub arbiter: ArbiterAddr,
    /// Where this server serves the guest's clients while it is primary.
    #[arg(long)]
    pub service: SocketAddr,
    /// Where this server's log channel listens for backups while it is
    /// primary (a backup or spare needs it once it takes over). Only a
    /// connection whose handshake names this VM, the current view, the
    /// same guest image, memory size and workload is taken; any other is
    /// turned away. Default: a free port on --service's address.
    #[arg(long)]
    log_listen: Option<SocketAddr>,
    /// The log channel address the arbiter gives backups, when they must
    /// reach it through something (a proxy, a NAT) rather than directly.
    #[arg(long)]
    log_advertise: Option<SocketAddr>,
    /// What counts as the peer's failure: no byte from it on the log
    /// channel for this long, a broken connection or a bad message, or
    /// (the primary's judgement of its backup) a replay that has stood
    /// still this long with log entries to replay while the primary waits
    /// for it. Then the survivor claims the view at the arbiter. A slow
    /// link is none of these: a constant delay, however long, holds the
    /// primary back (each output waits a round trip) but fails nobody; a
    /// rise in delay reads as silence of that length (plus up to a tenth of
    /// this, the heartbeat interval). A peer that
    /// stops on purpose says goodbye and is not a failure. A primary that
    /// wrote nothing to its backup for half this long (it was paused)
    /// asks the arbiter before it releases another output.
    #[arg(long, default_value_t = 300)]
    failure_timeout_ms: u64,
    /// Append events (role, status, failover) as JSON lines to this file.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Stop after this many seconds, counted from the start: waiting for
    /// the arbiter and the peer counts too.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Synchronous exits between periodic digests; primary and backup must agree.
    #[arg(long, default_value_t = DEFAULT_DIGEST_INTERVAL)]
    pub digest_interval: u64,
    /// PIT tick rate the guest is asked to program: 19 to 596591, the
    /// rates whose PIT divisor (1193182 / rate) the guest can use.
    #[arg(long, default_value_t = ftvm_core::machine::boot::DEFAULT_TICK_HZ, value_parser = parse_tick_hz)]
    tick_hz: u32,
    /// Log entries in flight (sent, not acknowledged) before the primary
    /// waits for its backup; bounds how far the backup can lag, and how
    /// much is sent per round trip.
    #[arg(long, default_value_t = DEFAULT_WINDOW_ENTRIES)]
    window_entries: u64,
    /// How far behind the backup may replay before the primary waits for
    /// it at its next exit: the age of the oldest log entry it has not
    /// reported replayed, less the link's round trip (an entry cannot be
    /// reported sooner); 0 turns the bound off.
    #[arg(long, default_value_t = DEFAULT_MAX_LAG_MS)]
    max_lag_ms: f64,
    /// How long a log entry may wait to be sent with later ones (an
    /// output's entries go at once); below --max-lag-ms.
    #[arg(long, default_value_t = DEFAULT_BATCH_DELAY_MS)]
    batch_delay_ms: f64,
}

impl FtArgs {
    /// `--id`, or one unique to this process incarnation.
    pub fn server_id(&self, role: &str) -> String {
        self.id.clone().unwrap_or_else(|| {
            format!(
                "{role}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )
        })
    }

    pub fn channel_config(&self) -> Result<ChannelConfig> {
        let failure_timeout = Duration::from_millis(self.failure_timeout_ms);
        if self.failure_timeout_ms < 20 {
            bail!(
                "--failure-timeout-ms {} is too short (at least 20)",
                self.failure_timeout_ms
            );
        }
        if !(self.max_lag_ms >= 0.0 && self.max_lag_ms.is_finite()) {
            bail!(
                "--max-lag-ms {} must be a number of milliseconds, 0 or more",
                self.max_lag_ms
            );
        }
        if !(self.batch_delay_ms > 0.0 && self.batch_delay_ms.is_finite()) {
            bail!(
                "--batch-delay-ms {} must be a positive number of milliseconds",
                self.batch_delay_ms
            );
        }
        if self.max_lag_ms > 0.0 && self.batch_delay_ms >= self.max_lag_ms {
            bail!(
                "--batch-delay-ms {} must be below --max-lag-ms {}: the lag bound would hold the primary for entries it has not sent yet",
                self.batch_delay_ms,
                self.max_lag_ms
            );
        }
        Ok(ChannelConfig {
            failure_timeout,
            max_lag: (self.max_lag_ms > 0.0)
                .then(|| Duration::from_secs_f64(self.max_lag_ms / 1000.0)),
            batch_delay: Duration::from_secs_f64(self.batch_delay_ms / 1000.0),
            heartbeat_interval: (failure_timeout / 10).max(Duration::from_millis(2)),
            handshake_timeout: Duration::from_secs(1),
            window_entries: self.window_entries,
            ..ChannelConfig::default()
        })
    }

    /// The log channel's listener, and the address the arbiter announces
    /// for it.
    pub fn log_listener(&self) -> Result<(TcpListener, SocketAddr)> {
        let addr = self
            .log_listen
            .unwrap_or_else(|| SocketAddr::new(self.service.ip(), 0));
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for backups on {addr}"))?;
        let advertised = match self.log_advertise {
            Some(a) => a,
            None => listener.local_addr()?,
        };
        Ok((listener, advertised))
    }

    /// What a primary and its backups must agree on, for the handshake.
    pub fn join_hello(&self, image: &[u8]) -> JoinHello {
        JoinHello {
            vm_id: self.vm_id.clone(),
            image_hash: image_hash(image),
            mem_size: self.mem,
            workload: self.workload().name().to_string(),
        }
    }

    /// What the guest runs (`--workload`, or the default).
    pub fn workload(&self) -> Workload {
        self.guest.workload(self.workload)
    }

    pub fn boot(&self, image: &[u8]) -> Result<Vm> {
        let config = VmConfig {
            mem_size: self.mem,
            tick_hz: self.tick_hz,
            kvm_device: self.guest.kvm_device.clone(),
            patching: true,
            workload: self.workload(),
        };
        Ok(Vm::new(image, config)?)
    }
}

/// When `--timeout` (counted from `started`) stops the server, if it does.
pub fn stop_at(started: Instant, timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| started + t)
}

/// What is left of `--timeout` for the run, once joined.
pub fn time_left(stop_at: Option<Instant>) -> Option<Duration> {
    stop_at.map(|t| t.saturating_duration_since(Instant::now()))
}

/// The exit status of a server that did not join, or stopped, for a reason
/// the arbiter's part explains.
pub fn exit_for_arbitration(e: &ArbitrationError) -> ExitCode {
    eprintln!("ftvm: {e}");
    ExitCode::from(match e {
        ArbitrationError::Unreachable { .. } => exit_codes::NO_ARBITER,
        ArbitrationError::Lost { .. } | ArbitrationError::Deposed { .. } => exit_codes::LOST,
        ArbitrationError::StoppedJoining {
            arbiter_answered: false,
            ..
        } => exit_codes::NO_ARBITER,
        ArbitrationError::StoppedJoining { .. } => 0,
        ArbitrationError::NotJoined { .. } => exit_codes::FAILURE,
    })
}

/// The exit status of a server whose joining failed: the arbiter's part
/// says which, anything else is an error.
pub fn joining_failed(e: anyhow::Error, events: &Events) -> Result<ExitCode> {
    match e.downcast_ref::<ArbitrationError>() {
        Some(a) => {
            let event = match a {
                ArbitrationError::Unreachable { .. } => {
                    Some(ServerEvent::ArbiterUnreachable { view: 0 })
                }
                ArbitrationError::StoppedJoining { .. } => Some(ServerEvent::Stopped {
                    reason: "stopped while joining".to_string(),
                }),
                _ => None,
            };
            if let Some(event) = event {
                events.emit(event, None);
            }
            Ok(exit_for_arbitration(a))
        }
        None => Err(e),
    }
}

/// The exit status for how a server's run ended.
pub fn finish(result: Result<RunSummary, RunError>, events: &Events) -> Result<ExitCode> {
    let e = match result {
        Ok(summary) => {
            print_summary(&summary);
            events.emit(
                ServerEvent::Stopped {
                    reason: format!("{:?}", summary.reason),
                },
                None,
            );
            return Ok(exit_for(summary.reason));
        }
        Err(e) => e,
    };
    if let Some(a) = ArbitrationError::of(&e) {
        return Ok(exit_for_arbitration(a));
    }
    if BackupError::of(&e).is_some() {
        eprintln!("ftvm: {e}");
        events.emit(
            ServerEvent::Stopped {
                reason: e.to_string(),
            },
            None,
        );
        return Ok(ExitCode::SUCCESS);
    }
    match e {
        RunError::Diverged(d) => {
            events.emit(
                ServerEvent::Diverged {
                    detail: d.to_string(),
                },
                None,
            );
            bail!("the backup diverged from the primary:\n{d}")
        }
        e => Err(e.into()),
    }
}
