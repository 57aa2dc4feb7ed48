//! Building a VM, shared by boot and restore: the hypervisor VM over guest RAM, the devices
//! (in one order, so that a snapshot's device states line up with a restored VM's), their
//! interrupt lines, the vCPUs, and the running [`Vmm`] that holds them.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::serial::ConsoleLog;
use devices::virtio::balloon::{Balloon, BalloonControl};
use devices::virtio::console::{NamedPort, AGENT_PORT_NAME, FS_PORT_NAME};
use devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use devices::virtio::VirtioDevice;
use devices::{GuestMemory, IrqLine};
use hypervisor::{Hypervisor, MemoryRegion, Vcpu};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, SharedDevice};
use crate::vcpu::Vcpus;
use crate::x86_64::{self, layout};
use crate::{memory, Error, Vmm, VmmConfig};

/// A VM whose guest-physical memory is `ram` (one slot per region), with its interrupt
/// controller, in the order [`Hypervisor::create_vm`] asks for. The caller keeps `ram` for
/// as long as the VM (the [`Vmm`] holds both).
pub(crate) fn create_vm(
    hv: &dyn Hypervisor,
    ram: &memory::GuestRam,
) -> Result<Arc<dyn hypervisor::Vm>, Error> {
    // Device threads are started by an unfiltered thread (devices::spawn_confined): this
    // one, the VMM's creator, starts it before any vCPU runs.
    devices::start_spawner().map_err(Error::Thread)?;
    let vm: Arc<dyn hypervisor::Vm> = Arc::from(hv.create_vm()?);
    for (slot, (guest_addr, size, host_addr)) in ram.host_regions().into_iter().enumerate() {
        // SAFETY: the mapping belongs to `ram`, which outlives the VM (see above).
        unsafe {
            vm.map_memory(MemoryRegion {
                slot: slot as u32,
                guest_addr,
                size,
                host_addr,
                read_only: false,
            })?;
        }
    }
    vm.create_irqchip()?;
    Ok(vm)
}

/// An edge on a guest interrupt line: an irqfd where the hypervisor has them.
#[derive(Debug)]
enum Irq {
    EventFd(EventFd),
    Line(Arc<dyn hypervisor::Vm>, u32),
}

impl IrqLine for Irq {
    fn trigger(&self) {
        match self {
            Irq::EventFd(fd) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("irqfd: {e}");
                }
            }
            Irq::Line(vm, line) => {
                let _ = vm.set_irq_line(*line, true);
                let _ = vm.set_irq_line(*line, false);
            }
        }
    }
}

fn irq(vm: &Arc<dyn hypervisor::Vm>, line: u32) -> Result<Arc<Irq>, Error> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::File {
        path: "eventfd".into(),
        source: e,
    })?;
    match vm.register_irqfd(fd.as_raw_fd(), line) {
        Ok(()) => Ok(Arc::new(Irq::EventFd(fd))),
        Err(hypervisor::Error::Unsupported { .. }) => Ok(Arc::new(Irq::Line(vm.clone(), line))),
        Err(e) => Err(e.into()),
    }
}

/// The serial console of every VM: COM1, written to the console log (bounded, see
/// [`ConsoleLog`]).
pub(crate) type ConsoleSerial = devices::serial::Serial<ConsoleLog>;

/// A VM's devices, as boot and restore build them.
#[derive(Debug)]
pub(crate) struct Devices {
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) serial: Arc<Mutex<ConsoleSerial>>,
    pub(crate) virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The host's side of the balloon (memory target, pages given back).
    pub(crate) balloon: BalloonControl,
    /// The `virtio_mmio.device=` kernel arguments that announce them.
    pub(crate) cmdline: String,
    /// Duplicates of the console ports' device ends, shut down when the VM ends so that
    /// their host ends read the end of the stream (see [`Vcpus::watch`]).
    pub(crate) port_ends: Vec<UnixStream>,
}

fn insert(bus: &mut Bus, base: u64, len: u64, device: SharedDevice) -> Result<(), Error> {
    bus.insert(base, len, device)
        .map_err(|e| Error::Config(e.to_string()))
}

/// COM1, then virtio-mmio devices: the disks, the NICs, the console (ports `agent.0` and
/// `fs.0`), the RNG, the shared filesystem (virtio-fs), the balloon, all in their power-on
/// state (a restore then puts the saved states back).
pub(crate) fn build_devices(
    vm: &Arc<dyn hypervisor::Vm>,
    mem: &Arc<GuestMemory>,
    config: &mut VmmConfig,
) -> Result<Devices, Error> {
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let console = ConsoleLog::create(&config.console_log).map_err(|e| Error::File {
        path: config.console_log.clone(),
        source: e,
    })?;
    let irq4 = irq(vm, devices::serial::COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(devices::serial::Serial::new(irq4, console)));
    insert(
        &mut pio,
        u64::from(devices::serial::COM1_PORT),
        devices::serial::COM1_LEN,
        serial.clone(),
    )?;

    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let file_error = |e| Error::File {
            path: disk.path.clone(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(file_error)?;
        let blk = devices::virtio::blk::Block::new(file, disk.read_only, &format!("disk{i}"))
            .map_err(file_error)?;
        virtio.push(Box::new(blk));
    }
    for nic in &config.nics {
        let net = devices::virtio::net::Net::new(nic.tap, nic.mac).map_err(|e| Error::File {
            path: format!("tap fd {:?}", nic.tap).into(),
            source: e,
        })?;
        virtio.push(Box::new(net));
    }
    let ports: Vec<NamedPort> = [
        (AGENT_PORT_NAME, config.agent_channel.take()),
        (FS_PORT_NAME, config.fs_channel.take()),
    ]
    .into_iter()
    .filter_map(|(name, socket)| {
        socket.map(|socket| NamedPort {
            name: name.into(),
            socket,
        })
    })
    .collect();
    let port_ends = ports
        .iter()
        .map(|port| {
            port.socket.try_clone().map_err(|e| Error::File {
                path: format!("console port {}", port.name).into(),
                source: e,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !ports.is_empty() {
        virtio.push(Box::new(devices::virtio::console::Console::new(ports)));
    }
    virtio.push(Box::<devices::virtio::rng::Rng>::default());
    // Always there, backend or not: the device set is part of a snapshot, the backend is not.
    virtio.push(Box::new(devices::virtio::fs::Fs::new(config.fs.clone())));
    let balloon = Balloon::new(!config.diagnostics.keep_freed_memory);
    let balloon_control = balloon.control();
    virtio.push(Box::new(balloon));

    let mut transports = Vec::new();
    let mut cmdline = String::new();
    for (i, device) in virtio.into_iter().enumerate() {
        let base = layout::VIRTIO_MMIO + i as u64 * MMIO_LEN;
        let line = layout::VIRTIO_IRQ + i as u32;
        if line > layout::IRQ_MAX {
            return Err(Error::Config("too many devices for the IOAPIC".into()));
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            irq(vm, line)?,
        )));
        insert(&mut mmio, base, MMIO_LEN, transport.clone())?;
        transports.push(transport);
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{line}"));
    }
    Ok(Devices {
        pio,
        mmio,
        serial,
        virtio: transports,
        balloon: balloon_control,
        cmdline,
        port_ends,
    })
}

/// Creates the vCPUs: CPUID from this host's policy, then `prepare` (boot registers, or a
/// snapshot's state).
pub(crate) fn create_vcpus(
    hv: &dyn Hypervisor,
    vm: &Arc<dyn hypervisor::Vm>,
    config: &VmmConfig,
    mut prepare: impl FnMut(u32, &mut dyn Vcpu) -> Result<(), hypervisor::Error>,
) -> Result<Vec<Box<dyn Vcpu>>, Error> {
    let hide: Vec<_> = config
        .hide_cpuid
        .iter()
        .map(|name| {
            x86_64::cpuid::feature(name)
                .ok_or_else(|| Error::Config(format!("unknown CPUID feature {name:?}")))
        })
        .collect::<Result<_, _>>()?;
    let supported = hv.supported_cpuid()?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_x86_cpuid(&x86_64::cpuid::for_vcpu(
            &supported,
            id,
            config.vcpus,
            &hide,
        ))?;
        prepare(id, vcpu.as_mut())?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Starts the vCPU threads of a built VM; the running VM.
pub(crate) fn start(
    vm: Arc<dyn hypervisor::Vm>,
    ram: memory::GuestRam,
    devices: Devices,
    vcpus: Vec<Box<dyn Vcpu>>,
    config: VmmConfig,
    started: Instant,
) -> Result<Vmm, Error> {
    let mut threads = Vcpus::start(
        vcpus,
        &devices.pio,
        &devices.mmio,
        &ram.mem,
        &config.diagnostics,
    )?;
    threads.watch(devices.port_ends)?;
    Ok(Vmm {
        vm,
        ram,
        serial: devices.serial,
        virtio: devices.virtio,
        balloon: devices.balloon,
        vcpus: threads,
        console_log: config.console_log,
        vcpu_count: config.vcpus,
        started,
    })
}
