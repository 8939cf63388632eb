//! The primary of a fault-tolerant pair: a live run whose log goes over the
//! log channel to the backup, whose outputs wait for the backup's
//! acknowledgement, and which goes on alone only after winning
//! test-and-set when the backup falls silent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logchannel::{Event, LogSender, Position};

use crate::ft::membership::{ArbitrationError, Membership};
use crate::host::events::{Events, ServerEvent, ServerRole, StatusBoard, ROLE_PRIMARY};
use crate::live::EntrySink;
use crate::run::run_loop::{RunError, StopReason};

/// How long `end` waits for the backup to acknowledge the End entry.
const END_ACK_WAIT: Duration = Duration::from_secs(2);
/// How long the primary waits at once for room in a full window before it
/// checks again whether the backup has failed.
const WINDOW_WAIT: Duration = Duration::from_millis(50);

pub struct FtSink {
    sender: Arc<LogSender>,
    membership: Arc<Membership>,
    /// Set once this primary has won the right to run without a backup:
    /// nothing more is sent and held outputs are released.
    alone: Arc<AtomicBool>,
    view: u64,
    digest_interval: u64,
    board: Arc<StatusBoard>,
    events: Arc<Events>,
}

impl FtSink {
    pub fn new(
        sender: Arc<LogSender>,
        membership: Arc<Membership>,
        alone: Arc<AtomicBool>,
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
            alone,
            view,
            digest_interval,
            board,
            events,
        }
    }

    fn alone(&self) -> bool {
        self.alone.load(Ordering::SeqCst)
    }

    /// The backup has failed: claim the view. Winning means going on alone;
    /// losing or not reaching the arbiter stops this primary.
    fn backup_failed(&mut self, why: String) -> Result<(), RunError> {
        self.events.emit(
            ServerEvent::FailureDetected {
                peer: ServerRole::Backup,
                detail: why.to_string(),
            },
            Some(format!(
                "the backup has failed ({why}); claiming view {}",
                self.view
            )),
        );
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
                self.alone.store(true, Ordering::SeqCst);
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
                    ArbitrationError::Lost { .. } => ServerEvent::Lost { view: self.view },
                };
                self.events.emit(event, Some(e.to_string()));
                Err(e.into())
            }
        }
    }

    fn check_backup(&mut self) -> Result<(), RunError> {
        if self.alone() {
            return Ok(());
        }
        if let Some(failure) = self.sender.failure() {
            return self.backup_failed(failure.to_string());
        }
        Ok(())
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
                self.backup_failed(e.to_string())?;
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
        self.sender.set_progress(pos.exits);
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
        // too far behind) holds the primary at this exit. One that makes no
        // room for as long as silence would take to declare it dead has
        // failed as surely, even if its connection still answers.
        let held = Instant::now();
        let limit = self.sender.config().failure_timeout;
        while self.sender.window_full() {
            if held.elapsed() > limit {
                return self.backup_failed(format!(
                    "its replay made no room in the window for {} ms",
                    held.elapsed().as_millis()
                ));
            }
            if let Err(e) = self.sender.wait_window(WINDOW_WAIT) {
                return self.backup_failed(e.to_string());
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RunError> {
        self.check_backup()
    }

    fn end(&mut self, pos: Position, reason: StopReason) -> Result<(), RunError> {
        if self.alone() {
            return Ok(());
        }
        let end = Event::End {
            exits: pos.exits,
            reason: format!("{reason:?}"),
        };
        if let Ok(seq) = self.sender.send(pos, end) {
            let _ = self.sender.wait_acked(seq, END_ACK_WAIT);
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
