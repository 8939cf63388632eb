//! A server's membership at the arbiter: periodic pings that tell the view
//! service which view this server knows (acknowledging it, for a primary),
//! the waits that join a pair, the test-and-set that decides who goes live
//! after a failure, and the check a primary makes after a pause.
//!
//! A server that has been replaced (deposed: a view after one where it was
//! primary or backup names it as neither) never pings again: a ping would
//! offer it as a spare, and a server that lost its place must not become
//! anybody's backup. So once a server has a role, each ping is preceded by
//! a query (which registers nothing), and the ping is made only if the
//! query still names it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::{Arbiter, ArbiterAddr, ArbiterError, LossReason, Member, TasOutcome, View};

use crate::run::run_loop::RunError;
use crate::run::stop::StopSignal;

pub const PING_INTERVAL: Duration = Duration::from_millis(100);
/// How often the pinger pings while the server waits to join: joining is
/// a sequence of views, each learned from a ping's answer.
const JOIN_PING_INTERVAL: Duration = Duration::from_millis(10);
/// How often a wait looks at the view and at the stop signal.
const WAIT_POLL: Duration = Duration::from_millis(5);
/// How long a server keeps trying an unreachable arbiter before it gives up
/// going live, and while it joins, before it gives up joining.
pub const ARBITER_PATIENCE: Duration = Duration::from_secs(5);
/// Each request to the arbiter.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How often an unanswered claim is made again, at most.
const CLAIM_RETRY: Duration = Duration::from_millis(50);

/// Why a server that needed the arbiter does not go on: it lost, it was
/// replaced, the arbiter cannot be reached, or it never joined.
#[derive(Debug, thiserror::Error)]
pub enum ArbitrationError {
    #[error("lost test-and-set for view {view} at the arbiter: {detail}; not going live")]
    Lost { view: u64, detail: String },
    #[error("the arbiter at {addr} cannot be reached ({detail}); not going live, for safety")]
    Unreachable { addr: String, detail: String },
    /// Another server holds this one's place: a view after `view` names it
    /// neither primary nor backup.
    #[error("deposed: {detail}; stopping without releasing anything")]
    Deposed { view: u64, detail: String },
    /// A stop was requested (a signal, `--timeout`) before the server
    /// joined a pair.
    #[error("stopped while {what}{}", if *.arbiter_answered { "" } else { " (the arbiter never answered)" })]
    StoppedJoining {
        what: String,
        arbiter_answered: bool,
    },
    /// The arbiter answers, but the wait for what joining needs ran out.
    #[error("gave up waiting until {what} (waited {waited:?})")]
    NotJoined { what: String, waited: Duration },
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

/// What ends a wait to join besides success: a stop request (a signal, or
/// the server's time limit), and the wait's own deadline.
pub struct JoinWait<'a> {
    stop: &'a StopSignal,
    /// When the server's time limit ends its run, joining included.
    stop_at: Option<Instant>,
    until: Instant,
    wait: Duration,
}

impl<'a> JoinWait<'a> {
    pub fn new(stop: &'a StopSignal, stop_at: Option<Instant>, wait: Duration) -> Self {
        JoinWait {
            stop,
            stop_at,
            until: Instant::now() + wait,
            wait,
        }
    }

    /// Whether the server is to stop: asked every few milliseconds by
    /// every wait while joining.
    pub fn stopping(&self) -> bool {
        self.stop.is_requested() || self.stop_at.is_some_and(|t| Instant::now() >= t)
    }

    /// What is left of the wait.
    pub fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }
}

pub struct Membership {
    client: Arc<dyn Arbiter>,
    vm_id: String,
    me: Mutex<Member>,
    view: Mutex<View>,
    view_number: AtomicU64,
    /// The view a primary pings with, and whether its pings vouch for the
    /// backup (acknowledge the view) or only say it has seen it.
    primary_known: AtomicU64,
    vouch: AtomicBool,
    /// The latest view that named this server, and the latest that named it
    /// backup (what a backup pings with: the highest view it knows, so
    /// that once displaced it does not read as a fresh spare).
    role_view: AtomicU64,
    backup_view: AtomicU64,
    deposed: AtomicBool,
    joining: AtomicBool,
    stopped: AtomicBool,
    /// The server's stop request: a wait for an unreachable arbiter ends
    /// on it.
    stop_request: StopSignal,
    started: Instant,
    /// When the arbiter last answered.
    answered_at: Mutex<Option<Instant>>,
}

impl Membership {
    /// The arbiter at `addr`, built-in or etcd, each request bounded as
    /// this module bounds them; one client serves every wait and the
    /// pinger (an etcd client keeps its connections).
    pub fn connect(addr: &ArbiterAddr) -> Result<Arc<dyn Arbiter>, String> {
        arbiter::connect(addr, REQUEST_TIMEOUT)
            .map_err(|e| format!("cannot start the arbiter's client: {e}"))
    }

    /// For a backup: waits (with queries, which register nothing) until the
    /// VM has a primary, so that a backup started first never becomes the
    /// primary of view 1 by pinging first.
    pub fn wait_for_primary(
        client: &dyn Arbiter,
        vm_id: &str,
        join: &JoinWait,
    ) -> Result<(), ArbitrationError> {
        let arbiter = client.addr();
        let started = Instant::now();
        let mut answered = None;
        let mut last_error = String::new();
        let mut next_query = started;
        loop {
            if Instant::now() >= next_query {
                match client.query(vm_id) {
                    Ok(view) if view.primary.is_some() => return Ok(()),
                    Ok(_) => answered = Some(Instant::now()),
                    Err(e) => last_error = e.to_string(),
                }
                next_query = Instant::now() + PING_INTERVAL;
            }
            let what = || format!("waiting for the arbiter at {arbiter} to name a primary");
            if join.stopping() {
                return Err(ArbitrationError::StoppedJoining {
                    what: what(),
                    arbiter_answered: answered.is_some(),
                });
            }
            if answered.unwrap_or(started).elapsed() >= ARBITER_PATIENCE {
                return Err(ArbitrationError::Unreachable {
                    addr: arbiter.to_string(),
                    detail: format!("no answer for {ARBITER_PATIENCE:?}: {last_error}"),
                });
            }
            if Instant::now() >= join.until {
                return Err(ArbitrationError::NotJoined {
                    what: format!("the arbiter at {arbiter} names a primary for {vm_id}"),
                    waited: join.wait,
                });
            }
            std::thread::sleep(WAIT_POLL);
        }
    }

    /// Starts pinging in the background, often while the server joins.
    /// `stop` is the server's stop request.
    pub fn start(
        client: Arc<dyn Arbiter>,
        vm_id: &str,
        me: Member,
        stop: StopSignal,
    ) -> Result<Arc<Self>, String> {
        let m = Arc::new(Membership {
            client,
            vm_id: vm_id.to_string(),
            me: Mutex::new(me),
            view: Mutex::new(View::default()),
            view_number: AtomicU64::new(0),
            primary_known: AtomicU64::new(0),
            vouch: AtomicBool::new(true),
            role_view: AtomicU64::new(0),
            backup_view: AtomicU64::new(0),
            deposed: AtomicBool::new(false),
            joining: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            stop_request: stop,
            started: Instant::now(),
            answered_at: Mutex::new(None),
        });
        let pinger = m.clone();
        std::thread::Builder::new()
            .name("ftvm-arbiter-ping".into())
            .spawn(move || {
                while !pinger.stopped.load(Ordering::SeqCst) && !pinger.deposed() {
                    pinger.ping_once();
                    let interval = if pinger.joining.load(Ordering::SeqCst) {
                        JOIN_PING_INTERVAL
                    } else {
                        PING_INTERVAL
                    };
                    std::thread::sleep(interval);
                }
            })
            .map_err(|e| format!("cannot start the arbiter pinger: {e}"))?;
        Ok(m)
    }

    fn me(&self) -> Member {
        self.me.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes in a view the arbiter answered; false once it shows this
    /// server deposed.
    fn note(&self, view: &View) -> bool {
        *self.answered_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let primary = self.is_me(view.primary.as_ref());
        let backup = self.is_me(view.backup.as_ref());
        let role_view = self.role_view.load(Ordering::SeqCst);
        if primary || backup {
            self.role_view.fetch_max(view.number, Ordering::SeqCst);
            if backup {
                self.backup_view.fetch_max(view.number, Ordering::SeqCst);
            }
        } else if role_view > 0
            && view.number > role_view
            && !self.deposed.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(
                "view {} names this server neither primary nor backup (it was in view {role_view}): deposed, no longer pinging",
                view.number
            );
        }
        // Answers to concurrent requests may arrive out of order.
        let mut current = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if view.number >= current.number {
            *current = view.clone();
            self.view_number.store(view.number, Ordering::SeqCst);
        }
        !self.deposed()
    }

    fn ping_once(&self) {
        if self.deposed() {
            return;
        }
        if self.role_view.load(Ordering::SeqCst) > 0 {
            match self.client.query(&self.vm_id) {
                Ok(view) => {
                    if !self.note(&view) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!("arbiter query failed: {e}");
                    return;
                }
            }
        }
        let me = self.me();
        let primary_known = self.primary_known.load(Ordering::SeqCst);
        let answer = if primary_known > 0 {
            if self.vouch.load(Ordering::SeqCst) {
                self.client.ping(&self.vm_id, &me, primary_known)
            } else {
                self.client.ping_seen(&self.vm_id, &me, primary_known)
            }
        } else {
            let known = self.backup_view.load(Ordering::SeqCst);
            self.client.ping(&self.vm_id, &me, known)
        };
        match answer {
            Ok(view) => {
                self.note(&view);
            }
            Err(e) => tracing::debug!("arbiter ping failed: {e}"),
        }
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The number of the latest view the arbiter answered.
    pub fn view_number(&self) -> u64 {
        self.view_number.load(Ordering::SeqCst)
    }

    pub fn is_me(&self, member: Option<&Member>) -> bool {
        member.is_some_and(|m| m.id == self.me().id)
    }

    /// Whether a view after one that named this server names it neither
    /// primary nor backup: another server took its place.
    pub fn deposed(&self) -> bool {
        self.deposed.load(Ordering::SeqCst)
    }

    /// Pings with `view` as the view this server knows and vouches for:
    /// for a primary, the acknowledgement that lets the arbiter move on,
    /// and that says its backup (if the view names one) holds its state.
    pub fn acknowledge(&self, view: u64) {
        self.vouch.store(true, Ordering::SeqCst);
        self.primary_known.store(view, Ordering::SeqCst);
        self.ping_once();
    }

    /// For a primary whose backup in `view` does not hold its state yet:
    /// pings with `view` without vouching for the backup, so that the
    /// arbiter may replace a backup that never comes up (and the backup
    /// cannot win a claim meanwhile).
    pub fn see(&self, view: u64) {
        self.vouch.store(false, Ordering::SeqCst);
        self.primary_known.store(view, Ordering::SeqCst);
        self.ping_once();
    }

    /// The server has joined (or given up): ping at the normal interval.
    pub fn joined(&self) {
        self.joining.store(false, Ordering::SeqCst);
    }

    /// Waits until the view satisfies `wanted`. It ends early when a stop
    /// is requested, when this server is deposed, and when the arbiter has
    /// not answered for [`ARBITER_PATIENCE`]; `what` says what is awaited
    /// ("the arbiter names a backup"), for the errors.
    pub fn wait_for(
        &self,
        join: &JoinWait,
        what: &str,
        wanted: impl Fn(&View) -> bool,
    ) -> Result<View, ArbitrationError> {
        loop {
            let view = self.view();
            if self.deposed() {
                return Err(ArbitrationError::Deposed {
                    view: self.role_view.load(Ordering::SeqCst),
                    detail: format!("view {} has taken this server's place", view.number),
                });
            }
            if wanted(&view) {
                return Ok(view);
            }
            if join.stopping() {
                return Err(ArbitrationError::StoppedJoining {
                    what: format!("waiting until {what}"),
                    arbiter_answered: self.answered_at().is_some(),
                });
            }
            self.check_patience()?;
            if Instant::now() >= join.until {
                return Err(ArbitrationError::NotJoined {
                    what: what.to_string(),
                    waited: join.wait,
                });
            }
            std::thread::sleep(WAIT_POLL);
        }
    }

    fn answered_at(&self) -> Option<Instant> {
        *self.answered_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An error once the arbiter has not answered for
    /// [`ARBITER_PATIENCE`] (since this membership started, if ever).
    pub fn check_patience(&self) -> Result<(), ArbitrationError> {
        let since = self.answered_at().unwrap_or(self.started);
        if since.elapsed() < ARBITER_PATIENCE {
            return Ok(());
        }
        Err(ArbitrationError::Unreachable {
            addr: self.client.addr().to_string(),
            detail: format!("no answer for {:?}", since.elapsed()),
        })
    }

    /// For a primary that may have been paused: asks the arbiter whether
    /// the current view still names it primary, retrying an unreachable
    /// arbiter for [`ARBITER_PATIENCE`]. A query registers nothing. Anyone
    /// else as primary means another server took over while this one was
    /// not running: it is deposed.
    pub fn confirm_primary(&self, view: u64) -> Result<View, ArbitrationError> {
        let deadline = Instant::now() + ARBITER_PATIENCE;
        loop {
            match self.client.query(&self.vm_id) {
                Ok(current) => {
                    self.note(&current);
                    if self.is_me(current.primary.as_ref()) {
                        return Ok(current);
                    }
                    self.deposed.store(true, Ordering::SeqCst);
                    return Err(ArbitrationError::Deposed {
                        view,
                        detail: format!(
                            "view {} has {} as its primary",
                            current.number,
                            current.primary.as_ref().map_or("nobody", |p| p.id.as_str())
                        ),
                    });
                }
                Err(e) if Instant::now() >= deadline || self.stop_request.is_requested() => {
                    self.stop();
                    return Err(self.unreachable(&e));
                }
                Err(e) => {
                    tracing::debug!("arbiter query failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Test-and-set for `view`: the one claim that decides who goes on.
    /// Returns the view the win created. Losing, or failing to reach the
    /// arbiter for [`ARBITER_PATIENCE`] (or until a stop is requested), is
    /// an error: nobody goes live without winning.
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
            let asked = Instant::now();
            match self.client.test_and_set(&self.vm_id, view, &me) {
                Ok(TasOutcome::Won { view: won }) => {
                    self.note(&won);
                    self.acknowledge(won.number);
                    return Ok(won);
                }
                // The arbiter already names this server primary of a later
                // view: it replaced the peer (a backup that fell silent),
                // or an earlier try of this very claim won and its answer
                // was lost. Either way nobody else can be primary.
                Ok(TasOutcome::Lost { view: current, .. })
                    if current.number > view && self.is_me(current.primary.as_ref()) =>
                {
                    self.note(&current);
                    self.acknowledge(current.number);
                    return Ok(current);
                }
                Ok(TasOutcome::Lost {
                    reason,
                    view: current,
                }) => {
                    self.stop();
                    let detail = match reason {
                        LossReason::Unacknowledged => format!(
                            "its primary never acknowledged view {}: this server's state was never confirmed complete, so it must not take over",
                            current.number
                        ),
                        reason => format!("{reason:?}; the current view is {}", current.number),
                    };
                    return Err(ArbitrationError::Lost { view, detail });
                }
                Err(e @ ArbiterError::Unreachable { .. })
                | Err(e @ ArbiterError::BadResponse { .. }) => {
                    if Instant::now() >= deadline || self.stop_request.is_requested() {
                        self.stop();
                        return Err(self.unreachable(&e));
                    }
                    // At most one claim per CLAIM_RETRY, so that an arbiter
                    // that refuses connections is not asked in a spin; one
                    // that took its time (etcd electing a leader) is asked
                    // again at once, as soon as it may answer.
                    std::thread::sleep(CLAIM_RETRY.saturating_sub(asked.elapsed()));
                }
                Err(e) => {
                    self.stop();
                    return Err(ArbitrationError::Lost {
                        view,
                        detail: format!("the arbiter refused the claim: {e}"),
                    });
                }
            }
        }
    }

    /// The arbiter did not answer a request that had to be answered: for
    /// [`ARBITER_PATIENCE`], or until a stop was requested.
    fn unreachable(&self, e: &ArbiterError) -> ArbitrationError {
        let detail = if self.stop_request.is_requested() {
            format!("{e}; a stop was requested meanwhile")
        } else {
            e.to_string()
        };
        ArbitrationError::Unreachable {
            addr: self.client.addr().to_string(),
            detail,
        }
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter::{ArbiterClient, Server, ServerConfig, ServerHandle};
    use std::path::PathBuf;

    const VM: &str = "vm-membership-test";

    /// An arbiter on loopback with its own state directory, removed after.
    struct TestArbiter {
        handle: Option<ServerHandle>,
        dir: PathBuf,
    }

    impl TestArbiter {
        fn start(name: &str) -> TestArbiter {
            let dir = std::env::temp_dir().join(format!(
                "ftvm-membership-{name}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            let server = Server::bind(
                "127.0.0.1:0".parse().expect("addr"),
                ServerConfig::new(&dir),
            )
            .expect("bind the arbiter");
            TestArbiter {
                handle: Some(server.spawn().expect("spawn the arbiter")),
                dir,
            }
        }

        fn addr(&self) -> SocketAddr {
            self.handle.as_ref().expect("running").local_addr()
        }

        fn client(&self) -> Arc<dyn Arbiter> {
            Membership::connect(&self.addr().into()).expect("a client")
        }
    }

    impl Drop for TestArbiter {
        fn drop(&mut self) {
            if let Some(h) = self.handle.take() {
                let _ = h.stop();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn member(id: &str, port: u16) -> Member {
        Member {
            id: id.to_string(),
            service_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log_addr: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
        }
    }

    fn join(stop: &StopSignal) -> JoinWait<'_> {
        JoinWait::new(stop, None, Duration::from_secs(10))
    }

    /// A primary of view 1 and a backup named in view 2, acknowledged.
    fn pair(arbiter: &TestArbiter) -> (Arc<Membership>, Arc<Membership>) {
        let stop = StopSignal::new();
        let p =
            Membership::start(arbiter.client(), VM, member("p", 7000), stop.clone()).expect("p");
        let view = p
            .wait_for(&join(&stop), "a primary", |v| v.primary.is_some())
            .expect("view 1");
        assert!(p.is_me(view.primary.as_ref()));
        p.acknowledge(view.number);
        let b =
            Membership::start(arbiter.client(), VM, member("b", 7010), stop.clone()).expect("b");
        let view = b
            .wait_for(&join(&stop), "b is backup", |v| b.is_me(v.backup.as_ref()))
            .expect("view 2");
        p.acknowledge(view.number);
        p.joined();
        b.joined();
        (p, b)
    }

    #[test]
    fn a_backup_replaced_by_its_primarys_claim_is_deposed_and_never_named_again() {
        let arbiter = TestArbiter::start("backup-deposed");
        let (p, b) = pair(&arbiter);
        assert_eq!(p.view_number(), 2);
        let won = p.claim(2, None).expect("the primary wins");
        assert_eq!(won.number, 3);
        let stop = StopSignal::new();
        let err = b
            .wait_for(&join(&stop), "never", |_| false)
            .expect_err("deposed");
        assert!(matches!(err, ArbitrationError::Deposed { .. }), "{err}");
        assert!(b.deposed());
        // It pings no more: view 3 has no backup, and none is named while
        // the deposed one is the only other server around.
        std::thread::sleep(Duration::from_secs(1));
        let view = ArbiterClient::new(arbiter.addr()).query(VM).expect("query");
        assert_eq!((view.number, view.backup), (3, None));
        assert!(!p.deposed());
    }

    #[test]
    fn a_primary_replaced_while_it_was_paused_is_deposed_by_the_arbiters_answer() {
        let arbiter = TestArbiter::start("primary-deposed");
        let (p, b) = pair(&arbiter);
        assert!(p.confirm_primary(2).is_ok(), "still primary");
        // The backup takes over while the primary is not looking.
        p.stop();
        b.claim(2, None).expect("the backup wins");
        match p.confirm_primary(2) {
            Err(ArbitrationError::Deposed { detail, .. }) => {
                assert!(detail.contains("view 3 has b as its primary"), "{detail}")
            }
            other => panic!("expected deposed, got {other:?}"),
        }
        assert!(p.deposed());
    }

    #[test]
    fn join_waits_end_at_once_on_a_stop_request_or_the_time_limit() {
        // Nobody listens there: the arbiter never answers.
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let nowhere = Membership::connect(&nowhere.into()).expect("a client");
        let stop = StopSignal::new();
        let m = Membership::start(Arc::clone(&nowhere), VM, member("p", 7000), stop.clone())
            .expect("start");
        let requested = stop.clone();
        let asked_at = Instant::now() + Duration::from_millis(200);
        std::thread::spawn(move || {
            std::thread::sleep(asked_at.saturating_duration_since(Instant::now()));
            requested.request();
        });
        let err = m
            .wait_for(&join(&stop), "a primary", |v| v.primary.is_some())
            .expect_err("stopped");
        assert!(
            matches!(
                err,
                ArbitrationError::StoppedJoining {
                    arbiter_answered: false,
                    ..
                }
            ),
            "{err}"
        );
        assert!(Instant::now() < asked_at + Duration::from_millis(100));

        let stop = StopSignal::new();
        let limit = Instant::now() + Duration::from_millis(200);
        let wait = JoinWait::new(&stop, Some(limit), Duration::from_secs(60));
        let err = Membership::wait_for_primary(&*nowhere, VM, &wait).expect_err("stopped");
        assert!(
            matches!(err, ArbitrationError::StoppedJoining { .. }),
            "{err}"
        );
        assert!(Instant::now() < limit + Duration::from_millis(100));
        m.stop();
    }
}
