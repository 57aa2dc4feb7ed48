//! Linux KVM through kvm-ioctls.

use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_segment, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm as KvmSys, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{x86, Error, Hypervisor, Kick, MemoryRegion, Result, Vcpu, VcpuExit, Vm};

mod state;

const BACKEND: &str = "kvm";

fn os(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Os {
        backend: BACKEND,
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Where KVM keeps the TSS and identity map it needs for real-mode emulation on Intel: the
/// page range just below the 4 GiB MMIO hole, outside guest RAM.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does nothing).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Copies the general registers between KVM's `kvm_regs` and [`x86::Regs`] (same field names).
macro_rules! general_registers {
    ($from:expr, $to:path) => {{
        let r = $from;
        $to {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }};
}

#[derive(Debug)]
pub struct Kvm {
    kvm: KvmSys,
}

impl Kvm {
    pub fn open() -> Result<Kvm> {
        let kvm = KvmSys::new().map_err(os("open /dev/kvm"))?;
        install_kick_handler();
        Ok(Kvm { kvm })
    }
}

/// Unblocks the kick signal in the calling thread.
fn unblock_kick_signal() {
    // SAFETY: a zeroed sigset_t initialised by sigemptyset, changed by sigaddset, and passed
    // to pthread_sigmask for the calling thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn install_kick_handler() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing for a real-time signal no other part of the
    // process uses; SA_RESTART is not set so KVM_RUN returns EINTR.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
    }
}

impl Hypervisor for Kvm {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let vm = self.kvm.create_vm().map_err(os("create VM"))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(os("set TSS address"))?;
        // The MSRs a snapshot carries: KVM's list of those it saves and restores.
        let msrs = self
            .kvm
            .get_msr_index_list()
            .map_err(os("get MSR index list"))?;
        Ok(Box::new(KvmVm {
            vm,
            msrs: Arc::new(msrs.as_slice().to_vec()),
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<x86::CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(os("get supported CPUID"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| x86::CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

#[derive(Debug)]
struct KvmVm {
    vm: VmFd,
    msrs: Arc<Vec<u32>>,
}

impl Vm for KvmVm {
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()> {
        let mem = kvm_userspace_memory_region {
            slot: region.slot,
            flags: if region.read_only {
                KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: region.guest_addr,
            memory_size: region.size,
            userspace_addr: region.host_addr as u64,
        };
        // SAFETY: the caller promises the host range stays mapped for the VM's life.
        unsafe { self.vm.set_user_memory_region(mem) }.map_err(os("map guest memory"))
    }

    fn create_irqchip(&self) -> Result<()> {
        self.vm.create_irq_chip().map_err(os("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm.create_pit2(pit).map_err(os("create PIT"))
    }

    fn set_irq_line(&self, line: u32, level: bool) -> Result<()> {
        self.vm
            .set_irq_line(line, level)
            .map_err(os("set irq line"))
    }

    fn register_irqfd(&self, eventfd: RawFd, line: u32) -> Result<()> {
        // KVM takes its own reference to the file; ours is only borrowed for the call.
        // SAFETY: `eventfd` is an open eventfd owned by the caller; ManuallyDrop keeps this
        // wrapper from closing it.
        let fd = std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(eventfd) });
        self.vm
            .register_irqfd(&fd, line)
            .map_err(os("register irqfd"))
    }

    fn save_platform(&self) -> Result<Vec<u8>> {
        state::save_platform(&self.vm)
    }

    fn describe_platform(&self) -> String {
        state::describe_platform(&self.vm)
    }

    fn restore_platform(&self, state: &[u8]) -> Result<()> {
        state::restore_platform(&self.vm, state)
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self.vm.create_vcpu(id.into()).map_err(os("create vCPU"))?;
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            msrs: self.msrs.clone(),
            thread: Arc::new(KvmKick {
                thread: AtomicU64::new(0),
            }),
        }))
    }
}

#[derive(Debug)]
struct KvmKick {
    /// pthread_t of the thread running the vCPU, 0 before its first run.
    thread: AtomicU64,
}

impl Kick for KvmKick {
    fn kick(&self) {
        let thread = self.thread.load(Ordering::Acquire);
        if thread != 0 {
            // SAFETY: `thread` is the pthread_t of a live vCPU thread (the VMM joins vCPU
            // threads before dropping their kickers' owner); the signal's handler is a no-op.
            unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        }
    }
}

#[derive(Debug)]
struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// The MSRs to save (KVM_GET_MSR_INDEX_LIST).
    msrs: Arc<Vec<u32>>,
    thread: Arc<KvmKick>,
}

/// `_IO`, `_IOR`, `_IOW` and `_IOWR` of KVM's ioctl type (0xAE), as the kernel encodes them.
const fn kvm_ioctl(direction: u64, nr: u64, size: usize) -> u64 {
    (direction << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

/// What a vCPU's thread asks of KVM (see [`Vcpu::thread_ioctls`]); its setup and restore
/// happen on the thread that creates it.
#[cfg(target_arch = "x86_64")]
const VCPU_THREAD_IOCTLS: &[u64] = {
    use kvm_bindings::{
        kvm_debugregs, kvm_irq_level, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
        kvm_translation, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use std::mem::size_of;
    &[
        kvm_ioctl(NONE, 0x80, 0),                                    // KVM_RUN
        kvm_ioctl(READ, 0x81, size_of::<kvm_regs>()),                // KVM_GET_REGS
        kvm_ioctl(WRITE, 0x82, size_of::<kvm_regs>()),               // KVM_SET_REGS
        kvm_ioctl(READ, 0x83, size_of::<kvm_sregs>()),               // KVM_GET_SREGS
        kvm_ioctl(READ | WRITE, 0x85, size_of::<kvm_translation>()), // KVM_TRANSLATE
        kvm_ioctl(READ | WRITE, 0x88, size_of::<kvm_msrs>()),        // KVM_GET_MSRS
        kvm_ioctl(READ, 0x8e, size_of::<kvm_lapic_state>()),         // KVM_GET_LAPIC
        kvm_ioctl(READ, 0x98, size_of::<kvm_mp_state>()),            // KVM_GET_MP_STATE
        kvm_ioctl(READ, 0x9f, size_of::<kvm_vcpu_events>()),         // KVM_GET_VCPU_EVENTS
        kvm_ioctl(WRITE, 0xa0, size_of::<kvm_vcpu_events>()),        // KVM_SET_VCPU_EVENTS
        kvm_ioctl(READ, 0xa1, size_of::<kvm_debugregs>()),           // KVM_GET_DEBUGREGS
        kvm_ioctl(NONE, 0xa3, 0),                                    // KVM_GET_TSC_KHZ
        kvm_ioctl(READ, 0xa4, size_of::<kvm_xsave>()),               // KVM_GET_XSAVE
        kvm_ioctl(READ, 0xa6, size_of::<kvm_xcrs>()),                // KVM_GET_XCRS
        kvm_ioctl(WRITE, 0x61, size_of::<kvm_irq_level>()),          // KVM_IRQ_LINE
    ]
};

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    #[cfg(target_arch = "x86_64")]
    fn thread_ioctls(&self) -> Option<&'static [u64]> {
        Some(VCPU_THREAD_IOCTLS)
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if self.thread.thread.load(Ordering::Relaxed) == 0 {
            // The thread that runs a vCPU takes its kicks: a caller that blocks signals for
            // its own reasons (a monitor forwarding them to a container) must not block this
            // one here, or a kick would wait for the guest's next exit to be seen.
            unblock_kick_signal();
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            self.thread.thread.store(me as u64, Ordering::Release);
        }
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(os("run vCPU")(e)),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
            KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
            KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            KvmExit::Hlt => VcpuExit::Halt,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    VcpuExit::Shutdown
                }
                other => VcpuExit::Other(format!("system event {other}")),
            },
            KvmExit::InternalError => VcpuExit::EmulationFailure {
                detail: "KVM internal error (emulation failure)".into(),
            },
            KvmExit::FailEntry(reason, cpu) => {
                VcpuExit::Other(format!("entry failed: reason {reason:#x} on cpu {cpu}"))
            }
            other => VcpuExit::Other(format!("{other:?}")),
        })
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.thread.clone()
    }

    fn x86_regs(&self) -> Result<x86::Regs> {
        let r = self.fd.get_regs().map_err(os("get registers"))?;
        Ok(general_registers!(r, x86::Regs))
    }

    fn set_x86_regs(&mut self, r: &x86::Regs) -> Result<()> {
        let regs = general_registers!(r, kvm_bindings::kvm_regs);
        self.fd.set_regs(&regs).map_err(os("set registers"))
    }

    fn x86_sregs(&self) -> Result<x86::Sregs> {
        let s = self.fd.get_sregs().map_err(os("get special registers"))?;
        Ok(x86::Sregs {
            cs: from_kvm_segment(&s.cs),
            ds: from_kvm_segment(&s.ds),
            es: from_kvm_segment(&s.es),
            fs: from_kvm_segment(&s.fs),
            gs: from_kvm_segment(&s.gs),
            ss: from_kvm_segment(&s.ss),
            tr: from_kvm_segment(&s.tr),
            ldt: from_kvm_segment(&s.ldt),
            gdt: x86::DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: x86::DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_x86_sregs(&mut self, s: &x86::Sregs) -> Result<()> {
        // Start from KVM's own (for the interrupt bitmap), then overwrite what we describe.
        let mut sregs = self.fd.get_sregs().map_err(os("get special registers"))?;
        sregs.cs = to_kvm_segment(&s.cs);
        sregs.ds = to_kvm_segment(&s.ds);
        sregs.es = to_kvm_segment(&s.es);
        sregs.fs = to_kvm_segment(&s.fs);
        sregs.gs = to_kvm_segment(&s.gs);
        sregs.ss = to_kvm_segment(&s.ss);
        sregs.tr = to_kvm_segment(&s.tr);
        sregs.ldt = to_kvm_segment(&s.ldt);
        sregs.gdt.base = s.gdt.base;
        sregs.gdt.limit = s.gdt.limit;
        sregs.idt.base = s.idt.base;
        sregs.idt.limit = s.idt.limit;
        sregs.cr0 = s.cr0;
        sregs.cr2 = s.cr2;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.cr8 = s.cr8;
        sregs.efer = s.efer;
        if s.apic_base != 0 {
            sregs.apic_base = s.apic_base;
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(os("set special registers"))
    }

    fn set_x86_cpuid(&mut self, entries: &[x86::CpuidEntry]) -> Result<()> {
        let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| Error::Invalid(format!("CPUID table: {e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(os("set CPUID"))
    }

    fn set_x86_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()> {
        state::write_msrs(&self.fd, msrs)
    }

    fn setup_x86_lapic(&mut self) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_EXTINT: u32 = 0b111;
        const DELIVERY_NMI: u32 = 0b100;
        let mut lapic = self.fd.get_lapic().map_err(os("get local APIC"))?;
        let set_delivery = |regs: &mut [std::os::raw::c_char; 1024], at: usize, mode: u32| {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = regs[at + i] as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                regs[at + i] = *b as std::os::raw::c_char;
            }
        };
        set_delivery(&mut lapic.regs, APIC_LVT0, DELIVERY_EXTINT);
        set_delivery(&mut lapic.regs, APIC_LVT1, DELIVERY_NMI);
        self.fd.set_lapic(&lapic).map_err(os("set local APIC"))
    }

    fn x86_tsc_khz(&self) -> Result<u32> {
        self.fd.get_tsc_khz().map_err(os("get TSC frequency"))
    }

    fn inject_x86_exception(&mut self, vector: u8) -> Result<()> {
        let mut events = self.fd.get_vcpu_events().map_err(os("get vCPU events"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(os("set vCPU events"))
    }

    fn translate(&self, gva: u64) -> Result<u64> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(os("translate address"))?;
        if t.valid == 0 {
            return Err(Error::Invalid(format!(
                "guest address {gva:#x} is not mapped"
            )));
        }
        Ok(t.physical_address)
    }

    fn save_state(&mut self) -> Result<Vec<u8>> {
        state::save_vcpu(&mut self.fd, &self.msrs)
    }

    fn describe(&self) -> String {
        state::describe_vcpu(&self.fd)
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        state::restore_vcpu(&self.fd, bytes)
    }
}

fn from_kvm_segment(s: &kvm_segment) -> x86::Segment {
    x86::Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        unusable: s.unusable != 0,
    }
}

fn to_kvm_segment(s: &x86::Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: 0,
        unusable: s.unusable.into(),
        padding: 0,
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod ioctl_tests {
    use super::*;

    /// The encodings agree with the kernel's numbers for the requests whose values are well
    /// known.
    #[test]
    fn vcpu_thread_ioctls_are_the_kernels_numbers() {
        assert_eq!(VCPU_THREAD_IOCTLS[0], 0xae80); // KVM_RUN
        assert_eq!(VCPU_THREAD_IOCTLS[1], 0x8090_ae81); // KVM_GET_REGS
        assert_eq!(VCPU_THREAD_IOCTLS[3], 0x8138_ae83); // KVM_GET_SREGS
        assert_eq!(VCPU_THREAD_IOCTLS[6], 0x8400_ae8e); // KVM_GET_LAPIC
        assert_eq!(VCPU_THREAD_IOCTLS[12], 0x9000_aea4); // KVM_GET_XSAVE
        assert_eq!(VCPU_THREAD_IOCTLS[14], 0x4008_ae61); // KVM_IRQ_LINE
    }
}
