//! The host channel: a named virtio-console port (`/dev/vportNpM`).
//!
//! Reads return 0 and `poll` reports `POLLHUP` while no host is connected; writes block until
//! one is. After a snapshot restore the host side is a new connection, so the agent treats
//! a hang-up as "drop any partial frame and wait for the next `Hello`".

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::cmdline::Cmdline;

#[derive(Debug)]
pub struct Channel {
    file: File,
    path: PathBuf,
}

impl Channel {
    pub fn open(cmdline: &Cmdline) -> io::Result<Self> {
        let path = find_port(&cmdline.port)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        Ok(Channel { file, path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads what is available; `Ok(0)` means no host is connected.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Finds the device node of the virtio-console port named `name`.
pub fn find_port(name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            let node = PathBuf::from("/dev").join(entry.file_name());
            if node.exists() {
                return Ok(node);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio port named {name}"),
    ))
}
