//! `ftvm primary`: runs the guest live and serves at once, alone; brings up
//! each backup the arbiter names by state transfer, and from then on holds
//! each output until that backup has the log entries that lead to it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use arbiter::Member;
use ftvm_core::ft::membership::{JoinWait, Membership};
use ftvm_core::ft::pairing::Pairing;
use ftvm_core::ft::primary::{Primary, PrimaryParts};
use ftvm_core::ft::standing::Standing;
use ftvm_core::ft::transfer::send::JoinerParts;
use ftvm_core::host::emitter::Emitter;
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::host::net_backend::NetBackend;
use ftvm_core::run::run_loop;
use ftvm_core::run::stop::StopSignal;

use crate::args::seconds;
use crate::ft::{finish, joining_failed, stop_at, time_left, FtArgs};
use crate::stop::stop_on_signals;

/// How long a new primary waits for the arbiter to name it; an arbiter
/// that does not answer ends the wait after 5 s (exit 5).
const ROLE_WAIT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Do not run the guest until a backup has joined or this many seconds
    /// have passed (then it runs alone anyway). Without it the guest runs
    /// and serves at once, unprotected until a backup joins.
    #[arg(long)]
    backup_wait: Option<f64>,
}

pub fn run(args: &PrimaryArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let ft = &args.ft;
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = ft.guest.image()?;
    let timeout = seconds("--timeout", ft.timeout)?;
    let backup_wait = seconds("--backup-wait", args.backup_wait)?;
    let config = ft.channel_config()?;
    let mut vm = ft.boot(&image)?;
    let net = Arc::new(NetBackend::bind(ft.service)?);
    let (listener, log_addr) = ft.log_listener()?;
    let id = ft.server_id("primary");
    let events = Events::open(&id, ft.events.as_deref()).context("cannot open the events file")?;
    let me = Member {
        id: id.clone(),
        service_addr: net.local_addr(),
        log_addr: Some(log_addr),
    };
    let arbiter = Membership::connect(&ft.arbiter).map_err(|e| anyhow!(e))?;
    let membership =
        Membership::start(arbiter, &ft.vm_id, me, stop.clone()).map_err(|e| anyhow!(e))?;
    let stop_at = stop_at(started, timeout);
    let join = JoinWait::new(&stop, stop_at, ROLE_WAIT);
    let named = membership.wait_for(&join, "the arbiter names a primary", |v| {
        v.primary.is_some()
    });
    membership.joined();
    let view = match named {
        Ok(view) => view,
        Err(e) => {
            membership.stop();
            return joining_failed(e.into(), &events);
        }
    };
    if !membership.is_me(view.primary.as_ref()) {
        membership.stop();
        bail!(
            "view {} already has a primary ({}); start this server as a backup",
            view.number,
            view.primary.map(|p| p.id).unwrap_or_default()
        );
    }
    membership.acknowledge(view.number);
    events.emit(
        ServerEvent::Role {
            role: ServerRole::Primary,
            view: view.number,
            backup: None,
        },
        Some(format!(
            "primary of view {}, serving on {}; alone until a backup joins (log channel on {log_addr})",
            view.number,
            net.local_addr()
        )),
    );

    let board = Arc::new(StatusBoard::default());
    StatusBoard::report_periodically(board.clone(), events.clone());
    let emitter = Emitter {
        net: Some(net.clone()),
        console: ft.guest.console()?,
        capture: ft.guest.capture()?,
        served: board.served.clone(),
    };
    let parts = PrimaryParts {
        view: view.number,
        membership: membership.clone(),
        joiner: JoinerParts {
            listener,
            membership: membership.clone(),
            pairing: Pairing::alone(Arc::new(Standing::default())),
            hello: ft.join_hello(&image),
            config,
            mem: vm.mem.clone(),
            dirty: vm.dirty_log(),
            events: events.clone(),
            board,
            stop: stop.clone(),
        },
        net,
        emitter,
        digest_interval: ft.digest_interval,
        events: events.clone(),
        stop: stop.clone(),
        timeout: time_left(stop_at),
        backup_wait,
        clock_ns: 0,
        datagrams: Vec::new(),
    };
    let mut primary = Primary::start(parts).context("cannot start the primary")?;
    let result = run_loop::run(&mut vm, &mut primary, &stop, true);
    if let Some(line) = primary.report() {
        eprintln!("ftvm {id}: {line}");
    }
    membership.stop();
    finish(result, &events)
}
