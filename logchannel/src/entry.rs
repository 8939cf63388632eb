//! Log entries: what the primary observed from outside the guest, and where.

use crate::hex;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where in the guest's execution an event happened.
///
/// `exits` locates it: the number of synchronous VM exits (PIO, MMIO, HLT,
/// trapped instructions) before the event. `rip` only checks it: a replay that
/// reaches the same exit count at another RIP has diverged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub exits: u64,
    #[serde(with = "hex::int")]
    pub rip: u64,
}

/// One log record. `seq` is contiguous from 1 within one primary's lifetime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub pos: Position,
    pub event: Event,
}

/// A nondeterministic input, or a check of the state it led to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// Result of a trapped `rdtsc`.
    Rdtsc {
        #[serde(with = "hex::int")]
        value: u64,
    },
    /// Result of a trapped `rdtscp`: the TSC and IA32_TSC_AUX.
    Rdtscp {
        #[serde(with = "hex::int")]
        value: u64,
        aux: u32,
    },
    /// Result of a trapped `rdrand`; `ok` is the carry flag it set.
    Rdrand {
        #[serde(with = "hex::int")]
        value: u64,
        ok: bool,
    },
    /// Result of a trapped `rdseed`; `ok` is the carry flag it set.
    Rdseed {
        #[serde(with = "hex::int")]
        value: u64,
        ok: bool,
    },
    /// A time MSR read caught by the MSR filter.
    Rdmsr {
        #[serde(with = "hex::int")]
        msr: u32,
        #[serde(with = "hex::int")]
        value: u64,
    },
    /// A time-dependent device register read (the PIT's counter).
    PitRead {
        port: u16,
        #[serde(with = "hex::int")]
        value: u8,
    },
    /// An interrupt injected at this position.
    Interrupt { vector: u8 },
    /// Packet input: the bytes DMA'd into the RX queue, and the descriptor
    /// chain (by its head index) that took them.
    Packet {
        desc_head: u16,
        #[serde(with = "hex::bytes")]
        frame: Vec<u8>,
    },
    /// The primary's state, for the backup to compare with its own.
    Digest(Digest),
    /// An output (a console line, a transmitted frame) and a compact check of
    /// the state that produced it. Taken at every output, so it is kept small:
    /// 32-bit hashes of the output's bytes and of registers plus memory; the
    /// periodic [`Digest`] carries the full registers and page hashes that
    /// locate a divergence.
    Output {
        kind: OutputKind,
        #[serde(with = "hex::int")]
        hash: u32,
        #[serde(with = "hex::int")]
        state: u32,
    },
    /// The log is complete up to this exit count: the backup may run to it.
    Progress { exits: u64 },
    /// The guest was taken between two synchronous exits, at the
    /// instruction `pos.rip` after `pos.exits` of them, for the entries that
    /// follow at the same position (packets, an interrupt). `regs` (a hash
    /// of the 16 general registers, RIP and RFLAGS) and `mem` (the memory
    /// hash) tell this pass through the instruction from the others: a
    /// replay delivers at the first pass with both.
    AsyncPoint {
        #[serde(with = "hex::int")]
        regs: u64,
        #[serde(with = "hex::int")]
        mem: u64,
    },
    /// The end of the run.
    End { exits: u64, reason: String },
}

/// The variant of an [`Event`] without its data, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    Rdtsc,
    Rdtscp,
    Rdrand,
    Rdseed,
    Rdmsr,
    PitRead,
    Interrupt,
    Packet,
    Digest,
    Output,
    Progress,
    End,
    AsyncPoint,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        EventKind::Rdtsc,
        EventKind::Rdtscp,
        EventKind::Rdrand,
        EventKind::Rdseed,
        EventKind::Rdmsr,
        EventKind::PitRead,
        EventKind::Interrupt,
        EventKind::Packet,
        EventKind::Digest,
        EventKind::Output,
        EventKind::Progress,
        EventKind::End,
        EventKind::AsyncPoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Rdtsc => "rdtsc",
            EventKind::Rdtscp => "rdtscp",
            EventKind::Rdrand => "rdrand",
            EventKind::Rdseed => "rdseed",
            EventKind::Rdmsr => "rdmsr",
            EventKind::PitRead => "pit-read",
            EventKind::Interrupt => "interrupt",
            EventKind::Packet => "packet",
            EventKind::Digest => "digest",
            EventKind::Output => "output",
            EventKind::Progress => "progress",
            EventKind::End => "end",
            EventKind::AsyncPoint => "async-point",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Rdtsc { .. } => EventKind::Rdtsc,
            Event::Rdtscp { .. } => EventKind::Rdtscp,
            Event::Rdrand { .. } => EventKind::Rdrand,
            Event::Rdseed { .. } => EventKind::Rdseed,
            Event::Rdmsr { .. } => EventKind::Rdmsr,
            Event::PitRead { .. } => EventKind::PitRead,
            Event::Interrupt { .. } => EventKind::Interrupt,
            Event::Packet { .. } => EventKind::Packet,
            Event::Digest(_) => EventKind::Digest,
            Event::Output { .. } => EventKind::Output,
            Event::Progress { .. } => EventKind::Progress,
            Event::End { .. } => EventKind::End,
            Event::AsyncPoint { .. } => EventKind::AsyncPoint,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let kind = self.kind();
        match self {
            Event::Rdtsc { value } => write!(f, "{kind} {value:#x}"),
            Event::Rdtscp { value, aux } => write!(f, "{kind} {value:#x} aux {aux:#x}"),
            Event::Rdrand { value, ok } | Event::Rdseed { value, ok } => {
                write!(f, "{kind} {value:#x}")?;
                if !ok {
                    f.write_str(" (failed, CF=0)")?;
                }
                Ok(())
            }
            Event::Rdmsr { msr, value } => write!(f, "{kind} msr {msr:#x} = {value:#x}"),
            Event::PitRead { port, value } => write!(f, "{kind} port {port:#x} = {value:#x}"),
            Event::Interrupt { vector } => write!(f, "{kind} vector {vector:#x}"),
            Event::Packet { desc_head, frame } => {
                write!(f, "{kind} desc {desc_head} len {}", frame.len())
            }
            Event::Digest(d) => write!(f, "{kind} {d}"),
            Event::Output {
                kind: out,
                hash,
                state,
            } => {
                write!(f, "{kind} {out} hash {hash:#010x} state {state:#010x}")
            }
            Event::Progress { exits } => write!(f, "{kind} complete to exit {exits}"),
            Event::End { exits, reason } => write!(f, "{kind} at exit {exits}: {reason}"),
            Event::AsyncPoint { regs, mem } => write!(f, "{kind} regs {regs:#x} mem {mem:#x}"),
        }
    }
}

impl fmt::Display for Entry {
    /// One line, as `ftvm log dump` prints it.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "#{} @exit {} rip {:#x}  {}",
            self.seq, self.pos.exits, self.pos.rip, self.event
        )
    }
}

/// What kind of output an [`Event::Output`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// A console line.
    Console,
    /// A transmitted network frame.
    Transmit,
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            OutputKind::Console => "console",
            OutputKind::Transmit => "transmit",
        })
    }
}

/// Why the primary took a digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DigestReason {
    /// Every N exits (the configured digest interval).
    Periodic,
    /// Before a console line goes out.
    Console,
    /// Before a packet goes out.
    Transmit,
    /// At the end of the run.
    End,
}

impl fmt::Display for DigestReason {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.pad(match self {
            DigestReason::Periodic => "periodic",
            DigestReason::Console => "console",
            DigestReason::Transmit => "transmit",
            DigestReason::End => "end",
        })
    }
}

/// The hash of one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageHash {
    /// Guest page number (guest physical address / 4096).
    pub page: u64,
    #[serde(with = "hex::int")]
    pub hash: u64,
}

/// A divergence check: the primary's registers and memory at this position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub reason: DigestReason,
    pub regs: Registers,
    /// Hash over the pages dirtied since the previous digest (or over all of
    /// memory, as the VMM decides; replay computes it the same way).
    #[serde(with = "hex::int")]
    pub mem_hash: u64,
    /// Per-page hashes, so that a mismatch can name the pages that differ.
    pub dirty_pages: Vec<PageHash>,
    /// Hash of the output's bytes, for Console and Transmit digests.
    #[serde(with = "hex::opt")]
    pub output_hash: Option<u64>,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} mem {:#x} dirty {} rip {:#x} rsp {:#x} rax {:#x}",
            self.reason,
            self.mem_hash,
            self.dirty_pages.len(),
            self.regs.rip,
            self.regs.rsp,
            self.regs.rax
        )?;
        if let Some(h) = self.output_hash {
            write!(f, " output {h:#x}")?;
        }
        Ok(())
    }
}

/// The general-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registers {
    #[serde(with = "hex::int")]
    pub rax: u64,
    #[serde(with = "hex::int")]
    pub rbx: u64,
    #[serde(with = "hex::int")]
    pub rcx: u64,
    #[serde(with = "hex::int")]
    pub rdx: u64,
    #[serde(with = "hex::int")]
    pub rsi: u64,
    #[serde(with = "hex::int")]
    pub rdi: u64,
    #[serde(with = "hex::int")]
    pub rbp: u64,
    #[serde(with = "hex::int")]
    pub rsp: u64,
    #[serde(with = "hex::int")]
    pub r8: u64,
    #[serde(with = "hex::int")]
    pub r9: u64,
    #[serde(with = "hex::int")]
    pub r10: u64,
    #[serde(with = "hex::int")]
    pub r11: u64,
    #[serde(with = "hex::int")]
    pub r12: u64,
    #[serde(with = "hex::int")]
    pub r13: u64,
    #[serde(with = "hex::int")]
    pub r14: u64,
    #[serde(with = "hex::int")]
    pub r15: u64,
    #[serde(with = "hex::int")]
    pub rip: u64,
    #[serde(with = "hex::int")]
    pub rflags: u64,
}

impl Registers {
    /// Every register with its name, in encoding order, so that a divergence
    /// report can list the ones that differ without naming all 18 by hand.
    pub fn named(&self) -> [(&'static str, u64); 18] {
        [
            ("rax", self.rax),
            ("rbx", self.rbx),
            ("rcx", self.rcx),
            ("rdx", self.rdx),
            ("rsi", self.rsi),
            ("rdi", self.rdi),
            ("rbp", self.rbp),
            ("rsp", self.rsp),
            ("r8", self.r8),
            ("r9", self.r9),
            ("r10", self.r10),
            ("r11", self.r11),
            ("r12", self.r12),
            ("r13", self.r13),
            ("r14", self.r14),
            ("r15", self.r15),
            ("rip", self.rip),
            ("rflags", self.rflags),
        ]
    }

    /// The inverse of [`Registers::named`]'s values.
    pub fn from_array(v: [u64; 18]) -> Registers {
        let [rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
            v;
        Registers {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rbp,
            rsp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip,
            rflags,
        }
    }

    /// The registers whose values differ: (name, self's, other's).
    pub fn diff(&self, other: &Registers) -> Vec<(&'static str, u64, u64)> {
        self.named()
            .iter()
            .zip(other.named())
            .filter(|((_, a), (_, b))| a != b)
            .map(|(&(name, a), (_, b))| (name, a, b))
            .collect()
    }
}
