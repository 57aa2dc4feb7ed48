//! The guest agent: PID 1 of every supermachine microVM.
//!
//! It mounts the guest's own filesystems, opens the host channel, says `Ready`, and then
//! serves the host: it mounts the container root (the image disk under a tmpfs overlay),
//! pivots into it, and runs, signals, reaps and relays the stdio of the container's processes.
//! It is one `poll` loop on one thread; the only other threads relay the share filesystem
//! (see `shares`) and touch nothing a child that shares the agent's memory until `exec`
//! (see `spawn`) uses.

mod caps;
mod cgroup;
mod channel;
mod cmdline;
mod cpus;
mod error;
mod logging;
mod network;
mod passed;
mod paths;
mod procfs;
mod seccomp;
mod server;
mod setup;
mod shares;
mod spawn;
mod userns;
mod warm;

use std::time::Duration;

use nix::mount::{mount, MsFlags};

fn main() {
    if let Err(e) = early_mounts() {
        agent_log!("early mounts failed: {e}");
    }
    let cmdline = cmdline::Cmdline::read();
    logging::set_debug(cmdline.debug);

    if let Err(e) = network::loopback_up() {
        agent_log!("lo: {}", e.0);
    }
    caps::last_cap();
    if std::process::id() != 1 {
        agent_log!("warning: not PID 1; orphans will not be reaped here");
    }

    let channel = loop {
        match channel::Channel::open(&cmdline) {
            Ok(channel) => break channel,
            Err(e) => {
                // The virtio device may still be probing; there is nothing else to do without it.
                agent_log!("waiting for host channel: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let mut server = match server::Server::new(channel, cmdline) {
        Ok(server) => server,
        Err(e) => fatal(&format!("cannot start: {e}")),
    };
    if let Err(e) = server.run() {
        fatal(&format!("stopped: {e}"));
    }
    power_off();
}

/// The filesystems the agent itself needs, in the initramfs root.
fn early_mounts() -> nix::Result<()> {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        match mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fatal(message: &str) -> ! {
    agent_log!("{message}");
    power_off();
}

/// Ends the VM. The host runs the guest with reboot as exit (`-no-reboot`, `reboot=t`).
fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not PID 1 (a test run): just leave.
    std::process::exit(1);
}
