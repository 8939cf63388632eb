//! The client side of the guest's key-value service (docs/protocol.md).
//!
//! - [`proto`]: the wire format of `ftvm_kvproto` (which the guest shares)
//!   as owned messages, encoded and decoded in both directions;
//! - [`KvClient`]: a UDP client that retries with the same request number
//!   until it gets the reply, so the guest's client table gives exactly-once
//!   execution even across lost datagrams and a change of server address;
//! - [`FailoverClient`]: a [`KvClient`] that finds the primary through the
//!   arbiter (or uses a fixed server, [`ServerSource`]) and, when a round of
//!   attempts goes unanswered, asks the arbiter again and retries the same
//!   request, under the same number, at the primary it names;
//! - [`fake_server`]: a scriptable stand-in for the guest's service and the
//!   arbiter, for the unit tests of this crate and of `ftvm kv`.

mod client;
mod failover;
pub mod fake_server;
pub mod proto;

pub use client::{ClientConfig, ClientError, ClientStats, KvClient};
pub use failover::{
    Answered, FailoverClient, FailoverConfig, FailoverError, FailoverStats, ServerSource,
    DEFAULT_VM_ID,
};
pub use proto::{Op, ProtoError, Reply, Request, Status};
