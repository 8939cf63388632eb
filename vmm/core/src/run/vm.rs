//! A KVM virtual machine with one vCPU: creation from a guest image, and the
//! access to registers and memory that the run loop and error reports need.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_interrupt, kvm_userspace_memory_region, KVMIO};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::devices::Devices;
use crate::machine::boot::{self, BootError};
use crate::machine::loader::{ElfImage, LoaderError};
use crate::machine::memory::{self, GuestMemory, MemoryError};
use crate::machine::patch::{PatchError, PatchTable};
use crate::machine::scan;
use crate::machine::workload::Workload;
use crate::run::dirty::{DirtyLog, DirtyReader};

ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// Where KVM may put the real-mode TSS on hosts that need one; above any
/// RAM we allow and below the top of the 32-bit space.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub mem_size: u64,
    pub tick_hz: u32,
    pub kvm_device: PathBuf,
    /// Patch rdtsc/rdtscp/rdrand/rdseed to trap. Only tests turn this off,
    /// to show that replay needs it.
    pub patching: bool,
    /// What the guest is asked to run (the boot-info block's field).
    pub workload: Workload,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: crate::machine::layout::DEFAULT_MEM_SIZE,
            tick_hz: boot::DEFAULT_TICK_HZ,
            kvm_device: PathBuf::from("/dev/kvm"),
            patching: true,
            workload: Workload::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source} (ftvm needs KVM: load the kvm module and make sure this user can read and write {path})")]
    OpenKvm {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION answered {version}, expected {KVM_API_VERSION})")]
    NotKvm { path: String, version: i32 },
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("bad guest image: {0}")]
    Image(#[from] LoaderError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot patch the guest image: {0}")]
    Patch(#[from] PatchError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// RFLAGS.RF, the resume flag.
const RFLAGS_RF: u64 = 1 << 16;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// IA32_TSC: `rdmsr` of it is as nondeterministic as `rdtsc`.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Makes `rdmsr`/`wrmsr` of IA32_TSC exit to the VMM (a filter range whose
/// bitmap denies it, with denials reported to user space), so that the run
/// loop supplies and logs the value. Where KVM cannot filter MSRs the guest
/// reads the TSC directly, which replay cannot reproduce: that is warned.
fn trap_time_msrs(vm: &VmFd) {
    use kvm_bindings::{kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER};
    use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: MSR_IA32_TSC,
        msr_count: 1,
        bitmap: &[0],
    };
    let result = vm
        .enable_cap(&cap)
        .and_then(|()| vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range]));
    if let Err(e) = result {
        tracing::warn!(
            "KVM cannot filter MSRs ({e}): a guest rdmsr of the TSC would not be recorded"
        );
    }
}

fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let shown = path.display().to_string();
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::OpenKvm {
        path: shown.clone(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| VmError::OpenKvm {
        path: shown.clone(),
        source,
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::NotKvm {
            path: shown,
            version,
        });
    }
    Ok(kvm)
}

pub struct Vm {
    pub(crate) kvm: Kvm,
    /// Holds the VM's fd, shared with whoever reads dirty pages off the
    /// vCPU thread.
    dirty: Arc<DirtyLog>,
    pub vcpu: VcpuFd,
    /// The guest's memory. A clone shares the mapping (and the VMM's dirty
    /// bitmap), so another thread may read pages through one while the vCPU
    /// runs, as a state transfer does. Such a read of a page the guest is
    /// writing at that moment may be torn; that page is then dirty and is
    /// read again at the next look at the [`DirtyLog`], so nothing torn
    /// survives to the cut. Only the vCPU thread writes.
    pub mem: GuestMemory,
    pub devices: Devices,
    pub image: ElfImage,
    pub patches: PatchTable,
    pub config: VmConfig,
}

impl Vm {
    /// Validates the image first, so a bad image is reported as such even
    /// where KVM is missing.
    pub fn new(image_bytes: &[u8], config: VmConfig) -> Result<Self, VmError> {
        let image = ElfImage::parse(image_bytes, config.mem_size)?;
        let mem = memory::create(config.mem_size)?;
        let kvm = open_kvm(&config.kvm_device)?;
        let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| MemoryError::BadSize {
                    size: config.mem_size,
                })?;
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                // Dirty logging costs nothing until the log is read; digests
                // read it to rehash only the pages the guest wrote.
                flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`; the VM fd
            // ends up in a DirtyLog that holds a clone of `mem` (sharing the
            // mapping) for as long as it holds the fd; slots are distinct.
            unsafe { vm.set_user_memory_region(region_desc) }
                .map_err(kvm_err("register guest memory"))?;
        }
        trap_time_msrs(&vm);
        if let Err(e) = vm.set_tss_address(KVM_TSS_ADDR) {
            tracing::debug!("KVM_SET_TSS_ADDR refused ({e}); not needed for a long-mode entry");
        }
        image.load(image_bytes, &mem)?;
        let patches = PatchTable::new(&scan::scan(image.code(image_bytes)).nondet)?;
        if config.patching {
            patches.apply(&mem, config.workload.trap_instruction())?;
        }
        boot::write_boot_structures(&mem, config.tick_hz, config.workload)?;
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
        boot::setup_vcpu(&kvm, &vcpu, image.entry)?;
        // KVM copies the registers into kvm_run at every exit, which makes
        // positions and trap emulation free of GET/SET_REGS calls.
        vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        Ok(Vm {
            kvm,
            dirty: Arc::new(DirtyLog::new(vm, mem.clone())),
            vcpu,
            mem,
            devices: Devices::new(),
            image,
            patches,
            config,
        })
    }

    /// Supplies the value of the port read that caused the last exit (an
    /// `in` from the guest), replacing what the exit handler put there.
    pub fn set_io_in_data(&mut self, data: &[u8]) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the union member
        // KVM filled in.
        let io = unsafe { run.__bindgen_anon_1.io };
        let len = (io.count as usize * io.size as usize).min(data.len());
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: KVM places the I/O data `data_offset` bytes into the
        // kvm_run mapping, which is at least a page long and holds
        // count * size bytes there; `len` is no larger.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(io.data_offset as usize), len);
        }
    }

    /// Supplies the value of the MSR read that caused the last exit.
    pub fn set_msr_data(&mut self, value: u64) {
        let run = self.vcpu.get_kvm_run();
        // The last exit was KVM_EXIT_X86_RDMSR: KVM reads `msr.data` back at
        // the next KVM_RUN.
        run.__bindgen_anon_1.msr.data = value;
    }

    /// Guest pages written since the digest hasher last looked, by the
    /// guest (KVM's dirty log) or by the VMM (the memory's own bitmap:
    /// device DMA).
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        self.dirty.take(DirtyReader::Digest)
    }

    /// The dirty page log, for a reader on another thread.
    pub fn dirty_log(&self) -> Arc<DirtyLog> {
        self.dirty.clone()
    }

    /// Queues an external interrupt; KVM delivers it at the next entry.
    pub fn inject(&self, vector: u8) -> Result<(), VmError> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: `vcpu` is a valid vCPU fd and `irq` a fully initialised
        // kvm_interrupt that the kernel only reads.
        let ret = unsafe { ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(VmError::Kvm {
                what: "inject an interrupt",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// At a signal exit of a live run, before anything reads or delivers
    /// there: clears RFLAGS.RF (the resume flag) if the kick left it set.
    /// A host interrupt that arrives while the host handles a fault of the
    /// guest's native CPL3 code (on this platform, the write-protect fault
    /// by which KVM's dirty log sees a page's first write) saves the
    /// guest's RFLAGS with RF set and RIP still on the faulting
    /// instruction. RF only suppresses an instruction breakpoint for one
    /// instruction, which this guest never sets, but it is in the
    /// registers an `async-point` entry hashes and in the frame an
    /// interrupt delivered there pushes: a replay, which reaches that
    /// instruction with RF clear, could then never find the pass (3 of 8
    /// `kv-user` recordings flooded with duplicate requests had such an
    /// entry; the recorded hash matched a replayed pass with RF flipped).
    pub fn clear_resume_flag(&mut self) {
        let regs = &mut self.vcpu.sync_regs_mut().regs;
        if regs.rflags & RFLAGS_RF == 0 {
            return;
        }
        regs.rflags &= !RFLAGS_RF;
        self.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
    }

    /// The current RIP and up to 16 bytes of code there, for error reports.
    /// Translates through the guest's page tables when KVM can.
    pub fn code_at_rip(&self) -> (u64, Vec<u8>) {
        let rip = match self.vcpu.get_regs() {
            Ok(regs) => regs.rip,
            Err(_) => return (0, Vec::new()),
        };
        let gpa = self
            .vcpu
            .translate_gva(rip)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
            .unwrap_or(rip);
        let mut bytes = Vec::new();
        for i in 0..16 {
            match self.mem.read_obj::<u8>(GuestAddress(gpa.wrapping_add(i))) {
                Ok(b) => bytes.push(b),
                Err(_) => break,
            }
        }
        (rip, bytes)
    }
}
