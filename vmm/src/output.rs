//! Where a guest's outputs go: the console, the network, a capture file;
//! directly on a plain run, or through a gate that holds each output until
//! the backup has acknowledged every log entry up to it (the output rule of
//! VMware FT).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use logchannel::LogSender;
use logchannel::OutputKind;

use crate::capture::Capture;
use crate::net_backend::NetBackend;

/// How long the gate waits for an ack before it looks again at whether the
/// primary has gone on alone.
const ACK_POLL: Duration = Duration::from_millis(20);
/// How long a closing gate waits for the acknowledgements of the outputs it
/// still holds; outputs never acknowledged are dropped, never released.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

pub struct Emitter {
    pub net: Option<Arc<NetBackend>>,
    pub console: Box<dyn Write + Send>,
    pub capture: Option<Capture>,
    /// Frames released to the network, for status reports.
    pub served: Arc<AtomicU64>,
}

impl Emitter {
    pub fn emit(&mut self, kind: OutputKind, bytes: &[u8]) -> std::io::Result<()> {
        match kind {
            OutputKind::Console => {
                if let Err(e) = self
                    .console
                    .write_all(bytes)
                    .and_then(|_| self.console.flush())
                {
                    tracing::warn!("writing the guest console failed: {e}");
                }
            }
            OutputKind::Transmit => {
                if let Some(c) = &mut self.capture {
                    c.write(bytes)?;
                }
                if let Some(net) = &self.net {
                    net.transmit(bytes);
                }
                self.served.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.console.flush();
        match &mut self.capture {
            Some(c) => c.flush(),
            None => Ok(()),
        }
    }
}

struct Held {
    seq: u64,
    kind: OutputKind,
    bytes: Vec<u8>,
}

/// Holds outputs until the backup acknowledges them, then emits them in
/// order from its own thread, so the guest keeps running meanwhile.
pub struct OutputGate {
    tx: Option<Sender<Held>>,
    thread: Option<JoinHandle<Emitter>>,
    /// Set when the gate closes: from then on, outputs whose
    /// acknowledgement has not come by the close deadline are dropped.
    closing: Arc<AtomicBool>,
}

impl OutputGate {
    /// `alone` becomes true when the primary has won the right to go on
    /// without a backup: held outputs are then released at once.
    pub fn new(
        mut emitter: Emitter,
        sender: Arc<LogSender>,
        alone: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (tx, rx): (Sender<Held>, Receiver<Held>) = crossbeam_channel::unbounded();
        let closing = Arc::new(AtomicBool::new(false));
        let closing_seen = closing.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-output-gate".into())
            .spawn(move || {
                let mut give_up_at = None;
                for held in rx {
                    let released = loop {
                        if alone.load(Ordering::SeqCst) {
                            break true;
                        }
                        if closing_seen.load(Ordering::SeqCst) {
                            let at = *give_up_at.get_or_insert_with(|| Instant::now() + CLOSE_WAIT);
                            if Instant::now() >= at {
                                break false;
                            }
                        }
                        match sender.wait_acked(held.seq, ACK_POLL) {
                            Ok(true) => break true,
                            Ok(false) => {}
                            // The backup failed: the output stays held until
                            // the primary wins test-and-set (alone) or stops.
                            Err(_) => std::thread::sleep(ACK_POLL),
                        }
                    };
                    if !released {
                        tracing::warn!(
                            "dropped an output the backup never acknowledged (entry #{})",
                            held.seq
                        );
                        continue;
                    }
                    if let Err(e) = emitter.emit(held.kind, &held.bytes) {
                        tracing::warn!("releasing an output failed: {e}");
                    }
                }
                emitter
            })?;
        Ok(OutputGate {
            tx: Some(tx),
            thread: Some(thread),
            closing,
        })
    }

    pub fn submit(&self, seq: u64, kind: OutputKind, bytes: &[u8]) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Held {
                seq,
                kind,
                bytes: bytes.to_vec(),
            });
        }
    }

    /// Waits until every submitted output is released and returns the
    /// emitter.
    pub fn finish(mut self) -> Option<Emitter> {
        self.tx = None;
        self.closing.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for OutputGate {
    fn drop(&mut self) {
        self.tx = None;
        self.closing.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
