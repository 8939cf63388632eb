//! A live run: host time, the host's random numbers, the network and the
//! console. With a [`Recorder`] it is a recording: every nondeterministic
//! input goes into the log at the position where the guest took it.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use logchannel::{Digest, DigestReason, Event, OutputKind, Position};

use crate::capture::Capture;
use crate::devices::virtio_net::VirtioNetError;
use crate::digest;
use crate::net_backend::{Datagram, NetBackend};
use crate::patch::TrapResult;
use crate::record::Recorder;
use crate::runloop::{Machine, Mode, RunError, StopReason, TIMER_IRQ};
use crate::scan::{NondetKind, NondetSite};
use crate::stop::StopSignal;

/// Datagrams held while the guest has no free receive buffer.
const MAX_PENDING_DATAGRAMS: usize = 1024;

/// The outside world of a live run.
pub struct LiveIo {
    pub net: Option<NetBackend>,
    pub console: Box<dyn Write + Send>,
    pub capture: Option<Capture>,
}

pub struct Live<'a> {
    io: &'a mut LiveIo,
    recorder: Option<Recorder>,
    start: Instant,
    deadline: Option<Instant>,
    stop: StopSignal,
    pending: VecDeque<Datagram>,
}

impl<'a> Live<'a> {
    pub fn new(
        io: &'a mut LiveIo,
        recorder: Option<Recorder>,
        stop: StopSignal,
        timeout: Option<Duration>,
    ) -> Self {
        let start = Instant::now();
        Live {
            io,
            recorder,
            start,
            deadline: timeout.map(|t| start + t),
            stop,
            pending: VecDeque::new(),
        }
    }

    /// The recorder back, to close its log.
    pub fn into_recorder(self) -> Option<Recorder> {
        self.recorder
    }

    fn log(&mut self, pos: Position, event: Event) -> Result<(), RunError> {
        if let Some(r) = &mut self.recorder {
            r.log(pos, event)?;
        }
        Ok(())
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

    fn host_random() -> u64 {
        rand::random()
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

impl Mode for Live<'_> {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
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
        // SAFETY: rdtsc has no preconditions; this VMM only runs on x86_64.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        let (result, event) = match site.kind {
            NondetKind::Rdtsc => (
                TrapResult {
                    value: tsc,
                    aux: 0,
                    ok: true,
                },
                Event::Rdtsc { value: tsc },
            ),
            // The guest never writes IA32_TSC_AUX, which stays 0.
            NondetKind::Rdtscp => (
                TrapResult {
                    value: tsc,
                    aux: 0,
                    ok: true,
                },
                Event::Rdtscp { value: tsc, aux: 0 },
            ),
            NondetKind::Rdrand => {
                let value = Self::host_random();
                (
                    TrapResult {
                        value,
                        aux: 0,
                        ok: true,
                    },
                    Event::Rdrand { value, ok: true },
                )
            }
            NondetKind::Rdseed => {
                let value = Self::host_random();
                (
                    TrapResult {
                        value,
                        aux: 0,
                        ok: true,
                    },
                    Event::Rdseed { value, ok: true },
                )
            }
        };
        self.log(pos, event)?;
        Ok(result)
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
        if self.recorder.is_some() {
            let (regs, mem_hash) = m.state()?;
            self.log(
                pos,
                Event::Output {
                    kind,
                    hash: digest::output_hash(bytes),
                    state: digest::state_hash(&regs, mem_hash),
                },
            )?;
        }
        match kind {
            OutputKind::Console => {
                if let Err(e) = self
                    .io
                    .console
                    .write_all(bytes)
                    .and_then(|_| self.io.console.flush())
                {
                    tracing::warn!("writing the guest console failed: {e}");
                }
            }
            OutputKind::Transmit => {
                if let Some(c) = &mut self.io.capture {
                    c.write(bytes).map_err(RunError::Capture)?;
                }
                if let Some(net) = &self.io.net {
                    net.transmit(bytes);
                }
            }
        }
        Ok(())
    }

    fn after_exit(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        let due = match &self.recorder {
            Some(r) => r.digest_due(pos),
            None => false,
        };
        if due {
            let digest = full_digest(m, DigestReason::Periodic)?;
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
                    crate::replay::FAILED_DELIVERY
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

    fn wait_idle(&mut self, m: &mut Machine, _pos: Position) -> Result<(), RunError> {
        let _ = self.io.console.flush();
        if let Some(r) = &mut self.recorder {
            r.flush()?;
        }
        let now = self.now_ns();
        let mut wake_at =
            m.vm.devices
                .pit
                .next_irq0_ns()
                .map(|ns| self.start + Duration::from_nanos(ns.max(now)));
        if let Some(deadline) = self.deadline {
            wake_at = Some(wake_at.map_or(deadline, |w| w.min(deadline)));
        }
        let never = crossbeam_channel::never();
        let incoming = self.io.net.as_ref().map_or(&never, |n| n.incoming());
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
        if let Some(c) = &mut self.io.capture {
            c.flush().map_err(RunError::Capture)?;
        }
        let _ = self.io.console.flush();
        if self.recorder.is_some() {
            if at_position {
                let digest = full_digest(m, DigestReason::End)?;
                self.log(pos, Event::Digest(digest))?;
            }
            if let Some(r) = &mut self.recorder {
                r.end(pos, reason)?;
            }
        }
        if let Some(net) = &self.io.net {
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

/// Registers, the memory hash and the pages dirtied since the last digest.
pub fn full_digest(m: &mut Machine, reason: DigestReason) -> Result<Digest, RunError> {
    let (regs, mem_hash) = m.state()?;
    let dirty_pages = m
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
