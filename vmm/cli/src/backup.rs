//! `ftvm backup`: a spare until the arbiter names it backup; then it joins
//! its primary by state transfer, replays the primary's log as it arrives,
//! and takes over when the primary fails and the arbiter lets it.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use arbiter::{Member, View};
use ftvm_core::ft::backup::{Backup, ChannelSource, GoLive};
use ftvm_core::ft::membership::{ArbitrationError, JoinWait, Membership};
use ftvm_core::ft::transfer::receive::{restore, Prepared, Restored};
use ftvm_core::ft::transfer::silence_limit;
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::replay::Replay;
use ftvm_core::run::run_loop::{self, Start};
use ftvm_core::run::stop::StopSignal;
use logchannel::{
    image_hash, ChannelConfig, ChannelError, Handshaken, Hello, LogReceiver, Mismatch, Role,
};

use crate::args::seconds;
use crate::exit_codes;
use crate::ft::{finish, joining_failed, stop_at, FtArgs};
use crate::stop::{stop_after, stop_on_signals};

/// How long a backup waits before it tries the primary's log channel again.
const RETRY: Duration = Duration::from_millis(50);
/// A spare waits to be named for as long as it runs.
const SPARE_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Seconds to wait for the VM to have a primary at all (then exit 1).
    /// Once it has one, this server waits as a spare until the arbiter
    /// names it backup, for as long as it runs. The arbiter unanswered for
    /// 5 s ends either wait (exit 5), and so do a signal and --timeout
    /// (exit 0, or 5 if the arbiter never answered).
    #[arg(long, default_value_t = 60.0)]
    primary_wait: f64,
}

pub fn run(args: &BackupArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let ft = &args.ft;
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = ft.guest.image()?;
    let timeout = seconds("--timeout", ft.timeout)?;
    let wait = seconds("--primary-wait", Some(args.primary_wait))?.unwrap_or_default();
    let config = ft.channel_config()?;
    let mut vm = ft.boot(&image)?;
    let prepared = Prepared::new(&vm).context("cannot prepare guest memory for a transfer")?;
    let (listener, log_addr) = ft.log_listener()?;
    let id = ft.server_id("backup");
    let events = Events::open(&id, ft.events.as_deref()).context("cannot open the events file")?;
    let me = Member {
        id: id.clone(),
        service_addr: ft.service,
        log_addr: Some(log_addr),
    };
    let stop_at = stop_at(started, timeout);
    if let Some(at) = stop_at {
        stop_after(&stop, at.saturating_duration_since(Instant::now()));
    }
    let arbiter = Membership::connect(&ft.arbiter).map_err(|e| anyhow!(e))?;
    let join = JoinWait::new(&stop, stop_at, wait);
    if let Err(e) = Membership::wait_for_primary(&*arbiter, &ft.vm_id, &join) {
        return joining_failed(e.into(), &events);
    }
    let membership =
        Membership::start(arbiter, &ft.vm_id, me, stop.clone()).map_err(|e| anyhow!(e))?;
    membership.joined();
    eprintln!("ftvm {id}: a spare until the arbiter names it backup");
    let board = Arc::new(StatusBoard::default());
    StatusBoard::report_periodically(board.clone(), events.clone());
    let spare = JoinWait::new(&stop, stop_at, SPARE_WAIT);
    let hello = Hello::new(
        Role::Backup,
        ft.vm_id.clone(),
        0,
        image_hash(&image),
        ft.mem,
        ft.workload().name(),
        0,
    );
    let connected = connect(&membership, &spare, hello, config);
    let (mut handshaken, view) = match connected {
        Ok(c) => c,
        Err(e) => {
            membership.stop();
            return joining_failed(e, &events);
        }
    };
    let restored = match restore(
        &mut handshaken,
        &mut vm,
        prepared,
        silence_limit(config.failure_timeout),
        &board,
    ) {
        Ok(r) => r,
        Err(e) => {
            membership.stop();
            let detail = format!(
                "{e}; this server holds no complete state, so it does not take over view {}",
                view.number
            );
            events.emit(
                ServerEvent::TransferFailed {
                    view: view.number,
                    detail: detail.clone(),
                },
                Some(detail),
            );
            return Ok(ExitCode::from(exit_codes::FAILURE));
        }
    };
    board.transfer_round.store(0, Ordering::Relaxed);
    board.transfer_bytes.store(0, Ordering::Relaxed);
    let receiver = LogReceiver::start(handshaken, restored.next_seq)
        .context("cannot start the log channel after the state transfer")?;
    joined(&events, &board, &view, &restored);
    let source = ChannelSource::new(
        Arc::new(receiver),
        board.clone(),
        events.clone(),
        restored.machine.datagrams.clone(),
    );
    let replay = Replay::new(
        source,
        ft.digest_interval,
        false,
        Box::new(std::io::sink()),
        None,
        stop.clone(),
    )
    .with_clock(restored.machine.clock_ns);
    let go_live = GoLive {
        membership: membership.clone(),
        view: view.number,
        service: ft.service,
        console: ft.guest.console()?,
        capture: ft.guest.capture()?,
        stop: stop.clone(),
        events: events.clone(),
        board,
        listener,
        hello: ft.join_hello(&image),
        config,
        mem: vm.mem.clone(),
        dirty: vm.dirty_log(),
        digest_interval: ft.digest_interval,
        clock_ns: restored.machine.clock_ns,
    };
    let mut backup = Backup::new(replay, go_live);
    let start = Start {
        exits: restored.exits,
        console_line: restored.machine.console_line.clone(),
    };
    let result = run_loop::run_from(&mut vm, &mut backup, &stop, true, start);
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

fn joined(events: &Events, board: &StatusBoard, view: &View, restored: &Restored) {
    board.view.store(view.number, Ordering::Relaxed);
    events.emit(
        ServerEvent::Restored {
            view: view.number,
            exits: restored.exits,
            rounds: restored.rounds,
            bytes: restored.bytes,
        },
        Some(format!(
            "restored the primary's state at exit {} ({:.1} MiB in {} rounds, {} pages, {:.0} ms); digest verified",
            restored.exits,
            restored.bytes as f64 / (1 << 20) as f64,
            restored.rounds,
            restored.pages,
            restored.took.as_secs_f64() * 1e3
        )),
    );
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
}

/// Waits to be named backup, then connects to the primary's log channel
/// and shakes hands. Every wait ends at once on a stop request, and when
/// another server takes this one's place.
fn connect(
    membership: &Membership,
    join: &JoinWait,
    mut hello: Hello,
    config: ChannelConfig,
) -> Result<(Handshaken, View)> {
    // Since when the primary's log channel has not answered.
    let mut unanswered: Option<Instant> = None;
    loop {
        let view = membership.wait_for(join, "the arbiter names this server backup", |v| {
            membership.is_me(v.backup.as_ref())
        })?;
        let Some(log_addr) = view.primary.as_ref().and_then(|p| p.log_addr) else {
            bail!(
                "view {} names no log channel address for its primary",
                view.number
            );
        };
        hello.view = view.number;
        let cancelled = || join.stopping() || membership.deposed();
        match LogReceiver::connect_handshaken(log_addr, hello.clone(), config, &cancelled) {
            Ok(h) => return Ok((h, view)),
            // The primary has not learned of this view yet: it will.
            Err(ChannelError::HelloRefused {
                mismatch: Mismatch::View { primary, backup },
                ..
            }) if primary < backup => {
                tracing::debug!("the primary is still in view {primary}; trying again");
                std::thread::sleep(RETRY);
            }
            Err(
                e @ (ChannelError::HelloRefused { .. }
                | ChannelError::RefusedByPeer { .. }
                | ChannelError::NotAPeer { .. }),
            ) => {
                return Err(e).with_context(|| format!("the primary's log channel at {log_addr}"));
            }
            Err(ChannelError::Cancelled { .. }) if join.stopping() => {
                return Err(ArbitrationError::StoppedJoining {
                    what: format!("connecting to the primary at {log_addr}"),
                    arbiter_answered: true,
                }
                .into());
            }
            // Deposed: the next wait says so.
            Err(ChannelError::Cancelled { .. }) => {}
            Err(e) => {
                let since = *unanswered.get_or_insert_with(Instant::now);
                if since.elapsed() > silence_limit(config.failure_timeout) {
                    return Err(e).with_context(|| {
                        format!(
                            "the primary of view {} does not answer on its log channel at {log_addr}; this server holds no state to take over with",
                            view.number
                        )
                    });
                }
                tracing::debug!("connecting to the primary at {log_addr}: {e}");
                std::thread::sleep(RETRY);
            }
        }
    }
}
