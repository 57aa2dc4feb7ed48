//! Boots a kernel on the builtin VMM and prints its console until it ends or TIMEOUT passes.
//!     cargo run -p vmm --example boot -- VMLINUX [INITRAMFS] [TIMEOUT_S] [EXTRA KERNEL ARGS...]
use std::time::Duration;

fn main() {
    env_logger_lite();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kernel = args
        .first()
        .expect("usage: boot VMLINUX [INITRAMFS] [TIMEOUT_S] [ARGS...]");
    let initramfs = args.get(1).filter(|s| !s.is_empty()).map(Into::into);
    let timeout: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let extra = args.get(3..).unwrap_or(&[]).join(" ");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("console.log");
    let hv = hypervisor::open().expect("hypervisor");
    let hide = std::env::var("HIDE_CPUID").unwrap_or_default();
    // The diagnostics settings are read here, at the binary's edge, as the runtime does.
    let diagnostics = vmm::Diagnostics {
        trace: std::env::var_os("SUPERMACHINE_VMM_TRACE").is_some(),
        profile: std::env::var_os("SUPERMACHINE_VMM_PROFILE").map(Into::into),
        keep_freed_memory: false,
        forbidden_call_for_tests: false,
    };
    let trace = diagnostics.trace;
    let vmm = vmm::Vmm::boot(
        hv.as_ref(),
        vmm::VmmConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: kernel.into(),
            initramfs,
            cmdline: format!("console=ttyS0 reboot=t panic=-1 {extra}"),
            disks: vec![],
            nics: vec![],
            agent_channel: None,
            fs_channel: None,
            fs: None,
            console_log: log.clone(),
            hide_cpuid: hide
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            diagnostics,
        },
    )
    .expect("boot");
    let mut exit = None;
    for _ in 0..timeout / 5 {
        exit = vmm.wait(Duration::from_secs(5));
        if exit.is_some() {
            break;
        }
        if trace {
            vmm.pause();
            vmm.resume();
        }
    }
    println!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    println!("exit after {:?}: {exit:?}", vmm.started.elapsed());
}

fn env_logger_lite() {
    env_logger::init();
}
