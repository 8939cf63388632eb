//! Where a guest's outputs go: the console, the network, a capture file;
//! directly on a plain run, or through a gate that holds each output until
//! the backup has acknowledged every log entry up to it (the output rule of
//! VMware FT).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logchannel::LogSender;
use logchannel::OutputKind;

use crate::host::emitter::Emitter;
use crate::host::histogram::Histogram;
use crate::live::Outputs;

/// How often the gate's thread looks at whether the primary has gone on
/// alone (and, closing, whether the last outputs were released).
const ACK_POLL: Duration = Duration::from_millis(20);
/// How long a closing gate waits for the acknowledgements of the outputs it
/// still holds; outputs never acknowledged are dropped, never released.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

struct Held {
    seq: u64,
    kind: OutputKind,
    bytes: Vec<u8>,
    since: Instant,
}

/// The outputs held, in order, and where they go once released.
struct HeldOutputs {
    queue: VecDeque<Held>,
    /// Taken back by `finish`.
    emitter: Option<Emitter>,
}

struct Shared {
    held: Mutex<HeldOutputs>,
    /// Wakes the gate's thread: a console line is acknowledged, or the
    /// gate closes. It looks at `alone` every `ACK_POLL` on its own.
    wake: Condvar,
    /// The backup's cumulative ack, as the ack reader last saw it.
    acked: AtomicU64,
    alone: Arc<AtomicBool>,
    closing: AtomicBool,
    /// How long each released output was held.
    hold: Arc<Histogram>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HeldOutputs> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Emits, in order, every held output up to entry `acked` (all of them
    /// once the primary is alone). The channel's ack reader leaves console
    /// lines, and whatever follows them, to the gate's thread: a console on
    /// a stalled pipe may block, and the reader must go on reading acks.
    fn release(&self, held: &mut HeldOutputs, acked: u64, by_ack_reader: bool) {
        let alone = self.alone.load(Ordering::SeqCst);
        while let Some(front) = held.queue.front() {
            if !(alone || front.seq <= acked) {
                break;
            }
            if by_ack_reader && front.kind == OutputKind::Console {
                self.wake.notify_all();
                break;
            }
            let Some(h) = held.queue.pop_front() else {
                break;
            };
            // Outputs of a primary already alone were never held.
            if h.seq != 0 {
                self.hold.record(h.since.elapsed().as_micros() as u64);
            }
            if let Some(emitter) = &mut held.emitter {
                if let Err(e) = emitter.emit(h.kind, &h.bytes) {
                    tracing::warn!("releasing an output failed: {e}");
                }
            }
        }
    }
}

/// Holds outputs until the backup acknowledges them. They are released by
/// the channel's ack reader as each ack arrives (no thread to wake on the
/// output's path), or by the gate's own thread once the primary goes on
/// alone; the guest keeps running meanwhile.
pub struct OutputGate {
    shared: Arc<Shared>,
    sender: Arc<LogSender>,
    thread: Option<JoinHandle<()>>,
}

impl OutputGate {
    /// `alone` becomes true when the primary has won the right to go on
    /// without a backup: held outputs are then released at once. `hold`
    /// gets how long each output waited.
    pub fn new(
        emitter: Emitter,
        sender: Arc<LogSender>,
        alone: Arc<AtomicBool>,
        hold: Arc<Histogram>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            held: Mutex::new(HeldOutputs {
                queue: VecDeque::new(),
                emitter: Some(emitter),
            }),
            wake: Condvar::new(),
            acked: AtomicU64::new(0),
            alone,
            closing: AtomicBool::new(false),
            hold,
        });
        let on_ack = Arc::clone(&shared);
        sender.on_ack(move |acked| {
            on_ack.acked.store(acked, Ordering::SeqCst);
            on_ack.release(&mut on_ack.lock(), acked, true);
        });
        let gate = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ftvm-output-gate".into())
            .spawn(move || watch(&gate))?;
        Ok(OutputGate {
            shared,
            sender,
            thread: Some(thread),
        })
    }

    pub fn hold(&self, seq: u64, kind: OutputKind, bytes: &[u8]) {
        // Held from now: the ack can come before the output is queued.
        let since = Instant::now();
        // The output's entry goes to the backup now rather than after the
        // writer thread wakes; a failure is the gate thread's to notice.
        if seq != 0 {
            let _ = self.sender.flush();
        }
        let mut held = self.shared.lock();
        held.queue.push_back(Held {
            seq,
            kind,
            bytes: bytes.to_vec(),
            since,
        });
        // The ack may have come before the output was queued.
        self.shared.release(&mut held, self.sender.acked(), false);
    }

    /// Waits until every submitted output is released or, after
    /// `CLOSE_WAIT`, dropped; returns the emitter.
    fn take_emitter(mut self) -> Option<Emitter> {
        self.close();
        self.shared.lock().emitter.take()
    }

    fn close(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The gate's thread: releases acknowledged console lines, everything
/// once the primary is alone, and on closing waits up to `CLOSE_WAIT` for
/// the last acknowledgements. Outputs never acknowledged are dropped, never
/// released.
fn watch(shared: &Shared) {
    let mut give_up_at = None;
    let mut held = shared.lock();
    loop {
        shared.release(&mut held, shared.acked.load(Ordering::SeqCst), false);
        if shared.closing.load(Ordering::SeqCst) {
            let at = *give_up_at.get_or_insert_with(|| Instant::now() + CLOSE_WAIT);
            if held.queue.is_empty() {
                return;
            }
            if Instant::now() >= at {
                for h in held.queue.drain(..) {
                    tracing::warn!(
                        "dropped an output the backup never acknowledged (entry #{})",
                        h.seq
                    );
                }
                return;
            }
        }
        held = shared
            .wake
            .wait_timeout(held, ACK_POLL)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

impl Drop for OutputGate {
    fn drop(&mut self) {
        self.close();
    }
}

impl Outputs for OutputGate {
    fn submit(&mut self, seq: u64, kind: OutputKind, bytes: &[u8]) -> std::io::Result<()> {
        self.hold(seq, kind, bytes);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Option<Emitter> {
        (*self).take_emitter()
    }
}
