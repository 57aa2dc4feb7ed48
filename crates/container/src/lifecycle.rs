//! The container lifecycle: which verb may act on a container in which status, what the
//! verb then changes, and the OCI hooks that go with it.
//!
//! A container is held either by its monitor process (the runc-style CLI reaches it through
//! the control socket: [`crate::monitored::MonitoredContainer`]) or by the containerd shim
//! that runs it in-process. Both implement [`Holder`], and both front doors call these
//! functions, so each verb's rules are written once. The status itself is recorded by the
//! holder, which is the one that sees the process start and end.

use std::sync::Mutex;

use agent_proto::{CgroupSetting, Reply, Request};
use engine::Vm;
use lock_ext::LockExt;
use serde::{Deserialize, Serialize};

use crate::agent_client::{AgentClient, REQUEST_TIMEOUT};
use crate::hooks::{self, HostHooks};
use crate::plan::Plan;
use crate::state::{OciState, Status, Verb};
use crate::{cgroup, translate, ContainerError};

/// The exit status of processes whose VM died under them.
pub const VM_DIED_STATUS: i32 = 255;

/// What holds a container's VM, seen by the lifecycle.
pub trait Holder {
    fn id(&self) -> &str;

    /// The container's status now.
    fn status(&self) -> Result<Status, ContainerError>;

    /// Its OCI state document, with the status of the hook's moment.
    fn oci_state(&self, status: Status) -> Result<OciState, ContainerError>;

    fn hooks(&self) -> Result<HostHooks, ContainerError>;

    /// Lets the created process run; records `Running`.
    fn start_process(&self) -> Result<(), ContainerError>;

    /// Signals the container's first process (with `all`, every process in the container).
    fn signal(&self, signal: i32, all: bool) -> Result<(), ContainerError>;

    fn pause_vm(&self) -> Result<(), ContainerError>;

    fn resume_vm(&self) -> Result<(), ContainerError>;

    /// Ends the VM and the container's processes; afterwards the status is `Stopped`.
    /// Nothing to stop is not an error.
    fn stop(&self) -> Result<(), ContainerError>;

    /// Removes what the container holds on the host (state, cgroups, mounts). After `stop`.
    fn remove(&self) -> Result<(), ContainerError>;

    /// What `create` planned for the VM (its size, its host cgroup).
    fn plan(&self) -> Result<Plan, ContainerError>;

    /// Applies a live update inside the VM ([`LiveUpdate::apply`], where the VM is).
    fn update_vm(&self, update: &LiveUpdate) -> Result<(), ContainerError>;
}

/// What a live update changes inside a running VM, in the order it is applied.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LiveUpdate {
    /// vCPUs kept online (the rest taken offline), when the CPU limit's count changes.
    #[serde(default)]
    pub online_vcpus: Option<u32>,
    /// Writes to the container's cgroup in the guest, in order.
    pub settings: Vec<CgroupSetting>,
    /// The VM's memory in bytes (through its balloon), when the memory limit changes.
    #[serde(default)]
    pub memory_target: Option<u64>,
}

impl LiveUpdate {
    pub fn is_empty(&self) -> bool {
        self.online_vcpus.is_none() && self.settings.is_empty() && self.memory_target.is_none()
    }

    /// Applies the update to a VM and its agent. vCPUs change first, so that a cpuset
    /// written next names CPUs that are online.
    pub fn apply(
        &self,
        agent: &AgentClient,
        vm: &Mutex<Box<dyn Vm>>,
    ) -> Result<(), ContainerError> {
        let ok = |reply: Reply| match reply {
            Reply::Ok => Ok(()),
            other => Err(ContainerError::Agent(format!("unexpected reply {other:?}"))),
        };
        if let Some(count) = self.online_vcpus {
            ok(agent.request(Request::OnlineCpus { count }, REQUEST_TIMEOUT)?)?;
        }
        if !self.settings.is_empty() {
            ok(agent.request(
                Request::UpdateCgroup(self.settings.clone()),
                REQUEST_TIMEOUT,
            )?)?;
        }
        if let Some(bytes) = self.memory_target {
            vm.lock_unpoisoned().set_memory_target(bytes)?;
        }
        Ok(())
    }
}

/// The end of `create`: the holder has a VM with the process created, and the hooks that
/// prepare the container from the host run now, as runc runs them during create. If one
/// fails, nothing of the container is left.
pub fn created(holder: &impl Holder) -> Result<(), ContainerError> {
    let result = (|| {
        let hooks = holder.hooks()?;
        let state = holder.oci_state(Status::Creating)?;
        hooks::run("createRuntime", &hooks.create_runtime, &state)?;
        hooks::run("prestart", &hooks.prestart, &state)
    })();
    if let Err(e) = result {
        discard(holder);
        return Err(e);
    }
    Ok(())
}

/// `start`. A start that fails leaves the container stopped with its VM gone, as runc
/// leaves it, so that `delete` works. A poststart hook's failure is reported but the
/// container keeps running, as with runc.
pub fn start(holder: &impl Holder) -> Result<(), ContainerError> {
    holder.status()?.allows(Verb::Start)?;
    if let Err(e) = holder.start_process() {
        if let Err(stop) = holder.stop() {
            log::warn!(
                "container {}: stopping after a failed start: {stop}",
                holder.id()
            );
        }
        return Err(e);
    }
    let hooks = holder.hooks()?;
    if !hooks.poststart.is_empty() {
        let state = holder.oci_state(Status::Running)?;
        if let Err(e) = hooks::run("poststart", &hooks.poststart, &state) {
            log::warn!("container {}: {e}", holder.id());
        }
    }
    Ok(())
}

/// `kill`. A paused VM cannot deliver a signal: SIGKILL ends it from outside, and any other
/// signal is refused until the container is resumed.
pub fn kill(holder: &impl Holder, signal: i32, all: bool) -> Result<(), ContainerError> {
    let status = holder.status()?;
    // As runc: `--all` of a stopped container has nothing left to signal, and succeeds.
    if all && status == Status::Stopped {
        return Ok(());
    }
    status.allows(Verb::Kill)?;
    match status {
        // Signal 0 asks whether the container's process is there; the status says it is.
        _ if signal == 0 => Ok(()),
        Status::Paused if signal == libc::SIGKILL => holder.stop(),
        Status::Paused => Err(ContainerError::InvalidState(
            "container is paused; resume it first or send SIGKILL".into(),
        )),
        _ => holder.signal(signal, all),
    }
}

pub fn pause(holder: &impl Holder) -> Result<(), ContainerError> {
    holder.status()?.allows(Verb::Pause)?;
    holder.pause_vm()
}

pub fn resume(holder: &impl Holder) -> Result<(), ContainerError> {
    holder.status()?.allows(Verb::Resume)?;
    holder.resume_vm()
}

/// `delete`: stops what still runs (a running or paused container only with `force`), runs
/// the poststop hooks, and removes the container.
pub fn delete(holder: &impl Holder, force: bool) -> Result<(), ContainerError> {
    let status = holder.status()?;
    if !status.can_delete(force) {
        return Err(ContainerError::InvalidState(format!(
            "cannot delete container {} that is not stopped: {status}",
            holder.id()
        )));
    }
    holder.stop()?;
    // The hooks read the bundle's config; a container whose plan is unreadable still goes.
    match holder.hooks() {
        Ok(hooks) if !hooks.poststop.is_empty() => {
            let ran = holder
                .oci_state(Status::Stopped)
                .and_then(|state| hooks::run("poststop", &hooks.poststop, &state));
            if let Err(e) = ran {
                log::warn!("container {}: {e}", holder.id());
            }
        }
        Ok(_) => {}
        Err(e) => log::warn!("container {}: poststop hooks not run: {e}", holder.id()),
    }
    holder.remove()
}

/// `update`: new resource limits (`linux.resources` as JSON) for a container whose VM runs,
/// applied inside the VM (the container's cgroup in the guest, its online vCPUs
/// and memory) and to the VM's host cgroup. An update the VM cannot take (more memory or
/// vCPUs than it booted with, a setting the guest cannot apply) is refused before anything
/// changes.
pub fn update(holder: &impl Holder, resources: &serde_json::Value) -> Result<(), ContainerError> {
    holder.status()?.allows(Verb::Update)?;
    let plan = holder.plan()?;
    let typed: oci_spec::runtime::LinuxResources = serde_json::from_value(resources.clone())
        .map_err(|e| ContainerError::InvalidResources(e.to_string()))?;
    let live = translate::live_update(&typed, plan.vcpus, plan.memory_mib)?;
    let overhead = crate::paths::VmDefaults::load().vmm_overhead_mib;
    let limits = cgroup::limits_from_resources(resources, plan.memory_mib, overhead)?;
    if !live.is_empty() {
        holder.update_vm(&live)?;
    }
    match &plan.cgroups_path {
        Some(path) => cgroup::update(path, &limits),
        None => {
            log::debug!("container {} has no host cgroup to update", holder.id());
            Ok(())
        }
    }
}

/// Stops and removes a container after a failed step, keeping the first error for the
/// caller: what the cleanup itself hit is only logged.
fn discard(holder: &impl Holder) {
    if let Err(e) = holder.stop() {
        log::warn!("container {}: stopping: {e}", holder.id());
    }
    if let Err(e) = holder.remove() {
        log::warn!("container {}: removing: {e}", holder.id());
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::hooks::HookSpec;

    /// A holder that records what the lifecycle asked of it. The same verbs run end to end
    /// against real VMs in tests/lifecycle.rs (CLI) and integration/shim.sh (shim).
    struct Recorder {
        status: RefCell<Status>,
        calls: RefCell<Vec<&'static str>>,
        fail_start: bool,
        hooks: HostHooks,
    }

    impl Recorder {
        fn new(status: Status) -> Self {
            Recorder {
                status: RefCell::new(status),
                calls: RefCell::new(Vec::new()),
                fail_start: false,
                hooks: HostHooks::default(),
            }
        }

        fn calls(&self) -> Vec<&'static str> {
            self.calls.borrow().clone()
        }
    }

    impl Holder for Recorder {
        fn id(&self) -> &str {
            "c1"
        }
        fn status(&self) -> Result<Status, ContainerError> {
            Ok(*self.status.borrow())
        }
        fn oci_state(&self, status: Status) -> Result<OciState, ContainerError> {
            Ok(OciState::new(
                "c1",
                status,
                Some(42),
                Path::new("/b"),
                "",
                HashMap::new(),
            ))
        }
        fn hooks(&self) -> Result<HostHooks, ContainerError> {
            Ok(self.hooks.clone())
        }
        fn start_process(&self) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("start");
            if self.fail_start {
                return Err(ContainerError::Agent("refused".into()));
            }
            *self.status.borrow_mut() = Status::Running;
            Ok(())
        }
        fn signal(&self, _: i32, _: bool) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("signal");
            Ok(())
        }
        fn pause_vm(&self) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("pause");
            Ok(())
        }
        fn resume_vm(&self) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("resume");
            Ok(())
        }
        fn stop(&self) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("stop");
            *self.status.borrow_mut() = Status::Stopped;
            Ok(())
        }
        fn remove(&self) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("remove");
            Ok(())
        }
        fn plan(&self) -> Result<Plan, ContainerError> {
            Err(ContainerError::NotFound("no plan in these tests".into()))
        }
        fn update_vm(&self, _: &LiveUpdate) -> Result<(), ContainerError> {
            self.calls.borrow_mut().push("update");
            Ok(())
        }
    }

    #[test]
    fn a_failed_start_leaves_the_container_stopped() {
        let mut holder = Recorder::new(Status::Created);
        holder.fail_start = true;
        assert!(start(&holder).is_err());
        assert_eq!(holder.calls(), ["start", "stop"]);
        assert_eq!(holder.status().unwrap(), Status::Stopped);
        // ... and so deletable without force.
        delete(&holder, false).unwrap();
    }

    #[test]
    fn start_is_refused_unless_created() {
        for status in [Status::Running, Status::Paused, Status::Stopped] {
            let holder = Recorder::new(status);
            assert!(start(&holder).is_err(), "{status}");
            assert!(holder.calls().is_empty());
        }
    }

    #[test]
    fn sigkill_ends_a_paused_vm_and_other_signals_wait_for_resume() {
        let holder = Recorder::new(Status::Paused);
        assert!(kill(&holder, libc::SIGTERM, false).is_err());
        kill(&holder, libc::SIGKILL, false).unwrap();
        assert_eq!(holder.calls(), ["stop"]);
        let stopped = Recorder::new(Status::Stopped);
        assert!(matches!(
            kill(&stopped, libc::SIGTERM, false),
            Err(ContainerError::NotRunning)
        ));
    }

    #[test]
    fn delete_of_a_running_container_needs_force() {
        let holder = Recorder::new(Status::Running);
        let refused = delete(&holder, false).unwrap_err().to_string();
        assert_eq!(
            refused,
            "cannot delete container c1 that is not stopped: running"
        );
        delete(&holder, true).unwrap();
        assert_eq!(holder.calls(), ["stop", "remove"]);
    }

    #[test]
    fn a_failing_create_hook_leaves_nothing() {
        let mut holder = Recorder::new(Status::Created);
        holder.hooks.prestart.push(HookSpec {
            path: "/bin/false".into(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: None,
        });
        assert!(created(&holder).is_err());
        assert_eq!(holder.calls(), ["stop", "remove"]);
    }

    #[test]
    fn hooks_read_the_state_with_its_annotations() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("state.json");
        let script = dir.path().join("hook.sh");
        std::fs::write(&script, format!("#!/bin/sh\ncat > {}\n", out.display())).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut annotations = HashMap::new();
        annotations.insert("org.example.key".to_string(), "value".to_string());
        let state = OciState::new(
            "c1",
            Status::Creating,
            Some(7),
            Path::new("/b"),
            "2026-01-01T00:00:00Z",
            annotations,
        );
        let hook = HookSpec {
            path: script.display().to_string(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: Some(10),
        };
        hooks::run("prestart", &[hook], &state).unwrap();
        let seen: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(seen["status"], "creating");
        assert_eq!(seen["pid"], 7);
        assert_eq!(seen["annotations"]["org.example.key"], "value");
        assert_eq!(seen["ociVersion"], crate::state::OCI_VERSION);
    }
}
