//! The campaign's clients: the demo's seeded workload, each request sent
//! through the lossy proxy in front of whichever server the arbiter names
//! primary. `FailoverClient` sends to the address the arbiter names, which
//! would bypass the proxies, so this asks the arbiter itself and keeps
//! `KvClient`'s rule of retrying a request under the same number.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arbiter::{Arbiter, ArbiterAddr};
use ftvm_kvclient::{ClientConfig, ClientError, KvClient, Op, Status};

use crate::demo::load::{FinalValues, Workload};
use crate::history::{OpKind, Recorder};

/// As the demo's: short, so that clients find a new primary soon.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
const ATTEMPTS_PER_ROUND: u32 = 2;
const ARBITER_TIMEOUT: Duration = Duration::from_millis(300);
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Each server's service address and the proxy in front of it, shared by
/// the clients and grown when a spare starts.
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<BTreeMap<SocketAddr, (SocketAddr, String)>>>);

impl Routes {
    pub fn add(&self, service: SocketAddr, proxy: SocketAddr, name: &str) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service, (proxy, name.to_owned()));
    }

    fn proxy_of(&self, service: SocketAddr) -> Option<SocketAddr> {
        let routes = self.0.read().unwrap_or_else(|p| p.into_inner());
        routes.get(&service).map(|(proxy, _)| *proxy)
    }

    /// The server behind `proxy`, by service address.
    pub fn service_of(&self, proxy: SocketAddr) -> Option<SocketAddr> {
        let routes = self.0.read().unwrap_or_else(|p| p.into_inner());
        routes
            .iter()
            .find(|(_, (p, _))| *p == proxy)
            .map(|(service, _)| *service)
    }

    /// Server names by service address.
    pub fn names(&self) -> BTreeMap<SocketAddr, String> {
        let routes = self.0.read().unwrap_or_else(|p| p.into_inner());
        routes
            .iter()
            .map(|(service, (_, name))| (*service, name.clone()))
            .collect()
    }
}

/// How a request ended.
pub enum Outcome {
    Reply(Option<Vec<u8>>),
    /// Not executed (TooLarge, Busy): not part of the history.
    Refused,
    /// No reply before the deadline: unknown outcome.
    GaveUp,
    /// An answer a correct server never gives.
    Failed(String),
}

pub struct ChaosClient {
    kv: KvClient,
    arbiter: Arc<dyn Arbiter>,
    vm_id: String,
    routes: Routes,
    /// Where requests go now (a proxy), if known.
    current: Option<SocketAddr>,
}

impl ChaosClient {
    pub fn new(arbiter: &ArbiterAddr, vm_id: &str, routes: Routes) -> Result<ChaosClient> {
        let config = ClientConfig {
            attempt_timeout: ATTEMPT_TIMEOUT,
            max_attempts: ATTEMPTS_PER_ROUND,
        };
        // Sent nowhere until the arbiter names a primary.
        let kv = KvClient::connect(SocketAddr::from(([127, 0, 0, 1], 9)), config)
            .context("cannot create a KV client")?;
        let arbiter = arbiter::connect(arbiter, ARBITER_TIMEOUT)
            .context("cannot create the clients' arbiter client")?;
        Ok(ChaosClient {
            kv,
            arbiter,
            vm_id: vm_id.to_owned(),
            routes,
            current: None,
        })
    }

    pub fn client_id(&self) -> u64 {
        self.kv.client_id()
    }

    /// The server that sent the last reply, by its service address.
    pub fn answered_by(&self) -> SocketAddr {
        self.kv
            .last_reply_from()
            .and_then(|p| self.routes.service_of(p))
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Points the client at the proxy of the primary the arbiter names.
    fn resolve(&mut self) -> bool {
        let primary = self
            .arbiter
            .query(&self.vm_id)
            .ok()
            .and_then(|view| view.primary)
            .and_then(|p| self.routes.proxy_of(p.service_addr));
        if let Some(proxy) = primary {
            self.kv.set_server(proxy);
            self.current = Some(proxy);
        }
        primary.is_some()
    }

    /// Sends the request until a reply comes or `give_up` passes.
    pub fn call(&mut self, kind: OpKind, key: &[u8], value: &[u8], give_up: Instant) -> Outcome {
        let op = match kind {
            OpKind::Get => Op::Get,
            OpKind::Put => Op::Put,
            OpKind::Append => Op::Append,
        };
        while Instant::now() < give_up {
            if self.current.is_none() && !self.resolve() {
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
            match self.kv.call(op, key, value) {
                Ok(reply) => {
                    return match reply.status {
                        Status::Ok if kind == OpKind::Get => Outcome::Reply(Some(reply.value)),
                        Status::Ok => Outcome::Reply(None),
                        Status::NotFound if kind == OpKind::Get => Outcome::Reply(None),
                        Status::TooLarge | Status::Busy => Outcome::Refused,
                        other => Outcome::Failed(format!("{op} got {other:?}")),
                    }
                }
                // Perhaps another primary now: ask again, retry the same
                // request.
                Err(ClientError::Timeout { .. }) => self.current = None,
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        }
        Outcome::GaveUp
    }
}

/// What the clients did.
#[derive(Default)]
pub struct LoadCounts {
    pub refused: AtomicU64,
    pub gave_up: AtomicU64,
    pub failures: std::sync::Mutex<Vec<String>>,
}

/// One closed-loop client, until `stop` is set; a request under way when
/// it is set is still seen through, until `give_up`.
#[allow(clippy::too_many_arguments)]
pub fn run_client(
    arbiter: &ArbiterAddr,
    vm_id: &str,
    routes: Routes,
    seed: u64,
    n: u32,
    clients: u32,
    recorder: &Recorder,
    stop: &AtomicBool,
    give_up: Instant,
    counts: &LoadCounts,
) {
    let fail = |e: String| {
        counts
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e)
    };
    let mut client = match ChaosClient::new(arbiter, vm_id, routes) {
        Ok(c) => c,
        Err(e) => return fail(format!("{e:#}")),
    };
    let mut work = Workload::new(seed, n, clients);
    while !stop.load(Ordering::SeqCst) {
        let (kind, key, value) = work.next();
        let id = recorder.invoke(client.client_id(), &key, kind, &value);
        match client.call(kind, &key, &value, give_up) {
            Outcome::Reply(v) => recorder.complete(id, v, client.answered_by()),
            Outcome::Refused => {
                recorder.withdraw(id);
                counts.refused.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::GaveUp => {
                counts.gave_up.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Outcome::Failed(e) => {
                fail(format!("client {n}: {e}"));
                break;
            }
        }
    }
}

/// Reads every key the clients touched through a client of its own, whose
/// reads go into the history too. Also returns that client's id.
pub fn read_back(
    arbiter: &ArbiterAddr,
    vm_id: &str,
    routes: Routes,
    recorder: &Recorder,
    give_up: Instant,
) -> Result<(FinalValues, u64)> {
    let keys: BTreeSet<Vec<u8>> = recorder.snapshot().into_iter().map(|o| o.key).collect();
    let mut client = ChaosClient::new(arbiter, vm_id, routes)?;
    let mut finals = BTreeMap::new();
    for key in keys {
        let id = recorder.invoke(client.client_id(), &key, OpKind::Get, b"");
        let value = match client.call(OpKind::Get, &key, b"", give_up) {
            Outcome::Reply(v) => {
                recorder.complete(id, v.clone(), client.answered_by());
                Some(v)
            }
            Outcome::Refused | Outcome::GaveUp | Outcome::Failed(_) => None,
        };
        finals.insert(key, value);
    }
    Ok((finals, client.client_id()))
}
