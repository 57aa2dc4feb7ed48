//! Hand-assembled real-mode guests on the host's KVM: port I/O, MMIO and `hlt` reach the VMM
//! as typed exits, reads are answered through the lent buffers, and registers show the
//! guest's work. Without a usable /dev/kvm: a recorded skip, or a failure where it is
//! required (see tests/common/skip.rs).
#![cfg(target_os = "linux")]

// The workspace's skip rules, shared with its tests/ (std only).
#[path = "../../../tests/common/skip.rs"]
mod skip;

use hypervisor::{x86, MemoryRegion, VcpuExit};

const RAM: usize = 0x4000;
const CODE: u64 = 0x1000;
/// Unmapped guest-physical address: accesses become MMIO exits.
const MMIO: u64 = 0x8000;

struct Ram(*mut u8);

impl Ram {
    fn new(code: &[u8]) -> Ram {
        // SAFETY: a fresh anonymous private mapping, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let ram = Ram(ptr.cast());
        // SAFETY: the code fits in the mapping (asserted) at CODE.
        unsafe {
            assert!(CODE as usize + code.len() <= RAM);
            std::ptr::copy_nonoverlapping(code.as_ptr(), ram.0.add(CODE as usize), code.len());
        }
        ram
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, after the VM using it was dropped.
        unsafe { libc::munmap(self.0.cast(), RAM) };
    }
}

fn kvm() -> Option<Box<dyn hypervisor::Hypervisor>> {
    match hypervisor::open() {
        Ok(h) => Some(h),
        Err(e) => {
            skip::missing_kvm(&e);
            None
        }
    }
}

/// Runs `code` in real mode at 0x0:0x1000 and returns the vCPU and VM, stopped at the first
/// exit, for the test to drive.
type Guest = (Ram, Box<dyn hypervisor::Vm>, Box<dyn hypervisor::Vcpu>);

fn real_mode(code: &[u8]) -> Option<Guest> {
    real_mode_on(code, false)
}

fn real_mode_on(code: &[u8], irqchip: bool) -> Option<Guest> {
    let kvm = kvm()?;
    let ram = Ram::new(code);
    let vm = kvm.create_vm().expect("create VM");
    // SAFETY: `ram` outlives the VM in every test (dropped after it).
    unsafe {
        vm.map_memory(MemoryRegion {
            slot: 0,
            guest_addr: 0,
            size: RAM as u64,
            host_addr: ram.0,
            read_only: false,
        })
        .expect("map memory");
    }
    if irqchip {
        vm.create_irqchip().expect("create irqchip");
    }
    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    let mut sregs = vcpu.x86_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_x86_sregs(&sregs).expect("set sregs");
    vcpu.set_x86_regs(&x86::Regs {
        rip: CODE,
        rflags: 2,
        ..Default::default()
    })
    .expect("set regs");
    Some((ram, vm, vcpu))
}

#[test]
fn port_io_mmio_and_hlt_exit_with_their_data() {
    #[rustfmt::skip]
    let code = [
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xb0, 0x41,             // mov al, 'A'
        0xee,                   // out dx, al
        0xec,                   // in al, dx
        0xa2, 0x00, 0x80,       // mov [0x8000], al
        0x8a, 0x1e, 0x00, 0x80, // mov bl, [0x8000]
        0xf4,                   // hlt
    ];
    let Some((_ram, _vm, mut vcpu)) = real_mode(&code) else {
        return;
    };

    match vcpu.run().expect("run") {
        VcpuExit::IoOut { port, data } => assert_eq!((port, data), (0x3f8, &[0x41u8][..])),
        other => panic!("expected the out, got {other:?}"),
    }
    match vcpu.run().expect("run") {
        VcpuExit::IoIn { port, data } => {
            assert_eq!((port, data.len()), (0x3f8, 1));
            data[0] = 0x42;
        }
        other => panic!("expected the in, got {other:?}"),
    }
    match vcpu.run().expect("run") {
        VcpuExit::MmioWrite { addr, data } => assert_eq!((addr, data), (MMIO, &[0x42u8][..])),
        other => panic!("expected the MMIO write of the value read in, got {other:?}"),
    }
    match vcpu.run().expect("run") {
        VcpuExit::MmioRead { addr, data } => {
            assert_eq!((addr, data.len()), (MMIO, 1));
            data[0] = 0x99;
        }
        other => panic!("expected the MMIO read, got {other:?}"),
    }
    match vcpu.run().expect("run") {
        VcpuExit::Halt => {}
        other => panic!("expected hlt, got {other:?}"),
    }
    let regs = vcpu.x86_regs().expect("regs");
    assert_eq!(regs.rax & 0xff, 0x42, "al holds the answer to the in");
    assert_eq!(
        regs.rbx & 0xff,
        0x99,
        "bl holds the answer to the MMIO read"
    );
    assert_eq!(regs.rip, CODE + code.len() as u64, "rip is past the hlt");
}

#[test]
fn a_loop_is_interrupted_by_a_kick_from_another_thread() {
    let code = [0xeb, 0xfe]; // jmp $
    let Some((_ram, _vm, mut vcpu)) = real_mode(&code) else {
        return;
    };
    let kicker = vcpu.kicker();
    let runner = std::thread::spawn(move || {
        let exit = format!("{:?}", vcpu.run().expect("run"));
        (exit, vcpu)
    });
    // Kick until the vCPU thread has entered the guest and come back.
    while !runner.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(20));
        kicker.kick();
    }
    let (exit, vcpu) = runner.join().expect("vCPU thread");
    assert_eq!(exit, "Interrupted");
    let rip = vcpu.x86_regs().expect("regs").rip;
    assert_eq!(rip, CODE, "the guest was still in its loop");
}

/// A process that blocks every signal for its own reasons (the monitor forwards them to the
/// container) still kicks its vCPUs: the thread running a vCPU takes the kick signal.
#[test]
fn a_kick_interrupts_a_vcpu_whose_thread_blocked_all_signals() {
    let code = [0xeb, 0xfe]; // jmp $
    let Some((_ram, _vm, mut vcpu)) = real_mode(&code) else {
        return;
    };
    let kicker = vcpu.kicker();
    let runner = std::thread::spawn(move || {
        // SAFETY: a full sigset_t for this thread's own mask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        }
        let exit = format!("{:?}", vcpu.run().expect("run"));
        (exit, vcpu)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !runner.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "kicks never reached the vCPU"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        kicker.kick();
    }
    let (exit, _vcpu) = runner.join().expect("vCPU thread");
    assert_eq!(exit, "Interrupted");
}

/// A vCPU stopped at a port read is saved with the answer given but not yet taken in; a
/// second VM restored from that state (and a copy of the RAM) carries on with it.
#[test]
fn a_vcpu_saved_mid_exit_resumes_in_another_vm() {
    #[rustfmt::skip]
    let code = [
        0xbb, 0x34, 0x12, // mov bx, 0x1234
        0xe4, 0x10,       // in al, 0x10
        0x00, 0xd8,       // add al, bl
        0xe6, 0x11,       // out 0x11, al
        0xeb, 0xfe,       // jmp $
    ];
    let with_irqchip = true;
    let Some((ram, vm, mut vcpu)) = real_mode_on(&code, with_irqchip) else {
        return;
    };
    match vcpu.run().expect("run") {
        VcpuExit::IoIn { port, data } => {
            assert_eq!(port, 0x10);
            data[0] = 0x05;
        }
        other => panic!("expected the in, got {other:?}"),
    }
    let saved = vcpu.save_state().expect("save vCPU");
    let platform = vm.save_platform().expect("save platform");
    assert_eq!(
        vcpu.x86_regs().expect("regs").rax & 0xff,
        0x05,
        "saving took the answer in"
    );

    // A second VM with a copy of the first one's RAM and a blank vCPU.
    let Some((ram2, vm2, mut vcpu2)) = real_mode_on(&[], with_irqchip) else {
        return;
    };
    // SAFETY: both mappings are RAM bytes long and no vCPU runs while copying.
    unsafe { std::ptr::copy_nonoverlapping(ram.0, ram2.0, RAM) };
    drop(vcpu);
    drop(vm);
    drop(ram);
    vm2.restore_platform(&platform).expect("restore platform");
    vcpu2.restore_state(&saved).expect("restore vCPU");
    match vcpu2.run().expect("run") {
        VcpuExit::IoOut { port, data } => {
            assert_eq!((port, data), (0x11, &[0x05u8 + 0x34][..]));
        }
        other => panic!("expected the out after the restore, got {other:?}"),
    }
    assert_eq!(vcpu2.x86_regs().expect("regs").rbx, 0x1234);
}
