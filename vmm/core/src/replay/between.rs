//! Replay between two synchronous exits: the `async-point` entries a live
//! run logged where it delivered at a kick, the pass through their
//! instruction that matches (`run::precise`), and the end of a recording
//! that was stopped between two exits. `docs/record-replay.md`,
//! "Interrupts between exits", has the rules.

use logchannel::{Entry, Event, OutputKind, Position};

use crate::replay::{LogSource, Replay};
use crate::run::digest;
use crate::run::precise::{regs_hash, Aim, Pass};
use crate::run::run_loop::{flush_outputs, Machine, Mode, RunError, StopReason};
use crate::run::vm::VmError;

impl<S: LogSource> Replay<S> {
    /// The next entry, if it is an `async-point` at the exit the guest is
    /// at (`pos`, the last synchronous exit): its sequence number and the
    /// instruction the guest must be stopped at.
    pub(super) fn async_point_at(&mut self, pos: Position) -> Result<Option<(u64, u64)>, RunError> {
        Ok(match self.next_entry(pos)? {
            Some(Entry {
                seq,
                pos: at,
                event: Event::AsyncPoint { .. },
            }) if at.exits == pos.exits => Some((seq, at.rip)),
            _ => None,
        })
    }

    /// The guest is at the aimed instruction (`at`): judges this pass
    /// against the `async-point` entry and, when it matches, applies the
    /// entry, delivers what follows it there, and returns true.
    pub(super) fn judge_pass(
        &mut self,
        m: &mut Machine,
        at: Position,
        aim: &mut Aim,
    ) -> Result<bool, RunError> {
        let entry = self.source.peek(at.exits)?.cloned();
        let Some(Event::AsyncPoint {
            regs: want_regs,
            mem: want_mem,
        }) = entry.as_ref().map(|e| e.event.clone())
        else {
            return Err(VmError::Internal("aimed at an entry that is not an async point").into());
        };
        let regs = regs_hash(&digest::registers(&m.regs()));
        let mut mem = None;
        let pass = aim.judge(regs, want_regs, want_mem, || {
            let hash = m.state()?.1;
            mem = Some(hash);
            Ok::<u64, RunError>(hash)
        })?;
        match pass {
            Pass::Match => {
                let (entry, ()) = self.take(at, "an async point", |e| {
                    matches!(e, Event::AsyncPoint { .. }).then_some(())
                })?;
                self.applied(&entry);
                self.counts.async_points += 1;
                self.deliver(m, at, true)?;
            }
            Pass::Repeated => {
                let memory = mem.map_or(String::new(), |h| format!(", memory {h:#x}"));
                return Err(self.report(
                    entry,
                    at,
                    format!(
                        "the guest passes rip {:#x} again and again in the same state (registers and memory repeat) without ever reaching the recorded one: it loops, and the entry can never be reached",
                        at.rip
                    ),
                    format!("registers {want_regs:#x}, memory {want_mem:#x}"),
                    format!("registers {regs:#x}{memory}"),
                ));
            }
            Pass::Other => {}
        }
        Ok(pass == Pass::Match)
    }

    /// The guest reached exit `pos` without reaching the `async-point`
    /// `entry`'s instruction with its state.
    pub(super) fn passed_async_point(
        &self,
        pos: Position,
        entry: Entry,
        found: String,
    ) -> RunError {
        let what = format!(
            "the guest is past the entry's position: it left exit {} without reaching rip {:#x} with the recorded state, and reached exit {}",
            entry.pos.exits, entry.pos.rip, pos.exits
        );
        let expected = match &entry.event {
            Event::AsyncPoint { regs, mem } => format!(
                "#{} at exit {} rip {:#x}: registers {regs:#x}, memory {mem:#x}",
                entry.seq, entry.pos.exits, entry.pos.rip
            ),
            other => format!("#{}: {other}", entry.seq),
        };
        self.report(Some(entry), pos, what, expected, found)
    }

    /// Between two exits: the end of a recording that was stopped there,
    /// whose last console output and `end` entry are at its last exit
    /// (`pos`).
    pub(super) fn end_between(
        &mut self,
        m: &mut Machine,
        pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        if self.end.is_some() {
            return Ok(Some(StopReason::EndOfLog));
        }
        let at_exit = |e: &Option<Entry>, wanted: fn(&Event) -> bool| {
            e.as_ref()
                .is_some_and(|e| e.pos.exits == pos.exits && wanted(&e.event))
        };
        let mut next = self.next_entry(pos)?;
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
        if at_exit(&next, |e| matches!(e, Event::End { .. })) {
            self.end_run(pos)?;
            return Ok(Some(StopReason::EndOfLog));
        }
        Ok(None)
    }
}
