//! What a booted VM starts from: the kernel (an ELF vmlinux entered through PVH, or a
//! bzImage through the 64-bit boot protocol) and the initramfs in guest RAM, the boot data
//! (MP table, start info or zero page, command line) and the boot vCPU's registers.

use std::fs::File;
use std::path::Path;

use devices::GuestMemory;
use hypervisor::x86::{Regs, Sregs};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::x86_64::{self, layout};
use crate::{Error, VmmConfig};

/// How the loaded kernel is entered.
#[derive(Debug)]
enum KernelFormat {
    /// An ELF vmlinux through its PVH entry note.
    Pvh,
    /// A bzImage through the 64-bit boot protocol, with its setup header.
    BzImage(linux_loader::loader::bootparam::setup_header),
}

#[derive(Debug)]
struct LoadedKernel {
    entry: u64,
    end: u64,
    format: KernelFormat,
}

/// The boot vCPU's registers at the kernel's entry.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) regs: Regs,
    pub(crate) sregs: Sregs,
}

/// Loads the kernel and initramfs of `config` into `mem` (whose RAM is `ram`), writes the
/// boot data with `cmdline`, and returns where the boot vCPU starts.
pub(crate) fn load(
    mem: &GuestMemory,
    ram: &[(u64, u64)],
    config: &VmmConfig,
    cmdline: &str,
) -> Result<Entry, Error> {
    let kernel = load_kernel(mem, &config.kernel)?;
    let low_ram_end = ram.first().map_or(0, |r| r.1);
    let initramfs = match &config.initramfs {
        Some(path) => Some(load_initramfs(mem, path, kernel.end, low_ram_end)?),
        None => None,
    };
    x86_64::mptable::write(mem, config.vcpus as u8)
        .map_err(|e| Error::Config(format!("writing the MP table: {e}")))?;
    let boot_info = x86_64::boot::BootInfo {
        ram,
        cmdline,
        initramfs,
    };
    let (regs, sregs) = match &kernel.format {
        KernelFormat::Pvh => {
            x86_64::boot::write_boot_data(mem, &boot_info)?;
            x86_64::boot::entry_registers(kernel.entry)
        }
        KernelFormat::BzImage(header) => {
            x86_64::boot::write_linux_boot_data(mem, &boot_info, header)?;
            x86_64::boot::entry_registers_64(kernel.entry)
        }
    };
    log::debug!("builtin VMM: kernel entry {:#x}", kernel.entry);
    Ok(Entry { regs, sregs })
}

/// MSRs a kernel expects firmware to have set: fast strings, write-back default memory type.
pub(crate) fn boot_msrs() -> Vec<(u32, u64)> {
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    vec![(IA32_MISC_ENABLE, 1), (IA32_MTRR_DEF_TYPE, (1 << 11) | 6)]
}

/// Loads an ELF vmlinux (entered through PVH) or a bzImage (the 64-bit boot protocol).
fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, Error> {
    use std::io::Read;
    let kernel_error = |detail: String| Error::Kernel {
        path: path.to_path_buf(),
        detail,
    };
    let mut file = File::open(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|e| kernel_error(e.to_string()))?;
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY));
    if &magic == b"\x7fELF" {
        let loaded =
            Elf::load(mem, None, &mut file, highmem).map_err(|e| kernel_error(e.to_string()))?;
        return match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                entry: entry.0,
                end: loaded.kernel_end,
                format: KernelFormat::Pvh,
            }),
            _ => Err(kernel_error(
                "no PVH entry note (build the kernel with CONFIG_PVH=y)".into(),
            )),
        };
    }
    let loaded = BzImage::load(mem, None, &mut file, highmem)
        .map_err(|e| kernel_error(format!("neither an ELF vmlinux nor a bzImage: {e}")))?;
    let header = loaded
        .setup_header
        .ok_or_else(|| kernel_error("a bzImage without a setup header".into()))?;
    Ok(LoadedKernel {
        // startup_64 of the 64-bit boot protocol.
        entry: loaded.kernel_load.0 + 0x200,
        end: loaded.kernel_end,
        format: KernelFormat::BzImage(header),
    })
}

/// Places the initramfs page-aligned at the top of low RAM; returns (address, size).
fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    low_ram_end: u64,
) -> Result<(u64, u64), Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        source: e,
    })?;
    let size = bytes.len() as u64;
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(Error::InitramfsTooBig { size })?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| Error::Config(format!("writing the initramfs: {e}")))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_initramfs_goes_page_aligned_at_the_top_of_low_ram_or_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initramfs");
        std::fs::write(&path, vec![0x5a; 0x1800]).unwrap();
        let (addr, size) = load_initramfs(&mem, &path, 0x20_0000, 0x40_0000).unwrap();
        assert_eq!((addr, size), (0x3f_e000, 0x1800));
        let mut byte = [0u8];
        mem.read_slice(&mut byte, GuestAddress(addr + 0x17ff))
            .unwrap();
        assert_eq!(byte, [0x5a]);
        assert!(matches!(
            load_initramfs(&mem, &path, 0x3f_f000, 0x40_0000),
            Err(Error::InitramfsTooBig { size: 0x1800 })
        ));
    }
}
