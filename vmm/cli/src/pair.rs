//! `ftvm primary` and `ftvm backup`: the two halves of a fault-tolerant
//! pair, joined by the log channel and refereed by the arbiter.

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::Member;
use ftvm_core::ft::backup::{Backup, ChannelSource, GoLive};
use ftvm_core::ft::membership::ArbitrationError;
use ftvm_core::ft::membership::Membership;
use ftvm_core::ft::output_gate::OutputGate;
use ftvm_core::ft::primary::FtSink;
use ftvm_core::host::emitter::Emitter;
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::host::net_backend::NetBackend;
use ftvm_core::live::Live;
use ftvm_core::replay::Replay;
use ftvm_core::run::run_loop::{self, RunError, RunSummary};
use ftvm_core::run::stop::StopSignal;
use ftvm_core::run::vm::{Vm, VmConfig};
use logchannel::{image_hash, ChannelConfig, ChannelError, Hello, LogReceiver, LogSender, Role};

use super::{
    capture, console, exit_for, print_summary, read_image, seconds, stop_on_signals, BackupArgs,
    FtArgs, PrimaryArgs,
};

/// Exit status of a server that lost test-and-set.
const EXIT_LOST: u8 = 4;
/// Exit status of a server that could not reach the arbiter when it had to
/// decide, and so did not go live.
const EXIT_NO_ARBITER: u8 = 5;

fn server_id(ft: &FtArgs, role: &str) -> String {
    ft.id.clone().unwrap_or_else(|| {
        format!(
            "{role}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    })
}

fn channel_config(ft: &FtArgs) -> Result<ChannelConfig, String> {
    let failure_timeout = Duration::from_millis(ft.failure_timeout_ms);
    if ft.failure_timeout_ms < 20 {
        return Err(format!(
            "--failure-timeout-ms {} is too short (at least 20)",
            ft.failure_timeout_ms
        ));
    }
    if !(ft.max_lag_ms >= 0.0 && ft.max_lag_ms.is_finite()) {
        return Err(format!(
            "--max-lag-ms {} must be a number of milliseconds, 0 or more",
            ft.max_lag_ms
        ));
    }
    if !(ft.batch_delay_ms > 0.0 && ft.batch_delay_ms.is_finite()) {
        return Err(format!(
            "--batch-delay-ms {} must be a positive number of milliseconds",
            ft.batch_delay_ms
        ));
    }
    if ft.max_lag_ms > 0.0 && ft.batch_delay_ms >= ft.max_lag_ms {
        return Err(format!(
            "--batch-delay-ms {} must be below --max-lag-ms {}: the lag bound would hold the primary for entries it has not sent yet",
            ft.batch_delay_ms, ft.max_lag_ms
        ));
    }
    Ok(ChannelConfig {
        failure_timeout,
        max_lag: (ft.max_lag_ms > 0.0).then(|| Duration::from_secs_f64(ft.max_lag_ms / 1000.0)),
        batch_delay: Duration::from_secs_f64(ft.batch_delay_ms / 1000.0),
        heartbeat_interval: (failure_timeout / 10).max(Duration::from_millis(2)),
        handshake_timeout: Duration::from_secs(1),
        window_entries: ft.window_entries,
        ..ChannelConfig::default()
    })
}

fn boot(ft: &FtArgs, image: &[u8]) -> Result<Vm, String> {
    let config = VmConfig {
        mem_size: ft.mem,
        tick_hz: ft.tick_hz,
        kvm_device: ft.guest.kvm_device.clone(),
        patching: true,
    };
    Vm::new(image, config).map_err(|e| e.to_string())
}

/// The exit status for how a server's run ended.
fn finish(result: Result<RunSummary, RunError>, events: &Events) -> Result<ExitCode, String> {
    match result {
        Ok(summary) => {
            print_summary(&summary);
            events.emit(
                ServerEvent::Stopped {
                    reason: format!("{:?}", summary.reason),
                },
                None,
            );
            Ok(exit_for(summary.reason))
        }
        Err(e) if ArbitrationError::of(&e).is_some() => {
            eprintln!("ftvm: {e}");
            Ok(ExitCode::from(match ArbitrationError::of(&e) {
                Some(ArbitrationError::Unreachable { .. }) => EXIT_NO_ARBITER,
                _ => EXIT_LOST,
            }))
        }
        Err(RunError::Diverged(d)) => {
            events.emit(
                ServerEvent::Diverged {
                    detail: d.to_string(),
                },
                None,
            );
            Err(format!("the backup diverged from the primary:\n{d}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

pub fn cmd_primary(args: &PrimaryArgs) -> Result<ExitCode, String> {
    let ft = &args.ft;
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = read_image(&ft.guest)?;
    let timeout = seconds("--timeout", ft.timeout)?;
    let wait = seconds("--backup-wait", Some(args.backup_wait))?.unwrap_or_default();
    let config = channel_config(ft)?;
    let mut vm = boot(ft, &image)?;
    let net = Arc::new(NetBackend::bind(ft.service).map_err(|e| e.to_string())?);
    let listener = TcpListener::bind(args.log_listen)
        .map_err(|e| format!("cannot listen for the backup on {}: {e}", args.log_listen))?;
    let log_addr = match args.log_advertise {
        Some(a) => a,
        None => listener.local_addr().map_err(|e| e.to_string())?,
    };
    let id = server_id(ft, "primary");
    let events = Events::open(&id, ft.events.as_deref())
        .map_err(|e| format!("cannot open the events file: {e}"))?;
    let me = Member {
        id: id.clone(),
        service_addr: net.local_addr(),
        log_addr: Some(log_addr),
    };
    let membership = Membership::start(ft.arbiter, &ft.vm_id, me)?;
    let view = membership
        .wait_for(wait, |v| v.primary.is_some())
        .ok_or_else(|| {
            format!(
                "the arbiter at {} named no primary within {wait:?}",
                ft.arbiter
            )
        })?;
    if !membership.is_me(view.primary.as_ref()) {
        return Err(format!(
            "view {} already has a primary ({}); start this server as a backup",
            view.number,
            view.primary.map(|p| p.id).unwrap_or_default()
        ));
    }
    membership.acknowledge(view.number);
    events.emit(
        ServerEvent::Role {
            role: ServerRole::Primary,
            view: view.number,
            backup: None,
        },
        Some(format!("primary of view {}", view.number)),
    );

    eprintln!("ftvm {id}: waiting for a backup (log channel on {log_addr})");
    let deadline = Instant::now() + wait;
    let (sender, view) = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(view) = membership.wait_for(remaining, |v| {
            membership.is_me(v.primary.as_ref()) && v.backup.is_some()
        }) else {
            return Err(format!("no backup joined within {wait:?}"));
        };
        let hello = Hello::new(
            Role::Primary,
            ft.vm_id.clone(),
            view.number,
            image_hash(&image),
            ft.mem,
            1,
        );
        match LogSender::accept(&listener, hello, config) {
            Ok(sender) => break (sender, view),
            Err(ChannelError::AcceptTimeout { .. }) if Instant::now() < deadline => continue,
            Err(e) => return Err(format!("the backup's log channel: {e}")),
        }
    };
    membership.acknowledge(view.number);
    events.emit(
        ServerEvent::Role {
            role: ServerRole::Primary,
            view: view.number,
            backup: view.backup.as_ref().map(|b| b.id.clone()),
        },
        Some(format!(
            "view {}: backup {} connected, fault tolerance on",
            view.number,
            view.backup.as_ref().map(|b| b.id.as_str()).unwrap_or("?")
        )),
    );

    let sender = Arc::new(sender);
    let alone = Arc::new(AtomicBool::new(false));
    let board = Arc::new(StatusBoard::default());
    StatusBoard::report_periodically(board.clone(), events.clone());
    let emitter = Emitter {
        net: Some(net.clone()),
        console: console(&ft.guest)?,
        capture: capture(&ft.guest)?,
        served: board.served.clone(),
    };
    let gate = OutputGate::new(
        emitter,
        sender.clone(),
        alone.clone(),
        board.output_hold.clone(),
    )
    .map_err(|e| format!("cannot start the output gate: {e}"))?;
    let sink = FtSink::new(
        sender,
        membership.clone(),
        alone,
        view.number,
        ft.digest_interval,
        board,
        events.clone(),
    );
    let mut live = Live::new(
        Some(net),
        Box::new(gate),
        Some(Box::new(sink)),
        stop.clone(),
        timeout,
    );
    let result = run_loop::run(&mut vm, &mut live, &stop, true);
    if let Some(line) = live.sink_mut().and_then(|s| s.report()) {
        eprintln!("ftvm {id}: {line}");
    }
    membership.stop();
    finish(result, &events)
}

pub fn cmd_backup(args: &BackupArgs) -> Result<ExitCode, String> {
    let ft = &args.ft;
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = read_image(&ft.guest)?;
    let timeout = seconds("--timeout", ft.timeout)?;
    let wait = seconds("--primary-wait", Some(args.primary_wait))?.unwrap_or_default();
    let config = channel_config(ft)?;
    let mut vm = boot(ft, &image)?;
    let id = server_id(ft, "backup");
    let events = Events::open(&id, ft.events.as_deref())
        .map_err(|e| format!("cannot open the events file: {e}"))?;
    let me = Member {
        id: id.clone(),
        service_addr: ft.service,
        log_addr: None,
    };
    Membership::wait_for_primary(ft.arbiter, &ft.vm_id, wait)?;
    let membership = Membership::start(ft.arbiter, &ft.vm_id, me)?;
    let deadline = Instant::now() + wait;
    let (receiver, view) = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let view = membership
            .wait_for(remaining, |v| membership.is_me(v.backup.as_ref()))
            .ok_or_else(|| {
                format!(
                    "the arbiter at {} did not name this server backup within {wait:?}",
                    ft.arbiter
                )
            })?;
        let Some(log_addr) = view.primary.as_ref().and_then(|p| p.log_addr) else {
            return Err(format!(
                "view {} names no log channel address for its primary",
                view.number
            ));
        };
        let hello = Hello::new(
            Role::Backup,
            ft.vm_id.clone(),
            view.number,
            image_hash(&image),
            ft.mem,
            0,
        );
        match LogReceiver::connect(log_addr, hello, config) {
            Ok(r) => break (r, view),
            Err(
                e @ (ChannelError::HelloRefused { .. }
                | ChannelError::RefusedByPeer { .. }
                | ChannelError::NotAPeer { .. }),
            ) => {
                return Err(format!("the primary's log channel at {log_addr}: {e}"));
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connecting to the primary at {log_addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(format!(
                    "cannot reach the primary's log channel at {log_addr}: {e}"
                ))
            }
        }
    };
    events.emit(
        ServerEvent::Role {
            role: ServerRole::Backup,
            view: view.number,
            backup: None,
        },
        Some(format!(
            "backup of view {}, following {}",
            view.number,
            view.primary.as_ref().map(|p| p.id.as_str()).unwrap_or("?")
        )),
    );
    let board = Arc::new(StatusBoard::default());
    board
        .view
        .store(view.number, std::sync::atomic::Ordering::Relaxed);
    StatusBoard::report_periodically(board.clone(), events.clone());
    let source = ChannelSource::new(Arc::new(receiver), board.clone(), events.clone());
    let replay = Replay::new(
        source,
        ft.digest_interval,
        false,
        Box::new(std::io::sink()),
        None,
        stop.clone(),
    );
    let go_live = GoLive {
        membership: membership.clone(),
        view: view.number,
        service: ft.service,
        console: console(&ft.guest)?,
        capture: capture(&ft.guest)?,
        stop: stop.clone(),
        timeout,
        events: events.clone(),
        board,
    };
    let mut backup = Backup::new(replay, go_live);
    if let Some(t) = timeout {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(t);
            stop.request();
        });
    }
    let result = run_loop::run(&mut vm, &mut backup, &stop, true);
    eprintln!(
        "ftvm {id}: replayed {}{}",
        backup.replay_counts(),
        if backup.is_live() {
            "; then went live"
        } else {
            ""
        }
    );
    membership.stop();
    finish(result, &events)
}
