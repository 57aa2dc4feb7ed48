//! The container's live shares (volumes, bind mounts): one FUSE filesystem served by the host,
//! mounted once at [`SHARES_DIR`] in the VM's own root (so no path in the container leads to
//! it), whose root lists the shares by index; each `MountKind::Share` binds
//! `SHARES_DIR/<index>` onto its destination.
//!
//! The kernel reaches the host's server by one of two transports:
//! - virtio-fs (the builtin VMM has the device, tag `sm`): the kernel talks to the device itself;
//! - the relay (QEMU, which has no virtio-fs that keeps restores copy-on-write): the agent moves
//!   the kernel's requests from `/dev/fuse` to the virtio-console port `fs.0`, and what comes
//!   back from the port to `/dev/fuse`.
//!
//! On both the host sends notifications (unique 0) on `fs.0`: cache invalidations and
//! `FUSE_NOTIFY_FSNOTIFY` (the guest kernel's patch), which make host-side changes visible
//! and raise inotify events. A virtio-fs mount has no `/dev/fuse`; its notifications go to the
//! connection's fusectl file `notify` (the same patch).
//!
//! The relay's threads are the agent's only ones. They only move bytes between descriptors
//! opened close-on-exec and share no state with the main thread, so a process the agent
//! spawns while sharing its memory (see `spawn`) meets nothing of theirs.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use crate::channel::find_port;
use crate::error::{err, SetupError};
use crate::{agent_debug, agent_log};

/// Where the share filesystem is mounted, outside the container root.
pub const SHARES_DIR: &str = "/sm/shares";
/// The virtio-fs tag of the builtin VMM's device.
const VIRTIOFS_TAG: &str = "sm";
/// The virtio-console port the host serves the share filesystem on.
const FS_PORT: &str = "fs.0";
/// The virtio device id of virtio-fs, as sysfs shows it.
const VIRTIO_ID_FS: &str = "0x001a";
const FUSECTL_DIR: &str = "/sys/fs/fuse/connections";
const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";

// The new mount API (Linux 5.2), as in <linux/mount.h>: it binds an entry of a directory the
// agent holds open (the share filesystem's root), which has no path once the agent has
// entered the container root.
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;

/// `struct fuse_out_header`: len (u32), error (i32), unique (u64).
const OUT_HEADER_LEN: usize = 16;
/// The kernel refuses a `/dev/fuse` read into less than `max_write` plus the request headers;
/// the server may negotiate up to 256 pages (`FUSE_MAX_MAX_PAGES`).
const REQUEST_BUFFER_LEN: usize = (256 << 12) + (4 << 10);
/// Threads reading `/dev/fuse`: a request that blocks on the host (a lock wait) must not stop
/// the others.
const DEV_FUSE_READERS: usize = 2;
/// No message from the host is larger (a read reply of 256 pages and its header); a header
/// that says more means the stream has lost its framing.
const MAX_MESSAGE_LEN: usize = 4 << 20;
const PORT_READ_LEN: usize = 256 << 10;
/// How often to look for a host again while none is connected to the port.
const RECONNECT_POLL: Duration = Duration::from_millis(10);

/// How the kernel reaches the host's FUSE server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    VirtioFs,
    Relay,
}

/// Where a message from the host goes.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// A reply, to `/dev/fuse` at once (the relay).
    Reply,
    /// A notification (unique 0), to the notifier thread: `/dev/fuse` on the relay, the
    /// connection's fusectl `notify` file on virtio-fs.
    Notification,
    Drop,
}

/// On virtio-fs replies travel on the device, so only notifications are expected on the port.
fn delivery(transport: Transport, message: &[u8]) -> Delivery {
    let unique = message
        .get(8..OUT_HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    match (transport, unique) {
        (_, None) => Delivery::Drop,
        (_, Some(0)) => Delivery::Notification,
        (Transport::Relay, Some(_)) => Delivery::Reply,
        (Transport::VirtioFs, Some(_)) => Delivery::Drop,
    }
}

#[derive(Debug, PartialEq, Eq)]
struct FramingError(usize);

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a FUSE message of {} bytes cannot be", self.0)
    }
}

/// Splits the port's byte stream into FUSE messages by the `len` of each out header.
#[derive(Debug, Default)]
struct MessageSplitter {
    pending: Vec<u8>,
}

impl MessageSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived. A length no message can have leaves the
    /// stream without framing: everything pending is dropped.
    fn next_message(&mut self) -> Result<Option<Vec<u8>>, FramingError> {
        let Some(len) = self
            .pending
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
        else {
            return Ok(None);
        };
        let len = len as usize;
        if !(OUT_HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
            self.pending.clear();
            return Err(FramingError(len));
        }
        if self.pending.len() < len {
            return Ok(None);
        }
        let rest = self.pending.split_off(len);
        Ok(Some(std::mem::replace(&mut self.pending, rest)))
    }

    /// A host that went away leaves no half message for the next one.
    fn clear(&mut self) {
        self.pending.clear();
    }
}

/// The mounted share filesystem.
#[derive(Debug)]
pub struct Shares {
    /// [`SHARES_DIR`] (`O_PATH`), still open after the agent has entered the container root.
    dir: OwnedFd,
}

impl Shares {
    /// Mounts the share filesystem and starts what serves it; before the agent enters the
    /// container root. The host must be serving it already: binds look their sources up.
    ///
    /// With `layered_root`, the container root is an overlay whose upper layer is a share:
    /// overlayfs does not expect its layers to change underneath it, so after host-side
    /// changes arrive (`docker cp` into a running container) the guest's unused directory
    /// entries and inodes are dropped, and the overlay looks them up again.
    pub fn mount(layered_root: bool) -> Result<Shares, SetupError> {
        fs::create_dir_all(SHARES_DIR).map_err(err(format!("mkdir {SHARES_DIR}")))?;
        if is_mount_point(Path::new(SHARES_DIR))? {
            agent_debug!("{SHARES_DIR} is mounted already");
            return Self::open();
        }
        let drop_caches = if layered_root {
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(DROP_CACHES)
                .map_err(err(format!("open {DROP_CACHES}")))?;
            Some(file)
        } else {
            None
        };
        let transport = if has_virtiofs_device() {
            Transport::VirtioFs
        } else {
            Transport::Relay
        };
        agent_debug!("share filesystem over {transport:?}");
        match transport {
            Transport::VirtioFs => {
                mount(
                    Some(VIRTIOFS_TAG),
                    SHARES_DIR,
                    Some("virtiofs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .map_err(err(format!(
                    "mount virtiofs {VIRTIOFS_TAG} on {SHARES_DIR}"
                )))?;
                // Notifications only: the shares work without them, if not live from the host.
                match open_port().and_then(|port| Ok((port, open_control_notify()?))) {
                    Ok((port, notify)) => spawn_port_reader(
                        Transport::VirtioFs,
                        Arc::new(port),
                        None,
                        notify,
                        drop_caches,
                    )?,
                    Err(e) => agent_log!("no notifications from the host's shares: {e}"),
                }
            }
            Transport::Relay => {
                let port = open_port().map_err(err(format!("open port {FS_PORT}")))?;
                let dev_fuse = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open("/dev/fuse")
                    .map_err(err("open /dev/fuse"))?;
                let options = format!(
                    "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
                    dev_fuse.as_raw_fd()
                );
                mount(
                    Some(VIRTIOFS_TAG),
                    SHARES_DIR,
                    Some("fuse"),
                    MsFlags::empty(),
                    Some(options.as_str()),
                )
                .map_err(err(format!("mount fuse on {SHARES_DIR}")))?;
                // /dev/fuse can be read only once it is mounted.
                let dev_fuse = Arc::new(dev_fuse);
                let port = Arc::new(port);
                let port_writes = Arc::new(Mutex::new(()));
                for n in 0..DEV_FUSE_READERS {
                    let (dev_fuse, port, port_writes) =
                        (dev_fuse.clone(), port.clone(), port_writes.clone());
                    std::thread::Builder::new()
                        .name(format!("fuse-requests-{n}"))
                        .spawn(move || relay_requests(&dev_fuse, &port, &port_writes))
                        .map_err(err("start the FUSE relay"))?;
                }
                spawn_port_reader(
                    Transport::Relay,
                    port,
                    Some(dev_fuse.clone()),
                    dev_fuse,
                    drop_caches,
                )?;
            }
        }
        Self::open()
    }

    /// Where share `index` is in the VM's root.
    pub fn path(&self, index: u32) -> PathBuf {
        Path::new(SHARES_DIR).join(index.to_string())
    }

    fn open() -> Result<Shares, SetupError> {
        let fd = nix::fcntl::open(
            SHARES_DIR,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(format!("open {SHARES_DIR}")))?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Shares { dir })
    }

    /// Binds share `index` onto `target` (in the entered root), made first like the source
    /// if missing, as runc makes a bind's target; then applies the bind's flags (`ro`,
    /// `nosuid`, `noexec`, …) and its propagation (`rprivate`, `runbindable`, …) from
    /// `options`.
    pub fn bind(
        &self,
        index: u32,
        target: &Path,
        destination: &str,
        readonly: bool,
        options: &[String],
    ) -> Result<(), SetupError> {
        let name = index.to_string();
        agent_debug!("bind share {name} on {destination}");
        let source_is_dir = nix::sys::stat::fstatat(
            Some(self.dir.as_raw_fd()),
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .map_err(err(format!("share {index} for {destination}")))?;
        if fs::symlink_metadata(target).is_err() {
            make_target(target, source_is_dir).map_err(err(format!("create {destination}")))?;
        }
        bind_at(self.dir.as_fd(), &name, target, destination)?;
        let (mut flags, _data) = crate::setup::parse_options(options);
        flags.set(MsFlags::MS_RDONLY, readonly);
        if !flags.is_empty() {
            // A bind takes its flags from a remount; its filesystem's data means nothing to it.
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
                None::<&str>,
            )
            .map_err(err(format!("remount {destination} with {options:?}")))?;
        }
        if let Some(propagation) = propagation(options) {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                propagation,
                None::<&str>,
            )
            .map_err(err(format!("propagation of {destination}: {options:?}")))?;
        }
        Ok(())
    }
}

/// An empty directory or file, with its missing parents, as a bind's target.
fn make_target(target: &Path, directory: bool) -> io::Result<()> {
    if directory {
        return fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(target);
    }
    if let Some(parent) = target.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(target)
        .map(drop)
}

/// Binds `name` in the directory `dir` onto `target` (in the agent's root, the container's
/// once entered), read-only if `readonly`: a bind from a directory that has no path there.
fn bind_at(
    dir: BorrowedFd<'_>,
    name: &str,
    target: &Path,
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
    Ok(())
}

/// The propagation a bind's options ask for, the last one winning as in mount(8). The host
/// refuses shared and slave propagation (nothing propagates across the VM's boundary).
fn propagation(options: &[String]) -> Option<MsFlags> {
    options.iter().rev().find_map(|o| match o.as_str() {
        "private" => Some(MsFlags::MS_PRIVATE),
        "rprivate" => Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "unbindable" => Some(MsFlags::MS_UNBINDABLE),
        "runbindable" => Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
        _ => None,
    })
}

fn is_mount_point(path: &Path) -> Result<bool, SetupError> {
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev());
    let own = dev(path).map_err(err(format!("stat {}", path.display())))?;
    let parent = dev(&path.join("..")).map_err(err(format!("stat {}/..", path.display())))?;
    Ok(own != parent)
}

fn has_virtiofs_device() -> bool {
    let Ok(devices) = fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    devices.flatten().any(|d| {
        fs::read_to_string(d.path().join("device")).is_ok_and(|id| id.trim() == VIRTIO_ID_FS)
    })
}

fn open_port() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(find_port(FS_PORT)?)
}

/// The fusectl `notify` file of the virtio-fs mount; fusectl is mounted if it is not yet.
fn open_control_notify() -> io::Result<File> {
    let minor = libc::minor(fs::metadata(SHARES_DIR)?.dev());
    let path = PathBuf::from(FUSECTL_DIR)
        .join(minor.to_string())
        .join("notify");
    if !path.exists() {
        mount(
            Some("fusectl"),
            FUSECTL_DIR,
            Some("fusectl"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(io::Error::from)?;
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Moves the kernel's requests, each whole, from `/dev/fuse` to the port until the share
/// filesystem is unmounted.
fn relay_requests(dev_fuse: &File, port: &File, port_writes: &Mutex<()>) {
    let mut request = vec![0u8; REQUEST_BUFFER_LEN];
    loop {
        match (&*dev_fuse).read(&mut request) {
            Ok(0) => return,
            Ok(n) => {
                // A request is one message on the stream: no other thread's bytes inside it.
                let _whole = port_writes.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = (&*port).write_all(&request[..n]) {
                    agent_log!("FUSE request to the host: {e}");
                }
            }
            // Interrupted, or a request that was interrupted before it could be read.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => {}
            // Unmounted.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return,
            Err(e) => {
                agent_log!("read /dev/fuse: {e}");
                return;
            }
        }
    }
}

/// Starts the thread reading the port and the one handing notifications to the kernel.
/// Notifications have a thread of their own: the kernel may wait while it handles one (an
/// invalidation takes the directory's lock, which a request waiting for its reply may hold;
/// an event about a watched directory's child looks the child up), and replies must keep
/// flowing meanwhile.
fn spawn_port_reader(
    transport: Transport,
    port: Arc<File>,
    dev_fuse: Option<Arc<File>>,
    notify_sink: impl Write + Send + 'static,
    drop_caches: Option<File>,
) -> Result<(), SetupError> {
    let (notifications, queue) = mpsc::channel::<Vec<u8>>();
    std::thread::Builder::new()
        .name("fuse-notify".into())
        .spawn(move || notify(queue, notify_sink, drop_caches))
        .map(drop)
        .map_err(err("start the FUSE notifier"))?;
    std::thread::Builder::new()
        .name("fuse-from-host".into())
        .spawn(move || {
            let sinks = Sinks {
                replies: dev_fuse.as_deref(),
                notifications,
            };
            read_port(transport, &port, sinks)
        })
        .map(drop)
        .map_err(err("start the FUSE port reader"))
}

/// Hands each notification to the kernel; after each batch, drops the guest's unused
/// dentries and inodes if `drop_caches` is given (see [`Shares::mount`]).
fn notify(queue: mpsc::Receiver<Vec<u8>>, mut sink: impl Write, mut drop_caches: Option<File>) {
    while let Ok(first) = queue.recv() {
        for message in std::iter::once(first).chain(queue.try_iter()) {
            // One write per message: the kernel takes a message from one write only. It
            // refuses invalidations of entries it no longer has, which is no error of the share.
            if let Err(e) = sink.write(&message) {
                agent_debug!("FUSE notification to the kernel: {e}");
            }
        }
        if let Some(file) = &mut drop_caches {
            // "2": slab objects (dentries and inodes) only; the page cache stays.
            if let Err(e) = file.write_all(b"2") {
                agent_debug!("{DROP_CACHES}: {e}");
            }
        }
    }
}

struct Sinks<'a> {
    replies: Option<&'a File>,
    notifications: mpsc::Sender<Vec<u8>>,
}

/// Delivers each message from the host where it goes, for as long as the VM runs.
fn read_port(transport: Transport, port: &File, sinks: Sinks<'_>) {
    let mut bytes = vec![0u8; PORT_READ_LEN];
    let mut splitter = MessageSplitter::default();
    loop {
        match (&*port).read(&mut bytes) {
            // No host connected.
            Ok(0) => {
                splitter.clear();
                std::thread::sleep(RECONNECT_POLL);
            }
            Ok(n) => {
                splitter.push(&bytes[..n]);
                loop {
                    match splitter.next_message() {
                        Ok(Some(message)) => deliver(transport, message, &sinks),
                        Ok(None) => break,
                        Err(e) => {
                            agent_log!("port {FS_PORT}: {e}; dropped what was pending");
                            break;
                        }
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                agent_log!("read port {FS_PORT}: {e}");
                std::thread::sleep(RECONNECT_POLL);
            }
        }
    }
}

fn deliver(transport: Transport, message: Vec<u8>, sinks: &Sinks<'_>) {
    match (delivery(transport, &message), sinks.replies) {
        (Delivery::Reply, Some(mut dev_fuse)) => {
            // One write per message. The kernel refuses a reply to a request that was
            // interrupted meanwhile (ENOENT): no error of the share.
            if let Err(e) = dev_fuse.write(&message) {
                agent_debug!("FUSE reply to the kernel: {e}");
            }
        }
        (Delivery::Notification, _) => {
            let _ = sinks.notifications.send(message);
        }
        _ => agent_debug!("dropped a FUSE message of {} bytes", message.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
        let len = (OUT_HEADER_LEN + body.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&error.to_le_bytes());
        m.extend_from_slice(&unique.to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn drain(splitter: &mut MessageSplitter) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| splitter.next_message().unwrap()).collect()
    }

    #[test]
    fn messages_split_by_header_length_across_reads() {
        let reply = message(7, 0, b"attr-data");
        let notification = message(0, 3, &[1; 40]);
        let stream: Vec<u8> = [reply.clone(), notification.clone()].concat();
        let mut splitter = MessageSplitter::default();
        // Every cut point: one message, a split header, a split body.
        for cut in 0..stream.len() {
            splitter.push(&stream[..cut]);
            let mut got = drain(&mut splitter);
            splitter.push(&stream[cut..]);
            got.extend(drain(&mut splitter));
            assert_eq!(got, vec![reply.clone(), notification.clone()], "cut {cut}");
        }
    }

    #[test]
    fn a_header_only_message_is_whole() {
        let mut splitter = MessageSplitter::default();
        splitter.push(&message(9, -2, b""));
        assert_eq!(drain(&mut splitter), vec![message(9, -2, b"")]);
    }

    #[test]
    fn an_impossible_length_drops_what_is_pending() {
        let mut splitter = MessageSplitter::default();
        splitter.push(&[8, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(splitter.next_message(), Err(FramingError(8)));
        assert_eq!(splitter.next_message(), Ok(None));
        splitter.push(&message(1, 0, b"x"));
        assert_eq!(drain(&mut splitter), vec![message(1, 0, b"x")]);

        let mut huge = message(1, 0, b"");
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        splitter.push(&huge);
        assert!(splitter.next_message().is_err());
    }

    #[test]
    fn a_hang_up_forgets_a_partial_message() {
        let mut splitter = MessageSplitter::default();
        let m = message(4, 0, b"0123456789");
        splitter.push(&m[..20]);
        assert_eq!(splitter.next_message(), Ok(None));
        splitter.clear();
        splitter.push(&m);
        assert_eq!(drain(&mut splitter), vec![m]);
    }

    #[test]
    fn relay_sends_replies_to_dev_fuse_and_notifications_to_the_notifier() {
        assert_eq!(
            delivery(Transport::Relay, &message(42, 0, b"")),
            Delivery::Reply
        );
        assert_eq!(
            delivery(Transport::Relay, &message(0, 64, b"event")),
            Delivery::Notification
        );
    }

    #[test]
    fn virtiofs_sends_notifications_to_the_notifier_and_drops_replies() {
        assert_eq!(
            delivery(Transport::VirtioFs, &message(0, 2, &[0; 24])),
            Delivery::Notification
        );
        assert_eq!(
            delivery(Transport::VirtioFs, &message(42, 0, b"")),
            Delivery::Drop
        );
    }

    #[test]
    fn the_last_propagation_option_wins_and_shared_ones_are_not_applied_here() {
        let opts = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            propagation(&opts(&["rbind", "rprivate"])),
            Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC)
        );
        assert_eq!(
            propagation(&opts(&["rprivate", "unbindable"])),
            Some(MsFlags::MS_UNBINDABLE)
        );
        assert_eq!(propagation(&opts(&["rbind", "ro", "nosuid"])), None);
    }

    #[test]
    fn a_short_message_goes_nowhere() {
        assert_eq!(delivery(Transport::Relay, &[16, 0, 0, 0]), Delivery::Drop);
    }

    #[test]
    fn a_missing_file_target_is_made_empty_with_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etc/app/config.toml");
        make_target(&file, false).unwrap();
        assert!(fs::metadata(&file).unwrap().is_file());
        assert_eq!(fs::metadata(&file).unwrap().len(), 0);
        let data = dir.path().join("var/lib/data");
        make_target(&data, true).unwrap();
        assert!(fs::metadata(&data).unwrap().is_dir());
    }
}
