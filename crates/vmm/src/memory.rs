//! Guest RAM: one memfd, mapped shared, so a snapshot can save it by file and a restore can
//! map a saved file instead.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use devices::GuestMemory;
use std::path::Path;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd for guest RAM: {0}")]
    Memfd(std::io::Error),
    #[error("mapping guest RAM: {0}")]
    Map(String),
    #[error("guest RAM file {0}: {1}")]
    File(std::path::PathBuf, std::io::Error),
}

#[derive(Debug)]
pub struct GuestRam {
    /// The memfd of a booted VM's RAM (a snapshot copies it); a restored VM's RAM is a
    /// private mapping of the snapshot's file and has none.
    pub file: Option<File>,
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
            file: Some(file),
            mem: Arc::new(mem),
            ranges: ranges.to_vec(),
        })
    }

    /// Guest RAM as a copy-on-write (`MAP_PRIVATE`) mapping of a snapshot's memory file:
    /// nothing is read until the guest touches it, the file is never written, and VMs
    /// restored from one file share its clean pages in the page cache.
    pub fn from_snapshot(path: &Path, ranges: &[(u64, u64)]) -> Result<GuestRam, MemoryError> {
        let io = |e| MemoryError::File(path.to_path_buf(), e);
        let file = File::open(path).map_err(io)?;
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let len = file.metadata().map_err(io)?.len();
        if len != total {
            return Err(MemoryError::Map(format!(
                "{} holds {len} bytes, the VM has {total}",
                path.display()
            )));
        }
        let mut offset = 0;
        let mut regions = Vec::new();
        for &(addr, size) in ranges {
            let file_offset = FileOffset::new(file.try_clone().map_err(io)?, offset);
            let mapping = MmapRegion::build(
                Some(file_offset),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| MemoryError::Map(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(addr))
                .ok_or_else(|| MemoryError::Map(format!("region at {addr:#x} overflows")))?;
            regions.push(region);
            offset += size;
        }
        let mem =
            GuestMemory::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            file: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::balloon::{discard, PAGE_SIZE};
    use vm_memory::Bytes;

    const PAGE: u64 = 0x10_0000;

    fn read_page(mem: &GuestMemory) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(PAGE)).unwrap();
        page
    }

    #[test]
    fn a_page_given_back_by_a_booted_vm_reads_back_as_zero() {
        let ram = GuestRam::new(&[(0, 4 << 20)]).unwrap();
        ram.mem
            .write_slice(&[0x5a; PAGE_SIZE as usize], GuestAddress(PAGE))
            .unwrap();
        discard(&ram.mem, PAGE, PAGE_SIZE).unwrap();
        assert_eq!(read_page(&ram.mem), vec![0; PAGE_SIZE as usize]);
    }

    /// The property the balloon documents for restored VMs: a page the guest gave back reads
    /// back as the snapshot's page, whatever the VM wrote there after the restore, and the
    /// snapshot's file is never changed.
    #[test]
    fn a_page_given_back_by_a_restored_vm_reads_back_as_the_snapshots_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut image = vec![0u8; 4 << 20];
        image[PAGE as usize..(PAGE + PAGE_SIZE) as usize].fill(0xa5);
        std::fs::write(&path, &image).unwrap();
        let ram = GuestRam::from_snapshot(&path, &[(0, 4 << 20)]).unwrap();
        ram.mem
            .write_slice(&[0x3c; PAGE_SIZE as usize], GuestAddress(PAGE))
            .unwrap();
        assert_eq!(read_page(&ram.mem), vec![0x3c; PAGE_SIZE as usize]);
        discard(&ram.mem, PAGE, PAGE_SIZE).unwrap();
        assert_eq!(read_page(&ram.mem), vec![0xa5; PAGE_SIZE as usize]);
        assert_eq!(std::fs::read(&path).unwrap(), image);
    }
}
