//! The shim v2 Task service over [`Task`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use container::agent_client::REQUEST_TIMEOUT;
use container::lifecycle;
use container::{ContainerError, Status};
use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult};
use lock_ext::LockExt;

use crate::io::StdioPaths;
use crate::launcher::Launcher;
use crate::options::ShimOptions;
use crate::task::{self, CreateArgs, Proc, Task};

fn status(code: Code, message: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// containerd maps these codes to its errdefs (NotFound, AlreadyExists, …).
fn rpc_error(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::NotFound(_) | ContainerError::NotRunning => Code::NOT_FOUND,
        ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        ContainerError::InvalidState(_) => Code::FAILED_PRECONDITION,
        ContainerError::Unsupported(_) => Code::UNIMPLEMENTED,
        ContainerError::Bundle { .. }
        | ContainerError::InvalidId(_)
        | ContainerError::UnknownSignal(_)
        | ContainerError::InvalidResources(_) => Code::INVALID_ARGUMENT,
        _ => Code::UNKNOWN,
    };
    status(code, e.to_string())
}

fn timestamp(at: SystemTime) -> Timestamp {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Sends events to containerd (when it gave an address to send them to).
#[derive(Clone)]
struct Events {
    publisher: Option<Arc<RemotePublisher>>,
    namespace: String,
}

impl Events {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(publisher) = &self.publisher {
            if let Err(e) = publisher.publish(Default::default(), topic, &self.namespace, event) {
                log::warn!("publish {topic}: {e}");
            }
        }
    }
}

#[derive(Clone)]
pub struct Service {
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
    events: Events,
    launcher: Option<Arc<Launcher>>,
    task: Arc<Mutex<Option<Arc<Task>>>>,
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Service {
            id: args.id.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
            events: Events {
                publisher: None,
                namespace: args.namespace.clone(),
            },
            launcher: None,
            task: Arc::new(Mutex::new(None)),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One shim (and so one VM) per container.
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// containerd runs this when the shim is gone: end whatever the shim left.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let path = task::record_path(&self.bundle);
        if let Some(record) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            task::cleanup(&self.bundle, &record);
        }
        let mut response = DeleteResponse::new();
        response.exit_status = 128 + libc::SIGKILL as u32;
        response.exited_at = Some(timestamp(SystemTime::now())).into();
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut service = self.clone();
        service.events.publisher = Some(Arc::new(publisher));
        match Launcher::new() {
            Ok(launcher) => service.launcher = Some(Arc::new(launcher)),
            Err(e) => log::error!("cannot start the VM launcher thread: {e}"),
        }
        service
    }
}

impl Service {
    fn task(&self) -> TtrpcResult<Arc<Task>> {
        self.task
            .lock_unpoisoned()
            .clone()
            .ok_or_else(|| status(Code::NOT_FOUND, "no task in this shim"))
    }

    fn process(&self, task: &Task, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        task.process(exec_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("process {exec_id} does not exist")))
    }

    /// Publishes a process's exit: as runc's shim, the init's exit carries the container id.
    fn exit_hook(&self) -> task::ExitHook {
        let events = self.events.clone();
        let container_id = self.id.clone();
        Arc::new(move |p: &Proc, code: i32| {
            let state = p.state.lock_unpoisoned();
            let exited_at = state.exit.map(|(_, at)| at).unwrap_or_else(SystemTime::now);
            let event = TaskExit {
                container_id: container_id.clone(),
                id: if p.exec_id.is_empty() {
                    container_id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid: state.pid,
                exit_status: code as u32,
                exited_at: Some(timestamp(exited_at)).into(),
                ..Default::default()
            };
            drop(state);
            events.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event));
        })
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.task.lock_unpoisoned().is_some() {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        let options = ShimOptions::from_any(req.options.as_ref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let launcher = self
            .launcher
            .clone()
            .ok_or_else(|| status(Code::INTERNAL, "no VM launcher"))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let args = CreateArgs {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req.rootfs.clone(),
            stdio: stdio.clone(),
            options,
        };
        let task = Task::create(args, &launcher, self.exit_hook()).map_err(rpc_error)?;
        // The guest reports an OOM kill before the exit it causes, so containerd (and docker's
        // `OOMKilled`) knows of it when the exit comes.
        let events = self.events.clone();
        let container_id = req.id.clone();
        task.agent.on_oom(Arc::new(move |kills| {
            log::info!(
                "container {container_id}: the guest's OOM killer killed {kills} process(es)"
            );
            events.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: container_id.clone(),
                    ..Default::default()
                }),
            );
        }));
        let pid = task.vmm_pid;
        *self.task.lock_unpoisoned() = Some(Arc::new(task));
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let task = self.task()?;
        let pid = task.start(&req.exec_id).map_err(rpc_error)?;
        if req.exec_id.is_empty() {
            self.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.events.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let task = self.task()?;
        let process = self.process(&task, &req.exec_id)?;
        if !req.exec_id.is_empty() {
            let state = process.state.lock_unpoisoned();
            if state.status == Status::Running {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    "cannot delete a running process",
                ));
            }
            let (code, at) = state.exit.unwrap_or((0, SystemTime::now()));
            let pid = state.pid;
            drop(state);
            task.execs.lock_unpoisoned().remove(&req.exec_id);
            return Ok(api::DeleteResponse {
                pid,
                exit_status: code as u32,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            });
        }
        let task = self
            .task
            .lock_unpoisoned()
            .take()
            .ok_or_else(|| status(Code::NOT_FOUND, "no task"))?;
        let pid = task.vmm_pid;
        // containerd deletes a task it has killed or seen exit; whatever still runs goes.
        lifecycle::delete(&*task, true).map_err(rpc_error)?;
        let (code, at) = process
            .state
            .lock_unpoisoned()
            .exit
            .unwrap_or((128 + libc::SIGKILL, SystemTime::now()));
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: code as u32,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid,
            exit_status: code as u32,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, _req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let task = self.task()?;
        let reply = task
            .agent
            .request(agent_proto::Request::ListProcesses, REQUEST_TIMEOUT)
            .map_err(rpc_error)?;
        let agent_proto::Reply::Processes(list) = reply else {
            return Err(status(Code::INTERNAL, "unexpected agent reply"));
        };
        let processes = list
            .into_iter()
            .map(|p| ProcessInfo {
                pid: p.pid as u32,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        lifecycle::pause(&*task).map_err(rpc_error)?;
        self.events.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        lifecycle::resume(&*task).map_err(rpc_error)?;
        self.events.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        task.kill(&req.exec_id, req.signal as i32, req.all)
            .map_err(rpc_error)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        let spec_json = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        let process: oci_spec::runtime::Process = serde_json::from_slice(&spec_json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let spec = container::translate::process_spec(&process);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        task.add_exec(&req.exec_id, spec, stdio)
            .map_err(rpc_error)?;
        self.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        let process = self.process(&task, &req.exec_id)?;
        let request = agent_proto::Request::ResizeTerminal {
            process: process.agent_id,
            rows: req.height.min(u16::MAX as u32) as u16,
            cols: req.width.min(u16::MAX as u32) as u16,
        };
        task.agent
            .request(request, REQUEST_TIMEOUT)
            .map_err(rpc_error)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        let process = self.process(&task, &req.exec_id)?;
        if req.stdin {
            process.close_stdin(&task.agent);
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let task = self.task()?;
        let resources: serde_json::Value = match req.resources.as_ref() {
            Some(any) => serde_json::from_slice(&any.value)
                .map_err(|e| status(Code::INVALID_ARGUMENT, format!("resources: {e}")))?,
            None => return Ok(api::Empty::new()),
        };
        lifecycle::update(&*task, &resources).map_err(rpc_error)?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let task = self.task()?;
        let process = self.process(&task, &req.exec_id)?;
        drop(task);
        let (code, at) = process.wait();
        Ok(api::WaitResponse {
            exit_status: code as u32,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let task = self.task()?;
        let files = match task
            .agent
            .request(agent_proto::Request::Stats, REQUEST_TIMEOUT)
            .map_err(rpc_error)?
        {
            agent_proto::Reply::Stats(files) => files,
            other => {
                return Err(status(
                    Code::INTERNAL,
                    format!("unexpected agent reply {other:?}"),
                ))
            }
        };
        let stats = crate::stats::packed(&container::guest_stats::GuestStats::parse(&files))
            .map_err(|e| status(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let task = self.task()?;
        let process = self.process(&task, &req.exec_id)?;
        let status = match task.process_status(&process) {
            Status::Creating | Status::Created => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Paused => api::Status::PAUSED,
            Status::Stopped => api::Status::STOPPED,
        };
        let state = process.state.lock_unpoisoned();
        let (code, at) = state
            .exit
            .map(|(c, at)| (c as u32, Some(timestamp(at))))
            .unwrap_or((0, None));
        Ok(api::StateResponse {
            id: req.id,
            bundle: task.bundle.display().to_string(),
            pid: state.pid,
            status: status.into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: code,
            exited_at: at.into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .task
            .lock_unpoisoned()
            .as_ref()
            .map(|t| t.vmm_pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // The shim ends with its last (only) container.
        if self.task.lock_unpoisoned().is_none() {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
