//! Replay: the guest runs from the log alone (no network, no host time, no
//! host randomness), and every digest and output is checked against the
//! recording. The first mismatch stops the replay with a [`Divergence`]
//! that names the entry, the position, what was expected and what was found.

use std::fmt;
use std::io::{Read, Write};

use logchannel::{Digest, DigestReason, Entry, Event, LogReader, OutputKind, Position, Registers};
use serde::Serialize;

use crate::host::capture::Capture;
use crate::machine::patch::TrapResult;
use crate::machine::scan::{NondetKind, NondetSite};
use crate::run::digest;
use crate::run::divergence::{Divergence, FAILED_DELIVERY};
use crate::run::run_loop::{Machine, Mode, RunError, StopReason};
use crate::run::stop::StopSignal;

#[derive(Debug, Default, Clone, Serialize)]
pub struct ReplayCounts {
    pub entries_applied: u64,
    pub digests_checked: u64,
    pub outputs_reproduced: u64,
    pub packets_delivered: u64,
    pub interrupts_injected: u64,
    pub traps_emulated: u64,
}

/// Where a replay's entries come from.
pub trait LogSource {
    /// The next entry, without taking it. `None` when the log holds nothing
    /// more at exits up to `exits`: a file at its end, a channel once the
    /// primary has declared its log complete past `exits`. A channel waits
    /// until it knows, and fails with [`RunError::PeerFailed`] if the
    /// primary falls silent first.
    fn peek(&mut self, exits: u64) -> Result<Option<&Entry>, RunError>;
    /// Takes the entry `peek` returned.
    fn take(&mut self) -> Option<Entry>;
    /// Whether the log can never grow (a file).
    fn finite(&self) -> bool;
    /// The replay has applied everything up to `seq`, at exit `exits`.
    fn applied(&mut self, _seq: u64, _exits: u64) {}
}

/// A log file.
pub struct FileSource<R: Read> {
    reader: LogReader<R>,
    next: Option<Entry>,
}

impl<R: Read> FileSource<R> {
    pub fn new(reader: LogReader<R>) -> Self {
        FileSource { reader, next: None }
    }

    pub fn reader(&self) -> &LogReader<R> {
        &self.reader
    }
}

impl<R: Read> LogSource for FileSource<R> {
    fn peek(&mut self, _exits: u64) -> Result<Option<&Entry>, RunError> {
        if self.next.is_none() {
            self.next = match self.reader.next() {
                Some(Ok(e)) => Some(e),
                Some(Err(e)) => return Err(RunError::LogRead(e)),
                None => None,
            };
        }
        Ok(self.next.as_ref())
    }

    fn take(&mut self) -> Option<Entry> {
        self.next.take()
    }

    fn finite(&self) -> bool {
        true
    }
}

pub struct Replay<S: LogSource> {
    pub source: S,
    digest_interval: u64,
    output_memory: bool,
    last_matched: Option<(u64, Position)>,
    console: Box<dyn Write + Send>,
    capture: Option<Capture>,
    stop: StopSignal,
    end_seen: bool,
    pub counts: ReplayCounts,
}

impl<S: LogSource> Replay<S> {
    pub fn new(
        source: S,
        digest_interval: u64,
        output_memory: bool,
        console: Box<dyn Write + Send>,
        capture: Option<Capture>,
        stop: StopSignal,
    ) -> Self {
        Replay {
            source,
            digest_interval,
            output_memory,
            last_matched: None,
            console,
            capture,
            stop,
            end_seen: false,
            counts: ReplayCounts::default(),
        }
    }

    fn peek_entry(&mut self, exits: u64) -> Result<Option<Entry>, RunError> {
        Ok(self.source.peek(exits)?.cloned())
    }

    fn diverge(
        &mut self,
        found_pos: Position,
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> RunError {
        let entry = self.source.peek(found_pos.exits).ok().flatten().cloned();
        RunError::Diverged(Box::new(Divergence {
            entry,
            found_pos,
            what: what.into(),
            expected: expected.into(),
            found: found.into(),
            registers: Vec::new(),
            first_differing_page: None,
            last_matched: self.last_matched,
        }))
    }

    /// The next entry's event, if it is at exit `pos`.
    fn event_at(&mut self, pos: Position) -> Result<Option<Event>, RunError> {
        Ok(self
            .source
            .peek(pos.exits)?
            .filter(|e| e.pos.exits == pos.exits)
            .map(|e| e.event.clone()))
    }

    /// Takes the next entry, which must be at `pos` and satisfy `wanted`.
    fn expect(
        &mut self,
        pos: Position,
        what: &str,
        wanted: impl Fn(&Event) -> bool,
    ) -> Result<Entry, RunError> {
        let next = self.peek_entry(pos.exits)?;
        match &next {
            Some(e) if e.pos.exits == pos.exits && wanted(&e.event) => {
                if e.pos.rip != pos.rip {
                    return Err(self.diverge(
                        pos,
                        format!("{what}: same exit, different RIP"),
                        format!("rip {:#x}", e.pos.rip),
                        format!("rip {:#x}", pos.rip),
                    ));
                }
            }
            other => {
                let expected = match other {
                    Some(e) => format!("#{} at exit {}: {}", e.seq, e.pos.exits, e.event),
                    None => "no entry at this exit".to_string(),
                };
                return Err(self.diverge(
                    pos,
                    format!("the guest produced {what} at exit {}", pos.exits),
                    expected,
                    format!("{what} at exit {} rip {:#x}", pos.exits, pos.rip),
                ));
            }
        }
        let entry = self
            .source
            .take()
            .ok_or(RunError::Vm(crate::run::vm::VmError::Internal(
                "a peeked log entry vanished",
            )))?;
        self.last_matched = Some((entry.seq, entry.pos));
        self.counts.entries_applied += 1;
        self.source.applied(entry.seq, entry.pos.exits);
        Ok(entry)
    }

    fn check_digest(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: DigestReason,
    ) -> Result<(), RunError> {
        let entry = self.expect(
            pos,
            &format!("a {reason} digest"),
            |e| matches!(e, Event::Digest(d) if d.reason == reason),
        )?;
        let Event::Digest(recorded) = &entry.event else {
            return Ok(());
        };
        let replayed = m.full_digest(reason)?;
        self.counts.digests_checked += 1;
        if recorded.regs == replayed.regs && recorded.mem_hash == replayed.mem_hash {
            return Ok(());
        }
        Err(RunError::Diverged(Box::new(digest_divergence(
            m,
            &entry,
            recorded,
            &replayed,
            pos,
            self.prior(&entry),
        ))))
    }

    fn prior(&self, entry: &Entry) -> Option<(u64, Position)> {
        self.last_matched.filter(|(seq, _)| *seq < entry.seq)
    }
}

fn digest_divergence(
    m: &Machine,
    entry: &Entry,
    recorded: &Digest,
    replayed: &Digest,
    pos: Position,
    last: Option<(u64, Position)>,
) -> Divergence {
    let registers = recorded.regs.diff(&replayed.regs);
    let mut first_page = None;
    if recorded.mem_hash != replayed.mem_hash {
        let hasher = m.hasher.as_ref();
        first_page = recorded
            .dirty_pages
            .iter()
            .filter(|p| hasher.and_then(|h| h.page_hash(p.page)) != Some(p.hash))
            .map(|p| p.page)
            .chain(
                replayed
                    .dirty_pages
                    .iter()
                    .filter(|p| !recorded.dirty_pages.iter().any(|r| r.page == p.page))
                    .map(|p| p.page),
            )
            .min();
    }
    Divergence {
        entry: Some(entry.clone()),
        found_pos: pos,
        what: format!("{} digest differs", recorded.reason),
        expected: format!("memory hash {:#018x}", recorded.mem_hash),
        found: format!("memory hash {:#018x}", replayed.mem_hash),
        registers,
        first_differing_page: first_page,
        last_matched: last,
    }
}

fn registers_line(r: &Registers) -> String {
    r.named()
        .iter()
        .map(|(n, v)| format!("{n}={v:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl<S: LogSource> Mode for Replay<S> {
    fn now_ns(&self) -> u64 {
        0
    }

    fn should_stop(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        if self.end_seen {
            return Ok(Some(StopReason::EndOfLog));
        }
        if self.stop.is_requested() {
            return Ok(Some(StopReason::Requested));
        }
        if matches!(self.event_at(pos)?, Some(Event::Digest(d)) if d.reason == DigestReason::End) {
            self.check_digest(m, pos, DigestReason::End)?;
        }
        if matches!(self.event_at(pos)?, Some(Event::End { .. })) {
            self.expect(pos, "the end of the run", |e| {
                matches!(e, Event::End { .. })
            })?;
            self.end_seen = true;
            return Ok(Some(StopReason::EndOfLog));
        }
        if self.source.finite() && self.source.peek(pos.exits)?.is_none() {
            return Err(self.diverge(
                pos,
                "the log ended without an End entry",
                "more entries",
                "none",
            ));
        }
        Ok(None)
    }

    fn trap(&mut self, pos: Position, site: &NondetSite) -> Result<TrapResult, RunError> {
        let kind = site.kind;
        let name = format!("{kind:?}").to_lowercase();
        let entry = self.expect(pos, &name, |e| {
            matches!(
                (kind, e),
                (NondetKind::Rdtsc, Event::Rdtsc { .. })
                    | (NondetKind::Rdtscp, Event::Rdtscp { .. })
                    | (NondetKind::Rdrand, Event::Rdrand { .. })
                    | (NondetKind::Rdseed, Event::Rdseed { .. })
            )
        })?;
        self.counts.traps_emulated += 1;
        Ok(match entry.event {
            Event::Rdtsc { value } => TrapResult {
                value,
                aux: 0,
                ok: true,
            },
            Event::Rdtscp { value, aux } => TrapResult {
                value,
                aux,
                ok: true,
            },
            Event::Rdrand { value, ok } | Event::Rdseed { value, ok } => {
                TrapResult { value, aux: 0, ok }
            }
            _ => TrapResult {
                value: 0,
                aux: 0,
                ok: false,
            },
        })
    }

    fn time_msr(&mut self, pos: Position, msr: u32) -> Result<u64, RunError> {
        let entry = self.expect(
            pos,
            &format!("an rdmsr of {msr:#x}"),
            |e| matches!(e, Event::Rdmsr { msr: m, .. } if *m == msr),
        )?;
        Ok(match entry.event {
            Event::Rdmsr { value, .. } => value,
            _ => 0,
        })
    }

    fn time_read(&mut self, pos: Position, port: u16, _value: u8) -> Result<u8, RunError> {
        let entry = self.expect(
            pos,
            &format!("a read of PIT port {port:#x}"),
            |e| matches!(e, Event::PitRead { port: p, .. } if *p == port),
        )?;
        Ok(match entry.event {
            Event::PitRead { value, .. } => value,
            _ => 0,
        })
    }

    fn output(
        &mut self,
        m: &mut Machine,
        pos: Position,
        kind: OutputKind,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        let entry = self.expect(
            pos,
            &format!("a {kind} output"),
            |e| matches!(e, Event::Output { kind: k, .. } if *k == kind),
        )?;
        let Event::Output { hash, state, .. } = entry.event else {
            return Ok(());
        };
        let (regs, mem_hash) = m.output_state(self.output_memory)?;
        let found_hash = digest::output_hash(bytes);
        let found_state = digest::state_hash(&regs, mem_hash);
        if found_hash != hash || found_state != state {
            let shown = match kind {
                OutputKind::Console => format!("{:?}", String::from_utf8_lossy(bytes)),
                OutputKind::Transmit => format!("a frame of {} bytes", bytes.len()),
            };
            let what = if found_hash != hash {
                format!("the {kind} output differs ({shown})")
            } else {
                format!("the {kind} output is the same ({shown}) but the state that produced it differs; replayed registers: {}", registers_line(&regs))
            };
            return Err(RunError::Diverged(Box::new(Divergence {
                entry: Some(entry.clone()),
                found_pos: pos,
                what,
                expected: format!("output hash {hash:#010x}, state hash {state:#010x}"),
                found: format!("output hash {found_hash:#010x}, state hash {found_state:#010x}"),
                registers: Vec::new(),
                first_differing_page: None,
                last_matched: self.prior(&entry),
            })));
        }
        self.counts.outputs_reproduced += 1;
        match kind {
            OutputKind::Console => {
                if let Err(e) = self.console.write_all(bytes) {
                    tracing::warn!("writing the replayed console failed: {e}");
                }
            }
            OutputKind::Transmit => {
                if let Some(c) = &mut self.capture {
                    c.write(bytes).map_err(RunError::Capture)?;
                }
            }
        }
        Ok(())
    }

    fn after_exit(&mut self, m: &mut Machine, pos: Position) -> Result<(), RunError> {
        if digest::periodic_due(self.digest_interval, pos.exits) {
            self.check_digest(m, pos, DigestReason::Periodic)?;
        }
        Ok(())
    }

    fn deliver(&mut self, m: &mut Machine, pos: Position, ready: bool) -> Result<bool, RunError> {
        while matches!(self.event_at(pos)?, Some(Event::Packet { .. })) {
            if !ready {
                return Err(self.diverge(
                    pos,
                    "the log delivers a packet where the guest cannot take an interrupt",
                    "interrupts enabled",
                    "interrupts disabled",
                ));
            }
            let entry = self.expect(pos, "a packet delivery", |e| {
                matches!(e, Event::Packet { .. })
            })?;
            let Event::Packet { desc_head, frame } = &entry.event else {
                continue;
            };
            let placed = m.vm.devices.net.deliver_rx(&m.vm.mem, frame);
            let head = match &placed {
                Ok(p) => p.head,
                Err(_) => FAILED_DELIVERY,
            };
            if head != *desc_head {
                return Err(RunError::Diverged(Box::new(Divergence {
                    entry: Some(entry.clone()),
                    found_pos: pos,
                    what: "the packet landed in another receive buffer".into(),
                    expected: format!("descriptor chain {desc_head}"),
                    found: match placed {
                        Ok(p) => format!("descriptor chain {}", p.head),
                        Err(e) => format!("no delivery: {e}"),
                    },
                    registers: Vec::new(),
                    first_differing_page: None,
                    last_matched: self.prior(&entry),
                })));
            }
            self.counts.packets_delivered += 1;
        }
        m.raise_device_irqs();
        let logged = match self.event_at(pos)? {
            Some(Event::Interrupt { vector }) => Some(vector),
            _ => None,
        };
        match logged {
            Some(vector) => {
                if !ready {
                    return Err(self.diverge(pos, format!("the log injects vector {vector:#x} where the guest cannot take an interrupt"), "interrupts enabled", "interrupts disabled"));
                }
                let entry = self.expect(pos, "an interrupt", |e| {
                    matches!(e, Event::Interrupt { .. })
                })?;
                // The timer is the one interrupt source driven by host time:
                // the log says when it fired, so raise its line now.
                if m.vm.devices.pic.pending_vector() != Some(vector) {
                    if let Some(line) = line_for_vector(m, vector) {
                        m.vm.devices.pic.raise_irq(line);
                    }
                }
                match m.inject_pending()? {
                    Some(v) if v == vector => {
                        self.counts.interrupts_injected += 1;
                        Ok(true)
                    }
                    other => Err(RunError::Diverged(Box::new(Divergence {
                        entry: Some(entry.clone()),
                        found_pos: pos,
                        what: "the interrupt controller gave another vector".into(),
                        expected: format!("vector {vector:#x}"),
                        found: match other {
                            Some(v) => format!("vector {v:#x}"),
                            None => "no interrupt deliverable".into(),
                        },
                        registers: Vec::new(),
                        first_differing_page: None,
                        last_matched: self.prior(&entry),
                    }))),
                }
            }
            None => {
                if ready {
                    if let Some(v) = m.vm.devices.pic.pending_vector() {
                        return Err(self.diverge(pos, format!("the guest could take vector {v:#x} here, but the recording injected nothing at exit {}", pos.exits), "no interrupt pending", format!("vector {v:#x} pending")));
                    }
                }
                Ok(false)
            }
        }
    }

    fn wait_idle(&mut self, _m: &mut Machine, pos: Position) -> Result<(), RunError> {
        if self.stop.is_requested() {
            return Ok(());
        }
        match self.peek_entry(pos.exits)? {
            Some(e) if e.pos.exits == pos.exits => Ok(()),
            other => {
                let next = match other {
                    Some(e) => format!("#{} at exit {}: {}", e.seq, e.pos.exits, e.event),
                    None => "the end of the log".into(),
                };
                Err(self.diverge(
                    pos,
                    format!(
                        "the guest is idle at exit {} and the log has nothing to wake it",
                        pos.exits
                    ),
                    format!("an interrupt at exit {}", pos.exits),
                    next,
                ))
            }
        }
    }

    fn finish(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: StopReason,
        _at_position: bool,
    ) -> Result<(), RunError> {
        let _ = self.console.flush();
        if let Some(c) = &mut self.capture {
            c.flush().map_err(RunError::Capture)?;
        }
        match reason {
            StopReason::EndOfLog | StopReason::Requested => Ok(()),
            StopReason::PowerOff | StopReason::GuestError(_) => {
                // The recording logs the final digest and End where the guest
                // powered off: both must be here.
                self.check_digest(m, pos, DigestReason::End)?;
                self.expect(pos, "the end of the run", |e| {
                    matches!(e, Event::End { .. })
                })?;
                self.end_seen = true;
                Ok(())
            }
            StopReason::Timeout => Ok(()),
        }
    }
}

/// The PIC line whose vector is `vector`, from the bases the guest programmed.
fn line_for_vector(m: &Machine, vector: u8) -> Option<u8> {
    let state = m.vm.devices.pic.state();
    let master = state.master.vector_base;
    let slave = state.slave.vector_base;
    if (master..master.saturating_add(8)).contains(&vector) {
        Some(vector - master)
    } else if (slave..slave.saturating_add(8)).contains(&vector) {
        Some(vector - slave + 8)
    } else {
        None
    }
}

impl fmt::Display for ReplayCounts {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} entries applied, {} digests checked, {} outputs reproduced, {} packets, {} interrupts, {} trapped instructions",
            self.entries_applied, self.digests_checked, self.outputs_reproduced, self.packets_delivered, self.interrupts_injected, self.traps_emulated
        )
    }
}
