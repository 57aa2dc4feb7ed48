//! The relaying side of an exec session (the process `exec` leaves behind): it asks the
//! monitor to run a process, then carries that process's stdio and signals until it exits.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use agent_proto::{encode_data, encode_message, read_frame, Frame, PassedFd, ProcessSpec, Stream};
use nix::sys::signal::{SigSet, Signal};

use crate::console::{self, HostConsole};
use crate::control::{self, ControlReply, ControlRequest};
use crate::passed::{self, HostEnds};
use crate::relay::{self, write_fd};
use crate::ContainerError;

/// A started exec'd process, before its stdio is relayed.
#[derive(Debug)]
pub struct ExecSession {
    stream: UnixStream,
    console: Option<HostConsole>,
    /// Descriptors this process holds for the exec'd one (`--preserve-fds`), relayed here.
    passed: Vec<PassedFd>,
    /// Guest pid of the process.
    pub pid: i32,
}

impl ExecSession {
    /// Starts `spec` in the container whose state dir is `dir`. With `console_socket`, this
    /// process must be a session leader: the pty's slave becomes its controlling terminal.
    pub fn start(
        dir: &Path,
        spec: ProcessSpec,
        console_socket: Option<&Path>,
    ) -> Result<Self, ContainerError> {
        let size = spec.console_size;
        let terminal = spec.terminal;
        let passed = spec.passed_fds.clone();
        let mut stream = control::connect(dir)?;
        control::send(
            &mut stream,
            &ControlRequest::Exec {
                spec: Box::new(spec),
            },
        )?;
        let pid = match control::receive(&mut stream)? {
            ControlReply::ExecStarted { pid } => pid,
            ControlReply::Error(message) => return Err(ContainerError::Monitor(message)),
            other => {
                return Err(ContainerError::Monitor(format!(
                    "unexpected reply {other:?}"
                )))
            }
        };
        let console = match (terminal, console_socket) {
            (true, Some(socket)) => Some(HostConsole::create_and_send(socket, size)?),
            _ => None,
        };
        Ok(ExecSession {
            stream,
            console,
            passed,
            pid,
        })
    }

    /// Relays stdio (this process's, or the pty's) and signals until the process exits;
    /// returns its shell-style status. Block the signals to forward before calling.
    /// `terminal` says this process's own stdio is the terminal (foreground use, no console
    /// socket): stdin EOF is then not a close, and resizes are read from stdin.
    pub fn relay(self, signals: SigSet, terminal: bool) -> Result<i32, ContainerError> {
        let writer = Arc::new(Mutex::new(
            self.stream
                .try_clone()
                .map_err(|e| ContainerError::Monitor(e.to_string()))?,
        ));
        let send = |writer: &Arc<Mutex<UnixStream>>, bytes: &[u8]| -> bool {
            writer
                .lock()
                .map(|mut w| w.write_all(bytes).is_ok())
                .unwrap_or(false)
        };
        let (out_fd, err_fd, input) = match &self.console {
            Some(c) => {
                let fd = c.slave.as_raw_fd();
                (fd, fd, c.slave.try_clone().map(File::from).ok())
            }
            // SAFETY: fd 0 is this process's stdin, handed to the relay thread for good.
            None => (1, 2, Some(unsafe { File::from_raw_fd(0) })),
        };
        if let Some(input) = input {
            let stdin_writer = Arc::clone(&writer);
            relay::pump_input(
                "stdin",
                input,
                self.console.is_some() || terminal,
                move |bytes| {
                    let mut out = Vec::new();
                    if bytes.is_empty() {
                        if encode_message(&ControlRequest::CloseStdin, &mut out).is_err() {
                            return false;
                        }
                    } else {
                        encode_data(0, Stream::STDIN, bytes, &mut out);
                    }
                    send(&stdin_writer, &out)
                },
            );
        }
        let ends = Arc::new(HostEnds::default());
        let session = SessionGuest {
            writer: Arc::clone(&writer),
        };
        passed::relay(&session, &self.passed, &ends);
        let signal_writer = Arc::clone(&writer);
        let console_fd = match &self.console {
            Some(c) => Some(c.slave.as_raw_fd()),
            None if terminal => Some(0),
            None => None,
        };
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let Ok(signal) = signals.wait() else { continue };
                let request = if signal == Signal::SIGWINCH {
                    match console_fd.and_then(console::window_size) {
                        Some((rows, cols)) => ControlRequest::Resize { rows, cols },
                        None => continue,
                    }
                } else {
                    ControlRequest::Signal {
                        signal: signal as i32,
                        all: false,
                    }
                };
                let mut out = Vec::new();
                if encode_message(&request, &mut out).is_ok() && !send(&signal_writer, &out) {
                    return;
                }
            });
        let mut reader = self.stream;
        loop {
            match read_frame::<ControlReply, _>(&mut reader) {
                Ok(Frame::Data { stream, bytes, .. }) => {
                    let fd = match stream {
                        Stream::STDOUT => out_fd,
                        Stream::STDERR => err_fd,
                        _ => {
                            ends.output(stream, &bytes);
                            continue;
                        }
                    };
                    if bytes.is_empty() {
                        if out_fd != err_fd {
                            relay::close_to_null(fd);
                        }
                    } else if let Err(e) = write_fd(fd, &bytes) {
                        log::debug!("exec output dropped: {e}");
                    }
                }
                Ok(Frame::Message(ControlReply::Exited { code })) => return Ok(code),
                Ok(Frame::Message(other)) => log::debug!("exec session: ignoring {other:?}"),
                Err(e) => {
                    return Err(ContainerError::Monitor(format!(
                        "lost the container while the process ran: {e}"
                    )))
                }
            }
        }
    }
}

/// The exec'd process's passed streams, through the session's connection to the monitor.
#[derive(Clone)]
struct SessionGuest {
    writer: Arc<Mutex<UnixStream>>,
}

impl SessionGuest {
    fn write(&self, frames: &[u8]) -> bool {
        self.writer
            .lock()
            .map(|mut w| w.write_all(frames).is_ok())
            .unwrap_or(false)
    }
}

impl passed::Guest for SessionGuest {
    fn send(&self, stream: Stream, bytes: &[u8]) -> bool {
        let mut out = Vec::new();
        encode_data(0, stream, bytes, &mut out);
        self.write(&out)
    }

    /// Asked of the monitor, which closes the stream if the guest cannot connect it.
    fn connect(&self, listener: u32, stream: Stream) -> Result<(), String> {
        let mut out = Vec::new();
        encode_message(&ControlRequest::Connect { listener, stream }, &mut out)
            .map_err(|e| e.to_string())?;
        if self.write(&out) {
            Ok(())
        } else {
            Err("the session's connection to the monitor is gone".into())
        }
    }

    /// Passed on by the monitor.
    fn credit(&self, stream: Stream, bytes: u32) {
        let mut out = Vec::new();
        if encode_message(&ControlRequest::Credit { stream, bytes }, &mut out).is_ok() {
            self.write(&out);
        }
    }

    fn gone(&self) -> bool {
        false
    }
}
