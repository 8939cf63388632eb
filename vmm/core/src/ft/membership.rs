//! A server's membership at the arbiter: periodic pings that tell the view
//! service which view this server knows (acknowledging it, for a primary),
//! and the test-and-set that decides who goes live after a failure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::{ArbiterClient, ArbiterError, Member, TasOutcome, View};

use crate::run::run_loop::RunError;

pub const PING_INTERVAL: Duration = Duration::from_millis(100);
/// How long a server keeps trying an unreachable arbiter before it gives up
/// going live.
pub const ARBITER_PATIENCE: Duration = Duration::from_secs(5);

/// Why a server that needed the arbiter's decision does not go live.
#[derive(Debug, thiserror::Error)]
pub enum ArbitrationError {
    #[error("lost test-and-set for view {view} at the arbiter: {detail}; not going live")]
    Lost { view: u64, detail: String },
    #[error("the arbiter at {addr} cannot be reached ({detail}); not going live, for safety")]
    Unreachable { addr: String, detail: String },
}

impl From<ArbitrationError> for RunError {
    fn from(e: ArbitrationError) -> Self {
        RunError::Mode(Box::new(e))
    }
}

impl ArbitrationError {
    /// The arbitration outcome inside a run's error, if that is what
    /// stopped it.
    pub fn of(e: &RunError) -> Option<&ArbitrationError> {
        match e {
            RunError::Mode(inner) => inner.downcast_ref(),
            _ => None,
        }
    }
}

pub struct Membership {
    client: ArbiterClient,
    vm_id: String,
    me: Mutex<Member>,
    view: Mutex<View>,
    acked: AtomicU64,
    stopped: AtomicBool,
}

impl Membership {
    /// For a backup: waits (with queries, which register nothing) until the
    /// VM has a primary, so that a backup started first never becomes the
    /// primary of view 1 by pinging first.
    pub fn wait_for_primary(
        arbiter: SocketAddr,
        vm_id: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let client = ArbiterClient::with_timeout(arbiter, Duration::from_millis(500));
        let deadline = Instant::now() + timeout;
        loop {
            match client.query(vm_id) {
                Ok(view) if view.primary.is_some() => return Ok(()),
                Ok(_) => {}
                Err(e) => tracing::debug!("arbiter query failed: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the arbiter at {arbiter} named no primary for {vm_id} within {timeout:?}"
                ));
            }
            std::thread::sleep(PING_INTERVAL);
        }
    }

    /// Starts pinging in the background.
    pub fn start(arbiter: SocketAddr, vm_id: &str, me: Member) -> Result<Arc<Self>, String> {
        let m = Arc::new(Membership {
            client: ArbiterClient::with_timeout(arbiter, Duration::from_millis(500)),
            vm_id: vm_id.to_string(),
            me: Mutex::new(me),
            view: Mutex::new(View::default()),
            acked: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let pinger = m.clone();
        std::thread::Builder::new()
            .name("ftvm-arbiter-ping".into())
            .spawn(move || {
                while !pinger.stopped.load(Ordering::SeqCst) {
                    pinger.ping_once();
                    std::thread::sleep(PING_INTERVAL);
                }
            })
            .map_err(|e| format!("cannot start the arbiter pinger: {e}"))?;
        Ok(m)
    }

    fn me(&self) -> Member {
        self.me.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn ping_once(&self) {
        let known = self.acked.load(Ordering::SeqCst);
        match self.client.ping(&self.vm_id, &self.me(), known) {
            Ok(view) => *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view,
            Err(e) => tracing::debug!("arbiter ping failed: {e}"),
        }
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_me(&self, member: Option<&Member>) -> bool {
        member.is_some_and(|m| m.id == self.me().id)
    }

    /// Pings with `view` as the view this server knows: for a primary, the
    /// acknowledgement that lets the arbiter move on.
    pub fn acknowledge(&self, view: u64) {
        self.acked.store(view, Ordering::SeqCst);
        self.ping_once();
    }

    /// Waits for a view that satisfies `wanted`.
    pub fn wait_for(&self, timeout: Duration, wanted: impl Fn(&View) -> bool) -> Option<View> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.view();
            if wanted(&view) {
                return Some(view);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
            self.ping_once();
        }
    }

    /// Test-and-set for `view`: the one claim that decides who goes on.
    /// Returns the view the win created. Losing, or failing to reach the
    /// arbiter for [`ARBITER_PATIENCE`], is an error: nobody goes live
    /// without winning.
    pub fn claim(
        &self,
        view: u64,
        service_addr: Option<SocketAddr>,
    ) -> Result<View, ArbitrationError> {
        if let Some(addr) = service_addr {
            self.me
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .service_addr = addr;
        }
        let me = self.me();
        let deadline = Instant::now() + ARBITER_PATIENCE;
        loop {
            match self.client.test_and_set(&self.vm_id, view, &me) {
                Ok(TasOutcome::Won { view: won }) => {
                    self.acknowledge(won.number);
                    return Ok(won);
                }
                Ok(TasOutcome::Lost {
                    reason,
                    view: current,
                }) => {
                    self.stopped.store(true, Ordering::SeqCst);
                    return Err(ArbitrationError::Lost {
                        view,
                        detail: format!("{reason:?}; the current view is {}", current.number),
                    });
                }
                Err(e @ ArbiterError::Unreachable { .. })
                | Err(e @ ArbiterError::BadResponse { .. }) => {
                    if Instant::now() >= deadline {
                        self.stopped.store(true, Ordering::SeqCst);
                        return Err(ArbitrationError::Unreachable {
                            addr: self.client.addr.to_string(),
                            detail: e.to_string(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    self.stopped.store(true, Ordering::SeqCst);
                    return Err(ArbitrationError::Lost {
                        view,
                        detail: format!("the arbiter refused the claim: {e}"),
                    });
                }
            }
        }
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}
