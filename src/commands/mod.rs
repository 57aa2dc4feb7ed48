//! One module per CLI verb.

pub mod create;
pub mod delete;
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

use anyhow::{bail, Result};
use container::state::ContainerDir;
use container::{ContainerState, Paths, StateStore};
use liboci_cli::{CommonCmd, GlobalOpts, StandardCmd};

use crate::logging::LogConfig;
use crate::Command;

/// What every verb gets: where state and caches live, and the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    pub paths: Paths,
    pub store: StateStore,
    pub engine: String,
    pub log: LogConfig,
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
        }
    }

    /// An existing container and its state.
    pub fn open(&self, id: &str) -> Result<(ContainerDir, ContainerState)> {
        let dir = self.store.open(id)?;
        let state = dir.load()?;
        Ok((dir, state))
    }
}

/// Runs a verb; the returned code is the process's exit status.
pub fn dispatch(command: Command, context: &Context) -> Result<i32> {
    match command {
        Command::Standard(cmd) => match *cmd {
            StandardCmd::Create(args) => create::run(args, context),
            StandardCmd::Start(args) => start::run(args, context),
            StandardCmd::State(args) => state::run(args, context),
            StandardCmd::Kill(args) => kill::run(args, context),
            StandardCmd::Delete(args) => delete::run(args, context),
        },
        Command::Common(cmd) => match *cmd {
            CommonCmd::Exec(args) => exec::run(args, context),
            CommonCmd::Features(args) => features::run(args, context),
            CommonCmd::List(args) => list::run(args, context),
            CommonCmd::Pause(args) => pause::run(args, context),
            CommonCmd::Resume(args) => resume::run(args, context),
            CommonCmd::Ps(args) => ps::run(args, context),
            CommonCmd::Run(args) => run::run(args, context),
            CommonCmd::Spec(args) => spec::run(args, context),
            CommonCmd::Update(args) => update::run(args, context),
            CommonCmd::Checkpointt(_) => bail!("checkpoint is not supported by supermachine"),
            CommonCmd::Events(_) => bail!("events is not supported by supermachine"),
        },
        Command::Monitor(args) => monitor::run(args, context),
        Command::ExecRelay(args) => exec::relay(args, context),
    }
}
