//! Guest memory: one anonymous mapping from guest-physical address 0.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::machine::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE};

/// Guest memory with a dirty bitmap that records the VMM's own writes (a
/// device's DMA, the loader), which KVM's dirty log does not see.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {size} bytes is out of range ({MIN_MEM_SIZE}..={MAX_MEM_SIZE}, a multiple of 4 KiB)")]
    BadSize { size: u64 },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize { size });
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Map { size, source })
}

/// Parses sizes such as `64M`, `1G`, `65536`, `512K`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (examples: 64M, 1G, 1048576)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn sizes_outside_the_range_are_refused() {
        assert!(matches!(create(4096), Err(MemoryError::BadSize { .. })));
        assert!(matches!(create(4 << 30), Err(MemoryError::BadSize { .. })));
        assert!(matches!(
            create((16 << 20) + 1),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(create(16 << 20).is_ok());
    }
}
