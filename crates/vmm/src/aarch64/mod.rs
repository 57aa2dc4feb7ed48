//! The aarch64 machine the builtin VMM describes to its guest: where RAM and each device
//! sit, and the device tree that tells the kernel so (`fdt`).
//!
//! The addresses and interrupt numbers are those of QEMU's `virt` machine: a kernel that
//! boots there boots here, and this crate's device tree can be checked by booting the real
//! guest kernel on QEMU's `virt` with it (`make smoke-aarch64`), before a vCPU of this VMM
//! runs aarch64 code.

pub mod fdt;

/// Start of guest RAM (below it: the interrupt controller and devices).
pub const RAM_START: u64 = 0x4000_0000;

/// GICv3 distributor, and the redistributors, one frame pair per vCPU.
pub const GIC_DISTRIBUTOR: u64 = 0x0800_0000;
pub const GIC_DISTRIBUTOR_SIZE: u64 = 0x1_0000;
pub const GIC_REDISTRIBUTORS: u64 = 0x080a_0000;
pub const GIC_REDISTRIBUTOR_SIZE: u64 = 0x2_0000;
/// Room for the redistributors of this many vCPUs below the next device.
pub const MAX_VCPUS: u32 = 123;

/// The PL011 UART (the console) and the PL031 real-time clock.
pub const UART: u64 = 0x0900_0000;
pub const RTC: u64 = 0x0901_0000;
pub const PRIMECELL_SIZE: u64 = 0x1000;

/// Virtio-mmio transports, one after another.
pub const VIRTIO_MMIO: u64 = 0x0a00_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
pub const MAX_VIRTIO_DEVICES: u32 = 32;

/// Shared peripheral interrupts (GIC INTID = 32 + number) of the devices.
pub const UART_SPI: u32 = 1;
pub const RTC_SPI: u32 = 2;
pub const FIRST_VIRTIO_SPI: u32 = 16;

/// Private peripheral interrupts (INTID = 16 + number) of the generic timer: the secure
/// and non-secure physical, virtual and hypervisor timers.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

/// Where the `n`th virtio-mmio transport sits, and its interrupt.
pub fn virtio_mmio(n: u32) -> (u64, u32) {
    (
        VIRTIO_MMIO + u64::from(n) * VIRTIO_MMIO_SIZE,
        FIRST_VIRTIO_SPI + n,
    )
}
