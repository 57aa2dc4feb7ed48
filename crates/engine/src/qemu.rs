//! The qemu engine: one `qemu-system-x86_64 -M microvm` process per VM.
//!
//! The VM's control (QMP), agent and fs channels are socketpairs handed to QEMU as inherited
//! fds, so there are no socket paths to clean up or to overflow `sun_path`. The agent channel
//! is a virtio-serial port named `agent.0`, the shared filesystem's FUSE relay a second one
//! named `fs.0` (QEMU has no virtio-fs here: vhost-user needs guest RAM shared with another
//! process, which the copy-on-write restore rules out). QEMU dies with the process that started it
//! (`PR_SET_PDEATHSIG`), so a killed monitor cannot leave a VM behind.
//!
//! QEMU runs jailed (`jail`): its own namespaces, a root holding only its inputs, no
//! capabilities, and its own seccomp filter (`-sandbox`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use devices::serial::ConsoleLog;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde_json::json;

use crate::probe::{Accel, AccelVerdict};
use crate::qmp::Qmp;
use crate::{Engine, EngineError, Phase, Vm, VmSpec, VMM_START_TIMEOUT};

/// The name of the QEMU binary, on PATH and among the guest assets.
pub const BINARY_NAME: &str = "qemu-system-x86_64";

/// The QEMU binary: `SUPERMACHINE_QEMU`; else `bundled`, the one built for the runtime
/// beside its guest kernel (`scripts/build-qemu.sh`), if it is there; else
/// `qemu-system-x86_64` from PATH.
pub fn binary(bundled: Option<&Path>) -> String {
    choose_binary(std::env::var("SUPERMACHINE_QEMU").ok(), bundled)
}

fn choose_binary(explicit: Option<String>, bundled: Option<&Path>) -> String {
    match (explicit, bundled) {
        (Some(binary), _) => binary,
        (None, Some(path)) if path.is_file() => path.to_string_lossy().into_owned(),
        (None, _) => BINARY_NAME.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct QemuEngine {
    binary: String,
    verdict: AccelVerdict,
    /// The firmware shipped beside the binary (`qboot.rom`, see `make qemu`), passed to it
    /// explicitly; `None`: QEMU's own search (its data directory, e.g. Debian's
    /// `qemu-system-data`).
    firmware: Option<PathBuf>,
    /// The QEMU scripts/build-qemu.sh built, with config/qemu/patches: among them, it opens
    /// a snapshot's memory file read-only (another QEMU opens it for writing, so the file
    /// must be writable in its jail).
    built_here: bool,
}

/// The microvm machine's firmware, as `make qemu` ships it beside the binary.
pub const FIRMWARE_NAME: &str = "qboot.rom";

/// The firmware shipped beside `binary` (`make qemu` puts it there), if it is.
pub fn firmware_beside(binary: &Path) -> Option<PathBuf> {
    binary
        .parent()
        .map(|dir| dir.join(FIRMWARE_NAME))
        .filter(|path| path.is_file())
}

impl QemuEngine {
    pub fn new(binary: String, verdict: AccelVerdict, built_here: bool) -> Self {
        let firmware = firmware_beside(Path::new(&binary));
        QemuEngine {
            binary,
            verdict,
            firmware,
            built_here,
        }
    }

    pub fn accel(&self) -> Accel {
        self.verdict.accel
    }
}

/// QEMU option values escape commas by doubling them.
fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// A memfd inherited by QEMU (`share=on`): this process can read it to bake a snapshot,
    /// and it vanishes with the last process that holds it.
    Shared { fd: RawFd },
    /// A baked memory file mapped copy-on-write (`share=off`): restores share its clean
    /// pages and never change it.
    Private { path: PathBuf },
}

/// The VM's end of each socket QEMU inherits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sockets {
    pub qmp: RawFd,
    /// Port `agent.0`.
    pub agent: RawFd,
    /// Port `fs.0`.
    pub fs: RawFd,
}

/// What a snapshot's device set is; part of the engine's snapshot identity, so that a
/// snapshot of another device set is never found (QEMU would refuse its migration stream).
/// 2: the virtio-serial device has a second port, `fs.0`.
/// 3: a virtio-balloon device with free page reporting follows the NICs.
pub const DEVICE_SET: u32 = 3;

/// The QEMU arguments for `spec`, with its sockets at the given fds.
pub fn command_line(
    spec: &VmSpec,
    verdict: &AccelVerdict,
    sockets: Sockets,
    console: &Path,
    memory: &GuestMemory,
    incoming: bool,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm,acpi=off,x-option-roms=off,memory-backend=mem",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec();
    // Names the VM by its work directory (the container's state): `ps` then says whose it
    // is, though its files are passed as descriptors and its root is a jail.
    args.extend(["-name".into(), format!("guest={}", escape(&spec.work_dir))]);
    args.extend([
        "-accel".into(),
        verdict.accel.to_string(),
        "-cpu".into(),
        verdict.cpu.clone(),
    ]);
    args.extend(["-smp".into(), spec.vcpus.to_string()]);
    args.extend(["-m".into(), format!("{}M", spec.memory_mib)]);
    let backing = match memory {
        GuestMemory::Shared { fd } => format!("mem-path=/proc/self/fd/{fd},share=on"),
        GuestMemory::Private { path } => format!("mem-path={},share=off", escape(path)),
    };
    args.extend([
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={}M,{backing}",
            spec.memory_mib
        ),
    ]);
    // A restored guest's kernel, initramfs and command line are in its memory already; QEMU
    // would read both files into firmware config tables the guest never reads again (the
    // firmware is the same either way, so the RAM blocks match the snapshot's).
    if !incoming {
        args.extend(["-kernel".into(), escape(&spec.kernel)]);
        args.extend(["-initrd".into(), escape(&spec.initramfs)]);
        args.extend([
            "-append".into(),
            spec.kernel_cmdline(&verdict.kernel_args()),
        ]);
    }
    args.extend(["-serial".into(), format!("file:{}", escape(console))]);
    args.extend([
        "-chardev".into(),
        format!("socket,id=qmp,fd={}", sockets.qmp),
    ]);
    args.extend(["-mon".into(), "chardev=qmp,mode=control".into()]);
    args.extend([
        "-chardev".into(),
        format!("socket,id=agent,fd={}", sockets.agent),
    ]);
    args.extend(["-chardev".into(), format!("socket,id=fs,fd={}", sockets.fs)]);
    // Port 0 is kept for a console: agent.0 is port 1, fs.0 port 2, as on the builtin VMM.
    args.extend(["-device".into(), "virtio-serial-device,max_ports=3".into()]);
    args.extend([
        "-device".into(),
        "virtserialport,chardev=agent,name=agent.0,nr=1".into(),
        "-device".into(),
        "virtserialport,chardev=fs,name=fs.0,nr=2".into(),
    ]);
    for (i, disk) in spec.disks.iter().enumerate() {
        let readonly = if disk.read_only { "on" } else { "off" };
        args.extend([
            "-drive".into(),
            format!(
                "file={},if=none,id=disk{i},format=raw,readonly={readonly},cache=unsafe",
                escape(&disk.path)
            ),
            "-device".into(),
            format!("virtio-blk-device,drive=disk{i}"),
        ]);
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        match nic.tap {
            Some(fd) => args.extend([
                "-netdev".into(),
                format!("tap,id=net{i},fd={fd}"),
                "-device".into(),
                format!("virtio-net-device,netdev=net{i},mac={}", nic.mac),
            ]),
            None => args.extend([
                "-device".into(),
                format!("virtio-net-device,mac={}", nic.mac),
            ]),
        }
    }
    // Memory the guest frees goes back to the host (free page reporting), and the host can
    // set a memory target (QMP `balloon`). On a restored VM a page given back reads back as
    // the snapshot's page: the baked file is mapped privately, and this project's QEMU leaves
    // a private mapping's file alone when it discards (config/qemu/patches/0005-*).
    // Without reporting (`keep_freed_memory`), the guest never offers what it frees: QEMU
    // discards every page it is told of, so the device must not offer the feature.
    let reporting = if spec.diagnostics.keep_freed_memory {
        "off"
    } else {
        "on"
    };
    args.extend([
        "-device".into(),
        format!("virtio-balloon-device,free-page-reporting={reporting},deflate-on-oom=on"),
    ]);
    if incoming {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    args
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.to_path_buf();
    move |source| EngineError::Io { path, source }
}

/// The open files QEMU may have: a few per device, far below this.
const VMM_FILES: u64 = 1024;

const KVM_DEVICE: &str = "/dev/kvm";

/// Where a distribution's QEMU finds its firmware (Debian's links into seabios's).
const QEMU_DATA_DIRS: [&str; 2] = ["/usr/share/qemu", "/usr/share/seabios"];

/// QEMU's own system call filter (`-sandbox`, libseccomp; scripts/build-qemu.sh builds it
/// in): on top of its default deny list, no obsolete calls, no new process or program, no
/// scheduling or affinity changes. A forbidden call kills QEMU (SIGSYS), which the VM reports
/// as such. Changes of credentials are denied too ([`SANDBOX_NO_USER_CHANGE`]) unless QEMU
/// makes one itself: `-runas` to [`VMM_USER`] once set up (QEMU installs its filter before
/// that), after which it holds no capability and cannot change them again anyway.
const SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";
const SANDBOX_NO_USER_CHANGE: &str = ",elevateprivileges=deny";

/// The environment variable this project's QEMU reads the parent's pipe from
/// (config/qemu/patches/0007-*, [`jail::Jail::switches_user`]).
const PARENT_PIPE: &str = "QEMU_PARENT_PIPE_FD";

/// `uid:gid`: the unprivileged user a jailed QEMU changes to once it has opened its inputs
/// and `/dev/kvm` as root (`-runas`); default 65534:65534 (nobody, nogroup). It sees nothing
/// of the host's files or processes from its jail, so a user shared with others costs
/// nothing there. Only the QEMU built here changes user: changing it clears the
/// parent-death signal that ends QEMU with its monitor, which that QEMU sets again
/// (config/qemu/patches/0007-*); another QEMU stays uid 0, without capabilities.
pub const VMM_USER: &str = "SUPERMACHINE_VMM_USER";
const DEFAULT_VMM_USER: (u32, u32) = (65534, 65534);

/// [`VMM_USER`]'s uid and gid; a malformed value, or root, is refused.
fn vmm_user() -> Result<(u32, u32), EngineError> {
    let Some(value) = std::env::var_os(VMM_USER) else {
        return Ok(DEFAULT_VMM_USER);
    };
    let value = value.to_string_lossy();
    parse_vmm_user(&value).ok_or_else(|| {
        EngineError::Unavailable(
            "qemu".into(),
            format!("{VMM_USER}={value}: expected an unprivileged uid:gid, such as 65534:65534"),
        )
    })
}

/// `uid:gid`, neither of them root's.
fn parse_vmm_user(value: &str) -> Option<(u32, u32)> {
    value
        .split_once(':')
        .and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)))
        .filter(|&(uid, gid)| uid != 0 && gid != 0)
}

/// `off`: QEMU runs without its jail and filter, in the caller's namespaces, root and
/// credentials. For measuring what the jail costs (`make bench`) and for debugging.
pub const JAIL_SETTING: &str = "SUPERMACHINE_VMM_JAIL";

fn jailed() -> bool {
    std::env::var(JAIL_SETTING).map_or(true, |v| v != "off")
}

/// How long a snapshot's device state may take to save or load.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

const X_IGNORE_SHARED: &str = "x-ignore-shared";

/// Drops TCG's translated code and returns its pages to the host (a command of the QEMU
/// built by scripts/build-qemu.sh; config/qemu/patches).
const JIT_FLUSH: &str = "x-jit-flush";

impl QemuEngine {
    /// Whether QEMU changes to [`VMM_USER`] once set up: the QEMU built here, which keeps
    /// its parent-death signal across the change.
    fn changes_user(&self) -> bool {
        self.built_here
    }

    /// The binary, resolved on PATH when it is a bare name.
    fn binary_path(&self) -> PathBuf {
        crate::probe::which(&self.binary).unwrap_or_else(|| PathBuf::from(&self.binary))
    }

    /// QEMU's jail for `spec`: its root holds the firmware, the kernel and initramfs it
    /// boots, the disks, the snapshot's memory file it restores from (read-only for the
    /// QEMU built here: a private mapping never writes it, config/qemu/patches/0006-*),
    /// `/dev/null`, and `/dev/kvm` when it runs on KVM. Everything else it uses is an inherited descriptor.
    fn jail(
        &self,
        spec: &VmSpec,
        memory: &GuestMemory,
        incoming: bool,
        jailed: bool,
    ) -> Result<jail::Jail, EngineError> {
        let limits = |jail: jail::Jail| {
            jail.limit(jail::Resource::Files, VMM_FILES)
                .limit(jail::Resource::CoreSize, 0)
                // QEMU asks for huge pages for its translation cache, which a VM fills
                // only ~10 MiB of: with 2 MiB pages each VM held ~1.2 MiB more, untouched.
                .without_huge_pages()
        };
        if !jailed {
            return Ok(limits(jail::Jail::unconfined()));
        }
        let root = spec.work_dir.join("vmm-root");
        std::fs::create_dir_all(&root).map_err(io_error(&root))?;
        // QEMU probes its file locking kind on /dev/null.
        let mut jail = limits(jail::Jail::new(root)).device("/dev/null");
        if self.changes_user() {
            jail = jail.switches_user(PARENT_PIPE);
        }
        match &self.firmware {
            Some(firmware) => jail = jail.read_only(firmware),
            // QEMU's own search, in the data directories a distribution's QEMU uses.
            None => {
                for dir in QEMU_DATA_DIRS.iter().filter(|d| Path::new(d).is_dir()) {
                    jail = jail.read_only(dir);
                }
            }
        }
        if !incoming {
            jail = jail.read_only(&spec.kernel).read_only(&spec.initramfs);
        }
        for disk in &spec.disks {
            jail = if disk.read_only {
                jail.read_only(&disk.path)
            } else {
                jail.writable(&disk.path)
            };
        }
        if let GuestMemory::Private { path } = memory {
            jail = if self.built_here {
                jail.read_only(path)
            } else {
                jail.writable(path)
            };
        }
        if self.verdict.accel == Accel::Kvm {
            jail = jail.device(KVM_DEVICE);
        }
        Ok(jail)
    }

    /// Starts QEMU for `spec` in its jail and waits for its control socket.
    fn spawn(
        &self,
        spec: &VmSpec,
        memory: GuestMemory,
        ram: Option<File>,
        incoming: bool,
    ) -> Result<QemuVm, EngineError> {
        let (agent_host, agent_vmm) =
            UnixStream::pair().map_err(io_error(Path::new("socketpair")))?;
        let (fs_host, fs_vmm) = UnixStream::pair().map_err(io_error(Path::new("socketpair")))?;
        let (qmp_host, qmp_vmm) = UnixStream::pair().map_err(io_error(Path::new("socketpair")))?;
        let console = spec.work_dir.join("console.log");
        // The guest's serial output comes through a pipe into a bounded log (a `file:`
        // chardev grows without end on the host's `/run`).
        let (console_out, console_in) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io_error(Path::new("pipe"))(e.into()))?;
        let log_of_console = ConsoleLog::create(&console).map_err(io_error(&console))?;
        let vmm_log = spec.work_dir.join("vmm.log");
        let log = File::create(&vmm_log).map_err(io_error(&vmm_log))?;
        let sockets = Sockets {
            qmp: qmp_vmm.as_raw_fd(),
            agent: agent_vmm.as_raw_fd(),
            fs: fs_vmm.as_raw_fd(),
        };
        let mut inherited = vec![
            sockets.agent,
            sockets.qmp,
            sockets.fs,
            console_in.as_raw_fd(),
        ];
        inherited.extend(ram.as_ref().map(|r| r.as_raw_fd()));
        inherited.extend(spec.nics.iter().filter_map(|n| n.tap));
        let serial = PathBuf::from(format!("/dev/fd/{}", console_in.as_raw_fd()));
        let mut args = command_line(spec, &self.verdict, sockets, &serial, &memory, incoming);
        if let Some(firmware) = &self.firmware {
            args.extend(["-bios".into(), escape(firmware)]);
        }
        let jailed = jailed();
        if jailed && self.changes_user() {
            let (uid, gid) = vmm_user()?;
            args.extend(["-sandbox".into(), SANDBOX.into()]);
            args.extend(["-runas".into(), format!("{uid}:{gid}")]);
        } else if jailed {
            args.extend([
                "-sandbox".into(),
                format!("{SANDBOX}{SANDBOX_NO_USER_CHANGE}"),
            ]);
        }
        log::debug!("starting {} {}", self.binary, args.join(" "));
        let started = Instant::now();
        let child = self
            .jail(spec, &memory, incoming, jailed)?
            .spawn(&self.binary_path(), &args, &log, &inherited)
            .map_err(|e| match e {
                jail::JailError::Input { path, .. } if path == self.binary_path() => {
                    EngineError::QemuMissing {
                        binary: self.binary.clone(),
                    }
                }
                e => EngineError::Spawn {
                    what: self.binary.clone(),
                    source: std::io::Error::other(e),
                },
            })?;
        drop(log);
        drop((agent_vmm, qmp_vmm, fs_vmm, console_in));
        relay_console(console_out, log_of_console);
        let mut vm = QemuVm {
            child,
            qmp: None,
            channel: Some(agent_host),
            fs_channel: Some(fs_host),
            console,
            vmm_log,
            ram: ram.map(|file| (file, u64::from(spec.memory_mib) << 20)),
            memory_bytes: u64::from(spec.memory_mib) << 20,
            flushes_jit: self.verdict.accel == Accel::Tcg,
            stopped: false,
        };
        match Qmp::handshake(qmp_host, VMM_START_TIMEOUT) {
            Ok(qmp) => vm.qmp = Some(qmp),
            Err(e) => return Err(vm.failed(e)),
        }
        if std::env::var_os(crate::FORBIDDEN_CALL_FOR_TESTS).is_some() {
            if let Err(e) = vm.qmp_with("migrate", json!({ "uri": "exec:true" })) {
                return Err(vm.failed(e));
            }
        }
        log::debug!(
            "qemu pid {} answering QMP after {:?}",
            vm.child.id(),
            started.elapsed()
        );
        Ok(vm)
    }
}

impl Engine for QemuEngine {
    fn name(&self) -> String {
        format!("qemu-{}", self.verdict.accel)
    }

    fn isolation(&self) -> crate::Isolation {
        match self.verdict.accel {
            crate::probe::Accel::Kvm => crate::Isolation::Hypervisor,
            crate::probe::Accel::Tcg => crate::Isolation::Emulation,
        }
    }

    fn vmm_confinement(&self) -> String {
        if jailed() {
            let user = if self.changes_user() {
                let user = vmm_user().map_or_else(|e| e.to_string(), |(u, g)| format!("{u}:{g}"));
                format!("as user {user} once set up")
            } else {
                "as uid 0 (a QEMU not built here loses its parent-death signal as it \
                 changes user)"
                    .into()
            };
            format!(
                "QEMU in new mount, PID, IPC, UTS and network namespaces on a root holding \
                 only its inputs, {user}, no capabilities, no_new_privs, rlimits, and its \
                 seccomp filter (-sandbox)"
            )
        } else {
            format!("none: {JAIL_SETTING}=off")
        }
    }

    fn snapshot_identity(&self) -> String {
        // A QEMU upgrade may change the migration stream or the machine: new snapshots.
        let path = crate::probe::which(&self.binary).unwrap_or_else(|| PathBuf::from(&self.binary));
        let stamp = std::fs::metadata(&path)
            .map(|m| format!("{} {}", m.len(), m.mtime()))
            .unwrap_or_default();
        // So may another firmware: it is in the migration stream as guest memory.
        let firmware = self.firmware.as_deref().map_or_else(String::new, |path| {
            let stamp = std::fs::metadata(path)
                .map(|m| format!("{} {}", m.len(), m.mtime()))
                .unwrap_or_default();
            format!(" firmware={} {stamp}", path.display())
        });
        format!(
            "qemu-{} cpu={} devices={DEVICE_SET} {} {stamp} {}{firmware}",
            self.verdict.accel,
            self.verdict.cpu,
            path.display(),
            self.verdict.kernel_args()
        )
    }

    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        let ram = memfd_create(c"supermachine-ram", MemFdCreateFlag::MFD_CLOEXEC)
            .map(File::from)
            .map_err(|e| EngineError::Io {
                path: "memfd".into(),
                source: e.into(),
            })?;
        ram.set_len(u64::from(spec.memory_mib) << 20)
            .map_err(io_error(Path::new("memfd")))?;
        let fd = ram.as_raw_fd();
        Ok(Box::new(self.spawn(
            spec,
            GuestMemory::Shared { fd },
            Some(ram),
            false,
        )?))
    }

    fn restore(
        &self,
        spec: &VmSpec,
        snapshot: &Path,
    ) -> Result<(Box<dyn Vm>, Vec<Phase>), EngineError> {
        let started = Instant::now();
        let memory = GuestMemory::Private {
            path: snapshot.join("memory"),
        };
        let mut vm = self.spawn(spec, memory, None, true)?;
        let mut phases = vec![Phase::new("vmm start + memory map", started.elapsed())];
        let loaded = Instant::now();
        let state_path = snapshot.join("state");
        let result = File::open(&state_path)
            .map_err(io_error(&state_path))
            .and_then(|state| {
                let qmp = vm
                    .qmp
                    .as_mut()
                    .ok_or_else(|| EngineError::Control("no QMP".into()))?;
                migrate(qmp, "migrate-incoming", &state)
            });
        if let Err(e) = result {
            return Err(vm.failed(e));
        }
        phases.push(Phase::new("vcpu/irq/clock/device state", loaded.elapsed()));
        let resumed = Instant::now();
        vm.resume().map_err(|e| vm.failed(e))?;
        phases.push(Phase::new("resume", resumed.elapsed()));
        Ok((Box::new(vm), phases))
    }
}

/// Runs QEMU's migration `command` (`migrate` out, `migrate-incoming` in) through `state`,
/// without guest RAM (x-ignore-shared: RAM is a file both sides map), to its end.
fn migrate(qmp: &mut Qmp, command: &str, state: &File) -> Result<(), EngineError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": X_IGNORE_SHARED, "state": true }] })),
    )?;
    qmp.execute_with_fd(
        "getfd",
        Some(json!({ "fdname": "snapshot" })),
        Some(state.as_raw_fd()),
    )?;
    qmp.execute(command, Some(json!({ "uri": "fd:snapshot" })))?;
    qmp.wait_migration(MIGRATION_TIMEOUT)
}

#[derive(Debug)]
pub struct QemuVm {
    child: jail::Jailed,
    qmp: Option<Qmp>,
    channel: Option<UnixStream>,
    fs_channel: Option<UnixStream>,
    console: PathBuf,
    vmm_log: PathBuf,
    /// Guest RAM and its size, when this process holds it (booted VMs; not restored ones).
    ram: Option<(File, u64)>,
    /// The size guest RAM booted with, the most a memory target can be.
    memory_bytes: u64,
    /// Whether QEMU translates guest code (TCG, rather than KVM or HVF running it) and
    /// can be asked to drop the translations; until it says it cannot.
    flushes_jit: bool,
    stopped: bool,
}

/// How QEMU ended, in words; a kill by its system call filter named as such.
fn describe_exit(status: ExitStatus) -> String {
    if status.signal() == Some(libc::SIGSYS) {
        "qemu was killed by its system call filter (SIGSYS): it made a call its -sandbox \
         forbids"
            .into()
    } else {
        format!("qemu exited ({status})")
    }
}

impl QemuVm {
    /// Stops a VM that failed to start, keeping QEMU's own words for the error, and how it
    /// ended when it had ended by itself.
    fn failed(&mut self, error: EngineError) -> EngineError {
        let _ = self.stop();
        let mut log = read_tail(&self.vmm_log, 5);
        // Not the SIGKILL of `stop`: it had ended by itself.
        let ended = self.child.try_wait().ok().flatten();
        if let Some(status) = ended.filter(|s| s.signal() != Some(libc::SIGKILL)) {
            log = if log.is_empty() {
                describe_exit(status)
            } else {
                format!("{}: {log}", describe_exit(status))
            };
        }
        if log.is_empty() {
            error
        } else {
            EngineError::VmmExited {
                log: format!("{error}: {log}"),
            }
        }
    }

    fn qmp(&mut self, command: &str) -> Result<(), EngineError> {
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        qmp.execute(command, None).map(|_| ())
    }

    fn qmp_with(&mut self, command: &str, arguments: serde_json::Value) -> Result<(), EngineError> {
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        qmp.execute(command, Some(arguments)).map(|_| ())
    }
}

impl Vm for QemuVm {
    fn vmm_pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
    }

    fn take_fs_channel(&mut self) -> Option<UnixStream> {
        self.fs_channel.take()
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        self.qmp("stop")
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        self.qmp("cont")
    }

    fn stop(&mut self) -> Result<(), EngineError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        // Nothing in the VM outlives it (the image is read-only, the container's writes are
        // in guest RAM), so there is nothing to shut down gracefully: SIGKILL is immediate.
        self.qmp = None;
        let _ = self.child.kill();
        self.child
            .wait()
            .map(|_| ())
            .map_err(|e| EngineError::Control(format!("wait for qemu: {e}")))
    }

    fn snapshot(&mut self, dir: &Path) -> Result<(), EngineError> {
        let Some((ram, size)) = &self.ram else {
            return Err(EngineError::Control(
                "only a booted VM can be snapshotted".into(),
            ));
        };
        let state_path = dir.join("state");
        let state = File::create(&state_path).map_err(io_error(&state_path))?;
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        // Device state only: RAM is the memfd, copied next, never streamed.
        migrate(qmp, "migrate", &state)?;
        drop(state);
        let memory = dir.join("memory");
        snapshot::file::copy_sparse(ram, &memory, *size).map_err(io_error(&memory))
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status)),
            _ => None,
        }
    }

    /// QMP `balloon`: the guest's memory target, in bytes (QEMU refuses more than the VM's
    /// size; the guest's driver gets there on its own time).
    fn set_memory_target(&mut self, bytes: u64) -> Result<(), EngineError> {
        if bytes < crate::MIN_MEMORY_TARGET || bytes > self.memory_bytes {
            return Err(EngineError::MemoryTarget {
                bytes,
                reason: format!(
                    "the VM's memory can be set between {} MiB and its boot size, {} MiB",
                    crate::MIN_MEMORY_TARGET >> 20,
                    self.memory_bytes >> 20
                ),
            });
        }
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        qmp.execute("balloon", Some(json!({ "value": bytes })))
            .map(|_| ())
    }

    fn trim(&mut self) {
        // TCG keeps every block it translated until its 1 GiB buffer fills: ~10 MiB of
        // kernel code after a restore and a container start, most of which does not run
        // again. What runs again is translated again. A QEMU without the command (the
        // distribution's) keeps its code.
        if self.flushes_jit {
            if let Err(e) = self.qmp(JIT_FLUSH) {
                log::debug!("{JIT_FLUSH}: {e}");
                self.flushes_jit = false;
            }
        }
    }

    fn trims(&self) -> bool {
        self.flushes_jit
    }

    fn console_tail(&self, lines: usize) -> String {
        let console = read_tail(&self.console, lines);
        let vmm = read_tail(&self.vmm_log, lines);
        match (console.is_empty(), vmm.is_empty()) {
            (_, true) => console,
            (true, false) => vmm,
            (false, false) => format!("{console}\n{vmm}"),
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The last `lines` lines of a log file (at most its last 64 KiB).
/// Copies the guest's serial output into its log until QEMU closes the pipe.
fn relay_console(from: std::os::fd::OwnedFd, mut log: ConsoleLog) {
    let spawned = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let _ = std::io::copy(&mut File::from(from), &mut log);
        });
    if let Err(e) = spawned {
        log::warn!("no thread for the VM's console log: {e}");
    }
}

/// The last `lines` non-empty lines of the console log at `path`, its rotated-out part
/// (see [`ConsoleLog`]) included.
pub fn read_tail(path: &Path, lines: usize) -> String {
    let end_of = |path: &Path| -> Vec<u8> {
        let Ok(mut file) = File::open(path) else {
            return Vec::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        bytes
    };
    let mut bytes = end_of(&ConsoleLog::previous(path));
    bytes.extend(end_of(path));
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskSpec;

    #[test]
    fn the_vmm_user_is_an_unprivileged_uid_and_gid() {
        assert_eq!(parse_vmm_user("65534:65534"), Some((65534, 65534)));
        assert_eq!(parse_vmm_user("1000:100"), Some((1000, 100)));
        for refused in [
            "0:0", "1000:0", "0:1000", "nobody", "1000", "a:b", ":", "-1:5",
        ] {
            assert_eq!(parse_vmm_user(refused), None, "{refused}");
        }
    }

    #[test]
    fn the_binary_is_the_users_then_the_bundled_one_then_paths() {
        let dir = tempfile::tempdir().unwrap();
        let bundled = dir.path().join(BINARY_NAME);
        // Not built: PATH's.
        assert_eq!(choose_binary(None, Some(&bundled)), BINARY_NAME);
        assert_eq!(choose_binary(None, None), BINARY_NAME);
        std::fs::write(&bundled, b"").unwrap();
        assert_eq!(
            choose_binary(None, Some(&bundled)),
            bundled.to_string_lossy()
        );
        assert_eq!(
            choose_binary(Some("/opt/qemu".into()), Some(&bundled)),
            "/opt/qemu"
        );
    }

    fn spec() -> VmSpec {
        VmSpec {
            vcpus: 2,
            memory_mib: 192,
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/agent.cpio".into(),
            kernel_args: vec!["supermachine.debug=1".into()],
            disks: vec![DiskSpec {
                path: "/images/a,b.ext4".into(),
                read_only: true,
            }],
            nics: vec![crate::NicSpec {
                tap: Some(12),
                mac: "02:00:00:00:00:01".into(),
            }],
            work_dir: "/run/x".into(),
            diagnostics: crate::VmDiagnostics::default(),
            fs: None,
        }
    }

    #[test]
    fn command_line_carries_shape_disks_and_sockets() {
        let verdict = AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: String::new(),
            tsc_khz: Some(2_100_000),
        };
        let memory = GuestMemory::Shared { fd: 9 };
        let args = command_line(
            &spec(),
            &verdict,
            Sockets {
                agent: 7,
                qmp: 8,
                fs: 10,
            },
            Path::new("/run/x/console.log"),
            &memory,
            false,
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("-accel tcg -cpu max -smp 2 -m 192M"),
            "{joined}"
        );
        assert!(joined
            .contains("memory-backend-file,id=mem,size=192M,mem-path=/proc/self/fd/9,share=on"));
        assert!(
            joined
                .contains("-device virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on"),
            "freed guest memory goes back to the host: {joined}"
        );
        assert!(joined.contains("file=/images/a,,b.ext4,if=none,id=disk0,format=raw,readonly=on"));
        assert!(
            joined.contains("-name guest=/run/x"),
            "named by its work directory"
        );
        assert!(joined.contains("socket,id=agent,fd=7"));
        assert!(joined.contains("socket,id=qmp,fd=8"));
        assert!(joined.contains(
            "-chardev socket,id=fs,fd=10 -device virtio-serial-device,max_ports=3 \
             -device virtserialport,chardev=agent,name=agent.0,nr=1 \
             -device virtserialport,chardev=fs,name=fs.0,nr=2"
        ));
        assert!(joined.contains(
            "-netdev tap,id=net0,fd=12 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"
        ));
        assert!(!joined.contains("-incoming"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.ends_with(
                "supermachine.port=agent.0 tsc_early_khz=2100000 tsc=reliable supermachine.debug=1"
            ),
            "{append}"
        );
    }

    #[test]
    fn a_vm_that_keeps_freed_memory_has_a_balloon_without_reporting() {
        let verdict = AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: String::new(),
            tsc_khz: None,
        };
        let mut spec = spec();
        spec.diagnostics.keep_freed_memory = true;
        let sockets = Sockets {
            agent: 7,
            qmp: 8,
            fs: 10,
        };
        let memory = GuestMemory::Shared { fd: 9 };
        let console = Path::new("/run/x/console.log");
        let joined = command_line(&spec, &verdict, sockets, console, &memory, false).join(" ");
        assert!(
            joined.contains("-device virtio-balloon-device,free-page-reporting=off"),
            "{joined}"
        );
    }

    #[test]
    fn a_restore_maps_the_baked_memory_privately_and_waits_for_incoming_state() {
        let verdict = AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: String::new(),
            tsc_khz: None,
        };
        let memory = GuestMemory::Private {
            path: "/cache/k/memory".into(),
        };
        let args = command_line(
            &spec(),
            &verdict,
            Sockets {
                agent: 7,
                qmp: 8,
                fs: 10,
            },
            Path::new("/run/x/console.log"),
            &memory,
            true,
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("mem-path=/cache/k/memory,share=off"),
            "{joined}"
        );
        assert!(joined.ends_with("-incoming defer"));
        assert!(
            joined.contains("virtserialport,chardev=fs,name=fs.0,nr=2"),
            "a restored VM has the booted one's devices: {joined}"
        );
        assert!(
            !joined.contains("-kernel") && !joined.contains("-initrd"),
            "{joined}"
        );
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(read_tail(&log, 2), "c\nd");
        assert_eq!(read_tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn guest_disks_are_named_in_order() {
        assert_eq!(VmSpec::guest_disk(0), "/dev/vda");
        assert_eq!(VmSpec::guest_disk(2), "/dev/vdc");
    }
}
