//! ftvm's arbiter: VMware FT's test-and-set service and the MIT 6.824
//! primary/backup view service in one. Servers ping it to learn the view
//! (number, primary, backup) of their VM; when a primary or backup suspects
//! the other dead, it claims the view by test-and-set, and exactly one
//! claimant per view ever wins and becomes the next view's primary. Clients
//! ask it for the current primary. Every decision is fsynced before it is
//! answered.
//!
//! The rules, the state file and the wire protocol are specified in this
//! crate's README.md. This crate knows nothing of KVM.

pub mod cli;
pub mod client;
mod protocol;
mod server;
mod store;
mod view;

use std::io;
use std::net::SocketAddr;

use thiserror::Error;

pub use client::ArbiterClient;
pub use protocol::{ErrorKind, MAX_ID_LEN, MAX_LINE, PROTOCOL_VERSION};
pub use server::{Server, ServerConfig, ServerHandle, WARNINGS_PER_SECOND};
pub use store::{StoreError, STATE_FILE, STATE_FORMAT};
pub use view::{LossReason, Member, TasOutcome, View};

#[derive(Debug, Error)]
pub enum ArbiterError {
    /// The arbiter could not be asked, or did not answer in time. A
    /// test-and-set may or may not have been decided; the caller must not
    /// go live, and may retry the same claim.
    #[error("arbiter at {addr} is unreachable: {source}")]
    Unreachable { addr: SocketAddr, source: io::Error },
    /// The arbiter answered with an error; nothing was decided.
    #[error("arbiter at {addr} rejected the request ({kind}): {message}")]
    Rejected {
        addr: SocketAddr,
        kind: ErrorKind,
        message: String,
    },
    /// Whatever answered does not speak this protocol; nothing is known to
    /// have been decided.
    #[error("arbiter at {addr} sent a response this client cannot read: {detail}")]
    BadResponse { addr: SocketAddr, detail: String },
    /// A [`ServerConfig`] the server cannot serve with (a zero limit or
    /// timeout).
    #[error("invalid arbiter configuration: {0}")]
    Config(String),
    /// The server could not bind its address.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    /// The state directory could not be locked, read or written.
    #[error(transparent)]
    State(#[from] StoreError),
    #[error("cannot start the server thread: {0}")]
    Thread(io::Error),
    #[error("the server thread panicked")]
    Panicked,
}
