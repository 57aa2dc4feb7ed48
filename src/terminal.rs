//! A foreground terminal for `run`/`exec` with `terminal: true` and no `--console-socket`:
//! like runc, this process receives the pty master itself and copies between it and its own
//! stdin/stdout, with its terminal in raw mode for the duration.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// Listening for the pty master on a private socket.
#[derive(Debug)]
pub struct ForegroundTerminal {
    path: PathBuf,
    master: mpsc::Receiver<OwnedFd>,
}

impl ForegroundTerminal {
    pub fn listen(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!(".console-{}.sock", std::process::id()));
        let listener = container::control::bind_unix(&path)
            .with_context(|| format!("bind {}", path.display()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                if let Ok(fd) = container::console::receive_fd(&stream) {
                    let _ = tx.send(fd);
                }
            }
        });
        Ok(ForegroundTerminal { path, master: rx })
    }

    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Takes the master the container's monitor sent and starts copying.
    pub fn attach(self) -> Result<AttachedTerminal> {
        let master = self
            .master
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the container did not send its terminal"))?;
        let _ = std::fs::remove_file(&self.path);
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok();
        if let Some(saved) = &saved {
            let mut raw = saved.clone();
            cfmakeraw(&mut raw);
            let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        }
        let mut terminal = AttachedTerminal {
            master: File::from(master),
            saved,
            output: None,
        };
        terminal.copy_size();
        let mut input_master = terminal.master.try_clone().context("dup pty master")?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || input_master.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut output_master = terminal.master.try_clone().context("dup pty master")?;
        let output = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdout = std::io::stdout();
            while let Ok(n) = output_master.read(&mut buf) {
                if n == 0
                    || stdout
                        .write_all(&buf[..n])
                        .and_then(|()| stdout.flush())
                        .is_err()
                {
                    break;
                }
            }
        });
        terminal.output = Some(output);
        Ok(terminal)
    }
}

impl Drop for ForegroundTerminal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
pub struct AttachedTerminal {
    master: File,
    saved: Option<Termios>,
    output: Option<JoinHandle<()>>,
}

impl AttachedTerminal {
    /// Gives the container's terminal the size of ours (on start and on SIGWINCH).
    pub fn copy_size(&self) {
        copy_size(self.master.as_raw_fd());
    }

    /// The master's fd number, valid while this terminal lives.
    pub fn raw_master(&self) -> i32 {
        self.master.as_raw_fd()
    }

    /// Waits (briefly) for the container's last output to be copied.
    pub fn finish(mut self) {
        if let Some(output) = self.output.take() {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = output.join();
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// Copies our terminal's size to the pty master `fd`.
pub fn copy_size(master: i32) {
    if let Some((rows, cols)) = container::console::window_size(std::io::stdin().as_raw_fd()) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that lives across the call; a stale fd number
        // only makes the ioctl fail.
        unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &size) };
    }
}

impl Drop for AttachedTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}
