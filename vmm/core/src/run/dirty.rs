//! Guest pages written since a reader last looked, for more than one reader.
//!
//! KVM's dirty log and vm-memory's own bitmap (the VMM's writes: device DMA,
//! the loader) both reset when they are read, so two readers that each read
//! them directly would steal pages from one another. [`DirtyLog`] reads both
//! on behalf of every reader and keeps, per active reader, what that reader
//! has not yet taken: the digest hasher on the vCPU thread, and a state
//! transfer on a thread of its own while the vCPU runs.

use std::sync::{Mutex, PoisonError};

use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::machine::memory::GuestMemory;
use crate::run::digest::pages_in_bitmap;
use crate::run::vm::VmError;

const PAGE_SIZE: u64 = 4096;
const PAGES_PER_WORD: u64 = 64;

/// Who takes dirty pages from a [`DirtyLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyReader {
    /// The memory hasher behind digests; always active.
    Digest,
    /// A live state transfer; active between [`DirtyLog::start`] and
    /// [`DirtyLog::stop`].
    Transfer,
}

/// One bit per guest page, for each reader: what it has not taken yet.
struct Pending {
    digest: Vec<u64>,
    /// `None` while no transfer is under way.
    transfer: Option<Vec<u64>>,
    /// Every page written since the VM was made (the loader's writes
    /// included): the pages a transfer's first round sends, so that it
    /// need not read all of memory to find the ones that are not zero.
    touched: Vec<u64>,
}

/// The dirty pages of one VM, shared between the vCPU thread and a transfer
/// thread (`Arc<DirtyLog>`, from [`crate::run::vm::Vm::dirty_log`]).
pub struct DirtyLog {
    /// The VM's fd lives here, beside a clone of the memory it maps, so that
    /// the mapping KVM writes into outlives the VM for as long as anyone
    /// holds this log.
    vm_fd: VmFd,
    mem: GuestMemory,
    words: usize,
    pending: Mutex<Pending>,
}

impl DirtyLog {
    /// `mem` must be the memory registered with `vm_fd`, one KVM slot per
    /// region in order, as [`crate::run::vm::Vm::new`] registers it.
    pub(crate) fn new(vm_fd: VmFd, mem: GuestMemory) -> Self {
        let end = mem
            .iter()
            .map(|r| r.start_addr().raw_value() + r.len())
            .max()
            .unwrap_or(0);
        let words = end.div_ceil(PAGE_SIZE * PAGES_PER_WORD) as usize;
        DirtyLog {
            vm_fd,
            mem,
            words,
            pending: Mutex::new(Pending {
                digest: vec![0; words],
                transfer: None,
                touched: vec![0; words],
            }),
        }
    }

    /// Makes `reader` active from now on: it is told of pages written after
    /// this call, not before. What KVM logged before is collected for the
    /// digest first; left in KVM's log, the transfer's first look would
    /// take every page written since the last digest for newly dirty.
    /// Starting a transfer that is under way starts it afresh. The digest
    /// reader is always active, and this leaves it be.
    pub fn start(&self, reader: DirtyReader) -> Result<(), VmError> {
        if reader == DirtyReader::Transfer {
            let mut pending = self.lock();
            self.gather(&mut pending)?;
            pending.transfer = Some(vec![0; self.words]);
        }
        Ok(())
    }

    /// Every page written since the VM was made, in increasing order.
    pub fn touched(&self) -> Result<Vec<u64>, VmError> {
        let mut pending = self.lock();
        self.gather(&mut pending)?;
        Ok(pages_in_bitmap(&pending.touched).collect())
    }

    /// Makes `reader` inactive; what it had not taken is dropped. The digest
    /// reader cannot be stopped (its hash must see every write).
    pub fn stop(&self, reader: DirtyReader) {
        if reader == DirtyReader::Transfer {
            self.lock().transfer = None;
        }
    }

    /// Whether a transfer is under way.
    pub fn is_active(&self, reader: DirtyReader) -> bool {
        match reader {
            DirtyReader::Digest => true,
            DirtyReader::Transfer => self.lock().transfer.is_some(),
        }
    }

    /// The guest page numbers written since `reader` last took them (or
    /// started), by the guest or by the VMM, in increasing order. Whatever
    /// this call collects is also kept for every other active reader. An
    /// inactive reader gets nothing.
    pub fn take(&self, reader: DirtyReader) -> Result<Vec<u64>, VmError> {
        let mut pending = self.lock();
        self.gather(&mut pending)?;
        let mine = match reader {
            DirtyReader::Digest => Some(&mut pending.digest),
            DirtyReader::Transfer => pending.transfer.as_mut(),
        };
        Ok(match mine {
            Some(set) => {
                let pages = pages_in_bitmap(set).collect();
                set.fill(0);
                pages
            }
            None => Vec::new(),
        })
    }

    /// Collects what was written since the last look into every active
    /// reader's set and the touched set. Called with the lock held, so that
    /// what one reader collects reaches the others before either can look
    /// again.
    fn gather(&self, pending: &mut Pending) -> Result<(), VmError> {
        let found = self.collect()?;
        let Pending {
            digest,
            transfer,
            touched,
        } = pending;
        for set in [digest, touched].into_iter().chain(transfer.as_mut()) {
            for (w, f) in set.iter_mut().zip(&found) {
                *w |= f;
            }
        }
        Ok(())
    }

    /// Reads and resets KVM's log and the memory's own bitmap.
    fn collect(&self) -> Result<Vec<u64>, VmError> {
        let mut found = vec![0u64; self.words];
        for (slot, region) in self.mem.iter().enumerate() {
            let first_word =
                (region.start_addr().raw_value() / PAGE_SIZE / PAGES_PER_WORD) as usize;
            let kvm = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| VmError::Kvm {
                    what: "read the dirty page log",
                    source,
                })?;
            let vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (i, (k, v)) in kvm
                .iter()
                .zip(vmm.iter().chain(std::iter::repeat(&0)))
                .enumerate()
            {
                if let Some(w) = found.get_mut(first_word + i) {
                    *w |= k | v;
                }
            }
        }
        Ok(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A reader that panicked left sets that are still bitmaps; at worst a
        // page is reported twice, which both readers tolerate.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::run::snapshot::tests::test_vm;
    use crate::run::vm::VmConfig;

    /// Guest code in RAM the guest image does not use: `mov rax, GUEST_PAGE;
    /// mov byte [rax], 1; hlt`.
    const CODE: u64 = 0x100_0000;
    const GUEST_PAGE: u64 = 0x100_2000;
    const VMM_PAGE: u64 = 0x100_4000;
    const EARLY_PAGE: u64 = 0x100_6000;

    fn code() -> Vec<u8> {
        let mut code = vec![0x48, 0xb8];
        code.extend_from_slice(&GUEST_PAGE.to_le_bytes());
        code.extend_from_slice(&[0xc6, 0x00, 0x01, 0xf4]);
        code
    }

    fn ours(pages: &[u64]) -> Vec<u64> {
        let ours = [GUEST_PAGE, VMM_PAGE, EARLY_PAGE].map(|a| a / PAGE_SIZE);
        pages.iter().copied().filter(|p| ours.contains(p)).collect()
    }

    #[test]
    fn a_vmm_write_and_a_guest_write_reach_both_readers_once() {
        let Some(mut vm) = test_vm(VmConfig::default()) else {
            return;
        };
        vm.mem
            .write_slice(&code(), GuestAddress(CODE))
            .expect("code");
        let mut regs = vm.vcpu.get_regs().expect("regs");
        regs.rip = CODE;
        regs.rflags = 0x2;
        vm.vcpu.set_regs(&regs).expect("set regs");
        let log = vm.dirty_log();
        log.take(DirtyReader::Digest).expect("clear");
        assert!(!log.is_active(DirtyReader::Transfer));

        vm.mem
            .write_obj(1u8, GuestAddress(EARLY_PAGE))
            .expect("write");
        // Written before the transfer starts, and not yet taken by anyone:
        // the digest's, never the transfer's concern.
        log.start(DirtyReader::Transfer).expect("start");
        vm.mem
            .write_obj(1u8, GuestAddress(VMM_PAGE))
            .expect("write");
        assert!(matches!(vm.vcpu.run(), Ok(VcpuExit::Hlt)));

        let both = [GUEST_PAGE / PAGE_SIZE, VMM_PAGE / PAGE_SIZE];
        // The transfer thread looks first, from another thread; the digest
        // still sees what that look collected.
        let transfer = std::thread::spawn({
            let log = log.clone();
            move || log.take(DirtyReader::Transfer).expect("take")
        })
        .join()
        .expect("the transfer thread");
        assert_eq!(ours(&transfer), both);
        let mut digest = vec![EARLY_PAGE / PAGE_SIZE];
        digest.extend(both);
        digest.sort_unstable();
        assert_eq!(ours(&vm.take_dirty_pages().expect("take")), digest);
        // Whoever took them, every page written stays touched.
        assert_eq!(ours(&log.touched().expect("touched")), digest);
        assert_eq!(ours(&vm.take_dirty_pages().expect("take")), [0u64; 0]);
        assert_eq!(
            ours(&log.take(DirtyReader::Transfer).expect("take")),
            [0u64; 0]
        );

        log.stop(DirtyReader::Transfer);
        vm.mem
            .write_obj(2u8, GuestAddress(VMM_PAGE))
            .expect("write");
        assert_eq!(
            ours(&log.take(DirtyReader::Transfer).expect("take")),
            [0u64; 0]
        );
        assert_eq!(
            ours(&log.take(DirtyReader::Digest).expect("take")),
            [VMM_PAGE / PAGE_SIZE]
        );
    }
}
