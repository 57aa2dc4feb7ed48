//! Terminals on the host side.
//!
//! With `--console-socket`, runc makes a pty and sends its master to the caller over that Unix
//! socket (SCM_RIGHTS); the container's process holds the slave. Here the container's process
//! is in the guest, so the host pty's slave is held by the relaying process (the monitor or an
//! exec relay), made raw (the guest's pty does the line discipline) and made that process's
//! controlling terminal, so that a resize of the master reaches it as SIGWINCH.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::pty::{openpty, Winsize};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

use crate::ContainerError;

/// A host pty whose master has been handed to the caller.
#[derive(Debug)]
pub struct HostConsole {
    pub slave: OwnedFd,
}

impl HostConsole {
    /// Makes a pty, sends the master to `socket`, and keeps the slave as this process's
    /// controlling terminal (the caller must be a session leader without one).
    pub fn create_and_send(
        socket: &Path,
        size: Option<(u16, u16)>,
    ) -> Result<Self, ContainerError> {
        let winsize = size.map(|(rows, cols)| Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = openpty(winsize.as_ref(), None)
            .map_err(|e| ContainerError::Monitor(format!("openpty: {e}")))?;
        let mut termios = tcgetattr(&pty.slave)
            .map_err(|e| ContainerError::Monitor(format!("tcgetattr: {e}")))?;
        cfmakeraw(&mut termios);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &termios)
            .map_err(|e| ContainerError::Monitor(format!("tcsetattr: {e}")))?;
        let name = nix::unistd::ttyname(&pty.slave)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/dev/ptmx".into());
        send_fd(socket, pty.master.as_raw_fd(), &name)?;
        drop(pty.master);
        // SAFETY: TIOCSCTTY with argument 0 on a terminal fd this process owns.
        if unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
            log::debug!("TIOCSCTTY: {}", std::io::Error::last_os_error());
        }
        Ok(HostConsole { slave: pty.slave })
    }

    /// The current window size (rows, cols) of the host pty.
    pub fn size(&self) -> Option<(u16, u16)> {
        window_size(self.slave.as_raw_fd())
    }
}

pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into memory we own for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// Sends `fd` over the Unix socket at `path`, with `name` as the message (as runc does).
pub fn send_fd(path: &Path, fd: RawFd, name: &str) -> Result<(), ContainerError> {
    let stream = crate::control::connect_unix(path).map_err(|e| {
        ContainerError::Monitor(format!("connect to console socket {}: {e}", path.display()))
    })?;
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| ContainerError::Monitor(format!("send pty master: {e}")))?;
    Ok(())
}

/// Receives one fd sent with SCM_RIGHTS (the caller's side of `--console-socket`).
pub fn receive_fd(stream: &UnixStream) -> Result<OwnedFd, ContainerError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(|e| ContainerError::Monitor(format!("recvmsg: {e}")))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| ContainerError::Monitor(e.to_string()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd in our table for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(ContainerError::Monitor(
        "no fd in the console socket message".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_fd_sent_over_a_socket_arrives_as_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let sender = std::thread::spawn({
            let path = path.clone();
            let fd = file.as_raw_fd();
            move || send_fd(&path, fd, "/dev/pts/x").unwrap()
        });
        let (stream, _) = listener.accept().unwrap();
        let got = receive_fd(&stream).unwrap();
        sender.join().unwrap();
        let a = nix::sys::stat::fstat(file.as_raw_fd()).unwrap();
        let b = nix::sys::stat::fstat(got.as_raw_fd()).unwrap();
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
    }
}
