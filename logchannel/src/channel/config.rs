//! The channel's timing and memory bounds.

use super::error::ChannelError;
use std::time::Duration;

/// Settings of one end of a log channel. The defaults suit a LAN or
/// loopback; each end checks its own and trusts the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    /// How long an end may stay quiet before it sends a heartbeat (the
    /// primary's carries its progress mark, the backup's is an ack). Keep it
    /// well under the other end's `failure_timeout`.
    pub heartbeat_interval: Duration,
    /// Silence (no byte at all) after which the peer is declared failed.
    pub failure_timeout: Duration,
    /// Bounds the wait for a backup to connect, and then the handshake
    /// itself; also the connect timeout of the backup.
    pub handshake_timeout: Duration,
    /// Primary: entries sent but not acknowledged at which the window is
    /// full. Backup: entries it buffers before it stops reading (and so
    /// stops acknowledging).
    pub window_entries: u64,
    /// The same bound in bytes of entry frames.
    pub window_bytes: u64,
    /// Primary: how far behind the backup may replay, as the age of the
    /// oldest entry it has not yet reported replayed, before the window
    /// counts as full. The primary then waits at its next exit and the
    /// backup gets the CPU to catch up, as VMware FT slows a primary whose
    /// backup lags. `None`: only the entry and byte bounds apply.
    pub max_lag: Option<Duration>,
    /// Primary: the longest an entry waits to be batched with later ones
    /// before it is written (an entry the primary waits on is written at
    /// once). Backup: the longest a replay report waits for an ack to ride
    /// on.
    pub batch_delay: Duration,
    /// Primary: a batch this large is written without waiting, and no batch
    /// message carries more.
    pub batch_max_bytes: usize,
}

impl Default for ChannelConfig {
    fn default() -> ChannelConfig {
        ChannelConfig {
            heartbeat_interval: Duration::from_millis(20),
            failure_timeout: Duration::from_millis(300),
            handshake_timeout: Duration::from_secs(1),
            window_entries: 65_536,
            window_bytes: 16 << 20,
            max_lag: None,
            batch_delay: Duration::from_micros(200),
            batch_max_bytes: 64 << 10,
        }
    }
}

impl ChannelConfig {
    pub(crate) fn validate(&self) -> Result<(), ChannelError> {
        let bad = |what: &str| Err(ChannelError::Config(what.to_string()));
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.failure_timeout {
            return bad("heartbeat_interval must be above zero and below failure_timeout");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be above zero");
        }
        if self.window_entries == 0 || self.window_bytes == 0 {
            return bad("window_entries and window_bytes must be above zero");
        }
        if self.max_lag.is_some_and(|l| l.is_zero()) {
            return bad("max_lag must be above zero");
        }
        if self.batch_max_bytes == 0 {
            return bad("batch_max_bytes must be above zero");
        }
        Ok(())
    }
}
