//! `ftvm backup`: replays the primary's log as it arrives, and takes over
//! when the primary fails and the arbiter lets it.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use arbiter::Member;
use ftvm_core::ft::backup::{Backup, ChannelSource, GoLive};
use ftvm_core::ft::membership::Membership;
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::replay::Replay;
use ftvm_core::run::run_loop;
use ftvm_core::run::stop::StopSignal;
use logchannel::{image_hash, ChannelError, Hello, LogReceiver, Role};

use crate::args::seconds;
use crate::ft::{finish, FtArgs};
use crate::stop::{stop_after, stop_on_signals};

#[derive(clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Seconds to wait to be named backup and to reach the primary.
    #[arg(long, default_value_t = 60.0)]
    primary_wait: f64,
}

pub fn run(args: &BackupArgs) -> Result<ExitCode> {
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
    Membership::wait_for_primary(ft.arbiter, &ft.vm_id, wait).map_err(|e| anyhow!(e))?;
    let membership = Membership::start(ft.arbiter, &ft.vm_id, me).map_err(|e| anyhow!(e))?;
    let deadline = Instant::now() + wait;
    let (receiver, view) = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let view = membership
            .wait_for(remaining, |v| membership.is_me(v.backup.as_ref()))
            .with_context(|| {
                format!(
                    "the arbiter at {} did not name this server backup within {wait:?}",
                    ft.arbiter
                )
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
                return Err(e).with_context(|| format!("the primary's log channel at {log_addr}"));
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connecting to the primary at {log_addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot reach the primary's log channel at {log_addr}")
                });
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
        timeout,
        events: events.clone(),
        board,
    };
    let mut backup = Backup::new(replay, go_live);
    if let Some(t) = timeout {
        stop_after(&stop, t);
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
