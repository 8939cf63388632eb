//! Fault tolerance: the primary (a live run whose log goes to the backup and
//! whose outputs pass the output gate), the backup (a replay fed by the log
//! channel that goes live after winning test-and-set), and the membership at
//! the arbiter that decides who does.

pub mod backup;
pub mod membership;
pub mod output_gate;
pub mod primary;
