//! ftvm-guest: the tiny x86_64 kernel that ftvm boots. By default it serves
//! the key-value protocol of docs/protocol.md over UDP on a virtio-net
//! device, following the VMM contract of docs/guest-abi.md; the boot-info
//! block can ask for another workload instead (`race`, `spin`) or beside it
//! (`kv-race`), built to test interrupts delivered between VM exits, or for
//! the same service run as a user task at CPL3 (`kv-user`, user.rs).
//!
//! It runs at CPL0, where this platform's KVM emulates every instruction, so
//! it does little per request and causes few VM exits: per request it traps
//! on one `rdtsc` and one `rdrand`, and the `hlt` of the idle loop lets the
//! device deliver the next frame and drain the replies. The request path's
//! functions are `#[inline(never)]`, which costs a call each, so that
//! `ftvm bench profile` can attribute its instructions by symbol.

#![no_std]
#![no_main]

mod background;
mod boot;
mod client_table;
mod entropy;
mod gdt;
mod idt;
mod kv;
mod mem;
mod net;
mod pic;
mod pit;
mod port;
mod race;
mod sched;
mod serial;
mod service;
mod shared;
mod spin;
mod user;
mod virtio_net;

use boot::{BootInfo, Workload};
use core::arch::asm;
use service::Service;
use shared::Shared;
use virtio_net::{Transmitter, VirtioNet};

/// Uptime between two stats lines.
const STATS_SECONDS: u64 = 5;

/// The store and client table (about 1.4 MiB, in .bss).
static SERVICE: Shared<Service> = Shared::new(Service::new());

/// Frames dropped below the KV protocol, and replies lost for want of a
/// transmit buffer.
struct NetCounters {
    dropped: u64,
    tx_full: u64,
}

/// The entry point: the VMM jumps here in long mode with RDI pointing to the
/// boot-info block and interrupts disabled.
#[no_mangle]
/// # Safety
/// Only the VMM calls it, once, with `boot_info` as the ABI says.
pub unsafe extern "C" fn _start(boot_info: *const [u8; boot::BLOCK_SIZE]) -> ! {
    // SAFETY: the ABI puts the 72-byte block at RDI (0x7000), identity
    // mapped, and nothing writes it.
    let info = match BootInfo::parse(unsafe { &*boot_info }, boot::image_end()) {
        Ok(info) => info,
        Err(reason) => fail("bad boot info: ", reason),
    };
    gdt::init();
    idt::init(info.workload, info.net_irq);
    print_banner(&info);
    pic::init(info.net_irq);
    pit::init(info.pit_divisor);
    match info.workload {
        Workload::Race => race::run(),
        Workload::Spin => spin::run(),
        Workload::SpinUser => {
            spin::announce();
            user::enter_spin()
        }
        Workload::Kv | Workload::KvRace | Workload::KvUser => {}
    }
    let rx_limit = match info.workload {
        Workload::KvUser => user::RX_ENTRIES,
        _ => virtio_net::QUEUE_SIZE,
    };
    let mut net = match VirtioNet::init(info.net_mmio_base as usize, rx_limit) {
        Ok(net) => net,
        Err(reason) => fail("virtio-net: ", reason),
    };
    serial::write_str("ftvm-guest: kv service ready on port ");
    serial::write_dec(info.service_port as u64);
    serial::write_str("\n");
    if info.workload == Workload::KvRace {
        background::start();
    }
    // SAFETY: this is the only place that takes the service; _start runs
    // once and never returns.
    let service = unsafe { &mut *SERVICE.get() };
    if info.workload == Workload::KvUser {
        user::enter_kv(info, net, service)
    }
    run(&info, &mut net, service)
}

/// The main loop. Interrupts are enabled only inside `sti; hlt`, and only
/// after the receive ring was found empty with interrupts disabled, so that
/// a frame arriving in between still ends the `hlt` with its interrupt.
/// With a background task (`kv-race`) the service yields to it instead of
/// halting; a received frame's interrupt switches back to the service. At
/// CPL3 (`kv-user`), where `cli` and `hlt` fault, interrupts stay enabled and
/// the idle port's check of the receive index closes the same window.
fn run(info: &BootInfo, net: &mut VirtioNet, service: &mut Service) -> ! {
    let stats_interval = STATS_SECONDS * info.tick_hz as u64;
    let mut next_stats = stats_interval;
    let mut counters = NetCounters {
        dropped: 0,
        tx_full: 0,
    };
    let user = info.workload == Workload::KvUser;
    loop {
        if !user {
            cli();
        }
        let mut received = false;
        while let Some(buffer) = net.rx.next() {
            received = true;
            if info.workload == Workload::KvRace {
                background::count_request();
            }
            handle_frame(
                info,
                net.rx.frame(&buffer),
                &mut net.tx,
                service,
                &mut counters,
            );
            net.rx.repost(buffer);
        }
        if received && info.workload == Workload::KvRace {
            net.tx.flush();
        }
        net.tx.reclaim();
        let ticks = pit::ticks();
        if ticks >= next_stats {
            print_stats(info.workload, service, &counters, ticks);
            next_stats = (ticks / stats_interval + 1) * stats_interval;
        }
        if !received {
            match info.workload {
                Workload::KvRace => sched::yield_now(),
                Workload::KvUser => port::idle(net.rx.seen()),
                _ => sti_hlt(),
            }
        }
    }
}

fn handle_frame(
    info: &BootInfo,
    frame: &[u8],
    tx: &mut Transmitter,
    service: &mut Service,
    counters: &mut NetCounters,
) {
    let Some((from, datagram)) = net::parse_udp(frame, info.guest_ip, info.service_port) else {
        counters.dropped += 1;
        return;
    };
    // Taken before the request runs: a request must not execute when its
    // reply cannot be sent (the client's retry will run it).
    let Some(buffer) = tx.alloc() else {
        counters.tx_full += 1;
        return;
    };
    let frame = tx.frame_mut(&buffer);
    let reply_len = service.handle(datagram, &mut frame[net::HEADERS_LEN..]);
    match reply_len.and_then(|len| net::write_headers(frame, &from.reversed(), len)) {
        Some(frame_len) => tx.send(buffer, frame_len),
        None => tx.release(buffer),
    }
}

fn print_banner(info: &BootInfo) {
    serial::write_str("ftvm-guest: booted mem=");
    serial::write_dec(info.mem_size >> 20);
    serial::write_str("MiB mac=");
    for (i, b) in info.guest_mac.iter().enumerate() {
        if i > 0 {
            serial::write_str(":");
        }
        serial::write_hex_byte(*b);
    }
    serial::write_str(" ip=");
    for (i, b) in info.guest_ip.iter().enumerate() {
        if i > 0 {
            serial::write_str(".");
        }
        serial::write_dec(*b as u64);
    }
    serial::write_str(" port=");
    serial::write_dec(info.service_port as u64);
    serial::write_str(" hz=");
    serial::write_dec(info.tick_hz as u64);
    serial::write_str(" workload=");
    serial::write_str(info.workload.name());
    serial::write_str("\n");
}

fn print_stats(workload: Workload, service: &Service, counters: &NetCounters, ticks: u64) {
    serial::write_str("ftvm-guest: stats requests=");
    serial::write_dec(service.requests);
    serial::write_str(" keys=");
    serial::write_dec(service.keys() as u64);
    serial::write_str(" ticks=");
    serial::write_dec(ticks);
    serial::write_str(" malformed=");
    serial::write_dec(counters.dropped + service.not_ours);
    serial::write_str(" bad=");
    serial::write_dec(service.bad_requests);
    serial::write_str(" txfull=");
    serial::write_dec(counters.tx_full);
    if workload == Workload::KvRace {
        let (rounds, shared) = background::counters();
        serial::write_str(" bg=");
        serial::write_dec(rounds);
        serial::write_str(" shared=");
        serial::write_dec(shared);
        serial::write_str(" switches=");
        serial::write_dec(sched::switches());
    }
    serial::write_str("\n");
}

fn fail(what: &str, reason: &str) -> ! {
    serial::write_str("ftvm-guest: ");
    serial::write_str(what);
    serial::write_str(reason);
    serial::write_str("\n");
    port::exit(port::EXIT_BOOT_FAILED)
}

fn cli() {
    // SAFETY: masking interrupts on the only CPU; also a compiler barrier,
    // so no memory access moves across it.
    unsafe { asm!("cli", options(nostack)) }
}

/// Enables interrupts and halts until the next one; the `sti` shadow makes
/// the pair atomic, so no interrupt is taken between them.
fn sti_hlt() {
    // SAFETY: every interrupt gate uses an IST stack, so an interrupt during
    // the halt does not touch this stack (or its red zone).
    unsafe { asm!("sti", "hlt", options(nostack)) }
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo) -> ! {
    serial::write_str("\nftvm-guest: PANIC");
    if let Some(location) = panic.location() {
        serial::write_str(" at ");
        serial::write_str(location.file());
        serial::write_str(":");
        serial::write_dec(location.line() as u64);
    }
    serial::write_str("\n");
    port::exit(port::EXIT_PANIC)
}
