//! A checked loader for the guest's ELF64 image: every field that comes from
//! the file is validated before it is used, so that a truncated or foreign
//! file is an error that says what is wrong and where, never a panic.

use vm_memory::{Bytes, GuestAddress};

use crate::machine::layout::IMAGE_MIN_ADDR;
use crate::machine::memory::GuestMemory;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
/// More program headers than any sane kernel image has; bounds the work done
/// on a hostile header.
const MAX_PHDRS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoaderError {
    #[error("guest image is {len} bytes, too short for an ELF header (64 bytes)")]
    TooShort { len: usize },
    #[error("guest image is not an ELF file (bytes 0..4 are {found:02x?}, expected 7f 45 4c 46)")]
    NotElf { found: [u8; 4] },
    #[error("guest image is not a little-endian ELF64 file (class {class}, data {data} at offsets 4 and 5)")]
    NotElf64Le { class: u8, data: u8 },
    #[error("guest image is for machine {machine} (e_machine at offset 18), not x86_64 (62)")]
    WrongMachine { machine: u16 },
    #[error("guest image has ELF type {kind} (e_type at offset 16), expected an executable (2)")]
    NotExecutable { kind: u16 },
    #[error("guest image has {count} program headers of {size} bytes (e_phnum/e_phentsize), expected 1..={MAX_PHDRS} of {PHDR_LEN} bytes")]
    BadPhdrTable { count: usize, size: usize },
    #[error("guest image is truncated: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        what: String,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error("segment {index} is malformed: file size {filesz} exceeds memory size {memsz}")]
    FileSizeOverMemSize {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("segment {index} loads at {addr:#x}, below {IMAGE_MIN_ADDR:#x} where the VMM's boot structures live")]
    BelowImageBase { index: usize, addr: u64 },
    #[error("segment {index} ({addr:#x}..{end:#x}) does not fit in {mem_size} bytes of guest memory (use a larger --mem)")]
    DoesNotFit {
        index: usize,
        addr: u64,
        end: u64,
        mem_size: u64,
    },
    #[error("guest image has no loadable segment")]
    NoSegments,
    #[error("entry point {entry:#x} is not inside an executable segment")]
    BadEntry { entry: u64 },
    #[error("writing segment {index} into guest memory at {addr:#x} failed: {reason}")]
    Write {
        index: usize,
        addr: u64,
        reason: String,
    },
}

/// One PT_LOAD segment as it will sit in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub mem_size: u64,
    pub executable: bool,
    /// Range of the segment's bytes in the image file.
    pub file_range: std::ops::Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

impl ElfImage {
    /// Parses and validates the image for a guest of `mem_size` bytes.
    pub fn parse(image: &[u8], mem_size: u64) -> Result<Self, LoaderError> {
        if image.len() < EHDR_LEN {
            return Err(LoaderError::TooShort { len: image.len() });
        }
        let magic = [image[0], image[1], image[2], image[3]];
        if magic != *b"\x7fELF" {
            return Err(LoaderError::NotElf { found: magic });
        }
        if image[4] != 2 || image[5] != 1 {
            return Err(LoaderError::NotElf64Le {
                class: image[4],
                data: image[5],
            });
        }
        let kind = u16_at(image, 16);
        let machine = u16_at(image, 18);
        if machine != EM_X86_64 {
            return Err(LoaderError::WrongMachine { machine });
        }
        if kind != ET_EXEC {
            return Err(LoaderError::NotExecutable { kind });
        }
        let entry = u64_at(image, 24);
        let phoff = u64_at(image, 32);
        let phentsize = usize::from(u16_at(image, 54));
        let phnum = usize::from(u16_at(image, 56));
        if phnum == 0 || phnum > MAX_PHDRS || phentsize != PHDR_LEN {
            return Err(LoaderError::BadPhdrTable {
                count: phnum,
                size: phentsize,
            });
        }
        let table_len = (phnum * PHDR_LEN) as u64;
        let table = slice(image, phoff, table_len, || {
            "the program header table".into()
        })?;

        let mut segments = Vec::new();
        for index in 0..phnum {
            let ph = &table[index * PHDR_LEN..(index + 1) * PHDR_LEN];
            if u32_at(ph, 0) != PT_LOAD {
                continue;
            }
            let flags = u32_at(ph, 4);
            let offset = u64_at(ph, 8);
            let paddr = u64_at(ph, 24);
            let filesz = u64_at(ph, 32);
            let memsz = u64_at(ph, 40);
            if memsz == 0 {
                continue;
            }
            if filesz > memsz {
                return Err(LoaderError::FileSizeOverMemSize {
                    index,
                    filesz,
                    memsz,
                });
            }
            slice(image, offset, filesz, || format!("segment {index}"))?;
            if paddr < IMAGE_MIN_ADDR {
                return Err(LoaderError::BelowImageBase { index, addr: paddr });
            }
            let end = paddr.saturating_add(memsz);
            if end > mem_size {
                return Err(LoaderError::DoesNotFit {
                    index,
                    addr: paddr,
                    end,
                    mem_size,
                });
            }
            segments.push(Segment {
                addr: paddr,
                mem_size: memsz,
                executable: flags & PF_X != 0,
                file_range: offset as usize..(offset + filesz) as usize,
            });
        }
        if segments.is_empty() {
            return Err(LoaderError::NoSegments);
        }
        let in_code = segments
            .iter()
            .any(|s| s.executable && (s.addr..s.addr + s.mem_size).contains(&entry));
        if !in_code {
            return Err(LoaderError::BadEntry { entry });
        }
        Ok(ElfImage { entry, segments })
    }

    /// Copies every segment into guest memory and zeroes the rest of each
    /// (the .bss), so that a reused memory image cannot leak into the guest.
    pub fn load(&self, image: &[u8], mem: &GuestMemory) -> Result<(), LoaderError> {
        for (index, seg) in self.segments.iter().enumerate() {
            let bytes = &image[seg.file_range.clone()];
            let write_err = |reason: String| LoaderError::Write {
                index,
                addr: seg.addr,
                reason,
            };
            mem.write_slice(bytes, GuestAddress(seg.addr))
                .map_err(|e| write_err(e.to_string()))?;
            let zeros = vec![0u8; (seg.mem_size as usize).saturating_sub(bytes.len())];
            mem.write_slice(&zeros, GuestAddress(seg.addr + bytes.len() as u64))
                .map_err(|e| write_err(e.to_string()))?;
        }
        Ok(())
    }

    /// The executable segments' bytes with their load addresses, for the
    /// instruction scanner.
    pub fn code<'a>(&'a self, image: &'a [u8]) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        self.segments
            .iter()
            .filter(|s| s.executable)
            .map(move |s| (s.addr, &image[s.file_range.clone()]))
    }
}

/// Wraps raw machine code in a minimal executable ELF: one segment at
/// `IMAGE_MIN_ADDR` (with 4 KiB of zeroed memory after the code), entry at its
/// first byte. For tests and experiments that need a guest smaller than ours.
pub fn flat_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; EHDR_LEN + PHDR_LEN];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[24..32].copy_from_slice(&IMAGE_MIN_ADDR.to_le_bytes());
    f[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
    f[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = EHDR_LEN;
    let data_off = (EHDR_LEN + PHDR_LEN) as u64;
    f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    f[ph + 4..ph + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&data_off.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&IMAGE_MIN_ADDR.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&IMAGE_MIN_ADDR.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
    f.extend_from_slice(code);
    f
}

fn slice(
    image: &[u8],
    start: u64,
    len: u64,
    what: impl FnOnce() -> String,
) -> Result<&[u8], LoaderError> {
    let end = start.saturating_add(len);
    if end > image.len() as u64 {
        return Err(LoaderError::Truncated {
            what: what(),
            start,
            end,
            len: image.len(),
        });
    }
    Ok(&image[start as usize..end as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_image_parses_and_loads_with_zeroed_bss() {
        let elf = flat_elf(&[0xf4, 0xeb, 0xfd]);
        let img = ElfImage::parse(&elf, 4 << 20).expect("valid image");
        assert_eq!(img.entry, 0x10_0000);
        assert_eq!(img.segments.len(), 1);
        let mem = crate::machine::memory::create(4 << 20).expect("memory");
        mem.write_slice(&[0xaa; 16], GuestAddress(0x10_0003))
            .expect("dirty");
        img.load(&elf, &mem).expect("load");
        let mut back = [0u8; 8];
        mem.read_slice(&mut back, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(back, [0xf4, 0xeb, 0xfd, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let elf = flat_elf(&[0x90; 32]);
        for len in 0..elf.len() {
            let err = ElfImage::parse(&elf[..len], 4 << 20).expect_err("truncated");
            assert!(
                matches!(
                    err,
                    LoaderError::TooShort { .. } | LoaderError::Truncated { .. }
                ),
                "len {len}: {err}"
            );
        }
    }

    #[test]
    fn foreign_files_are_named() {
        let mut elf = flat_elf(&[0x90]);
        elf[0] = b'M';
        assert!(matches!(
            ElfImage::parse(&elf, 4 << 20),
            Err(LoaderError::NotElf { .. })
        ));
        let mut elf = flat_elf(&[0x90]);
        elf[18] = 40;
        assert_eq!(
            ElfImage::parse(&elf, 4 << 20),
            Err(LoaderError::WrongMachine { machine: 40 })
        );
    }

    #[test]
    fn an_image_larger_than_memory_is_refused() {
        let elf = flat_elf(&[0x90; 16]);
        let err = ElfImage::parse(&elf, 0x10_0800).expect_err("too small");
        assert!(matches!(err, LoaderError::DoesNotFit { .. }), "{err}");
        assert!(err.to_string().contains("--mem"));
    }

    #[test]
    fn random_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..512), flip in 0usize..200, val in any::<u8>())| {
            let _ = ElfImage::parse(&bytes, 64 << 20);
            let mut elf = flat_elf(&[0x90; 8]);
            let i = flip % elf.len();
            elf[i] = val;
            let _ = ElfImage::parse(&elf, 64 << 20);
        });
    }
}
