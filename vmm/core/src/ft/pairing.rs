//! Which backup a primary has right now: none (it runs alone, its outputs
//! leave at once), or one that restored the state the primary sent at a
//! cut and is fed the log from there. The primary's log sink, its output
//! gate and the transfer that brings up a backup share this one record, so
//! that they agree on when the output rule is in force.
//!
//! Sequence numbers go on across backups: the first entry a new backup
//! gets follows the last one any earlier backup got, so that an
//! acknowledgement from one connection can never be read as one for an
//! output logged on another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use logchannel::LogSender;

use crate::ft::standing::Standing;

/// A backup that holds the primary's state: its channel and the view that
/// names it.
#[derive(Clone)]
pub struct Paired {
    pub sender: Arc<LogSender>,
    pub view: u64,
}

type AttachHook = Box<dyn Fn(&Arc<LogSender>) + Send + Sync>;

pub struct Pairing {
    standing: Arc<Standing>,
    current: Mutex<Option<Paired>>,
    /// Bumped at every change, so that readers on the vCPU's path notice
    /// one with a load instead of taking the lock.
    generation: AtomicU64,
    /// The sequence number the next backup's first entry gets.
    next_seq: AtomicU64,
    /// Called with each new backup's channel (the output gate listens to
    /// its acknowledgements).
    on_attach: Mutex<Vec<AttachHook>>,
}

impl Pairing {
    /// A primary that starts alone.
    pub fn alone(standing: Arc<Standing>) -> Arc<Pairing> {
        standing.go_alone();
        Arc::new(Pairing {
            standing,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            next_seq: AtomicU64::new(1),
            on_attach: Mutex::new(Vec::new()),
        })
    }

    pub fn standing(&self) -> &Arc<Standing> {
        &self.standing
    }

    pub fn current(&self) -> Option<Paired> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The first sequence number of the next backup's log.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }

    /// Entry `seq` went to the current backup.
    pub fn sent(&self, seq: u64) {
        self.next_seq.fetch_max(seq + 1, Ordering::SeqCst);
    }

    pub fn on_attach(&self, hook: impl Fn(&Arc<LogSender>) + Send + Sync + 'static) {
        self.on_attach
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(hook));
    }

    /// The backup of `view` restored the state: from now on the output
    /// rule holds.
    pub fn attach(&self, sender: Arc<LogSender>, view: u64) {
        for hook in self
            .on_attach
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            hook(&sender);
        }
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Paired { sender, view });
        self.standing.pair();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The primary goes on alone (it won test-and-set after its backup
    /// failed or left): everything held is released, nothing more is sent,
    /// and a backup still connected learns it from the closed channel.
    pub fn detach(&self) {
        let old = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.standing.go_alone();
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(p) = old {
            p.sender.close();
        }
    }
}
