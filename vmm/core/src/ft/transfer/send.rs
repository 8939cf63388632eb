//! The primary's side of a state transfer. A joiner thread waits for the
//! arbiter to name a backup, takes its connection on the log channel's
//! listener, and runs the pre-copy rounds while the guest goes on; then it
//! hands the connection to the vCPU thread, which makes the cut at its next
//! synchronous exit (the [`Donor`]), waits for the backup's verdict, and
//! starts the log channel. The primary acknowledges the view to the
//! arbiter only once the backup has verified what it restored, so until
//! then the backup can never take over.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use logchannel::{
    ChannelConfig, ChannelError, Cut, Handshaken, Hello, LogSender, Position, Role, TransferError,
    TransferWriter, Verdict,
};
use vm_memory::{Bytes, GuestAddress};

use crate::ft::membership::Membership;
use crate::ft::pairing::Pairing;
use crate::ft::transfer::{silence_limit, PAGE_SIZE};
use crate::host::events::{Events, ServerEvent, ServerRole, StatusBoard};
use crate::live::Live;
use crate::machine::memory::GuestMemory;
use crate::run::digest;
use crate::run::dirty::{DirtyLog, DirtyReader};
use crate::run::run_loop::{Machine, RunError};
use crate::run::snapshot::MachineState;
use crate::run::stop::StopSignal;

/// A round that finds this few dirty pages is the last before the cut: at
/// most 256 KiB more go out while the guest stands still.
const CUT_PAGES: usize = 64;
/// A guest that dirties pages as fast as they are sent never converges;
/// after this many rounds the cut sends whatever is dirty.
const MAX_ROUNDS: u32 = 30;
/// How the joiner thread looks again at the view and at its backup.
const POLL: Duration = Duration::from_millis(10);

/// What the primary tells a backup in its handshake, besides the view.
#[derive(Clone)]
pub struct JoinHello {
    pub vm_id: String,
    pub image_hash: [u8; 32],
    pub mem_size: u64,
    pub workload: String,
}

/// Everything the joiner thread needs.
pub struct JoinerParts {
    pub listener: TcpListener,
    pub membership: Arc<Membership>,
    pub pairing: Arc<Pairing>,
    pub hello: JoinHello,
    pub config: ChannelConfig,
    pub mem: GuestMemory,
    pub dirty: Arc<DirtyLog>,
    pub events: Arc<Events>,
    pub board: Arc<StatusBoard>,
    pub stop: StopSignal,
}

/// How a transfer went, for the events and the benchmark.
#[derive(Debug, Clone)]
pub struct TransferDone {
    pub rounds: u32,
    pub pages: u64,
    pub bytes: u64,
    pub pause: Duration,
    pub total: Duration,
}

/// A transfer whose pre-copy is done, waiting for the vCPU thread's cut.
struct CutJob {
    handshaken: Handshaken,
    writer: TransferWriter<Outgoing>,
    view: u64,
    started: Instant,
    rounds: u32,
    dirty: Arc<DirtyLog>,
    mem: GuestMemory,
    silence: Duration,
    reply: Sender<Result<TransferDone, String>>,
}

/// The vCPU thread's side: takes the cut when a transfer is ready.
pub struct Donor {
    jobs: Receiver<CutJob>,
    pairing: Arc<Pairing>,
    membership: Arc<Membership>,
    stop: StopSignal,
    quit: Arc<AtomicBool>,
    /// Until when the guest waits for its first backup before it runs
    /// (`--backup-wait`), if it does.
    first_wait: Option<Instant>,
}

impl Donor {
    /// Starts the joiner thread. With `backup_wait`, the guest does not
    /// run before a backup has joined or that long has passed (or the
    /// run's `time_limit`).
    pub fn start(
        parts: JoinerParts,
        backup_wait: Option<Duration>,
        time_limit: Option<Duration>,
    ) -> std::io::Result<Donor> {
        let now = Instant::now();
        let first_wait = match (backup_wait, time_limit) {
            (Some(w), Some(t)) => Some(now + w.min(t)),
            (w, _) => w.map(|w| now + w),
        };
        let (jobs_tx, jobs) = bounded(1);
        let quit = Arc::new(AtomicBool::new(false));
        let donor = Donor {
            jobs,
            pairing: Arc::clone(&parts.pairing),
            membership: Arc::clone(&parts.membership),
            stop: parts.stop.clone(),
            quit: Arc::clone(&quit),
            first_wait,
        };
        std::thread::Builder::new()
            .name("ftvm-joiner".into())
            .spawn(move || Joiner { parts, quit }.run(&jobs_tx))?;
        Ok(donor)
    }

    /// At a synchronous exit whose handling is complete (the guest is
    /// about to run): the cut, if a transfer waits for it. A transfer that
    /// fails here costs the primary nothing but the pause: it goes on
    /// alone, and the joiner thread says why.
    pub fn at_exit(&mut self, m: &mut Machine, pos: Position, live: &Live) -> Result<(), RunError> {
        let Some(job) = self.next_job() else {
            return Ok(());
        };
        let view = job.view;
        let reply = job.reply.clone();
        // The arbiter may have named another backup while pre-copy ran: a
        // backup of an old view must never hold this primary's outputs.
        let current = self.membership.view_number();
        if current != view {
            let _ = reply.send(Err(format!(
                "view {view} was replaced by view {current} before the cut"
            )));
            return Ok(());
        }
        let next_seq = self.pairing.next_seq();
        match cut(job, m, pos, live, next_seq) {
            Ok((sender, done)) => {
                self.pairing.attach(Arc::new(sender), view);
                let _ = reply.send(Ok(done));
            }
            Err(why) => {
                let _ = reply.send(Err(why));
            }
        }
        Ok(())
    }

    fn next_job(&mut self) -> Option<CutJob> {
        let Some(until) = self.first_wait else {
            return self.jobs.try_recv().ok();
        };
        while self.pairing.current().is_none()
            && Instant::now() < until
            && !self.stop.is_requested()
        {
            if let Ok(job) = self.jobs.recv_timeout(POLL * 5) {
                return Some(job);
            }
        }
        self.first_wait = None;
        self.jobs.try_recv().ok()
    }

    /// The run is over: the joiner takes no more backups.
    pub fn stop(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }
}

impl Drop for Donor {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Joiner {
    parts: JoinerParts,
    quit: Arc<AtomicBool>,
}

impl Joiner {
    fn quitting(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
            || self.parts.stop.is_requested()
            || self.parts.membership.deposed()
    }

    fn run(&self, jobs: &Sender<CutJob>) {
        let p = &self.parts;
        // The latest view whose backup this primary has dealt with (joined,
        // or failed to): the next transfer is for a later view.
        let mut done_with = 0;
        while !self.quitting() {
            if p.pairing.current().is_some() {
                std::thread::sleep(POLL);
                continue;
            }
            let view = p.membership.view();
            let backup = view
                .backup
                .clone()
                .filter(|_| p.membership.is_me(view.primary.as_ref()) && view.number > done_with);
            let Some(backup) = backup else {
                std::thread::sleep(POLL);
                continue;
            };
            // Seen, not vouched for: the backup holds nothing yet, and the
            // arbiter may replace it if it never comes up.
            p.membership.see(view.number);
            let hello = Hello::new(
                Role::Primary,
                p.hello.vm_id.clone(),
                view.number,
                p.hello.image_hash,
                p.hello.mem_size,
                p.hello.workload.clone(),
                p.pairing.next_seq(),
            );
            let cancelled = || self.quitting() || p.membership.view_number() != view.number;
            let handshaken = match LogSender::accept_handshaken(
                &p.listener,
                hello,
                p.config,
                Duration::from_secs(3600),
                &cancelled,
            ) {
                Ok(h) => h,
                Err(ChannelError::Cancelled { .. } | ChannelError::AcceptTimeout { .. }) => {
                    continue
                }
                Err(e) => {
                    tracing::warn!("the backup of view {} could not connect: {e}", view.number);
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            p.events.emit(
                ServerEvent::TransferStarted {
                    view: view.number,
                    backup: backup.id.clone(),
                },
                Some(format!(
                    "backup {} connected for view {}; sending the VM's state",
                    backup.id, view.number
                )),
            );
            done_with = view.number;
            let outcome = self.transfer(handshaken, view.number, &cancelled, jobs);
            p.board.transfer_round.store(0, Ordering::Relaxed);
            p.board.transfer_bytes.store(0, Ordering::Relaxed);
            match outcome {
                Some(Ok(done)) => {
                    p.events.emit(
                        ServerEvent::Role {
                            role: ServerRole::Primary,
                            view: view.number,
                            backup: Some(backup.id.clone()),
                        },
                        None,
                    );
                    p.events.emit(
                        ServerEvent::Protected {
                            view: view.number,
                            backup: backup.id.clone(),
                            rounds: done.rounds,
                            pages: done.pages,
                            bytes: done.bytes,
                            pause_ms: done.pause.as_secs_f64() * 1e3,
                            transfer_ms: done.total.as_secs_f64() * 1e3,
                        },
                        Some(format!(
                            "protected again: backup {} holds the state of view {} (pause {:.1} ms, {:.1} MiB in {} rounds, {:.0} ms)",
                            backup.id,
                            view.number,
                            done.pause.as_secs_f64() * 1e3,
                            done.bytes as f64 / (1 << 20) as f64,
                            done.rounds,
                            done.total.as_secs_f64() * 1e3
                        )),
                    );
                    // Only after the events: the arbiter may let the new
                    // backup take over as soon as it hears of the
                    // acknowledgement, so whoever reads the events (the
                    // chaos campaign's check that nobody goes live without
                    // a state its primary vouched for) must find them
                    // first, even when this process is stopped right here.
                    p.membership.acknowledge(view.number);
                }
                Some(Err(why)) => {
                    p.dirty.stop(DirtyReader::Transfer);
                    p.events.emit(
                        ServerEvent::TransferFailed {
                            view: view.number,
                            detail: why.clone(),
                        },
                        Some(format!(
                            "the state transfer to {} failed ({why}); serving alone",
                            backup.id
                        )),
                    );
                }
                None => return,
            }
        }
    }

    /// Pre-copy, then the cut by the vCPU thread. `None`: the run ended
    /// meanwhile.
    fn transfer(
        &self,
        handshaken: Handshaken,
        view: u64,
        cancelled: &dyn Fn() -> bool,
        jobs: &Sender<CutJob>,
    ) -> Option<Result<TransferDone, String>> {
        let started = Instant::now();
        let (writer, rounds) = match self.precopy(&handshaken, view, cancelled) {
            Ok(done) => done,
            Err(why) => return Some(Err(why)),
        };
        let (reply, outcome) = bounded(1);
        let job = CutJob {
            handshaken,
            writer,
            view,
            started,
            rounds,
            dirty: Arc::clone(&self.parts.dirty),
            mem: self.parts.mem.clone(),
            silence: silence_limit(self.parts.config.failure_timeout),
            reply,
        };
        jobs.send(job).ok()?;
        outcome.recv().ok()
    }

    fn precopy(
        &self,
        handshaken: &Handshaken,
        view: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(TransferWriter<Outgoing>, u32), String> {
        let p = &self.parts;
        let silence = silence_limit(p.config.failure_timeout);
        let stream = handshaken
            .stream()
            .try_clone()
            .map_err(|e| format!("cannot use the connection: {e}"))?;
        // The writer holds at most one message of pages (256 KiB): that
        // bounds what a transfer takes on the primary.
        let outgoing = Outgoing {
            stream,
            stall: silence,
        };
        let mut writer = TransferWriter::new(outgoing).stall_timeout(silence);
        let failed = |e: TransferError| format!("sending to the backup: {e}");
        writer
            .begin(p.hello.mem_size, PAGE_SIZE as u32)
            .map_err(failed)?;
        // Pages written from here on are the next round's.
        p.dirty
            .start(DirtyReader::Transfer)
            .map_err(|e| format!("reading the dirty log: {e}"))?;
        let mut buf = vec![0u8; PAGE_SIZE];
        let touched = p
            .dirty
            .touched()
            .map_err(|e| format!("reading the dirty log: {e}"))?;
        let mut sent = 0;
        for (i, &page) in touched.iter().enumerate() {
            read_page(&p.mem, page, &mut buf);
            // The joining backup starts from zeroed memory, so a page
            // written and zeroed again need not go.
            if buf.iter().all(|b| *b == 0) {
                continue;
            }
            writer.page(page, &buf).map_err(failed)?;
            sent += 1;
            if i % 1024 == 0 && cancelled() {
                return Err(format!("view {view} was replaced during pre-copy"));
            }
        }
        let mut round = writer.end_round().map_err(failed)?;
        self.round_done(view, round, sent, writer.bytes_written());
        while round < MAX_ROUNDS {
            let dirty = p
                .dirty
                .take(DirtyReader::Transfer)
                .map_err(|e| format!("reading the dirty log: {e}"))?;
            send_pages(&mut writer, &p.mem, &dirty, &mut buf).map_err(failed)?;
            round = writer.end_round().map_err(failed)?;
            self.round_done(view, round, dirty.len() as u64, writer.bytes_written());
            if dirty.len() <= CUT_PAGES {
                break;
            }
            if cancelled() {
                return Err(format!("view {view} was replaced during pre-copy"));
            }
        }
        writer.flush().map_err(failed)?;
        wait_drained(&writer.get_ref().stream, silence)?;
        Ok((writer, round))
    }

    fn round_done(&self, view: u64, round: u32, pages: u64, bytes: u64) {
        let p = &self.parts;
        p.board.transfer_round.store(round, Ordering::Relaxed);
        p.board.transfer_bytes.store(bytes, Ordering::Relaxed);
        p.events.emit(
            ServerEvent::TransferRound {
                view,
                round,
                pages,
                bytes,
            },
            None,
        );
    }
}

/// The transfer's socket for writing, with a stall limit that holds
/// however often a signal interrupts a write: the cut is written on the
/// vCPU thread, which the run loop's kicker interrupts with signals, and a
/// socket's own write timeout starts again with every interrupted call.
struct Outgoing {
    stream: TcpStream,
    stall: Duration,
}

impl std::io::Write for Outgoing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let until = Instant::now() + self.stall;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.stream.set_write_timeout(Some(left))?;
            match self.stream.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Waits until the backup has taken in what pre-copy sent, down to a
/// cut's worth of bytes, so that the guest never stands still at the cut
/// while a slow link delivers earlier rounds (the verdict can only come
/// after them). Gives up when nothing drains for `silence`.
fn wait_drained(stream: &TcpStream, silence: Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let limit = CUT_PAGES * PAGE_SIZE;
    let mut last = usize::MAX;
    let mut since = Instant::now();
    loop {
        let mut unsent: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int, the bytes the socket holds that
        // the peer has not acknowledged, into `unsent`; the fd is open for
        // as long as `stream` lives.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut unsent) };
        if rc != 0 {
            // Without the count, the cut waits for the data as before.
            return Ok(());
        }
        let unsent = usize::try_from(unsent).unwrap_or(0);
        if unsent <= limit {
            return Ok(());
        }
        if unsent < last {
            last = unsent;
            since = Instant::now();
        } else if since.elapsed() > silence {
            return Err(format!(
                "the backup took in nothing for {} ms ({unsent} bytes still on their way)",
                silence.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A page of guest memory. The guest may be writing it meanwhile, so the
/// copy can be torn; such a page is dirty and goes again in a later round
/// or at the cut.
fn read_page(mem: &GuestMemory, page: u64, buf: &mut [u8]) {
    if mem
        .read_slice(buf, GuestAddress(page * PAGE_SIZE as u64))
        .is_err()
    {
        buf.fill(0);
    }
}

fn send_pages(
    writer: &mut TransferWriter<Outgoing>,
    mem: &GuestMemory,
    pages: &[u64],
    buf: &mut [u8],
) -> Result<(), TransferError> {
    for &page in pages {
        read_page(mem, page, buf);
        writer.page(page, buf)?;
    }
    Ok(())
}

/// The cut, on the vCPU thread at a synchronous exit: the last dirty pages,
/// the machine state and the digest, then the backup's verdict, then the
/// log channel. The guest stands still throughout.
fn cut(
    job: CutJob,
    m: &mut Machine,
    pos: Position,
    live: &Live,
    next_seq: u64,
) -> Result<(LogSender, TransferDone), String> {
    let paused = Instant::now();
    let CutJob {
        mut handshaken,
        mut writer,
        started,
        rounds,
        dirty,
        mem,
        silence,
        ..
    } = job;
    let failed = |e: TransferError| format!("sending the cut: {e}");
    // Capturing completes the exit's instruction (an `in` takes its value,
    // a `rep ins` writes memory), so it comes first, while the transfer
    // still collects dirty pages; the digest is of the state after it,
    // which is what the backup restores and what both run on from.
    let state = MachineState::capture(m, live.clock_ns(), live.pending_datagrams())
        .map_err(|e| format!("capturing the machine state: {e}"))?;
    let last = dirty
        .take(DirtyReader::Transfer)
        .map_err(|e| format!("reading the dirty log: {e}"))?;
    dirty.stop(DirtyReader::Transfer);
    let mut buf = vec![0u8; PAGE_SIZE];
    send_pages(&mut writer, &mem, &last, &mut buf).map_err(failed)?;
    let regs = digest::registers(&state.vcpu.regs);
    let (_, mem_hash) = m.state().map_err(|e| format!("digest at the cut: {e}"))?;
    let machine = state
        .encode()
        .map_err(|e| format!("encoding the machine state: {e}"))?;
    writer
        .cut(&Cut {
            exits: pos.exits,
            rip: regs.rip,
            next_seq,
            regs,
            mem_hash,
            machine,
        })
        .map_err(failed)?;
    let bytes = writer.bytes_written();
    let pages = writer.pages_written();
    drop(writer);
    let verdict = handshaken
        .read_verdict(silence)
        .map_err(|e| format!("waiting for the backup's verdict: {e}"))?;
    match verdict {
        Verdict::Restored { mem_hash: theirs } if theirs == mem_hash => {}
        Verdict::Restored { mem_hash: theirs } => {
            return Err(format!(
            "the backup's memory hash {theirs:#018x} differs from this primary's {mem_hash:#018x}"
        ))
        }
        Verdict::Refused { reason } => {
            return Err(format!("the backup refused the state: {reason}"))
        }
    }
    let pause = paused.elapsed();
    let sender = LogSender::start(handshaken, next_seq)
        .map_err(|e| format!("starting the log channel: {e}"))?;
    Ok((
        sender,
        TransferDone {
            rounds,
            pages,
            bytes,
            pause,
            total: started.elapsed(),
        },
    ))
}
