//! Moving a process's stdio between host file descriptors and the agent (or an exec
//! session's socket).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use agent_proto::{ExitStatus, Stream};

use crate::agent_client::ProcessEvents;
use crate::passed::HostEnds;

/// Writes a process's output to host fds (stdout/stderr of this process, or a pty slave) and
/// hands its exit to a callback.
pub struct FdOutput {
    stdout: RawFd,
    stderr: RawFd,
    /// Where the streams of passed descriptors go.
    passed: Option<Arc<HostEnds>>,
    on_exit: Option<Box<dyn FnOnce(ExitStatus) + Send>>,
}

impl std::fmt::Debug for FdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdOutput")
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl FdOutput {
    pub fn new(
        stdout: RawFd,
        stderr: RawFd,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> Self {
        FdOutput {
            stdout,
            stderr,
            passed: None,
            on_exit: Some(Box::new(on_exit)),
        }
    }

    /// Sends the streams of passed descriptors to `ends`.
    pub fn with_passed(mut self, ends: Arc<HostEnds>) -> Self {
        self.passed = Some(ends);
        self
    }
}

/// Writes all of `bytes` to a raw fd we do not own.
pub fn write_fd(fd: RawFd, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: writing from a valid buffer to an fd number; a closed fd yields EBADF.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Points `fd` at /dev/null: the reader sees EOF, and the fd number stays valid.
pub fn close_to_null(fd: RawFd) {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        // SAFETY: dup2 onto an fd number this process uses for this stream only.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

impl ProcessEvents for FdOutput {
    fn output(&mut self, stream: Stream, bytes: &[u8]) {
        let fd = match stream {
            Stream::STDOUT => self.stdout,
            Stream::STDERR => self.stderr,
            _ => {
                if let Some(ends) = &self.passed {
                    ends.output(stream, bytes);
                }
                return;
            }
        };
        if bytes.is_empty() {
            // A terminal carries both streams; closing it is the relay's business.
            if self.stdout != self.stderr {
                close_to_null(fd);
            }
            return;
        }
        if let Err(e) = write_fd(fd, bytes) {
            log::debug!("container output on fd {fd} dropped: {e}");
        }
    }

    fn exited(&mut self, status: ExitStatus) {
        if let Some(f) = self.on_exit.take() {
            f(status);
        }
    }
}

/// Copies `input` to `send` in a thread named `name` until EOF or `send` refuses; at EOF
/// calls `send(&[])` unless the input is a terminal (a terminal's EOF is a keystroke in the
/// guest's line discipline, not a close).
pub fn pump_input(
    name: &str,
    mut input: impl Read + Send + 'static,
    is_terminal: bool,
    mut send: impl FnMut(&[u8]) -> bool + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if !send(&buf[..n]) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO on a pty whose other side closed; EBADF if there is no stdin at all.
                    Err(_) => break,
                }
            }
            if !is_terminal {
                send(&[]);
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the relay {name}: {e}");
    }
}

/// A writer over a shared raw fd (used for the monitor's own stdout/stderr).
#[derive(Debug)]
pub struct RawFdWriter(pub RawFd);

impl Write for RawFdWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_fd(self.0, buf).map(|()| buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
