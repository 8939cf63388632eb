//! `ftvm backup`: replays the primary's log as it arrives, and takes over
//! when the primary fails and the arbiter lets it.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use arbiter::{Member, View};
use ftvm_core::ft::backup::{Backup, ChannelSource, GoLive};
use ftvm_core::ft::membership::{ArbitrationError, JoinWait, Membership};
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::replay::Replay;
use ftvm_core::run::run_loop;
use ftvm_core::run::stop::StopSignal;
use logchannel::{image_hash, ChannelConfig, ChannelError, Hello, LogReceiver, Mismatch, Role};

use crate::args::seconds;
use crate::ft::{finish, joining_failed, stop_at, time_left, FtArgs};
use crate::stop::{stop_after, stop_on_signals};

/// How long a backup waits before it tries the primary's log channel again.
const RETRY: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Seconds to wait to be named backup and to reach the primary (then
    /// exit 1). The arbiter unanswered for 5 s ends the wait sooner (exit
    /// 5), and so do a signal and --timeout (exit 0, or 5 if the arbiter
    /// never answered).
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
    let id = ft.server_id("backup");
    let events = Events::open(&id, ft.events.as_deref()).context("cannot open the events file")?;
    let me = Member {
        id: id.clone(),
        service_addr: ft.service,
        log_addr: None,
    };
    let stop_at = stop_at(started, timeout);
    let join = JoinWait::new(&stop, stop_at, wait);
    let arbiter = Membership::connect(&ft.arbiter).map_err(|e| anyhow!(e))?;
    if let Err(e) = Membership::wait_for_primary(&*arbiter, &ft.vm_id, &join) {
        return joining_failed(e.into(), &events);
    }
    let membership =
        Membership::start(arbiter, &ft.vm_id, me, stop.clone()).map_err(|e| anyhow!(e))?;
    let joined = connect(ft, &membership, &join, image_hash(&image), config);
    membership.joined();
    let (receiver, view) = match joined {
        Ok(joined) => joined,
        Err(e) => {
            membership.stop();
            return joining_failed(e, &events);
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
    board.view.store(view.number, Ordering::Relaxed);
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
        console: ft.guest.console()?,
        capture: ft.guest.capture()?,
        stop: stop.clone(),
        events: events.clone(),
        board,
    };
    let mut backup = Backup::new(replay, go_live);
    if let Some(left) = time_left(stop_at) {
        stop_after(&stop, left);
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

/// Waits to be named backup, then connects to the primary's log channel.
/// Every wait ends at once on a stop request, and when another server
/// takes this one's place.
fn connect(
    ft: &FtArgs,
    membership: &Membership,
    join: &JoinWait,
    image_hash: [u8; 32],
    config: ChannelConfig,
) -> Result<(LogReceiver, View)> {
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
        let hello = Hello::new(
            Role::Backup,
            ft.vm_id.clone(),
            view.number,
            image_hash,
            ft.mem,
            ft.workload.name(),
            0,
        );
        let cancelled = || join.stopping() || membership.deposed();
        match LogReceiver::connect_cancellable(log_addr, hello, config, &cancelled) {
            Ok(receiver) => return Ok((receiver, view)),
            // The primary has not learned of this view yet: it will.
            Err(ChannelError::HelloRefused {
                mismatch: Mismatch::View { primary, backup },
                ..
            }) if primary < backup && join.left() > Duration::ZERO => {
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
            Err(e) if join.left() > Duration::ZERO => {
                tracing::debug!("connecting to the primary at {log_addr}: {e}");
                std::thread::sleep(RETRY);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot reach the primary's log channel at {log_addr}")
                });
            }
        }
    }
}
