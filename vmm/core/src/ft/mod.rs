//! Fault tolerance: the primary (a live run whose log goes to the backup and
//! whose outputs pass the output gate), the backup (a replay fed by the log
//! channel that goes live after winning test-and-set), and the membership at
//! the arbiter that decides who does.

pub mod backup;
pub mod membership;
pub mod output_gate;
pub mod pairing;
pub mod planted;
pub mod primary;
pub mod standing;
pub mod transfer;

use crate::run::run_loop::StopReason;

/// What a server that stops on purpose tells its peer in its goodbye.
pub(crate) fn goodbye_reason(reason: StopReason) -> String {
    match reason {
        StopReason::PowerOff => "the guest powered off".to_string(),
        StopReason::GuestError(code) => format!("the guest stopped with error code {code}"),
        StopReason::Requested | StopReason::RequestedBetweenExits => {
            "a stop was requested".to_string()
        }
        StopReason::Timeout => "its time limit passed".to_string(),
        StopReason::EndOfLog => "its primary's log ended".to_string(),
    }
}
