//! Where a replay and its recording part ways: the report a replay (or a
//! backup) gives when the guest does not do what the log says it did.

use std::fmt;

use logchannel::{Entry, Position};

use crate::run::digest;

/// The descriptor head logged for a delivery that consumed a receive buffer
/// but failed (a frame too large for it): replay must fail the same way.
pub const FAILED_DELIVERY: u16 = u16::MAX;

/// Where replay and recording part ways.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// The log entry that did not match, if the log had one at that point.
    pub entry: Option<Entry>,
    /// Where the replayed guest was.
    pub found_pos: Position,
    pub what: String,
    pub expected: String,
    pub found: String,
    /// (name, recorded, replayed) for each register that differs.
    pub registers: Vec<(&'static str, u64, u64)>,
    pub first_differing_page: Option<u64>,
    /// The last entry that matched.
    pub last_matched: Option<(u64, Position)>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.entry {
            Some(e) => writeln!(
                f,
                "  first divergent entry: #{} at exit {} rip {:#x}: {}",
                e.seq, e.pos.exits, e.pos.rip, e.event
            )?,
            None => writeln!(
                f,
                "  first divergent entry: none (the log has no entry where the replay is)"
            )?,
        }
        writeln!(
            f,
            "  replay was at: exit {} rip {:#x}",
            self.found_pos.exits, self.found_pos.rip
        )?;
        writeln!(f, "  what: {}", self.what)?;
        writeln!(f, "  expected: {}", self.expected)?;
        writeln!(f, "  found:    {}", self.found)?;
        for (name, rec, rep) in &self.registers {
            writeln!(f, "  register {name}: recorded {rec:#x}, replayed {rep:#x}")?;
        }
        if let Some(page) = self.first_differing_page {
            writeln!(
                f,
                "  first differing memory page: {page} (guest-physical {:#x})",
                page * digest::PAGE_SIZE
            )?;
        }
        match self.last_matched {
            Some((seq, pos)) => write!(
                f,
                "  last matching entry: #{seq} at exit {} rip {:#x}",
                pos.exits, pos.rip
            ),
            None => write!(f, "  last matching entry: none"),
        }
    }
}
