//! How a log channel fails.

use super::hello::{Mismatch, Role};
use crate::frame::{EncodeError, FrameError};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// The other end of a connection, as errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "the {} at {}", self.role, self.addr)
    }
}

/// A log channel error. Once a channel has failed, every later call returns
/// the same error, so it is `Clone` (sources that are not are shared).
#[derive(Clone, Debug, Error)]
pub enum ChannelError {
    #[error("invalid log channel configuration: {0}")]
    Config(String),
    /// No backup finished a handshake within the wait. `refused` counts the
    /// connections turned away meanwhile (strangers, peers that said too
    /// little, hellos that did not match), `last_refusal` says why the last
    /// one was.
    #[error("no backup connected to {local} within {waited:?}{}", refusals(*.refused, .last_refusal.as_deref()))]
    AcceptTimeout {
        local: String,
        waited: Duration,
        refused: u64,
        last_refusal: Option<String>,
    },
    /// The caller asked the wait to end (a stop request).
    #[error("stopped while {what}")]
    Cancelled { what: String },
    #[error("accepting a backup on {local} failed: {source}")]
    Accept {
        local: String,
        source: Arc<io::Error>,
    },
    #[error("connecting to the primary at {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: Arc<io::Error>,
    },
    #[error("starting a log channel thread failed: {0}")]
    Spawn(Arc<io::Error>),
    /// The peer speaks the protocol but did not finish the handshake in
    /// time.
    #[error("log channel handshake with {peer} timed out after {timeout:?}: {detail}")]
    HandshakeTimeout {
        peer: Peer,
        timeout: Duration,
        detail: String,
    },
    /// The peer's first bytes are not this protocol's (an HTTP client, an
    /// SSH server, a port scanner).
    #[error("not an ftvm log channel peer: {peer} {detail}")]
    NotAPeer { peer: Peer, detail: String },
    /// This end refused the peer's hello (and told the peer why).
    #[error("log channel handshake with {peer} refused: {mismatch}")]
    HelloRefused { peer: Peer, mismatch: Mismatch },
    /// The peer refused this end's hello for a reason this end did not see
    /// (a peer of another build).
    #[error("log channel handshake refused by {peer}: {reason}")]
    RefusedByPeer { peer: Peer, reason: String },
    /// Nothing arrived for longer than the failure timeout.
    #[error("no byte from {peer} for {silent:?} (failure timeout {timeout:?})")]
    Silent {
        peer: Peer,
        silent: Duration,
        timeout: Duration,
    },
    #[error("{peer} closed the connection")]
    Closed { peer: Peer },
    /// The peer stopped on purpose and said so: not a failure, and not to
    /// be acted on as one.
    #[error("{peer} stopped on purpose ({reason})")]
    PeerLeft { peer: Peer, reason: String },
    #[error("the connection to {peer} broke: {source}")]
    Broken { peer: Peer, source: Arc<io::Error> },
    /// A frame from the peer is bad: corruption, a sequence gap, an
    /// undecodable payload. Names the frame and its byte offset.
    #[error("bad frame from {peer}: {source}")]
    Frame { peer: Peer, source: Arc<FrameError> },
    /// The peer sent a well-formed message it must not send.
    #[error("protocol violation by {peer}: {detail}")]
    Protocol { peer: Peer, detail: String },
    /// An entry could not be encoded; nothing was queued.
    #[error("cannot send entry: {0}")]
    Encode(Arc<EncodeError>),
}

fn refusals(refused: u64, last: Option<&str>) -> String {
    match (refused, last) {
        (0, _) => String::new(),
        (n, Some(last)) => {
            format!("; turned away {n} other connection(s), the last because {last}")
        }
        (n, None) => format!("; turned away {n} other connection(s)"),
    }
}

impl ChannelError {
    /// The error a frame read from `peer` turns into.
    pub(crate) fn from_frame(peer: Peer, err: FrameError) -> ChannelError {
        match err {
            FrameError::Io { source, .. } => ChannelError::Broken {
                peer,
                source: Arc::new(source),
            },
            other => ChannelError::Frame {
                peer,
                source: Arc::new(other),
            },
        }
    }

    pub(crate) fn broken(peer: Peer, err: io::Error) -> ChannelError {
        ChannelError::Broken {
            peer,
            source: Arc::new(err),
        }
    }

    pub(crate) fn protocol(peer: Peer, detail: impl Into<String>) -> ChannelError {
        ChannelError::Protocol {
            peer,
            detail: detail.into(),
        }
    }
}

impl From<EncodeError> for ChannelError {
    fn from(e: EncodeError) -> ChannelError {
        ChannelError::Encode(Arc::new(e))
    }
}
