//! One container as the shim holds it: its VM, the agent session, and its processes (the
//! init and every exec), with their stdio and exit statuses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use agent_proto::{ExitStatus, ProcessId, ProcessSpec, Reply, Request, INIT_PROCESS};
use container::agent_client::AgentClient;
use container::bundle::Bundle;
use container::cgroup::{self, Placement};
use container::launch::{self, Launched};
use container::netns::NetworkNamespace;
use container::network::{self, Attachment};
use container::paths::{Paths, VmDefaults};
use container::plan::Plan;
use container::{hooks, proc, reclaim, ContainerError};
use engine::{EngineChoice, Vm};
use serde::{Deserialize, Serialize};
use snapshot::SnapshotCache;

use crate::io::{FifoOutput, StdinRelay, StdioPaths};
use crate::launcher::Launcher;
use crate::options::ShimOptions;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit status reported for processes whose VM died under them.
pub const VM_DIED_STATUS: i32 = 255;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcStatus {
    Created,
    Running,
    Stopped,
}

#[derive(Debug)]
pub struct ProcState {
    pub status: ProcStatus,
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
                status: ProcStatus::Created,
                pid: 0,
                exit: None,
            }),
            exited: Condvar::new(),
            stdin: Mutex::new(None),
        })
    }

    /// Records the exit (the first one wins) and wakes waiters; true if this call did.
    pub fn set_exited(&self, code: i32) -> bool {
        let mut state = lock(&self.state);
        if state.exit.is_some() {
            return false;
        }
        state.status = ProcStatus::Stopped;
        state.exit = Some((code, SystemTime::now()));
        self.exited.notify_all();
        true
    }

    pub fn wait(&self) -> (i32, SystemTime) {
        let mut state = lock(&self.state);
        loop {
            if let Some(exit) = state.exit {
                return exit;
            }
            state = self.exited.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn close_stdin(&self, agent: &AgentClient) {
        if let Some(relay) = lock(&self.stdin).take() {
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
    pub vm: Arc<Mutex<Box<dyn Vm>>>,
    pub agent: AgentClient,
    pub vmm_pid: u32,
    pub init: Arc<Proc>,
    pub execs: Arc<Mutex<HashMap<String, Arc<Proc>>>>,
    next_process: Mutex<ProcessId>,
    pub paused: Mutex<bool>,
    pub record: ShimRecord,
    publisher: Option<std::thread::JoinHandle<()>>,
    on_exit: ExitHook,
    /// The container's network, attached from the launcher thread (which is in the
    /// container's network namespace).
    network: Arc<Mutex<Attachment>>,
    taps: Vec<String>,
    files: Vec<container::translate::FileBind>,
    launcher: Arc<Launcher>,
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
    /// Mounts the rootfs, starts the VM (restored or booted), prepares the init process and
    /// runs the host hooks. On failure nothing is left: no VM, mount or cgroup.
    pub fn create(
        args: CreateArgs,
        launcher: &Arc<Launcher>,
        on_exit: ExitHook,
    ) -> Result<Task, ContainerError> {
        let mut record = ShimRecord::default();
        let result = Self::create_inner(&args, launcher, on_exit, &mut record);
        if result.is_err() {
            cleanup(&args.bundle, &record);
        }
        result
    }

    fn create_inner(
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

        let choice: EngineChoice = args.options.engine.parse()?;
        let launch_plan = plan.clone();
        let work_dir = args.bundle.clone();
        let (launched, taps) = launcher
            .run(move || -> Result<(Launched, Vec<String>), ContainerError> {
                // This thread starts the VMM, which inherits its network namespace.
                launch_plan.network.enter()?;
                let selection = engine::select(
                    choice,
                    &Paths::new(None).probe_dir(),
                    launch_plan.qemu.as_deref(),
                )?;
                log::debug!("engine {} ({})", selection.engine.name(), selection.reason);
                // Never persistent, unlike the monitor's: this thread stays in a new
                // namespace after its container has gone (until its next job), so a
                // persistent tap would outlive the container.
                let tap = match launch_plan.network {
                    NetworkNamespace::Host => None,
                    _ => Some(network::create_tap(
                        &format!("{}0", network::TAP_PREFIX),
                        false,
                    )?),
                };
                let spec = launch_plan.vm_spec(work_dir, tap.as_ref());
                let cache = if launch_plan.snapshots {
                    Some(SnapshotCache::new(
                        Paths::new(None).snapshots_dir(),
                        launch::cache_limits(Some(&*selection.engine))?,
                    ))
                } else {
                    None
                };
                let launched =
                    launch::launch(&*selection.engine, &spec, &launch_plan, cache.as_ref())?;
                Ok((launched, tap.into_iter().map(|t| t.name).collect()))
            })
            .ok_or_else(|| ContainerError::Monitor("the VM launcher is gone".into()))??;
        let Launched {
            vm,
            agent,
            publisher,
            ..
        } = launched;
        let vmm_pid = vm.vmm_pid().unwrap_or(std::process::id());
        record.vmm_pid = Some(vmm_pid);
        record.vmm_start_time = proc::start_time(vmm_pid as i32);
        write_record(&args.bundle, record);

        let init = Proc::new(String::new(), INIT_PROCESS, args.stdio.clone(), None);
        let plan_files = plan.file_binds.clone();
        let task = Task {
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            plan,
            vm: Arc::new(Mutex::new(vm)),
            agent,
            vmm_pid,
            init: Arc::clone(&init),
            execs: Arc::new(Mutex::new(HashMap::new())),
            next_process: Mutex::new(INIT_PROCESS + 1),
            paused: Mutex::new(false),
            record: record.clone(),
            publisher,
            on_exit,
            network: Arc::new(Mutex::new(Attachment::default())),
            files: plan_files,
            taps,
            launcher: Arc::clone(launcher),
        };
        if let Err(e) = task.prepare_init().and_then(|()| task.attach_network()) {
            let mut vm = lock(&task.vm);
            let console = vm.console_tail(15);
            let _ = vm.stop();
            return Err(ContainerError::Boot {
                message: e.to_string(),
                console,
            });
        }
        lock(&init.state).pid = vmm_pid;
        // The VMM (in the container's network namespace) is the task's host process.
        let state = task.oci_state("creating");
        hooks::run("createRuntime", &task.plan.hooks.create_runtime, &state)?;
        hooks::run("prestart", &task.plan.hooks.prestart, &state)?;
        let agent = task.agent.clone();
        let procs = task.all_procs_handle();
        let hook = Arc::clone(&task.on_exit);
        task.agent.on_close(move || {
            // The VM is gone: every process still running ended with it.
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
            all.extend(lock(&execs).values().cloned());
            all
        }
    }

    /// Routes the process's output and exit; before the agent creates it.
    fn register_output(&self, process: &Arc<Proc>) -> Result<(), ContainerError> {
        let proc = Arc::clone(process);
        let hook = Arc::clone(&self.on_exit);
        let output = FifoOutput::open(&process.stdio, move |status: ExitStatus| {
            let code = status.code();
            if proc.set_exited(code) {
                hook(&proc, code);
            }
        })
        .map_err(|e| ContainerError::Monitor(format!("open stdio FIFOs: {e}")))?;
        self.agent.register(process.agent_id, Box::new(output));
        Ok(())
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
        *lock(&process.stdin) = Some(relay);
        Ok(())
    }

    fn prepare_init(&self) -> Result<(), ContainerError> {
        self.register_output(&self.init)?;
        launch::prepare_container(&self.agent, &self.plan)?;
        self.start_stdin(&self.init)
    }

    /// Connects the network namespace's interfaces to the VM, if there are any yet.
    pub fn attach_network(&self) -> Result<(), ContainerError> {
        if self.taps.is_empty() {
            return Ok(());
        }
        let (network, agent, taps, files) = (
            Arc::clone(&self.network),
            self.agent.clone(),
            self.taps.clone(),
            self.files.clone(),
        );
        self.launcher
            .run(move || lock(&network).attach(&agent, &taps, &files))
            .ok_or_else(|| ContainerError::Monitor("the VM launcher is gone".into()))?
    }

    pub fn oci_state(&self, status: &str) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.2.0",
            "id": self.id,
            "status": status,
            "pid": self.vmm_pid,
            "bundle": self.bundle,
            "annotations": serde_json::Value::Object(Default::default()),
        })
    }

    pub fn process(&self, exec_id: &str) -> Option<Arc<Proc>> {
        if exec_id.is_empty() {
            Some(Arc::clone(&self.init))
        } else {
            lock(&self.execs).get(exec_id).cloned()
        }
    }

    /// Starts the init or an exec; returns its pid.
    pub fn start(&self, exec_id: &str) -> Result<u32, ContainerError> {
        let process = self
            .process(exec_id)
            .ok_or_else(|| ContainerError::NotFound(exec_id.to_string()))?;
        if lock(&process.state).status != ProcStatus::Created {
            return Err(ContainerError::InvalidState(format!(
                "process {exec_id:?} was already started"
            )));
        }
        if exec_id.is_empty() {
            self.agent.request(
                Request::StartProcess {
                    process: INIT_PROCESS,
                },
                REQUEST_TIMEOUT,
            )?;
            lock(&process.state).status = ProcStatus::Running;
            reclaim::watch(&self.vm);
            let running = self.oci_state("running");
            if let Err(e) = hooks::run("poststart", &self.plan.hooks.poststart, &running) {
                log::warn!("{e}");
            }
            return Ok(self.vmm_pid);
        }
        let spec = lock(&process.spec)
            .take()
            .ok_or_else(|| ContainerError::InvalidState("no process spec".into()))?;
        self.register_output(&process)?;
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
                    let mut state = lock(&process.state);
                    state.status = ProcStatus::Running;
                    state.pid = pid as u32;
                }
                self.start_stdin(&process)?;
                Ok(pid as u32)
            }
            Ok(other) => Err(ContainerError::Agent(format!("unexpected reply {other:?}"))),
            Err(e) => {
                self.agent.unregister(process.agent_id);
                lock(&process.state).status = ProcStatus::Stopped;
                Err(e)
            }
        }
    }

    /// Registers an exec (started by a later `start`).
    pub fn add_exec(
        &self,
        exec_id: &str,
        spec: ProcessSpec,
        stdio: StdioPaths,
    ) -> Result<(), ContainerError> {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(exec_id.to_string()));
        }
        let agent_id = {
            let mut next = lock(&self.next_process);
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

    pub fn kill(&self, exec_id: &str, signal: i32, all: bool) -> Result<(), ContainerError> {
        let process = self
            .process(exec_id)
            .ok_or_else(|| ContainerError::NotFound(exec_id.to_string()))?;
        if lock(&process.state).exit.is_some() {
            return Err(ContainerError::NotRunning);
        }
        if *lock(&self.paused) && signal == libc::SIGKILL && exec_id.is_empty() {
            // A paused VM cannot deliver it; SIGKILL ends the VM from outside.
            self.stop_vm();
            return Ok(());
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

    pub fn stop_vm(&self) {
        let mut vm = lock(&self.vm);
        if let Err(e) = vm.stop() {
            log::warn!("stopping the VM: {e}");
        }
    }

    /// Ends the VM and removes what the container holds on the host.
    pub fn destroy(self) -> Result<(), ContainerError> {
        self.agent.shutdown();
        let network = Arc::clone(&self.network);
        let _ = self.launcher.run(move || lock(&network).detach());
        self.stop_vm();
        for p in std::iter::once(Arc::clone(&self.init)).chain(lock(&self.execs).values().cloned())
        {
            if p.set_exited(VM_DIED_STATUS) {
                (self.on_exit)(&p, VM_DIED_STATUS);
            }
        }
        if let Some(publisher) = self.publisher {
            let _ = publisher.join();
        }
        let stopped = serde_json::json!({ "ociVersion": "1.2.0", "id": self.id, "status": "stopped", "pid": 0, "bundle": self.bundle });
        if let Err(e) = hooks::run("poststop", &self.plan.hooks.poststop, &stopped) {
            log::warn!("{e}");
        }
        cleanup(&self.bundle, &self.record);
        Ok(())
    }
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
