//! What the embedded guest runs, chosen by the boot-info block's `workload`
//! field (`docs/guest-abi.md`): the KV service, or one of the workloads that
//! test interrupts delivered between VM exits.

use std::fmt;
use std::str::FromStr;

/// The `ReplayConfig.extra` key under which a log header records a workload
/// other than the default: a replay boots the same one, and a build that
/// does not know the key refuses the log rather than boot another.
pub const LOG_KEY: &str = "workload";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Workload {
    /// The UDP key-value service.
    #[default]
    Kv,
    /// Tasks preempted round-robin by the timer race on shared counters,
    /// print the result and power off.
    Race,
    /// A busy wait for timer ticks with no VM exit, then power-off.
    Spin,
    /// The KV service and a background task it preempts.
    KvRace,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("unknown workload {0:?} (the workloads are kv, race, spin, kv-race)")]
    UnknownName(String),
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::Kv,
        Workload::Race,
        Workload::Spin,
        Workload::KvRace,
    ];

    /// The value of the boot-info field.
    pub fn boot_field(self) -> u32 {
        match self {
            Workload::Kv => 0,
            Workload::Race => 1,
            Workload::Spin => 2,
            Workload::KvRace => 3,
        }
    }

    /// The name `--workload` takes and a log header stores.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Kv => "kv",
            Workload::Race => "race",
            Workload::Spin => "spin",
            Workload::KvRace => "kv-race",
        }
    }

    /// Whether the guest serves the KV protocol (and so waits for clients
    /// rather than powering off by itself).
    pub fn serves_kv(self) -> bool {
        matches!(self, Workload::Kv | Workload::KvRace)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| WorkloadError::UnknownName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_fields_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        let fields: Vec<u32> = Workload::ALL.iter().map(|w| w.boot_field()).collect();
        assert_eq!(fields, vec![0, 1, 2, 3], "the ABI's values");
        assert_eq!(Workload::default(), Workload::Kv);
        assert!("kv_race".parse::<Workload>().is_err());
    }
}
