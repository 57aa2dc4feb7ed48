//! Descriptors the host passes to the container's first process beyond its stdio
//! (`--preserve-fds`, systemd's `LISTEN_FDS`). A host descriptor cannot cross into the VM, so
//! the guest makes one of the same kind at the same number and the agent relays its bytes as
//! the process's stream of that number: a pipe's other end, the other end of a socket pair,
//! or, for a listening socket, a listener on the guest's loopback that the agent connects to
//! once for each connection the host accepts.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use agent_proto::{PassedKind, SocketFamily};

use crate::spawn::pipe;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    bind, connect as connect_to, getsockname, listen, socket, socketpair, AddressFamily, Backlog,
    SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage, UnixAddr,
};

/// The agent's end of one passed descriptor.
#[derive(Debug)]
pub enum AgentEnd {
    /// The write end of the pipe the process reads: the host's bytes go in here.
    Input(OwnedFd),
    /// The read end of the pipe the process writes: its bytes come out here.
    Output(OwnedFd),
    /// The other end of the process's socket pair: bytes both ways.
    Both(OwnedFd),
    /// Where the process's listening socket listens, to connect to.
    Listener(SockaddrStorage),
    /// Nothing to relay (the null device).
    Nothing,
}

/// Makes the process's descriptor of `kind` (close-on-exec until the child places it) and the
/// agent's end of it.
pub fn make(kind: PassedKind) -> Result<(OwnedFd, AgentEnd), String> {
    match kind {
        PassedKind::PipeReader => {
            let (read, write) = pipe()?;
            Ok((read, AgentEnd::Input(write)))
        }
        PassedKind::PipeWriter => {
            let (read, write) = pipe()?;
            Ok((write, AgentEnd::Output(read)))
        }
        PassedKind::Connected => {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| format!("socketpair: {e}"))?;
            Ok((theirs, AgentEnd::Both(ours)))
        }
        PassedKind::Listener { family } => {
            let (listener, address) = listener(family)?;
            Ok((listener, AgentEnd::Listener(address)))
        }
        PassedKind::Null => {
            let null = std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| format!("open /dev/null: {e}"))?;
            Ok((null.into(), AgentEnd::Nothing))
        }
    }
}

/// A listening socket of `family` on the guest's loopback (Unix: an address the kernel picks
/// in the abstract namespace), and where it listens.
fn listener(family: SocketFamily) -> Result<(OwnedFd, SockaddrStorage), String> {
    let domain = address_family(family);
    let fd = socket(domain, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    let bound = match family {
        // An address of the family alone: the kernel binds an abstract name of its choice.
        SocketFamily::Unix => bind(fd.as_raw_fd(), &UnixAddr::new_unnamed()),
        SocketFamily::Inet => bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::LOCALHOST,
                0,
            )),
        ),
        SocketFamily::Inet6 => bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::LOCALHOST,
                0,
                0,
                0,
            )),
        ),
    };
    bound.map_err(|e| format!("bind a {family:?} listener on the guest's loopback: {e}"))?;
    listen(&fd, Backlog::MAXCONN).map_err(|e| format!("listen: {e}"))?;
    let address: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    Ok((fd, address))
}

fn address_family(family: SocketFamily) -> AddressFamily {
    match family {
        SocketFamily::Unix => AddressFamily::Unix,
        SocketFamily::Inet => AddressFamily::Inet,
        SocketFamily::Inet6 => AddressFamily::Inet6,
    }
}

/// A new connection to a passed listener, non-blocking once made: on the loopback a
/// connection is complete when `connect` returns, and sits in the listener's queue until
/// the process accepts it.
pub fn connect(address: &SockaddrStorage) -> Result<OwnedFd, String> {
    let domain = address
        .family()
        .ok_or_else(|| "the listener's address has no family".to_string())?;
    let fd = socket(domain, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    connect_to(fd.as_raw_fd(), address)
        .map_err(|e| format!("connect to the process's listener: {e}"))?;
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| format!("F_GETFL: {e}"))?;
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| format!("F_SETFL: {e}"))?;
    Ok(fd)
}

/// Runs in the child: puts each `(target, source)` at its target number, open across `exec`.
/// Every descriptor the child still needs (`keep`) first moves above the targets, so that no
/// target overwrites it; so does every source, so that no target overwrites a source not
/// yet placed.
pub fn place(passed: &[(RawFd, RawFd)], keep: &mut [&mut RawFd]) -> Result<(), String> {
    let Some(floor) = passed.iter().map(|&(target, _)| target + 1).max() else {
        return Ok(());
    };
    let above = |fd: RawFd| {
        // SAFETY: F_DUPFD_CLOEXEC takes an integer argument and returns a new descriptor.
        let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
        if moved < 0 {
            Err(format!(
                "move descriptor {fd} above {floor}: {}",
                std::io::Error::last_os_error()
            ))
        } else {
            Ok(moved)
        }
    };
    for fd in keep.iter_mut() {
        **fd = above(**fd)?;
    }
    let moved = passed
        .iter()
        .map(|&(target, source)| above(source).map(|source| (target, source)))
        .collect::<Result<Vec<_>, _>>()?;
    for (target, source) in moved {
        // SAFETY: dup2 onto a number this child owns; the copy is open across exec.
        if unsafe { libc::dup2(source, target) } < 0 {
            return Err(format!(
                "place passed descriptor {target}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;

    /// A descriptor number from an owned one, kept open.
    fn leak(fd: OwnedFd) -> RawFd {
        std::os::fd::IntoRawFd::into_raw_fd(fd)
    }

    #[test]
    fn a_connection_to_a_passed_listener_reaches_the_process_end() {
        for family in [SocketFamily::Unix, SocketFamily::Inet] {
            let (listening, end) = make(PassedKind::Listener { family }).expect("listener");
            let AgentEnd::Listener(address) = end else {
                panic!("{family:?}: not a listener: {end:?}");
            };
            let ours = connect(&address).expect("connect");
            // SAFETY: accept returns a new descriptor this test then owns.
            let accepted = unsafe {
                OwnedFd::from_raw_fd(
                    nix::sys::socket::accept(listening.as_raw_fd()).expect("accept"),
                )
            };
            let mut theirs = UnixStream::from(accepted);
            let mut ours = std::fs::File::from(ours);
            theirs.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            let mut got = 0;
            while got < 4 {
                match ours.read(&mut buf[got..]) {
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("{family:?}: read: {e}"),
                }
            }
            assert_eq!(&buf, b"ping", "{family:?}");
        }
    }

    #[test]
    fn placing_swaps_descriptors_and_keeps_the_ones_still_needed() {
        // Two pipes whose read ends are placed at each other's numbers, and a kept
        // descriptor sitting on one of the targets.
        let (a_read, a_write) = pipe().unwrap();
        let (b_read, b_write) = pipe().unwrap();
        let (a, b) = (leak(a_read), leak(b_read));
        let (kept_read, kept_write) = pipe().unwrap();
        let mut kept = leak(kept_write);
        // Runs in this process (no child): the numbers a and b swap.
        place(&[(b, a), (a, b)], &mut [&mut kept]).expect("place");
        assert!(kept > a.max(b), "kept {kept} not above {a} and {b}");
        let mut a_write = std::fs::File::from(a_write);
        let mut b_write = std::fs::File::from(b_write);
        a_write.write_all(b"A").unwrap();
        b_write.write_all(b"B").unwrap();
        // SAFETY: place left open descriptors at a and b, now owned here.
        let (mut at_a, mut at_b) =
            unsafe { (std::fs::File::from_raw_fd(a), std::fs::File::from_raw_fd(b)) };
        let mut byte = [0u8; 1];
        at_a.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"B");
        at_b.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"A");
        // SAFETY: `kept` is the moved write end of the kept pipe.
        let mut kept = unsafe { std::fs::File::from_raw_fd(kept) };
        kept.write_all(b"K").unwrap();
        std::fs::File::from(kept_read)
            .read_exact(&mut byte)
            .unwrap();
        assert_eq!(&byte, b"K");
    }
}
