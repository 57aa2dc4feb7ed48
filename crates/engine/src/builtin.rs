//! The builtin engine: the VM runs inside this process on the in-process VMM ([`vmm`]), with
//! no VMM process to exec.
//!
//! Whether it is the right engine here is measured, not assumed: [`kernel_code_speed`] runs a
//! real-mode countdown loop (CPL0, like guest kernel code) on the hypervisor. Where KVM runs
//! it natively it takes about a millisecond; where KVM only emulates guest kernel code (a
//! host that is itself a guest without VMX/SVM, such as PVM) it takes seconds, and QEMU's TCG
//! is the faster engine.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::{x86, Hypervisor, MemoryRegion, VcpuExit};
use serde::{Deserialize, Serialize};

use crate::{EngineError, Phase, Vm, VmSpec};

/// On hosts whose KVM emulates guest kernel code, these keep the 6.1 kernel off the
/// instructions the emulator lacks (XSAVE, CMPXCHG16B, SMAP's CLAC/STAC, POPCNT) and off
/// paravirtual clocks and hypercalls. The guest reads CPUID from the hardware there (it sees
/// the outer hypervisor's leaves), so hiding features needs the kernel's help.
pub const EMULATED_KERNEL_ARGS: &str =
    "noxsave clearcpuid=cx16,xsave,smap,popcnt nopv no-kvmclock tsc=reliable";
const EMULATED_HIDDEN_CPUID: [&str; 3] = ["cx16", "xsave", "smap"];
/// Also on those hosts: user code runs on the hardware with the host's XCR0, so it finds
/// AVX and AVX-512 usable (CPUID, XGETBV), but the guest kernel, which cannot use XSAVE
/// there, switches only the x87/SSE state between processes. glibc's string functions keep
/// data in YMM/ZMM registers across the page faults of a copy, where other processes' values
/// can take their place: a busybox started while the agent served a request found its TLS
/// copied wrong and crashed. The kernel passes an unknown `NAME=value` argument on to init's
/// environment, so the agent's own glibc starts with these features off, and the agent hands
/// the variable to every process it starts (the agent's `spawn::environment`). Programs that
/// choose vector code without glibc (Go's runtime, say) are not covered.
pub const EMULATED_GLIBC_TUNABLES: &str =
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ";

/// A loop the probe may not take longer than to count as native. Measured: hardware KVM
/// runs it in about 1 ms; KVM nested in QEMU's TCG (which emulates SVM, and translates the
/// guest's kernel code in blocks: a guest boots in seconds) in 40-102 ms, varying with the
/// outer machine's load; a PVM host, which emulates guest kernel code instruction by
/// instruction (a guest boots in minutes), in about 950 ms. The limit sits between the last
/// two, with room on each side.
const NATIVE_LIMIT: Duration = Duration::from_millis(300);
/// Longest the probe runs before judging the hypervisor slow.
const PROBE_LIMIT: Duration = Duration::from_millis(500);
/// Runs of the probe when one lands between [`NATIVE_LIMIT`] and [`PROBE_LIMIT`], the best
/// counting: a nested KVM whose outer machine was busy took 474 ms once (a typical host
/// while its build host compiled), and a busy moment is not the hypervisor's speed.
const PROBE_ATTEMPTS: u32 = 3;
const PROBE_ITERATIONS: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeedVerdict {
    /// Guest kernel code runs natively.
    pub native: bool,
    pub reason: String,
    /// The guests' TSC frequency as the hypervisor reports it, in kHz.
    pub tsc_khz: Option<u32>,
}

impl SpeedVerdict {
    /// What the engine adds to the guest kernel's command line on this host.
    ///
    /// Where guest kernel code is emulated the guest also runs without paravirtual clocks,
    /// and the builtin VMM has no PIT or HPET to calibrate the TSC against: the kernel would
    /// mark the TSC unstable and keep time in jiffies, which needs a periodic tick, so every
    /// idle VM took a timer interrupt 100 times a second (each one emulated: about a quarter
    /// of a host core per idle VM, measured). `tsc_early_khz` gives it the frequency.
    pub fn kernel_args(&self) -> String {
        if self.native {
            return String::new();
        }
        let mut args = format!("{EMULATED_KERNEL_ARGS} {EMULATED_GLIBC_TUNABLES}");
        if let Some(khz) = self.tsc_khz {
            args.push_str(&format!(" tsc_early_khz={khz}"));
        }
        args
    }
}

/// The TSC frequency the hypervisor gives a new vCPU, if it can say.
fn guest_tsc_khz(hv: &dyn Hypervisor) -> Option<u32> {
    let vm = hv.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.x86_tsc_khz().ok().filter(|&khz| khz > 0)
}

/// Runs 2^20 iterations of `dec ecx; jnz` in real mode and says how long they took, or
/// `None` when they took longer than `limit`.
pub fn kernel_code_speed(
    hv: &dyn Hypervisor,
    limit: Duration,
) -> Result<Option<Duration>, hypervisor::Error> {
    const RAM: usize = 0x2000;
    #[rustfmt::skip]
    let code = [
        0x66, 0xb9, 0x00, 0x00, 0x10, 0x00, // mov ecx, 0x100000
        0x66, 0x49,                         // dec ecx
        0x75, 0xfc,                         // jnz dec
        0xf4,                               // hlt
    ];
    debug_assert_eq!(PROBE_ITERATIONS, 0x10_0000);
    let ram = PageAligned::new(RAM)?;
    // SAFETY: the mapping is RAM bytes long and nothing else refers to it yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ram.0, RAM) };
    bytes.fill(0xf4); // hlt everywhere else
    bytes[0x1000..0x1000 + code.len()].copy_from_slice(&code);
    let vm = hv.create_vm()?;
    // SAFETY: `ram` is unmapped at the end of this function, after the VM and its vCPU.
    unsafe {
        vm.map_memory(MemoryRegion {
            slot: 0,
            guest_addr: 0,
            size: RAM as u64,
            host_addr: ram.0,
            read_only: false,
        })?;
    }
    let mut vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.x86_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_x86_sregs(&sregs)?;
    vcpu.set_x86_regs(&x86::Regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    })?;
    // The vCPU runs on a thread of its own (the backend may unblock its kick signal there);
    // this one kicks it once the limit has passed, until it is out.
    let kicker = vcpu.kicker();
    let started = Instant::now();
    let runner = std::thread::spawn(move || {
        let result = loop {
            match vcpu.run() {
                Ok(VcpuExit::Halt) => break Ok(Some(started.elapsed())),
                Ok(VcpuExit::Interrupted) => {
                    if started.elapsed() >= limit {
                        break Ok(None);
                    }
                }
                Ok(other) => {
                    break Err(hypervisor::Error::Invalid(format!(
                        "probe guest: unexpected exit {other:?}"
                    )))
                }
                Err(e) => break Err(e),
            }
        };
        (result, vcpu)
    });
    let deadline = started + limit;
    while !runner.is_finished() {
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) => std::thread::sleep(left.min(Duration::from_millis(5))),
            None => {
                kicker.kick();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let (result, vcpu) = runner
        .join()
        .map_err(|_| hypervisor::Error::Invalid("the probe's vCPU thread panicked".into()))?;
    drop(vcpu);
    drop(vm);
    drop(ram);
    result
}

/// An anonymous mapping (the hypervisor wants page-aligned guest memory).
struct PageAligned(*mut u8, usize);

impl PageAligned {
    fn new(len: usize) -> Result<Self, hypervisor::Error> {
        // SAFETY: a fresh anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(hypervisor::Error::Invalid(format!(
                "probe memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(PageAligned(ptr.cast(), len))
    }
}

impl Drop for PageAligned {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

/// The verdict for this host, cached per boot in `dir` (a probe that could not run is not
/// cached).
pub fn speed_verdict(hv: &dyn Hypervisor, dir: &Path) -> SpeedVerdict {
    // v2: the verdict has the TSC frequency.
    let measured =
        crate::probe::BootCache::this_boot(dir).get_or_measure("builtin-v2", hv.name(), || {
            Ok::<_, std::convert::Infallible>(measure_speed(hv))
        });
    match measured {
        Ok(verdict) => verdict,
        Err(never) => match never {},
    }
}

/// The probe's time, run again (up to [`PROBE_ATTEMPTS`] in all) while it lands between
/// the native limit and the probe's own: the fastest run counts.
fn best_kernel_code_speed(hv: &dyn Hypervisor) -> Result<Option<Duration>, hypervisor::Error> {
    let mut best = kernel_code_speed(hv, PROBE_LIMIT)?;
    for _ in 1..PROBE_ATTEMPTS {
        match best {
            Some(t) if t > NATIVE_LIMIT => {
                if let Some(again) = kernel_code_speed(hv, PROBE_LIMIT)? {
                    best = Some(t.min(again));
                }
            }
            _ => break,
        }
    }
    Ok(best)
}

fn measure_speed(hv: &dyn Hypervisor) -> crate::probe::Measured<SpeedVerdict> {
    let name = hv.name();
    let (native, reason, probed) = match best_kernel_code_speed(hv) {
        Ok(Some(t)) if t <= NATIVE_LIMIT => (
            true,
            format!("{name} runs guest kernel code natively (probe loop {t:.1?})"),
            true,
        ),
        Ok(Some(t)) => (
            false,
            format!(
                "{name} emulates guest kernel code here (probe loop {t:.1?}, native is about 1 ms)"
            ),
            true,
        ),
        Ok(None) => (
            false,
            format!(
                "{name} emulates guest kernel code here (probe loop over {PROBE_LIMIT:?}, native \
                 is about 1 ms)"
            ),
            true,
        ),
        Err(e) => (
            false,
            format!("{name} cannot run the probe guest: {e}"),
            false,
        ),
    };
    let verdict = SpeedVerdict {
        native,
        reason,
        tsc_khz: guest_tsc_khz(hv),
    };
    if probed {
        crate::probe::Measured::Keep(verdict)
    } else {
        crate::probe::Measured::Once(verdict)
    }
}

#[derive(Debug)]
pub struct BuiltinEngine {
    hv: Box<dyn Hypervisor>,
    verdict: SpeedVerdict,
}

impl BuiltinEngine {
    pub fn new(hv: Box<dyn Hypervisor>, verdict: SpeedVerdict) -> Self {
        BuiltinEngine { hv, verdict }
    }

    pub fn verdict(&self) -> &SpeedVerdict {
        &self.verdict
    }

    fn config(
        &self,
        spec: &VmSpec,
        channel: UnixStream,
        fs_channel: UnixStream,
    ) -> Result<vmm::VmmConfig, EngineError> {
        // A NIC without a tap is detached: it keeps the device set a snapshot needs.
        let nics = spec
            .nics
            .iter()
            .map(|nic| {
                devices::virtio::net::parse_mac(&nic.mac)
                    .map(|mac| vmm::Nic { tap: nic.tap, mac })
                    .ok_or_else(|| EngineError::Control(format!("bad MAC address {:?}", nic.mac)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(vmm::VmmConfig {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: crate::Engine::kernel(self, spec),
            initramfs: Some(spec.initramfs.clone()),
            cmdline: spec.kernel_cmdline(&self.verdict.kernel_args()),
            disks: spec
                .disks
                .iter()
                .map(|d| vmm::Disk {
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            nics,
            agent_channel: Some(channel),
            fs_channel: Some(fs_channel),
            fs: spec.fs.clone(),
            console_log: spec.work_dir.join("console.log"),
            hide_cpuid: if self.verdict.native {
                Vec::new()
            } else {
                EMULATED_HIDDEN_CPUID
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            },
            diagnostics: vmm::Diagnostics {
                trace: spec.diagnostics.trace,
                profile: spec.diagnostics.profile.clone(),
                keep_freed_memory: spec.diagnostics.keep_freed_memory,
                forbidden_call_for_tests: std::env::var_os(crate::FORBIDDEN_CALL_FOR_TESTS)
                    .is_some(),
            },
        })
    }
}

impl BuiltinEngine {
    /// The VMM's config for `spec` with fresh agent and fs channels, and the VM handle
    /// (without its VMM yet) that keeps their host ends.
    fn prepare(&self, spec: &VmSpec) -> Result<(vmm::VmmConfig, BuiltinVm), EngineError> {
        let pair = |what: &str| {
            UnixStream::pair().map_err(|e| EngineError::Spawn {
                what: what.into(),
                source: e,
            })
        };
        let (host, device) = pair("agent channel")?;
        let (fs_host, fs_device) = pair("fs channel")?;
        let config = self.config(spec, device, fs_device)?;
        let vm = BuiltinVm {
            vmm: None,
            channel: Some(host),
            fs_channel: Some(fs_host),
            console: config.console_log.clone(),
        };
        Ok((config, vm))
    }
}

/// The boot timeout on hosts that emulate guest kernel code.
const SLOW_BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The file name of the kernel variant for hosts that emulate guest kernel code.
pub const PVM_KERNEL: &str = "vmlinux-pvm";

impl crate::Engine for BuiltinEngine {
    fn name(&self) -> String {
        format!("builtin-{}", self.hv.name())
    }

    /// KVM or Hypervisor.framework, always.
    fn isolation(&self) -> crate::Isolation {
        crate::Isolation::Hypervisor
    }

    fn vmm_confinement(&self) -> String {
        "the builtin VMM runs in the container's monitor process: its vCPU and device threads \
         under system call allow lists per kind of thread (no new process or program, socket, \
         namespace, mount, credential or capability; a call outside a list kills the \
         process), the monitor's own thread unfiltered"
            .into()
    }

    /// On a host that emulates guest kernel code, the variant built for it (`vmlinux-pvm`
    /// beside the default one, see config/patches/pvm) when there is one.
    fn kernel(&self, spec: &VmSpec) -> PathBuf {
        if self.verdict.native {
            return spec.kernel.clone();
        }
        let variant = spec.kernel.with_file_name(PVM_KERNEL);
        if variant.exists() {
            return variant;
        }
        log::warn!(
            "{} is missing: the default kernel cannot run user programs on this host \
             (make guest builds it where the probe finds such a host)",
            variant.display()
        );
        spec.kernel.clone()
    }

    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        let (config, mut vm) = self.prepare(spec)?;
        let vmm = vmm::Vmm::boot(self.hv.as_ref(), config)
            .map_err(|e| EngineError::VmmExited { log: e.to_string() })?;
        vm.vmm = Some(vmm);
        Ok(Box::new(vm))
    }

    /// The hypervisor, this host's CPU (vCPU state and CPUID are the CPU's) and whether
    /// guest kernel code is emulated here (it picks the kernel variant and hidden CPUID).
    fn snapshot_identity(&self) -> String {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map_or(String::new(), |(_, v)| v.trim().to_string())
        };
        format!(
            "builtin-{} state={} cpu={} family={} model={} stepping={} native={} cmdline={}",
            self.hv.name(),
            // The VMM's state file layout: a snapshot of another layout is a miss.
            vmm::snapshot::STATE_FORMAT,
            field("model name"),
            field("cpu family"),
            field("model"),
            field("stepping"),
            self.verdict.native,
            // What the engine adds to the kernel command line shapes the baked guest too
            // (the agent's environment and the TSC frequency, for two).
            self.verdict.kernel_args()
        )
    }

    /// Where guest kernel code is emulated, a boot to the agent takes a minute or two
    /// (about 60 s on the host this was measured on) instead of a fraction of a second.
    fn boot_timeout_floor(&self) -> Duration {
        if self.verdict.native {
            Duration::ZERO
        } else {
            SLOW_BOOT_TIMEOUT
        }
    }

    fn restore(&self, spec: &VmSpec, dir: &Path) -> Result<(Box<dyn Vm>, Vec<Phase>), EngineError> {
        let (config, mut vm) = self.prepare(spec)?;
        let (vmm, phases) = vmm::Vmm::restore(self.hv.as_ref(), config, dir)
            .map_err(|e| EngineError::Restore(e.to_string()))?;
        let phases = phases
            .into_iter()
            .map(|(name, duration)| Phase::new(name, duration))
            .collect();
        vm.vmm = Some(vmm);
        Ok((Box::new(vm), phases))
    }
}

#[derive(Debug)]
struct BuiltinVm {
    vmm: Option<vmm::Vmm>,
    channel: Option<UnixStream>,
    fs_channel: Option<UnixStream>,
    console: PathBuf,
}

impl Vm for BuiltinVm {
    fn vmm_pid(&self) -> Option<u32> {
        None
    }

    fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
    }

    fn take_fs_channel(&mut self) -> Option<UnixStream> {
        self.fs_channel.take()
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        if let Some(vmm) = &self.vmm {
            vmm.pause();
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        if let Some(vmm) = &self.vmm {
            vmm.resume();
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), EngineError> {
        if let Some(mut vmm) = self.vmm.take() {
            vmm.stop();
        }
        Ok(())
    }

    fn snapshot(&mut self, dir: &Path) -> Result<(), EngineError> {
        let vmm = self
            .vmm
            .as_ref()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        vmm.snapshot(dir)
            .map_err(|e| EngineError::Control(e.to_string()))
    }

    fn exited(&mut self) -> Option<String> {
        match self.vmm.as_ref()?.exit()? {
            vmm::VmExit::Shutdown => Some("the guest shut down".into()),
            vmm::VmExit::Failed(why) => Some(why),
        }
    }

    fn console_tail(&self, lines: usize) -> String {
        crate::qemu::read_tail(&self.console, lines)
    }

    fn describe(&self) -> vmm::Description {
        self.vmm
            .as_ref()
            .map(vmm::Vmm::describe)
            .unwrap_or_default()
    }

    fn set_memory_target(&mut self, bytes: u64) -> Result<(), EngineError> {
        let vmm = self
            .vmm
            .as_ref()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        vmm.set_memory_target(bytes)
            .map_err(|e| EngineError::MemoryTarget {
                bytes,
                reason: e.to_string(),
            })
    }
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(native: bool, tsc_khz: Option<u32>) -> SpeedVerdict {
        SpeedVerdict {
            native,
            reason: String::new(),
            tsc_khz,
        }
    }

    #[test]
    fn an_emulating_host_gives_the_guest_its_tsc_frequency() {
        let args = verdict(false, Some(2_100_000)).kernel_args();
        assert!(args.starts_with(EMULATED_KERNEL_ARGS), "{args}");
        assert!(args.contains(EMULATED_GLIBC_TUNABLES), "{args}");
        assert!(args.ends_with(" tsc_early_khz=2100000"), "{args}");
        // A hypervisor that cannot say leaves the kernel to calibrate.
        assert!(!verdict(false, None).kernel_args().contains("tsc_early_khz"));
    }

    #[test]
    fn a_native_host_adds_nothing_to_the_kernel_command_line() {
        // The guest has kvmclock there, which carries the frequency.
        assert_eq!(verdict(true, Some(2_100_000)).kernel_args(), "");
    }
}
