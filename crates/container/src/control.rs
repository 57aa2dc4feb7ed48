//! The control socket of a monitor (`<state dir>/control.sock`): how `start`, `kill`,
//! `exec`, `ps`, `pause`, `resume`, `update`, `events` and `delete` reach the process that
//! holds the VM.
//!
//! Frames are agent-proto frames: a request message, then a reply message. An `Exec` turns
//! the connection into that process's session: stdin data frames and `Resize` requests go
//! in, output data frames and a final `Exited` come out.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_proto::{read_frame, write_message, Frame, ProcessInfo, ProcessSpec};
use serde::{Deserialize, Serialize};

use crate::lifecycle::LiveUpdate;
use crate::ContainerError;

pub const SOCKET_NAME: &str = "control.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    Start,
    Signal {
        signal: i32,
        all: bool,
    },
    Pause,
    Resume,
    Processes,
    Exec {
        spec: Box<ProcessSpec>,
    },
    /// Within an exec session: the terminal was resized.
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Within an exec session: stdin is at EOF.
    CloseStdin,
    /// Within an exec session: the relay accepted a connection on the passed listener
    /// `listener`, whose bytes go both ways as `stream`.
    Connect {
        listener: u32,
        stream: agent_proto::Stream,
    },
    /// Within an exec session: the relay wrote `bytes` more of a connection's output.
    Credit {
        stream: agent_proto::Stream,
        bytes: u32,
    },
    /// A live `update` of the VM ([`LiveUpdate::apply`]).
    Update(LiveUpdate),
    /// The container cgroup's files in the guest, as the agent reads them.
    Stats,
    /// Kill the container and end the monitor (delete).
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlReply {
    Ok,
    Error(String),
    Processes(Vec<ProcessInfo>),
    ExecStarted {
        pid: i32,
    },
    /// The exec'd process ended with this shell-style status.
    Exited {
        code: i32,
    },
    Stats(BTreeMap<String, String>),
}

/// `sun_path` holds 108 bytes; deeper paths are reached through the directory's
/// `/proc/self/fd` entry, which the kernel resolves like any path.
fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() < 100 {
        return f(path);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let dir = std::fs::File::open(parent)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    let result = f(&short);
    drop(dir);
    result
}

pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    with_short_path(path, |p| UnixListener::bind(p))
}

pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    with_short_path(path, |p| UnixStream::connect(p))
}

/// Opens a connection to the monitor in `dir`.
pub fn connect(dir: &Path) -> Result<UnixStream, ContainerError> {
    connect_unix(&dir.join(SOCKET_NAME)).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ContainerError::NotRunning,
        _ => ContainerError::Monitor(format!("connect: {e}")),
    })
}

pub fn send(stream: &mut UnixStream, request: &ControlRequest) -> Result<(), ContainerError> {
    write_message(stream, request).map_err(|e| ContainerError::Monitor(e.to_string()))
}

pub fn receive(stream: &mut UnixStream) -> Result<ControlReply, ContainerError> {
    loop {
        match read_frame::<ControlReply, _>(stream) {
            Ok(Frame::Message(reply)) => return Ok(reply),
            Ok(Frame::Data { .. }) => continue,
            Err(agent_proto::ProtoError::Closed) => {
                return Err(ContainerError::Monitor(
                    "the monitor closed the connection".into(),
                ))
            }
            Err(e) => return Err(ContainerError::Monitor(e.to_string())),
        }
    }
}

/// One request, one reply. `Error` replies become errors.
pub fn call(
    dir: &Path,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, ContainerError> {
    let mut stream = connect(dir)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| ContainerError::Monitor(e.to_string()))?;
    send(&mut stream, &request)?;
    match receive(&mut stream)? {
        // The monitor found the container stopped after the caller checked: runc's words.
        ControlReply::Error(message) if message == ContainerError::NotRunning.to_string() => {
            Err(ContainerError::NotRunning)
        }
        ControlReply::Error(message) => Err(ContainerError::Monitor(message)),
        reply => Ok(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_with_paths_longer_than_sun_path_work() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join(SOCKET_NAME);
        assert!(path.as_os_str().len() > 108);
        let listener = bind_unix(&path).unwrap();
        let client = std::thread::spawn(move || {
            let mut s = connect_unix(&path).unwrap();
            send(&mut s, &ControlRequest::Start).unwrap();
            receive(&mut s).unwrap()
        });
        let (mut server, _) = listener.accept().unwrap();
        let request: ControlRequest = match read_frame(&mut server).unwrap() {
            Frame::Message(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(request, ControlRequest::Start);
        write_message(&mut server, &ControlReply::Ok).unwrap();
        assert_eq!(client.join().unwrap(), ControlReply::Ok);
    }

    #[test]
    fn no_monitor_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            connect(dir.path()),
            Err(ContainerError::NotRunning)
        ));
    }
}
