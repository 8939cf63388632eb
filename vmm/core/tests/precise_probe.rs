//! Probes of what exact interrupt delivery relies on, run against this
//! machine's KVM with hand-assembled guest code: a `hlt` breakpoint written
//! while the guest runs, a single step over one instruction, a signal kick
//! in the middle of a loop that makes no exit, and an interrupt injected at
//! that asynchronous exit, which must land at the very instruction the kick
//! stopped at. Each test stops the process after a minute should KVM hang.
//!
//! The KVM tests fail loudly when `/dev/kvm` is unusable;
//! `FTVM_SKIP_KVM_TESTS=1` skips them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::run::breakpoint::{Breakpoint, Disarmed};
use ftvm_core::run::single_step;
use ftvm_core::run::vm::{Vm, VmConfig};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

/// Guest code, a handler and an IDT, in RAM the guest image does not use.
const CODE: u64 = 0x100_0000;
const HANDLER: u64 = 0x100_1000;
const IDT: u64 = 0x100_2000;
const OUT_CODE: u64 = 0x100_3000;
const TIMER_VECTOR: u64 = 0x20;

/// `inc rax; inc rbx; jmp CODE`: a loop with no VM exit.
const LOOP: [u8; 8] = [0x48, 0xff, 0xc0, 0x48, 0xff, 0xc3, 0xeb, 0xf8];
const INC_RBX: u64 = CODE + 3;
const JMP: u64 = CODE + 6;
/// `mov dx, 0x3f8; mov al, 0x41; out dx, al; hlt`.
const OUT: [u8; 8] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4];
const RFLAGS_IF: u64 = 0x200;
const RFLAGS_TF: u64 = 0x100;

fn vm() -> Option<Vm> {
    match Vm::new(GUEST_ELF, VmConfig::default()) {
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

/// Ends the process if a test is still running after a minute: a probe
/// that hangs inside KVM must not hang the test run.
fn watchdog() -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let seen = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        if !seen.load(Ordering::SeqCst) {
            eprintln!("a KVM probe hung for 60 s");
            std::process::exit(101);
        }
    });
    done
}

/// Puts `code` at `at` and the vCPU there with `rflags`, all other
/// general registers zero.
fn start_at(vm: &mut Vm, at: u64, code: &[u8], rflags: u64) {
    vm.mem
        .write_slice(code, GuestAddress(at))
        .expect("write the probe code");
    let mut regs = vm.vcpu.get_regs().expect("regs");
    regs.rax = 0;
    regs.rbx = 0;
    regs.rip = at;
    regs.rflags = rflags;
    vm.vcpu.set_regs(&regs).expect("set regs");
}

/// An IDT whose timer vector enters `hlt` at HANDLER, with no stack switch.
fn install_idt(vm: &mut Vm) {
    vm.mem
        .write_slice(&[0xf4, 0xeb, 0xfe], GuestAddress(HANDLER))
        .expect("handler");
    let gate_low = (HANDLER & 0xffff) | 0x08 << 16 | 0x8e << 40 | (HANDLER >> 16 & 0xffff) << 48;
    let at = IDT + TIMER_VECTOR * 16;
    vm.mem.write_obj(gate_low, GuestAddress(at)).expect("gate");
    vm.mem
        .write_obj(HANDLER >> 32, GuestAddress(at + 8))
        .expect("gate");
    let mut sregs = vm.vcpu.get_sregs().expect("sregs");
    sregs.idt.base = IDT;
    sregs.idt.limit = ((TIMER_VECTOR + 1) * 16 - 1) as u16;
    vm.vcpu.set_sregs(&sregs).expect("set sregs");
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Hlt,
    Debug,
    Interrupted,
    IoOut(u16, Vec<u8>),
    Other(String),
}

fn run_once(vm: &mut Vm) -> Stop {
    match vm.vcpu.run() {
        Ok(VcpuExit::Hlt) => Stop::Hlt,
        Ok(VcpuExit::Debug(_)) => Stop::Debug,
        Ok(VcpuExit::IoOut(port, data)) => Stop::IoOut(port, data.to_vec()),
        Ok(VcpuExit::Intr) => Stop::Interrupted,
        Err(e) if e.errno() == libc::EINTR => Stop::Interrupted,
        Ok(other) => Stop::Other(format!("{other:?}")),
        Err(e) => Stop::Other(e.to_string()),
    }
}

fn rip(vm: &Vm) -> u64 {
    vm.vcpu.get_regs().expect("regs").rip
}

/// Moves RIP back onto the breakpoint's instruction, as a hit needs.
fn rewind(vm: &mut Vm, to: u64) {
    let mut regs = vm.vcpu.get_regs().expect("regs");
    regs.rip = to;
    vm.vcpu.set_regs(&regs).expect("set regs");
}

/// Runs exactly one instruction at RIP with stepping on.
fn step(vm: &mut Vm) -> Stop {
    single_step::set(&vm.vcpu, true).expect("step on");
    let stop = run_once(vm);
    single_step::set(&vm.vcpu, false).expect("step off");
    stop
}

#[test]
fn a_hlt_breakpoint_stops_the_loop_and_a_single_step_passes_it() {
    let Some(mut vm) = vm() else { return };
    let done = watchdog();
    start_at(&mut vm, CODE, &LOOP, 0x2);
    let mut bp = Breakpoint::new(&vm.vcpu, &vm.mem, INC_RBX).expect("breakpoint");
    assert!(!bp.is_hlt());
    for pass in 1..=3u64 {
        bp.arm(&vm.mem);
        assert_eq!(run_once(&mut vm), Stop::Hlt, "pass {pass}");
        let regs = vm.vcpu.get_regs().expect("regs");
        assert!(bp.is_hit(regs.rip), "hlt exit at {:#x}", regs.rip);
        assert_eq!(
            (regs.rax, regs.rbx),
            (pass, pass - 1),
            "stopped before `inc rbx`"
        );
        assert_eq!(bp.disarm(&vm.mem), Disarmed::Restored);
        let byte: u8 = vm.mem.read_obj(GuestAddress(INC_RBX)).expect("byte");
        assert_eq!(byte, 0x48, "the original byte is back");
        rewind(&mut vm, INC_RBX);
        assert_eq!(step(&mut vm), Stop::Debug, "pass {pass}");
        let regs = vm.vcpu.get_regs().expect("regs");
        assert_eq!(regs.rip, JMP, "one instruction, no more");
        assert_eq!(regs.rbx, pass);
        assert_eq!(regs.rflags & RFLAGS_TF, 0, "KVM hides its trap flag");
        // The sync copy that the run loop reads agrees.
        assert_eq!(vm.vcpu.sync_regs().regs.rip, JMP);
    }
    // With stepping off again the loop runs freely: a kick is what stops it.
    let thread = current_thread();
    let kicker = kick_after(thread, Duration::from_millis(50));
    assert_eq!(run_once(&mut vm), Stop::Interrupted);
    kicker.join().expect("kicker");
    assert!(vm.vcpu.get_regs().expect("regs").rax > 1000);
    done.store(true, Ordering::SeqCst);
}

#[test]
fn an_interrupt_injected_at_a_kick_lands_at_the_kicked_instruction() {
    let Some(mut vm) = vm() else { return };
    let done = watchdog();
    install_idt(&mut vm);
    start_at(&mut vm, CODE, &LOOP, 0x2 | RFLAGS_IF);
    let thread = current_thread();
    for attempt in 0..5 {
        let kicker = kick_after(thread, Duration::from_millis(30));
        let stop = run_once(&mut vm);
        kicker.join().expect("kicker");
        assert_eq!(stop, Stop::Interrupted, "attempt {attempt}");
        let at = vm.vcpu.get_regs().expect("regs");
        assert_eq!(
            vm.vcpu.sync_regs().regs,
            at,
            "the sync copy is valid at a signal exit"
        );
        let (ready, if_flag) = {
            let run = vm.vcpu.get_kvm_run();
            (run.ready_for_interrupt_injection, run.if_flag)
        };
        let events = vm.vcpu.get_vcpu_events().expect("events");
        assert_eq!(
            (ready, if_flag, events.interrupt.shadow),
            (1, 1, 0),
            "a loop with IF set can take an interrupt at a kick"
        );
        vm.inject(TIMER_VECTOR as u8).expect("inject");
        assert_eq!(run_once(&mut vm), Stop::Hlt);
        let inside = vm.vcpu.get_regs().expect("regs");
        assert_eq!(inside.rip, HANDLER + 1, "in the handler");
        let pushed_rip: u64 = vm.mem.read_obj(GuestAddress(inside.rsp)).expect("frame");
        let pushed_flags: u64 = vm
            .mem
            .read_obj(GuestAddress(inside.rsp + 16))
            .expect("frame");
        assert_eq!(
            pushed_rip, at.rip,
            "the interrupt came at the kicked instruction"
        );
        assert_eq!(pushed_flags, at.rflags);
        assert_eq!(
            (inside.rax, inside.rbx),
            (at.rax, at.rbx),
            "nothing ran in between"
        );
        // Back to the loop, as `iretq` would go.
        let mut regs = at;
        regs.rsp = inside.rsp + 40;
        vm.vcpu.set_regs(&regs).expect("set regs");
    }
    done.store(true, Ordering::SeqCst);
}

#[test]
fn a_step_into_an_instruction_that_exits_gives_that_exit() {
    let Some(mut vm) = vm() else { return };
    let done = watchdog();
    start_at(&mut vm, OUT_CODE, &OUT, 0x2);
    assert_eq!(step(&mut vm), Stop::Debug, "mov dx");
    assert_eq!(step(&mut vm), Stop::Debug, "mov al");
    assert_eq!(step(&mut vm), Stop::IoOut(0x3f8, vec![0x41]));
    // Stepping is off again: the `out` completes and the guest runs on to
    // the `hlt`, with no debug exit in between.
    assert_eq!(run_once(&mut vm), Stop::Hlt);
    assert_eq!(rip(&vm), OUT_CODE + OUT.len() as u64);
    done.store(true, Ordering::SeqCst);
}

#[test]
fn a_breakpoint_on_a_hlt_changes_nothing_and_is_hit_by_it() {
    let Some(mut vm) = vm() else { return };
    let done = watchdog();
    start_at(&mut vm, OUT_CODE, &OUT, 0x2);
    let hlt_at = OUT_CODE + OUT.len() as u64 - 1;
    let mut bp = Breakpoint::new(&vm.vcpu, &vm.mem, hlt_at).expect("breakpoint");
    assert!(bp.is_hlt());
    bp.arm(&vm.mem);
    assert!(!bp.is_armed(), "nothing to write over a hlt");
    assert!(matches!(run_once(&mut vm), Stop::IoOut(0x3f8, _)));
    assert_eq!(run_once(&mut vm), Stop::Hlt);
    assert!(bp.is_hit(rip(&vm)));
    done.store(true, Ordering::SeqCst);
}

#[test]
fn a_guest_write_over_an_armed_breakpoint_is_kept() {
    let Some(mut vm) = vm() else { return };
    start_at(&mut vm, CODE, &LOOP, 0x2);
    let mut bp = Breakpoint::new(&vm.vcpu, &vm.mem, INC_RBX).expect("breakpoint");
    bp.arm(&vm.mem);
    vm.mem
        .write_obj(0x90u8, GuestAddress(INC_RBX))
        .expect("a write as the guest would make it");
    assert_eq!(bp.disarm(&vm.mem), Disarmed::GuestWrote(0x90));
    let byte: u8 = vm.mem.read_obj(GuestAddress(INC_RBX)).expect("byte");
    assert_eq!(byte, 0x90);
}

/// What a breakpoint hit that is not the wanted one costs: the `hlt` exit,
/// putting the byte back, one step, and arming again. Printed for
/// BENCHMARKS.md (`cargo test --release -p ftvm-core --test precise_probe
/// -- --nocapture`).
#[test]
fn cost_of_a_hit_that_is_stepped_over() {
    let Some(mut vm) = vm() else { return };
    let done = watchdog();
    start_at(&mut vm, CODE, &LOOP, 0x2);
    let mut bp = Breakpoint::new(&vm.vcpu, &vm.mem, INC_RBX).expect("breakpoint");
    const HITS: u64 = 2000;
    let started = Instant::now();
    for _ in 0..HITS {
        bp.arm(&vm.mem);
        assert_eq!(run_once(&mut vm), Stop::Hlt);
        bp.disarm(&vm.mem);
        rewind(&mut vm, INC_RBX);
        assert_eq!(step(&mut vm), Stop::Debug);
    }
    let per_hit = started.elapsed() / HITS as u32;
    assert_eq!(vm.vcpu.get_regs().expect("regs").rbx, HITS);
    eprintln!("a breakpoint hit stepped over costs {per_hit:?} ({HITS} hits)");
    done.store(true, Ordering::SeqCst);
}

fn current_thread() -> libc::pthread_t {
    install_kick_handler();
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).expect("kick handler");
}

/// Signals `thread` once after `delay`; KVM_RUN returns EINTR.
fn kick_after(thread: libc::pthread_t, delay: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        // SAFETY: the test thread outlives this kicker (it joins it) and has
        // a no-op handler for the signal.
        unsafe {
            libc::pthread_kill(thread, kick_signal());
        }
    })
}
