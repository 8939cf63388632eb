//! Stopping a running vCPU from another thread. On this platform setting
//! `immediate_exit` alone does not stop a vCPU inside `KVM_RUN`; a signal
//! does (KVM returns EINTR), so a stop request is a flag, a wake-up for the
//! idle wait, and a signal to the vCPU thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

/// How often a stop request kicks a vCPU that has not stopped yet.
const KICK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

#[derive(Debug, Clone)]
pub struct StopSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requested: AtomicBool,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    /// The vCPU thread while it runs the vCPU. The lock is held while
    /// signalling, so the thread cannot finish between lookup and signal.
    vcpu_thread: Mutex<Option<libc::pthread_t>>,
}

impl Default for StopSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl StopSignal {
    pub fn new() -> Self {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        StopSignal {
            inner: Arc::new(Inner {
                requested: AtomicBool::new(false),
                wake_tx,
                wake_rx,
                vcpu_thread: Mutex::new(None),
            }),
        }
    }

    /// Asks the run loop to stop at its next synchronous exit. The vCPU is
    /// kicked now and again every few milliseconds while it runs, because a
    /// guest that makes no synchronous exit would otherwise keep it inside
    /// `KVM_RUN`.
    pub fn request(&self) {
        let first = !self.inner.requested.swap(true, Ordering::SeqCst);
        let _ = self.inner.wake_tx.try_send(());
        self.kick();
        if first {
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("ftvm-stop-kicker".into())
                .spawn(move || {
                    while me.vcpu_running() {
                        std::thread::sleep(KICK_INTERVAL);
                        me.kick();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the stop kicker: {e}");
            }
        }
    }

    fn vcpu_running(&self) -> bool {
        self.inner
            .vcpu_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }

    fn kick(&self) {
        let thread = self
            .inner
            .vcpu_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: the id was stored by the vCPU thread itself, which
            // clears it (under this lock) before it stops running the vCPU,
            // so the thread is alive; the signal has a no-op handler
            // installed by `enter_vcpu_thread`.
            unsafe {
                libc::pthread_kill(thread, kick_signal());
            }
        }
    }

    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Becomes ready when a stop is requested; for `select!` in idle waits.
    pub fn wake(&self) -> &Receiver<()> {
        &self.inner.wake_rx
    }

    /// Marks the calling thread as the vCPU thread until the guard drops.
    pub fn enter_vcpu_thread(&self) -> std::io::Result<VcpuThreadGuard> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self
            .inner
            .vcpu_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(me);
        Ok(VcpuThreadGuard { stop: self.clone() })
    }
}

pub struct VcpuThreadGuard {
    stop: StopSignal,
}

impl Drop for VcpuThreadGuard {
    fn drop(&mut self) {
        *self
            .stop
            .inner
            .vcpu_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}
