//! Host-side changes to the shares, relayed to the guest as FUSE notifications.
//!
//! fanotify reports, for every directory node the guest has looked up, the changes to its
//! entries with the changing process's pid and the directory's file handle plus the entry's
//! name. Events of this process (the server's own writes for the guest) are dropped: the
//! guest kernel raised those itself. Every other event becomes INVAL_ENTRY / INVAL_INODE
//! (the guest's caches) then FSNOTIFY (the guest's inotify watchers).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lock_ext::LockExt;

use crate::abi::{self, FsnotifyOut, Writer};
use crate::server::{Inode, InodeTable, Server};
use crate::sys;
use crate::ShareError;

/// The events the guest's inotify watchers can ask for, in the order a combined fanotify
/// event is split into notifications.
const RELAYED: [(u64, u32); 6] = [
    (libc::FAN_CREATE, libc::IN_CREATE),
    (libc::FAN_MOVED_FROM, libc::IN_MOVED_FROM),
    (libc::FAN_MOVED_TO, libc::IN_MOVED_TO),
    (libc::FAN_MODIFY, libc::IN_MODIFY),
    (libc::FAN_ATTRIB, libc::IN_ATTRIB),
    (libc::FAN_DELETE, libc::IN_DELETE),
];
const DIR_MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_EVENT_ON_CHILD
    | libc::FAN_ONDIR;
const FILE_MASK: u64 = libc::FAN_MODIFY | libc::FAN_ATTRIB;

pub(crate) type Sink = Box<dyn Fn(Vec<u8>) + Send + Sync>;

/// The fanotify group of one server and what its events map to.
#[derive(Debug)]
pub(crate) struct Watcher {
    fan: OwnedFd,
    /// Directory file handle (type + bytes) -> the directory nodes holding that inode.
    dirs: Mutex<HashMap<Vec<u8>, Vec<u64>>>,
    /// (parent directory's file handle, name) -> the file share's node.
    files: HashMap<(Vec<u8>, Vec<u8>), u64>,
    /// Set when the server is dropped: the event thread ends.
    pub(crate) stopped: AtomicBool,
}

impl Watcher {
    fn mark(&self, flags: libc::c_uint, mask: u64, fd: i32) -> sys::SysResult<()> {
        sys::fanotify_mark(self.fan.as_raw_fd(), flags, mask, fd)
    }

    /// Starts reporting changes in a directory node the guest has looked up.
    pub(crate) fn watch_node(&self, node: &Inode) {
        let Some(handle) = node.handle.clone() else {
            log::debug!("share: no file handle for node {}", node.nodeid);
            return;
        };
        // A mark is on the inode, not the descriptor: a reopened one may close after.
        let node_fd = match node.fd() {
            Ok(fd) => fd,
            Err(e) => {
                log::debug!("share: node {} cannot be reopened: errno {e}", node.nodeid);
                return;
            }
        };
        let fd = node_fd.as_raw_fd();
        let mut dirs = self.dirs.lock_unpoisoned();
        let ids = dirs.entry(handle).or_default();
        if !ids.contains(&node.nodeid) {
            ids.push(node.nodeid);
        }
        if let Err(e) = self.mark(libc::FAN_MARK_ADD, DIR_MASK, fd) {
            log::warn!(
                "share: host changes in node {} will not reach the guest: fanotify_mark errno {e}",
                node.nodeid
            );
        }
    }

    pub(crate) fn unwatch_node(&self, node: &Inode) {
        let Some(handle) = &node.handle else {
            return;
        };
        let mut dirs = self.dirs.lock_unpoisoned();
        if let Some(ids) = dirs.get_mut(handle) {
            ids.retain(|id| *id != node.nodeid);
            if ids.is_empty() {
                dirs.remove(handle);
                // The mark goes with the last node of the inode; a failure (or an inode
                // already deleted, whose marks went with it) only leaves events that map
                // to no node.
                if let Ok(fd) = node.fd() {
                    let _ = self.mark(libc::FAN_MARK_REMOVE, DIR_MASK, fd.as_raw_fd());
                }
            }
        }
    }
}

fn notify(sink: &Sink, code: i32, body: &[u8]) {
    sink(abi::message(0, code, body));
}

fn inval_entry(sink: &Sink, parent: u64, name: &[u8]) {
    let mut w = Writer::default();
    w.u64(parent)
        .u32(u32::try_from(name.len()).unwrap_or(0))
        .u32(0)
        .raw(name)
        .raw(&[0]);
    notify(sink, abi::NOTIFY_INVAL_ENTRY, &w.bytes);
}

fn inval_inode(sink: &Sink, nodeid: u64) {
    let mut w = Writer::default();
    w.u64(nodeid).u64(0).u64(u64::MAX); // offset 0, length -1: all of it
    notify(sink, abi::NOTIFY_INVAL_INODE, &w.bytes);
}

fn fsnotify(sink: &Sink, event: FsnotifyOut) {
    let mut w = Writer::default();
    event.write(&mut w);
    notify(sink, abi::NOTIFY_FSNOTIFY, &w.bytes);
}

impl Server {
    /// Host-side changes made by processes other than this one, as FUSE notify messages
    /// (out header with unique = 0): INVAL_ENTRY / INVAL_INODE, then FSNOTIFY. Spawns the
    /// thread that reads the events; it ends when the server is dropped.
    pub fn watch(&self, sink: Box<dyn Fn(Vec<u8>) + Send + Sync>) -> Result<(), ShareError> {
        let first = || {
            self.share_specs()
                .first()
                .map(|s| s.source.clone())
                .unwrap_or_default()
        };
        let fan = sys::fanotify_init().map_err(|e| ShareError::Watch {
            path: first(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        let mut files = HashMap::new();
        for (index, spec) in self.share_specs().iter().enumerate() {
            if spec.source.is_dir() {
                continue;
            }
            // A file share is marked itself; its events name it by its parent directory's
            // handle and its name, which are recorded here (the parent is never served).
            let (Some(parent), Some(name)) = (spec.source.parent(), spec.source.file_name()) else {
                continue;
            };
            let parent = if parent.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                parent
            };
            let watch_err = |e: i32| ShareError::Watch {
                path: spec.source.clone(),
                source: std::io::Error::from_raw_os_error(e),
            };
            let cpath = sys::cstring(parent.as_os_str().as_encoded_bytes()).map_err(watch_err)?;
            let dir = sys::openat(libc::AT_FDCWD, &cpath, libc::O_PATH, 0).map_err(watch_err)?;
            let handle = sys::file_handle(dir.as_raw_fd()).map_err(watch_err)?;
            let nodeid = self.share_root_ids()[index];
            files.insert((handle, name.as_encoded_bytes().to_vec()), nodeid);
        }
        let watcher = Arc::new(Watcher {
            fan,
            dirs: Mutex::new(HashMap::new()),
            files,
            stopped: AtomicBool::new(false),
        });
        if self.watcher.set(watcher.clone()).is_err() {
            return Err(ShareError::AlreadyWatched);
        }
        for (index, spec) in self.share_specs().iter().enumerate() {
            let node = self.any_node(self.share_root_ids()[index]);
            let Ok(node) = node else { continue };
            if spec.source.is_dir() {
                watcher.watch_node(&node);
            } else if let Err(e) = node
                .fd()
                .and_then(|fd| watcher.mark(libc::FAN_MARK_ADD, FILE_MASK, fd.as_raw_fd()))
            {
                log::warn!(
                    "share: host changes to {} will not reach the guest: fanotify_mark errno {e}",
                    spec.source.display()
                );
            }
        }
        let nodes: Vec<Arc<Inode>> = self
            .inodes
            .lock_unpoisoned()
            .nodes
            .values()
            .filter(|n| n.kind == libc::S_IFDIR)
            .cloned()
            .collect();
        for node in nodes {
            watcher.watch_node(&node);
        }
        let inodes = self.inodes_shared();
        std::thread::Builder::new()
            .name("share-watch".into())
            .spawn(move || event_loop(&watcher, &inodes, &sink))
            .map_err(|source| ShareError::Watch {
                path: first(),
                source,
            })?;
        Ok(())
    }
}

fn event_loop(watcher: &Watcher, inodes: &Mutex<InodeTable>, sink: &Sink) {
    let own_pid = std::process::id() as i32;
    let mut buf = vec![0u8; 64 * 1024];
    let mut cookies = Cookies::default();
    while !watcher.stopped.load(Ordering::Relaxed) {
        // The timeout bounds how long a dropped server keeps this thread.
        let n = sys::poll_read(watcher.fan.as_raw_fd(), &mut buf, 200);
        if n == 0 {
            continue;
        }
        for event in parse_events(&buf[..n]) {
            if event.pid == own_pid {
                continue;
            }
            relay(watcher, inodes, sink, &event, &mut cookies);
        }
    }
}

#[derive(Debug, Default)]
struct Cookies {
    next: u32,
    /// The cookie of a MOVED_FROM waiting for its MOVED_TO.
    pending: Option<u32>,
}

impl Cookies {
    fn for_mask(&mut self, bit: u32) -> u32 {
        match bit {
            libc::IN_MOVED_FROM => {
                self.next = self.next.wrapping_add(1).max(1);
                self.pending = Some(self.next);
                self.next
            }
            libc::IN_MOVED_TO => self.pending.take().unwrap_or_else(|| {
                self.next = self.next.wrapping_add(1).max(1);
                self.next
            }),
            _ => 0,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FanEvent {
    pub(crate) mask: u64,
    pub(crate) pid: i32,
    /// Directory file handle (type + bytes) and the entry's name ("." for the directory).
    pub(crate) dir: Vec<u8>,
    pub(crate) name: Vec<u8>,
}

/// Splits a fanotify read into events, skipping anything malformed or without a DFID_NAME
/// record.
pub(crate) fn parse_events(bytes: &[u8]) -> Vec<FanEvent> {
    let mut events = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 24 {
        let mut r = abi::Reader::new(rest);
        let (Ok(event_len), Ok(_vers_reserved), Ok(metadata_len), Ok(mask), Ok(_fd), Ok(pid)) =
            (r.u32(), r.u16(), r.u16(), r.u64(), r.u32(), r.u32())
        else {
            break;
        };
        let event_len = event_len as usize;
        if event_len < 24 || event_len > rest.len() {
            break;
        }
        let infos = rest
            .get((metadata_len as usize).max(24)..event_len)
            .unwrap_or(&[]);
        if let Some((dir, name)) = dfid_name(infos) {
            events.push(FanEvent {
                mask,
                pid: pid as i32,
                dir,
                name,
            });
        }
        rest = &rest[event_len..];
    }
    events
}

fn dfid_name(mut infos: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    while infos.len() >= 4 {
        let typ = infos[0];
        let len = u16::from_ne_bytes([infos[2], infos[3]]) as usize;
        if len < 4 || len > infos.len() {
            return None;
        }
        if typ == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
            // header(4) fsid(8) handle_bytes(4) handle_type(4) f_handle[handle_bytes] name\0
            let rec = &infos[4..len];
            let handle_bytes = u32::from_ne_bytes(rec.get(8..12)?.try_into().ok()?) as usize;
            let handle_type = rec.get(12..16)?;
            let f_handle = rec.get(16..16 + handle_bytes)?;
            let name_bytes = rec.get(16 + handle_bytes..)?;
            let end = name_bytes.iter().position(|&b| b == 0)?;
            let mut dir = handle_type.to_vec();
            dir.extend_from_slice(f_handle);
            return Some((dir, name_bytes[..end].to_vec()));
        }
        infos = &infos[len..];
    }
    None
}

fn relay(
    watcher: &Watcher,
    inodes: &Mutex<InodeTable>,
    sink: &Sink,
    event: &FanEvent,
    cookies: &mut Cookies,
) {
    let isdir = if event.mask & libc::FAN_ONDIR != 0 {
        libc::IN_ISDIR
    } else {
        0
    };
    if let Some(&file) = watcher.files.get(&(event.dir.clone(), event.name.clone())) {
        inval_inode(sink, file);
        for (fan, inotify) in RELAYED {
            if event.mask & fan != 0 && fan & FILE_MASK != 0 {
                fsnotify(
                    sink,
                    FsnotifyOut {
                        parent: file,
                        child: 0,
                        mask: inotify,
                        cookie: 0,
                        name: Vec::new(),
                    },
                );
            }
        }
    }
    let parents = watcher
        .dirs
        .lock_unpoisoned()
        .get(&event.dir)
        .cloned()
        .unwrap_or_default();
    for parent in parents {
        let on_self = event.name == b"." || event.name.is_empty();
        let child = if on_self {
            Some(parent)
        } else {
            known_child(inodes, parent, &event.name)
        };
        if !on_self
            && event.mask
                & (libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO)
                != 0
        {
            inval_entry(sink, parent, &event.name);
        }
        if event.mask & (libc::FAN_MODIFY | libc::FAN_ATTRIB) != 0 {
            if let Some(child) = child {
                inval_inode(sink, child);
            }
        }
        for (fan, inotify) in RELAYED {
            if event.mask & fan == 0 {
                continue;
            }
            fsnotify(
                sink,
                FsnotifyOut {
                    parent,
                    child: if on_self { 0 } else { child.unwrap_or(0) },
                    mask: inotify | isdir,
                    cookie: cookies.for_mask(inotify),
                    name: if on_self {
                        Vec::new()
                    } else {
                        event.name.clone()
                    },
                },
            );
        }
    }
}

/// The node of `name` in directory node `parent`, if the guest holds one.
fn known_child(inodes: &Mutex<InodeTable>, parent: u64, name: &[u8]) -> Option<u64> {
    let parent = inodes.lock_unpoisoned().nodes.get(&parent).cloned()?;
    let name = sys::cstring(name).ok()?;
    let fd = sys::openat(
        parent.fd().ok()?.as_raw_fd(),
        &name,
        libc::O_PATH | libc::O_NOFOLLOW,
        0,
    )
    .ok()?;
    let st = sys::fstat(fd.as_raw_fd()).ok()?;
    let key = parent.child_key(st.st_dev, st.st_ino);
    inodes.lock_unpoisoned().by_key.get(&key).copied()
}
