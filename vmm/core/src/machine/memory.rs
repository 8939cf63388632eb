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
    #[error("cannot zero guest memory: {source}")]
    Zero { source: std::io::Error },
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

/// Zeroes all of guest memory by handing its pages back to the kernel
/// (anonymous memory reads as zero afterwards), so that a joining backup
/// starts from memory that differs from its primary's only where the
/// primary's pages are not zero, which are the pages a transfer sends.
pub fn zero(mem: &GuestMemory) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion, MemoryRegionAddress};
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::BadSize { size: len })?;
        // SAFETY: `host..host + len` is the region's own anonymous private
        // mapping, alive as long as `mem`; MADV_DONTNEED on it only
        // replaces its contents with zero pages, which KVM's MMU notifier
        // follows for the guest's view of the same pages.
        let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(MemoryError::Zero {
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
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
    fn zeroing_leaves_every_byte_zero() {
        use vm_memory::Bytes;
        let mem = create(2 << 20).expect("mem");
        mem.write_obj(0x5au8, GuestAddress(4096 * 7 + 3))
            .expect("write");
        zero(&mem).expect("zero");
        let b: u8 = mem.read_obj(GuestAddress(4096 * 7 + 3)).expect("read");
        assert_eq!(b, 0);
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
