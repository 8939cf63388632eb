//! Safety rules that can be broken on purpose, so that a fault campaign
//! (`ftvm chaos`) can show it finds what breaking them costs. A bug is
//! planted only by the environment variable [`PLANT_BUG`] naming it; no
//! flag, config file or default turns one on, and every process that has
//! one planted says so on stderr when it first consults it.

use std::sync::OnceLock;

/// The environment variable that plants a bug: its value is the bug's name.
pub const PLANT_BUG: &str = "FTVM_PLANT_BUG";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// The primary's output gate releases every output at once, without
    /// waiting for the backup's acknowledgement (breaks the output rule).
    ReleaseBeforeAck,
    /// A backup whose primary failed goes live without test-and-set, even
    /// when it loses (breaks "one primary per view").
    LiveWithoutTas,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 2] = [PlantedBug::ReleaseBeforeAck, PlantedBug::LiveWithoutTas];

    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::ReleaseBeforeAck => "release-before-ack",
            PlantedBug::LiveWithoutTas => "live-without-tas",
        }
    }
}

fn planted_bug() -> Option<PlantedBug> {
    static BUG: OnceLock<Option<PlantedBug>> = OnceLock::new();
    *BUG.get_or_init(|| {
        let name = std::env::var(PLANT_BUG).ok()?;
        let bug = PlantedBug::ALL.into_iter().find(|b| b.name() == name);
        match bug {
            Some(b) => eprintln!(
                "ftvm: WARNING: bug `{}` planted by {PLANT_BUG}: this server breaks a safety rule on purpose",
                b.name()
            ),
            None => eprintln!("ftvm: {PLANT_BUG}={name} names no bug; nothing planted"),
        }
        bug
    })
}

/// Whether `bug` is planted in this process.
pub fn planted(bug: PlantedBug) -> bool {
    planted_bug() == Some(bug)
}
