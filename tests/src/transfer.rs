//! What the state-transfer tests share: an arbiter with primaries, backups
//! and spares started one at a time (each joins when the test says, not
//! with its primary), a client load that can be stopped and checked, a
//! probe that counts the answers one service address gives, and the
//! checks of a run's events.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ftvm_core::host::events::{EventRecord, ServerEvent};
use ftvm_harness::history::{Clock, Recorder};
use ftvm_harness::launcher::{
    free_tcp_addr, ClusterEvents, Guest, Knobs, Membership, Process, Proxy, Role, ServerConfig,
};
use ftvm_harness::linearizability::{check, CheckConfig, Overall};
use ftvm_kvclient::{ClientConfig, KvClient};

use crate::load::{check_no_acknowledged_write_lost, run_load, AppendLog};
use crate::{free_udp, launcher, VMM_TIME_LIMIT, VM_ID};

/// An arbiter, and primaries, backups and spares started one at a time,
/// their files in one directory.
pub struct Servers {
    dir: tempfile::TempDir,
    /// Killed when the test ends.
    _arbiter: Process,
    arbiter_addr: SocketAddr,
    _state: tempfile::TempDir,
    pub knobs: Knobs,
}

impl Servers {
    pub fn start() -> Servers {
        let dir = tempfile::tempdir().expect("dir");
        let state = tempfile::tempdir().expect("state dir");
        let arbiter_addr = free_tcp_addr().expect("a free port");
        let mut config = ServerConfig::arbiter(arbiter_addr, state.path());
        config.dir = Some(dir.path().to_owned());
        let mut arbiter = launcher().start(&config).expect("the arbiter starts");
        arbiter
            .wait_for(
                "the arbiter to listen",
                Duration::from_secs(30),
                Duration::from_millis(10),
                |_| Ok(TcpStream::connect(arbiter_addr).is_ok()),
            )
            .expect("the arbiter listens");
        Servers {
            dir,
            _arbiter: arbiter,
            arbiter_addr,
            _state: state,
            knobs: Knobs::default(),
        }
    }

    pub fn arbiter_addr(&self) -> SocketAddr {
        self.arbiter_addr
    }

    pub fn arbiter(&self) -> arbiter::ArbiterClient {
        arbiter::ArbiterClient::new(self.arbiter_addr)
    }

    pub fn membership(&self, vm_id: &str) -> Membership {
        Membership {
            arbiter: self.arbiter_addr.into(),
            vm_id: vm_id.into(),
            knobs: self.knobs.clone(),
        }
    }

    fn server(&self, name: &str, role: Role, guest: &Guest) -> Process {
        let mut config = ServerConfig::new(name, role, free_udp(), VMM_TIME_LIMIT);
        config.dir = Some(self.dir.path().to_owned());
        config.guest = guest.clone();
        launcher()
            .start(&config)
            .unwrap_or_else(|e| panic!("{name} does not start: {e:#}"))
    }

    /// The VM's first primary, serving alone once it has its role; its log
    /// channel behind a [`Proxy`] if `proxy`.
    pub fn primary(&self, name: &str, guest: &Guest, proxy: bool) -> (Process, Option<Proxy>) {
        let log_listen = free_tcp_addr().expect("a free port");
        let proxy = proxy.then(|| Proxy::start(log_listen).expect("the proxy starts"));
        let advertise = proxy.as_ref().map(Proxy::addr);
        (self.primary_at(name, guest, log_listen, advertise), proxy)
    }

    /// The VM's first primary, its log channel on `log_listen`, announced
    /// as `advertise` if set; serving alone once it has its role.
    pub fn primary_at(
        &self,
        name: &str,
        guest: &Guest,
        log_listen: SocketAddr,
        advertise: Option<SocketAddr>,
    ) -> Process {
        let role = Role::Primary {
            membership: self.membership(VM_ID),
            log_listen,
            log_advertise: advertise,
        };
        let mut primary = self.server(name, role, guest);
        await_event(&mut primary, "role", Duration::from_secs(30), |e| {
            matches!(e, ServerEvent::Role { .. })
        });
        primary
    }

    /// The VM's first primary, its log channel reached through a
    /// [`ThrottledLink`] of `bytes_per_sec` and, if `proxy`, a [`Proxy`]
    /// after it: a state transfer slow enough for a test to act while it
    /// is under way.
    pub fn throttled_primary(
        &self,
        name: &str,
        guest: &Guest,
        bytes_per_sec: u64,
        proxy: bool,
    ) -> (Process, ThrottledLink, Option<Proxy>) {
        let log_listen = free_tcp_addr().expect("a free port");
        let link = ThrottledLink::start(log_listen, bytes_per_sec);
        let proxy = proxy.then(|| Proxy::start(link.addr()).expect("the proxy starts"));
        let advertise = proxy.as_ref().map_or(link.addr(), Proxy::addr);
        let primary = self.primary_at(name, guest, log_listen, Some(advertise));
        (primary, link, proxy)
    }

    /// An `ftvm backup` of the VM: a spare until the arbiter names it.
    pub fn backup(&self, name: &str, guest: &Guest) -> Process {
        self.backup_of(VM_ID, name, guest)
    }

    /// An `ftvm backup` of the VM `vm_id`.
    pub fn backup_of(&self, vm_id: &str, name: &str, guest: &Guest) -> Process {
        let role = Role::Backup {
            membership: self.membership(vm_id),
        };
        self.server(name, role, guest)
    }
}

/// Waits for an event of `server` that `wanted` accepts and returns it;
/// panics with the server's log if it does not come `within` or the server
/// ends first.
pub fn await_event(
    server: &mut Process,
    what: &str,
    within: Duration,
    wanted: impl Fn(&ServerEvent) -> bool,
) -> EventRecord {
    server
        .wait_event(what, within, wanted)
        .unwrap_or_else(|e| panic!("{e:#}\nfull log of {}:\n{}", server.name(), server.log()))
}

/// Waits until `primary` has begun to send its state to the backup named
/// `backup`.
pub fn await_transfer_started(primary: &mut Process, backup: &str) {
    await_event(
        primary,
        "transfer_started",
        Duration::from_secs(30),
        |e| matches!(e, ServerEvent::TransferStarted { backup: b, .. } if b == backup),
    );
}

/// `server`'s events that `wanted` accepts.
pub fn events_of(server: &Process, wanted: impl Fn(&ServerEvent) -> bool) -> Vec<EventRecord> {
    server
        .events()
        .into_iter()
        .filter(|e| wanted(&e.event))
        .collect()
}

/// Waits until the primary `primary` reports the backup `backup` protecting
/// it (its `protected` event, after the backup verified what it
/// restored) and the backup its `restored` event for the same view;
/// returns the `protected` event.
pub fn await_protected(
    primary: &mut Process,
    backup: &mut Process,
    within: Duration,
) -> EventRecord {
    let name = backup.name().to_owned();
    let protected = await_event(
        primary,
        "protected",
        within,
        |e| matches!(e, ServerEvent::Protected { backup, .. } if *backup == name),
    );
    let ServerEvent::Protected { view, .. } = protected.event else {
        unreachable!("a protected event")
    };
    await_event(
        backup,
        "restored",
        Duration::from_secs(10),
        |e| matches!(e, ServerEvent::Restored { view: v, .. } if *v == view),
    );
    protected
}

/// Asserts that no view had two primaries, over every server of a run.
pub fn assert_one_primary_per_view(servers: &[&Process]) {
    let events = ClusterEvents(
        servers
            .iter()
            .map(|p| (p.name().to_owned(), p.events()))
            .collect(),
    );
    let primaries = events.primaries_per_view();
    assert!(
        primaries.values().all(|names| names.len() == 1),
        "a view had two primaries: {primaries:?}"
    );
}

/// Clients appending through the arbiter (tests/src/load.rs) until
/// [`Load::finish`].
pub struct Load {
    arbiter: SocketAddr,
    stop: Arc<AtomicBool>,
    history: Arc<Recorder>,
    clients: JoinHandle<Vec<AppendLog>>,
}

impl Load {
    pub fn start(arbiter: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Recorder::new(Clock::start()));
        let handle = {
            let (stop, history) = (stop.clone(), history.clone());
            std::thread::spawn(move || run_load(arbiter, clients, stop, history))
        };
        Load {
            arbiter,
            stop,
            history,
            clients: handle,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.history.completed()
    }

    /// Stops the clients, reads every key back and checks that no
    /// acknowledged append was lost and that the history is linearizable
    /// per key; returns how many acknowledged appends were checked.
    pub fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let logs = self.clients.join().expect("the clients");
        let acked = check_no_acknowledged_write_lost(self.arbiter, &logs, &self.history);
        assert!(acked > 0, "the load acknowledged nothing");
        let report = check(&self.history.snapshot(), &CheckConfig::default());
        assert_eq!(
            report.overall,
            Overall::Linearizable,
            "{}",
            report.explain()
        );
        acked
    }
}

/// Asks one service address, over and over, for a key, and counts the
/// answers, until dropped or [`Probe::answers`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u32>>,
}

impl Probe {
    pub fn start(addr: SocketAddr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let config = ClientConfig {
                    attempt_timeout: Duration::from_millis(100),
                    max_attempts: 1,
                };
                let mut answers = 0;
                while !stop.load(Ordering::SeqCst) {
                    match KvClient::connect(addr, config) {
                        Ok(mut c) => {
                            if c.get(b"probe").is_ok() {
                                answers += 1;
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                answers
            })
        };
        Probe {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops probing; the answers it got.
    pub fn answers(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().expect("the probe"))
            .unwrap_or(0)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A TCP link to `target` that passes what the target sends at most
/// `bytes_per_sec` (what is sent toward the target passes at once), and
/// that can fail as a crashed host does: what it has not delivered yet is
/// lost, and both connections close. Between a primary and a joining
/// backup it holds a state transfer half delivered for as long as a test
/// needs, which the log channel proxy, which passes everything it read
/// sooner or later, cannot.
pub struct ThrottledLink {
    addr: SocketAddr,
    crashed: Arc<AtomicBool>,
}

impl ThrottledLink {
    pub fn start(target: SocketAddr, bytes_per_sec: u64) -> ThrottledLink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the link");
        let addr = listener.local_addr().expect("the link's address");
        let crashed = Arc::new(AtomicBool::new(false));
        let crash = crashed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(target)) else {
                    continue;
                };
                let (Ok(mut up_from), Ok(mut up_to)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_from, &mut up_to);
                });
                let crash = crash.clone();
                std::thread::spawn(move || throttle(server, client, bytes_per_sec, &crash));
            }
        });
        ThrottledLink { addr, crashed }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on nothing more is delivered, and both ends see their
    /// connection close.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }
}

impl Drop for ThrottledLink {
    fn drop(&mut self) {
        self.crash();
    }
}

fn throttle(mut from: TcpStream, mut to: TcpStream, bytes_per_sec: u64, crashed: &AtomicBool) {
    use std::io::{Read, Write};
    const SLICE: usize = 256;
    let _ = from.set_read_timeout(Some(Duration::from_millis(10)));
    let mut buf = [0u8; SLICE];
    let began = std::time::Instant::now();
    let mut sent = 0u64;
    while !crashed.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        // Deliver no faster than the rate since the link began.
        let due = began + Duration::from_secs_f64((sent + n as u64) as f64 / bytes_per_sec as f64);
        while std::time::Instant::now() < due && !crashed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        if crashed.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
