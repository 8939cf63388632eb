//! The keys the etcd backend keeps under its prefix, and what each holds:
//!
//! | key | value | written |
//! | --- | --- | --- |
//! | `PREFIX/vm/VM/view` | the VM's record: view, acknowledged, seen, the last view won | by pings and wins, each compared on this key's revision |
//! | `PREFIX/vm/VM/won/N` | the member that won the claim for view N (N in 20 digits, so that keys sort by number) | once, by the win, only if it does not exist |
//! | `PREFIX/vm/VM/heard/ID` | a server heard within the liveness bound: its member information and the view number of its last ping | by each of its pings, bound to its lease |
//! | `PREFIX/vm/VM/retired/ID` | the view in which the server was retired | by the claim that retired it |
//!
//! Values are JSON. VM names and ids may hold any byte, so `/`, `%` and
//! bytes that are not printable ASCII are escaped as `%XX`.

use std::fmt::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::view::{Member, Record, View};

/// The layout of a record's value, in its `format` field.
const RECORD_FORMAT: u32 = 1;

#[derive(Debug, Error)]
pub enum KeyError {
    /// A value under the prefix is not what this backend writes there:
    /// another program's key, or another version's.
    #[error("etcd key {key} holds what this arbiter cannot use: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("cannot encode the value of etcd key {key}: {source}")]
    Encode {
        key: String,
        source: serde_json::Error,
    },
}

/// The key names for one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn vm(&self, vm: &str) -> String {
        format!("{}/vm/{}/", self.prefix, escape(vm))
    }

    pub fn record(&self, vm: &str) -> String {
        self.vm(vm) + "view"
    }

    pub fn won(&self, vm: &str, view: u64) -> String {
        format!("{}won/{view:020}", self.vm(vm))
    }

    pub fn heard_prefix(&self, vm: &str) -> String {
        self.vm(vm) + "heard/"
    }

    pub fn heard(&self, vm: &str, id: &str) -> String {
        self.heard_prefix(vm) + &escape(id)
    }

    pub fn retired_prefix(&self, vm: &str) -> String {
        self.vm(vm) + "retired/"
    }

    pub fn retired(&self, vm: &str, id: &str) -> String {
        self.retired_prefix(vm) + &escape(id)
    }
}

/// Keeps every name one key segment, and distinct names distinct.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_graphic() && byte != b'/' && byte != b'%' {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRecord {
    format: u32,
    view: View,
    acknowledged: bool,
    seen: bool,
    last_won: u64,
}

pub fn encode_record(key: &str, record: &Record) -> Result<Vec<u8>, KeyError> {
    encode(
        key,
        &StoredRecord {
            format: RECORD_FORMAT,
            view: record.view.clone(),
            acknowledged: record.acknowledged,
            seen: record.seen,
            last_won: record.last_won,
        },
    )
}

/// A record that breaks the rules' invariants is refused: deciding from it
/// could name a second primary.
pub fn decode_record(key: &str, value: &[u8]) -> Result<Record, KeyError> {
    let stored: StoredRecord = decode(key, value)?;
    if stored.format != RECORD_FORMAT {
        return Err(corrupt(
            key,
            format!(
                "format {} (this arbiter writes format {RECORD_FORMAT})",
                stored.format
            ),
        ));
    }
    let record = Record {
        view: stored.view,
        acknowledged: stored.acknowledged,
        seen: stored.seen,
        last_won: stored.last_won,
    };
    if record.view.number == 0 {
        return Err(corrupt(key, "view 0 is never stored".into()));
    }
    record.check().map_err(|detail| corrupt(key, detail))?;
    Ok(record)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPing {
    member: Member,
    view_known: u64,
}

pub fn encode_ping(key: &str, member: &Member, view_known: u64) -> Result<Vec<u8>, KeyError> {
    encode(
        key,
        &StoredPing {
            member: member.clone(),
            view_known,
        },
    )
}

/// The member and the view number of a server's last ping.
pub fn decode_ping(key: &str, value: &[u8]) -> Result<(Member, u64), KeyError> {
    let stored: StoredPing = decode(key, value)?;
    Ok((stored.member, stored.view_known))
}

pub fn encode_member(key: &str, member: &Member) -> Result<Vec<u8>, KeyError> {
    encode(key, member)
}

pub fn decode_member(key: &str, value: &[u8]) -> Result<Member, KeyError> {
    decode(key, value)
}

/// Read by people (`etcdctl get`), never by the arbiter: the key's
/// existence is what counts.
#[derive(Serialize)]
struct StoredRetirement {
    view: u64,
}

pub fn encode_retirement(key: &str, view: u64) -> Result<Vec<u8>, KeyError> {
    encode(key, &StoredRetirement { view })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, KeyError> {
    serde_json::to_vec(value).map_err(|source| KeyError::Encode {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, KeyError> {
    serde_json::from_slice(value).map_err(|e| corrupt(key, e.to_string()))
}

fn corrupt(key: &str, detail: String) -> KeyError {
    KeyError::Corrupt {
        key: key.to_owned(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn names_stay_one_segment_and_distinct() {
        let keys = Keys::new("p/q");
        assert_eq!(keys.record("vm1"), "p/q/vm/vm1/view");
        assert_eq!(keys.record("a/b"), "p/q/vm/a%2Fb/view");
        assert_ne!(keys.record("a/b"), keys.record("a%2Fb"));
        assert_eq!(keys.heard("vm", "id 1"), "p/q/vm/vm/heard/id%201");
        assert_eq!(keys.won("vm", 7), "p/q/vm/vm/won/00000000000000000007");
        assert!(keys
            .retired("vm", "x")
            .starts_with(&keys.retired_prefix("vm")));
    }

    #[test]
    fn records_round_trip_and_broken_ones_are_refused() {
        let member = Member {
            id: "a".into(),
            service_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            log_addr: None,
        };
        let record = Record {
            view: View {
                number: 3,
                primary: Some(member.clone()),
                backup: None,
            },
            acknowledged: true,
            seen: true,
            last_won: 2,
        };
        let key = "k";
        let bytes = encode_record(key, &record).unwrap();
        assert_eq!(decode_record(key, &bytes).unwrap(), record);
        let future_win = Record {
            last_won: 3,
            ..record.clone()
        };
        let bytes = encode_record(key, &future_win).unwrap();
        assert!(matches!(
            decode_record(key, &bytes),
            Err(KeyError::Corrupt { .. })
        ));
        let other_format = String::from_utf8(encode_record(key, &record).unwrap())
            .unwrap()
            .replace("\"format\":1", "\"format\":2");
        assert!(decode_record(key, other_format.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("format 2"));
        assert!(decode_record(key, b"hello").is_err());
    }
}
