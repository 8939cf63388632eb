//! Replay: the guest runs from the log alone (no network, no host time, no
//! host randomness), and every digest and output is checked against the
//! recording. Every entry must be applied at its exit; the first entry that
//! does not match, or that the guest can no longer reach, stops the replay
//! with a [`Divergence`] that names the entry, the position, what was
//! expected and what was found. A replay that ends without one says how
//! far it got ([`Verdict`]).

mod between;
pub mod file;
mod verdict;

pub use verdict::Verdict;

use std::fmt;
use std::io::Write;

use logchannel::{Digest, DigestReason, Entry, Event, OutputKind, Position, Registers};
use serde::Serialize;

use crate::host::capture::Capture;
use crate::machine::patch::TrapResult;
use crate::machine::scan::{NondetKind, NondetSite};
use crate::run::digest;
use crate::run::divergence::{Divergence, FAILED_DELIVERY};
use crate::run::precise::Aim;
use crate::run::run_loop::{
    end_without_final_digest, flush_outputs, Machine, Mode, RunError, RunSummary, StopReason,
};
use crate::run::stop::StopSignal;
use crate::run::vm::VmError;

pub use file::{FileSource, LogFileError, LogOutline};

#[derive(Debug, Default, Clone, Serialize)]
pub struct ReplayCounts {
    pub entries_applied: u64,
    pub digests_checked: u64,
    pub outputs_reproduced: u64,
    pub packets_delivered: u64,
    pub interrupts_injected: u64,
    pub traps_emulated: u64,
    /// `async-point` entries reached: deliveries between two exits.
    pub async_points: u64,
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

pub struct Replay<S: LogSource> {
    pub source: S,
    digest_interval: u64,
    output_memory: bool,
    /// The last entry applied and found to match.
    last_matched: Option<(u64, Position)>,
    console: Box<dyn Write + Send>,
    capture: Option<Capture>,
    stop: StopSignal,
    /// The exit of the last final digest that matched.
    final_digest_at: Option<u64>,
    /// The device clock, frozen: time reads come from the log. 0 from boot;
    /// the primary's clock at the cut for a replay that starts there.
    clock_ns: u64,
    /// The log's `end` entry, once applied: the replay reached the end.
    end: Option<Entry>,
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
            final_digest_at: None,
            clock_ns: 0,
            end: None,
            counts: ReplayCounts::default(),
        }
    }

    /// A replay that starts from a machine state taken at `base_ns` of the
    /// primary's device clock: the devices' time stands there (a PIT
    /// reprogrammed during the replay counts from it, as on the primary's
    /// timeline) instead of at 0.
    pub fn with_clock(mut self, base_ns: u64) -> Self {
        self.clock_ns = base_ns;
        self
    }

    /// The outcome of a run that returned `summary`; `total` is the log's
    /// entry count if known.
    pub fn verdict(&self, summary: &RunSummary, total: Option<u64>) -> Verdict {
        let exits = summary.exits.synchronous;
        match &self.end {
            Some(end) => Verdict::Reproduced {
                exits,
                entries: end.seq,
                cut_short: match &end.event {
                    Event::End { reason, .. } if self.final_digest_at != Some(end.pos.exits) => {
                        Some(reason.clone())
                    }
                    _ => None,
                },
            },
            None => Verdict::Stopped {
                reason: summary.reason.unwrap_or(StopReason::Requested),
                exits,
                applied: self.counts.entries_applied,
                total,
            },
        }
    }

    /// Records `entry` as applied and matched.
    fn applied(&mut self, entry: &Entry) {
        self.last_matched = Some((entry.seq, entry.pos));
        self.counts.entries_applied += 1;
        self.source.applied(entry.seq, entry.pos.exits);
    }

    fn report(
        &self,
        entry: Option<Entry>,
        found_pos: Position,
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> RunError {
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

    /// The next entry, after applying the progress marks at `pos`'s exit. A
    /// progress mark only says how far the log is complete, so it is
    /// applied wherever the guest is at its exit; the entries after it must
    /// be past the exit it names.
    fn next_entry(&mut self, pos: Position) -> Result<Option<Entry>, RunError> {
        loop {
            let next = self.source.peek(pos.exits)?.cloned();
            let Some(
                mark @ Entry {
                    event: Event::Progress { exits: complete },
                    ..
                },
            ) = next
            else {
                return Ok(next);
            };
            if mark.pos.exits != pos.exits {
                return Ok(Some(mark));
            }
            if mark.pos.rip != pos.rip {
                return Err(self.report(
                    Some(mark.clone()),
                    pos,
                    "a progress mark: same exit, different RIP",
                    format!("rip {:#x}", mark.pos.rip),
                    format!("rip {:#x}", pos.rip),
                ));
            }
            self.source.take();
            if let Some(after) = self.source.peek(pos.exits)?.cloned() {
                if after.pos.exits <= complete {
                    return Err(self.report(
                        Some(mark),
                        pos,
                        format!(
                            "the progress mark says the log is complete up to exit {complete}, but the entry after it is at exit {}",
                            after.pos.exits
                        ),
                        format!("no entry at an exit up to {complete} after the mark"),
                        format!("#{} at exit {}: {}", after.seq, after.pos.exits, after.event),
                    ));
                }
            }
            self.applied(&mark);
        }
    }

    /// The next entry's event, if it is at exit `pos`.
    fn event_at(&mut self, pos: Position) -> Result<Option<Event>, RunError> {
        Ok(self
            .next_entry(pos)?
            .filter(|e| e.pos.exits == pos.exits)
            .map(|e| e.event))
    }

    /// Takes the next entry, which must be at `pos` with an event that
    /// `wanted` accepts, and returns it with what `wanted` made of it. The
    /// caller marks it applied once it has checked what there is to check.
    fn take<T>(
        &mut self,
        pos: Position,
        what: &str,
        wanted: impl Fn(&Event) -> Option<T>,
    ) -> Result<(Entry, T), RunError> {
        let next = self.next_entry(pos)?;
        let taken = match &next {
            Some(e) if e.pos.exits == pos.exits => wanted(&e.event),
            _ => None,
        };
        let (Some(entry), Some(value)) = (next, taken) else {
            return Err(self.unexpected(pos, what));
        };
        if entry.pos.rip != pos.rip {
            return Err(self.report(
                Some(entry.clone()),
                pos,
                format!("{what}: same exit, different RIP"),
                format!("rip {:#x}", entry.pos.rip),
                format!("rip {:#x}", pos.rip),
            ));
        }
        self.source.take().ok_or(RunError::Vm(VmError::Internal(
            "a peeked log entry vanished",
        )))?;
        Ok((entry, value))
    }

    /// The guest did `what` at `pos` and the log's next entry is not that.
    fn unexpected(&mut self, pos: Position, what: &str) -> RunError {
        let next = self.source.peek(pos.exits).ok().flatten().cloned();
        let found = format!("{what} at exit {} rip {:#x}", pos.exits, pos.rip);
        let expected = match &next {
            Some(e) if e.pos.exits < pos.exits => return self.passed(pos, e.clone(), found),
            Some(e) => format!("#{} at exit {}: {}", e.seq, e.pos.exits, e.event),
            None => "no entry at this exit".to_string(),
        };
        self.report(
            next,
            pos,
            format!("the guest produced {what} at exit {}", pos.exits),
            expected,
            found,
        )
    }

    /// The guest has gone past `entry`'s exit without applying it; `found`
    /// is where it is and what it does there.
    fn passed(&self, pos: Position, entry: Entry, found: String) -> RunError {
        if let Event::AsyncPoint { .. } = entry.event {
            return self.passed_async_point(pos, entry, found);
        }
        let expected = format!("#{} applied at exit {}", entry.seq, entry.pos.exits);
        self.report(
            Some(entry),
            pos,
            format!(
                "the guest is past the entry's position: it reached exit {} without applying it",
                pos.exits
            ),
            expected,
            found,
        )
    }

    fn check_digest(
        &mut self,
        m: &mut Machine,
        pos: Position,
        reason: DigestReason,
    ) -> Result<(), RunError> {
        let (entry, recorded) = self.take(pos, &format!("a {reason} digest"), |e| match e {
            Event::Digest(d) if d.reason == reason => Some(d.clone()),
            _ => None,
        })?;
        let replayed = m.full_digest(reason)?;
        self.counts.digests_checked += 1;
        if recorded.regs != replayed.regs || recorded.mem_hash != replayed.mem_hash {
            return Err(RunError::Diverged(Box::new(digest_divergence(
                m,
                &entry,
                &recorded,
                &replayed,
                pos,
                self.last_matched,
            ))));
        }
        self.applied(&entry);
        if reason == DigestReason::End {
            self.final_digest_at = Some(pos.exits);
        }
        Ok(())
    }

    /// Applies the `end` entry at `pos`, which a final digest must precede
    /// unless the entry says why there is none.
    fn end_run(&mut self, pos: Position) -> Result<(), RunError> {
        let (entry, reason) = self.take(pos, "the end of the run", |e| match e {
            Event::End { reason, .. } => Some(reason.clone()),
            _ => None,
        })?;
        if self.final_digest_at != Some(pos.exits) && !end_without_final_digest(&reason) {
            return Err(self.report(
                Some(entry),
                pos,
                format!("the log ends the run at exit {} without a final digest, and its end entry does not say why (truncated or edited)", pos.exits),
                format!("a final digest at exit {}, or an end entry that says the recording was cut short", pos.exits),
                format!("end entry reason {reason:?}"),
            ));
        }
        self.applied(&entry);
        self.end = Some(entry);
        Ok(())
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

fn trap_result(kind: NondetKind, event: &Event) -> Option<TrapResult> {
    let ok = |value| TrapResult {
        value,
        aux: 0,
        ok: true,
    };
    match (kind, event) {
        (NondetKind::Rdtsc, Event::Rdtsc { value }) => Some(ok(*value)),
        (NondetKind::Rdtscp, Event::Rdtscp { value, aux }) => Some(TrapResult {
            value: *value,
            aux: *aux,
            ok: true,
        }),
        (NondetKind::Rdrand, Event::Rdrand { value, ok })
        | (NondetKind::Rdseed, Event::Rdseed { value, ok }) => Some(TrapResult {
            value: *value,
            aux: 0,
            ok: *ok,
        }),
        _ => None,
    }
}

impl<S: LogSource> Mode for Replay<S> {
    fn now_ns(&self) -> u64 {
        self.clock_ns
    }

    fn aim(&mut self, _m: &mut Machine, pos: Position) -> Result<Option<(u64, u64)>, RunError> {
        self.async_point_at(pos)
    }

    fn at_aim(&mut self, m: &mut Machine, at: Position, aim: &mut Aim) -> Result<bool, RunError> {
        self.judge_pass(m, at, aim)
    }

    fn should_stop_between(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        self.end_between(m, pos)
    }

    /// Before the guest leaves exit `pos` (and while it idles there): the
    /// end of the log if it is here, and the check that no entry was left
    /// behind at an earlier exit.
    fn should_stop(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        if self.end.is_some() {
            return Ok(Some(StopReason::EndOfLog));
        }
        if self.stop.is_requested() {
            return Ok(Some(StopReason::Requested));
        }
        let at_exit = |e: &Option<Entry>, wanted: fn(&Event) -> bool| {
            e.as_ref()
                .is_some_and(|e| e.pos.exits == pos.exits && wanted(&e.event))
        };
        let mut next = self.next_entry(pos)?;
        // A recording that stops with part of a console line written logs
        // that part as a last output, before its final digest.
        if m.console_line_pending()
            && at_exit(&next, |e| {
                matches!(
                    e,
                    Event::Output {
                        kind: OutputKind::Console,
                        ..
                    }
                )
            })
        {
            flush_outputs(m, self, pos, true)?;
            next = self.next_entry(pos)?;
        }
        if at_exit(
            &next,
            |e| matches!(e, Event::Digest(d) if d.reason == DigestReason::End),
        ) {
            self.check_digest(m, pos, DigestReason::End)?;
            next = self.next_entry(pos)?;
        }
        if at_exit(&next, |e| matches!(e, Event::End { .. })) {
            self.end_run(pos)?;
            return Ok(Some(StopReason::EndOfLog));
        }
        match next {
            Some(e) if e.pos.exits < pos.exits => {
                let found = format!("exit {} rip {:#x}", pos.exits, pos.rip);
                Err(self.passed(pos, e, found))
            }
            None if self.source.finite() => Err(self.report(
                None,
                pos,
                "the log ended without an end entry",
                "more entries",
                "none",
            )),
            _ => Ok(None),
        }
    }

    fn trap(&mut self, pos: Position, site: &NondetSite) -> Result<TrapResult, RunError> {
        let kind = site.kind;
        let name = format!("{kind:?}").to_lowercase();
        let (entry, result) = self.take(pos, &name, |e| trap_result(kind, e))?;
        self.applied(&entry);
        self.counts.traps_emulated += 1;
        Ok(result)
    }

    fn time_msr(&mut self, pos: Position, msr: u32) -> Result<u64, RunError> {
        let (entry, value) = self.take(pos, &format!("an rdmsr of {msr:#x}"), |e| match e {
            Event::Rdmsr { msr: m, value } if *m == msr => Some(*value),
            _ => None,
        })?;
        self.applied(&entry);
        Ok(value)
    }

    fn time_read(&mut self, pos: Position, port: u16, _value: u8) -> Result<u8, RunError> {
        let (entry, value) =
            self.take(pos, &format!("a read of PIT port {port:#x}"), |e| match e {
                Event::PitRead { port: p, value } if *p == port => Some(*value),
                _ => None,
            })?;
        self.applied(&entry);
        Ok(value)
    }

    fn output(
        &mut self,
        m: &mut Machine,
        pos: Position,
        kind: OutputKind,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        // Once a stop is requested the run ends before the end of the log,
        // and its last flush hands over the part of a console line the
        // guest has written, which the recording logged only if it stopped
        // here too (`should_stop` takes that case). The verdict says the
        // rest of the log was not checked.
        if self.stop.is_requested() {
            return Ok(());
        }
        let (entry, (hash, state)) = self.take(pos, &format!("a {kind} output"), |e| match e {
            Event::Output {
                kind: k,
                hash,
                state,
            } if *k == kind => Some((*hash, *state)),
            _ => None,
        })?;
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
            return Err(self.report(
                Some(entry),
                pos,
                what,
                format!("output hash {hash:#010x}, state hash {state:#010x}"),
                format!("output hash {found_hash:#010x}, state hash {found_state:#010x}"),
            ));
        }
        self.applied(&entry);
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
                let next = self.next_entry(pos)?;
                return Err(self.report(
                    next,
                    pos,
                    "the log delivers a packet where the guest cannot take an interrupt",
                    "interrupts enabled",
                    "interrupts disabled",
                ));
            }
            let (entry, (desc_head, frame)) = self.take(pos, "a packet delivery", |e| match e {
                Event::Packet { desc_head, frame } => Some((*desc_head, frame.clone())),
                _ => None,
            })?;
            let placed = m.vm.devices.net.deliver_rx(&m.vm.mem, &frame);
            let head = match &placed {
                Ok(p) => p.head,
                Err(_) => FAILED_DELIVERY,
            };
            if head != desc_head {
                return Err(self.report(
                    Some(entry),
                    pos,
                    "the packet landed in another receive buffer",
                    format!("descriptor chain {desc_head}"),
                    match placed {
                        Ok(p) => format!("descriptor chain {}", p.head),
                        Err(e) => format!("no delivery: {e}"),
                    },
                ));
            }
            self.applied(&entry);
            self.counts.packets_delivered += 1;
        }
        m.raise_device_irqs();
        let logged = match self.event_at(pos)? {
            Some(Event::Interrupt { vector }) => Some(vector),
            _ => None,
        };
        let Some(vector) = logged else {
            if ready {
                if let Some(v) = m.vm.devices.pic.pending_vector() {
                    let next = self.next_entry(pos)?;
                    return Err(self.report(
                        next,
                        pos,
                        format!("the guest could take vector {v:#x} here, but the recording injected nothing at exit {}", pos.exits),
                        "no interrupt pending",
                        format!("vector {v:#x} pending"),
                    ));
                }
            }
            return Ok(false);
        };
        if !ready {
            let next = self.next_entry(pos)?;
            return Err(self.report(
                next,
                pos,
                format!(
                    "the log injects vector {vector:#x} where the guest cannot take an interrupt"
                ),
                "interrupts enabled",
                "interrupts disabled",
            ));
        }
        let (entry, ()) = self.take(pos, "an interrupt", |e| {
            matches!(e, Event::Interrupt { .. }).then_some(())
        })?;
        // The timer is the one interrupt source driven by host time: the
        // log says when it fired, so raise its line now.
        if m.vm.devices.pic.pending_vector() != Some(vector) {
            if let Some(line) = line_for_vector(m, vector) {
                m.vm.devices.pic.raise_irq(line);
            }
        }
        match m.inject_pending()? {
            Some(v) if v == vector => {
                self.applied(&entry);
                self.counts.interrupts_injected += 1;
                Ok(true)
            }
            other => Err(self.report(
                Some(entry),
                pos,
                "the interrupt controller gave another vector",
                format!("vector {vector:#x}"),
                match other {
                    Some(v) => format!("vector {v:#x}"),
                    None => "no interrupt deliverable".into(),
                },
            )),
        }
    }

    /// Called when delivery found nothing at `pos` for a guest idle in
    /// `hlt`: the log can never wake it, since only a packet or an
    /// interrupt at this exit could, and `deliver` has just looked. (A
    /// stop request is the one way out, and `should_stop` takes it next.)
    fn wait_idle(&mut self, _m: &mut Machine, pos: Position) -> Result<(), RunError> {
        if self.stop.is_requested() {
            return Ok(());
        }
        let idle = format!("idle in hlt at exit {} rip {:#x}", pos.exits, pos.rip);
        Err(match self.next_entry(pos)? {
            Some(e) if e.pos.exits < pos.exits => self.passed(pos, e, idle),
            Some(e) if e.pos.exits == pos.exits => {
                let expected = format!("#{} at exit {}: {}", e.seq, e.pos.exits, e.event);
                self.report(
                    Some(e),
                    pos,
                    format!(
                        "the guest is idle in hlt at exit {}, where only a packet or an interrupt can be applied, and the log's next entry there is neither",
                        pos.exits
                    ),
                    expected,
                    idle,
                )
            }
            next => {
                let found = match &next {
                    Some(e) => format!(
                        "{idle}; the next entry is #{} at exit {}: {}",
                        e.seq, e.pos.exits, e.event
                    ),
                    None => format!("{idle}; the log has no more entries"),
                };
                self.report(
                    next,
                    pos,
                    format!(
                        "the guest is idle in hlt at exit {} and the log has nothing to wake it there",
                        pos.exits
                    ),
                    format!("an interrupt at exit {}", pos.exits),
                    found,
                )
            }
        })
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
            // The verdict tells whether the end of the log was reached.
            StopReason::EndOfLog
            | StopReason::Requested
            | StopReason::RequestedBetweenExits
            | StopReason::Timeout => Ok(()),
            StopReason::PowerOff | StopReason::GuestError(_) => {
                // The recording logs the final digest and End where the guest
                // powered off: both must be here.
                self.check_digest(m, pos, DigestReason::End)?;
                self.end_run(pos)
            }
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
            "{} entries applied, {} digests checked, {} outputs reproduced, {} packets, {} interrupts ({} between exits), {} trapped instructions",
            self.entries_applied, self.digests_checked, self.outputs_reproduced, self.packets_delivered, self.interrupts_injected, self.async_points, self.traps_emulated
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use logchannel::{LogHeader, LogReader, LogWriter, ReplayConfig};

    use super::*;

    const RIP: u64 = 0x1000;

    fn at(exits: u64) -> Position {
        Position { exits, rip: RIP }
    }

    /// A replay of `events`, each at its exit, from an in-memory log.
    fn replay_of(events: &[(u64, Event)]) -> Replay<FileSource<Cursor<Vec<u8>>>> {
        let header = LogHeader::new(
            "vm-test",
            logchannel::image_hash(b"image"),
            64 << 20,
            ReplayConfig {
                digest_interval: 0,
                tick_hz: 100,
                patching: true,
                extra: Default::default(),
            },
        );
        let mut w = LogWriter::new(Vec::new(), &header).expect("header");
        for (exits, event) in events {
            w.append(at(*exits), event.clone()).expect("append");
        }
        let last = events.last().map_or(0, |(e, _)| *e);
        let bytes = w.finish(at(last), "Timeout").expect("finish");
        let reader = LogReader::new(Cursor::new(bytes)).expect("reader");
        Replay::new(
            FileSource::new(reader),
            0,
            false,
            Box::new(std::io::sink()),
            None,
            StopSignal::new(),
        )
    }

    fn rdtsc_site() -> NondetSite {
        NondetSite {
            addr: RIP - 1,
            len: 2,
            kind: NondetKind::Rdtsc,
            dest: None,
        }
    }

    fn diverged(e: RunError) -> Divergence {
        match e {
            RunError::Diverged(d) => *d,
            other => panic!("expected a divergence, got {other}"),
        }
    }

    /// Issue 9, item 7: a progress mark consistent with the log held back
    /// every entry after it, so the guest found nothing at its next exit.
    #[test]
    fn a_consistent_progress_mark_is_applied_at_its_exit() {
        let mut r = replay_of(&[
            (5, Event::Rdtsc { value: 1 }),
            (5, Event::Progress { exits: 5 }),
            (6, Event::Rdtsc { value: 2 }),
        ]);
        assert_eq!(r.trap(at(5), &rdtsc_site()).expect("exit 5").value, 1);
        // What `should_stop` looks at before the guest leaves exit 5.
        let next = r.next_entry(at(5)).expect("the mark applies");
        assert_eq!(next.map(|e| e.seq), Some(3));
        assert_eq!(r.trap(at(6), &rdtsc_site()).expect("exit 6").value, 2);
        assert_eq!(r.counts.entries_applied, 3);
        assert_eq!(r.last_matched, Some((3, at(6))));
    }

    #[test]
    fn a_progress_mark_with_an_entry_it_covers_after_it_diverges() {
        let mut r = replay_of(&[
            (5, Event::Progress { exits: 6 }),
            (6, Event::Rdtsc { value: 2 }),
        ]);
        let d = diverged(r.trap(at(5), &rdtsc_site()).expect_err("inconsistent"));
        assert_eq!(d.entry.map(|e| e.seq), Some(1));
        assert!(d.what.contains("complete up to exit 6"), "{}", d.what);
        assert_eq!(d.last_matched, None);
    }

    #[test]
    fn a_progress_mark_at_another_rip_diverges() {
        let mut r = replay_of(&[
            (5, Event::Progress { exits: 5 }),
            (6, Event::Rdtsc { value: 2 }),
        ]);
        let moved = Position {
            exits: 5,
            rip: RIP + 1,
        };
        let d = diverged(r.trap(moved, &rdtsc_site()).expect_err("rip"));
        assert!(d.what.contains("different RIP"), "{}", d.what);
    }

    #[test]
    fn an_entry_the_guest_left_behind_is_named_with_the_last_match() {
        let mut r = replay_of(&[
            (5, Event::Rdtsc { value: 1 }),
            (5, Event::Rdrand { value: 9, ok: true }),
            (7, Event::Rdtsc { value: 2 }),
        ]);
        r.trap(at(5), &rdtsc_site()).expect("exit 5");
        let d = diverged(r.trap(at(7), &rdtsc_site()).expect_err("left behind"));
        assert_eq!(d.entry.map(|e| e.seq), Some(2));
        assert_eq!(d.last_matched, Some((1, at(5))));
    }

    fn async_point() -> Event {
        Event::AsyncPoint { regs: 7, mem: 70 }
    }

    #[test]
    fn an_async_point_is_aimed_at_from_its_own_exit_only() {
        let mut r = replay_of(&[
            (5, Event::Rdtsc { value: 1 }),
            (5, async_point()),
            (6, Event::Rdtsc { value: 2 }),
        ]);
        assert_eq!(r.async_point_at(at(5)).expect("peek"), None, "rdtsc first");
        r.trap(at(5), &rdtsc_site()).expect("exit 5");
        assert_eq!(r.async_point_at(at(4)).expect("peek"), None);
        assert_eq!(r.async_point_at(at(5)).expect("peek"), Some((2, RIP)));
    }

    #[test]
    fn an_async_point_the_guest_left_behind_names_its_instruction() {
        let mut r = replay_of(&[(5, async_point()), (6, Event::Rdtsc { value: 2 })]);
        let d = diverged(r.trap(at(6), &rdtsc_site()).expect_err("left behind"));
        assert_eq!(d.entry.map(|e| e.seq), Some(1));
        assert!(
            d.what
                .contains("left exit 5 without reaching rip 0x1000 with the recorded state"),
            "{}",
            d.what
        );
        assert!(
            d.expected.contains("registers 0x7, memory 0x46"),
            "{}",
            d.expected
        );
    }

    #[test]
    fn a_stopped_replay_never_claims_everything_matched() {
        let stopped = Verdict::Stopped {
            reason: StopReason::Requested,
            exits: 350,
            applied: 164,
            total: Some(1344),
        };
        let text = stopped.to_string();
        assert!(text.contains("164 of 1344 entries applied"), "{text}");
        assert!(text.contains("exit 350 reached"), "{text}");
        assert!(!text.contains("every digest and output matched"), "{text}");
        let cut = Verdict::Reproduced {
            exits: 10,
            entries: 4,
            cut_short: Some(StopReason::RequestedBetweenExits.end_reason()),
        };
        let text = cut.to_string();
        assert!(text.contains("cut short"), "{text}");
        assert!(!text.contains("every digest and output matched"), "{text}");
    }
}
