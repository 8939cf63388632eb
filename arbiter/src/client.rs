//! The client library that servers and KV clients use to talk to the
//! arbiter. Each call opens its own connection, so a client holds no state
//! that a failure could leave stale, and every call is bounded in time.

use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::api::{Arbiter, ArbiterAddr};
use crate::protocol::{encode_request, parse_response, read_line, LineRead, Request, ViewReply};
use crate::view::{Member, TasOutcome, View};
use crate::ArbiterError;

#[derive(Clone, Debug)]
pub struct ArbiterClient {
    pub addr: SocketAddr,
    /// Bounds connecting, and separately sending the request and reading
    /// its response.
    pub timeout: Duration,
}

impl ArbiterClient {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    pub fn new(addr: SocketAddr) -> ArbiterClient {
        ArbiterClient {
            addr,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(addr: SocketAddr, timeout: Duration) -> ArbiterClient {
        ArbiterClient { addr, timeout }
    }

    /// Reports `me` alive and knowing view `view_known`; returns the
    /// current view. From the primary of view `view_known`, this
    /// acknowledges that view: its backup, if it has one, holds the
    /// primary's state.
    pub fn ping(&self, vm: &str, me: &Member, view_known: u64) -> Result<View, ArbiterError> {
        self.ping_as(vm, me, view_known, true)
    }

    /// For the primary of view `view`, whose backup does not hold its state
    /// yet: reports that it has seen the view without vouching for the
    /// backup. The arbiter may then replace that backup if it stops pinging
    /// (see the README), and the backup still cannot win a test-and-set for
    /// the view. From any other server it is the same as [`Self::ping`].
    pub fn ping_seen(&self, vm: &str, me: &Member, view: u64) -> Result<View, ArbiterError> {
        self.ping_as(vm, me, view, false)
    }

    fn ping_as(
        &self,
        vm: &str,
        me: &Member,
        view_known: u64,
        backup_ready: bool,
    ) -> Result<View, ArbiterError> {
        let reply: ViewReply = self.call(&Request::Ping {
            vm: vm.to_owned(),
            me: me.clone(),
            view_known,
            backup_ready,
        })?;
        Ok(reply.view)
    }

    /// Claims view `view` for `claimant`. Retrying after an error is safe:
    /// a repeated winning claim is answered [`TasOutcome::Won`] again.
    pub fn test_and_set(
        &self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ArbiterError> {
        self.call(&Request::TestAndSet {
            vm: vm.to_owned(),
            view,
            claimant: claimant.clone(),
        })
    }

    /// The current view, without taking part in it.
    pub fn query(&self, vm: &str) -> Result<View, ArbiterError> {
        let reply: ViewReply = self.call(&Request::Query { vm: vm.to_owned() })?;
        Ok(reply.view)
    }

    fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ArbiterError> {
        let addr = self.addr;
        let unreachable = |source| ArbiterError::Unreachable {
            addr: ArbiterAddr::Builtin(addr),
            source,
        };
        let bad = |detail| ArbiterError::BadResponse {
            addr: ArbiterAddr::Builtin(addr),
            detail,
        };
        let line = encode_request(request).map_err(|e| bad(format!("cannot encode: {e}")))?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(unreachable)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        stream.set_nodelay(true).map_err(unreachable)?;
        stream.write_all(&line).map_err(unreachable)?;
        let deadline = Instant::now() + self.timeout;
        let mut reader = BufReader::new(stream);
        let mut response = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unreachable(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no response within {:?}", self.timeout),
                )));
            }
            reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(unreachable)?;
            match read_line(&mut reader, &mut response) {
                Ok(LineRead::Line) => break,
                Ok(LineRead::Eof) => {
                    return Err(unreachable(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before a response",
                    )))
                }
                Ok(LineRead::TooLong) => return Err(bad("response line too long".into())),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(unreachable(e)),
            }
        }
        match parse_response(&response).map_err(bad)? {
            Ok(reply) => Ok(reply),
            Err((kind, message)) => Err(ArbiterError::Rejected {
                addr: ArbiterAddr::Builtin(addr),
                kind,
                message,
            }),
        }
    }
}

/// The trait's methods are the inherent ones, which callers holding an
/// `ArbiterClient` use without importing the trait.
impl Arbiter for ArbiterClient {
    fn ping(&self, vm: &str, me: &Member, view_known: u64) -> Result<View, ArbiterError> {
        ArbiterClient::ping(self, vm, me, view_known)
    }

    fn ping_seen(&self, vm: &str, me: &Member, view: u64) -> Result<View, ArbiterError> {
        ArbiterClient::ping_seen(self, vm, me, view)
    }

    fn test_and_set(
        &self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ArbiterError> {
        ArbiterClient::test_and_set(self, vm, view, claimant)
    }

    fn query(&self, vm: &str) -> Result<View, ArbiterError> {
        ArbiterClient::query(self, vm)
    }

    fn addr(&self) -> ArbiterAddr {
        ArbiterAddr::Builtin(self.addr)
    }

    fn with_call_timeout(&self, timeout: Duration) -> Arc<dyn Arbiter> {
        Arc::new(ArbiterClient::with_timeout(self.addr, timeout))
    }
}
