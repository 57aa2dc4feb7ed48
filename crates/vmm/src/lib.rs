//! The builtin VMM: a microVM inside the calling process.
//!
//! [`Vmm::boot`] builds a VM on a [`hypervisor::Hypervisor`]: guest RAM in a memfd, the kernel
//! (an ELF vmlinux entered through PVH, or a bzImage through the 64-bit boot protocol) and an
//! optional initramfs, a COM1 serial console
//! written to a log, virtio-mmio devices (block disks, the agent's console port, rng) on the
//! kernel command line, and one thread per vCPU. The vCPU threads serve port I/O and MMIO
//! exits on two [`bus::Bus`]es; the VM ends when the guest powers off, resets or faults.
//!
//! x86_64 on KVM is what runs today; the hypervisor boundary already has an HVF backend for
//! aarch64 macOS, whose boot path (device tree, PSCI) is the remaining piece on that side.

pub mod bus;
pub mod memory;
pub mod snapshot;
pub mod x86_64;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use devices::virtio::VirtioDevice;
use devices::{GuestMemory, IrqLine};
use hypervisor::{Hypervisor, Kick, MemoryRegion, Vcpu, VcpuExit};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use bus::{Bus, SharedDevice};
use x86_64::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the kernel {path}: {detail}")]
    Kernel { path: PathBuf, detail: String },
    #[error("the initramfs ({size} bytes) does not fit in guest RAM above the kernel")]
    InitramfsTooBig { size: u64 },
    #[error(transparent)]
    Boot(#[from] x86_64::boot::BootError),
    #[error("{0}")]
    Config(String),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// A disk for virtio-blk; the guest sees them as /dev/vda, /dev/vdb, … in order.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio-net device on a tap (IFF_VNET_HDR; the VMM keeps its own duplicate), or
/// detached (no tap: the guest has the NIC, its frames go nowhere).
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap: Option<std::os::fd::RawFd>,
    pub mac: [u8; 6],
}

#[derive(Debug)]
pub struct VmmConfig {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// An ELF vmlinux with a PVH entry note.
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// The kernel command line; the VMM appends its virtio-mmio device list.
    pub cmdline: String,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// The device end of the host↔agent channel (virtio-console port `agent.0`).
    pub agent_channel: Option<UnixStream>,
    /// Where the serial console goes.
    pub console_log: PathBuf,
    /// CPUID features to hide from the guest (by /proc/cpuinfo name).
    pub hide_cpuid: Vec<String>,
}

impl VmmConfig {
    /// The shapes the VMM builds: 1 to 254 vCPUs (the MP table's APIC ids), at least 32 MiB.
    fn check_shape(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > 254 || self.memory_mib < 32 {
            return Err(Error::Config(format!(
                "a VM needs 1 to 254 vCPUs and at least 32 MiB (asked: {} vCPUs, {} MiB)",
                self.vcpus, self.memory_mib
            )));
        }
        Ok(())
    }
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off or reset (`reboot=t`: a triple fault), or the VMM stopped it.
    Shutdown,
    /// Something the VMM could not serve; the VM cannot go on.
    Failed(String),
}

/// How the vCPU threads are steered: pause, resume, stop, and the VM's end.
#[derive(Debug, Default)]
struct RunState {
    pause: bool,
    paused: u32,
    stop: bool,
    exit: Option<VmExit>,
    /// A snapshot in progress: one slot per vCPU, filled by its (parked) thread.
    save: Option<Vec<SavedVcpu>>,
}

/// A vCPU's saved state once its thread has read it.
type SavedVcpu = Option<Result<Vec<u8>, String>>;

#[derive(Debug, Default)]
struct Control {
    state: Mutex<RunState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by vCPU `id`'s thread between runs: parks while paused, saving the vCPU's state
    /// with `save` when a snapshot asks for it (vCPU state is read on the vCPU's own thread);
    /// false when it must end.
    fn checkpoint(&self, id: usize, save: &mut dyn FnMut() -> Result<Vec<u8>, String>) -> bool {
        let mut state = self.lock();
        if state.pause && !state.stop {
            state.paused += 1;
            self.changed.notify_all();
            while state.pause && !state.stop {
                let asked = state
                    .save
                    .as_ref()
                    .is_some_and(|slots| slots.get(id).is_some_and(Option::is_none));
                if asked {
                    drop(state);
                    let saved = save();
                    state = self.lock();
                    if let Some(slot) = state.save.as_mut().and_then(|s| s.get_mut(id)) {
                        *slot = Some(saved);
                    }
                    self.changed.notify_all();
                    continue;
                }
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.paused -= 1;
        }
        !state.stop
    }

    fn end(&self, exit: VmExit) {
        let mut state = self.lock();
        state.stop = true;
        state.exit.get_or_insert(exit);
        self.changed.notify_all();
    }
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

/// A running VM.
#[derive(Debug)]
pub struct Vmm {
    vm: Arc<dyn hypervisor::Vm>,
    ram: memory::GuestRam,
    serial: Arc<Mutex<ConsoleSerial>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    control: Arc<Control>,
    kickers: Vec<Arc<dyn Kick>>,
    threads: Vec<JoinHandle<()>>,
    console_log: PathBuf,
    vcpus: u32,
    /// When boot started, for the phase timings.
    pub started: Instant,
}

impl Vmm {
    pub fn boot(hv: &dyn Hypervisor, mut config: VmmConfig) -> Result<Vmm, Error> {
        let started = Instant::now();
        config.check_shape()?;
        let ram_size = u64::from(config.memory_mib) << 20;
        let ram = memory::GuestRam::new(&x86_64::ram_ranges(ram_size))?;
        let vm = create_vm(hv, &ram)?;
        let low_ram_end = ram.ranges[0].1;

        let kernel = load_kernel(&ram.mem, &config.kernel)?;
        let kernel_end = kernel.end;
        let initramfs = match &config.initramfs {
            Some(path) => Some(load_initramfs(&ram.mem, path, kernel_end, low_ram_end)?),
            None => None,
        };

        let devices = build_devices(&vm, &ram.mem, &mut config, None)?;
        let mut cmdline = config.cmdline.clone();
        cmdline.push_str(&devices.cmdline);

        x86_64::mptable::write(&ram.mem, config.vcpus as u8)
            .map_err(|e| Error::Config(format!("writing the MP table: {e}")))?;
        let boot_info = x86_64::boot::BootInfo {
            ram: &ram.ranges,
            cmdline: &cmdline,
            initramfs,
        };
        let entry = kernel.entry;
        let (entry_regs, entry_sregs) = match &kernel.format {
            KernelFormat::Pvh => {
                x86_64::boot::write_boot_data(&ram.mem, &boot_info)?;
                x86_64::boot::entry_registers(entry)
            }
            KernelFormat::BzImage(header) => {
                x86_64::boot::write_linux_boot_data(&ram.mem, &boot_info, header)?;
                x86_64::boot::entry_registers_64(entry)
            }
        };

        let threads = start_vcpus(hv, &vm, &config, &ram.mem, &devices, |id, vcpu| {
            vcpu.set_x86_msrs(&boot_msrs())?;
            vcpu.setup_x86_lapic()?;
            if id == 0 {
                vcpu.set_x86_sregs(&entry_sregs)?;
                vcpu.set_x86_regs(&entry_regs)?;
            }
            Ok(())
        })?;
        log::debug!(
            "builtin VMM: {} vCPUs, {} MiB, kernel entry {entry:#x}, set up in {:?}",
            config.vcpus,
            config.memory_mib,
            started.elapsed()
        );
        Ok(Vmm::running(vm, ram, devices, threads, config, started))
    }

    /// The VMM of a VM whose vCPU threads have started.
    fn running(
        vm: Arc<dyn hypervisor::Vm>,
        ram: memory::GuestRam,
        devices: Devices,
        (control, kickers, threads): VcpuThreads,
        config: VmmConfig,
        started: Instant,
    ) -> Vmm {
        Vmm {
            vm,
            ram,
            serial: devices.serial,
            virtio: devices.virtio,
            control,
            kickers,
            threads,
            console_log: config.console_log,
            vcpus: config.vcpus,
            started,
        }
    }

    /// Stops every vCPU between two guest instructions; returns when all are parked.
    pub fn pause(&self) {
        let mut state = self.control.lock();
        state.pause = true;
        drop(state);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for k in &self.kickers {
                k.kick();
            }
            let state = self.control.lock();
            if state.paused == self.vcpus || state.stop || Instant::now() > deadline {
                if state.paused != self.vcpus && !state.stop {
                    log::warn!("builtin VMM: not every vCPU parked within 5 s");
                }
                return;
            }
            let _ = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(10));
        }
    }

    pub fn resume(&self) {
        let mut state = self.control.lock();
        state.pause = false;
        self.control.changed.notify_all();
    }

    /// Ends the VM (if it has not ended) and joins its vCPU threads.
    pub fn stop(&mut self) {
        self.control.end(VmExit::Shutdown);
        while self.threads.iter().any(|t| !t.is_finished()) {
            for k in &self.kickers {
                k.kick();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Why the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.control.lock().exit.clone()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let deadline = Instant::now() + timeout;
        let mut state = self.control.lock();
        while state.exit.is_none() {
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .control
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.exit.clone()
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.ram.mem
    }

    /// The hypervisor VM (for tests and the snapshot code).
    pub fn vm(&self) -> &Arc<dyn hypervisor::Vm> {
        &self.vm
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A VM whose guest-physical memory is `ram` (one slot per region), with its interrupt
/// controller, in the order [`Hypervisor::create_vm`] asks for. The caller keeps `ram` for
/// as long as the VM (the [`Vmm`] holds both).
fn create_vm(
    hv: &dyn Hypervisor,
    ram: &memory::GuestRam,
) -> Result<Arc<dyn hypervisor::Vm>, Error> {
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

fn insert(bus: &mut Bus, base: u64, len: u64, device: SharedDevice) -> Result<(), Error> {
    bus.insert(base, len, device)
        .map_err(|e| Error::Config(e.to_string()))
}

/// The serial console of every VM: COM1, written to the console log.
type ConsoleSerial = devices::serial::Serial<LineWriter>;

/// A VM's devices, as boot and restore build them (in the same order, so a snapshot's
/// device states line up).
struct Devices {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<ConsoleSerial>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The `virtio_mmio.device=` kernel arguments that announce them.
    cmdline: String,
}

/// COM1 (in `serial`'s state when restoring), then virtio-mmio devices: the disks, the NICs,
/// the agent's console port, the RNG.
fn build_devices(
    vm: &Arc<dyn hypervisor::Vm>,
    mem: &Arc<GuestMemory>,
    config: &mut VmmConfig,
    serial: Option<&devices::serial::SerialState>,
) -> Result<Devices, Error> {
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let console = File::create(&config.console_log).map_err(|e| Error::File {
        path: config.console_log.clone(),
        source: e,
    })?;
    let irq4 = irq(vm, devices::serial::COM1_IRQ)?;
    let serial = match serial {
        None => devices::serial::Serial::new(irq4, LineWriter(console)),
        Some(state) => devices::serial::Serial::restored(irq4, LineWriter(console), state)
            .map_err(|e| Error::Snapshot(e.to_string()))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    insert(
        &mut pio,
        u64::from(devices::serial::COM1_PORT),
        devices::serial::COM1_LEN,
        serial.clone(),
    )?;

    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|e| Error::File {
                path: disk.path.clone(),
                source: e,
            })?;
        let blk = devices::virtio::blk::Block::new(file, disk.read_only, &format!("disk{i}"))
            .map_err(|e| Error::File {
                path: disk.path.clone(),
                source: e,
            })?;
        virtio.push(Box::new(blk));
    }
    for nic in &config.nics {
        let net = devices::virtio::net::Net::new(nic.tap, nic.mac).map_err(|e| Error::File {
            path: format!("tap fd {:?}", nic.tap).into(),
            source: e,
        })?;
        virtio.push(Box::new(net));
    }
    if let Some(channel) = config.agent_channel.take() {
        virtio.push(Box::new(devices::virtio::console::Console::new(channel)));
    }
    virtio.push(Box::<devices::virtio::rng::Rng>::default());

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
        cmdline,
    })
}

type VcpuThreads = (Arc<Control>, Vec<Arc<dyn Kick>>, Vec<JoinHandle<()>>);

/// Creates the vCPUs (CPUID from this host's policy, then `prepare` for boot registers or a
/// snapshot's state) and starts one thread per vCPU serving its exits on the devices' buses.
fn start_vcpus(
    hv: &dyn Hypervisor,
    vm: &Arc<dyn hypervisor::Vm>,
    config: &VmmConfig,
    mem: &Arc<GuestMemory>,
    devices: &Devices,
    mut prepare: impl FnMut(u32, &mut dyn Vcpu) -> Result<(), hypervisor::Error>,
) -> Result<VcpuThreads, Error> {
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
    let control = Arc::new(Control::default());
    let mut kickers = Vec::new();
    let mut threads = Vec::new();
    let trace = std::env::var_os("SUPERMACHINE_VMM_TRACE").is_some();
    let profile = std::env::var_os("SUPERMACHINE_VMM_PROFILE").map(PathBuf::from);
    for vcpu in vcpus {
        let id = vcpu.id();
        kickers.push(vcpu.kicker());
        let worker = VcpuWorker {
            vcpu,
            trace,
            exits: 0,
            profile: profile.as_ref().map(|p| (p.clone(), HashMap::new())),
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            mem: mem.clone(),
            control: control.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || worker.run())
            .map_err(Error::Thread);
        match thread {
            Ok(t) => threads.push(t),
            Err(e) => {
                control.end(VmExit::Failed(e.to_string()));
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
    }
    if profile.is_some() {
        start_sampler(control.clone(), kickers.clone());
    }
    Ok((control, kickers, threads))
}

/// SUPERMACHINE_VMM_PROFILE: kicks every vCPU each millisecond so that each records where
/// the guest was (see [`VcpuWorker::profile`]).
fn start_sampler(control: Arc<Control>, kickers: Vec<Arc<dyn Kick>>) {
    let _ = std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(1));
            if control.lock().stop {
                return;
            }
            for k in &kickers {
                k.kick();
            }
        });
}

/// MSRs a kernel expects firmware to have set: fast strings, write-back default memory type.
fn boot_msrs() -> Vec<(u32, u64)> {
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    vec![(IA32_MISC_ENABLE, 1), (IA32_MTRR_DEF_TYPE, (1 << 11) | 6)]
}

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

/// A console log that is flushed at each line, so a crash loses at most a partial line.
#[derive(Debug)]
struct LineWriter(File);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// What to do about an instruction the hypervisor failed to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// `int3` (0xcc): deliver the #BP it would have raised, past the instruction.
    Breakpoint,
    /// `fwait` (0x9b) with no pending x87 exception: nothing to do but skip it.
    Skip,
}

/// The repair for the instruction starting with `bytes`, if the VMM knows one. Some emulators
/// (KVM's on hosts that only emulate guest kernel code, such as PVM) lack these.
pub fn repair_for(bytes: &[u8]) -> Option<Repair> {
    match bytes.first()? {
        0xcc => Some(Repair::Breakpoint),
        0x9b => Some(Repair::Skip),
        _ => None,
    }
}

struct VcpuWorker {
    vcpu: Box<dyn Vcpu>,
    /// SUPERMACHINE_VMM_TRACE: log one exit in a thousand and where each kick found the
    /// vCPU (for a guest that stalls on a slow host).
    trace: bool,
    exits: u64,
    /// SUPERMACHINE_VMM_PROFILE=<path>: where the sampler's kicks found the guest, counted
    /// by (CR3, instruction pointer, guessed kernel call chain) and written to
    /// `<path>.<pid>.vcpu<id>` as `count cr3 rip frames…` lines when the vCPU ends;
    /// `scripts/guest-profile.py` names the functions. CR3 tells the guest's processes
    /// apart.
    profile: Option<(PathBuf, HashMap<Vec<u64>, u64>)>,
    pio: Bus,
    mmio: Bus,
    mem: Arc<GuestMemory>,
    control: Arc<Control>,
}

/// What the run loop does after an exit (the exit borrows the vCPU; this does not).
enum Next {
    Continue,
    End(VmExit),
    Repair(String),
}

impl VcpuWorker {
    fn run(mut self) {
        let id = self.vcpu.id();
        while self.control.checkpoint(id as usize, &mut || {
            self.vcpu.save_state().map_err(|e| e.to_string())
        }) {
            let exit = self.vcpu.run();
            if self.trace {
                self.exits += 1;
                if self.exits.is_multiple_of(1000) {
                    log::debug!("vCPU {id}: exit #{}: {exit:?}", self.exits);
                }
            }
            let next = match exit {
                Ok(VcpuExit::IoIn { port, data }) => {
                    self.pio.read(u64::from(port), data);
                    Next::Continue
                }
                Ok(VcpuExit::IoOut { port, data }) => {
                    // The i8042 reset line: the guest asked for a reboot.
                    if port == 0x64 && data.first() == Some(&0xfe) {
                        Next::End(VmExit::Shutdown)
                    } else {
                        self.pio.write(u64::from(port), data);
                        Next::Continue
                    }
                }
                Ok(VcpuExit::MmioRead { addr, data }) => {
                    self.mmio.read(addr, data);
                    Next::Continue
                }
                Ok(VcpuExit::MmioWrite { addr, data }) => {
                    self.mmio.write(addr, data);
                    Next::Continue
                }
                Ok(VcpuExit::Interrupted) => {
                    if self.profile.is_some() {
                        self.sample();
                    }
                    if self.trace {
                        if let Ok(r) = self.vcpu.x86_regs() {
                            log::debug!("vCPU {}: kicked at rip {:#x}", self.vcpu.id(), r.rip);
                        }
                    }
                    Next::Continue
                }
                Ok(VcpuExit::Halt) | Ok(VcpuExit::Shutdown) => Next::End(VmExit::Shutdown),
                Ok(VcpuExit::EmulationFailure { detail }) => Next::Repair(detail),
                Ok(VcpuExit::Other(what)) => {
                    Next::End(VmExit::Failed(format!("vCPU {}: {what}", self.vcpu.id())))
                }
                Err(e) => Next::End(VmExit::Failed(format!("vCPU {}: {e}", self.vcpu.id()))),
            };
            match next {
                Next::Continue => {}
                Next::End(exit) => {
                    self.control.end(exit);
                    self.write_profile();
                    return;
                }
                Next::Repair(detail) => {
                    if let Err(e) = self.repair() {
                        self.control.end(VmExit::Failed(format!(
                            "vCPU {}: {detail}: {e}",
                            self.vcpu.id()
                        )));
                        return;
                    }
                }
            }
        }
        self.write_profile();
    }

    /// One profile sample: the instruction pointer and, in the guest kernel, the words on
    /// its stack that look like kernel text addresses (a guessed call chain, innermost first).
    fn sample(&mut self) {
        const KERNEL_TEXT: std::ops::Range<u64> = 0xffff_ffff_8100_0000..0xffff_ffff_a000_0000;
        let Ok(r) = self.vcpu.x86_regs() else { return };
        let cr3 = self.vcpu.x86_sregs().map_or(0, |s| s.cr3);
        let mut key = vec![cr3, r.rip];
        if KERNEL_TEXT.contains(&r.rip) {
            let mut page = [0u8; 4096];
            let start = r.rsp & !7;
            let end = (start | 0xfff) + 1;
            if let Ok(gpa) = self.vcpu.translate(start) {
                let len = (end - start) as usize;
                if self
                    .mem
                    .read_slice(&mut page[..len], GuestAddress(gpa))
                    .is_ok()
                {
                    key.extend(
                        page[..len]
                            .chunks_exact(8)
                            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                            .filter(|w| KERNEL_TEXT.contains(w)),
                    );
                }
            }
        }
        if let Some((_, samples)) = &mut self.profile {
            *samples.entry(key).or_default() += 1;
        }
    }

    fn write_profile(&mut self) {
        let Some((path, samples)) = self.profile.take() else {
            return;
        };
        let mut lines: Vec<(u64, Vec<u64>)> = samples.into_iter().map(|(k, n)| (n, k)).collect();
        lines.sort_unstable_by(|a, b| b.cmp(a));
        let text: String = lines
            .iter()
            .map(|(n, key)| {
                let words: Vec<String> = key.iter().map(|w| format!("{w:#x}")).collect();
                format!("{n} {}\n", words.join(" "))
            })
            .collect();
        let mut name = path.into_os_string();
        name.push(format!(".{}.vcpu{}", std::process::id(), self.vcpu.id()));
        if let Err(e) = std::fs::write(&name, text) {
            log::warn!("profile {}: {e}", Path::new(&name).display());
        }
    }

    fn repair(&mut self) -> Result<(), String> {
        let mut regs = self.vcpu.x86_regs().map_err(|e| e.to_string())?;
        let gpa = self.vcpu.translate(regs.rip).map_err(|e| e.to_string())?;
        let mut bytes = [0u8; 4];
        self.mem
            .read_slice(&mut bytes, GuestAddress(gpa))
            .map_err(|e| e.to_string())?;
        let repair = repair_for(&bytes)
            .ok_or_else(|| format!("no repair for {bytes:02x?} at rip {:#x}", regs.rip))?;
        log::debug!(
            "vCPU {}: repairing {repair:?} at {:#x}",
            self.vcpu.id(),
            regs.rip
        );
        regs.rip += 1;
        self.vcpu.set_x86_regs(&regs).map_err(|e| e.to_string())?;
        if repair == Repair::Breakpoint {
            self.vcpu
                .inject_x86_exception(hypervisor::x86::VECTOR_BREAKPOINT)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_and_fwait_have_repairs_and_nothing_else_does() {
        assert_eq!(repair_for(&[0xcc, 0x90]), Some(Repair::Breakpoint));
        assert_eq!(repair_for(&[0x9b]), Some(Repair::Skip));
        assert_eq!(repair_for(&[0x0f, 0x05]), None);
        assert_eq!(repair_for(&[]), None);
    }

    #[test]
    fn a_paused_vcpu_parks_until_resumed_and_stop_releases_it() {
        let control = Arc::new(Control::default());
        control.lock().pause = true;
        let c = control.clone();
        let parked = std::thread::spawn(move || c.checkpoint(0, &mut || Ok(Vec::new())));
        let deadline = Instant::now() + Duration::from_secs(5);
        while control.lock().paused != 1 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        control.end(VmExit::Shutdown);
        assert!(!parked.join().unwrap(), "a stopped VM's vCPU ends");
        assert_eq!(control.lock().exit, Some(VmExit::Shutdown));
    }

    #[test]
    fn a_parked_vcpu_saves_its_state_when_asked_and_runs_on_after_resume() {
        let control = Arc::new(Control::default());
        control.lock().pause = true;
        let c = control.clone();
        let parked = std::thread::spawn(move || {
            let mut saves = 0;
            let going_on = c.checkpoint(1, &mut || {
                saves += 1;
                Ok(vec![7, 7])
            });
            (going_on, saves)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while control.lock().paused != 1 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        // A snapshot asks both vCPUs; only slot 1 belongs to this thread.
        control.lock().save = Some(vec![None, None]);
        control.changed.notify_all();
        while control.lock().save.as_ref().unwrap()[1].is_none() {
            assert!(Instant::now() < deadline, "the parked vCPU never saved");
            std::thread::sleep(Duration::from_millis(1));
        }
        let slots = control.lock().save.take().unwrap();
        assert!(slots[0].is_none());
        assert_eq!(slots[1].as_ref().unwrap().as_ref().unwrap(), &vec![7, 7]);
        control.lock().pause = false;
        control.changed.notify_all();
        assert_eq!(
            parked.join().unwrap(),
            (true, 1),
            "saved once, then runs on"
        );
    }
}
