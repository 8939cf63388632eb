//! The client side of the guest's key-value service (docs/protocol.md).
//!
//! - [`proto`]: the wire format, encoded and decoded in both directions;
//! - [`KvClient`]: a UDP client that retries with the same request number
//!   until it gets the reply, so the guest's client table gives exactly-once
//!   execution even across lost datagrams and a change of server address;
//! - [`KvArgs`] and [`run`]: the `ftvm kv` subcommand.

mod cli;
mod client;
pub mod proto;

#[cfg(test)]
mod fake_server;

pub use cli::{run, KvArgs, KvCommand};
pub use client::{ClientConfig, ClientError, ClientStats, KvClient};
pub use proto::{Op, ProtoError, Reply, Request, Status};
