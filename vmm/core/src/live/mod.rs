//! A live run: host time, the host's random numbers, the network and the
//! console. With an [`EntrySink`] every nondeterministic input goes into a
//! log at the position where the guest took it: a file (`ftvm record`) or
//! the log channel to a backup (`ftvm primary`).

pub mod record;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use logchannel::{DigestReason, Event, OutputKind, Position};

use crate::devices::virtio_net::VirtioNetError;
use crate::host::emitter::Emitter;
use crate::host::events::StatusBoard;
use crate::host::net_backend::{Datagram, NetBackend};
use crate::machine::patch::TrapResult;
use crate::machine::scan::{NondetKind, NondetSite};
use crate::run::digest;
use crate::run::precise::regs_hash;
use crate::run::run_loop::{Machine, Mode, RunError, StopReason, TIMER_IRQ};
use crate::run::stop::StopSignal;

/// Datagrams held while the guest has no free receive buffer.
const MAX_PENDING_DATAGRAMS: usize = 1024;
/// How long a guest with the network may compute without a synchronous exit
/// before it is kicked to look for datagrams to deliver between two exits.
const DATAGRAM_KICK: Duration = Duration::from_millis(2);

/// Where a live run's log entries go.
pub trait EntrySink: Send {
    /// Appends an entry; returns its sequence number.
    fn log(&mut self, pos: Position, event: Event) -> Result<u64, RunError>;
    fn digest_due(&self, pos: Position) -> bool;
    /// Whether output checks bring the memory hash up to date.
    fn output_memory(&self) -> bool {
        false
    }
    /// Everything at exits up to `pos` has been logged and the guest is
    /// about to run again (progress marks, flow control, failure checks).
    fn resume(&mut self, _pos: Position) -> Result<(), RunError> {
        Ok(())
    }
    /// The guest is idle; a good moment to push buffered entries out.
    fn flush(&mut self) -> Result<(), RunError>;
    fn end(&mut self, pos: Position, reason: StopReason) -> Result<(), RunError>;
    /// The run failed: close what can be closed, so that what was logged
    /// stays readable.
    fn abort(&mut self, _why: &str) -> Result<(), RunError> {
        Ok(())
    }
    /// A line for the user about what was logged.
    fn report(&self) -> Option<String> {
        None
    }
}

/// How a live run's outputs leave: at once (an [`Emitter`]), or through the
/// primary's gate that holds them until the backup has acknowledged them.
pub trait Outputs: Send {
    /// Takes the output logged as entry `seq` (0: not logged).
    fn submit(&mut self, seq: u64, kind: OutputKind, bytes: &[u8]) -> std::io::Result<()>;
    /// Releases or drops what is still held and hands back the emitter.
    fn finish(self: Box<Self>) -> Option<Emitter>;
}

impl Outputs for Emitter {
    fn submit(&mut self, _seq: u64, kind: OutputKind, bytes: &[u8]) -> std::io::Result<()> {
        self.emit(kind, bytes)
    }

    fn finish(self: Box<Self>) -> Option<Emitter> {
        Some(*self)
    }
}

pub struct Live {
    net: Option<Arc<NetBackend>>,
    outputs: Option<Box<dyn Outputs>>,
    sink: Option<Box<dyn EntrySink>>,
    start: Instant,
    /// The device clock at `start`: 0 from boot, the primary's clock at the
    /// cut for a backup that goes live after replaying from a transferred
    /// state, so that PIT counters (`since_ns` in this clock) run on.
    base_ns: u64,
    deadline: Option<Instant>,
    stop: StopSignal,
    pending: VecDeque<Datagram>,
    board: Option<Arc<StatusBoard>>,
    /// The last synchronous exit, or delivery between two: a timer tick
    /// waits for a kick only once the guest has made no exit for a tick.
    last_exit: Instant,
    /// The `async-point` entry that goes before the first entry logged at
    /// a delivery between two exits.
    point: Option<Event>,
}

impl Live {
    pub fn new(
        net: Option<Arc<NetBackend>>,
        outputs: Box<dyn Outputs>,
        sink: Option<Box<dyn EntrySink>>,
        stop: StopSignal,
        timeout: Option<Duration>,
    ) -> Self {
        let start = Instant::now();
        Live {
            net,
            outputs: Some(outputs),
            sink,
            start,
            base_ns: 0,
            deadline: timeout.map(|t| start + t),
            stop,
            pending: VecDeque::new(),
            board: None,
            last_exit: start,
            point: None,
        }
    }

    /// Reports the guest's progress on `board`.
    pub fn with_board(mut self, board: Arc<StatusBoard>) -> Self {
        self.board = Some(board);
        self
    }

    /// A device clock that reads `base_ns` now and runs on from there.
    pub fn with_clock(mut self, base_ns: u64) -> Self {
        self.base_ns = base_ns;
        self
    }

    /// Starts with `datagrams` waiting for the guest, ahead of any the
    /// network brings.
    pub fn with_datagrams(mut self, datagrams: Vec<Datagram>) -> Self {
        self.pending = datagrams.into();
        self
    }

    /// The device clock: what the devices see as now.
    pub fn clock_ns(&self) -> u64 {
        self.base_ns
            .saturating_add(self.start.elapsed().as_nanos() as u64)
    }

    /// The datagrams this run holds and has not delivered yet (not those
    /// still queued in the network backend, which it has not taken).
    pub fn pending_datagrams(&self) -> Vec<Datagram> {
        self.pending.iter().cloned().collect()
    }

    /// The host instant at which the device clock reads `ns`.
    fn instant_at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns.saturating_sub(self.base_ns))
    }

    pub fn sink_mut(&mut self) -> Option<&mut (dyn EntrySink + 'static)> {
        self.sink.as_deref_mut()
    }

    fn log(&mut self, pos: Position, event: Event) -> Result<Option<u64>, RunError> {
        match &mut self.sink {
            Some(s) => {
                if let Some(point) = self.point.take() {
                    s.log(pos, point)?;
                }
                s.log(pos, event).map(Some)
            }
            None => Ok(None),
        }
    }

    fn collect_datagrams(&mut self) {
        let Some(net) = &self.net else { return };
        while self.pending.len() < MAX_PENDING_DATAGRAMS {
            match net.incoming().try_recv() {
                Ok(d) => self.pending.push_back(d),
                Err(_) => break,
            }
        }
    }

    /// Releases every output still held and flushes the emitter.
    fn close_outputs(&mut self) -> Result<(), RunError> {
        let emitter = self.outputs.take().and_then(|o| o.finish());
        if let Some(mut e) = emitter {
            e.flush().map_err(RunError::Capture)?;
        }
        Ok(())
    }
}

/// Errors of `deliver_rx` that left the device and memory untouched; any
/// other outcome changed guest state and must be logged like a delivery.
fn delivery_changed_nothing(e: &VirtioNetError) -> bool {
    matches!(
        e,
        VirtioNetError::NotActive
            | VirtioNetError::NoRxBuffer
            | VirtioNetError::FrameTooLong { .. }
    )
}

fn host_result(kind: NondetKind) -> (TrapResult, Event) {
    // SAFETY: rdtsc has no preconditions; this VMM only runs on x86_64.
    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
    let random: u64 = rand::random();
    let ok = |value| TrapResult {
        value,
        aux: 0,
        ok: true,
    };
    match kind {
        NondetKind::Rdtsc => (ok(tsc), Event::Rdtsc { value: tsc }),
        // The guest never writes IA32_TSC_AUX, which stays 0.
        NondetKind::Rdtscp => (ok(tsc), Event::Rdtscp { value: tsc, aux: 0 }),
        NondetKind::Rdrand => (
            ok(random),
            Event::Rdrand {
                value: random,
                ok: true,
            },
        ),
        NondetKind::Rdseed => (
            ok(random),
            Event::Rdseed {
                value: random,
                ok: true,
            },
        ),
    }
}

impl Mode for Live {
    fn now_ns(&self) -> u64 {
        self.clock_ns()
    }

    fn should_stop(
        &mut self,
        _m: &mut Machine,
        _pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        if self.stop.is_requested() {
            return Ok(Some(StopReason::Requested));
        }
        Ok(match self.deadline {
            Some(d) if Instant::now() >= d => Some(StopReason::Timeout),
            _ => None,
        })
    }

    fn trap(&mut self, pos: Position, site: &NondetSite) -> Result<TrapResult, RunError> {
        let (result, event) = host_result(site.kind);
        self.log(pos, event)?;
        Ok(result)
    }

    fn time_msr(&mut self, pos: Position, msr: u32) -> Result<u64, RunError> {
        // SAFETY: rdtsc has no preconditions; this VMM only runs on x86_64.
        let value = unsafe { core::arch::x86_64::_rdtsc() };
        self.log(pos, Event::Rdmsr { msr, value })?;
        Ok(value)
    }

    fn time_read(&mut self, pos: Position, port: u16, value: u8) -> Result<u8, RunError> {
        self.log(pos, Event::PitRead { port, value })?;
        Ok(value)
    }

    fn output(
        &mut self,
        m: &mut Machine,
        pos: Position,
        kind: OutputKind,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        let mut seq = 0;
        if let Some(sink) = &self.sink {
            let (regs, mem_hash) = m.output_state(sink.output_memory())?;
            let check = Event::Output {
                kind,
                hash: digest::output_hash(bytes),
                state: digest::state_hash(&regs, mem_hash),
            };
            seq = self.log(pos, check)?.unwrap_or(0);
        }
        if let Some(outputs) = &mut self.outputs {
            outputs
                .submit(seq, kind, bytes)
                .map_err(RunError::Capture)?;
        }
        Ok(())
    }

    fn after_exit(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        if self.sink.as_ref().is_some_and(|s| s.digest_due(pos)) {
            let digest = m.full_digest(DigestReason::Periodic)?;
            self.log(pos, Event::Digest(digest))?;
        }
        Ok(())
    }

    fn deliver(&mut self, m: &mut Machine, pos: Position, ready: bool) -> Result<bool, RunError> {
        if !ready {
            return Ok(false);
        }
        if m.vm.devices.pit.poll_irq0(self.now_ns()) {
            m.summary.timer_irqs += 1;
            m.vm.devices.pic.raise_irq(TIMER_IRQ);
        }
        self.collect_datagrams();
        while !self.pending.is_empty() && m.vm.devices.net.rx_buffers_available(&m.vm.mem) > 0 {
            let Some(datagram) = self.pending.pop_front() else {
                break;
            };
            let frame = match datagram.to_frame() {
                Ok(f) => f,
                Err(e) => {
                    m.summary.datagrams_dropped += 1;
                    tracing::debug!("datagram from {} not deliverable: {e}", datagram.from);
                    continue;
                }
            };
            let head = match m.vm.devices.net.deliver_rx(&m.vm.mem, &frame) {
                Ok(placed) => {
                    m.summary.packets_delivered += 1;
                    placed.head
                }
                Err(e) if delivery_changed_nothing(&e) => {
                    m.summary.datagrams_dropped += 1;
                    continue;
                }
                Err(e) => {
                    m.summary.datagrams_dropped += 1;
                    tracing::debug!("receive delivery consumed a buffer but failed: {e}");
                    crate::run::divergence::FAILED_DELIVERY
                }
            };
            self.log(
                pos,
                Event::Packet {
                    desc_head: head,
                    frame,
                },
            )?;
        }
        m.raise_device_irqs();
        match m.inject_pending()? {
            Some(vector) => {
                self.log(pos, Event::Interrupt { vector })?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn kick_at(&mut self, m: &mut Machine) -> Option<Instant> {
        let tick = Duration::from_nanos(1_000_000_000 / u64::from(m.vm.config.tick_hz.max(1)));
        let timer =
            m.vm.devices
                .pit
                .next_irq0_ns()
                .map(|ns| self.instant_at(ns).max(self.last_exit + tick));
        let datagrams = self.net.as_ref().map(|_| self.last_exit + DATAGRAM_KICK);
        match (timer, datagrams) {
            (Some(t), Some(d)) => Some(t.min(d)),
            (t, d) => t.or(d),
        }
    }

    fn due_between(&mut self, m: &mut Machine) -> bool {
        let now = self.now_ns();
        if m.vm.devices.pit.next_irq0_ns().is_some_and(|at| at <= now) {
            return true;
        }
        self.collect_datagrams();
        !self.pending.is_empty() && m.vm.devices.net.rx_buffers_available(&m.vm.mem) > 0
    }

    fn deliver_between(&mut self, m: &mut Machine, at: Position) -> Result<bool, RunError> {
        if self.sink.is_some() {
            let (regs, mem) = m.state()?;
            self.point = Some(Event::AsyncPoint {
                regs: regs_hash(&regs),
                mem,
            });
        }
        self.last_exit = Instant::now();
        let injected = self.deliver(m, at, true);
        self.point = None;
        injected
    }

    fn resume(&mut self, _m: &mut Machine, pos: Position) -> Result<(), RunError> {
        self.last_exit = Instant::now();
        if let Some(b) = &self.board {
            b.exits
                .store(pos.exits, std::sync::atomic::Ordering::Relaxed);
        }
        match &mut self.sink {
            Some(s) => s.resume(pos),
            None => Ok(()),
        }
    }

    fn wait_idle(&mut self, m: &mut Machine, _pos: Position) -> Result<(), RunError> {
        if let Some(s) = &mut self.sink {
            s.flush()?;
        }
        let now = self.now_ns();
        let mut wake_at =
            m.vm.devices
                .pit
                .next_irq0_ns()
                .map(|ns| self.instant_at(ns.max(now)));
        if let Some(deadline) = self.deadline {
            wake_at = Some(wake_at.map_or(deadline, |w| w.min(deadline)));
        }
        let never = crossbeam_channel::never();
        let incoming = self.net.as_ref().map_or(&never, |n| n.incoming());
        let timeout = match wake_at {
            Some(w) => crossbeam_channel::at(w),
            None => crossbeam_channel::never(),
        };
        crossbeam_channel::select! {
            recv(incoming) -> d => {
                if let Ok(d) = d {
                    self.pending.push_back(d);
                }
            }
            recv(self.stop.wake()) -> _ => {}
            recv(timeout) -> _ => {}
        }
        Ok(())
    }

    fn finish(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: StopReason,
        at_position: bool,
    ) -> Result<(), RunError> {
        // Taken between two exits, the state belongs to no position a
        // replay could compare it at; the `end` entry's reason
        // (`RequestedBetweenExits`) tells the replay why no digest is there.
        if self.sink.is_some() && at_position {
            let digest = m.full_digest(DigestReason::End)?;
            self.log(pos, Event::Digest(digest))?;
        }
        if let Some(s) = &mut self.sink {
            s.end(pos, reason)?;
        }
        self.close_outputs()?;
        if let Some(net) = &self.net {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &net.counters;
            m.summary.datagrams_received = c.received.load(Relaxed);
            m.summary.datagrams_dropped +=
                c.dropped_full.load(Relaxed) + c.dropped_unusable.load(Relaxed);
            m.summary.tx_frames_unparseable = c.tx_unparseable.load(Relaxed);
        }
        Ok(())
    }
}
