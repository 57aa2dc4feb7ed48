//! The FUSE request handler: the synthetic root, the inode and file-handle tables, and one
//! function per opcode, each confined to the shares it was given.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use lock_ext::LockExt;

use crate::abi::{self, Attr, EntryOut, InHeader, Malformed, Reader, Writer};
use crate::sys::{self, Errno, SysResult};
use crate::watch::Watcher;
use crate::{ShareError, ShareSpec};

/// Entry and attribute cache timeout given to the guest kernel, in seconds: host changes
/// made behind the guest's back show within this time even without a notification.
const CACHE_TIMEOUT_SECS: u64 = 1;
/// The synthetic root's handle (OPENDIR on nodeid 1); real handles start above it.
const ROOT_FH: u64 = 0;
/// Bound on the reply buffers a request can make the server allocate.
const MAX_XATTR_SIZE: usize = 64 * 1024;
const MAX_DIR_BUFFER: usize = 64 * 1024;

/// The identity of a node: which share it was reached through and the host inode. The share
/// is part of it so that the same host file reached through a read-only and a writable share
/// (or two shares) stays two nodes, each with its share's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct InodeKey {
    share: usize,
    dev: u64,
    ino: u64,
}

/// How many node descriptors may stay cached, process-wide (every server of the process
/// takes from the same budget unless a test gives it its own): a guest walking a large tree
/// must not make the host process run out of descriptors.
#[derive(Debug)]
pub(crate) struct FdBudget {
    limit: usize,
    used: AtomicUsize,
}

impl FdBudget {
    pub(crate) fn new(limit: usize) -> Arc<FdBudget> {
        Arc::new(FdBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// The budget of this process: half of its (raised) open-file soft limit, the other
    /// half left to open files, directory handles and everything else of the process.
    fn process() -> Arc<FdBudget> {
        static PROCESS: OnceLock<Arc<FdBudget>> = OnceLock::new();
        PROCESS
            .get_or_init(|| {
                let soft = match sys::raise_nofile_limit() {
                    Ok(soft) => soft,
                    Err(e) => {
                        log::debug!("share: cannot read RLIMIT_NOFILE: errno {e}");
                        1024
                    }
                };
                FdBudget::new(usize::try_from(soft / 2).unwrap_or(usize::MAX))
            })
            .clone()
    }

    fn take(self: &Arc<Self>) -> Option<BudgetSlot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.limit).then_some(used + 1)
            })
            .ok()
            .map(|_| BudgetSlot(self.clone()))
    }

    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// One cached node descriptor counted in a budget, given back when the node is dropped.
#[derive(Debug)]
struct BudgetSlot(Arc<FdBudget>);

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How an operation reaches a node's host inode.
#[derive(Debug)]
enum NodeAccess {
    /// An O_PATH|O_NOFOLLOW descriptor held for the node's life: the share roots, nodes
    /// while the budget allows, nodes on a filesystem that gives no file handles, and the
    /// first node of a filesystem mounted inside a share (the mount point).
    Kept {
        fd: Arc<OwnedFd>,
        _slot: Option<BudgetSlot>,
    },
    /// Reopened per operation by its file handle on `Inode::mount`.
    Reopened { handle: Vec<u8> },
}

#[derive(Debug)]
pub(crate) struct Inode {
    pub(crate) nodeid: u64,
    /// Every operation on the node goes through a descriptor of its inode (see [`Inode::fd`]),
    /// never through a host path.
    access: NodeAccess,
    /// A descriptor on the node's own filesystem (st_dev), from which its handle and those
    /// of its descendants on the same filesystem are reopened: the share root's directory,
    /// or the mount point's below which the node lies (see [`mount_anchor`]).
    mount: Arc<OwnedFd>,
    /// Whether open_by_handle_at works on `mount` (it needs CAP_DAC_READ_SEARCH and a
    /// filesystem that decodes handles); when not, every node below keeps its descriptor.
    reopenable: bool,
    /// The inode's file handle (type then bytes), None when its filesystem gives none.
    pub(crate) handle: Option<Vec<u8>>,
    pub(crate) key: InodeKey,
    /// S_IFMT bits of the host inode.
    pub(crate) kind: u32,
    pub(crate) read_only: bool,
    /// A share's own root: never dropped by FORGET.
    pinned: bool,
    lookups: AtomicU64,
}

/// A descriptor of a node's inode, valid while the guard lives: the node's cached one
/// borrowed, or one reopened for this operation and closed with the guard.
#[derive(Debug)]
pub(crate) enum NodeFd<'a> {
    Cached(&'a OwnedFd),
    Reopened(OwnedFd),
}

impl AsRawFd for NodeFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NodeFd::Cached(fd) => fd.as_raw_fd(),
            NodeFd::Reopened(fd) => fd.as_raw_fd(),
        }
    }
}

/// The anchor of the filesystem a directory inode (`fd`, O_PATH) is on: a descriptor of
/// it opened for reading (open_by_handle_at refuses an O_PATH one as its mount), and
/// whether handles made there reopen on it (one round trip tells). A non-directory has no
/// descendants, so its own descriptor is its anchor, never used.
fn mount_anchor(fd: &Arc<OwnedFd>, kind: u32, handle: Option<&[u8]>) -> (Arc<OwnedFd>, bool) {
    let Some(handle) = handle.filter(|_| kind == libc::S_IFDIR) else {
        return (fd.clone(), false);
    };
    let probe = sys::reopen(fd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY).and_then(|dir| {
        sys::open_by_handle(dir.as_raw_fd(), handle, libc::O_PATH)?;
        Ok(dir)
    });
    match probe {
        Ok(dir) => (Arc::new(dir), true),
        Err(e) => {
            log::debug!("share: file handles do not reopen here (errno {e}): descriptors kept");
            (fd.clone(), false)
        }
    }
}

impl Inode {
    /// A share's root: its descriptor is kept, and anchors the handles of the share.
    fn root(nodeid: u64, fd: OwnedFd, key: InodeKey, kind: u32, read_only: bool) -> Inode {
        let handle = sys::file_handle(fd.as_raw_fd()).ok();
        let fd = Arc::new(fd);
        let (mount, reopenable) = mount_anchor(&fd, kind, handle.as_deref());
        Inode {
            nodeid,
            reopenable,
            mount,
            access: NodeAccess::Kept { fd, _slot: None },
            handle,
            key,
            kind,
            read_only,
            pinned: true,
            lookups: AtomicU64::new(0),
        }
    }

    /// A node found by a confined lookup in `parent` (`fd` is what that lookup opened). The
    /// rule for its descriptor: a node on another filesystem than its parent (a mount
    /// point inside the share) keeps it and becomes the anchor of its own filesystem; a
    /// node on its parent's filesystem keeps it while the budget allows, else drops it and
    /// is reopened by handle on the parent's anchor; without a usable handle it keeps it.
    fn child(
        parent: &Inode,
        nodeid: u64,
        fd: OwnedFd,
        st: &libc::stat,
        budget: &Arc<FdBudget>,
    ) -> Inode {
        let handle = sys::file_handle(fd.as_raw_fd()).ok();
        let (access, mount, reopenable) = if st.st_dev != parent.key.dev {
            let fd = Arc::new(fd);
            let (mount, reopenable) =
                mount_anchor(&fd, st.st_mode & libc::S_IFMT, handle.as_deref());
            let access = NodeAccess::Kept { fd, _slot: None };
            (access, mount, reopenable)
        } else {
            let access = match (&handle, parent.reopenable) {
                (Some(handle), true) => match budget.take() {
                    Some(slot) => NodeAccess::Kept {
                        fd: Arc::new(fd),
                        _slot: Some(slot),
                    },
                    None => NodeAccess::Reopened {
                        handle: handle.clone(),
                    },
                },
                _ => NodeAccess::Kept {
                    fd: Arc::new(fd),
                    _slot: None,
                },
            };
            (access, parent.mount.clone(), parent.reopenable)
        };
        Inode {
            nodeid,
            access,
            mount,
            reopenable,
            handle,
            key: parent.child_key(st.st_dev, st.st_ino),
            kind: st.st_mode & libc::S_IFMT,
            read_only: parent.read_only,
            pinned: false,
            lookups: AtomicU64::new(1),
        }
    }

    /// A descriptor of the node's inode for one operation. A node reopened by handle
    /// whose inode was deleted on the host gives ESTALE.
    pub(crate) fn fd(&self) -> SysResult<NodeFd<'_>> {
        match &self.access {
            NodeAccess::Kept { fd, .. } => Ok(NodeFd::Cached(fd)),
            NodeAccess::Reopened { handle } => {
                sys::open_by_handle(self.mount.as_raw_fd(), handle, libc::O_PATH)
                    .map(NodeFd::Reopened)
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn has_cached_fd(&self) -> bool {
        matches!(self.access, NodeAccess::Kept { .. })
    }

    fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
    fn is_symlink(&self) -> bool {
        self.kind == libc::S_IFLNK
    }
    pub(crate) fn share(&self) -> usize {
        self.key.share
    }
    /// The key of a host inode reached through this node.
    pub(crate) fn child_key(&self, dev: u64, ino: u64) -> InodeKey {
        InodeKey {
            share: self.key.share,
            dev,
            ino,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct InodeTable {
    pub(crate) nodes: HashMap<u64, Arc<Inode>>,
    pub(crate) by_key: HashMap<InodeKey, u64>,
    next_id: u64,
}

#[derive(Debug)]
struct Handle {
    nodeid: u64,
    fd: OwnedFd,
    /// Serialises seek+getdents on a directory handle.
    dir_cursor: Mutex<()>,
}

/// A FUSE passthrough server over host files and directories (see the crate doc).
#[derive(Debug)]
pub struct Server {
    shares: Vec<ShareSpec>,
    /// The pinned root node of each share, by share index.
    share_roots: Vec<u64>,
    pub(crate) inodes: Arc<Mutex<InodeTable>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    pub(crate) watcher: OnceLock<Arc<Watcher>>,
    /// Bounds the node descriptors kept open (see [`FdBudget`]).
    fd_budget: Arc<FdBudget>,
    /// Told when the guest changes the names in one share ([`Server::on_names_changed`]).
    names_changed: OnceLock<NamesListener>,
}

/// What [`Server::on_names_changed`] calls.
pub type NamesChanged = Box<dyn Fn() + Send + Sync>;

struct NamesListener {
    share: usize,
    call: NamesChanged,
}

impl std::fmt::Debug for NamesListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamesListener")
            .field("share", &self.share)
            .finish_non_exhaustive()
    }
}

type OpResult = Result<Vec<u8>, Errno>;

/// The requests that add, remove or rename a directory entry.
fn changes_names(opcode: u32) -> bool {
    matches!(
        opcode,
        abi::CREATE
            | abi::MKNOD
            | abi::MKDIR
            | abi::SYMLINK
            | abi::LINK
            | abi::UNLINK
            | abi::RMDIR
            | abi::RENAME
            | abi::RENAME2
    )
}

fn malformed(_: Malformed) -> Errno {
    libc::EINVAL
}

/// One name relative to a directory: never empty, ".", "..", or containing a '/'.
fn checked_name(name: &[u8]) -> Result<CString, Errno> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    sys::cstring(name)
}

fn attr_from_stat(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: u32::try_from(st.st_rdev).unwrap_or(0),
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
    }
}

fn entry_bytes(entry: &EntryOut) -> Vec<u8> {
    let mut w = Writer::default();
    entry.write(&mut w);
    w.bytes
}

impl Server {
    /// Opens every source now (O_PATH), so a missing source fails here, naming it.
    pub fn new(shares: Vec<ShareSpec>) -> Result<Server, ShareError> {
        // Raises the process's open-file soft limit (once) before sizing the budget on it.
        Self::with_fd_budget(shares, FdBudget::process())
    }

    /// A server whose nodes keep at most `budget`'s descriptors (tests give a small one).
    pub(crate) fn with_fd_budget(
        shares: Vec<ShareSpec>,
        fd_budget: Arc<FdBudget>,
    ) -> Result<Server, ShareError> {
        let mut table = InodeTable {
            next_id: abi::ROOT_ID + 1,
            ..InodeTable::default()
        };
        let mut share_roots = Vec::with_capacity(shares.len());
        for (index, spec) in shares.iter().enumerate() {
            if let Some(with) = spec.joined_with {
                if with >= index || shares[with].read_only != spec.read_only {
                    return Err(ShareError::BadJoin { index, with });
                }
            }
            let path = sys::cstring(spec.source.as_os_str().as_encoded_bytes()).map_err(|_| {
                ShareError::Open {
                    path: spec.source.clone(),
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                }
            })?;
            let open_err = |e: Errno| ShareError::Open {
                path: spec.source.clone(),
                source: std::io::Error::from_raw_os_error(e),
            };
            // The source itself may be reached through symlinks (it is the user's path on
            // the host); what lies inside it never is.
            let fd = sys::openat(libc::AT_FDCWD, &path, libc::O_PATH, 0).map_err(open_err)?;
            let st = sys::fstat(fd.as_raw_fd()).map_err(open_err)?;
            let kind = st.st_mode & libc::S_IFMT;
            if kind != libc::S_IFDIR && kind != libc::S_IFREG {
                return Err(ShareError::NotFileOrDirectory {
                    path: spec.source.clone(),
                });
            }
            let nodeid = table.next_id;
            table.next_id += 1;
            let key = InodeKey {
                share: spec.joined_with.unwrap_or(index),
                dev: st.st_dev,
                ino: st.st_ino,
            };
            table.by_key.insert(key, nodeid);
            table.nodes.insert(
                nodeid,
                Arc::new(Inode::root(nodeid, fd, key, kind, spec.read_only)),
            );
            share_roots.push(nodeid);
        }
        Ok(Server {
            shares,
            share_roots,
            inodes: Arc::new(Mutex::new(table)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(ROOT_FH + 1),
            watcher: OnceLock::new(),
            fd_budget,
            names_changed: OnceLock::new(),
        })
    }

    pub(crate) fn share_specs(&self) -> &[ShareSpec] {
        &self.shares
    }

    pub(crate) fn inodes_shared(&self) -> Arc<Mutex<InodeTable>> {
        self.inodes.clone()
    }

    pub(crate) fn share_root_ids(&self) -> &[u64] {
        &self.share_roots
    }

    /// One FUSE request (fuse_in_header + arguments [+ write data]) -> the reply
    /// (fuse_out_header + data), or None when the opcode has no reply (FORGET, BATCH_FORGET,
    /// INTERRUPT) or the request is too short to carry a header to answer.
    pub fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
        let mut r = Reader::new(request);
        let Ok(header) = InHeader::parse(&mut r) else {
            log::warn!(
                "share: dropped a FUSE request of {} bytes, shorter than its header",
                request.len()
            );
            return None;
        };
        if header.len as usize != request.len() {
            return Some(abi::message(header.unique, -libc::EINVAL, &[]));
        }
        let result = match header.opcode {
            abi::FORGET => {
                if let Ok(n) = r.u64() {
                    self.forget(header.nodeid, n);
                }
                return None;
            }
            abi::BATCH_FORGET => {
                self.batch_forget(&mut r);
                return None;
            }
            abi::INTERRUPT => return None,
            abi::INIT => self.init(&mut r),
            abi::DESTROY => self.destroy(),
            abi::LOOKUP => self.lookup_op(&header, &mut r),
            abi::GETATTR => self.getattr(&header, &mut r),
            abi::SETATTR => self.setattr(&header, &mut r),
            abi::READLINK => self.readlink(&header),
            abi::SYMLINK => self.symlink(&header, &mut r),
            abi::MKNOD => self.mknod(&header, &mut r),
            abi::MKDIR => self.mkdir(&header, &mut r),
            abi::UNLINK => self.unlink(&header, &mut r, 0),
            abi::RMDIR => self.unlink(&header, &mut r, libc::AT_REMOVEDIR),
            abi::RENAME => self.rename(&header, &mut r, false),
            abi::RENAME2 => self.rename(&header, &mut r, true),
            abi::LINK => self.link(&header, &mut r),
            abi::OPEN => self.open(&header, &mut r),
            abi::CREATE => self.create(&header, &mut r),
            abi::READ => self.read(&header, &mut r),
            abi::WRITE => self.write(&header, &mut r),
            abi::FLUSH => self.flush(&header, &mut r),
            abi::RELEASE | abi::RELEASEDIR => self.release(&header, &mut r),
            abi::FSYNC | abi::FSYNCDIR => self.fsync(&header, &mut r),
            abi::OPENDIR => self.opendir(&header, &mut r),
            abi::READDIR => self.readdir(&header, &mut r, false),
            abi::READDIRPLUS => self.readdir(&header, &mut r, true),
            abi::STATFS => self.statfs(&header),
            abi::ACCESS => self.access(&header, &mut r),
            abi::SETXATTR => self.setxattr(&header, &mut r),
            abi::GETXATTR => self.getxattr(&header, &mut r),
            abi::LISTXATTR => self.listxattr(&header, &mut r),
            abi::REMOVEXATTR => self.removexattr(&header, &mut r),
            abi::GETLK => self.getlk(&header, &mut r),
            abi::SETLK => self.setlk(&header, &mut r, false),
            abi::SETLKW => self.setlk(&header, &mut r, true),
            abi::FALLOCATE => self.fallocate(&header, &mut r),
            abi::LSEEK => self.lseek(&header, &mut r),
            abi::COPY_FILE_RANGE => self.copy_file_range(&header, &mut r),
            _ => Err(libc::ENOSYS),
        };
        if result.is_ok() && changes_names(header.opcode) {
            self.names_changed_in(header.nodeid);
        }
        Some(match result {
            Ok(body) => abi::message(header.unique, 0, &body),
            Err(errno) => abi::message(header.unique, -errno, &[]),
        })
    }

    /// Calls `listener` after each request of the guest that created, removed or renamed an
    /// entry of share `share` (or of a share joined with it), on the thread that served it.
    /// A host overlay whose upper directory the share is needs to hear of those: it does not
    /// look at its layers again by itself. One listener per server.
    pub fn on_names_changed(&self, share: usize, listener: NamesChanged) -> Result<(), ShareError> {
        if share >= self.shares.len() {
            return Err(ShareError::NoSuchShare(share));
        }
        self.names_changed
            .set(NamesListener {
                share,
                call: listener,
            })
            .map_err(|_| ShareError::AlreadyListened)
    }

    fn names_changed_in(&self, nodeid: u64) {
        let Some(listener) = self.names_changed.get() else {
            return;
        };
        let share = listener.share;
        let key_share = self.shares[share].joined_with.unwrap_or(share);
        if self
            .any_node(nodeid)
            .is_ok_and(|node| node.share() == key_share)
        {
            (listener.call)();
        }
    }

    // ---- node and handle tables ----

    /// A node the guest holds: one it was given by a lookup and has not forgotten. (A
    /// share's root exists from the start but counts only once the guest looked it up.)
    pub(crate) fn node(&self, nodeid: u64) -> SysResult<Arc<Inode>> {
        let node = self.any_node(nodeid)?;
        if node.pinned && node.lookups.load(Ordering::Relaxed) == 0 {
            return Err(libc::EBADF);
        }
        Ok(node)
    }

    pub(crate) fn any_node(&self, nodeid: u64) -> SysResult<Arc<Inode>> {
        self.inodes
            .lock_unpoisoned()
            .nodes
            .get(&nodeid)
            .cloned()
            .ok_or(libc::EBADF)
    }

    /// A node that may be modified: a real node of a writable share (the root is read-only).
    fn writable_node(&self, nodeid: u64) -> SysResult<Arc<Inode>> {
        if nodeid == abi::ROOT_ID {
            return Err(libc::EROFS);
        }
        let node = self.node(nodeid)?;
        if node.read_only {
            return Err(libc::EROFS);
        }
        Ok(node)
    }

    fn writable_dir(&self, nodeid: u64) -> SysResult<Arc<Inode>> {
        let node = self.writable_node(nodeid)?;
        if !node.is_dir() {
            return Err(libc::ENOTDIR);
        }
        Ok(node)
    }

    fn handle_of(&self, nodeid: u64, fh: u64) -> SysResult<Arc<Handle>> {
        let handle = self
            .handles
            .lock_unpoisoned()
            .get(&fh)
            .cloned()
            .ok_or(libc::EBADF)?;
        if handle.nodeid != nodeid {
            return Err(libc::EBADF);
        }
        Ok(handle)
    }

    fn add_handle(&self, nodeid: u64, fd: OwnedFd) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock_unpoisoned().insert(
            fh,
            Arc::new(Handle {
                nodeid,
                fd,
                dir_cursor: Mutex::new(()),
            }),
        );
        fh
    }

    /// Looks `name` up in `parent` on the host (one component, no symlink followed) and
    /// counts one guest lookup of the resulting node.
    fn lookup_child(&self, parent: &Inode, name: &CStr) -> SysResult<EntryOut> {
        if !parent.is_dir() {
            return Err(libc::ENOTDIR);
        }
        let fd = sys::openat(
            parent.fd()?.as_raw_fd(),
            name,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let key = InodeKey {
            share: parent.share(),
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let (node, new) = {
            let mut table = self.inodes.lock_unpoisoned();
            match table.by_key.get(&key).and_then(|id| table.nodes.get(id)) {
                Some(node) => {
                    node.lookups.fetch_add(1, Ordering::Relaxed);
                    (node.clone(), false)
                }
                None => {
                    let nodeid = table.next_id;
                    table.next_id += 1;
                    let node = Arc::new(Inode::child(parent, nodeid, fd, &st, &self.fd_budget));
                    table.by_key.insert(key, nodeid);
                    table.nodes.insert(nodeid, node.clone());
                    (node, true)
                }
            }
        };
        if new && node.is_dir() {
            if let Some(watcher) = self.watcher.get() {
                watcher.watch_node(&node);
            }
        }
        Ok(EntryOut {
            nodeid: node.nodeid,
            generation: 0,
            valid_secs: CACHE_TIMEOUT_SECS,
            attr: attr_from_stat(&st),
        })
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> SysResult<EntryOut> {
        if parent == abi::ROOT_ID {
            return self.lookup_share(name);
        }
        let parent = self.node(parent)?;
        let name = checked_name(name)?;
        self.lookup_child(&parent, &name)
    }

    /// A name in the synthetic root: the decimal index of a share.
    fn lookup_share(&self, name: &[u8]) -> SysResult<EntryOut> {
        let index: usize = std::str::from_utf8(name)
            .ok()
            .filter(|s| !s.starts_with('+') && (s.len() == 1 || !s.starts_with('0')))
            .and_then(|s| s.parse().ok())
            .ok_or(libc::ENOENT)?;
        let nodeid = *self.share_roots.get(index).ok_or(libc::ENOENT)?;
        let node = self.any_node(nodeid)?;
        let st = sys::fstat(node.fd()?.as_raw_fd())?;
        node.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(EntryOut {
            nodeid,
            generation: 0,
            valid_secs: CACHE_TIMEOUT_SECS,
            attr: attr_from_stat(&st),
        })
    }

    fn forget(&self, nodeid: u64, n: u64) {
        let mut table = self.inodes.lock_unpoisoned();
        let Some(node) = table.nodes.get(&nodeid).cloned() else {
            return;
        };
        let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
        node.lookups.store(left, Ordering::Relaxed);
        if left == 0 && !node.pinned {
            table.nodes.remove(&nodeid);
            table.by_key.remove(&node.key);
            if let Some(watcher) = self.watcher.get() {
                watcher.unwatch_node(&node);
            }
        }
    }

    fn batch_forget(&self, r: &mut Reader) {
        let Ok(count) = r.u32() else { return };
        if r.u32().is_err() {
            return;
        }
        for _ in 0..count {
            let (Ok(nodeid), Ok(n)) = (r.u64(), r.u64()) else {
                return;
            };
            self.forget(nodeid, n);
        }
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: abi::ROOT_ID,
            mode: libc::S_IFDIR | 0o555,
            nlink: 2,
            blksize: 4096,
            ..Attr::default()
        }
    }

    fn attr_of(&self, nodeid: u64) -> SysResult<Attr> {
        if nodeid == abi::ROOT_ID {
            return Ok(self.root_attr());
        }
        let node = self.node(nodeid)?;
        let st = sys::fstat(node.fd()?.as_raw_fd())?;
        Ok(attr_from_stat(&st))
    }

    fn attr_reply(&self, nodeid: u64) -> OpResult {
        let attr = self.attr_of(nodeid)?;
        let mut w = Writer::default();
        abi::write_attr_out(&mut w, CACHE_TIMEOUT_SECS, &attr);
        Ok(w.bytes)
    }

    /// After the server (root) created `node` for the guest: the request's owner, and the
    /// exact mode the guest asked for (the host process's umask must not narrow it).
    fn adopt_new_node(
        &self,
        parent: &Inode,
        node: &Inode,
        header: &InHeader,
        mode: u32,
    ) -> SysResult<()> {
        let parent_st = sys::fstat(parent.fd()?.as_raw_fd())?;
        // A setgid directory gives its group to what is created in it, as on the host.
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            u32::MAX
        } else {
            header.gid
        };
        sys::fchown(node.fd()?.as_raw_fd(), header.uid, gid)?;
        if node.is_symlink() {
            return Ok(());
        }
        let mut wanted = mode & 0o7777;
        if node.is_dir() && parent_st.st_mode & libc::S_ISGID != 0 {
            wanted |= libc::S_ISGID;
        }
        let st = sys::fstat(node.fd()?.as_raw_fd())?;
        if st.st_mode & 0o7777 != wanted {
            sys::chmod_fd(node.fd()?.as_raw_fd(), wanted)?;
        }
        Ok(())
    }

    /// Creates a node with `make`, looks it up, and gives it to the request's owner.
    fn make_node(
        &self,
        header: &InHeader,
        name: &[u8],
        mode: u32,
        make: impl FnOnce(RawFd, &CStr) -> SysResult<()>,
    ) -> OpResult {
        let parent = self.writable_dir(header.nodeid)?;
        let name = checked_name(name)?;
        make(parent.fd()?.as_raw_fd(), &name)?;
        let entry = self.lookup_child(&parent, &name)?;
        let node = self.node(entry.nodeid)?;
        if let Err(e) = self.adopt_new_node(&parent, &node, header, mode) {
            self.forget(entry.nodeid, 1);
            return Err(e);
        }
        let st = sys::fstat(node.fd()?.as_raw_fd())?;
        Ok(entry_bytes(&EntryOut {
            attr: attr_from_stat(&st),
            ..entry
        }))
    }

    // ---- operations ----

    fn init(&self, r: &mut Reader) -> OpResult {
        let init = abi::InitIn::parse(r).map_err(malformed)?;
        let mut w = Writer::default();
        if init.major < abi::KERNEL_VERSION {
            return Err(libc::EPROTO);
        }
        if init.major > abi::KERNEL_VERSION {
            // The kernel retries INIT with the major version the server answers.
            w.u32(abi::KERNEL_VERSION).u32(abi::KERNEL_MINOR_VERSION);
            return Ok(w.bytes);
        }
        let wanted = abi::ASYNC_READ
            | abi::POSIX_LOCKS
            | abi::FLOCK_LOCKS
            | abi::BIG_WRITES
            | abi::AUTO_INVAL_DATA
            | abi::DO_READDIRPLUS
            | abi::READDIRPLUS_AUTO
            | abi::PARALLEL_DIROPS
            | abi::MAX_PAGES;
        abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: init.minor.min(abi::KERNEL_MINOR_VERSION),
            max_readahead: init.max_readahead,
            flags: init.flags & wanted,
            max_background: 64,
            congestion_threshold: 48,
            max_write: abi::MAX_WRITE,
            time_gran: 1,
            max_pages: abi::MAX_PAGES_COUNT,
        }
        .write(&mut w);
        Ok(w.bytes)
    }

    fn destroy(&self) -> OpResult {
        self.handles.lock_unpoisoned().clear();
        let mut table = self.inodes.lock_unpoisoned();
        table.nodes.retain(|_, node| node.pinned);
        let kept: std::collections::HashSet<u64> = table.nodes.keys().copied().collect();
        table.by_key.retain(|_, id| kept.contains(id));
        for node in table.nodes.values() {
            node.lookups.store(0, Ordering::Relaxed);
        }
        Ok(Vec::new())
    }

    fn lookup_op(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let name = r.cstr().map_err(malformed)?;
        let entry = self.lookup(h.nodeid, name)?;
        Ok(entry_bytes(&entry))
    }

    fn getattr(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let flags = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?;
        let fh = r.u64().map_err(malformed)?;
        if flags & abi::GETATTR_FH != 0 && h.nodeid != abi::ROOT_ID {
            // The open file answers: a node reopened by handle cannot be once its inode
            // was unlinked on the host, while the guest may still fstat its open file.
            let node = self.node(h.nodeid)?;
            let handle = self.handle_of(node.nodeid, fh)?;
            let st = sys::fstat(handle.fd.as_raw_fd())?;
            let mut w = Writer::default();
            abi::write_attr_out(&mut w, CACHE_TIMEOUT_SECS, &attr_from_stat(&st));
            return Ok(w.bytes);
        }
        self.attr_reply(h.nodeid)
    }

    fn setattr(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let a = abi::SetattrIn::parse(r).map_err(malformed)?;
        let node = self.writable_node(h.nodeid)?;
        let node_fd = node.fd()?;
        let fd = node_fd.as_raw_fd();
        if a.valid & abi::FATTR_MODE != 0 {
            if node.is_symlink() {
                return Err(libc::EOPNOTSUPP);
            }
            sys::chmod_fd(fd, a.mode & 0o7777)?;
        }
        if a.valid & (abi::FATTR_UID | abi::FATTR_GID) != 0 {
            let uid = if a.valid & abi::FATTR_UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & abi::FATTR_GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            sys::fchown(fd, uid, gid)?;
        }
        if a.valid & abi::FATTR_SIZE != 0 {
            if node.kind != libc::S_IFREG {
                return Err(if node.is_dir() {
                    libc::EISDIR
                } else {
                    libc::EINVAL
                });
            }
            let handle = if a.valid & abi::FATTR_FH != 0 {
                self.handle_of(h.nodeid, a.fh).ok()
            } else {
                None
            };
            match handle {
                Some(handle) => sys::ftruncate(handle.fd.as_raw_fd(), a.size)?,
                None => {
                    let file = sys::reopen(fd, libc::O_WRONLY)?;
                    sys::ftruncate(file.as_raw_fd(), a.size)?;
                }
            }
        }
        if a.valid & (abi::FATTR_ATIME | abi::FATTR_MTIME) != 0 {
            let time = |set: u32, now: u32, secs: u64, nsecs: u32| {
                if a.valid & set == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                } else if a.valid & now != 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: secs as libc::time_t,
                        tv_nsec: i64::from(nsecs.min(999_999_999)),
                    }
                }
            };
            let times = [
                time(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, a.atime, a.atimensec),
                time(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, a.mtime, a.mtimensec),
            ];
            sys::utimens(fd, &times)?;
        }
        self.attr_reply(h.nodeid)
    }

    fn readlink(&self, h: &InHeader) -> OpResult {
        let node = self.node(h.nodeid)?;
        if !node.is_symlink() {
            return Err(libc::EINVAL);
        }
        sys::readlink(node.fd()?.as_raw_fd())
    }

    fn symlink(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let name = r.cstr().map_err(malformed)?;
        let target = r.cstr().map_err(malformed)?;
        if target.is_empty() {
            return Err(libc::ENOENT);
        }
        let target = sys::cstring(target)?;
        self.make_node(h, name, 0o777, |dir, name| {
            sys::symlinkat(&target, dir, name)
        })
    }

    fn mknod(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let mode = r.u32().map_err(malformed)?;
        let rdev = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?; // umask: already applied by the guest kernel
        r.u32().map_err(malformed)?;
        let name = r.cstr().map_err(malformed)?;
        self.make_node(h, name, mode, |dir, name| {
            sys::mknodat(dir, name, mode, u64::from(rdev))
        })
    }

    fn mkdir(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let mode = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?; // umask
        let name = r.cstr().map_err(malformed)?;
        self.make_node(h, name, mode, |dir, name| {
            sys::mkdirat(dir, name, mode & 0o7777)
        })
    }

    fn unlink(&self, h: &InHeader, r: &mut Reader, flags: i32) -> OpResult {
        let name = r.cstr().map_err(malformed)?;
        let parent = self.writable_dir(h.nodeid)?;
        let name = checked_name(name)?;
        sys::unlinkat(parent.fd()?.as_raw_fd(), &name, flags)?;
        Ok(Vec::new())
    }

    fn rename(&self, h: &InHeader, r: &mut Reader, with_flags: bool) -> OpResult {
        let newdir = r.u64().map_err(malformed)?;
        let flags = if with_flags {
            let flags = r.u32().map_err(malformed)?;
            r.u32().map_err(malformed)?;
            flags
        } else {
            0
        };
        let old = r.cstr().map_err(malformed)?;
        let new = r.cstr().map_err(malformed)?;
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT;
        if flags & !known != 0 {
            return Err(libc::EINVAL);
        }
        let old_dir = self.writable_dir(h.nodeid)?;
        let new_dir = self.writable_dir(newdir)?;
        if old_dir.share() != new_dir.share() {
            return Err(libc::EXDEV);
        }
        let old = checked_name(old)?;
        let new = checked_name(new)?;
        sys::renameat2(
            old_dir.fd()?.as_raw_fd(),
            &old,
            new_dir.fd()?.as_raw_fd(),
            &new,
            flags,
        )?;
        Ok(Vec::new())
    }

    fn link(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let old = r.u64().map_err(malformed)?;
        let name = r.cstr().map_err(malformed)?;
        let node = self.writable_node(old)?;
        let parent = self.writable_dir(h.nodeid)?;
        if node.share() != parent.share() {
            return Err(libc::EXDEV);
        }
        if node.is_dir() {
            return Err(libc::EPERM);
        }
        let name = checked_name(name)?;
        sys::link_fd(node.fd()?.as_raw_fd(), parent.fd()?.as_raw_fd(), &name)?;
        let entry = self.lookup_child(&parent, &name)?;
        Ok(entry_bytes(&entry))
    }

    fn open_flags_allowed(node: &Inode, flags: i32) -> SysResult<()> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if node.read_only && writes {
            return Err(libc::EROFS);
        }
        Ok(())
    }

    /// Host flags for reopening a node for IO: never creating, never taking a terminal.
    fn io_flags(flags: u32) -> i32 {
        (flags as i32) & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW)
    }

    fn open_reply(fh: u64) -> Vec<u8> {
        // open_flags 0: no FOPEN_KEEP_CACHE, so the guest drops its page cache at every
        // open, as the host may have changed the file.
        let mut w = Writer::default();
        w.u64(fh).u32(0).u32(0);
        w.bytes
    }

    fn open(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let flags = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?; // open_flags
        if h.nodeid == abi::ROOT_ID {
            return Err(libc::EISDIR);
        }
        let node = self.node(h.nodeid)?;
        // Only regular files are opened on the host: the guest kernel opens devices, FIFOs
        // and sockets itself, and a device node made in a share must never be opened by
        // the host's root.
        match node.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(libc::EISDIR),
            libc::S_IFLNK => return Err(libc::ELOOP),
            _ => return Err(libc::EACCES),
        }
        let flags = Self::io_flags(flags);
        Self::open_flags_allowed(&node, flags)?;
        let fd = sys::reopen(node.fd()?.as_raw_fd(), flags)?;
        Ok(Self::open_reply(self.add_handle(h.nodeid, fd)))
    }

    fn create(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let flags = r.u32().map_err(malformed)?;
        let mode = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?; // umask
        r.u32().map_err(malformed)?; // open_flags
        let name = r.cstr().map_err(malformed)?;
        let parent = self.writable_dir(h.nodeid)?;
        let name = checked_name(name)?;
        let guest_flags = Self::io_flags(flags);
        let base = guest_flags | libc::O_NOFOLLOW;
        let dir_fd = parent.fd()?;
        let dir = dir_fd.as_raw_fd();
        // Exclusive first, to know whether this request made the file (and so owns it).
        let (fd, created) = match sys::openat(
            dir,
            &name,
            base | libc::O_CREAT | libc::O_EXCL,
            mode & 0o7777,
        ) {
            Ok(fd) => (fd, true),
            Err(libc::EEXIST) if flags as i32 & libc::O_EXCL == 0 => {
                (sys::openat(dir, &name, base, 0)?, false)
            }
            Err(e) => return Err(e),
        };
        let st = sys::fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(libc::EACCES);
        }
        let entry = self.lookup_child(&parent, &name)?;
        let node = self.node(entry.nodeid)?;
        if node.key.ino != st.st_ino || node.key.dev != st.st_dev {
            // Replaced on the host between the open and the lookup.
            self.forget(entry.nodeid, 1);
            return Err(libc::EAGAIN);
        }
        if created {
            if let Err(e) = self.adopt_new_node(&parent, &node, h, mode) {
                self.forget(entry.nodeid, 1);
                return Err(e);
            }
        }
        let st = sys::fstat(node.fd()?.as_raw_fd())?;
        let fh = self.add_handle(entry.nodeid, fd);
        let mut body = entry_bytes(&EntryOut {
            attr: attr_from_stat(&st),
            ..entry
        });
        body.extend_from_slice(&Self::open_reply(fh));
        Ok(body)
    }

    fn read(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        let offset = r.u64().map_err(malformed)?;
        let size = r.u32().map_err(malformed)?;
        r.take(20).map_err(malformed)?; // read_flags, lock_owner, flags, padding
        let handle = self.handle_of(h.nodeid, fh)?;
        let mut buf = vec![0u8; size.min(abi::MAX_WRITE) as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = sys::pread(
                handle.fd.as_raw_fd(),
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn write(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        let offset = r.u64().map_err(malformed)?;
        let size = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?; // write_flags
        r.u64().map_err(malformed)?; // lock_owner
        r.u32().map_err(malformed)?; // flags
        r.u32().map_err(malformed)?;
        let data = r.take(size as usize).map_err(malformed)?;
        let node = self.writable_node(h.nodeid)?;
        let handle = self.handle_of(node.nodeid, fh)?;
        let n = sys::pwrite(handle.fd.as_raw_fd(), data, offset)?;
        let mut w = Writer::default();
        w.u32(u32::try_from(n).unwrap_or(0)).u32(0);
        Ok(w.bytes)
    }

    fn flush(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        r.take(16).map_err(malformed)?; // unused, padding, lock_owner
                                        // Data is written through at WRITE; the locks are the handle's (OFD), released at
                                        // RELEASE. Nothing is left to flush.
        self.handle_of(h.nodeid, fh)?;
        Ok(Vec::new())
    }

    fn release(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        r.take(16).map_err(malformed)?; // flags, release_flags, lock_owner
        if fh == ROOT_FH && h.nodeid == abi::ROOT_ID {
            return Ok(Vec::new());
        }
        let mut handles = self.handles.lock_unpoisoned();
        match handles.get(&fh) {
            Some(handle) if handle.nodeid == h.nodeid => {
                handles.remove(&fh);
                Ok(Vec::new())
            }
            _ => Err(libc::EBADF),
        }
    }

    fn fsync(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        let flags = r.u32().map_err(malformed)?;
        r.u32().map_err(malformed)?;
        if h.nodeid == abi::ROOT_ID {
            return Ok(Vec::new());
        }
        let handle = self.handle_of(h.nodeid, fh)?;
        sys::fsync(handle.fd.as_raw_fd(), flags & abi::FSYNC_FDATASYNC != 0)?;
        Ok(Vec::new())
    }

    fn opendir(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        r.take(8).map_err(malformed)?; // fuse_open_in: a directory is opened read-only
        if h.nodeid == abi::ROOT_ID {
            return Ok(Self::open_reply(ROOT_FH));
        }
        let node = self.node(h.nodeid)?;
        if !node.is_dir() {
            return Err(libc::ENOTDIR);
        }
        let fd = sys::reopen(node.fd()?.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(Self::open_reply(self.add_handle(h.nodeid, fd)))
    }

    fn readdir(&self, h: &InHeader, r: &mut Reader, plus: bool) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        let offset = r.u64().map_err(malformed)?;
        let size = (r.u32().map_err(malformed)? as usize).min(MAX_DIR_BUFFER);
        r.take(20).map_err(malformed)?; // fuse_read_in's remaining fields
        let mut out = Writer::default();
        if h.nodeid == abi::ROOT_ID {
            self.readdir_root(offset, size, plus, &mut out);
            return Ok(out.bytes);
        }
        let handle = self.handle_of(h.nodeid, fh)?;
        let parent = self.node(h.nodeid)?;
        let _cursor = handle.dir_cursor.lock_unpoisoned();
        let fd = handle.fd.as_raw_fd();
        sys::lseek(fd, offset, libc::SEEK_SET)?;
        let mut buf = vec![0u8; size.max(512)];
        let n = sys::getdents(fd, &mut buf)?;
        let mut records = Reader::new(&buf[..n]);
        while let Ok(ino) = records.u64() {
            let (Ok(next), Ok(reclen), Ok(typ)) = (records.u64(), records.u16(), records.take(1))
            else {
                break;
            };
            let Ok(rest) = records.take((reclen as usize).saturating_sub(19)) else {
                break;
            };
            let name_len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let name = &rest[..name_len];
            let entry = DirEntry {
                ino,
                next,
                typ: u32::from(typ[0]),
                name,
            };
            if !entry.fits(out.bytes.len(), size, plus) {
                break;
            }
            let entry_out = if plus && name != b"." && name != b".." {
                // A name removed since getdents is listed without attributes.
                checked_name(name)
                    .and_then(|n| self.lookup_child(&parent, &n))
                    .ok()
            } else {
                None
            };
            entry.write(&mut out, plus, entry_out.as_ref());
        }
        Ok(out.bytes)
    }

    fn readdir_root(&self, offset: u64, size: usize, plus: bool, out: &mut Writer) {
        let mut names: Vec<(Vec<u8>, u32, Option<u64>)> = vec![
            (b".".to_vec(), libc::DT_DIR.into(), None),
            (b"..".to_vec(), libc::DT_DIR.into(), None),
        ];
        for (index, spec) in self.shares.iter().enumerate() {
            let typ = if spec.source.is_dir() {
                libc::DT_DIR
            } else {
                libc::DT_REG
            };
            names.push((
                index.to_string().into_bytes(),
                typ.into(),
                Some(index as u64),
            ));
        }
        for (i, (name, typ, _)) in names.iter().enumerate().skip(offset as usize) {
            let entry = DirEntry {
                ino: abi::ROOT_ID + i as u64,
                next: i as u64 + 1,
                typ: *typ,
                name,
            };
            if !entry.fits(out.bytes.len(), size, plus) {
                break;
            }
            let entry_out = if plus && i >= 2 {
                self.lookup_share(name).ok()
            } else {
                None
            };
            entry.write(out, plus, entry_out.as_ref());
        }
    }

    fn statfs(&self, h: &InHeader) -> OpResult {
        let fd = if h.nodeid == abi::ROOT_ID {
            match self.share_roots.first() {
                Some(id) => Some(self.any_node(*id)?),
                None => None,
            }
        } else {
            Some(self.node(h.nodeid)?)
        };
        let mut w = Writer::default();
        match fd {
            Some(node) => {
                let st = sys::fstatfs(node.fd()?.as_raw_fd())?;
                w.u64(st.f_blocks)
                    .u64(st.f_bfree)
                    .u64(st.f_bavail)
                    .u64(st.f_files)
                    .u64(st.f_ffree)
                    .u32(st.f_bsize as u32)
                    .u32(st.f_namemax as u32)
                    .u32(st.f_frsize as u32)
                    .u32(0);
            }
            None => {
                w.raw(&[0u8; 40]).u32(4096).u32(255).u32(4096).u32(0);
            }
        }
        for _ in 0..6 {
            w.u32(0);
        }
        Ok(w.bytes)
    }

    fn access(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let mask = r.u32().map_err(malformed)? as i32;
        r.u32().map_err(malformed)?;
        if h.nodeid == abi::ROOT_ID {
            return if mask & libc::W_OK != 0 {
                Err(libc::EROFS)
            } else {
                Ok(Vec::new())
            };
        }
        let node = self.node(h.nodeid)?;
        if node.read_only && mask & libc::W_OK != 0 {
            return Err(libc::EROFS);
        }
        // Permission bits are the guest kernel's to check (default_permissions).
        Ok(Vec::new())
    }

    fn xattr_node(&self, nodeid: u64, modify: bool) -> SysResult<Arc<Inode>> {
        let node = if modify {
            self.writable_node(nodeid)?
        } else if nodeid == abi::ROOT_ID {
            return Err(libc::ENODATA);
        } else {
            self.node(nodeid)?
        };
        // Extended attributes go through /proc/self/fd, which would follow a symlink.
        if node.is_symlink() {
            return Err(libc::EOPNOTSUPP);
        }
        Ok(node)
    }

    fn setxattr(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let size = r.u32().map_err(malformed)? as usize;
        let flags = r.u32().map_err(malformed)? as i32;
        let name = r.cstr().map_err(malformed)?;
        let value = r.take(size).map_err(malformed)?;
        let node = self.xattr_node(h.nodeid, true)?;
        let name = sys::cstring(name)?;
        sys::setxattr(node.fd()?.as_raw_fd(), &name, value, flags)?;
        Ok(Vec::new())
    }

    fn sized_reply(size: usize, fill: impl FnOnce(&mut [u8]) -> SysResult<usize>) -> OpResult {
        if size == 0 {
            let n = fill(&mut [])?;
            let mut w = Writer::default();
            w.u32(u32::try_from(n).unwrap_or(u32::MAX)).u32(0);
            return Ok(w.bytes);
        }
        let mut buf = vec![0u8; size.min(MAX_XATTR_SIZE)];
        let n = fill(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn getxattr(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let size = r.u32().map_err(malformed)? as usize;
        r.u32().map_err(malformed)?;
        let name = r.cstr().map_err(malformed)?;
        let node = self.xattr_node(h.nodeid, false)?;
        let name = sys::cstring(name)?;
        Self::sized_reply(size, |buf| {
            sys::getxattr(node.fd()?.as_raw_fd(), &name, buf)
        })
    }

    fn listxattr(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let size = r.u32().map_err(malformed)? as usize;
        r.u32().map_err(malformed)?;
        if h.nodeid == abi::ROOT_ID {
            return Self::sized_reply(size, |_| Ok(0));
        }
        let node = self.xattr_node(h.nodeid, false)?;
        Self::sized_reply(size, |buf| sys::listxattr(node.fd()?.as_raw_fd(), buf))
    }

    fn removexattr(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let name = r.cstr().map_err(malformed)?;
        let node = self.xattr_node(h.nodeid, true)?;
        let name = sys::cstring(name)?;
        sys::removexattr(node.fd()?.as_raw_fd(), &name)?;
        Ok(Vec::new())
    }

    fn flock_of(lk: &abi::FileLock) -> SysResult<libc::flock> {
        let typ = match lk.typ as i32 {
            libc::F_RDLCK => libc::F_RDLCK,
            libc::F_WRLCK => libc::F_WRLCK,
            libc::F_UNLCK => libc::F_UNLCK,
            _ => return Err(libc::EINVAL),
        };
        let start = i64::try_from(lk.start).map_err(|_| libc::EINVAL)?;
        // The kernel's end is inclusive, OFFSET_MAX for "to the end of the file".
        let len = if lk.end >= i64::MAX as u64 {
            0
        } else if lk.end < lk.start {
            return Err(libc::EINVAL);
        } else {
            (lk.end - lk.start + 1) as i64
        };
        // SAFETY: an all-zero flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        fl.l_pid = 0; // required for OFD locks
        Ok(fl)
    }

    fn getlk(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let lk = abi::LkIn::parse(r).map_err(malformed)?;
        let handle = self.handle_of(h.nodeid, lk.fh)?;
        let mut fl = Self::flock_of(&lk.lk)?;
        sys::ofd_lock(handle.fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl)?;
        let out = if fl.l_type == libc::F_UNLCK as i16 {
            abi::FileLock {
                start: 0,
                end: 0,
                typ: libc::F_UNLCK as u32,
                pid: 0,
            }
        } else {
            let start = fl.l_start as u64;
            abi::FileLock {
                start,
                end: if fl.l_len == 0 {
                    i64::MAX as u64
                } else {
                    start + fl.l_len as u64 - 1
                },
                typ: fl.l_type as u32,
                pid: 0,
            }
        };
        let mut w = Writer::default();
        out.write(&mut w);
        Ok(w.bytes)
    }

    fn setlk(&self, h: &InHeader, r: &mut Reader, wait: bool) -> OpResult {
        let lk = abi::LkIn::parse(r).map_err(malformed)?;
        let handle = self.handle_of(h.nodeid, lk.fh)?;
        let fd = handle.fd.as_raw_fd();
        if lk.lk_flags & abi::LK_FLOCK != 0 {
            let op = match lk.lk.typ as i32 {
                libc::F_RDLCK => libc::LOCK_SH,
                libc::F_WRLCK => libc::LOCK_EX,
                libc::F_UNLCK => libc::LOCK_UN,
                _ => return Err(libc::EINVAL),
            };
            let op = if wait { op } else { op | libc::LOCK_NB };
            sys::flock(fd, op)?;
            return Ok(Vec::new());
        }
        let mut fl = Self::flock_of(&lk.lk)?;
        let cmd = if wait {
            libc::F_OFD_SETLKW
        } else {
            libc::F_OFD_SETLK
        };
        sys::ofd_lock(fd, cmd, &mut fl)?;
        Ok(Vec::new())
    }

    fn fallocate(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        let offset = r.u64().map_err(malformed)?;
        let length = r.u64().map_err(malformed)?;
        let mode = r.u32().map_err(malformed)? as i32;
        r.u32().map_err(malformed)?;
        let node = self.writable_node(h.nodeid)?;
        let handle = self.handle_of(node.nodeid, fh)?;
        sys::fallocate(handle.fd.as_raw_fd(), mode, offset, length)?;
        Ok(Vec::new())
    }

    fn lseek(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh = r.u64().map_err(malformed)?;
        let offset = r.u64().map_err(malformed)?;
        let whence = r.u32().map_err(malformed)? as i32;
        r.u32().map_err(malformed)?;
        let handle = self.handle_of(h.nodeid, fh)?;
        // The handle's own position is never used (IO is positional), so seeking it on
        // behalf of one guest lseek is harmless.
        let pos = sys::lseek(handle.fd.as_raw_fd(), offset, whence)?;
        let mut w = Writer::default();
        w.u64(pos);
        Ok(w.bytes)
    }

    fn copy_file_range(&self, h: &InHeader, r: &mut Reader) -> OpResult {
        let fh_in = r.u64().map_err(malformed)?;
        let off_in = r.u64().map_err(malformed)?;
        let nodeid_out = r.u64().map_err(malformed)?;
        let fh_out = r.u64().map_err(malformed)?;
        let off_out = r.u64().map_err(malformed)?;
        let len = r.u64().map_err(malformed)?;
        let src = self.handle_of(h.nodeid, fh_in)?;
        let node_out = self.writable_node(nodeid_out)?;
        let dst = self.handle_of(node_out.nodeid, fh_out)?;
        let len = usize::try_from(len.min(1 << 30)).unwrap_or(1 << 30);
        let n = sys::copy_file_range(src.fd.as_raw_fd(), off_in, dst.fd.as_raw_fd(), off_out, len)?;
        let mut w = Writer::default();
        w.u32(u32::try_from(n).unwrap_or(u32::MAX)).u32(0);
        Ok(w.bytes)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.get() {
            watcher.stopped.store(true, Ordering::Relaxed);
        }
    }
}

/// One directory entry on its way into a READDIR(PLUS) reply.
struct DirEntry<'a> {
    ino: u64,
    next: u64,
    typ: u32,
    name: &'a [u8],
}

impl DirEntry<'_> {
    fn record_len(&self, plus: bool) -> usize {
        let base = 24 + self.name.len();
        let base = if plus { base + EntryOut::SIZE } else { base };
        (base + 7) & !7
    }

    fn fits(&self, used: usize, size: usize, plus: bool) -> bool {
        used + self.record_len(plus) <= size
    }

    fn write(&self, w: &mut Writer, plus: bool, entry: Option<&EntryOut>) {
        if plus {
            match entry {
                Some(entry) => entry.write(w),
                // nodeid 0: the kernel lists the name without caching a node for it.
                None => {
                    w.raw(&[0u8; EntryOut::SIZE]);
                }
            }
        }
        w.u64(self.ino)
            .u64(self.next)
            .u32(u32::try_from(self.name.len()).unwrap_or(0))
            .u32(self.typ)
            .raw(self.name)
            .align8();
    }
}
