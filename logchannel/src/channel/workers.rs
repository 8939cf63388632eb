//! The threads behind one end of a channel, and stopping them without
//! hanging the thread that drops the channel.

use super::error::ChannelError;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long dropping a channel waits for its threads. They only block in
/// socket calls that the drop has already shut down, so this is a bound on
/// a bug, not a wait that happens.
const JOIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Workers {
    handles: Vec<JoinHandle<()>>,
    /// Never sent on: it disconnects when the last thread's sender drops,
    /// which `std`'s join cannot wait for with a timeout.
    done: Receiver<()>,
    done_tx: Option<Sender<()>>,
}

impl Workers {
    pub(crate) fn new() -> Workers {
        let (done_tx, done) = crossbeam_channel::bounded(0);
        Workers {
            handles: Vec::new(),
            done,
            done_tx: Some(done_tx),
        }
    }

    pub(crate) fn spawn(
        &mut self,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), ChannelError> {
        let done_tx = self.done_tx.clone();
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                f();
                drop(done_tx);
            })
            .map_err(|e| ChannelError::Spawn(Arc::new(e)))?;
        self.handles.push(handle);
        Ok(())
    }

    /// Waits (boundedly) for every thread, once the caller has told them to
    /// stop.
    pub(crate) fn join(&mut self) {
        self.done_tx = None;
        match self.done.recv_timeout(JOIN_TIMEOUT) {
            Err(RecvTimeoutError::Disconnected) => {
                for h in self.handles.drain(..) {
                    if h.join().is_err() {
                        tracing::error!("a log channel thread panicked");
                    }
                }
            }
            _ => tracing::warn!(
                "log channel threads did not stop within {JOIN_TIMEOUT:?}; leaving them detached"
            ),
        }
    }
}
