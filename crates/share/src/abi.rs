//! The FUSE wire protocol (Linux `include/uapi/linux/fuse.h`, protocol 7.x) as the server
//! reads and writes it: opcodes, flags, and every request and reply structure it uses.
//!
//! Requests are decoded field by field from little-endian bytes by [`Reader`], which checks
//! every length, so no input, however short or inconsistent, can make decoding panic or read
//! past the request. Replies are encoded by [`Writer`] the same way.

pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor version this server implements (every opcode it serves exists at 7.31).
pub const KERNEL_MINOR_VERSION: u32 = 31;
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER_SIZE: usize = 40;
pub const OUT_HEADER_SIZE: usize = 16;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const GETLK: u32 = 31;
pub const SETLK: u32 = 32;
pub const SETLKW: u32 = 33;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const LSEEK: u32 = 46;
pub const COPY_FILE_RANGE: u32 = 47;

// Notify codes (the `error` field of a notification's out header).
pub const NOTIFY_INVAL_INODE: i32 = 2;
pub const NOTIFY_INVAL_ENTRY: i32 = 3;
/// The project's guest-kernel extension: raise an fsnotify event in the guest.
pub const NOTIFY_FSNOTIFY: i32 = 64;

// fuse_setattr_in.valid
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;

// INIT flags.
pub const ASYNC_READ: u32 = 1 << 0;
pub const POSIX_LOCKS: u32 = 1 << 1;
pub const BIG_WRITES: u32 = 1 << 5;
pub const FLOCK_LOCKS: u32 = 1 << 10;
pub const AUTO_INVAL_DATA: u32 = 1 << 12;
pub const DO_READDIRPLUS: u32 = 1 << 13;
pub const READDIRPLUS_AUTO: u32 = 1 << 14;
pub const PARALLEL_DIROPS: u32 = 1 << 18;
pub const MAX_PAGES: u32 = 1 << 22;

pub const GETATTR_FH: u32 = 1 << 0;
pub const LK_FLOCK: u32 = 1 << 0;
pub const FSYNC_FDATASYNC: u32 = 1 << 0;

/// The largest READ or WRITE payload the server accepts (it tells the kernel in INIT).
pub const MAX_WRITE: u32 = 1 << 20;
pub const MAX_PAGES_COUNT: u16 = 256;

/// Little-endian, bounds-checked decoding of one request's bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

/// A request too short for what its opcode needs, or a name without its terminating NUL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(Malformed);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A NUL-terminated string (without its NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], Malformed> {
        let end = self.bytes.iter().position(|&b| b == 0).ok_or(Malformed)?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }
}

/// Little-endian encoding of a reply body.
#[derive(Debug, Default)]
pub struct Writer {
    pub bytes: Vec<u8>,
}

impl Writer {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }
    /// Zero bytes up to the next multiple of 8 (dirent records are 8-byte aligned).
    pub fn align8(&mut self) -> &mut Self {
        while self.bytes.len() & 7 != 0 {
            self.bytes.push(0);
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
        };
        // total_extlen and padding: no extension is negotiated, so they carry nothing.
        r.u16()?;
        r.u16()?;
        Ok(h)
    }

    pub fn write(&self, w: &mut Writer) {
        w.u32(self.len)
            .u32(self.opcode)
            .u64(self.unique)
            .u64(self.nodeid)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.pid)
            .u16(0)
            .u16(0);
    }
}

/// A whole message: out header (`len` covers the header and `body`) then `body`.
pub fn message(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let len = OUT_HEADER_SIZE + body.len();
    let mut w = Writer::default();
    w.u32(u32::try_from(len).unwrap_or(u32::MAX))
        .u32(error as u32)
        .u64(unique)
        .raw(body);
    w.bytes
}

/// `struct fuse_attr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    pub const SIZE: usize = 88;

    pub fn write(&self, w: &mut Writer) {
        w.u64(self.ino)
            .u64(self.size)
            .u64(self.blocks)
            .u64(self.atime)
            .u64(self.mtime)
            .u64(self.ctime)
            .u32(self.atimensec)
            .u32(self.mtimensec)
            .u32(self.ctimensec)
            .u32(self.mode)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(self.blksize)
            .u32(0);
    }

    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        let a = Attr {
            ino: r.u64()?,
            size: r.u64()?,
            blocks: r.u64()?,
            atime: r.u64()?,
            mtime: r.u64()?,
            ctime: r.u64()?,
            atimensec: r.u32()?,
            mtimensec: r.u32()?,
            ctimensec: r.u32()?,
            mode: r.u32()?,
            nlink: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            rdev: r.u32()?,
            blksize: r.u32()?,
        };
        r.u32()?;
        Ok(a)
    }
}

/// `struct fuse_entry_out`: a node and how long the kernel may cache its name and attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub valid_secs: u64,
    pub attr: Attr,
}

impl EntryOut {
    pub const SIZE: usize = 40 + Attr::SIZE;

    pub fn write(&self, w: &mut Writer) {
        w.u64(self.nodeid)
            .u64(self.generation)
            .u64(self.valid_secs)
            .u64(self.valid_secs)
            .u32(0)
            .u32(0);
        self.attr.write(w);
    }

    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        let nodeid = r.u64()?;
        let generation = r.u64()?;
        let valid_secs = r.u64()?;
        r.u64()?;
        r.u32()?;
        r.u32()?;
        Ok(EntryOut {
            nodeid,
            generation,
            valid_secs,
            attr: Attr::parse(r)?,
        })
    }
}

/// `struct fuse_attr_out`.
pub fn write_attr_out(w: &mut Writer, valid_secs: u64, attr: &Attr) {
    w.u64(valid_secs).u32(0).u32(0);
    attr.write(w);
}

#[derive(Debug, Clone, Copy)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
}

impl InitIn {
    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        // Kernels before 7.36 send only these four fields; later ones append flags2 and
        // reserved words that this server does not negotiate.
        Ok(InitIn {
            major: r.u32()?,
            minor: r.u32()?,
            max_readahead: r.u32()?,
            flags: r.u32()?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
}

impl InitOut {
    pub fn write(&self, w: &mut Writer) {
        w.u32(self.major)
            .u32(self.minor)
            .u32(self.max_readahead)
            .u32(self.flags)
            .u16(self.max_background)
            .u16(self.congestion_threshold)
            .u32(self.max_write)
            .u32(self.time_gran)
            .u16(self.max_pages)
            .u16(0) // map_alignment
            .u32(0); // flags2
        for _ in 0..7 {
            w.u32(0);
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl SetattrIn {
    pub const SIZE: usize = 88;

    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        let valid = r.u32()?;
        r.u32()?;
        let fh = r.u64()?;
        let size = r.u64()?;
        r.u64()?; // lock_owner
        let atime = r.u64()?;
        let mtime = r.u64()?;
        r.u64()?; // ctime
        let atimensec = r.u32()?;
        let mtimensec = r.u32()?;
        r.u32()?; // ctimensec
        let mode = r.u32()?;
        r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        r.u32()?;
        Ok(SetattrIn {
            valid,
            fh,
            size,
            atime,
            mtime,
            atimensec,
            mtimensec,
            mode,
            uid,
            gid,
        })
    }
}

/// `struct fuse_file_lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLock {
    pub start: u64,
    pub end: u64,
    pub typ: u32,
    pub pid: u32,
}

impl FileLock {
    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        Ok(FileLock {
            start: r.u64()?,
            end: r.u64()?,
            typ: r.u32()?,
            pid: r.u32()?,
        })
    }
    pub fn write(&self, w: &mut Writer) {
        w.u64(self.start).u64(self.end).u32(self.typ).u32(self.pid);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LkIn {
    pub fh: u64,
    pub owner: u64,
    pub lk: FileLock,
    pub lk_flags: u32,
}

impl LkIn {
    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        let fh = r.u64()?;
        let owner = r.u64()?;
        let lk = FileLock::parse(r)?;
        let lk_flags = r.u32()?;
        r.u32()?;
        Ok(LkIn {
            fh,
            owner,
            lk,
            lk_flags,
        })
    }
}

/// `struct fuse_notify_fsnotify_out` (the project's notify code 64), followed by the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsnotifyOut {
    pub parent: u64,
    pub child: u64,
    pub mask: u32,
    pub cookie: u32,
    pub name: Vec<u8>,
}

impl FsnotifyOut {
    pub fn write(&self, w: &mut Writer) {
        w.u64(self.parent)
            .u64(self.child)
            .u32(self.mask)
            .u32(self.cookie)
            .u32(u32::try_from(self.name.len()).unwrap_or(0))
            .u32(0)
            .raw(&self.name)
            .raw(&[0]);
    }

    pub fn parse(r: &mut Reader) -> Result<Self, Malformed> {
        let parent = r.u64()?;
        let child = r.u64()?;
        let mask = r.u32()?;
        let cookie = r.u32()?;
        let namelen = r.u32()? as usize;
        r.u32()?;
        let name = r.take(namelen)?.to_vec();
        Ok(FsnotifyOut {
            parent,
            child,
            mask,
            cookie,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_reads_past_the_end_instead_of_panicking() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), Err(Malformed));
        assert_eq!(r.u16(), Ok(0x0201));
        assert_eq!(r.u64(), Err(Malformed));
        assert_eq!(r.cstr(), Err(Malformed));
    }

    #[test]
    fn encoded_sizes_match_the_kernel_structures() {
        let mut w = Writer::default();
        Attr::default().write(&mut w);
        assert_eq!(w.bytes.len(), Attr::SIZE);
        let mut w = Writer::default();
        EntryOut {
            nodeid: 2,
            generation: 0,
            valid_secs: 1,
            attr: Attr::default(),
        }
        .write(&mut w);
        assert_eq!(w.bytes.len(), EntryOut::SIZE);
        let mut w = Writer::default();
        InitOut {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
            max_background: 0,
            congestion_threshold: 0,
            max_write: 0,
            time_gran: 1,
            max_pages: 0,
        }
        .write(&mut w);
        assert_eq!(w.bytes.len(), 64);
        let mut w = Writer::default();
        InHeader {
            len: 0,
            opcode: 0,
            unique: 0,
            nodeid: 0,
            uid: 0,
            gid: 0,
            pid: 0,
        }
        .write(&mut w);
        assert_eq!(w.bytes.len(), IN_HEADER_SIZE);
    }
}
