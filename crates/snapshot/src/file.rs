//! The files of one snapshot as an engine writes them: a small state file framed with a
//! magic, the format version, its length and a CRC (so a stale, truncated or flipped file is
//! refused before anything decodes it), and a sparse copy of guest memory.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::FORMAT_VERSION;

const MAGIC: &[u8; 8] = b"SMVMSTAT";
const HEADER: usize = 8 + 4 + 4 + 8;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a supermachine state file")]
    Magic,
    #[error("state format {found} (this runtime reads {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("state file truncated ({found} of {expected} bytes)")]
    Truncated { found: usize, expected: usize },
    #[error("state file CRC mismatch")]
    Crc,
}

/// The bytes of a state file holding `body`.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of a state file, once its frame checks out.
pub fn unseal(bytes: &[u8]) -> Result<&[u8], StateError> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let found = word(8);
    if found != FORMAT_VERSION {
        return Err(StateError::Version { found });
    }
    let crc = word(12);
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
    let body = &bytes[HEADER..];
    if body.len() != len {
        return Err(StateError::Truncated {
            found: body.len(),
            expected: len,
        });
    }
    if crc32fast::hash(body) != crc {
        return Err(StateError::Crc);
    }
    Ok(body)
}

/// Writes a state file holding `body` at `path`.
pub fn write_state(path: &Path, body: &[u8]) -> std::io::Result<()> {
    File::create(path)?.write_all(&seal(body))
}

/// Copies the allocated extents of `from` (a memfd or tmpfs file) into a new sparse file `to`
/// of `size` bytes: the pages a guest never touched cost nothing on disk.
pub fn copy_sparse(from: &File, to: &Path, size: u64) -> std::io::Result<()> {
    let out = File::create(to)?;
    out.set_len(size)?;
    let fd = from.as_raw_fd();
    let mut offset: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (offset as u64) < size {
        // SAFETY: lseek on an open fd; SEEK_DATA/SEEK_HOLE only move its offset.
        let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `offset`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole };
        let mut at = data as u64;
        while at < end as u64 {
            let n = buf.len().min((end as u64 - at) as usize);
            from.read_exact_at(&mut buf[..n], at)?;
            out.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        offset = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_body_comes_back_and_any_damage_is_refused() {
        let body = b"vcpu state, irqchip, devices".to_vec();
        let sealed = seal(&body);
        assert_eq!(unseal(&sealed).unwrap(), &body[..]);

        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(unseal(&flipped), Err(StateError::Crc)));

        assert!(matches!(
            unseal(&sealed[..sealed.len() - 1]),
            Err(StateError::Truncated { .. })
        ));
        assert!(matches!(unseal(&sealed[..10]), Err(StateError::Magic)));

        let mut newer = sealed.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(unseal(&newer), Err(StateError::Version { .. })));
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("ram"))
            .unwrap();
        from.set_len(8 << 20).unwrap();
        from.write_all_at(b"low", 4096).unwrap();
        from.write_all_at(b"high", (6 << 20) + 17).unwrap();
        let to = dir.path().join("copy");
        copy_sparse(&from, &to, 8 << 20).unwrap();
        let copy = std::fs::read(&to).unwrap();
        assert_eq!(copy.len(), 8 << 20);
        assert_eq!(&copy[4096..4099], b"low");
        assert_eq!(&copy[(6 << 20) + 17..(6 << 20) + 21], b"high");
        assert!(copy[..4096].iter().all(|&b| b == 0));
    }
}
