//! The arbiter on etcd: the README's rules kept by a Raft cluster, so that
//! the arbiter is no single point of failure.
//!
//! Every request runs optimistically, and no client ever holds a lock:
//! it reads the VM's keys in one read-only transaction (one revision),
//! computes the change with the same pure rules as the built-in server
//! (`view.rs`), and commits it with a transaction that compares the
//! revisions it read, so that the change applies only to the state it was
//! computed from; on a conflict it reads again. A client that dies halfway
//! leaves its whole transaction or nothing. A win is also written only if
//! its `won/N` key does not exist yet, so a decision is never replaced.
//! The keys are described in [`keys`]; `docs/fault-tolerance.md` maps each
//! rule to its transaction and explains why the whole is linearizable.
//!
//! The client is etcd-client's async one, driven by a small tokio runtime
//! that this backend owns, behind the blocking [`Arbiter`] trait. Its
//! methods must not be called from inside another tokio runtime.

pub mod cluster;
mod keys;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::runtime::Runtime;
use tokio::task::{AbortHandle, JoinSet};
use tracing::debug;

use crate::api::{Arbiter, ArbiterAddr, EtcdAddr};
use crate::protocol::{check_id, ErrorKind};
use crate::view::{
    self, check_known, log_claim, log_ping, retired_by, Change, Liveness, Member, Record,
    TasOutcome, View, ViewError, MAX_RETIRED,
};
use crate::ArbiterError;
use keys::{KeyError, Keys};

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Bounds each call: every request to etcd in it, and its retries.
    pub timeout: Duration,
    /// The liveness bound, as the TTL of the lease each ping refreshes:
    /// rounded up to whole seconds, and raised by etcd to its minimum
    /// lease TTL (1.5 election timeouts: 2 s with etcd's defaults).
    pub liveness: Duration,
}

impl EtcdConfig {
    /// The shortest lease there is; etcd raises it to its own minimum.
    pub const DEFAULT_LIVENESS: Duration = Duration::from_secs(1);
}

impl Default for EtcdConfig {
    fn default() -> EtcdConfig {
        EtcdConfig {
            timeout: Duration::from_secs(1),
            liveness: Self::DEFAULT_LIVENESS,
        }
    }
}

/// A failed attempt pauses this long before the next, so that a cluster
/// without a leader is not asked as fast as the network allows.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// HTTP/2 pings on idle connections, so that a member that died is
/// noticed before a request waits on it.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Leases are kept per server id so that pings refresh one lease instead
/// of granting a new one each time. A process pings for one id (tests for
/// a few); past this many the map is emptied, and the next pings grant new
/// leases while the old ones expire.
const MAX_LEASES: usize = 64;
/// A read unanswered for this long gets another beside it (see
/// `Shared::read`): far above a read's usual time (a millisecond or two),
/// far below an election's.
const HEDGE_AFTER: Duration = Duration::from_millis(25);
/// Reads of one attempt in flight at once, at most: beyond, the oldest is
/// given up for a new one.
const MAX_READS: usize = 8;
/// How many of the oldest retired ids a claim reads, to forget them once a
/// VM has [`MAX_RETIRED`]: more than a claim adds (one), so that a count
/// pushed past the bound by concurrent claims comes back to it.
const OLDEST_RETIRED: i64 = 4;

/// The arbiter kept in etcd (see the module's documentation). Copies made
/// by [`Arbiter::with_call_timeout`] share its connections.
pub struct EtcdArbiter {
    shared: Arc<Shared>,
    timeout: Duration,
}

struct Shared {
    addr: EtcdAddr,
    keys: Keys,
    /// Whole seconds, at least 1.
    lease_ttl: i64,
    client: Client,
    leases: Mutex<HashMap<String, i64>>,
    /// Declared last, so that it is dropped after the client whose
    /// connections it drives.
    runtime: Runtime,
}

impl fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("addr", &self.shared.addr)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why one attempt at a request did not give its answer.
enum Failure {
    /// etcd did not answer, or answered with an error: retried until the
    /// call's time is up, then the arbiter is unreachable.
    Etcd(etcd_client::Error),
    /// What the attempt read changed before it committed: read again.
    Conflict,
    /// The rules refuse the request; nothing was decided.
    Refused(ViewError),
    /// A key under the prefix holds what this backend cannot use.
    Corrupt(KeyError),
}

impl From<etcd_client::Error> for Failure {
    fn from(e: etcd_client::Error) -> Failure {
        Failure::Etcd(e)
    }
}

impl From<KeyError> for Failure {
    fn from(e: KeyError) -> Failure {
        Failure::Corrupt(e)
    }
}

impl EtcdArbiter {
    /// Starts the client's runtime and its connections to `addr`'s
    /// endpoints. It does not wait for etcd: an etcd that cannot be reached
    /// makes each call fail with [`ArbiterError::Unreachable`].
    pub fn connect(addr: &EtcdAddr, config: EtcdConfig) -> Result<EtcdArbiter, ArbiterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ftvm-etcd")
            .enable_all()
            .build()
            .map_err(ArbiterError::Runtime)?;
        let endpoints: Vec<String> = addr
            .endpoints
            .iter()
            .map(|endpoint| format!("http://{endpoint}"))
            .collect();
        // Without a leader a request fails at once ("no leader") rather
        // than waiting for one until its timeout.
        let options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(KEEP_ALIVE, config.timeout)
            .with_require_leader(true);
        let unreachable = |detail: String| ArbiterError::Unreachable {
            addr: ArbiterAddr::Etcd(addr.clone()),
            source: io::Error::other(detail),
        };
        let client = runtime
            .block_on(async {
                tokio::time::timeout(config.timeout, Client::connect(endpoints, Some(options)))
                    .await
            })
            .map_err(|_| unreachable(format!("no connection within {:?}", config.timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        let lease_ttl = config.liveness.as_secs_f64().ceil().max(1.0) as i64;
        Ok(EtcdArbiter {
            shared: Arc::new(Shared {
                addr: addr.clone(),
                keys: Keys::new(&addr.prefix),
                lease_ttl,
                client,
                leases: Mutex::new(HashMap::new()),
                runtime,
            }),
            timeout: config.timeout,
        })
    }

    /// Runs `attempt` until it answers, retrying conflicts and etcd's
    /// errors until the call's timeout.
    fn run<T, F, Fut>(&self, mut attempt: F) -> Result<T, ArbiterError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let addr = || ArbiterAddr::Etcd(self.shared.addr.clone());
        let deadline = Instant::now() + self.timeout;
        self.shared.runtime.block_on(async {
            let mut last_error = None;
            let mut conflicts = 0u32;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let outcome = if left.is_zero() {
                    None
                } else {
                    tokio::time::timeout(left, attempt()).await.ok()
                };
                let Some(outcome) = outcome else {
                    let detail = match &last_error {
                        Some(e) => format!("no answer within {:?}; last error: {e}", self.timeout),
                        None if conflicts > 0 => format!(
                            "no answer within {:?} ({conflicts} conflicting attempts)",
                            self.timeout
                        ),
                        None => format!("no answer within {:?}", self.timeout),
                    };
                    return Err(ArbiterError::Unreachable {
                        addr: addr(),
                        source: io::Error::new(io::ErrorKind::TimedOut, detail),
                    });
                };
                match outcome {
                    Ok(answer) => return Ok(answer),
                    Err(Failure::Conflict) => conflicts += 1,
                    Err(Failure::Etcd(e)) => {
                        debug!(addr = %self.shared.addr, "etcd request failed, retrying: {e}");
                        last_error = Some(e);
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                    }
                    Err(Failure::Refused(e)) => {
                        return Err(ArbiterError::Rejected {
                            addr: addr(),
                            kind: ErrorKind::Refused,
                            message: e.to_string(),
                        })
                    }
                    Err(Failure::Corrupt(e)) => {
                        return Err(ArbiterError::BadResponse {
                            addr: addr(),
                            detail: e.to_string(),
                        })
                    }
                }
            }
        })
    }

    /// Refuses, as the built-in arbiter does, names its protocol refuses.
    fn check_names(&self, vm: &str, member: Option<&Member>) -> Result<(), ArbiterError> {
        check_id("vm", vm)
            .and_then(|()| member.map_or(Ok(()), |m| check_id("member id", &m.id)))
            .map_err(|e| ArbiterError::Rejected {
                addr: ArbiterAddr::Etcd(self.shared.addr.clone()),
                kind: e.kind(),
                message: e.to_string(),
            })
    }

    fn ping_as(
        &self,
        vm: &str,
        me: &Member,
        view_known: u64,
        backup_ready: bool,
    ) -> Result<View, ArbiterError> {
        self.check_names(vm, Some(me))?;
        self.run(|| self.shared.ping_attempt(vm, me, view_known, backup_ready))
    }
}

impl Shared {
    /// One attempt at a ping: read the record, who is heard and whether
    /// `me` is retired; apply the rules; write the record if it changed and
    /// `me`'s heard key, comparing what the rules read.
    async fn ping_attempt(
        &self,
        vm: &str,
        me: &Member,
        view_known: u64,
        backup_ready: bool,
    ) -> Result<View, Failure> {
        let record_key = self.keys.record(vm);
        let heard_prefix = self.keys.heard_prefix(vm);
        let retired_key = self.keys.retired(vm, &me.id);
        let read = vec![
            TxnOp::get(record_key.as_str(), None),
            TxnOp::get(heard_prefix.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(retired_key.as_str(), None),
        ];
        let mut kv = self.client.kv_client();
        let (read, lease) = tokio::join!(self.read(read), self.lease(&me.id));
        let read = read?;
        let snapshot = revision(&read);
        let [record_kvs, heard_kvs, retired_kvs] = gets::<3>(&read)?;
        let (record, record_rev) = decode_record(&record_key, &record_kvs)?;
        check_known(vm, record.view.number, view_known).map_err(Failure::Refused)?;
        let retired_rev = retired_kvs.first().map_or(0, KeyValue::mod_revision);
        let mut heard = Heard::read(&heard_kvs)?;
        heard.servers.retain(|h| h.member.id != me.id);
        if retired_rev == 0 {
            heard.servers.insert(
                0,
                HeardServer {
                    member: me.clone(),
                    view_known,
                    revision: i64::MAX,
                },
            );
        }
        let mut next = record.clone();
        let changes = view::ping(&mut next, me, view_known, backup_ready, &heard);

        let mut when = vec![
            Compare::mod_revision(record_key.as_str(), CompareOp::Equal, record_rev),
            Compare::mod_revision(retired_key.as_str(), CompareOp::Equal, retired_rev),
        ];
        let named = changes.iter().find_map(|c| match c {
            Change::Named { spare, .. } => Some(spare),
            _ => None,
        });
        if let Some(spare) = named {
            // The spare chosen must be the one the rules would choose at
            // commit: no server heard since the read (it would be the most
            // recent), none gone back to alive (a replaced backup), and the
            // spare itself still heard and not retired.
            when.push(
                Compare::mod_revision(heard_prefix.as_str(), CompareOp::Less, snapshot + 1)
                    .with_prefix(),
            );
            if spare.id != me.id {
                let spare_rev = heard.revision_of(&spare.id);
                when.push(Compare::mod_revision(
                    self.keys.heard(vm, &spare.id),
                    CompareOp::Equal,
                    spare_rev,
                ));
            }
        }
        let mut then = Vec::new();
        if next != record {
            then.push(TxnOp::put(
                record_key.as_str(),
                keys::encode_record(&record_key, &next)?,
                None,
            ));
        }
        // A retired server is not heard: it is never named backup, and as a
        // backup it is gone.
        if retired_rev == 0 {
            let key = self.keys.heard(vm, &me.id);
            let value = keys::encode_ping(&key, me, view_known)?;
            then.push(TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease?)),
            ));
        }
        if !then.is_empty() {
            let committed = kv.txn(Txn::new().when(when).and_then(then)).await?;
            if !committed.succeeded() {
                return Err(Failure::Conflict);
            }
        }
        log_ping(vm, me, view_known, backup_ready, &changes, &next.view);
        Ok(next.view)
    }

    /// The lease of `id`'s heard keys, refreshed: each ping keeps it alive,
    /// so that it expires one liveness bound after the server's last ping.
    async fn lease(&self, id: &str) -> Result<i64, Failure> {
        let cached = self.leases().get(id).copied();
        let mut leases = self.client.lease_client();
        if let Some(lease) = cached {
            match leases.keep_alive(lease).await {
                Ok(_) => return Ok(lease),
                // Expired: the server was silent for longer than the bound
                // (or this process was). Its keys are gone; a new lease.
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let lease = leases.grant(self.lease_ttl, None).await?.id();
        let mut cache = self.leases();
        if cache.len() >= MAX_LEASES {
            cache.clear();
        }
        cache.insert(id.to_owned(), lease);
        Ok(lease)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // A map of lease ids: whatever a panicking thread left is usable.
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt at a claim: read the record and the winner of `view`;
    /// apply the rules; write a first win (only if `won/N` does not exist)
    /// and the retirements it makes, comparing the record's revision.
    async fn claim_attempt(
        &self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, Failure> {
        let record_key = self.keys.record(vm);
        let won_key = self.keys.won(vm, view);
        let retired_prefix = self.keys.retired_prefix(vm);
        let read = self
            .read(vec![
                TxnOp::get(record_key.as_str(), None),
                TxnOp::get(won_key.as_str(), None),
                TxnOp::get(
                    retired_prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
                TxnOp::get(
                    retired_prefix.as_str(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_sort(SortTarget::Create, SortOrder::Ascend)
                            .with_limit(OLDEST_RETIRED),
                    ),
                ),
            ])
            .await?;
        let mut kv = self.client.kv_client();
        let responses = read.op_responses();
        let retired_count = match responses.get(2) {
            Some(TxnOpResponse::Get(count)) => count.count(),
            _ => return Err(unexpected_response()),
        };
        let [record_kvs, won_kvs, _, oldest_retired] = gets::<4>(&read)?;
        let (record, record_rev) = decode_record(&record_key, &record_kvs)?;
        let decided = match won_kvs.first() {
            Some(kv) => Some(keys::decode_member(&won_key, kv.value())?),
            None => None,
        };
        let won_rev = won_kvs.first().map_or(0, KeyValue::mod_revision);
        let claimed = record.view.clone();
        let mut next = record.clone();
        let outcome = view::claim(&mut next, decided.as_ref(), vm, view, claimant)
            .map_err(Failure::Refused)?;
        let first_win = outcome.won() && decided.is_none();
        let retired = retired_by(view, claimant, &claimed, &outcome);
        if first_win || !retired.is_empty() {
            let mut when = vec![Compare::mod_revision(
                record_key.as_str(),
                CompareOp::Equal,
                record_rev,
            )];
            let mut then = Vec::new();
            if first_win {
                when.push(Compare::create_revision(
                    won_key.as_str(),
                    CompareOp::Equal,
                    0,
                ));
                then.push(TxnOp::put(
                    won_key.as_str(),
                    keys::encode_member(&won_key, claimant)?,
                    None,
                ));
                then.push(TxnOp::put(
                    record_key.as_str(),
                    keys::encode_record(&record_key, &next)?,
                    None,
                ));
            } else {
                when.push(Compare::mod_revision(
                    won_key.as_str(),
                    CompareOp::Equal,
                    won_rev,
                ));
            }
            let mut retiring = Vec::new();
            for id in &retired {
                let key = self.keys.retired(vm, id);
                let value = keys::encode_retirement(&key, claimed.number)?;
                then.push(TxnOp::put(key.as_str(), value, None));
                then.push(TxnOp::delete(self.keys.heard(vm, id), None));
                retiring.push(key);
            }
            // Forget the oldest beyond the bound, as the built-in arbiter
            // does (a key being written now is not among them: a
            // transaction may not name a key twice).
            let excess = (retired_count + retired.len() as i64 - MAX_RETIRED as i64).max(0);
            for old in oldest_retired
                .iter()
                .map(KeyValue::key)
                .filter(|key| !retiring.iter().any(|r| r.as_bytes() == *key))
                .take(excess as usize)
            {
                then.push(TxnOp::delete(old, None));
            }
            let committed = kv.txn(Txn::new().when(when).and_then(then)).await?;
            if !committed.succeeded() {
                return Err(Failure::Conflict);
            }
        }
        log_claim(vm, view, claimant, &outcome, first_win);
        Ok(outcome)
    }

    async fn query_attempt(&self, vm: &str) -> Result<View, Failure> {
        let key = self.keys.record(vm);
        let response = self.read(vec![TxnOp::get(key.as_str(), None)]).await?;
        let [kvs] = gets::<1>(&response)?;
        let (record, _) = decode_record(&key, &kvs)?;
        Ok(record.view)
    }

    /// `ops` (gets) as one read-only transaction, hedged: a read without
    /// an answer after [`HEDGE_AFTER`] is not given up, but another is sent
    /// beside it, and the first answer wins. A member that has not noticed
    /// yet that its leader died passes reads on to it and waits; once
    /// another leads, the next read gets through at once, while a read that
    /// is only slow is cut short only when [`MAX_READS`] newer ones wait
    /// beside it.
    async fn read(&self, ops: Vec<TxnOp>) -> Result<TxnResponse, etcd_client::Error> {
        let mut reads = JoinSet::new();
        let mut sent: VecDeque<AbortHandle> = VecDeque::new();
        let mut send = |reads: &mut JoinSet<_>| {
            if sent.len() >= MAX_READS {
                if let Some(oldest) = sent.pop_front() {
                    oldest.abort();
                }
            }
            let mut kv = self.client.kv_client();
            let txn = Txn::new().and_then(ops.clone());
            sent.push_back(reads.spawn(async move { kv.txn(txn).await }));
        };
        send(&mut reads);
        loop {
            tokio::select! {
                done = reads.join_next() => match done {
                    Some(Ok(Ok(response))) => return Ok(response),
                    Some(Ok(Err(e))) if reads.is_empty() => return Err(e),
                    Some(Ok(Err(e))) => debug!(addr = %self.addr, "one of the reads failed: {e}"),
                    // Aborted to make room for a newer one, which is there.
                    Some(Err(e)) if e.is_cancelled() => {}
                    Some(Err(e)) if reads.is_empty() => {
                        return Err(etcd_client::Error::Internal(format!("a read's task failed: {e}")))
                    }
                    Some(Err(e)) => debug!(addr = %self.addr, "a read's task failed: {e}"),
                    // Every read sent ended in an error, returned above.
                    None => {
                        return Err(etcd_client::Error::Internal("no read was sent".into()))
                    }
                },
                () = tokio::time::sleep(HEDGE_AFTER) => send(&mut reads),
            }
        }
    }
}

impl Arbiter for EtcdArbiter {
    fn ping(&self, vm: &str, me: &Member, view_known: u64) -> Result<View, ArbiterError> {
        self.ping_as(vm, me, view_known, true)
    }

    fn ping_seen(&self, vm: &str, me: &Member, view: u64) -> Result<View, ArbiterError> {
        self.ping_as(vm, me, view, false)
    }

    fn test_and_set(
        &self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ArbiterError> {
        self.check_names(vm, Some(claimant))?;
        self.run(|| self.shared.claim_attempt(vm, view, claimant))
    }

    fn query(&self, vm: &str) -> Result<View, ArbiterError> {
        self.check_names(vm, None)?;
        self.run(|| self.shared.query_attempt(vm))
    }

    fn addr(&self) -> ArbiterAddr {
        ArbiterAddr::Etcd(self.shared.addr.clone())
    }

    fn with_call_timeout(&self, timeout: Duration) -> Arc<dyn Arbiter> {
        Arc::new(EtcdArbiter {
            shared: Arc::clone(&self.shared),
            timeout,
        })
    }
}

/// A server heard within the liveness bound: its heard key exists.
struct HeardServer {
    member: Member,
    view_known: u64,
    /// The key's revision: a later ping has a higher one.
    revision: i64,
}

/// The heard keys of a VM at one revision, most recent first.
struct Heard {
    servers: Vec<HeardServer>,
}

impl Heard {
    fn read(kvs: &[KeyValue]) -> Result<Heard, KeyError> {
        let mut servers = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key());
            let (member, view_known) = keys::decode_ping(&key, kv.value())?;
            servers.push(HeardServer {
                member,
                view_known,
                revision: kv.mod_revision(),
            });
        }
        servers.sort_by_key(|s| std::cmp::Reverse(s.revision));
        Ok(Heard { servers })
    }

    fn revision_of(&self, id: &str) -> i64 {
        self.servers
            .iter()
            .find(|s| s.member.id == id)
            .map_or(0, |s| s.revision)
    }
}

/// A heard key exists only for a server that pinged within its lease's
/// TTL and is not retired (retiring deletes it), so being alive is having
/// one. Revisions are unique, so there are no ties.
impl Liveness for Heard {
    fn alive(&self) -> Vec<(&Member, u64)> {
        self.servers
            .iter()
            .map(|s| (&s.member, s.view_known))
            .collect()
    }

    fn gone(&self, id: &str) -> bool {
        !self.servers.iter().any(|s| s.member.id == id)
    }
}

/// The record in `kvs` (the result of a get of its key) and its revision;
/// a VM without one has view 0, at revision 0 (what etcd compares a
/// missing key's revision with).
fn decode_record(key: &str, kvs: &[KeyValue]) -> Result<(Record, i64), KeyError> {
    match kvs.first() {
        Some(kv) => Ok((keys::decode_record(key, kv.value())?, kv.mod_revision())),
        None => Ok((Record::default(), 0)),
    }
}

fn revision(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |h| h.revision())
}

/// The key-values of the `N` gets of a read-only transaction, in order.
fn gets<const N: usize>(response: &TxnResponse) -> Result<[Vec<KeyValue>; N], Failure> {
    let responses = response.op_responses();
    if responses.len() != N {
        return Err(unexpected_response());
    }
    let mut out: [Vec<KeyValue>; N] = std::array::from_fn(|_| Vec::new());
    for (slot, response) in out.iter_mut().zip(responses) {
        match response {
            TxnOpResponse::Get(mut get) => *slot = get.take_kvs(),
            _ => return Err(unexpected_response()),
        }
    }
    Ok(out)
}

fn unexpected_response() -> Failure {
    Failure::Etcd(etcd_client::Error::Internal(
        "a read transaction answered with other than its gets".into(),
    ))
}
