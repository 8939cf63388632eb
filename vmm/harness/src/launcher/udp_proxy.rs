//! A lossy UDP proxy for the clients' datagrams: put in front of a
//! server's service address, it forwards each client's datagrams from a
//! socket of its own (so that the server's replies come back to it) and
//! the replies back to the client, and can lose, duplicate, reorder and
//! delay them in both directions. Every choice comes from one seeded RNG;
//! which datagram meets which choice depends on the machine's timing, but
//! the kind and rates of the faults do not.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// What the proxy does to each datagram, in either direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct DatagramFaults {
    /// The chance that a datagram is dropped.
    pub loss: f64,
    /// The chance that a datagram is sent twice.
    pub duplicate: f64,
    /// The chance that a datagram is held back by up to `reorder_ms`, so
    /// that later ones overtake it.
    pub reorder: f64,
    pub reorder_ms: u64,
    /// Every datagram is held this long.
    pub delay_ms: u64,
}

impl DatagramFaults {
    pub fn is_clean(&self) -> bool {
        *self == DatagramFaults::default()
    }
}

/// What the proxy did so far.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DatagramCounts {
    pub forwarded: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Datagrams that came back from the server.
    pub replies: u64,
}

struct Due {
    at: Instant,
    /// Breaks ties in arrival order.
    n: u64,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        (self.at, self.n) == (other.at, other.n)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Due) -> std::cmp::Ordering {
        (self.at, self.n).cmp(&(other.at, other.n))
    }
}

struct Shared {
    faults: Mutex<DatagramFaults>,
    rng: Mutex<StdRng>,
    queue: Mutex<(BinaryHeap<Reverse<Due>>, u64)>,
    queued: Condvar,
    stop: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    replies: AtomicU64,
}

impl Shared {
    /// Applies the faults to one datagram and queues what is left of it.
    fn pass(&self, socket: &Arc<UdpSocket>, to: SocketAddr, bytes: &[u8]) {
        let faults = *self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let (drop, copies, extra) = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            let drop = rng.random_bool(faults.loss.clamp(0.0, 1.0));
            let copies = if rng.random_bool(faults.duplicate.clamp(0.0, 1.0)) {
                2
            } else {
                1
            };
            let extra = if faults.reorder_ms > 0 && rng.random_bool(faults.reorder.clamp(0.0, 1.0))
            {
                Some(rng.random_range(1..=faults.reorder_ms))
            } else {
                None
            };
            (drop, copies, extra)
        };
        if drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if copies > 1 {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        if extra.is_some() {
            self.reordered.fetch_add(1, Ordering::Relaxed);
        }
        let at = Instant::now() + Duration::from_millis(faults.delay_ms + extra.unwrap_or(0));
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..copies {
            queue.1 += 1;
            let n = queue.1;
            queue.0.push(Reverse(Due {
                at,
                n,
                socket: socket.clone(),
                to,
                bytes: bytes.to_vec(),
            }));
        }
        self.queued.notify_one();
    }

    /// Sends each queued datagram when it is due.
    fn deliver(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wait = match queue.0.peek() {
                Some(Reverse(due)) if due.at <= now => {
                    if let Some(Reverse(due)) = queue.0.pop() {
                        drop(queue);
                        if due.socket.send_to(&due.bytes, due.to).is_ok() {
                            self.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                        queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                    }
                    continue;
                }
                Some(Reverse(due)) => due.at - now,
                None => POLL,
            };
            queue = self
                .queued
                .wait_timeout(queue, wait.min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// How often the proxy's threads look whether it was dropped.
const POLL: Duration = Duration::from_millis(50);
const MAX_DATAGRAM: usize = 65_536;

pub struct UdpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
}

impl UdpProxy {
    /// Forwards datagrams sent to the proxy's address to `target`, faults
    /// drawn from `seed`; clean until [`set_faults`](UdpProxy::set_faults).
    pub fn start(target: SocketAddr, seed: u64) -> Result<UdpProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").context("cannot bind the UDP proxy")?);
        let addr = front.local_addr().context("the UDP proxy's address")?;
        front
            .set_read_timeout(Some(POLL))
            .context("cannot set the UDP proxy's read timeout")?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(DatagramFaults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            queued: Condvar::new(),
            stop: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            replies: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || s.deliver());
        let s = shared.clone();
        std::thread::spawn(move || front_loop(&s, &front, target));
        Ok(UdpProxy {
            addr,
            target,
            shared,
        })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server behind it.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// From now on, treat datagrams as `faults` says.
    pub fn set_faults(&self, faults: DatagramFaults) {
        *self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    pub fn counts(&self) -> DatagramCounts {
        let s = &self.shared;
        DatagramCounts {
            forwarded: s.forwarded.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            duplicated: s.duplicated.load(Ordering::Relaxed),
            reordered: s.reordered.load(Ordering::Relaxed),
            replies: s.replies.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.queued.notify_all();
    }
}

/// Reads the clients' datagrams; each client gets a socket of its own
/// toward the server, and a thread that passes the server's replies back.
fn front_loop(shared: &Arc<Shared>, front: &Arc<UdpSocket>, target: SocketAddr) {
    let mut upstream: BTreeMap<SocketAddr, Arc<UdpSocket>> = BTreeMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, client) = match front.recv_from(&mut buf) {
            Ok(got) => got,
            Err(_) => continue,
        };
        let socket = match upstream.get(&client) {
            Some(s) => s.clone(),
            None => match UdpSocket::bind("127.0.0.1:0") {
                Ok(s) => {
                    let s = Arc::new(s);
                    if s.set_read_timeout(Some(POLL)).is_err() {
                        continue;
                    }
                    upstream.insert(client, s.clone());
                    let (sh, up, fr) = (shared.clone(), s.clone(), front.clone());
                    std::thread::spawn(move || back_loop(&sh, &up, &fr, client));
                    s
                }
                Err(_) => continue,
            },
        };
        shared.pass(&socket, target, &buf[..n]);
    }
}

fn back_loop(shared: &Shared, upstream: &UdpSocket, front: &Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::SeqCst) {
        if let Ok((n, _)) = upstream.recv_from(&mut buf) {
            shared.replies.fetch_add(1, Ordering::Relaxed);
            shared.pass(front, client, &buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        });
        addr
    }

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c
    }

    #[test]
    fn clean_proxy_passes_everything_both_ways() {
        let proxy = UdpProxy::start(echo(), 1).unwrap();
        let c = client();
        let mut buf = [0u8; 64];
        for i in 0..20u8 {
            c.send_to(&[i], proxy.addr()).unwrap();
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&[i][..], proxy.addr()));
        }
        // The proxy counts a reply after passing it on, so the client may
        // look first.
        let until = std::time::Instant::now() + Duration::from_secs(1);
        let mut counts = proxy.counts();
        while counts.forwarded < 40 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            counts = proxy.counts();
        }
        assert_eq!(
            (counts.forwarded, counts.replies, counts.dropped),
            (40, 20, 0)
        );
    }

    #[test]
    fn lossy_proxy_drops_duplicates_and_reorders() {
        let proxy = UdpProxy::start(echo(), 2).unwrap();
        proxy.set_faults(DatagramFaults {
            loss: 0.2,
            duplicate: 0.3,
            reorder: 0.3,
            reorder_ms: 5,
            delay_ms: 1,
        });
        let c = client();
        for i in 0..200u8 {
            c.send_to(&[i], proxy.addr()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let counts = proxy.counts();
        assert!(counts.dropped > 0 && counts.duplicated > 0 && counts.reordered > 0);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((n, _)) = c.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        assert!(!got.is_empty() && got.len() as u64 == counts.forwarded - counts.replies);
        assert!(got.windows(2).any(|w| w[0] > w[1]), "nothing reordered");
    }
}
