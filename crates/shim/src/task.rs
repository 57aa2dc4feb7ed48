//! One container as the shim holds it: its VM, the agent session, and its processes (the
//! init and every exec), with their stdio and exit statuses. The container's lifecycle
//! (which verb may act when, and the hooks) is `container::lifecycle`'s: [`Task`] is its
//! [`Holder`] here, as the monitor process is for the CLI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use agent_proto::{ExitStatus, ProcessId, ProcessSpec, Reply, Request, INIT_PROCESS};
use container::agent_client::{AgentClient, REQUEST_TIMEOUT};
use container::bundle::Bundle;
use container::capacity::Reservation;
use container::cgroup::{self, Placement};
use container::hooks::HostHooks;
use container::lifecycle::{self, Holder, LiveUpdate, VM_DIED_STATUS};
use container::paths::{Paths, VmDefaults};
use container::plan::Plan;
use container::startup::{self, RunningVm, TapLifetime, VmNetwork, VmStartup};
use container::state::rfc3339_now;
use container::{proc, reclaim, ContainerError, OciState, Status};
use engine::{EngineChoice, Vm};
use lock_ext::{CondvarExt, LockExt};
use serde::{Deserialize, Serialize};

use crate::io::{FifoOutput, StdinRelay, StdioPaths};
use crate::launcher::Launcher;
use crate::options::ShimOptions;

/// A process's status: the container's statuses but `creating` (the init's is the
/// container's; an exec is never paused itself, its container is).
#[derive(Debug)]
pub struct ProcState {
    pub status: Status,
    pub pid: u32,
    pub exit: Option<(i32, SystemTime)>,
}

/// The init process or one exec.
#[derive(Debug)]
pub struct Proc {
    /// containerd's exec id; empty for the init.
    pub exec_id: String,
    pub agent_id: ProcessId,
    pub stdio: StdioPaths,
    /// The process to run, until it is started (execs).
    pub spec: Mutex<Option<ProcessSpec>>,
    pub state: Mutex<ProcState>,
    exited: Condvar,
    stdin: Mutex<Option<Arc<StdinRelay>>>,
}

impl Proc {
    fn new(
        exec_id: String,
        agent_id: ProcessId,
        stdio: StdioPaths,
        spec: Option<ProcessSpec>,
    ) -> Arc<Self> {
        Arc::new(Proc {
            exec_id,
            agent_id,
            stdio,
            spec: Mutex::new(spec),
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                exit: None,
            }),
            exited: Condvar::new(),
            stdin: Mutex::new(None),
        })
    }

    /// Records the exit (the first one wins) and wakes waiters; true if this call did.
    pub fn set_exited(&self, code: i32) -> bool {
        let mut state = self.state.lock_unpoisoned();
        if state.exit.is_some() {
            return false;
        }
        state.status = Status::Stopped;
        state.exit = Some((code, SystemTime::now()));
        self.exited.notify_all();
        true
    }

    pub fn wait(&self) -> (i32, SystemTime) {
        let mut state = self.state.lock_unpoisoned();
        loop {
            if let Some(exit) = state.exit {
                return exit;
            }
            state = self.exited.wait_unpoisoned(state);
        }
    }

    pub fn close_stdin(&self, agent: &AgentClient) {
        if let Some(relay) = self.stdin.lock_unpoisoned().take() {
            relay.close(agent, self.agent_id);
        } else {
            let _ = agent.send_stdin(self.agent_id, &[]);
        }
    }
}

/// What the `delete` action needs to clean up after a shim that died: written next to the
/// bundle when the VM starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShimRecord {
    pub vmm_pid: Option<u32>,
    pub vmm_start_time: Option<u64>,
    pub cgroups: Placement,
    pub rootfs_mounted: bool,
}

pub fn record_path(bundle: &Path) -> PathBuf {
    bundle.join("supermachine-shim.json")
}

/// Called when a process ends: with its exit code, after the status is recorded.
pub type ExitHook = Arc<dyn Fn(&Proc, i32) + Send + Sync>;

pub struct Task {
    pub id: String,
    pub bundle: PathBuf,
    pub plan: Plan,
    /// For the OCI state the hooks read, as the CLI's state.json has them.
    created: String,
    annotations: HashMap<String, String>,
    pub vm: Arc<Mutex<Box<dyn Vm>>>,
    pub agent: AgentClient,
    pub vmm_pid: u32,
    pub init: Arc<Proc>,
    pub execs: Arc<Mutex<HashMap<String, Arc<Proc>>>>,
    next_process: Mutex<ProcessId>,
    pub record: ShimRecord,
    publisher: Mutex<Option<JoinHandle<()>>>,
    on_exit: ExitHook,
    /// The container's network, attached from the launcher thread (which is in the
    /// container's network namespace).
    network: Arc<Mutex<VmNetwork>>,
    launcher: Arc<Launcher>,
    /// The VM's place in the host's capacity ledger, released once it has stopped.
    reservation: Mutex<Option<Reservation>>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("id", &self.id)
            .field("vmm_pid", &self.vmm_pid)
            .finish_non_exhaustive()
    }
}

/// Everything `create` needs.
pub struct CreateArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<containerd_shim::protos::types::mount::Mount>,
    pub stdio: StdioPaths,
    pub options: ShimOptions,
}

impl Task {
    /// Mounts the rootfs, starts the VM (restored or booted) with the init process created,
    /// and runs the create hooks. On failure nothing is left: no VM, mount or cgroup.
    pub fn create(
        args: CreateArgs,
        launcher: &Arc<Launcher>,
        on_exit: ExitHook,
    ) -> Result<Task, ContainerError> {
        let mut record = ShimRecord::default();
        let task = match Self::start_vm(&args, launcher, on_exit, &mut record) {
            Ok(task) => task,
            Err(e) => {
                cleanup(&args.bundle, &record);
                return Err(e);
            }
        };
        // On failure the lifecycle has stopped and removed it.
        lifecycle::created(&task)?;
        Ok(task)
    }

    fn start_vm(
        args: &CreateArgs,
        launcher: &Arc<Launcher>,
        on_exit: ExitHook,
        record: &mut ShimRecord,
    ) -> Result<Task, ContainerError> {
        let rootfs_dir = args.bundle.join("rootfs");
        for mount in &args.rootfs {
            container::rootfs::mount_rootfs(
                &mount.type_,
                &mount.source,
                &mount.options,
                &rootfs_dir,
            )?;
            record.rootfs_mounted = true;
        }
        let bundle = Bundle::load(&args.bundle)?;
        let paths = Paths::new(None);
        let mut defaults = VmDefaults::load();
        if let Some(memory) = args.options.memory_mib {
            defaults.memory_mib = memory;
        }
        if let Some(vcpus) = args.options.vcpus {
            defaults.vcpus = vcpus;
        }
        let plan = Plan::prepare_with(
            &bundle,
            &paths,
            args.options.debug,
            args.options.snapshots,
            defaults,
        )?;
        for note in &plan.notes {
            log::warn!("container {}: {note}", args.id);
        }
        // The shim and its VMM are the container's host cost: they join its cgroup.
        if let Some(path) = &plan.cgroups_path {
            record.cgroups = cgroup::place(std::process::id(), path, &plan.host_limits)?;
        }
        write_record(&args.bundle, record);

        let init = Proc::new(String::new(), INIT_PROCESS, args.stdio.clone(), None);
        let init_events = Box::new(exit_reporter(&init, &on_exit)?);
        let startup = VmStartup {
            plan: plan.clone(),
            engine: args.options.engine.parse::<EngineChoice>()?,
            paths,
            work_dir: args.bundle.clone(),
            tap_lifetime: TapLifetime::WithVmm,
            init_events,
        };
        // The launcher thread starts the VMM, which inherits its network namespace.
        let running = launcher
            .run(move || startup::start_vm(startup))
            .ok_or_else(|| ContainerError::Monitor("the VM launcher is gone".into()))??;
        let RunningVm {
            vm,
            agent,
            network,
            publisher,
            reservation,
            ..
        } = running;
        let vmm_pid = vm.vmm_pid().unwrap_or(std::process::id());
        record.vmm_pid = Some(vmm_pid);
        record.vmm_start_time = proc::start_time(vmm_pid as i32);
        write_record(&args.bundle, record);
        // The VMM (in the container's network namespace) is the task's host process.
        init.state.lock_unpoisoned().pid = vmm_pid;
        let task = Task {
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            plan,
            created: rfc3339_now(),
            annotations: bundle.annotations(),
            vm: Arc::new(Mutex::new(vm)),
            agent,
            vmm_pid,
            init: Arc::clone(&init),
            execs: Arc::new(Mutex::new(HashMap::new())),
            next_process: Mutex::new(INIT_PROCESS + 1),
            record: record.clone(),
            publisher: Mutex::new(publisher),
            on_exit,
            network: Arc::new(Mutex::new(network)),
            launcher: Arc::clone(launcher),
            reservation: Mutex::new(Some(reservation)),
        };
        if let Err(e) = task.start_stdin(&task.init) {
            let _ = task.stop();
            return Err(e);
        }
        let agent = task.agent.clone();
        let procs = task.all_procs_handle();
        let hook = Arc::clone(&task.on_exit);
        let (id, vm) = (task.id.clone(), Arc::clone(&task.vm));
        task.agent.on_close(move || {
            // The VM is gone: every process still running ended with it. (Why, when the VM
            // went by itself: a stop asked for says nothing.)
            if let Some(why) = vm.try_lock().ok().and_then(|mut vm| vm.exited()) {
                log::warn!("task {id}: VM died ({why})");
            }
            for p in procs() {
                if p.set_exited(VM_DIED_STATUS) {
                    hook(&p, VM_DIED_STATUS);
                }
            }
            drop(agent);
        });
        Ok(task)
    }

    fn all_procs_handle(&self) -> impl Fn() -> Vec<Arc<Proc>> + Send + 'static {
        let init = Arc::clone(&self.init);
        let execs = Arc::clone(&self.execs);
        move || {
            let mut all = vec![Arc::clone(&init)];
            all.extend(execs.lock_unpoisoned().values().cloned());
            all
        }
    }

    /// Starts relaying stdin; after the agent created the process (it drops input for
    /// processes it does not know).
    fn start_stdin(&self, process: &Arc<Proc>) -> Result<(), ContainerError> {
        let relay = StdinRelay::start(
            &process.stdio.stdin,
            self.agent.clone(),
            process.agent_id,
            process.stdio.terminal,
        )
        .map_err(|e| ContainerError::Monitor(format!("open stdin FIFO: {e}")))?;
        *process.stdin.lock_unpoisoned() = Some(relay);
        Ok(())
    }

    /// Connects the network namespace's interfaces to the VM, if there are any yet.
    fn attach_network(&self) -> Result<(), ContainerError> {
        let (network, agent) = (Arc::clone(&self.network), self.agent.clone());
        self.launcher
            .run(move || network.lock_unpoisoned().attach(&agent))
            .ok_or_else(|| ContainerError::Monitor("the VM launcher is gone".into()))?
    }

    pub fn process(&self, exec_id: &str) -> Option<Arc<Proc>> {
        if exec_id.is_empty() {
            Some(Arc::clone(&self.init))
        } else {
            self.execs.lock_unpoisoned().get(exec_id).cloned()
        }
    }

    /// The status containerd sees for a process: an exec that runs in a paused container is
    /// paused too.
    pub fn process_status(&self, process: &Proc) -> Status {
        let own = process.state.lock_unpoisoned().status;
        match (own, self.status_now()) {
            (Status::Running, Status::Paused) => Status::Paused,
            _ => own,
        }
    }

    fn status_now(&self) -> Status {
        self.init.state.lock_unpoisoned().status
    }

    /// Starts the init (through the lifecycle) or an exec; returns its pid.
    pub fn start(&self, exec_id: &str) -> Result<u32, ContainerError> {
        if exec_id.is_empty() {
            lifecycle::start(self)?;
            return Ok(self.vmm_pid);
        }
        let process = self
            .process(exec_id)
            .ok_or_else(|| ContainerError::NotFound(exec_id.to_string()))?;
        if process.state.lock_unpoisoned().status != Status::Created {
            return Err(ContainerError::InvalidState(format!(
                "process {exec_id:?} was already started"
            )));
        }
        self.status_now().allows(container::state::Verb::Exec {
            ignore_paused: false,
        })?;
        let spec = process
            .spec
            .lock_unpoisoned()
            .take()
            .ok_or_else(|| ContainerError::InvalidState("no process spec".into()))?;
        let events = exit_reporter(&process, &self.on_exit)?;
        self.agent.register(process.agent_id, Box::new(events));
        let reply = self.agent.request(
            Request::CreateProcess {
                process: process.agent_id,
                spec,
                start: true,
            },
            REQUEST_TIMEOUT,
        );
        match reply {
            Ok(Reply::Created { pid }) => {
                {
                    let mut state = process.state.lock_unpoisoned();
                    state.status = Status::Running;
                    state.pid = pid as u32;
                }
                self.start_stdin(&process)?;
                Ok(pid as u32)
            }
            Ok(other) => Err(ContainerError::Agent(format!("unexpected reply {other:?}"))),
            Err(e) => {
                self.agent.unregister(process.agent_id);
                process.state.lock_unpoisoned().status = Status::Stopped;
                Err(e)
            }
        }
    }

    /// Registers an exec (started by a later `start`).
    pub fn add_exec(
        &self,
        exec_id: &str,
        mut spec: ProcessSpec,
        stdio: StdioPaths,
    ) -> Result<(), ContainerError> {
        container::translate::inherit_capabilities(&mut spec, &self.plan.init);
        let mut execs = self.execs.lock_unpoisoned();
        if execs.contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(exec_id.to_string()));
        }
        let agent_id = {
            let mut next = self.next_process.lock_unpoisoned();
            let id = *next;
            *next += 1;
            id
        };
        execs.insert(
            exec_id.to_string(),
            Proc::new(exec_id.to_string(), agent_id, stdio, Some(spec)),
        );
        Ok(())
    }

    /// Signals the init (through the lifecycle) or an exec.
    pub fn kill(&self, exec_id: &str, signal: i32, all: bool) -> Result<(), ContainerError> {
        if exec_id.is_empty() {
            return lifecycle::kill(self, signal, all);
        }
        let process = self
            .process(exec_id)
            .ok_or_else(|| ContainerError::NotFound(exec_id.to_string()))?;
        if process.state.lock_unpoisoned().exit.is_some() {
            return Err(ContainerError::NotRunning);
        }
        self.agent
            .request(
                Request::Signal {
                    process: process.agent_id,
                    signal,
                    all,
                },
                REQUEST_TIMEOUT,
            )
            .map(|_| ())
    }

    /// Ends every process of the VM with `code` (the first exit recorded wins).
    fn end_processes(&self, code: i32) {
        for p in std::iter::once(Arc::clone(&self.init))
            .chain(self.execs.lock_unpoisoned().values().cloned())
        {
            if p.set_exited(code) {
                (self.on_exit)(&p, code);
            }
        }
    }
}

impl Holder for Task {
    fn id(&self) -> &str {
        &self.id
    }

    fn status(&self) -> Result<Status, ContainerError> {
        Ok(self.status_now())
    }

    fn oci_state(&self, status: Status) -> Result<OciState, ContainerError> {
        Ok(OciState::new(
            &self.id,
            status,
            Some(self.vmm_pid as i32),
            &self.bundle,
            &self.created,
            self.annotations.clone(),
        ))
    }

    fn hooks(&self) -> Result<HostHooks, ContainerError> {
        Ok(self.plan.hooks.clone())
    }

    fn start_process(&self) -> Result<(), ContainerError> {
        self.attach_network()?;
        self.agent.request(
            Request::StartProcess {
                process: INIT_PROCESS,
            },
            REQUEST_TIMEOUT,
        )?;
        {
            let mut state = self.init.state.lock_unpoisoned();
            if state.status == Status::Created {
                state.status = Status::Running;
            }
        }
        reclaim::watch(&self.vm);
        Ok(())
    }

    fn signal(&self, signal: i32, all: bool) -> Result<(), ContainerError> {
        self.agent
            .request(
                Request::Signal {
                    process: INIT_PROCESS,
                    signal,
                    all,
                },
                REQUEST_TIMEOUT,
            )
            .map(|_| ())
    }

    fn pause_vm(&self) -> Result<(), ContainerError> {
        self.vm.lock_unpoisoned().pause()?;
        let mut state = self.init.state.lock_unpoisoned();
        if state.status == Status::Running {
            state.status = Status::Paused;
        }
        Ok(())
    }

    fn resume_vm(&self) -> Result<(), ContainerError> {
        self.vm.lock_unpoisoned().resume()?;
        let mut state = self.init.state.lock_unpoisoned();
        if state.status == Status::Paused {
            state.status = Status::Running;
        }
        Ok(())
    }

    fn plan(&self) -> Result<container::plan::Plan, ContainerError> {
        Ok(self.plan.clone())
    }

    fn update_vm(&self, update: &LiveUpdate) -> Result<(), ContainerError> {
        update.apply(&self.agent, &self.vm)
    }

    /// Ends the VM; processes still running end as killed (SIGKILL from outside).
    fn stop(&self) -> Result<(), ContainerError> {
        self.agent.shutdown();
        let network = Arc::clone(&self.network);
        let _ = self
            .launcher
            .run(move || network.lock_unpoisoned().detach());
        if let Err(e) = self.vm.lock_unpoisoned().stop() {
            log::warn!("stopping the VM: {e}");
        }
        self.end_processes(128 + libc::SIGKILL);
        self.reservation.lock_unpoisoned().take();
        // A bake being sealed finishes (or fails) before the container is gone.
        if let Some(publisher) = self.publisher.lock_unpoisoned().take() {
            let _ = publisher.join();
        }
        Ok(())
    }

    fn remove(&self) -> Result<(), ContainerError> {
        cleanup(&self.bundle, &self.record);
        Ok(())
    }
}

/// Routes a process's output to its FIFOs and reports its exit; registered before the agent
/// creates the process.
fn exit_reporter(process: &Arc<Proc>, on_exit: &ExitHook) -> Result<FifoOutput, ContainerError> {
    let proc = Arc::clone(process);
    let hook = Arc::clone(on_exit);
    FifoOutput::open(&process.stdio, move |status: ExitStatus| {
        let code = status.code();
        if proc.set_exited(code) {
            hook(&proc, code);
        }
    })
    .map_err(|e| ContainerError::Monitor(format!("open stdio FIFOs: {e}")))
}

fn write_record(bundle: &Path, record: &ShimRecord) {
    if let Ok(bytes) = serde_json::to_vec(record) {
        let _ = container::state::write_atomic(&record_path(bundle), &bytes);
    }
}

/// Removes what a container left on the host: its VMM (if still alive), rootfs mount and
/// cgroups. Used by delete and by the `delete` action after a shim died.
pub fn cleanup(bundle: &Path, record: &ShimRecord) {
    if let Some(pid) = record.vmm_pid {
        if proc::is_alive(pid as i32, record.vmm_start_time) && pid != std::process::id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            proc::wait_gone(pid as i32, record.vmm_start_time, Duration::from_secs(5));
        }
    }
    if record.rootfs_mounted {
        container::rootfs::unmount_rootfs(&bundle.join("rootfs"));
    }
    // The shim itself is in the container's cgroup: out of it first.
    cgroup::leave(&record.cgroups, std::process::id());
    cgroup::remove(&record.cgroups);
    let _ = std::fs::remove_file(record_path(bundle));
}
