//! A container held by its monitor process, as the runc-style CLI verbs see it: its state
//! directory, and the monitor reached through the control socket. The monitor records the
//! container's status in `state.json`; a monitor that is gone means `stopped`.

use std::time::Duration;

use crate::control::{self, ControlRequest};
use crate::hooks::HostHooks;
use crate::lifecycle::{Holder, LiveUpdate};
use crate::plan::Plan;
use crate::state::{ContainerDir, ContainerState, OciState, StateStore, Status};
use crate::{proc, ContainerError};

/// How long a verb waits for the monitor to answer a control request (a `start` includes
/// attaching the network, which under TCG takes a few guest round trips).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `stop` lets the monitor end the VM and record the exit before it kills it.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct MonitoredContainer {
    pub dir: ContainerDir,
}

impl MonitoredContainer {
    pub fn open(store: &StateStore, id: &str) -> Result<Self, ContainerError> {
        Ok(MonitoredContainer {
            dir: store.open(id)?,
        })
    }

    fn call(&self, request: ControlRequest) -> Result<(), ContainerError> {
        control::call(&self.dir.path, request, CONTROL_TIMEOUT).map(|_| ())
    }

    /// The state to stop from. A container still being created whose monitor has not yet
    /// recorded its pid (its `create` was killed in between, or is that far) is marked
    /// stopped under the state lock: its monitor, which records its pid under that lock
    /// only while the container is still being created, then gives up instead of starting a
    /// VM that nothing would stop.
    fn stop_before_a_monitor(&self) -> Result<ContainerState, ContainerError> {
        let lock = self.dir.lock_state()?;
        let mut state = self.dir.load()?;
        if state.status == Status::Creating && state.pid.is_none() {
            state.status = Status::Stopped;
            self.dir.save(&state, &lock)?;
        }
        Ok(state)
    }
}

impl Holder for MonitoredContainer {
    fn id(&self) -> &str {
        &self.dir.id
    }

    fn status(&self) -> Result<Status, ContainerError> {
        Ok(self.dir.load()?.current_status())
    }

    fn oci_state(&self, status: Status) -> Result<OciState, ContainerError> {
        Ok(self.dir.load()?.oci_state_as(status))
    }

    fn hooks(&self) -> Result<HostHooks, ContainerError> {
        Ok(Plan::load(&self.dir)?.hooks)
    }

    fn start_process(&self) -> Result<(), ContainerError> {
        self.call(ControlRequest::Start)
    }

    fn signal(&self, signal: i32, all: bool) -> Result<(), ContainerError> {
        self.call(ControlRequest::Signal { signal, all })
    }

    fn pause_vm(&self) -> Result<(), ContainerError> {
        self.call(ControlRequest::Pause)
    }

    fn resume_vm(&self) -> Result<(), ContainerError> {
        self.call(ControlRequest::Resume)
    }

    fn plan(&self) -> Result<Plan, ContainerError> {
        Plan::load(&self.dir)
    }

    fn update_vm(&self, update: &LiveUpdate) -> Result<(), ContainerError> {
        self.call(ControlRequest::Update(update.clone()))
    }

    /// Asks the monitor to stop (it ends the VM and records the exit); a monitor that does
    /// not go in time, or is still creating (no control socket yet), is killed, and its VM
    /// dies with it (PR_SET_PDEATHSIG).
    fn stop(&self) -> Result<(), ContainerError> {
        let state = self.stop_before_a_monitor()?;
        let Some(pid) = state
            .pid
            .filter(|&pid| proc::is_alive(pid, state.pid_start_time))
        else {
            return Ok(());
        };
        let creating = state.status == Status::Creating;
        if !creating {
            if let Err(e) =
                control::call(&self.dir.path, ControlRequest::Stop, Duration::from_secs(5))
            {
                log::debug!("asking monitor {pid} to stop: {e}");
            }
        }
        if creating || !proc::wait_gone(pid, state.pid_start_time, STOP_GRACE) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if !proc::wait_gone(pid, state.pid_start_time, Duration::from_secs(5)) {
                return Err(ContainerError::Monitor(format!(
                    "monitor {pid} of container {} did not exit after SIGKILL",
                    self.dir.id
                )));
            }
        }
        Ok(())
    }

    /// Removes the container's cgroups and state directory.
    fn remove(&self) -> Result<(), ContainerError> {
        self.dir.discard()
    }
}
