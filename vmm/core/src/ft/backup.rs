//! The backup of a fault-tolerant pair: it replays the primary's log as it
//! arrives, never running past what the log covers, drops its outputs after
//! checking them, and when the primary falls silent it claims the view at
//! the arbiter and, on winning, goes live at exactly the point the log
//! reached. A primary that says goodbye stopped on purpose: the backup
//! stops too, without a claim, and a backup that stops on purpose says
//! goodbye itself.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use logchannel::{ChannelConfig, ChannelError, Entry, Event, LogReceiver, OutputKind, Position};

use crate::ft::goodbye_reason;
use crate::ft::membership::{ArbitrationError, Membership};
use crate::ft::pairing::Pairing;
use crate::ft::planted::{planted, PlantedBug};
use crate::ft::primary::{Primary, PrimaryParts};
use crate::ft::standing::Standing;
use crate::ft::transfer::send::{JoinHello, JoinerParts};
use crate::host::capture::Capture;
use crate::host::emitter::Emitter;
use crate::host::events::{Events, ServerEvent, ServerRole, StatusBoard, ROLE_PRIMARY};
use crate::host::net_backend::{Datagram, NetBackend};
use crate::machine::memory::GuestMemory;
use crate::machine::patch::TrapResult;
use crate::machine::scan::NondetSite;
use crate::replay::{LogSource, Replay};
use crate::run::dirty::DirtyLog;
use crate::run::precise::Aim;
use crate::run::run_loop::{Machine, Mode, RunError, StopReason};
use crate::run::stop::StopSignal;

/// How long one wait for the primary's log lasts before the source looks
/// again at what it knows.
const RECV_SLICE: Duration = Duration::from_millis(20);

/// Why a backup stops that is not the run loop's business.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The primary said goodbye: it stopped on purpose, so there is
    /// nothing to take over.
    #[error("the primary stopped on purpose ({reason}); so does this backup")]
    PrimaryLeft { reason: String },
}

impl BackupError {
    /// The backup's own reason inside a run's error, if that is what
    /// stopped it.
    pub fn of(e: &RunError) -> Option<&BackupError> {
        match e {
            RunError::Mode(inner) => inner.downcast_ref(),
            _ => None,
        }
    }
}

/// What a channel error means for the replay: the end of a primary that
/// left on purpose, or a failure to fail over from.
fn stopped_by(e: ChannelError) -> RunError {
    match e {
        ChannelError::PeerLeft { reason, .. } => {
            RunError::Mode(Box::new(BackupError::PrimaryLeft { reason }))
        }
        other => RunError::PeerFailed(other.to_string()),
    }
}

/// The primary's log as it arrives over the channel.
pub struct ChannelSource {
    receiver: Arc<LogReceiver>,
    next: Option<Entry>,
    board: Arc<StatusBoard>,
    events: Arc<Events>,
    /// The primary's failure, once noticed. The backup then still replays
    /// what it received before it claims the view.
    failure_noticed: bool,
    /// The datagrams the primary held undelivered at the cut, less those
    /// the log has since delivered: what this server delivers if it goes
    /// live.
    undelivered: Vec<Datagram>,
}

impl ChannelSource {
    pub fn new(
        receiver: Arc<LogReceiver>,
        board: Arc<StatusBoard>,
        events: Arc<Events>,
        undelivered: Vec<Datagram>,
    ) -> Self {
        ChannelSource {
            receiver,
            next: None,
            board,
            events,
            failure_noticed: false,
            undelivered,
        }
    }

    /// Caught up with the log: report how far replay got (the primary may
    /// be holding its guest for that), then wait for an entry or for the
    /// log to be known complete up to `exits`.
    fn wait_for_log(&self, exits: u64) -> Result<Option<Entry>, logchannel::ChannelError> {
        self.receiver.flush_report()?;
        self.receiver.recv_or_complete(exits, RECV_SLICE)
    }

    /// Reports the primary's failure (or its goodbye) when the channel
    /// first knows of it, not when replay has drained the backlog.
    fn notice_failure(&mut self) {
        if self.failure_noticed {
            return;
        }
        let Some(failure) = self.receiver.failure() else {
            return;
        };
        self.failure_noticed = true;
        match failure {
            ChannelError::PeerLeft { reason, .. } => {
                let say = format!(
                    "the primary stopped on purpose ({reason}); replaying what it sent, then stopping"
                );
                self.events.emit(
                    ServerEvent::PeerLeft {
                        peer: ServerRole::Primary,
                        reason,
                    },
                    Some(say),
                );
            }
            failure => self.events.emit(
                ServerEvent::FailureDetected {
                    peer: ServerRole::Primary,
                    detail: failure.to_string(),
                },
                Some(format!(
                    "the primary is silent ({failure}); replaying what it sent"
                )),
            ),
        }
    }

    /// Tells the primary this backup stops on purpose, so that it does not
    /// take the close for a failure.
    fn goodbye(&self, reason: StopReason) {
        if let Err(e) = self.receiver.goodbye(&goodbye_reason(reason)) {
            tracing::debug!("no goodbye to the primary: {e}");
        }
    }
}

impl LogSource for ChannelSource {
    fn peek(&mut self, exits: u64) -> Result<Option<&Entry>, RunError> {
        self.notice_failure();
        while self.next.is_none() {
            // Read before polling: every entry at an exit up to `complete`
            // was already receivable when it was read.
            let complete = self.receiver.complete_up_to();
            match self.receiver.recv(Duration::ZERO) {
                Ok(Some(e)) => self.next = Some(e),
                Ok(None) if complete >= exits => return Ok(None),
                Ok(None) => match self.wait_for_log(exits) {
                    Ok(Some(e)) => self.next = Some(e),
                    Ok(None) => {}
                    Err(e) => {
                        self.notice_failure();
                        return Err(stopped_by(e));
                    }
                },
                Err(e) => {
                    self.notice_failure();
                    return Err(stopped_by(e));
                }
            }
        }
        Ok(self.next.as_ref())
    }

    fn take(&mut self) -> Option<Entry> {
        let entry = self.next.take();
        if let Some(Entry {
            event: Event::Packet { frame, .. },
            ..
        }) = &entry
        {
            if let Some(i) = self
                .undelivered
                .iter()
                .position(|d| d.to_frame().is_ok_and(|f| f == *frame))
            {
                self.undelivered.remove(i);
            }
        }
        entry
    }

    fn finite(&self) -> bool {
        false
    }

    fn applied(&mut self, seq: u64, exits: u64) {
        self.receiver.report_replayed(seq, exits);
        self.board.exits.store(exits, Ordering::Relaxed);
        let m = self.receiver.metrics();
        self.board
            .log_entries
            .store(m.entries_received, Ordering::Relaxed);
        self.board
            .log_bytes
            .store(m.bytes_received, Ordering::Relaxed);
        self.board
            .lag_exits
            .store(m.complete_up_to.saturating_sub(exits), Ordering::Relaxed);
    }
}

/// What the backup needs to go live, and then to bring up backups of its
/// own.
pub struct GoLive {
    pub membership: Arc<Membership>,
    pub view: u64,
    pub service: SocketAddr,
    pub console: Box<dyn Write + Send>,
    pub capture: Option<Capture>,
    /// Also ends the live run: the server's time limit counts from its
    /// start, so it is a stop request, not a deadline of the live part.
    pub stop: StopSignal,
    pub events: Arc<Events>,
    pub board: Arc<StatusBoard>,
    /// The log channel listener it serves as a primary.
    pub listener: TcpListener,
    pub hello: JoinHello,
    pub config: ChannelConfig,
    pub mem: GuestMemory,
    pub dirty: Arc<DirtyLog>,
    pub digest_interval: u64,
    /// The device clock at the cut this backup started from: the live run
    /// continues it.
    pub clock_ns: u64,
}

pub struct Backup {
    replay: Replay<ChannelSource>,
    live: Option<Primary>,
    go_live: Option<GoLive>,
}

impl Backup {
    pub fn new(replay: Replay<ChannelSource>, go_live: GoLive) -> Self {
        Backup {
            replay,
            live: None,
            go_live: Some(go_live),
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    pub fn replay_counts(&self) -> &crate::replay::ReplayCounts {
        &self.replay.counts
    }

    /// The primary is gone and everything it sent has been replayed: claim
    /// its view and, on winning, become the primary from this very point.
    fn fail_over(&mut self, why: &str) -> Result<(), RunError> {
        let Some(g) = self.go_live.take() else {
            return Ok(());
        };
        g.events.emit(
            ServerEvent::CaughtUp {
                view: g.view,
                detail: why.to_string(),
            },
            Some(format!(
                "replayed everything the primary sent; claiming view {}",
                g.view
            )),
        );
        let won = match g.membership.claim(g.view, Some(g.service)) {
            Ok(won) => won,
            Err(_) if planted(PlantedBug::LiveWithoutTas) => g.membership.view(),
            Err(e) => {
                let event = match &e {
                    ArbitrationError::Unreachable { .. } => {
                        ServerEvent::ArbiterUnreachable { view: g.view }
                    }
                    _ => ServerEvent::Lost { view: g.view },
                };
                g.events.emit(event, Some(e.to_string()));
                return Err(e.into());
            }
        };
        g.events.emit(
            ServerEvent::Tas {
                view: g.view,
                won: true,
            },
            Some(format!("won test-and-set for view {}", g.view)),
        );
        let net = Arc::new(
            NetBackend::bind(g.service)
                .map_err(|e| RunError::PeerFailed(format!("cannot serve after failover: {e}")))?,
        );
        let emitter = Emitter {
            net: Some(net.clone()),
            console: g.console,
            capture: g.capture,
            served: g.board.served.clone(),
        };
        let parts = PrimaryParts {
            view: won.number,
            membership: Arc::clone(&g.membership),
            joiner: JoinerParts {
                listener: g.listener,
                membership: Arc::clone(&g.membership),
                pairing: Pairing::alone(Arc::new(Standing::default())),
                hello: g.hello,
                config: g.config,
                mem: g.mem,
                dirty: g.dirty,
                events: Arc::clone(&g.events),
                board: Arc::clone(&g.board),
                stop: g.stop.clone(),
            },
            net,
            emitter,
            digest_interval: g.digest_interval,
            events: Arc::clone(&g.events),
            stop: g.stop,
            timeout: None,
            backup_wait: None,
            clock_ns: g.clock_ns,
            datagrams: std::mem::take(&mut self.replay.source.undelivered),
        };
        self.live = Some(Primary::start(parts).map_err(RunError::Thread)?);
        g.board.view.store(won.number, Ordering::Relaxed);
        g.board.role.store(ROLE_PRIMARY, Ordering::Relaxed);
        g.events.emit(
            ServerEvent::Live { view: won.number },
            Some(format!(
                "live as the primary of view {} on {}",
                won.number, g.service
            )),
        );
        Ok(())
    }
}

/// Runs `$call` on the replay; if the primary's log ran dry because it
/// failed, fails over and runs `$live_call` on the live side instead.
macro_rules! replay_or_live {
    ($self:ident, $live:ident => $live_call:expr, $call:expr) => {{
        if let Some($live) = $self.live.as_mut() {
            return $live_call;
        }
        match $call {
            Err(RunError::PeerFailed(why)) => {
                $self.fail_over(&why)?;
                match $self.live.as_mut() {
                    Some($live) => $live_call,
                    None => Err(RunError::PeerFailed(why)),
                }
            }
            other => other,
        }
    }};
}

impl Mode for Backup {
    fn now_ns(&self) -> u64 {
        match &self.live {
            Some(l) => l.now_ns(),
            None => self.replay.now_ns(),
        }
    }

    fn should_stop(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        // A backup that another server replaced stops at once: it must not
        // claim, nor be taken for a spare.
        if let Some(g) = &self.go_live {
            if g.membership.deposed() {
                let view = g.view;
                let detail = format!(
                    "view {} no longer names this server",
                    g.membership.view_number()
                );
                g.events.emit(
                    ServerEvent::Deposed {
                        view,
                        detail: detail.clone(),
                    },
                    None,
                );
                return Err(ArbitrationError::Deposed { view, detail }.into());
            }
        }
        replay_or_live!(self, live => live.should_stop(m, pos), self.replay.should_stop(m, pos))
    }

    fn trap(&mut self, pos: Position, site: &NondetSite) -> Result<TrapResult, RunError> {
        replay_or_live!(self, live => live.trap(pos, site), self.replay.trap(pos, site))
    }

    fn time_msr(&mut self, pos: Position, msr: u32) -> Result<u64, RunError> {
        replay_or_live!(self, live => live.time_msr(pos, msr), self.replay.time_msr(pos, msr))
    }

    fn time_read(&mut self, pos: Position, port: u16, value: u8) -> Result<u8, RunError> {
        replay_or_live!(self, live => live.time_read(pos, port, value), self.replay.time_read(pos, port, value))
    }

    fn output(
        &mut self,
        m: &mut Machine,
        pos: Position,
        kind: OutputKind,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        replay_or_live!(self, live => live.output(m, pos, kind, bytes), self.replay.output(m, pos, kind, bytes))
    }

    fn after_exit(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        replay_or_live!(self, live => live.after_exit(m, pos), self.replay.after_exit(m, pos))
    }

    fn deliver(&mut self, m: &mut Machine, pos: Position, ready: bool) -> Result<bool, RunError> {
        replay_or_live!(self, live => live.deliver(m, pos, ready), self.replay.deliver(m, pos, ready))
    }

    fn resume(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        replay_or_live!(self, live => live.resume(m, pos), self.replay.resume(m, pos))
    }

    fn wait_idle(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        replay_or_live!(self, live => live.wait_idle(m, pos), self.replay.wait_idle(m, pos))
    }

    fn kick_at(&mut self, m: &mut Machine) -> Option<Instant> {
        self.live.as_mut().and_then(|live| live.kick_at(m))
    }

    fn due_between(&mut self, m: &mut Machine) -> bool {
        self.live.as_mut().is_some_and(|live| live.due_between(m))
    }

    fn deliver_between(&mut self, m: &mut Machine, at: Position) -> Result<bool, RunError> {
        match self.live.as_mut() {
            Some(live) => live.deliver_between(m, at),
            None => Ok(false),
        }
    }

    fn aim(&mut self, m: &mut Machine, pos: Position) -> Result<Option<(u64, u64)>, RunError> {
        replay_or_live!(self, live => live.aim(m, pos), self.replay.aim(m, pos))
    }

    fn at_aim(&mut self, m: &mut Machine, at: Position, aim: &mut Aim) -> Result<bool, RunError> {
        replay_or_live!(self, live => live.at_aim(m, at, aim), self.replay.at_aim(m, at, aim))
    }

    fn should_stop_between(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        replay_or_live!(self, live => live.should_stop_between(m, pos), self.replay.should_stop_between(m, pos))
    }

    fn finish(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: StopReason,
        at_position: bool,
    ) -> Result<(), RunError> {
        match self.live.as_mut() {
            Some(live) => live.finish(m, pos, reason, at_position),
            None => {
                let finished = self.replay.finish(m, pos, reason, at_position);
                self.replay.source.goodbye(reason);
                finished
            }
        }
    }
}
