//! The flattened device tree an aarch64 guest boots with: its CPUs (brought up through
//! PSCI), RAM, the GICv3, the generic timer, the PL011 console, the PL031 clock, the
//! virtio-mmio transports and `/chosen` (command line, initramfs).

use vm_fdt::{FdtWriter, FdtWriterNode};

use super::*;

/// The interrupt cells' first value: a shared or a private peripheral interrupt.
const SPI: u32 = 0;
const PPI: u32 = 1;
/// The third cell: the trigger.
const EDGE_RISING: u32 = 1;
const LEVEL_HIGH: u32 = 4;

const GIC_PHANDLE: u32 = 1;
const CLOCK_PHANDLE: u32 = 2;

/// The input clock of the PL011 and PL031, as on QEMU's `virt`.
const APB_CLOCK_HZ: u32 = 24_000_000;

/// What the guest is told of its machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub cmdline: String,
    /// Where the initramfs sits in guest memory, and its length.
    pub initramfs: Option<(u64, u64)>,
    /// How many virtio-mmio transports to describe (the first ones of [`virtio_mmio`]).
    pub virtio_devices: u32,
    /// How PSCI calls reach the hypervisor: `hvc` (a VMM at EL2, KVM or HVF) or `smc`.
    pub psci_method: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    #[error("device tree: {0}")]
    Writer(#[from] vm_fdt::Error),
    #[error("{0} vCPUs: the machine has room for 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("{0} virtio devices: the machine has {MAX_VIRTIO_DEVICES} transports")]
    VirtioDevices(u32),
}

impl Machine {
    /// The device tree blob.
    pub fn device_tree(&self) -> Result<Vec<u8>, FdtError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(FdtError::Vcpus(self.vcpus));
        }
        if self.virtio_devices > MAX_VIRTIO_DEVICES {
            return Err(FdtError::VirtioDevices(self.virtio_devices));
        }
        let mut fdt = FdtWriter::new()?;
        let root = fdt.begin_node("")?;
        fdt.property_string("compatible", "linux,dummy-virt")?;
        fdt.property_u32("#address-cells", 2)?;
        fdt.property_u32("#size-cells", 2)?;
        fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;
        self.cpus(&mut fdt)?;
        let memory = fdt.begin_node(&format!("memory@{RAM_START:x}"))?;
        fdt.property_string("device_type", "memory")?;
        fdt.property_array_u64("reg", &[RAM_START, self.memory_bytes])?;
        fdt.end_node(memory)?;
        let psci = fdt.begin_node("psci")?;
        fdt.property_string_list(
            "compatible",
            vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
        )?;
        fdt.property_string("method", self.psci_method)?;
        fdt.end_node(psci)?;
        self.gic(&mut fdt)?;
        let timer = fdt.begin_node("timer")?;
        fdt.property_string("compatible", "arm,armv8-timer")?;
        let cells: Vec<u32> = TIMER_PPIS
            .iter()
            .flat_map(|&ppi| [PPI, ppi, LEVEL_HIGH])
            .collect();
        fdt.property_array_u32("interrupts", &cells)?;
        fdt.property_null("always-on")?;
        fdt.end_node(timer)?;
        let clock = fdt.begin_node("apb-pclk")?;
        fdt.property_string("compatible", "fixed-clock")?;
        fdt.property_u32("#clock-cells", 0)?;
        fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
        fdt.property_string("clock-output-names", "clk24mhz")?;
        fdt.property_phandle(CLOCK_PHANDLE)?;
        fdt.end_node(clock)?;
        let uart = primecell(&mut fdt, "pl011", UART, UART_SPI)?;
        fdt.property_array_u32("clocks", &[CLOCK_PHANDLE, CLOCK_PHANDLE])?;
        fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
        fdt.end_node(uart)?;
        let rtc = primecell(&mut fdt, "pl031", RTC, RTC_SPI)?;
        fdt.property_u32("clocks", CLOCK_PHANDLE)?;
        fdt.property_string("clock-names", "apb_pclk")?;
        fdt.end_node(rtc)?;
        for n in 0..self.virtio_devices {
            let (base, spi) = virtio_mmio(n);
            let node = fdt.begin_node(&format!("virtio_mmio@{base:x}"))?;
            fdt.property_string("compatible", "virtio,mmio")?;
            fdt.property_array_u64("reg", &[base, VIRTIO_MMIO_SIZE])?;
            fdt.property_array_u32("interrupts", &[SPI, spi, EDGE_RISING])?;
            fdt.property_null("dma-coherent")?;
            fdt.end_node(node)?;
        }
        let chosen = fdt.begin_node("chosen")?;
        fdt.property_string("bootargs", &self.cmdline)?;
        fdt.property_string("stdout-path", &format!("/pl011@{UART:x}"))?;
        if let Some((start, len)) = self.initramfs {
            fdt.property_u64("linux,initrd-start", start)?;
            fdt.property_u64("linux,initrd-end", start + len)?;
        }
        fdt.end_node(chosen)?;
        fdt.end_node(root)?;
        Ok(fdt.finish()?)
    }

    fn cpus(&self, fdt: &mut FdtWriter) -> Result<(), FdtError> {
        let cpus = fdt.begin_node("cpus")?;
        fdt.property_u32("#address-cells", 1)?;
        fdt.property_u32("#size-cells", 0)?;
        for n in 0..self.vcpus {
            // MPIDR as KVM gives vCPU n: affinity 0 is n % 16, affinity 1 is n / 16.
            let mpidr = ((n / 16) << 8) | (n % 16);
            let cpu = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
            fdt.property_string("device_type", "cpu")?;
            fdt.property_string("compatible", "arm,arm-v8")?;
            fdt.property_u32("reg", mpidr)?;
            fdt.property_string("enable-method", "psci")?;
            fdt.end_node(cpu)?;
        }
        fdt.end_node(cpus)?;
        Ok(())
    }

    fn gic(&self, fdt: &mut FdtWriter) -> Result<(), FdtError> {
        let gic = fdt.begin_node(&format!("intc@{GIC_DISTRIBUTOR:x}"))?;
        fdt.property_string("compatible", "arm,gic-v3")?;
        fdt.property_u32("#interrupt-cells", 3)?;
        // No interrupt map refers into it.
        fdt.property_u32("#address-cells", 0)?;
        fdt.property_null("interrupt-controller")?;
        fdt.property_array_u64(
            "reg",
            &[
                GIC_DISTRIBUTOR,
                GIC_DISTRIBUTOR_SIZE,
                GIC_REDISTRIBUTORS,
                GIC_REDISTRIBUTOR_SIZE * u64::from(self.vcpus),
            ],
        )?;
        fdt.property_phandle(GIC_PHANDLE)?;
        fdt.end_node(gic)?;
        Ok(())
    }
}

/// Opens the node of an ARM PrimeCell device; the caller adds its clocks and closes it.
fn primecell(
    fdt: &mut FdtWriter,
    name: &str,
    base: u64,
    spi: u32,
) -> Result<FdtWriterNode, FdtError> {
    let node = fdt.begin_node(&format!("{name}@{base:x}"))?;
    fdt.property_string_list(
        "compatible",
        vec![format!("arm,{name}"), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[base, PRIMECELL_SIZE])?;
    fdt.property_array_u32("interrupts", &[SPI, spi, LEVEL_HIGH])?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every property of a blob, by `node/path:name`: a reader of the format's structure
    /// block (tokens 1 begin node, 2 end node, 3 property, 4 nop, 9 end) and strings.
    fn properties(blob: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let word = |at: usize| u32::from_be_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(word(0), 0xd00d_feed, "magic");
        assert_eq!(word(4), blob.len(), "total size");
        let (structure, strings) = (word(8), word(12));
        let mut path: Vec<String> = Vec::new();
        let mut found = BTreeMap::new();
        let mut at = structure;
        loop {
            let token = word(at);
            at += 4;
            match token {
                1 => {
                    let end = at + blob[at..].iter().position(|&b| b == 0).unwrap();
                    path.push(String::from_utf8(blob[at..end].to_vec()).unwrap());
                    at = (end + 1).next_multiple_of(4);
                }
                2 => {
                    path.pop();
                }
                3 => {
                    let (len, name_at) = (word(at), word(at + 4));
                    at += 8;
                    let name_start = strings + name_at;
                    let name_end =
                        name_start + blob[name_start..].iter().position(|&b| b == 0).unwrap();
                    let name = String::from_utf8(blob[name_start..name_end].to_vec()).unwrap();
                    found.insert(
                        format!("{}:{name}", path.join("/")),
                        blob[at..at + len].to_vec(),
                    );
                    at = (at + len).next_multiple_of(4);
                }
                4 => {}
                9 => return found,
                other => panic!("token {other} at {at}"),
            }
        }
    }

    fn cells(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn machine() -> Machine {
        Machine {
            vcpus: 2,
            memory_bytes: 256 << 20,
            cmdline: "console=ttyAMA0 panic=-1".into(),
            initramfs: Some((0x4800_0000, 0x1234)),
            virtio_devices: 3,
            psci_method: "hvc",
        }
    }

    #[test]
    fn the_tree_describes_cpus_memory_interrupts_devices_and_the_command_line() {
        let found = properties(&machine().device_tree().unwrap());
        let get = |key: &str| found.get(key).unwrap_or_else(|| panic!("no {key}"));
        assert_eq!(get(":compatible"), b"linux,dummy-virt\0");
        assert_eq!(cells(get(":interrupt-parent")), [GIC_PHANDLE]);
        assert_eq!(cells(get("/cpus/cpu@1:reg")), [1]);
        assert_eq!(get("/cpus/cpu@1:enable-method"), b"psci\0");
        assert!(!found.contains_key("/cpus/cpu@2:reg"));
        assert_eq!(
            cells(get("/memory@40000000:reg")),
            [0, 0x4000_0000, 0, 256 << 20]
        );
        assert_eq!(get("/psci:method"), b"hvc\0");
        assert_eq!(cells(get("/intc@8000000:phandle")), [GIC_PHANDLE]);
        // The redistributors of two vCPUs.
        assert_eq!(
            cells(get("/intc@8000000:reg")),
            [0, 0x0800_0000, 0, 0x1_0000, 0, 0x080a_0000, 0, 0x4_0000]
        );
        assert_eq!(
            cells(get("/timer:interrupts")),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );
        assert_eq!(cells(get("/pl011@9000000:interrupts")), [0, 1, 4]);
        assert_eq!(
            cells(get("/pl011@9000000:clocks")),
            [CLOCK_PHANDLE, CLOCK_PHANDLE]
        );
        assert_eq!(cells(get("/virtio_mmio@a000400:interrupts")), [0, 18, 1]);
        assert!(!found.contains_key("/virtio_mmio@a000600:reg"));
        assert_eq!(get("/chosen:bootargs"), b"console=ttyAMA0 panic=-1\0");
        assert_eq!(get("/chosen:stdout-path"), b"/pl011@9000000\0");
        assert_eq!(cells(get("/chosen:linux,initrd-end")), [0, 0x4800_1234]);
    }

    #[test]
    fn a_machine_without_room_for_its_vcpus_or_devices_is_refused() {
        let too_many = Machine {
            vcpus: MAX_VCPUS + 1,
            ..machine()
        };
        assert!(matches!(too_many.device_tree(), Err(FdtError::Vcpus(_))));
        let none = Machine {
            vcpus: 0,
            ..machine()
        };
        assert!(matches!(none.device_tree(), Err(FdtError::Vcpus(0))));
        let devices = Machine {
            virtio_devices: MAX_VIRTIO_DEVICES + 1,
            ..machine()
        };
        assert!(matches!(
            devices.device_tree(),
            Err(FdtError::VirtioDevices(_))
        ));
    }
}
