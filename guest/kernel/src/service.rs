//! The key-value service: one datagram in, at most one reply out, with
//! exactly-once execution through the client table.

use crate::client_table::{ClientTable, History};
use crate::entropy;
use crate::kv::{self, Store};
use ftvm_kvproto::{
    self as protocol, Ids, Op, Parsed, Request, Status, MAX_REPLY_LEN, REPLY_HEADER_LEN,
};

pub struct Service {
    store: Store,
    clients: ClientTable,
    /// Replies to well-formed requests (executed, repeated or Stale).
    pub requests: u64,
    /// BadRequest replies.
    pub bad_requests: u64,
    /// Datagrams that were not ours (too short, no magic): no reply.
    pub not_ours: u64,
}

impl Service {
    pub const fn new() -> Service {
        Service {
            store: Store::new(),
            clients: ClientTable::new(),
            requests: 0,
            bad_requests: 0,
            not_ours: 0,
        }
    }

    pub fn keys(&self) -> usize {
        self.store.len()
    }

    /// Handles one datagram, writing the reply into `out` (at least
    /// MAX_REPLY_LEN bytes). Returns the reply's length, or None if there is
    /// no reply (the datagram is not ours, or `out` is too small).
    #[inline(never)]
    pub fn handle(&mut self, datagram: &[u8], out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..MAX_REPLY_LEN)?;
        let request = match parse(datagram) {
            Parsed::NotOurs => {
                self.not_ours += 1;
                return None;
            }
            Parsed::Bad(ids) => {
                self.bad_requests += 1;
                return Some(fresh_reply(out, &ids, Status::BadRequest));
            }
            Parsed::Request(request) => request,
        };
        self.requests += 1;
        let ids = request.ids();
        match self.clients.history(ids.client_id) {
            History::Last { request_num, reply } if request_num == ids.request_num => {
                out[..reply.len()].copy_from_slice(reply);
                return Some(reply.len());
            }
            History::Last { request_num, .. } if request_num > ids.request_num => {
                return Some(fresh_reply(out, &ids, Status::Stale));
            }
            _ => {}
        }
        let (tsc, nonce) = entropy::stamp();
        let (status, value_len) = self.execute(&request, &mut out[REPLY_HEADER_LEN..]);
        protocol::write_reply_header(out, &ids, status, tsc, nonce, value_len);
        let len = REPLY_HEADER_LEN + value_len;
        // A Busy request was not executed, so a retry must be tried again.
        if status != Status::Busy {
            self.clients
                .record(ids.client_id, ids.request_num, &out[..len]);
        }
        Some(len)
    }

    /// Runs the request against the store, writing any result value into
    /// `value_out`; returns the status and the value's length.
    #[inline(never)]
    fn execute(&mut self, request: &Request, value_out: &mut [u8]) -> (Status, usize) {
        let result = match request.op {
            Op::Get => {
                return match self.store.get(request.key) {
                    Some(value) => {
                        value_out[..value.len()].copy_from_slice(value);
                        (Status::Ok, value.len())
                    }
                    None => (Status::NotFound, 0),
                };
            }
            Op::Entropy => {
                let mix = entropy::mix(protocol::entropy_rounds(request.value));
                value_out[..protocol::ENTROPY_REPLY_VALUE_LEN].copy_from_slice(&mix.to_le_bytes());
                return (Status::Ok, protocol::ENTROPY_REPLY_VALUE_LEN);
            }
            Op::Put => self.store.put(request.key, request.value),
            Op::Append => self.store.append(request.key, request.value),
        };
        match result {
            Ok(()) => (Status::Ok, 0),
            Err(kv::Error::Full) => (Status::Busy, 0),
            Err(kv::Error::TooLarge) => (Status::TooLarge, 0),
        }
    }
}

/// The protocol's parser, kept out of line so that a profile of the guest
/// (`ftvm bench profile`) attributes its instructions to it.
#[inline(never)]
fn parse(datagram: &[u8]) -> Parsed<'_> {
    protocol::parse(datagram)
}

/// A reply that executes nothing (BadRequest, Stale) but still carries the
/// TSC and a nonce of the moment it was made.
fn fresh_reply(out: &mut [u8], ids: &Ids, status: Status) -> usize {
    let (tsc, nonce) = entropy::stamp();
    protocol::write_reply_header(out, ids, status, tsc, nonce, 0);
    REPLY_HEADER_LEN
}
