//! The backup's end: receives entries into a bounded buffer, acknowledges
//! them, and follows the primary's progress marks.

use super::config::ChannelConfig;
use super::error::{ChannelError, Peer};
use super::handshake::{handshake, Side};
use super::handshaken::Handshaken;
use super::hello::{Hello, Role};
use super::link::{HasHealth, Health, Link, IDLE_RECHECK};
use super::liveness::StampingReader;
use super::metrics::ReceiverMetrics;
use super::wire::{ControlSeq, Message};
use super::workers::Workers;
use crate::entry::{Entry, Event};
use crate::frame::FrameDecoder;
use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The backup's end of a log channel.
///
/// A reader thread decodes entries into a buffer of at most
/// `window_entries` entries and `window_bytes` bytes and stops reading while
/// it is full, so a backup that lags holds the primary back instead of
/// growing without bound. A writer thread acknowledges what the reader
/// received (receipt, not replay, as in VMware FT) and reports what the
/// backup replayed. Dropping it closes the connection at once.
pub struct LogReceiver {
    link: Arc<Link<State>>,
    workers: Workers,
    peer_hello: Hello,
}

#[derive(Debug)]
struct State {
    health: Health,
    queue: VecDeque<(Entry, u32)>,
    queued_bytes: u64,
    /// The last sequence number put in the queue, and the last one an ack
    /// carried.
    received: u64,
    acked: u64,
    entries_received: u64,
    bytes_received: u64,
    complete_up_to: u64,
    replayed_seq: u64,
    replayed_exits: u64,
    /// Since when a replay report has waited for an ack to carry it.
    replay_due: Option<Instant>,
    last_write: Instant,
}

struct Room {
    entries: u64,
    bytes: u64,
}

impl HasHealth for State {
    fn health(&mut self) -> &mut Health {
        &mut self.health
    }
}

impl State {
    /// Room for more entries, by count and by bytes; `None` when full. An
    /// empty queue always has room for one entry, so that an entry larger
    /// than the byte bound still gets through.
    fn room(&self, config: &ChannelConfig) -> Option<Room> {
        if self.health.leaving {
            // What still arrives is read and dropped, so that the reader
            // sees the primary close.
            return Some(Room {
                entries: u64::MAX,
                bytes: u64::MAX,
            });
        }
        let room = Room {
            entries: config
                .window_entries
                .saturating_sub(self.queue.len() as u64),
            bytes: config.window_bytes.saturating_sub(self.queued_bytes),
        };
        if self.queue.is_empty() {
            Some(Room {
                entries: room.entries.max(1),
                bytes: room.bytes.max(1),
            })
        } else {
            (room.entries > 0 && room.bytes > 0).then_some(room)
        }
    }

    fn push(&mut self, entry: Entry, size: usize) {
        self.health.ended |= matches!(entry.event, Event::End { .. });
        let implied = match entry.event {
            Event::Progress { exits } | Event::End { exits, .. } => exits,
            _ => entry.pos.exits.saturating_sub(1),
        };
        self.complete_up_to = self.complete_up_to.max(implied);
        self.received = entry.seq;
        self.entries_received += 1;
        self.bytes_received += size as u64;
        self.queued_bytes += size as u64;
        self.queue.push_back((entry, size as u32));
    }
}

impl LogReceiver {
    /// Connects to the primary at `addr` and shakes hands, each within
    /// `config.handshake_timeout`.
    pub fn connect(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
    ) -> Result<LogReceiver, ChannelError> {
        LogReceiver::connect_cancellable(addr, hello, config, &|| false)
    }

    /// [`LogReceiver::connect`], except that the handshake asks `cancelled`
    /// every few milliseconds while it waits for the primary and gives up
    /// at once (`ChannelError::Cancelled`) when it says so. The TCP connect
    /// itself is not interrupted: it takes at most `handshake_timeout`, and
    /// no time at all to a host that answers. The log starts from the
    /// primary's `first_seq`: [`LogReceiver::connect_handshaken`], then
    /// [`LogReceiver::start`].
    pub fn connect_cancellable(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<LogReceiver, ChannelError> {
        let handshaken = LogReceiver::connect_handshaken(addr, hello, config, cancelled)?;
        let first_seq = handshaken.peer_hello.first_seq;
        LogReceiver::start(handshaken, first_seq)
    }

    /// Connects to the primary at `addr` and shakes hands, as
    /// [`LogReceiver::connect_cancellable`] does, without starting the
    /// channel: a joining backup reads the primary's state transfer first
    /// ([`crate::TransferReader`]), then calls [`LogReceiver::start`] with
    /// the cut's `next_seq`.
    pub fn connect_handshaken(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Handshaken, ChannelError> {
        config.validate()?;
        let began = Instant::now();
        let stream = TcpStream::connect_timeout(&addr, config.handshake_timeout).map_err(|e| {
            ChannelError::Connect {
                addr,
                source: Arc::new(e),
            }
        })?;
        let peer = Peer {
            role: Side::Connecting.peer_role(),
            addr,
        };
        let established = handshake(
            &stream,
            &hello,
            Side::Connecting,
            peer,
            config.handshake_timeout,
            cancelled,
        )?;
        tracing::debug!(%peer, view = hello.view, "log channel handshake done");
        Ok(Handshaken {
            stream,
            peer,
            ours: hello,
            peer_hello: established.peer_hello,
            config,
            received: established.offset,
            round_trip: began.elapsed(),
        })
    }

    /// Starts the channel on a connection from
    /// [`LogReceiver::connect_handshaken`]: the first entry `recv` returns
    /// must carry `first_seq`. Refused (`Config`) for 0, for a connection
    /// this end did not make, and for a `first_seq` other than the one this
    /// end's hello asked for unless it said 0. Clears the socket's timeouts.
    pub fn start(h: Handshaken, first_seq: u64) -> Result<LogReceiver, ChannelError> {
        let (link, peer_hello, received) = h.into_link(Role::Backup, first_seq, || {
            let before_first = first_seq - 1;
            State {
                health: Health::default(),
                queue: VecDeque::new(),
                queued_bytes: 0,
                received: before_first,
                acked: before_first,
                entries_received: 0,
                bytes_received: 0,
                complete_up_to: 0,
                replayed_seq: before_first,
                replayed_exits: 0,
                replay_due: None,
                last_write: Instant::now(),
            }
        })?;
        let mut receiver = LogReceiver {
            link,
            workers: Workers::new(),
            peer_hello,
        };
        let link = Arc::clone(&receiver.link);
        receiver
            .workers
            .spawn("ftvm-log-acker", move || write_loop(&link))?;
        let link = Arc::clone(&receiver.link);
        let decoder = FrameDecoder::new(first_seq, received);
        receiver
            .workers
            .spawn("ftvm-log-recv", move || read_loop(&link, decoder))?;
        Ok(receiver)
    }

    /// The next entry, in sequence order with no gaps, waiting up to
    /// `timeout`; `Ok(None)` if none came. Entries received before a failure
    /// are delivered first; then the failure is returned (a bad frame names
    /// its number and byte offset), and keeps being returned.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Entry>, ChannelError> {
        self.next(timeout, None)
    }

    /// Like [`LogReceiver::recv`], but also returns `Ok(None)` as soon as
    /// the log is known complete up to `exits` with no entry waiting: for a
    /// replay that may run on as far as `exits` without one.
    pub fn recv_or_complete(
        &self,
        exits: u64,
        timeout: Duration,
    ) -> Result<Option<Entry>, ChannelError> {
        self.next(timeout, Some(exits))
    }

    fn next(
        &self,
        timeout: Duration,
        complete: Option<u64>,
    ) -> Result<Option<Entry>, ChannelError> {
        let next = self.link.wait_for(timeout, |st| {
            if let Some((entry, size)) = st.queue.pop_front() {
                st.queued_bytes -= u64::from(size);
                if st.health.not_reading {
                    self.link.wake_waiters();
                }
                return Some(Some(entry));
            }
            complete
                .is_some_and(|exits| st.complete_up_to >= exits)
                .then_some(None)
        })?;
        Ok(next.flatten())
    }

    /// The highest exit count up to which the primary's log is known to be
    /// complete: every entry at an exit count up to it has been received
    /// (and is available from `recv` without waiting). It comes from
    /// progress marks, from `Progress` and `End` entries, and from any
    /// entry at exit count E, which implies E − 1. 0 until the primary has
    /// declared anything: exit counts start at 1, so 0 promises nothing.
    pub fn complete_up_to(&self) -> u64 {
        self.link.lock().complete_up_to
    }

    /// Waits until `complete_up_to() >= exits`. `Ok(false)` on timeout; an
    /// error if the primary fails first.
    pub fn wait_complete(&self, exits: u64, timeout: Duration) -> Result<bool, ChannelError> {
        let done = self
            .link
            .wait_for(timeout, |st| (st.complete_up_to >= exits).then_some(()))?;
        Ok(done.is_some())
    }

    /// Tells the primary (with the next ack, within `batch_delay`) that the
    /// backup has replayed up to entry `seq` and exit count `exits`, for its
    /// lag metrics. Values only go up; `seq` is capped at what was received.
    pub fn report_replayed(&self, seq: u64, exits: u64) {
        let mut st = self.link.lock();
        let seq = seq.min(st.received);
        if seq <= st.replayed_seq && exits <= st.replayed_exits {
            return;
        }
        st.replayed_seq = st.replayed_seq.max(seq);
        st.replayed_exits = st.replayed_exits.max(exits);
        if st.replay_due.is_none() {
            st.replay_due = Some(Instant::now());
            drop(st);
            self.link.wake_writer();
        }
    }

    /// Sends the last replay report now, from the calling thread, if it has
    /// not been sent: for a backup about to wait for more log, whose
    /// primary may be waiting for exactly this report (its lag bound).
    pub fn flush_report(&self) -> Result<(), ChannelError> {
        write_ack(&self.link, Ack::IfReportPending)
    }

    /// Tells the primary that this backup stops on purpose: the primary
    /// must not take the close for a failure (it may still go on alone, but
    /// only after winning test-and-set). Sends the goodbye after the
    /// acknowledgement of what was received, closes this direction, and
    /// waits up to the failure timeout for the primary to close its own,
    /// dropping what still arrives, so that the goodbye is not lost to a
    /// reset. An error if the channel had failed already.
    pub fn goodbye(&self, reason: &str) -> Result<(), ChannelError> {
        write_ack(&self.link, Ack::IfReportPending)?;
        self.link.goodbye(reason)
    }

    /// Whether the primary is considered failed: nothing from it for
    /// `failure_timeout` while this end was reading, or the connection
    /// broke, or it sent a bad frame. Once true, stays true.
    pub fn primary_failed(&self) -> bool {
        self.failure().is_some()
    }

    /// Why the primary is considered failed, or `PeerLeft` if it said
    /// goodbye.
    pub fn failure(&self) -> Option<ChannelError> {
        self.link.check(&mut self.link.lock()).err()
    }

    /// The primary's hello. Its `first_seq` is the first entry `recv`
    /// returns unless the channel was started from another (a joining
    /// backup's, from the cut).
    pub fn peer_hello(&self) -> &Hello {
        &self.peer_hello
    }

    pub fn metrics(&self) -> ReceiverMetrics {
        let st = self.link.lock();
        ReceiverMetrics {
            entries_received: st.entries_received,
            bytes_received: st.bytes_received,
            queued: st.queue.len() as u64,
            queued_bytes: st.queued_bytes,
            complete_up_to: st.complete_up_to,
            replayed_seq: st.replayed_seq,
            replayed_exits: st.replayed_exits,
        }
    }
}

impl Drop for LogReceiver {
    fn drop(&mut self) {
        self.link.close();
        self.workers.join();
    }
}

fn read_loop(link: &Link<State>, mut decoder: FrameDecoder) {
    let mut control = ControlSeq::after_handshake();
    let mut input = BufReader::with_capacity(
        64 << 10,
        StampingReader {
            stream: &link.stream,
            live: &link.live,
        },
    );
    let err = loop {
        let msg = match decoder.read_value::<Message, _>(&mut input, control.take()) {
            Ok(Some((msg, _))) => msg,
            Ok(None) => break ChannelError::Closed { peer: link.peer },
            Err(e) => break ChannelError::from_frame(link.peer, e),
        };
        let result = match msg {
            Message::Entries { count } => read_entries(link, &mut decoder, &mut input, count),
            Message::Heartbeat { progress } => {
                let mut st = link.lock();
                if progress > st.complete_up_to {
                    st.complete_up_to = progress;
                    drop(st);
                    link.wake_waiters();
                }
                Ok(())
            }
            Message::Goodbye { reason } => Err(ChannelError::PeerLeft {
                peer: link.peer,
                reason,
            }),
            other => Err(ChannelError::protocol(
                link.peer,
                format!(
                    "sent a {} message; a primary sends only entries, heartbeats and its goodbye",
                    other.name()
                ),
            )),
        };
        if let Err(e) = result {
            break e;
        }
    };
    link.fail(&mut link.lock(), err);
}

/// Reads the `count` entry frames of one batch into the queue, as many at a
/// time as the queue has room for (it can overshoot the byte bound by one
/// frame), pausing while it has none.
fn read_entries(
    link: &Link<State>,
    decoder: &mut FrameDecoder,
    input: &mut impl Read,
    count: u32,
) -> Result<(), ChannelError> {
    let mut left = u64::from(count);
    let mut chunk = Vec::new();
    while left > 0 {
        let room = wait_for_room(link)?;
        let mut bytes = 0;
        while left > 0 && (chunk.len() as u64) < room.entries && bytes < room.bytes {
            match decoder.read_entry(input) {
                Ok(Some((entry, size))) => {
                    chunk.push((entry, size));
                    bytes += size as u64;
                    left -= 1;
                }
                Ok(None) => return Err(ChannelError::Closed { peer: link.peer }),
                Err(e) => {
                    // What arrived intact before the bad frame is still the
                    // primary's log.
                    deliver(link, &mut chunk);
                    return Err(ChannelError::from_frame(link.peer, e));
                }
            }
        }
        deliver(link, &mut chunk);
    }
    Ok(())
}

fn deliver(link: &Link<State>, chunk: &mut Vec<(Entry, usize)>) {
    if chunk.is_empty() {
        return;
    }
    let mut st = link.lock();
    if st.health.leaving {
        chunk.clear();
        return;
    }
    for (entry, size) in chunk.drain(..) {
        st.push(entry, size);
    }
    drop(st);
    link.wake_waiters();
    // From this thread, not the writer's: the primary may be holding an
    // output for exactly this acknowledgement.
    let _ = write_ack(link, Ack::IfReceived);
}

/// Waits until the queue has room and returns how much. While it waits,
/// the reader does not read, so the primary's silence is not held against
/// it; reading resumes with a fresh clock.
fn wait_for_room(link: &Link<State>) -> Result<Room, ChannelError> {
    let mut st = link.lock();
    loop {
        if st.health.closing {
            return Err(ChannelError::Closed { peer: link.peer });
        }
        if let Some(f) = &st.health.failure {
            return Err(f.clone());
        }
        if let Some(room) = st.room(&link.config) {
            if st.health.not_reading {
                st.health.not_reading = false;
                link.live.touch();
            }
            return Ok(room);
        }
        if !st.health.not_reading {
            st.health.not_reading = true;
            // Acknowledge what the full queue holds before going quiet.
            link.wake_writer();
        }
        st = link.wait_waiters(st, Instant::now() + IDLE_RECHECK);
    }
}

fn write_loop(link: &Link<State>) {
    let due = |st: &mut State, now: Instant| {
        let replay_at = st.replay_due.map(|t| t + link.config.batch_delay);
        let beat_at = st.last_write + link.config.heartbeat_interval;
        let report = replay_at.is_some_and(|t| t <= now) || beat_at <= now;
        if report || st.received > st.acked {
            Ok(if report { Ack::Always } else { Ack::IfReceived })
        } else {
            Err(replay_at.unwrap_or(beat_at).min(beat_at))
        }
    };
    while let Some(when) = link.writer_wait(due) {
        if write_ack(link, when).is_err() {
            return;
        }
    }
}

/// When an ack (which always carries the last replay report) is worth
/// sending.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// Entries arrived since the last one.
    IfReceived,
    /// That, or a replay report has not been sent.
    IfReportPending,
    /// A heartbeat or a report is due.
    Always,
}

/// Acknowledges what was received, with the last replay report, if `when`
/// says so.
fn write_ack(link: &Link<State>, when: Ack) -> Result<(), ChannelError> {
    link.write_out(
        |st, out| {
            let send = match when {
                Ack::IfReceived => st.received > st.acked,
                Ack::IfReportPending => st.received > st.acked || st.replay_due.is_some(),
                Ack::Always => true,
            };
            if !send {
                return Ok(());
            }
            st.acked = st.received;
            st.replay_due = None;
            let ack = Message::Ack {
                received: st.received,
                replayed_seq: st.replayed_seq,
                replayed_exits: st.replayed_exits,
            };
            Ok(out.control.encode(&ack, &mut out.buf)?)
        },
        |st, _| st.last_write = Instant::now(),
    )
}
