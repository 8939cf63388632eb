//! A round-robin scheduler for the `race` and `kv-race` workloads: tasks
//! with their own stacks, switched by the timer interrupt, by the network
//! interrupt (which hands the CPU to the service, task 0) and by a task that
//! yields ([`yield_now`]).
//!
//! Every switch happens with interrupts off in a stub that pushes the 15
//! general registers under an interrupt frame (the CPU's, on the IRQ IST
//! stack, or the one [`yield_now`] builds on the task's stack); [`switch`]
//! swaps that whole frame with the next task's saved one, so `iretq`
//! resumes the other task exactly where it was interrupted. A task
//! can therefore lose the CPU between any two instructions where it has
//! interrupts enabled, which is the point of these workloads.

use crate::pit::TICKS;
use crate::shared::Shared;
use core::arch::{asm, global_asm};
use core::sync::atomic::Ordering;

pub const MAX_TASKS: usize = 4;
const TASK_STACK_SIZE: usize = 16384;

/// The registers a stub leaves on the IST stack, lowest address first: the
/// 15 pushed general registers (r15 last pushed), then the CPU's frame.
const FRAME_WORDS: usize = 20;
type Frame = [u64; FRAME_WORDS];
const FRAME_RDI: usize = 9;
const FRAME_RIP: usize = 15;
const FRAME_CS: usize = 16;
const FRAME_RFLAGS: usize = 17;
const FRAME_RSP: usize = 18;
const FRAME_SS: usize = 19;

/// Why the scheduler runs; the stubs pass it in RSI.
const REASON_TIMER: u64 = 0;
const REASON_NET: u64 = 1;
const REASON_YIELD: u64 = 2;

/// RFLAGS of a new task: interrupts enabled, and the always-one bit 1.
const NEW_TASK_RFLAGS: u64 = 0x202;

struct Scheduler {
    frames: [Frame; MAX_TASKS],
    count: usize,
    current: usize,
    finished: [bool; MAX_TASKS],
    switches: u64,
}

static SCHEDULER: Shared<Scheduler> = Shared::new(Scheduler {
    frames: [[0; FRAME_WORDS]; MAX_TASKS],
    count: 1,
    current: 0,
    finished: [false; MAX_TASKS],
    switches: 0,
});

#[repr(C, align(16))]
struct Stacks([[u8; TASK_STACK_SIZE]; MAX_TASKS]);

static STACKS: Shared<Stacks> = Shared::new(Stacks([[0; TASK_STACK_SIZE]; MAX_TASKS]));

global_asm!(
    ".section .text.ftvm_sched, \"ax\"",
    // 5 words of frame (RSP ≡ 8 mod 16: the CPU, like `yield_now`, starts
    // it 16-aligned) and 15 registers leave RSP 16-aligned for the call.
    ".macro FTVM_SCHED_STUB name, reason",
    ".global \\name",
    "\\name:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "cld",
    "mov rdi, rsp",
    "mov esi, \\reason",
    "call {switch}",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "iretq",
    ".endm",
    "FTVM_SCHED_STUB ftvm_sched_timer, {timer}",
    "FTVM_SCHED_STUB ftvm_sched_net, {net}",
    "FTVM_SCHED_STUB ftvm_sched_yield, {yield_}",
    ".text",
    switch = sym switch,
    timer = const REASON_TIMER,
    net = const REASON_NET,
    yield_ = const REASON_YIELD,
);

extern "C" {
    pub fn ftvm_sched_timer();
    pub fn ftvm_sched_net();
    fn ftvm_sched_yield();
}

/// Makes the running code task 0 and prepares `count - 1` more tasks, each
/// to start in `entry(index)` on its own stack with interrupts enabled.
/// Called once, with interrupts disabled, before the first switch.
pub fn init(count: usize, entry: extern "C" fn(u64) -> !) {
    // SAFETY: interrupts are off and no switch has happened yet, so nothing
    // else touches the scheduler; the stack tops are computed from the
    // static's address without creating references to the stacks.
    unsafe {
        let s = &mut *SCHEDULER.get();
        s.count = count.clamp(1, MAX_TASKS);
        let stacks = STACKS.get();
        for index in 1..s.count {
            let top = core::ptr::addr_of_mut!((*stacks).0[index]) as u64 + TASK_STACK_SIZE as u64;
            let frame = &mut s.frames[index];
            frame[FRAME_RIP] = entry as usize as u64;
            frame[FRAME_CS] = crate::gdt::CODE_SELECTOR as u64;
            frame[FRAME_RFLAGS] = NEW_TASK_RFLAGS;
            // As a call would leave it: RSP ≡ 8 (mod 16) at the entry.
            frame[FRAME_RSP] = top - 8;
            frame[FRAME_SS] = crate::gdt::DATA_SELECTOR as u64;
            frame[FRAME_RDI] = index as u64;
        }
    }
}

/// Marks the calling task finished and gives the CPU away for good; returns
/// only if it was the last task, which then has the CPU to itself.
pub fn finish() {
    without_interrupts(|| {
        // SAFETY: interrupts are off, so no switch runs concurrently.
        let s = unsafe { &mut *SCHEDULER.get() };
        s.finished[s.current] = true;
    });
    if !all_finished() {
        yield_now();
    }
}

fn all_finished() -> bool {
    without_interrupts(|| {
        // SAFETY: interrupts are off, so no switch runs concurrently.
        let s = unsafe { &*SCHEDULER.get() };
        s.finished[..s.count].iter().all(|f| *f)
    })
}

/// Hands the CPU to the next task; returns when this task is scheduled
/// again. It builds the frame an interrupt would push (this platform's CPL0
/// emulator cannot run `int n`) and jumps to the yield stub, which works on
/// this task's stack; the red zone below RSP is stepped over first.
pub fn yield_now() {
    // SAFETY: the frame makes the stub's `iretq` come back to label 2 with
    // this task's RSP, RFLAGS and selectors, and the stub restores every
    // general register; interrupts are off from the `cli` until that
    // `iretq` restores the flags pushed before it.
    unsafe {
        asm!(
            "sub rsp, 128",
            "mov {tmp}, rsp",
            "push {ss}",
            "push {tmp}",
            "pushfq",
            "cli",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "jmp {stub}",
            "2:",
            "add rsp, 128",
            tmp = out(reg) _,
            ss = const crate::gdt::DATA_SELECTOR as u64,
            cs = const crate::gdt::CODE_SELECTOR as u64,
            stub = sym ftvm_sched_yield,
        )
    }
}

/// Context switches so far (a snapshot: a switch may follow at once).
pub fn switches() -> u64 {
    // SAFETY: a volatile read of an aligned u64 that only the scheduler
    // writes, in one instruction; no reference to the scheduler is formed.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*SCHEDULER.get()).switches)) }
}

/// Runs `f` with interrupts disabled, then enables them again. Tasks run
/// with interrupts enabled, so there is nothing else to restore.
pub fn without_interrupts<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: masking interrupts on the only CPU; also a compiler barrier.
    unsafe { asm!("cli", options(nostack)) }
    let value = f();
    // SAFETY: tasks always run with interrupts enabled (see above).
    unsafe { asm!("sti", options(nostack)) }
    value
}

/// Called by the stubs with interrupts off: counts a tick, picks the task
/// to resume and swaps `frame` with it.
extern "C" fn switch(frame: *mut Frame, reason: u64) {
    // SAFETY: interrupt gates run with interrupts off on the only CPU, so
    // this is the only code touching the scheduler; `frame` points at the
    // stub's save area on the IST stack.
    let (s, frame) = unsafe { (&mut *SCHEDULER.get(), &mut *frame) };
    if reason == REASON_TIMER {
        TICKS.store(TICKS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
    let next = match reason {
        // The network interrupt is for the service.
        REASON_NET if !s.finished[0] => 0,
        _ => (1..=s.count)
            .map(|step| (s.current + step) % s.count)
            .find(|task| !s.finished[*task])
            .unwrap_or(s.current),
    };
    if next == s.current {
        return;
    }
    s.frames[s.current] = *frame;
    *frame = s.frames[next];
    s.current = next;
    s.switches += 1;
}
