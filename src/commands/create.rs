//! `create`: validate the bundle, plan the VM, start the monitor, wait until the container's
//! process is ready to start, write `--pid-file`.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use agent_proto::{PassedFd, ProcessSpec};
use anyhow::{anyhow, bail, Context as _, Result};
use container::bundle::Bundle;
use container::lifecycle;
use container::monitor::{self, SyncMessage};
use container::monitored::MonitoredContainer;
use container::passed;
use container::plan::Plan;
use container::state::{rfc3339_now, write_atomic, ContainerDir, ContainerState, Status};
use liboci_cli::Create;
use nix::fcntl::OFlag;
use std::os::fd::RawFd;

use super::Context;

pub fn run(args: Create, context: &Context) -> Result<i32> {
    let passed = PassedFds::from_caller(args.preserve_fds)?;
    let bundle = Bundle::load(&args.bundle)?;
    if context.systemd_cgroup {
        require_systemd_path(&bundle)?;
    }
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && args.console_socket.is_none() {
        bail!("cannot allocate tty if supermachine will detach without setting console socket");
    }
    let created = create_container(
        &args.container_id,
        bundle,
        &passed,
        args.console_socket.as_deref(),
        args.pid_file.as_deref(),
        context,
    )?;
    // The monitor outlives this process; its parent becomes our caller's subreaper.
    drop(created.monitor);
    Ok(0)
}

/// With `--systemd-cgroup`, runc's refusal of a `cgroupsPath` that is not systemd's
/// `slice:prefix:name` (the scope is then created through systemd where it is PID 1, see
/// `container::systemd`).
fn require_systemd_path(bundle: &Bundle) -> Result<()> {
    let path = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref());
    if let Some(path) = path {
        let text = path.to_string_lossy();
        if container::systemd::Scope::parse(&text).is_none() {
            bail!(
                "expected cgroupsPath to be of format \"slice:prefix:name\" for systemd \
                 cgroups, got \"{text}\" instead"
            );
        }
    }
    Ok(())
}

/// A container whose monitor answered `Created`.
#[derive(Debug)]
pub struct Created {
    pub dir: ContainerDir,
    pub monitor: Child,
}

pub fn create_container(
    id: &str,
    bundle: Bundle,
    passed: &PassedFds,
    console_socket: Option<&Path>,
    pid_file: Option<&Path>,
    context: &Context,
) -> Result<Created> {
    let dir = context.store.create(id)?;
    match create_in(&dir, bundle, passed, console_socket, pid_file, context) {
        Ok(monitor) => Ok(Created { dir, monitor }),
        Err(e) => {
            // The monitor is gone by now; take its cgroups and state with it.
            let _ = dir.discard();
            Err(e)
        }
    }
}

fn create_in(
    dir: &ContainerDir,
    bundle: Bundle,
    passed: &PassedFds,
    console_socket: Option<&Path>,
    pid_file: Option<&Path>,
    context: &Context,
) -> Result<Child> {
    let started = std::time::Instant::now();
    // The agent's debug lines go to the guest console, a port write per byte, so they cost
    // guest time (seconds where guest kernel code is emulated) and would skew the timings
    // `--debug` logs: they have their own switch.
    let guest_debug = std::env::var("SUPERMACHINE_GUEST_DEBUG").is_ok_and(|v| v == "1");
    let mut plan = Plan::prepare(&bundle, &context.paths, guest_debug, context.snapshots)?;
    passed.give_to(&mut plan.init);
    log::debug!("container {}: planned in {:?}", dir.id, started.elapsed());
    for note in &plan.notes {
        log::warn!("container {}: {note}", dir.id);
    }
    let state = ContainerState {
        id: dir.id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        status: Status::Creating,
        pid: None,
        pid_start_time: None,
        created: rfc3339_now(),
        annotations: bundle.annotations(),
        engine: context.engine.clone(),
        exit_status: None,
        guest_pid: None,
        cgroups: Default::default(),
    };
    write_atomic(&dir.file("plan.json"), &serde_json::to_vec(&plan)?)?;
    let lock = dir.lock_state()?;
    dir.save(&state, &lock)?;
    drop(lock);

    let (sync_read, sync_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let console_socket = console_socket.map(absolute).transpose()?;
    let mut command = context.helper(&sync_write)?;
    command.args(["--engine", &context.engine, "monitor", "--id", &dir.id]);
    if let Some(socket) = &console_socket {
        command.arg("--console-socket").arg(socket);
        // With a terminal the container's stdio is the pty; our own stdio is the caller's
        // way to read *our* output to EOF (containerd's runc shim waits for that), so the
        // long-lived monitor must not keep it open.
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let mut child = command.spawn().context("start the monitor process")?;
    drop(sync_write);
    let answer = monitor::read_sync(File::from(sync_read));
    match answer {
        Some(SyncMessage::Created { engine }) => {
            log::debug!(
                "container {} created on {engine}, monitor pid {}, {:?} after create began",
                dir.id,
                child.id(),
                started.elapsed()
            );
        }
        Some(SyncMessage::Failed { error }) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!(error));
        }
        None => {
            let _ = child.kill();
            let status = child.wait().ok();
            if status.and_then(|s| s.signal()) == Some(libc::SIGSYS) {
                bail!(
                    "the monitor process, which runs the builtin VMM, was killed by its system \
                     call filter (SIGSYS): a vCPU or device thread made a call it forbids"
                );
            }
            let status = status.map(|s| s.to_string()).unwrap_or_default();
            bail!("the monitor process exited before the container was created ({status})");
        }
    }
    // The monitor (and the container's network namespace) exists: the hooks that prepare
    // the container from the host run now. If one fails, the container is gone.
    let container = MonitoredContainer { dir: dir.clone() };
    if let Err(e) = lifecycle::created(&container) {
        let _ = child.wait();
        return Err(e.into());
    }
    if let Some(path) = pid_file {
        if let Err(e) = absolute(path).and_then(|path| {
            write_atomic(&path, child.id().to_string().as_bytes()).map_err(Into::into)
        }) {
            let _ = lifecycle::delete(&container, true);
            let _ = child.wait();
            return Err(e);
        }
    }
    Ok(child)
}

/// The descriptors the caller hands to the container's first process, as runc takes them:
/// systemd's socket activation (`LISTEN_FDS` descriptors from 3, when `LISTEN_PID` is this
/// process), then `--preserve-fds` more, each at its own number. The monitor inherits them
/// and relays each (see `container::passed`); one the VM cannot stand in for fails
/// `create`, naming it, rather than the process starting without it.
#[derive(Debug, Default)]
pub struct PassedFds {
    fds: Vec<PassedFd>,
    listen: u32,
}

impl PassedFds {
    /// `create`'s and `run`'s: socket activation's and `--preserve-fds`.
    pub fn from_caller(preserve_fds: i32) -> Result<Self> {
        Self::classify(listen_fds(), preserve_fds)
    }

    /// `exec`'s: `--preserve-fds` only, as runc's exec takes no socket activation.
    pub fn preserved(preserve_fds: i32) -> Result<Self> {
        Self::classify(0, preserve_fds)
    }

    fn classify(listen: u32, preserve_fds: i32) -> Result<Self> {
        let preserve = u32::try_from(preserve_fds).unwrap_or(0);
        let mut fds = Vec::new();
        for (fd, option) in (0..listen)
            .map(|i| (3 + i, format!("LISTEN_FDS={listen} (socket activation)")))
            .chain((0..preserve).map(|i| (3 + listen + i, format!("--preserve-fds {preserve}"))))
        {
            let kind = passed::classify(fd as RawFd).map_err(|e| anyhow!("{option}: {e}"))?;
            fds.push(PassedFd { fd, kind });
        }
        Ok(PassedFds { fds, listen })
    }

    /// Puts them in the process's spec, with runc's `LISTEN_FDS` and `LISTEN_PID`.
    pub fn give_to(&self, process: &mut ProcessSpec) {
        process.passed_fds = self.fds.clone();
        if self.listen > 0 {
            process.env.push(format!("LISTEN_FDS={}", self.listen));
            process.env.push("LISTEN_PID=1".to_string());
        }
    }
}

/// How many descriptors systemd's socket activation passes to this process: `LISTEN_FDS`,
/// when `LISTEN_PID` names this process (as go-systemd's activation reads them for runc).
fn listen_fds() -> u32 {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<u32>().ok());
    count.filter(|_| ours).unwrap_or(0)
}

pub fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("current directory")?
            .join(path))
    }
}
