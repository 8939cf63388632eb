//! A KV client that finds its server through the arbiter and follows the
//! primary across failovers (docs/protocol.md, arbiter/README.md).
//!
//! [`KvClient`] sends to one address. [`FailoverClient`] asks the arbiter
//! for the current view and sends to its primary's service address; when a
//! *round* (a few short attempts) gets no reply, it asks the arbiter again,
//! points the `KvClient` at whatever primary the arbiter now names (perhaps
//! the same one) and repeats the same call. Repeating the same call keeps
//! the request number, so a request that the old primary executed, and that
//! the backup therefore has in its client table when it goes live, is
//! answered from that table instead of being executed twice. Every call is
//! bounded by a total timeout, over all its rounds, queries and pauses.
//!
//! The primary's address is remembered between calls: the arbiter is asked
//! on the first call and after a round without a reply, not on every call.
//!
//! After a call fails, its request may or may not have been executed. As
//! with `KvClient`, calling again with the same arguments retries it under
//! the same number; any other call abandons it and takes the next number.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arbiter::{Arbiter, ArbiterAddr, ArbiterError, ErrorKind, View, MAX_ID_LEN};
use thiserror::Error;
use tracing::debug;

use crate::client::{
    entropy_mix, status_error, ClientConfig, ClientError, ClientStats, KvClient, ENTROPY_KEY,
};
use crate::proto::{Op, Reply, Request, Status};

/// The VM id `ftvm kv --arbiter` asks about unless told otherwise.
pub const DEFAULT_VM_ID: &str = "ftvm";

/// The shortest arbiter timeout used, however little time a call has left:
/// std refuses a zero timeout.
const MIN_ARBITER_TIMEOUT: Duration = Duration::from_millis(1);

/// Calls whose total timeout does not fit in an `Instant` get this instead.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where a [`FailoverClient`] sends its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSource {
    /// Always this address (`ftvm kv --server`).
    Fixed(SocketAddr),
    /// The service address of the primary of VM `vm_id`, as named by the
    /// arbiter at `addr`, built-in or etcd (`ftvm kv --arbiter`).
    Arbiter { addr: ArbiterAddr, vm_id: String },
}

impl ServerSource {
    /// The built-in arbiter at `addr`.
    pub fn arbiter(addr: SocketAddr, vm_id: impl Into<String>) -> ServerSource {
        Self::arbiter_at(ArbiterAddr::Builtin(addr), vm_id)
    }

    pub fn arbiter_at(addr: ArbiterAddr, vm_id: impl Into<String>) -> ServerSource {
        ServerSource::Arbiter {
            addr,
            vm_id: vm_id.into(),
        }
    }
}

impl fmt::Display for ServerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerSource::Fixed(addr) => write!(f, "server {addr}"),
            ServerSource::Arbiter { addr, vm_id } => {
                write!(f, "the primary of VM {vm_id:?} (arbiter {addr})")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverConfig {
    /// Bounds each call from its start to its reply, over all its rounds,
    /// arbiter queries and pauses.
    pub total_timeout: Duration,
    /// One round: the attempts sent to one primary before the arbiter is
    /// asked again. The last round is shortened to fit `total_timeout`.
    /// Unused with a [`ServerSource::Fixed`] server, where asking again
    /// would change nothing: there the whole budget is spread over attempts
    /// as by [`ClientConfig::with_total_timeout`].
    pub round: ClientConfig,
    /// Bounds an arbiter query's connecting, and separately its response
    /// (also never more than half of what is left of the call).
    pub arbiter_timeout: Duration,
    /// How long to wait before asking the arbiter again when there is no
    /// primary to send to: the arbiter names none, or cannot be reached
    /// before any primary was known.
    pub retry_pause: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            total_timeout: Duration::from_secs(5),
            round: ClientConfig {
                attempt_timeout: Duration::from_millis(200),
                max_attempts: 3,
            },
            arbiter_timeout: Duration::from_millis(500),
            retry_pause: Duration::from_millis(100),
        }
    }
}

impl FailoverConfig {
    pub fn with_total_timeout(total: Duration) -> Self {
        FailoverConfig {
            total_timeout: total,
            ..Self::default()
        }
    }
}

/// Who answered a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The request number the call used (and the reply carried).
    pub request_num: u64,
    /// Where the request was sent last: the fixed server, or the service
    /// address of the primary the arbiter named.
    pub server: SocketAddr,
    /// Where the reply came from; normally `server`.
    pub from: SocketAddr,
    /// The number of the view whose primary `server` is (`None` with a
    /// fixed server).
    pub view: Option<u64>,
    /// That primary's member id (`None` with a fixed server).
    pub primary_id: Option<String>,
    /// Rounds the call took: 1 unless a round went unanswered.
    pub rounds: u32,
    pub elapsed: Duration,
}

/// Counters over the client's lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailoverStats {
    /// Calls made, answered or not (requests refused as invalid before
    /// anything was sent are not counted).
    pub calls: u64,
    /// Rounds sent: one per answered call, more when rounds went
    /// unanswered.
    pub rounds: u64,
    /// Rounds that ended without a reply (timeout or socket error).
    pub failed_rounds: u64,
    /// Arbiter queries, answered or not.
    pub queries: u64,
    /// Queries made because a round went unanswered (in this call or at
    /// the end of the previous one).
    pub re_resolutions: u64,
    /// Queries that got no usable answer (unreachable, rejected, unreadable).
    pub arbiter_errors: u64,
    /// Answers that named no primary.
    pub no_primary: u64,
    /// Times the arbiter named a primary at another address than before.
    pub server_changes: u64,
    /// The datagram-level counters of the underlying [`KvClient`].
    pub datagrams: ClientStats,
}

#[derive(Debug, Error)]
pub enum FailoverError {
    /// An invalid request, an error status, or (with a fixed server) no
    /// reply: as from [`KvClient`].
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("invalid VM id {vm_id:?}: must be 1 to {MAX_ID_LEN} bytes")]
    InvalidVmId { vm_id: String },
    /// The arbiter's client could not be started (for etcd: its runtime).
    #[error("cannot start the client of the arbiter at {arbiter}: {source}")]
    ArbiterClient {
        arbiter: ArbiterAddr,
        source: Box<ArbiterError>,
    },
    /// No primary was ever learned in this call, because the arbiter could
    /// not be asked (until the timeout), or answered in a way that asking
    /// again cannot fix.
    #[error(
        "cannot learn the primary of VM {vm_id:?} from the arbiter at {arbiter}: {} \
         ({queries} quer{} in {:.1} s)",
        describe(.source.as_ref()),
        if *.queries == 1 { "y" } else { "ies" },
        .elapsed.as_secs_f64()
    )]
    Arbiter {
        arbiter: ArbiterAddr,
        vm_id: String,
        queries: u32,
        elapsed: Duration,
        /// Boxed to keep results small.
        source: Box<ArbiterError>,
    },
    /// The arbiter answered, but named no primary until the timeout (view
    /// 0: no server of this VM has pinged it).
    #[error(
        "the arbiter at {arbiter} names no primary for VM {vm_id:?} (view {view}) \
         after {:.1} s of asking",
        .elapsed.as_secs_f64()
    )]
    NoPrimary {
        arbiter: ArbiterAddr,
        vm_id: String,
        view: u64,
        elapsed: Duration,
    },
    /// Requests were sent, but no reply came before the timeout.
    #[error(
        "no reply from the primary of VM {vm_id:?} within {:.1} s: {rounds} round{}, \
         the last to {server} (view {view}){}",
        .elapsed.as_secs_f64(),
        if *.rounds == 1 { "" } else { "s" },
        .note.as_deref().map(|note| format!("; {note}")).unwrap_or_default()
    )]
    Timeout {
        vm_id: String,
        /// The primary the last round went to, and its view.
        server: SocketAddr,
        view: u64,
        rounds: u32,
        elapsed: Duration,
        /// What else went wrong: the last arbiter query, or the last
        /// round's socket error.
        note: Option<String>,
    },
}

/// An arbiter error without the arbiter's address, which the message
/// around it names already.
fn describe(error: &ArbiterError) -> String {
    match error {
        ArbiterError::Unreachable { source, .. } => format!("unreachable: {source}"),
        ArbiterError::Rejected { kind, message, .. } => {
            format!("the query was rejected ({kind}): {message}")
        }
        ArbiterError::BadResponse { detail, .. } => {
            format!("its response cannot be read: {detail}")
        }
        other => other.to_string(),
    }
}

/// Why a query gave no primary to send to.
#[derive(Debug)]
enum Trouble {
    Arbiter(ArbiterError),
    NoPrimary { view: u64 },
}

impl Trouble {
    /// Asking again would get the same answer: the arbiter does not
    /// understand us, or is not an arbiter.
    fn is_final(error: &ArbiterError) -> bool {
        matches!(
            error,
            ArbiterError::BadResponse { .. }
                | ArbiterError::Rejected {
                    kind: ErrorKind::Version | ErrorKind::Malformed | ErrorKind::TooLong,
                    ..
                }
        )
    }

    fn note(&self, arbiter: &ArbiterAddr) -> String {
        match self {
            Trouble::Arbiter(error) => {
                format!(
                    "the last query to the arbiter at {arbiter}: {}",
                    describe(error)
                )
            }
            Trouble::NoPrimary { view } => {
                format!("the last query to the arbiter at {arbiter} named no primary (view {view})")
            }
        }
    }
}

/// The primary the arbiter named last.
#[derive(Debug)]
struct Resolved {
    view: View,
    server: SocketAddr,
}

/// The state of one call through the arbiter.
struct Attempt {
    started: Instant,
    deadline: Instant,
    rounds: u32,
    queries: u32,
    /// The server and view the last round went to.
    last_sent: Option<(SocketAddr, u64)>,
    /// Set when the last query failed, cleared when one succeeds.
    trouble: Option<Trouble>,
    /// The last round's socket error, cleared by a round without one.
    round_error: Option<ClientError>,
}

impl Attempt {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The error for a call that reached its deadline without a reply.
    fn timed_out(self, arbiter: &ArbiterAddr, vm_id: &str) -> FailoverError {
        let vm_id = vm_id.to_owned();
        let arbiter = arbiter.clone();
        let elapsed = self.started.elapsed();
        match (self.last_sent, self.trouble) {
            (Some((server, view)), trouble) => FailoverError::Timeout {
                vm_id,
                server,
                view,
                rounds: self.rounds,
                elapsed,
                note: trouble.map(|t| t.note(&arbiter)).or_else(|| {
                    self.round_error
                        .map(|e| format!("the last round failed: {e}"))
                }),
            },
            (None, Some(Trouble::Arbiter(source))) => FailoverError::Arbiter {
                arbiter,
                vm_id,
                queries: self.queries,
                elapsed,
                source: Box::new(source),
            },
            (None, Some(Trouble::NoPrimary { view })) => FailoverError::NoPrimary {
                arbiter,
                vm_id,
                view,
                elapsed,
            },
            // Rounds are sent only to a primary, so a call that sent none
            // ended on a failed query; this is for completeness.
            (None, None) => FailoverError::NoPrimary {
                arbiter,
                vm_id,
                view: 0,
                elapsed,
            },
        }
    }
}

/// Where calls go, with the arbiter's client made once: an etcd client
/// holds connections that every query reuses.
#[derive(Clone, Debug)]
enum Target {
    Fixed(SocketAddr),
    Arbiter {
        arbiter: Arc<dyn Arbiter>,
        vm_id: String,
    },
}

/// A KV client that sends to a fixed server or to the primary the arbiter
/// names, following it across failovers; see the module documentation.
#[derive(Debug)]
pub struct FailoverClient {
    client: KvClient,
    source: ServerSource,
    target: Target,
    config: FailoverConfig,
    resolved: Option<Resolved>,
    /// The last call ended without a reply from `resolved`: the next one
    /// asks the arbiter first.
    suspect: bool,
    last_answer: Option<Answered>,
    stats: FailoverStats,
}

impl FailoverClient {
    /// A client with a random non-zero id. Nothing is sent, and the arbiter
    /// is not asked, until the first call.
    pub fn new(source: ServerSource, config: FailoverConfig) -> Result<Self, FailoverError> {
        let client = KvClient::connect(initial_server(&source), config.round)?;
        Self::build(client, source, config)
    }

    /// A client with a chosen id (not 0).
    pub fn with_client_id(
        source: ServerSource,
        config: FailoverConfig,
        client_id: u64,
    ) -> Result<Self, FailoverError> {
        let client = KvClient::with_client_id(initial_server(&source), config.round, client_id)?;
        Self::build(client, source, config)
    }

    fn build(
        client: KvClient,
        source: ServerSource,
        config: FailoverConfig,
    ) -> Result<Self, FailoverError> {
        let target = match &source {
            ServerSource::Fixed(server) => Target::Fixed(*server),
            ServerSource::Arbiter { addr, vm_id } => {
                if vm_id.is_empty() || vm_id.len() > MAX_ID_LEN {
                    return Err(FailoverError::InvalidVmId {
                        vm_id: vm_id.clone(),
                    });
                }
                // Each query bounds itself (see `query`); this is the
                // longest.
                let arbiter = arbiter::connect(addr, config.arbiter_timeout).map_err(|e| {
                    FailoverError::ArbiterClient {
                        arbiter: addr.clone(),
                        source: Box::new(e),
                    }
                })?;
                Target::Arbiter {
                    arbiter,
                    vm_id: vm_id.clone(),
                }
            }
        };
        Ok(FailoverClient {
            client,
            source,
            target,
            config,
            resolved: None,
            suspect: false,
            last_answer: None,
            stats: FailoverStats::default(),
        })
    }

    pub fn client_id(&self) -> u64 {
        self.client.client_id()
    }

    pub fn source(&self) -> &ServerSource {
        &self.source
    }

    pub fn config(&self) -> FailoverConfig {
        self.config
    }

    /// Applies from the next call on.
    pub fn set_config(&mut self, config: FailoverConfig) {
        self.config = config;
    }

    /// Where the next call will be sent first: the fixed server, or the
    /// primary the arbiter named last (`None` before it named one).
    pub fn server(&self) -> Option<SocketAddr> {
        match &self.source {
            ServerSource::Fixed(addr) => Some(*addr),
            ServerSource::Arbiter { .. } => self.resolved.as_ref().map(|r| r.server),
        }
    }

    /// The last view the arbiter gave that named a primary.
    pub fn view(&self) -> Option<&View> {
        self.resolved.as_ref().map(|r| &r.view)
    }

    /// Who answered the last call; `None` if it failed.
    pub fn last_answer(&self) -> Option<&Answered> {
        self.last_answer.as_ref()
    }

    pub fn stats(&self) -> FailoverStats {
        FailoverStats {
            datagrams: self.client.stats(),
            ..self.stats
        }
    }

    /// The value of `key`, or `None` if the store has no such key.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, FailoverError> {
        let reply = self.call(Op::Get, key, &[])?;
        match reply.status {
            Status::Ok => Ok(Some(reply.value)),
            Status::NotFound => Ok(None),
            _ => Err(status_error(Op::Get, &reply).into()),
        }
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), FailoverError> {
        self.call_ok(Op::Put, key, value).map(drop)
    }

    pub fn append(&mut self, key: &[u8], value: &[u8]) -> Result<(), FailoverError> {
        self.call_ok(Op::Append, key, value).map(drop)
    }

    /// Has the guest draw `n` (1..=10000) times from each of its sources of
    /// nondeterminism and returns their mix.
    pub fn entropy(&mut self, n: u32) -> Result<u64, FailoverError> {
        let reply = self.call_ok(Op::Entropy, ENTROPY_KEY, &n.to_le_bytes())?;
        Ok(entropy_mix(&reply)?)
    }

    fn call_ok(&mut self, op: Op, key: &[u8], value: &[u8]) -> Result<Reply, FailoverError> {
        let reply = self.call(op, key, value)?;
        match reply.status {
            Status::Ok => Ok(reply),
            _ => Err(status_error(op, &reply).into()),
        }
    }

    /// Sends one request and returns its reply whatever the status; see
    /// the module documentation for the rounds. [`last_answer`] then tells
    /// who answered.
    ///
    /// [`last_answer`]: Self::last_answer
    pub fn call(&mut self, op: Op, key: &[u8], value: &[u8]) -> Result<Reply, FailoverError> {
        self.last_answer = None;
        // An invalid request fails at once, without bothering the arbiter.
        Request {
            op,
            client_id: self.client.client_id(),
            request_num: 1,
            key: key.to_vec(),
            value: value.to_vec(),
        }
        .encode()
        .map_err(ClientError::from)?;
        self.stats.calls += 1;
        let started = Instant::now();
        match self.target.clone() {
            Target::Fixed(server) => self.call_fixed(op, key, value, server, started),
            Target::Arbiter { arbiter, vm_id } => {
                self.call_via_arbiter(op, key, value, &*arbiter, &vm_id, started)
            }
        }
    }

    fn call_fixed(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        server: SocketAddr,
        started: Instant,
    ) -> Result<Reply, FailoverError> {
        self.client
            .set_config(ClientConfig::with_total_timeout(self.config.total_timeout));
        self.stats.rounds += 1;
        match self.client.call(op, key, value) {
            Ok(reply) => {
                self.answered(&reply, server, None, 1, started);
                Ok(reply)
            }
            Err(error) => {
                if matches!(error, ClientError::Timeout { .. } | ClientError::Io { .. }) {
                    self.stats.failed_rounds += 1;
                }
                Err(error.into())
            }
        }
    }

    fn call_via_arbiter(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        arbiter: &dyn Arbiter,
        vm_id: &str,
        started: Instant,
    ) -> Result<Reply, FailoverError> {
        let addr = arbiter.addr();
        let mut attempt = Attempt {
            started,
            deadline: started
                .checked_add(self.config.total_timeout)
                .unwrap_or(started + FOREVER),
            rounds: 0,
            queries: 0,
            last_sent: None,
            trouble: None,
            round_error: None,
        };
        let mut ask = self.resolved.is_none() || self.suspect;
        if ask && self.resolved.is_some() {
            self.stats.re_resolutions += 1;
        }
        loop {
            if ask {
                match self.query(arbiter, vm_id, &mut attempt) {
                    Ok(()) => {
                        attempt.trouble = None;
                        self.suspect = false;
                    }
                    Err(Trouble::Arbiter(source)) if Trouble::is_final(&source) => {
                        return Err(FailoverError::Arbiter {
                            arbiter: addr,
                            vm_id: vm_id.to_owned(),
                            queries: attempt.queries,
                            elapsed: started.elapsed(),
                            source: Box::new(source),
                        });
                    }
                    Err(trouble) => {
                        let nothing_to_send_to =
                            self.resolved.is_none() || matches!(trouble, Trouble::NoPrimary { .. });
                        attempt.trouble = Some(trouble);
                        if nothing_to_send_to {
                            if !self.pause(&attempt) {
                                return Err(attempt.timed_out(&addr, vm_id));
                            }
                            continue;
                        }
                        // The arbiter cannot say, but the primary it named
                        // last may still be there: try it again, and ask
                        // again after this round.
                        debug!(arbiter = %addr, "arbiter unreachable: trying the last primary again");
                    }
                }
            }
            let Some(resolved) = &self.resolved else {
                return Err(attempt.timed_out(&addr, vm_id));
            };
            let (server, view) = (resolved.server, resolved.view.number);
            let primary_id = resolved.view.primary.as_ref().map(|p| p.id.clone());
            self.client
                .set_config(round_config(self.config.round, attempt.left()));
            attempt.rounds += 1;
            attempt.last_sent = Some((server, view));
            self.stats.rounds += 1;
            self.suspect = true;
            match self.client.call(op, key, value) {
                Ok(reply) => {
                    self.suspect = false;
                    let rounds = attempt.rounds;
                    self.answered(&reply, server, Some((view, primary_id)), rounds, started);
                    return Ok(reply);
                }
                Err(error @ ClientError::Timeout { .. }) => {
                    debug!(%server, view, %error, "round unanswered: asking the arbiter again");
                    self.stats.failed_rounds += 1;
                    attempt.round_error = None;
                    if attempt.left().is_zero() {
                        return Err(attempt.timed_out(&addr, vm_id));
                    }
                }
                Err(error @ ClientError::Io { .. }) => {
                    debug!(%server, view, %error, "round failed: asking the arbiter again");
                    self.stats.failed_rounds += 1;
                    attempt.round_error = Some(error);
                    // Socket errors tend to come at once: do not spin.
                    if !self.pause(&attempt) {
                        return Err(attempt.timed_out(&addr, vm_id));
                    }
                }
                // An answer, or an invalid request: another round would not
                // change it.
                Err(error) => {
                    self.suspect = false;
                    return Err(error.into());
                }
            }
            ask = true;
            self.stats.re_resolutions += 1;
        }
    }

    /// Asks the arbiter for the current view and, if it names a primary,
    /// points the client at it.
    fn query(
        &mut self,
        arbiter: &dyn Arbiter,
        vm_id: &str,
        attempt: &mut Attempt,
    ) -> Result<(), Trouble> {
        // Connecting and the response are bounded separately, hence the half.
        let timeout = self
            .config
            .arbiter_timeout
            .min(attempt.left() / 2)
            .max(MIN_ARBITER_TIMEOUT);
        attempt.queries += 1;
        self.stats.queries += 1;
        let view = arbiter
            .with_call_timeout(timeout)
            .query(vm_id)
            .map_err(|error| {
                debug!(arbiter = %arbiter.addr(), vm_id, %error, "arbiter query failed");
                self.stats.arbiter_errors += 1;
                Trouble::Arbiter(error)
            })?;
        let Some(primary) = &view.primary else {
            debug!(arbiter = %arbiter.addr(), vm_id, view = view.number, "the arbiter names no primary");
            self.stats.no_primary += 1;
            return Err(Trouble::NoPrimary { view: view.number });
        };
        let server = primary.service_addr;
        if self.resolved.as_ref().is_some_and(|r| r.server != server) {
            self.stats.server_changes += 1;
        }
        debug!(arbiter = %arbiter.addr(), vm_id, %view, %server, "the arbiter names the primary");
        self.client.set_server(server);
        self.resolved = Some(Resolved { view, server });
        Ok(())
    }

    /// Sleeps for the retry pause, cut short by the deadline; false if the
    /// deadline has come.
    fn pause(&self, attempt: &Attempt) -> bool {
        thread::sleep(self.config.retry_pause.min(attempt.left()));
        !attempt.left().is_zero()
    }

    fn answered(
        &mut self,
        reply: &Reply,
        server: SocketAddr,
        view: Option<(u64, Option<String>)>,
        rounds: u32,
        started: Instant,
    ) {
        let (view, primary_id) = match view {
            Some((view, primary_id)) => (Some(view), primary_id),
            None => (None, None),
        };
        self.last_answer = Some(Answered {
            request_num: reply.request_num,
            server,
            from: self.client.last_reply_from().unwrap_or(server),
            view,
            primary_id,
            rounds,
            elapsed: started.elapsed(),
        });
    }
}

/// Where the `KvClient` points before the arbiter named a primary; nothing
/// is sent there, and the socket is bound again for the primary's address
/// if it needs another.
fn initial_server(source: &ServerSource) -> SocketAddr {
    match source {
        ServerSource::Fixed(addr)
        | ServerSource::Arbiter {
            addr: ArbiterAddr::Builtin(addr),
            ..
        } => *addr,
        ServerSource::Arbiter {
            addr: ArbiterAddr::Etcd(_),
            ..
        } => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// `round`, shortened to end within `left`.
fn round_config(round: ClientConfig, left: Duration) -> ClientConfig {
    let attempt_timeout = round.attempt_timeout.min(left);
    let fit = match attempt_timeout.as_nanos() {
        0 => 1,
        per_attempt => u32::try_from(left.as_nanos() / per_attempt).unwrap_or(u32::MAX),
    };
    ClientConfig {
        attempt_timeout,
        max_attempts: round.max_attempts.clamp(1, fit.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::fake_server::{member, Behavior, FakeServer, SharedStore, TestArbiter};

    const VM: &str = "vm1";

    /// Short rounds, so that failovers are quick to notice.
    fn fast(total_ms: u64) -> FailoverConfig {
        FailoverConfig {
            total_timeout: Duration::from_millis(total_ms),
            round: ClientConfig {
                attempt_timeout: Duration::from_millis(100),
                max_attempts: 2,
            },
            arbiter_timeout: Duration::from_millis(300),
            retry_pause: Duration::from_millis(20),
        }
    }

    fn via(arbiter: SocketAddr, total_ms: u64) -> FailoverClient {
        FailoverClient::new(ServerSource::arbiter(arbiter, VM), fast(total_ms)).unwrap()
    }

    /// An address where nothing listens.
    fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    /// Runs `f` on `client` on another thread, for a call that is in flight
    /// while the test changes the world.
    fn in_flight<T: Send + 'static>(
        mut client: FailoverClient,
        f: impl FnOnce(&mut FailoverClient) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<(FailoverClient, T)> {
        std::thread::spawn(move || {
            let result = f(&mut client);
            (client, result)
        })
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_fixed_server_is_used_as_given() {
        let server = FakeServer::start(Behavior::default());
        let mut client =
            FailoverClient::new(ServerSource::Fixed(server.addr()), fast(2000)).unwrap();
        assert_eq!(client.server(), Some(server.addr()));
        client.put(b"k", b"v").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"v".to_vec()));
        let answer = client.last_answer().unwrap();
        assert_eq!(
            (answer.request_num, answer.server, answer.from, answer.view),
            (2, server.addr(), server.addr(), None)
        );
        assert_eq!((answer.rounds, answer.primary_id.as_deref()), (1, None));
        let stats = client.stats();
        assert_eq!((stats.calls, stats.rounds, stats.queries), (2, 2, 0));
        assert_eq!(stats.datagrams.attempts, 2);
        let id = client.client_id();
        assert_eq!(server.stop(), [(id, 1), (id, 2)]);
    }

    #[test]
    fn a_silent_fixed_server_times_out_as_kv_client_does() {
        let server = FakeServer::start(Behavior {
            drop_requests: usize::MAX,
            ..Behavior::default()
        });
        let mut client =
            FailoverClient::new(ServerSource::Fixed(server.addr()), fast(300)).unwrap();
        let error = client.get(b"k").unwrap_err();
        assert!(
            matches!(
                error,
                FailoverError::Client(ClientError::Timeout { attempts: 1, .. })
            ),
            "{error:?}"
        );
        assert!(client.last_answer().is_none());
        assert_eq!(client.stats().failed_rounds, 1);
    }

    #[test]
    fn calls_go_to_the_primary_the_arbiter_names() {
        let arbiter = TestArbiter::start();
        let (a, b) = (
            FakeServer::start(Behavior::default()),
            FakeServer::start(Behavior::default()),
        );
        arbiter.register(VM, &member("a", &a), &member("b", &b));
        let mut client = via(arbiter.addr(), 3000);
        assert_eq!(client.server(), None);
        client.put(b"k", b"v").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"v".to_vec()));
        let answer = client.last_answer().unwrap().clone();
        assert_eq!(
            (answer.server, answer.from, answer.view, answer.rounds),
            (a.addr(), a.addr(), Some(2), 1)
        );
        assert_eq!(answer.primary_id.as_deref(), Some("a"));
        assert_eq!(client.server(), Some(a.addr()));
        assert_eq!(client.view().map(|v| v.number), Some(2));
        // The arbiter is asked once, not on every call.
        let stats = client.stats();
        assert_eq!(
            (
                stats.calls,
                stats.rounds,
                stats.queries,
                stats.failed_rounds
            ),
            (2, 2, 1, 0)
        );
        let id = client.client_id();
        assert_eq!(a.stop(), [(id, 1), (id, 2)]);
        assert_eq!(b.stop(), []);
    }

    #[test]
    fn after_a_failover_the_next_call_goes_to_the_new_primary() {
        let arbiter = TestArbiter::start();
        let store_b = SharedStore::default();
        let a = FakeServer::start(Behavior::default());
        // b loses its first reply, so the client resends to it, and b
        // answers from its client table.
        let b = FakeServer::start_on(
            Behavior {
                drop_replies: 1,
                ..Behavior::default()
            },
            &store_b,
        );
        let view = arbiter.register(VM, &member("a", &a), &member("b", &b));
        let mut client = via(arbiter.addr(), 5000);
        client.put(b"k", b"1").unwrap();
        let id = client.client_id();
        assert_eq!(a.stop(), [(id, 1)]);

        let new_view = arbiter.fail_over(VM, &view);
        assert_eq!(new_view.number, 3);
        client.append(b"k", b"2").unwrap();
        let answer = client.last_answer().unwrap();
        assert_eq!(
            (
                answer.request_num,
                answer.server,
                answer.view,
                answer.rounds
            ),
            (2, b.addr(), Some(3), 2)
        );
        assert_eq!(answer.primary_id.as_deref(), Some("b"));
        assert_eq!(store_b.value(b"k"), Some(b"2".to_vec()));
        assert_eq!(store_b.executions(), 1);
        let stats = client.stats();
        assert_eq!(
            (
                stats.failed_rounds,
                stats.re_resolutions,
                stats.queries,
                stats.server_changes
            ),
            (1, 1, 2, 1)
        );
        assert_eq!(b.stop(), [(id, 2), (id, 2)]);
    }

    #[test]
    fn a_call_in_flight_is_retried_at_the_new_primary_and_executed_once() {
        let arbiter = TestArbiter::start();
        // Primary and backup of one guest: what a executes, b has in its
        // client table (the log channel's job).
        let store = SharedStore::default();
        let a = FakeServer::start_on(
            Behavior {
                drop_replies: usize::MAX,
                ..Behavior::default()
            },
            &store,
        );
        let b = FakeServer::start_on(Behavior::default(), &store);
        let view = arbiter.register(VM, &member("a", &a), &member("b", &b));
        let call = in_flight(via(arbiter.addr(), 5000), |c| c.append(b"k", b"x"));

        // a executes the append and dies before its reply leaves.
        wait_until("a gets the request", || a.received() > 0);
        wait_until("a executes it", || store.executions() == 1);
        let to_a = a.stop();
        arbiter.fail_over(VM, &view);

        let (mut client, result) = call.join().unwrap();
        result.unwrap();
        let id = client.client_id();
        let answer = client.last_answer().unwrap();
        assert_eq!(
            (answer.request_num, answer.server, answer.view),
            (1, b.addr(), Some(3))
        );
        assert!(answer.rounds >= 2, "{answer:?}");
        assert!(
            !to_a.is_empty() && to_a.iter().all(|&r| r == (id, 1)),
            "{to_a:?}"
        );
        // Executed once: by a. b answered from the client table.
        assert_eq!(store.executions(), 1);
        assert_eq!(store.value(b"k"), Some(b"x".to_vec()));

        assert_eq!(client.get(b"k").unwrap(), Some(b"x".to_vec()));
        assert_eq!(client.last_answer().unwrap().rounds, 1);
        assert_eq!(b.stop(), [(id, 1), (id, 2)]);
    }

    #[test]
    fn after_a_call_times_out_the_next_asks_the_arbiter_first() {
        let arbiter = TestArbiter::start();
        let a = FakeServer::start(Behavior {
            drop_requests: usize::MAX,
            ..Behavior::default()
        });
        let b = FakeServer::start(Behavior::default());
        let view = arbiter.register(VM, &member("a", &a), &member("b", &b));
        let mut client = via(arbiter.addr(), 450);
        let error = client.put(b"k", b"1").unwrap_err();
        assert!(
            matches!(&error, FailoverError::Timeout { server, view: 2, note: None, .. } if *server == a.addr()),
            "{error:?}"
        );
        // How many rounds fit, and the time taken, depend on the machine.
        let message = error.to_string();
        let suffix = format!(" rounds, the last to {} (view 2)", a.addr());
        assert!(
            message.starts_with("no reply from the primary of VM \"vm1\" within 0.")
                && message.ends_with(&suffix),
            "{message}"
        );

        arbiter.fail_over(VM, &view);
        client.put(b"k", b"2").unwrap();
        let answer = client.last_answer().unwrap();
        assert_eq!(
            (
                answer.server,
                answer.view,
                answer.rounds,
                answer.request_num
            ),
            (b.addr(), Some(3), 1, 2)
        );
        let id = client.client_id();
        assert_eq!(b.stop(), [(id, 2)]);
    }

    #[test]
    fn a_call_waits_for_the_arbiter_to_name_a_primary() {
        let arbiter = TestArbiter::start();
        let a = FakeServer::start(Behavior::default());
        let call = in_flight(via(arbiter.addr(), 5000), |c| c.put(b"k", b"v"));
        thread::sleep(Duration::from_millis(200));
        // a's first ping makes it primary of view 1.
        arbiter.client().ping(VM, &member("a", &a), 0).unwrap();
        let (client, result) = call.join().unwrap();
        result.unwrap();
        let answer = client.last_answer().unwrap();
        assert_eq!((answer.server, answer.view), (a.addr(), Some(1)));
        let stats = client.stats();
        assert!(
            stats.no_primary >= 1 && stats.queries > stats.no_primary,
            "{stats:?}"
        );
        assert_eq!(a.stop(), [(client.client_id(), 1)]);
    }

    #[test]
    fn no_primary_until_the_timeout_is_an_error() {
        let arbiter = TestArbiter::start();
        let mut client = via(arbiter.addr(), 500);
        let started = Instant::now();
        let error = client.get(b"k").unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert!(
            matches!(error, FailoverError::NoPrimary { view: 0, .. }),
            "{error:?}"
        );
        let message = error.to_string();
        let expected = format!(
            "the arbiter at {} names no primary for VM \"vm1\" (view 0) after 0.",
            arbiter.addr()
        );
        assert!(message.starts_with(&expected), "{message}");
        assert_eq!(client.stats().rounds, 0);
    }

    #[test]
    fn an_unreachable_arbiter_is_a_clear_error_within_the_timeout() {
        let addr = closed_port();
        let mut client = via(addr, 800);
        let started = Instant::now();
        let error = client.put(b"k", b"v").unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        let FailoverError::Arbiter {
            arbiter, queries, ..
        } = &error
        else {
            panic!("expected an arbiter error, got {error:?}");
        };
        // It kept trying.
        assert!(
            *arbiter == ArbiterAddr::Builtin(addr) && *queries > 1,
            "{error:?}"
        );
        let message = error.to_string();
        let expected = format!(
            "cannot learn the primary of VM \"vm1\" from the arbiter at {addr}: unreachable: "
        );
        assert!(message.starts_with(&expected), "{message}");
        assert!(message.ends_with(" s)"), "{message}");
        assert_eq!(client.stats().rounds, 0);
    }

    #[test]
    fn a_silent_arbiter_is_a_clear_error_within_the_timeout() {
        // Connections are accepted by the kernel, and never answered.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let mut client = via(addr, 800);
        let started = Instant::now();
        let error = client.get(b"k").unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        assert!(
            matches!(&error, FailoverError::Arbiter { arbiter, .. } if *arbiter == ArbiterAddr::Builtin(addr)),
            "{error:?}"
        );
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }

    #[test]
    fn an_arbiter_that_does_not_speak_the_protocol_fails_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let impostor = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"hello\n").unwrap();
        });
        let mut client = via(addr, 3000);
        let started = Instant::now();
        let error = client.get(b"k").unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            matches!(
                &error,
                FailoverError::Arbiter { queries: 1, source, .. }
                    if matches!(**source, ArbiterError::BadResponse { .. })
            ),
            "{error:?}"
        );
        impostor.join().unwrap();
    }

    #[test]
    fn the_last_primary_is_tried_again_while_the_arbiter_is_down() {
        let mut arbiter = TestArbiter::start();
        let deaf = Arc::new(AtomicBool::new(false));
        let a = FakeServer::start(Behavior {
            deaf: Some(deaf.clone()),
            ..Behavior::default()
        });
        let b = FakeServer::start(Behavior::default());
        arbiter.register(VM, &member("a", &a), &member("b", &b));
        let mut client = via(arbiter.addr(), 3000);
        client.put(b"k", b"1").unwrap();
        let arbiter_addr = arbiter.addr();
        arbiter.stop();

        // The primary answers: the arbiter is not needed.
        client.put(b"k", b"2").unwrap();
        assert_eq!(client.stats().queries, 1);

        // The primary is cut off for a while, and the arbiter cannot be
        // asked: the client keeps trying the primary it knows.
        deaf.store(true, Ordering::SeqCst);
        let call = in_flight(client, |c| c.append(b"k", b"3"));
        wait_until("a drops a request", || a.received() >= 3);
        thread::sleep(Duration::from_millis(300));
        deaf.store(false, Ordering::SeqCst);
        let (mut client, result) = call.join().unwrap();
        result.unwrap();
        let answer = client.last_answer().unwrap();
        assert_eq!((answer.server, answer.request_num), (a.addr(), 3));
        assert!(answer.rounds >= 2, "{answer:?}");
        let stats = client.stats();
        assert!(stats.arbiter_errors >= 1, "{stats:?}");
        assert_eq!(client.get(b"k").unwrap(), Some(b"23".to_vec()));

        // Cut off until the timeout: the error says what was tried.
        deaf.store(true, Ordering::SeqCst);
        client.set_config(fast(600));
        let error = client.get(b"k").unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, FailoverError::Timeout { view: 2, .. }),
            "{error:?}"
        );
        // The number of rounds depends on how the last one is cut.
        let (start, rest) = message.split_once(" rounds, ").unwrap();
        assert!(
            start.starts_with("no reply from the primary of VM \"vm1\" within 0."),
            "{message}"
        );
        let expected = format!(
            "the last to {} (view 2); the last query to the arbiter at {arbiter_addr}: \
             unreachable: ",
            a.addr()
        );
        assert!(rest.starts_with(&expected), "{message}");
        assert_eq!(b.stop(), []);
    }

    #[test]
    fn invalid_requests_fail_without_asking_the_arbiter() {
        let mut client = via(closed_port(), 3000);
        let started = Instant::now();
        assert!(matches!(
            client.entropy(0),
            Err(FailoverError::Client(ClientError::Proto(_)))
        ));
        assert!(matches!(
            client.get(b""),
            Err(FailoverError::Client(ClientError::Proto(_)))
        ));
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(client.stats(), FailoverStats::default());
        for vm_id in [String::new(), "v".repeat(MAX_ID_LEN + 1)] {
            let source = ServerSource::arbiter(closed_port(), vm_id);
            assert!(matches!(
                FailoverClient::new(source, fast(100)),
                Err(FailoverError::InvalidVmId { .. })
            ));
        }
    }

    #[test]
    fn the_last_round_is_cut_to_the_deadline() {
        let round = ClientConfig {
            attempt_timeout: Duration::from_millis(200),
            max_attempts: 3,
        };
        let cut = |left_ms| {
            let config = round_config(round, Duration::from_millis(left_ms));
            (config.max_attempts, config.attempt_timeout.as_millis())
        };
        assert_eq!(cut(5000), (3, 200));
        assert_eq!(cut(600), (3, 200));
        assert_eq!(cut(450), (2, 200));
        assert_eq!(cut(150), (1, 150));
        assert_eq!(cut(0), (1, 0));
    }

    #[test]
    fn sources_display() {
        let addr: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        assert_eq!(
            ServerSource::Fixed(addr).to_string(),
            "server 127.0.0.1:7100"
        );
        assert_eq!(
            ServerSource::arbiter(addr, "ftvm").to_string(),
            "the primary of VM \"ftvm\" (arbiter 127.0.0.1:7100)"
        );
    }
}
