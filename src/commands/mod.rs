//! One module per CLI verb.

pub mod cache;
pub mod check;
pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod kill;
pub mod list;
pub mod monitor;
pub mod pause;
pub mod ps;
pub mod resume;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod update;
pub mod version;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use anyhow::{Context as _, Result};
use container::monitored::MonitoredContainer;
use container::state::ContainerDir;
use container::{ContainerState, Paths, StateStore};
use liboci_cli::GlobalOpts;

use crate::logging::LogConfig;
use crate::Command;

/// What every verb gets: where state and caches live, and the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    pub paths: Paths,
    pub store: StateStore,
    pub engine: String,
    pub log: LogConfig,
    /// Whether containers may use the snapshot cache.
    pub snapshots: bool,
    /// `--systemd-cgroup`: a container's `cgroupsPath` must be systemd's `slice:prefix:name`.
    pub systemd_cgroup: bool,
}

impl Context {
    pub fn new(global: &GlobalOpts, engine: String, log: LogConfig) -> Self {
        let paths = Paths::new(global.root.clone());
        let store = StateStore::new(&paths.state_root);
        Context {
            paths,
            store,
            engine,
            log,
            snapshots: true,
            systemd_cgroup: global.systemd_cgroup,
        }
    }

    /// An existing container, as the lifecycle acts on it.
    pub fn container(&self, id: &str) -> Result<MonitoredContainer> {
        Ok(MonitoredContainer::open(&self.store, id)?)
    }

    /// An existing container and its state.
    pub fn open(&self, id: &str) -> Result<(ContainerDir, ContainerState)> {
        let dir = self.store.open(id)?;
        let state = dir.load()?;
        Ok((dir, state))
    }

    /// This binary again, with this invocation's root and log flags, for a process that
    /// outlives the verb (a container's monitor, an exec relay); the caller adds the rest.
    /// `sync`, the write end of the pipe the verb reads the helper's answer from, stays open
    /// across the helper's `exec`, its number in the environment (`monitor::take_sync_fd`).
    pub fn helper(&self, sync: &OwnedFd) -> Result<std::process::Command> {
        let exe = std::env::current_exe().context("locate own executable")?;
        let mut command = std::process::Command::new(exe);
        command.arg("--root").arg(self.store.root());
        if let Some(log) = &self.log.file {
            command.arg("--log").arg(create::absolute(log)?);
        }
        if self.log.format == crate::logging::Format::Json {
            command.args(["--log-format", "json"]);
        }
        if self.log.debug {
            command.arg("--debug");
        }
        let sync_fd = sync.as_raw_fd();
        command.env(container::monitor::sync_fd_env(), sync_fd.to_string());
        // SAFETY: between fork and exec only fcntl runs, on an fd that exists in the child.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(sync_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }
}

/// Runs a verb; the returned code is the process's exit status.
pub fn dispatch(command: Command, context: &Context) -> Result<i32> {
    match command {
        Command::Create(args) => create::run(args, context),
        Command::Start(args) => start::run(args, context),
        Command::State(args) => state::run(args, context),
        Command::Kill(args) => kill::run(args, context),
        Command::Delete(args) => delete::run(args, context),
        Command::Run(args) => run::run(*args, context),
        Command::Exec(args) => exec::run(*args, context),
        Command::List(args) => list::run(args, context),
        Command::Ps(args) => ps::run(args, context),
        Command::Pause(args) => pause::run(args, context),
        Command::Resume(args) => resume::run(args, context),
        Command::Update(args) => update::run(*args, context),
        Command::Events(args) => events::run(args, context),
        Command::Features(args) => features::run(args, context),
        Command::Spec(args) => spec::run(args, context),
        Command::Cache(args) => cache::run(args, context),
        Command::Check => check::run(context),
        Command::Monitor(args) => monitor::run(args, context),
        Command::ExecRelay(args) => exec::relay(args, context),
    }
}
