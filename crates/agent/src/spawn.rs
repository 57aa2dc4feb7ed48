//! Starting a container process: fork, apply the OCI process settings in the child, report
//! setup success or the reason for failure, wait for `start`, exec.
//!
//! The agent is single-threaded, so the child may allocate and use std freely between fork
//! and exec. Setup errors (a missing executable, a bad user) reach the host as the reply to
//! `CreateProcess`, the way runc fails `create` rather than the container's first instant.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use agent_proto::ProcessSpec;
use nix::fcntl::OFlag;
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use crate::caps;
use crate::setup::ProcFinish;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started (or waiting-to-start) process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// Pipe to the process's stdin; for a terminal, the pty master serves both directions.
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
    /// Writing a byte here lets a process created with `wait_for_start` exec.
    pub start: Option<OwnedFd>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

pub fn spawn(
    spec: &ProcessSpec,
    wait_for_start: bool,
    finish: Option<&ProcFinish>,
) -> Result<Spawned, String> {
    if spec.args.is_empty() {
        return Err("process.args is empty".to_string());
    }
    let env = environment(spec, std::env::var(TUNABLES).ok().as_deref());
    let (sync_r, sync_w) = pipe()?;
    let (start_r, start_w) = if wait_for_start {
        let (r, w) = pipe()?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };

    enum ChildStdio {
        Terminal {
            slave: OwnedFd,
        },
        Pipes {
            stdin: OwnedFd,
            stdout: OwnedFd,
            stderr: OwnedFd,
        },
    }
    let mut spawned = Spawned {
        pid: Pid::from_raw(0),
        stdin: None,
        stdout: None,
        stderr: None,
        pty_master: None,
        start: start_w,
    };
    let child_stdio = if spec.terminal {
        let size = spec.console_size.map(|(rows, cols)| Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = openpty(size.as_ref(), None).map_err(|e| format!("openpty: {e}"))?;
        set_cloexec(pty.master.as_raw_fd());
        set_cloexec(pty.slave.as_raw_fd());
        spawned.pty_master = Some(pty.master);
        ChildStdio::Terminal { slave: pty.slave }
    } else {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        spawned.stdin = Some(in_w);
        spawned.stdout = Some(out_r);
        spawned.stderr = Some(err_r);
        ChildStdio::Pipes {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        }
    };

    // SAFETY: the agent is single-threaded, so the child is a full copy of a consistent
    // process: no lock can be held by a thread that does not exist in the child.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            // The child's stderr becomes the container's: no agent diagnostics from here on.
            crate::logging::set_debug(false);
            drop(sync_r);
            let stdio_fds = match &child_stdio {
                ChildStdio::Terminal { slave } => {
                    [slave.as_raw_fd(), slave.as_raw_fd(), slave.as_raw_fd()]
                }
                ChildStdio::Pipes {
                    stdin,
                    stdout,
                    stderr,
                } => [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            };
            let result = child_setup(spec, &env, stdio_fds, spec.terminal, finish);
            let mut sync = File::from(sync_w);
            match result {
                Ok(program) => {
                    let _ = sync.write_all(&[0]);
                    drop(sync);
                    if let Some(start_r) = start_r {
                        let mut byte = [0u8; 1];
                        match File::from(start_r).read(&mut byte) {
                            Ok(1) => {}
                            // The host deleted the container before starting it.
                            _ => child_exit(1),
                        }
                    }
                    exec(&program, &spec.args, &env)
                }
                Err(message) => {
                    let mut report = vec![1u8];
                    report.extend_from_slice(message.as_bytes());
                    let _ = sync.write_all(&report);
                    child_exit(127)
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(child_stdio);
            drop(sync_w);
            drop(start_r);
            spawned.pid = child;
            let mut report = Vec::new();
            let _ = File::from(sync_r).read_to_end(&mut report);
            match report.split_first() {
                Some((0, _)) => Ok(spawned),
                Some((_, message)) => {
                    reap(child);
                    Err(String::from_utf8_lossy(message).into_owned())
                }
                None => {
                    reap(child);
                    Err("the process died while being set up".to_string())
                }
            }
        }
    }
}

fn reap(pid: Pid) {
    let _ = nix::sys::wait::waitpid(pid, None);
}

fn set_cloexec(fd: RawFd) {
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
}

fn child_exit(code: i32) -> ! {
    // SAFETY: _exit ends the forked child without running the parent's atexit handlers or
    // flushing stdio buffers it shares with the agent.
    unsafe { libc::_exit(code) }
}

const TUNABLES: &str = "GLIBC_TUNABLES";

/// The environment the process gets: config.json's, plus HOME when it is missing (as runc).
/// `tunables` is the agent's own `GLIBC_TUNABLES`, which the engine sets (on the kernel
/// command line) only where the guest kernel cannot switch the vector state user code may
/// use: every process gets it, ahead of the container's own so that those win.
fn environment(spec: &ProcessSpec, tunables: Option<&str>) -> Vec<String> {
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = home_of(spec.uid).unwrap_or_else(|| "/".to_string());
        env.push(format!("HOME={home}"));
    }
    if let Some(ours) = tunables.filter(|t| !t.is_empty()) {
        let prefix = format!("{TUNABLES}=");
        match env.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(theirs) => *theirs = format!("{prefix}{ours}:{}", &theirs[prefix.len()..]),
            None => env.push(format!("{prefix}{ours}")),
        }
    }
    env
}

fn home_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_string())
    })
}

/// Runs in the forked child. Returns the program path to exec.
fn child_setup(
    spec: &ProcessSpec,
    env: &[String],
    stdio: [RawFd; 3],
    terminal: bool,
    finish: Option<&ProcFinish>,
) -> Result<PathBuf, String> {
    // The agent blocks SIGCHLD for its signalfd and ignores SIGPIPE; the container must not
    // inherit either.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| format!("sigprocmask: {e}"))?;
    for signal in [Signal::SIGPIPE, Signal::SIGCHLD] {
        // SAFETY: restoring the default disposition installs no handler code.
        unsafe {
            let _ = nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl);
        }
    }
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    if terminal {
        // SAFETY: TIOCSCTTY takes an integer argument; stdio[0] is the pty slave.
        if unsafe { libc::ioctl(stdio[0], libc::TIOCSCTTY, 0) } != 0 {
            return Err(format!("TIOCSCTTY: {}", std::io::Error::last_os_error()));
        }
    }
    for (target, fd) in stdio.into_iter().enumerate() {
        // SAFETY: dup2 on descriptors this process owns; 0..=2 are replaced atomically.
        if unsafe { libc::dup2(fd, target as RawFd) } < 0 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
    }
    if let Some(finish) = finish {
        finish.run().map_err(|e| e.0)?;
    }
    if let Some(adj) = spec.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("oom_score_adj: {e}"))?;
    }
    for limit in &spec.rlimits {
        let resource =
            rlimit_resource(&limit.kind).ok_or_else(|| format!("unknown rlimit {}", limit.kind))?;
        let value = libc::rlimit {
            rlim_cur: limit.soft,
            rlim_max: limit.hard,
        };
        // SAFETY: setrlimit reads a valid rlimit struct.
        if unsafe { libc::setrlimit(resource, &value) } != 0 {
            return Err(format!(
                "setrlimit {}: {}",
                limit.kind,
                std::io::Error::last_os_error()
            ));
        }
    }
    let cwd = if spec.cwd.is_empty() {
        "/"
    } else {
        spec.cwd.as_str()
    };
    if !Path::new(cwd).is_dir() {
        std::fs::create_dir_all(cwd).map_err(|e| format!("create cwd {cwd}: {e}"))?;
    }
    std::env::set_current_dir(cwd).map_err(|e| format!("chdir to cwd {cwd:?}: {e}"))?;
    if let Some(caps) = &spec.capabilities {
        caps::drop_bounding(caps)?;
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    }
    let groups: Vec<Gid> = spec
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setgid(Gid::from_raw(spec.gid))
        .map_err(|e| format!("setgid {}: {e}", spec.gid))?;
    nix::unistd::setuid(Uid::from_raw(spec.uid))
        .map_err(|e| format!("setuid {}: {e}", spec.uid))?;
    if let Some(caps) = &spec.capabilities {
        caps::apply_sets(caps)?;
    }
    if let Some(mask) = spec.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask & 0o777));
    }
    if spec.no_new_privileges {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err("prctl(PR_SET_NO_NEW_PRIVS) failed".to_string());
        }
    }
    find_program(&spec.args[0], env)
}

/// `execvp`'s search, done before `start` so that a missing program fails `create`.
fn find_program(name: &str, env: &[String]) -> Result<PathBuf, String> {
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return if !path.exists() {
            Err(format!("exec: {name:?}: no such file or directory"))
        } else if executable(&path) {
            Ok(path)
        } else {
            Err(format!("exec: {name:?}: permission denied"))
        };
    }
    let search = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    search
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| executable(p))
        .ok_or_else(|| format!("exec: {name:?}: executable file not found in $PATH"))
}

fn exec(program: &Path, args: &[String], env: &[String]) -> ! {
    let cstrings = |items: &[String]| -> Vec<CString> {
        items
            .iter()
            .map(|s| CString::new(s.as_bytes()).unwrap_or_default())
            .collect()
    };
    let path = CString::new(program.as_os_str().as_bytes()).unwrap_or_default();
    let argv = cstrings(args);
    let envp = cstrings(env);
    let error = match nix::unistd::execve(&path, &argv, &envp) {
        Err(e) => e,
        Ok(infallible) => match infallible {},
    };
    // SAFETY: fd 2 is the process's stderr, set up above; File takes it only to write once
    // and the process exits right after.
    let mut stderr = unsafe { File::from_raw_fd(2) };
    let _ = writeln!(stderr, "exec {}: {error}", program.display());
    child_exit(if error == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    })
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_search_uses_the_process_path() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        assert!(find_program("sh", &env).is_ok());
        let missing = find_program("no-such-program-here", &env).unwrap_err();
        assert!(
            missing.contains("executable file not found in $PATH"),
            "{missing}"
        );
    }

    #[test]
    fn explicit_path_is_checked_not_searched() {
        let err = find_program("/no/such/file", &[]).unwrap_err();
        assert!(err.contains("no such file or directory"), "{err}");
    }

    #[test]
    fn home_is_added_only_when_missing() {
        let spec = ProcessSpec {
            env: vec!["HOME=/h".into()],
            ..Default::default()
        };
        assert_eq!(environment(&spec, None), vec!["HOME=/h".to_string()]);
        let spec = ProcessSpec {
            uid: 4242_4242,
            ..Default::default()
        };
        assert_eq!(environment(&spec, None), vec!["HOME=/".to_string()]);
    }

    #[test]
    fn the_agents_glibc_tunables_come_before_the_containers() {
        let ours = Some("glibc.cpu.hwcaps=-AVX2");
        let spec = ProcessSpec {
            env: vec!["HOME=/".into()],
            ..Default::default()
        };
        assert_eq!(
            environment(&spec, ours),
            ["HOME=/", "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2"]
        );
        let spec = ProcessSpec {
            env: vec![
                "GLIBC_TUNABLES=glibc.malloc.check=3".into(),
                "HOME=/".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            environment(&spec, ours),
            [
                "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2:glibc.malloc.check=3",
                "HOME=/"
            ]
        );
        assert_eq!(environment(&spec, None), spec.env);
    }
}
