//! Kicking the vCPU out of `KVM_RUN` when something is due for a guest that
//! makes no synchronous exit: a live run sets a deadline before every entry
//! into the guest (when the next timer tick is due, or a datagram has
//! waited), and a thread of this module signals the vCPU thread when it
//! passes. On this platform only a signal stops a running vCPU (KVM returns
//! EINTR); setting `immediate_exit` from another thread does not.
//!
//! The kick is a signal of its own (not the stop request's), with a no-op
//! handler. A kick that arrives while the vCPU thread is outside `KVM_RUN`
//! is lost; the deadline, still passed, makes the thread kick again after
//! [`RETRY`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How soon a kick that found the vCPU outside `KVM_RUN` is repeated.
const RETRY: Duration = Duration::from_millis(1);
/// How long the thread sleeps at most; a deadline set earlier than the one
/// it sleeps for wakes it at once.
const IDLE: Duration = Duration::from_millis(100);
const NEVER: u64 = u64::MAX;

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

struct Shared {
    epoch: Instant,
    /// Nanoseconds since `epoch`, or NEVER.
    deadline: AtomicU64,
    quit: AtomicBool,
    kicks: AtomicU64,
}

/// The kicking thread of one vCPU thread, which creates it and drops it
/// (joining the thread) before it ends.
pub struct Kicker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    /// Starts the thread that kicks the calling thread.
    pub fn start() -> std::io::Result<Kicker> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: pthread_self has no preconditions.
        let vcpu_thread = unsafe { libc::pthread_self() };
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            deadline: AtomicU64::new(NEVER),
            quit: AtomicBool::new(false),
            kicks: AtomicU64::new(0),
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-kicker".into())
            .spawn(move || kick_loop(&theirs, vcpu_thread))?;
        Ok(Kicker {
            shared,
            thread: Some(thread),
        })
    }

    /// Kick the vCPU thread at `at` (or never) unless this is called again
    /// first. Cheap when the deadline only moves later, as it does at most
    /// exits.
    pub fn set(&self, at: Option<Instant>) {
        let ns = at.map_or(NEVER, |at| {
            at.saturating_duration_since(self.shared.epoch).as_nanos() as u64
        });
        let before = self.shared.deadline.swap(ns, Ordering::SeqCst);
        if ns < before {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    /// Kicks sent so far.
    pub fn kicks(&self) -> u64 {
        self.shared.kicks.load(Ordering::Relaxed)
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn kick_loop(shared: &Shared, vcpu_thread: libc::pthread_t) {
    while !shared.quit.load(Ordering::SeqCst) {
        let deadline = shared.deadline.load(Ordering::SeqCst);
        let now = shared.epoch.elapsed().as_nanos() as u64;
        if deadline == NEVER || now < deadline {
            let wait = Duration::from_nanos(deadline.saturating_sub(now)).min(IDLE);
            std::thread::park_timeout(wait);
            continue;
        }
        // SAFETY: the vCPU thread joins this thread (dropping the Kicker)
        // before it ends, so it is alive; it has a no-op handler for the
        // signal, installed in `start`.
        unsafe {
            libc::pthread_kill(vcpu_thread, kick_signal());
        }
        shared.kicks.fetch_add(1, Ordering::Relaxed);
        std::thread::park_timeout(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sleep the kick must cut short: `nanosleep` returns EINTR when a
    /// signal's handler has run.
    fn sleep_until_kicked(limit: Duration) -> Duration {
        let started = Instant::now();
        let ask = libc::timespec {
            tv_sec: limit.as_secs() as libc::time_t,
            tv_nsec: 0,
        };
        // SAFETY: `ask` is a valid timespec; no remainder is asked for.
        unsafe { libc::nanosleep(&ask, std::ptr::null_mut()) };
        started.elapsed()
    }

    #[test]
    fn the_thread_is_kicked_at_its_deadline_and_not_before() {
        let kicker = Kicker::start().expect("kicker");
        kicker.set(Some(Instant::now() + Duration::from_millis(50)));
        let slept = sleep_until_kicked(Duration::from_secs(5));
        assert!(
            slept >= Duration::from_millis(40),
            "kicked early: {slept:?}"
        );
        assert!(slept < Duration::from_secs(2), "not kicked: {slept:?}");
        // The kicker counts its kick after sending it, so the kicked thread
        // may look first.
        let counted_by = Instant::now() + Duration::from_secs(1);
        while kicker.kicks() == 0 && Instant::now() < counted_by {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(kicker.kicks() >= 1);
        // A deadline moved later, then cleared: no kick.
        kicker.set(Some(Instant::now() + Duration::from_secs(60)));
        kicker.set(None);
        let before = kicker.kicks();
        let slept = sleep_until_kicked(Duration::from_secs(1));
        assert!(slept >= Duration::from_millis(900), "{slept:?}");
        assert_eq!(kicker.kicks(), before);
    }
}
