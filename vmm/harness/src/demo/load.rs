//! The demo's clients: each runs its own seeded choice of operations
//! against whoever the arbiter names primary, through the failovers, and
//! one more reads every key back at the end. Every operation goes into the
//! history. Meanwhile the main thread prints the status line and carries
//! out the kills.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arbiter::ArbiterAddr;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::args::{drain, DemoArgs, ARBITER_TIMEOUT, ATTEMPT_TIMEOUT, STATUS_EVERY};
use super::kills::{Kill, Killer, Planned};
use super::report::EtcdLeaderKill;
use super::servers::Servers;
use super::status::Status;
use crate::history::{self, OpKind, Recorder};
use crate::launcher::Cluster;
use ftvm_kvclient::{ClientConfig, ClientError, FailoverConfig, FailoverError, ServerSource};

/// A few keys that every client uses, so that operations on one key
/// overlap (what a linearizability check is about), and many private
/// ones, so that most keys' histories stay short. The guest holds at most
/// 1024 keys; the demo stays well below with the readiness probe's.
const SHARED_KEYS: u32 = 16;
const PRIVATE_KEYS_TOTAL: u32 = 512;
const SHARED_FRACTION: f64 = 0.3;

/// What happened during the load.
pub(super) struct Load {
    pub start_ns: u64,
    pub end_ns: u64,
    /// The kills, in order.
    pub kills: Vec<Kill>,
    /// The kills planned that did not happen.
    pub missed: Vec<Planned>,
    pub resends: u64,
    pub refused: u64,
    pub problems: Vec<String>,
    /// With --etcd: the leader killed and the next one.
    pub etcd: Option<EtcdLeaderKill>,
}

/// How often the demo looks for a new etcd leader after killing one.
const LEADER_POLL: Duration = Duration::from_millis(20);

/// How a request that the client keeps retrying across failover ended.
enum Outcome {
    Reply(Option<Vec<u8>>),
    /// TooLarge: the guest did not execute it.
    Refused,
    /// No reply before the deadline: unknown outcome.
    GaveUp,
    /// An answer that a correct server never gives to this client.
    Failed(String),
}

/// A KV client that follows the primary through the arbiter
/// ([`kv::FailoverClient`](ftvm_kvclient::FailoverClient)), retrying a request
/// with the same number until `give_up`.
struct FailoverClient {
    kv: ftvm_kvclient::FailoverClient,
    resends: u64,
}

impl FailoverClient {
    fn new(arbiter: &ArbiterAddr, vm_id: &str) -> Result<FailoverClient> {
        let config = FailoverConfig {
            round: ClientConfig {
                attempt_timeout: ATTEMPT_TIMEOUT,
                max_attempts: 1,
            },
            arbiter_timeout: ARBITER_TIMEOUT,
            ..FailoverConfig::default()
        };
        let kv = ftvm_kvclient::FailoverClient::new(
            ServerSource::arbiter_at(arbiter.clone(), vm_id),
            config,
        )
        .context("cannot create a KV client")?;
        Ok(FailoverClient { kv, resends: 0 })
    }

    /// The server that sent the last reply.
    fn answered_by(&self) -> SocketAddr {
        self.kv
            .last_answer()
            .map(|a| a.from)
            .or_else(|| self.kv.server())
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Sends the request until a reply comes or `give_up` passes.
    fn call(&mut self, kind: OpKind, key: &[u8], value: &[u8], give_up: Instant) -> Outcome {
        let mut config = self.kv.config();
        config.total_timeout = give_up
            .saturating_duration_since(Instant::now())
            .max(ATTEMPT_TIMEOUT);
        self.kv.set_config(config);
        let before = self.kv.stats().failed_rounds;
        let result = match kind {
            OpKind::Get => self.kv.get(key),
            OpKind::Put => self.kv.put(key, value).map(|()| None),
            OpKind::Append => self.kv.append(key, value).map(|()| None),
        };
        self.resends += self.kv.stats().failed_rounds - before;
        match result {
            Ok(v) => Outcome::Reply(v),
            Err(FailoverError::Client(ClientError::TooLarge { .. })) => Outcome::Refused,
            Err(
                FailoverError::Timeout { .. }
                | FailoverError::NoPrimary { .. }
                | FailoverError::Arbiter { .. },
            ) => Outcome::GaveUp,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// One client's choice of operations: mostly its own keys, some shared
/// ones; every written value is a token unique in the whole run
/// (`p<client>.<n>;` for a put, `a<client>.<n>;` for an append), so that
/// the final value of a key shows which writes it reflects.
pub(crate) struct Workload {
    client: u32,
    private_keys: u32,
    rng: StdRng,
    n: u64,
}

impl Workload {
    pub(crate) fn new(seed: u64, client: u32, clients: u32) -> Workload {
        Workload {
            client,
            private_keys: (PRIVATE_KEYS_TOTAL / clients).max(1),
            rng: StdRng::seed_from_u64(
                seed ^ u64::from(client).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            n: 0,
        }
    }

    pub(crate) fn next(&mut self) -> (OpKind, Vec<u8>, Vec<u8>) {
        self.n += 1;
        let key = if self.rng.random_bool(SHARED_FRACTION) {
            format!("s{}", self.rng.random_range(0..SHARED_KEYS))
        } else {
            format!(
                "c{}k{}",
                self.client,
                self.rng.random_range(0..self.private_keys)
            )
        };
        let (kind, value) = match self.rng.random_range(0..100) {
            0..40 => (OpKind::Get, String::new()),
            40..65 => (OpKind::Put, format!("p{}.{};", self.client, self.n)),
            _ => (OpKind::Append, format!("a{}.{};", self.client, self.n)),
        };
        (kind, key.into_bytes(), value.into_bytes())
    }
}

/// Runs the clients for `--duration`, carries out the kills of `plan`
/// (restarting each victim as a spare), and prints the status line
/// meanwhile.
pub(super) fn run_load(
    args: &DemoArgs,
    seed: u64,
    plan: Vec<Planned>,
    servers: &mut Servers,
    recorder: &Recorder,
) -> Load {
    let arbiter = servers.cluster.arbiter_at();
    let clock = recorder.clock();
    let start = Instant::now();
    let start_ns = clock.now_ns();
    let load_end = start + Duration::from_secs_f64(args.duration);
    let give_up = load_end + drain(args);
    let mut killer = Killer::new(plan, args, &arbiter, start);
    let mut etcd_kill_at = args
        .etcd_kill_at()
        .map(|at| start + Duration::from_secs_f64(at));
    let mut etcd = None;
    let resends = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let failures: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut problems = Vec::new();

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for c in 0..args.clients {
            let (resends, refused, failures) = (&resends, &refused, &failures);
            let fail = move |e: String| failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
            let arbiter = &arbiter;
            handles.push(scope.spawn(move || {
                let mut client = match FailoverClient::new(arbiter, &args.vm_id) {
                    Ok(c) => c,
                    Err(e) => return fail(format!("{e:#}")),
                };
                let mut work = Workload::new(seed, c, args.clients);
                while Instant::now() < load_end {
                    let (kind, key, value) = work.next();
                    let id = recorder.invoke(client.kv.client_id(), &key, kind, &value);
                    match client.call(kind, &key, &value, give_up) {
                        Outcome::Reply(v) => recorder.complete(id, v, client.answered_by()),
                        Outcome::Refused => {
                            recorder.withdraw(id);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::GaveUp => break,
                        Outcome::Failed(e) => {
                            fail(format!("client {c}: {e}"));
                            break;
                        }
                    }
                }
                resends.fetch_add(client.resends, Ordering::Relaxed);
            }));
        }
        let status = Status::new(args, &arbiter, start);
        let mut next_status = start + STATUS_EVERY;
        loop {
            let now = Instant::now();
            if etcd.is_none() && etcd_kill_at.is_some_and(|at| now >= at) {
                match kill_etcd_leader(&servers.cluster, &clock) {
                    Ok(kill) => {
                        println!(
                            "{:>6.1} s  SIGKILL -> etcd leader {}",
                            now.duration_since(start).as_secs_f64(),
                            kill.killed
                        );
                        etcd = Some(kill);
                    }
                    Err(e) => {
                        problems.push(format!("{e:#}"));
                        etcd_kill_at = None;
                    }
                }
            }
            if let Some(kill) = etcd.as_mut().filter(|k| k.elected.is_none()) {
                if let Some(leader) = servers
                    .cluster
                    .arbiter
                    .etcd()
                    .and_then(|e| e.leader().map(|m| e.name(m).to_owned()))
                {
                    let after = clock.now_ns().saturating_sub(kill.killed_unix_ns) as f64 / 1e6;
                    println!(
                        "{:>6.1} s  etcd leader elected: {leader} ({after:.0} ms after the kill)",
                        now.duration_since(start).as_secs_f64()
                    );
                    kill.elected = Some(leader);
                    kill.elected_after_ms = Some(after);
                }
            }
            let killer_wakes = killer.step(servers, &clock, &mut problems);
            if now >= next_status {
                status.print(servers, recorder.completed());
                next_status += STATUS_EVERY;
            }
            if now >= load_end {
                break;
            }
            let mut wake = next_status.min(killer_wakes);
            match (&etcd, etcd_kill_at) {
                (None, Some(at)) => wake = wake.min(at),
                (Some(kill), _) if kill.elected.is_none() => wake = wake.min(now + LEADER_POLL),
                _ => {}
            }
            std::thread::sleep(wake.min(load_end).saturating_duration_since(Instant::now()));
        }
        for h in handles {
            if h.join().is_err() {
                problems.push("a client thread panicked".into());
            }
        }
    });
    problems.extend(failures.into_inner().unwrap_or_else(|p| p.into_inner()));
    let end_ns = start_ns + u64::try_from((load_end - start).as_nanos()).unwrap_or(u64::MAX);
    Load {
        start_ns,
        end_ns,
        missed: killer.missed().to_vec(),
        kills: killer.kills,
        resends: resends.into_inner(),
        refused: refused.into_inner(),
        problems,
        etcd,
    }
}

/// Finds the etcd leader and kills it.
fn kill_etcd_leader(cluster: &Cluster, clock: &crate::history::Clock) -> Result<EtcdLeaderKill> {
    let etcd = cluster
        .arbiter
        .etcd()
        .context("--etcd-kill-at, but the pair does not run on etcd")?;
    let leader = etcd
        .leader()
        .context("the etcd cluster has no leader to kill")?;
    let killed_unix_ns = clock.now_ns();
    etcd.kill(leader)
        .with_context(|| format!("cannot kill {}", etcd.name(leader)))?;
    Ok(EtcdLeaderKill {
        killed: etcd.name(leader).to_owned(),
        killed_unix_ns,
        elected: None,
        elected_after_ms: None,
    })
}

/// Each key's value read back at the end: `None` if the read got no reply,
/// `Some(None)` if the key does not exist.
pub(crate) type FinalValues = BTreeMap<Vec<u8>, Option<Option<Vec<u8>>>>;

/// Reads every key the clients touched, after they are done, through a
/// client of its own (its reads are part of the history, so the
/// linearizability check covers them too). A key maps to `None` when its
/// read got no reply. Also returns the reading client's id.
pub(super) fn read_back(
    args: &DemoArgs,
    arbiter: &ArbiterAddr,
    recorder: &Recorder,
) -> (FinalValues, Option<u64>) {
    let keys: BTreeSet<Vec<u8>> = recorder.snapshot().into_iter().map(|o| o.key).collect();
    let mut finals = BTreeMap::new();
    let mut client = match FailoverClient::new(arbiter, &args.vm_id) {
        Ok(c) => c,
        Err(e) => {
            println!("final reads: {e:#}");
            return (keys.into_iter().map(|k| (k, None)).collect(), None);
        }
    };
    let give_up = Instant::now() + drain(args) + Duration::from_secs(30);
    for key in keys {
        let id = recorder.invoke(client.kv.client_id(), &key, OpKind::Get, b"");
        let value = match client.call(OpKind::Get, &key, b"", give_up) {
            Outcome::Reply(v) => {
                recorder.complete(id, v.clone(), client.answered_by());
                Some(v)
            }
            Outcome::Failed(e) => {
                println!("final read of {:?}: {e}", history::show(&key));
                None
            }
            Outcome::Refused | Outcome::GaveUp => None,
        };
        finals.insert(key, value);
    }
    (finals, Some(client.kv.client_id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_seeded_and_values_are_unique() {
        let mut a = Workload::new(7, 0, 4);
        let mut b = Workload::new(7, 0, 4);
        let mut c = Workload::new(7, 1, 4);
        let mut values = BTreeSet::new();
        for _ in 0..1000 {
            let x = a.next();
            assert_eq!(x, b.next());
            let y = c.next();
            for (kind, key, value) in [x, y] {
                assert!(!key.is_empty() && key.len() <= 64);
                if kind != OpKind::Get {
                    assert!(values.insert(value), "duplicate value");
                }
            }
        }
    }
}
