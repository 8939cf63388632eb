//! The state transfer's tests: the format in memory (round trips, the
//! documented layout, every malformed input and its named error, random
//! corruption), and over real loopback connections between a handshake and
//! the start of the log channel.

mod errors;
mod format;
mod props;
mod support;
mod tcp;

/// The channel tests' helpers (hellos, configs, time limits, entries).
#[path = "../channel/support.rs"]
#[allow(dead_code)]
mod channel_support;
