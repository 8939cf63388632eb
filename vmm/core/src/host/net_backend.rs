//! User-mode networking: a host UDP socket on `--service ADDR`. Each datagram
//! it receives becomes a frame for the guest; each frame the guest sends is
//! unwrapped and sent from the socket to the address the frame names.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::host::frame::{
    self, FrameError, GATEWAY_MAC, GUEST_IP, GUEST_MAC, GUEST_SERVICE_PORT, MAX_UDP_PAYLOAD,
};

/// Datagrams waiting for the guest; past this the backend drops, as a NIC
/// whose ring is full would.
const QUEUE_DEPTH: usize = 1024;
/// How often the receiver thread looks at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind the service address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the service address {addr} is IPv6; the guest network is IPv4 only")]
    Ipv6 { addr: SocketAddr },
    #[error("setting up the service socket failed: {0}")]
    Socket(#[from] std::io::Error),
}

/// A datagram from a client, with the address it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Datagram {
    pub from: SocketAddrV4,
    pub payload: Vec<u8>,
}

impl Datagram {
    /// The Ethernet frame the guest receives for this datagram.
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        frame::wrap_udp(
            GATEWAY_MAC,
            GUEST_MAC,
            self.from,
            SocketAddrV4::new(GUEST_IP, GUEST_SERVICE_PORT),
            &self.payload,
        )
    }
}

#[derive(Debug, Default)]
pub struct NetCounters {
    pub received: AtomicU64,
    pub dropped_full: AtomicU64,
    pub dropped_unusable: AtomicU64,
    pub sent: AtomicU64,
    pub tx_unparseable: AtomicU64,
    pub send_errors: AtomicU64,
}

pub struct NetBackend {
    socket: UdpSocket,
    local: SocketAddr,
    incoming: Receiver<Datagram>,
    stop: Arc<AtomicBool>,
    receiver: Option<JoinHandle<()>>,
    pub counters: Arc<NetCounters>,
}

impl NetBackend {
    pub fn bind(addr: SocketAddr) -> Result<Self, NetError> {
        if addr.is_ipv6() {
            return Err(NetError::Ipv6 { addr });
        }
        let socket = UdpSocket::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
        let local = socket.local_addr()?;
        let rx_socket = socket.try_clone()?;
        rx_socket.set_read_timeout(Some(POLL_INTERVAL))?;
        let (tx, incoming) = crossbeam_channel::bounded(QUEUE_DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(NetCounters::default());
        let receiver = {
            let stop = stop.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("ftvm-net-rx".into())
                .spawn(move || receive_loop(&rx_socket, &tx, &stop, &counters))?
        };
        Ok(NetBackend {
            socket,
            local,
            incoming,
            stop,
            receiver: Some(receiver),
            counters,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams as they arrive; the run loop selects on this while the
    /// guest is idle.
    pub fn incoming(&self) -> &Receiver<Datagram> {
        &self.incoming
    }

    /// Sends the payload of a frame the guest transmitted. A frame that is
    /// not UDP over IPv4 is dropped and counted: the guest cannot crash the
    /// VMM by sending garbage.
    pub fn transmit(&self, frame: &[u8]) {
        match frame::unwrap_udp(frame) {
            Ok(udp) => match self.socket.send_to(udp.payload, udp.dst) {
                Ok(_) => {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("sending a guest datagram to {} failed: {e}", udp.dst);
                }
            },
            Err(e) => {
                self.counters.tx_unparseable.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("dropped a guest frame of {} bytes: {e}", frame.len());
            }
        }
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.receiver.take() {
            let _ = handle.join();
        }
    }
}

fn receive_loop(
    socket: &UdpSocket,
    tx: &Sender<Datagram>,
    stop: &AtomicBool,
    counters: &NetCounters,
) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(v) => v,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("service socket receive failed: {e}");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        counters.received.fetch_add(1, Ordering::Relaxed);
        let SocketAddr::V4(from) = from else {
            counters.dropped_unusable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // A datagram too long for one frame is cut to what fits rather than
        // dropped: the guest then sees lengths that do not add up and answers
        // BadRequest (docs/protocol.md), as it does for any other malformed
        // request; no valid request is anywhere near this long.
        let datagram = Datagram {
            from,
            payload: buf[..len.min(MAX_UDP_PAYLOAD)].to_vec(),
        };
        match tx.try_send(datagram) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                counters.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_round_trips_through_the_backend() {
        let backend = NetBackend::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        client
            .send_to(b"hello", backend.local_addr())
            .expect("send");
        let d = backend
            .incoming()
            .recv_timeout(Duration::from_secs(5))
            .expect("datagram");
        assert_eq!(d.payload, b"hello");
        let frame = d.to_frame().expect("frame");
        let udp = frame::unwrap_udp(&frame).expect("unwrap");
        assert_eq!(udp.dst, SocketAddrV4::new(GUEST_IP, GUEST_SERVICE_PORT));
        let reply =
            frame::wrap_udp(GUEST_MAC, GATEWAY_MAC, udp.dst, udp.src, b"world").expect("reply");
        backend.transmit(&reply);
        let mut buf = [0u8; 16];
        let (n, _) = client.recv_from(&mut buf).expect("reply");
        assert_eq!(&buf[..n], b"world");
    }

    #[test]
    fn a_datagram_longer_than_a_frame_reaches_the_guest_cut_to_fit() {
        let backend = NetBackend::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        let long: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
        client.send_to(&long, backend.local_addr()).expect("send");
        let d = backend
            .incoming()
            .recv_timeout(Duration::from_secs(5))
            .expect("datagram");
        assert_eq!(d.payload, long[..MAX_UDP_PAYLOAD]);
        let frame = d.to_frame().expect("a frame that fits");
        assert_eq!(frame.len(), frame::MAX_FRAME_LEN);
        assert_eq!(backend.counters.dropped_unusable.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn garbage_frames_are_counted_not_sent() {
        let backend = NetBackend::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        backend.transmit(&[0u8; 10]);
        backend.transmit(&[0xffu8; 100]);
        assert_eq!(backend.counters.tx_unparseable.load(Ordering::Relaxed), 2);
        assert_eq!(backend.counters.sent.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_port_in_use_is_a_clear_error() {
        let first = NetBackend::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let err = NetBackend::bind(first.local_addr()).err().expect("in use");
        assert!(
            err.to_string().contains("cannot bind the service address"),
            "{err}"
        );
    }
}
