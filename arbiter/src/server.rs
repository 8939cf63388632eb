//! The TCP server: a thread per connection, one lock around the state
//! machine and its state file, so that every answer follows the fsync of
//! the decision it reports.

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, Scope};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::protocol::{
    error_line, ok_line, parse_request, read_line, ErrorKind, LineRead, ProtocolError, Request,
    ViewReply,
};
use crate::store::StateDir;
use crate::view::{ViewError, ViewService};
use crate::ArbiterError;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A peer that does not take its response within this time is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many warnings of one kind (malformed lines, error answers,
/// storage failures, refused or evicted connections) are logged per
/// second; the rest are counted, and the count is logged in one line once
/// the second is over.
pub const WARNINGS_PER_SECOND: u32 = 10;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub state_dir: PathBuf,
    /// The liveness bound: a server not heard from for longer is not a live
    /// spare, and a backup its primary has not vouched for may be replaced.
    pub spare_timeout: Duration,
    /// At most this many connections are served at once. Beyond it, the
    /// connection that has gone longest without a request is closed to
    /// make room; if every one is in the middle of a request, the new one
    /// is answered `busy` and closed.
    pub max_connections: usize,
    /// A connection that has not completed a request for this long (since
    /// it was opened, or since its last request) is closed.
    pub idle_timeout: Duration,
}

impl ServerConfig {
    pub const DEFAULT_SPARE_TIMEOUT: Duration = Duration::from_millis(500);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
    /// Clients open a connection per request and send it at once, so a
    /// connection silent for this long is not a client at work.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

    pub fn new(state_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            state_dir: state_dir.into(),
            spare_timeout: Self::DEFAULT_SPARE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// Zeros would make a server that answers nobody (no connection, no
    /// time to send a request) or never sees a live spare.
    pub fn check(&self) -> Result<(), ArbiterError> {
        let zero = if self.max_connections == 0 {
            "max_connections"
        } else if self.idle_timeout.is_zero() {
            "idle_timeout"
        } else if self.spare_timeout.is_zero() {
            "spare_timeout"
        } else {
            return Ok(());
        };
        Err(ArbiterError::Config(format!("{zero} must not be zero")))
    }
}

/// One kind of warning, limited to [`WARNINGS_PER_SECOND`]: a peer that
/// sends garbage as fast as it can must not fill the disk with the
/// arbiter's log.
struct LogLimit {
    /// Names what was suppressed in the summary line.
    what: &'static str,
    state: Mutex<LimitState>,
}

#[derive(Default)]
struct LimitState {
    /// When the current second began; none while nothing is being counted.
    second: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    const fn new(what: &'static str) -> LogLimit {
        LogLimit {
            what,
            state: Mutex::new(LimitState {
                second: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LimitState> {
        // Counters only: whatever a panicking thread left is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a warning may be logged now; if not, it is counted.
    fn allow(&self, now: Instant) -> bool {
        let mut state = self.lock();
        self.roll(&mut state, now);
        let state = &mut *state;
        if state.second.is_none() {
            state.second = Some(now);
        }
        if state.logged < WARNINGS_PER_SECOND {
            state.logged += 1;
            true
        } else {
            state.suppressed += 1;
            false
        }
    }

    /// Ends the current second if it is over, logging how many warnings it
    /// suppressed; returns that number.
    fn flush(&self, now: Instant) -> u64 {
        self.roll(&mut self.lock(), now)
    }

    fn roll(&self, state: &mut LimitState, now: Instant) -> u64 {
        let Some(second) = state.second else {
            return 0;
        };
        if now.saturating_duration_since(second) < Duration::from_secs(1) {
            return 0;
        }
        let suppressed = state.suppressed;
        if suppressed > 0 {
            warn!(suppressed, "suppressed {suppressed} {}", self.what);
        }
        *state = LimitState::default();
        suppressed
    }
}

struct Limits {
    malformed: LogLimit,
    answers: LogLimit,
    storage: LogLimit,
    connections: LogLimit,
}

impl Limits {
    const fn new() -> Limits {
        Limits {
            malformed: LogLimit::new("malformed lines"),
            answers: LogLimit::new("requests answered with an error"),
            storage: LogLimit::new("storage failures"),
            connections: LogLimit::new("refused or evicted connections"),
        }
    }

    fn flush(&self, now: Instant) {
        for limit in [
            &self.malformed,
            &self.answers,
            &self.storage,
            &self.connections,
        ] {
            limit.flush(now);
        }
    }
}

/// The connections being served, so that the idlest can make room for a
/// new one: otherwise a peer that opens connections and sends nothing
/// would hold every slot, and real clients would be refused until the
/// idle timeout. `H` is what closes a connection (its stream).
struct Connections<H> {
    limit: usize,
    next_id: u64,
    open: HashMap<u64, Slot<H>>,
}

struct Slot<H> {
    handle: H,
    /// When the connection was opened or its last request answered.
    idle_since: Instant,
    /// A request is being answered; the connection is not idle.
    busy: bool,
}

enum Admission<H> {
    Admitted(u64),
    /// Admitted in the place of another connection, which is out of the
    /// table and must be closed.
    Evicted {
        id: u64,
        evicted: H,
        idle: Duration,
    },
    /// Every connection is answering a request; the new one is handed
    /// back to be refused.
    Full(H),
}

impl<H> Connections<H> {
    fn new(limit: usize) -> Connections<H> {
        Connections {
            limit,
            next_id: 0,
            open: HashMap::new(),
        }
    }

    fn admit(&mut self, handle: H, now: Instant) -> Admission<H> {
        let mut evicted = None;
        if self.open.len() >= self.limit {
            let idlest = self
                .open
                .iter()
                .filter(|(_, slot)| !slot.busy)
                .min_by_key(|(&id, slot)| (slot.idle_since, id))
                .map(|(&id, _)| id);
            match idlest.and_then(|id| self.open.remove(&id)) {
                Some(slot) => evicted = Some(slot),
                None => return Admission::Full(handle),
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Slot {
                handle,
                idle_since: now,
                busy: false,
            },
        );
        match evicted {
            None => Admission::Admitted(id),
            Some(slot) => Admission::Evicted {
                id,
                idle: now.saturating_duration_since(slot.idle_since),
                evicted: slot.handle,
            },
        }
    }

    /// Marks a request as being answered; false if the connection was
    /// evicted, and must not answer.
    fn begin(&mut self, id: u64) -> bool {
        match self.open.get_mut(&id) {
            Some(slot) => {
                slot.busy = true;
                true
            }
            None => false,
        }
    }

    fn end(&mut self, id: u64, now: Instant) {
        if let Some(slot) = self.open.get_mut(&id) {
            slot.busy = false;
            slot.idle_since = now;
        }
    }

    fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

struct Core {
    views: ViewService,
    store: StateDir,
}

type Answer = Result<Vec<u8>, (ErrorKind, String)>;

impl Core {
    /// Runs one operation on `vm` and persists its effect, if any, before
    /// returning; if persisting fails, the operation is undone.
    fn decide<T>(
        &mut self,
        limits: &Limits,
        vm: &str,
        op: impl FnOnce(&mut ViewService) -> Result<T, ViewError>,
    ) -> Result<T, (ErrorKind, String)> {
        let before = self.views.vm(vm).cloned();
        let reply = op(&mut self.views).map_err(|e| (ErrorKind::Refused, e.to_string()))?;
        if self.views.vm(vm) != before.as_ref() {
            if let Err(e) = self.store.save(self.views.vms()) {
                self.views.restore(vm, before);
                if limits.storage.allow(Instant::now()) {
                    error!(vm, "decision not persisted, so not made: {e}");
                }
                return Err((
                    ErrorKind::Storage,
                    format!(
                        "the arbiter could not persist the decision, so it did not make it: {e}"
                    ),
                ));
            }
        }
        Ok(reply)
    }

    fn answer(&mut self, request: Request, limits: &Limits) -> Answer {
        match request {
            Request::Ping {
                vm,
                me,
                view_known,
                backup_ready,
            } => {
                let view = self.decide(limits, &vm, |views| {
                    views.ping_as(&vm, &me, view_known, backup_ready, Instant::now())
                })?;
                Ok(ok_line(&ViewReply { view }))
            }
            Request::TestAndSet { vm, view, claimant } => {
                let claimed = self.views.query(&vm);
                let outcome =
                    self.decide(limits, &vm, |views| views.claim(&vm, view, &claimant))?;
                // Only once the outcome stands: a win that was not saved
                // displaced nobody.
                self.views
                    .settle_claim(&vm, view, &claimant, &claimed, &outcome);
                Ok(ok_line(&outcome))
            }
            Request::Query { vm } => Ok(ok_line(&ViewReply {
                view: self.views.query(&vm),
            })),
        }
    }
}

/// A bound arbiter with its state loaded, ready to serve.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    core: Mutex<Core>,
    config: ServerConfig,
    connections: Mutex<Connections<TcpStream>>,
    limits: Limits,
}

impl Server {
    /// Checks `config`, locks and loads the state directory, then binds
    /// `listen` (port 0 picks a free port; see [`Server::local_addr`]).
    /// Nothing is served until [`Server::serve`] or [`Server::spawn`].
    pub fn bind(listen: SocketAddr, config: ServerConfig) -> Result<Server, ArbiterError> {
        config.check()?;
        let (store, vms) = StateDir::open(&config.state_dir)?;
        let listen_failed = |source| ArbiterError::Listen {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).map_err(listen_failed)?;
        let addr = listener.local_addr().map_err(listen_failed)?;
        Ok(Server {
            listener,
            addr,
            core: Mutex::new(Core {
                views: ViewService::new(vms, config.spare_timeout),
                store,
            }),
            connections: Mutex::new(Connections::new(config.max_connections)),
            limits: Limits::new(),
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` is set, then waits for its connections to close
    /// (each notices within [`POLL`]) and releases the state directory.
    pub fn serve(self, stop: &AtomicBool) -> Result<(), ArbiterError> {
        info!(addr = %self.addr, state = %self.config.state_dir.display(), "arbiter serving");
        thread::scope(|scope| {
            thread::Builder::new()
                .name("arbiter stop".into())
                .spawn_scoped(scope, || self.wake_on_stop(stop))
                .map_err(ArbiterError::Thread)?;
            loop {
                let accepted = self.listener.accept();
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match accepted {
                    Ok((stream, peer)) => self.admit(scope, stream, peer, stop),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Out of descriptors and the like: keep serving the
                    // connections there are.
                    Err(e) => {
                        if self.limits.connections.allow(Instant::now()) {
                            warn!("accept failed: {e}");
                        }
                        thread::sleep(POLL);
                    }
                }
            }
            Ok::<(), ArbiterError>(())
        })?;
        self.limits.flush(Instant::now() + Duration::from_secs(1));
        info!(addr = %self.addr, "arbiter stopped");
        Ok(())
    }

    /// `accept` blocks, so that a connection is taken at once rather than
    /// at the next poll, and only a connection wakes it: once `stop` is
    /// set, this makes one. Meanwhile it reports what the log limits
    /// suppressed, so that a summary does not wait for the next warning.
    fn wake_on_stop(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(POLL);
            self.limits.flush(Instant::now());
        }
        let mut target = self.addr;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        if let Err(e) = TcpStream::connect_timeout(&target, WRITE_TIMEOUT) {
            error!(%target, "cannot wake the accept loop to stop it: {e}");
        }
    }

    /// Serves on a thread of its own until the handle is stopped or
    /// dropped.
    pub fn spawn(self) -> Result<ServerHandle, ArbiterError> {
        let addr = self.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("arbiter {addr}"))
            .spawn(move || self.serve(&flag))
            .map_err(ArbiterError::Thread)?;
        Ok(ServerHandle {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    fn connections(&self) -> MutexGuard<'_, Connections<TcpStream>> {
        // A table of open connections: whatever a panicking thread left in
        // it is still a table.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit<'scope>(
        &'scope self,
        scope: &'scope Scope<'scope, '_>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: &'scope AtomicBool,
    ) {
        let limit = self.config.max_connections;
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                if self.limits.connections.allow(Instant::now()) {
                    warn!(%peer, "cannot keep a handle on a connection, closing it: {e}");
                }
                return;
            }
        };
        let admission = self.connections().admit(handle, Instant::now());
        let id = match admission {
            Admission::Admitted(id) => id,
            Admission::Evicted { id, evicted, idle } => {
                let idlest = evicted.peer_addr().ok();
                if self.limits.connections.allow(Instant::now()) {
                    warn!(
                        %peer, evicted = ?idlest, ?idle, limit,
                        "at the connection limit: closing the idlest connection to serve a new one"
                    );
                }
                close_with(
                    evicted,
                    &format!(
                        "closed after {} ms without a request: the arbiter is at its limit of \
                         {limit} connections and a new one needed the room",
                        idle.as_millis()
                    ),
                );
                id
            }
            Admission::Full(_) => {
                if self.limits.connections.allow(Instant::now()) {
                    warn!(%peer, limit, "too many connections, each answering a request: refusing one");
                }
                close_with(
                    stream,
                    &format!("too many connections (limit {limit}); try again later"),
                );
                return;
            }
        };
        let spawned = thread::Builder::new()
            .name(format!("arbiter conn {peer}"))
            .spawn_scoped(scope, move || {
                self.converse(stream, id, peer, stop);
                self.connections().close(id);
            });
        if let Err(e) = spawned {
            // The closure, and the stream in it, are gone with the error.
            self.connections().close(id);
            warn!(%peer, "cannot start a connection thread: {e}");
        }
    }

    fn converse(&self, stream: TcpStream, id: u64, peer: SocketAddr, stop: &AtomicBool) {
        debug!(%peer, "connection opened");
        if let Err(e) = self.converse_inner(stream, id, peer, stop) {
            debug!(%peer, "connection ended: {e}");
        } else {
            debug!(%peer, "connection closed");
        }
    }

    fn converse_inner(
        &self,
        stream: TcpStream,
        id: u64,
        peer: SocketAddr,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = Vec::new();
        let mut last_request = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            match read_line(&mut reader, &mut line) {
                Ok(LineRead::Line) => {
                    // Evicted while the line came in: the evicting thread
                    // has told the peer and closed the connection.
                    if !self.connections().begin(id) {
                        return Ok(());
                    }
                    let response = self.respond(&line, peer);
                    let written = writer.write_all(&response);
                    self.connections().end(id, Instant::now());
                    written?;
                    line.clear();
                    last_request = Instant::now();
                }
                Ok(LineRead::Eof) => return Ok(()),
                Ok(LineRead::TooLong) => {
                    let err = ProtocolError::TooLong;
                    if self.limits.malformed.allow(Instant::now()) {
                        warn!(%peer, "{err}; closing the connection");
                    }
                    // The rest of the line cannot be told from a next
                    // request, so the connection cannot go on.
                    writer.write_all(&error_line(
                        err.kind(),
                        &format!("{err}; closing the connection"),
                    ))?;
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Counted from the last complete request, so that a
                    // peer trickling bytes is no less idle than a silent one.
                    if last_request.elapsed() >= self.config.idle_timeout {
                        debug!(%peer, "idle connection closed");
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn respond(&self, line: &[u8], peer: SocketAddr) -> Vec<u8> {
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(e) => {
                if self.limits.malformed.allow(Instant::now()) {
                    warn!(%peer, "{e}");
                }
                return error_line(e.kind(), &e.to_string());
            }
        };
        // A thread that panicked while holding the lock may have left the
        // state machine between states; answering from it could contradict
        // what is on disk, so every later request is refused instead.
        let Ok(mut core) = self.core.lock() else {
            return error_line(
                ErrorKind::Internal,
                "the arbiter's state is unusable after an internal failure; restart it",
            );
        };
        match core.answer(request, &self.limits) {
            Ok(line) => line,
            Err((kind, message)) => {
                if self.limits.answers.allow(Instant::now()) {
                    warn!(%peer, %kind, "{message}");
                }
                error_line(kind, &message)
            }
        }
    }
}

/// Tells the peer why, as a `busy` error, and closes the connection. Best
/// effort: the peer is told if it is listening, and the caller (the accept
/// loop) never waits on it for long.
fn close_with(stream: TcpStream, message: &str) {
    let mut stream = stream;
    let _ = stream.set_write_timeout(Some(POLL));
    let _ = stream.write_all(&error_line(ErrorKind::Busy, message));
    // Wakes the connection's own thread, blocked reading, if it has one.
    let _ = stream.shutdown(Shutdown::Both);
}

/// A server running on its own thread (see [`Server::spawn`]).
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ArbiterError>>>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and waits until it has closed its connections and
    /// released its state directory.
    pub fn stop(mut self) -> Result<(), ArbiterError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), ArbiterError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or(Err(ArbiterError::Panicked)),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            error!("arbiter stopped with an error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idlest_connection_makes_room() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut table = Connections::new(2);
        let Admission::Admitted(a) = table.admit("a", ms(0)) else {
            panic!("room for a")
        };
        let Admission::Admitted(b) = table.admit("b", ms(1)) else {
            panic!("room for b")
        };
        // a answered a request after b was opened: b is the idler.
        assert!(table.begin(a));
        table.end(a, ms(5));
        match table.admit("c", ms(10)) {
            Admission::Evicted { evicted, idle, .. } => {
                assert_eq!((evicted, idle), ("b", Duration::from_millis(9)))
            }
            _ => panic!("b should have been evicted"),
        }
        // An evicted connection must not answer the line it was reading.
        assert!(!table.begin(b));
        table.close(b);
        assert_eq!(table.open.len(), 2);
    }

    #[test]
    fn busy_connections_are_not_evicted() {
        let t = Instant::now();
        let mut table = Connections::new(1);
        let Admission::Admitted(a) = table.admit("a", t) else {
            panic!("room for a")
        };
        assert!(table.begin(a));
        assert!(matches!(table.admit("b", t), Admission::Full("b")));
        table.end(a, t);
        assert!(matches!(
            table.admit("b", t),
            Admission::Evicted { evicted: "a", .. }
        ));
    }

    #[test]
    fn warnings_are_limited_per_second() {
        let limit = LogLimit::new("test lines");
        let t = Instant::now();
        let allowed = (0..100).filter(|_| limit.allow(t)).count();
        assert_eq!(allowed, WARNINGS_PER_SECOND as usize);
        // The second is not over: nothing to report yet.
        assert_eq!(limit.flush(t + Duration::from_millis(999)), 0);
        assert_eq!(
            limit.flush(t + Duration::from_secs(1)),
            100 - u64::from(WARNINGS_PER_SECOND)
        );
        // Reported once; a new second starts with the next warning.
        assert_eq!(limit.flush(t + Duration::from_secs(5)), 0);
        assert!(limit.allow(t + Duration::from_secs(5)));
    }

    #[test]
    fn zero_limits_are_refused() {
        let dir = std::path::Path::new("/nonexistent/never/created");
        for config in [
            ServerConfig {
                max_connections: 0,
                ..ServerConfig::new(dir)
            },
            ServerConfig {
                idle_timeout: Duration::ZERO,
                ..ServerConfig::new(dir)
            },
            ServerConfig {
                spare_timeout: Duration::ZERO,
                ..ServerConfig::new(dir)
            },
        ] {
            let err = Server::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config)
                .err()
                .expect("refused");
            // Refused before the state directory is touched.
            assert!(matches!(err, ArbiterError::Config(_)), "{err:?}");
            assert!(!dir.exists());
        }
    }
}
