//! Instructions the hypervisor failed to emulate that the VMM can finish itself. Some
//! emulators (KVM's on hosts that only emulate guest kernel code, such as PVM) lack these.

use devices::GuestMemory;
use hypervisor::Vcpu;

/// What to do about an instruction the hypervisor failed to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// `int3` (0xcc): deliver the #BP it would have raised, past the instruction.
    Breakpoint,
    /// `fwait` (0x9b) with no pending x87 exception: nothing to do but skip it.
    Skip,
}

/// The repair for the instruction starting with `bytes`, if the VMM knows one.
pub fn repair_for(bytes: &[u8]) -> Option<Repair> {
    match bytes.first()? {
        0xcc => Some(Repair::Breakpoint),
        0x9b => Some(Repair::Skip),
        _ => None,
    }
}

/// Finishes the instruction at the vCPU's instruction pointer, or says why it cannot.
pub(crate) fn apply(vcpu: &mut dyn Vcpu, mem: &GuestMemory) -> Result<(), String> {
    let mut regs = vcpu.x86_regs().map_err(|e| e.to_string())?;
    let bytes = crate::vcpu::read_virtual(vcpu, mem, regs.rip, 4)?;
    let repair = repair_for(&bytes)
        .ok_or_else(|| format!("no repair for {bytes:02x?} at rip {:#x}", regs.rip))?;
    log::debug!(
        "vCPU {}: repairing {repair:?} at {:#x}",
        vcpu.id(),
        regs.rip
    );
    regs.rip += 1;
    vcpu.set_x86_regs(&regs).map_err(|e| e.to_string())?;
    if repair == Repair::Breakpoint {
        vcpu.inject_x86_exception(hypervisor::x86::VECTOR_BREAKPOINT)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
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
}
