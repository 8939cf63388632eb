//! The primary of a fault-tolerant pair: a live run that serves alone until
//! a backup joins by state transfer, then sends its log over the log
//! channel to that backup and holds its outputs for the backup's
//! acknowledgement, and goes on alone again only after winning
//! test-and-set when the backup fails or leaves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use logchannel::{ChannelError, Event, Position};

use crate::ft::goodbye_reason;
use crate::ft::membership::{ArbitrationError, Membership};
use crate::ft::output_gate::OutputGate;
use crate::ft::pairing::{Paired, Pairing};
use crate::ft::transfer::send::{Donor, JoinerParts};
use crate::host::emitter::Emitter;
use crate::host::events::{Events, ServerEvent, ServerRole, StatusBoard, ROLE_PRIMARY};
use crate::host::net_backend::{Datagram, NetBackend};
use crate::live::{EntrySink, Live};
use crate::run::forward::forward_mode;
use crate::run::run_loop::{Machine, Mode, RunError, StopReason};
use crate::run::stop::StopSignal;

/// How long `end` waits for the backup to acknowledge the End entry.
const END_ACK_WAIT: Duration = Duration::from_secs(2);
/// How long the primary waits at once for room in a full window before it
/// looks again at whether the backup has failed or stalled.
const WINDOW_WAIT: Duration = Duration::from_millis(50);

pub struct FtSink {
    /// Shared with the output gate and the transfer that brings up
    /// backups: whether a backup holds the state, and its standing.
    pairing: Arc<Pairing>,
    /// The pairing as of `seen`, read again only when it changes.
    paired: Option<Paired>,
    seen: u64,
    membership: Arc<Membership>,
    /// The view this server is primary of.
    view: u64,
    digest_interval: u64,
    board: Arc<StatusBoard>,
    events: Arc<Events>,
}

impl FtSink {
    pub fn new(
        pairing: Arc<Pairing>,
        membership: Arc<Membership>,
        view: u64,
        digest_interval: u64,
        board: Arc<StatusBoard>,
        events: Arc<Events>,
    ) -> Self {
        board.role.store(ROLE_PRIMARY, Ordering::Relaxed);
        board.view.store(view, Ordering::Relaxed);
        FtSink {
            paired: pairing.current(),
            seen: pairing.generation(),
            pairing,
            membership,
            view,
            digest_interval,
            board,
            events,
        }
    }

    fn alone(&self) -> bool {
        self.paired.is_none()
    }

    /// Takes in a backup that joined (or the end of one) since the last
    /// look.
    fn refresh(&mut self) {
        let generation = self.pairing.generation();
        if generation == self.seen {
            return;
        }
        self.seen = generation;
        self.paired = self.pairing.current();
        if let Some(p) = &self.paired {
            self.view = p.view;
            self.board.view.store(p.view, Ordering::Relaxed);
        }
    }

    /// The channel to the backup is down: it failed, or the backup said
    /// goodbye. Either way the primary goes on alone only if it wins
    /// test-and-set; a goodbye is not reported as a failure.
    fn channel_down(&mut self, err: ChannelError) -> Result<(), RunError> {
        match err {
            ChannelError::PeerLeft { reason, .. } => {
                let say = format!(
                    "the backup stopped on purpose ({reason}); claiming view {} to go on alone",
                    self.view
                );
                self.events.emit(
                    ServerEvent::PeerLeft {
                        peer: ServerRole::Backup,
                        reason,
                    },
                    Some(say),
                );
                self.go_on_alone()
            }
            other => self.backup_failed(other.to_string()),
        }
    }

    fn backup_failed(&mut self, why: String) -> Result<(), RunError> {
        self.events.emit(
            ServerEvent::FailureDetected {
                peer: ServerRole::Backup,
                detail: why.clone(),
            },
            Some(format!(
                "the backup has failed ({why}); claiming view {}",
                self.view
            )),
        );
        self.go_on_alone()
    }

    /// Claims the view. Winning means going on alone; losing or not
    /// reaching the arbiter stops this primary.
    fn go_on_alone(&mut self) -> Result<(), RunError> {
        match self.membership.claim(self.view, None) {
            Ok(won) => {
                self.events.emit(
                    ServerEvent::Tas {
                        view: self.view,
                        won: true,
                    },
                    Some(format!(
                        "won test-and-set; primary of view {} alone",
                        won.number
                    )),
                );
                self.view = won.number;
                self.board.view.store(won.number, Ordering::Relaxed);
                // A backup still connected (one whose replay stalled) must
                // learn that this primary goes on without it: detaching
                // closes its channel.
                self.pairing.detach();
                self.paired = None;
                self.seen = self.pairing.generation();
                Ok(())
            }
            Err(e) => {
                let event = match &e {
                    ArbitrationError::Unreachable { .. } => {
                        ServerEvent::ArbiterUnreachable { view: self.view }
                    }
                    _ => ServerEvent::Lost { view: self.view },
                };
                self.events.emit(event, Some(e.to_string()));
                Err(e.into())
            }
        }
    }

    /// A primary that has not written to its backup for half the failure
    /// timeout may have been paused long enough for the backup to take
    /// over: it asks the arbiter before the gate releases anything more.
    /// One the arbiter's answers show replaced stops here too.
    fn check_standing(&mut self) -> Result<(), RunError> {
        let Some(p) = &self.paired else {
            return Ok(());
        };
        let write_gaps = p.sender.write_gaps();
        let standing = self.pairing.standing();
        let result = if self.membership.deposed() {
            Err(ArbitrationError::Deposed {
                view: self.view,
                detail: format!(
                    "view {} names another primary",
                    self.membership.view_number()
                ),
            })
        } else if standing.unconfirmed(write_gaps) {
            self.membership.confirm_primary(self.view)
        } else {
            return Ok(());
        };
        match result {
            Ok(view) => {
                standing.confirm(write_gaps);
                self.events.emit(
                    ServerEvent::Confirmed { view: view.number },
                    Some(format!(
                        "did not write to the backup for over half the failure timeout; \
                         the arbiter still names this server primary (view {})",
                        view.number
                    )),
                );
                Ok(())
            }
            Err(e) => {
                let event = match &e {
                    ArbitrationError::Deposed { detail, .. } => {
                        standing.depose();
                        ServerEvent::Deposed {
                            view: self.view,
                            detail: detail.clone(),
                        }
                    }
                    _ => ServerEvent::ArbiterUnreachable { view: self.view },
                };
                self.events.emit(event, Some(e.to_string()));
                Err(e.into())
            }
        }
    }

    /// Whether the arbiter has moved past the view of this primary's backup
    /// while still naming this server primary: it took the backup for dead
    /// (it had stopped pinging) and the backup is nobody's any more. Views
    /// move on past an acknowledged pair only that way.
    fn backup_replaced(&self) -> bool {
        self.paired.is_some()
            && self.membership.view_number() > self.view
            && self
                .membership
                .is_me(self.membership.view().primary.as_ref())
    }

    fn check_backup(&mut self) -> Result<(), RunError> {
        self.check_standing()?;
        if self.backup_replaced() {
            let view = self.membership.view_number();
            self.events.emit(
                ServerEvent::PeerLeft {
                    peer: ServerRole::Backup,
                    reason: format!("the arbiter named another backup in view {view}"),
                },
                Some(format!(
                    "view {view} names this server primary with another backup; going on without the backup of view {}",
                    self.view
                )),
            );
            self.view = view;
            self.board.view.store(view, Ordering::Relaxed);
            self.pairing.detach();
            self.paired = None;
            self.seen = self.pairing.generation();
            return Ok(());
        }
        match self.paired.as_ref().and_then(|p| p.sender.failure()) {
            Some(e) => self.channel_down(e),
            None => Ok(()),
        }
    }
}

impl EntrySink for FtSink {
    fn log(&mut self, pos: Position, event: Event) -> Result<u64, RunError> {
        let Some(p) = &self.paired else {
            return Ok(0);
        };
        match p.sender.send(pos, event) {
            Ok(seq) => {
                self.pairing.sent(seq);
                Ok(seq)
            }
            Err(e) => {
                // As at every exit: a primary that was paused may have been
                // replaced meanwhile, which it must learn before it takes
                // its backup's silence for a failure.
                self.check_standing()?;
                self.channel_down(e)?;
                Ok(0)
            }
        }
    }

    fn digest_due(&self, pos: Position) -> bool {
        !self.alone() && crate::run::digest::periodic_due(self.digest_interval, pos.exits)
    }

    fn resume(&mut self, pos: Position) -> Result<(), RunError> {
        self.board.exits.store(pos.exits, Ordering::Relaxed);
        self.refresh();
        self.check_backup()?;
        let Some(p) = self.paired.clone() else {
            return Ok(());
        };
        let sender = p.sender;
        // Everything at exits before this one is logged; at this one the
        // guest may still be given an interrupt between this exit and the
        // next (an `async-point` entry at this exit count), so the backup
        // must not run past it on the strength of this mark.
        sender.set_progress(pos.exits.saturating_sub(1));
        // The lag as this exit finds it, before any wait below shortens it.
        let m = sender.metrics();
        let lag_us = (m.lag_ms * 1000.0) as u64;
        self.board.lag_exits.store(m.lag_exits, Ordering::Relaxed);
        self.board.lag_us.store(lag_us, Ordering::Relaxed);
        self.board.lag.record(lag_us);
        self.board
            .log_entries
            .store(m.entries_sent, Ordering::Relaxed);
        self.board.log_bytes.store(m.bytes_sent, Ordering::Relaxed);
        // Flow control: a backup that lags (too much in flight, or replay
        // too far behind) holds the primary at this exit, for as long as it
        // takes on a slow link. The backup is judged by its replay, not by
        // how long one exit waited: one whose replay has stood still for
        // the failure timeout while it had entries to replay has failed as
        // surely as a silent one, even if its connection still answers.
        let limit = sender.config().failure_timeout;
        while sender.window_full() {
            if let Some(stall) = sender.replay_stall().filter(|s| *s > limit) {
                return self.backup_failed(format!(
                    "its replay has stood still for {} ms with entries to replay, while its connection answers",
                    stall.as_millis()
                ));
            }
            if let Err(e) = sender.wait_window(WINDOW_WAIT) {
                return self.channel_down(e);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RunError> {
        self.check_backup()
    }

    /// The run ends on purpose (a stop request, the time limit, the guest
    /// powering off): the End entry, then a goodbye, so that the backup
    /// stops too instead of taking over.
    fn end(&mut self, pos: Position, reason: StopReason) -> Result<(), RunError> {
        self.refresh();
        let Some(Paired { sender, .. }) = self.paired.clone() else {
            return Ok(());
        };
        if self.pairing.standing().deposed() {
            return Ok(());
        }
        let end = Event::End {
            exits: pos.exits,
            reason: reason.end_reason(),
        };
        if let Ok(seq) = sender.send(pos, end) {
            let _ = sender.wait_acked(seq, END_ACK_WAIT);
        }
        if let Err(e) = sender.goodbye(&goodbye_reason(reason)) {
            tracing::debug!("no goodbye to the backup: {e}");
        }
        Ok(())
    }

    fn report(&self) -> Option<String> {
        let m = self.pairing.current()?.sender.metrics();
        Some(format!(
            "log channel: {} entries, {} bytes sent, {} acknowledged",
            m.entries_sent, m.bytes_sent, m.acked
        ))
    }
}

/// What a primary is made of: at boot (`ftvm primary`) or when a backup
/// goes live.
pub struct PrimaryParts {
    pub view: u64,
    pub membership: Arc<Membership>,
    pub joiner: JoinerParts,
    pub net: Arc<NetBackend>,
    pub emitter: Emitter,
    pub digest_interval: u64,
    pub events: Arc<Events>,
    pub stop: StopSignal,
    pub timeout: Option<Duration>,
    /// With it, the guest waits this long for its first backup before it
    /// runs.
    pub backup_wait: Option<Duration>,
    /// The device clock and the undelivered datagrams to start from (a
    /// backup going live continues its primary's).
    pub clock_ns: u64,
    pub datagrams: Vec<Datagram>,
}

/// A live run that serves alone until a backup joins, brings up each
/// backup the arbiter names by state transfer, and then holds its outputs
/// for that backup under the output rule.
pub struct Primary {
    live: Live,
    donor: Donor,
}

impl Primary {
    pub fn start(parts: PrimaryParts) -> std::io::Result<Primary> {
        let PrimaryParts {
            view,
            membership,
            joiner,
            net,
            emitter,
            digest_interval,
            events,
            stop,
            timeout,
            backup_wait,
            clock_ns,
            datagrams,
        } = parts;
        let board = Arc::clone(&joiner.board);
        let pairing = Arc::clone(&joiner.pairing);
        let gate = OutputGate::new(emitter, Arc::clone(&pairing), board.output_hold.clone())?;
        let sink = FtSink::new(
            pairing,
            membership,
            view,
            digest_interval,
            Arc::clone(&board),
            events,
        );
        let donor = Donor::start(joiner, backup_wait, timeout)?;
        let live = Live::new(
            Some(net),
            Box::new(gate),
            Some(Box::new(sink)),
            stop,
            timeout,
        )
        .with_board(board)
        .with_clock(clock_ns)
        .with_datagrams(datagrams);
        Ok(Primary { live, donor })
    }

    /// A line for the user about what was logged.
    pub fn report(&mut self) -> Option<String> {
        self.live.sink_mut().and_then(|s| s.report())
    }
}

impl Mode for Primary {
    forward_mode!(live: now_ns, should_stop, trap, time_msr, time_read, output, after_exit,
        deliver, wait_idle, kick_at, due_between, deliver_between);

    /// The cut happens here, where everything for exit `pos` is done and
    /// nothing more is logged at it: a backup that starts from this
    /// position replays exactly what follows.
    fn resume(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        self.donor.at_exit(m, pos, &self.live)?;
        self.live.resume(m, pos)
    }

    fn finish(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: StopReason,
        at_position: bool,
    ) -> Result<(), RunError> {
        self.donor.stop();
        self.live.finish(m, pos, reason, at_position)
    }
}
