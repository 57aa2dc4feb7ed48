//! Apple Hypervisor.framework (aarch64 macOS) through applevisor-sys.
//!
//! Hypervisor.framework allows one VM per process and binds each vCPU to the thread that
//! created it, so an [`HvfVcpu`] is created lazily by its first `run` on its own thread.
//! Interrupts go through the framework's in-kernel GICv3 (`hv_gic_*`, macOS 15); the EL1
//! virtual timer is the GIC's PPI 27. MMIO reaches the VMM as data aborts, decoded here from
//! the exception syndrome; PSCI calls (HVC/SMC) for power-off and reset become
//! [`VcpuExit::Shutdown`].
//!
//! This backend type-checks on every host (CI runs `cargo check -p hypervisor --features
//! hvf`); it has not been run here, since this project's CI has no Apple hardware.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use applevisor_sys as hv;

use crate::{aarch64, Error, Hypervisor, Kick, MemoryRegion, Result, Vcpu, VcpuExit, Vm};

const BACKEND: &str = "hvf";

fn check(what: &'static str, ret: hv::hv_return_t) -> Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(Error::Code {
            backend: BACKEND,
            what,
            code: i64::from(ret),
        })
    }
}

/// Guest-physical layout of the GIC the VMM's device tree must describe.
pub const GIC_DISTRIBUTOR_BASE: u64 = 0x0800_0000;
pub const GIC_REDISTRIBUTOR_BASE: u64 = 0x080a_0000;
/// The EL1 virtual timer's interrupt (a PPI).
pub const VTIMER_INTID: u32 = 27;

// Exception classes (ESR_EL2.EC) the run loop handles.
const EC_WFX: u64 = 0x01;
const EC_HVC64: u64 = 0x16;
const EC_SMC64: u64 = 0x17;
const EC_DATA_ABORT_LOWER: u64 = 0x24;

// PSCI 0.2+ function ids (SMC32/SMC64 calling convention).
const PSCI_VERSION: u64 = 0x8400_0000;
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
const PSCI_SYSTEM_RESET: u64 = 0x8400_0009;
const PSCI_FEATURES: u64 = 0x8400_000a;
const PSCI_NOT_SUPPORTED: u64 = (-1i64) as u64;

#[derive(Debug)]
pub struct Hvf;

impl Hvf {
    pub fn open() -> Result<Hvf> {
        Ok(Hvf)
    }
}

impl Hypervisor for Hvf {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        // SAFETY: a null configuration asks for the default VM; one per process.
        check("create VM", unsafe {
            hv::hv_vm_create(std::ptr::null_mut())
        })?;
        Ok(Box::new(HvfVm))
    }
}

#[derive(Debug)]
struct HvfVm;

impl Drop for HvfVm {
    fn drop(&mut self) {
        // SAFETY: destroys this process's VM; its vCPUs were destroyed by their threads.
        unsafe { hv::hv_vm_destroy() };
    }
}

impl Vm for HvfVm {
    fn create_irqchip(&self) -> Result<()> {
        // SAFETY: creates a configuration object the framework owns until os_release.
        let config = unsafe { hv::hv_gic_config_create() };
        // SAFETY: `config` is the live object created above; the bases are aligned guest
        // addresses outside RAM.
        unsafe {
            check(
                "GIC distributor base",
                hv::hv_gic_config_set_distributor_base(config, GIC_DISTRIBUTOR_BASE),
            )?;
            check(
                "GIC redistributor base",
                hv::hv_gic_config_set_redistributor_base(config, GIC_REDISTRIBUTOR_BASE),
            )?;
            let created = hv::hv_gic_create(config);
            hv::os_release(config);
            check("create GIC", created)
        }
    }

    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()> {
        let mut flags = hv::HV_MEMORY_READ | hv::HV_MEMORY_EXEC;
        if !region.read_only {
            flags |= hv::HV_MEMORY_WRITE;
        }
        // SAFETY: the caller promises the host range stays mapped for the VM's life.
        check("map guest memory", unsafe {
            hv::hv_vm_map(
                region.host_addr as *const c_void,
                region.guest_addr,
                region.size as usize,
                flags,
            )
        })
    }

    fn set_irq_line(&self, line: u32, level: bool) -> Result<()> {
        // SAFETY: the GIC exists (created with the VM); an invalid intid is an error return.
        check("set SPI", unsafe { hv::hv_gic_set_spi(line, level) })
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(HvfVcpu {
            id,
            vcpu: None,
            exit: std::ptr::null(),
            handle: Arc::new(HvfKick {
                vcpu: AtomicU64::new(u64::MAX),
            }),
            initial: None,
            pending_read: None,
            buf: [0; 8],
        }))
    }
}

#[derive(Debug)]
struct HvfKick {
    /// The hv_vcpu_t once created (u64::MAX before).
    vcpu: AtomicU64,
}

impl Kick for HvfKick {
    fn kick(&self) {
        let vcpu = self.vcpu.load(Ordering::Acquire);
        if vcpu != u64::MAX {
            // SAFETY: hv_vcpus_exit may be called from any thread on a live vCPU.
            unsafe { hv::hv_vcpus_exit(&vcpu, 1) };
        }
    }
}

/// An MMIO load waiting for the VMM's answer: destination register and access size.
#[derive(Debug, Clone, Copy)]
struct PendingRead {
    register: u32,
    len: usize,
}

#[derive(Debug)]
pub struct HvfVcpu {
    id: u32,
    vcpu: Option<hv::hv_vcpu_t>,
    exit: *const hv::hv_vcpu_exit_t,
    handle: Arc<HvfKick>,
    /// Registers set before the vCPU exists (it is created on its run thread).
    initial: Option<aarch64::Regs>,
    pending_read: Option<PendingRead>,
    buf: [u8; 8],
}

// SAFETY: the vCPU handle and exit pointer are only used by the thread that runs the vCPU
// (it is created on the first `run`); before that the struct holds plain data.
unsafe impl Send for HvfVcpu {}

impl HvfVcpu {
    fn handle(&self) -> Result<hv::hv_vcpu_t> {
        self.vcpu.ok_or(Error::Invalid(
            "hvf vCPU registers are reachable only from its run thread, after its first run".into(),
        ))
    }

    fn get(&self, reg: hv::hv_reg_t) -> Result<u64> {
        let mut value = 0;
        // SAFETY: a live vCPU of this thread; `value` is a valid out pointer.
        check("get register", unsafe {
            hv::hv_vcpu_get_reg(self.handle()?, reg, &mut value)
        })?;
        Ok(value)
    }

    fn set(&self, reg: hv::hv_reg_t, value: u64) -> Result<()> {
        // SAFETY: a live vCPU of this thread.
        check("set register", unsafe {
            hv::hv_vcpu_set_reg(self.handle()?, reg, value)
        })
    }

    fn x(&self, n: u32) -> Result<u64> {
        if n == 31 {
            return Ok(0); // xzr
        }
        self.get(x_reg(n))
    }

    fn set_x(&self, n: u32, value: u64) -> Result<()> {
        if n == 31 {
            return Ok(());
        }
        self.set(x_reg(n), value)
    }

    fn skip_instruction(&self) -> Result<()> {
        let pc = self.get(hv::hv_reg_t::PC)?;
        self.set(hv::hv_reg_t::PC, pc + 4)
    }

    fn create_on_this_thread(&mut self) -> Result<()> {
        let mut vcpu = 0;
        let mut exit = std::ptr::null();
        // SAFETY: out pointers are valid; a null config asks for the default vCPU.
        check("create vCPU", unsafe {
            hv::hv_vcpu_create(&mut vcpu, &mut exit, std::ptr::null_mut())
        })?;
        self.vcpu = Some(vcpu);
        self.exit = exit;
        self.handle.vcpu.store(vcpu, Ordering::Release);
        if let Some(regs) = self.initial.take() {
            self.write_regs(&regs)?;
        }
        Ok(())
    }

    fn write_regs(&self, regs: &aarch64::Regs) -> Result<()> {
        for (n, value) in regs.x.iter().enumerate() {
            self.set(x_reg(n as u32), *value)?;
        }
        self.set(hv::hv_reg_t::PC, regs.pc)?;
        self.set(hv::hv_reg_t::CPSR, regs.pstate)?;
        // SAFETY: a live vCPU of this thread.
        check("set SP_EL1", unsafe {
            hv::hv_vcpu_set_sys_reg(self.handle()?, hv::hv_sys_reg_t::SP_EL1, regs.sp_el1)
        })
    }

    /// Answers a PSCI call in x0; `None` when the guest asked to power off or reset.
    fn psci(&self) -> Result<Option<()>> {
        let function = self.get(hv::hv_reg_t::X0)?;
        let answer = match function {
            PSCI_SYSTEM_OFF | PSCI_SYSTEM_RESET => return Ok(None),
            PSCI_VERSION => 0x0001_0000, // 1.0
            PSCI_FEATURES => PSCI_NOT_SUPPORTED,
            _ => PSCI_NOT_SUPPORTED,
        };
        self.set(hv::hv_reg_t::X0, answer)?;
        Ok(Some(()))
    }
}

fn x_reg(n: u32) -> hv::hv_reg_t {
    const X: [hv::hv_reg_t; 31] = {
        use hv::hv_reg_t::*;
        [
            X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15, X16, X17, X18,
            X19, X20, X21, X22, X23, X24, X25, X26, X27, X28, X29, X30,
        ]
    };
    X[n as usize]
}

impl Vcpu for HvfVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if self.vcpu.is_none() {
            self.create_on_this_thread()?;
        }
        if let Some(read) = self.pending_read.take() {
            let mut bytes = [0u8; 8];
            bytes[..read.len].copy_from_slice(&self.buf[..read.len]);
            self.set_x(read.register, u64::from_le_bytes(bytes))?;
        }
        loop {
            // SAFETY: a live vCPU created by this thread.
            check("run vCPU", unsafe { hv::hv_vcpu_run(self.handle()?) })?;
            // SAFETY: the framework keeps `exit` valid for the vCPU's life and fills it on
            // each return from hv_vcpu_run.
            let exit = unsafe { *self.exit };
            match exit.reason {
                hv::hv_exit_reason_t::CANCELED => return Ok(VcpuExit::Interrupted),
                hv::hv_exit_reason_t::VTIMER_ACTIVATED => {
                    // The GIC raises the timer's PPI; unmask so the next expiry exits again.
                    // SAFETY: a live vCPU of this thread.
                    check("unmask vtimer", unsafe {
                        hv::hv_vcpu_set_vtimer_mask(self.handle()?, false)
                    })?;
                    continue;
                }
                hv::hv_exit_reason_t::UNKNOWN => {
                    return Ok(VcpuExit::Other("hvf: unknown exit".into()))
                }
                hv::hv_exit_reason_t::EXCEPTION => {}
            }
            let syndrome = exit.exception.syndrome;
            match syndrome >> 26 {
                EC_WFX => {
                    self.skip_instruction()?;
                    return Ok(VcpuExit::Halt);
                }
                EC_HVC64 | EC_SMC64 => {
                    if syndrome >> 26 == EC_SMC64 {
                        self.skip_instruction()?; // HVC's return address is already past it
                    }
                    match self.psci()? {
                        Some(()) => continue,
                        None => return Ok(VcpuExit::Shutdown),
                    }
                }
                EC_DATA_ABORT_LOWER => {
                    let access = DataAbort::decode(syndrome).ok_or_else(|| {
                        Error::Invalid(format!(
                            "data abort without a valid syndrome at {:#x}",
                            exit.exception.physical_address
                        ))
                    })?;
                    self.skip_instruction()?;
                    let addr = exit.exception.physical_address;
                    if access.write {
                        let value = self.x(access.register)?;
                        self.buf = value.to_le_bytes();
                        return Ok(VcpuExit::MmioWrite {
                            addr,
                            data: &self.buf[..access.len],
                        });
                    }
                    self.pending_read = Some(PendingRead {
                        register: access.register,
                        len: access.len,
                    });
                    self.buf = [0; 8];
                    return Ok(VcpuExit::MmioRead {
                        addr,
                        data: &mut self.buf[..access.len],
                    });
                }
                ec => {
                    return Ok(VcpuExit::Other(format!(
                        "hvf: exception class {ec:#x}, syndrome {syndrome:#x}"
                    )))
                }
            }
        }
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.handle.clone()
    }

    fn aarch64_regs(&self) -> Result<aarch64::Regs> {
        let mut regs = aarch64::Regs::default();
        for n in 0..31 {
            regs.x[n as usize] = self.get(x_reg(n))?;
        }
        regs.pc = self.get(hv::hv_reg_t::PC)?;
        regs.pstate = self.get(hv::hv_reg_t::CPSR)?;
        let mut sp = 0;
        // SAFETY: a live vCPU of this thread; `sp` is a valid out pointer.
        check("get SP_EL1", unsafe {
            hv::hv_vcpu_get_sys_reg(self.handle()?, hv::hv_sys_reg_t::SP_EL1, &mut sp)
        })?;
        regs.sp_el1 = sp;
        Ok(regs)
    }

    fn set_aarch64_regs(&mut self, regs: &aarch64::Regs) -> Result<()> {
        if self.vcpu.is_none() {
            self.initial = Some(*regs);
            return Ok(());
        }
        self.write_regs(regs)
    }
}

impl Drop for HvfVcpu {
    fn drop(&mut self) {
        if let Some(vcpu) = self.vcpu {
            // SAFETY: destroys the vCPU this struct created (on the thread that drops it,
            // which is its run thread: the VMM drops a vCPU where it ran).
            unsafe { hv::hv_vcpu_destroy(vcpu) };
        }
    }
}

/// The fields of a data abort's syndrome (ESR_EL2 ISS) the VMM needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataAbort {
    pub write: bool,
    pub len: usize,
    pub register: u32,
}

impl DataAbort {
    /// `None` when the syndrome does not describe the access (ISV clear).
    pub fn decode(syndrome: u64) -> Option<DataAbort> {
        let iss_valid = syndrome & (1 << 24) != 0;
        if !iss_valid {
            return None;
        }
        Some(DataAbort {
            write: syndrome & (1 << 6) != 0,
            len: 1 << ((syndrome >> 22) & 0b11),
            register: ((syndrome >> 16) & 0b1_1111) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_data_abort_syndrome() {
        // str w3, [x1]: EC 0x24, IL, ISV, SAS=2 (4 bytes), SRT=3, WnR.
        let esr = (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6);
        assert_eq!(
            DataAbort::decode(esr),
            Some(DataAbort {
                write: true,
                len: 4,
                register: 3
            })
        );
        // ldrb w0: SAS=0, read.
        let esr = (0x24 << 26) | (1 << 24);
        assert_eq!(
            DataAbort::decode(esr),
            Some(DataAbort {
                write: false,
                len: 1,
                register: 0
            })
        );
        assert_eq!(DataAbort::decode(0x24 << 26), None);
    }
}
