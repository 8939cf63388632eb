//! The primary's end: queues entries, batches them onto the socket, and
//! tracks what the backup has acknowledged and replayed.

use super::accept::{accept_backup, Accepted};
use super::config::ChannelConfig;
use super::error::ChannelError;
use super::handshaken::Handshaken;
use super::hello::{Hello, Role};
use super::link::{HasHealth, Health, Link, Outgoing};
use super::liveness::StampingReader;
use super::metrics::{ChannelMetrics, Rates};
use super::rtt::MinRtt;
use super::wire::{ControlSeq, Message};
use super::workers::Workers;
use crate::entry::{Entry, Event, Position};
use crate::frame::FrameDecoder;
use crate::frame::FrameEncoder;
use std::collections::VecDeque;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The primary's end of a log channel.
///
/// `send` never blocks: it encodes the entry and queues it, and a writer
/// thread writes the queue in batches. A reader thread takes the backup's
/// acks. Dropping it closes the connection at once, discarding entries not
/// yet written; to deliver everything first, `wait_acked` on the last one.
pub struct LogSender {
    link: Arc<Link<State>>,
    workers: Workers,
    peer_hello: Hello,
}

/// What the primary remembers of an entry it sent.
#[derive(Debug)]
struct Sent {
    /// Entry frame bytes queued up to and including this one.
    bytes_end: u64,
    at: Instant,
}

/// Called with the new cumulative ack each time it moves, and
/// [`LogSender::write_gaps`] as the ack was taken in.
type AckHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

struct State {
    health: Health,
    on_ack: Option<AckHook>,
    encoder: FrameEncoder,
    /// Entry frames not yet taken by the writer, and their sizes.
    pending: Vec<u8>,
    pending_sizes: Vec<u32>,
    /// Since when something (an entry, a new progress mark) has been
    /// waiting for the writer.
    due_since: Option<Instant>,
    /// Someone waits for an ack: write now, do not batch.
    urgent: bool,
    /// Entries from `front_seq` on: every unacknowledged one, and acked
    /// ones not yet replayed (at most `window_entries` of those).
    sent: VecDeque<Sent>,
    front_seq: u64,
    /// The last sequence number queued, and the last given to the writer.
    queued_seq: u64,
    written_seq: u64,
    queued_bytes: u64,
    acked: u64,
    acked_bytes: u64,
    replayed_seq: u64,
    replayed_exits: u64,
    progress: u64,
    progress_written: u64,
    /// The highest exit count of an entry or progress mark.
    exits: u64,
    entries_sent: u64,
    bytes_written: u64,
    last_write: Instant,
    /// Times this end went more than half the failure timeout without
    /// writing, counted at the write that ended each.
    write_gaps: u64,
    rates: Rates,
    rtt: MinRtt,
    /// Since when the backup has had entries received and not replayed
    /// without its replay report moving; `None` while it has none.
    stall_since: Option<Instant>,
}

impl HasHealth for State {
    fn health(&mut self) -> &mut Health {
        &mut self.health
    }
}

impl State {
    fn in_flight(&self) -> u64 {
        self.queued_seq - self.acked
    }

    fn in_flight_bytes(&self) -> u64 {
        self.queued_bytes - self.acked_bytes
    }

    /// The lag bound discounts the round trip: an entry cannot be reported
    /// replayed sooner than that, however fast the backup replays, so a
    /// slow link is not taken for a slow backup.
    fn window_full(&self, config: &ChannelConfig, now: Instant) -> bool {
        self.in_flight() >= config.window_entries
            || self.in_flight_bytes() >= config.window_bytes
            || config
                .max_lag
                .is_some_and(|max| self.lag(now) > max + self.rtt.get())
    }

    /// Gaps in this end's writing longer than `limit`, with one still under
    /// way, unless this end has said goodbye: then it writes nothing on
    /// purpose.
    fn write_gaps(&self, limit: Duration, now: Instant) -> u64 {
        let under_way = !self.health.leaving && now.duration_since(self.last_write) > limit;
        self.write_gaps + u64::from(under_way)
    }

    /// How long the oldest entry the backup has not reported replayed has
    /// waited since `send`; zero when it has replayed everything.
    fn lag(&self, now: Instant) -> Duration {
        let oldest = self.record(self.replayed_seq + 1).or_else(|| {
            (self.replayed_seq < self.queued_seq)
                .then(|| self.sent.front())
                .flatten()
        });
        oldest.map_or(Duration::ZERO, |s| now.duration_since(s.at))
    }

    /// Forgets what neither flow control nor the lag metric needs.
    fn trim(&mut self, keep_unreplayed: u64) {
        while !self.sent.is_empty()
            && self.front_seq <= self.acked
            && (self.front_seq <= self.replayed_seq
                || self.acked - self.front_seq >= keep_unreplayed)
        {
            self.sent.pop_front();
            self.front_seq += 1;
        }
    }

    fn record(&self, seq: u64) -> Option<&Sent> {
        let i = seq.checked_sub(self.front_seq)?;
        self.sent.get(usize::try_from(i).ok()?)
    }
}

impl LogSender {
    /// Waits up to `config.handshake_timeout` for a backup to connect on
    /// `listener` and shake hands: [`LogSender::accept_within`] with that
    /// wait and nothing to cancel it.
    pub fn accept(
        listener: &TcpListener,
        hello: Hello,
        config: ChannelConfig,
    ) -> Result<LogSender, ChannelError> {
        let wait = config.handshake_timeout;
        LogSender::accept_within(listener, hello, config, wait, &|| false)
    }

    /// Waits up to `wait` for the backup on `listener`, shakes hands and
    /// starts the channel: [`LogSender::accept_handshaken`], then
    /// [`LogSender::start`] from `hello.first_seq`, the sequence number of
    /// the first entry `send` will assign (1 at the start of a primary's
    /// lifetime).
    pub fn accept_within(
        listener: &TcpListener,
        hello: Hello,
        config: ChannelConfig,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<LogSender, ChannelError> {
        let first_seq = hello.first_seq;
        let handshaken = LogSender::accept_handshaken(listener, hello, config, wait, cancelled)?;
        LogSender::start(handshaken, first_seq)
    }

    /// Waits up to `wait` for the backup on `listener` and shakes hands,
    /// without starting the channel: the caller may first transfer state
    /// over the connection ([`crate::TransferWriter`]), then
    /// [`LogSender::start`]. A connection counts only once its handshake
    /// succeeds; every other one (a stranger, a peer that says nothing
    /// within `handshake_timeout`, a hello that does not match, which is
    /// told why) is turned away and the wait goes on, each on its own
    /// thread, so none holds up the real backup. A handshake under way when
    /// the wait ends may finish within `handshake_timeout`. `cancelled` is
    /// asked every few milliseconds and ends the wait at once
    /// (`ChannelError::Cancelled`); otherwise the wait ends in
    /// `AcceptTimeout`, which counts the connections turned away and says
    /// why the last one was. The listener is left in blocking mode.
    ///
    /// `hello.first_seq` is what the backup's hello is checked against (a
    /// backup that says 0 takes any): the primary's next sequence number
    /// as it stands now, at least 1.
    pub fn accept_handshaken(
        listener: &TcpListener,
        hello: Hello,
        config: ChannelConfig,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Handshaken, ChannelError> {
        config.validate()?;
        if hello.first_seq == 0 {
            return Err(ChannelError::Config(
                "the primary's first_seq must be at least 1".to_string(),
            ));
        }
        let Accepted {
            stream,
            peer,
            established,
        } = accept_backup(listener, &hello, &config, wait, cancelled)?;
        tracing::debug!(%peer, view = hello.view, "log channel handshake done");
        Ok(Handshaken {
            stream,
            peer,
            ours: hello,
            peer_hello: established.peer_hello,
            config,
            received: established.offset,
            round_trip: Duration::ZERO,
        })
    }

    /// Starts the channel on a connection from
    /// [`LogSender::accept_handshaken`]: `send` assigns sequence numbers
    /// from `first_seq` (a joining backup's: the `next_seq` of the cut).
    /// Refused (`Config`) for 0, for a connection this end did not accept,
    /// and for a `first_seq` other than the one the backup's hello expects
    /// unless it said 0. Clears the socket's timeouts.
    pub fn start(h: Handshaken, first_seq: u64) -> Result<LogSender, ChannelError> {
        let (link, peer_hello, received) = h.into_link(Role::Primary, first_seq, || {
            let now = Instant::now();
            State {
                health: Health::default(),
                on_ack: None,
                encoder: FrameEncoder::new(first_seq),
                pending: Vec::new(),
                pending_sizes: Vec::new(),
                due_since: None,
                urgent: false,
                sent: VecDeque::new(),
                front_seq: first_seq,
                queued_seq: first_seq - 1,
                written_seq: first_seq - 1,
                queued_bytes: 0,
                acked: first_seq - 1,
                acked_bytes: 0,
                replayed_seq: first_seq - 1,
                replayed_exits: 0,
                progress: 0,
                progress_written: 0,
                exits: 0,
                entries_sent: 0,
                bytes_written: 0,
                last_write: now,
                write_gaps: 0,
                rates: Rates::new(now),
                rtt: MinRtt::new(now),
                stall_since: None,
            }
        })?;
        let mut sender = LogSender {
            link,
            workers: Workers::new(),
            peer_hello,
        };
        let link = Arc::clone(&sender.link);
        sender
            .workers
            .spawn("ftvm-log-send", move || write_loop(&link))?;
        let link = Arc::clone(&sender.link);
        // The backup sends no entries, so the entry sequence is unused.
        let decoder = FrameDecoder::new(0, received);
        sender
            .workers
            .spawn("ftvm-log-acks", move || read_loop(&link, decoder))?;
        Ok(sender)
    }

    /// Assigns the next sequence number to an entry at `pos` and queues it;
    /// returns the sequence number. Never blocks: the caller checks
    /// [`LogSender::window_full`] at each exit. Fails once the peer has
    /// failed, or if the entry cannot be encoded (an exit count below the
    /// previous entry's, a payload over `MAX_PAYLOAD`); then nothing is
    /// queued.
    pub fn send(&self, pos: Position, event: Event) -> Result<u64, ChannelError> {
        let mut guard = self.link.lock();
        self.link.check(&mut guard)?;
        let st = &mut *guard;
        let entry = Entry {
            seq: st.encoder.next_seq(),
            pos,
            event,
        };
        let size = st.encoder.encode_entry(&entry, &mut st.pending)?;
        st.health.ended |= matches!(entry.event, Event::End { .. });
        let now = Instant::now();
        st.pending_sizes.push(size as u32);
        st.queued_seq = entry.seq;
        st.queued_bytes += size as u64;
        st.sent.push_back(Sent {
            bytes_end: st.queued_bytes,
            at: now,
        });
        st.entries_sent += 1;
        st.exits = st.exits.max(pos.exits);
        let big = st.pending.len() >= self.link.config.batch_max_bytes
            && st.pending.len() - size < self.link.config.batch_max_bytes;
        let first = st.due_since.is_none();
        if first {
            st.due_since = Some(now);
        }
        drop(guard);
        if first || big {
            self.link.wake_writer();
        }
        Ok(entry.seq)
    }

    /// Declares that every entry at an exit count up to `exits` has been
    /// passed to `send`. The backup learns it within `batch_delay` (and
    /// with every heartbeat), so it can run that far without entries.
    pub fn set_progress(&self, exits: u64) {
        let mut st = self.link.lock();
        if exits <= st.progress {
            return;
        }
        st.progress = exits;
        st.exits = st.exits.max(exits);
        if st.due_since.is_none() {
            st.due_since = Some(Instant::now());
            drop(st);
            self.link.wake_writer();
        }
    }

    /// Writes everything queued, and the progress mark, now and from the
    /// calling thread rather than the writer's: for the entry of an output,
    /// which waits for the backup's acknowledgement, a thread woken is
    /// latency added. An error if the peer has failed or the write fails.
    pub fn flush(&self) -> Result<(), ChannelError> {
        write_batch(&self.link, false)
    }

    /// Has `hook` called, from the thread that reads acks, with the new
    /// cumulative ack each time it moves: a caller holding outputs can
    /// release them there instead of in a thread of its own that would have
    /// to be woken. Its second argument is [`LogSender::write_gaps`] as the
    /// ack was taken in, so that a hook can hold releases across a pause
    /// of this end without a handle on the sender. The hook must not block
    /// for long; it is called with no lock of the channel held, so it may
    /// call back into it.
    pub fn on_ack(&self, hook: impl Fn(u64, u64) + Send + Sync + 'static) {
        self.link.lock().on_ack = Some(Arc::new(hook));
    }

    /// The highest sequence number the backup has acknowledged receiving
    /// (everything up to it, since acks are cumulative).
    pub fn acked(&self) -> u64 {
        self.link.lock().acked
    }

    /// Waits until the backup has acknowledged `seq` (the output rule).
    /// Entries still waiting to be batched are written at once. `Ok(false)`
    /// on timeout; an error if the peer fails first.
    pub fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<bool, ChannelError> {
        let mut st = self.link.lock();
        if st.acked < seq && seq > st.written_seq && !st.pending_sizes.is_empty() {
            st.urgent = true;
            self.link.wake_writer();
        }
        drop(st);
        let acked = self
            .link
            .wait_for(timeout, |st| (st.acked >= seq).then_some(()))?;
        Ok(acked.is_some())
    }

    /// Entries sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.link.lock().in_flight()
    }

    /// Whether the window is full (entries or bytes in flight, or the
    /// backup's replay lag over `max_lag`): the primary should not run past
    /// its next exit. The window is checked there, not in `send`, so it can
    /// be exceeded by what one exit logs.
    pub fn window_full(&self) -> bool {
        self.link
            .lock()
            .window_full(&self.link.config, Instant::now())
    }

    /// Waits until the window has room. `Ok(false)` on timeout; an error if
    /// the peer fails first.
    pub fn wait_window(&self, timeout: Duration) -> Result<bool, ChannelError> {
        let config = &self.link.config;
        let room = self.link.wait_for(timeout, |st| {
            (!st.window_full(config, Instant::now())).then_some(())
        })?;
        Ok(room.is_some())
    }

    /// How long the backup's replay has stood still while it had entries to
    /// replay: its acks show entries received that its replay reports have
    /// not covered, and neither the replayed entry nor the replayed exit
    /// count has moved since. `None` while it has replayed all it received.
    /// Both figures come from the backup's own messages, so a slow link
    /// delays them alike and does not count: a backup whose replay moves,
    /// however late its reports arrive, is not stalled.
    pub fn replay_stall(&self) -> Option<Duration> {
        self.link.lock().stall_since.map(|t| t.elapsed())
    }

    /// How many times this end has gone more than half the failure timeout
    /// without writing anything to the backup (a heartbeat goes at least
    /// every `heartbeat_interval` while it runs), counting one still under
    /// way (but none after its goodbye, when it stops writing on purpose). Each is a moment when the backup may have heard nothing for
    /// long enough to take over: a primary frozen (stopped, descheduled,
    /// suspended) and resumed finds the count moved, and must confirm it is
    /// still primary before it releases an output. Half, because the
    /// backup's clock for the same silence started up to a heartbeat
    /// earlier and the link may have held its bytes back.
    pub fn write_gaps(&self) -> u64 {
        let limit = self.link.config.failure_timeout / 2;
        self.link.lock().write_gaps(limit, Instant::now())
    }

    /// Tells the backup that this primary stops on purpose (after the End
    /// entry, which the caller should have seen acknowledged): the backup
    /// stops too rather than take over. Writes what is queued, then the
    /// goodbye, then closes this direction and waits up to the failure
    /// timeout for the backup to close its own, so that the goodbye is not
    /// lost to a reset. Nothing is sent afterwards. An error if the channel
    /// had failed already.
    pub fn goodbye(&self, reason: &str) -> Result<(), ChannelError> {
        self.flush()?;
        self.link.goodbye(reason)
    }

    /// Whether the backup is considered failed: nothing from it for
    /// `failure_timeout`, or the connection broke. Once true, stays true.
    pub fn peer_failed(&self) -> bool {
        self.failure().is_some()
    }

    /// Why the backup is considered failed, or `PeerLeft` if it said
    /// goodbye.
    pub fn failure(&self) -> Option<ChannelError> {
        self.link.check(&mut self.link.lock()).err()
    }

    /// The backup's hello.
    pub fn peer_hello(&self) -> &Hello {
        &self.peer_hello
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.link.peer.addr
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.link.config
    }

    /// Closes the connection now, as dropping the last handle would: for a
    /// primary that goes on alone while other threads still hold the
    /// sender. The backup sees the close; every later call here fails.
    pub fn close(&self) {
        self.link.close();
    }

    pub fn metrics(&self) -> ChannelMetrics {
        let mut guard = self.link.lock();
        let st = &mut *guard;
        let now = Instant::now();
        let (entries_per_sec, bytes_per_sec) =
            st.rates.update(now, st.entries_sent, st.bytes_written);
        ChannelMetrics {
            entries_sent: st.entries_sent,
            bytes_sent: st.bytes_written,
            entries_per_sec,
            bytes_per_sec,
            acked: st.acked,
            in_flight: st.in_flight(),
            in_flight_bytes: st.in_flight_bytes(),
            lag_entries: st.queued_seq - st.replayed_seq,
            lag_exits: st.exits.saturating_sub(st.replayed_exits),
            lag_ms: st.lag(now).as_secs_f64() * 1e3,
            rtt_ms: st.rtt.get().as_secs_f64() * 1e3,
        }
    }
}

impl Drop for LogSender {
    fn drop(&mut self) {
        self.link.close();
        self.workers.join();
    }
}

fn write_loop(link: &Link<State>) {
    let config = &link.config;
    let due = |st: &mut State, now: Instant| {
        let flush_at = if st.urgent || st.pending.len() >= config.batch_max_bytes {
            Some(now)
        } else {
            st.due_since.map(|t| t + config.batch_delay)
        };
        let beat_at = st.last_write + config.heartbeat_interval;
        if flush_at.is_some_and(|t| t <= now) {
            Ok(false)
        } else if beat_at <= now {
            Ok(true)
        } else {
            Err(flush_at.unwrap_or(beat_at).min(beat_at))
        }
    };
    while let Some(beat) = link.writer_wait(due) {
        if write_batch(link, beat).is_err() {
            return;
        }
    }
}

/// Writes every queued entry frame, then the progress mark if it moved (or
/// as a heartbeat, if `beat` and nothing was written meanwhile).
fn write_batch(link: &Link<State>, beat: bool) -> Result<(), ChannelError> {
    let config = &link.config;
    link.write_out(
        |st, out| {
            let beat = beat && st.last_write + config.heartbeat_interval <= Instant::now();
            let progress = (beat || st.progress != st.progress_written).then_some(st.progress);
            if st.pending_sizes.is_empty() && progress.is_none() {
                return Ok(());
            }
            encode_batch(
                config.batch_max_bytes,
                &st.pending,
                &st.pending_sizes,
                progress,
                out,
            )?;
            st.pending.clear();
            st.pending_sizes.clear();
            st.written_seq = st.queued_seq;
            st.due_since = None;
            st.urgent = false;
            st.progress_written = st.progress;
            Ok(())
        },
        |st, bytes| {
            let now = Instant::now();
            if now.duration_since(st.last_write) > config.failure_timeout / 2 {
                st.write_gaps += 1;
            }
            st.bytes_written += bytes as u64;
            st.last_write = now;
        },
    )
}

/// Entry frames in messages of at most `max` bytes (but at least one entry
/// each), then the progress mark if there is one to send.
fn encode_batch(
    max: usize,
    frames: &[u8],
    sizes: &[u32],
    progress: Option<u64>,
    out: &mut Outgoing,
) -> Result<(), ChannelError> {
    let mut start = 0;
    let mut sizes = sizes;
    while !sizes.is_empty() {
        let mut len = 0;
        let mut count = 0;
        for &size in sizes {
            if count > 0 && (len + size as usize > max || count == u32::MAX as usize) {
                break;
            }
            len += size as usize;
            count += 1;
        }
        out.control.encode(
            &Message::Entries {
                count: count as u32,
            },
            &mut out.buf,
        )?;
        out.buf.extend_from_slice(&frames[start..start + len]);
        start += len;
        sizes = &sizes[count..];
    }
    if let Some(progress) = progress {
        out.control
            .encode(&Message::Heartbeat { progress }, &mut out.buf)?;
    }
    Ok(())
}

fn read_loop(link: &Link<State>, mut decoder: FrameDecoder) {
    let mut control = ControlSeq::after_handshake();
    let mut input = BufReader::new(StampingReader {
        stream: &link.stream,
        live: &link.live,
    });
    let err = loop {
        let msg = match decoder.read_value::<Message, _>(&mut input, control.take()) {
            Ok(Some((msg, _))) => msg,
            Ok(None) => break ChannelError::Closed { peer: link.peer },
            Err(e) => break ChannelError::from_frame(link.peer, e),
        };
        let (received, replayed_seq, replayed_exits) = match msg {
            Message::Ack {
                received,
                replayed_seq,
                replayed_exits,
            } => (received, replayed_seq, replayed_exits),
            Message::Goodbye { reason } => {
                break ChannelError::PeerLeft {
                    peer: link.peer,
                    reason,
                }
            }
            other => {
                break ChannelError::protocol(
                    link.peer,
                    format!(
                        "sent a {} message; a backup sends only acks and its goodbye",
                        other.name()
                    ),
                )
            }
        };
        if let Err(e) = on_ack(link, received, replayed_seq, replayed_exits) {
            break e;
        }
    };
    link.fail(&mut link.lock(), err);
}

fn on_ack(
    link: &Link<State>,
    received: u64,
    replayed_seq: u64,
    replayed_exits: u64,
) -> Result<(), ChannelError> {
    let mut guard = link.lock();
    let st = &mut *guard;
    if received < st.acked || received > st.written_seq {
        return Err(ChannelError::protocol(
            link.peer,
            format!(
                "acknowledged entry {received}, but {} was acknowledged before and {} is the last written",
                st.acked, st.written_seq
            ),
        ));
    }
    if replayed_seq > received {
        return Err(ChannelError::protocol(
            link.peer,
            format!("reported entry {replayed_seq} replayed but only {received} received"),
        ));
    }
    let now = Instant::now();
    let moved = received > st.acked;
    if moved {
        if let Some((bytes_end, at)) = st.record(received).map(|s| (s.bytes_end, s.at)) {
            st.acked_bytes = bytes_end;
            st.rtt.sample(now, now.duration_since(at));
        }
        st.acked = received;
    }
    let replay_moved = replayed_seq > st.replayed_seq || replayed_exits > st.replayed_exits;
    st.replayed_seq = st.replayed_seq.max(replayed_seq);
    st.replayed_exits = st.replayed_exits.max(replayed_exits);
    st.stall_since = if st.acked <= st.replayed_seq {
        None
    } else if replay_moved {
        Some(now)
    } else {
        Some(st.stall_since.unwrap_or(now))
    };
    st.trim(link.config.window_entries);
    let hook = st.on_ack.clone().filter(|_| moved);
    let write_gaps = st.write_gaps(link.config.failure_timeout / 2, now);
    drop(guard);
    link.wake_waiters();
    if let Some(hook) = hook {
        hook(received, write_gaps);
    }
    Ok(())
}
