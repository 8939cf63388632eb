//! Every exit status `ftvm` returns, in one place: scripts and the
//! end-to-end tests tell outcomes apart by these numbers, so they never
//! change meaning.
//!
//! `ftvm kv` has its own scale (a client's outcomes, not a VMM's) and so
//! reuses 1 and 2 with other meanings.

/// Any error `ftvm` reports as one `ftvm: ...` line on stderr.
pub const FAILURE: u8 = 1;
/// The guest stopped itself with an error code (its console says why).
pub const GUEST_ERROR: u8 = 2;
/// `ftvm replay`: the guest diverged from the recording.
pub const DIVERGED: u8 = 3;
/// `ftvm primary`/`backup`: this server lost test-and-set at the arbiter.
pub const LOST: u8 = 4;
/// `ftvm primary`/`backup`: the arbiter could not be reached when this
/// server had to decide, so it did not go live.
pub const NO_ARBITER: u8 = 5;
/// `ftvm replay`: stopped (SIGINT, SIGTERM, `--timeout`) before the end of
/// its log, so the rest of the log was not checked.
pub const REPLAY_STOPPED: u8 = 6;

/// `ftvm kv`: the request succeeded.
pub const KV_OK: u8 = 0;
/// `ftvm kv get`: there is no such key.
pub const KV_NOT_FOUND: u8 = 1;
/// `ftvm kv`: any error, reported as one `ftvm kv: ...` line on stderr.
pub const KV_ERROR: u8 = 2;
