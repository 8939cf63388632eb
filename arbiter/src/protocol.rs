//! The wire protocol: one JSON object per line each way, specified byte by
//! byte in the crate's README.md.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufRead};

use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::view::{Member, View};

/// The protocol version every request carries in its `version` field.
pub const PROTOCOL_VERSION: u64 = 1;
/// The longest line (without its `\n`) either side accepts.
pub const MAX_LINE: usize = 64 * 1024;
/// The longest VM id or server id, in bytes.
pub const MAX_ID_LEN: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Request {
    Ping {
        vm: String,
        me: Member,
        view_known: u64,
        /// Meaningful only from the primary of the current view pinging with
        /// its number: `false` says it has seen the view but its backup does
        /// not hold its state yet (see the README). Omitted means `true`,
        /// which is what every ping meant before the field existed.
        #[serde(default = "yes", skip_serializing_if = "is_yes")]
        backup_ready: bool,
    },
    TestAndSet {
        vm: String,
        view: u64,
        claimant: Member,
    },
    Query {
        vm: String,
    },
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

/// The reply to `ping` and `query`.
#[derive(Serialize, Deserialize)]
pub(crate) struct ViewReply {
    pub view: View,
}

/// What kind of failure an error response reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request's protocol version is not this arbiter's.
    Version,
    /// The line is not a well-formed request.
    Malformed,
    /// The line exceeds [`MAX_LINE`]; the arbiter closes the connection.
    TooLong,
    /// The arbiter will not answer this request (it names a view from
    /// beyond the arbiter's history).
    Refused,
    /// The decision could not be persisted, so it was not made.
    Storage,
    /// Too many connections; the arbiter closes this one.
    Busy,
    /// The arbiter is in a state it cannot answer from.
    Internal,
    /// A kind this client does not know (a newer arbiter).
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorKind::Version => "version",
            ErrorKind::Malformed => "malformed",
            ErrorKind::TooLong => "too_long",
            ErrorKind::Refused => "refused",
            ErrorKind::Storage => "storage",
            ErrorKind::Busy => "busy",
            ErrorKind::Internal => "internal",
            ErrorKind::Unknown => "unknown",
        };
        f.write_str(name)
    }
}

/// Why a request line could not be read as a request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error(
        "protocol version mismatch: the request has version {got}, this arbiter speaks version \
         {PROTOCOL_VERSION}"
    )]
    Version { got: u64 },
    #[error("request line longer than {MAX_LINE} bytes")]
    TooLong,
}

impl ProtocolError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::Malformed(_) => ErrorKind::Malformed,
            ProtocolError::Version { .. } => ErrorKind::Version,
            ProtocolError::TooLong => ErrorKind::TooLong,
        }
    }
}

/// The version is checked before anything else so that a client of
/// another version is told so, whatever else its request looks like.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| ProtocolError::Malformed(format!("not JSON: {e}")))?;
    // `Value` keeps the last of two equal keys; which one a request meant
    // cannot be known, so it is refused rather than guessed.
    serde_json::from_slice::<NoDuplicateKeys>(line)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(ProtocolError::Malformed(
            "a request must be a JSON object".into(),
        ));
    };
    match fields.remove("version") {
        None => {
            return Err(ProtocolError::Malformed(format!(
                "missing field `version` (this arbiter speaks protocol version {PROTOCOL_VERSION})"
            )))
        }
        Some(Value::Number(n)) => match n.as_u64() {
            Some(PROTOCOL_VERSION) => {}
            Some(got) => return Err(ProtocolError::Version { got }),
            None => return Err(bad_version(&Value::Number(n))),
        },
        Some(other) => return Err(bad_version(&other)),
    }
    let request: Request = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let (vm, member) = match &request {
        Request::Ping { vm, me, .. } => (vm, Some(me)),
        Request::TestAndSet { vm, claimant, .. } => (vm, Some(claimant)),
        Request::Query { vm } => (vm, None),
    };
    check_id("vm", vm)?;
    if let Some(member) = member {
        check_id("member id", &member.id)?;
    }
    Ok(request)
}

/// Walks a JSON text and fails on the first object with two equal keys, at
/// any depth. It keeps nothing, so it works whatever `serde_json` features
/// the build has enabled.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                // The value is read so that the error names the key's place.
                map.next_value::<IgnoredAny>()?;
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
}

fn bad_version(found: &Value) -> ProtocolError {
    ProtocolError::Malformed(format!(
        "`version` must be a non-negative integer, found {found} (this arbiter speaks protocol \
         version {PROTOCOL_VERSION})"
    ))
}

pub(crate) fn check_id(what: &str, id: &str) -> Result<(), ProtocolError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ProtocolError::Malformed(format!(
            "{what} must be 1 to {MAX_ID_LEN} bytes long, found {} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// A request line with its `\n`.
pub(crate) fn encode_request(request: &Request) -> Result<Vec<u8>, serde_json::Error> {
    let Value::Object(fields) = serde_json::to_value(request)? else {
        return Err(serde::ser::Error::custom(
            "a request must encode as an object",
        ));
    };
    let mut line = Map::new();
    line.insert("version".into(), PROTOCOL_VERSION.into());
    line.extend(fields);
    let mut bytes = serde_json::to_vec(&line)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// A success response line with its `\n`.
pub(crate) fn ok_line<T: Serialize>(reply: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Success<'a, T> {
        ok: &'a T,
    }
    match serde_json::to_vec(&Success { ok: reply }) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            bytes
        }
        Err(e) => error_line(
            ErrorKind::Internal,
            &format!("cannot encode the reply: {e}"),
        ),
    }
}

/// An error response line with its `\n`.
pub(crate) fn error_line(kind: ErrorKind, message: &str) -> Vec<u8> {
    let mut bytes = serde_json::json!({ "error": message, "kind": kind })
        .to_string()
        .into_bytes();
    bytes.push(b'\n');
    bytes
}

/// A response as read by a client: the reply, the arbiter's error, or a
/// description of why the line is not a response.
pub(crate) fn parse_response<T: DeserializeOwned>(
    line: &[u8],
) -> Result<Result<T, (ErrorKind, String)>, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err("a response must be a JSON object".into());
    };
    if let Some(error) = fields.remove("error") {
        let message = match error {
            Value::String(s) => s,
            other => other.to_string(),
        };
        let kind = fields
            .remove("kind")
            .and_then(|k| serde_json::from_value(k).ok())
            .unwrap_or(ErrorKind::Unknown);
        return Ok(Err((kind, message)));
    }
    let ok = fields
        .remove("ok")
        .ok_or("neither `ok` nor `error` in the response")?;
    serde_json::from_value(ok)
        .map(Ok)
        .map_err(|e| format!("unexpected reply: {e}"))
}

pub(crate) enum LineRead {
    /// A whole line is in the buffer, without its `\n` (or `\r\n`).
    Line,
    /// The peer closed the connection; a partial line is dropped.
    Eof,
    /// The line exceeds [`MAX_LINE`].
    TooLong,
}

/// Reads up to the next `\n` into `buf`, never holding more than
/// [`MAX_LINE`] bytes. On an error (a read timeout), what was read stays
/// in `buf` and a later call carries on with the same line.
pub(crate) fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<LineRead> {
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (take, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > MAX_LINE {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(take + usize::from(complete));
        if complete {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(LineRead::Line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{LossReason, TasOutcome};
    use std::net::SocketAddr;

    fn member() -> Member {
        Member {
            id: "a".into(),
            service_addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            log_addr: None,
        }
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Ping {
                vm: "vm".into(),
                me: member(),
                view_known: 3,
                backup_ready: true,
            },
            Request::Ping {
                vm: "vm".into(),
                me: member(),
                view_known: 3,
                backup_ready: false,
            },
            Request::TestAndSet {
                vm: "vm".into(),
                view: 3,
                claimant: member(),
            },
            Request::Query { vm: "vm".into() },
        ];
        for request in requests {
            let line = encode_request(&request).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), request);
        }
    }

    #[test]
    fn documented_request_parses() {
        let line = br#"{"version":1,"op":"ping","vm":"vm1","me":{"id":"a","service_addr":"127.0.0.1:5000"},"view_known":0}"#;
        assert_eq!(
            parse_request(line).unwrap(),
            Request::Ping {
                vm: "vm1".into(),
                me: member(),
                view_known: 0,
                backup_ready: true,
            }
        );
        // The field is left out when true, so that a ping reads as it did
        // before the field existed.
        let line = encode_request(&Request::Ping {
            vm: "vm1".into(),
            me: member(),
            view_known: 0,
            backup_ready: true,
        })
        .unwrap();
        assert!(!String::from_utf8(line).unwrap().contains("backup_ready"));
    }

    #[test]
    fn bad_requests_are_named() {
        let cases: &[(&[u8], ErrorKind, &str)] = &[
            (b"{", ErrorKind::Malformed, "not JSON"),
            (b"[1]", ErrorKind::Malformed, "JSON object"),
            (br#"{"op":"query","vm":"x"}"#, ErrorKind::Malformed, "missing field `version`"),
            (br#"{"version":"1","op":"query","vm":"x"}"#, ErrorKind::Malformed, "non-negative integer"),
            (br#"{"version":-1,"op":"query","vm":"x"}"#, ErrorKind::Malformed, "non-negative integer"),
            (br#"{"version":2,"op":"nonsense"}"#, ErrorKind::Version, "version 2, this arbiter speaks version 1"),
            (br#"{"version":1,"op":"nonsense","vm":"x"}"#, ErrorKind::Malformed, "unknown variant `nonsense`"),
            (br#"{"version":1,"op":"query"}"#, ErrorKind::Malformed, "missing field `vm`"),
            (br#"{"version":1,"op":"query","vm":"x","extra":1}"#, ErrorKind::Malformed, "unknown field `extra`"),
            (br#"{"version":1,"op":"query","vm":""}"#, ErrorKind::Malformed, "vm must be 1 to 256 bytes"),
            (br#"{"version":1,"op":"test_and_set","vm":"x","view":1,"claimant":{"id":"a","service_addr":"nowhere"}}"#, ErrorKind::Malformed, "socket address"),
            (br#"{"version":1,"op":"ping","vm":"x","me":{"id":"a","service_addr":"127.0.0.1:1"},"view_known":0,"backup_ready":1}"#, ErrorKind::Malformed, "expected a boolean"),
        ];
        for (line, kind, text) in cases {
            let err = parse_request(line).unwrap_err();
            assert_eq!(err.kind(), *kind, "{err}");
            assert!(err.to_string().contains(text), "{err:?} lacks {text:?}");
        }
    }

    #[test]
    fn duplicate_keys_are_malformed() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"version":1,"op":"query","vm":"a","vm":"b"}"#, "duplicate key `vm`"),
            (br#"{"version":1,"version":1,"op":"query","vm":"a"}"#, "duplicate key `version`"),
            // The same key twice is refused even with the same value.
            (br#"{"version":1,"op":"query","op":"query","vm":"a"}"#, "duplicate key `op`"),
            (
                br#"{"version":1,"op":"ping","vm":"x","me":{"id":"a","id":"b","service_addr":"127.0.0.1:1"},"view_known":0}"#,
                "duplicate key `id`",
            ),
            // Escapes are undone before keys are compared.
            (br#"{"version":1,"op":"query","vm":"a","\u0076m":"b"}"#, "duplicate key `vm`"),
            (br#"{"version":1,"op":"query","vm":"a","x":[{"k":1,"k":2}]}"#, "duplicate key `k`"),
        ];
        for (line, text) in cases {
            let err = parse_request(line).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Malformed, "{err}");
            assert!(err.to_string().contains(text), "{err:?} lacks {text:?}");
            assert!(!err.to_string().contains("not JSON"), "{err:?}");
        }
        // Equal values under different keys are fine.
        assert!(parse_request(br#"{"version":1,"op":"query","vm":"1"}"#).is_ok());
    }

    #[test]
    fn outcomes_are_flat_objects() {
        let lost = TasOutcome::Lost {
            reason: LossReason::Decided { winner: member() },
            view: View::default(),
        };
        let line = ok_line(&lost);
        let text = std::str::from_utf8(&line).unwrap();
        assert_eq!(
            text,
            "{\"ok\":{\"outcome\":\"lost\",\"reason\":\"decided\",\"winner\":{\"id\":\"a\",\
             \"service_addr\":\"127.0.0.1:5000\",\"log_addr\":null},\"view\":{\"number\":0,\
             \"primary\":null,\"backup\":null}}}\n"
        );
        let back: TasOutcome = parse_response(text.trim_end().as_bytes()).unwrap().unwrap();
        assert_eq!(back, lost);
        let err = error_line(ErrorKind::Busy, "full");
        let back = parse_response::<ViewReply>(&err[..err.len() - 1]).unwrap();
        assert!(matches!(back, Err((ErrorKind::Busy, m)) if m == "full"));
    }

    #[test]
    fn lines_are_bounded() {
        let mut input: &[u8] = b"abc\r\ndef";
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut input, &mut buf),
            Ok(LineRead::Line)
        ));
        assert_eq!(buf, b"abc");
        buf.clear();
        assert!(matches!(read_line(&mut input, &mut buf), Ok(LineRead::Eof)));
        let long = vec![b'x'; MAX_LINE + 1];
        buf.clear();
        assert!(matches!(
            read_line(&mut &long[..], &mut buf),
            Ok(LineRead::TooLong)
        ));
        let exact = [vec![b'x'; MAX_LINE], b"\n".to_vec()].concat();
        buf.clear();
        assert!(matches!(
            read_line(&mut &exact[..], &mut buf),
            Ok(LineRead::Line)
        ));
    }
}
