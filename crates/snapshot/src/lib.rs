//! The snapshot cache: one baked VM per key, restored by every later container of that key.
//!
//! A key ([`SnapshotKey`]) covers everything that makes a baked VM reusable: the image, the
//! guest kernel and agent, the VM's shape, the engine (and its version) and the format. An
//! entry is a directory `<cache>/<key>/` with the engine's files (e.g. `state` and `memory`)
//! and `meta.json` (sizes and CRCs of those files). Entries appear atomically: a baker
//! writes `<key>.partial-<pid>/`, syncs, and renames it. A per-key lock file makes N
//! concurrent creates of a new key bake once; the others wait (bounded) and restore, or boot
//! cold. Anything that does not validate is removed and treated as a miss.
//! The size of the cache is bounded (least recently used entries go first), and no bake
//! starts when the disk's free space is below a floor. Each entry keeps how long its last few
//! hundred restores took, phase by phase ([`latency`]).

mod cache;
pub mod file;
mod key;
pub mod latency;

pub use cache::{
    Bake, CacheLimits, Entry, EntryInfo, EntryLatency, Lookup, Meta, SnapshotCache, FORMAT_VERSION,
};
pub use key::{KeyParts, SnapshotKey};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no snapshot {0} in the cache")]
    NotFound(String),
    #[error("invalid size {0:?} (expected a number with an optional K, M, G or T suffix)")]
    InvalidSize(String),
}

impl CacheError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CacheError {
        let path = path.into();
        move |source| CacheError::Io { path, source }
    }
}

/// Parses `512M`, `10G`, `1048576`.
pub fn parse_size(text: &str) -> Result<u64, CacheError> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(CacheError::InvalidSize(text.to_string())),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| CacheError::InvalidSize(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
    }
}
