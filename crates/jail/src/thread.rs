//! System call allow lists for the threads that run guest-driven code (a vCPU, a device's
//! I/O loop, the shared filesystem's server) in a process that is not jailed as a whole:
//! the builtin VMM runs in the container's monitor, whose main thread still needs the host
//! (state, cgroups, hooks).
//!
//! Each kind of thread gets the calls it makes and no others, as Firecracker gives each of
//! its threads: memory and synchronisation for all; `KVM_RUN` and the exits' device work for
//! a vCPU; reads, writes and interrupts for a device loop; file system calls on the shared
//! trees for the server. Anything else (a new program or process, a namespace, a mount, a
//! credential, a socket, tracing, a module, BPF) kills the whole process (SIGSYS): the VM and
//! its monitor end, and the caller sees how. `clone` is allowed only with `CLONE_THREAD`, and
//! `clone3` (whose flags a filter cannot read) fails with ENOSYS, so the C library uses
//! `clone`: a thread may start threads, never processes. A thread starts threads only of its
//! own kind (a thread inherits its creator's filter); threads of another kind are started by
//! an unfiltered thread (`devices::spawn_confined`).
//!
//! `SUPERMACHINE_THREAD_FILTER=log` logs a call outside the lists to the kernel log
//! (`audit: type=1326 ... comm="vcpu0" ... syscall=N`) instead of killing: how the lists are
//! checked against a workload.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::JailError;

/// The kinds of filtered thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and what its exits do on the same thread (a queue notification's
    /// device work: block I/O, the console's and the network's transmit, the balloon's
    /// discards, the serial log), its state saved at a snapshot. With the `ioctl` requests
    /// its hypervisor backend makes on it (`None`: any), the same for every vCPU of the
    /// process (the first one's list is compiled and kept).
    Vcpu(Option<&'static [u64]>),
    /// A device's host-side loop: a console port's reader, the network's receive.
    DeviceIo,
    /// The shared filesystem's server (virtio-fs requests on the shared host trees).
    FileServer,
}

const KINDS: usize = 3;

impl ThreadKind {
    fn index(self) -> usize {
        match self {
            ThreadKind::Vcpu(_) => 0,
            ThreadKind::DeviceIo => 1,
            ThreadKind::FileServer => 2,
        }
    }
}

/// What every filtered thread calls: memory, synchronisation, time, signals of its own, I/O
/// on descriptors it holds, and its own start and end.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ppoll,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Decided by the second filter (ENOSYS).
    libc::SYS_clone3,
];

/// What only some architectures have, for every thread.
#[cfg(target_arch = "x86_64")]
const COMMON_HERE: &[libc::c_long] = &[libc::SYS_poll, libc::SYS_epoll_wait, libc::SYS_time];
#[cfg(not(target_arch = "x86_64"))]
const COMMON_HERE: &[libc::c_long] = &[];

/// A vCPU's own (beside its `ioctl`s): its exits' device work adds durable writes, the
/// console log's rotation and discards of guest memory.
const VCPU: &[libc::c_long] = &[
    libc::SYS_fsync,
    libc::SYS_copy_file_range,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_mincore,
];

/// The shared filesystem server's own: file system calls relative to the descriptors of the
/// shared trees (it opens nothing by absolute path), by handle, and host change events.
const FILE_SERVER: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstatfs,
    libc::SYS_flock,
    libc::SYS_copy_file_range,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_lsetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_fanotify_init,
    libc::SYS_fanotify_mark,
];

/// The server's calls that only some architectures have: `renameat` (the C library's
/// `rename` of an entry without flags) and `chmod` of a `/proc/self/fd` path (a node opened
/// `O_PATH`, which `fchmod` refuses).
#[cfg(target_arch = "x86_64")]
const FILE_SERVER_HERE: &[libc::c_long] = &[libc::SYS_renameat, libc::SYS_chmod];
#[cfg(not(target_arch = "x86_64"))]
const FILE_SERVER_HERE: &[libc::c_long] = &[];

/// `ioctl`s a device loop makes: raising its interrupt line where the VM has no irqfd, and
/// making a descriptor non-blocking.
const DEVICE_IOCTLS: &[u64] = &[KVM_IRQ_LINE, libc::FIONBIO];
/// `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
const KVM_IRQ_LINE: u64 = 0x4008_ae61;

fn log_only() -> bool {
    std::env::var("SUPERMACHINE_THREAD_FILTER").is_ok_and(|v| v == "log")
}

/// Each kind's two filters (clone3's ENOSYS, and its allow list), compiled once per process.
fn programs(kind: ThreadKind) -> Result<&'static [BpfProgram; 2], String> {
    type Compiled = Result<[BpfProgram; 2], String>;
    static PROGRAMS: [OnceLock<Compiled>; KINDS] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    PROGRAMS[kind.index()]
        .get_or_init(|| compile(kind, log_only()).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

fn compile(kind: ThreadKind, log_only: bool) -> Result<[BpfProgram; 2], seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let own: &[&[libc::c_long]] = match kind {
        ThreadKind::Vcpu(_) => &[VCPU],
        ThreadKind::DeviceIo => &[],
        ThreadKind::FileServer => &[FILE_SERVER, FILE_SERVER_HERE],
    };
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(COMMON_HERE)
        .chain(own.iter().copied().flatten())
        .map(|&call| (call, Vec::new()))
        .collect();
    // A clone with CLONE_THREAD makes a thread; without, a process.
    allowed.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // Thread names.
    allowed.insert(
        libc::SYS_prctl,
        argument_is_one_of(0, [libc::PR_SET_NAME, libc::PR_GET_NAME].map(|o| o as u64))?,
    );
    let ioctls = match kind {
        ThreadKind::Vcpu(ioctls) => ioctls,
        ThreadKind::DeviceIo => Some(DEVICE_IOCTLS),
        ThreadKind::FileServer => Some(&[][..]),
    };
    match ioctls {
        // Any request.
        None => {
            allowed.insert(libc::SYS_ioctl, Vec::new());
        }
        Some([]) => {}
        Some(requests) => {
            allowed.insert(
                libc::SYS_ioctl,
                argument_is_one_of(1, requests.iter().copied())?,
            );
        }
    }
    let otherwise = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let allow = SeccompFilter::new(allowed, otherwise, SeccompAction::Allow, arch)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    // The allow list last: installing a filter is a call it does not allow.
    Ok([clone3.try_into()?, allow.try_into()?])
}

/// Rules that match a call whose argument `index` (32 bits of it) is one of `values`.
fn argument_is_one_of(
    index: u8,
    values: impl IntoIterator<Item = u64>,
) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    let rules = values
        .into_iter()
        .map(|value| {
            SeccompRule::new(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])
        })
        .collect::<Result<_, _>>()?;
    Ok(rules)
}

/// Installs `kind`'s filters on the calling thread (and the threads it starts from now on).
/// It also sets the thread's `no_new_privs`.
pub fn confine_this_thread(kind: ThreadKind) -> Result<(), JailError> {
    let programs = programs(kind).map_err(|reason| JailError::Setup {
        what: "compile the thread filter",
        source: std::io::Error::other(reason),
    })?;
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| JailError::Setup {
            what: "install the thread filter",
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child after confining it to `kind`: `Ok(code)` for its exit
    /// code, `Err(signal)` if a signal ended it.
    fn in_confined_child(kind: ThreadKind, body: impl FnOnce() -> i32) -> Result<i32, i32> {
        // Compiled here, not taken from the process's cache: a vCPU's list is cached once.
        let programs = compile(kind, false).unwrap();
        // SAFETY: the child only installs the filter, runs `body` (system calls, no locks
        // held by other threads) and exits without unwinding.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let installed = programs
                .iter()
                .all(|program| seccompiler::apply_filter(program).is_ok());
            let code = if installed { body() } else { 100 };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut raw = 0;
        // SAFETY: waitpid writes only `raw`.
        assert_eq!(unsafe { libc::waitpid(child, &mut raw, 0) }, child);
        if libc::WIFSIGNALED(raw) {
            Err(libc::WTERMSIG(raw))
        } else {
            Ok(libc::WEXITSTATUS(raw))
        }
    }

    /// A confined thread may start threads (of its kind); its status says it is filtered,
    /// the thread that started it is not.
    #[test]
    fn a_confined_thread_starts_threads() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let confined = std::thread::spawn(move || {
            confine_this_thread(ThreadKind::Vcpu(None)).expect("install");
            // SAFETY: gettid has no arguments.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let started = std::thread::spawn(|| 42).join().unwrap();
            done_rx.recv().unwrap();
            started
        });
        let tid = tid_rx.recv().unwrap();
        let status = |path: &str| std::fs::read_to_string(path).unwrap();
        let theirs = status(&format!("/proc/self/task/{tid}/status"));
        assert!(theirs.lines().any(|l| l == "Seccomp:\t2"), "{theirs}");
        assert!(theirs.lines().any(|l| l == "NoNewPrivs:\t1"), "{theirs}");
        done_tx.send(()).unwrap();
        assert_eq!(confined.join().unwrap(), 42);
        let ours = status("/proc/thread-self/status");
        assert!(ours.lines().any(|l| l == "Seccomp:\t0"), "{ours}");
    }

    /// What no kind may do kills the whole process: a new process, a new program.
    #[test]
    fn a_fork_or_an_exec_kills_the_process() {
        for kind in [
            ThreadKind::Vcpu(None),
            ThreadKind::DeviceIo,
            ThreadKind::FileServer,
        ] {
            // SAFETY: a fork the filter forbids.
            let forked = in_confined_child(kind, || unsafe { libc::fork().max(0) + 3 });
            assert_eq!(forked, Err(libc::SIGSYS), "{kind:?}: fork");
            let exec = in_confined_child(kind, || {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: a NUL-terminated path and argument list.
                unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
                3
            });
            assert_eq!(exec, Err(libc::SIGSYS), "{kind:?}: exec");
        }
    }

    /// Each kind has its own list: opening a file is the file server's alone, and a device
    /// loop's ioctls are only its interrupt line's and FIONBIO.
    #[test]
    fn each_kind_allows_its_own_calls_only() {
        let open = || {
            // SAFETY: a NUL-terminated path.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
            i32::from(fd < 0)
        };
        assert_eq!(in_confined_child(ThreadKind::FileServer, open), Ok(0));
        assert_eq!(
            in_confined_child(ThreadKind::Vcpu(None), open),
            Err(libc::SIGSYS)
        );
        assert_eq!(
            in_confined_child(ThreadKind::DeviceIo, open),
            Err(libc::SIGSYS)
        );

        let winsize = || {
            let mut size = [0u16; 4];
            // SAFETY: TIOCGWINSZ writes a struct winsize (four u16) into `size`.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, size.as_mut_ptr()) };
            0
        };
        assert_eq!(
            in_confined_child(ThreadKind::DeviceIo, winsize),
            Err(libc::SIGSYS)
        );
        assert_eq!(
            in_confined_child(ThreadKind::FileServer, winsize),
            Err(libc::SIGSYS)
        );
        // A vCPU's ioctls are its backend's list, when it gives one.
        const KVM_RUN: u64 = 0xae80;
        assert_eq!(
            in_confined_child(ThreadKind::Vcpu(Some(&[KVM_RUN])), winsize),
            Err(libc::SIGSYS)
        );
        assert_eq!(in_confined_child(ThreadKind::Vcpu(None), winsize), Ok(0));
        let nonblocking = || {
            let mut on: libc::c_int = 1;
            // SAFETY: FIONBIO reads an int; whatever it answers, the call was allowed.
            unsafe { libc::ioctl(0, libc::FIONBIO, &mut on) };
            0
        };
        assert_eq!(in_confined_child(ThreadKind::DeviceIo, nonblocking), Ok(0));
    }
}
