//! Guest RAM: one memfd, mapped shared, so a snapshot can save it by file and a restore can
//! map a saved file instead.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use devices::GuestMemory;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd for guest RAM: {0}")]
    Memfd(std::io::Error),
    #[error("mapping guest RAM: {0}")]
    Map(String),
}

#[derive(Debug)]
pub struct GuestRam {
    pub file: File,
    pub mem: Arc<GuestMemory>,
    /// (guest address, size) of each region, in file order.
    pub ranges: Vec<(u64, u64)>,
}

impl GuestRam {
    pub fn new(ranges: &[(u64, u64)]) -> Result<GuestRam, MemoryError> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked.
        let fd =
            unsafe { libc::memfd_create(c"supermachine-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor this File now owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(total).map_err(MemoryError::Memfd)?;
        let mut offset = 0;
        let mut regions = Vec::new();
        for &(addr, size) in ranges {
            let file_offset =
                FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
            regions.push((GuestAddress(addr), size as usize, Some(file_offset)));
            offset += size;
        }
        let mem = GuestMemory::from_ranges_with_files(&regions)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            file,
            mem: Arc::new(mem),
            ranges: ranges.to_vec(),
        })
    }

    /// (guest address, size, host address) of each region, for the hypervisor.
    pub fn host_regions(&self) -> Vec<(u64, u64, *mut u8)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr()))
            .collect()
    }
}
