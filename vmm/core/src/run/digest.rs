//! Divergence digests: a hash of guest memory kept up to date page by page
//! (only the pages dirtied since the last look are hashed again), and the
//! compact hashes that check every output.

use std::collections::BTreeSet;

use kvm_bindings::kvm_regs;
use logchannel::{PageHash, Registers, ReplayConfig};
use vm_memory::{Bytes, GuestAddress};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::machine::memory::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;

/// The `ReplayConfig.extra` key that says output checks bring the memory
/// hash up to date; its one value is [`OUTPUT_MEMORY_REFRESH`]. Without it
/// they use the last periodic digest's.
pub const OUTPUT_MEMORY_KEY: &str = "output_memory";
pub const OUTPUT_MEMORY_REFRESH: &str = "refresh";

/// Whether a log's output checks refresh the memory hash.
pub fn output_memory_refreshed(config: &ReplayConfig) -> bool {
    config
        .extra
        .get(OUTPUT_MEMORY_KEY)
        .is_some_and(|v| v == OUTPUT_MEMORY_REFRESH)
}

/// The hashes of every guest page and their combination, which is
/// order-independent so one page can be replaced without rehashing the rest.
pub struct MemoryHasher {
    pages: Vec<u64>,
    combined: u64,
    /// Pages rehashed since the last `take_dirty`, for the periodic digest.
    dirty_since_digest: BTreeSet<u64>,
    buf: Vec<u8>,
}

fn hash_page(mem: &GuestMemory, page: u64, buf: &mut [u8]) -> u64 {
    if mem.read_slice(buf, GuestAddress(page * PAGE_SIZE)).is_err() {
        buf.fill(0);
    }
    xxh3_64_with_seed(buf, page)
}

impl MemoryHasher {
    pub fn new(mem: &GuestMemory, mem_size: u64) -> Self {
        let count = mem_size.div_ceil(PAGE_SIZE);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let pages: Vec<u64> = (0..count).map(|p| hash_page(mem, p, &mut buf)).collect();
        let combined = pages.iter().fold(0u64, |acc, h| acc.wrapping_add(*h));
        MemoryHasher {
            pages,
            combined,
            dirty_since_digest: BTreeSet::new(),
            buf,
        }
    }

    /// Rehashes `dirty` pages.
    pub fn refresh(&mut self, mem: &GuestMemory, dirty: impl IntoIterator<Item = u64>) {
        for page in dirty {
            let Some(slot) = self.pages.get_mut(page as usize) else {
                continue;
            };
            let new = hash_page(mem, page, &mut self.buf);
            self.combined = self.combined.wrapping_sub(*slot).wrapping_add(new);
            *slot = new;
            self.dirty_since_digest.insert(page);
        }
    }

    pub fn mem_hash(&self) -> u64 {
        self.combined
    }

    pub fn page_hash(&self, page: u64) -> Option<u64> {
        self.pages.get(page as usize).copied()
    }

    /// The pages dirtied since the last call, with their current hashes.
    pub fn take_dirty(&mut self) -> Vec<PageHash> {
        let pages = std::mem::take(&mut self.dirty_since_digest);
        pages
            .into_iter()
            .map(|page| PageHash {
                page,
                hash: self.pages[page as usize],
            })
            .collect()
    }
}

pub fn registers(r: &kvm_regs) -> Registers {
    Registers::from_array([
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ])
}

/// Registers and memory in 32 bits, for the check at every output.
pub fn state_hash(regs: &Registers, mem_hash: u64) -> u32 {
    let mut bytes = Vec::with_capacity(19 * 8);
    for (_, v) in regs.named() {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&mem_hash.to_le_bytes());
    xxh3_64(&bytes) as u32
}

/// Whether exit `exits` takes a periodic digest (interval 0: never).
pub fn periodic_due(interval: u64, exits: u64) -> bool {
    interval > 0 && exits.is_multiple_of(interval)
}

pub fn output_hash(bytes: &[u8]) -> u32 {
    xxh3_64(bytes) as u32
}

/// Page numbers set in a dirty bitmap (one bit per page, as KVM and
/// vm-memory lay them out).
pub fn pages_in_bitmap(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, word)| {
        let base = i as u64 * 64;
        (0..64u64)
            .filter(move |b| word & (1 << b) != 0)
            .map(move |b| base + b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshing_a_page_tracks_memory_exactly() {
        let mem = crate::machine::memory::create(2 << 20).expect("mem");
        let mut h = MemoryHasher::new(&mem, 2 << 20);
        let start = h.mem_hash();
        mem.write_obj(0xabu8, GuestAddress(5 * PAGE_SIZE + 7))
            .expect("write");
        h.refresh(&mem, [5]);
        assert_ne!(h.mem_hash(), start);
        let fresh = MemoryHasher::new(&mem, 2 << 20);
        assert_eq!(h.mem_hash(), fresh.mem_hash(), "incremental equals full");
        mem.write_obj(0u8, GuestAddress(5 * PAGE_SIZE + 7))
            .expect("write");
        h.refresh(&mem, [5]);
        assert_eq!(h.mem_hash(), start);
        let dirty = h.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].page, 5);
        assert!(h.take_dirty().is_empty());
    }

    #[test]
    fn the_same_bytes_on_different_pages_hash_differently() {
        let mem = crate::machine::memory::create(2 << 20).expect("mem");
        let h = MemoryHasher::new(&mem, 2 << 20);
        assert_ne!(h.page_hash(1), h.page_hash(2));
    }

    #[test]
    fn bitmap_pages_are_listed() {
        let pages: Vec<u64> = pages_in_bitmap(&[0b1010, 1 << 63]).collect();
        assert_eq!(pages, vec![1, 3, 127]);
    }
}
