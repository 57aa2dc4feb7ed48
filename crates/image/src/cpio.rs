//! The guest initramfs: an uncompressed `newc` cpio holding the agent as `/init`.
//!
//! Uncompressed on purpose: inflating even a small gzip archive costs seconds when guest
//! kernel code is emulated, and the kernel unpacks a plain cpio at memcpy speed.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{file_digest, ImageError};

struct Entry<'a> {
    name: &'a str,
    mode: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

fn write_entry(out: &mut impl Write, ino: u32, entry: &Entry<'_>) -> io::Result<()> {
    let name_len = entry.name.len() + 1;
    let fields = [
        ino,
        entry.mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime: fixed, so the archive is reproducible
        entry.data.len() as u32,
        0,
        0,
        entry.rdev.0,
        entry.rdev.1,
        name_len as u32,
        0, // check
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(entry.name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(110 + name_len)])?;
    out.write_all(entry.data)?;
    out.write_all(&[0; 3][..pad4(entry.data.len())])
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Writes an initramfs with `/init` = `agent` and the nodes the kernel and agent need.
pub fn write_initramfs(agent: &[u8], out: &mut impl Write) -> io::Result<()> {
    const DIR: u32 = 0o040_755;
    let entries = [
        Entry {
            name: "dev",
            mode: DIR,
            rdev: (0, 0),
            data: &[],
        },
        // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
        Entry {
            name: "dev/console",
            mode: 0o020_600,
            rdev: (5, 1),
            data: &[],
        },
        Entry {
            name: "proc",
            mode: DIR,
            rdev: (0, 0),
            data: &[],
        },
        Entry {
            name: "sys",
            mode: DIR,
            rdev: (0, 0),
            data: &[],
        },
        Entry {
            name: "run",
            mode: DIR,
            rdev: (0, 0),
            data: &[],
        },
        Entry {
            name: "init",
            mode: 0o100_755,
            rdev: (0, 0),
            data: agent,
        },
    ];
    for (ino, entry) in entries.iter().enumerate() {
        write_entry(out, ino as u32 + 1, entry)?;
    }
    write_entry(
        out,
        0,
        &Entry {
            name: "TRAILER!!!",
            mode: 0,
            rdev: (0, 0),
            data: &[],
        },
    )
}

/// The initramfs of one agent binary, made on first use and cached by the agent's digest.
#[derive(Debug, Clone)]
pub struct Initramfs {
    pub path: PathBuf,
    pub agent_digest: String,
}

impl Initramfs {
    pub fn ensure(agent: &Path, cache_dir: &Path) -> Result<Self, ImageError> {
        let agent_digest = file_digest(agent)?;
        let path = cache_dir.join(format!("initramfs-{}.cpio", &agent_digest[..16]));
        if !path.exists() {
            crate::private_dir(cache_dir).map_err(ImageError::io(cache_dir))?;
            let bytes = std::fs::read(agent).map_err(ImageError::io(agent))?;
            let partial = cache_dir.join(format!(
                ".initramfs-{}.{}",
                &agent_digest[..16],
                std::process::id()
            ));
            let write = || -> io::Result<()> {
                let mut file = File::create(&partial)?;
                write_initramfs(&bytes, &mut file)?;
                file.sync_all()?;
                std::fs::rename(&partial, &path)
            };
            if let Err(e) = write() {
                let _ = std::fs::remove_file(&partial);
                return Err(ImageError::Io { path, source: e });
            }
        }
        Ok(Initramfs { path, agent_digest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_init_with_its_bytes_when_read_by_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        let mut file = File::create(&archive).unwrap();
        write_initramfs(b"#!agent", &mut file).unwrap();
        drop(file);
        let bytes = std::fs::read(&archive).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The agent's bytes follow the 4-aligned header of the `init` entry.
        let at = bytes.windows(5).position(|w| w == b"init\0").unwrap();
        assert_eq!(&bytes[at - 110..at - 104], b"070701");
        let data = (at + 5).next_multiple_of(4);
        assert_eq!(&bytes[data..data + 7], b"#!agent");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
