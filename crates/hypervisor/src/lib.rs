//! The hypervisor boundary: the only crate that calls a hypervisor API.
//!
//! A [`Hypervisor`] makes [`Vm`]s; a `Vm` maps guest memory, raises interrupt lines and makes
//! [`Vcpu`]s; a `Vcpu` runs until the guest needs the VMM and says why as a typed
//! [`VcpuExit`]. Backends: `kvm` (Linux, kvm-ioctls, in `sys/linux`) and [`hvf`] (Apple
//! Hypervisor.framework on aarch64 macOS, applevisor-sys); [`open`] picks this host's. The
//! VMM above is written against the traits only.
//!
//! Register state is described in plain, architecture-named structs ([`x86`], [`aarch64`]) so
//! a backend for one architecture type-checks on a host of the other, and so a snapshot can
//! store them without naming a backend's types.

pub mod aarch64;
#[cfg(feature = "hvf")]
pub mod hvf;
mod sys;
pub mod x86;

pub use sys::open;

use std::fmt;
use std::os::fd::RawFd;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{backend}: {what}: {source}")]
    Os {
        backend: &'static str,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{backend}: {what} failed with {code:#x}")]
    Code {
        backend: &'static str,
        what: &'static str,
        code: i64,
    },
    #[error("{backend} does not support {what}")]
    Unsupported {
        backend: &'static str,
        what: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One hypervisor on this host.
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// `kvm`, `hvf`.
    fn name(&self) -> &'static str;
    /// Creates a VM with no memory, devices or vCPUs yet. The order that follows is: map
    /// guest memory, then [`Vm::create_irqchip`], then create vCPUs.
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// The CPUID leaves this hypervisor can present to a guest (x86 only).
    fn supported_cpuid(&self) -> Result<Vec<x86::CpuidEntry>> {
        Err(Error::Unsupported {
            backend: self.name(),
            what: "CPUID",
        })
    }
}

/// A guest physical memory region backed by host memory.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: *mut u8,
    pub read_only: bool,
}

// SAFETY: a MemoryRegion is a description (addresses and sizes); whoever maps it through
// `Vm::map_memory` promises the host memory outlives the mapping.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above; the struct itself is never dereferenced here.
unsafe impl Sync for MemoryRegion {}

pub trait Vm: Send + Sync + fmt::Debug {
    /// Makes `region` guest-physical memory.
    ///
    /// # Safety
    /// `region.host_addr .. + size` must be a valid mapping that stays mapped for as long as
    /// the VM exists, and must not be aliased by Rust references the VMM writes through while
    /// the guest runs.
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()>;
    /// Creates the in-kernel interrupt controller (KVM: IOAPIC, PIC, LAPICs and PIT; HVF:
    /// GICv3), after guest memory is mapped and before any vCPU exists. Without one, `hlt`
    /// reaches the VMM as [`VcpuExit::Halt`]; tiny test guests use that.
    ///
    /// Memory first: once KVM has an irqchip, every memory-slot change waits for its
    /// interrupt-routing readers (measured 5-7 ms a slot on a nested host, against 0.3 ms
    /// without), which would dominate a snapshot restore.
    fn create_irqchip(&self) -> Result<()>;
    /// Sets an interrupt line (a GSI on x86, an SPI number on aarch64).
    fn set_irq_line(&self, line: u32, level: bool) -> Result<()>;
    /// Raises an edge on `line` whenever `eventfd` is written, without the VMM's threads.
    fn register_irqfd(&self, _eventfd: RawFd, _line: u32) -> Result<()> {
        Err(Error::Unsupported {
            backend: "this hypervisor",
            what: "irqfd",
        })
    }
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Interrupt controller and clock state for a snapshot (opaque bytes, backend-defined).
    fn save_platform(&self) -> Result<Vec<u8>> {
        Err(Error::Unsupported {
            backend: "this hypervisor",
            what: "platform state",
        })
    }
    fn restore_platform(&self, _state: &[u8]) -> Result<()> {
        Err(Error::Unsupported {
            backend: "this hypervisor",
            what: "platform state",
        })
    }
    /// The interrupt controllers' state in words, for a person chasing a stalled guest;
    /// empty where the backend does not say.
    fn describe_platform(&self) -> String {
        String::new()
    }
}

/// Why [`Vcpu::run`] returned. Data of an access is lent by the vCPU: a read is answered by
/// filling `data`, and the answer reaches the guest on the next `run`.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The guest executed `hlt` (x86) or `wfi` (aarch64) with nothing pending.
    Halt,
    /// Triple fault (x86) or PSCI system off/reset (aarch64): the guest wants to stop.
    Shutdown,
    /// `run` was interrupted by a [`Kick`]; nothing to do for the guest.
    Interrupted,
    /// The hypervisor could not run or emulate the guest's instruction.
    EmulationFailure {
        detail: String,
    },
    /// Anything else, described for the log.
    Other(String),
}

/// Interrupts a vCPU's `run` from another thread.
pub trait Kick: Send + Sync + fmt::Debug {
    fn kick(&self);
}

pub trait Vcpu: Send + fmt::Debug {
    fn id(&self) -> u32;
    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// A handle that makes `run` return [`VcpuExit::Interrupted`] soon. A backend may take
    /// over a signal for this in the thread that runs the vCPU (KVM: `SIGRTMIN`, unblocked
    /// there at the first `run`), so run vCPUs on threads of their own.
    fn kicker(&self) -> Arc<dyn Kick>;
    /// The `ioctl` requests the thread running this vCPU makes (running it, the state a
    /// snapshot saves, an instruction finished by the VMM, an interrupt line raised by a
    /// device's work), for that thread's system call filter; `None` where the backend does
    /// not say (any `ioctl` is then allowed).
    fn thread_ioctls(&self) -> Option<&'static [u64]> {
        None
    }
    /// Where the vCPU is and the interrupts it has in hand, in words, for a person chasing
    /// a stalled guest; called on the vCPU's thread between runs; empty where the backend
    /// does not say.
    fn describe(&self) -> String {
        String::new()
    }
    /// x86: general registers.
    fn x86_regs(&self) -> Result<x86::Regs> {
        Err(unsupported("x86 registers"))
    }
    fn set_x86_regs(&mut self, _regs: &x86::Regs) -> Result<()> {
        Err(unsupported("x86 registers"))
    }
    /// x86: segment, control and descriptor-table registers.
    fn x86_sregs(&self) -> Result<x86::Sregs> {
        Err(unsupported("x86 registers"))
    }
    fn set_x86_sregs(&mut self, _sregs: &x86::Sregs) -> Result<()> {
        Err(unsupported("x86 registers"))
    }
    fn set_x86_cpuid(&mut self, _entries: &[x86::CpuidEntry]) -> Result<()> {
        Err(unsupported("CPUID"))
    }
    fn set_x86_msrs(&mut self, _msrs: &[(u32, u64)]) -> Result<()> {
        Err(unsupported("MSRs"))
    }
    /// x86: sets up the local APIC's LINT0 as ExtINT and LINT1 as NMI, as firmware would.
    fn setup_x86_lapic(&mut self) -> Result<()> {
        Err(unsupported("local APIC"))
    }
    /// x86: the frequency of the guest's time-stamp counter, in kHz.
    fn x86_tsc_khz(&self) -> Result<u32> {
        Err(unsupported("TSC frequency"))
    }
    /// x86: queues exception `vector` for delivery on the next `run` (used to repair an
    /// instruction the hypervisor failed to emulate).
    fn inject_x86_exception(&mut self, _vector: u8) -> Result<()> {
        Err(unsupported("exception injection"))
    }
    /// Guest virtual → guest physical, with the vCPU's current page tables.
    fn translate(&self, _gva: u64) -> Result<u64> {
        Err(unsupported("address translation"))
    }
    /// aarch64: general registers, PC and PSTATE.
    fn aarch64_regs(&self) -> Result<aarch64::Regs> {
        Err(unsupported("aarch64 registers"))
    }
    fn set_aarch64_regs(&mut self, _regs: &aarch64::Regs) -> Result<()> {
        Err(unsupported("aarch64 registers"))
    }
    /// Everything a snapshot needs to resume this vCPU (opaque bytes, backend-defined). Call
    /// it on the thread that runs the vCPU, between two runs: it may have to finish the last
    /// exit's access first.
    fn save_state(&mut self) -> Result<Vec<u8>> {
        Err(unsupported("vCPU state"))
    }
    /// Puts back what [`Vcpu::save_state`] gave, after the vCPU's CPUID is set.
    fn restore_state(&mut self, _state: &[u8]) -> Result<()> {
        Err(unsupported("vCPU state"))
    }
}

fn unsupported(what: &'static str) -> Error {
    Error::Unsupported {
        backend: "this hypervisor",
        what,
    }
}
