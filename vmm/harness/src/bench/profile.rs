//! `ftvm bench profile`: where a request's guest instructions go. Boots the
//! embedded guest in this process, hands it requests one at a time, and
//! single-steps the vCPU (`KVM_SET_GUEST_DEBUG`, never a hardware
//! breakpoint) from the delivery of each request until the guest is idle
//! again with the reply sent, attributing every step's RIP to a function
//! through the guest ELF's `.symtab`. On this platform every instruction of
//! CPL0 guest code runs in KVM's emulator, so the count is the cost.
//!
//! The clock is frozen (no timer tick lands inside a request) and trapped
//! instructions return fixed values: a profile is deterministic.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_core::host::net_backend::Datagram;
use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::machine::patch::{TrapInstruction, TrapResult};
use ftvm_core::machine::scan::NondetSite;
use ftvm_core::machine::workload::Workload;
use ftvm_core::run::run_loop::{self, ExitCounts, Machine, Mode, RunError, StopReason};
use ftvm_core::run::single_step;
use ftvm_core::run::stop::StopSignal;
use ftvm_core::run::vm::{Vm, VmConfig};
use ftvm_kvclient::{Op, Request};
use logchannel::{OutputKind, Position};
use serde::Serialize;

use crate::report::write_json;

const HLT: u8 = 0xf4;

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Requests of each kind (put, get, append, get of a missing key) to
    /// step through.
    #[arg(long, default_value_t = 3)]
    pub requests: usize,
    /// The guest workload to boot (one that serves KV).
    #[arg(long, default_value = "kv")]
    pub workload: Workload,
    /// Functions to list, the costliest first.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Gives up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A function of the guest image: `[start, end)` and its demangled name.
struct Symbol {
    start: u64,
    end: u64,
    name: String,
}

/// The `STT_FUNC` symbols of an ELF64 image's `.symtab`, sorted by address.
fn function_symbols(elf: &[u8]) -> Result<Vec<Symbol>> {
    const SHT_SYMTAB: u32 = 2;
    const STT_FUNC: u8 = 2;
    let u16_at = |at: usize| -> Result<u16> {
        let b = elf.get(at..at + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| -> Result<u32> {
        let b = elf.get(at..at + 4).context("truncated ELF")?;
        Ok(u32::from_le_bytes(b.try_into()?))
    };
    let u64_at = |at: usize| -> Result<u64> {
        let b = elf.get(at..at + 8).context("truncated ELF")?;
        Ok(u64::from_le_bytes(b.try_into()?))
    };
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let section = |i: usize| shoff + i * shentsize;
    let mut symbols = Vec::new();
    for i in 0..shnum {
        if u32_at(section(i) + 4)? != SHT_SYMTAB {
            continue;
        }
        let offset = u64_at(section(i) + 0x18)? as usize;
        let size = u64_at(section(i) + 0x20)? as usize;
        let strtab = section(u32_at(section(i) + 0x28)? as usize);
        let str_offset = u64_at(strtab + 0x18)? as usize;
        for sym in (offset..offset + size).step_by(24) {
            let info = *elf.get(sym + 4).context("truncated symbol")?;
            let (value, len) = (u64_at(sym + 8)?, u64_at(sym + 16)?);
            if info & 0xf != STT_FUNC || len == 0 {
                continue;
            }
            let name_at = str_offset + u32_at(sym)? as usize;
            let raw = elf
                .get(name_at..)
                .and_then(|s| s.split(|b| *b == 0).next())
                .context("symbol name outside the string table")?;
            symbols.push(Symbol {
                start: value,
                end: value + len,
                name: demangle(&String::from_utf8_lossy(raw)),
            });
        }
    }
    if symbols.is_empty() {
        bail!("the guest image has no function symbols (stripped?)");
    }
    symbols.sort_by_key(|s| s.start);
    Ok(symbols)
}

/// A legacy Rust symbol (`_ZN` length-prefixed parts `E`) as a path without
/// its hash; any other name as it is.
fn demangle(raw: &str) -> String {
    let Some(mut rest) = raw.strip_prefix("_ZN") else {
        return raw.to_string();
    };
    let mut parts = Vec::new();
    while let Some(digits) = rest.find(|c: char| !c.is_ascii_digit()).filter(|n| *n > 0) {
        let Ok(len) = rest[..digits].parse::<usize>() else {
            break;
        };
        let Some(part) = rest.get(digits..digits + len) else {
            break;
        };
        // A part that would begin with `$` is mangled with a `_` before it.
        parts.push(
            part.strip_prefix('_')
                .filter(|p| p.starts_with('$'))
                .unwrap_or(part),
        );
        rest = &rest[digits + len..];
    }
    if parts
        .last()
        .is_some_and(|p| p.len() == 17 && p.starts_with('h'))
    {
        parts.pop();
    }
    let path = parts.join("::");
    [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$u20$", " "),
        ("$C$", ","),
        ("$RF$", "&"),
        ("..", "::"),
    ]
    .iter()
    .fold(path, |s, (from, to)| s.replace(from, to))
}

fn symbol_of(symbols: &[Symbol], rip: u64) -> &str {
    let at = symbols.partition_point(|s| s.start <= rip);
    match at.checked_sub(1).map(|i| &symbols[i]) {
        Some(s) if rip < s.end => &s.name,
        _ => "(no symbol)",
    }
}

/// One request as it was stepped through.
#[derive(Debug, Serialize)]
pub struct RequestProfile {
    pub kind: &'static str,
    pub instructions: u64,
    pub exits: u64,
    pub trapped_exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub hlt_exits: u64,
    pub by_function: BTreeMap<String, u64>,
}

struct Stepping {
    kind: &'static str,
    /// Whether the next entry single-steps: not over a `hlt` or a patch
    /// site, whose exits the run loop must see as such (stepped, a `hlt`
    /// ends in a debug exit and the guest runs on).
    stepping: bool,
    exits_before: ExitCounts,
    by_rip: BTreeMap<u64, u64>,
    replied: bool,
}

struct ProfileMode {
    queue: VecDeque<(&'static str, Vec<u8>)>,
    stepping: Option<Stepping>,
    done: Vec<(Stepping, ExitCounts)>,
    deadline: Instant,
}

impl ProfileMode {
    /// Counts the instruction the next entry runs, stepping over it unless
    /// it must exit as itself.
    fn record_step(&mut self, m: &mut Machine) -> Result<(), RunError> {
        let Some(s) = &mut self.stepping else {
            return Ok(());
        };
        let (rip, code) = m.vm.code_at_rip();
        *s.by_rip.entry(rip).or_default() += 1;
        let exits_itself = code.first() == Some(&HLT) || !m.vm.patches.trapped_run(rip).is_empty();
        if s.stepping == exits_itself {
            s.stepping = !exits_itself;
            single_step::set(&m.vm.vcpu, s.stepping).map_err(|e| RunError::Mode(Box::new(e)))?;
        }
        Ok(())
    }

    /// Hands the guest its next request and steps from there.
    fn start_next(&mut self, m: &mut Machine) -> Result<bool, RunError> {
        if m.vm.devices.net.rx_buffers_available(&m.vm.mem) == 0 {
            return Ok(false);
        }
        let Some((kind, frame)) = self.queue.pop_front() else {
            return Ok(false);
        };
        m.vm.devices
            .net
            .deliver_rx(&m.vm.mem, &frame)
            .map_err(|e| RunError::Mode(e.to_string().into()))?;
        m.raise_device_irqs();
        self.stepping = Some(Stepping {
            kind,
            exits_before: m.summary.exits.clone(),
            stepping: true,
            by_rip: BTreeMap::new(),
            replied: false,
        });
        single_step::set(&m.vm.vcpu, true).map_err(|e| RunError::Mode(Box::new(e)))?;
        Ok(m.inject_pending()?.is_some())
    }
}

impl Mode for ProfileMode {
    fn now_ns(&self) -> u64 {
        0
    }

    fn should_stop(
        &mut self,
        _m: &mut Machine,
        _pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        if self.stepping.is_none() && self.queue.is_empty() {
            return Ok(Some(StopReason::Requested));
        }
        Ok((Instant::now() > self.deadline).then_some(StopReason::Timeout))
    }

    fn resume(&mut self, m: &mut Machine, _pos: Position) -> Result<(), RunError> {
        self.record_step(m)
    }

    fn should_stop_between(
        &mut self,
        m: &mut Machine,
        _pos: Position,
    ) -> Result<Option<StopReason>, RunError> {
        self.record_step(m)?;
        Ok((Instant::now() > self.deadline).then_some(StopReason::Timeout))
    }

    fn trap(&mut self, _pos: Position, _site: &NondetSite) -> Result<TrapResult, RunError> {
        Ok(TrapResult {
            value: 0x1234_5678,
            aux: 0,
            ok: true,
        })
    }

    fn time_msr(&mut self, _pos: Position, _msr: u32) -> Result<u64, RunError> {
        Ok(0)
    }

    fn time_read(&mut self, _pos: Position, _port: u16, value: u8) -> Result<u8, RunError> {
        Ok(value)
    }

    fn output(
        &mut self,
        _m: &mut Machine,
        _pos: Position,
        kind: OutputKind,
        bytes: &[u8],
    ) -> Result<(), RunError> {
        match (kind, &mut self.stepping) {
            (OutputKind::Transmit, Some(s)) => s.replied = true,
            (OutputKind::Console, _) => eprint!("{}", String::from_utf8_lossy(bytes)),
            _ => {}
        }
        Ok(())
    }

    fn after_exit(&mut self, _m: &mut Machine, _pos: Position) -> Result<(), RunError> {
        Ok(())
    }

    /// A request ends at the first exit where its reply has gone out and the
    /// guest can take an interrupt again (idle, waiting for the next frame).
    fn deliver(&mut self, m: &mut Machine, _pos: Position, ready: bool) -> Result<bool, RunError> {
        if !ready {
            return Ok(false);
        }
        if self.stepping.as_ref().is_some_and(|s| s.replied) {
            let finished = self.stepping.take().expect("checked above");
            self.done.push((finished, m.summary.exits.clone()));
        }
        if self.stepping.is_some() || !m.vm.devices.net.is_active() {
            return Ok(false);
        }
        self.start_next(m)
    }

    fn wait_idle(&mut self, _m: &mut Machine, _pos: Position) -> Result<(), RunError> {
        if Instant::now() > self.deadline {
            return Err(RunError::Mode(
                "the profile's time limit passed with the guest idle".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }

    fn finish(
        &mut self,
        _m: &mut Machine,
        _pos: Position,
        _reason: StopReason,
        _at_position: bool,
    ) -> Result<(), RunError> {
        Ok(())
    }
}

/// The request frames: puts of fresh keys, gets of them, appends to them
/// and gets of keys that are missing, `per_kind` of each.
fn requests(per_kind: usize) -> Result<VecDeque<(&'static str, Vec<u8>)>> {
    let from = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 40000);
    let mut frames = VecDeque::new();
    let mut num = 0;
    for (kind, op) in [
        ("put", Op::Put),
        ("get", Op::Get),
        ("append", Op::Append),
        ("get missing", Op::Get),
    ] {
        for i in 0..per_kind {
            num += 1;
            let key = if kind == "get missing" {
                format!("missing-{i}")
            } else {
                format!("key-{i}")
            };
            let value = if op == Op::Get {
                Vec::new()
            } else {
                b"a value of some thirty-two bytes".to_vec()
            };
            let payload = Request {
                op,
                client_id: 0x5eed,
                request_num: num,
                key: key.into_bytes(),
                value,
            }
            .encode()?;
            frames.push_back((kind, Datagram { from, payload }.to_frame()?));
        }
    }
    Ok(frames)
}

#[derive(Debug, Serialize)]
pub struct Profile {
    pub workload: String,
    pub requests: Vec<RequestProfile>,
    /// Mean instructions per request by function, the costliest first.
    pub mean_by_function: Vec<(String, f64)>,
    pub mean_instructions: f64,
    pub mean_exits: f64,
}

pub fn bench_profile(args: &ProfileArgs) -> Result<()> {
    if !args.workload.serves_kv() {
        bail!("workload {} serves no KV requests", args.workload);
    }
    if args.workload.trap_instruction() == TrapInstruction::Out {
        bail!(
            "workload {} runs its service at CPL3, where a single step reaches the guest as #DB \
             instead of exiting to the VMM on this platform; profile `kv`, which runs the same code at CPL0",
            args.workload
        );
    }
    let symbols = function_symbols(GUEST_ELF)?;
    let mut vm = Vm::new(
        GUEST_ELF,
        VmConfig {
            workload: args.workload,
            ..VmConfig::default()
        },
    )?;
    let mut mode = ProfileMode {
        queue: requests(args.requests.max(1))?,
        stepping: None,
        done: Vec::new(),
        deadline: Instant::now() + Duration::from_secs_f64(args.timeout),
    };
    let stop = StopSignal::new();
    let summary = run_loop::run(&mut vm, &mut mode, &stop, false)?;
    if summary.reason != Some(StopReason::Requested) {
        bail!(
            "the guest stopped before every request was profiled: {:?}",
            summary.reason
        );
    }
    let requests: Vec<RequestProfile> = mode
        .done
        .iter()
        .map(|(s, after)| {
            let mut by_function = BTreeMap::new();
            for (rip, n) in &s.by_rip {
                *by_function
                    .entry(symbol_of(&symbols, *rip).to_string())
                    .or_default() += n;
            }
            let b = &s.exits_before;
            RequestProfile {
                kind: s.kind,
                instructions: s.by_rip.values().sum(),
                exits: after.synchronous - b.synchronous,
                trapped_exits: after.trapped - b.trapped,
                pio_exits: after.pio - b.pio,
                mmio_exits: after.mmio - b.mmio,
                hlt_exits: after.hlt - b.hlt,
                by_function,
            }
        })
        .collect();
    let n = requests.len().max(1) as f64;
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &requests {
        for (f, count) in &r.by_function {
            *totals.entry(f).or_default() += count;
        }
    }
    let mut mean_by_function: Vec<(String, f64)> = totals
        .into_iter()
        .map(|(f, c)| (f.to_string(), c as f64 / n))
        .collect();
    mean_by_function.sort_by(|a, b| b.1.total_cmp(&a.1));
    let profile = Profile {
        workload: args.workload.to_string(),
        mean_instructions: requests.iter().map(|r| r.instructions).sum::<u64>() as f64 / n,
        mean_exits: requests.iter().map(|r| r.exits).sum::<u64>() as f64 / n,
        requests,
        mean_by_function,
    };
    print_profile(&profile, args.top);
    write_json(args.json.as_deref(), &profile)
}

fn print_profile(p: &Profile, top: usize) {
    println!("workload {}: per request", p.workload);
    println!("kind          instructions  exits (trap pio mmio hlt)");
    for r in &p.requests {
        println!(
            "{:<13} {:<13} {} ({} {} {} {})",
            r.kind,
            r.instructions,
            r.exits,
            r.trapped_exits,
            r.pio_exits,
            r.mmio_exits,
            r.hlt_exits
        );
    }
    println!(
        "mean          {:<13.0} {:.2}",
        p.mean_instructions, p.mean_exits
    );
    println!("\nmean instructions per request by function");
    for (f, mean) in p.mean_by_function.iter().take(top) {
        println!(
            "{:>8.1}  {:>5.1}%  {f}",
            mean,
            100.0 * mean / p.mean_instructions.max(1.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_symbols_lose_their_hash() {
        assert_eq!(
            demangle("_ZN10ftvm_guest3net9parse_udp17h0123456789abcdefE"),
            "ftvm_guest::net::parse_udp"
        );
        assert_eq!(demangle("memcpy"), "memcpy");
        assert_eq!(
            demangle("_ZN44_$LT$usize$u20$as$u20$core..fmt..Display$GT$3fmt17h0123456789abcdefE"),
            "<usize as core::fmt::Display>::fmt"
        );
    }

    #[test]
    fn the_guest_image_has_its_request_path_symbols() {
        let symbols = function_symbols(GUEST_ELF).expect("symbols");
        let names: Vec<&str> = symbols.iter().map(|s| s.name.as_str()).collect();
        for wanted in ["_start", "ftvm_guest::net::parse_udp", "memcpy"] {
            assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
        }
        let parse = symbols
            .iter()
            .find(|s| s.name == "ftvm_guest::net::parse_udp")
            .expect("parse_udp");
        assert_eq!(symbol_of(&symbols, parse.start), parse.name);
    }
}
