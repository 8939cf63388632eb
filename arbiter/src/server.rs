//! The TCP server: a thread per connection, one lock around the state
//! machine and its state file, so that every answer follows the fsync of
//! the decision it reports.

use std::io::{self, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub state_dir: PathBuf,
    /// A server not heard from for longer is not a live spare.
    pub spare_timeout: Duration,
    /// Connections beyond this many are answered `busy` and closed.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl ServerConfig {
    pub const DEFAULT_SPARE_TIMEOUT: Duration = Duration::from_millis(500);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(state_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            state_dir: state_dir.into(),
            spare_timeout: Self::DEFAULT_SPARE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
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
    fn decide<T: serde::Serialize>(
        &mut self,
        vm: &str,
        op: impl FnOnce(&mut ViewService) -> Result<T, ViewError>,
    ) -> Answer {
        let before = self.views.vm(vm).cloned();
        let reply = op(&mut self.views).map_err(|e| (ErrorKind::Refused, e.to_string()))?;
        if self.views.vm(vm) != before.as_ref() {
            if let Err(e) = self.store.save(self.views.vms()) {
                self.views.restore(vm, before);
                error!(vm, "decision not persisted, so not made: {e}");
                return Err((
                    ErrorKind::Storage,
                    format!(
                        "the arbiter could not persist the decision, so it did not make it: {e}"
                    ),
                ));
            }
        }
        Ok(ok_line(&reply))
    }

    fn answer(&mut self, request: Request) -> Answer {
        match request {
            Request::Ping { vm, me, view_known } => self.decide(&vm, |views| {
                views
                    .ping(&vm, &me, view_known, Instant::now())
                    .map(|view| ViewReply { view })
            }),
            Request::TestAndSet { vm, view, claimant } => {
                self.decide(&vm, |views| views.test_and_set(&vm, view, &claimant))
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
}

impl Server {
    /// Locks and loads the state directory, then binds `listen` (port 0
    /// picks a free port; see [`Server::local_addr`]).
    pub fn bind(listen: SocketAddr, config: ServerConfig) -> Result<Server, ArbiterError> {
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
        let active = AtomicUsize::new(0);
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
                    Ok((stream, peer)) => self.admit(scope, stream, peer, &active, stop),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Out of descriptors and the like: keep serving the
                    // connections there are.
                    Err(e) => {
                        warn!("accept failed: {e}");
                        thread::sleep(POLL);
                    }
                }
            }
            Ok::<(), ArbiterError>(())
        })?;
        info!(addr = %self.addr, "arbiter stopped");
        Ok(())
    }

    /// `accept` blocks, so that a connection is taken at once rather than
    /// at the next poll, and only a connection wakes it: once `stop` is
    /// set, this makes one.
    fn wake_on_stop(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(POLL);
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

    fn admit<'scope>(
        &'scope self,
        scope: &'scope Scope<'scope, '_>,
        stream: TcpStream,
        peer: SocketAddr,
        active: &'scope AtomicUsize,
        stop: &'scope AtomicBool,
    ) {
        let limit = self.config.max_connections;
        if active.load(Ordering::SeqCst) >= limit {
            warn!(%peer, limit, "too many connections: refusing one");
            refuse(
                stream,
                &format!("too many connections (limit {limit}); try again later"),
            );
            return;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let spawned = thread::Builder::new()
            .name(format!("arbiter conn {peer}"))
            .spawn_scoped(scope, move || {
                self.converse(stream, peer, stop);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            // The closure, and the stream in it, are gone with the error.
            active.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, "cannot start a connection thread: {e}");
        }
    }

    fn converse(&self, stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
        debug!(%peer, "connection opened");
        if let Err(e) = self.converse_inner(stream, peer, stop) {
            debug!(%peer, "connection ended: {e}");
        } else {
            debug!(%peer, "connection closed");
        }
    }

    fn converse_inner(
        &self,
        stream: TcpStream,
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
                    let response = self.respond(&line, peer);
                    writer.write_all(&response)?;
                    line.clear();
                    last_request = Instant::now();
                }
                Ok(LineRead::Eof) => return Ok(()),
                Ok(LineRead::TooLong) => {
                    let err = ProtocolError::TooLong;
                    warn!(%peer, "{err}; closing the connection");
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
                warn!(%peer, "{e}");
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
        match core.answer(request) {
            Ok(line) => line,
            Err((kind, message)) => {
                warn!(%peer, %kind, "{message}");
                error_line(kind, &message)
            }
        }
    }
}

fn refuse(mut stream: TcpStream, message: &str) {
    // Best effort: the peer is told why if it is listening, and the
    // accept loop never waits on it for long.
    let _ = stream.set_write_timeout(Some(POLL));
    let _ = stream.write_all(&error_line(ErrorKind::Busy, message));
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
