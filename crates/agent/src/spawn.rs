//! Starting a container process: a child that shares the agent's memory until it execs
//! (`clone` with `CLONE_VM | CLONE_VFORK`, as `posix_spawn` does), applies the OCI process
//! settings, and execs; a process that must wait for `start` is held at its first
//! instruction, stopped under `ptrace`, until the agent lets it go.
//!
//! A forked child would copy the agent's page tables, take a copy-on-write fault for every
//! page either side then writes, and tear its copy down again at `exec`. Where the guest
//! kernel is emulated instruction by instruction each of those costs milliseconds (measured
//! there: restored create+start+exit of `true`, median 4.31 s with fork, 4.03 s without).
//!
//! The agent's main thread stays suspended while the child runs, so the child may allocate
//! and use std as that thread would (the share relay's threads, the only others, touch none
//! of its state, and the allocator locks for them as between threads) (what it leaves allocated at `exec` stays in the
//! agent's heap: a few hundred bytes). It must not change state the agent keeps in memory;
//! the one such switch, debug logging, is put back when the child has gone.
//!
//! Setup errors (a missing executable, a bad user, a failed `exec`) reach the host as the
//! reply to `CreateProcess`, the way runc fails `create` rather than the container's first
//! instant.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use agent_proto::{ProcessSpec, Stream};
use nix::fcntl::OFlag;
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::caps;
use crate::cgroup::ContainerCgroup;
use crate::passed::{self, AgentEnd};
use crate::paths::{DEFAULT_PATH, PASSWD};
use crate::seccomp::Filter;
use crate::setup::ContainerMounts;
use crate::userns::{self, ContainerUserNamespace};

/// A started (or waiting-to-start) process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// Pipe to the process's stdin; for a terminal, the pty master serves both directions.
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
    /// The agent's ends of the descriptors passed to the process, by their streams.
    pub passed: Vec<(Stream, AgentEnd)>,
    /// Created with `wait_for_start`: stopped at its first instruction until [`release`].
    pub held: bool,
}

/// Lets a process held for `start` run; with `signal`, that signal is the first thing it
/// gets, before its first instruction.
pub fn release(pid: Pid, signal: Option<Signal>) -> Result<(), String> {
    // The tracee is in the stop that follows its `exec`; detaching discards that SIGTRAP
    // (or delivers `signal` in its place) and lets the program run.
    nix::sys::ptrace::detach(pid, signal).map_err(|e| format!("release pid {pid}: {e}"))
}

/// Whether a freshly exec'd program, which has set no handlers, dies of `signal`.
pub fn fatal_by_default(signal: Signal) -> bool {
    use Signal::*;
    !matches!(
        signal,
        SIGCHLD | SIGCONT | SIGURG | SIGWINCH | SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU
    )
}

/// How much stack the child gets for the setup it runs before `exec`.
const CHILD_STACK: usize = 256 << 10;

/// A pipe, both ends close-on-exec.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

/// What every process of the container shares, made at its setup.
pub struct Container<'a> {
    /// The mounts left for the first process to make (PID 1 of a pid namespace).
    pub mounts: Option<&'a ContainerMounts>,
    pub cgroup: Option<&'a ContainerCgroup>,
    pub seccomp: Option<&'a Filter>,
    pub user_namespace: Option<&'a ContainerUserNamespace>,
}

pub fn spawn(
    spec: &ProcessSpec,
    wait_for_start: bool,
    container: &Container<'_>,
) -> Result<Spawned, String> {
    let Container {
        mounts,
        cgroup,
        seccomp,
        user_namespace,
    } = *container;
    if spec.args.is_empty() {
        return Err("process.args is empty".to_string());
    }
    // Opened here, written by the child: the agent itself stays out of the container's cgroup.
    let cgroup_procs = cgroup.map(ContainerCgroup::open_procs).transpose()?;
    let env = environment(spec, std::env::var(TUNABLES).ok().as_deref());
    // Close-on-exec: the agent reads it to its end, which comes at the child's `exec` (no
    // bytes: success) or exit (the reason it failed).
    let (sync_r, sync_w) = pipe()?;

    // A terminal is made by the child, in the container's devpts once its mounts are made
    // (as runc makes it): the slave is then a `/dev/pts/N` the container can open by name.
    // The master comes back over `console`, sent before the child's `exec`.
    enum ChildStdio {
        Terminal {
            console: OwnedFd,
            agent_end: OwnedFd,
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
        passed: Vec::new(),
        held: wait_for_start,
    };
    // The process's ends stay open here until the child has placed them.
    let mut passed_ends = Vec::with_capacity(spec.passed_fds.len());
    for p in &spec.passed_fds {
        let (theirs, ours) = passed::make(p.kind)?;
        let target = RawFd::try_from(p.fd).map_err(|_| format!("descriptor {} too large", p.fd))?;
        passed_ends.push((target, theirs));
        spawned.passed.push((Stream::passed(p.fd), ours));
    }
    let child_stdio = if spec.terminal {
        let (agent_end, console) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        ChildStdio::Terminal { console, agent_end }
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

    let stdio = match &child_stdio {
        ChildStdio::Terminal { console, .. } => Stdio::Terminal {
            console: console.as_raw_fd(),
            size: spec.console_size.map(|(rows, cols)| Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
        },
        ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => Stdio::Pipes([stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()]),
    };
    let mut child = Child {
        spec,
        env: &env,
        stdio,
        mounts,
        cgroup,
        cgroup_procs: cgroup_procs.as_ref().map(|fd| fd.as_raw_fd()),
        seccomp,
        user_namespace: user_namespace.map(|ns| ns.fd().as_raw_fd()),
        passed: passed_ends
            .iter()
            .map(|(target, fd)| (*target, fd.as_raw_fd()))
            .collect(),
        hold: wait_for_start,
        report: sync_w.as_raw_fd(),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    let debug = crate::logging::debug_enabled();
    // SAFETY: `child_main` runs on `stack`, which outlives the child's use of it: with
    // CLONE_VFORK this thread is suspended until the child has exec'd or exited, and only
    // then is `stack` dropped. The agent's other threads (the share relay) never touch
    // `stack` or `child`; `child` is valid for the same span.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK) as usize & !15;
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut child as *mut Child).cast(),
        )
    };
    drop(stack);
    crate::logging::set_debug(debug);
    if pid < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    let pid = Pid::from_raw(pid);
    // The child's ends close here; the agent keeps its end of the console socket.
    let console = match child_stdio {
        ChildStdio::Terminal { agent_end, .. } => Some(agent_end),
        ChildStdio::Pipes { .. } => None,
    };
    drop(sync_w);
    drop(cgroup_procs);
    drop(passed_ends);
    spawned.pid = pid;
    let mut report = Vec::new();
    let _ = File::from(sync_r).read_to_end(&mut report);
    if !report.is_empty() {
        reap(pid);
        // runc's words for any failure between clone and exec.
        return Err(format!(
            "unable to start container process: {}",
            String::from_utf8_lossy(&report)
        ));
    }
    if let Some(console) = console {
        // Sent before the `exec` that ended the report, so it is waiting in the socket.
        match receive_master(&console) {
            Ok(master) => spawned.pty_master = Some(master),
            Err(e) => {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                reap(pid);
                return Err(e);
            }
        }
    }
    if wait_for_start {
        // Its `exec` has begun; wait for the stop that ends it.
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, _)) => {}
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                return Err("the process died before it could be held for start".into())
            }
            other => {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                reap(pid);
                return Err(format!("holding the process for start: {other:?}"));
            }
        }
    }
    Ok(spawned)
}

/// What the child needs; it lives on the agent's stack while the child runs.
struct Child<'a> {
    spec: &'a ProcessSpec,
    env: &'a [String],
    stdio: Stdio,
    mounts: Option<&'a ContainerMounts>,
    cgroup: Option<&'a ContainerCgroup>,
    /// The container cgroup's `cgroup.procs`, when it has one.
    cgroup_procs: Option<RawFd>,
    seccomp: Option<&'a Filter>,
    /// The container's user namespace, joined after the mounts.
    user_namespace: Option<RawFd>,
    /// Passed descriptors: (the number the process gets, the child's descriptor).
    passed: Vec<(RawFd, RawFd)>,
    hold: bool,
    /// The write end of the report pipe.
    report: RawFd,
}

/// The child's stdio, as descriptors in its copy of the agent's table.
enum Stdio {
    /// Make a pty, send its master over `console`, and make the slave the stdio.
    Terminal {
        console: RawFd,
        size: Option<Winsize>,
    },
    /// stdin, stdout, stderr.
    Pipes([RawFd; 3]),
}

/// The pty master the child sent over `socket`.
fn receive_master(socket: &OwnedFd) -> Result<OwnedFd, String> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receive the pty master: {e}"))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| format!("pty master message: {e}"))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed `fd` in this process's table for this call.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err("the process sent no pty master".into())
}

/// Runs in the child, in the container's root with its mounts made: a pty from the
/// container's `/dev/ptmx`, its master sent to the agent. Returns the slave.
fn open_terminal(console: RawFd, size: Option<&Winsize>) -> Result<OwnedFd, String> {
    let pty = openpty(size, None).map_err(|e| format!("openpty: {e}"))?;
    let fds = [pty.master.as_raw_fd()];
    // One byte of data carries the descriptor (a message needs a body to be sent).
    sendmsg::<()>(
        console,
        &[std::io::IoSlice::new(b"m")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("send the pty master: {e}"))?;
    // The child's copy of the master is not the container's to keep, nor is the slave's
    // descriptor beyond the stdio it becomes.
    drop(pty.master);
    set_cloexec(pty.slave.as_raw_fd());
    Ok(pty.slave)
}

/// The child's entry point, on its own stack in the agent's memory (see `spawn`).
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn` passes a `Child` that stays valid until this process execs or exits.
    let child = unsafe { &*(arg as *const Child) };
    // The child's stderr becomes the container's: no agent diagnostics from here on (`spawn`
    // turns them back on for the agent).
    crate::logging::set_debug(false);
    // The child's own copy: placing passed descriptors may move it.
    let mut report = child.report;
    let failure = match child_setup(child, &mut report) {
        Ok(program) => exec(&program, &child.spec.args, child.env),
        Err(message) => message,
    };
    report_and_exit(report, &failure)
}

fn report_and_exit(report: RawFd, message: &str) -> ! {
    // SAFETY: `report` is the pipe's write end, open in this process; the `File` is
    // forgotten, not closed, since `_exit` closes it.
    let mut out = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(report) });
    let _ = out.write_all(message.as_bytes());
    child_exit(127)
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
    // SAFETY: _exit ends the child without running the agent's atexit handlers or flushing
    // stdio buffers it shares with the agent.
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
    let passwd = std::fs::read_to_string(PASSWD).ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_string())
    })
}

/// Runs in the child. Returns the program path to exec; `report` is where a failure goes.
fn child_setup(child: &Child, report: &mut RawFd) -> Result<PathBuf, String> {
    let spec = child.spec;
    // First, so that everything the process does is accounted and limited as the
    // container's, and what it mounts or reads of cgroups is rooted at the container's.
    if let Some(procs) = child.cgroup_procs {
        crate::cgroup::join(procs)?;
    }
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
    if let Some(mounts) = child.mounts {
        mounts.run(child.cgroup).map_err(|e| e.0)?;
    }
    let fds = match &child.stdio {
        Stdio::Terminal { console, size } => {
            // Close-on-exec, and never closed before: a passed descriptor may take its number.
            let terminal = open_terminal(*console, size.as_ref())?.into_raw_fd();
            // SAFETY: TIOCSCTTY takes an integer argument; `terminal` is the pty slave.
            if unsafe { libc::ioctl(terminal, libc::TIOCSCTTY, 0) } != 0 {
                return Err(format!("TIOCSCTTY: {}", std::io::Error::last_os_error()));
            }
            [terminal; 3]
        }
        Stdio::Pipes(fds) => *fds,
    };
    for (target, fd) in fds.into_iter().enumerate() {
        // SAFETY: dup2 on descriptors this process owns; 0..=2 are replaced atomically.
        if unsafe { libc::dup2(fd, target as RawFd) } < 0 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
    }
    let mut user_namespace = child.user_namespace;
    let mut keep: Vec<&mut RawFd> = vec![report];
    keep.extend(user_namespace.as_mut());
    passed::place(&child.passed, &mut keep)?;
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
    if let Some(namespace) = user_namespace {
        // SAFETY: the agent keeps the namespace's descriptor open until this child has
        // exec'd or exited (it is suspended meanwhile).
        userns::join(unsafe { BorrowedFd::borrow_raw(namespace) })?;
    }
    if child.hold {
        // The `exec` then stops before the program's first instruction. Before seccomp, which
        // may not allow `ptrace`.
        nix::sys::ptrace::traceme().map_err(|e| format!("ptrace: {e}"))?;
    }
    // As runc: without no_new_privileges a filter needs CAP_SYS_ADMIN, so it is installed
    // while the process still has it, and the rest of the setup runs under it; with it, last.
    let seccomp_now = child.seccomp.filter(|_| !spec.no_new_privileges);
    if let Some(filter) = seccomp_now {
        filter.install()?;
    }
    // No `capabilities` means none, as under runc (the host fills in an exec's from the
    // container's).
    let no_capabilities = Default::default();
    let caps = spec.capabilities.as_ref().unwrap_or(&no_capabilities);
    caps::drop_bounding(caps)?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    set_ids(spec)?;
    caps::apply_sets(caps)?;
    if let Some(mask) = spec.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask & 0o777));
    }
    if spec.no_new_privileges {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err("prctl(PR_SET_NO_NEW_PRIVS) failed".to_string());
        }
    }
    let program = find_program(&spec.args[0], child.env)?;
    if let Some(filter) = child.seccomp.filter(|_| spec.no_new_privileges) {
        filter.install()?;
    }
    Ok(program)
}

/// Sets the child's supplementary groups, gid and uid with the system calls themselves.
///
/// glibc's wrappers change the credentials of every thread of the process (POSIX says a
/// process has one set): they signal each thread of the agent and wait for it. This child
/// shares the agent's memory, so glibc takes the agent's threads (the share relay) for its
/// own: it would change their credentials, or, from a new pid namespace where their thread
/// ids mean other tasks, wait for acknowledgements that never come.
fn set_ids(spec: &ProcessSpec) -> Result<(), String> {
    let groups: Vec<libc::gid_t> = spec.additional_gids.clone();
    let calls: [(&str, libc::c_long, [libc::c_long; 2]); 3] = [
        (
            "setgroups",
            libc::SYS_setgroups,
            [
                groups.len() as libc::c_long,
                groups.as_ptr() as libc::c_long,
            ],
        ),
        ("setgid", libc::SYS_setgid, [spec.gid as libc::c_long, 0]),
        ("setuid", libc::SYS_setuid, [spec.uid as libc::c_long, 0]),
    ];
    for (name, number, [a, b]) in calls {
        // SAFETY: each call takes integers, or for setgroups a length and a pointer to that
        // many gids in `groups`, which outlives the call.
        if unsafe { libc::syscall(number, a, b) } != 0 {
            return Err(format!("{name}: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
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

/// Replaces the process with `program`; returns only why it could not.
fn exec(program: &Path, args: &[String], env: &[String]) -> String {
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
    format!("exec {}: {error}", program.display())
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
    fn signals_that_kill_a_program_without_handlers() {
        assert!(fatal_by_default(Signal::SIGTERM));
        assert!(fatal_by_default(Signal::SIGKILL));
        assert!(fatal_by_default(Signal::SIGUSR1));
        assert!(!fatal_by_default(Signal::SIGCHLD));
        assert!(!fatal_by_default(Signal::SIGWINCH));
        assert!(!fatal_by_default(Signal::SIGSTOP));
    }

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
