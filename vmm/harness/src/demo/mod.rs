//! `ftvm demo`: a primary, a backup and an arbiter on loopback, a client
//! load, a SIGKILL to the primary in mid-load, and the evidence that
//! nothing was lost: the failover timeline, every acknowledged write read
//! back, and a linearizability check of the clients' history.
//!
//! The servers are child processes of this executable, started by the
//! launcher, each with a time limit and killed when the demo ends however
//! it ends; they report what they do in events files (JSON lines) that the
//! demo reads for its live status and its timeline.

pub(crate) mod analysis;
mod args;
pub(crate) mod load;
mod report;
mod run;
mod status;

pub use args::DemoArgs;
pub use report::{
    Addresses, DemoReport, Failover, FtPhase, LostWrite, OpCounts, Throughput, WriteCheck,
};
pub use run::run;
