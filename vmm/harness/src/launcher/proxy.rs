//! A TCP proxy that can partition a connection, or slow it down: put
//! between a backup and its primary's log channel, it is cut on demand. A
//! cut proxy keeps both connections open and silently drops every byte, so
//! that each side sees silence, as in a real partition, rather than a
//! closed socket. A delaying proxy holds every byte a set time in each
//! direction before passing it on, as a long link does: nothing is lost or
//! reordered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub struct Proxy {
    addr: SocketAddr,
    /// Toward the target and back from it.
    cut: [Arc<AtomicBool>; 2],
    /// Delay toward the target and back from it, in microseconds.
    delay_us: [Arc<AtomicU64>; 2],
    /// Toward the target and back from it: bytes read before this are held
    /// until it, then passed on (a stall).
    hold: [Arc<Mutex<Option<Instant>>>; 2],
    stop: Arc<AtomicBool>,
    /// Connections forwarded so far.
    accepted: Arc<AtomicU64>,
}

/// Writes what `pump` read once its delay is over, in order.
fn deliver(mut to: TcpStream, queue: mpsc::Receiver<(Instant, Vec<u8>)>) {
    for (due, bytes) in queue {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if to.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn pump(
    mut from: TcpStream,
    to: TcpStream,
    cut: Arc<AtomicBool>,
    delay_us: Arc<AtomicU64>,
    hold: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let (queue, delayed) = mpsc::channel();
    std::thread::spawn(move || deliver(to, delayed));
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                let held = *hold.lock().unwrap_or_else(|p| p.into_inner());
                let due = (now + Duration::from_micros(delay_us.load(Ordering::SeqCst)))
                    .max(held.unwrap_or(now));
                if !cut.load(Ordering::SeqCst) && queue.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

impl Proxy {
    /// Forwards connections made to the proxy's address to `target`.
    pub fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the proxy")?;
        let addr = listener.local_addr().context("the proxy's address")?;
        listener
            .set_nonblocking(true)
            .context("cannot make the proxy's listener nonblocking")?;
        let cut = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        let delay_us = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let hold = [Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None))];
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (c, d, h, s) = (cut.clone(), delay_us.clone(), hold.clone(), stop.clone());
        let a = accepted.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                            continue;
                        };
                        a.fetch_add(1, Ordering::SeqCst);
                        let (cut1, delay1, hold1) = (c[0].clone(), d[0].clone(), h[0].clone());
                        let (cut2, delay2, hold2) = (c[1].clone(), d[1].clone(), h[1].clone());
                        let (stop1, stop2) = (s.clone(), s.clone());
                        std::thread::spawn(move || {
                            pump(client, server, cut1, delay1, hold1, stop1)
                        });
                        std::thread::spawn(move || pump(s2, c2, cut2, delay2, hold2, stop2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Proxy {
            addr,
            cut,
            delay_us,
            hold,
            stop,
            accepted,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the proxy has forwarded so far (a backup's
    /// handshake, and its state transfer right after, start with one).
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// From now on, drop every byte in both directions.
    pub fn partition(&self) {
        for cut in &self.cut {
            cut.store(true, Ordering::SeqCst);
        }
    }

    /// From now on, drop every byte going to the target (`to_target`), or
    /// every byte coming back from it, and pass the other direction.
    pub fn partition_one_way(&self, to_target: bool) {
        self.cut[0].store(to_target, Ordering::SeqCst);
        self.cut[1].store(!to_target, Ordering::SeqCst);
    }

    /// Holds every byte read from now until `until` (toward the target,
    /// and back from it, as `directions` says), then passes them all on:
    /// the peers see silence, and then everything, as after a stalled
    /// link; nothing is lost.
    pub fn stall(&self, until: Instant, directions: [bool; 2]) {
        for (hold, on) in self.hold.iter().zip(directions) {
            if on {
                *hold.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
            }
        }
    }

    /// From now on, pass every byte again, at once: no cut, delay or
    /// stall.
    pub fn heal(&self) {
        for cut in &self.cut {
            cut.store(false, Ordering::SeqCst);
        }
        for hold in &self.hold {
            *hold.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.delay(Duration::ZERO, Duration::ZERO);
    }

    /// From now on, hold every byte going to the target (from the backup,
    /// to the primary's log channel) `to_target` before passing it on, and
    /// every byte coming back `from_target`: a round trip of both.
    pub fn delay(&self, to_target: Duration, from_target: Duration) {
        for (d, delay) in self.delay_us.iter().zip([to_target, from_target]) {
            d.store(delay.as_micros() as u64, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
