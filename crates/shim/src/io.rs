//! A process's stdio: the FIFOs containerd gives, relayed to and from the agent.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use agent_proto::{ExitStatus, ProcessId, Stream};
use container::agent_client::{AgentClient, ProcessEvents};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The FIFO paths of one process (empty when containerd gives none).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Opens an output FIFO. Read-write, as containerd's runc shim keeps one: the open never
/// blocks or fails for want of a reader, and the FIFO closes when the process's stream does.
fn open_output(path: &str) -> std::io::Result<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(Some)
}

/// Where a process's output goes, and what its exit does.
pub struct FifoOutput {
    stdout: Option<File>,
    stderr: Option<File>,
    on_exit: Option<Box<dyn FnOnce(ExitStatus) + Send>>,
}

impl std::fmt::Debug for FifoOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FifoOutput").finish_non_exhaustive()
    }
}

impl FifoOutput {
    pub fn open(
        paths: &StdioPaths,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> std::io::Result<Self> {
        Ok(FifoOutput {
            stdout: open_output(&paths.stdout)?,
            stderr: if paths.terminal {
                None
            } else {
                open_output(&paths.stderr)?
            },
            on_exit: Some(Box::new(on_exit)),
        })
    }
}

impl ProcessEvents for FifoOutput {
    fn output(&mut self, stream: Stream, bytes: &[u8]) {
        let sink = match stream {
            Stream::STDOUT => &mut self.stdout,
            Stream::STDERR => &mut self.stderr,
            // The shim passes no descriptors: a guest that names another stream is ignored.
            _ => return,
        };
        if bytes.is_empty() {
            *sink = None;
            return;
        }
        if let Some(file) = sink {
            if let Err(e) = file.write_all(bytes) {
                log::debug!("output dropped: {e}");
            }
        }
    }

    fn exited(&mut self, status: ExitStatus) {
        self.stdout = None;
        self.stderr = None;
        if let Some(f) = self.on_exit.take() {
            f(status);
        }
    }
}

/// Copies a stdin FIFO to a process until its writer goes away, or until `close`.
#[derive(Debug)]
pub struct StdinRelay {
    cancel: Mutex<Option<OwnedFd>>,
}

impl StdinRelay {
    /// Starts relaying `path` (if any) to `process`.
    pub fn start(
        path: &str,
        agent: AgentClient,
        process: ProcessId,
        terminal: bool,
    ) -> std::io::Result<Arc<Self>> {
        let relay = Arc::new(StdinRelay {
            cancel: Mutex::new(None),
        });
        if path.is_empty() {
            return Ok(relay);
        }
        // Non-blocking open succeeds without a writer; poll then waits for one. A FIFO read
        // end reports HUP only after a writer came and went, which is stdin's EOF.
        let fifo = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        let (cancel_read, cancel_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        if let Ok(mut slot) = relay.cancel.lock() {
            *slot = Some(cancel_write);
        }
        std::thread::Builder::new()
            .name(format!("stdin-{process}"))
            .spawn(move || {
                copy_until_eof(fifo, cancel_read, &agent, process);
                if !terminal {
                    let _ = agent.send_stdin(process, &[]);
                }
            })?;
        Ok(relay)
    }

    /// Stops relaying and closes the process's stdin (containerd's CloseIO).
    pub fn close(&self, agent: &AgentClient, process: ProcessId) {
        if let Ok(mut slot) = self.cancel.lock() {
            // Dropping the write end wakes the relay's poll with HUP.
            *slot = None;
        }
        let _ = agent.send_stdin(process, &[]);
    }
}

fn copy_until_eof(mut fifo: File, cancel: OwnedFd, agent: &AgentClient, process: ProcessId) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let mut fds = [
            PollFd::new(fifo.as_fd(), PollFlags::POLLIN),
            PollFd::new(cancel.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.contains(PollFlags::POLLIN) {
            match fifo.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if agent.send_stdin(process, &buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        } else if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return;
        }
        let _ = fifo.as_raw_fd();
    }
}
