//! `containerd-shim-supermachine-v2`: containerd's shim v2 for supermachine.
//!
//! One shim process per container, holding that container's VM and the agent channel
//! directly (no runc-style binary in between, no host process per exec). Built on the
//! `containerd-shim` crate pinned to 0.11.0, which speaks containerd 1.6's Task API.

mod io;
mod launcher;
mod options;
mod service;
mod stats;
mod task;

/// The VMs are this process's children and it waits for them itself: the library's own
/// reaper (which collects every child) and subreaper role are off.
fn main() {
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>("io.containerd.supermachine.v2", Some(config));
}
