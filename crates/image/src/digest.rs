//! Content digests of guest artifacts (kernel, agent), which are part of cache keys.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// SHA-256 (hex) of a file. A `<file>.sha256` beside it is trusted when it is not older than
/// the file (the build writes one), so that hot paths do not hash megabytes per container.
pub fn file_digest(path: &Path) -> Result<String, ImageError> {
    let meta = std::fs::metadata(path).map_err(ImageError::io(path))?;
    let sidecar = PathBuf::from(format!("{}.sha256", path.display()));
    if let (Ok(side_meta), Ok(text)) = (
        std::fs::metadata(&sidecar),
        std::fs::read_to_string(&sidecar),
    ) {
        let fresh = match (side_meta.modified(), meta.modified()) {
            (Ok(s), Ok(f)) => s >= f,
            _ => false,
        };
        let hex = text.split_whitespace().next().unwrap_or("");
        if fresh && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(hex.to_string());
        }
    }
    let mut file = File::open(path).map_err(ImageError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(ImageError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Best effort: an installed, read-only assets directory just hashes every time.
    let _ = std::fs::write(&sidecar, format!("{hex}\n"));
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_and_a_stale_sidecar_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blob");
        std::fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(file_digest(&file).unwrap(), abc);
        // A sidecar older than the file must not be believed.
        let sidecar = dir.path().join("blob.sha256");
        std::fs::write(&sidecar, format!("{}\n", "0".repeat(64))).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&sidecar)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(file_digest(&file).unwrap(), abc);
    }
}
