//! The client table of Viewstamped Replication: per client id, the number
//! of the last request executed and the reply sent for it, so that a retry
//! is answered byte for byte instead of executed again. 256 clients, found
//! through a linear-probing index; when full, the least recently used client
//! (the tail of an intrusive doubly linked list) is evicted. Every operation
//! is O(1) apart from short probes.

use ftvm_kvproto::MAX_REPLY_LEN;

pub const CAPACITY: usize = 256;
/// A power of two, twice CAPACITY: probes stay short and always end.
const SLOTS: usize = 2 * CAPACITY;
const EMPTY: u16 = 0;
/// No neighbour in the recency list. Links hold a client index + 1, so that
/// an empty table is all zeros and lives in .bss rather than in the image.
const NONE: u16 = 0;

struct Client {
    id: u64,
    last_request: u64,
    /// Neighbours in recency order (towards most / least recently used),
    /// as links (index + 1, or NONE).
    newer: u16,
    older: u16,
    reply_len: u16,
    reply: [u8; MAX_REPLY_LEN],
}

impl Client {
    const VACANT: Client = Client {
        id: 0,
        last_request: 0,
        newer: NONE,
        older: NONE,
        reply_len: 0,
        reply: [0; MAX_REPLY_LEN],
    };
}

pub struct ClientTable {
    clients: [Client; CAPACITY],
    /// Client index + 1, or EMPTY.
    slots: [u16; SLOTS],
    len: usize,
    /// Links to the ends of the recency list.
    newest: u16,
    oldest: u16,
}

/// What the table knows about a client.
pub enum History<'a> {
    Unknown,
    Last { request_num: u64, reply: &'a [u8] },
}

impl ClientTable {
    pub const fn new() -> ClientTable {
        ClientTable {
            clients: [Client::VACANT; CAPACITY],
            slots: [EMPTY; SLOTS],
            len: 0,
            newest: NONE,
            oldest: NONE,
        }
    }

    /// The last request executed for `client_id` and its reply; counts as a
    /// use of the client for eviction.
    #[inline(never)]
    pub fn history(&mut self, client_id: u64) -> History<'_> {
        match self.find(client_id) {
            Ok(slot) => {
                let at = self.index_at(slot);
                self.touch(at);
                let client = &self.clients[at];
                History::Last {
                    request_num: client.last_request,
                    reply: client.reply.get(..client.reply_len as usize).unwrap_or(&[]),
                }
            }
            Err(_) => History::Unknown,
        }
    }

    /// Records that `request_num` of `client_id` was executed and answered
    /// with `reply` (at most MAX_REPLY_LEN bytes; longer replies are not
    /// recorded), evicting the least recently used client if the table is
    /// full.
    #[inline(never)]
    pub fn record(&mut self, client_id: u64, request_num: u64, reply: &[u8]) {
        if reply.len() > MAX_REPLY_LEN {
            return;
        }
        let at = match self.find(client_id) {
            Ok(slot) => {
                let at = self.index_at(slot);
                self.touch(at);
                at
            }
            Err(mut slot) => {
                let at = if self.len < CAPACITY {
                    self.len += 1;
                    self.len - 1
                } else {
                    // The table is full, so the list is not empty.
                    let victim = self.oldest as usize - 1;
                    self.unlink(victim);
                    if let Ok(victim_slot) = self.find(self.clients[victim].id) {
                        self.remove_slot(victim_slot);
                    }
                    // The removal may have shifted the probe chain that
                    // the new id was headed for.
                    slot = match self.find(client_id) {
                        Ok(found) | Err(found) => found,
                    };
                    victim
                };
                self.slots[slot] = link(at);
                self.clients[at].id = client_id;
                self.push_newest(at);
                at
            }
        };
        let client = &mut self.clients[at];
        client.last_request = request_num;
        client.reply[..reply.len()].copy_from_slice(reply);
        client.reply_len = reply.len() as u16;
    }

    /// Ok(the slot holding the id), or Err(the empty slot where it would go).
    fn find(&self, client_id: u64) -> Result<usize, usize> {
        let mut slot = home(client_id);
        loop {
            match self.slots[slot] {
                EMPTY => return Err(slot),
                n if self.clients[n as usize - 1].id == client_id => return Ok(slot),
                _ => slot = (slot + 1) % SLOTS,
            }
        }
    }

    /// The client index an occupied slot holds.
    fn index_at(&self, slot: usize) -> usize {
        self.slots[slot] as usize - 1
    }

    /// Empties an occupied slot by backward shifting: every later entry of
    /// the probe chain that may move closer to its home slot does, so
    /// lookups never need tombstones.
    fn remove_slot(&mut self, slot: usize) {
        let mut hole = slot;
        let mut next = hole;
        loop {
            next = (next + 1) % SLOTS;
            let n = self.slots[next];
            if n == EMPTY {
                break;
            }
            let want = home(self.clients[n as usize - 1].id);
            // The entry at `next` stays if its home lies cyclically in
            // (hole, next]: moving it to the hole would put it before home.
            let stays = if hole <= next {
                hole < want && want <= next
            } else {
                hole < want || want <= next
            };
            if !stays {
                self.slots[hole] = n;
                hole = next;
            }
        }
        self.slots[hole] = EMPTY;
    }

    fn touch(&mut self, at: usize) {
        if self.newest != link(at) {
            self.unlink(at);
            self.push_newest(at);
        }
    }

    fn unlink(&mut self, at: usize) {
        let newer = self.clients[at].newer;
        let older = self.clients[at].older;
        match newer {
            NONE => self.newest = older,
            n => self.clients[n as usize - 1].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            o => self.clients[o as usize - 1].newer = newer,
        }
    }

    fn push_newest(&mut self, at: usize) {
        self.clients[at].newer = NONE;
        self.clients[at].older = self.newest;
        match self.newest {
            NONE => self.oldest = link(at),
            n => self.clients[n as usize - 1].newer = link(at),
        }
        self.newest = link(at);
    }
}

fn link(at: usize) -> u16 {
    at as u16 + 1
}

/// The home slot of a client id (Fibonacci hashing: client ids are random,
/// but a multiplicative hash also spreads sequential ones).
fn home(client_id: u64) -> usize {
    (client_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}
