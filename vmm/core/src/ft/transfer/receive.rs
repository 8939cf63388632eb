//! The joining backup's side of a state transfer: with its memory zeroed
//! and hashed beforehand (while it waited as a spare), it writes each page
//! as it arrives (nothing is buffered beyond one read),
//! and at the cut restores the machine state and checks the primary's
//! digest. Only a state that restored completely and matches is
//! acknowledged; anything else is refused with both values named, and the
//! server never runs the guest from it.

use std::time::{Duration, Instant};

use logchannel::{Handshaken, PageData, TransferError, TransferItem, Verdict};
use vm_memory::{Bytes, GuestAddress};

use crate::ft::transfer::PAGE_SIZE;
use crate::host::events::StatusBoard;
use crate::machine::memory;
use crate::run::digest::{self, MemoryHasher};
use crate::run::snapshot::MachineState;
use crate::run::vm::Vm;

/// Why a joining backup holds no state it could run.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The stream broke off or was malformed: the primary died, froze, or
    /// is not speaking this protocol.
    #[error("the state transfer broke off after {bytes} bytes (round {round}): {source}")]
    Stream {
        round: u32,
        bytes: u64,
        source: TransferError,
    },
    #[error("the primary gave up the state transfer: {reason}")]
    Aborted { reason: String },
    /// The state arrived complete but is not the primary's: refused, and
    /// the primary told why.
    #[error("refused the primary's state: {0}")]
    Refused(String),
    #[error("cannot prepare guest memory: {0}")]
    Memory(#[from] memory::MemoryError),
}

/// A restored machine, ready to replay from the cut.
pub struct Restored {
    pub exits: u64,
    pub rip: u64,
    /// The sequence number of the first log entry after the cut.
    pub next_seq: u64,
    pub machine: MachineState,
    pub rounds: u32,
    pub pages: u64,
    pub bytes: u64,
    pub took: Duration,
}

/// A spare's memory, zeroed and hashed ahead of any transfer: work that
/// grows with the guest's memory size, done while nobody waits for it,
/// not while the primary's guest stands still at the cut.
pub struct Prepared {
    hasher: MemoryHasher,
}

impl Prepared {
    /// Zeroes `vm`'s memory and hashes it. Nothing may write to it before
    /// [`restore`].
    pub fn new(vm: &Vm) -> Result<Prepared, RestoreError> {
        memory::zero(&vm.mem)?;
        Ok(Prepared {
            hasher: MemoryHasher::new(&vm.mem, vm.config.mem_size),
        })
    }
}

/// Receives the primary's state on `handshaken` into `vm` (prepared by
/// `prepared`) and answers with the verdict. Waits at most `silence` for
/// each read.
pub fn restore(
    handshaken: &mut Handshaken,
    vm: &mut Vm,
    prepared: Prepared,
    silence: Duration,
    board: &StatusBoard,
) -> Result<Restored, RestoreError> {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let mut hasher = prepared.hasher;
    let mut round = 0;
    let mut pages = 0;
    let mut reader =
        handshaken
            .transfer_reader(silence)
            .map_err(|source| RestoreError::Stream {
                round: 0,
                bytes: 0,
                source,
            })?;
    let cut = loop {
        let item = match reader.next() {
            Ok(item) => item,
            Err(source) => {
                return Err(RestoreError::Stream {
                    round: round + 1,
                    bytes: reader.bytes_read(),
                    source,
                })
            }
        };
        match item {
            // The reader checked it against this guest's memory size.
            TransferItem::Begin { .. } => {}
            TransferItem::Page { index, data } => {
                let at = GuestAddress(index * PAGE_SIZE as u64);
                let written = match data {
                    PageData::Bytes(bytes) => vm.mem.write_slice(bytes, at),
                    PageData::Zero => vm.mem.write_slice(&[0u8; PAGE_SIZE], at),
                };
                written.map_err(|e| {
                    RestoreError::Refused(format!("page {index} cannot be written: {e}"))
                })?;
                hasher.refresh(&vm.mem, [index]);
                pages += 1;
            }
            TransferItem::RoundEnd { round: r, .. } => {
                round = r;
                board.transfer_round.store(r, Relaxed);
                board.transfer_bytes.store(reader.bytes_read(), Relaxed);
            }
            TransferItem::Cut(cut) => break cut,
            TransferItem::Abort { reason } => return Err(RestoreError::Aborted { reason }),
        }
    };
    let bytes = reader.bytes_read();
    let verdict = check(&cut, vm, &hasher);
    let answer = match &verdict {
        Ok(_) => Verdict::Restored {
            mem_hash: cut.mem_hash,
        },
        Err(reason) => Verdict::Refused {
            reason: reason.clone(),
        },
    };
    let answered = handshaken.write_verdict(&answer);
    let machine = verdict.map_err(RestoreError::Refused)?;
    answered.map_err(|source| RestoreError::Stream {
        round,
        bytes,
        source,
    })?;
    Ok(Restored {
        exits: cut.exits,
        rip: cut.rip,
        next_seq: cut.next_seq,
        machine,
        rounds: round,
        pages,
        bytes,
        took: started.elapsed(),
    })
}

/// Restores the machine state of the cut and checks it against the
/// primary's digest; the reason it is refused otherwise.
fn check(
    cut: &logchannel::Cut,
    vm: &mut Vm,
    hasher: &MemoryHasher,
) -> Result<MachineState, String> {
    if cut.next_seq == 0 {
        return Err("the cut names log entry 0 as the next one".to_string());
    }
    let machine = MachineState::decode(&cut.machine).map_err(|e| e.to_string())?;
    machine.restore_into(vm).map_err(|e| e.to_string())?;
    let regs = vm
        .vcpu
        .get_regs()
        .map_err(|e| format!("cannot read back the restored registers: {e}"))?;
    let regs = digest::registers(&regs);
    if regs != cut.regs {
        let differ: Vec<String> = regs
            .named()
            .into_iter()
            .zip(cut.regs.named())
            .filter(|(a, b)| a.1 != b.1)
            .map(|((name, mine), (_, theirs))| {
                format!("{name}: primary {theirs:#x}, restored {mine:#x}")
            })
            .collect();
        return Err(format!(
            "registers differ after restore ({})",
            differ.join(", ")
        ));
    }
    if regs.rip != cut.rip {
        return Err(format!(
            "the cut is at rip {:#x} but its registers say {:#x}",
            cut.rip, regs.rip
        ));
    }
    let mine = hasher.mem_hash();
    if mine != cut.mem_hash {
        return Err(format!(
            "memory hash differs: primary {:#018x}, restored {mine:#018x}",
            cut.mem_hash
        ));
    }
    Ok(machine)
}
