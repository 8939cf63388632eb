//! Live state transfer to a joining backup (pre-copy, as live migration
//! does it), over the log channel's connection right after its handshake:
//!
//! 1. pre-copy rounds while the guest runs and serves: every page ever
//!    written (the dirty log keeps that set) that is not all zero, then the pages dirtied since the last round (KVM's dirty
//!    log and the VMM's own writes), until a round finds few enough or the
//!    round limit is reached;
//! 2. the cut, at a synchronous exit: the last dirty pages, the complete
//!    machine state (vCPU, devices, the partial console line, the device
//!    clock, the datagrams not yet delivered), the position and a digest;
//! 3. the backup restores it, checks the digest, and answers; on a match
//!    both ends start the log channel on the same connection, the log
//!    numbered on from the cut.
//!
//! [`send`] is the primary's side, [`receive`] the backup's. The wire format
//! is logchannel's (its README, "State transfer"). docs/fault-tolerance.md
//! says what happens when either side dies on the way.

pub mod receive;
pub mod send;

use std::time::Duration;

/// The page size of the transfer: the guest's, and KVM's dirty log's.
pub const PAGE_SIZE: usize = crate::run::digest::PAGE_SIZE as usize;

/// How long either side waits for the other's next bytes during a transfer
/// before it gives the transfer up. A peer that dies closes the connection
/// at once; this bounds a peer that was frozen.
pub fn silence_limit(failure_timeout: Duration) -> Duration {
    (failure_timeout * 10).max(Duration::from_secs(2))
}
