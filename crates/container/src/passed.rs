//! Descriptors the caller passes to a container's process beyond its stdio
//! (`--preserve-fds`, and systemd's `LISTEN_FDS`, as runc takes them): what each one is, and
//! the host's half of relaying it.
//!
//! A host descriptor cannot cross into the VM. The guest gets one of the same kind at the
//! same number (see `agent_proto::PassedKind`), and the process that holds the process's
//! stdio (the monitor for the container's first process, the process `exec` leaves for an
//! exec'd one) relays its bytes through the agent channel, as the process's stream of that
//! number: a pipe's bytes one way, a connected socket's both ways, and each connection
//! accepted on a listening socket as a stream of its own, paced by credit. What has no such
//! stand-in (a regular file, a directory, a device, a datagram socket) fails `create` or
//! `exec`, naming the descriptor.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use agent_proto::{PassedFd, PassedKind, ProcessId, Request, SocketFamily, Stream};
use lock_ext::LockExt;
use nix::sys::socket::{
    accept4, getpeername, getsockname, getsockopt, shutdown, sockopt, AddressFamily, Shutdown,
    SockFlag, SockType, SockaddrLike, SockaddrStorage,
};

use crate::agent_client::{AgentClient, REQUEST_TIMEOUT};
use crate::relay::{self, write_fd};

/// Connections to a passed listener relayed at once; one more is closed as it is accepted.
pub const MAX_CONNECTIONS: usize = 1024;

/// What the descriptor `fd` of this process is, as the guest can make it; an error says
/// what it is when the guest cannot.
pub fn classify(fd: RawFd) -> Result<PassedKind, String> {
    let stat =
        nix::sys::stat::fstat(fd).map_err(|e| format!("descriptor {fd} is not open ({e})"))?;
    // One inherited across `exec` is never close-on-exec: this one is the runtime's own (its
    // log, say), which took a number the caller left free.
    // SAFETY: F_GETFD takes no argument.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC != 0 {
        return Err(format!(
            "descriptor {fd} is not open (the caller passed none there)"
        ));
    }
    let what = |kind: &str| {
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| format!(" ({})", p.display()))
            .unwrap_or_default();
        format!(
            "descriptor {fd} is {kind}{target}: only pipes, stream sockets and /dev/null can \
             be passed into the container's VM"
        )
    };
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFIFO => {
            // SAFETY: F_GETFL takes no argument.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            match flags & libc::O_ACCMODE {
                libc::O_RDONLY => Ok(PassedKind::PipeReader),
                libc::O_WRONLY => Ok(PassedKind::PipeWriter),
                _ => Err(what("a FIFO open for both reading and writing")),
            }
        }
        libc::S_IFSOCK => {
            // SAFETY: the descriptor is open (fstat said so) and stays open for these calls;
            // the borrow lives only across them.
            let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let kind = getsockopt(&socket, sockopt::SockType).map_err(|e| format!("{fd}: {e}"))?;
            if kind != SockType::Stream {
                return Err(what(&format!("a {kind:?} socket")));
            }
            if getsockopt(&socket, sockopt::AcceptConn).unwrap_or(false) {
                let address: SockaddrStorage =
                    getsockname(fd).map_err(|e| format!("descriptor {fd}: {e}"))?;
                let family = match address.family() {
                    Some(AddressFamily::Unix) => SocketFamily::Unix,
                    Some(AddressFamily::Inet) => SocketFamily::Inet,
                    Some(AddressFamily::Inet6) => SocketFamily::Inet6,
                    other => return Err(what(&format!("a listening {other:?} socket"))),
                };
                return Ok(PassedKind::Listener { family });
            }
            if getpeername::<SockaddrStorage>(fd).is_err() {
                return Err(what("a stream socket neither connected nor listening"));
            }
            Ok(PassedKind::Connected)
        }
        libc::S_IFCHR if stat.st_rdev == libc::makedev(1, 3) => Ok(PassedKind::Null),
        libc::S_IFCHR => Err(what("a character device")),
        libc::S_IFBLK => Err(what("a block device")),
        libc::S_IFDIR => Err(what("a directory")),
        libc::S_IFREG => Err(what("a regular file")),
        _ => Err(what("of an unknown kind")),
    }
}

/// The host's ends of a process's passed streams, by stream: where the guest's bytes go.
#[derive(Debug, Default)]
pub struct HostEnds {
    ends: Mutex<HashMap<Stream, HostEnd>>,
    next_connection: AtomicU32,
}

#[derive(Debug)]
enum HostEnd {
    /// A descriptor the caller passed, written by the thread that reads the guest's
    /// frames (with back-pressure, as the process's stdout is). A socket is shut for
    /// writing at the guest's EOF; a pipe is closed.
    Passed { fd: Arc<OwnedFd>, socket: bool },
    /// A connection accepted on a passed listener: its own thread writes it and credits the
    /// guest, so that a client that stops reading stops only its connection.
    Connection(mpsc::Sender<Vec<u8>>),
}

impl HostEnds {
    /// Takes the guest's bytes of `stream`; empty bytes end it.
    pub fn output(&self, stream: Stream, bytes: &[u8]) {
        let mut ends = self.ends.lock_unpoisoned();
        let eof = bytes.is_empty();
        let fd = match ends.get(&stream) {
            None => return,
            Some(HostEnd::Connection(writer)) => {
                if writer.send(bytes.to_vec()).is_err() || eof {
                    ends.remove(&stream);
                }
                return;
            }
            Some(HostEnd::Passed { fd, socket }) => {
                if eof {
                    if *socket {
                        let _ = shutdown(fd.as_raw_fd(), Shutdown::Write);
                    }
                    // Closed once its reader (if any) lets go too.
                    ends.remove(&stream);
                    return;
                }
                Arc::clone(fd)
            }
        };
        // Not under the lock: the write may wait for the reader.
        drop(ends);
        if let Err(e) = write_fd(fd.as_raw_fd(), bytes) {
            log::debug!("passed stream {}: output dropped: {e}", stream.0);
            self.ends.lock_unpoisoned().remove(&stream);
        }
    }

    fn insert(&self, stream: Stream, fd: Arc<OwnedFd>, socket: bool) {
        self.ends
            .lock_unpoisoned()
            .insert(stream, HostEnd::Passed { fd, socket });
    }

    /// A connection's end: a thread writes what the guest sends and gives the guest credit
    /// for each write (see `Request::Credit`).
    fn insert_connection(&self, guest: &impl Guest, stream: Stream, fd: Arc<OwnedFd>) {
        let (writer, chunks) = mpsc::channel::<Vec<u8>>();
        let guest = guest.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("conn-out-{}", stream.0))
            .spawn(move || {
                for chunk in chunks {
                    if chunk.is_empty() {
                        let _ = shutdown(fd.as_raw_fd(), Shutdown::Write);
                        return;
                    }
                    if write_fd(fd.as_raw_fd(), &chunk).is_err() {
                        // The client went away: the guest's end of it closes too.
                        guest.send(stream, &[]);
                        return;
                    }
                    guest.credit(stream, chunk.len() as u32);
                }
            });
        match spawned {
            Ok(_) => {
                self.ends
                    .lock_unpoisoned()
                    .insert(stream, HostEnd::Connection(writer));
            }
            Err(e) => log::warn!("cannot start the writer of connection {}: {e}", stream.0),
        }
    }

    fn connections(&self) -> usize {
        self.ends
            .lock_unpoisoned()
            .keys()
            .filter(|s| s.is_connection())
            .count()
    }

    fn new_connection(&self) -> Stream {
        let n = self.next_connection.fetch_add(1, Ordering::Relaxed);
        Stream(
            Stream::FIRST_CONNECTION
                .wrapping_add(n)
                .max(Stream::FIRST_CONNECTION),
        )
    }
}

/// The guest side of a process's passed streams, as the relaying process reaches it: the
/// agent itself (the monitor, for the container's first process) or an exec session's
/// connection to the monitor (the process `exec` leaves, for an exec'd one).
pub trait Guest: Clone + Send + 'static {
    /// Sends bytes of `stream` (empty: its EOF); false once the guest is gone.
    fn send(&self, stream: Stream, bytes: &[u8]) -> bool;
    /// Opens `stream` as a new connection to the process's passed listener `listener`.
    fn connect(&self, listener: u32, stream: Stream) -> Result<(), String>;
    /// The host wrote `bytes` more of a connection's output.
    fn credit(&self, stream: Stream, bytes: u32);
    fn gone(&self) -> bool;
}

/// A process of the container, through the agent.
#[derive(Debug, Clone)]
pub struct AgentProcess {
    pub agent: AgentClient,
    pub process: ProcessId,
}

impl Guest for AgentProcess {
    fn send(&self, stream: Stream, bytes: &[u8]) -> bool {
        self.agent.send_input(self.process, stream, bytes).is_ok()
    }

    fn connect(&self, listener: u32, stream: Stream) -> Result<(), String> {
        let request = Request::Connect {
            process: self.process,
            listener,
            stream,
        };
        self.agent
            .request(request, REQUEST_TIMEOUT)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn credit(&self, stream: Stream, bytes: u32) {
        let _ = self.agent.notify(Request::Credit {
            process: self.process,
            stream,
            bytes,
        });
    }

    fn gone(&self) -> bool {
        self.agent.is_closed()
    }
}

/// Starts relaying a process's passed descriptors, which this process holds at the same
/// numbers (inherited from the runtime's command): a thread per host end that has bytes
/// for the guest, and one accepting connections per listener. They end with this process.
pub fn relay(guest: &impl Guest, passed: &[PassedFd], ends: &Arc<HostEnds>) {
    for p in passed {
        let stream = Stream::passed(p.fd);
        // SAFETY: the descriptor was passed to this process for this stream alone; nothing
        // else here uses or closes it.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(p.fd as RawFd) });
        match p.kind {
            PassedKind::PipeReader => pump(guest, stream, fd),
            PassedKind::PipeWriter => ends.insert(stream, fd, false),
            PassedKind::Connected => {
                ends.insert(stream, Arc::clone(&fd), true);
                pump(guest, stream, fd);
            }
            PassedKind::Listener { .. } => accept(guest, p.fd, fd, ends),
            PassedKind::Null => {}
        }
    }
}

/// Sends what `fd` gives to the guest as `stream`, then its EOF.
fn pump(guest: &impl Guest, stream: Stream, fd: Arc<OwnedFd>) {
    let guest = guest.clone();
    let name = format!("passed-{}", stream.0);
    relay::pump_input(&name, SharedReader(fd), false, move |bytes| {
        guest.send(stream, bytes)
    });
}

/// Reads a descriptor another thread may write (a connected socket's two directions).
struct SharedReader(Arc<OwnedFd>);

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        nix::unistd::read(self.0.as_raw_fd(), buf).map_err(std::io::Error::from)
    }
}

/// Accepts connections on a passed listener for as long as the guest is there; each
/// becomes a stream to a new connection to the guest's listener.
fn accept(guest: &impl Guest, listener_fd: u32, listener: Arc<OwnedFd>, ends: &Arc<HostEnds>) {
    let guest = guest.clone();
    let ends = Arc::clone(ends);
    let spawned = std::thread::Builder::new()
        .name(format!("accept-{listener_fd}"))
        .spawn(move || {
            while !guest.gone() {
                let connection = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor, owned from here on.
                    Ok(fd) => Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                    Err(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE) => {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                    Err(e) => {
                        log::debug!("passed listener {listener_fd}: accept: {e}");
                        return;
                    }
                };
                if ends.connections() >= MAX_CONNECTIONS {
                    log::warn!(
                        "passed listener {listener_fd}: {MAX_CONNECTIONS} connections are \
                         open; closing a new one"
                    );
                    continue;
                }
                let stream = ends.new_connection();
                ends.insert_connection(&guest, stream, Arc::clone(&connection));
                match guest.connect(listener_fd, stream) {
                    Ok(()) => pump(&guest, stream, connection),
                    Err(e) => {
                        log::debug!("passed listener {listener_fd}: connect in the guest: {e}");
                        ends.output(stream, &[]);
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the relay of passed listener {listener_fd}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// What `fd` is, made inheritable as a caller's descriptor would be.
    fn kind_of(fd: impl IntoRawFd) -> Result<PassedKind, String> {
        // SAFETY: the descriptor was just made, and is owned again (and closed) here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) };
        // SAFETY: F_SETFD with an integer argument, on an open descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
        classify(fd.as_raw_fd())
    }

    #[test]
    fn pipes_sockets_and_the_null_device_pass_and_the_rest_is_named() {
        let (read, write) = nix::unistd::pipe().unwrap();
        assert_eq!(kind_of(read), Ok(PassedKind::PipeReader));
        assert_eq!(kind_of(write), Ok(PassedKind::PipeWriter));
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(kind_of(a), Ok(PassedKind::Connected));
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("l")).unwrap();
        assert_eq!(
            kind_of(listener),
            Ok(PassedKind::Listener {
                family: SocketFamily::Unix
            })
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            kind_of(tcp),
            Ok(PassedKind::Listener {
                family: SocketFamily::Inet
            })
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(kind_of(null), Ok(PassedKind::Null));
        let file = std::fs::File::create(dir.path().join("file")).unwrap();
        let refused = kind_of(file).unwrap_err();
        assert!(refused.contains("a regular file"), "{refused}");
        assert!(refused.contains("/file"), "{refused}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let refused = kind_of(udp).unwrap_err();
        assert!(refused.contains("Datagram socket"), "{refused}");
        assert!(classify(100_000).unwrap_err().contains("not open"));
        let own = std::fs::File::open("/dev/null").unwrap();
        let refused = classify(own.as_raw_fd()).unwrap_err();
        assert!(refused.contains("not open"), "{refused}");
    }
}
