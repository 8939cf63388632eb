//! A model of the guest's KV service on a loopback UDP socket, for the unit
//! tests of the client and the CLI, with knobs to lose and garble traffic;
//! and a real arbiter run in-process ([`TestArbiter`]) to name one of them
//! primary.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proto::{Op, Reply, Request, Status, MAX_REQUEST_LEN, MAX_VALUE_LEN};

/// Bounds every test even if it forgets to stop its server.
const LIFETIME: Duration = Duration::from_secs(20);
/// How often the server thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Drop this many request datagrams unseen (`usize::MAX`: never answer).
    pub drop_requests: usize,
    /// Execute this many requests but lose their replies.
    pub drop_replies: usize,
    /// Before each reply, send a junk datagram and a reply to another
    /// request number.
    pub decoys: bool,
    /// Send replies from a second socket, as a new primary would after a
    /// failover.
    pub reply_from_other_socket: bool,
    /// Answer every request with this status without executing it.
    pub forced_status: Option<Status>,
    /// While this is set, drop requests unseen, as if cut off.
    pub deaf: Option<Arc<AtomicBool>>,
}

/// The state of a guest: store and client table. Servers started on one
/// `SharedStore` act as a primary and a backup joined by a perfect log
/// channel: a request one of them executed is in the other's client table.
#[derive(Clone, Default)]
pub struct SharedStore(Arc<Mutex<Model>>);

impl SharedStore {
    pub fn value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().store.get(key).cloned()
    }

    /// How many requests were executed (retries answered from the client
    /// table are not).
    pub fn executions(&self) -> u64 {
        self.lock().tsc
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Model> {
        self.0.lock().expect("fake server state poisoned")
    }
}

pub struct FakeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Vec<(u64, u64)>>>,
}

impl FakeServer {
    pub fn start(behavior: Behavior) -> FakeServer {
        Self::start_on(behavior, &SharedStore::default())
    }

    /// A server that executes requests on `store`, shared with others.
    pub fn start_on(behavior: Behavior, store: &SharedStore) -> FakeServer {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind fake server");
        socket
            .set_read_timeout(Some(POLL))
            .expect("set read timeout");
        let other = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind second socket");
        let addr = socket.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::spawn({
            let (stop, received, store) = (stop.clone(), received.clone(), store.clone());
            move || serve(&socket, &other, &behavior, &store, &stop, &received)
        });
        FakeServer {
            addr,
            stop,
            received,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many request datagrams have arrived so far, dropped ones included.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// Stops the server and returns `(client_id, request_num)` of every
    /// request datagram it received, dropped ones included.
    pub fn stop(mut self) -> Vec<(u64, u64)> {
        self.join()
    }

    fn join(&mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread.join().expect("fake server thread panicked"),
            None => Vec::new(),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.join();
    }
}

fn serve(
    socket: &UdpSocket,
    other: &UdpSocket,
    behavior: &Behavior,
    store: &SharedStore,
    stop: &AtomicBool,
    count: &AtomicUsize,
) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + LIFETIME;
    let mut received = Vec::new();
    let (mut requests_dropped, mut replies_dropped) = (0, 0);
    let mut buf = [0; MAX_REQUEST_LEN + 1];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        // The client never sends malformed requests, so the guest's
        // BadRequest replies to them are not modelled.
        let Ok(request) = Request::decode(&buf[..len]) else {
            continue;
        };
        received.push((request.client_id, request.request_num));
        count.fetch_add(1, Ordering::SeqCst);
        if requests_dropped < behavior.drop_requests {
            requests_dropped += 1;
            continue;
        }
        if behavior
            .deaf
            .as_ref()
            .is_some_and(|deaf| deaf.load(Ordering::SeqCst))
        {
            continue;
        }
        let reply = match behavior.forced_status {
            Some(status) => reply_to(&request, status, Vec::new(), 0),
            None => store.lock().handle(&request),
        };
        if replies_dropped < behavior.drop_replies {
            replies_dropped += 1;
            continue;
        }
        let sender = if behavior.reply_from_other_socket {
            other
        } else {
            socket
        };
        if behavior.decoys {
            let stale = Request {
                request_num: request.request_num.wrapping_sub(1),
                ..request.clone()
            };
            let decoy = reply_to(&stale, Status::Ok, b"decoy".to_vec(), 0);
            sender.send_to(b"junk", from).expect("send junk");
            sender.send_to(&decoy, from).expect("send decoy");
        }
        sender.send_to(&reply, from).expect("send reply");
    }
    received
}

fn reply_to(request: &Request, status: Status, value: Vec<u8>, tsc: u64) -> Vec<u8> {
    Reply {
        op: request.op as u8,
        status,
        client_id: request.client_id,
        request_num: request.request_num,
        tsc,
        nonce: rand::random(),
        value,
    }
    .encode()
    .expect("encode reply")
}

#[derive(Default)]
pub struct Model {
    store: HashMap<Vec<u8>, Vec<u8>>,
    /// Per client: the last request number executed and its reply datagram.
    clients: HashMap<u64, (u64, Vec<u8>)>,
    tsc: u64,
}

impl Model {
    fn handle(&mut self, request: &Request) -> Vec<u8> {
        match self.clients.get(&request.client_id) {
            Some((last, reply)) if *last == request.request_num => return reply.clone(),
            Some((last, _)) if *last > request.request_num => {
                return reply_to(request, Status::Stale, Vec::new(), self.tsc)
            }
            _ => {}
        }
        self.tsc += 1;
        let (status, value) = self.execute(request);
        let reply = reply_to(request, status, value, self.tsc);
        self.clients
            .insert(request.client_id, (request.request_num, reply.clone()));
        reply
    }

    fn execute(&mut self, request: &Request) -> (Status, Vec<u8>) {
        match request.op {
            Op::Get => match self.store.get(&request.key) {
                Some(value) => (Status::Ok, value.clone()),
                None => (Status::NotFound, Vec::new()),
            },
            Op::Put => {
                self.store
                    .insert(request.key.clone(), request.value.clone());
                (Status::Ok, Vec::new())
            }
            Op::Append => {
                let value = self.store.entry(request.key.clone()).or_default();
                if value.len() + request.value.len() > MAX_VALUE_LEN {
                    (Status::TooLarge, Vec::new())
                } else {
                    value.extend_from_slice(&request.value);
                    (Status::Ok, Vec::new())
                }
            }
            Op::Entropy => (Status::Ok, rand::random::<u64>().to_le_bytes().to_vec()),
        }
    }
}

/// A real arbiter on loopback, in this process, on a state directory of its
/// own that is removed when it is dropped.
pub struct TestArbiter {
    handle: Option<arbiter::ServerHandle>,
    dir: PathBuf,
}

impl TestArbiter {
    pub fn start() -> TestArbiter {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ftvm-kv-test-arbiter-{}-{}-{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        ));
        let handle = arbiter::Server::bind(
            (Ipv4Addr::LOCALHOST, 0).into(),
            arbiter::ServerConfig::new(&dir),
        )
        .and_then(arbiter::Server::spawn)
        .expect("start the arbiter");
        TestArbiter {
            handle: Some(handle),
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("arbiter running").local_addr()
    }

    pub fn client(&self) -> arbiter::ArbiterClient {
        arbiter::ArbiterClient::new(self.addr())
    }

    /// Makes `primary` the primary of `vm` and `backup` its backup, both
    /// acknowledged, by pinging as the servers would; returns that view.
    pub fn register(
        &self,
        vm: &str,
        primary: &arbiter::Member,
        backup: &arbiter::Member,
    ) -> arbiter::View {
        let client = self.client();
        let view = client.ping(vm, primary, 0).expect("first ping");
        assert_eq!(view.number, 1);
        client.ping(vm, primary, 1).expect("acknowledge view 1");
        let view = client.ping(vm, backup, 0).expect("spare's ping");
        assert_eq!(
            (view.number, view.backup.as_ref()),
            (2, Some(backup)),
            "{view}"
        );
        client.ping(vm, primary, 2).expect("acknowledge view 2");
        view
    }

    /// The backup of `view` claims it and becomes primary of the next view.
    pub fn fail_over(&self, vm: &str, view: &arbiter::View) -> arbiter::View {
        let backup = view.backup.as_ref().expect("the view has a backup");
        match self
            .client()
            .test_and_set(vm, view.number, backup)
            .expect("test-and-set")
        {
            arbiter::TasOutcome::Won { view } => view,
            lost => panic!("the backup lost: {lost:?}"),
        }
    }

    /// Stops the arbiter, keeping its state directory until drop.
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop().expect("stop the arbiter");
        }
    }
}

impl Drop for TestArbiter {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A member for a fake server.
pub fn member(id: &str, server: &FakeServer) -> arbiter::Member {
    arbiter::Member {
        id: id.to_owned(),
        service_addr: server.addr(),
        log_addr: None,
    }
}
