//! What each end of a log channel says about itself before any entry flows,
//! and the rules by which the other end refuses it.

use super::wire::CHANNEL_PROTOCOL_VERSION;
use std::fmt;

/// Which end of the channel a VMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    pub(crate) fn code(self) -> u8 {
        match self {
            Role::Primary => 0,
            Role::Backup => 1,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Role> {
        match code {
            0 => Some(Role::Primary),
            1 => Some(Role::Backup),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.pad(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// The handshake message: who is speaking, about which VM, in which view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`CHANNEL_PROTOCOL_VERSION`] unless a test pretends to be another
    /// build.
    pub protocol_version: u32,
    pub vm_id: String,
    /// The arbiter's view number both ends believe in.
    pub view: u64,
    /// SHA-256 of the guest image ([`crate::image_hash`]).
    pub image_hash: [u8; 32],
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// What the guest runs, as the VMM names it (ftvm: `kv`, `race`, …).
    pub workload: String,
    pub role: Role,
    /// The primary's: the sequence number of the first entry it will send
    /// on this connection. The backup's: the one it expects, or 0 to take
    /// whatever the primary sends (a backup joining by state transfer learns
    /// it here).
    pub first_seq: u64,
}

impl Hello {
    /// A hello in this build's protocol version.
    pub fn new(
        role: Role,
        vm_id: impl Into<String>,
        view: u64,
        image_hash: [u8; 32],
        mem_size: u64,
        workload: impl Into<String>,
        first_seq: u64,
    ) -> Hello {
        Hello {
            protocol_version: CHANNEL_PROTOCOL_VERSION,
            vm_id: vm_id.into(),
            view,
            image_hash,
            mem_size,
            workload: workload.into(),
            role,
            first_seq,
        }
    }
}

/// Why a handshake was refused. Each variant names both ends' values; the
/// end that listens is the primary's, the end that connects the backup's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    ProtocolVersion {
        primary: u32,
        backup: u32,
    },
    /// The listening end must say it is the primary, the connecting end the
    /// backup.
    Role {
        listening: Role,
        connecting: Role,
    },
    VmId {
        primary: String,
        backup: String,
    },
    View {
        primary: u64,
        backup: u64,
    },
    ImageHash {
        primary: [u8; 32],
        backup: [u8; 32],
    },
    MemSize {
        primary: u64,
        backup: u64,
    },
    Workload {
        primary: String,
        backup: String,
    },
    /// The backup expects a first sequence number the primary does not
    /// start from.
    FirstSeq {
        primary: u64,
        backup: u64,
    },
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Mismatch::ProtocolVersion { primary, backup } => write!(
                f,
                "protocol version mismatch: primary speaks {primary}, backup speaks {backup}"
            ),
            Mismatch::Role {
                listening,
                connecting,
            } => write!(
                f,
                "role mismatch: the listening end says it is the {listening} and the connecting end the {connecting} (the primary listens, the backup connects)"
            ),
            Mismatch::VmId { primary, backup } => write!(
                f,
                "VM id mismatch: primary runs {primary:?}, backup expects {backup:?}"
            ),
            Mismatch::View { primary, backup } => write!(
                f,
                "view mismatch: primary is in view {primary}, backup in view {backup}"
            ),
            Mismatch::ImageHash { primary, backup } => write!(
                f,
                "guest image mismatch: primary's image hash is {}, backup's {}",
                Hex(primary),
                Hex(backup)
            ),
            Mismatch::MemSize { primary, backup } => write!(
                f,
                "memory size mismatch: primary has {primary} bytes of guest memory, backup {backup}"
            ),
            Mismatch::Workload { primary, backup } => write!(
                f,
                "workload mismatch: primary runs {primary:?}, backup {backup:?}"
            ),
            Mismatch::FirstSeq { primary, backup } => write!(
                f,
                "first sequence number mismatch: primary sends from entry {primary}, backup expects entry {backup}"
            ),
        }
    }
}

/// The checks both ends make, with the same arguments in the same order, so
/// that both refuse for the same reason. The protocol version is compared
/// before the hellos are parsed.
pub(crate) fn check(primary: &Hello, backup: &Hello) -> Option<Mismatch> {
    if primary.role != Role::Primary || backup.role != Role::Backup {
        return Some(Mismatch::Role {
            listening: primary.role,
            connecting: backup.role,
        });
    }
    if primary.vm_id != backup.vm_id {
        return Some(Mismatch::VmId {
            primary: primary.vm_id.clone(),
            backup: backup.vm_id.clone(),
        });
    }
    if primary.view != backup.view {
        return Some(Mismatch::View {
            primary: primary.view,
            backup: backup.view,
        });
    }
    if primary.image_hash != backup.image_hash {
        return Some(Mismatch::ImageHash {
            primary: primary.image_hash,
            backup: backup.image_hash,
        });
    }
    if primary.mem_size != backup.mem_size {
        return Some(Mismatch::MemSize {
            primary: primary.mem_size,
            backup: backup.mem_size,
        });
    }
    if primary.workload != backup.workload {
        return Some(Mismatch::Workload {
            primary: primary.workload.clone(),
            backup: backup.workload.clone(),
        });
    }
    if backup.first_seq != 0 && backup.first_seq != primary.first_seq {
        return Some(Mismatch::FirstSeq {
            primary: primary.first_seq,
            backup: backup.first_seq,
        });
    }
    None
}
