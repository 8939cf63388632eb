//! Helpers for the channel tests: hellos and configs, entries from a
//! seeded generator, a time limit for each test, and a fault-injecting TCP
//! proxy.

use logchannel::{
    ChannelConfig, ChannelError, Digest, DigestReason, Entry, Event, Hello, LogReceiver, LogSender,
    PageHash, Position, Registers, Role,
};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const MEM: u64 = 64 << 20;

pub fn hello(role: Role) -> Hello {
    Hello::new(
        role,
        "vm-test",
        3,
        logchannel::image_hash(b"guest"),
        MEM,
        "kv",
        1,
    )
}

/// For tests about something other than failure detection: a failure
/// timeout long enough that a loaded machine does not trip it.
pub fn relaxed() -> ChannelConfig {
    ChannelConfig {
        failure_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
        ..ChannelConfig::default()
    }
}

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `limit`, so that a hang is a failure with a message, not a stuck run.
pub fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("the test thread ended without a result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within {limit:?}"),
    }
}

/// A seed from `FTVM_SEED`, or from the clock; printed so that a failure
/// can be repeated.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("FTVM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (FTVM_SEED={seed} repeats it)");
    seed
}

/// xorshift64*: small, deterministic, good enough to pick test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` entries from seq 1 on, of the kinds a guest produces, with exit
/// counts that never go backwards.
pub fn entries(seed: u64, n: usize) -> Vec<Entry> {
    let mut rng = Rng::new(seed);
    let mut exits = 0;
    let mut tsc = 1u64 << 32;
    (1..=n as u64)
        .map(|seq| {
            exits += rng.below(4);
            tsc += rng.below(1 << 20);
            let rip = 0x10_0000 + rng.below(0x4000);
            let event = match rng.below(100) {
                0..=39 => Event::Rdtsc { value: tsc },
                40..=64 => Event::Interrupt { vector: 0x20 },
                65..=79 => Event::Rdrand {
                    value: rng.next(),
                    ok: rng.below(50) != 0,
                },
                80..=89 => Event::Packet {
                    desc_head: rng.below(256) as u16,
                    frame: (0..rng.below(1500)).map(|_| rng.next() as u8).collect(),
                },
                90..=94 => Event::PitRead {
                    port: 0x40,
                    value: rng.next() as u8,
                },
                95..=97 => Event::Progress { exits },
                _ => Event::Digest(Digest {
                    reason: DigestReason::Periodic,
                    regs: Registers::from_array([rng.next(); 18]),
                    mem_hash: rng.next(),
                    dirty_pages: (0..rng.below(4))
                        .map(|i| PageHash {
                            page: 0x100 + i,
                            hash: rng.next(),
                        })
                        .collect(),
                    output_hash: None,
                }),
            };
            Entry {
                seq,
                pos: Position { exits, rip },
                event,
            }
        })
        .collect()
}

pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

pub fn addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("local address")
}

/// Accepts on `listener` in a thread while the caller connects.
pub fn accept_in_thread(
    listener: TcpListener,
    hello: Hello,
    config: ChannelConfig,
) -> thread::JoinHandle<Result<LogSender, ChannelError>> {
    thread::spawn(move || LogSender::accept(&listener, hello, config))
}

/// A connected pair with the given configs, the backup going through
/// `via` (a proxy's address) if given.
pub fn pair_via(
    primary: ChannelConfig,
    backup: ChannelConfig,
    via: Option<&Proxy>,
) -> (LogSender, LogReceiver) {
    let l = listener();
    let target = addr(&l);
    let accepting = accept_in_thread(l, hello(Role::Primary), primary);
    let connect_to = via.map_or(target, |p| p.addr());
    let receiver =
        LogReceiver::connect(connect_to, hello(Role::Backup), backup).expect("backup connects");
    let sender = accepting
        .join()
        .expect("accept thread")
        .expect("primary accepts");
    (sender, receiver)
}

pub fn pair(config: ChannelConfig) -> (LogSender, LogReceiver) {
    pair_via(config, config, None)
}

/// What the proxy does with the bytes of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Forward = 0,
    /// Reads and discards, as a partition does: the writer's writes
    /// succeed, the reader hears nothing, and nothing is closed.
    Blackhole = 1,
}

/// A TCP proxy between a backup (which connects to [`Proxy::addr`]) and a
/// primary's listener, for one connection, that can blackhole either
/// direction, cut the connection, flip one byte going to the backup, or
/// delay every byte by the same time each way (a slow link: nothing lost,
/// nothing reordered).
pub struct Proxy {
    addr: SocketAddr,
    ctl: Arc<ProxyCtl>,
}

#[derive(Default)]
struct ProxyCtl {
    /// Primary to backup, and backup to primary.
    down: AtomicU8,
    up: AtomicU8,
    /// Offset in the primary-to-backup stream of the byte to flip, or
    /// u64::MAX; and the XOR mask.
    flip_at: AtomicU64,
    flip_mask: AtomicU8,
    /// One-way delay, in microseconds.
    delay_us: AtomicU64,
    sockets: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    pub fn new(upstream: SocketAddr) -> Proxy {
        let listener = listener();
        let addr = addr(&listener);
        let ctl = Arc::new(ProxyCtl {
            flip_at: AtomicU64::new(u64::MAX),
            ..ProxyCtl::default()
        });
        let c = Arc::clone(&ctl);
        thread::spawn(move || {
            let Ok((backup, _)) = listener.accept() else {
                return;
            };
            let Ok(primary) = TcpStream::connect(upstream) else {
                return;
            };
            let clones = (
                primary.try_clone(),
                backup.try_clone(),
                primary.try_clone(),
                backup.try_clone(),
            );
            let (Ok(p2), Ok(b2), Ok(p3), Ok(b3)) = clones else {
                return;
            };
            c.sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend([p3, b3]);
            let c2 = Arc::clone(&c);
            thread::spawn(move || pump(primary, b2, &c2, true));
            pump(backup, p2, &c, false);
        });
        Proxy { addr, ctl }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, down: Fault, up: Fault) {
        self.ctl.down.store(down as u8, Ordering::SeqCst);
        self.ctl.up.store(up as u8, Ordering::SeqCst);
    }

    /// Holds every byte `delay` before passing it on, in both directions.
    pub fn delay(&self, delay: Duration) {
        self.ctl
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Flips the bits of `mask` in the byte at `offset` of the
    /// primary-to-backup stream (counted from the connection's first byte).
    pub fn flip(&self, offset: u64, mask: u8) {
        self.ctl.flip_mask.store(mask, Ordering::SeqCst);
        self.ctl.flip_at.store(offset, Ordering::SeqCst);
    }

    /// Closes both connections, as a crashed host's kernel would not, but a
    /// killed process's does.
    pub fn cut(&self) {
        for s in self
            .ctl
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Writes what `pump` read once its delay is over, in order; `None` closes
/// the write side.
fn deliver_delayed(mut to: TcpStream, queue: mpsc::Receiver<(Instant, Option<Vec<u8>>)>) {
    for (due, bytes) in queue {
        thread::sleep(due.saturating_duration_since(Instant::now()));
        match bytes {
            Some(bytes) => {
                if to.write_all(&bytes).is_err() {
                    return;
                }
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

fn pump(mut from: TcpStream, to: TcpStream, ctl: &ProxyCtl, down: bool) {
    let mode = if down { &ctl.down } else { &ctl.up };
    let (queue, delayed) = mpsc::channel();
    thread::spawn(move || deliver_delayed(to, delayed));
    let due = || Instant::now() + Duration::from_micros(ctl.delay_us.load(Ordering::SeqCst));
    let mut buf = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                // A partition does not carry the close across.
                if mode.load(Ordering::SeqCst) == Fault::Forward as u8 {
                    let _ = queue.send((due(), None));
                }
                return;
            }
            Ok(n) => n,
        };
        if down {
            let at = ctl.flip_at.load(Ordering::SeqCst);
            if (offset..offset + n as u64).contains(&at) {
                buf[(at - offset) as usize] ^= ctl.flip_mask.load(Ordering::SeqCst);
            }
        }
        offset += n as u64;
        if mode.load(Ordering::SeqCst) == Fault::Forward as u8
            && queue.send((due(), Some(buf[..n].to_vec()))).is_err()
        {
            return;
        }
    }
}
