//! Hermetic tests: real FUSE requests as bytes against a server over temporary directories.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::abi::{self, EntryOut, FsnotifyOut, InHeader, Reader, Writer};
use crate::server::FdBudget;
use crate::{Server, ShareSpec};

static UNIQUE: AtomicU64 = AtomicU64::new(1);

fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    request_as(opcode, nodeid, 0, 0, body)
}

fn request_as(opcode: u32, nodeid: u64, uid: u32, gid: u32, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    InHeader {
        len: (abi::IN_HEADER_SIZE + body.len()) as u32,
        opcode,
        unique: UNIQUE.fetch_add(1, Ordering::Relaxed),
        nodeid,
        uid,
        gid,
        pid: 1,
    }
    .write(&mut w);
    w.raw(body);
    w.bytes
}

/// The reply's errno (0 on success) and body.
fn call(server: &Server, req: &[u8]) -> (i32, Vec<u8>) {
    let reply = server.handle(req).expect("a reply");
    let mut r = Reader::new(&reply);
    let len = r.u32().expect("len") as usize;
    let error = r.u32().expect("error") as i32;
    let unique = r.u64().expect("unique");
    assert_eq!(len, reply.len());
    assert_eq!(
        unique,
        u64::from_le_bytes(req[8..16].try_into().expect("8 bytes"))
    );
    (-error, r.rest().to_vec())
}

fn ok(server: &Server, req: &[u8]) -> Vec<u8> {
    let (errno, body) = call(server, req);
    assert_eq!(errno, 0, "request failed with errno {errno}");
    body
}

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn lookup(server: &Server, parent: u64, n: &str) -> Result<EntryOut, i32> {
    let (errno, body) = call(server, &request(abi::LOOKUP, parent, &name(n)));
    if errno != 0 {
        return Err(errno);
    }
    Ok(EntryOut::parse(&mut Reader::new(&body)).expect("entry"))
}

fn open(server: &Server, nodeid: u64, flags: i32) -> Result<u64, i32> {
    let mut w = Writer::default();
    w.u32(flags as u32).u32(0);
    let (errno, body) = call(server, &request(abi::OPEN, nodeid, &w.bytes));
    if errno != 0 {
        return Err(errno);
    }
    Ok(Reader::new(&body).u64().expect("fh"))
}

fn read(server: &Server, nodeid: u64, fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(fh).u64(offset).u32(size).u32(0).u64(0).u32(0).u32(0);
    ok(server, &request(abi::READ, nodeid, &w.bytes))
}

fn write(server: &Server, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> (i32, Vec<u8>) {
    let mut w = Writer::default();
    w.u64(fh)
        .u64(offset)
        .u32(data.len() as u32)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .raw(data);
    call(server, &request(abi::WRITE, nodeid, &w.bytes))
}

fn create(server: &Server, parent: u64, n: &str, mode: u32, uid: u32, gid: u32) -> (i32, Vec<u8>) {
    let mut w = Writer::default();
    w.u32((libc::O_RDWR | libc::O_CREAT) as u32)
        .u32(mode)
        .u32(0)
        .u32(0)
        .raw(&name(n));
    call(server, &request_as(abi::CREATE, parent, uid, gid, &w.bytes))
}

fn server_over(dir: &Path, read_only: bool) -> Server {
    let server = Server::new(vec![ShareSpec {
        source: dir.to_path_buf(),
        read_only,
        joined_with: None,
    }])
    .expect("server");
    let mut w = Writer::default();
    w.u32(7).u32(38).u32(65536).u32(u32::MAX);
    ok(&server, &request(abi::INIT, 0, &w.bytes));
    server
}

/// The share's root node.
fn share_root(server: &Server) -> u64 {
    lookup(server, abi::ROOT_ID, "0").expect("share 0").nodeid
}

#[test]
fn init_answers_the_lower_of_the_kernel_and_server_minor_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::new(vec![]).expect("server");
    let _ = dir;
    for (kernel_minor, expected) in [(38, abi::KERNEL_MINOR_VERSION), (27, 27)] {
        let mut w = Writer::default();
        w.u32(7).u32(kernel_minor).u32(0).u32(0);
        let body = ok(&server, &request(abi::INIT, 0, &w.bytes));
        let mut r = Reader::new(&body);
        assert_eq!(r.u32(), Ok(7));
        assert_eq!(r.u32(), Ok(expected));
    }
}

#[test]
fn new_fails_naming_a_missing_source() {
    let err = Server::new(vec![ShareSpec {
        source: "/nonexistent/share-source".into(),
        read_only: false,
        joined_with: None,
    }])
    .expect_err("missing source");
    assert!(
        err.to_string().contains("/nonexistent/share-source"),
        "{err}"
    );
}

#[test]
fn lookup_getattr_read_and_write_reach_the_host_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"hello host").expect("write");
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    let a = lookup(&server, root, "a").expect("a");
    assert_eq!(a.attr.size, 10);
    assert_eq!(a.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let attr = ok(&server, &request(abi::GETATTR, a.nodeid, &[0; 16]));
    assert_eq!(attr.len(), 16 + abi::Attr::SIZE);
    let fh = open(&server, a.nodeid, libc::O_RDWR).expect("open");
    assert_eq!(read(&server, a.nodeid, fh, 0, 100), b"hello host");
    let (errno, body) = write(&server, a.nodeid, fh, 6, b"guest");
    assert_eq!(errno, 0);
    assert_eq!(Reader::new(&body).u32(), Ok(5));
    assert_eq!(
        std::fs::read(dir.path().join("a")).expect("read"),
        b"hello guest"
    );
}

#[test]
fn create_and_mkdir_give_the_request_owner_and_exact_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    let (errno, body) = create(&server, root, "f", libc::S_IFREG | 0o664, 1234, 5678);
    assert_eq!(errno, 0);
    assert_eq!(body.len(), EntryOut::SIZE + 16);
    let meta = std::fs::metadata(dir.path().join("f")).expect("f");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (1234, 5678, 0o664)
    );

    let mut w = Writer::default();
    w.u32(0o775).u32(0).raw(&name("d"));
    ok(&server, &request_as(abi::MKDIR, root, 42, 43, &w.bytes));
    let meta = std::fs::metadata(dir.path().join("d")).expect("d");
    assert!(meta.is_dir());
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (42, 43, 0o775)
    );
}

#[test]
fn rename_link_and_symlink_act_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"x").expect("write");
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    let a = lookup(&server, root, "a").expect("a");

    let mut w = Writer::default();
    w.u64(a.nodeid).raw(&name("hard"));
    let linked = ok(&server, &request(abi::LINK, root, &w.bytes));
    let linked = EntryOut::parse(&mut Reader::new(&linked)).expect("entry");
    assert_eq!(linked.nodeid, a.nodeid, "a hard link is the same node");
    assert_eq!(linked.attr.nlink, 2);

    let mut w = Writer::default();
    w.u64(root).raw(&name("a")).raw(&name("b"));
    ok(&server, &request(abi::RENAME, root, &w.bytes));
    assert!(!dir.path().join("a").exists());
    assert_eq!(std::fs::read(dir.path().join("b")).expect("b"), b"x");

    let mut w = Writer::default();
    w.u64(root)
        .u32(libc::RENAME_NOREPLACE)
        .u32(0)
        .raw(&name("b"))
        .raw(&name("hard"));
    let (errno, _) = call(&server, &request(abi::RENAME2, root, &w.bytes));
    assert_eq!(errno, libc::EEXIST);

    let mut w = Writer::default();
    w.raw(&name("link")).raw(&name("../../outside"));
    let entry = ok(&server, &request(abi::SYMLINK, root, &w.bytes));
    let entry = EntryOut::parse(&mut Reader::new(&entry)).expect("entry");
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        std::fs::read_link(dir.path().join("link"))
            .expect("link")
            .as_os_str(),
        "../../outside"
    );
    assert_eq!(
        ok(&server, &request(abi::READLINK, entry.nodeid, &[])),
        b"../../outside"
    );

    let mut w = Writer::default();
    w.raw(&name("b"));
    ok(&server, &request(abi::UNLINK, root, &w.bytes));
    assert!(!dir.path().join("b").exists());
}

#[test]
fn xattrs_are_set_read_listed_and_removed_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"").expect("write");
    let server = server_over(dir.path(), false);
    let a = lookup(&server, share_root(&server), "a").expect("a").nodeid;
    let mut w = Writer::default();
    w.u32(3).u32(0).raw(&name("user.k")).raw(b"val");
    ok(&server, &request(abi::SETXATTR, a, &w.bytes));
    let mut w = Writer::default();
    w.u32(0).u32(0).raw(&name("user.k"));
    let size = ok(&server, &request(abi::GETXATTR, a, &w.bytes));
    assert_eq!(Reader::new(&size).u32(), Ok(3));
    let mut w = Writer::default();
    w.u32(64).u32(0).raw(&name("user.k"));
    assert_eq!(ok(&server, &request(abi::GETXATTR, a, &w.bytes)), b"val");
    let mut w = Writer::default();
    w.u32(64).u32(0);
    let list = ok(&server, &request(abi::LISTXATTR, a, &w.bytes));
    assert!(list.windows(7).any(|s| s == b"user.k\0"));
    ok(&server, &request(abi::REMOVEXATTR, a, &name("user.k")));
    let mut w = Writer::default();
    w.u32(64).u32(0).raw(&name("user.k"));
    assert_eq!(
        call(&server, &request(abi::GETXATTR, a, &w.bytes)).0,
        libc::ENODATA
    );
}

fn lk(fh: u64, typ: i32, start: u64, end: u64, flags: u32) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(fh)
        .u64(fh)
        .u64(start)
        .u64(end)
        .u32(typ as u32)
        .u32(0)
        .u32(flags)
        .u32(0);
    w.bytes
}

#[test]
fn posix_and_flock_locks_conflict_between_handles() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"0123456789").expect("write");
    let server = server_over(dir.path(), false);
    let a = lookup(&server, share_root(&server), "a").expect("a").nodeid;
    let fh1 = open(&server, a, libc::O_RDWR).expect("open");
    let fh2 = open(&server, a, libc::O_RDWR).expect("open");
    ok(
        &server,
        &request(abi::SETLK, a, &lk(fh1, libc::F_WRLCK, 0, 4, 0)),
    );
    let (errno, _) = call(
        &server,
        &request(abi::SETLK, a, &lk(fh2, libc::F_WRLCK, 2, 3, 0)),
    );
    assert_eq!(errno, libc::EAGAIN);
    let conflict = ok(
        &server,
        &request(abi::GETLK, a, &lk(fh2, libc::F_WRLCK, 0, u64::MAX >> 1, 0)),
    );
    let conflict = abi::FileLock::parse(&mut Reader::new(&conflict)).expect("lock");
    assert_eq!(
        (conflict.typ as i32, conflict.start, conflict.end),
        (libc::F_WRLCK, 0, 4)
    );
    ok(
        &server,
        &request(abi::SETLK, a, &lk(fh2, libc::F_WRLCK, 5, 9, 0)),
    );

    ok(
        &server,
        &request(abi::SETLK, a, &lk(fh1, libc::F_WRLCK, 0, 0, abi::LK_FLOCK)),
    );
    let (errno, _) = call(
        &server,
        &request(abi::SETLK, a, &lk(fh2, libc::F_RDLCK, 0, 0, abi::LK_FLOCK)),
    );
    assert_eq!(errno, libc::EWOULDBLOCK);
}

#[test]
fn sparse_writes_beyond_4_gib_keep_their_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_over(dir.path(), false);
    let (errno, body) = create(&server, share_root(&server), "sparse", 0o644, 0, 0);
    assert_eq!(errno, 0);
    let entry = EntryOut::parse(&mut Reader::new(&body)).expect("entry");
    let fh = Reader::new(&body[EntryOut::SIZE..]).u64().expect("fh");
    let offset = 5u64 << 30;
    assert_eq!(write(&server, entry.nodeid, fh, offset, b"end").0, 0);
    let meta = std::fs::metadata(dir.path().join("sparse")).expect("sparse");
    assert_eq!(meta.len(), offset + 3);
    assert!(meta.blocks() < 1024, "the file stays sparse");
    assert_eq!(read(&server, entry.nodeid, fh, offset, 10), b"end");
}

#[test]
fn setattr_changes_mode_owner_size_and_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"0123456789").expect("write");
    let server = server_over(dir.path(), false);
    let a = lookup(&server, share_root(&server), "a").expect("a").nodeid;
    let mut w = Writer::default();
    let valid =
        abi::FATTR_MODE | abi::FATTR_UID | abi::FATTR_GID | abi::FATTR_SIZE | abi::FATTR_MTIME;
    w.u32(valid)
        .u32(0)
        .u64(0)
        .u64(4)
        .u64(0)
        .u64(0)
        .u64(1_000_000)
        .u64(0);
    w.u32(0)
        .u32(0)
        .u32(0)
        .u32(0o600)
        .u32(0)
        .u32(7)
        .u32(8)
        .u32(0);
    ok(&server, &request(abi::SETATTR, a, &w.bytes));
    let meta = std::fs::metadata(dir.path().join("a")).expect("a");
    assert_eq!(
        (
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.len(),
            meta.mtime()
        ),
        (0o600, 7, 8, 4, 1_000_000)
    );
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sub")).expect("sub");
    let server = server_over(&dir.path().join("sub"), false);
    let root = share_root(&server);
    for bad in ["..", ".", "", "../sub", "a/b", "/etc"] {
        assert_eq!(
            lookup(&server, root, bad).err(),
            Some(libc::EINVAL),
            "{bad:?}"
        );
    }
    let mut w = Writer::default();
    w.u32(0o755).u32(0).raw(&name(".."));
    assert_eq!(
        call(&server, &request(abi::MKDIR, root, &w.bytes)).0,
        libc::EINVAL
    );
}

#[test]
fn a_symlink_to_etc_shadow_is_returned_as_a_link_and_never_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/etc/shadow", dir.path().join("s")).expect("symlink");
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).expect("symlink");
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    let s = lookup(&server, root, "s").expect("s");
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        ok(&server, &request(abi::READLINK, s.nodeid, &[])),
        b"/etc/shadow"
    );
    assert_eq!(open(&server, s.nodeid, libc::O_RDONLY), Err(libc::ELOOP));
    let mut w = Writer::default();
    w.u32(64).u32(0).raw(&name("security.selinux"));
    assert_eq!(
        call(&server, &request(abi::GETXATTR, s.nodeid, &w.bytes)).0,
        libc::EOPNOTSUPP
    );
    // A symlink to a directory is no directory to look names up in.
    let etc = lookup(&server, root, "etc").expect("etc");
    assert_eq!(
        lookup(&server, etc.nodeid, "shadow").err(),
        Some(libc::ENOTDIR)
    );
    let mut w = Writer::default();
    w.u32(0).u32(0);
    assert_eq!(
        call(&server, &request(abi::OPENDIR, etc.nodeid, &w.bytes)).0,
        libc::ENOTDIR
    );
}

#[test]
fn a_nodeid_or_handle_the_guest_was_not_given_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"secret").expect("write");
    let server = server_over(dir.path(), false);
    for forged in [0u64, 2, 3, 99, u64::MAX] {
        assert_eq!(
            lookup(&server, forged, "a").err(),
            Some(libc::EBADF),
            "{forged}"
        );
        assert_eq!(
            call(&server, &request(abi::GETATTR, forged, &[0; 16])).0,
            libc::EBADF
        );
    }
    let a = lookup(&server, share_root(&server), "a").expect("a").nodeid;
    let mut w = Writer::default();
    w.u64(12345).u64(0).u32(10).u32(0).u64(0).u32(0).u32(0);
    assert_eq!(
        call(&server, &request(abi::READ, a, &w.bytes)).0,
        libc::EBADF
    );
}

#[test]
fn a_file_share_reaches_nothing_next_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hosts"), b"127.0.0.1 x").expect("write");
    std::fs::write(dir.path().join("sibling"), b"secret").expect("write");
    let server = Server::new(vec![ShareSpec {
        source: dir.path().join("hosts"),
        read_only: false,
        joined_with: None,
    }])
    .expect("server");
    let file = lookup(&server, abi::ROOT_ID, "0").expect("share");
    assert_eq!(file.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(
        lookup(&server, file.nodeid, "sibling").err(),
        Some(libc::ENOTDIR)
    );
    for other in ["1", "sibling", "..", "00", "+0"] {
        assert!(lookup(&server, abi::ROOT_ID, other).is_err(), "{other}");
    }
    let mut w = Writer::default();
    w.u32(0).u32(0);
    assert_eq!(
        call(&server, &request(abi::OPENDIR, file.nodeid, &w.bytes)).0,
        libc::ENOTDIR
    );
    // The synthetic root lists the shares and nothing else.
    let fh = Reader::new(&ok(&server, &request(abi::OPENDIR, abi::ROOT_ID, &w.bytes)))
        .u64()
        .expect("fh");
    let mut w = Writer::default();
    w.u64(fh).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
    let listing = ok(&server, &request(abi::READDIR, abi::ROOT_ID, &w.bytes));
    let names = dirent_names(&listing);
    assert_eq!(names, vec![".", "..", "0"]);
    let mut w = Writer::default();
    w.u32(0).u32(0).raw(&name("x"));
    assert_eq!(
        call(&server, &request(abi::MKDIR, abi::ROOT_ID, &w.bytes)).0,
        libc::EROFS
    );
}

fn dirent_names(mut bytes: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    while bytes.len() >= 24 {
        let namelen = u32::from_le_bytes(bytes[16..20].try_into().expect("4")) as usize;
        names.push(String::from_utf8_lossy(&bytes[24..24 + namelen]).into_owned());
        let rec = (24 + namelen + 7) & !7;
        bytes = &bytes[rec.min(bytes.len())..];
    }
    names
}

#[test]
fn readdir_lists_the_host_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    for n in ["x", "y", "z"] {
        std::fs::write(dir.path().join(n), b"").expect("write");
    }
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    let mut w = Writer::default();
    w.u32(0).u32(0);
    let fh = Reader::new(&ok(&server, &request(abi::OPENDIR, root, &w.bytes)))
        .u64()
        .expect("fh");
    let mut w = Writer::default();
    w.u64(fh).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
    let mut names = dirent_names(&ok(&server, &request(abi::READDIR, root, &w.bytes)));
    names.sort();
    assert_eq!(names, vec![".", "..", "x", "y", "z"]);
    let plus = ok(&server, &request(abi::READDIRPLUS, root, &w.bytes));
    assert!(plus.len() >= 5 * (EntryOut::SIZE + 24));
}

#[test]
fn a_read_only_share_refuses_every_modification_on_the_host_side() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"keep").expect("write");
    let server = server_over(dir.path(), true);
    let root = share_root(&server);
    let a = lookup(&server, root, "a").expect("a").nodeid;
    assert_eq!(open(&server, a, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(
        open(&server, a, libc::O_RDONLY | libc::O_TRUNC),
        Err(libc::EROFS)
    );
    assert_eq!(create(&server, root, "n", 0o644, 0, 0).0, libc::EROFS);
    let mut setattr = Writer::default();
    setattr.u32(abi::FATTR_SIZE).u32(0).u64(0).u64(0);
    setattr.raw(&[0u8; 64]);
    let refusals: Vec<(u32, u64, Vec<u8>)> = vec![
        (abi::SETATTR, a, setattr.bytes.clone()),
        (abi::UNLINK, root, name("a")),
        (abi::RMDIR, root, name("a")),
        (abi::MKDIR, root, [&[0u8; 8][..], &name("d")].concat()),
        (abi::MKNOD, root, [&[0u8; 16][..], &name("d")].concat()),
        (abi::SYMLINK, root, [name("l"), name("t")].concat()),
        (
            abi::RENAME,
            root,
            [&root.to_le_bytes()[..], &name("a"), &name("b")].concat(),
        ),
        (abi::LINK, root, [&a.to_le_bytes()[..], &name("b")].concat()),
        (
            abi::SETXATTR,
            a,
            [&[1u8, 0, 0, 0, 0, 0, 0, 0][..], &name("user.x"), b"v"].concat(),
        ),
        (abi::REMOVEXATTR, a, name("user.x")),
        (abi::FALLOCATE, a, vec![0u8; 32]),
    ];
    for (opcode, nodeid, body) in refusals {
        assert_eq!(
            call(&server, &request(opcode, nodeid, &body)).0,
            libc::EROFS,
            "opcode {opcode}"
        );
    }
    let fh = open(&server, a, libc::O_RDONLY).expect("read-only open");
    assert_ne!(write(&server, a, fh, 0, b"x").0, 0);
    assert_eq!(std::fs::read(dir.path().join("a")).expect("a"), b"keep");
}

#[test]
fn truncated_and_inconsistent_requests_get_einval_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"x").expect("write");
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    assert!(server.handle(&[1, 2, 3]).is_none());
    for opcode in 0..60u32 {
        // FORGET and co. have no reply; READLINK, STATFS and DESTROY take no arguments.
        if matches!(
            opcode,
            abi::FORGET
                | abi::BATCH_FORGET
                | abi::INTERRUPT
                | abi::READLINK
                | abi::STATFS
                | abi::DESTROY
        ) {
            continue;
        }
        for body_len in [0usize, 3, 7] {
            let (errno, _) = call(&server, &request(opcode, root, &vec![0xff; body_len]));
            assert_ne!(errno, 0, "opcode {opcode} with {body_len} bytes");
        }
    }
    let mut bad_len = request(abi::GETATTR, root, &[0; 16]);
    bad_len[0] = 200;
    assert_eq!(call(&server, &bad_len).0, libc::EINVAL);
    // A WRITE claiming more data than it carries.
    let mut w = Writer::default();
    w.u64(0)
        .u64(0)
        .u32(1000)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .raw(b"short");
    assert_eq!(
        call(&server, &request(abi::WRITE, root, &w.bytes)).0,
        libc::EINVAL
    );
}

#[test]
fn forget_drops_a_node_after_its_last_lookup() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"x").expect("write");
    let server = server_over(dir.path(), false);
    let root = share_root(&server);
    let a = lookup(&server, root, "a").expect("a").nodeid;
    assert_eq!(lookup(&server, root, "a").expect("a").nodeid, a);
    assert!(server
        .handle(&request(abi::FORGET, a, &1u64.to_le_bytes()))
        .is_none());
    assert_eq!(call(&server, &request(abi::GETATTR, a, &[0; 16])).0, 0);
    let mut w = Writer::default();
    w.u32(1).u32(0).u64(a).u64(1);
    assert!(server
        .handle(&request(abi::BATCH_FORGET, 0, &w.bytes))
        .is_none());
    assert_eq!(
        call(&server, &request(abi::GETATTR, a, &[0; 16])).0,
        libc::EBADF
    );
    // A forgotten share root is no longer the guest's, but looking it up again gives it back.
    assert!(server
        .handle(&request(abi::FORGET, root, &100u64.to_le_bytes()))
        .is_none());
    assert_eq!(
        call(&server, &request(abi::GETATTR, root, &[0; 16])).0,
        libc::EBADF
    );
    assert_eq!(share_root(&server), root);
    assert_eq!(call(&server, &request(abi::GETATTR, root, &[0; 16])).0, 0);
}

/// Notification messages a watch produces within `wait`.
fn drain(rx: &mpsc::Receiver<Vec<u8>>, wait: Duration) -> Vec<(i32, Vec<u8>)> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(message) => {
                let mut r = Reader::new(&message);
                let _len = r.u32();
                let code = r.u32().expect("code") as i32;
                assert_eq!(r.u64(), Ok(0), "notifications have unique 0");
                out.push((code, r.rest().to_vec()));
            }
            Err(_) => break,
        }
    }
    out
}

fn watched_server(dir: &Path) -> (Server, mpsc::Receiver<Vec<u8>>) {
    let server = server_over(dir, false);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    server
        .watch(Box::new(move |m| {
            let _ = tx.lock().map(|tx| tx.send(m));
        }))
        .expect("watch");
    (server, rx)
}

fn outside(script: &str) {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .expect("sh");
    assert!(status.success());
}

#[test]
fn an_outside_write_produces_inval_and_fsnotify_but_the_servers_own_write_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("d")).expect("d");
    std::fs::write(dir.path().join("d/f"), b"x").expect("write");
    let (server, rx) = watched_server(dir.path());
    let root = share_root(&server);
    let d = lookup(&server, root, "d").expect("d").nodeid;
    let f = lookup(&server, d, "f").expect("f").nodeid;
    let fh = open(&server, f, libc::O_RDWR).expect("open");
    assert_eq!(write(&server, f, fh, 0, b"own").0, 0);
    assert_eq!(
        drain(&rx, Duration::from_millis(500)),
        vec![],
        "the server's own write is not echoed"
    );

    outside(&format!(
        "echo more >> {}",
        dir.path().join("d/f").display()
    ));
    let messages = drain(&rx, Duration::from_millis(1000));
    let mut inval = Writer::default();
    inval.u64(f).u64(0).u64(u64::MAX);
    assert!(
        messages.contains(&(abi::NOTIFY_INVAL_INODE, inval.bytes)),
        "{messages:?}"
    );
    let modify = messages
        .iter()
        .filter(|(code, _)| *code == abi::NOTIFY_FSNOTIFY)
        .map(|(_, body)| FsnotifyOut::parse(&mut Reader::new(body)).expect("fsnotify"))
        .find(|e| e.mask == libc::IN_MODIFY)
        .expect("an IN_MODIFY");
    assert_eq!(
        (modify.parent, modify.child, modify.name.as_slice()),
        (d, f, &b"f"[..])
    );
}

#[test]
fn outside_create_rename_and_delete_invalidate_the_entry_with_inotify_masks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, rx) = watched_server(dir.path());
    let root = share_root(&server);
    let p = dir.path().display();
    outside(&format!(
        "mkdir {p}/newdir && touch {p}/a && mv {p}/a {p}/b && rm {p}/b"
    ));
    let messages = drain(&rx, Duration::from_millis(1000));
    let events: Vec<FsnotifyOut> = messages
        .iter()
        .filter(|(code, _)| *code == abi::NOTIFY_FSNOTIFY)
        .map(|(_, body)| FsnotifyOut::parse(&mut Reader::new(body)).expect("fsnotify"))
        .collect();
    let seen: Vec<(u32, &[u8])> = events.iter().map(|e| (e.mask, e.name.as_slice())).collect();
    assert!(
        seen.contains(&(libc::IN_CREATE | libc::IN_ISDIR, &b"newdir"[..])),
        "{seen:?}"
    );
    assert!(seen.contains(&(libc::IN_CREATE, &b"a"[..])), "{seen:?}");
    assert!(seen.contains(&(libc::IN_DELETE, &b"b"[..])), "{seen:?}");
    let from = events
        .iter()
        .find(|e| e.mask == libc::IN_MOVED_FROM)
        .expect("moved from");
    let to = events
        .iter()
        .find(|e| e.mask == libc::IN_MOVED_TO)
        .expect("moved to");
    assert_eq!(
        (from.name.as_slice(), to.name.as_slice()),
        (&b"a"[..], &b"b"[..])
    );
    assert_eq!(from.cookie, to.cookie);
    assert_ne!(from.cookie, 0);
    assert!(events.iter().all(|e| e.parent == root));
    let mut inval = Writer::default();
    inval.u64(root).u32(1).u32(0).raw(b"a\0");
    assert!(messages.contains(&(abi::NOTIFY_INVAL_ENTRY, inval.bytes)));
}

#[test]
fn serve_stream_answers_requests_framed_by_their_length() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"x").expect("write");
    let server = Arc::new(
        Server::new(vec![ShareSpec {
            source: dir.path().to_path_buf(),
            read_only: false,
            joined_with: None,
        }])
        .expect("server"),
    );
    let (mut guest, host) = std::os::unix::net::UnixStream::pair().expect("pair");
    crate::serve_stream(server, host).expect("serve");
    let mut w = Writer::default();
    w.u32(7).u32(38).u32(0).u32(0);
    let mut both = request(abi::INIT, 0, &w.bytes);
    let lookup = request(abi::LOOKUP, abi::ROOT_ID, &name("0"));
    both.extend_from_slice(&lookup);
    guest.write_all(&both).expect("send");
    guest
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut errors = Vec::new();
    for _ in 0..2 {
        let mut header = [0u8; 16];
        guest.read_exact(&mut header).expect("header");
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4")) as usize;
        let mut body = vec![0u8; len - 16];
        guest.read_exact(&mut body).expect("body");
        errors.push(i32::from_le_bytes(header[4..8].try_into().expect("4")));
    }
    assert_eq!(errors, vec![0, 0]);
    drop(guest);
}

/// Descriptors of this process that point into `dir` (other tests run beside this one).
fn fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

fn server_with_budget(dir: &Path, limit: usize) -> (Server, Arc<FdBudget>) {
    let budget = FdBudget::new(limit);
    let server = Server::with_fd_budget(
        vec![ShareSpec {
            source: dir.to_path_buf(),
            read_only: false,
            joined_with: None,
        }],
        budget.clone(),
    )
    .expect("server");
    let mut w = Writer::default();
    w.u32(7).u32(38).u32(65536).u32(u32::MAX);
    ok(&server, &request(abi::INIT, 0, &w.bytes));
    (server, budget)
}

fn opendir(server: &Server, nodeid: u64) -> u64 {
    let mut w = Writer::default();
    w.u32(0).u32(0);
    Reader::new(&ok(server, &request(abi::OPENDIR, nodeid, &w.bytes)))
        .u64()
        .expect("fh")
}

fn release(server: &Server, opcode: u32, nodeid: u64, fh: u64) {
    let mut w = Writer::default();
    w.u64(fh).u32(0).u32(0).u64(0);
    ok(server, &request(opcode, nodeid, &w.bytes));
}

/// Every entry of a directory through READDIRPLUS (which looks each one up), as
/// (name, entry) without "." and "..".
fn readdirplus_all(server: &Server, dir: u64) -> Vec<(String, EntryOut)> {
    let fh = opendir(server, dir);
    let mut entries = Vec::new();
    let mut offset = 0;
    loop {
        let mut w = Writer::default();
        w.u64(fh).u64(offset).u32(65536).u32(0).u64(0).u32(0).u32(0);
        let body = ok(server, &request(abi::READDIRPLUS, dir, &w.bytes));
        if body.is_empty() {
            break;
        }
        let mut r = Reader::new(&body);
        while let Ok(entry) = EntryOut::parse(&mut r) {
            let _ino = r.u64().expect("ino");
            offset = r.u64().expect("off");
            let namelen = r.u32().expect("namelen") as usize;
            let _typ = r.u32().expect("type");
            let name = String::from_utf8_lossy(r.take(namelen).expect("name")).into_owned();
            r.take(((24 + namelen + 7) & !7) - 24 - namelen)
                .expect("padding");
            if name != "." && name != ".." {
                assert_ne!(entry.nodeid, 0, "{name} was listed without a node");
                entries.push((name, entry));
            }
        }
    }
    release(server, abi::RELEASEDIR, dir, fh);
    entries
}

#[test]
fn nodes_beyond_the_fd_budget_serve_every_operation_by_handle_with_bounded_fds() {
    const DIRS: usize = 150;
    const BUDGET: usize = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..DIRS {
        let d = dir.path().join(format!("d{i}"));
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("f"), format!("content {i}")).expect("write");
    }
    let (server, budget) = server_with_budget(dir.path(), BUDGET);
    let root = share_root(&server);
    let mut files = Vec::new();
    for i in 0..DIRS {
        let d = lookup(&server, root, &format!("d{i}")).expect("dir").nodeid;
        let f = lookup(&server, d, "f").expect("file").nodeid;
        let attr = ok(&server, &request(abi::GETATTR, f, &[0; 16]));
        let mut r = Reader::new(&attr);
        r.take(16).expect("attr_out header");
        assert_eq!(
            crate::abi::Attr::parse(&mut r).expect("attr").size,
            format!("content {i}").len() as u64
        );
        let fh = open(&server, f, libc::O_RDONLY).expect("open");
        assert_eq!(
            read(&server, f, fh, 0, 100),
            format!("content {i}").as_bytes()
        );
        release(&server, abi::RELEASE, f, fh);
        let names: Vec<String> = readdirplus_all(&server, d)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["f"]);
        files.push((d, f));
    }
    // 1 share root + 300 nodes: the budget's nodes keep descriptors, no other does.
    assert_eq!(budget.used(), BUDGET);
    let (last_dir, last_file) = files[DIRS - 1];
    assert!(!server.node(last_dir).expect("node").has_cached_fd());
    assert!(!server.node(last_file).expect("node").has_cached_fd());
    assert!(
        fds_under(dir.path()) <= BUDGET + 1 + 4,
        "{} descriptors held in the share",
        fds_under(dir.path())
    );

    // Modifications through nodes without a descriptor.
    let (d1, _) = files[DIRS - 2];
    let mut w = Writer::default();
    w.u64(d1).raw(&name("f")).raw(&name("moved"));
    ok(&server, &request(abi::RENAME, last_dir, &w.bytes));
    assert_eq!(
        std::fs::read(dir.path().join(format!("d{}/moved", DIRS - 2))).expect("moved"),
        format!("content {}", DIRS - 1).as_bytes()
    );
    ok(&server, &request(abi::UNLINK, d1, &name("f")));
    assert!(!dir.path().join(format!("d{}/f", DIRS - 2)).exists());

    // An open file whose node has no descriptor still answers fstat after the host unlinks
    // it; once closed, the deleted inode no longer reopens by handle: ESTALE.
    let fh = open(&server, last_file, libc::O_RDONLY).expect("open moved file");
    std::fs::remove_file(dir.path().join(format!("d{}/moved", DIRS - 2))).expect("rm");
    let mut w = Writer::default();
    w.u32(abi::GETATTR_FH).u32(0).u64(fh);
    ok(&server, &request(abi::GETATTR, last_file, &w.bytes));
    release(&server, abi::RELEASE, last_file, fh);
    assert_eq!(
        call(&server, &request(abi::GETATTR, last_file, &[0; 16])).0,
        libc::ESTALE
    );

    // Forgetting nodes gives their budget back.
    // Each file was looked up by LOOKUP and by READDIRPLUS, each directory once.
    for (d, f) in &files {
        for (nodeid, n) in [(*f, 2), (*d, 1)] {
            let mut w = Writer::default();
            w.u64(n);
            assert!(server
                .handle(&request(abi::FORGET, nodeid, &w.bytes))
                .is_none());
        }
    }
    assert_eq!(budget.used(), 0);
}

#[test]
fn a_guest_walk_of_5000_entries_keeps_descriptors_within_a_budget_of_100() {
    const DIRS: usize = 10;
    const FILES: usize = 499;
    const BUDGET: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..DIRS {
        let d = dir.path().join(format!("d{i}"));
        std::fs::create_dir(&d).expect("mkdir");
        for j in 0..FILES {
            std::fs::File::create(d.join(format!("f{j}"))).expect("create");
        }
    }
    let (server, budget) = server_with_budget(dir.path(), BUDGET);
    let root = share_root(&server);
    let mut seen = 0;
    for (_, d) in readdirplus_all(&server, root) {
        seen += 1;
        for (_, f) in readdirplus_all(&server, d.nodeid) {
            seen += 1;
            ok(&server, &request(abi::GETATTR, f.nodeid, &[0; 16]));
        }
    }
    assert_eq!(seen, DIRS * (FILES + 1));
    assert_eq!(budget.used(), BUDGET);
    // The budget's nodes, the share root and its anchor.
    assert!(
        fds_under(dir.path()) <= BUDGET + 2,
        "{} descriptors held in the share",
        fds_under(dir.path())
    );
}

fn two_shares(dir: &Path, joined: bool) -> Server {
    for sub in ["upper", "work"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let spec = |sub: &str, joined_with| ShareSpec {
        source: dir.join(sub),
        read_only: false,
        joined_with,
    };
    let server =
        Server::new(vec![spec("upper", None), spec("work", joined.then_some(0))]).expect("server");
    let mut w = Writer::default();
    w.u32(7).u32(38).u32(65536).u32(u32::MAX);
    ok(&server, &request(abi::INIT, 0, &w.bytes));
    server
}

#[test]
fn renames_cross_joined_shares_only() {
    for joined in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = two_shares(dir.path(), joined);
        std::fs::write(dir.path().join("work/#tmp"), b"copied up").expect("write");
        let upper = lookup(&server, abi::ROOT_ID, "0").expect("upper").nodeid;
        let work = lookup(&server, abi::ROOT_ID, "1").expect("work").nodeid;
        let moved = lookup(&server, work, "#tmp").expect("#tmp");

        // As overlayfs moves a copied-up file from its work directory into its upper one.
        let mut w = Writer::default();
        w.u64(upper).raw(&name("#tmp")).raw(&name("file"));
        let (errno, _) = call(&server, &request(abi::RENAME, work, &w.bytes));
        if !joined {
            assert_eq!(errno, libc::EXDEV);
            continue;
        }
        assert_eq!(errno, 0);
        assert_eq!(
            std::fs::read(dir.path().join("upper/file")).expect("moved"),
            b"copied up"
        );
        let found = lookup(&server, upper, "file").expect("file");
        assert_eq!(found.nodeid, moved.nodeid, "one host file is one node");
    }
}

#[test]
fn a_share_joins_only_an_earlier_one_with_its_read_only_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = |read_only, joined_with| ShareSpec {
        source: dir.path().to_path_buf(),
        read_only,
        joined_with,
    };
    for shares in [
        vec![spec(false, Some(0))],
        vec![spec(false, Some(1)), spec(false, None)],
        vec![spec(true, None), spec(false, Some(0))],
    ] {
        assert!(matches!(
            Server::new(shares),
            Err(crate::ShareError::BadJoin { .. })
        ));
    }
}

#[test]
fn the_listener_hears_of_name_changes_in_its_share_only() {
    use std::sync::atomic::AtomicUsize;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = two_shares(dir.path(), true);
    let heard = Arc::new(AtomicUsize::new(0));
    let counter = heard.clone();
    server
        .on_names_changed(
            0,
            Box::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .expect("listen");
    let upper = lookup(&server, abi::ROOT_ID, "0").expect("upper").nodeid;
    let (errno, _) = create(&server, upper, "f", 0o644, 0, 0);
    assert_eq!(errno, 0);
    assert_eq!(heard.load(Ordering::Relaxed), 1, "a create changes names");
    lookup(&server, upper, "f").expect("f");
    assert_eq!(heard.load(Ordering::Relaxed), 1, "a lookup does not");
    let mut w = Writer::default();
    w.raw(&name("f"));
    ok(&server, &request(abi::UNLINK, upper, &w.bytes));
    assert_eq!(heard.load(Ordering::Relaxed), 2);
    assert!(server.on_names_changed(0, Box::new(|| {})).is_err());
}

#[test]
fn locks_waiting_at_once_are_bounded_and_the_next_is_refused() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"0123456789").expect("write");
    let server = Arc::new(server_over(dir.path(), false));
    let a = lookup(&server, share_root(&server), "a").expect("a").nodeid;
    let fh = open(&server, a, libc::O_RDWR).expect("open");
    // The host holds the whole file: every lock the guest asks for waits.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("a"))
        .expect("open on the host");
    let mut whole = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    crate::sys::ofd_lock(held.as_raw_fd(), libc::F_OFD_SETLK, &mut whole).expect("host lock");

    let (mut guest, host) = std::os::unix::net::UnixStream::pair().expect("pair");
    crate::serve_stream(server, host).expect("serve");
    let asks: Vec<Vec<u8>> = (0..=crate::stream::MAX_WAITING_LOCKS)
        .map(|_| request(abi::SETLKW, a, &lk(fh, libc::F_WRLCK, 0, u64::MAX >> 1, 0)))
        .collect();
    for ask in &asks {
        guest.write_all(ask).expect("send");
    }
    guest
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reply = || {
        let mut header = [0u8; 16];
        guest.read_exact(&mut header).expect("a reply");
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4")) as usize;
        let mut body = vec![0u8; len - 16];
        guest.read_exact(&mut body).expect("its body");
        let error = i32::from_le_bytes(header[4..8].try_into().expect("4"));
        let unique = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        (unique, -error)
    };
    let last = asks.last().expect("asks");
    let last_unique = u64::from_le_bytes(last[8..16].try_into().expect("8"));
    // The one past the bound is refused at once, while the others wait.
    assert_eq!(reply(), (last_unique, libc::ENOLCK));
    // Once the host lets go, every waiting lock is granted.
    whole.l_type = libc::F_UNLCK as i16;
    crate::sys::ofd_lock(held.as_raw_fd(), libc::F_OFD_SETLK, &mut whole).expect("unlock");
    for _ in 0..crate::stream::MAX_WAITING_LOCKS {
        assert_eq!(reply().1, 0);
    }
}
