//! Checks that the clients' history is linearizable, key by key, with
//! stateright's [`LinearizabilityTester`].
//!
//! Linearizability is local (Herlihy and Wing): a history is linearizable
//! exactly when each key's sub-history is, so every key is checked on its
//! own. That keeps the search small, since the tester's search is
//! exponential in the number of operations that overlap in time, and lets
//! keys be checked in parallel.
//!
//! An operation whose client gave up without a reply is invoked and never
//! returns: the tester may then place its effect anywhere after its
//! invocation, or leave it out, which is what an unanswered request means.
//!
//! The search is bounded by steps per key and by a deadline for the whole
//! check; a key whose search runs out is reported as not checked rather
//! than holding the caller up.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use crate::history::{show, HistoryOp, OpKind};

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    Get,
    Put(Arc<[u8]>),
    Append(Arc<[u8]>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvRet {
    Written,
    Value(Option<Arc<[u8]>>),
}

/// One key of the guest's store: Get returns the value or nothing, Put sets
/// it, Append appends to it and creates a missing key. (The guest refuses
/// an append beyond 1024 bytes with TooLarge, changing nothing; such a
/// refusal is not an operation of the history.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValue(pub Option<Vec<u8>>);

impl SequentialSpec for KeyValue {
    type Op = KvOp;
    type Ret = KvRet;

    fn invoke(&mut self, op: &KvOp) -> KvRet {
        match op {
            KvOp::Get => KvRet::Value(self.0.as_deref().map(Arc::from)),
            KvOp::Put(v) => {
                self.0 = Some(v.to_vec());
                KvRet::Written
            }
            KvOp::Append(v) => {
                self.0.get_or_insert_with(Vec::new).extend_from_slice(v);
                KvRet::Written
            }
        }
    }

    /// Compares without building the return value: the search calls this
    /// at every step.
    fn is_valid_step(&mut self, op: &KvOp, ret: &KvRet) -> bool {
        match (op, ret) {
            (KvOp::Get, KvRet::Value(seen)) => self.0.as_deref() == seen.as_deref(),
            (KvOp::Put(_) | KvOp::Append(_), KvRet::Written) => {
                self.invoke(op);
                true
            }
            _ => false,
        }
    }
}

/// Where the search of one key stands against its limits. Shared by every
/// copy of the reference object in that key's search, on one thread.
#[derive(Debug)]
struct Budget {
    steps: Cell<u64>,
    max_steps: u64,
    deadline: Instant,
    exhausted: Cell<Option<&'static str>>,
}

/// How often, in steps, the clock is read: reading it at every step would
/// cost more than the step.
const CLOCK_EVERY: u64 = 1024;

impl Budget {
    fn step(&self) -> bool {
        if self.exhausted.get().is_some() {
            return false;
        }
        let n = self.steps.get() + 1;
        self.steps.set(n);
        if n > self.max_steps {
            self.exhausted.set(Some("step budget exhausted"));
        } else if n.is_multiple_of(CLOCK_EVERY) && Instant::now() >= self.deadline {
            self.exhausted.set(Some("time budget exhausted"));
        }
        self.exhausted.get().is_none()
    }
}

/// [`KeyValue`] that refuses every step once the budget is spent. The
/// tester then backtracks out of its search at once and reports no
/// linearization, which the budget tells apart from a real violation.
/// (An operation that never returned is applied without a validity check,
/// so it cannot be refused, but there are only a few of those.)
#[derive(Clone, Debug)]
struct Budgeted {
    spec: KeyValue,
    budget: Rc<Budget>,
}

impl SequentialSpec for Budgeted {
    type Op = KvOp;
    type Ret = KvRet;

    fn invoke(&mut self, op: &KvOp) -> KvRet {
        self.budget.step();
        self.spec.invoke(op)
    }

    fn is_valid_step(&mut self, op: &KvOp, ret: &KvRet) -> bool {
        self.budget.step() && self.spec.is_valid_step(op, ret)
    }
}

#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// A key's history is searched in parts (see [`segments`]); a part
    /// with more operations is not checked, since the search recurses once
    /// per operation and copies what remains at every step.
    pub max_ops_per_segment: usize,
    /// Steps of the search (one operation tried at one point of an order)
    /// per key.
    pub max_steps_per_key: u64,
    /// For the whole check; keys not done by then are not checked.
    pub time_budget: Duration,
    /// Keys checked at once.
    pub threads: usize,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            max_ops_per_segment: 4000,
            max_steps_per_key: 5_000_000,
            time_budget: Duration::from_secs(60),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum KeyVerdict {
    Linearizable,
    NotLinearizable,
    NotChecked { reason: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct KeyReport {
    /// The key, printable.
    pub key: String,
    pub ops: usize,
    /// Operations without a reply.
    pub unknown: usize,
    #[serde(flatten)]
    pub verdict: KeyVerdict,
    /// The key's operations when it is not linearizable, for the report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryOp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overall {
    Linearizable,
    NotLinearizable,
    /// No violation found, but some keys were not checked.
    Incomplete,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub overall: Overall,
    pub total_keys: usize,
    pub total_ops: usize,
    pub keys_checked: usize,
    pub keys_not_linearizable: usize,
    pub keys_not_checked: usize,
    pub elapsed_ms: u64,
    pub keys: Vec<KeyReport>,
}

impl Report {
    pub fn summary(&self) -> String {
        let verdict = match self.overall {
            Overall::Linearizable => "linearizable",
            Overall::NotLinearizable => "NOT linearizable",
            Overall::Incomplete => "incomplete",
        };
        format!(
            "{verdict}: {} keys, {} operations; {} keys checked, {} not linearizable, \
             {} not checked ({} ms)",
            self.total_keys,
            self.total_ops,
            self.keys_checked,
            self.keys_not_linearizable,
            self.keys_not_checked,
            self.elapsed_ms
        )
    }

    /// What went wrong, key by key: each non-linearizable key with its
    /// operations, and each key not checked with the reason.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        for k in &self.keys {
            match &k.verdict {
                KeyVerdict::Linearizable => {}
                KeyVerdict::NotChecked { reason } => {
                    out.push_str(&format!("key {:?}: not checked: {reason}\n", k.key));
                }
                KeyVerdict::NotLinearizable => {
                    out.push_str(&format!(
                        "key {:?} is not linearizable; its {} operations (times in ms from the first):\n",
                        k.key, k.ops
                    ));
                    out.push_str(&describe(&k.history));
                }
            }
        }
        out
    }
}

/// One line per operation, in invocation order.
pub fn describe(ops: &[HistoryOp]) -> String {
    let t0 = ops.iter().map(|o| o.invoked_ns).min().unwrap_or(0);
    let ms = |t: u64| t.saturating_sub(t0) as f64 / 1e6;
    let mut out = String::new();
    for op in ops {
        let what = match op.kind {
            OpKind::Get => "get".to_owned(),
            OpKind::Put => format!("put {:?}", show(&op.value)),
            OpKind::Append => format!("append {:?}", show(&op.value)),
        };
        let until = op
            .completed_ns
            .map_or("no reply".to_owned(), |t| format!("{:.3}", ms(t)));
        let result = match &op.result {
            Some(Some(v)) => format!(" -> {:?}", show(v)),
            Some(None) => " -> not found".to_owned(),
            None => String::new(),
        };
        out.push_str(&format!(
            "  client {:#x}: {what} [{:.3} .. {until}]{result}\n",
            op.client,
            ms(op.invoked_ns)
        ));
    }
    out
}

/// Checks `history` key by key.
pub fn check(history: &[HistoryOp], config: &CheckConfig) -> Report {
    let started = Instant::now();
    let deadline = started + config.time_budget;
    let mut by_key: BTreeMap<&[u8], Vec<HistoryOp>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    let keys: Vec<(&[u8], Vec<HistoryOp>)> = by_key.into_iter().collect();
    let results: Mutex<Vec<Option<KeyReport>>> = Mutex::new(vec![None; keys.len()]);
    let next = AtomicUsize::new(0);
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some((key, ops)) = keys.get(i) else {
            return;
        };
        let report = check_key(key, ops.clone(), config, deadline);
        if let Some(slot) = results.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
            *slot = Some(report);
        }
    };
    // Deep enough for the search's one frame per operation.
    let stack = (config.max_ops_per_segment * 4096).max(8 << 20);
    std::thread::scope(|scope| {
        for n in 0..config.threads.clamp(1, keys.len().max(1)) {
            let spawned = std::thread::Builder::new()
                .name(format!("ftvm-lincheck-{n}"))
                .stack_size(stack)
                .spawn_scoped(scope, worker);
            if let Err(e) = spawned {
                tracing::warn!("cannot start a linearizability checker thread: {e}");
            }
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let keys: Vec<KeyReport> = keys
        .iter()
        .zip(results)
        .map(|((key, ops), report)| {
            report.unwrap_or_else(|| KeyReport {
                key: show(key),
                ops: ops.len(),
                unknown: ops.iter().filter(|o| !o.acknowledged()).count(),
                verdict: KeyVerdict::NotChecked {
                    reason: "no checker thread could be started".into(),
                },
                history: Vec::new(),
            })
        })
        .collect();
    let count = |f: fn(&KeyVerdict) -> bool| keys.iter().filter(|k| f(&k.verdict)).count();
    let keys_not_linearizable = count(|v| *v == KeyVerdict::NotLinearizable);
    let keys_not_checked = count(|v| matches!(v, KeyVerdict::NotChecked { .. }));
    let overall = if keys_not_linearizable > 0 {
        Overall::NotLinearizable
    } else if keys_not_checked > 0 {
        Overall::Incomplete
    } else {
        Overall::Linearizable
    };
    Report {
        overall,
        total_keys: keys.len(),
        total_ops: history.len(),
        keys_checked: keys.len() - keys_not_checked,
        keys_not_linearizable,
        keys_not_checked,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        keys,
    }
}

fn check_key(
    key: &[u8],
    mut ops: Vec<HistoryOp>,
    config: &CheckConfig,
    deadline: Instant,
) -> KeyReport {
    ops.sort_by_key(|o| (o.invoked_ns, o.client));
    let unknown = ops.iter().filter(|o| !o.acknowledged()).count();
    let budget = Rc::new(Budget {
        steps: Cell::new(0),
        max_steps: config.max_steps_per_key,
        deadline,
        exhausted: Cell::new(None),
    });
    let mut verdict = KeyVerdict::Linearizable;
    let mut history = Vec::new();
    for (initial, range) in segments(&ops) {
        let segment = &ops[range.clone()];
        let found = if segment.len() > config.max_ops_per_segment {
            KeyVerdict::NotChecked {
                reason: format!(
                    "{} operations overlap in a chain, more than the limit of {}",
                    segment.len(),
                    config.max_ops_per_segment
                ),
            }
        } else if Instant::now() >= deadline {
            KeyVerdict::NotChecked {
                reason: "time budget exhausted before this key".into(),
            }
        } else {
            search(segment, initial, &budget)
                .unwrap_or_else(|reason| KeyVerdict::NotChecked { reason })
        };
        match found {
            KeyVerdict::Linearizable => {}
            KeyVerdict::NotLinearizable => {
                // With the operation before it, which fixed the state the
                // segment starts from.
                history = ops[range.start.saturating_sub(1)..range.end].to_vec();
                verdict = found;
                break;
            }
            // A violation in a later segment is still worth finding.
            KeyVerdict::NotChecked { .. } => verdict = found,
        }
    }
    KeyReport {
        key: show(key),
        ops: ops.len(),
        unknown,
        verdict,
        history,
    }
}

/// Splits one key's history (in invocation order) into parts that can be
/// checked one after the other, each from a known starting value, so that
/// the search's cost grows with the longest part rather than the whole.
///
/// A part ends at an *isolated* get or put: one that overlaps no other
/// operation of the key, and has no operation without a reply before it
/// (which could take effect at any later time). Every linearization puts
/// all earlier operations before it and all later ones after it, and the
/// value right after it is known: the get's result, or the put's value.
/// So the whole history is linearizable exactly when every part is,
/// starting from the value its predecessor ends with.
fn segments(ops: &[HistoryOp]) -> Vec<(KeyValue, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut initial = KeyValue::default();
    // The latest completion among the operations so far; `None` once one of
    // them has no reply.
    let mut busy_until = Some(0u64);
    for (i, op) in ops.iter().enumerate() {
        let isolated_from_earlier = busy_until.is_some_and(|b| i == 0 || b < op.invoked_ns);
        busy_until = busy_until.zip(op.completed_ns).map(|(b, c)| b.max(c));
        let Some(done) = op.completed_ns else {
            continue;
        };
        let isolated =
            isolated_from_earlier && ops.get(i + 1).is_none_or(|next| next.invoked_ns > done);
        let after = match (op.kind, &op.result) {
            (OpKind::Get, Some(value)) => value.clone(),
            (OpKind::Put, _) => Some(op.value.clone()),
            _ => continue,
        };
        if isolated {
            out.push((
                std::mem::replace(&mut initial, KeyValue(after)),
                start..i + 1,
            ));
            start = i + 1;
        }
    }
    if start < ops.len() {
        out.push((initial, start..ops.len()));
    }
    out
}

/// The tester's thread for each operation (index into `ops`, which is in
/// invocation order). A client's operations are sequential, so a client is
/// a thread, except that after an operation without a reply the client
/// carries on as a new thread: the tester allows one operation in flight
/// per thread, and the abandoned one stays in flight for ever.
fn threads(ops: &[HistoryOp]) -> Result<Vec<u32>, String> {
    let mut last: BTreeMap<u64, (u32, Option<u64>)> = BTreeMap::new();
    let mut next_thread = 0u32;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        if op.completed_ns.is_some_and(|c| c < op.invoked_ns) {
            return Err(format!(
                "malformed history: an operation of client {:#x} completed before it was invoked",
                op.client
            ));
        }
        if op.kind == OpKind::Get && op.acknowledged() && op.result.is_none() {
            return Err(format!(
                "malformed history: a completed get of client {:#x} has no result",
                op.client
            ));
        }
        let thread = match last.get(&op.client) {
            Some(&(thread, Some(done))) if done <= op.invoked_ns => thread,
            Some(&(_, Some(_))) => {
                return Err(format!(
                    "malformed history: client {:#x} invoked an operation before its previous one completed",
                    op.client
                ))
            }
            Some((_, None)) | None => {
                next_thread += 1;
                next_thread
            }
        };
        last.insert(op.client, (thread, op.completed_ns));
        out.push(thread);
    }
    Ok(out)
}

/// Feeds the history to the tester in real-time order and searches for a
/// linearization. `Err` is why the key could not be checked.
fn search(ops: &[HistoryOp], initial: KeyValue, budget: &Rc<Budget>) -> Result<KeyVerdict, String> {
    let threads = threads(ops)?;
    let mut tester = LinearizabilityTester::new(Budgeted {
        spec: initial,
        budget: budget.clone(),
    });
    // At equal times an invocation goes first: the two then count as
    // overlapping, which never turns a linearizable history into a
    // violation.
    const INVOKE: u8 = 0;
    const RETURN: u8 = 1;
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoked_ns, INVOKE, i));
        if let Some(t) = op.completed_ns {
            events.push((t, RETURN, i));
        }
    }
    events.sort_unstable();
    let mut returned = vec![false; ops.len()];
    let mut in_flight: BTreeMap<u32, usize> = BTreeMap::new();
    let tester_error = |e: String| format!("the tester refused the history: {e}");
    for (_, phase, i) in events {
        let thread = threads[i];
        if phase == INVOKE {
            // The same client's previous operation returned at this very
            // nanosecond, so it goes first after all.
            if let Some(prev) = in_flight.remove(&thread) {
                tester
                    .on_return(thread, ret(&ops[prev]))
                    .map_err(tester_error)?;
                returned[prev] = true;
            }
            tester
                .on_invoke(thread, op(&ops[i]))
                .map_err(tester_error)?;
            in_flight.insert(thread, i);
        } else if !returned[i] {
            tester
                .on_return(thread, ret(&ops[i]))
                .map_err(tester_error)?;
            returned[i] = true;
            in_flight.remove(&thread);
        }
    }
    if tester.serialized_history().is_some() {
        Ok(KeyVerdict::Linearizable)
    } else if let Some(why) = budget.exhausted.get() {
        Err(format!("{why} after {} steps", budget.steps.get()))
    } else {
        Ok(KeyVerdict::NotLinearizable)
    }
}

fn op(o: &HistoryOp) -> KvOp {
    match o.kind {
        OpKind::Get => KvOp::Get,
        OpKind::Put => KvOp::Put(Arc::from(o.value.as_slice())),
        OpKind::Append => KvOp::Append(Arc::from(o.value.as_slice())),
    }
}

fn ret(o: &HistoryOp) -> KvRet {
    match (o.kind, &o.result) {
        (OpKind::Get, Some(v)) => KvRet::Value(v.as_deref().map(Arc::from)),
        // `threads` has refused a completed get without a result.
        (OpKind::Get, None) => KvRet::Value(None),
        (OpKind::Put | OpKind::Append, _) => KvRet::Written,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories in milliseconds.
    struct H(Vec<HistoryOp>);

    impl H {
        fn new() -> H {
            H(Vec::new())
        }

        fn add(
            mut self,
            client: u64,
            kind: OpKind,
            value: &str,
            at: u64,
            until: Option<u64>,
            result: Option<Option<&str>>,
        ) -> H {
            self.0.push(HistoryOp {
                client,
                key: b"k".to_vec(),
                kind,
                value: value.as_bytes().to_vec(),
                invoked_ns: at * 1_000_000,
                completed_ns: until.map(|t| t * 1_000_000),
                result: result.map(|r| r.map(|v| v.as_bytes().to_vec())),
                server: None,
            });
            self
        }

        fn put(self, c: u64, v: &str, at: u64, until: u64) -> H {
            self.add(c, OpKind::Put, v, at, Some(until), None)
        }

        fn append(self, c: u64, v: &str, at: u64, until: u64) -> H {
            self.add(c, OpKind::Append, v, at, Some(until), None)
        }

        fn get(self, c: u64, at: u64, until: u64, result: Option<&str>) -> H {
            self.add(c, OpKind::Get, "", at, Some(until), Some(result))
        }

        fn unknown(self, c: u64, kind: OpKind, v: &str, at: u64) -> H {
            self.add(c, kind, v, at, None, None)
        }

        fn verdict(&self) -> KeyVerdict {
            let report = check(&self.0, &CheckConfig::default());
            assert_eq!(report.keys.len(), 1);
            report.keys[0].verdict.clone()
        }
    }

    #[test]
    fn concurrent_linearizable_history_passes() {
        // Two writes overlap; the reads agree on one order (b then a).
        let h = H::new()
            .put(1, "a", 0, 10)
            .put(2, "b", 2, 8)
            .get(3, 3, 12, Some("b"))
            .get(3, 13, 14, Some("a"))
            .append(1, "+", 11, 20)
            .get(2, 15, 25, Some("a+"))
            .get(2, 26, 27, Some("a+"));
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn append_to_a_missing_key_creates_it() {
        let h = H::new()
            .get(1, 0, 1, None)
            .append(1, "x", 2, 3)
            .append(2, "y", 4, 5)
            .get(1, 6, 7, Some("xy"));
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn stale_read_after_acknowledged_put_fails() {
        let h = H::new()
            .put(1, "old", 0, 1)
            .put(1, "new", 2, 3)
            .get(2, 4, 5, Some("old"));
        assert_eq!(h.verdict(), KeyVerdict::NotLinearizable);
        let report = check(&h.0, &CheckConfig::default());
        assert_eq!(report.overall, Overall::NotLinearizable);
        let text = report.explain();
        assert!(text.contains("key \"k\" is not linearizable"), "{text}");
        assert!(text.contains("put \"new\""), "{text}");
        assert!(text.contains("-> \"old\""), "{text}");
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let h = H::new()
            .put(1, "a", 0, 1)
            .append(2, "b", 2, 3)
            .get(3, 10, 11, Some("a"));
        assert_eq!(h.verdict(), KeyVerdict::NotLinearizable);
        let h = H::new().put(1, "a", 0, 1).get(3, 10, 11, None);
        assert_eq!(h.verdict(), KeyVerdict::NotLinearizable);
    }

    #[test]
    fn unknown_outcome_may_have_taken_effect() {
        let h = H::new()
            .put(1, "a", 0, 1)
            .unknown(2, OpKind::Append, "b", 2)
            .get(3, 10, 11, Some("ab"))
            .get(3, 12, 13, Some("ab"));
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn unknown_outcome_may_not_have_taken_effect() {
        let h = H::new()
            .put(1, "a", 0, 1)
            .unknown(2, OpKind::Put, "b", 2)
            .get(3, 10, 11, Some("a"));
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn unknown_outcome_takes_effect_at_most_once_and_not_before_invocation() {
        // Seen, then gone again with nothing else written: impossible.
        let h = H::new()
            .put(1, "a", 0, 1)
            .unknown(2, OpKind::Put, "b", 2)
            .get(3, 10, 11, Some("b"))
            .get(3, 12, 13, Some("a"));
        assert_eq!(h.verdict(), KeyVerdict::NotLinearizable);
        // Read before the write was even sent.
        let h = H::new()
            .put(1, "a", 0, 1)
            .get(3, 2, 3, Some("b"))
            .unknown(2, OpKind::Put, "b", 5);
        assert_eq!(h.verdict(), KeyVerdict::NotLinearizable);
    }

    #[test]
    fn client_carries_on_after_an_unanswered_operation() {
        let h = H::new()
            .unknown(1, OpKind::Append, "x", 0)
            .append(1, "y", 5, 6)
            .get(2, 7, 8, Some("xy"))
            .get(1, 9, 10, Some("xy"));
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn touching_operations_of_one_client_are_sequential() {
        let h = H::new()
            .put(1, "a", 0, 5)
            .get(1, 5, 6, Some("a"))
            .put(2, "b", 5, 7)
            .get(2, 8, 9, Some("b"));
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn overlapping_operations_of_one_client_are_malformed() {
        let h = H::new().put(1, "a", 0, 5).put(1, "b", 3, 6);
        match h.verdict() {
            KeyVerdict::NotChecked { reason } => assert!(reason.contains("malformed"), "{reason}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn keys_are_checked_separately() {
        let mut ops = H::new().put(1, "a", 0, 1).get(2, 2, 3, Some("a")).0;
        let mut other = H::new().put(1, "x", 0, 1).get(2, 2, 3, Some("y")).0;
        for o in &mut other {
            o.key = b"other".to_vec();
        }
        ops.extend(other);
        let report = check(&ops, &CheckConfig::default());
        assert_eq!(report.overall, Overall::NotLinearizable);
        assert_eq!(report.keys_not_linearizable, 1);
        let bad: Vec<_> = report
            .keys
            .iter()
            .filter(|k| k.verdict == KeyVerdict::NotLinearizable)
            .map(|k| k.key.as_str())
            .collect();
        assert_eq!(bad, ["other"]);
        assert!(
            report.summary().starts_with("NOT linearizable"),
            "{}",
            report.summary()
        );
    }

    /// Many fully overlapping writes and a read that fits no order: the
    /// search must explore every order, so it must run out of budget.
    fn hard_history() -> Vec<HistoryOp> {
        let mut h = H::new();
        for c in 1..=12u64 {
            h = h.put(c, &format!("v{c}"), 0, 100);
        }
        h.get(20, 200, 201, Some("nothing")).0
    }

    #[test]
    fn search_beyond_budget_is_not_checked_not_wrong() {
        let config = CheckConfig {
            max_steps_per_key: 10_000,
            ..CheckConfig::default()
        };
        let report = check(&hard_history(), &config);
        assert_eq!(report.overall, Overall::Incomplete, "{}", report.explain());
        match &report.keys[0].verdict {
            KeyVerdict::NotChecked { reason } => {
                assert!(reason.contains("step budget"), "{reason}")
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn time_budget_stops_the_search() {
        let config = CheckConfig {
            max_steps_per_key: u64::MAX,
            time_budget: Duration::from_millis(50),
            ..CheckConfig::default()
        };
        let t = Instant::now();
        let report = check(&hard_history(), &config);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(report.overall, Overall::Incomplete, "{}", report.explain());
    }

    #[test]
    fn too_many_operations_are_not_checked() {
        let config = CheckConfig {
            max_ops_per_segment: 2,
            ..CheckConfig::default()
        };
        // Overlapping in a chain, so that no part of it stands alone.
        let h = H::new()
            .put(1, "a", 0, 10)
            .put(2, "b", 5, 15)
            .put(3, "c", 12, 20);
        let report = check(&h.0, &config);
        assert_eq!(report.overall, Overall::Incomplete);
    }

    #[test]
    fn history_is_split_at_isolated_reads_and_puts() {
        let h = H::new()
            .append(1, "x", 0, 10)
            .put(2, "p", 5, 6)
            .get(3, 20, 21, Some("px"))
            .append(1, "y", 30, 35)
            .append(2, "z", 31, 36)
            .put(3, "q", 40, 41)
            .append(1, "w", 50, 51);
        let parts: Vec<_> = segments(&h.0)
            .into_iter()
            .map(|(initial, range)| (initial.0.map(String::from_utf8), range))
            .collect();
        assert_eq!(
            parts,
            [
                (None, 0..3),
                (Some(Ok("px".to_owned())), 3..6),
                (Some(Ok("q".to_owned())), 6..7)
            ]
        );
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn violation_after_a_split_is_found_and_shown_with_its_start() {
        let h = H::new()
            .put(1, "a", 0, 1)
            .get(2, 2, 3, Some("a"))
            .append(1, "b", 4, 6)
            .append(2, "c", 5, 7)
            .get(3, 8, 9, Some("ab"));
        let report = check(&h.0, &CheckConfig::default());
        assert_eq!(report.overall, Overall::NotLinearizable);
        let shown: Vec<_> = report.keys[0].history.iter().map(|o| o.kind).collect();
        assert_eq!(
            shown,
            [OpKind::Get, OpKind::Append, OpKind::Append, OpKind::Get]
        );
    }

    #[test]
    fn operation_without_reply_keeps_the_history_whole() {
        // The unanswered put may land after the first read: no split there.
        let h = H::new()
            .put(1, "a", 0, 1)
            .unknown(2, OpKind::Put, "b", 2)
            .get(3, 10, 11, Some("a"))
            .get(3, 12, 13, Some("b"));
        assert_eq!(segments(&h.0).len(), 2);
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    /// Four clients, each with one operation at a time, in bursts that
    /// overlap and quiet moments between them: far more operations than
    /// one search may take, checked in parts.
    #[test]
    fn long_history_with_quiet_moments_is_checked_in_parts() {
        let mut h = H::new();
        let mut value = String::new();
        for round in 0..5000u64 {
            let t = round * 100;
            let c = round % 4 + 1;
            h = h.append(c, &format!("{round};"), t, t + 10);
            value.push_str(&format!("{round};"));
            h = h.append(c % 4 + 1, "+", t + 5, t + 15);
            value.push('+');
            if round % 3 == 0 {
                h = h.get(c, t + 20, t + 21, Some(&value));
            }
        }
        let config = CheckConfig {
            max_ops_per_segment: 100,
            ..CheckConfig::default()
        };
        let t = Instant::now();
        let report = check(&h.0, &config);
        assert_eq!(
            report.overall,
            Overall::Linearizable,
            "{}",
            report.explain()
        );
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }

    /// A long, realistic history: four clients on one key, each operation
    /// overlapping the others', all consistent with one order.
    #[test]
    fn long_concurrent_history_is_checked_quickly() {
        let mut ops = Vec::new();
        let mut value: Option<Vec<u8>> = None;
        // Linearization points 1 µs apart, clients in turn; each operation
        // spans from 1.8 µs before its point to 1.5 µs after, so it
        // overlaps the other clients' neighbouring ones.
        for step in 0..600u64 {
            let c = step % 4;
            let at = step * 1000 + 2000;
            let kind = [OpKind::Get, OpKind::Put, OpKind::Append][(step % 3) as usize];
            let arg = format!("{step};").into_bytes();
            let result = match kind {
                OpKind::Get => Some(value.clone()),
                OpKind::Put => {
                    value = Some(arg.clone());
                    None
                }
                OpKind::Append => {
                    value.get_or_insert_with(Vec::new).extend_from_slice(&arg);
                    None
                }
            };
            let invoked = at - 1800;
            let done = at + 1500;
            ops.push(HistoryOp {
                client: c + 1,
                key: b"k".to_vec(),
                kind,
                value: if kind == OpKind::Get { Vec::new() } else { arg },
                invoked_ns: invoked,
                completed_ns: Some(done),
                result,
                server: None,
            });
        }
        let t = Instant::now();
        let report = check(&ops, &CheckConfig::default());
        assert_eq!(
            report.overall,
            Overall::Linearizable,
            "{}",
            report.explain()
        );
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }
}
