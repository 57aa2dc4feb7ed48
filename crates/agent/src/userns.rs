//! The container's user namespace (config.json's `user` namespace with its `uidMappings` and
//! `gidMappings`), made once at setup and joined by every container process.
//!
//! The mappings of a user namespace can only be written from outside it by a process with
//! CAP_SETUID/CAP_SETGID over its parent; a container process, which is cloned with the
//! agent's memory and suspends the agent until it execs, cannot have that done for it. So
//! the agent makes the namespace itself, before any container process: a short-lived child
//! is cloned into a new user namespace, the agent writes that child's maps and keeps a
//! descriptor of the namespace, and the child exits. Each container process joins the
//! namespace with `setns` once the container's mounts are made (they stay owned by the VM's
//! namespace, as the VM's own are), before its ids and capabilities are set: its uid 0 is
//! then the mapped VM uid, and its capabilities hold only inside the namespace.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use agent_proto::{IdMapping, UserNamespace};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::{pipe, Pid};

use crate::error::{err, SetupError};

/// Stack of the child that only holds the namespace while its maps are written.
const HOLDER_STACK: usize = 16 * 1024;

/// A user namespace with its maps written, kept alive by this descriptor.
#[derive(Debug)]
pub struct ContainerUserNamespace(OwnedFd);

impl ContainerUserNamespace {
    pub fn create(spec: &UserNamespace) -> Result<Self, SetupError> {
        let (hold_r, hold_w) = pipe().map_err(err("pipe"))?;
        let mut stack = vec![0u8; HOLDER_STACK];
        let mut hold = Some(File::from(hold_r));
        let agent_end = hold_w.as_raw_fd();
        // The holder closes its copy of the agent's end, waits for the end of the pipe (the
        // agent closes its own once the maps are written and the namespace opened), and
        // exits.
        let holder = move || {
            // SAFETY: `agent_end` is this process's copy of the pipe's write end, which
            // nothing else in it uses.
            unsafe { libc::close(agent_end) };
            if let Some(mut pipe) = hold.take() {
                let _ = pipe.read(&mut [0u8; 1]);
            }
            0
        };
        // SAFETY: without CLONE_VM the child runs on its own copy of the agent's memory, as
        // after fork(2); it only reads a pipe and returns, calling nothing that another
        // thread of the agent could have left locked.
        let pid = unsafe {
            nix::sched::clone(
                Box::new(holder),
                &mut stack,
                CloneFlags::CLONE_NEWUSER,
                Some(Signal::SIGCHLD as i32),
            )
        }
        .map_err(err("clone a user namespace"))?;
        let made = write_maps(pid, spec).and_then(|()| {
            File::open(format!("/proc/{pid}/ns/user"))
                .map(OwnedFd::from)
                .map_err(err("open the user namespace"))
        });
        drop(hold_w);
        let _ = nix::sys::wait::waitpid(pid, None);
        made.map(ContainerUserNamespace)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

fn write_maps(pid: Pid, spec: &UserNamespace) -> Result<(), SetupError> {
    for (file, mappings) in [
        ("uid_map", &spec.uid_mappings),
        ("gid_map", &spec.gid_mappings),
    ] {
        let path = format!("/proc/{pid}/{file}");
        let text = map_text(mappings);
        // One write: the kernel takes a map whole, once.
        std::fs::write(&path, &text).map_err(err(format!("write {file} {:?}", text.trim_end())))?;
    }
    Ok(())
}

/// A `uid_map`/`gid_map` body: "inside outside count" per line.
fn map_text(mappings: &[IdMapping]) -> String {
    mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
        .collect()
}

/// In a container process, before its ids and capabilities are set: joins the namespace.
pub fn join(namespace: BorrowedFd<'_>) -> Result<(), String> {
    nix::sched::setns(namespace, CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("unable to join the user namespace: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_text_is_one_line_per_mapping() {
        let mappings = [
            IdMapping {
                container_id: 0,
                host_id: 100_000,
                size: 65_536,
            },
            IdMapping {
                container_id: 65_536,
                host_id: 1000,
                size: 1,
            },
        ];
        assert_eq!(map_text(&mappings), "0 100000 65536\n65536 1000 1\n");
    }
}
