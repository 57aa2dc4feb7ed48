//! The qemu engine: one `qemu-system-x86_64 -M microvm` process per VM.
//!
//! The VM's control (QMP) and agent channel are socketpairs handed to QEMU as inherited fds,
//! so there are no socket paths to clean up or to overflow `sun_path`. The agent channel is a
//! virtio-serial port named `agent.0`. QEMU dies with the process that started it
//! (`PR_SET_PDEATHSIG`), so a killed monitor cannot leave a VM behind.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::probe::{Accel, AccelVerdict};
use crate::qmp::Qmp;
use crate::{Engine, EngineError, Vm, VmSpec, VMM_START_TIMEOUT};

/// The QEMU binary: `SUPERMACHINE_QEMU`, else `qemu-system-x86_64` from PATH.
pub fn binary() -> String {
    std::env::var("SUPERMACHINE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

#[derive(Debug, Clone)]
pub struct QemuEngine {
    binary: String,
    verdict: AccelVerdict,
}

impl QemuEngine {
    pub fn new(binary: String, verdict: AccelVerdict) -> Self {
        QemuEngine { binary, verdict }
    }

    pub fn accel(&self) -> Accel {
        self.verdict.accel
    }
}

/// QEMU option values escape commas by doubling them.
fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The kernel command line every guest gets; the spec's arguments follow.
pub const BASE_KERNEL_ARGS: &str =
    "console=ttyS0 reboot=t panic=-1 quiet i8042.noaux i8042.nomux i8042.nopnp supermachine.port=agent.0";

/// The QEMU arguments for `spec`, with the agent and QMP sockets at the given fds.
pub fn command_line(
    spec: &VmSpec,
    verdict: &AccelVerdict,
    agent_fd: RawFd,
    qmp_fd: RawFd,
    console: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm,acpi=off,x-option-roms=off",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-accel".into(),
        verdict.accel.to_string(),
        "-cpu".into(),
        verdict.cpu.clone(),
    ]);
    args.extend(["-smp".into(), spec.vcpus.to_string()]);
    args.extend(["-m".into(), format!("{}M", spec.memory_mib)]);
    args.extend(["-kernel".into(), escape(&spec.kernel)]);
    args.extend(["-initrd".into(), escape(&spec.initramfs)]);
    let mut cmdline = BASE_KERNEL_ARGS.to_string();
    for arg in &spec.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    args.extend(["-append".into(), cmdline]);
    args.extend(["-serial".into(), format!("file:{}", escape(console))]);
    args.extend(["-chardev".into(), format!("socket,id=qmp,fd={qmp_fd}")]);
    args.extend(["-mon".into(), "chardev=qmp,mode=control".into()]);
    args.extend(["-chardev".into(), format!("socket,id=agent,fd={agent_fd}")]);
    args.extend(["-device".into(), "virtio-serial-device,max_ports=2".into()]);
    args.extend([
        "-device".into(),
        "virtserialport,chardev=agent,name=agent.0".into(),
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
    args
}

impl Engine for QemuEngine {
    fn name(&self) -> String {
        format!("qemu-{}", self.verdict.accel)
    }

    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EngineError::Io { path, source }
        };
        let (agent_host, agent_vmm) = UnixStream::pair().map_err(io(Path::new("socketpair")))?;
        let (qmp_host, qmp_vmm) = UnixStream::pair().map_err(io(Path::new("socketpair")))?;
        let console = spec.work_dir.join("console.log");
        let vmm_log = spec.work_dir.join("vmm.log");
        let log = File::create(&vmm_log).map_err(io(&vmm_log))?;
        let log2 = log.try_clone().map_err(io(&vmm_log))?;
        let (agent_fd, qmp_fd) = (agent_vmm.as_raw_fd(), qmp_vmm.as_raw_fd());
        let args = command_line(spec, &self.verdict, agent_fd, qmp_fd, &console);
        log::debug!("starting {} {}", self.binary, args.join(" "));
        let mut command = Command::new(&self.binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (prctl, fcntl) on fds that exist in the child.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in [agent_fd, qmp_fd] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = command.spawn().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => EngineError::QemuMissing {
                binary: self.binary.clone(),
            },
            _ => EngineError::Spawn {
                what: self.binary.clone(),
                source,
            },
        })?;
        drop((agent_vmm, qmp_vmm));
        let mut vm = QemuVm {
            child,
            qmp: None,
            channel: Some(agent_host),
            console,
            vmm_log,
            stopped: false,
        };
        match Qmp::handshake(qmp_host, VMM_START_TIMEOUT) {
            Ok(qmp) => vm.qmp = Some(qmp),
            Err(e) => {
                let _ = vm.stop();
                let log = read_tail(&vm.vmm_log, 5);
                return Err(EngineError::VmmExited {
                    log: if log.is_empty() { e.to_string() } else { log },
                });
            }
        }
        log::debug!(
            "qemu pid {} answering QMP after {:?}",
            vm.child.id(),
            started.elapsed()
        );
        Ok(Box::new(vm))
    }
}

#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    qmp: Option<Qmp>,
    channel: Option<UnixStream>,
    console: PathBuf,
    vmm_log: PathBuf,
    stopped: bool,
}

impl QemuVm {
    fn qmp(&mut self, command: &str) -> Result<(), EngineError> {
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| EngineError::Control("VM stopped".into()))?;
        qmp.execute(command, None).map(|_| ())
    }
}

impl Vm for QemuVm {
    fn vmm_pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
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
        if let Some(mut qmp) = self.qmp.take() {
            let _ = qmp.execute("quit", None);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => break,
            }
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .map(|_| ())
            .map_err(|e| EngineError::Control(format!("wait for qemu: {e}")))
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("qemu exited ({status})")),
            _ => None,
        }
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
pub fn read_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskSpec;

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
            work_dir: "/run/x".into(),
        }
    }

    #[test]
    fn command_line_carries_shape_disks_and_sockets() {
        let verdict = AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: String::new(),
        };
        let args = command_line(&spec(), &verdict, 7, 8, Path::new("/run/x/console.log"));
        let joined = args.join(" ");
        assert!(
            joined.contains("-accel tcg -cpu max -smp 2 -m 192M"),
            "{joined}"
        );
        assert!(joined.contains("file=/images/a,,b.ext4,if=none,id=disk0,format=raw,readonly=on"));
        assert!(joined.contains("socket,id=agent,fd=7"));
        assert!(joined.contains("socket,id=qmp,fd=8"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.ends_with("supermachine.port=agent.0 supermachine.debug=1"),
            "{append}"
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
