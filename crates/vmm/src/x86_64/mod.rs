//! x86_64 guest layout and boot: PVH entry of an ELF vmlinux, CPUID and MSRs.

pub mod boot;
pub mod cpuid;
pub mod mptable;

/// Guest-physical layout.
pub mod layout {
    /// The boot GDT.
    pub const GDT: u64 = 0x500;
    /// `hvm_start_info`, then the module list, then the memory map.
    pub const START_INFO: u64 = 0x6000;
    pub const MODLIST: u64 = 0x6100;
    pub const MEMMAP: u64 = 0x7000;
    /// The kernel command line (NUL-terminated).
    pub const CMDLINE: u64 = 0x20000;
    pub const CMDLINE_MAX: usize = 0x10000;
    /// The end of low memory the BIOS would leave usable (EBDA above).
    pub const EBDA: u64 = 0x9fc00;
    pub const HIGH_MEMORY: u64 = 0x10_0000;
    /// Guest RAM below 4 GiB ends here; the MMIO hole follows.
    pub const MMIO_HOLE: u64 = 0xc000_0000;
    /// virtio-mmio devices, one 4 KiB window each.
    pub const VIRTIO_MMIO: u64 = 0xd000_0000;
    /// The first GSI of virtio-mmio devices (0-4 are legacy: timer, keyboard, cascade, COM2,
    /// COM1).
    pub const VIRTIO_IRQ: u32 = 5;
    /// The IOAPIC has 24 pins.
    pub const IRQ_MAX: u32 = 23;
    pub const FOUR_GIB: u64 = 1 << 32;
}

/// RAM ranges for `size` bytes of guest memory: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(layout::MMIO_HOLE);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((layout::FOUR_GIB, size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_the_hole_moves_past_4_gib() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, 3 << 30), (layout::FOUR_GIB, 1 << 30)]
        );
    }
}
