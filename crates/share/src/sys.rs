//! Thin, safe wrappers over the host system calls the server makes, each returning the host's
//! errno on failure (the server passes it to the guest unchanged).

use std::ffi::{CStr, CString};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub type Errno = i32;
pub type SysResult<T> = Result<T, Errno>;

pub fn errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> SysResult<usize> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as usize)
    }
}

pub fn cstring(bytes: &[u8]) -> SysResult<CString> {
    CString::new(bytes).map_err(|_| libc::EINVAL)
}

const EMPTY: &CStr = c"";

pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned descriptor is new and
    // owned by nobody else.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is owned here alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The path through which the host kernel reopens the exact inode an O_PATH descriptor
/// holds: `/proc/self/fd/N` resolves to that inode itself, never by name, so it cannot be
/// redirected by a rename or a symlink planted in the share.
pub fn proc_path(fd: RawFd) -> CString {
    // A decimal number has no NUL byte, so this cannot fail.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// Reopens the non-symlink inode held by an O_PATH descriptor for IO.
pub fn reopen(fd: RawFd, flags: i32) -> SysResult<OwnedFd> {
    let path = proc_path(fd);
    openat(libc::AT_FDCWD, &path, flags & !libc::O_NOFOLLOW, 0)
}

pub fn fstat(fd: RawFd) -> SysResult<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; the empty path with AT_EMPTY_PATH names `fd`
    // itself (an O_PATH descriptor works, a symlink is not followed).
    check(unsafe {
        libc::fstatat(
            fd,
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn fstatfs(fd: RawFd) -> SysResult<libc::statvfs> {
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; fstatvfs accepts O_PATH descriptors.
    check(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(st)
}

pub fn readlink(fd: RawFd) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is valid for `buf.len()` bytes; the empty path reads the link `fd` holds.
    let n = check_size(unsafe {
        libc::readlinkat(fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: `name` is a valid NUL-terminated string.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> SysResult<()> {
    // SAFETY: `name` is a valid NUL-terminated string.
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> SysResult<()> {
    // SAFETY: both strings are valid and NUL-terminated.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> SysResult<()> {
    // SAFETY: `name` is a valid NUL-terminated string.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: RawFd,
    old: &CStr,
    new_dir: RawFd,
    new: &CStr,
    flags: u32,
) -> SysResult<()> {
    // SAFETY: both names are valid NUL-terminated strings.
    check(unsafe { libc::renameat2(old_dir, old.as_ptr(), new_dir, new.as_ptr(), flags) }).map(drop)
}

/// A new hard link to the inode an O_PATH descriptor holds (a symlink links itself).
pub fn link_fd(fd: RawFd, new_dir: RawFd, name: &CStr) -> SysResult<()> {
    // SAFETY: the names are valid NUL-terminated strings; AT_EMPTY_PATH links `fd` itself.
    check(unsafe {
        libc::linkat(
            fd,
            EMPTY.as_ptr(),
            new_dir,
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// chown of the inode `fd` holds, never following a symlink; `u32::MAX` leaves an id as is.
pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> SysResult<()> {
    // SAFETY: the empty path with AT_EMPTY_PATH names `fd` itself.
    check(unsafe {
        libc::fchownat(
            fd,
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of the non-symlink inode an O_PATH descriptor holds.
pub fn chmod_fd(fd: RawFd, mode: u32) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: `path` is a valid NUL-terminated string.
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

pub fn utimens(fd: RawFd, times: &[libc::timespec; 2]) -> SysResult<()> {
    // SAFETY: `times` points to two timespecs; the empty path names `fd` itself.
    check(unsafe {
        libc::utimensat(
            fd,
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn ftruncate(fd: RawFd, size: u64) -> SysResult<()> {
    let size = i64::try_from(size).map_err(|_| libc::EFBIG)?;
    // SAFETY: plain system call on a descriptor.
    check(unsafe { libc::ftruncate(fd, size) }).map(drop)
}

pub fn pread(fd: RawFd, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    check_size(unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) })
}

pub fn pwrite(fd: RawFd, buf: &[u8], offset: u64) -> SysResult<usize> {
    let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    check_size(unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset) })
}

pub fn fsync(fd: RawFd, datasync: bool) -> SysResult<()> {
    // SAFETY: plain system calls on a descriptor.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> SysResult<()> {
    let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| libc::EINVAL)?;
    // SAFETY: plain system call on a descriptor.
    check(unsafe { libc::fallocate(fd, mode, offset, len) }).map(drop)
}

pub fn lseek(fd: RawFd, offset: u64, whence: i32) -> SysResult<u64> {
    let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    // SAFETY: plain system call on a descriptor.
    let ret = unsafe { libc::lseek(fd, offset, whence) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as u64)
    }
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: usize,
) -> SysResult<usize> {
    let mut off_in = i64::try_from(off_in).map_err(|_| libc::EINVAL)?;
    let mut off_out = i64::try_from(off_out).map_err(|_| libc::EINVAL)?;
    // SAFETY: the offsets are valid in/out pointers for the duration of the call.
    check_size(unsafe { libc::copy_file_range(fd_in, &mut off_in, fd_out, &mut off_out, len, 0) })
}

pub fn getdents(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let ret = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as usize)
    }
}

pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: strings are NUL-terminated; `value` is valid for its length.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn getxattr(fd: RawFd, name: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    let path = proc_path(fd);
    // SAFETY: strings are NUL-terminated; `buf` is valid for writes of its length.
    check_size(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub fn listxattr(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    let path = proc_path(fd);
    // SAFETY: `path` is NUL-terminated; `buf` is valid for writes of its length.
    check_size(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn removexattr(fd: RawFd, name: &CStr) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: both strings are NUL-terminated.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

pub fn ofd_lock(fd: RawFd, cmd: i32, lock: &mut libc::flock) -> SysResult<()> {
    // SAFETY: `lock` is a valid flock structure for the duration of the call.
    check(unsafe { libc::fcntl(fd, cmd, lock as *mut libc::flock) }).map(drop)
}

pub fn flock(fd: RawFd, op: i32) -> SysResult<()> {
    // SAFETY: plain system call on a descriptor.
    check(unsafe { libc::flock(fd, op) }).map(drop)
}

/// The filesystem-independent handle of the inode `fd` holds (type then bytes), which
/// fanotify reports for events.
pub fn file_handle(fd: RawFd) -> SysResult<Vec<u8>> {
    const MAX_HANDLE: usize = 128;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    let mut buf = [0u32; 2 + MAX_HANDLE / 4];
    buf[0] = MAX_HANDLE as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a 4-byte-aligned file_handle with room for MAX_HANDLE bytes, as its
    // first field says; the empty path with AT_EMPTY_PATH names `fd` itself.
    check(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd,
            EMPTY.as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        ) as libc::c_int
    })?;
    let len = (buf[0] as usize).min(MAX_HANDLE);
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&buf[1].to_ne_bytes());
    for word in &buf[2..] {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    out.truncate(4 + len);
    Ok(out)
}

/// Reopens the inode a handle from [`file_handle`] names, on the filesystem `mount` (any
/// descriptor on that filesystem) holds. Needs CAP_DAC_READ_SEARCH; a deleted inode gives
/// ESTALE.
pub fn open_by_handle(mount: RawFd, handle: &[u8], flags: i32) -> SysResult<OwnedFd> {
    let (Some(typ), Some(bytes)) = (handle.get(..4), handle.get(4..)) else {
        return Err(libc::EINVAL);
    };
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, built in
    // u32 words so that it has the struct's alignment.
    let mut buf = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    buf.push(u32::try_from(bytes.len()).map_err(|_| libc::EINVAL)?);
    let mut typ_word = [0u8; 4];
    typ_word.copy_from_slice(typ);
    buf.push(u32::from_ne_bytes(typ_word));
    for chunk in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        buf.push(u32::from_ne_bytes(word));
    }
    // SAFETY: `buf` is a 4-byte-aligned file_handle whose first field is the length of the
    // handle bytes that follow it in `buf`; the kernel only reads it.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount,
            buf.as_mut_ptr(),
            flags | libc::O_CLOEXEC,
        ) as libc::c_int
    })?;
    // SAFETY: `fd` was just returned by open_by_handle_at and is owned here alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raises this process's soft limit on open files to its hard limit, returning the soft
/// limit in force afterwards.
pub fn raise_nofile_limit() -> SysResult<u64> {
    // SAFETY: an all-zero rlimit is a valid value of this plain C struct.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit for the duration of the call.
        match check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) }) {
            Ok(_) => return Ok(raised.rlim_cur),
            Err(e) => {
                log::debug!(
                    "share: cannot raise RLIMIT_NOFILE to {}: errno {e}",
                    lim.rlim_max
                );
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// A fanotify group reporting directory file handles and names, non-blocking.
pub fn fanotify_init() -> SysResult<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_NOTIF
                | libc::FAN_REPORT_DFID_NAME
                | libc::FAN_CLOEXEC
                | libc::FAN_NONBLOCK,
            (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` was just returned by fanotify_init and is owned here alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds or removes a mark of the fanotify group `fan` on the inode `fd` refers to.
pub fn fanotify_mark(fan: RawFd, flags: libc::c_uint, mask: u64, fd: RawFd) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: `path` is a valid NUL-terminated string; `fan` is the caller's descriptor.
    let ret = unsafe { libc::fanotify_mark(fan, flags, mask, libc::AT_FDCWD, path.as_ptr()) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Waits up to `timeout_ms` for `fd` to be readable, then reads what it has into `buf`;
/// 0 when nothing came (timeout, interruption, or a read that found nothing).
pub fn poll_read(fd: RawFd, buf: &mut [u8], timeout_ms: i32) -> usize {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, timeout_ms) } <= 0 {
        return 0;
    }
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    n.max(0) as usize
}
