//! The container layer's error: one variant per cause a caller may need to tell apart.

use std::path::PathBuf;

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
    /// Something config.json asks for that the runtime cannot provide: `create` fails
    /// rather than dropping it.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Assets(String),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// A bind mount's source cannot be served to the VM.
    #[error("bind mount: {0}")]
    Share(#[from] share::ShareError),
    /// The channel to the agent failed: it closed, timed out or carried something else.
    #[error("agent: {0}")]
    Agent(String),
    /// The agent answered a request with an error, in its own words (for a process that
    /// could not start, runc's: "unable to start container process: ...").
    #[error("{0}")]
    Guest(String),
    /// The VM failed to come up or to serve the container's start; `console` is the end of
    /// the guest's console, when it printed anything.
    #[error("{message}{}", console_lines(.console))]
    Boot { message: String, console: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("monitor: {0}")]
    Monitor(String),
    /// A `linux.namespaces` path that is no namespace of its type, or one the runtime
    /// cannot join.
    #[error("{kind} namespace {}: {reason}", path.display())]
    Namespace {
        kind: String,
        path: PathBuf,
        reason: String,
    },
    #[error("unknown signal {0:?}")]
    UnknownSignal(String),
    /// `linux.resources` given to `update` that is not valid.
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("invalid resources: {0}")]
    InvalidResources(String),
    /// The host's capacity ledger has no room for the VM (or cannot be read).
    #[error("capacity: {0}")]
    Capacity(String),
}

fn console_lines(console: &str) -> String {
    if console.trim().is_empty() {
        String::new()
    } else {
        format!("; last guest console lines:\n{console}")
    }
}

impl ContainerError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ContainerError {
        let path = path.into();
        move |source| ContainerError::Io { path, source }
    }
}

pub type Result<T, E = ContainerError> = std::result::Result<T, E>;
