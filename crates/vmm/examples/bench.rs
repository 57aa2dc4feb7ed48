//! Cold boot of the guest kernel on the builtin VMM, by phase, and the VMM's own memory:
//! prints one JSON line for scripts/bench.py.
//!
//!     cargo run --release -p vmm --example bench -- VMLINUX DISK.ext4 [EXTRA KERNEL ARGS...]
//!
//! The guest mounts DISK as its root and, finding no init, panics and resets (`panic=-1`):
//! the phases are VMM start-up (until the vCPU thread runs), kernel entry to its first console
//! byte, and the root mount to the reset. Memory: this process's resident set beyond the
//! guest's own pages (the memfd, counted as shared memory), the figure Firecracker quotes.

use std::time::{Duration, Instant};

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kernel), Some(disk)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bench VMLINUX DISK.ext4 [ARGS...]");
        std::process::exit(2);
    };
    let extra = args.get(2..).unwrap_or(&[]).join(" ");
    let dir = tempfile::tempdir().expect("temp dir");
    let console = dir.path().join("console.log");
    let hv = hypervisor::open().expect("hypervisor");
    let rss_before = status_kib("VmRSS:");
    let started = Instant::now();
    let vmm = vmm::Vmm::boot(
        hv.as_ref(),
        vmm::VmmConfig {
            vcpus: 1,
            memory_mib: 128,
            kernel: kernel.into(),
            initramfs: None,
            cmdline: format!("console=ttyS0 reboot=t panic=-1 root=/dev/vda ro {extra}"),
            disks: vec![vmm::Disk {
                path: disk.into(),
                read_only: true,
            }],
            nics: vec![],
            agent_channel: None,
            fs_channel: None,
            fs: None,
            console_log: console.clone(),
            hide_cpuid: vec![],
            diagnostics: vmm::Diagnostics::default(),
        },
    )
    .expect("boot");
    let vmm_start = started.elapsed();
    let mut first_byte = None;
    let mut root_mounted = None;
    let mut exit = None;
    let mut peak_overhead_kib = 0;
    while started.elapsed() < Duration::from_secs(900) {
        exit = vmm.wait(Duration::from_millis(5));
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if first_byte.is_none() && !text.is_empty() {
            first_byte = Some(started.elapsed());
        }
        if root_mounted.is_none() && text.contains("VFS: Mounted root") {
            root_mounted = Some(started.elapsed());
        }
        let overhead = status_kib("VmRSS:").saturating_sub(status_kib("RssShmem:"));
        peak_overhead_kib = peak_overhead_kib.max(overhead);
        if exit.is_some() {
            break;
        }
    }
    let total = started.elapsed();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    println!(
        "{}",
        serde_json_lite(&[
            ("vmm_start_ms", ms(Some(vmm_start))),
            ("first_console_byte_ms", ms(first_byte)),
            ("root_mounted_ms", ms(root_mounted)),
            ("reset_ms", ms(exit.as_ref().map(|_| total))),
            ("rss_before_boot_kib", Some(rss_before as f64)),
            ("vmm_rss_beyond_guest_kib", Some(peak_overhead_kib as f64)),
        ])
    );
}

/// A flat JSON object of numbers (null when missing), without pulling in serde here.
fn serde_json_lite(fields: &[(&str, Option<f64>)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("\"{k}\": {v:.1}"),
            None => format!("\"{k}\": null"),
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}
