//! `ftvm primary`: runs the guest live, and holds each output until the
//! backup has the log entries that lead to it.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use arbiter::Member;
use ftvm_core::ft::membership::Membership;
use ftvm_core::ft::output_gate::OutputGate;
use ftvm_core::ft::primary::FtSink;
use ftvm_core::host::emitter::Emitter;
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::host::net_backend::NetBackend;
use ftvm_core::live::Live;
use ftvm_core::run::run_loop;
use ftvm_core::run::stop::StopSignal;
use logchannel::{image_hash, ChannelError, Hello, LogSender, Role};

use crate::args::seconds;
use crate::ft::{finish, FtArgs};
use crate::stop::stop_on_signals;

#[derive(clap::Args)]
pub struct PrimaryArgs {
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

pub fn run(args: &PrimaryArgs) -> Result<ExitCode> {
    let ft = &args.ft;
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    let image = ft.guest.image()?;
    let timeout = seconds("--timeout", ft.timeout)?;
    let wait = seconds("--backup-wait", Some(args.backup_wait))?.unwrap_or_default();
    let config = ft.channel_config()?;
    let mut vm = ft.boot(&image)?;
    let net = Arc::new(NetBackend::bind(ft.service)?);
    let listener = TcpListener::bind(args.log_listen)
        .with_context(|| format!("cannot listen for the backup on {}", args.log_listen))?;
    let log_addr = match args.log_advertise {
        Some(a) => a,
        None => listener.local_addr()?,
    };
    let id = ft.server_id("primary");
    let events = Events::open(&id, ft.events.as_deref()).context("cannot open the events file")?;
    let me = Member {
        id: id.clone(),
        service_addr: net.local_addr(),
        log_addr: Some(log_addr),
    };
    let membership = Membership::start(ft.arbiter, &ft.vm_id, me).map_err(|e| anyhow!(e))?;
    let view = membership
        .wait_for(wait, |v| v.primary.is_some())
        .with_context(|| {
            format!(
                "the arbiter at {} named no primary within {wait:?}",
                ft.arbiter
            )
        })?;
    if !membership.is_me(view.primary.as_ref()) {
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
        Some(format!("primary of view {}", view.number)),
    );

    eprintln!("ftvm {id}: waiting for a backup (log channel on {log_addr})");
    let deadline = Instant::now() + wait;
    let (sender, view) = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(view) = membership.wait_for(remaining, |v| {
            membership.is_me(v.primary.as_ref()) && v.backup.is_some()
        }) else {
            bail!("no backup joined within {wait:?}");
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
            Err(e) => return Err(e).context("the backup's log channel"),
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
        console: ft.guest.console()?,
        capture: ft.guest.capture()?,
        served: board.served.clone(),
    };
    let gate = OutputGate::new(
        emitter,
        sender.clone(),
        alone.clone(),
        board.output_hold.clone(),
    )
    .context("cannot start the output gate")?;
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
