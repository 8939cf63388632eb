//! Linear-sweep decoding of the guest's executable segments (iced-x86): finds
//! the instructions this platform cannot run at CPL0 (SSE, AVX) and the
//! nondeterministic ones the VMM must trap (rdtsc, rdtscp, rdrand, rdseed).

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, Register};

/// A nondeterministic instruction found in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NondetKind {
    Rdtsc,
    Rdtscp,
    Rdrand,
    Rdseed,
}

/// The register an rdrand or rdseed writes: its number in encoding order
/// (0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX, 4 = RSP, 5 = RBP, 6 = RSI, 7 = RDI,
/// 8..=15 = R8..R15) and its width in bytes (2, 4 or 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestRegister {
    pub number: u8,
    pub width: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NondetSite {
    pub addr: u64,
    pub len: usize,
    pub kind: NondetKind,
    /// For rdrand and rdseed.
    pub dest: Option<DestRegister>,
}

fn dest_register(instr: &Instruction) -> Option<DestRegister> {
    let reg = instr.op0_register();
    let full = reg.full_register();
    if !reg.is_gpr() || !(Register::RAX..=Register::R15).contains(&full) {
        return None;
    }
    Some(DestRegister {
        number: (full as u32 - Register::RAX as u32) as u8,
        width: reg.size() as u8,
    })
}

/// An instruction that needs SSE or AVX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimdSite {
    pub addr: u64,
    pub mnemonic: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub instructions: usize,
    pub invalid: usize,
    pub simd: Vec<SimdSite>,
    pub nondet: Vec<NondetSite>,
}

fn needs_simd(instr: &Instruction) -> bool {
    let simd_register = (0..instr.op_count()).any(|i| {
        let r = instr.op_register(i);
        r.is_xmm() || r.is_ymm() || r.is_zmm()
    });
    simd_register
        || instr.cpuid_features().iter().any(|f| {
            let name = format!("{f:?}");
            name.starts_with("SSE") || name.starts_with("AVX") || name.starts_with("SSSE")
        })
}

/// Scans code segments given as (load address, bytes).
pub fn scan<'a>(segments: impl IntoIterator<Item = (u64, &'a [u8])>) -> ScanReport {
    let mut report = ScanReport::default();
    for (addr, bytes) in segments {
        let mut decoder = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
        let mut instr = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            report.instructions += 1;
            if instr.is_invalid() {
                report.invalid += 1;
                continue;
            }
            let kind = match instr.mnemonic() {
                Mnemonic::Rdtsc => Some(NondetKind::Rdtsc),
                Mnemonic::Rdtscp => Some(NondetKind::Rdtscp),
                Mnemonic::Rdrand => Some(NondetKind::Rdrand),
                Mnemonic::Rdseed => Some(NondetKind::Rdseed),
                _ => None,
            };
            if let Some(kind) = kind {
                let dest = match kind {
                    NondetKind::Rdrand | NondetKind::Rdseed => dest_register(&instr),
                    NondetKind::Rdtsc | NondetKind::Rdtscp => None,
                };
                report.nondet.push(NondetSite {
                    addr: instr.ip(),
                    len: instr.len(),
                    kind,
                    dest,
                });
            } else if needs_simd(&instr) {
                let start = (instr.ip() - addr) as usize;
                report.simd.push(SimdSite {
                    addr: instr.ip(),
                    mnemonic: format!("{:?}", instr.mnemonic()).to_lowercase(),
                    bytes: bytes[start..start + instr.len()].to_vec(),
                });
            }
        }
    }
    report
}

/// Whether the instruction at the start of `code` is a string instruction
/// with a repeat prefix (`rep movsq`, `repne scasb`, …). Such an instruction
/// can be interrupted between two of its iterations with RIP still on it, so
/// RIP and registers there do not say how far it is, in a way a single step
/// (which may run any number of iterations on some KVMs) reproduces.
pub fn is_repeated_string(code: &[u8]) -> bool {
    let mut decoder = Decoder::new(64, code, DecoderOptions::NONE);
    let instr = decoder.decode();
    let string = matches!(
        instr.mnemonic(),
        Mnemonic::Movsb
            | Mnemonic::Movsw
            | Mnemonic::Movsd
            | Mnemonic::Movsq
            | Mnemonic::Stosb
            | Mnemonic::Stosw
            | Mnemonic::Stosd
            | Mnemonic::Stosq
            | Mnemonic::Lodsb
            | Mnemonic::Lodsw
            | Mnemonic::Lodsd
            | Mnemonic::Lodsq
            | Mnemonic::Cmpsb
            | Mnemonic::Cmpsw
            | Mnemonic::Cmpsd
            | Mnemonic::Cmpsq
            | Mnemonic::Scasb
            | Mnemonic::Scasw
            | Mnemonic::Scasd
            | Mnemonic::Scasq
            | Mnemonic::Insb
            | Mnemonic::Insw
            | Mnemonic::Insd
            | Mnemonic::Outsb
            | Mnemonic::Outsw
            | Mnemonic::Outsd
    );
    string && (instr.has_rep_prefix() || instr.has_repe_prefix() || instr.has_repne_prefix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_string_instructions_are_recognised() {
        assert!(is_repeated_string(&[0xf3, 0x48, 0xa5])); // rep movsq
        assert!(is_repeated_string(&[0xf3, 0xa4])); // rep movsb
        assert!(is_repeated_string(&[0xf2, 0xae])); // repne scasb
        assert!(!is_repeated_string(&[0x48, 0xa5])); // movsq, once
        assert!(!is_repeated_string(&[0xf3, 0x90])); // pause
        assert!(!is_repeated_string(&[0xf2, 0x0f, 0x10, 0x00])); // movsd xmm0, [rax]
        assert!(!is_repeated_string(&[0x48, 0xff, 0xc0])); // inc rax
        assert!(!is_repeated_string(&[])); // nothing to decode
    }

    #[test]
    fn finds_sse_and_nondeterministic_instructions() {
        let code: &[u8] = &[
            0x0f, 0x31, // rdtsc
            0x0f, 0x57, 0xc0, // xorps xmm0, xmm0
            0x0f, 0x01, 0xf9, // rdtscp
            0x48, 0x0f, 0xc7, 0xf0, // rdrand rax
            0x0f, 0xc7, 0xf8, // rdseed eax
            0xf2, 0x0f, 0x10, 0x00, // movsd xmm0, [rax]
            0xc5, 0xfc, 0x28, 0xc1, // vmovaps ymm0, ymm1
            0x48, 0x01, 0xd8, // add rax, rbx
        ];
        let r = scan([(0x1000u64, code)]);
        let kinds: Vec<_> = r.nondet.iter().map(|s| (s.addr, s.kind, s.len)).collect();
        assert_eq!(
            kinds,
            vec![
                (0x1000, NondetKind::Rdtsc, 2),
                (0x1005, NondetKind::Rdtscp, 3),
                (0x1008, NondetKind::Rdrand, 4),
                (0x100c, NondetKind::Rdseed, 3),
            ]
        );
        let simd: Vec<_> = r
            .simd
            .iter()
            .map(|s| (s.addr, s.mnemonic.as_str()))
            .collect();
        assert_eq!(
            simd,
            vec![(0x1002, "xorps"), (0x100f, "movsd"), (0x1013, "vmovaps")]
        );
        assert_eq!(r.instructions, 8);
        assert_eq!(
            r.nondet[2].dest,
            Some(DestRegister {
                number: 0,
                width: 8
            })
        );
        assert_eq!(
            r.nondet[3].dest,
            Some(DestRegister {
                number: 0,
                width: 4
            })
        );
        assert_eq!(r.nondet[0].dest, None);
    }

    #[test]
    fn integer_code_is_clean() {
        let code: &[u8] = &[0x48, 0x89, 0xd8, 0xf3, 0xa4, 0xf4, 0xc3];
        let r = scan([(0u64, code)]);
        assert!(r.simd.is_empty() && r.nondet.is_empty());
        assert_eq!(r.invalid, 0);
    }
}
