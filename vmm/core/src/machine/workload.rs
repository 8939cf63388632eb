//! What the embedded guest runs, chosen by the boot-info block's `workload`
//! field (`docs/guest-abi.md`): the KV service, or one of the workloads that
//! test interrupts delivered between VM exits.

use std::fmt;
use std::str::FromStr;

use crate::machine::patch::TrapInstruction;

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
    /// The KV service as a user task at CPL3, where this platform runs
    /// guest code natively rather than in KVM's instruction emulator.
    KvUser,
    /// The busy wait of `Spin` as a user task at CPL3.
    SpinUser,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error(
        "unknown workload {0:?} (the workloads are kv, race, spin, kv-race, kv-user, spin-user)"
    )]
    UnknownName(String),
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::Kv,
        Workload::Race,
        Workload::Spin,
        Workload::KvRace,
        Workload::KvUser,
        Workload::SpinUser,
    ];

    /// The value of the boot-info field.
    pub fn boot_field(self) -> u32 {
        match self {
            Workload::Kv => 0,
            Workload::Race => 1,
            Workload::Spin => 2,
            Workload::KvRace => 3,
            Workload::KvUser => 4,
            Workload::SpinUser => 5,
        }
    }

    /// The name `--workload` takes and a log header stores.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Kv => "kv",
            Workload::Race => "race",
            Workload::Spin => "spin",
            Workload::KvRace => "kv-race",
            Workload::KvUser => "kv-user",
            Workload::SpinUser => "spin-user",
        }
    }

    /// Whether the guest serves the KV protocol (and so waits for clients
    /// rather than powering off by itself).
    pub fn serves_kv(self) -> bool {
        matches!(self, Workload::Kv | Workload::KvRace | Workload::KvUser)
    }

    /// What the patch sites of this workload's image become: `hlt` gives
    /// #GP at CPL3, so a guest with user-mode code traps with a port write,
    /// which exits from CPL3 as from CPL0 (docs/guest-abi.md).
    pub fn trap_instruction(self) -> TrapInstruction {
        if self.runs_user_code() {
            TrapInstruction::Out
        } else {
            TrapInstruction::Hlt
        }
    }

    /// Whether the guest runs code at CPL3. Its replay then stops the
    /// guest at an instruction with `int3` and the trap flag, which reach
    /// the guest's #BP and #DB handlers on this platform, and takes the
    /// exception back at the handlers' write to the debug trap port
    /// (`run::debug_trap`); at CPL0 it uses `hlt`, which does not exist
    /// at CPL3.
    pub fn runs_user_code(self) -> bool {
        matches!(self, Workload::KvUser | Workload::SpinUser)
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
        assert_eq!(fields, vec![0, 1, 2, 3, 4, 5], "the ABI's values");
        assert_eq!(Workload::default(), Workload::Kv);
        assert!("kv_race".parse::<Workload>().is_err());
    }

    /// The scanner covers the whole image, the code `kv-user` runs at CPL3
    /// included: every site there (the reply stamp's `rdtsc; rdrand` among
    /// them) becomes a port write, which exits from CPL3.
    #[test]
    fn kv_user_traps_every_site_with_a_port_write() {
        use crate::machine::guest_image::GUEST_ELF;
        use crate::machine::layout::{DEFAULT_MEM_SIZE, TRAP_PORT};
        use crate::machine::loader::ElfImage;
        use crate::machine::patch::PatchTable;
        use crate::machine::scan::{self, NondetKind};
        use vm_memory::{Bytes, GuestAddress};

        let image = ElfImage::parse(GUEST_ELF, DEFAULT_MEM_SIZE).expect("image");
        let mem = crate::machine::memory::create(DEFAULT_MEM_SIZE).expect("memory");
        image.load(GUEST_ELF, &mem).expect("load");
        let sites = scan::scan(image.code(GUEST_ELF)).nondet;
        let kinds: Vec<NondetKind> = sites.iter().map(|s| s.kind).collect();
        assert!(kinds.contains(&NondetKind::Rdtsc) && kinds.contains(&NondetKind::Rdrand));
        let table = PatchTable::new(&sites).expect("table");
        table
            .apply(&mem, Workload::KvUser.trap_instruction())
            .expect("apply");
        for site in &sites {
            let mut first = [0u8; 2];
            mem.read_slice(&mut first, GuestAddress(site.addr))
                .expect("read");
            assert_eq!(first, [0xe6, TRAP_PORT], "site {:#x}", site.addr);
        }
        assert_eq!(Workload::Kv.trap_instruction(), TrapInstruction::Hlt);
    }
}
