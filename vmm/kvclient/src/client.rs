//! A UDP client for the guest's KV service.
//!
//! UDP loses datagrams, so the client resends a request until a reply comes.
//! Every resend is the same datagram with the same request number: the
//! guest's client table then executes it at most once and answers a
//! duplicate with the stored reply, which makes retries safe for Append.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rand::Rng;
use thiserror::Error;
use tracing::debug;

use crate::proto::{
    Op, ProtoError, Reply, Request, Status, ENTROPY_REPLY_VALUE_LEN, MAX_VALUE_LEN,
};

/// The guest ignores an Entropy request's key, but the format demands one.
pub(super) const ENTROPY_KEY: &[u8] = b"entropy";

/// Larger than any datagram, so that an oversized one is seen whole and
/// rejected by its length rather than silently truncated into a valid reply.
const RECV_BUF_LEN: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// How long to wait for a reply before sending the request again.
    pub attempt_timeout: Duration,
    /// How many times a request is sent before giving up; at least one
    /// attempt is always made.
    pub max_attempts: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            attempt_timeout: Duration::from_millis(300),
            max_attempts: 20,
        }
    }
}

impl ClientConfig {
    /// Spreads a total budget over attempts of about the default length, so
    /// that the last attempt ends at `total`, never later.
    pub fn with_total_timeout(total: Duration) -> Self {
        let per_attempt = Self::default().attempt_timeout.as_nanos();
        let attempts = u32::try_from(total.as_nanos() / per_attempt)
            .unwrap_or(u32::MAX)
            .max(1);
        ClientConfig {
            attempt_timeout: total / attempts,
            max_attempts: attempts,
        }
    }
}

/// Counters over the client's lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Request datagrams sent, first sends and resends.
    pub attempts: u64,
    /// Resends alone.
    pub retries: u64,
    /// Well-formed replies that were not for the request waited on: late
    /// duplicates of earlier requests, or another client's.
    pub ignored_replies: u64,
    /// Datagrams that did not decode as a reply.
    pub undecodable: u64,
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    Proto(#[from] ProtoError),
    #[error("UDP socket error talking to {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "no reply from {server} after {attempts} attempt{} ({:.1} s)",
        if *.attempts == 1 { "" } else { "s" },
        .elapsed.as_secs_f64()
    )]
    Timeout {
        server: SocketAddr,
        attempts: u32,
        elapsed: Duration,
    },
    #[error("{op} refused: the value would exceed {MAX_VALUE_LEN} bytes (TooLarge)")]
    TooLarge { op: Op },
    #[error("the server rejected the {op} request as malformed (BadRequest)")]
    BadRequest { op: Op },
    #[error(
        "request {request_num} of client {client_id:#018x} is stale: \
         the server already executed a later one (Stale)"
    )]
    Stale { client_id: u64, request_num: u64 },
    #[error("{op} refused: the server's client table or store is full (Busy)")]
    Busy { op: Op },
    #[error("unexpected reply to {op}: {detail}")]
    UnexpectedReply { op: Op, detail: String },
}

/// A request sent without a reply yet, kept so that calling again with the
/// same arguments (say, after a timeout and `set_server`) is recognised as a
/// retry of it.
#[derive(Debug)]
struct Unanswered {
    request_num: u64,
    datagram: Vec<u8>,
}

#[derive(Debug)]
pub struct KvClient {
    socket: UdpSocket,
    /// What `socket` is bound to, so a change of server can tell whether it
    /// needs another socket.
    bound_ip: IpAddr,
    server: SocketAddr,
    client_id: u64,
    next_request_num: u64,
    unanswered: Option<Unanswered>,
    config: ClientConfig,
    stats: ClientStats,
    /// Where the last accepted reply came from.
    last_reply_from: Option<SocketAddr>,
    recv_buf: Vec<u8>,
}

impl KvClient {
    /// A client with a random non-zero id, so that clients of one guest do
    /// not share a client-table entry.
    pub fn connect(server: SocketAddr, config: ClientConfig) -> Result<Self, ClientError> {
        let client_id = rand::rng().random_range(1..=u64::MAX);
        Self::with_client_id(server, config, client_id)
    }

    /// A client with a chosen id, e.g. to continue another client's request
    /// numbering. The id must not be 0.
    pub fn with_client_id(
        server: SocketAddr,
        config: ClientConfig,
        client_id: u64,
    ) -> Result<Self, ClientError> {
        if client_id == 0 {
            return Err(ProtoError::ZeroClientId.into());
        }
        let bound_ip = local_ip_for(server);
        let socket = bind(bound_ip, server)?;
        Ok(KvClient {
            socket,
            bound_ip,
            server,
            client_id,
            next_request_num: 1,
            unanswered: None,
            config,
            stats: ClientStats::default(),
            last_reply_from: None,
            recv_buf: vec![0; RECV_BUF_LEN],
        })
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Sends later requests, and retries, to `server`. A request that timed
    /// out keeps its number when called again with the same arguments, so a
    /// new primary that already executed it answers from its client table.
    pub fn set_server(&mut self, server: SocketAddr) {
        self.server = server;
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    pub fn config(&self) -> ClientConfig {
        self.config
    }

    /// Applies to later calls, retries included: e.g. to spread what is left
    /// of a caller's own deadline over the next call's attempts.
    pub fn set_config(&mut self, config: ClientConfig) {
        self.config = config;
    }

    /// The address the last accepted reply came from. It is usually
    /// [`server`](Self::server), but replies are accepted from anywhere (see
    /// [`call`](Self::call)).
    pub fn last_reply_from(&self) -> Option<SocketAddr> {
        self.last_reply_from
    }

    /// The value of `key`, or `None` if the store has no such key.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let reply = self.call(Op::Get, key, &[])?;
        match reply.status {
            Status::Ok => Ok(Some(reply.value)),
            Status::NotFound => Ok(None),
            _ => Err(status_error(Op::Get, &reply)),
        }
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.call_ok(Op::Put, key, value).map(drop)
    }

    pub fn append(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.call_ok(Op::Append, key, value).map(drop)
    }

    /// Has the guest draw `n` (1..=10000) times from each of its sources of
    /// nondeterminism and returns their mix.
    pub fn entropy(&mut self, n: u32) -> Result<u64, ClientError> {
        let reply = self.call_ok(Op::Entropy, ENTROPY_KEY, &n.to_le_bytes())?;
        entropy_mix(&reply)
    }

    /// Sends one request and returns its reply whatever the status.
    ///
    /// The request is sent up to `max_attempts` times, waiting
    /// `attempt_timeout` after each, always as the same datagram. Datagrams
    /// that are not the reply to it are ignored and counted in
    /// [`stats`](Self::stats); replies are accepted from any address, since
    /// after a failover the answer may come from elsewhere.
    ///
    /// After an error the request stays unanswered: calling again with the
    /// same `op`, `key` and `value` retries it under the same request number,
    /// anything else abandons it and takes the next number (reusing the
    /// number for a different request would fetch the old one's stored reply).
    pub fn call(&mut self, op: Op, key: &[u8], value: &[u8]) -> Result<Reply, ClientError> {
        let (request_num, datagram) = self.prepare(op, key, value)?;
        self.rebind_if_needed()?;
        let attempts = self.config.max_attempts.max(1);
        let started = Instant::now();
        for attempt in 1..=attempts {
            if attempt > 1 {
                self.stats.retries += 1;
                debug!(server = %self.server, request_num, attempt, "resending");
            }
            self.stats.attempts += 1;
            self.socket
                .send_to(&datagram, self.server)
                .map_err(|source| self.io_error(source))?;
            // No deadline if it is beyond what `Instant` can represent.
            let deadline = Instant::now().checked_add(self.config.attempt_timeout);
            if let Some(reply) = self.await_reply(op, request_num, deadline)? {
                self.unanswered = None;
                return Ok(reply);
            }
        }
        Err(ClientError::Timeout {
            server: self.server,
            attempts,
            elapsed: started.elapsed(),
        })
    }

    fn call_ok(&mut self, op: Op, key: &[u8], value: &[u8]) -> Result<Reply, ClientError> {
        let reply = self.call(op, key, value)?;
        match reply.status {
            Status::Ok => Ok(reply),
            _ => Err(status_error(op, &reply)),
        }
    }

    /// Picks the request number and encodes the datagram; see [`call`](Self::call)
    /// on retries of an unanswered request.
    fn prepare(&mut self, op: Op, key: &[u8], value: &[u8]) -> Result<(u64, Vec<u8>), ClientError> {
        let request = |request_num| Request {
            op,
            client_id: self.client_id,
            request_num,
            key: key.to_vec(),
            value: value.to_vec(),
        };
        if let Some(unanswered) = &self.unanswered {
            let retry = request(unanswered.request_num).encode()?;
            if retry == unanswered.datagram {
                return Ok((unanswered.request_num, retry));
            }
        }
        let request_num = self.next_request_num;
        let datagram = request(request_num).encode()?;
        self.next_request_num += 1;
        self.unanswered = Some(Unanswered {
            request_num,
            datagram: datagram.clone(),
        });
        Ok((request_num, datagram))
    }

    /// The reply to `request_num`, or `None` once `deadline` passes.
    fn await_reply(
        &mut self,
        op: Op,
        request_num: u64,
        deadline: Option<Instant>,
    ) -> Result<Option<Reply>, ClientError> {
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            // std refuses a zero read timeout, and there is no time left anyway.
            if remaining.is_some_and(|r| r.is_zero()) {
                return Ok(None);
            }
            self.socket
                .set_read_timeout(remaining)
                .map_err(|source| self.io_error(source))?;
            let (len, from) = match self.socket.recv_from(&mut self.recv_buf) {
                Ok(received) => received,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(self.io_error(source)),
            };
            match Reply::decode(&self.recv_buf[..len]) {
                Ok(reply)
                    if reply.client_id == self.client_id
                        && reply.request_num == request_num
                        && reply.op == op as u8 =>
                {
                    self.last_reply_from = Some(from);
                    return Ok(Some(reply));
                }
                Ok(reply) => {
                    self.stats.ignored_replies += 1;
                    debug!(
                        %from,
                        client_id = reply.client_id,
                        request_num = reply.request_num,
                        op = reply.op,
                        expected_request_num = request_num,
                        "ignoring a reply to another request"
                    );
                }
                Err(error) => {
                    self.stats.undecodable += 1;
                    debug!(%from, %error, "ignoring an undecodable datagram");
                }
            }
        }
    }

    /// A socket bound to loopback cannot reach another host, and one of one
    /// address family cannot send to the other.
    fn rebind_if_needed(&mut self) -> Result<(), ClientError> {
        let wanted = local_ip_for(self.server);
        if wanted != self.bound_ip {
            self.socket = bind(wanted, self.server)?;
            self.bound_ip = wanted;
        }
        Ok(())
    }

    fn io_error(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            server: self.server,
            source,
        }
    }
}

/// Loopback for a loopback server, which keeps off-host datagrams away;
/// otherwise any address of the server's family.
fn local_ip_for(server: SocketAddr) -> IpAddr {
    match server.ip() {
        ip if ip.is_loopback() => ip,
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn bind(ip: IpAddr, server: SocketAddr) -> Result<UdpSocket, ClientError> {
    UdpSocket::bind((ip, 0)).map_err(|source| ClientError::Io { server, source })
}

/// The mix in an Ok reply to Entropy.
pub(super) fn entropy_mix(reply: &Reply) -> Result<u64, ClientError> {
    let bytes: [u8; ENTROPY_REPLY_VALUE_LEN] =
        reply
            .value
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::UnexpectedReply {
                op: Op::Entropy,
                detail: format!(
                    "{} value bytes, expected {ENTROPY_REPLY_VALUE_LEN}",
                    reply.value.len()
                ),
            })?;
    Ok(u64::from_le_bytes(bytes))
}

/// The error for a reply whose status is not what `op` succeeds with.
pub(super) fn status_error(op: Op, reply: &Reply) -> ClientError {
    match reply.status {
        Status::TooLarge => ClientError::TooLarge { op },
        Status::BadRequest => ClientError::BadRequest { op },
        Status::Stale => ClientError::Stale {
            client_id: reply.client_id,
            request_num: reply.request_num,
        },
        Status::Busy => ClientError::Busy { op },
        Status::Ok | Status::NotFound => ClientError::UnexpectedReply {
            op,
            detail: format!("status {:?}", reply.status),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_server::{Behavior, FakeServer};

    /// Short attempts keep the retry tests fast; loopback answers in well
    /// under a millisecond.
    fn fast(max_attempts: u32) -> ClientConfig {
        ClientConfig {
            attempt_timeout: Duration::from_millis(50),
            max_attempts,
        }
    }

    fn client(server: &FakeServer, max_attempts: u32) -> KvClient {
        KvClient::connect(server.addr(), fast(max_attempts)).unwrap()
    }

    #[test]
    fn put_get_append_entropy() {
        let server = FakeServer::start(Behavior::default());
        let mut client = client(&server, 5);
        assert_eq!(client.get(b"k").unwrap(), None);
        client.put(b"k", b"abc").unwrap();
        client.append(b"k", b"def").unwrap();
        client.append(b"new", b"x").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"abcdef".to_vec()));
        assert_eq!(client.get(b"new").unwrap(), Some(b"x".to_vec()));
        client.entropy(10).unwrap();
        let id = client.client_id();
        assert_eq!(server.stop(), (1..=7).map(|n| (id, n)).collect::<Vec<_>>());
        assert_eq!(
            client.stats(),
            ClientStats {
                attempts: 7,
                ..ClientStats::default()
            }
        );
    }

    #[test]
    fn clients_get_distinct_nonzero_ids() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = KvClient::connect(addr, ClientConfig::default()).unwrap();
        let b = KvClient::connect(addr, ClientConfig::default()).unwrap();
        assert_ne!(a.client_id(), 0);
        assert_ne!(a.client_id(), b.client_id());
        assert!(matches!(
            KvClient::with_client_id(addr, ClientConfig::default(), 0),
            Err(ClientError::Proto(ProtoError::ZeroClientId))
        ));
    }

    #[test]
    fn retries_reuse_the_request_number() {
        let server = FakeServer::start(Behavior {
            drop_requests: 2,
            ..Behavior::default()
        });
        let mut client = client(&server, 5);
        client.put(b"k", b"v").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"v".to_vec()));
        let stats = client.stats();
        assert_eq!((stats.attempts, stats.retries), (4, 2));
        let id = client.client_id();
        assert_eq!(server.stop(), [(id, 1), (id, 1), (id, 1), (id, 2)]);
    }

    #[test]
    fn a_retry_after_a_lost_reply_is_not_executed_twice() {
        let server = FakeServer::start(Behavior {
            drop_replies: 1,
            ..Behavior::default()
        });
        let mut client = client(&server, 5);
        client.append(b"k", b"once").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"once".to_vec()));
        assert_eq!(client.stats().retries, 1);
    }

    #[test]
    fn other_replies_and_junk_are_ignored() {
        let server = FakeServer::start(Behavior {
            decoys: true,
            ..Behavior::default()
        });
        let mut client = client(&server, 5);
        client.put(b"k", b"v").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            client.stats(),
            ClientStats {
                attempts: 2,
                retries: 0,
                ignored_replies: 2,
                undecodable: 2,
            }
        );
    }

    #[test]
    fn replies_from_another_address_are_accepted() {
        let server = FakeServer::start(Behavior {
            reply_from_other_socket: true,
            ..Behavior::default()
        });
        let mut client = client(&server, 2);
        client.put(b"k", b"v").unwrap();
        assert_eq!(client.stats().attempts, 1);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let server = FakeServer::start(Behavior {
            drop_requests: usize::MAX,
            ..Behavior::default()
        });
        let mut client = client(&server, 4);
        let started = Instant::now();
        let error = client.put(b"k", b"v").unwrap_err();
        let took = started.elapsed();
        let ClientError::Timeout {
            server: addr,
            attempts,
            elapsed,
        } = &error
        else {
            panic!("expected a timeout, got {error:?}");
        };
        assert_eq!((*addr, *attempts), (server.addr(), 4));
        assert!(*elapsed >= Duration::from_millis(200) && *elapsed <= took);
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(error.to_string().starts_with(&format!(
            "no reply from {} after 4 attempts (0.",
            server.addr()
        )));
        let id = client.client_id();
        assert_eq!(server.stop(), [(id, 1); 4]);
    }

    #[test]
    fn failover_retries_under_the_same_number() {
        let old = FakeServer::start(Behavior {
            drop_requests: usize::MAX,
            ..Behavior::default()
        });
        let new = FakeServer::start(Behavior::default());
        let mut client = client(&old, 2);
        assert!(matches!(
            client.append(b"k", b"v"),
            Err(ClientError::Timeout { attempts: 2, .. })
        ));
        client.set_server(new.addr());
        client.append(b"k", b"v").unwrap();
        assert_eq!(client.get(b"k").unwrap(), Some(b"v".to_vec()));
        let id = client.client_id();
        assert_eq!(old.stop(), [(id, 1), (id, 1)]);
        assert_eq!(new.stop(), [(id, 1), (id, 2)]);
    }

    #[test]
    fn another_call_after_a_timeout_takes_a_new_number() {
        let old = FakeServer::start(Behavior {
            drop_requests: usize::MAX,
            ..Behavior::default()
        });
        let new = FakeServer::start(Behavior::default());
        let mut client = client(&old, 1);
        assert!(client.put(b"k", b"v").is_err());
        client.set_server(new.addr());
        client.put(b"k", b"w").unwrap();
        let id = client.client_id();
        assert_eq!(new.stop(), [(id, 2)]);
    }

    #[test]
    fn status_errors() {
        for (status, op, check) in [
            (Status::Busy, Op::Put, ClientError::Busy { op: Op::Put }),
            (
                Status::BadRequest,
                Op::Get,
                ClientError::BadRequest { op: Op::Get },
            ),
            (
                Status::TooLarge,
                Op::Append,
                ClientError::TooLarge { op: Op::Append },
            ),
        ] {
            let server = FakeServer::start(Behavior {
                forced_status: Some(status),
                ..Behavior::default()
            });
            let mut client = client(&server, 2);
            let error = match op {
                Op::Get => client.get(b"k").map(drop),
                Op::Put => client.put(b"k", b"v"),
                _ => client.append(b"k", b"v"),
            }
            .unwrap_err();
            assert_eq!(error.to_string(), check.to_string());
            let reply = client.call(Op::Get, b"k", &[]).unwrap();
            assert_eq!((reply.status, reply.request_num), (status, 2));
        }
    }

    #[test]
    fn stale_request_numbers_are_reported() {
        let server = FakeServer::start(Behavior::default());
        let mut first = client(&server, 2);
        first.put(b"k", b"1").unwrap();
        first.put(b"k", b"2").unwrap();
        let id = first.client_id();
        let mut second = KvClient::with_client_id(server.addr(), fast(2), id).unwrap();
        let error = second.get(b"k").unwrap_err();
        assert!(
            matches!(error, ClientError::Stale { client_id, request_num: 1 } if client_id == id),
            "{error:?}"
        );
    }

    #[test]
    fn append_past_the_limit_is_too_large() {
        let server = FakeServer::start(Behavior::default());
        let mut client = client(&server, 2);
        client.put(b"k", &[b'a'; 1000]).unwrap();
        assert!(matches!(
            client.append(b"k", &[b'b'; 25]),
            Err(ClientError::TooLarge { op: Op::Append })
        ));
        assert_eq!(client.get(b"k").unwrap(), Some(vec![b'a'; 1000]));
    }

    #[test]
    fn invalid_requests_are_not_sent() {
        let server = FakeServer::start(Behavior::default());
        let mut client = client(&server, 2);
        let errors = [
            client.get(b"").unwrap_err(),
            client.put(&[b'k'; 65], b"v").unwrap_err(),
            client.append(b"k", &[0; 1025]).unwrap_err(),
            client.entropy(0).unwrap_err(),
            client.entropy(10_001).unwrap_err(),
        ];
        for error in errors {
            assert!(matches!(error, ClientError::Proto(_)), "{error:?}");
        }
        assert_eq!(client.stats().attempts, 0);
        // Nothing was sent, so no request number was used up.
        client.put(b"k", b"v").unwrap();
        assert_eq!(server.stop(), [(client.client_id(), 1)]);
    }

    #[test]
    fn total_timeout_is_split_into_attempts() {
        let split = |total| {
            let config = ClientConfig::with_total_timeout(total);
            (config.max_attempts, config.attempt_timeout)
        };
        assert_eq!(
            split(Duration::from_secs(5)),
            (16, Duration::from_micros(312_500))
        );
        assert_eq!(
            split(Duration::from_secs(6)),
            (20, Duration::from_millis(300))
        );
        assert_eq!(
            split(Duration::from_millis(100)),
            (1, Duration::from_millis(100))
        );
        assert_eq!(split(Duration::ZERO), (1, Duration::ZERO));
        assert_eq!(split(Duration::MAX).0, u32::MAX);
    }

    #[test]
    fn socket_binds_loopback_only_for_a_loopback_server() {
        let ip = |addr: &str| local_ip_for(addr.parse().unwrap()).to_string();
        assert_eq!(ip("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(ip("10.0.2.15:7000"), "0.0.0.0");
        assert_eq!(ip("[::1]:7000"), "::1");
        assert_eq!(ip("[2001:db8::1]:7000"), "::");
    }
}
