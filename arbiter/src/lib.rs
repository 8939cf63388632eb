//! ftvm's arbiter: VMware FT's test-and-set service and the MIT 6.824
//! primary/backup view service in one. Servers ping it to learn the view
//! (number, primary, backup) of their VM; when a primary or backup suspects
//! the other dead, it claims the view by test-and-set, and exactly one
//! claimant per view ever wins and becomes the next view's primary. Clients
//! ask it for the current primary. Every decision is fsynced before it is
//! answered.
//!
//! The rules are kept by one of two implementations behind one trait
//! ([`Arbiter`], chosen by an [`ArbiterAddr`] with [`connect`]): the
//! built-in server, one process with one state directory, and an etcd
//! cluster, whose transactions apply the same rules (see [`etcd`]).
//!
//! The rules, the state file and the wire protocol are specified in this
//! crate's README.md. This crate knows nothing of KVM.

mod api;
pub mod cli;
pub mod client;
pub mod etcd;
mod protocol;
mod server;
mod store;
mod view;

use std::io;
use std::net::SocketAddr;

use thiserror::Error;

pub use api::{connect, AddrError, Arbiter, ArbiterAddr, EtcdAddr};
pub use client::ArbiterClient;
pub use etcd::{EtcdArbiter, EtcdConfig};
pub use protocol::{ErrorKind, MAX_ID_LEN, MAX_LINE, PROTOCOL_VERSION};
pub use server::{Server, ServerConfig, ServerHandle, WARNINGS_PER_SECOND};
pub use store::{StoreError, STATE_FILE, STATE_FORMAT};
pub use view::{LossReason, Member, TasOutcome, View};

#[derive(Debug, Error)]
pub enum ArbiterError {
    /// The arbiter could not be asked, or did not answer in time (for
    /// etcd: no member answered, or the cluster has no quorum). A
    /// test-and-set may or may not have been decided; the caller must not
    /// go live, and may retry the same claim.
    #[error("arbiter at {addr} is unreachable: {source}")]
    Unreachable {
        addr: ArbiterAddr,
        source: io::Error,
    },
    /// The arbiter answered with an error; nothing was decided.
    #[error("arbiter at {addr} rejected the request ({kind}): {message}")]
    Rejected {
        addr: ArbiterAddr,
        kind: ErrorKind,
        message: String,
    },
    /// Whatever answered does not speak this protocol (for etcd: a key
    /// under the prefix holds what this client cannot read); nothing is
    /// known to have been decided.
    #[error("arbiter at {addr} sent a response this client cannot read: {detail}")]
    BadResponse { addr: ArbiterAddr, detail: String },
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
    /// The etcd client's runtime could not be started.
    #[error("cannot start the etcd client: {0}")]
    Runtime(io::Error),
    #[error("the server thread panicked")]
    Panicked,
}
