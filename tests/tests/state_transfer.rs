//! Live state transfer to a joining backup, with real processes on
//! loopback (docs/fault-tolerance.md, "Joining", steps 4 and 5): a backup
//! that joins a primary serving under load, protects it and takes over
//! without losing an acknowledged write; a primary that dies during
//! pre-copy or at the cut, whose joining backup never goes live; a joining
//! backup that dies, after which the primary serves on and the next spare
//! joins; three failovers in a row with a spare brought up after each; and
//! a joining backup fed a bad transfer by a fake primary, which it refuses.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arbiter::{ArbiterClient, Member};
use ftvm_core::host::events::ServerEvent;
use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::machine::layout::DEFAULT_MEM_SIZE;
use ftvm_core::run::digest;
use ftvm_core::run::snapshot::{MachineState, VcpuState};
use ftvm_core::run::vm::{Vm, VmConfig};
use ftvm_harness::launcher::{Guest, Process};
use ftvm_tests::transfer::{
    assert_one_primary_per_view, await_event, await_protected, await_transfer_started, events_of,
    Load, Probe, Servers,
};
use ftvm_tests::{free_udp, kvm_available, vm_lock, VM_ID};
use logchannel::{
    image_hash, ChannelConfig, Cut, Handshaken, Hello, LogSender, Registers, Role, TransferWriter,
    Verdict,
};

fn is_diverged(e: &ServerEvent) -> bool {
    matches!(e, ServerEvent::Diverged { .. })
}

/// The figures a server's "replayed …" line gives: digests checked and
/// outputs reproduced.
fn replayed_counts(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().find(|l| l.contains(" digests checked"))?;
    let number_before = |what: &str| -> Option<u64> {
        let end = line.find(what)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    Some((
        number_before(" digests checked")?,
        number_before(" outputs reproduced")?,
    ))
}

#[test]
fn a_backup_joins_a_primary_serving_under_load_and_a_failover_afterwards_loses_nothing() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let started = Instant::now();
    let servers = Servers::start();
    let guest = Guest::default();
    let (mut primary, _) = servers.primary("p1", &guest, false);
    let load = Load::start(servers.arbiter_addr(), 3);
    // The primary serves alone, unprotected, for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert!(load.answered() > 0, "the primary alone answered nothing");
    let mut backup = servers.backup("b1", &guest);
    let protected = await_protected(&mut primary, &mut backup, Duration::from_secs(30));
    let ServerEvent::Protected {
        view,
        rounds,
        bytes,
        ..
    } = protected.event
    else {
        unreachable!()
    };
    assert_eq!(view, 2, "{protected:?}");
    assert!(rounds >= 1 && bytes > 0, "{protected:?}");
    // The backup compared the digest of the cut before it answered.
    assert!(backup.log().contains("digest verified"), "{}", backup.log());
    let restored_at = events_of(&backup, |e| matches!(e, ServerEvent::Restored { .. }))
        .into_iter()
        .find_map(|r| match r.event {
            ServerEvent::Restored { exits, .. } => Some(exits),
            _ => None,
        })
        .expect("a restored event");

    // The pair runs under load: the backup replays on from the cut,
    // checking every output and periodic digest (a mismatch is exit 3).
    let answered = load.answered();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        load.answered() > answered,
        "the protected pair answered nothing"
    );
    assert!(backup.running(), "{}", backup.log());
    assert!(
        !backup.has_event(is_diverged),
        "{:?}",
        events_of(&backup, is_diverged)
    );
    for failed in [
        events_of(&primary, |e| {
            matches!(
                e,
                ServerEvent::TransferFailed { .. } | ServerEvent::FailureDetected { .. }
            )
        }),
        events_of(&backup, |e| {
            matches!(e, ServerEvent::FailureDetected { .. })
        }),
    ] {
        assert!(failed.is_empty(), "{failed:?}");
    }
    // Past the next periodic digest (every 4096 exits), so that the
    // backup has checked one, however slowly the machine runs.
    let digest_at = (restored_at / 4096 + 1) * 4096;
    let deadline = Instant::now() + Duration::from_secs(30);
    while backup.last_status().is_none_or(|s| s.exits <= digest_at) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = backup.last_status().expect("the backup reports its status");
    assert!(
        status.exits > digest_at,
        "the backup did not replay past exit {digest_at} (the cut was at {restored_at}): {status:?}"
    );
    let held = primary.last_status().expect("the primary's status");
    assert!(
        held.outputs_held > 0,
        "no output waited for the backup: {held:?}"
    );

    // The primary dies: the backup takes over with every acknowledged
    // write.
    primary.kill();
    let live = await_event(&mut backup, "live", Duration::from_secs(10), |e| {
        matches!(e, ServerEvent::Live { .. })
    });
    assert_eq!(live.event, ServerEvent::Live { view: 3 });
    std::thread::sleep(Duration::from_millis(800));
    let acked = load.finish();
    assert_one_primary_per_view(&[&primary, &backup]);
    let status = backup.stop(Duration::from_secs(15)).expect("it stops");
    assert_eq!(status.code(), Some(0), "{}", backup.log());
    let (digests, outputs) = replayed_counts(&backup.log())
        .unwrap_or_else(|| panic!("no replay counts in:\n{}", backup.log()));
    assert!(
        digests > 0 && outputs > 0,
        "{digests} digests and {outputs} outputs checked"
    );
    eprintln!(
        "{acked} acknowledged appends checked; {digests} digests and {outputs} outputs checked after the cut; {:?}",
        started.elapsed()
    );
}

/// What every joining server that lost its primary mid-transfer must show:
/// it ended with `code`, saying `says`; it never won a claim, went live or
/// answered a client.
fn assert_never_live(joiner: &mut Process, code: i32, says: &str, probe: Probe) {
    let status = joiner
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = joiner.log();
    assert_eq!(status.code(), Some(code), "{log}");
    assert!(log.contains(says), "it does not say `{says}`:\n{log}");
    let wrong = events_of(joiner, |e| {
        matches!(
            e,
            ServerEvent::Live { .. } | ServerEvent::Tas { won: true, .. }
        )
    });
    assert!(wrong.is_empty(), "{wrong:?}\n{log}");
    assert_eq!(probe.answers(), 0, "the joining server answered a client");
}

#[test]
fn a_primary_killed_during_pre_copy_leaves_a_joiner_that_never_goes_live() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let started = Instant::now();
    let servers = Servers::start();
    let guest = Guest::default();
    // Pre-copy takes milliseconds on loopback: through a link of 16 KB/s
    // the backup receives the first pages after the handshake and then
    // waits for the rest, which the primary's host takes with it when it
    // dies.
    let (mut primary, link, _) = servers.throttled_primary("p1", &guest, 16 << 10, false);
    let mut joiner = servers.backup("b1", &guest);
    let probe = Probe::start(joiner.address().expect("an address"));
    await_transfer_started(&mut primary, "b1");
    std::thread::sleep(Duration::from_millis(300));
    link.crash();
    primary.kill();
    assert_never_live(&mut joiner, 1, "holds no complete state", probe);
    let log = joiner.log();
    // It had the beginning of the stream and not its cut.
    assert!(log.contains("broke off after"), "{log}");
    assert!(!log.contains("broke off after 0 bytes"), "{log}");
    assert!(log.contains("(round 1)"), "not in the first round: {log}");
    assert!(
        joiner.has_event(|e| matches!(e, ServerEvent::TransferFailed { .. })),
        "{:?}",
        joiner.events()
    );
    assert!(!joiner.has_event(|e| matches!(e, ServerEvent::Restored { .. })));
    let view = servers.arbiter().query(VM_ID).expect("query");
    assert_eq!(
        view.primary.map(|p| p.id).as_deref(),
        Some("p1"),
        "the joiner was made primary"
    );
    eprintln!("{:?}", started.elapsed());
}

#[test]
fn a_primary_killed_at_the_cut_leaves_a_joiner_that_never_goes_live() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let started = Instant::now();
    let servers = Servers::start();
    let guest = Guest::default();
    // The backup reaches the primary through a proxy that can hold what
    // it sends, then a link that passes the primary's state at 64 KiB/s:
    // pre-copy would otherwise be over in a few ms, before the test can
    // act.
    let (mut primary, _link, proxy) = servers.throttled_primary("p1", &guest, 64 << 10, true);
    let proxy = proxy.expect("the proxy");
    let mut joiner = servers.backup("b1", &guest);
    let probe = Probe::start(joiner.address().expect("an address"));
    await_transfer_started(&mut primary, "b1");
    // The handshake is over and the backup says nothing more until its
    // verdict: hold what it sends, so that the primary, its cut made,
    // waits for the verdict with its guest stopped.
    proxy.stall(Instant::now() + Duration::from_secs(60), [true, false]);
    await_event(&mut joiner, "restored", Duration::from_secs(30), |e| {
        matches!(e, ServerEvent::Restored { .. })
    });
    primary.kill();
    // It had sent its pre-copy rounds and was waiting at the cut.
    let events = primary.events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e.event, ServerEvent::TransferRound { .. })),
        "{events:?}"
    );
    let protected = events_of(&primary, |e| matches!(e, ServerEvent::Protected { .. }));
    assert!(protected.is_empty(), "{protected:?}");
    // The joiner holds the state, but its primary never acknowledged the
    // view that names it: its claim is refused.
    assert_never_live(&mut joiner, 4, "never acknowledged", probe);
    assert!(
        joiner.has_event(|e| matches!(e, ServerEvent::Lost { .. })),
        "{:?}",
        joiner.events()
    );
    eprintln!("{:?}", started.elapsed());
}

#[test]
fn a_joining_backup_killed_mid_transfer_leaves_the_primary_serving_and_the_next_spare_joins() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let started = Instant::now();
    let servers = Servers::start();
    let guest = Guest::default();
    // Pre-copy takes a few ms: the link to the primary passes its state at
    // 1 MiB/s, so that the transfer (some 0.7 MiB) is still under way when
    // the joiner dies, and the spare's, later, ends well within the
    // primary's wait for a verdict.
    let (mut primary, _link, _) = servers.throttled_primary("p1", &guest, 1 << 20, false);
    let load = Load::start(servers.arbiter_addr(), 2);
    let mut joiner = servers.backup("b1", &guest);
    await_transfer_started(&mut primary, "b1");
    // A spare waits while b1 joins.
    let mut spare = servers.backup("s2", &guest);
    joiner.kill();
    let failed = await_event(
        &mut primary,
        "transfer_failed",
        Duration::from_secs(15),
        |e| matches!(e, ServerEvent::TransferFailed { .. }),
    );
    assert_eq!(
        events_of(&primary, |e| matches!(e, ServerEvent::Protected { .. })).len(),
        0,
        "{failed:?}"
    );
    // The primary serves on alone.
    let answered = load.answered();
    let deadline = Instant::now() + Duration::from_secs(5);
    while load.answered() <= answered && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        load.answered() > answered,
        "no answers within 5 s after the joining backup died"
    );
    // The arbiter replaces the dead backup with the spare, which the
    // primary brings up.
    let protected = await_protected(&mut primary, &mut spare, Duration::from_secs(30));
    assert!(
        matches!(protected.event, ServerEvent::Protected { view, .. } if view >= 3),
        "{protected:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(spare.running(), "{}", spare.log());
    assert!(!spare.has_event(is_diverged));
    assert!(primary.running(), "{}", primary.log());
    let acked = load.finish();
    assert_one_primary_per_view(&[&primary, &joiner, &spare]);
    eprintln!(
        "{acked} acknowledged appends checked; {:?}",
        started.elapsed()
    );
}

#[test]
fn three_primary_kills_under_load_with_a_spare_brought_up_after_each_lose_nothing() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let started = Instant::now();
    let servers = Servers::start();
    let guest = Guest::default();
    let (mut primary, _) = servers.primary("vmm1", &guest, false);
    let mut backup = servers.backup("vmm2", &guest);
    await_protected(&mut primary, &mut backup, Duration::from_secs(30));
    let load = Load::start(servers.arbiter_addr(), 3);
    let mut gone: Vec<Process> = Vec::new();
    for kill in 1..=3u64 {
        std::thread::sleep(Duration::from_secs(1));
        primary.kill();
        let live = await_event(&mut backup, "live", Duration::from_secs(10), |e| {
            matches!(e, ServerEvent::Live { .. })
        });
        // Views: 2 is the first pair's; each failover wins view N and is
        // primary of N + 1, and each spare joins in the view after that.
        assert_eq!(live.event, ServerEvent::Live { view: 2 * kill + 1 });
        let answered = load.answered();
        let live_at = Instant::now();
        // The killed server's replacement: a new spare with a new id.
        let mut spare = servers.backup(&format!("vmm{}", kill + 2), &guest);
        await_protected(&mut backup, &mut spare, Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(10);
        while load.answered() <= answered && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            load.answered() > answered,
            "no answers from the new primary within 10 s of kill {kill}"
        );
        eprintln!(
            "kill {kill}: answers again {:?} after the new primary went live",
            live_at.elapsed()
        );
        gone.push(std::mem::replace(
            &mut primary,
            std::mem::replace(&mut backup, spare),
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    for server in [&mut primary, &mut backup] {
        assert!(server.running(), "{}", server.log());
        assert!(!server.has_event(is_diverged));
    }
    let acked = load.finish();
    let mut all: Vec<&Process> = gone.iter().collect();
    all.extend([&primary, &backup]);
    assert_one_primary_per_view(&all);
    eprintln!(
        "{acked} acknowledged appends checked over 3 failovers; {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Bad input: a fake primary in this process feeds a real joining backup.

/// One page of `byte`.
fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; ftvm_core::ft::transfer::PAGE_SIZE]
}

/// A primary of the VM `vm_id` that exists only at the arbiter and on its
/// log channel listener: it pings as primary, acknowledges each view that
/// names it, and hands out the joining backup's connection after the
/// handshake.
struct FakePrimary {
    vm_id: String,
    listener: TcpListener,
    arbiter: ArbiterClient,
    stop: Arc<AtomicBool>,
    pinger: Option<JoinHandle<()>>,
}

impl FakePrimary {
    fn start(servers: &Servers, vm_id: &str) -> FakePrimary {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
        let me = Member {
            id: "fake-primary".into(),
            service_addr: free_udp(),
            log_addr: Some(listener.local_addr().expect("its address")),
        };
        let arbiter = servers.arbiter();
        let view = arbiter.ping(vm_id, &me, 0).expect("ping");
        assert_eq!(
            view.primary.as_ref().map(|p| p.id.as_str()),
            Some("fake-primary")
        );
        let stop = Arc::new(AtomicBool::new(false));
        let pinger = {
            let (stop, arbiter, vm_id) = (stop.clone(), arbiter.clone(), vm_id.to_owned());
            let mut known = view.number;
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(view) = arbiter.ping(&vm_id, &me, known) {
                        if view.primary.as_ref().is_some_and(|p| p.id == me.id) {
                            known = view.number;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        FakePrimary {
            vm_id: vm_id.to_owned(),
            listener,
            arbiter,
            stop,
            pinger: Some(pinger),
        }
    }

    /// Waits until the arbiter names `backup` backup, and takes its
    /// connection.
    fn accept(&self, backup: &mut Process) -> Handshaken {
        let deadline = Instant::now() + Duration::from_secs(20);
        let view = loop {
            let view = self.arbiter.query(&self.vm_id).expect("query");
            if view.backup.as_ref().is_some_and(|b| b.id == backup.name()) {
                break view;
            }
            assert!(backup.running(), "{}", backup.log());
            assert!(Instant::now() < deadline, "never named backup: {view:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let hello = Hello::new(
            Role::Primary,
            self.vm_id.clone(),
            view.number,
            image_hash(GUEST_ELF),
            DEFAULT_MEM_SIZE,
            "kv",
            1,
        );
        LogSender::accept_handshaken(
            &self.listener,
            hello,
            ChannelConfig::default(),
            Duration::from_secs(20),
            &|| false,
        )
        .unwrap_or_else(|e| panic!("the backup's handshake: {e}\n{}", backup.log()))
    }
}

impl Drop for FakePrimary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(p) = self.pinger.take() {
            let _ = p.join();
        }
    }
}

/// A machine state the backup can restore: the boot state of a VM of the
/// same guest, built here; and its registers as a digest has them.
fn boot_state() -> (MachineState, Registers) {
    let config = VmConfig {
        mem_size: DEFAULT_MEM_SIZE,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(GUEST_ELF, config).expect("a VM");
    let vcpu = VcpuState::capture(&mut vm).expect("the vCPU's state");
    let regs = digest::registers(&vcpu.regs);
    let state = MachineState {
        vcpu,
        devices: vm.devices.state(),
        console_line: Vec::new(),
        clock_ns: 0,
        datagrams: Vec::new(),
    };
    (state, regs)
}

/// Writes a complete transfer (a begin, one page, a round, the cut) and
/// returns the backup's verdict.
fn complete_transfer(h: &mut Handshaken, cut: &Cut) -> Verdict {
    {
        let mut w = h.transfer_writer(Duration::from_secs(5)).expect("writer");
        w.begin(DEFAULT_MEM_SIZE, 4096).expect("begin");
        w.page(1, &page_of(0xab)).expect("page");
        w.end_round().expect("round");
        w.cut(cut).expect("cut");
    }
    h.read_verdict(Duration::from_secs(20)).expect("a verdict")
}

/// The backup exits 1 with `says` on stderr, having restored nothing, run
/// nothing and served nothing.
fn assert_refused_whole(backup: &mut Process, says: &[&str]) {
    let status = backup
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = backup.log();
    assert_eq!(status.code(), Some(1), "{log}");
    for needle in says.iter().chain(&["holds no complete state"]) {
        assert!(log.contains(needle), "it does not say `{needle}`:\n{log}");
    }
    let ran = events_of(backup, |e| {
        matches!(
            e,
            ServerEvent::Restored { .. } | ServerEvent::Live { .. } | ServerEvent::Role { .. }
        )
    });
    assert!(ran.is_empty(), "{ran:?}");
    assert!(
        backup.has_event(|e| matches!(e, ServerEvent::TransferFailed { .. })),
        "{:?}",
        backup.events()
    );
}

#[test]
fn a_joining_backup_refuses_a_bad_transfer_by_name_and_runs_nothing() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let started = Instant::now();
    let servers = Servers::start();
    // The backups boot the very image this process hashes and boots (the
    // `ftvm` binary may embed another build of the guest).
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, GUEST_ELF).expect("the guest image");
    let guest = Guest {
        kernel: Some(kernel),
        ..Guest::default()
    };
    let (state, regs) = boot_state();
    let machine = state.encode().expect("encode");
    let good_cut = Cut {
        exits: 1,
        rip: regs.rip,
        next_seq: 1,
        regs,
        mem_hash: 0,
        machine: machine.clone(),
    };
    let pages = DEFAULT_MEM_SIZE / 4096;

    type Case = Box<dyn Fn(&mut Handshaken) -> Vec<String>>;
    let cases: Vec<(&str, Case)> = vec![
        (
            "truncated",
            Box::new(|h| {
                {
                    let mut w = h.transfer_writer(Duration::from_secs(5)).expect("writer");
                    w.begin(DEFAULT_MEM_SIZE, 4096).expect("begin");
                    w.page(1, &page_of(0xab)).expect("page");
                    w.end_round().expect("round");
                }
                // A pages message of 4105 bytes of which 3 arrive, then the
                // connection closes.
                h.stream()
                    .write_all(&[2, 0x89, 0x20, 1, 1, 0xfb])
                    .expect("write");
                vec![
                    "broke off".into(),
                    "inside message 3 (pages)".into(),
                    "6 of its 4112 bytes arrived".into(),
                ]
            }),
        ),
        (
            "a page out of range",
            Box::new(move |h| {
                let mut begin = TransferWriter::new(Vec::new());
                begin.begin(DEFAULT_MEM_SIZE, 4096).expect("begin");
                // The same pages message as a writer for a guest twice as
                // large makes it (message 1 either way).
                let mut larger = TransferWriter::new(Vec::new());
                larger.begin(2 * DEFAULT_MEM_SIZE, 4096).expect("begin");
                let begin_len = larger.get_ref().len();
                larger.page(pages, &page_of(0xcd)).expect("page");
                larger.flush().expect("flush");
                let mut bytes = begin.into_inner();
                bytes.extend_from_slice(&larger.get_ref()[begin_len..]);
                h.stream().write_all(&bytes).expect("write");
                vec![
                    "broke off".into(),
                    format!("page {pages} is outside the guest's {pages} pages"),
                ]
            }),
        ),
        (
            "a machine state that does not decode",
            Box::new({
                let good_cut = good_cut.clone();
                move |h| {
                    let cut = Cut {
                        machine: vec![0xff; 64],
                        ..good_cut.clone()
                    };
                    let verdict = complete_transfer(h, &cut);
                    assert_refused(&verdict, &["cannot be decoded"]);
                    vec![
                        "refused the primary's state".into(),
                        "cannot be decoded".into(),
                    ]
                }
            }),
        ),
        (
            "a device state that from_state rejects",
            Box::new({
                let (good_cut, state) = (good_cut.clone(), state.clone());
                move |h| {
                    let mut bad = state.clone();
                    bad.devices.pit.channels[0].mode = 7;
                    let cut = Cut {
                        machine: bad.encode().expect("encode"),
                        ..good_cut.clone()
                    };
                    let verdict = complete_transfer(h, &cut);
                    let says = "PIT channel 0: mode 7 does not exist";
                    assert_refused(&verdict, &[says]);
                    vec!["refused the primary's state".into(), says.into()]
                }
            }),
        ),
        (
            "registers that do not match",
            Box::new({
                let good_cut = good_cut.clone();
                move |h| {
                    let mut regs = good_cut.regs;
                    regs.rax ^= 0x5a5a;
                    let cut = Cut {
                        regs,
                        ..good_cut.clone()
                    };
                    let verdict = complete_transfer(h, &cut);
                    let says = format!(
                        "rax: primary {:#x}, restored {:#x}",
                        regs.rax, good_cut.regs.rax
                    );
                    assert_refused(&verdict, &["registers differ", &says]);
                    vec!["refused the primary's state".into(), says]
                }
            }),
        ),
        (
            "a memory hash that does not match",
            Box::new({
                let good_cut = good_cut.clone();
                move |h| {
                    let cut = Cut {
                        mem_hash: 0x0123_4567_89ab_cdef,
                        ..good_cut.clone()
                    };
                    let verdict = complete_transfer(h, &cut);
                    let says = "memory hash differs: primary 0x0123456789abcdef, restored 0x";
                    assert_refused(&verdict, &[says]);
                    vec!["refused the primary's state".into(), says.into()]
                }
            }),
        ),
    ];
    for (i, (case, feed)) in cases.iter().enumerate() {
        let case_started = Instant::now();
        let vm_id = format!("bad-input-{i}");
        let fake = FakePrimary::start(&servers, &vm_id);
        let mut backup = servers.backup_of(&vm_id, &format!("joiner-{i}"), &guest);
        let mut h = fake.accept(&mut backup);
        let says = feed(&mut h);
        // The connection stays open until the backup has judged; a
        // truncated stream is cut short by closing it.
        if *case == "truncated" {
            drop(h);
            let says: Vec<&str> = says.iter().map(String::as_str).collect();
            assert_refused_whole(&mut backup, &says);
        } else {
            let says: Vec<&str> = says.iter().map(String::as_str).collect();
            assert_refused_whole(&mut backup, &says);
            drop(h);
        }
        eprintln!("{case}: refused in {:?}", case_started.elapsed());
    }
    eprintln!("{:?}", started.elapsed());
}

/// A `Refused` verdict whose reason says each of `says`.
fn assert_refused(verdict: &Verdict, says: &[&str]) {
    let Verdict::Refused { reason } = verdict else {
        panic!("the backup accepted a bad state: {verdict:?}");
    };
    for needle in says {
        assert!(
            reason.contains(needle),
            "`{reason}` does not say `{needle}`"
        );
    }
}
