//! What the two ends of a channel have in common: one connection, the state
//! behind one mutex, and the rules for declaring the peer failed.
//!
//! Failure is sticky and shuts the socket down, so a late byte cannot
//! revive a peer that the caller may already have acted on (by calling
//! test-and-set), and every thread blocked in the socket returns.

use super::config::ChannelConfig;
use super::error::{ChannelError, Peer};
use super::liveness::Liveness;
use super::wire::{ControlSeq, Message};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Whether a connection is still usable.
#[derive(Debug, Default)]
pub(crate) struct Health {
    pub failure: Option<ChannelError>,
    /// The owner is dropping the channel: errors from here on are its own
    /// doing, not the peer's.
    pub closing: bool,
    /// This end has stopped reading on purpose (its buffer is full), so the
    /// peer's silence means nothing.
    pub not_reading: bool,
    /// The log's `End` entry has gone through this end: the peer closing
    /// the connection now is the run ending, not a failure to warn about.
    pub ended: bool,
    /// This end has said goodbye: it writes nothing more, takes no more
    /// entries, and what happens to the connection now is its own doing.
    pub leaving: bool,
}

pub(crate) trait HasHealth {
    fn health(&mut self) -> &mut Health;
}

/// How long a wait lasts when nothing in particular is due; any change
/// that matters notifies the waiter anyway.
pub(crate) const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The sending half of the connection. Whoever holds it takes what is due
/// from the state and writes it, so that messages reach the socket in the
/// order their control sequence numbers were given; any thread may write
/// (an end's writer thread, or a caller that must not wait for it).
pub(crate) struct Outgoing {
    pub control: ControlSeq,
    pub buf: Vec<u8>,
}

pub(crate) struct Link<S> {
    /// Locked before `state` when both are held.
    out: Mutex<Outgoing>,
    state: Mutex<S>,
    /// Wakes the writer thread.
    to_writer: Condvar,
    /// Wakes everyone else: callers waiting for acks, entries, progress or
    /// room in the window, and a reader waiting for room in its buffer.
    to_waiters: Condvar,
    pub stream: TcpStream,
    pub live: Liveness,
    pub peer: Peer,
    pub config: ChannelConfig,
}

impl<S: HasHealth> Link<S> {
    pub(crate) fn new(state: S, stream: TcpStream, peer: Peer, config: ChannelConfig) -> Link<S> {
        let live = Liveness::new();
        live.touch();
        Link {
            out: Mutex::new(Outgoing {
                control: ControlSeq::after_handshake(),
                buf: Vec::new(),
            }),
            state: Mutex::new(state),
            to_writer: Condvar::new(),
            to_waiters: Condvar::new(),
            stream,
            live,
            peer,
            config,
        }
    }

    /// A panic in one channel thread must not take every caller down with
    /// it, and the state stays consistent between statements.
    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what `take` encodes (it is given the state, locked, and the
    /// outgoing buffer, emptied), then lets `written` note the write in the
    /// state. A failed write fails the link.
    pub(crate) fn write_out(
        &self,
        take: impl FnOnce(&mut S, &mut Outgoing) -> Result<(), ChannelError>,
        written: impl FnOnce(&mut S, usize),
    ) -> Result<(), ChannelError> {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        out.buf.clear();
        {
            let mut st = self.lock();
            self.check(&mut st)?;
            if st.health().leaving {
                return Ok(());
            }
            if let Err(e) = take(&mut st, &mut out) {
                self.fail(&mut st, e.clone());
                return Err(e);
            }
        }
        if out.buf.is_empty() {
            return Ok(());
        }
        let mut stream = &self.stream;
        let result = stream.write_all(&out.buf);
        let mut st = self.lock();
        match result {
            Ok(()) => {
                written(&mut st, out.buf.len());
                Ok(())
            }
            Err(e) => {
                let err = ChannelError::broken(self.peer, e);
                self.fail(&mut st, err.clone());
                Err(err)
            }
        }
    }

    /// Records the first failure and stops the connection.
    pub(crate) fn fail(&self, st: &mut S, err: ChannelError) {
        let h = st.health();
        if h.closing || h.failure.is_some() {
            return;
        }
        if h.leaving {
            tracing::debug!("log channel closed after this end's goodbye: {err}");
        } else if matches!(err, ChannelError::PeerLeft { .. }) {
            tracing::info!("log channel closed: {err}");
        } else if h.ended && matches!(err, ChannelError::Closed { .. }) {
            tracing::debug!("log channel closed after the end of the log: {err}");
        } else {
            tracing::warn!("log channel failed: {err}");
        }
        h.failure = Some(err);
        let _ = self.stream.shutdown(Shutdown::Both);
        self.to_writer.notify_all();
        self.to_waiters.notify_all();
    }

    /// The failure, if there is one or the peer has just been silent too
    /// long.
    pub(crate) fn check(&self, st: &mut S) -> Result<(), ChannelError> {
        let h = st.health();
        if let Some(f) = &h.failure {
            return Err(f.clone());
        }
        let silent = self.live.silent_for();
        if !h.not_reading && !h.closing && !h.leaving && silent > self.config.failure_timeout {
            self.fail(
                st,
                ChannelError::Silent {
                    peer: self.peer,
                    silent,
                    timeout: self.config.failure_timeout,
                },
            );
            if let Some(f) = &st.health().failure {
                return Err(f.clone());
            }
        }
        Ok(())
    }

    /// Whether the writer thread should stop.
    pub(crate) fn stopping(&self, st: &mut S) -> bool {
        let h = st.health();
        h.closing || h.leaving || self.check(st).is_err()
    }

    /// When the peer's silence will have lasted the failure timeout, if
    /// nothing arrives before: when to check again. The millisecond makes
    /// that check see the timeout as passed rather than just reached.
    /// Far away while this end is not reading.
    pub(crate) fn silence_deadline(&self, st: &mut S, now: Instant) -> Instant {
        if st.health().not_reading {
            return now + IDLE_RECHECK;
        }
        now + self
            .config
            .failure_timeout
            .saturating_sub(self.live.silent_for())
            + Duration::from_millis(1)
    }

    /// The writer thread's wait: `due` says, under the lock, what is to be
    /// written now (`Ok`) or until when nothing is (`Err`). `None` when the
    /// writer should stop.
    pub(crate) fn writer_wait<T>(
        &self,
        mut due: impl FnMut(&mut S, Instant) -> Result<T, Instant>,
    ) -> Option<T> {
        let mut guard = self.lock();
        loop {
            if self.stopping(&mut guard) {
                return None;
            }
            let now = Instant::now();
            match due(&mut guard, now) {
                Ok(what) => return Some(what),
                Err(at) => {
                    let until = at.min(self.silence_deadline(&mut guard, now));
                    guard = self.wait_writer(guard, until);
                }
            }
        }
    }

    fn wait_writer<'a>(&self, g: MutexGuard<'a, S>, until: Instant) -> MutexGuard<'a, S> {
        wait(&self.to_writer, g, until)
    }

    /// Waits on behalf of a caller until `ready`, run under the lock at
    /// every change, gives a value, the peer fails (the error), or
    /// `timeout` passes (`Ok(None)`). `ready` comes first, so what arrived
    /// before a failure is still delivered.
    pub(crate) fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&mut S) -> Option<T>,
    ) -> Result<Option<T>, ChannelError> {
        let until = deadline(timeout);
        let mut st = self.lock();
        loop {
            if let Some(value) = ready(&mut st) {
                return Ok(Some(value));
            }
            self.check(&mut st)?;
            if Instant::now() >= until {
                return Ok(None);
            }
            st = self.wait_waiters(st, until);
        }
    }

    /// Waits on behalf of a caller or the reader, waking in time to notice
    /// silence.
    pub(crate) fn wait_waiters<'a>(
        &self,
        mut g: MutexGuard<'a, S>,
        until: Instant,
    ) -> MutexGuard<'a, S> {
        let until = until.min(self.silence_deadline(&mut g, Instant::now()));
        wait(&self.to_waiters, g, until)
    }

    /// Says goodbye: the message, then the end of this direction, then a
    /// wait of at most the failure timeout for the peer to close its side,
    /// so that closing does not reset the connection under the goodbye
    /// before the peer has read it.
    pub(crate) fn goodbye(&self, reason: &str) -> Result<(), ChannelError> {
        self.write_out(
            |st, out| {
                out.control.encode(
                    &Message::Goodbye {
                        reason: reason.to_string(),
                    },
                    &mut out.buf,
                )?;
                st.health().leaving = true;
                Ok(())
            },
            |_, _| {},
        )?;
        let _ = self.stream.shutdown(Shutdown::Write);
        // The writer stops; a reader waiting for room reads on (and drops).
        self.to_writer.notify_all();
        self.to_waiters.notify_all();
        let until = deadline(self.config.failure_timeout);
        let mut st = self.lock();
        while st.health().failure.is_none() && Instant::now() < until {
            st = wait(&self.to_waiters, st, until);
        }
        Ok(())
    }

    pub(crate) fn wake_writer(&self) {
        self.to_writer.notify_all();
    }

    pub(crate) fn wake_waiters(&self) {
        self.to_waiters.notify_all();
    }

    /// The owner's part of dropping a channel: the threads see `closing`,
    /// and the shutdown returns any of them blocked in the socket.
    pub(crate) fn close(&self) {
        self.lock().health().closing = true;
        let _ = self.stream.shutdown(Shutdown::Both);
        self.to_writer.notify_all();
        self.to_waiters.notify_all();
    }
}

fn wait<'a, S>(cv: &Condvar, g: MutexGuard<'a, S>, until: Instant) -> MutexGuard<'a, S> {
    let d = until.saturating_duration_since(Instant::now());
    cv.wait_timeout(g, d)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}

/// `now + d`, or far in the future for a `d` too large to add.
pub(crate) fn deadline(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
