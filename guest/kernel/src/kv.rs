//! The key-value store: at most 1024 keys in a fixed array, found through
//! an open-addressing (linear probing) index of twice as many slots, so a
//! lookup hashes the key once and usually compares one entry. Keys are
//! never removed (the protocol has no delete), so the index needs no
//! tombstones.

use ftvm_kvproto::{MAX_KEY_LEN, MAX_VALUE_LEN};

pub const MAX_KEYS: usize = 1024;
/// A power of two, and more than MAX_KEYS: a probe always ends at an empty
/// slot.
const SLOTS: usize = 2 * MAX_KEYS;
const EMPTY: u16 = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// MAX_KEYS keys exist and this one is new.
    Full,
    /// The key or the resulting value is longer than the protocol allows.
    TooLarge,
}

struct Entry {
    hash: u32,
    key_len: u8,
    value_len: u16,
    key: [u8; MAX_KEY_LEN],
    value: [u8; MAX_VALUE_LEN],
}

impl Entry {
    const VACANT: Entry = Entry {
        hash: 0,
        key_len: 0,
        value_len: 0,
        key: [0; MAX_KEY_LEN],
        value: [0; MAX_VALUE_LEN],
    };

    fn key(&self) -> &[u8] {
        self.key.get(..self.key_len as usize).unwrap_or(&[])
    }

    fn value(&self) -> &[u8] {
        self.value.get(..self.value_len as usize).unwrap_or(&[])
    }
}

pub struct Store {
    entries: [Entry; MAX_KEYS],
    /// Entry index + 1, or EMPTY.
    slots: [u16; SLOTS],
    len: usize,
}

/// Where a key is, or where it would go.
enum Probe {
    Found(usize),
    Vacant { slot: usize, hash: u32 },
}

impl Store {
    pub const fn new() -> Store {
        Store {
            entries: [Entry::VACANT; MAX_KEYS],
            slots: [EMPTY; SLOTS],
            len: 0,
        }
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline(never)]
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        match self.probe(key) {
            Probe::Found(at) => Some(self.entries[at].value()),
            Probe::Vacant { .. } => None,
        }
    }

    #[inline(never)]
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::TooLarge);
        }
        let entry = self.entry(key)?;
        entry.value[..value.len()].copy_from_slice(value);
        entry.value_len = value.len() as u16;
        Ok(())
    }

    /// Appends `value` to the value of `key`; a missing key counts as empty
    /// (and exists afterwards). Nothing changes on error.
    #[inline(never)]
    pub fn append(&mut self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let old_len = match self.probe(key) {
            Probe::Found(at) => self.entries[at].value_len as usize,
            Probe::Vacant { .. } => 0,
        };
        let new_len = old_len + value.len();
        if new_len > MAX_VALUE_LEN {
            return Err(Error::TooLarge);
        }
        let entry = self.entry(key)?;
        entry.value[old_len..new_len].copy_from_slice(value);
        entry.value_len = new_len as u16;
        Ok(())
    }

    /// The entry of `key`, created with an empty value if missing.
    fn entry(&mut self, key: &[u8]) -> Result<&mut Entry, Error> {
        let at = match self.probe(key) {
            Probe::Found(at) => at,
            Probe::Vacant { slot, hash } => {
                if key.len() > MAX_KEY_LEN {
                    return Err(Error::TooLarge);
                }
                if self.len == MAX_KEYS {
                    return Err(Error::Full);
                }
                let at = self.len;
                let entry = &mut self.entries[at];
                entry.hash = hash;
                entry.key[..key.len()].copy_from_slice(key);
                entry.key_len = key.len() as u8;
                entry.value_len = 0;
                self.slots[slot] = at as u16 + 1;
                self.len += 1;
                at
            }
        };
        Ok(&mut self.entries[at])
    }

    #[inline(never)]
    fn probe(&self, key: &[u8]) -> Probe {
        let hash = fnv1a(key);
        let mut slot = hash as usize % SLOTS;
        loop {
            match self.slots[slot] {
                EMPTY => return Probe::Vacant { slot, hash },
                n => {
                    let at = n as usize - 1;
                    let entry = &self.entries[at];
                    if entry.hash == hash && entry.key() == key {
                        return Probe::Found(at);
                    }
                }
            }
            slot = (slot + 1) % SLOTS;
        }
    }
}

/// 32-bit FNV-1a: a few instructions per byte and fixed, so that primary
/// and backup lay out the table identically.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash = (hash ^ b as u32).wrapping_mul(0x0100_0193);
    }
    hash
}
