//! The builtin VMM: a microVM inside the calling process.
//!
//! This crate owns a VM's life on a [`hypervisor::Hypervisor`]: guest RAM in a memfd
//! ([`memory`]), the kernel, initramfs and boot data (`loader`), the devices on two
//! [`bus::Bus`]es and the vCPUs (`builder`, shared by boot and [`snapshot`] restore), one
//! thread per vCPU serving port I/O and MMIO exits (`vcpu`, with the `profiler` and the
//! [`repair`] of instructions the hypervisor cannot emulate), and snapshots. The VM ends
//! when the guest powers off, resets or faults.
//!
//! x86_64 on KVM is what runs today; the hypervisor boundary already has an HVF backend for
//! aarch64 macOS, whose boot path (device tree, PSCI) is the remaining piece on that side.

pub mod aarch64;
mod builder;
pub mod bus;
mod loader;
pub mod memory;
mod profiler;
pub mod repair;
pub mod snapshot;
mod vcpu;
pub mod x86_64;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::balloon::{self, BalloonControl, BalloonState};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::FsBackend;
use devices::GuestMemory;
use hypervisor::Hypervisor;

pub use repair::{repair_for, Repair};

/// A VM in words (see [`Vmm::describe`]).
#[derive(Clone, Debug, Default)]
pub struct Description {
    /// Each vCPU, the interrupt controller and each device, a line each.
    pub text: String,
    /// Set when a vCPU shows what neither a guest nor a working hypervisor does (state that
    /// cannot be the guest's, a run call that kicks do not end): the hypervisor under the
    /// VMM (nested virtualisation, typically) failed, and no change of the guest's can help.
    pub hypervisor_fault: Option<String>,
}

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
    #[error("snapshot: restoring {device}: {source}")]
    DeviceState {
        device: String,
        source: devices::PersistError,
    },
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
    /// The device end of the shared filesystem's message channel (port `fs.0`).
    pub fs_channel: Option<UnixStream>,
    /// What serves the virtio-fs device's requests; without it each is answered ENODEV.
    pub fs: Option<Arc<dyn FsBackend>>,
    /// Where the serial console goes.
    pub console_log: PathBuf,
    /// CPUID features to hide from the guest (by /proc/cpuinfo name).
    pub hide_cpuid: Vec<String>,
    pub diagnostics: Diagnostics,
}

impl std::fmt::Debug for VmmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmConfig")
            .field("vcpus", &self.vcpus)
            .field("memory_mib", &self.memory_mib)
            .field("kernel", &self.kernel)
            .field("initramfs", &self.initramfs)
            .field("cmdline", &self.cmdline)
            .field("disks", &self.disks)
            .field("nics", &self.nics)
            .field("agent_channel", &self.agent_channel)
            .field("fs_channel", &self.fs_channel)
            .field("fs", &self.fs.as_ref().map(|_| "FsBackend"))
            .field("console_log", &self.console_log)
            .field("hide_cpuid", &self.hide_cpuid)
            .field("diagnostics", &self.diagnostics)
            .finish()
    }
}

/// Ways to watch a slow or stalling guest; all off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics {
    /// Log one vCPU exit in a thousand and where each kick found a vCPU (at debug level).
    pub trace: bool,
    /// Sample each vCPU every millisecond and write the counts to `<path>.<pid>.vcpu<id>`
    /// when it ends (see the `profiler` module).
    pub profile: Option<PathBuf>,
    /// Keep the pages the guest gives back (free page reporting, balloon inflation) instead
    /// of discarding them: only to measure what giving them back is worth.
    pub keep_freed_memory: bool,
    /// Only for tests: vCPU 0 forks once its system call filter is on, which the filter
    /// answers by killing the process.
    pub forbidden_call_for_tests: bool,
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

/// The error for `faults` (a line per vCPU) that the hypervisor under the VMM, not the
/// guest, caused; its first words are what callers (the typical host's suites) look for.
pub(crate) fn hypervisor_fault(faults: &[String]) -> String {
    format!(
        "the hypervisor under this VMM failed the guest ({})",
        faults.join("; ")
    )
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off or reset (`reboot=t`: a triple fault), or the VMM stopped it.
    Shutdown,
    /// Something the VMM could not serve; the VM cannot go on.
    Failed(String),
}

/// A running VM.
#[derive(Debug)]
pub struct Vmm {
    vm: Arc<dyn hypervisor::Vm>,
    ram: memory::GuestRam,
    serial: Arc<Mutex<builder::ConsoleSerial>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    balloon: BalloonControl,
    vcpus: vcpu::Vcpus,
    console_log: PathBuf,
    vcpu_count: u32,
    /// When boot started, for the phase timings.
    pub started: Instant,
}

/// The least memory a balloon target leaves the guest (the smallest VM the VMM builds).
pub const MIN_MEMORY_TARGET: u64 = 32 << 20;

/// How long [`Vmm::pause`] waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Vmm {
    pub fn boot(hv: &dyn Hypervisor, mut config: VmmConfig) -> Result<Vmm, Error> {
        let started = Instant::now();
        config.check_shape()?;
        let ram = memory::GuestRam::new(&x86_64::ram_ranges(u64::from(config.memory_mib) << 20))?;
        let vm = builder::create_vm(hv, &ram)?;
        let devices = builder::build_devices(&vm, &ram.mem, &mut config)?;
        let cmdline = format!("{}{}", config.cmdline, devices.cmdline);
        let entry = loader::load(&ram.mem, &ram.ranges, &config, &cmdline)?;
        let vcpus = builder::create_vcpus(hv, &vm, &config, |id, vcpu| {
            vcpu.set_x86_msrs(&loader::boot_msrs())?;
            vcpu.setup_x86_lapic()?;
            if id == 0 {
                vcpu.set_x86_sregs(&entry.sregs)?;
                vcpu.set_x86_regs(&entry.regs)?;
            }
            Ok(())
        })?;
        log::debug!(
            "builtin VMM: {} vCPUs, {} MiB, set up in {:?}",
            config.vcpus,
            config.memory_mib,
            started.elapsed()
        );
        builder::start(vm, ram, devices, vcpus, config, started)
    }

    /// Stops every vCPU between two guest instructions; returns when all are parked.
    pub fn pause(&self) {
        self.vcpus.pause(self.vcpu_count, PAUSE_TIMEOUT);
    }

    pub fn resume(&self) {
        self.vcpus.control.resume();
    }

    /// Ends the VM (if it has not ended) and joins its vCPU threads.
    pub fn stop(&mut self) {
        self.vcpus.stop();
    }

    /// Why the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.vcpus.control.exit()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let ended = |state: &vcpu::RunState| matches!(state, vcpu::RunState::Ended(_));
        drop(
            self.vcpus
                .control
                .wait_until(Instant::now() + timeout, ended),
        );
        self.exit()
    }

    /// Asks the guest to keep its memory use within `bytes` of the VM's RAM (at most its
    /// boot size, at least [`MIN_MEMORY_TARGET`]): the balloon takes the rest, and the pages
    /// the guest hands over go back to the host. Returns at once; the guest's driver inflates
    /// or deflates on its own time ([`Vmm::balloon`] says how far it got).
    pub fn set_memory_target(&self, bytes: u64) -> Result<(), Error> {
        let ram: u64 = self.ram.ranges.iter().map(|r| r.1).sum();
        if bytes > ram || bytes < MIN_MEMORY_TARGET {
            return Err(Error::Config(format!(
                "a memory target of {bytes} bytes is outside this VM's {} MiB to {} MiB",
                MIN_MEMORY_TARGET >> 20,
                ram >> 20
            )));
        }
        let pages = (ram - bytes).div_ceil(balloon::PAGE_SIZE);
        let pages = u32::try_from(pages)
            .map_err(|_| Error::Config(format!("{pages} balloon pages do not fit virtio's u32")))?;
        self.balloon.set_target_pages(pages);
        Ok(())
    }

    /// The balloon's target and the guest's answer, in pages of [`balloon::PAGE_SIZE`], and
    /// the bytes given back to the host so far.
    pub fn balloon(&self) -> (BalloonState, u64) {
        (self.balloon.state(), self.balloon.discarded_bytes())
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.ram.mem
    }

    /// The VM in words, for a person chasing a guest that stopped answering: each vCPU
    /// (where it is, the interrupts it has in hand), the interrupt controller, and each
    /// virtio device (its queues' positions as the device and the driver have them, its
    /// interrupt status, what it holds for the guest).
    pub fn describe(&self) -> Description {
        let mut out = Vec::new();
        let mut faults = Vec::new();
        let vcpus = self
            .vcpus
            .describe(self.vcpu_count, Duration::from_millis(500));
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            out.push(format!("vCPU {id}: {}", vcpu.text));
            if let Some(why) = vcpu.fault {
                faults.push(format!("vCPU {id}: {why}"));
            }
        }
        out.push(self.vm.describe_platform());
        for (index, transport) in self.virtio.iter().enumerate() {
            // A device held by a thread that is stuck must not hold this up too.
            let described = match transport.try_lock() {
                Ok(transport) => transport.describe(),
                Err(_) => "busy (locked)".into(),
            };
            out.push(format!("virtio {index} {described}"));
        }
        Description {
            text: out.join("\n"),
            hypervisor_fault: (!faults.is_empty()).then(|| hypervisor_fault(&faults)),
        }
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
