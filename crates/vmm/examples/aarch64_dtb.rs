//! Writes the device tree of an aarch64 machine of the builtin VMM to stdout, for a boot of
//! the guest kernel with it on QEMU's `virt` (scripts/aarch64-guest-smoke.sh):
//!
//!   aarch64_dtb VCPUS MEMORY_MIB VIRTIO_DEVICES CMDLINE > machine.dtb

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [vcpus, memory_mib, virtio_devices, cmdline] = args.as_slice() else {
        eprintln!("usage: aarch64_dtb VCPUS MEMORY_MIB VIRTIO_DEVICES CMDLINE");
        std::process::exit(2);
    };
    let number = |text: &str| -> u32 {
        text.parse().unwrap_or_else(|_| {
            eprintln!("aarch64_dtb: {text:?} is not a number");
            std::process::exit(2)
        })
    };
    let machine = vmm::aarch64::fdt::Machine {
        vcpus: number(vcpus),
        memory_bytes: u64::from(number(memory_mib)) << 20,
        cmdline: cmdline.clone(),
        initramfs: None,
        virtio_devices: number(virtio_devices),
        psci_method: "hvc",
    };
    match machine.device_tree() {
        Ok(blob) => {
            if let Err(e) = std::io::stdout().write_all(&blob) {
                eprintln!("aarch64_dtb: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("aarch64_dtb: {e}");
            std::process::exit(1);
        }
    }
}
