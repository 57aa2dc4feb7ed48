//! The VMM's jail: the process that runs guest code and device models starts in new mount,
//! PID, IPC, UTS and network namespaces, on a root that holds only its inputs, with no
//! capabilities, `no_new_privs` and rlimits, as Firecracker's jailer does for its VMM.
//!
//! The root is a small tmpfs on which each input is bind-mounted at its own host path, so the
//! program's arguments need no rewriting; everything not listed does not exist there. Taps,
//! sockets and memory files are inherited as file descriptors. `/proc` is the new PID
//! namespace's own (the program is its PID 1 and sees no other process), so `/proc/self/fd/N`
//! and `/dev/fd/N` name inherited descriptors.
//!
//! Everything the child does between `clone` and `execve` is planned in the parent
//! ([`Plan`]): the child only makes system calls on prepared C strings, never allocates.
//! A failed step is sent to the parent over a close-on-exec pipe as (step, errno).
//!
//! What the jail does not do: change the user (the inputs are root's files, mode 0600, and
//! `/dev/kvm` is root's; an unprivileged uid would need each input handed over as a file
//! descriptor), or filter system calls (the program's own: QEMU's `-sandbox`).

#![cfg(target_os = "linux")]

pub mod thread;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error("jail: {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    /// A step in the child, before the program ran.
    #[error("jail: {step} failed in the jailed process: {source}")]
    Child {
        step: &'static str,
        source: std::io::Error,
    },
}

/// One input of the jailed program: a host file or directory, visible at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
    /// A device node (`/dev/kvm`): its mount keeps device access.
    pub device: bool,
    /// The program itself: its mount keeps execution.
    pub executable: bool,
}

/// A jail to start a program in.
#[derive(Debug, Clone)]
pub struct Jail {
    root: PathBuf,
    binds: Vec<Bind>,
    limits: Vec<(Resource, u64)>,
    huge_pages: bool,
    confined: bool,
    /// [`Jail::switches_user`]: the environment variable naming the parent's pipe.
    switches_user: Option<&'static str>,
}

/// What [`Jail::switches_user`] leaves the program: `CAP_SETGID` (6) and `CAP_SETUID` (7)
/// (linux/capability.h).
const USER_SWITCH_CAPABILITIES: u32 = (1 << 6) | (1 << 7);

/// The rlimits a jail sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Open files.
    Files,
    /// Locked memory, in bytes.
    LockedMemory,
    /// Core dumps (a VMM's would hold guest memory), in bytes.
    CoreSize,
}

impl Resource {
    fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            Resource::Files => libc::RLIMIT_NOFILE,
            Resource::LockedMemory => libc::RLIMIT_MEMLOCK,
            Resource::CoreSize => libc::RLIMIT_CORE,
        }
    }
}

impl Jail {
    /// A jail whose root is mounted on `root`, an empty directory the caller owns (the
    /// mount exists only in the jail's mount namespace: the host sees the directory empty).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Jail {
            root: root.into(),
            binds: Vec::new(),
            limits: Vec::new(),
            huge_pages: true,
            confined: true,
            switches_user: None,
        }
    }

    /// No jail: the program starts in the caller's namespaces, root and credentials, with
    /// only the limits, stdio and descriptors set (to measure what the jail costs).
    pub fn unconfined() -> Self {
        Jail {
            confined: false,
            ..Jail::new("/")
        }
    }

    /// `path`, read-only.
    pub fn read_only(mut self, path: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            path: path.into(),
            writable: false,
            device: false,
            executable: false,
        });
        self
    }

    /// `path`, writable.
    pub fn writable(mut self, path: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            path: path.into(),
            writable: true,
            device: false,
            executable: false,
        });
        self
    }

    /// The device node at `path`, readable and writable.
    pub fn device(mut self, path: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            path: path.into(),
            writable: true,
            device: true,
            executable: false,
        });
        self
    }

    pub fn limit(mut self, resource: Resource, value: u64) -> Self {
        self.limits.push((resource, value));
        self
    }

    /// The program changes to an unprivileged user itself once set up (QEMU's `-runas`,
    /// after it opened its inputs and `/dev/kvm` as root): it keeps `CAP_SETGID` and
    /// `CAP_SETUID` for that, and nothing else. Changing from uid 0 to another clears its
    /// capabilities, and with `no_new_privs` nothing gives them back.
    ///
    /// The change clears its parent-death signal too, which the program must set again
    /// (this project's QEMU does: config/qemu/patches/0007-*). So that it can tell whether
    /// its parent died before it did, it gets the read end of a pipe whose write end only
    /// the [`Jailed`] holds, its number in the environment variable `parent_pipe`: the
    /// parent is gone once that pipe hangs up.
    pub fn switches_user(mut self, parent_pipe: &'static str) -> Self {
        self.switches_user = Some(parent_pipe);
        self
    }

    /// No transparent huge pages for the program (`PR_SET_THP_DISABLE`; best effort: a
    /// kernel without them has nothing to turn off).
    pub fn without_huge_pages(mut self) -> Self {
        self.huge_pages = false;
        self
    }

    /// Starts `program` with `args` and no environment in the jail. Its stdin is
    /// `/dev/null`, stdout and stderr `output`; `inherit` are left open in it at their
    /// numbers. The program runs as PID 1 of its namespace and dies with the caller's thread
    /// (`PR_SET_PDEATHSIG`).
    pub fn spawn(
        &self,
        program: &Path,
        args: &[String],
        output: &File,
        inherit: &[RawFd],
    ) -> Result<Jailed, JailError> {
        let program = std::fs::canonicalize(program).map_err(|e| JailError::Input {
            path: program.to_path_buf(),
            reason: e.to_string(),
        })?;
        // Unconfined, the program sees the host's files: there is nothing to bind.
        let (binds, links) = if self.confined {
            self.inputs(&program)
        } else {
            Default::default()
        };
        let null = File::open("/dev/null").map_err(|source| JailError::Setup {
            what: "open /dev/null",
            source,
        })?;
        let stdio = [null.as_raw_fd(), output.as_raw_fd()];
        Plan::new(self, &binds, &links, &program, args, stdio, inherit)?.run()
    }

    /// What the jail's root holds for `program`: the binds asked for, the program, and for
    /// a dynamically linked one its libraries and the symlinks among their directories.
    fn inputs(&self, program: &Path) -> (Vec<Bind>, Vec<(PathBuf, PathBuf)>) {
        let mut binds = self.binds.clone();
        binds.push(Bind {
            path: program.to_path_buf(),
            writable: false,
            device: false,
            executable: true,
        });
        let mut links = Vec::new();
        if !is_static(program) {
            // A dynamically linked program needs its loader and libraries.
            let (libraries, library_links) = library_paths();
            binds.extend(libraries);
            links = library_links;
        }
        let mut seen = std::collections::HashSet::new();
        binds.retain(|b| seen.insert(b.path.clone()));
        (binds, links)
    }
}

/// The host paths a dynamically linked program loads from, as they exist here: binds of the
/// directories, and the symlinks among them (`/lib64` → `usr/lib64` on a merged `/usr`)
/// made again in the jail.
fn library_paths() -> (Vec<Bind>, Vec<(PathBuf, PathBuf)>) {
    let mut binds = Vec::new();
    let mut links = Vec::new();
    for path in [
        "/lib",
        "/lib64",
        "/lib32",
        "/libx32",
        "/usr/lib",
        "/usr/lib64",
        "/etc/ld.so.cache",
    ]
    .iter()
    .map(Path::new)
    {
        let Ok(metadata) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if metadata.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(path) {
                links.push((target, path.to_path_buf()));
            }
        }
        if let Ok(path) = std::fs::canonicalize(path) {
            binds.push(Bind {
                path,
                writable: false,
                device: false,
                executable: true,
            });
        }
    }
    (binds, links)
}

/// Whether `program` is an ELF file without an interpreter (statically linked).
pub fn is_static(program: &Path) -> bool {
    // The program headers follow the ELF header in every linker's output: the first
    // page holds them (a program of 9 MiB is not read whole at each start).
    let mut head = Vec::with_capacity(4096);
    let read = File::open(program).and_then(|f| f.take(4096).read_to_end(&mut head));
    read.is_ok() && elf_interpreter(&head) == Some(false)
}

/// Whether a 64-bit little-endian ELF image has a `PT_INTERP` header; `None`: not one.
fn elf_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(elf.get(32..40)?.try_into().ok()?) as usize;
    let entry_size = usize::from(u16_at(54)?);
    let entries = usize::from(u16_at(56)?);
    (0..entries)
        .map(|i| {
            let at = phoff.checked_add(i.checked_mul(entry_size)?)?;
            Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?))
        })
        .try_fold(false, |found, kind| Some(found || kind? == PT_INTERP))
}

/// A jailed process; like `std::process::Child`, dropping it neither kills nor reaps it.
#[derive(Debug)]
pub struct Jailed {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
    /// [`Jail::switches_user`]'s pipe, held open while this handle lives.
    _parent_pipe: Option<OwnedFd>,
}

impl Jailed {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// SIGKILL, unless it has been reaped.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.reap(0)
            .map(|status| status.expect("a blocking waitpid returns a status"))
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    fn reap(&mut self, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid writes only `raw`.
            let pid = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
            match pid {
                0 => return Ok(None),
                -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
                }
                -1 => return Err(std::io::Error::last_os_error()),
                _ => {
                    let status = ExitStatus::from_raw(raw);
                    self.status = Some(status);
                    return Ok(Some(status));
                }
            }
        }
    }
}

/// What the child does, prepared: C strings and numbers only.
struct Plan {
    root: CString,
    /// Directories to make under the root, parents first.
    dirs: Vec<CString>,
    /// Mount points that are files, to make under the root.
    files: Vec<CString>,
    mounts: Vec<PlannedMount>,
    /// Symlinks to make under the root: (target, link).
    links: Vec<(CString, CString)>,
    proc_dir: CString,
    dev_fd: CString,
    limits: Vec<(libc::__rlimit_resource_t, u64)>,
    huge_pages: bool,
    confined: bool,
    /// Capabilities (bits, all below 32) the program keeps: [`Jail::switches_user`].
    kept_capabilities: u32,
    /// Its stdin, and its stdout and stderr.
    stdio: [RawFd; 2],
    inherit: Vec<RawFd>,
    /// Its environment: `NAME=value`, nothing else.
    env: Vec<CString>,
    /// [`Jail::switches_user`]'s pipe: its read end (inherited), its write end.
    parent_pipe: Option<(OwnedFd, OwnedFd)>,
    last_capability: u32,
    program: CString,
    argv: Vec<CString>,
}

struct PlannedMount {
    source: CString,
    target: CString,
    flags: libc::c_ulong,
}

fn cstring(bytes: &[u8]) -> Result<CString, JailError> {
    CString::new(bytes).map_err(|_| JailError::Input {
        path: PathBuf::from(OsStr::from_bytes(bytes)),
        reason: "contains a NUL byte".into(),
    })
}

fn cpath(path: &Path) -> Result<CString, JailError> {
    cstring(path.as_os_str().as_bytes())
}

/// A pipe, both ends close-on-exec: its read end, its write end.
fn pipe(what: &'static str) -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::Setup {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just made and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Plan {
    fn new(
        jail: &Jail,
        binds: &[Bind],
        links: &[(PathBuf, PathBuf)],
        program: &Path,
        args: &[String],
        stdio: [RawFd; 2],
        inherit: &[RawFd],
    ) -> Result<Plan, JailError> {
        let root = jail.root.as_path();
        let under_root = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
        let mut dirs: Vec<PathBuf> = vec![root.join("proc"), root.join("dev")];
        let mut files = Vec::new();
        let mut mounts = Vec::new();
        for bind in binds {
            if !bind.path.is_absolute() || bind.path.components().any(|c| c == Component::ParentDir)
            {
                return Err(JailError::Input {
                    path: bind.path.clone(),
                    reason: "not an absolute, clean path".into(),
                });
            }
            let metadata = std::fs::metadata(&bind.path).map_err(|e| JailError::Input {
                path: bind.path.clone(),
                reason: e.to_string(),
            })?;
            let target = under_root(&bind.path);
            for parent in target.ancestors().skip(1) {
                if parent == root {
                    break;
                }
                dirs.push(parent.to_path_buf());
            }
            if metadata.is_dir() {
                dirs.push(target.clone());
            } else {
                files.push(target.clone());
            }
            let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
            if !bind.writable {
                flags |= libc::MS_RDONLY;
            }
            if !bind.device {
                flags |= libc::MS_NODEV;
            }
            if !bind.executable {
                flags |= libc::MS_NOEXEC;
            }
            mounts.push(PlannedMount {
                source: cpath(&bind.path)?,
                target: cpath(&target)?,
                flags,
            });
        }
        for (_, link) in links {
            let link = under_root(link);
            for parent in link.ancestors().skip(1) {
                if parent == root {
                    break;
                }
                dirs.push(parent.to_path_buf());
            }
        }
        // Parents first, each once: a sort by path puts every directory before what is in it.
        dirs.sort();
        dirs.dedup();
        files.retain(|f| !dirs.contains(f));
        let last_capability = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        let mut argv = vec![cpath(program)?];
        for arg in args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let mut inherit = inherit.to_vec();
        let mut env = Vec::new();
        let parent_pipe = match jail.switches_user {
            Some(variable) => {
                let (read, write) = pipe("parent pipe")?;
                inherit.push(read.as_raw_fd());
                env.push(cstring(
                    format!("{variable}={}", read.as_raw_fd()).as_bytes(),
                )?);
                Some((read, write))
            }
            None => None,
        };
        Ok(Plan {
            root: cpath(root)?,
            dirs: dirs.iter().map(|d| cpath(d)).collect::<Result<_, _>>()?,
            files: files.iter().map(|f| cpath(f)).collect::<Result<_, _>>()?,
            mounts,
            links: links
                .iter()
                .map(|(target, link)| Ok((cpath(target)?, cpath(&under_root(link))?)))
                .collect::<Result<_, JailError>>()?,
            proc_dir: cpath(&root.join("proc"))?,
            dev_fd: cpath(&root.join("dev/fd"))?,
            limits: jail.limits.iter().map(|(r, v)| (r.raw(), *v)).collect(),
            huge_pages: jail.huge_pages,
            confined: jail.confined,
            kept_capabilities: if jail.switches_user.is_some() {
                USER_SWITCH_CAPABILITIES
            } else {
                0
            },
            stdio,
            inherit,
            env,
            parent_pipe,
            last_capability,
            program: cpath(program)?,
            argv,
        })
    }

    fn run(mut self) -> Result<Jailed, JailError> {
        let (errors_in, errors_out) = pipe("pipe")?;
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let namespaces = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET;
        let flags = if self.confined { namespaces } else { 0 } | libc::SIGCHLD;
        // SAFETY: a clone without a new stack is a fork: the child gets a copy of this
        // address space. It runs `child`, which makes only system calls on memory prepared
        // here, then execs or exits.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0, 0, 0, 0) };
        match pid {
            -1 => Err(JailError::Setup {
                what: "clone",
                source: std::io::Error::last_os_error(),
            }),
            0 => {
                // SAFETY: in the child of a fork, as above.
                let (step, errno) = unsafe {
                    self.child(
                        (errors_in.as_raw_fd(), errors_out.as_raw_fd()),
                        &argv,
                        &envp,
                    )
                };
                let report = [step as i32, errno];
                // SAFETY: writes 8 bytes of `report` to the pipe, then exits without
                // running anything of the parent's.
                unsafe {
                    libc::write(errors_out.as_raw_fd(), report.as_ptr().cast(), 8);
                    libc::_exit(127)
                }
            }
            pid => {
                drop(errors_out);
                let mut jailed = Jailed {
                    pid: pid as libc::pid_t,
                    status: None,
                    _parent_pipe: self.parent_pipe.take().map(|(_read, write)| write),
                };
                let mut report = [0u8; 8];
                let mut errors = File::from(errors_in);
                match errors.read_exact(&mut report) {
                    // The pipe closed on execve: the program runs.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(jailed),
                    Err(source) => {
                        let _ = jailed.kill();
                        let _ = jailed.wait();
                        Err(JailError::Setup {
                            what: "read the jailed process's report",
                            source,
                        })
                    }
                    Ok(()) => {
                        let _ = jailed.wait();
                        let [a, b, c, d, e, f, g, h] = report;
                        let step = i32::from_ne_bytes([a, b, c, d]);
                        let errno = i32::from_ne_bytes([e, f, g, h]);
                        Err(JailError::Child {
                            step: Step::ALL.get(step as usize).map_or("setup", |s| s.name()),
                            source: std::io::Error::from_raw_os_error(errno),
                        })
                    }
                }
            }
        }
    }

    /// The child's steps; returns the failed one's index and errno (on success it does not
    /// return: it is the program).
    ///
    /// # Safety
    /// Only in the child of a fork: it changes the process's namespaces, mounts, limits and
    /// credentials, and makes no call that allocates.
    unsafe fn child(
        &self,
        reports: (RawFd, RawFd),
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> (Step, i32) {
        // SAFETY: system calls on C strings and arrays prepared by `Plan::new`, alive for
        // the whole call.
        let result = unsafe {
            self.parent_check(reports)
                .and_then(|()| {
                    if self.confined {
                        self.confine()
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| self.limit())
                .and_then(|()| {
                    if self.confined {
                        self.drop_privileges()
                    } else {
                        Ok(())
                    }
                })
        };
        if let Err(failed) = result {
            return failed;
        }
        // SAFETY: as above; execve returns only on failure.
        unsafe {
            libc::execve(self.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            (Step::Execve, errno())
        }
    }

    /// # Safety
    /// As [`Plan::child`].
    unsafe fn parent_check(&self, reports: (RawFd, RawFd)) -> Result<(), (Step, i32)> {
        let step = Step::ParentCheck;
        let mut poll = libc::pollfd {
            fd: reports.1,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: close, prctl and poll on this process's own descriptors and a local.
        unsafe {
            // The parent may be outside this PID namespace (getppid says 0): whether it
            // still lives is whether the pipe's read end, which it holds, is still open.
            libc::close(reports.0);
            check(
                step,
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            )?;
            check(step, libc::poll(&mut poll, 1, 0))?;
        }
        if poll.revents & libc::POLLERR != 0 {
            return Err((step, libc::ESRCH));
        }
        Ok(())
    }

    /// The new root: a tmpfs with the inputs, `/proc` and `/dev/fd`, pivoted into.
    ///
    /// # Safety
    /// As [`Plan::child`].
    unsafe fn confine(&self) -> Result<(), (Step, i32)> {
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: mount, mkdir, open, symlink, chdir and pivot_root on prepared C strings.
        unsafe {
            check(
                Step::PrivateMounts,
                libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
            )?;
            check(
                Step::RootTmpfs,
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=0755,size=64k".as_ptr().cast(),
                ),
            )?;
            for dir in &self.dirs {
                check(Step::Directories, libc::mkdir(dir.as_ptr(), 0o755))?;
            }
            for file in &self.files {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                check(Step::MountPoints, fd)?;
                libc::close(fd);
            }
            for m in &self.mounts {
                check(
                    Step::BindMounts,
                    libc::mount(
                        m.source.as_ptr(),
                        m.target.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                )?;
                check(
                    Step::Remounts,
                    libc::mount(none, m.target.as_ptr(), none, m.flags, std::ptr::null()),
                )?;
            }
            check(
                Step::Proc,
                libc::mount(
                    c"proc".as_ptr(),
                    self.proc_dir.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
            )?;
            check(
                Step::DevFd,
                libc::symlink(c"/proc/self/fd".as_ptr(), self.dev_fd.as_ptr()),
            )?;
            for (target, link) in &self.links {
                check(
                    Step::Symlinks,
                    libc::symlink(target.as_ptr(), link.as_ptr()),
                )?;
            }
            check(Step::PivotRoot, libc::chdir(self.root.as_ptr()))?;
            check(
                Step::PivotRoot,
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            )?;
            check(
                Step::PivotRoot,
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            )?;
            check(Step::PivotRoot, libc::chdir(c"/".as_ptr()))?;
            check(
                Step::ReadOnlyRoot,
                libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
            )
        }
    }

    /// Rlimits, transparent huge pages, stdio and inherited descriptors.
    ///
    /// # Safety
    /// As [`Plan::child`].
    unsafe fn limit(&self) -> Result<(), (Step, i32)> {
        // SAFETY: setrlimit, prctl, dup2 and fcntl with numbers and a local struct.
        unsafe {
            for &(resource, value) in &self.limits {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                check(Step::Rlimits, libc::setrlimit(resource, &limit))?;
            }
            if !self.huge_pages {
                // Best effort: a kernel without them has nothing to turn off.
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
            }
            check(Step::FileDescriptors, libc::dup2(self.stdio[0], 0))?;
            check(Step::FileDescriptors, libc::dup2(self.stdio[1], 1))?;
            check(Step::FileDescriptors, libc::dup2(self.stdio[1], 2))?;
            // Nothing else this process holds reaches the program: descriptors it inherited
            // without close-on-exec (a container's passed ones, in a monitor) included.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                // Before Linux 5.11: each number up to the limit on open files.
                let mut open_files = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut open_files);
                for fd in 3..open_files.rlim_cur.min(1 << 20) as i32 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            for &fd in &self.inherit {
                check(Step::FileDescriptors, libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
        }
        Ok(())
    }

    /// `no_new_privs` and no capability left, after exec too: an empty bounding set leaves
    /// even uid 0 none (the ambient set is cleared, the inheritable one emptied with the rest).
    /// Capabilities the plan keeps stay in the bounding, permitted and effective sets.
    ///
    /// # Safety
    /// As [`Plan::child`].
    unsafe fn drop_privileges(&self) -> Result<(), (Step, i32)> {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: self.kept_capabilities,
                permitted: self.kept_capabilities,
                inheritable: 0,
            },
            CapData::default(),
        ];
        // SAFETY: prctl with numbers; capset reads the local header and data.
        unsafe {
            check(
                Step::NoNewPrivs,
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            )?;
            check(
                Step::Capabilities,
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ),
            )?;
            for capability in 0..=self.last_capability {
                if capability < 32 && self.kept_capabilities & (1 << capability) != 0 {
                    continue;
                }
                check(
                    Step::Capabilities,
                    libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0),
                )?;
            }
            check(
                Step::Capabilities,
                libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()),
            )
        }
    }
}

/// A step of the child, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    ParentCheck,
    PrivateMounts,
    RootTmpfs,
    Directories,
    MountPoints,
    BindMounts,
    Remounts,
    Proc,
    DevFd,
    Symlinks,
    PivotRoot,
    ReadOnlyRoot,
    Rlimits,
    FileDescriptors,
    NoNewPrivs,
    Capabilities,
    Execve,
}

impl Step {
    const ALL: [Step; 17] = [
        Step::ParentCheck,
        Step::PrivateMounts,
        Step::RootTmpfs,
        Step::Directories,
        Step::MountPoints,
        Step::BindMounts,
        Step::Remounts,
        Step::Proc,
        Step::DevFd,
        Step::Symlinks,
        Step::PivotRoot,
        Step::ReadOnlyRoot,
        Step::Rlimits,
        Step::FileDescriptors,
        Step::NoNewPrivs,
        Step::Capabilities,
        Step::Execve,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::ParentCheck => "parent check",
            Step::PrivateMounts => "private mounts",
            Step::RootTmpfs => "root tmpfs",
            Step::Directories => "directories",
            Step::MountPoints => "mount points",
            Step::BindMounts => "bind mounts",
            Step::Remounts => "read-only remounts",
            Step::Proc => "/proc",
            Step::DevFd => "/dev/fd",
            Step::Symlinks => "symlinks",
            Step::PivotRoot => "pivot_root",
            Step::ReadOnlyRoot => "read-only root",
            Step::Rlimits => "rlimits",
            Step::FileDescriptors => "file descriptors",
            Step::NoNewPrivs => "no_new_privs",
            Step::Capabilities => "capabilities",
            Step::Execve => "execve",
        }
    }
}

/// This thread's errno.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `Err((step, errno))` when a system call returned a negative value.
fn check<T: Into<i64>>(step: Step, returned: T) -> Result<(), (Step, i32)> {
    if returned.into() < 0 {
        Err((step, errno()))
    } else {
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_binary_has_no_interpreter_and_a_dynamic_one_has() {
        // This test binary is linked dynamically (the workspace's default target).
        let me = std::env::current_exe().unwrap();
        assert_eq!(
            elf_interpreter(&std::fs::read(&me).unwrap()),
            Some(true),
            "{me:?}"
        );
        assert!(!is_static(&me));
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        // No program headers at all: static.
        assert_eq!(elf_interpreter(&header), Some(false));
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn a_program_that_switches_user_holds_its_parents_pipe() {
        let jail = Jail::unconfined().switches_user("PARENT_PIPE");
        let mut out = tempfile::tempfile().unwrap();
        let script =
            r#"echo "fd $PARENT_PIPE"; [ -p "/dev/fd/$PARENT_PIPE" ] && echo pipe; env | wc -l"#;
        let mut jailed = jail
            .spawn(
                Path::new("/bin/sh"),
                &["-c".into(), script.into()],
                &out,
                &[],
            )
            .unwrap();
        assert!(jailed.wait().unwrap().success());
        let mut printed = String::new();
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(0)).unwrap();
        out.read_to_string(&mut printed).unwrap();
        let lines: Vec<&str> = printed.lines().map(str::trim).collect();
        assert!(
            lines[0].starts_with("fd ") && lines[0] != "fd ",
            "{printed}"
        );
        // sh adds PWD (and maybe SHLVL, _) to what it was given: the pipe's variable.
        assert_eq!(lines[1], "pipe", "{printed}");
        assert!(lines[2].parse::<u32>().unwrap() <= 4, "{printed}");
        assert!(
            jailed._parent_pipe.is_some(),
            "the handle holds the write end"
        );
    }

    #[test]
    fn relative_or_unclean_inputs_are_refused() {
        let root = tempfile::tempdir().unwrap();
        for path in ["relative", "/tmp/../etc"] {
            let jail = Jail::new(root.path()).read_only(path);
            let out = tempfile::tempfile().unwrap();
            let error = jail
                .spawn(Path::new("/bin/true"), &[], &out, &[])
                .unwrap_err();
            assert!(
                error.to_string().contains("not an absolute, clean path"),
                "{error}"
            );
        }
    }
}
