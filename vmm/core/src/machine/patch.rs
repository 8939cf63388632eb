//! The patch table: every rdtsc, rdtscp, rdrand and rdseed in the guest's
//! code is replaced at load time by an instruction that exits plus `nop`s
//! of the same length: `hlt`, which exits at CPL0 with RIP one past it, or,
//! for a workload with CPL3 code (where `hlt` gives #GP), `out TRAP_PORT,
//! al`, which exits at either level with RIP past it. The VMM supplies the
//! instruction's result (from the host on a live run, from the log on
//! replay) and moves RIP past the site. Primary and backup patch the same
//! image identically, so the sites are part of the deterministic state.

use std::collections::BTreeMap;

use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress};

use crate::machine::layout::TRAP_PORT;
use crate::machine::memory::GuestMemory;
use crate::machine::scan::{DestRegister, NondetKind, NondetSite};

const HLT: u8 = 0xf4;
/// `out imm8, al`.
const OUT_IMM8_AL: u8 = 0xe6;
const NOP: u8 = 0x90;
/// RFLAGS bits rdrand and rdseed define: CF is the result, OF, SF, ZF, AF
/// and PF are cleared.
const FLAGS_CF: u64 = 1 << 0;
const FLAGS_CLEARED: u64 = (1 << 11) | (1 << 7) | (1 << 6) | (1 << 4) | (1 << 2) | FLAGS_CF;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error(
        "{kind:?} at {addr:#x} has no general-purpose destination register; it cannot be emulated"
    )]
    NoDestination { kind: NondetKind, addr: u64 },
    #[error("patch site {addr:#x} is {len} bytes long; a site must be 2..=15 bytes")]
    BadLength { addr: u64, len: usize },
    #[error("patching guest memory at {addr:#x} failed: {reason}")]
    Write { addr: u64, reason: String },
}

/// What a trapped instruction returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapResult {
    pub value: u64,
    /// IA32_TSC_AUX for rdtscp.
    pub aux: u32,
    /// CF for rdrand and rdseed.
    pub ok: bool,
}

/// The exiting instruction a patch site begins with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapInstruction {
    /// `hlt` (1 byte): exits at CPL0 only.
    Hlt,
    /// `out TRAP_PORT, al` (2 bytes): exits at CPL0 and, with the port
    /// allowed in the TSS I/O bitmap, at CPL3.
    Out,
}

impl TrapInstruction {
    fn bytes(self) -> &'static [u8] {
        match self {
            TrapInstruction::Hlt => &[HLT],
            TrapInstruction::Out => &[OUT_IMM8_AL, TRAP_PORT],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatchTable {
    sites: BTreeMap<u64, NondetSite>,
}

impl PatchTable {
    pub fn new(sites: &[NondetSite]) -> Result<Self, PatchError> {
        let mut table = BTreeMap::new();
        for site in sites {
            if !(2..=15).contains(&site.len) {
                return Err(PatchError::BadLength {
                    addr: site.addr,
                    len: site.len,
                });
            }
            if matches!(site.kind, NondetKind::Rdrand | NondetKind::Rdseed) && site.dest.is_none() {
                return Err(PatchError::NoDestination {
                    kind: site.kind,
                    addr: site.addr,
                });
            }
            table.insert(site.addr, site.clone());
        }
        Ok(PatchTable { sites: table })
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    pub fn sites(&self) -> impl Iterator<Item = &NondetSite> {
        self.sites.values()
    }

    /// Writes the trapping sequence over every site.
    pub fn apply(&self, mem: &GuestMemory, with: TrapInstruction) -> Result<(), PatchError> {
        let trap = with.bytes();
        for site in self.sites.values() {
            let mut bytes = vec![NOP; site.len];
            // Every site is at least 2 bytes long (checked in `new`).
            bytes[..trap.len()].copy_from_slice(trap);
            mem.write_slice(&bytes, GuestAddress(site.addr))
                .map_err(|e| PatchError::Write {
                    addr: site.addr,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// The sites a trap exit at `site` stands for: the patched site there
    /// and every patched site that directly follows it, which one exit
    /// emulates together (the guest's `rdtsc; rdrand` pairs cost one exit,
    /// not two). Empty if `site` is not a patch site. On this platform a
    /// `hlt` trap's site is its exit's RIP minus one, an `out` trap's its
    /// RIP minus two.
    pub fn trapped_run(&self, site: u64) -> Vec<&NondetSite> {
        let mut run = Vec::new();
        let mut at = site;
        while let Some(site) = self.sites.get(&at) {
            run.push(site);
            at = site.addr + site.len as u64;
        }
        run
    }
}

fn gpr(regs: &mut kvm_regs, number: u8) -> &mut u64 {
    match number {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn write_dest(regs: &mut kvm_regs, dest: DestRegister, value: u64) {
    let reg = gpr(regs, dest.number);
    *reg = match dest.width {
        // A 16-bit write keeps the upper bits; a 32-bit one zero-extends.
        2 => (*reg & !0xffff) | (value & 0xffff),
        4 => value & 0xffff_ffff,
        _ => value,
    };
}

/// Applies the architectural effect of `site` returning `result` and moves
/// RIP past it.
pub fn emulate(regs: &mut kvm_regs, site: &NondetSite, result: TrapResult) {
    match site.kind {
        NondetKind::Rdtsc | NondetKind::Rdtscp => {
            regs.rax = result.value & 0xffff_ffff;
            regs.rdx = result.value >> 32;
            if site.kind == NondetKind::Rdtscp {
                regs.rcx = u64::from(result.aux);
            }
        }
        NondetKind::Rdrand | NondetKind::Rdseed => {
            if let Some(dest) = site.dest {
                write_dest(regs, dest, if result.ok { result.value } else { 0 });
            }
            regs.rflags &= !FLAGS_CLEARED;
            if result.ok {
                regs.rflags |= FLAGS_CF;
            }
        }
    }
    regs.rip = site.addr + site.len as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(addr: u64, len: usize, kind: NondetKind, dest: Option<DestRegister>) -> NondetSite {
        NondetSite {
            addr,
            len,
            kind,
            dest,
        }
    }

    #[test]
    fn adjacent_sites_trap_as_one_run() {
        let rax64 = Some(DestRegister {
            number: 0,
            width: 8,
        });
        let t = PatchTable::new(&[
            site(0x1000, 2, NondetKind::Rdtsc, None),
            site(0x1002, 4, NondetKind::Rdrand, rax64),
            site(0x1010, 3, NondetKind::Rdtscp, None),
        ])
        .expect("table");
        let run: Vec<u64> = t.trapped_run(0x1000).iter().map(|s| s.addr).collect();
        assert_eq!(run, vec![0x1000, 0x1002]);
        assert_eq!(t.trapped_run(0x1010).len(), 1);
        assert!(
            t.trapped_run(0x1003).is_empty(),
            "only a site's first byte traps"
        );
    }

    #[test]
    fn patching_writes_hlt_and_nops() {
        let mem = crate::machine::memory::create(4 << 20).expect("mem");
        let t = PatchTable::new(&[site(
            0x10_0000,
            4,
            NondetKind::Rdrand,
            Some(DestRegister {
                number: 1,
                width: 4,
            }),
        )])
        .expect("table");
        t.apply(&mem, TrapInstruction::Hlt).expect("apply");
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(b, [0xf4, 0x90, 0x90, 0x90]);
        t.apply(&mem, TrapInstruction::Out).expect("apply");
        mem.read_slice(&mut b, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(b, [0xe6, TRAP_PORT, 0x90, 0x90]);
    }

    #[test]
    fn emulation_sets_registers_flags_and_rip() {
        let mut regs = kvm_regs {
            rip: 0x1001,
            rflags: 0x2 | (1 << 6) | (1 << 11),
            rcx: 0xdead_beef_0000_ffff,
            rbx: 0x1111_2222_3333_4444,
            ..Default::default()
        };
        emulate(
            &mut regs,
            &site(0x1000, 2, NondetKind::Rdtsc, None),
            TrapResult {
                value: 0x1234_5678_9abc_def0,
                aux: 0,
                ok: true,
            },
        );
        assert_eq!(
            (regs.rax, regs.rdx, regs.rip),
            (0x9abc_def0, 0x1234_5678, 0x1002)
        );
        emulate(
            &mut regs,
            &site(
                0x1002,
                3,
                NondetKind::Rdrand,
                Some(DestRegister {
                    number: 1,
                    width: 2,
                }),
            ),
            TrapResult {
                value: 0xaaaa_bbbb_cccc_dddd,
                aux: 0,
                ok: true,
            },
        );
        assert_eq!(
            regs.rcx, 0xdead_beef_0000_dddd,
            "16-bit write keeps the upper bits"
        );
        assert_eq!(regs.rflags, 0x2 | FLAGS_CF, "CF set, ZF and OF cleared");
        emulate(
            &mut regs,
            &site(
                0x1005,
                4,
                NondetKind::Rdseed,
                Some(DestRegister {
                    number: 3,
                    width: 4,
                }),
            ),
            TrapResult {
                value: 0x5555_6666_7777_8888,
                aux: 0,
                ok: false,
            },
        );
        assert_eq!(regs.rbx, 0, "a failed rdseed writes zero");
        assert_eq!(regs.rflags & FLAGS_CF, 0);
        assert_eq!(regs.rip, 0x1009);
        emulate(
            &mut regs,
            &site(0x1009, 3, NondetKind::Rdtscp, None),
            TrapResult {
                value: 5,
                aux: 7,
                ok: true,
            },
        );
        assert_eq!((regs.rax, regs.rdx, regs.rcx), (5, 0, 7));
    }

    #[test]
    fn rdrand_without_a_register_is_refused() {
        let err = PatchTable::new(&[site(0x10, 3, NondetKind::Rdrand, None)]).expect_err("no dest");
        assert!(matches!(err, PatchError::NoDestination { .. }));
    }
}
