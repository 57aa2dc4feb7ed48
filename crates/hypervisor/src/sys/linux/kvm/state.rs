//! What KVM needs to stop a VM and start it again elsewhere: each vCPU's architectural state
//! and the VM's in-kernel devices (PIC, IOAPIC, PIT) and clock.
//!
//! The state travels as opaque bytes through the [`crate::Vcpu`] and [`crate::Vm`] traits
//! (bincode of the structs below, which are KVM's own ioctl structures); the VMM stores them
//! without looking inside. Order matters on restore and follows what KVM checks: CPUID
//! before anything (the caller sets it), then MP state, registers, FPU/XSAVE, XCRs, debug
//! registers, LAPIC, MSRs (some depend on the LAPIC and CPUID), and the pending events last.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::os;
use crate::{Error, Result};

/// KVM_GET_MSRS and KVM_SET_MSRS take at most this many entries per call.
const MSR_BATCH: usize = 64;

#[derive(Serialize, Deserialize)]
pub(super) struct VcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    /// Absent where the host has no XSAVE.
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<(u32, u64)>,
    events: kvm_vcpu_events,
}

/// Reads a vCPU's state. It must be out of `KVM_RUN` on the caller's thread, which must be the
/// thread that runs it: an I/O exit's answer is only taken in by the next `KVM_RUN`, so that
/// first runs with `immediate_exit` (it completes the access and returns at once).
pub(super) fn save_vcpu(fd: &mut VcpuFd, msr_list: &[u32]) -> Result<Vec<u8>> {
    fd.set_kvm_immediate_exit(1);
    let flushed = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match flushed {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(os("complete the pending exit")(e)),
        Ok(()) => {
            return Err(Error::Invalid(
                "KVM ran the vCPU despite immediate_exit".into(),
            ))
        }
    }
    let state = VcpuState {
        mp_state: fd.get_mp_state().map_err(os("get MP state"))?,
        regs: fd.get_regs().map_err(os("get registers"))?,
        sregs: fd.get_sregs().map_err(os("get special registers"))?,
        xsave: fd.get_xsave().map_err(os("get XSAVE"))?,
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd.get_debug_regs().map_err(os("get debug registers"))?,
        lapic: fd.get_lapic().map_err(os("get local APIC"))?,
        msrs: read_msrs(fd, msr_list)?,
        events: fd.get_vcpu_events().map_err(os("get vCPU events"))?,
    };
    bincode::serialize(&state).map_err(|e| Error::Invalid(format!("encoding vCPU state: {e}")))
}

/// Puts a vCPU back in the state [`save_vcpu`] read (its CPUID must be set already).
pub(super) fn restore_vcpu(fd: &VcpuFd, bytes: &[u8]) -> Result<()> {
    let state: VcpuState = bincode::deserialize(bytes)
        .map_err(|e| Error::Invalid(format!("decoding vCPU state: {e}")))?;
    fd.set_mp_state(state.mp_state)
        .map_err(os("set MP state"))?;
    fd.set_regs(&state.regs).map_err(os("set registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(os("set special registers"))?;
    // SAFETY: the buffer is a whole `kvm_xsave` as KVM_GET_XSAVE filled it on a host of the
    // same CPU (the snapshot key names it); KVM reads no more than its size.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(os("set XSAVE"))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(os("set XCRs"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(os("set debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(os("set local APIC"))?;
    write_msrs(fd, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(os("set vCPU events"))
}

/// Every MSR in KVM's list that this vCPU lets us read. `KVM_GET_MSRS` stops at the first
/// one it refuses; that one is skipped and the rest of the batch asked again.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut values = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Invalid(format!("MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(os("get MSRs"))?;
        values.extend(
            msrs.as_slice()[..read]
                .iter()
                .map(|entry| (entry.index, entry.data)),
        );
        // Unless the whole batch was read, the entry at `read` was refused: skip it.
        let consumed = if read == batch.len() { read } else { read + 1 };
        rest = &rest[consumed..];
    }
    Ok(values)
}

/// Sets MSRs; every one must be accepted.
pub(super) fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<()> {
    for batch in msrs.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Invalid(format!("MSR list: {e:?}")))?;
        let written = fd.set_msrs(&msrs).map_err(os("set MSRs"))?;
        if written != entries.len() {
            return Err(Error::Invalid(format!(
                "KVM restored {written} of {} MSRs (it refused {:#x})",
                entries.len(),
                entries[written].index
            )));
        }
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
pub(super) struct PlatformState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

pub(super) fn save_platform(vm: &VmFd) -> Result<Vec<u8>> {
    let chip = |id| -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(os("get irqchip"))?;
        Ok(chip)
    };
    let mut clock = vm.get_clock().map_err(os("get clock"))?;
    // Only the clock value is restored: the flags describe this host's TSC, not the next one.
    clock.flags = 0;
    let state = PlatformState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(os("get PIT"))?,
        clock,
    };
    bincode::serialize(&state).map_err(|e| Error::Invalid(format!("encoding VM state: {e}")))
}

pub(super) fn restore_platform(vm: &VmFd, bytes: &[u8]) -> Result<()> {
    let state: PlatformState = bincode::deserialize(bytes)
        .map_err(|e| Error::Invalid(format!("decoding VM state: {e}")))?;
    vm.set_pit2(&state.pit).map_err(os("set PIT"))?;
    vm.set_clock(&state.clock).map_err(os("set clock"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(os("set irqchip"))?;
    }
    Ok(())
}

/// The 256 bits of a local APIC vector register (ISR, IRR) as the vectors set in it; each
/// 32-bit part sits at the start of a 16-byte line from `offset`.
fn apic_vectors(lapic: &kvm_lapic_state, offset: usize) -> Vec<u32> {
    let mut vectors = Vec::new();
    for part in 0..8 {
        let at = offset + part * 16;
        let word = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[at + i] as u8));
        vectors.extend(
            (0..32)
                .filter(|bit| word & (1 << bit) != 0)
                .map(|bit| part as u32 * 32 + bit),
        );
    }
    vectors
}

/// Where a vCPU is and what interrupts it has in hand, for a person chasing a stalled guest:
/// its instruction pointer and interrupt flag, MP state, the local APIC's in-service and
/// requested vectors and task priority, and what is pending injection. The vCPU must be out
/// of `KVM_RUN` on the caller's thread.
pub(super) fn describe_vcpu(fd: &VcpuFd) -> String {
    let mut out = Vec::new();
    match fd.get_regs() {
        Ok(r) => out.push(format!(
            "rip {:#x} rflags {:#x} (IF {})",
            r.rip,
            r.rflags,
            (r.rflags >> 9) & 1
        )),
        Err(e) => out.push(format!("registers: {e}")),
    }
    match fd.get_mp_state() {
        Ok(s) => out.push(format!("mp_state {}", s.mp_state)),
        Err(e) => out.push(format!("MP state: {e}")),
    }
    match fd.get_lapic() {
        Ok(lapic) => out.push(format!(
            "APIC ISR {:?} IRR {:?} TPR {:#x}",
            apic_vectors(&lapic, 0x100),
            apic_vectors(&lapic, 0x200),
            lapic.regs[0x80] as u8
        )),
        Err(e) => out.push(format!("local APIC: {e}")),
    }
    match fd.get_vcpu_events() {
        Ok(e) => out.push(format!(
            "interrupt injected {} nr {} shadow {}, nmi pending {}",
            e.interrupt.injected, e.interrupt.nr, e.interrupt.shadow, e.nmi.pending
        )),
        Err(e) => out.push(format!("events: {e}")),
    }
    out.join(", ")
}

/// The IOAPIC's requested lines and its redirection entries that are not masked, for a
/// person chasing a stalled guest.
pub(super) fn describe_platform(vm: &VmFd) -> String {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    if let Err(e) = vm.get_irqchip(&mut chip) {
        return format!("IOAPIC: {e}");
    }
    // SAFETY: chip_id IOAPIC says the union holds the IOAPIC's state.
    let ioapic = unsafe { chip.chip.ioapic };
    let mut out = vec![format!("IOAPIC irr {:#x}", ioapic.irr)];
    for (pin, entry) in ioapic.redirtbl.iter().enumerate() {
        // SAFETY: every bit pattern is a valid u64.
        let bits = unsafe { entry.bits };
        if bits & (1 << 16) == 0 {
            out.push(format!(
                "pin {pin}: vector {:#x} {} remote_irr {} dest {:#x}",
                bits & 0xff,
                if bits & (1 << 15) != 0 {
                    "level"
                } else {
                    "edge"
                },
                (bits >> 14) & 1,
                bits >> 56
            ));
        }
    }
    out.join("; ")
}
