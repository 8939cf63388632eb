//! Whether a primary may release what its backup acknowledged: the answer
//! its output gate asks for before every release, and that its run loop
//! keeps up to date.
//!
//! Acknowledged outputs are released while the primary is, as far as it
//! knows, still the primary. It stops knowing when it has not written to
//! its backup for half the failure timeout (the channel's write gaps): the
//! whole process may have been frozen, and the backup may have taken it for
//! dead, won test-and-set and gone live meanwhile. An ack read after such a
//! pause can be one the backup sent before it took over, so nothing is
//! released until the arbiter confirms that the current view still names
//! this server primary. Alone (before a backup joined, or after it won
//! test-and-set), no backup exists that could take over, and everything is
//! released; once deposed, nothing ever is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::ft::planted::{planted, PlantedBug};

#[derive(Debug, Default)]
pub struct Standing {
    alone: AtomicBool,
    deposed: AtomicBool,
    /// The channel's write-gap count up to which the arbiter has confirmed
    /// this primary.
    confirmed_gaps: AtomicU64,
}

/// What the gate may release now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// Nothing: deposed, or paused and not yet confirmed.
    Nothing,
    /// What the backup has acknowledged.
    Acknowledged,
    /// Everything held: the primary runs alone.
    Everything,
}

impl Standing {
    pub fn alone(&self) -> bool {
        self.alone.load(Ordering::SeqCst)
    }

    pub fn deposed(&self) -> bool {
        self.deposed.load(Ordering::SeqCst)
    }

    pub(crate) fn go_alone(&self) {
        self.alone.store(true, Ordering::SeqCst);
    }

    /// A backup joined: the output rule holds again, and the new
    /// channel's write gaps are counted from zero.
    pub(crate) fn pair(&self) {
        self.confirmed_gaps.store(0, Ordering::SeqCst);
        self.alone.store(false, Ordering::SeqCst);
    }

    pub(crate) fn depose(&self) {
        self.deposed.store(true, Ordering::SeqCst);
    }

    /// Whether a pause since the last confirmation (the channel counted
    /// `write_gaps`) needs the arbiter's word before anything is released.
    pub(crate) fn unconfirmed(&self, write_gaps: u64) -> bool {
        write_gaps > self.confirmed_gaps.load(Ordering::SeqCst)
    }

    /// The arbiter named this server primary after the channel had counted
    /// `write_gaps`.
    pub(crate) fn confirm(&self, write_gaps: u64) {
        self.confirmed_gaps.fetch_max(write_gaps, Ordering::SeqCst);
    }

    pub(crate) fn release(&self, write_gaps: u64) -> Release {
        if planted(PlantedBug::ReleaseBeforeAck) {
            Release::Everything
        } else if self.deposed() {
            Release::Nothing
        } else if self.alone() {
            Release::Everything
        } else if self.unconfirmed(write_gaps) {
            Release::Nothing
        } else {
            Release::Acknowledged
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_holds_releases_until_confirmed() {
        let s = Standing::default();
        assert_eq!(s.release(0), Release::Acknowledged);
        assert_eq!(s.release(1), Release::Nothing);
        s.confirm(1);
        assert_eq!(s.release(1), Release::Acknowledged);
        assert_eq!(s.release(2), Release::Nothing);
        s.go_alone();
        assert_eq!(s.release(2), Release::Everything);
        s.depose();
        assert_eq!(s.release(0), Release::Nothing);
    }
}
