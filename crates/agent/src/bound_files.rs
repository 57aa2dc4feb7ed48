//! Files bound into the container from the host (docker's resolv.conf, hosts and hostname,
//! its init binary). The agent keeps each in a tmpfs of its own, outside the container root,
//! and bind-mounts it over its destination, as runc binds the host's file: the image is never
//! written, so a read-only root works, and an update (docker rewrites resolv.conf and hosts
//! when it connects the network, after `create`) rewrites the backing file in place, which
//! the bind shows at once.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use crate::error::{err, SetupError};

/// The backing files' directory: in the tmpfs of the root's writable layer (mounted on
/// `/sm/rw` by `setup::prepare_root`), beside the overlay's upper directory, so no path in
/// the container leads to it.
pub const BACKING_DIR: &str = "/sm/rw/files";

// The new mount API (Linux 5.2), as in <linux/mount.h>: it binds a file from a directory fd,
// which the agent still holds after it has entered the container root, where the backing
// directory has no path.
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;

#[derive(Debug)]
struct BoundFile {
    destination: String,
    /// The backing file's name in the backing directory.
    name: String,
    mode: u32,
    readonly: bool,
}

/// The container's file binds and their backing files.
#[derive(Debug)]
pub struct BoundFiles {
    /// The backing directory (`O_PATH`).
    dir: OwnedFd,
    files: Vec<BoundFile>,
    /// Backing files are never reused: one per bind, and one per replacement of a file that
    /// was being executed.
    next_name: u32,
}

impl BoundFiles {
    /// Opens the backing directory; before the agent enters the container root.
    pub fn open() -> Result<Self, SetupError> {
        let fd = nix::fcntl::open(
            BACKING_DIR,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(format!("open {BACKING_DIR}")))?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(BoundFiles {
            dir,
            files: Vec::new(),
            next_name: 0,
        })
    }

    /// Keeps `contents` in a new backing file and binds it over `target` (an existing file in
    /// the entered root), read-only if `readonly`.
    pub fn bind(
        &mut self,
        destination: &str,
        target: &Path,
        contents: &[u8],
        mode: u32,
        readonly: bool,
    ) -> Result<(), SetupError> {
        let name = self.write_new(contents, mode, destination)?;
        self.mount(&name, target, readonly, destination)?;
        self.files.push(BoundFile {
            destination: destination.to_string(),
            name,
            mode,
            readonly,
        });
        Ok(())
    }

    /// New contents for the file bound on `destination`; returns whether they differ from the
    /// old. Unchanged contents are not written: docker sends its init binary again, which may
    /// be running. Changed ones are written into the backing file in place; a backing file
    /// that is being executed cannot be opened for writing (`ETXTBSY`, checked before any
    /// truncation), so a new one is bound over it instead.
    pub fn update(&mut self, destination: &str, contents: &[u8]) -> Result<bool, SetupError> {
        let Some(index) = self
            .files
            .iter()
            .rposition(|f| f.destination == destination)
        else {
            return Err(SetupError(format!("{destination} is not a file bind")));
        };
        let file = &self.files[index];
        if self.read(&file.name, destination)? == contents {
            return Ok(false);
        }
        match self.open_at(&file.name, OFlag::O_WRONLY | OFlag::O_TRUNC, 0) {
            Ok(mut backing) => {
                backing
                    .write_all(contents)
                    .map_err(err(format!("write the file bound on {destination}")))?;
            }
            Err(Errno::ETXTBSY) => {
                let (mode, readonly) = (file.mode, file.readonly);
                let target = Path::new("/").join(destination);
                self.bind(destination, &target, contents, mode, readonly)?;
            }
            Err(e) => {
                return Err(SetupError(format!(
                    "open the file bound on {destination}: {e}"
                )))
            }
        }
        Ok(true)
    }

    fn open_at(&self, name: &str, flags: OFlag, mode: u32) -> Result<File, Errno> {
        let fd = nix::fcntl::openat(
            Some(self.dir.as_raw_fd()),
            name,
            flags | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        // SAFETY: `openat` returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn read(&self, name: &str, destination: &str) -> Result<Vec<u8>, SetupError> {
        let mut contents = Vec::new();
        self.open_at(name, OFlag::O_RDONLY, 0)
            .map_err(err(format!("open the file bound on {destination}")))?
            .read_to_end(&mut contents)
            .map_err(err(format!("read the file bound on {destination}")))?;
        Ok(contents)
    }

    fn write_new(
        &mut self,
        contents: &[u8],
        mode: u32,
        destination: &str,
    ) -> Result<String, SetupError> {
        let name = self.next_name.to_string();
        self.next_name += 1;
        let mut file = self
            .open_at(
                &name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                0o600,
            )
            .map_err(err(format!("create the file bound on {destination}")))?;
        file.write_all(contents)
            .map_err(err(format!("write the file bound on {destination}")))?;
        // Set after creation: `open` honours the umask, and the host file's mode may carry
        // bits (setuid, setgid) that a umask clears.
        nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode & 0o7777))
            .map_err(err(format!("chmod the file bound on {destination}")))?;
        Ok(name)
    }

    fn mount(
        &self,
        name: &str,
        target: &Path,
        readonly: bool,
        destination: &str,
    ) -> Result<(), SetupError> {
        bind_at(self.dir.as_fd(), name, target, readonly, destination)
    }
}

/// Binds `name` in the directory `dir` onto `target` (in the agent's root, the container's
/// once entered), read-only if `readonly`: a bind from a directory that has no path there.
pub fn bind_at(
    dir: BorrowedFd<'_>,
    name: &str,
    target: &Path,
    readonly: bool,
    destination: &str,
) -> Result<(), SetupError> {
    let name_c = CString::new(name).map_err(err(format!("the source of {destination}")))?;
    let target_c =
        CString::new(target.as_os_str().as_bytes()).map_err(err(destination.to_string()))?;
    // SAFETY: open_tree reads a NUL-terminated path relative to a directory fd the
    // caller holds open; it returns a new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            name_c.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    };
    if tree < 0 {
        return Err(SetupError(format!(
            "clone the source of {destination}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: open_tree returned a new descriptor (it fits a c_int) that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as libc::c_int) };
    let empty = c"";
    // SAFETY: move_mount reads two NUL-terminated paths that outlive the call and uses the
    // detached mount `tree` owns; the target resolves in the agent's root, the container's.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS,
        )
    };
    if moved != 0 {
        return Err(SetupError(format!(
            "bind {destination}: {}",
            std::io::Error::last_os_error()
        )));
    }
    if readonly {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(err(format!("remount {destination} read-only")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `BoundFiles` over a temporary directory, without mounts (they need root).
    fn in_temp_dir() -> (tempfile::TempDir, BoundFiles) {
        let dir = tempfile::tempdir().unwrap();
        let fd = nix::fcntl::open(
            dir.path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        (
            dir,
            BoundFiles {
                dir: fd,
                files: Vec::new(),
                next_name: 0,
            },
        )
    }

    fn track(files: &mut BoundFiles, destination: &str, contents: &[u8]) -> String {
        let name = files.write_new(contents, 0o755, destination).unwrap();
        files.files.push(BoundFile {
            destination: destination.into(),
            name: name.clone(),
            mode: 0o755,
            readonly: true,
        });
        name
    }

    #[test]
    fn backing_files_keep_contents_and_mode() {
        let (dir, mut files) = in_temp_dir();
        let name = track(&mut files, "/sbin/docker-init", b"\x7fELF");
        let path = dir.path().join(&name);
        assert_eq!(std::fs::read(&path).unwrap(), b"\x7fELF");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }

    #[test]
    fn an_update_rewrites_only_changed_files_in_place() {
        let (dir, mut files) = in_temp_dir();
        let name = track(&mut files, "/etc/resolv.conf", b"nameserver 10.0.0.1\n");
        let path = dir.path().join(&name);
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&path);
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();

        assert!(!files
            .update("/etc/resolv.conf", b"nameserver 10.0.0.1\n")
            .unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified,
            "unchanged contents are not written"
        );

        assert!(files
            .update("/etc/resolv.conf", b"nameserver 127.0.0.11\n")
            .unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"nameserver 127.0.0.11\n");
        assert_eq!(inode(&path), before, "the bind mount keeps its inode");
    }

    #[test]
    fn an_update_of_an_unbound_destination_is_refused() {
        let (_dir, mut files) = in_temp_dir();
        let e = files.update("/etc/hosts", b"x").unwrap_err();
        assert!(e.0.contains("not a file bind"), "{e}");
    }

    #[test]
    fn an_executing_backing_file_is_neither_truncated_nor_written() {
        let (dir, mut files) = in_temp_dir();
        let program = std::fs::read("/bin/sleep").unwrap();
        // A destination no host has: the replacement's bind below must fail, not cover a
        // file of the host running the test.
        let destination = "/nonexistent-supermachine-test/docker-init";
        let name = track(&mut files, destination, &program);
        let path = dir.path().join(&name);
        // Another test's fork may hold a descriptor of the new file until its child execs.
        let mut running = loop {
            match std::process::Command::new(&path).arg("5").spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                spawned => break spawned.unwrap(),
            }
        };
        // The same contents, as docker sends them at network attach: no write at all.
        let unchanged = files.update(destination, &program);
        // Different contents: the open for writing meets ETXTBSY and a replacement is bound
        // instead (which fails here, for want of a target), but the running file stays whole.
        let changed = files.update(destination, b"other");
        let _ = running.kill();
        let _ = running.wait();
        assert!(!unchanged.unwrap());
        assert!(changed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), program);
    }
}
