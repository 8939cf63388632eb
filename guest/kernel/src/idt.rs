//! The IDT: CPU exceptions 0..32 stop the VM with a report on the console;
//! the 16 PIC vectors count timer ticks or do nothing, except for the
//! workloads with tasks, where the timer and the network interrupt enter the
//! scheduler. Every gate switches to an IST stack (see gdt.rs).

use crate::boot::Workload;
use crate::gdt::{CODE_SELECTOR, IST_DEBUG, IST_EXCEPTION, IST_FATAL, IST_IRQ};
use crate::pic::{MASTER_VECTOR, TIMER_IRQ};
use crate::sched;
use crate::shared::Shared;
use crate::{port, serial};
use core::arch::{asm, global_asm};

const EXCEPTIONS: usize = 32;
const IRQS: usize = 16;
const GATES: usize = MASTER_VECTOR as usize + IRQS;

/// Present, DPL 0, 64-bit interrupt gate (clears IF on entry).
const INTERRUPT_GATE: u64 = 0x8e;

#[repr(C, align(16))]
struct Idt([u64; 2 * GATES]);

static IDT: Shared<Idt> = Shared::new(Idt([0; 2 * GATES]));

global_asm!(
    ".section .text.ftvm_isr, \"ax\"",
    // Exceptions without an error code push a zero one, so that every
    // exception reaches the common path with the same frame:
    // [vector, error, rip, cs, rflags, rsp, ss].
    ".macro FTVM_EXC_NOERR n",
    "ftvm_exc_\\n:",
    "push 0",
    "push \\n",
    "jmp ftvm_exc_common",
    ".endm",
    ".macro FTVM_EXC_ERR n",
    "ftvm_exc_\\n:",
    "push \\n",
    "jmp ftvm_exc_common",
    ".endm",
    ".irp n, 0,2,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "FTVM_EXC_NOERR \\n",
    ".endr",
    // #DB and #BP first tell the VMM, whose replay may have caused them to
    // stop the guest at one instruction: it then takes the exception back
    // (frame, registers, stack) and the rest never runs. Without the VMM's
    // doing they are reported like any other exception. `al` is the
    // interrupted code's: the handler must not change a register before
    // the exit.
    ".irp n, 1,3",
    "ftvm_exc_\\n:",
    "out {debug_port}, al",
    "push 0",
    "push \\n",
    "jmp ftvm_exc_common",
    ".endr",
    ".irp n, 8,10,11,12,13,14,17,21,29,30",
    "FTVM_EXC_ERR \\n",
    ".endr",
    // The handler never returns, so no register needs saving.
    "ftvm_exc_common:",
    "cld",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    // The timer handler is one instruction: interrupts cannot nest, and the
    // main loop only reads the counter.
    ".global ftvm_irq_timer",
    "ftvm_irq_timer:",
    "add qword ptr [rip + {ticks}], 1",
    "iretq",
    // The virtio-net interrupt only has to end `hlt`; the main loop then
    // polls the used ring. InterruptStatus is deliberately not read or
    // acknowledged: each MMIO access is a VM exit.
    ".global ftvm_irq_ignore",
    "ftvm_irq_ignore:",
    "iretq",
    ".section .rodata.ftvm_isr, \"a\"",
    ".balign 8",
    ".global ftvm_exception_stubs",
    "ftvm_exception_stubs:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad ftvm_exc_\\n",
    ".endr",
    ".text",
    handler = sym exception,
    debug_port = const port::DEBUG_TRAP_PORT,
    ticks = sym crate::pit::TICKS,
);

extern "C" {
    static ftvm_exception_stubs: [u64; EXCEPTIONS];
    fn ftvm_irq_timer();
    fn ftvm_irq_ignore();
}

/// Fills and loads the IDT for `workload`, whose network interrupt (if it
/// uses one) is `net_irq`. Called once at boot, interrupts off, after the
/// GDT and TSS that the gates refer to are loaded.
pub fn init(workload: Workload, net_irq: u8) {
    // SAFETY: the stub table is immutable data defined in global_asm above.
    let stubs = unsafe { &ftvm_exception_stubs };
    // SAFETY: boot runs once on the only CPU and the IDT is not loaded yet.
    let idt = unsafe { &mut (*IDT.get()).0 };
    for (vector, &stub) in stubs.iter().enumerate() {
        let ist = match vector {
            2 | 8 | 18 => IST_FATAL,
            1 | 3 => IST_DEBUG,
            _ => IST_EXCEPTION,
        };
        set_gate(idt, vector, stub, ist);
    }
    let tasks = matches!(workload, Workload::Race | Workload::KvRace);
    for irq in 0..IRQS {
        let stub: unsafe extern "C" fn() = match irq as u8 {
            TIMER_IRQ if tasks => sched::ftvm_sched_timer,
            TIMER_IRQ => ftvm_irq_timer,
            irq if irq == net_irq && workload == Workload::KvRace => sched::ftvm_sched_net,
            _ => ftvm_irq_ignore,
        };
        set_gate(
            idt,
            MASTER_VECTOR as usize + irq,
            stub as *const () as u64,
            IST_IRQ,
        );
    }

    let pointer = crate::gdt::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: every gate of the table is filled with a valid handler.
    unsafe { asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

fn set_gate(idt: &mut [u64; 2 * GATES], vector: usize, handler: u64, ist: u8) {
    idt[2 * vector] = (handler & 0xffff)
        | (CODE_SELECTOR as u64) << 16
        | (ist as u64) << 32
        | INTERRUPT_GATE << 40
        | (handler >> 16 & 0xffff) << 48;
    idt[2 * vector + 1] = handler >> 32;
}

#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const NAMES: [&str; 21] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE",
];

const PAGE_FAULT: u64 = 14;

extern "C" fn exception(frame: &ExceptionFrame) -> ! {
    serial::write_str("\nEXCEPTION ");
    match NAMES.get(frame.vector as usize) {
        Some(name) => serial::write_str(name),
        None => serial::write_str("#"),
    }
    serial::write_str("(");
    serial::write_dec(frame.vector);
    serial::write_str(") rip=");
    serial::write_hex(frame.rip);
    serial::write_str(" err=");
    serial::write_hex(frame.error);
    if frame.vector == PAGE_FAULT {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effects.
        unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) }
        serial::write_str(" cr2=");
        serial::write_hex(cr2);
    }
    serial::write_str(" rsp=");
    serial::write_hex(frame.rsp);
    serial::write_str("\n");
    port::exit(port::EXIT_EXCEPTION)
}
