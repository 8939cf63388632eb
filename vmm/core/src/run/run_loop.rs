//! The one run loop: `VcpuFd::run()`, the pure exit handler, trapped
//! instructions, outputs and the delivery rule of docs/design.md, shared by a
//! live run, a recording and a replay. What differs between them (where time,
//! random numbers, packets and interrupts come from, where outputs go) is a
//! [`Mode`]; the loop calls it at the same points of every synchronous exit
//! in the same order, which is what makes a recording replayable.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use logchannel::{Digest, DigestReason, OutputKind, Position, Registers};

use crate::devices::virtio_net::NET_IRQ;
use crate::machine::layout::{DEBUG_TRAP_PORT, TRAP_PORT};
use crate::machine::patch::{emulate, TrapResult};
use crate::machine::scan::NondetSite;
use crate::run::digest::{self, MemoryHasher};
use crate::run::divergence::Divergence;
use crate::run::exit::{handle_exit, Action, Exit, ExitKind};
use crate::run::kick::Kicker;
use crate::run::precise::{can_take_interrupt, Aim, PreciseError, Trapped};
use crate::run::stop::StopSignal;
pub use crate::run::summary::{
    end_without_final_digest, BetweenCounts, ExitCounts, RunSummary, StopReason, ABORTED_END_PREFIX,
};
use crate::run::vm::{Vm, VmError};

pub const TIMER_IRQ: u8 = 0;
pub const SERIAL_IRQ: u8 = crate::machine::boot::SERIAL_IRQ as u8;
/// PIT counter ports whose reads depend on time.
const PIT_COUNTER_PORTS: std::ops::RangeInclusive<u16> = 0x40..=0x42;
/// How long a stop request waits for the guest's next synchronous exit, so
/// that the run ends at a position (where a replay can compare state),
/// before it takes the vCPU wherever it is.
pub const STOP_GRACE: Duration = Duration::from_millis(500);
/// `out TRAP_PORT, al`, a patch site's first instruction at CPL3.
const TRAP_OUT_LEN: u64 = 2;
/// A console line longer than this is cut into several outputs, so that a
/// guest that never prints a newline still has its output released.
const MAX_CONSOLE_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    #[error("the guest stopped the VM: {exit} at RIP {rip:#x} (code there: {code}) after {position} synchronous exits")]
    GuestFault {
        exit: String,
        rip: u64,
        code: String,
        position: u64,
    },
    #[error(
        "the guest executed hlt with interrupts disabled at RIP {rip:#x}: it can never wake up"
    )]
    DeadHalt { rip: u64 },
    #[error("cannot prepare the vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Precise(#[from] PreciseError),
    #[error("writing the log failed: {0}")]
    Log(#[from] logchannel::LogError),
    #[error("reading the log failed: {0}")]
    LogRead(logchannel::LogError),
    #[error("replay diverged from the recording:\n{0}")]
    Diverged(Box<Divergence>),
    #[error("writing the packet capture failed: {0}")]
    Capture(std::io::Error),
    /// The log channel's peer fell silent or broke: the caller decides
    /// whether to fail over.
    #[error("the log channel failed: {0}")]
    PeerFailed(String),
    /// The mode stopped the run for a reason of its own that the loop knows
    /// nothing of (the `ft` layer's arbitration outcomes); the caller that
    /// chose the mode looks inside with `downcast_ref`.
    #[error(transparent)]
    Mode(Box<dyn std::error::Error + Send + Sync>),
}

/// The VM plus what every mode needs to look at it.
pub struct Machine<'a> {
    pub vm: &'a mut Vm,
    /// Present when the mode takes digests (record, replay).
    pub hasher: Option<MemoryHasher>,
    pub summary: RunSummary,
    console_line: Vec<u8>,
}

impl Machine<'_> {
    pub fn regs(&mut self) -> kvm_bindings::kvm_regs {
        self.vm.vcpu.sync_regs().regs
    }

    /// Registers and an up-to-date memory hash, for digests.
    pub fn state(&mut self) -> Result<(Registers, u64), RunError> {
        let regs = digest::registers(&self.regs());
        let dirty = self.vm.take_dirty_pages()?;
        let hasher = self
            .hasher
            .get_or_insert_with(|| MemoryHasher::new(&self.vm.mem, self.vm.config.mem_size));
        hasher.refresh(&self.vm.mem, dirty);
        Ok((regs, hasher.mem_hash()))
    }

    /// The state an output check covers: the registers, and the memory hash
    /// either brought up to date now (`refresh_memory`) or as of the last
    /// digest. Refreshing re-arms KVM's dirty log, which makes the guest's
    /// next write to every page it touches fault; at every output that costs
    /// a loaded guest 15-20% on this platform (BENCHMARKS.md), so by default
    /// memory is checked by the periodic digests.
    pub fn output_state(&mut self, refresh_memory: bool) -> Result<(Registers, u64), RunError> {
        if refresh_memory {
            return self.state();
        }
        let regs = digest::registers(&self.regs());
        let mem_hash = self.hasher.as_ref().map_or(0, |h| h.mem_hash());
        Ok((regs, mem_hash))
    }

    /// Whether the guest has written part of a console line: a run that
    /// stops here logs it as a last console output ([`flush_outputs`]).
    pub fn console_line_pending(&self) -> bool {
        !self.console_line.is_empty()
    }

    /// What the guest has written of its current console line, which a
    /// machine state taken here carries to the run that continues from it.
    pub fn console_line(&self) -> &[u8] {
        &self.console_line
    }

    /// Hands the guest the interrupt the PIC has for it, if any.
    pub fn inject_pending(&mut self) -> Result<Option<u8>, RunError> {
        match self.vm.devices.pic.acknowledge() {
            Some(vector) => {
                self.vm.inject(vector)?;
                self.summary.interrupts_injected += 1;
                Ok(Some(vector))
            }
            None => Ok(None),
        }
    }

    /// Raises the interrupt lines of devices that signalled since the last
    /// look (deterministic: it depends only on device state).
    pub fn raise_device_irqs(&mut self) {
        if self.vm.devices.net.take_irq() {
            self.vm.devices.pic.raise_irq(NET_IRQ);
        }
        if self.vm.devices.serial.irq_pending() {
            self.vm.devices.pic.raise_irq(SERIAL_IRQ);
        }
    }

    fn fault(&self, exit: String) -> RunError {
        let (rip, bytes) = self.vm.code_at_rip();
        let code = if bytes.is_empty() {
            "unreadable".to_string()
        } else {
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        RunError::GuestFault {
            exit,
            rip,
            code,
            position: self.summary.exits.synchronous,
        }
    }
}

/// What distinguishes a live run, a recording and a replay.
pub trait Mode {
    /// Time as the devices see it.
    fn now_ns(&self) -> u64;
    /// Checked before every entry into the guest.
    fn should_stop(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError>;
    /// The result of a trapped instruction.
    fn trap(&mut self, pos: Position, site: &NondetSite) -> Result<TrapResult, RunError>;
    /// The value of a time MSR (IA32_TSC) the guest reads with `rdmsr`.
    fn time_msr(&mut self, pos: Position, msr: u32) -> Result<u64, RunError>;
    /// A time-dependent device read returned `value`; returns what the guest sees.
    fn time_read(&mut self, pos: Position, port: u16, value: u8) -> Result<u8, RunError>;
    /// An output the guest produced (a console line, a frame).
    fn output(
        &mut self,
        m: &mut Machine,
        pos: Position,
        kind: OutputKind,
        bytes: &[u8],
    ) -> Result<(), RunError>;
    /// After every synchronous exit (periodic digests).
    fn after_exit(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError>;
    /// Packets and interrupts for the guest at this exit; `ready` says
    /// whether it can take an interrupt. Returns whether one was injected.
    fn deliver(&mut self, m: &mut Machine, pos: Position, ready: bool) -> Result<bool, RunError>;
    /// Everything for exit `pos` is done and the guest is about to run.
    fn resume(&mut self, _m: &mut Machine, _pos: Position) -> Result<(), RunError> {
        Ok(())
    }
    /// The guest is halted with nothing delivered: wait for something to
    /// deliver, or say why nothing ever will.
    fn wait_idle(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError>;
    /// When a guest that makes no synchronous exit from now on should be
    /// kicked out of `KVM_RUN`, so that what is due then reaches it between
    /// two exits (a live run's timer tick, a datagram); `None`: never.
    fn kick_at(&mut self, _m: &mut Machine) -> Option<Instant> {
        None
    }
    /// At an asynchronous exit (a kick): whether anything is due that the
    /// guest should take right where it is.
    fn due_between(&mut self, _m: &mut Machine) -> bool {
        false
    }
    /// Delivers what is due at `at` (the count of synchronous exits so far
    /// and the RIP a kick stopped the guest at), where it can take an
    /// interrupt. Returns whether one was injected.
    fn deliver_between(&mut self, _m: &mut Machine, _at: Position) -> Result<bool, RunError> {
        Ok(false)
    }
    /// Whether the guest must be stopped at an instruction before it runs
    /// on from the last synchronous exit `pos` (a replay's next
    /// `async-point` entry): that entry's sequence number and RIP.
    fn aim(&mut self, _m: &mut Machine, _pos: Position) -> Result<Option<(u64, u64)>, RunError> {
        Ok(None)
    }
    /// The guest is at the aimed instruction, at `at`: judge this pass
    /// (`aim.judge`) and, when it is the recorded one, apply the entry,
    /// deliver what follows it and return true. A pass that can never lead
    /// to the recorded one is a divergence, returned as the error.
    fn at_aim(
        &mut self,
        _m: &mut Machine,
        _at: Position,
        _aim: &mut Aim,
    ) -> Result<bool, RunError> {
        Ok(false)
    }
    /// Between two exits, after the last synchronous exit `pos`: whether the
    /// run ends here (a replay whose recording was stopped between exits).
    fn should_stop_between(
        &mut self,
        _m: &mut Machine,
        _pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        Ok(None)
    }
    /// The run ends at `pos`. `at_position` is false when a stop request
    /// had to take the vCPU between two synchronous exits (a guest that made
    /// none for [`STOP_GRACE`]), where its state belongs to no position.
    fn finish(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: StopReason,
        at_position: bool,
    ) -> Result<(), RunError>;
}

/// Hands the guest's outputs since the last call to `mode`: its complete
/// console lines and the frames it transmitted, and with `all` what it wrote
/// of its current line too (a run that stops does so, so that nothing the
/// guest printed is lost).
pub fn flush_outputs<M: Mode>(
    m: &mut Machine,
    mode: &mut M,
    pos: Position,
    all: bool,
) -> Result<(), RunError> {
    let console = m.vm.devices.serial.take_output();
    m.summary.console_bytes += console.len() as u64;
    m.console_line.extend_from_slice(&console);
    while let Some(end) = m
        .console_line
        .iter()
        .position(|b| *b == b'\n')
        .map(|i| i + 1)
        .or_else(|| (m.console_line.len() >= MAX_CONSOLE_LINE).then_some(MAX_CONSOLE_LINE))
        .or_else(|| (all && !m.console_line.is_empty()).then_some(m.console_line.len()))
    {
        let line: Vec<u8> = m.console_line.drain(..end).collect();
        m.summary.console_lines += 1;
        mode.output(m, pos, OutputKind::Console, &line)?;
    }
    if m.vm.devices.net.is_active() {
        let batch = m.vm.devices.net.pop_tx_frames(&m.vm.mem);
        m.summary.virtio_errors += batch.errors.len() as u64;
        for e in &batch.errors {
            tracing::debug!("guest transmit error: {e}");
        }
        for frame in &batch.frames {
            m.summary.frames_transmitted += 1;
            mode.output(m, pos, OutputKind::Transmit, frame)?;
        }
    }
    Ok(())
}

/// What one entry into the guest ended with.
enum Stepped {
    /// A synchronous exit: a position.
    Sync(Position, Action),
    /// A signal kick or another exit that is not a position.
    Between,
    /// The aimed breakpoint (a `hlt` exit one past it).
    Hit,
    /// A single step completed.
    Debug,
}

/// Enters the guest once and handles the exit; with `aim`, its breakpoint
/// or its step is in place, and undone after the exit.
fn step<M: Mode>(
    m: &mut Machine,
    mode: &mut M,
    mut aim: Option<&mut Aim>,
) -> Result<Stepped, RunError> {
    let stepped = enter(m, mode, aim.as_deref_mut());
    if let Some(aim) = aim {
        let interrupted_at = match stepped {
            Ok(Stepped::Between) => {
                aim.leave_trap_flag(m.vm);
                Some(m.regs().rip)
            }
            _ => None,
        };
        aim.end_step(&m.vm.vcpu, interrupted_at)?;
    }
    stepped
}

fn enter<M: Mode>(
    m: &mut Machine,
    mode: &mut M,
    mut aim: Option<&mut Aim>,
) -> Result<Stepped, RunError> {
    let now = mode.now_ns();
    // The exit's data borrows the vCPU, so it is handled first and the
    // registers (for the position) are read once that borrow ends.
    let mut pit_read = None;
    let mut msr_read = None;
    let mut trap_out = false;
    let mut debug_trap = false;
    let (kind, action) = 'exit: {
        let Vm {
            vcpu, devices, mem, ..
        } = &mut *m.vm;
        let result = vcpu.run();
        // Before anything looks at guest memory, whatever the exit.
        if let Some(aim) = aim.as_deref_mut() {
            aim.restore(mem);
        }
        let exit = match result {
            Ok(VcpuExit::X86Rdmsr(e)) => {
                msr_read = Some(e.index);
                break 'exit (ExitKind::Msr, Action::Resume);
            }
            // The guest cannot set its TSC on this platform either: a
            // write to a filtered MSR is dropped.
            Ok(VcpuExit::X86Wrmsr(_)) => break 'exit (ExitKind::Msr, Action::Resume),
            Ok(VcpuExit::IoIn(port, data)) => Exit::IoIn { port, data },
            Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut { port, data },
            Ok(VcpuExit::MmioRead(addr, data)) => Exit::MmioRead { addr, data },
            Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite { addr, data },
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Debug(_)) => return Ok(Stepped::Debug),
            Ok(VcpuExit::Intr) => {
                m.summary.exits.asynchronous += 1;
                return Ok(Stepped::Between);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                m.summary.exits.asynchronous += 1;
                return Ok(Stepped::Between);
            }
            Err(e) => return Err(RunError::Run(e)),
            Ok(VcpuExit::Shutdown) => {
                return Err(m.fault("KVM_EXIT_SHUTDOWN (triple fault)".into()))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so
                // `internal` is the union member KVM filled in.
                let suberror =
                    unsafe { m.vm.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Err(m.fault(format!(
                    "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}; on this platform often an instruction the CPL0 emulator cannot run, such as SSE)"
                )));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(m.fault(format!(
                    "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                )))
            }
            Ok(other) => {
                let described = format!("unexpected exit {other:?}");
                return Err(m.fault(described));
            }
        };
        let kind = exit.kind();
        trap_out = matches!(exit, Exit::IoOut { port, .. } if port == u16::from(TRAP_PORT));
        debug_trap = matches!(exit, Exit::IoOut { port, .. } if port == DEBUG_TRAP_PORT);
        let action = match exit {
            Exit::IoIn { port, data } if PIT_COUNTER_PORTS.contains(&port) => {
                let action = handle_exit(
                    devices,
                    mem,
                    now,
                    Exit::IoIn {
                        port,
                        data: &mut *data,
                    },
                );
                pit_read = Some((port, data.to_vec()));
                action
            }
            exit => handle_exit(devices, mem, now, exit),
        };
        (kind, action)
    };
    if let Some(aim) = aim {
        if debug_trap && aim.traps_through_guest() {
            match aim.trap(m.vm)? {
                Trapped::Hit => return Ok(Stepped::Hit),
                Trapped::Stepped => return Ok(Stepped::Debug),
                Trapped::Guest => {}
            }
        }
        if kind == ExitKind::Hlt && !aim.traps_through_guest() && aim.is_hit(m.regs().rip) {
            return Ok(Stepped::Hit);
        }
        aim.leave_trap_flag(m.vm);
    }
    let (pos, action) = synchronous(m, mode, kind, action, pit_read, msr_read, trap_out)?;
    Ok(Stepped::Sync(pos, action))
}

/// The work of a synchronous exit of `kind` before delivery: its position,
/// trapped instructions, time reads. `trap_out` says the exit was a write
/// to the trap port, which a patch site of a CPL3 workload makes.
fn synchronous<M: Mode>(
    m: &mut Machine,
    mode: &mut M,
    kind: ExitKind,
    action: Action,
    pit_read: Option<(u16, Vec<u8>)>,
    msr_read: Option<u32>,
    trap_out: bool,
) -> Result<(Position, Action), RunError> {
    let position = m.summary.exits.synchronous + 1;
    m.summary.exits.synchronous = position;
    let mut regs = m.regs();
    let pos = Position {
        exits: position,
        rip: regs.rip,
    };
    // This platform reports both exits with RIP past the instruction.
    let site = match kind {
        ExitKind::Hlt => Some(regs.rip.wrapping_sub(1)),
        ExitKind::Pio if trap_out => Some(regs.rip.wrapping_sub(TRAP_OUT_LEN)),
        _ => None,
    };
    if let Some(site) = site {
        let trapped = m.vm.patches.trapped_run(site);
        if !trapped.is_empty() {
            let counts = &mut m.summary.exits;
            counts.trapped += 1;
            counts.trapped_instructions += trapped.len() as u64;
            for site in trapped {
                let result = mode.trap(pos, site)?;
                emulate(&mut regs, site, result);
            }
            m.vm.vcpu.sync_regs_mut().regs = regs;
            m.vm.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
            return Ok((pos, Action::Resume));
        }
    }
    let counts = &mut m.summary.exits;
    match kind {
        ExitKind::Pio => counts.pio += 1,
        ExitKind::Mmio => counts.mmio += 1,
        ExitKind::Hlt => counts.hlt += 1,
        ExitKind::Msr => counts.msr += 1,
    }
    if let Some(msr) = msr_read {
        let value = mode.time_msr(pos, msr)?;
        m.vm.set_msr_data(value);
    }
    if let Some((port, mut data)) = pit_read {
        for byte in data.iter_mut() {
            *byte = mode.time_read(pos, port, *byte)?;
        }
        m.vm.set_io_in_data(&data);
    }
    Ok((pos, action))
}

/// What a hit of the aimed breakpoint turned out to be.
enum Hit {
    /// The recorded pass: the mode delivered there.
    Delivered,
    /// Another pass: the next entry steps over the instruction.
    Passed,
    /// Not the pass wanted, on a `hlt` of the guest's: its own exit.
    Sync(Position, Action),
}

fn at_breakpoint<M: Mode>(m: &mut Machine, mode: &mut M, aim: &mut Aim) -> Result<Hit, RunError> {
    m.summary.between.breakpoint_hits += 1;
    if aim.hit_in_user_mode() {
        m.summary.between.user_mode_hits += 1;
    }
    aim.rewind(m.vm)?;
    let at = Position {
        exits: m.summary.exits.synchronous,
        rip: aim.rip(),
    };
    if mode.at_aim(m, at, aim)? {
        m.summary.between.deliveries += 1;
        return Ok(Hit::Delivered);
    }
    if !aim.on_hlt() {
        return Ok(Hit::Passed);
    }
    aim.advance(m.vm)?;
    let (pos, action) = synchronous(m, mode, ExitKind::Hlt, Action::Idle, None, None, false)?;
    Ok(Hit::Sync(pos, action))
}

/// Where a run begins: at boot, or where a machine state was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Start {
    /// The synchronous exits before this run (the position of the cut);
    /// positions go on from there.
    pub exits: u64,
    /// What the guest had written of its current console line.
    pub console_line: Vec<u8>,
}

/// Runs the guest from boot until it powers off, fails, or `mode` stops it.
pub fn run<M: Mode>(
    vm: &mut Vm,
    mode: &mut M,
    stop: &StopSignal,
    hashing: bool,
) -> Result<RunSummary, RunError> {
    run_from(vm, mode, stop, hashing, Start::default())
}

/// Runs a guest whose state was restored at the synchronous exit
/// `start.exits` (or booted, with the default `Start`), as [`run`] does.
/// The summary's exit counts include the `start.exits` before it.
pub fn run_from<M: Mode>(
    vm: &mut Vm,
    mode: &mut M,
    stop: &StopSignal,
    hashing: bool,
    start: Start,
) -> Result<RunSummary, RunError> {
    let _guard = stop.enter_vcpu_thread().map_err(RunError::Thread)?;
    let started = Instant::now();
    let hasher = hashing.then(|| MemoryHasher::new(&vm.mem, vm.config.mem_size));
    if hashing {
        vm.take_dirty_pages()?;
    }
    let mut summary = RunSummary::default();
    summary.exits.synchronous = start.exits;
    let mut m = Machine {
        vm,
        hasher,
        summary,
        console_line: start.console_line,
    };
    let mut pos = Position {
        exits: start.exits,
        rip: m.regs().rip,
    };
    let mut at_position = true;
    let mut stop_seen: Option<Instant> = None;
    // The replay's aim (with the sequence number of the entry it is for),
    // and the kicker of a live run, started when it first wants a kick.
    let mut aim: Option<(u64, Aim)> = None;
    let mut kicker: Option<Kicker> = None;
    let reason = loop {
        if at_position {
            if let Some(reason) = mode.should_stop(&mut m, pos)? {
                break reason;
            }
            mode.resume(&mut m, pos)?;
        } else {
            if let Some(reason) = mode.should_stop_between(&mut m, pos)? {
                break reason;
            }
            if stop.is_requested()
                && stop_seen.get_or_insert_with(Instant::now).elapsed() > STOP_GRACE
            {
                break StopReason::RequestedBetweenExits;
            }
        }
        match (mode.kick_at(&mut m), &kicker) {
            (Some(at), Some(k)) => k.set(Some(at)),
            (Some(at), None) => {
                let k = Kicker::start().map_err(RunError::Thread)?;
                k.set(Some(at));
                kicker = Some(k);
            }
            (None, Some(k)) => k.set(None),
            (None, None) => {}
        }
        match mode.aim(&mut m, pos)? {
            Some((seq, _)) if aim.as_ref().is_some_and(|(s, _)| *s == seq) => {}
            Some((seq, rip)) => aim = Some((seq, Aim::new(m.vm, rip)?)),
            None => aim = None,
        }
        if let Some((_, a)) = &mut aim {
            a.before_entry(m.vm)?;
        }
        let (at, action) = match step(&mut m, mode, aim.as_mut().map(|(_, a)| a))? {
            Stepped::Sync(at, action) => (at, action),
            Stepped::Debug => {
                m.summary.between.single_steps += 1;
                at_position = false;
                continue;
            }
            Stepped::Between => {
                at_position = false;
                if aim.is_none() {
                    m.vm.clear_resume_flag();
                }
                if aim.is_none() && mode.due_between(&mut m) && can_take_interrupt(m.vm)? {
                    let at = Position {
                        exits: m.summary.exits.synchronous,
                        rip: m.regs().rip,
                    };
                    mode.deliver_between(&mut m, at)?;
                    m.summary.between.deliveries += 1;
                }
                continue;
            }
            Stepped::Hit => {
                let Some((_, a)) = &mut aim else {
                    return Err(VmError::Internal("a breakpoint hit without an aim").into());
                };
                match at_breakpoint(&mut m, mode, a)? {
                    Hit::Sync(at, action) => (at, action),
                    Hit::Delivered => {
                        aim = None;
                        at_position = false;
                        continue;
                    }
                    Hit::Passed => {
                        at_position = false;
                        continue;
                    }
                }
            }
        };
        at_position = true;
        pos = at;
        if let Action::GuestExit { code } = action {
            flush_outputs(&mut m, mode, pos, true)?;
            break if code == 0 {
                StopReason::PowerOff
            } else {
                StopReason::GuestError(code)
            };
        }
        flush_outputs(&mut m, mode, pos, false)?;
        mode.after_exit(&mut m, pos)?;
        let (ready, if_flag) = {
            let run = m.vm.vcpu.get_kvm_run();
            (
                run.ready_for_interrupt_injection != 0 && run.if_flag != 0,
                run.if_flag != 0,
            )
        };
        let mut injected = mode.deliver(&mut m, pos, ready)?;
        if action == Action::Idle && !injected {
            if !if_flag {
                return Err(RunError::DeadHalt { rip: pos.rip });
            }
            // The vCPU is out of KVM_RUN for as long as it idles.
            if let Some(k) = &kicker {
                k.set(None);
            }
            while !injected {
                if mode.should_stop(&mut m, pos)?.is_some() {
                    break;
                }
                mode.wait_idle(&mut m, pos)?;
                injected = mode.deliver(&mut m, pos, true)?;
            }
        }
    };
    flush_outputs(&mut m, mode, pos, true)?;
    mode.finish(&mut m, pos, reason, at_position)?;
    let mut summary = m.summary;
    summary.between.kicks = kicker.as_ref().map_or(0, Kicker::kicks);
    summary.reason = Some(reason);
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    summary.unknown_pio = m.vm.devices.unknown_pio;
    summary.unknown_mmio = m.vm.devices.unknown_mmio;
    Ok(summary)
}

impl Machine<'_> {
    /// Registers, the memory hash and the pages dirtied since the last digest.
    pub fn full_digest(&mut self, reason: DigestReason) -> Result<Digest, RunError> {
        let (regs, mem_hash) = self.state()?;
        let dirty_pages = self
            .hasher
            .as_mut()
            .map(|h| h.take_dirty())
            .unwrap_or_default();
        Ok(Digest {
            reason,
            regs,
            mem_hash,
            dirty_pages,
            output_hash: None,
        })
    }
}
