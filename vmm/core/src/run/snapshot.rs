//! The complete state of the machine at a synchronous exit, and its restore
//! into another VM built from the same image: what a state transfer sends at
//! its cut (guest memory aside, which travels page by page).
//!
//! Taken inside the run loop, at [`crate::run::run_loop::Mode::resume`]:
//! everything of that exit has been handled and logged there, so the
//! receiver replays the log from the next entry on.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs,
    Xsave, KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use kvm_ioctls::Cap;
use serde::{Deserialize, Serialize};

use crate::devices::{Devices, DevicesError, DevicesState};
use crate::host::net_backend::Datagram;
use crate::run::run_loop::{Machine, RunError};
use crate::run::vm::{Vm, MSR_IA32_TSC};

/// The largest encoded [`MachineState`] [`MachineState::decode`] accepts:
/// the vCPU (a few KiB), the devices, a console line (at most 4 KiB) and up
/// to 1024 pending datagrams of at most 64 KiB each, with room to spare.
pub const MAX_ENCODED_STATE: usize = 80 << 20;

const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to set MSR {index:#x} to {value:#x}; the vCPU holds {current}")]
    MsrRefused {
        index: u32,
        value: u64,
        current: String,
    },
    #[error("the state has MSR {0:#x}, which is not among the MSRs KVM lists here")]
    UnknownMsr(u32),
    #[error("the XSAVE area is {got} bytes, KVM on this host uses {want}")]
    XsaveSize { got: usize, want: usize },
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error("cannot bring the memory hash up to date at the cut: {0}")]
    MemoryHash(Box<RunError>),
    #[error(
        "device state does not survive a restore: {0} restored from it is not the state given"
    )]
    DevicesRoundTrip(&'static str),
    #[error("the machine state cannot be encoded: {0}")]
    Encode(String),
    #[error("the machine state cannot be decoded: {0}")]
    Decode(String),
    #[error("the machine state is {len} bytes, more than the {MAX_ENCODED_STATE} accepted")]
    TooLarge { len: usize },
    #[error("the machine state has {0} bytes after its end")]
    TrailingBytes(usize),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// The FPU, SSE and AVX state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum FpuState {
    /// The XSAVE area as KVM_GET_XSAVE2 (or KVM_GET_XSAVE) gives it, in
    /// 32-bit words.
    Xsave(Vec<u32>),
    /// KVM_GET_FPU's x87 and SSE state, where KVM refuses XSAVE.
    Legacy(Box<LegacyFpu>),
}

/// `kvm_fpu` without its padding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LegacyFpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for LegacyFpu {
    fn from(f: &kvm_fpu) -> Self {
        LegacyFpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&LegacyFpu> for kvm_fpu {
    fn from(f: &LegacyFpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One model-specific register.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything of the one vCPU that the guest can observe, as KVM holds it.
/// The KVM structures serialise as their bytes (kvm-bindings' `serde`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VcpuState {
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base and
    /// the pending external interrupt.
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// `None` where KVM has no XCR access (no XSAVE).
    pub xcrs: Option<kvm_xcrs>,
    /// The MSRs KVM lists and can read here, IA32_TSC excepted: the guest
    /// never sees it directly (its reads are trapped and logged, its writes
    /// dropped) and it moves with host time.
    pub msrs: Vec<MsrValue>,
    /// Pending exception, interrupt and NMI; the interrupt shadow.
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub mp_state: u32,
}

// Every field compares integers only (the KVM structures' derived
// PartialEq is over integer fields and arrays of them), so equality is total.
impl Eq for VcpuState {}

impl VcpuState {
    /// The vCPU's state at a synchronous exit. It first lets KVM complete
    /// the exit's instruction (an `in` or MMIO read takes its value from
    /// kvm_run only at the next KVM_RUN): KVM_RUN with `immediate_exit` set
    /// finishes it and returns at once without running the guest, which is
    /// what the next entry would have done first anyway.
    pub fn capture(vm: &mut Vm) -> Result<VcpuState, SnapshotError> {
        complete_pending_exit(vm)?;
        let vcpu = &vm.vcpu;
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = capture_fpu(vm)?;
        let xcrs = match vcpu.get_xcrs() {
            Ok(x) => Some(x),
            Err(e) if vm.kvm.check_extension(Cap::Xcrs) => {
                return Err(SnapshotError::Kvm {
                    what: "KVM_GET_XCRS",
                    source: e,
                })
            }
            Err(_) => None,
        };
        let msrs = capture_msrs(vm)?;
        let events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let mp_state = vcpu
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE"))?
            .mp_state;
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xcrs,
            msrs,
            events,
            debugregs,
            mp_state,
        })
    }

    /// Puts `state` into the vCPU: special registers before MSRs (EFER and
    /// the APIC base decide which MSRs KVM accepts), XCRs before XSAVE.
    /// The registers the run loop reads (kvm_run's sync_regs) become the
    /// restored ones too. What can be checked without KVM (the MSR list,
    /// the XSAVE area's size) is checked before the vCPU is touched; KVM
    /// refusing a value part-way leaves it half-restored, and the error
    /// names the call.
    pub fn restore(vm: &mut Vm, state: &VcpuState) -> Result<(), SnapshotError> {
        check_msr_indices(vm, &state.msrs)?;
        let fpu = match &state.fpu {
            FpuState::Xsave(words) => FpuSet::Xsave(xsave_from_words(vm, words)?),
            FpuState::Legacy(fpu) => FpuSet::Legacy(Box::new(kvm_fpu::from(&**fpu))),
        };
        vm.vcpu
            .set_sregs(&state.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        restore_msrs(vm, &state.msrs)?;
        let vcpu = &vm.vcpu;
        if let Some(xcrs) = &state.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        match fpu {
            // SAFETY: `xsave` was allocated with the size KVM_CAP_XSAVE2
            // reports for this VM (xsave_from_words checks that the words
            // fill exactly that), and ftvm enables no XSTATE feature with
            // arch_prctl that could make KVM read more.
            FpuSet::Xsave(xsave) => {
                unsafe { vcpu.set_xsave2(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?
            }
            FpuSet::Legacy(fpu) => vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        vcpu.set_regs(&state.regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        let mut events = state.events;
        // KVM reports the pending NMI without this flag but reads it on a
        // set only with it.
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
        vcpu.set_vcpu_events(&events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: state.mp_state,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        // The run loop reads the registers from sync_regs, and KVM would
        // load stale ones from there at the next entry were they still
        // marked dirty. Without an in-kernel LAPIC, KVM also sets CR8 from
        // kvm_run at every entry.
        vm.vcpu.sync_regs_mut().regs = state.regs;
        vm.vcpu.clear_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
        vm.vcpu.get_kvm_run().cr8 = state.sregs.cr8;
        Ok(())
    }
}

/// The FPU state as KVM takes it, built before the vCPU is touched.
enum FpuSet {
    Xsave(Xsave),
    Legacy(Box<kvm_fpu>),
}

/// KVM_RUN with `immediate_exit`: completes the last exit's I/O and
/// applies registers marked dirty in sync_regs, then returns EINTR.
fn complete_pending_exit(vm: &mut Vm) -> Result<(), SnapshotError> {
    vm.vcpu.set_kvm_immediate_exit(1);
    let result = vm.vcpu.run().map(|_| ());
    vm.vcpu.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(SnapshotError::Kvm {
            what: "KVM_RUN with immediate_exit (to complete the exit's instruction)",
            source,
        }),
        // KVM returns EINTR before entering the guest; an exit here would
        // mean the guest ran, and its exit would be lost.
        Ok(()) => Err(SnapshotError::Kvm {
            what: "KVM_RUN with immediate_exit: it entered the guest",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }),
    }
}

/// The XSAVE area size KVM uses for this VM, in bytes: never less than
/// the fixed `kvm_xsave` (a KVM without KVM_CAP_XSAVE2 answers 0).
fn xsave_size(vm: &Vm) -> usize {
    let reported = usize::try_from(vm.kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    reported.max(XSAVE_LEGACY_WORDS * 4)
}

fn new_xsave(vm: &Vm) -> Result<Xsave, SnapshotError> {
    let extra = xsave_size(vm)
        .saturating_sub(XSAVE_LEGACY_WORDS * 4)
        .div_ceil(4);
    Xsave::new(extra).map_err(|_| SnapshotError::XsaveSize {
        got: 0,
        want: xsave_size(vm),
    })
}

fn capture_fpu(vm: &Vm) -> Result<FpuState, SnapshotError> {
    if vm.kvm.check_extension(Cap::Xsave) {
        let mut xsave = new_xsave(vm)?;
        // SAFETY: `xsave` is allocated with the size KVM_CAP_XSAVE2 reports
        // for this VM, and ftvm enables no XSTATE feature with arch_prctl
        // that could make KVM write more.
        match unsafe { vm.vcpu.get_xsave2(&mut xsave) } {
            Ok(()) => {
                let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
                words.extend_from_slice(xsave.as_slice());
                return Ok(FpuState::Xsave(words));
            }
            Err(e) => tracing::debug!("KVM_GET_XSAVE2 refused ({e}); taking KVM_GET_FPU"),
        }
    }
    let fpu = vm.vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
    Ok(FpuState::Legacy(Box::new(LegacyFpu::from(&fpu))))
}

fn xsave_from_words(vm: &Vm, words: &[u32]) -> Result<Xsave, SnapshotError> {
    let want = xsave_size(vm);
    if words.len() * 4 != want.next_multiple_of(4) {
        return Err(SnapshotError::XsaveSize {
            got: words.len() * 4,
            want,
        });
    }
    let mut xsave = new_xsave(vm)?;
    let (region, extra) = words.split_at(XSAVE_LEGACY_WORDS);
    // SAFETY: only the fixed-size region is written; the length field the
    // wrapper keeps is left alone.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice().copy_from_slice(extra);
    Ok(xsave)
}

fn msrs_of(entries: &[MsrValue]) -> Result<Msrs, SnapshotError> {
    let list: Vec<kvm_bindings::kvm_msr_entry> = entries
        .iter()
        .map(|m| kvm_bindings::kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&list).map_err(|_| SnapshotError::Kvm {
        what: "an MSR list this long",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// Reads the listed MSRs; KVM stops at the first it cannot read, which is
/// left out and the rest read on.
fn read_msrs(vm: &Vm, indices: &[u32]) -> Result<Vec<MsrValue>, SnapshotError> {
    let mut values = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<MsrValue> = rest
            .iter()
            .map(|&index| MsrValue { index, data: 0 })
            .collect();
        let mut msrs = msrs_of(&entries)?;
        let read = vm
            .vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?;
        values.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        if read < rest.len() {
            tracing::debug!("MSR {:#x} is not readable; left out", rest[read]);
        }
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(values)
}

/// The MSRs a state holds: those KVM lists, IA32_TSC excepted.
fn msr_indices(vm: &Vm) -> Result<Vec<u32>, SnapshotError> {
    let list = vm
        .kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_TSC)
        .collect())
}

fn capture_msrs(vm: &Vm) -> Result<Vec<MsrValue>, SnapshotError> {
    read_msrs(vm, &msr_indices(vm)?)
}

/// Refuses, before the vCPU is touched, a state with an MSR this host's KVM
/// does not list (or IA32_TSC, which a state never holds).
fn check_msr_indices(vm: &Vm, msrs: &[MsrValue]) -> Result<(), SnapshotError> {
    let known = msr_indices(vm)?;
    match msrs.iter().find(|m| !known.contains(&m.index)) {
        Some(m) => Err(SnapshotError::UnknownMsr(m.index)),
        None => Ok(()),
    }
}

/// Sets the MSRs; KVM stops at the first it refuses. One it refuses but
/// already holds at the wanted value is no loss (on this platform
/// MSR_KVM_ASYNC_PF_INT, 0x4b564d06, at 0); any other is an error.
fn restore_msrs(vm: &Vm, entries: &[MsrValue]) -> Result<(), SnapshotError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let written = vm
            .vcpu
            .set_msrs(&msrs_of(rest)?)
            .map_err(kvm_err("KVM_SET_MSRS"))?;
        let Some(refused) = rest.get(written) else {
            break;
        };
        let current = read_msrs(vm, &[refused.index])?;
        match current.first() {
            Some(c) if c.data == refused.data => {}
            other => {
                return Err(SnapshotError::MsrRefused {
                    index: refused.index,
                    value: refused.data,
                    current: match other {
                        Some(c) => format!("{:#x}", c.data),
                        None => "an unreadable value".to_string(),
                    },
                })
            }
        }
        rest = &rest[written + 1..];
    }
    Ok(())
}

/// The complete state of the machine at a synchronous exit, guest memory
/// aside.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    pub vcpu: VcpuState,
    pub devices: DevicesState,
    /// What the guest has written of its current console line.
    pub console_line: Vec<u8>,
    /// The live run's device clock at the cut ([`crate::live::Live::clock_ns`]).
    pub clock_ns: u64,
    /// Datagrams received and not yet delivered to the guest.
    pub datagrams: Vec<Datagram>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENCODED_STATE>()
}

impl MachineState {
    /// The state of `m` at the synchronous exit it is at (call it from
    /// [`crate::run::run_loop::Mode::resume`]). It also brings `m`'s memory
    /// hash up to date: output checks use the hash as of its last refresh,
    /// and a replay that starts from this state hashes the memory as it is
    /// here, so the two must agree from the cut on.
    pub fn capture(
        m: &mut Machine,
        clock_ns: u64,
        datagrams: Vec<Datagram>,
    ) -> Result<Self, SnapshotError> {
        m.state()
            .map_err(|e| SnapshotError::MemoryHash(Box::new(e)))?;
        Ok(MachineState {
            vcpu: VcpuState::capture(m.vm)?,
            devices: m.vm.devices.state(),
            console_line: m.console_line().to_vec(),
            clock_ns,
            datagrams,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        bincode::serde::encode_to_vec(self, bincode_config())
            .map_err(|e| SnapshotError::Encode(e.to_string()))
    }

    /// Bytes from the network: anything but one whole state is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() > MAX_ENCODED_STATE {
            return Err(SnapshotError::TooLarge { len: bytes.len() });
        }
        let (state, read): (MachineState, usize) =
            bincode::serde::decode_from_slice(bytes, bincode_config())
                .map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if read != bytes.len() {
            return Err(SnapshotError::TrailingBytes(bytes.len() - read));
        }
        Ok(state)
    }

    /// Builds the devices (checking that they are exactly the state given),
    /// then puts the vCPU state in and the devices in place. Everything
    /// that can reject the state runs before the VM is touched, so a
    /// rejected state leaves the VM as it was; only KVM refusing a value
    /// part-way can leave the vCPU half-restored (the error names the
    /// call). Guest memory is the caller's.
    pub fn restore_into(&self, vm: &mut Vm) -> Result<(), SnapshotError> {
        let devices = checked_devices(&self.devices)?;
        VcpuState::restore(vm, &self.vcpu)?;
        vm.devices = devices;
        Ok(())
    }
}

fn checked_devices(state: &DevicesState) -> Result<Devices, SnapshotError> {
    let devices = Devices::from_state(state)?;
    let back = devices.state();
    let differs = [
        ("the serial console", back.serial != state.serial),
        ("the PIC", back.pic != state.pic),
        ("the PIT", back.pit != state.pit),
        ("virtio-net", back.net != state.net),
        (
            "the unknown access counters",
            (back.unknown_pio, back.unknown_mmio) != (state.unknown_pio, state.unknown_mmio),
        ),
    ];
    match differs.iter().find(|(_, d)| *d) {
        Some((what, _)) => Err(SnapshotError::DevicesRoundTrip(what)),
        None => Ok(devices),
    }
}

/// These tests drive the whole pipeline (a live run that records, a replay
/// from the cut), which is why a test of `run` imports `live` and `replay`.
#[cfg(test)]
pub(crate) mod tests {
    use std::collections::VecDeque;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use logchannel::{Entry, Event, Position};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::host::emitter::Emitter;
    use crate::live::{EntrySink, Live};
    use crate::machine::guest_image::GUEST_ELF;
    use crate::machine::workload::Workload;
    use crate::replay::{LogSource, Replay, Verdict};
    use crate::run::forward::forward_mode;
    use crate::run::run_loop::{run, run_from, Mode, RunError, Start, StopReason};
    use crate::run::stop::StopSignal;
    use crate::run::vm::VmConfig;

    pub(crate) fn config(workload: Workload) -> VmConfig {
        VmConfig {
            mem_size: 16 << 20,
            tick_hz: 1000,
            workload,
            ..VmConfig::default()
        }
    }

    /// A VM of the embedded guest; `None` when the environment says to skip
    /// the KVM tests, a panic when KVM is unusable otherwise.
    pub(crate) fn test_vm(config: VmConfig) -> Option<Vm> {
        match Vm::new(GUEST_ELF, config) {
            Ok(vm) => Some(vm),
            Err(e) if std::env::var("FTVM_SKIP_KVM_TESTS").as_deref() == Ok("1") => {
                eprintln!("skipped: /dev/kvm is not usable ({e}) and FTVM_SKIP_KVM_TESTS=1");
                None
            }
            Err(e) => panic!(
                "/dev/kvm is not usable ({e}); set FTVM_SKIP_KVM_TESTS=1 to skip the KVM tests explicitly"
            ),
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl SharedBuf {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().expect("buffer").clone()
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const DIGEST_INTERVAL: u64 = 64;

    /// Keeps the entries logged once `keep` is set, numbered on from the
    /// ones before.
    struct MemorySink {
        seq: u64,
        keep: Arc<Mutex<Option<Vec<Entry>>>>,
    }

    impl EntrySink for MemorySink {
        fn log(&mut self, pos: Position, event: Event) -> Result<u64, RunError> {
            self.seq += 1;
            if let Some(kept) = self.keep.lock().expect("entries").as_mut() {
                kept.push(Entry {
                    seq: self.seq,
                    pos,
                    event,
                });
            }
            Ok(self.seq)
        }
        fn digest_due(&self, pos: Position) -> bool {
            crate::run::digest::periodic_due(DIGEST_INTERVAL, pos.exits)
        }
        fn flush(&mut self) -> Result<(), RunError> {
            Ok(())
        }
        fn end(&mut self, pos: Position, reason: StopReason) -> Result<(), RunError> {
            self.log(
                pos,
                Event::End {
                    exits: pos.exits,
                    reason: reason.end_reason(),
                },
            )
            .map(|_| ())
        }
    }

    struct VecSource(VecDeque<Entry>);

    impl LogSource for VecSource {
        fn peek(&mut self, _exits: u64) -> Result<Option<&Entry>, RunError> {
            Ok(self.0.front())
        }
        fn take(&mut self) -> Option<Entry> {
            self.0.pop_front()
        }
        fn finite(&self) -> bool {
            true
        }
    }

    /// What a live run looked like at its cut.
    struct Cut {
        state: MachineState,
        memory: Vec<u8>,
        /// How much console output had been released by then.
        console_at: usize,
    }

    /// A live run that takes the machine state at exit `at` (and starts
    /// keeping log entries there), and stops at exit `until` unless the
    /// guest powers off first.
    struct CutLive {
        live: Live,
        at: u64,
        until: u64,
        console: SharedBuf,
        keep: Arc<Mutex<Option<Vec<Entry>>>>,
        cut: Option<Cut>,
    }

    impl Mode for CutLive {
        forward_mode!(live: now_ns, trap, time_msr, time_read, output, after_exit, deliver,
            wait_idle, kick_at, due_between, deliver_between, aim, at_aim, finish);

        fn should_stop(
            &mut self,
            m: &mut Machine,
            pos: Position,
        ) -> Result<Option<StopReason>, RunError> {
            if pos.exits >= self.until {
                return Ok(Some(StopReason::Requested));
            }
            self.live.should_stop(m, pos)
        }
        fn resume(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
            self.live.resume(m, pos)?;
            if pos.exits == self.at && self.cut.is_none() {
                let state =
                    MachineState::capture(m, self.live.clock_ns(), self.live.pending_datagrams())
                        .expect("capture at the cut");
                let mut memory = vec![0u8; m.vm.config.mem_size as usize];
                m.vm.mem
                    .read_slice(&mut memory, GuestAddress(0))
                    .expect("guest memory");
                *self.keep.lock().expect("entries") = Some(Vec::new());
                self.cut = Some(Cut {
                    state,
                    memory,
                    console_at: self.console.bytes().len(),
                });
            }
            Ok(())
        }
    }

    /// Runs a live, recording guest of `workload` to exit `until`, taking
    /// its state at exit `at`; returns the cut, the entries after it and
    /// the console output after it.
    fn live_with_cut(
        workload: Workload,
        at: u64,
        until: u64,
    ) -> Option<(Cut, Vec<Entry>, Vec<u8>)> {
        let mut vm = test_vm(config(workload))?;
        let stop = StopSignal::new();
        let console = SharedBuf::default();
        let keep = Arc::new(Mutex::new(None));
        let emitter = Emitter {
            net: None,
            console: Box::new(console.clone()),
            capture: None,
            served: Arc::default(),
        };
        let sink = MemorySink {
            seq: 0,
            keep: keep.clone(),
        };
        let live = Live::new(
            None,
            Box::new(emitter),
            Some(Box::new(sink)),
            stop.clone(),
            Some(Duration::from_secs(60)),
        );
        let mut mode = CutLive {
            live,
            at,
            until,
            console: console.clone(),
            keep: keep.clone(),
            cut: None,
        };
        let summary = run(&mut vm, &mut mode, &stop, true).expect("the live run");
        assert!(
            matches!(
                summary.reason,
                Some(StopReason::Requested | StopReason::PowerOff)
            ),
            "the guest ran to exit {until} or its end: {summary:?}"
        );
        let cut = mode.cut.expect("the run passed the cut");
        let entries = keep.lock().expect("entries").take().unwrap_or_default();
        let after = console.bytes()[cut.console_at..].to_vec();
        Some((cut, entries, after))
    }

    /// A second VM of the same image with the cut's memory and state.
    fn restored(workload: Workload, cut: &Cut) -> Vm {
        let mut vm = test_vm(config(workload)).expect("KVM worked a moment ago");
        vm.mem
            .write_slice(&cut.memory, GuestAddress(0))
            .expect("guest memory");
        cut.state.restore_into(&mut vm).expect("restore");
        vm
    }

    #[test]
    fn a_restored_vm_has_the_captured_state_and_replays_on_from_the_cut() {
        for (workload, at, until) in [(Workload::Kv, 3000, 6000), (Workload::Race, 400, u64::MAX)] {
            let Some((cut, entries, console_after)) = live_with_cut(workload, at, until) else {
                return;
            };
            let mut vm = restored(workload, &cut);
            let again = VcpuState::capture(&mut vm).expect("capture the restored VM");
            assert_eq!(again, cut.state.vcpu, "{workload:?}");
            assert_eq!(vm.devices.state(), cut.state.devices);

            let stop = StopSignal::new();
            let console = SharedBuf::default();
            let mut replay = Replay::new(
                VecSource(entries.into()),
                DIGEST_INTERVAL,
                false,
                Box::new(console.clone()),
                None,
                stop.clone(),
            )
            .with_clock(cut.state.clock_ns);
            let start = Start {
                exits: at,
                console_line: cut.state.console_line.clone(),
            };
            let summary = run_from(&mut vm, &mut replay, &stop, true, start).expect("the replay");
            let verdict = replay.verdict(&summary, None);
            assert!(
                matches!(
                    verdict,
                    Verdict::Reproduced {
                        cut_short: None,
                        ..
                    }
                ),
                "{workload:?}: {verdict:?}"
            );
            assert!(replay.counts.digests_checked > 0);
            assert_eq!(
                String::from_utf8_lossy(&console.bytes()),
                String::from_utf8_lossy(&console_after),
                "{workload:?}"
            );
        }
    }

    #[test]
    fn an_encoded_state_round_trips_and_a_damaged_one_is_refused_by_name() {
        let Some((cut, _, _)) = live_with_cut(Workload::Kv, 500, 600) else {
            return;
        };
        let mut state = cut.state;
        state.datagrams.push(Datagram {
            from: "127.0.0.1:9".parse().expect("address"),
            payload: b"get k".to_vec(),
        });
        let bytes = state.encode().expect("encode");
        assert_eq!(MachineState::decode(&bytes).expect("decode"), state);
        for cut_at in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            let err = MachineState::decode(&bytes[..cut_at]).expect_err("truncated");
            assert!(matches!(err, SnapshotError::Decode(_)), "{err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            MachineState::decode(&longer),
            Err(SnapshotError::TrailingBytes(1))
        ));
        let mut huge = bytes;
        huge.resize(MAX_ENCODED_STATE + 1, 0);
        assert!(matches!(
            MachineState::decode(&huge),
            Err(SnapshotError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_rejected_device_state_leaves_the_vm_untouched() {
        let Some((cut, _, _)) = live_with_cut(Workload::Kv, 500, 600) else {
            return;
        };
        let mut state = cut.state.clone();
        state.devices.net.interrupt_status = 0x80;
        let mut vm = test_vm(config(Workload::Kv)).expect("KVM");
        let before = VcpuState::capture(&mut vm).expect("capture");
        let err = state
            .restore_into(&mut vm)
            .expect_err("unknown interrupt bits");
        assert!(err.to_string().starts_with("virtio-net state: "), "{err}");
        assert_eq!(VcpuState::capture(&mut vm).expect("capture"), before);
        assert_eq!(vm.devices, Devices::new());

        let mut state = cut.state;
        state.devices = vm.devices.state();
        state.vcpu.msrs.push(MsrValue {
            index: MSR_IA32_TSC,
            data: 1,
        });
        let err = state.restore_into(&mut vm).expect_err("the TSC");
        assert!(
            matches!(err, SnapshotError::UnknownMsr(MSR_IA32_TSC)),
            "{err}"
        );
        state.vcpu.msrs.pop();
        state.vcpu.fpu = FpuState::Xsave(vec![0; 3]);
        let err = state.restore_into(&mut vm).expect_err("a short XSAVE area");
        assert!(
            matches!(err, SnapshotError::XsaveSize { got: 12, .. }),
            "{err}"
        );
        assert_eq!(VcpuState::capture(&mut vm).expect("capture"), before);
    }
}
