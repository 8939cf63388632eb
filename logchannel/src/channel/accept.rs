//! Waiting for the backup on the primary's listener. Whoever connects is
//! trusted only once its handshake says it is the backup this primary
//! waits for: a port scanner, a stranger, a peer that says nothing or says
//! the wrong thing is turned away and the wait goes on, since a server must
//! never fail because of a connection it did not ask for.
//!
//! Each connection shakes hands on a thread of its own, so that a peer that
//! connects and says nothing holds up neither the wait nor the real backup
//! behind it.

use super::config::ChannelConfig;
use super::error::{ChannelError, Peer};
use super::handshake::{handshake, Established, Side};
use super::hello::Hello;
use super::link::deadline;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How often the listener is looked at: std has no accept timeout, so it
/// is polled in non-blocking mode.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// Handshakes under way at once. A connection beyond them is closed at
/// once; a backup that meets this retries, as after any failed connect.
const MAX_HANDSHAKES: usize = 16;
/// Refusals logged as warnings in one wait; the rest go to the debug
/// level, so that a port scan cannot flood the log.
const WARN_REFUSALS: u64 = 8;

/// A backup's connection, its handshake done.
pub(crate) struct Accepted {
    pub stream: TcpStream,
    pub peer: Peer,
    pub established: Established,
}

type Outcome = (u64, Peer, Result<(TcpStream, Established), ChannelError>);

/// Connections turned away during one wait.
#[derive(Default)]
struct Refusals {
    count: u64,
    last: Option<String>,
}

impl Refusals {
    fn note(&mut self, addr: SocketAddr, why: String) {
        self.count += 1;
        if self.count <= WARN_REFUSALS {
            tracing::warn!("turned away a log channel connection from {addr}: {why}");
        } else {
            tracing::debug!("turned away a log channel connection from {addr}: {why}");
        }
        self.last = Some(why);
    }
}

/// Waits up to `wait` for a connection whose handshake succeeds, turning
/// away every other one; a handshake under way when the wait ends may
/// finish within its own bound (`handshake_timeout`). `cancelled` ends the
/// wait at once. The listener is left in blocking mode.
pub(crate) fn accept_backup(
    listener: &TcpListener,
    hello: &Hello,
    config: &ChannelConfig,
    wait: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<Accepted, ChannelError> {
    let local = listener
        .local_addr()
        .map_or_else(|_| "the listener".to_string(), |a| a.to_string());
    let accept_err = |e: io::Error| ChannelError::Accept {
        local: local.clone(),
        source: Arc::new(e),
    };
    listener.set_nonblocking(true).map_err(accept_err)?;
    let mut acceptor = Acceptor {
        listener,
        hello,
        config,
        local: &local,
        pending: HashMap::new(),
        next_id: 0,
        refusals: Refusals::default(),
    };
    let accepted = acceptor.run(wait, cancelled);
    acceptor.abandon();
    let restored = listener.set_nonblocking(false);
    let accepted = accepted?;
    restored.map_err(accept_err)?;
    Ok(accepted)
}

struct Acceptor<'a> {
    listener: &'a TcpListener,
    hello: &'a Hello,
    config: &'a ChannelConfig,
    local: &'a str,
    /// Handshakes under way, with a handle to stop each.
    pending: HashMap<u64, Option<TcpStream>>,
    next_id: u64,
    refusals: Refusals,
}

impl Acceptor<'_> {
    fn run(
        &mut self,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Accepted, ChannelError> {
        let until = deadline(wait);
        // Handshake threads always report, within their own bound; this is
        // a bound on a bug, not a wait that happens.
        let give_up = until + self.config.handshake_timeout + Duration::from_secs(1);
        let (tx, rx) = crossbeam_channel::unbounded::<Outcome>();
        loop {
            if cancelled() {
                return Err(ChannelError::Cancelled {
                    what: format!("waiting for a backup on {}", self.local),
                });
            }
            let now = Instant::now();
            if now < until {
                self.take_queued(&tx);
            } else if self.pending.is_empty() || now >= give_up {
                return Err(ChannelError::AcceptTimeout {
                    local: self.local.to_string(),
                    waited: wait,
                    refused: self.refusals.count,
                    last_refusal: self.refusals.last.clone(),
                });
            }
            if let Ok((id, peer, outcome)) = rx.recv_timeout(ACCEPT_POLL) {
                self.pending.remove(&id);
                match outcome {
                    Ok((stream, established)) => {
                        return Ok(Accepted {
                            stream,
                            peer,
                            established,
                        })
                    }
                    Err(e) => self.refusals.note(peer.addr, e.to_string()),
                }
            }
        }
    }

    /// Starts a handshake for every connection waiting in the listener.
    fn take_queued(&mut self, tx: &Sender<Outcome>) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => self.start(stream, addr, tx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A connection reset before it was accepted, a signal, or
                // a shortage of descriptors (a flood): none is the
                // listener's end, so the wait goes on.
                Err(e) => {
                    tracing::debug!("accepting on {} failed: {e}", self.local);
                    return;
                }
            }
        }
    }

    fn start(&mut self, stream: TcpStream, addr: SocketAddr, tx: &Sender<Outcome>) {
        let peer = Peer {
            role: Side::Listening.peer_role(),
            addr,
        };
        if self.pending.len() >= MAX_HANDSHAKES {
            self.refusals.note(
                addr,
                format!("{MAX_HANDSHAKES} other handshakes were under way"),
            );
            return;
        }
        if let Err(e) = stream.set_nonblocking(false) {
            self.refusals.note(addr, e.to_string());
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let handle = stream.try_clone().ok();
        let ours = self.hello.clone();
        let timeout = self.config.handshake_timeout;
        let tx = tx.clone();
        let spawned = thread::Builder::new()
            .name("ftvm-log-hello".into())
            .spawn(move || {
                let outcome = handshake(&stream, &ours, Side::Listening, peer, timeout, &|| false)
                    .map(|established| (stream, established));
                // The wait may be over; then nobody needs the outcome.
                let _ = tx.send((id, peer, outcome));
            });
        match spawned {
            Ok(_) => {
                self.pending.insert(id, handle);
            }
            Err(e) => self
                .refusals
                .note(addr, format!("no thread for its handshake: {e}")),
        }
    }

    /// Stops the handshakes still under way: their threads see the socket
    /// shut down and end.
    fn abandon(&mut self) {
        for (_, handle) in self.pending.drain() {
            if let Some(stream) = handle {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}
