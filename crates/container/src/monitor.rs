//! The monitor: the one host process per container that runc's contract asks for.
//!
//! `create` starts it and puts its pid in `--pid-file`. It boots the VM, sets the container
//! up through the agent, holds the container's stdio (or the pty it sent to
//! `--console-socket`), serves the control socket, forwards the signals it receives to the
//! container's process, and exits with that process's status (128+N when killed by signal
//! N; 255 when the VM itself died). QEMU is its child and dies with it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agent_proto::{
    encode_data, encode_message, read_frame, ExitStatus, Frame, ProcessId, Reply, Request, Stream,
    INIT_PROCESS,
};
use engine::Vm;
use lock_ext::LockExt;
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::agent_client::{AgentClient, ProcessEvents, REQUEST_TIMEOUT};
use crate::console::{self, HostConsole};
use crate::control::{self, ControlReply, ControlRequest};
use crate::lifecycle::VM_DIED_STATUS;
use crate::plan::Plan;
use crate::relay::{self, FdOutput};
use crate::startup::{self, RunningVm, TapLifetime, VmNetwork, VmStartup};
use crate::state::{ContainerDir, StateStore, Status, Verb};
use crate::{cgroup, passed, proc, reclaim, ContainerError, Paths};

/// What `create` passes to the monitor it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorArgs {
    pub state_root: PathBuf,
    pub id: String,
    pub console_socket: Option<PathBuf>,
    pub engine: String,
}

/// The monitor's answer to `create`, one JSON line on the sync pipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMessage {
    Created { engine: String },
    Failed { error: String },
}

/// Signals forwarded to the container's process (all catchable ones but SIGCHLD and
/// SIGPIPE); SIGWINCH resizes its terminal instead. With the builtin engine the VMM's vCPU
/// threads take `SIGRTMIN` for their kicks (hypervisor::kvm), so that one is not forwarded.
fn forwarded_signals() -> SigSet {
    let mut set = SigSet::all();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGPIPE,
        Signal::SIGKILL,
        Signal::SIGSTOP,
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGILL,
        Signal::SIGFPE,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGTSTP,
    ] {
        set.remove(s);
    }
    set
}

enum Event {
    InitExited(ExitStatus),
    AgentGone,
    Stop,
}

/// Runs a monitor to its end and returns its exit status. `sync` is the pipe to `create`.
pub fn run(args: MonitorArgs, sync: Option<OwnedFd>) -> i32 {
    let signals = forwarded_signals();
    // Before any thread exists, so that every thread inherits the mask and only the
    // forwarding thread receives these signals.
    if let Err(e) = signals.thread_block() {
        log::warn!("block signals: {e}");
    }
    let _ = nix::unistd::setsid();
    let mut sync = sync.map(File::from);
    let store = StateStore::new(&args.state_root);
    let dir = match store.open(&args.id) {
        Ok(dir) => dir,
        Err(e) => {
            report(
                &mut sync,
                SyncMessage::Failed {
                    error: e.to_string(),
                },
            );
            return 1;
        }
    };
    let started = Instant::now();
    // Known from the start, so that `delete --force` of a container still being created
    // (its VM booting) finds the process to stop; a container deleted before that (see
    // `MonitoredContainer::stop`) is not started at all.
    if let Err(e) = record_pid(&dir) {
        report(
            &mut sync,
            SyncMessage::Failed {
                error: e.to_string(),
            },
        );
        return 1;
    }
    match Monitor::start(&args, &dir, started) {
        Ok(monitor) => {
            report(
                &mut sync,
                SyncMessage::Created {
                    engine: monitor.engine_name.clone(),
                },
            );
            drop(sync);
            monitor.serve(signals, started)
        }
        Err(e) => {
            log::debug!("monitor for {} failed: {e}", args.id);
            report(
                &mut sync,
                SyncMessage::Failed {
                    error: e.to_string(),
                },
            );
            1
        }
    }
}

/// Records this monitor's pid in the state of a container still being created.
fn record_pid(dir: &ContainerDir) -> Result<(), ContainerError> {
    let lock = dir.lock_state()?;
    let mut state = dir.load()?;
    if state.status != Status::Creating || state.pid.is_some() {
        return Err(ContainerError::InvalidState(format!(
            "container {} was deleted while it was being created",
            dir.id
        )));
    }
    let pid = std::process::id() as i32;
    state.pid = Some(pid);
    state.pid_start_time = proc::start_time(pid);
    dir.save(&state, &lock)
}

fn report(sync: &mut Option<File>, message: SyncMessage) {
    if let Some(file) = sync {
        let mut line = serde_json::to_vec(&message).unwrap_or_default();
        line.push(b'\n');
        let _ = file.write_all(&line);
    }
}

/// Reads the monitor's answer; `None` if it exited without one.
pub fn read_sync(mut pipe: File) -> Option<SyncMessage> {
    let mut text = String::new();
    let _ = pipe.read_to_string(&mut text);
    serde_json::from_str(text.lines().next()?).ok()
}

struct Monitor {
    dir: ContainerDir,
    publisher: Option<std::thread::JoinHandle<()>>,
    vm: Arc<Mutex<Box<dyn Vm>>>,
    agent: AgentClient,
    console: Option<HostConsole>,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    listener: UnixListener,
    engine_name: String,
    next_exec: Arc<Mutex<ProcessId>>,
    network: Arc<Mutex<VmNetwork>>,
    /// Set when the agent reports the container's first process gone, before the event.
    init_exited: Arc<AtomicBool>,
    /// Control requests being answered: the monitor answers them before it exits.
    in_flight: InFlight,
    /// The host overlay root a renewer thread remounts after the guest's changes.
    renewed_root: Option<PathBuf>,
    /// The VM's place in the host's capacity ledger, released once it has stopped.
    reservation: crate::capacity::Reservation,
}

impl Monitor {
    fn start(
        args: &MonitorArgs,
        dir: &ContainerDir,
        started: Instant,
    ) -> Result<Self, ContainerError> {
        let plan = Plan::load(dir)?;
        // Host placement first, so the VMM inherits it: the container's cgroup (recorded at
        // once, so that delete removes it whatever happens next) and network namespace.
        if let Some(path) = &plan.cgroups_path {
            let placement = cgroup::place(std::process::id(), path, &plan.host_limits)?;
            dir.update(|s| s.cgroups = placement)?;
        }
        let console = match &args.console_socket {
            Some(socket) => Some(HostConsole::create_and_send(
                socket,
                plan.init.console_size,
            )?),
            None => None,
        };
        let (events_tx, events) = mpsc::channel();
        let init_exit = events_tx.clone();
        let (out, err) = match &console {
            Some(c) => (c.slave.as_raw_fd(), c.slave.as_raw_fd()),
            None => (1, 2),
        };
        let init_exited = Arc::new(AtomicBool::new(false));
        let exited_flag = Arc::clone(&init_exited);
        let passed_ends = Arc::new(passed::HostEnds::default());
        let passed_fds = plan.init.passed_fds.clone();
        let init_events = Box::new(
            FdOutput::new(out, err, move |status| {
                exited_flag.store(true, Ordering::SeqCst);
                let _ = init_exit.send(Event::InitExited(status));
            })
            .with_passed(Arc::clone(&passed_ends)),
        );
        // Bound before the VM starts, so that nothing can fail between its start and `created`
        // but the state's update.
        let listener = control::bind_unix(&dir.file(control::SOCKET_NAME))
            .map_err(ContainerError::io(dir.file(control::SOCKET_NAME)))?;
        // This process owns the VMM: the start-up enters the container's network namespace
        // here, where the tap can go with the namespace.
        let renewed_root = plan.renewed_root.clone();
        let running = startup::start_vm(VmStartup {
            plan,
            engine: args.engine.parse()?,
            paths: Paths::new(Some(args.state_root.clone())),
            work_dir: dir.path.clone(),
            tap_lifetime: TapLifetime::WithNamespace,
            init_events,
        })?;
        log::debug!(
            "container {} created in {:.1}ms",
            dir.id,
            started.elapsed().as_secs_f64() * 1000.0
        );
        let RunningVm {
            vm,
            agent,
            engine_name,
            guest_pid,
            network,
            publisher,
            reservation,
            ..
        } = running;
        let gone = events_tx.clone();
        agent.on_close(move || {
            let _ = gone.send(Event::AgentGone);
        });
        let input = match &console {
            Some(c) => c.slave.try_clone().map(File::from).ok(),
            // SAFETY: fd 0 is this process's stdin, which it hands over to the relay for good.
            None => Some(unsafe { File::from_raw_fd(0) }),
        };
        if let Some(input) = input {
            let stdin_agent = agent.clone();
            relay::pump_input("stdin", input, console.is_some(), move |bytes| {
                stdin_agent.send_stdin(INIT_PROCESS, bytes).is_ok()
            });
        }
        let init = passed::AgentProcess {
            agent: agent.clone(),
            process: INIT_PROCESS,
        };
        passed::relay(&init, &passed_fds, &passed_ends);
        let pid = std::process::id() as i32;
        let recorded = dir.update(|s| {
            s.status = Status::Created;
            s.pid = Some(pid);
            s.pid_start_time = proc::start_time(pid);
            s.engine = engine_name.clone();
            s.guest_pid = Some(guest_pid);
        });
        if let Err(e) = recorded {
            let mut vm = vm;
            let _ = vm.stop();
            if let Some(publisher) = publisher {
                let _ = publisher.join();
            }
            return Err(e);
        }
        Ok(Monitor {
            dir: dir.clone(),
            publisher,
            vm: Arc::new(Mutex::new(vm)),
            agent,
            console,
            events,
            events_tx,
            listener,
            engine_name,
            next_exec: Arc::new(Mutex::new(INIT_PROCESS + 1)),
            network: Arc::new(Mutex::new(network)),
            init_exited,
            in_flight: InFlight::default(),
            renewed_root,
            reservation,
        })
    }

    fn serve(self, signals: SigSet, started: Instant) -> i32 {
        self.spawn_signal_forwarder(signals);
        self.spawn_control_server();
        let code = match self.events.recv() {
            Ok(Event::InitExited(status)) => {
                // Stopped from now on, as under runc the moment its process is gone: the
                // VM's shutdown below takes a while (a bake being sealed longer), and verbs
                // meanwhile must find a stopped container, not a closing agent connection.
                let code = status.code();
                if let Err(e) = self.dir.update(|s| {
                    s.status = Status::Stopped;
                    s.exit_status = Some(code);
                }) {
                    log::debug!("record exit: {e}");
                }
                code
            }
            Ok(Event::Stop) => 128 + libc::SIGKILL,
            Ok(Event::AgentGone) | Err(_) => {
                let mut vm = self.vm.lock_unpoisoned();
                let why = vm
                    .exited()
                    .unwrap_or_else(|| "the agent connection closed".into());
                log::warn!(
                    "container {}: VM died ({why}); last console lines:\n{}",
                    self.dir.id,
                    vm.console_tail(15)
                );
                VM_DIED_STATUS
            }
        };
        log::debug!(
            "container {} exited with {code} at {:.1}ms",
            self.dir.id,
            started.elapsed().as_secs_f64() * 1000.0
        );
        if let Some(publisher) = self.publisher {
            // A bake being sealed must finish (or fail) before the monitor goes.
            let _ = publisher.join();
        }
        self.agent.shutdown();
        self.network.lock_unpoisoned().detach();
        if let Err(e) = self.vm.lock_unpoisoned().stop() {
            log::warn!("stopping the VM: {e}");
        }
        drop(self.reservation);
        // The root renewer's thread dies with this process: one caught between its unmount
        // and its mount would leave the bundle's root unmounted. Its lock waits out a renewal
        // in progress and keeps any other from starting; the kernel releases it at exit.
        if let Some(root) = &self.renewed_root {
            match crate::rootfs::lock_root(root) {
                Ok(lock) => std::mem::forget(lock),
                Err(e) => log::debug!("{e}"),
            }
        }
        let _ = std::fs::remove_file(self.dir.file(control::SOCKET_NAME));
        if let Err(e) = self.dir.update(|s| {
            s.status = Status::Stopped;
            s.exit_status = Some(code);
        }) {
            log::debug!("record exit: {e}");
        }
        // A `start` whose process exited at once may still be writing its answer: the
        // process's end must not take the answer with it (the CLI would see a closed
        // connection, not its reply).
        if !self.in_flight.wait_idle(CONTROL_DRAIN) {
            log::debug!("control requests still unanswered at exit");
        }
        code
    }

    fn spawn_signal_forwarder(&self, signals: SigSet) {
        let agent = self.agent.clone();
        let console_fd = self.console.as_ref().map(|c| c.slave.as_raw_fd());
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let Ok(signal) = signals.wait() else { continue };
                let result = if signal == Signal::SIGWINCH {
                    match console_fd.and_then(console::window_size) {
                        Some((rows, cols)) => agent
                            .request(
                                Request::ResizeTerminal {
                                    process: INIT_PROCESS,
                                    rows,
                                    cols,
                                },
                                REQUEST_TIMEOUT,
                            )
                            .map(|_| ()),
                        None => Ok(()),
                    }
                } else {
                    agent
                        .request(
                            Request::Signal {
                                process: INIT_PROCESS,
                                signal: signal as i32,
                                all: false,
                            },
                            REQUEST_TIMEOUT,
                        )
                        .map(|_| ())
                };
                if let Err(e) = result {
                    log::debug!("forwarding {signal}: {e}");
                }
            });
    }

    fn spawn_control_server(&self) {
        let Ok(listener) = self.listener.try_clone() else {
            log::warn!("control socket unavailable");
            return;
        };
        let context = ControlContext {
            dir: self.dir.clone(),
            vm: Arc::clone(&self.vm),
            agent: self.agent.clone(),
            events: self.events_tx.clone(),
            next_exec: Arc::clone(&self.next_exec),
            network: Arc::clone(&self.network),
            init_exited: Arc::clone(&self.init_exited),
            in_flight: self.in_flight.clone(),
        };
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let context = context.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || context.handle(stream));
                }
            });
    }
}

#[derive(Clone)]
struct ControlContext {
    dir: ContainerDir,
    vm: Arc<Mutex<Box<dyn Vm>>>,
    agent: AgentClient,
    network: Arc<Mutex<VmNetwork>>,
    events: mpsc::Sender<Event>,
    next_exec: Arc<Mutex<ProcessId>>,
    init_exited: Arc<AtomicBool>,
    in_flight: InFlight,
}

/// How long an ending monitor waits for the control requests it is answering.
const CONTROL_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// A count of control requests being answered, which the ending monitor waits to reach 0.
#[derive(Clone, Default)]
struct InFlight(Arc<(Mutex<usize>, std::sync::Condvar)>);

impl InFlight {
    /// Counts one request until the guard drops.
    fn enter(&self) -> InFlightGuard {
        *self.0 .0.lock_unpoisoned() += 1;
        InFlightGuard(self.clone())
    }

    /// Waits, at most `limit`, for no request to be in flight; false if some still are.
    fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let (count, idle) = &*self.0;
        let guard = count.lock_unpoisoned();
        match idle.wait_timeout_while(guard, limit, |n| *n > 0) {
            Ok((n, _)) => *n == 0,
            Err(_) => false,
        }
    }
}

struct InFlightGuard(InFlight);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let (count, idle) = &*self.0 .0;
        let mut n = count.lock_unpoisoned();
        *n -= 1;
        if *n == 0 {
            idle.notify_all();
        }
    }
}

impl ControlContext {
    fn handle(&self, mut stream: UnixStream) {
        // Counted from the connection on; exec sessions last as long as their process, so
        // only plain requests are waited for.
        let answering = self.in_flight.enter();
        let request = match read_frame::<ControlRequest, _>(&mut stream) {
            Ok(Frame::Message(request)) => request,
            _ => return,
        };
        if let ControlRequest::Exec { spec } = request {
            drop(answering);
            self.exec_session(stream, *spec);
            return;
        }
        let reply = match self.apply(request) {
            Ok(reply) => reply,
            Err(e) => ControlReply::Error(e.to_string()),
        };
        let _ = agent_proto::write_message(&mut stream, &reply);
    }

    fn apply(&self, request: ControlRequest) -> Result<ControlReply, ContainerError> {
        match request {
            ControlRequest::Start => {
                self.dir.load()?.current_status().allows(Verb::Start)?;
                if let Err(e) = self.start_process() {
                    // As with runc, a container whose start failed is stopped: the VM goes
                    // now, and the caller's `delete` finds nothing running.
                    let _ = self.events.send(Event::Stop);
                    return Err(e);
                }
                Ok(ControlReply::Ok)
            }
            ControlRequest::Signal { signal, all } => {
                // The CLI checked the status before it called; the process may have exited
                // since, and then the container is not running, as runc would say, whatever
                // the agent (or its closing connection) answers.
                self.refuse_once_exited()?;
                let result = self.agent.request(
                    Request::Signal {
                        process: INIT_PROCESS,
                        signal,
                        all,
                    },
                    REQUEST_TIMEOUT,
                );
                if result.is_err() {
                    self.refuse_once_exited()?;
                }
                result?;
                Ok(ControlReply::Ok)
            }
            ControlRequest::Pause => {
                self.refuse_once_exited()?;
                self.vm.lock_unpoisoned().pause()?;
                self.dir.update(|s| s.status = Status::Paused)?;
                Ok(ControlReply::Ok)
            }
            ControlRequest::Resume => {
                self.vm.lock_unpoisoned().resume()?;
                self.dir.update(|s| s.status = Status::Running)?;
                Ok(ControlReply::Ok)
            }
            ControlRequest::Processes => match self
                .agent
                .request(Request::ListProcesses, REQUEST_TIMEOUT)?
            {
                Reply::Processes(list) => Ok(ControlReply::Processes(list)),
                other => Err(ContainerError::Agent(format!("unexpected reply {other:?}"))),
            },
            ControlRequest::Stop => {
                let _ = self.events.send(Event::Stop);
                Ok(ControlReply::Ok)
            }
            ControlRequest::Update(update) => {
                update.apply(&self.agent, &self.vm)?;
                Ok(ControlReply::Ok)
            }
            ControlRequest::Stats => match self.agent.request(Request::Stats, REQUEST_TIMEOUT)? {
                Reply::Stats(files) => Ok(ControlReply::Stats(files)),
                other => Err(ContainerError::Agent(format!("unexpected reply {other:?}"))),
            },
            ControlRequest::Exec { .. }
            | ControlRequest::Resize { .. }
            | ControlRequest::CloseStdin
            | ControlRequest::Connect { .. }
            | ControlRequest::Credit { .. } => Err(ContainerError::Monitor(
                "request only valid in an exec session".into(),
            )),
        }
    }

    /// `container not running` once the first process has exited.
    fn refuse_once_exited(&self) -> Result<(), ContainerError> {
        if self.init_exited.load(Ordering::SeqCst) {
            return Err(ContainerError::NotRunning);
        }
        Ok(())
    }

    /// Connects the network (docker connects it between create and start), lets the
    /// container's first process run, and records `running`.
    fn start_process(&self) -> Result<(), ContainerError> {
        self.network.lock_unpoisoned().attach(&self.agent)?;
        self.agent.request(
            Request::StartProcess {
                process: INIT_PROCESS,
            },
            REQUEST_TIMEOUT,
        )?;
        reclaim::watch(&self.vm);
        self.dir.update(|s| {
            if s.status == Status::Created {
                s.status = Status::Running;
            }
        })?;
        Ok(())
    }

    /// Runs one exec'd process for the connection's lifetime.
    fn exec_session(&self, stream: UnixStream, spec: agent_proto::ProcessSpec) {
        let process = {
            let mut next = self.next_exec.lock_unpoisoned();
            let id = *next;
            *next += 1;
            id
        };
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let writer = Arc::new(Mutex::new(SessionWriter {
            stream: writer,
            held: Some(Held::default()),
        }));
        self.agent.register(
            process,
            Box::new(SessionOutput {
                writer: Arc::clone(&writer),
            }),
        );
        let created = self.agent.request(
            Request::CreateProcess {
                process,
                spec,
                start: true,
            },
            REQUEST_TIMEOUT,
        );
        let reply = match created {
            Ok(Reply::Created { pid }) => ControlReply::ExecStarted { pid },
            Ok(other) => ControlReply::Error(format!("unexpected reply {other:?}")),
            Err(e) => ControlReply::Error(e.to_string()),
        };
        let failed = matches!(reply, ControlReply::Error(_));
        if failed {
            self.agent.unregister(process);
        }
        if writer.lock_unpoisoned().start(&reply).is_err() || failed {
            return;
        }
        let mut reader = stream;
        loop {
            match read_frame::<ControlRequest, _>(&mut reader) {
                Ok(Frame::Data { stream, bytes, .. }) => {
                    if self.agent.send_input(process, stream, &bytes).is_err() {
                        break;
                    }
                }
                Ok(Frame::Message(ControlRequest::Connect { listener, stream })) => {
                    let connected = self.agent.request(
                        Request::Connect {
                            process,
                            listener,
                            stream,
                        },
                        REQUEST_TIMEOUT,
                    );
                    if let Err(e) = connected {
                        log::debug!("exec {process}: connect to listener {listener}: {e}");
                        // The session's end of the connection closes.
                        let mut out = Vec::new();
                        encode_data(0, stream, &[], &mut out);
                        writer.lock_unpoisoned().write(&out);
                    }
                }
                Ok(Frame::Message(ControlRequest::Credit { stream, bytes })) => {
                    let _ = self.agent.notify(Request::Credit {
                        process,
                        stream,
                        bytes,
                    });
                }
                Ok(Frame::Message(ControlRequest::Resize { rows, cols })) => {
                    let _ = self.agent.request(
                        Request::ResizeTerminal {
                            process,
                            rows,
                            cols,
                        },
                        REQUEST_TIMEOUT,
                    );
                }
                Ok(Frame::Message(ControlRequest::CloseStdin)) => {
                    let _ = self.agent.send_stdin(process, &[]);
                }
                Ok(Frame::Message(ControlRequest::Signal { signal, .. })) => {
                    let _ = self.agent.request(
                        Request::Signal {
                            process,
                            signal,
                            all: false,
                        },
                        REQUEST_TIMEOUT,
                    );
                }
                Ok(Frame::Message(_)) => {}
                // The relay went away; the process keeps running, its output is dropped.
                Err(_) => break,
            }
        }
    }
}

/// An exec session's connection. The agent reports a process's output and exit on its
/// reader thread, which can run before the session's thread has written the `ExecStarted`
/// reply that the client reads first (a fast process's output would then be skipped as
/// frames before the reply): until the reply is written, they are held.
struct SessionWriter {
    stream: UnixStream,
    /// What came before the reply; `None` once it is written.
    held: Option<Held>,
}

#[derive(Default)]
struct Held {
    frames: Vec<u8>,
    exited: bool,
    overflowed: bool,
}

/// What an exec'd process may print before its session's reply is written (a round trip
/// to the agent), held for after it: the bound on what a guest can make the monitor buffer.
/// Past it, output is dropped until the reply is out (then it flows with back-pressure).
const MAX_HELD_OUTPUT: usize = 16 << 20;

impl SessionWriter {
    /// Writes the reply to the exec request, then what was held for after it.
    fn start(&mut self, reply: &ControlReply) -> Result<(), agent_proto::ProtoError> {
        agent_proto::write_message(&mut self.stream, reply)?;
        let held = self.held.take().unwrap_or_default();
        self.stream.write_all(&held.frames)?;
        if held.exited {
            self.stream.shutdown(std::net::Shutdown::Write)?;
        }
        Ok(())
    }

    fn write(&mut self, frames: &[u8]) {
        match &mut self.held {
            Some(held) if held.frames.len() + frames.len() > MAX_HELD_OUTPUT => {
                if !held.overflowed {
                    log::warn!(
                        "exec output beyond {MAX_HELD_OUTPUT} bytes before the exec's reply \
                         was written: the rest of it until then is dropped"
                    );
                    held.overflowed = true;
                }
            }
            Some(held) => held.frames.extend_from_slice(frames),
            None => {
                let _ = self.stream.write_all(frames);
            }
        }
    }

    /// The exit status frame: held whatever the output before it was (it is small, and the
    /// session's client waits for it).
    fn write_status(&mut self, frame: &[u8]) {
        match &mut self.held {
            Some(held) => held.frames.extend_from_slice(frame),
            None => {
                let _ = self.stream.write_all(frame);
            }
        }
    }

    /// Ends the session's output after the exit status.
    fn finish(&mut self) {
        match &mut self.held {
            Some(held) => held.exited = true,
            None => {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
    }
}

/// An exec'd process's output and exit, framed onto its session connection.
struct SessionOutput {
    writer: Arc<Mutex<SessionWriter>>,
}

impl ProcessEvents for SessionOutput {
    fn output(&mut self, stream: Stream, bytes: &[u8]) {
        let mut out = Vec::new();
        encode_data(0, stream, bytes, &mut out);
        self.writer.lock_unpoisoned().write(&out);
    }

    fn exited(&mut self, status: ExitStatus) {
        let mut out = Vec::new();
        if encode_message(
            &ControlReply::Exited {
                code: status.code(),
            },
            &mut out,
        )
        .is_ok()
        {
            let mut writer = self.writer.lock_unpoisoned();
            writer.write_status(&out);
            writer.finish();
        }
    }
}

/// Spawning a monitor: `exe` runs [`run`] (the hidden `monitor` verb of the CLI) with the
/// sync pipe at `SUPERMACHINE_SYNC_FD`.
pub fn sync_fd_env() -> &'static str {
    "SUPERMACHINE_SYNC_FD"
}

/// Takes the sync pipe from the environment, if this process was started with one.
pub fn take_sync_fd() -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(sync_fd_env()).ok()?.parse().ok()?;
    std::env::remove_var(sync_fd_env());
    // Only accept an fd that is open, and keep it from the VMM and other children: the
    // caller waits for EOF on this pipe.
    // SAFETY: F_SETFD only sets the fd's flags; it fails with EBADF on a closed fd.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: `create` passed this fd to us for our exclusive use.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// True when `path` is the state dir of a container whose monitor answers.
pub fn monitor_answers(dir: &Path) -> bool {
    control::connect(dir).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::{read_frame, Frame, ProtoError};

    fn frames(mut stream: UnixStream) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match read_frame::<ControlReply, _>(&mut stream) {
                Ok(Frame::Message(reply)) => seen.push(format!("{reply:?}")),
                Ok(Frame::Data { bytes, .. }) => seen.push(text(&bytes)),
                Err(ProtoError::Closed) => return seen,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// A session whose reply is not written yet, and the exec client's end of it.
    fn session() -> (Arc<Mutex<SessionWriter>>, UnixStream) {
        let (ours, client) = UnixStream::pair().unwrap();
        let writer = Arc::new(Mutex::new(SessionWriter {
            stream: ours,
            held: Some(Held::default()),
        }));
        (writer, client)
    }

    #[test]
    fn an_exec_sessions_output_and_exit_come_after_its_start_reply() {
        let (writer, client) = session();
        let mut output = SessionOutput {
            writer: Arc::clone(&writer),
        };
        // A fast process: all of it is reported before the session writes its reply.
        output.output(Stream::STDOUT, b"exec-out");
        output.output(Stream::STDERR, b"exec-err");
        output.exited(ExitStatus::Exited(5));
        writer
            .lock_unpoisoned()
            .start(&ControlReply::ExecStarted { pid: 7 })
            .unwrap();
        // Then more output would go straight through (none here: the stream is shut).
        drop(output);
        drop(writer);
        assert_eq!(
            frames(client),
            [
                format!("{:?}", ControlReply::ExecStarted { pid: 7 }),
                "exec-out".to_string(),
                "exec-err".to_string(),
                format!("{:?}", ControlReply::Exited { code: 5 }),
            ]
        );
    }

    #[test]
    fn output_after_the_start_reply_is_written_at_once() {
        let (writer, client) = session();
        writer
            .lock_unpoisoned()
            .start(&ControlReply::ExecStarted { pid: 7 })
            .unwrap();
        let mut output = SessionOutput {
            writer: Arc::clone(&writer),
        };
        output.output(Stream::STDOUT, b"later");
        output.exited(ExitStatus::Exited(0));
        drop(output);
        drop(writer);
        assert_eq!(
            frames(client),
            [
                format!("{:?}", ControlReply::ExecStarted { pid: 7 }),
                "later".to_string(),
                format!("{:?}", ControlReply::Exited { code: 0 }),
            ]
        );
    }

    #[test]
    fn output_held_before_the_start_reply_is_bounded_but_the_exit_is_kept() {
        let (writer, client) = session();
        let mut output = SessionOutput {
            writer: Arc::clone(&writer),
        };
        // A guest that floods the session before its reply is out.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(2 * MAX_HELD_OUTPUT) >> 20 {
            output.output(Stream::STDOUT, &chunk);
        }
        output.exited(ExitStatus::Exited(3));
        let held = writer.lock_unpoisoned().held.as_ref().unwrap().frames.len();
        assert!(held <= MAX_HELD_OUTPUT + 64, "{held} bytes held");
        let reader = std::thread::spawn(move || frames(client));
        writer
            .lock_unpoisoned()
            .start(&ControlReply::ExecStarted { pid: 7 })
            .unwrap();
        drop(output);
        drop(writer);
        let seen = reader.join().unwrap();
        assert_eq!(
            seen.last().unwrap(),
            &format!("{:?}", ControlReply::Exited { code: 3 })
        );
    }
}
