//! The primary of a fault-tolerant pair: a live run whose log goes over the
//! log channel to the backup, whose outputs wait for the backup's
//! acknowledgement, and which goes on alone only after winning
//! test-and-set when the backup fails or leaves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use logchannel::{ChannelError, Event, LogSender, Position};

use crate::ft::goodbye_reason;
use crate::ft::membership::{ArbitrationError, Membership};
use crate::ft::standing::Standing;
use crate::host::events::{Events, ServerEvent, ServerRole, StatusBoard, ROLE_PRIMARY};
use crate::live::EntrySink;
use crate::run::run_loop::{RunError, StopReason};

/// How long `end` waits for the backup to acknowledge the End entry.
const END_ACK_WAIT: Duration = Duration::from_secs(2);
/// How long the primary waits at once for room in a full window before it
/// looks again at whether the backup has failed or stalled.
const WINDOW_WAIT: Duration = Duration::from_millis(50);

pub struct FtSink {
    sender: Arc<LogSender>,
    membership: Arc<Membership>,
    /// Shared with the output gate: alone (nothing more is sent, held
    /// outputs are released), confirmed after a pause, or deposed.
    standing: Arc<Standing>,
    view: u64,
    digest_interval: u64,
    board: Arc<StatusBoard>,
    events: Arc<Events>,
}

impl FtSink {
    pub fn new(
        sender: Arc<LogSender>,
        membership: Arc<Membership>,
        standing: Arc<Standing>,
        view: u64,
        digest_interval: u64,
        board: Arc<StatusBoard>,
        events: Arc<Events>,
    ) -> Self {
        board.role.store(ROLE_PRIMARY, Ordering::Relaxed);
        board.view.store(view, Ordering::Relaxed);
        FtSink {
            sender,
            membership,
            standing,
            view,
            digest_interval,
            board,
            events,
        }
    }

    fn alone(&self) -> bool {
        self.standing.alone()
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
                self.standing.go_alone();
                // A backup still connected (one whose replay stalled) must
                // learn that this primary goes on without it.
                self.sender.close();
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
        if self.alone() {
            return Ok(());
        }
        let write_gaps = self.sender.write_gaps();
        let result = if self.membership.deposed() {
            Err(ArbitrationError::Deposed {
                view: self.view,
                detail: format!(
                    "view {} names another primary",
                    self.membership.view_number()
                ),
            })
        } else if self.standing.unconfirmed(write_gaps) {
            self.membership.confirm_primary(self.view)
        } else {
            return Ok(());
        };
        match result {
            Ok(view) => {
                self.standing.confirm(write_gaps);
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
                        self.standing.depose();
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

    fn check_backup(&mut self) -> Result<(), RunError> {
        self.check_standing()?;
        if self.alone() {
            return Ok(());
        }
        match self.sender.failure() {
            Some(e) => self.channel_down(e),
            None => Ok(()),
        }
    }
}

impl EntrySink for FtSink {
    fn log(&mut self, pos: Position, event: Event) -> Result<u64, RunError> {
        if self.alone() {
            return Ok(0);
        }
        match self.sender.send(pos, event) {
            Ok(seq) => Ok(seq),
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
        self.check_backup()?;
        if self.alone() {
            return Ok(());
        }
        // Everything at exits before this one is logged; at this one the
        // guest may still be given an interrupt between this exit and the
        // next (an `async-point` entry at this exit count), so the backup
        // must not run past it on the strength of this mark.
        self.sender.set_progress(pos.exits.saturating_sub(1));
        // The lag as this exit finds it, before any wait below shortens it.
        let m = self.sender.metrics();
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
        let limit = self.sender.config().failure_timeout;
        while self.sender.window_full() {
            if let Some(stall) = self.sender.replay_stall().filter(|s| *s > limit) {
                return self.backup_failed(format!(
                    "its replay has stood still for {} ms with entries to replay, while its connection answers",
                    stall.as_millis()
                ));
            }
            if let Err(e) = self.sender.wait_window(WINDOW_WAIT) {
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
        if self.alone() || self.standing.deposed() {
            return Ok(());
        }
        let end = Event::End {
            exits: pos.exits,
            reason: reason.end_reason(),
        };
        if let Ok(seq) = self.sender.send(pos, end) {
            let _ = self.sender.wait_acked(seq, END_ACK_WAIT);
        }
        if let Err(e) = self.sender.goodbye(&goodbye_reason(reason)) {
            tracing::debug!("no goodbye to the backup: {e}");
        }
        Ok(())
    }

    fn report(&self) -> Option<String> {
        let m = self.sender.metrics();
        Some(format!(
            "log channel: {} entries, {} bytes sent, {} acknowledged",
            m.entries_sent, m.bytes_sent, m.acked
        ))
    }
}
