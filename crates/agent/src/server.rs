//! The agent's one loop: host requests, process stdio and exits, all through `poll`.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use agent_proto::{
    encode_data, encode_message, AgentInfo, AgentMessage, ExitStatus, Frame, FrameDecoder,
    HostMessage, ProcessId, Reply, Request, Stream, INIT_PROCESS, PROTOCOL_VERSION,
};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{shutdown, Shutdown, SockaddrStorage};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::cgroup::ContainerCgroup;
use crate::channel::Channel;
use crate::cmdline::Cmdline;
use crate::passed::{self, AgentEnd};
use crate::userns::ContainerUserNamespace;
use crate::{agent_debug, agent_log, cpus, network, procfs, seccomp, setup, spawn, warm};

/// How long an exited process's output may stay open (held by its own background children)
/// before the agent reports the exit anyway.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(200);

/// How much one read from the host channel takes at most.
const CHANNEL_READ_SIZE: usize = 256 << 10;

/// How often to look for a host again while none is connected.
const RECONNECT_POLL: Duration = Duration::from_millis(5);

#[derive(Debug)]
pub struct AgentError(pub String);

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug)]
struct Process {
    pid: Pid,
    /// Where the host's bytes go: stdin (a pipe, or the pty master), passed pipes and
    /// sockets, connections to passed listeners.
    inputs: Vec<Input>,
    /// stdout/stderr pipes, or the pty master as stdout; passed pipes, sockets and
    /// connections.
    outputs: Vec<(Stream, OwnedFd)>,
    /// Passed listening sockets: their descriptor numbers in the process, and addresses.
    listeners: Vec<(u32, SockaddrStorage)>,
    /// How much more of each connection's output the host takes now (see
    /// `Request::Credit`); an output at 0 is not read until more comes.
    credits: BTreeMap<Stream, u32>,
    pty: bool,
    /// Stopped at its first instruction until `StartProcess` (see `spawn`). A signal that
    /// kills by default ends it then; others reach it when it starts.
    held: bool,
    exit: Option<(ExitStatus, Instant)>,
}

/// One stream from the host into the guest.
#[derive(Debug)]
struct Input {
    stream: Stream,
    fd: OwnedFd,
    pending: Vec<u8>,
    eof: bool,
    /// A socket is shut for writing at the host's EOF: the agent's descriptor (a copy of its
    /// output's) stays, so closing it would not end the stream.
    socket: bool,
}

impl Input {
    fn new(stream: Stream, fd: OwnedFd, socket: bool) -> Self {
        set_nonblocking(&fd);
        Input {
            stream,
            fd,
            pending: Vec::new(),
            eof: false,
            socket,
        }
    }

    /// Writes what the descriptor takes now; the rest waits for POLLOUT. Returns whether
    /// the input is done (its EOF delivered, or its reader gone).
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() {
            match nix::unistd::write(&self.fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(Errno::EAGAIN) => return false,
                Err(Errno::EINTR) => continue,
                // The reader is gone (EPIPE): nobody will read the rest.
                Err(_) => return true,
            }
        }
        if self.eof && self.socket {
            let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Write);
        }
        self.eof
    }
}

enum Readiness {
    Channel,
    Dns,
    Signals,
    CgroupEvents,
    Output(ProcessId, usize),
    Input(ProcessId, usize),
}

/// What the guest kernel says of itself: the same for the whole boot, and for every VM
/// restored from a snapshot of it, so read once at start instead of at each host's hello
/// (where each restored VM would run the code for it anew).
#[derive(Debug)]
struct KernelIdentity {
    /// `uname -r`.
    release: String,
    boot_id: String,
}

impl KernelIdentity {
    fn read() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        // Reading the boot id also fixes it: the kernel makes it on first read, and a VM
        // snapshotted before that would give each restored copy its own.
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        KernelIdentity { release, boot_id }
    }
}

#[derive(Debug)]
pub struct Server {
    channel: Channel,
    kernel: KernelIdentity,
    connected: bool,
    decoder: FrameDecoder,
    signals: SignalFd,
    processes: BTreeMap<ProcessId, Process>,
    container_ready: bool,
    /// The root overlay mounted by `PrepareRoot` (before a snapshot), if it was.
    prepared_root: Option<agent_proto::RootfsSpec>,
    /// The mounts left for the container's first process (PID 1 of its pid namespace).
    container_mounts: Option<setup::ContainerMounts>,
    /// The container's cgroup, once set up (when the host asked for one).
    cgroup: Option<ContainerCgroup>,
    /// config.json's seccomp filter, compiled at setup; every container process installs it.
    seccomp: Option<seccomp::Filter>,
    /// config.json's user namespace, made at setup; every container process joins it.
    user_namespace: Option<ContainerUserNamespace>,
    /// The guest's vCPUs, taken online and offline by a live update.
    cpus: cpus::Cpus,
    /// virtio-net devices held detached until the host connects them.
    detached_nics: network::DetachedNics,
    dns: Option<network::DnsRelay>,
    shutdown: bool,
    started: Instant,
    /// One buffer for every read from the channel and from process output, allocated once:
    /// a buffer allocated (and zeroed) per read takes a page fault for each page it
    /// touches, milliseconds each where the guest kernel is emulated.
    scratch: Scratch,
}

struct Scratch(Box<[u8]>);

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scratch({} bytes)", self.0.len())
    }
}

impl Server {
    pub fn new(channel: Channel, _cmdline: Cmdline) -> Result<Self, AgentError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block()
            .map_err(|e| AgentError(format!("block SIGCHLD: {e}")))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| AgentError(format!("signalfd: {e}")))?;
        agent_debug!("host channel on {}", channel.path().display());
        Ok(Server {
            channel,
            kernel: KernelIdentity::read(),
            connected: true,
            decoder: FrameDecoder::new(),
            signals,
            processes: BTreeMap::new(),
            container_ready: false,
            prepared_root: None,
            container_mounts: None,
            cgroup: None,
            seccomp: None,
            user_namespace: None,
            cpus: cpus::Cpus::open(),
            detached_nics: network::DetachedNics::detach_all(),
            dns: None,
            shutdown: false,
            started: Instant::now(),
            scratch: Scratch(vec![0u8; CHANNEL_READ_SIZE.max(agent_proto::MAX_DATA_CHUNK)].into()),
        })
    }

    fn info(&self) -> AgentInfo {
        AgentInfo {
            version: PROTOCOL_VERSION,
            kernel_release: self.kernel.release.clone(),
            uptime_ms: uptime_ms(),
            boot_id: self.kernel.boot_id.clone(),
        }
    }

    pub fn run(&mut self) -> Result<(), AgentError> {
        // Blocks until a host connects: then the guest is ready for it.
        self.send(&AgentMessage::Ready(self.info()))?;
        agent_debug!("ready after {:?} in the agent", self.started.elapsed());
        while !self.shutdown {
            self.turn()?;
        }
        Ok(())
    }

    fn send(&mut self, message: &AgentMessage) -> Result<(), AgentError> {
        let mut out = Vec::new();
        encode_message(message, &mut out).map_err(|e| AgentError(format!("encode: {e}")))?;
        self.write(&out)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.channel
            .write_all(bytes)
            .map_err(|e| AgentError(format!("channel write: {e}")))
    }

    /// One poll round.
    fn turn(&mut self) -> Result<(), AgentError> {
        let mut fds: Vec<PollFd> = Vec::new();
        let mut what: Vec<Readiness> = Vec::new();
        // SAFETY (for the borrows below): every fd polled is owned by `self` and stays open
        // until `fds` is dropped at the end of this block, before anything is closed.
        let channel_fd = borrow(&self.channel);
        if self.connected {
            fds.push(PollFd::new(channel_fd, PollFlags::POLLIN));
            what.push(Readiness::Channel);
        }
        fds.push(PollFd::new(borrow(&self.signals), PollFlags::POLLIN));
        what.push(Readiness::Signals);
        if let Some(dns) = &self.dns {
            fds.push(PollFd::new(borrow(&dns.socket), PollFlags::POLLIN));
            what.push(Readiness::Dns);
        }
        if let Some(events) = self.cgroup.as_ref().and_then(|c| c.events_fd()) {
            fds.push(PollFd::new(borrow(&events), PollFlags::POLLIN));
            what.push(Readiness::CgroupEvents);
        }
        let mut deadline: Option<Instant> = None;
        for (&id, process) in &self.processes {
            for (index, (stream, fd)) in process.outputs.iter().enumerate() {
                if process.credits.get(stream) == Some(&0) {
                    continue;
                }
                fds.push(PollFd::new(borrow(fd), PollFlags::POLLIN));
                what.push(Readiness::Output(id, index));
            }
            for (index, input) in process.inputs.iter().enumerate() {
                if !input.pending.is_empty() {
                    fds.push(PollFd::new(borrow(&input.fd), PollFlags::POLLOUT));
                    what.push(Readiness::Input(id, index));
                }
            }
            if let Some((_, at)) = process.exit {
                let d = at + OUTPUT_DRAIN_GRACE;
                deadline = Some(deadline.map_or(d, |x| x.min(d)));
            }
        }
        let mut timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if !self.connected {
            timeout = Some(timeout.map_or(RECONNECT_POLL, |t| t.min(RECONNECT_POLL)));
        }
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t.as_millis().min(60_000) as i32 + 1)
                .unwrap_or(PollTimeout::MAX),
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(AgentError(format!("poll: {e}"))),
        }
        let ready: Vec<(usize, PollFlags)> = fds
            .iter()
            .enumerate()
            .filter_map(|(i, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (i, r)))
            .collect();
        drop(fds);

        if !self.connected && self.host_reconnected() {
            self.connected = true;
        }
        for (index, revents) in ready {
            match what[index] {
                Readiness::Channel => self.on_channel(revents)?,
                Readiness::Signals => self.reap(),
                Readiness::Dns => self.relay_dns()?,
                Readiness::CgroupEvents => self.report_oom_kills()?,
                Readiness::Output(id, slot) => self.on_output(id, slot)?,
                Readiness::Input(id, slot) => self.flush_input(id, slot),
            }
        }
        self.report_exits()
    }

    /// With no host, `poll` on the port reports HUP (with IN: a read returns 0 at once); a
    /// host is back when HUP is gone.
    fn host_reconnected(&self) -> bool {
        let mut fds = [PollFd::new(borrow(&self.channel), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok()
            && fds[0]
                .revents()
                .is_some_and(|r| !r.contains(PollFlags::POLLHUP))
    }

    fn on_channel(&mut self, revents: PollFlags) -> Result<(), AgentError> {
        let n = if revents.contains(PollFlags::POLLIN) {
            match self.channel.read(&mut self.scratch.0[..CHANNEL_READ_SIZE]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
                Err(e) => return Err(AgentError(format!("channel read: {e}"))),
            }
        } else {
            0
        };
        if n == 0 {
            // The host went away (it was killed, or this VM was restored from a snapshot).
            agent_debug!("host disconnected");
            self.connected = false;
            self.decoder.reset();
            return Ok(());
        }
        self.decoder.push(&self.scratch.0[..n]);
        loop {
            let frame = match self.decoder.next_frame::<HostMessage>() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    // A corrupt stream cannot be resynchronised; wait for the host to reconnect.
                    agent_log!("dropping corrupt input from the host: {e}");
                    self.decoder.reset();
                    break;
                }
            };
            match frame {
                Frame::Message(message) => {
                    let started = Instant::now();
                    let name = message.request.name();
                    let result = self.handle(message.request).map_err(|e| e.0);
                    agent_debug!("request {} {name} took {:?}", message.id, started.elapsed());
                    self.send(&AgentMessage::Response {
                        id: message.id,
                        result,
                    })?;
                }
                Frame::Data {
                    process,
                    stream,
                    bytes,
                } => self.on_input(process, stream, bytes),
            }
        }
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Result<Reply, AgentError> {
        match request {
            Request::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    return Err(AgentError(format!(
                        "host protocol {version}, agent protocol {PROTOCOL_VERSION}"
                    )));
                }
                Ok(Reply::Hello(self.info()))
            }
            Request::SetClock { unix_secs, nanos } => {
                let ts = nix::sys::time::TimeSpec::new(unix_secs, nanos as i64);
                nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
                    .map_err(|e| AgentError(format!("clock_settime: {e}")))?;
                Ok(Reply::Ok)
            }
            Request::AddEntropy { bytes } => {
                add_entropy(&bytes)?;
                Ok(Reply::Ok)
            }
            Request::PrepareRoot(rootfs) => {
                if self.prepared_root.is_some() || self.container_ready {
                    return Err(AgentError("the root is already prepared".into()));
                }
                self.prepare_root(rootfs)?;
                Ok(Reply::Ok)
            }
            Request::SetupContainer(config) => {
                if self.container_ready {
                    return Err(AgentError("the container is already set up".into()));
                }
                match &self.prepared_root {
                    // The image disk is what was prepared; the shares are attached now.
                    Some(rootfs)
                        if rootfs.source.image_disk() == config.rootfs.source.image_disk() => {}
                    Some(rootfs) => {
                        return Err(AgentError(format!(
                            "the root was prepared from {:?}, not {:?}",
                            rootfs.source.image_disk(),
                            config.rootfs.source.image_disk()
                        )))
                    }
                    None => self.prepare_root(config.rootfs.clone())?,
                }
                // Compiled first: a profile the guest cannot build fails the setup.
                let seccomp = config
                    .seccomp
                    .as_ref()
                    .map(seccomp::compile)
                    .transpose()
                    .map_err(AgentError)?;
                if let Some(filter) = &seccomp {
                    agent_debug!("seccomp filter of {} instructions", filter.instructions());
                }
                // Made before the setup enters the container root, out of the container's
                // sight.
                let cgroup = config
                    .cgroup
                    .as_ref()
                    .map(ContainerCgroup::create)
                    .transpose()
                    .map_err(|e| AgentError(e.0))?;
                let user_namespace = config
                    .user_namespace
                    .as_ref()
                    .map(ContainerUserNamespace::create)
                    .transpose()
                    .map_err(|e| AgentError(e.0))?;
                self.container_mounts = setup::setup_container(&config, cgroup.as_ref())
                    .map_err(|e| AgentError(e.0))?;
                self.cgroup = cgroup;
                self.seccomp = seccomp;
                self.user_namespace = user_namespace;
                self.container_ready = true;
                Ok(Reply::Ok)
            }
            Request::CreateProcess {
                process,
                spec,
                start,
            } => {
                if !self.container_ready {
                    return Err(AgentError("the container is not set up".into()));
                }
                if self.processes.contains_key(&process) {
                    return Err(AgentError(format!("process {process} already exists")));
                }
                let mounts = self.container_mounts.take();
                let container = spawn::Container {
                    mounts: mounts.as_ref(),
                    cgroup: self.cgroup.as_ref(),
                    seccomp: self.seccomp.as_ref(),
                    user_namespace: self.user_namespace.as_ref(),
                };
                let spawned = spawn::spawn(&spec, !start, &container).map_err(AgentError)?;
                let pid = spawned.pid;
                let pid_of = spawned.pid;
                match into_process(spawned) {
                    Ok(p) => self.processes.insert(process, p),
                    Err(e) => {
                        let _ = kill(pid_of, Signal::SIGKILL);
                        return Err(e);
                    }
                };
                Ok(Reply::Created { pid: pid.as_raw() })
            }
            Request::StartProcess { process } => {
                let p = self.process(process)?;
                if !std::mem::take(&mut p.held) {
                    return Err(AgentError(format!(
                        "process {process} has already been started"
                    )));
                }
                spawn::release(p.pid, None)
                    .map_err(|e| AgentError(format!("start process {process}: {e}")))?;
                Ok(Reply::Ok)
            }
            Request::Signal {
                process,
                signal,
                all,
            } => {
                let signal = Signal::try_from(signal)
                    .map_err(|_| AgentError(format!("invalid signal {signal}")))?;
                if all {
                    // From PID 1, pid -1 means every process but the agent itself.
                    match kill(Pid::from_raw(-1), signal) {
                        Ok(()) | Err(Errno::ESRCH) => return Ok(Reply::Ok),
                        Err(e) => return Err(AgentError(format!("kill -1: {e}"))),
                    }
                }
                let p = self.process(process)?;
                if p.exit.is_some() {
                    return Err(AgentError("process already finished".into()));
                }
                if p.held && spawn::fatal_by_default(signal) {
                    // As runc's init waiting for `start` would, it dies of it: let it go
                    // with the signal, which it meets before its program's first instruction.
                    p.held = false;
                    spawn::release(p.pid, Some(signal)).map_err(AgentError)?;
                    return Ok(Reply::Ok);
                }
                kill(p.pid, signal).map_err(|e| AgentError(format!("kill {}: {e}", p.pid)))?;
                Ok(Reply::Ok)
            }
            Request::ResizeTerminal {
                process,
                rows,
                cols,
            } => {
                let p = self.process(process)?;
                let Some((_, master)) = p.outputs.first().filter(|_| p.pty) else {
                    return Err(AgentError(format!("process {process} has no terminal")));
                };
                let size = libc::winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads a winsize struct that outlives the call.
                if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
                    return Err(AgentError(format!(
                        "resize terminal: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                Ok(Reply::Ok)
            }
            Request::CloseStdin { process } => {
                self.on_input(process, Stream::STDIN, Vec::new());
                Ok(Reply::Ok)
            }
            Request::Connect {
                process,
                listener,
                stream,
            } => {
                let p = self.process(process)?;
                let Some((_, address)) = p.listeners.iter().find(|(fd, _)| *fd == listener) else {
                    return Err(AgentError(format!(
                        "process {process} has no passed listener {listener}"
                    )));
                };
                if p.outputs.iter().any(|(s, _)| *s == stream)
                    || p.inputs.iter().any(|i| i.stream == stream)
                {
                    return Err(AgentError(format!("stream {} is in use", stream.0)));
                }
                let connection = passed::connect(address).map_err(AgentError)?;
                let input = connection
                    .try_clone()
                    .map_err(|e| AgentError(format!("dup: {e}")))?;
                p.outputs.push((stream, connection));
                p.inputs.push(Input::new(stream, input, true));
                p.credits.insert(stream, agent_proto::CONNECTION_WINDOW);
                Ok(Reply::Ok)
            }
            Request::Credit {
                process,
                stream,
                bytes,
            } => {
                // A connection already closed (or its process gone) has nothing to pace.
                if let Some(credit) = self
                    .processes
                    .get_mut(&process)
                    .and_then(|p| p.credits.get_mut(&stream))
                {
                    *credit = credit.saturating_add(bytes);
                }
                Ok(Reply::Ok)
            }
            Request::ListProcesses => Ok(Reply::Processes(procfs::list_processes())),
            Request::ConfigureNetwork(config) => {
                network::configure(&config, &mut self.detached_nics)
                    .map_err(|e| AgentError(e.0))?;
                if config.dns_relay && self.dns.is_none() {
                    self.dns = Some(network::DnsRelay::bind().map_err(|e| AgentError(e.0))?);
                }
                Ok(Reply::Ok)
            }
            Request::DnsAnswer { id, payload } => {
                if let Some(dns) = &mut self.dns {
                    dns.answer(id, &payload);
                }
                Ok(Reply::Ok)
            }
            Request::UpdateCgroup(settings) => {
                self.container_cgroup()?
                    .write(&settings)
                    .map_err(AgentError)?;
                Ok(Reply::Ok)
            }
            Request::OnlineCpus { count } => {
                self.cpus.keep_online(count).map_err(AgentError)?;
                Ok(Reply::Ok)
            }
            Request::Stats => Ok(Reply::Stats(self.container_cgroup()?.stats())),
            Request::Shutdown => {
                self.shutdown = true;
                Ok(Reply::Ok)
            }
        }
    }

    /// Mounts the image's disk, if the root has one, and reads what the container will need
    /// from it: before a snapshot when the host asks (`PrepareRoot`), else as the first step
    /// of the setup.
    fn prepare_root(&mut self, rootfs: agent_proto::RootfsSpec) -> Result<(), AgentError> {
        if let Some(image) = setup::prepare_root(&rootfs).map_err(|e| AgentError(e.0))? {
            warm::warm_root(image, &rootfs);
        }
        self.prepared_root = Some(rootfs);
        Ok(())
    }

    fn container_cgroup(&self) -> Result<&ContainerCgroup, AgentError> {
        self.cgroup
            .as_ref()
            .ok_or_else(|| AgentError("the container has no cgroup in this guest".into()))
    }

    /// Tells the host of OOM kills in the container's cgroup since the last report.
    fn report_oom_kills(&mut self) -> Result<(), AgentError> {
        match self.cgroup.as_mut().and_then(|c| c.new_oom_kills()) {
            Some(kills) => {
                agent_debug!("the OOM killer killed {kills} container process(es)");
                self.send(&AgentMessage::OomKilled { kills })
            }
            None => Ok(()),
        }
    }

    fn process(&mut self, id: ProcessId) -> Result<&mut Process, AgentError> {
        self.processes
            .get_mut(&id)
            .ok_or_else(|| AgentError(format!("no process {id}")))
    }

    fn on_input(&mut self, id: ProcessId, stream: Stream, bytes: Vec<u8>) {
        let Some(p) = self.processes.get_mut(&id) else {
            return;
        };
        let Some(slot) = p.inputs.iter().position(|i| i.stream == stream) else {
            // Closed already, or never one: nobody would read it.
            return;
        };
        let input = &mut p.inputs[slot];
        if bytes.is_empty() {
            input.eof = true;
        } else {
            input.pending.extend_from_slice(&bytes);
        }
        self.flush_input(id, slot);
    }

    fn flush_input(&mut self, id: ProcessId, slot: usize) {
        let Some(p) = self.processes.get_mut(&id) else {
            return;
        };
        if p.inputs.get_mut(slot).is_some_and(Input::flush) {
            // A terminal's stdin is a copy of the master: its EOF is the line discipline's.
            p.inputs.remove(slot);
        }
    }

    fn on_output(&mut self, id: ProcessId, slot: usize) -> Result<(), AgentError> {
        let buf = &mut self.scratch.0[..agent_proto::MAX_DATA_CHUNK];
        let mut out = Vec::new();
        let Some(p) = self.processes.get_mut(&id) else {
            return Ok(());
        };
        let Some((stream, fd)) = p.outputs.get(slot) else {
            return Ok(());
        };
        let stream = *stream;
        let mut closed = false;
        let mut credit = p.credits.get(&stream).copied();
        // Bounded, so that one chatty process cannot starve the loop.
        for _ in 0..16 {
            let want = credit.map_or(buf.len(), |c| buf.len().min(c as usize));
            if want == 0 {
                break;
            }
            match nix::unistd::read(fd.as_raw_fd(), &mut buf[..want]) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    encode_data(id, stream, &buf[..n], &mut out);
                    credit = credit.map(|c| c - n as u32);
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                // EIO: the last holder of a pty slave closed it.
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if let Some(left) = credit {
            p.credits.insert(stream, left);
        }
        if closed {
            p.outputs.remove(slot);
            p.credits.remove(&stream);
            encode_data(id, stream, &[], &mut out);
        }
        self.write(&out)
    }

    /// Sends the DNS queries waiting at the relay address to the host.
    fn relay_dns(&mut self) -> Result<(), AgentError> {
        let mut queries = Vec::new();
        if let Some(dns) = &mut self.dns {
            while let Some(query) = dns.receive() {
                queries.push(query);
            }
        }
        for (id, payload) in queries {
            self.send(&AgentMessage::DnsQuery { id, payload })?;
        }
        Ok(())
    }

    /// Reaps every exited child; the container's processes get their status recorded.
    fn reap(&mut self) {
        while let Ok(Some(_)) = self.signals.read_signal() {}
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => status,
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, ExitStatus::Exited(code)),
                WaitStatus::Signaled(pid, signal, _) => (pid, ExitStatus::Signaled(signal as i32)),
                _ => continue,
            };
            let Some((&id, p)) = self.processes.iter_mut().find(|(_, p)| p.pid == pid) else {
                continue;
            };
            agent_debug!("process {id} (pid {pid}) ended: {exit:?}");
            p.exit = Some((exit, Instant::now()));
            p.held = false;
            if id == INIT_PROCESS {
                // The container ends with its first process, as a pid namespace would.
                let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            }
        }
    }

    /// Sends `Exited` for processes whose output is drained (or whose grace ran out).
    fn report_exits(&mut self) -> Result<(), AgentError> {
        let now = Instant::now();
        let done: Vec<ProcessId> = self
            .processes
            .iter()
            .filter(|(_, p)| match p.exit {
                Some((_, at)) => p.outputs.is_empty() || now >= at + OUTPUT_DRAIN_GRACE,
                None => false,
            })
            .map(|(&id, _)| id)
            .collect();
        if !done.is_empty() {
            // A process the OOM killer ended is reported as such before its exit, as the
            // kernel's event reaches a runtime on the host before the exit status.
            self.report_oom_kills()?;
        }
        for id in done {
            let Some(p) = self.processes.remove(&id) else {
                continue;
            };
            let mut out = Vec::new();
            for (stream, _) in &p.outputs {
                encode_data(id, *stream, &[], &mut out);
            }
            if let Some((status, _)) = p.exit {
                encode_message(
                    &AgentMessage::Exited {
                        process: id,
                        status,
                    },
                    &mut out,
                )
                .map_err(|e| AgentError(format!("encode: {e}")))?;
            }
            self.write(&out)?;
        }
        Ok(())
    }
}

fn into_process(spawned: spawn::Spawned) -> Result<Process, AgentError> {
    let mut outputs = Vec::new();
    let mut inputs = Vec::new();
    let mut listeners = Vec::new();
    let pty = spawned.pty_master.is_some();
    if let Some(master) = &spawned.pty_master {
        let copy = master
            .try_clone()
            .map_err(|e| AgentError(format!("dup the pty master: {e}")))?;
        inputs.push(Input::new(Stream::STDIN, copy, false));
    }
    if let Some(fd) = spawned.stdin {
        inputs.push(Input::new(Stream::STDIN, fd, false));
    }
    for (stream, fd) in [
        (Stream::STDOUT, spawned.pty_master),
        (Stream::STDOUT, spawned.stdout),
        (Stream::STDERR, spawned.stderr),
    ] {
        if let Some(fd) = fd {
            set_nonblocking(&fd);
            outputs.push((stream, fd));
        }
    }
    for (stream, end) in spawned.passed {
        match end {
            AgentEnd::Input(fd) => inputs.push(Input::new(stream, fd, false)),
            AgentEnd::Output(fd) => {
                set_nonblocking(&fd);
                outputs.push((stream, fd));
            }
            AgentEnd::Both(fd) => {
                let copy = fd
                    .try_clone()
                    .map_err(|e| AgentError(format!("dup: {e}")))?;
                inputs.push(Input::new(stream, copy, true));
                set_nonblocking(&fd);
                outputs.push((stream, fd));
            }
            AgentEnd::Listener(address) => listeners.push((stream.0, address)),
            AgentEnd::Nothing => {}
        }
    }
    Ok(Process {
        pid: spawned.pid,
        inputs,
        outputs,
        listeners,
        credits: BTreeMap::new(),
        pty,
        held: spawned.held,
        exit: None,
    })
}

fn set_nonblocking(fd: &OwnedFd) {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap_or(0);
    let _ = fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    );
}

/// Borrows an fd for one poll round; see the SAFETY note in `Server::turn`.
fn borrow<T: AsFd>(owner: &T) -> BorrowedFd<'static> {
    let raw = owner.as_fd().as_raw_fd();
    // SAFETY: callers drop the borrowed fd before `owner` can be closed (within one turn).
    unsafe { BorrowedFd::borrow_raw(raw) }
}

fn uptime_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME);
    ts.map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Credits host entropy to the guest pool and forces a CRNG reseed, so that VMs restored
/// from one snapshot diverge at once.
fn add_entropy(bytes: &[u8]) -> Result<(), AgentError> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| AgentError(format!("open /dev/urandom: {e}")))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` is a complete rand_pool_info of `bytes.len()` payload bytes that lives
    // across the call; the kernel only reads it.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(AgentError(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(AgentError(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
