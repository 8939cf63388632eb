//! `ftvm demo`: a primary, a backup, spares and an arbiter on loopback, a
//! client load, SIGKILLs to the primary in mid-load (each killed server
//! back as a spare with a new id, each new primary protected again by a
//! spare's state transfer before the next kill), and the evidence that
//! nothing was lost: each failover's timeline, every acknowledged write
//! read back, and a linearizability check of the clients' history.
//!
//! The servers are child processes of this executable, started by the
//! launcher, each with a time limit and killed when the demo ends however
//! it ends; they report what they do in events files (JSON lines) that the
//! demo reads for its live status and its timeline.

pub(crate) mod analysis;
mod args;
mod kills;
pub(crate) mod load;
mod report;
mod run;
mod servers;
mod status;

pub use args::DemoArgs;
pub use kills::{Kill, Target};
pub use report::{
    Addresses, DemoReport, Failure, FtPhase, LostWrite, OpCounts, Protection, Throughput,
    WriteCheck,
};
pub use run::run;
