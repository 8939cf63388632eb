//! What a run ended with and what it counted: the stop reason (and what
//! an `end` entry records for it) and the summary every mode reports.

use serde::Serialize;

#[cfg(doc)]
use crate::run::run_loop::STOP_GRACE;

/// Why a run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "code")]
pub enum StopReason {
    /// The guest wrote 0 to the exit port.
    PowerOff,
    /// The guest wrote this non-zero code to the exit port.
    GuestError(u32),
    /// Someone asked the VMM to stop (SIGINT, SIGTERM, a caller).
    Requested,
    /// A stop request found the guest making no synchronous exit for
    /// [`STOP_GRACE`] and took the vCPU between two exits: its last state
    /// belongs to no position, so a recording ends without a final digest
    /// and its `end` entry says why.
    RequestedBetweenExits,
    /// The run's time limit passed.
    Timeout,
    /// A replay reached the end of its log.
    EndOfLog,
}

/// How an `end` entry of a recorder that failed begins; the rest says why.
/// Such a log has no final digest.
pub const ABORTED_END_PREFIX: &str = "aborted: ";

impl StopReason {
    /// What an `end` entry records for this stop (the recorder and the
    /// primary write it, a replay reads it back).
    pub fn end_reason(self) -> String {
        format!("{self:?}")
    }
}

/// Whether an `end` entry's reason says that the recording stopped where no
/// final digest could be taken: between two exits, or because it failed.
/// Every other `end` entry follows a final digest at the same exit.
pub fn end_without_final_digest(reason: &str) -> bool {
    reason == StopReason::RequestedBetweenExits.end_reason()
        || reason.starts_with(ABORTED_END_PREFIX)
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ExitCounts {
    /// All synchronous exits: the guest's position.
    pub synchronous: u64,
    pub pio: u64,
    pub mmio: u64,
    pub hlt: u64,
    /// Reads and writes of filtered MSRs (the TSC).
    pub msr: u64,
    /// `hlt` exits that were patched instructions.
    pub trapped: u64,
    /// Instructions emulated at those exits (adjacent sites share one).
    pub trapped_instructions: u64,
    /// Signal kicks and other exits that are not positions.
    pub asynchronous: u64,
}

/// What delivering between two synchronous exits took.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BetweenCounts {
    /// Places between two exits where something was delivered (a live run
    /// at a kick, a replay at a breakpoint hit that matched).
    pub deliveries: u64,
    /// Kicks sent to a guest that made no synchronous exit (live).
    pub kicks: u64,
    /// Breakpoint hits, the matching ones included (replay).
    pub breakpoint_hits: u64,
    /// Of those, the hits in CPL3 code, brought back by the guest's #BP
    /// handler (`run::debug_trap`).
    pub user_mode_hits: u64,
    /// Single steps over hits that did not match (replay).
    pub single_steps: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RunSummary {
    pub reason: Option<StopReason>,
    pub elapsed_secs: f64,
    pub exits: ExitCounts,
    pub between: BetweenCounts,
    pub interrupts_injected: u64,
    pub timer_irqs: u64,
    pub packets_delivered: u64,
    pub frames_transmitted: u64,
    pub console_lines: u64,
    pub console_bytes: u64,
    pub datagrams_received: u64,
    pub datagrams_dropped: u64,
    pub tx_frames_unparseable: u64,
    pub virtio_errors: u64,
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
}
