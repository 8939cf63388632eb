//! `ftvm primary`: runs the guest live, and holds each output until the
//! backup has the log entries that lead to it.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use arbiter::{Member, View};
use ftvm_core::ft::membership::{ArbitrationError, JoinWait, Membership};
use ftvm_core::ft::output_gate::OutputGate;
use ftvm_core::ft::primary::FtSink;
use ftvm_core::ft::standing::Standing;
use ftvm_core::host::emitter::Emitter;
use ftvm_core::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use ftvm_core::host::net_backend::NetBackend;
use ftvm_core::live::Live;
use ftvm_core::run::run_loop;
use ftvm_core::run::stop::StopSignal;
use logchannel::{image_hash, ChannelConfig, ChannelError, Hello, LogSender, Role};

use crate::args::seconds;
use crate::ft::{finish, joining_failed, stop_at, time_left, FtArgs};
use crate::stop::stop_on_signals;

#[derive(clap::Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Where the log channel listens for the backup. Only a connection
    /// whose handshake names this VM, the current view, the same guest
    /// image and memory size is taken; any other is turned away and the
    /// wait goes on.
    #[arg(long)]
    log_listen: SocketAddr,
    /// The log channel address the arbiter gives backups, when they must
    /// reach it through something (a proxy, a NAT) rather than directly.
    #[arg(long)]
    log_advertise: Option<SocketAddr>,
    /// Seconds to wait for a backup before giving up (exit 1). The arbiter
    /// unanswered for 5 s ends the wait sooner (exit 5), and so do a signal
    /// and --timeout (exit 0, or 5 if the arbiter never answered).
    #[arg(long, default_value_t = 60.0)]
    backup_wait: f64,
}

pub fn run(args: &PrimaryArgs) -> Result<ExitCode> {
    let started = Instant::now();
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
    let arbiter = Membership::connect(&ft.arbiter).map_err(|e| anyhow!(e))?;
    let membership =
        Membership::start(arbiter, &ft.vm_id, me, stop.clone()).map_err(|e| anyhow!(e))?;
    let stop_at = stop_at(started, timeout);
    let join = JoinWait::new(&stop, stop_at, wait);
    let pair = Pair {
        ft,
        membership: &membership,
        join: &join,
        listener: &listener,
        image_hash: image_hash(&image),
        config,
        events: &events,
    };
    let joined = pair.join(&id, log_addr);
    membership.joined();
    let (sender, view) = match joined {
        Ok(joined) => joined,
        Err(e) => {
            membership.stop();
            return joining_failed(e, &events);
        }
    };
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
    let standing = Arc::new(Standing::default());
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
        standing.clone(),
        board.output_hold.clone(),
    )
    .context("cannot start the output gate")?;
    let sink = FtSink::new(
        sender,
        membership.clone(),
        standing,
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
        time_left(stop_at),
    );
    let result = run_loop::run(&mut vm, &mut live, &stop, true);
    if let Some(line) = live.sink_mut().and_then(|s| s.report()) {
        eprintln!("ftvm {id}: {line}");
    }
    membership.stop();
    finish(result, &events)
}

/// What joining as the primary takes.
struct Pair<'a> {
    ft: &'a FtArgs,
    membership: &'a Membership,
    join: &'a JoinWait<'a>,
    listener: &'a TcpListener,
    image_hash: [u8; 32],
    config: ChannelConfig,
    events: &'a Events,
}

impl Pair<'_> {
    /// Becomes primary of view 1, then waits for the backup the arbiter
    /// names and takes its connection. The view may move on meanwhile (the
    /// arbiter replaces a backup that never came up): the wait follows it.
    /// Every wait ends at once on a stop request.
    fn join(&self, id: &str, log_addr: SocketAddr) -> Result<(LogSender, View)> {
        let m = self.membership;
        let view = m.wait_for(self.join, "the arbiter names a primary", |v| {
            v.primary.is_some()
        })?;
        if !m.is_me(view.primary.as_ref()) {
            bail!(
                "view {} already has a primary ({}); start this server as a backup",
                view.number,
                view.primary.map(|p| p.id).unwrap_or_default()
            );
        }
        m.acknowledge(view.number);
        self.events.emit(
            ServerEvent::Role {
                role: ServerRole::Primary,
                view: view.number,
                backup: None,
            },
            Some(format!("primary of view {}", view.number)),
        );
        eprintln!("ftvm {id}: waiting for a backup (log channel on {log_addr})");
        loop {
            let view = m.wait_for(self.join, "which server is backup", |v| v.backup.is_some())?;
            // Seen, not vouched for: the backup holds nothing yet, and the
            // arbiter may replace it if it never comes up.
            m.see(view.number);
            let hello = Hello::new(
                Role::Primary,
                self.ft.vm_id.clone(),
                view.number,
                self.image_hash,
                self.ft.mem,
                self.ft.workload.name(),
                1,
            );
            let cancelled =
                || self.join.stopping() || m.deposed() || m.view_number() != view.number;
            let accepted = LogSender::accept_within(
                self.listener,
                hello,
                self.config,
                self.join.left(),
                &cancelled,
            );
            match accepted {
                Ok(sender) => {
                    m.acknowledge(view.number);
                    return Ok((sender, view));
                }
                Err(ChannelError::Cancelled { .. }) if self.join.stopping() => {
                    return Err(ArbitrationError::StoppedJoining {
                        what: "waiting for a backup".to_string(),
                        arbiter_answered: true,
                    }
                    .into());
                }
                // A new view, or this server deposed: the next wait says.
                Err(ChannelError::Cancelled { .. }) => {}
                Err(ChannelError::AcceptTimeout {
                    local,
                    refused,
                    last_refusal,
                    ..
                }) => {
                    let turned_away = match last_refusal {
                        Some(why) if refused > 0 => format!(
                            " (turned away {refused} other connection(s), the last because {why})"
                        ),
                        _ => String::new(),
                    };
                    return Err(ArbitrationError::NotJoined {
                        what: format!("a backup connects to {local}{turned_away}"),
                        waited: self.join.wait(),
                    }
                    .into());
                }
                Err(e) => return Err(e).context("the backup's log channel"),
            }
        }
    }
}
