//! The microVM engine boundary.
//!
//! An [`Engine`] boots a VM from a [`VmSpec`] (kernel, agent initramfs, disks, shape) and
//! hands back a running [`Vm`] with the agent channel connected. Everything above this crate
//! (the monitor, the shim) is engine-neutral. Implementations: [`qemu`] (`qemu-system-* -M
//! microvm`, accel kvm or tcg, chosen by a probe).

pub mod builtin;
pub mod probe;
pub mod qemu;
mod qmp;

use std::fmt;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "{binary} not found: install it (Debian package qemu-system-x86) or set SUPERMACHINE_QEMU"
    )]
    QemuMissing { binary: String },
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("the VMM exited during start-up: {log}")]
    VmmExited { log: String },
    #[error("VMM control: {0}")]
    Control(String),
    /// The snapshot could not be restored (unreadable, of another shape, or a device refused
    /// its saved state); the caller treats the snapshot as corrupt.
    #[error("restoring the snapshot: {0}")]
    Restore(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine {0} is not available on this host: {1}")]
    Unavailable(String, String),
    #[error("unknown engine {0:?} (expected auto, qemu or builtin)")]
    UnknownEngine(String),
    #[error("cannot set the VM's memory to {bytes} bytes: {reason}")]
    MemoryTarget { bytes: u64, reason: String },
}

/// The least memory [`Vm::set_memory_target`] leaves a guest: below it the guest kernel and
/// the agent would have nothing to run in.
pub const MIN_MEMORY_TARGET: u64 = vmm::MIN_MEMORY_TARGET;

/// A disk attached as virtio-blk; the guest sees them as /dev/vda, /dev/vdb, … in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio-net device; the guest sees them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// A tap (with IFF_VNET_HDR) to carry its frames, or none: the device exists (a VM's
    /// device set is part of its snapshot) but carries nothing.
    pub tap: Option<RawFd>,
    pub mac: String,
}

/// What serves the builtin VMM's virtio-fs requests (the container layer's FUSE server).
pub use devices::virtio::FsBackend;

/// Everything an engine needs to boot one VM.
#[derive(Clone)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Appended to the engine's own kernel arguments.
    pub kernel_args: Vec<String>,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// Where the VM keeps its console log and other per-VM files; it outlives the VM.
    pub work_dir: PathBuf,
    pub diagnostics: VmDiagnostics,
    /// The FUSE server behind the builtin VMM's virtio-fs device, attached at boot and at
    /// restore (never part of a snapshot); without one the guest's requests fail with
    /// ENODEV. The QEMU engine has no virtio-fs and ignores it: there the guest relays FUSE
    /// over the `fs.0` port ([`Vm::take_fs_channel`]), which the caller serves.
    pub fs: Option<Arc<dyn FsBackend>>,
}

impl fmt::Debug for VmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmSpec")
            .field("vcpus", &self.vcpus)
            .field("memory_mib", &self.memory_mib)
            .field("kernel", &self.kernel)
            .field("initramfs", &self.initramfs)
            .field("kernel_args", &self.kernel_args)
            .field("disks", &self.disks)
            .field("nics", &self.nics)
            .field("work_dir", &self.work_dir)
            .field("diagnostics", &self.diagnostics)
            .field("fs", &self.fs.as_ref().map(|_| "FsBackend"))
            .finish()
    }
}

/// Ways to watch a slow or stalling guest, for engines that have them (the builtin VMM);
/// all off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmDiagnostics {
    /// Log one vCPU exit in a thousand and where each kick finds a vCPU (with `--debug`).
    pub trace: bool,
    /// A path prefix: sample each vCPU every millisecond and write `<prefix>.<pid>.vcpu<n>`
    /// when the VM ends.
    pub profile: Option<PathBuf>,
    /// Keep the memory the guest frees instead of giving it back to the host: to measure
    /// what free page reporting is worth. The builtin VMM keeps the pages the guest reports;
    /// QEMU's balloon then offers no reporting (a different device: snapshots are keyed
    /// apart, see `container::launch::snapshot_key`).
    pub keep_freed_memory: bool,
}

impl VmSpec {
    /// The guest device name of disk `index`.
    pub fn guest_disk(index: usize) -> String {
        format!("/dev/vd{}", (b'a' + index as u8) as char)
    }

    /// The guest kernel's command line: what every guest gets, then `engine_args` (what
    /// the engine adds on this host, may be empty), then this VM's own arguments. (The
    /// engines append their device lists themselves.)
    pub fn kernel_cmdline(&self, engine_args: &str) -> String {
        let mut cmdline = BASE_KERNEL_ARGS.to_string();
        for arg in std::iter::once(engine_args)
            .filter(|a| !a.is_empty())
            .chain(self.kernel_args.iter().map(String::as_str))
        {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        cmdline
    }
}

/// Guest kernel arguments of every VM, whichever engine runs it.
pub const BASE_KERNEL_ARGS: &str =
    "console=ttyS0 reboot=t panic=-1 quiet i8042.noaux i8042.nomux i8042.nopnp supermachine.port=agent.0";

/// A booted VM.
pub trait Vm: Send + fmt::Debug {
    /// The host process that runs the VM, when it is not this one.
    fn vmm_pid(&self) -> Option<u32>;
    /// The host end of the agent channel; taken once.
    fn take_channel(&mut self) -> Option<UnixStream>;
    /// The host end of the virtio-console port `fs.0` (raw FUSE messages: the guest's
    /// requests where it has no virtio-fs, replies and notifications); taken once.
    fn take_fs_channel(&mut self) -> Option<UnixStream>;
    /// Stops the vCPUs.
    fn pause(&mut self) -> Result<(), EngineError>;
    fn resume(&mut self) -> Result<(), EngineError>;
    /// Ends the VM and releases what it holds. Safe to call more than once.
    fn stop(&mut self) -> Result<(), EngineError>;
    /// Writes a snapshot of the paused VM into `dir` (which the snapshot cache seals).
    fn snapshot(&mut self, dir: &Path) -> Result<(), EngineError>;
    /// Why the VM ended on its own, if it has.
    fn exited(&mut self) -> Option<String>;
    /// The last `lines` lines of the guest console, to explain a failure.
    fn console_tail(&self, lines: usize) -> String;
    /// The VM's state in words (vCPUs, interrupt controller, devices), to explain a guest
    /// that stopped answering; empty where the engine cannot look inside.
    fn describe(&self) -> vmm::Description {
        vmm::Description::default()
    }
    /// Gives the host back memory the guest can do without, such as a translating
    /// engine's code for paths the guest ran once (boot, restore, a container's start).
    /// Best effort; called when the guest idles.
    fn trim(&mut self) {}
    /// Whether [`Vm::trim`] gives anything back for this VM.
    fn trims(&self) -> bool {
        false
    }
    /// Sets how much of its memory the guest may use, in bytes, between
    /// [`MIN_MEMORY_TARGET`] and the size the VM booted with (which it cannot outgrow): the
    /// guest's virtio-balloon driver hands the rest to the host, or takes it back. Returns
    /// once the target is set; the guest reaches it within seconds, as far as it can without
    /// running out of memory. A target the engine cannot set is an
    /// [`EngineError::MemoryTarget`] (or [`EngineError::Control`] for a stopped VM), never a
    /// silent success.
    fn set_memory_target(&mut self, bytes: u64) -> Result<(), EngineError>;
}

/// What separates a guest from the host, as `features` and `--debug` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A hypervisor of the host kernel (KVM, Hypervisor.framework) runs the guest: the VM
    /// boundary is the CPU's virtualization, or the host kernel's paravirtual equivalent.
    Hypervisor,
    /// Software emulation (QEMU's TCG): the boundary is QEMU's translator, whose escapes
    /// its maintainers do not treat as security bugs. Weaker than a hypervisor.
    Emulation,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Hypervisor => "hypervisor",
            Isolation::Emulation => "emulation",
        })
    }
}

/// Set to `1`: a container is never run where its VM would be emulated in software
/// ([`Isolation::Emulation`]); `create` fails instead.
pub const REQUIRE_HARDWARE_ISOLATION: &str = "SUPERMACHINE_REQUIRE_HARDWARE_ISOLATION";

impl Selection {
    /// Fails if the user requires a hypervisor ([`REQUIRE_HARDWARE_ISOLATION`]) and this
    /// engine emulates.
    pub fn check_isolation(&self) -> Result<(), EngineError> {
        let required = std::env::var(REQUIRE_HARDWARE_ISOLATION).is_ok_and(|v| v == "1");
        if required && self.engine.isolation() == Isolation::Emulation {
            return Err(EngineError::Unavailable(
                self.engine.name(),
                format!(
                    "{REQUIRE_HARDWARE_ISOLATION}=1, and this engine would emulate the VM in \
                     software ({})",
                    self.reason
                ),
            ));
        }
        Ok(())
    }
}

pub trait Engine: Send + Sync + fmt::Debug {
    /// `qemu-tcg`, `qemu-kvm`, `builtin-kvm`, …
    fn name(&self) -> String;
    /// What separates the guest from the host under this engine.
    fn isolation(&self) -> Isolation;
    /// What confines the process that runs guest code and device models, in words.
    fn vmm_confinement(&self) -> String;
    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError>;
    /// The guest kernel this engine boots for `spec`: `spec.kernel` unless the host needs a
    /// variant of it. A snapshot depends on this file, so its digest is in the cache key.
    fn kernel(&self, spec: &VmSpec) -> PathBuf {
        spec.kernel.clone()
    }
    /// Everything about the engine a snapshot depends on (kind, version, CPU model), for
    /// the snapshot cache key.
    fn snapshot_identity(&self) -> String;
    /// The least time a cold boot must be allowed on this host unless the user set one
    /// (an engine that knows its guest boots slowly here says so).
    fn boot_timeout_floor(&self) -> Duration {
        Duration::ZERO
    }
    /// Starts a VM from the snapshot in `dir`, running; also says how long each phase took.
    fn restore(&self, spec: &VmSpec, dir: &Path) -> Result<(Box<dyn Vm>, Vec<Phase>), EngineError>;
}

/// A named step of a VM start and its duration, for `--debug` logs and benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub duration: Duration,
}

impl Phase {
    pub fn new(name: &'static str, duration: Duration) -> Self {
        Phase { name, duration }
    }
}

/// What the user asked for (`--engine`, `SUPERMACHINE_ENGINE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    #[default]
    Auto,
    Qemu,
    Builtin,
}

impl FromStr for EngineChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "auto" => Ok(EngineChoice::Auto),
            "qemu" => Ok(EngineChoice::Qemu),
            "builtin" => Ok(EngineChoice::Builtin),
            other => Err(EngineError::UnknownEngine(other.to_string())),
        }
    }
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Qemu => "qemu",
            EngineChoice::Builtin => "builtin",
        })
    }
}

/// The engine picked for this host, and why.
#[derive(Debug)]
pub struct Selection {
    pub engine: Box<dyn Engine>,
    pub reason: String,
}

/// Picks an engine. `probe_dir` holds the cached probe verdicts (one probe per host boot);
/// `bundled_qemu` is the QEMU built for the runtime, preferred to the one on PATH
/// ([`qemu::binary`]).
pub fn select(
    choice: EngineChoice,
    probe_dir: &Path,
    bundled_qemu: Option<&Path>,
) -> Result<Selection, EngineError> {
    match choice {
        EngineChoice::Builtin => {
            let hv = hypervisor::open()
                .map_err(|e| EngineError::Unavailable("builtin".into(), e.to_string()))?;
            let verdict = builtin::speed_verdict(hv.as_ref(), probe_dir);
            if !verdict.native {
                log::warn!("--engine builtin on a slow host: {}", verdict.reason);
            }
            let reason = format!("requested builtin; {}", verdict.reason);
            Ok(Selection {
                engine: Box::new(builtin::BuiltinEngine::new(hv, verdict)),
                reason,
            })
        }
        EngineChoice::Auto => {
            let why_not_builtin = match hypervisor::open() {
                Ok(hv) => {
                    let verdict = builtin::speed_verdict(hv.as_ref(), probe_dir);
                    if verdict.native {
                        let reason = format!("auto: builtin, since {}", verdict.reason);
                        return Ok(Selection {
                            engine: Box::new(builtin::BuiltinEngine::new(hv, verdict)),
                            reason,
                        });
                    }
                    verdict.reason
                }
                Err(e) => e.to_string(),
            };
            let mut selection = select_qemu(probe_dir, bundled_qemu)?;
            selection.reason = format!("auto: qemu, since {why_not_builtin}; {}", selection.reason);
            Ok(selection)
        }
        EngineChoice::Qemu => {
            let mut selection = select_qemu(probe_dir, bundled_qemu)?;
            selection.reason = format!("requested qemu; {}", selection.reason);
            Ok(selection)
        }
    }
}

fn select_qemu(probe_dir: &Path, bundled: Option<&Path>) -> Result<Selection, EngineError> {
    let binary = qemu::binary(bundled);
    let verdict = probe::accel_verdict(&binary, probe_dir)?;
    let reason = format!("{binary}, accel {}: {}", verdict.accel, verdict.reason);
    let built_here = bundled.is_some_and(|path| Path::new(&binary) == path);
    Ok(Selection {
        engine: Box::new(qemu::QemuEngine::new(binary, verdict, built_here)),
        reason,
    })
}

/// Set (to anything) only by tests: the VMM makes a system call its filter forbids once it
/// runs (QEMU is asked to migrate to a command, which it can only do by forking; the builtin
/// VMM's first vCPU forks), and the start must fail saying so.
pub const FORBIDDEN_CALL_FOR_TESTS: &str = "SUPERMACHINE_TEST_VMM_FORBIDDEN_CALL";

/// How long to wait for a VMM to answer its control socket after start.
pub(crate) const VMM_START_TIMEOUT: Duration = Duration::from_secs(10);
