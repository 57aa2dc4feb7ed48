//! Bundle → microVM.
//!
//! This crate owns a container's life on the host: validating the bundle, the state store
//! (one directory per id with `state.json`, guarded by a lock), the plan of the VM (image
//! disk, shape, what the agent mounts and runs), the lifecycle (which verb may act in which
//! status, and its hooks: [`lifecycle`]), the VM start-up from a plan to a created container
//! ([`startup`]), the monitor process that holds the VM and the container's stdio for the
//! CLI, and the control socket through which the CLI verbs reach it. Both front doors (the
//! runc-style CLI and the containerd shim) use it.

pub mod agent_client;
pub mod bundle;
pub mod capacity;
pub mod cgroup;
pub mod console;
pub mod control;
mod error;
pub mod exec_client;
pub mod guest_stats;
pub mod hooks;
pub mod id;
pub mod launch;
pub mod lifecycle;
pub mod monitor;
pub mod monitored;
pub mod namespaces;
pub mod netns;
pub mod network;
pub mod passed;
pub mod paths;
pub mod plan;
pub mod proc;
pub mod reclaim;
pub mod relay;
pub mod rootfs;
pub mod shares;
pub mod signal;
pub mod startup;
pub mod state;
pub mod systemd;
pub mod translate;

pub use error::{ContainerError, Result};
pub use paths::{Assets, Paths};
pub use state::{ContainerState, OciState, StateStore, Status};
