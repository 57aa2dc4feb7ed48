//! Two ways into a Linux kernel.
//!
//! PVH (Xen's x86/HVM direct boot ABI, which Linux implements), for an ELF vmlinux: the vCPU
//! starts in 32-bit protected mode with paging off at the kernel's PVH entry, `ebx` pointing
//! at an `hvm_start_info` that gives the command line, the memory map and the initramfs.
//!
//! The 64-bit boot protocol, for a bzImage: the vCPU starts in long mode on identity-mapped
//! page tables at the kernel's `startup_64` (load address + 0x200), `rsi` pointing at the
//! "zero page" (`boot_params`: the image's setup header, the command line, the E820 map and
//! the initramfs).

use hypervisor::x86::{DescriptorTable, Regs, Segment, Sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use devices::GuestMemory;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

const SELECTOR_CODE: u16 = 0x08;
const SELECTOR_DATA: u16 = 0x10;
const SELECTOR_TSS: u16 = 0x18;

/// What the kernel is told at entry.
#[derive(Debug, Clone)]
pub struct BootInfo<'a> {
    /// RAM ranges (guest address, size).
    pub ram: &'a [(u64, u64)],
    pub cmdline: &'a str,
    /// Where the initramfs was loaded (guest address, size), if any.
    pub initramfs: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the kernel command line is {0} bytes; at most {max} fit", max = layout::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The E820-style memory map the kernel gets.
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for &(start, size) in ram {
        if start == 0 {
            map.push((0, layout::EBDA, E820_RAM));
            map.push((
                layout::EBDA,
                layout::HIGH_MEMORY - layout::EBDA,
                E820_RESERVED,
            ));
            if size > layout::HIGH_MEMORY {
                map.push((layout::HIGH_MEMORY, size - layout::HIGH_MEMORY, E820_RAM));
            }
        } else {
            map.push((start, size, E820_RAM));
        }
    }
    map
}

/// Writes the GDT, command line and `hvm_start_info` into guest memory.
pub fn write_boot_data(mem: &GuestMemory, info: &BootInfo<'_>) -> Result<(), BootError> {
    if info.cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(info.cmdline.len()));
    }
    let mut cmdline = info.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE))?;

    for (i, entry) in gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT + 8 * i as u64))?;
    }

    let map = memory_map(info.ram);
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let at = layout::MEMMAP + 24 * i as u64;
        mem.write_obj(addr, GuestAddress(at))?;
        mem.write_obj(size, GuestAddress(at + 8))?;
        mem.write_obj(kind, GuestAddress(at + 16))?;
        mem.write_obj(0u32, GuestAddress(at + 20))?;
    }

    let modules = u32::from(info.initramfs.is_some());
    if let Some((addr, size)) = info.initramfs {
        mem.write_obj(addr, GuestAddress(layout::MODLIST))?;
        mem.write_obj(size, GuestAddress(layout::MODLIST + 8))?;
        mem.write_obj(0u64, GuestAddress(layout::MODLIST + 16))?;
        mem.write_obj(0u64, GuestAddress(layout::MODLIST + 24))?;
    }

    let s = layout::START_INFO;
    mem.write_obj(START_INFO_MAGIC, GuestAddress(s))?;
    mem.write_obj(1u32, GuestAddress(s + 4))?; // version
    mem.write_obj(0u32, GuestAddress(s + 8))?; // flags
    mem.write_obj(modules, GuestAddress(s + 12))?;
    mem.write_obj(layout::MODLIST, GuestAddress(s + 16))?;
    mem.write_obj(layout::CMDLINE, GuestAddress(s + 24))?;
    mem.write_obj(0u64, GuestAddress(s + 32))?; // no ACPI RSDP
    mem.write_obj(layout::MEMMAP, GuestAddress(s + 40))?;
    mem.write_obj(map.len() as u32, GuestAddress(s + 48))?;
    mem.write_obj(0u32, GuestAddress(s + 52))?;
    Ok(())
}

/// Null, flat 32-bit code, flat data, and a TSS descriptor (VMX wants a usable TR).
fn gdt() -> [u64; 4] {
    [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ]
}

/// The zero page, the boot stack's top and the page tables of the 64-bit boot protocol.
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;

const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Writes the GDT, page tables, command line and zero page of the 64-bit boot protocol.
/// `header` is the bzImage's setup header, as the loader read it.
pub fn write_linux_boot_data(
    mem: &GuestMemory,
    info: &BootInfo<'_>,
    header: &linux_loader::loader::bootparam::setup_header,
) -> Result<(), BootError> {
    use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
    if info.cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(info.cmdline.len()));
    }
    let mut cmdline = info.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE))?;
    for (i, entry) in gdt64().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT + 8 * i as u64))?;
    }
    // Identity map of the first GiB with 2 MiB pages.
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4))?;
    mem.write_obj(PD | 0x3, GuestAddress(PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))?;
    }

    let mut params = boot_params {
        hdr: *header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(info.ram);
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))?;
    Ok(())
}

/// Null, 64-bit code, data, and a TSS descriptor.
fn gdt64() -> [u64; 4] {
    [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ]
}

/// The vCPU state at a bzImage's 64-bit entry (`startup_64`).
pub fn entry_registers_64(entry: u64) -> (Regs, Sregs) {
    let regs = Regs {
        rip: entry,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    let (_, mut sregs) = entry_registers(entry);
    sregs.cs.l = true;
    sregs.cs.db = false;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LMA | LME
    (regs, sregs)
}

/// The vCPU state at PVH entry.
pub fn entry_registers(entry: u64) -> (Regs, Sregs) {
    let regs = Regs {
        rip: entry,
        rbx: layout::START_INFO,
        rflags: 0x2,
        ..Default::default()
    };
    let code = Segment::flat32(SELECTOR_CODE, 0xb);
    let data = Segment::flat32(SELECTOR_DATA, 0x3);
    let tss = Segment {
        base: 0,
        limit: 0xfffff,
        selector: SELECTOR_TSS,
        type_: 0xb,
        present: true,
        s: false,
        ..Default::default()
    };
    let sregs = Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt: Segment {
            unusable: true,
            type_: 0x2,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: layout::GDT,
            limit: (gdt().len() * 8 - 1) as u16,
        },
        idt: DescriptorTable::default(),
        cr0: 0x11, // PE | ET
        ..Default::default()
    };
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: vm_memory::ByteValued>(mem: &GuestMemory, at: u64) -> T {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn start_info_describes_cmdline_memory_and_initramfs() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let ram = [(0, 0x40_0000)];
        write_boot_data(
            &mem,
            &BootInfo {
                ram: &ram,
                cmdline: "console=ttyS0 quiet",
                initramfs: Some((0x30_0000, 0x1234)),
            },
        )
        .unwrap();

        let s = layout::START_INFO;
        assert_eq!(read::<u32>(&mem, s), START_INFO_MAGIC);
        assert_eq!(read::<u32>(&mem, s + 4), 1);
        assert_eq!(read::<u32>(&mem, s + 12), 1, "one module");
        assert_eq!(read::<u64>(&mem, s + 16), layout::MODLIST);
        assert_eq!(read::<u64>(&mem, read::<u64>(&mem, s + 16)), 0x30_0000);
        assert_eq!(read::<u64>(&mem, layout::MODLIST + 8), 0x1234);

        let cmdline = read::<u64>(&mem, s + 24);
        let mut bytes = [0u8; 20];
        mem.read_slice(&mut bytes, GuestAddress(cmdline)).unwrap();
        assert_eq!(&bytes, b"console=ttyS0 quiet\0");

        assert_eq!(read::<u64>(&mem, s + 40), layout::MEMMAP);
        assert_eq!(read::<u32>(&mem, s + 48), 3);
        let entry = |i: u64| {
            let at = layout::MEMMAP + 24 * i;
            (
                read::<u64>(&mem, at),
                read::<u64>(&mem, at + 8),
                read::<u32>(&mem, at + 16),
            )
        };
        assert_eq!(entry(0), (0, layout::EBDA, E820_RAM));
        assert_eq!(entry(1).2, E820_RESERVED);
        assert_eq!(
            entry(2),
            (
                layout::HIGH_MEMORY,
                0x40_0000 - layout::HIGH_MEMORY,
                E820_RAM
            )
        );
        assert_eq!(read::<u64>(&mem, layout::GDT + 8), gdt()[1]);
    }

    #[test]
    fn entry_is_flat_protected_mode_with_ebx_at_start_info() {
        let (regs, sregs) = entry_registers(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rbx, layout::START_INFO);
        assert_eq!(sregs.cr0 & 1, 1, "protected mode");
        assert_eq!(sregs.cr0 & (1 << 31), 0, "paging off");
        assert_eq!(sregs.cs.selector, SELECTOR_CODE);
        assert!(sregs.cs.db && sregs.cs.g && !sregs.cs.l);
        assert_eq!(sregs.ds.limit, 0xffff_ffff);
    }

    #[test]
    fn the_zero_page_carries_header_cmdline_initramfs_and_memory_map() {
        use linux_loader::loader::bootparam::{boot_params, setup_header};
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let header = setup_header {
            setup_sects: 27,
            version: 0x20f,
            ..Default::default()
        };
        write_linux_boot_data(
            &mem,
            &BootInfo {
                ram: &[(0, 0x40_0000)],
                cmdline: "console=ttyS0",
                initramfs: Some((0x30_0000, 0x1000)),
            },
            &header,
        )
        .unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.setup_sects }, 27, "the image's header is kept");
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr } as u64, layout::CMDLINE);
        assert_eq!({ hdr.cmdline_size }, 14);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x30_0000, 0x1000)
        );
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.r#type }),
            (layout::HIGH_MEMORY, E820_RAM)
        );
        // The first 2 MiB page maps address 0, present, writable, large.
        assert_eq!(read::<u64>(&mem, PD), 0x83);
        assert_eq!(read::<u64>(&mem, PD + 8), (1 << 21) | 0x83);
        assert_eq!(read::<u64>(&mem, PML4), PDPT | 3);

        let (regs, sregs) = entry_registers_64(0x100_0200);
        assert_eq!((regs.rip, regs.rsi), (0x100_0200, ZERO_PAGE));
        assert!(sregs.cs.l && !sregs.cs.db);
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_ne!(sregs.cr0 & (1 << 31), 0, "paging on");
    }

    #[test]
    fn an_oversized_cmdline_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let long = "x".repeat(layout::CMDLINE_MAX);
        let err = write_boot_data(
            &mem,
            &BootInfo {
                ram: &[(0, 0x40_0000)],
                cmdline: &long,
                initramfs: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong(_)));
    }
}
