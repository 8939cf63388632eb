//! The clients' history: every KV operation a client invoked, when, and what
//! came back, for the linearizability check and the timeline of
//! `ftvm demo`.
//!
//! Times are unix nanoseconds, so that they line up with the `t_ns` of the
//! servers' events files, but they are taken from a monotonic clock (a unix
//! base plus the elapsed [`Instant`]): a wall-clock step during a run must not
//! reorder operations, since the checker reads real-time order from them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Get,
    Put,
    Append,
}

/// One operation of one client. A client has at most one operation in
/// flight, so its operations are ordered by `invoked_ns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryOp {
    pub client: u64,
    #[serde(with = "bytes")]
    pub key: Vec<u8>,
    pub kind: OpKind,
    /// The argument of a put or append; empty for a get.
    #[serde(with = "bytes", default, skip_serializing_if = "Vec::is_empty")]
    pub value: Vec<u8>,
    pub invoked_ns: u64,
    /// `None`: the client gave up without a reply, so the operation may or
    /// may not have taken effect, at any time after its invocation.
    pub completed_ns: Option<u64>,
    /// A completed get's result: `Some(None)` is "no such key". In JSON an
    /// absent `result` is `None` and `"result": null` is `Some(None)`.
    #[serde(with = "get_result", default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Option<Vec<u8>>>,
    /// The server the client last sent the request to before the reply came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<SocketAddr>,
}

impl HistoryOp {
    pub fn is_write(&self) -> bool {
        self.kind != OpKind::Get
    }

    pub fn acknowledged(&self) -> bool {
        self.completed_ns.is_some()
    }
}

/// Unix nanoseconds that never go backwards.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_unix_ns: u64,
    base: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        let base_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Clock {
            base_unix_ns,
            base: Instant::now(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        let elapsed = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.base_unix_ns.saturating_add(elapsed)
    }
}

/// Identifies an operation recorded by [`Recorder::invoke`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpId(usize);

/// Collects the history from many client threads. An operation is entered
/// when it is invoked, so one that never completes is still in the history.
#[derive(Debug)]
pub struct Recorder {
    clock: Clock,
    /// Indexed by [`OpId`]; `None` once withdrawn.
    ops: Mutex<Vec<Option<HistoryOp>>>,
    completed: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new(Clock::start())
    }
}

impl Recorder {
    pub fn new(clock: Clock) -> Recorder {
        Recorder {
            clock,
            ops: Mutex::new(Vec::new()),
            completed: AtomicU64::new(0),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<HistoryOp>>> {
        // A client thread that panicked leaves a history that is still
        // well formed: every entry is written under the lock in one go.
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn invoke(&self, client: u64, key: &[u8], kind: OpKind, value: &[u8]) -> OpId {
        let invoked_ns = self.clock.now_ns();
        let mut ops = self.lock();
        ops.push(Some(HistoryOp {
            client,
            key: key.to_vec(),
            kind,
            value: value.to_vec(),
            invoked_ns,
            completed_ns: None,
            result: None,
            server: None,
        }));
        OpId(ops.len() - 1)
    }

    /// Records the reply to `id`; `result` is the get's result (ignored for
    /// writes).
    pub fn complete(&self, id: OpId, result: Option<Vec<u8>>, server: SocketAddr) {
        let completed_ns = self.clock.now_ns();
        let mut ops = self.lock();
        if let Some(Some(op)) = ops.get_mut(id.0) {
            op.completed_ns = Some(completed_ns);
            op.server = Some(server);
            if op.kind == OpKind::Get {
                op.result = Some(result);
            }
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes back an operation that the server refused without executing
    /// it (e.g. TooLarge): it has no effect, so it is not part of the
    /// history.
    pub fn withdraw(&self, id: OpId) {
        if let Some(slot) = self.lock().get_mut(id.0) {
            *slot = None;
        }
    }

    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Vec<HistoryOp> {
        self.lock().iter().flatten().cloned().collect()
    }
}

/// One operation per line.
pub fn to_jsonl(ops: &[HistoryOp]) -> String {
    let mut out = String::new();
    for op in ops {
        // A HistoryOp has only string keys and plain data: it always
        // serialises.
        if let Ok(line) = serde_json::to_string(op) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

pub fn from_jsonl(text: &str) -> anyhow::Result<Vec<HistoryOp>> {
    use anyhow::Context;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("history line {}", i + 1))
        })
        .collect()
}

/// Shows bytes as text where they are printable ASCII, escaped otherwise.
pub fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// Bytes as a JSON string when they are UTF-8 (keys and values usually
/// are, and a history is read by people), else as an array of numbers.
mod bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(v) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_seq(v),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Repr {
        Text(String),
        Raw(Vec<u8>),
    }

    impl From<Repr> for Vec<u8> {
        fn from(r: Repr) -> Vec<u8> {
            match r {
                Repr::Text(t) => t.into_bytes(),
                Repr::Raw(b) => b,
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Repr::deserialize(d).map(Vec::from)
    }
}

mod get_result {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::bytes;

    pub fn serialize<S: Serializer>(v: &Option<Option<Vec<u8>>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(Some(value)) => bytes::serialize(value, s),
            Some(None) | None => s.serialize_none(),
        }
    }

    /// Called only when the key is present, so a `null` is "no such key".
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<Vec<u8>>>, D::Error> {
        Ok(Some(Option::<bytes::Repr>::deserialize(d)?.map(Vec::from)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, value: &[u8], result: Option<Option<Vec<u8>>>) -> HistoryOp {
        HistoryOp {
            client: 7,
            key: b"k".to_vec(),
            kind,
            value: value.to_vec(),
            invoked_ns: 10,
            completed_ns: Some(20),
            result,
            server: Some("127.0.0.1:7000".parse().unwrap()),
        }
    }

    #[test]
    fn json_round_trip_keeps_found_not_found_and_unknown_apart() {
        let mut unknown = op(OpKind::Get, b"", None);
        unknown.completed_ns = None;
        unknown.server = None;
        let ops = vec![
            op(OpKind::Get, b"", Some(Some(b"v1".to_vec()))),
            op(OpKind::Get, b"", Some(None)),
            unknown,
            op(OpKind::Put, b"v\xff", None),
            op(OpKind::Append, b"x", None),
        ];
        let text = to_jsonl(&ops);
        assert_eq!(text.lines().count(), ops.len());
        assert!(text.contains(r#""result":null"#), "{text}");
        assert!(text.contains(r#""result":"v1""#), "{text}");
        assert_eq!(from_jsonl(&text).unwrap(), ops);
    }

    #[test]
    fn bad_json_names_the_line() {
        let good = to_jsonl(&[op(OpKind::Put, b"v", None)]);
        let err = from_jsonl(&format!("{good}{{\"client\": 1}}\n")).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.starts_with("history line 2:"), "{err}");
    }

    #[test]
    fn recorder_keeps_unfinished_ops_and_drops_withdrawn_ones() {
        let rec = Recorder::default();
        let server = "127.0.0.1:1".parse().unwrap();
        let a = rec.invoke(1, b"k", OpKind::Put, b"v");
        let b = rec.invoke(2, b"k", OpKind::Get, b"");
        let c = rec.invoke(3, b"k", OpKind::Append, b"too long");
        rec.invoke(4, b"k", OpKind::Get, b"");
        rec.complete(a, None, server);
        rec.complete(b, Some(b"v".to_vec()), server);
        rec.withdraw(c);
        let ops = rec.snapshot();
        assert_eq!(ops.len(), 3);
        assert_eq!(rec.completed(), 2);
        assert_eq!(ops[0].result, None);
        assert_eq!(ops[1].result, Some(Some(b"v".to_vec())));
        assert!(ops[1].completed_ns >= Some(ops[1].invoked_ns));
        assert_eq!(ops[2].client, 4);
        assert_eq!(ops[2].completed_ns, None);
    }

    #[test]
    fn clock_is_unix_time_and_monotonic() {
        let clock = Clock::start();
        let a = clock.now_ns();
        let b = clock.now_ns();
        assert!(b >= a);
        assert!(a > 1_600_000_000_000_000_000);
    }
}
