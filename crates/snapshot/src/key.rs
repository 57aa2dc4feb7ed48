//! Snapshot keys.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything a baked VM depends on. Two containers may share a snapshot only if all of it
/// is equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyParts {
    pub image_key: String,
    pub kernel_digest: String,
    pub agent_digest: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The engine, its version and its own snapshot format (`qemu-tcg 7.2.22 …`).
    pub engine: String,
    /// The guest kernel command line, which is baked into guest memory.
    pub kernel_args: String,
    /// The cache format ([`crate::FORMAT_VERSION`]).
    pub format: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotKey(String);

impl SnapshotKey {
    pub fn new(parts: &KeyParts) -> Self {
        let mut hasher = Sha256::new();
        // serde_json of a struct is a stable encoding: fields in declaration order.
        hasher.update(serde_json::to_vec(parts).unwrap_or_default());
        let hex: String = hasher.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        SnapshotKey(hex)
    }

    /// A key given by a user (`cache rm KEY`): 32 hex digits, so that it is one path
    /// component.
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| SnapshotKey(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn parts() -> KeyParts {
        KeyParts {
            image_key: "img".into(),
            kernel_digest: "k".into(),
            agent_digest: "a".into(),
            vcpus: 1,
            memory_mib: 256,
            engine: "qemu-tcg".into(),
            kernel_args: "console=ttyS0".into(),
            format: 1,
        }
    }

    #[test]
    fn every_part_changes_the_key() {
        let base = SnapshotKey::new(&parts());
        assert_eq!(base, SnapshotKey::new(&parts()));
        let variants: Vec<KeyParts> = vec![
            KeyParts {
                image_key: "other".into(),
                ..parts()
            },
            KeyParts {
                kernel_digest: "k2".into(),
                ..parts()
            },
            KeyParts {
                agent_digest: "a2".into(),
                ..parts()
            },
            KeyParts {
                vcpus: 2,
                ..parts()
            },
            KeyParts {
                memory_mib: 512,
                ..parts()
            },
            KeyParts {
                engine: "builtin-kvm".into(),
                ..parts()
            },
            KeyParts {
                kernel_args: "quiet".into(),
                ..parts()
            },
            KeyParts {
                format: 2,
                ..parts()
            },
        ];
        for v in variants {
            assert_ne!(SnapshotKey::new(&v), base, "{v:?}");
        }
    }

    #[test]
    fn user_keys_must_be_32_hex_digits() {
        let key = SnapshotKey::new(&parts());
        assert_eq!(SnapshotKey::parse(key.as_str()), Some(key));
        assert_eq!(SnapshotKey::parse("../etc"), None);
        assert_eq!(SnapshotKey::parse("abc"), None);
    }
}
