//! An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its
//! CPUs, its IOAPIC and how ISA interrupt lines reach it (virtio-mmio devices use those).

use vm_memory::{Bytes, GuestAddress};

use devices::GuestMemory;

/// Where the floating pointer and the table go: the start of the EBDA, which the memory map
/// marks reserved.
pub const MPTABLE_START: u64 = super::layout::EBDA;
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// IOAPIC input pins.
pub const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// The table's bytes for `vcpus` CPUs, placed at `MPTABLE_START`.
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = vec![0u8, id, APIC_VERSION, 1 | if id == 0 { 2 } else { 0 }];
        e.extend(0x600u32.to_le_bytes()); // CPU signature: family 6
        e.extend(0x201u32.to_le_bytes()); // features: FPU, APIC
        e.extend([0u8; 8]);
        entries.extend(e);
        count += 1;
    }
    entries.extend([1u8, 0]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([2u8, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // I/O interrupt: INT, polarity/trigger conforming to the (ISA: edge, high) bus.
        entries.extend([3u8, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, to every local APIC.
    entries.extend([4u8, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4u8, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_address = MPTABLE_START as u32 + 16;
    let mut table = Vec::new();
    table.extend(b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend(b"SMACHINE");
    table.extend(b"microvm     ");
    table.extend(0u32.to_le_bytes()); // OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(count.to_le_bytes());
    table.extend(LAPIC_ADDRESS.to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table
    table.push(0);
    table.push(0);
    table.extend(entries);
    table[7] = checksum(&table);

    let mut floating = Vec::new();
    floating.extend(b"_MP_");
    floating.extend(table_address.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum, below
    floating.extend([0u8; 5]); // feature bytes: a configuration table is present
    floating[10] = checksum(&floating);

    floating.extend(table);
    floating
}

pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&build(vcpus), GuestAddress(MPTABLE_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_and_table_are_well_formed() {
        let bytes = build(2);
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table_at = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_at, MPTABLE_START + 16);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, a bus, an IOAPIC, 24 interrupt lines, 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        assert_eq!(len, 44 + 2 * 20 + 8 * (1 + 1 + 24 + 2));
        // The first CPU is the enabled bootstrap processor.
        assert_eq!(table[44], 0);
        assert_eq!(table[47], 3);
        // The table ends before high memory.
        assert!(MPTABLE_START + bytes.len() as u64 <= super::super::layout::HIGH_MEMORY);
    }
}
