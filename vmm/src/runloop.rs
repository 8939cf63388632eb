//! The live run loop: `VcpuFd::run()`, the pure exit handler, and the
//! delivery rule of DESIGN.md §3. Interrupts and received packets reach the
//! guest only at a synchronous exit where it can take an interrupt, and the
//! count of synchronous exits is the guest's position.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use serde::Serialize;

use crate::exit::{handle_exit, Action, Exit, ExitKind};
use crate::net_backend::{Datagram, NetBackend};
use crate::stop::StopSignal;
use crate::vm::{Vm, VmError};

/// IRQ lines of the guest's devices (docs/guest-abi.md).
const TIMER_IRQ: u8 = 0;
const NET_IRQ: u8 = crate::devices::virtio_net::NET_IRQ;
/// Datagrams held while the guest has no free receive buffer.
const MAX_PENDING_DATAGRAMS: usize = 1024;

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
    #[error("the guest executed hlt with interrupts disabled at RIP {rip:#x}: it can never wake up")]
    DeadHalt { rip: u64 },
    #[error("cannot prepare the vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// Why a run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "code")]
pub enum StopReason {
    /// The guest wrote 0 to the exit port.
    PowerOff,
    /// The guest wrote this non-zero code to the exit port.
    GuestError(u32),
    /// Someone asked the VMM to stop (SIGINT, SIGTERM, a caller).
    Requested,
    /// The run's time limit passed.
    Timeout,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ExitCounts {
    /// All synchronous exits: the guest's position.
    pub synchronous: u64,
    pub pio: u64,
    pub mmio: u64,
    pub hlt: u64,
    /// Signal kicks and other exits that are not positions.
    pub asynchronous: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub reason: StopReason,
    pub elapsed_secs: f64,
    pub exits: ExitCounts,
    pub interrupts_injected: u64,
    pub timer_irqs: u64,
    pub packets_delivered: u64,
    pub frames_transmitted: u64,
    pub console_bytes: u64,
    pub datagrams_received: u64,
    pub datagrams_dropped: u64,
    pub tx_frames_unparseable: u64,
    pub virtio_errors: u64,
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
}

/// The outside world of a live run.
pub struct LiveIo {
    pub net: Option<NetBackend>,
    pub console: Box<dyn Write + Send>,
}

pub struct RunLimits {
    pub stop: StopSignal,
    pub timeout: Option<Duration>,
}

struct Loop<'a> {
    vm: &'a mut Vm,
    io: &'a mut LiveIo,
    start: Instant,
    deadline: Option<Instant>,
    stop: &'a StopSignal,
    pending: VecDeque<Datagram>,
    summary: RunSummary,
}

impl Loop<'_> {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn instant_at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }

    /// Moves what the guest produced at this exit to the outside world.
    fn flush_outputs(&mut self) {
        let console = self.vm.devices.serial.take_output();
        if !console.is_empty() {
            self.summary.console_bytes += console.len() as u64;
            if let Err(e) = self.io.console.write_all(&console).and_then(|_| self.io.console.flush()) {
                tracing::warn!("writing the guest console failed: {e}");
            }
        }
        if self.vm.devices.net.is_active() {
            let batch = self.vm.devices.net.pop_tx_frames(&self.vm.mem);
            self.summary.virtio_errors += batch.errors.len() as u64;
            for e in &batch.errors {
                tracing::debug!("guest transmit error: {e}");
            }
            for frame in &batch.frames {
                self.summary.frames_transmitted += 1;
                if let Some(net) = &self.io.net {
                    net.transmit(frame);
                }
            }
        }
    }

    fn collect_datagrams(&mut self) {
        let Some(net) = &self.io.net else { return };
        while self.pending.len() < MAX_PENDING_DATAGRAMS {
            match net.incoming().try_recv() {
                Ok(d) => self.pending.push_back(d),
                Err(_) => break,
            }
        }
    }

    /// At an exit where the guest can take an interrupt: hand it every
    /// waiting datagram it has buffers for, then the highest-priority
    /// interrupt. Returns whether an interrupt was injected.
    fn deliver(&mut self) -> Result<bool, RunError> {
        let now = self.now_ns();
        if self.vm.devices.pit.poll_irq0(now) {
            self.summary.timer_irqs += 1;
            self.vm.devices.pic.raise_irq(TIMER_IRQ);
        }
        self.collect_datagrams();
        while !self.pending.is_empty() && self.vm.devices.net.rx_buffers_available(&self.vm.mem) > 0 {
            let Some(datagram) = self.pending.pop_front() else { break };
            let frame = match datagram.to_frame() {
                Ok(f) => f,
                Err(e) => {
                    self.summary.datagrams_dropped += 1;
                    tracing::debug!("datagram from {} not deliverable: {e}", datagram.from);
                    continue;
                }
            };
            match self.vm.devices.net.deliver_rx(&self.vm.mem, &frame) {
                Ok(_) => self.summary.packets_delivered += 1,
                Err(e) => {
                    self.summary.datagrams_dropped += 1;
                    tracing::debug!("receive delivery failed: {e}");
                }
            }
        }
        if self.vm.devices.net.take_irq() {
            self.vm.devices.pic.raise_irq(NET_IRQ);
        }
        if self.vm.devices.serial.irq_pending() {
            self.vm.devices.pic.raise_irq(crate::boot::SERIAL_IRQ as u8);
        }
        match self.vm.devices.pic.acknowledge() {
            Some(vector) => {
                self.vm.inject(vector)?;
                self.summary.interrupts_injected += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The guest is halted with interrupts enabled and nothing to inject:
    /// sleep until a datagram, the next timer tick, a stop request or the
    /// deadline.
    fn wait_idle(&mut self) {
        let _ = self.io.console.flush();
        let mut wake_at = self.vm.devices.pit.next_irq0_ns().map(|ns| self.instant_at(ns));
        if let Some(deadline) = self.deadline {
            wake_at = Some(wake_at.map_or(deadline, |w| w.min(deadline)));
        }
        let timeout = wake_at.map(|w| w.saturating_duration_since(Instant::now()));
        let never = crossbeam_channel::never();
        let incoming = self.io.net.as_ref().map_or(&never, |n| n.incoming());
        let stop = self.stop.wake();
        let timeout_chan = match timeout {
            Some(t) => crossbeam_channel::after(t),
            None => crossbeam_channel::never(),
        };
        crossbeam_channel::select! {
            recv(incoming) -> d => {
                if let Ok(d) = d {
                    self.pending.push_back(d);
                }
            }
            recv(stop) -> _ => {}
            recv(timeout_chan) -> _ => {}
        }
    }

    fn should_stop(&self) -> Option<StopReason> {
        if self.stop.is_requested() {
            return Some(StopReason::Requested);
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => Some(StopReason::Timeout),
            _ => None,
        }
    }

    fn fault(&self, exit: String) -> RunError {
        let (rip, bytes) = self.vm.code_at_rip();
        let code = if bytes.is_empty() {
            "unreadable".to_string()
        } else {
            bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
        };
        RunError::GuestFault {
            exit,
            rip,
            code,
            position: self.summary.exits.synchronous,
        }
    }

    fn run(&mut self) -> Result<StopReason, RunError> {
        loop {
            if let Some(reason) = self.should_stop() {
                return Ok(reason);
            }
            let now = self.now_ns();
            let action = {
                let Vm { vcpu, devices, mem, .. } = &mut *self.vm;
                let exit = match vcpu.run() {
                    Ok(VcpuExit::IoIn(port, data)) => Exit::IoIn { port, data },
                    Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut { port, data },
                    Ok(VcpuExit::MmioRead(addr, data)) => Exit::MmioRead { addr, data },
                    Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite { addr, data },
                    Ok(VcpuExit::Hlt) => Exit::Hlt,
                    Ok(VcpuExit::Intr) => {
                        self.summary.exits.asynchronous += 1;
                        continue;
                    }
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        self.summary.exits.asynchronous += 1;
                        continue;
                    }
                    Err(e) => return Err(RunError::Run(e)),
                    Ok(VcpuExit::Shutdown) => {
                        return Err(self.fault("KVM_EXIT_SHUTDOWN (triple fault)".into()));
                    }
                    Ok(VcpuExit::InternalError) => {
                        let suberror = {
                            let run = self.vm.vcpu.get_kvm_run();
                            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR,
                            // so `internal` is the union member KVM filled in.
                            unsafe { run.__bindgen_anon_1.internal.suberror }
                        };
                        return Err(self.fault(format!(
                            "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}; on this platform often an instruction the CPL0 emulator cannot run, such as SSE)"
                        )));
                    }
                    Ok(VcpuExit::FailEntry(reason, cpu)) => {
                        return Err(self.fault(format!(
                            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                        )));
                    }
                    Ok(other) => {
                        let described = format!("unexpected exit {other:?}");
                        return Err(self.fault(described));
                    }
                };
                let counts = &mut self.summary.exits;
                counts.synchronous += 1;
                match exit.kind() {
                    ExitKind::Pio => counts.pio += 1,
                    ExitKind::Mmio => counts.mmio += 1,
                    ExitKind::Hlt => counts.hlt += 1,
                }
                handle_exit(devices, mem, now, exit)
            };
            self.flush_outputs();
            match action {
                Action::GuestExit { code: 0 } => return Ok(StopReason::PowerOff),
                Action::GuestExit { code } => return Ok(StopReason::GuestError(code)),
                Action::Resume | Action::Idle => {}
            }
            let (ready, if_flag) = {
                let run = self.vm.vcpu.get_kvm_run();
                (run.ready_for_interrupt_injection != 0, run.if_flag != 0)
            };
            let mut injected = if ready { self.deliver()? } else { false };
            if action == Action::Idle {
                if !if_flag {
                    let (rip, _) = self.vm.code_at_rip();
                    return Err(RunError::DeadHalt { rip });
                }
                while !injected {
                    if let Some(reason) = self.should_stop() {
                        return Ok(reason);
                    }
                    self.wait_idle();
                    injected = self.deliver()?;
                }
            }
        }
    }
}

/// Runs the guest until it powers off, fails, times out or is stopped.
pub fn run_live(vm: &mut Vm, io: &mut LiveIo, limits: &RunLimits) -> Result<RunSummary, RunError> {
    let _guard = limits.stop.enter_vcpu_thread().map_err(RunError::Thread)?;
    let start = Instant::now();
    let mut lp = Loop {
        vm,
        io,
        start,
        deadline: limits.timeout.map(|t| start + t),
        stop: &limits.stop,
        pending: VecDeque::new(),
        summary: RunSummary {
            reason: StopReason::Requested,
            elapsed_secs: 0.0,
            exits: ExitCounts::default(),
            interrupts_injected: 0,
            timer_irqs: 0,
            packets_delivered: 0,
            frames_transmitted: 0,
            console_bytes: 0,
            datagrams_received: 0,
            datagrams_dropped: 0,
            tx_frames_unparseable: 0,
            virtio_errors: 0,
            unknown_pio: 0,
            unknown_mmio: 0,
        },
    };
    let result = lp.run();
    let _ = lp.io.console.flush();
    let reason = result?;
    let mut summary = lp.summary;
    summary.reason = reason;
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    summary.unknown_pio = lp.vm.devices.unknown_pio;
    summary.unknown_mmio = lp.vm.devices.unknown_mmio;
    if let Some(net) = &lp.io.net {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &net.counters;
        summary.datagrams_received = c.received.load(Relaxed);
        summary.datagrams_dropped += c.dropped_full.load(Relaxed) + c.dropped_unusable.load(Relaxed);
        summary.tx_frames_unparseable = c.tx_unparseable.load(Relaxed);
    }
    Ok(summary)
}
