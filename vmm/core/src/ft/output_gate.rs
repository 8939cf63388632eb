//! Where a guest's outputs go: the console, the network, a capture file;
//! directly on a plain run, or through a gate that holds each output until
//! the backup has acknowledged every log entry up to it (the output rule of
//! VMware FT), and releases nothing while the primary's standing is in
//! doubt (after a pause, until the arbiter confirms it; once deposed,
//! ever).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logchannel::OutputKind;

use crate::ft::pairing::Pairing;
use crate::ft::standing::{Release, Standing};
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
    /// gate closes. It looks at the standing every `ACK_POLL` on its own.
    wake: Condvar,
    /// The backup's cumulative ack, as the ack reader last saw it.
    acked: AtomicU64,
    standing: Arc<Standing>,
    closing: AtomicBool,
    /// How long each released output was held.
    hold: Arc<Histogram>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HeldOutputs> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Emits, in order, every held output up to entry `acked` (all of them
    /// once the primary is alone; none while the channel's `write_gaps`
    /// are unconfirmed, or once deposed). The channel's ack reader leaves
    /// console lines, and whatever follows them, to the gate's thread: a
    /// console on a stalled pipe may block, and the reader must go on
    /// reading acks.
    fn release(&self, held: &mut HeldOutputs, acked: u64, write_gaps: u64, by_ack_reader: bool) {
        let all = match self.standing.release(write_gaps) {
            Release::Nothing => return,
            Release::Acknowledged => false,
            Release::Everything => true,
        };
        while let Some(front) = held.queue.front() {
            if !(all || front.seq <= acked) {
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
/// alone or its standing is confirmed after a pause; the guest keeps
/// running meanwhile.
pub struct OutputGate {
    shared: Arc<Shared>,
    pairing: Arc<Pairing>,
    thread: Option<JoinHandle<()>>,
}

/// The current backup's cumulative ack and write gaps; alone, nothing is
/// acknowledged and the standing releases everything anyway.
fn channel_state(pairing: &Pairing) -> (u64, u64) {
    pairing
        .current()
        .map_or((0, 0), |p| (p.sender.acked(), p.sender.write_gaps()))
}

impl OutputGate {
    /// The pairing's standing says what may be released: acknowledged
    /// outputs, all of them while the primary runs alone, none while it is
    /// unconfirmed after a pause or once it is deposed. Each backup that
    /// joins is listened to from its first acknowledgement. `hold` gets how
    /// long each output waited.
    pub fn new(
        emitter: Emitter,
        pairing: Arc<Pairing>,
        hold: Arc<Histogram>,
    ) -> std::io::Result<Self> {
        let standing = Arc::clone(pairing.standing());
        let shared = Arc::new(Shared {
            held: Mutex::new(HeldOutputs {
                queue: VecDeque::new(),
                emitter: Some(emitter),
            }),
            wake: Condvar::new(),
            acked: AtomicU64::new(0),
            standing,
            closing: AtomicBool::new(false),
            hold,
        });
        let on_attach = Arc::clone(&shared);
        pairing.on_attach(move |sender| {
            let on_ack = Arc::clone(&on_attach);
            sender.on_ack(move |acked, write_gaps| {
                on_ack.acked.fetch_max(acked, Ordering::SeqCst);
                on_ack.release(&mut on_ack.lock(), acked, write_gaps, true);
            });
        });
        let gate = Arc::clone(&shared);
        let channel = Arc::clone(&pairing);
        let thread = std::thread::Builder::new()
            .name("ftvm-output-gate".into())
            .spawn(move || watch(&gate, &channel))?;
        Ok(OutputGate {
            shared,
            pairing,
            thread: Some(thread),
        })
    }

    pub fn hold(&self, seq: u64, kind: OutputKind, bytes: &[u8]) {
        // Held from now: the ack can come before the output is queued.
        let since = Instant::now();
        // The output's entry goes to the backup now rather than after the
        // writer thread wakes; a failure is the gate thread's to notice.
        if let Some(p) = self.pairing.current().filter(|_| seq != 0) {
            let _ = p.sender.flush();
        }
        let mut held = self.shared.lock();
        held.queue.push_back(Held {
            seq,
            kind,
            bytes: bytes.to_vec(),
            since,
        });
        // The ack may have come before the output was queued.
        let (acked, write_gaps) = channel_state(&self.pairing);
        self.shared.release(&mut held, acked, write_gaps, false);
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

/// The gate's thread: releases acknowledged console lines, what was held
/// across a pause once the primary is confirmed, everything once it is
/// alone, and on closing waits up to `CLOSE_WAIT` for the last
/// acknowledgements. Outputs never acknowledged, and all of a deposed
/// primary's, are dropped, never released.
fn watch(shared: &Shared, pairing: &Pairing) {
    let mut give_up_at = None;
    let mut held = shared.lock();
    loop {
        let acked = shared.acked.load(Ordering::SeqCst);
        let (_, write_gaps) = channel_state(pairing);
        shared.release(&mut held, acked, write_gaps, false);
        if shared.closing.load(Ordering::SeqCst) {
            let at = *give_up_at.get_or_insert_with(|| Instant::now() + CLOSE_WAIT);
            if held.queue.is_empty() {
                return;
            }
            let deposed = shared.standing.deposed();
            if Instant::now() >= at || deposed {
                let why = if deposed {
                    "this primary was deposed"
                } else {
                    "the backup never acknowledged it"
                };
                for h in held.queue.drain(..) {
                    tracing::warn!("dropped an output (entry #{}): {why}", h.seq);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(standing: Arc<Standing>) -> Shared {
        let held = [1, 2]
            .into_iter()
            .map(|seq| Held {
                seq,
                kind: OutputKind::Transmit,
                bytes: format!("frame {seq}\n").into_bytes(),
                since: Instant::now(),
            })
            .collect();
        Shared {
            held: Mutex::new(HeldOutputs {
                queue: held,
                emitter: Some(Emitter {
                    net: None,
                    console: Box::new(std::io::sink()),
                    capture: None,
                    served: Arc::default(),
                }),
            }),
            wake: Condvar::new(),
            acked: AtomicU64::new(0),
            standing,
            closing: AtomicBool::new(false),
            hold: Arc::default(),
        }
    }

    #[test]
    fn an_ack_read_after_a_pause_releases_nothing_until_the_arbiter_confirms() {
        let standing = Arc::new(Standing::default());
        let s = shared(standing.clone());
        // Acknowledged, but the channel counts a pause nobody confirmed.
        s.release(&mut s.lock(), 2, 1, true);
        assert_eq!(s.lock().queue.len(), 2);
        standing.confirm(1);
        s.release(&mut s.lock(), 1, 1, true);
        assert_eq!(s.lock().queue.len(), 1, "entry 1 released once confirmed");
        // Deposed: nothing, ever, even alone.
        standing.depose();
        standing.go_alone();
        s.release(&mut s.lock(), 2, 1, true);
        assert_eq!(s.lock().queue.len(), 1);
    }
}
