//! Bundle → microVM.
//!
//! This crate owns a container's life on the host: validating the bundle, the state store
//! (one directory per id with `state.json`, guarded by a lock), the plan of the VM (image
//! disk, shape, what the agent mounts and runs), the monitor process that holds the VM and
//! the container's stdio, and the control socket through which the CLI verbs reach it.
//! Both front doors (the runc-style CLI and the containerd shim) use it.

pub mod agent_client;
pub mod bundle;
pub mod cgroup;
pub mod console;
pub mod control;
pub mod exec_client;
pub mod hooks;
pub mod id;
pub mod launch;
pub mod monitor;
pub mod netns;
pub mod network;
pub mod paths;
pub mod plan;
pub mod proc;
pub mod reclaim;
pub mod relay;
pub mod rootfs;
pub mod signal;
pub mod state;
pub mod translate;

use std::path::PathBuf;

pub use paths::{Assets, Paths};
pub use state::{ContainerState, StateStore, Status};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container id format: {0:?}")]
    InvalidId(String),
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    #[error("container with id exists: {0}")]
    AlreadyExists(String),
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("{0}")]
    InvalidState(String),
    #[error("container not running")]
    NotRunning,
    #[error("{0}")]
    Assets(String),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("agent: {0}")]
    Agent(String),
    #[error("{message}; last guest console lines:\n{console}")]
    Boot { message: String, console: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("monitor: {0}")]
    Monitor(String),
    #[error("unknown signal {0:?}")]
    UnknownSignal(String),
}

impl ContainerError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ContainerError {
        let path = path.into();
        move |source| ContainerError::Io { path, source }
    }
}

pub type Result<T, E = ContainerError> = std::result::Result<T, E>;
