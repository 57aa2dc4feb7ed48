//! The shared filesystem: a FUSE passthrough server over host files and directories, which
//! the guest mounts to see bind mounts and volumes live.
//!
//! This crate owns the FUSE protocol ([`abi`]), the request handler ([`Server`]) with its
//! confinement to the shared sources, the relay of host-side changes as FUSE notifications
//! ([`Server::watch`]), and serving a raw FUSE byte stream ([`serve_stream`]). It knows
//! nothing of virtio or of the engines: a transport hands it requests and sends its replies.
//!
//! The guest sees one filesystem: nodeid 1 is a synthetic read-only directory whose entries
//! "0", "1", … are the shares in the order given to [`Server::new`].

pub mod abi;
mod server;
mod stream;
mod sys;
mod watch;

use std::path::PathBuf;

pub use server::{NamesChanged, Server};
pub use stream::serve_stream;

/// One host source shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// A directory or a regular file on the host.
    pub source: PathBuf,
    /// Every modifying request on the share is refused on the host side (EROFS).
    pub read_only: bool,
    /// An earlier share this one is joined with: renames and hard links may cross between
    /// the two as within one share (the host still answers EXDEV across filesystems), and a
    /// host file reached through either is one node. A guest overlay needs this of its upper
    /// and work directories, which are two shares. Both must have the same `read_only`.
    pub joined_with: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot open shared source {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shared source {path} is neither a directory nor a regular file")]
    NotFileOrDirectory { path: PathBuf },
    #[error("cannot watch shared source {path} for host changes")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share {index} cannot be joined with share {with}: it must be an earlier share with the same read-only setting")]
    BadJoin { index: usize, with: usize },
    #[error("no share {0}")]
    NoSuchShare(usize),
    #[error("the server has a names-changed listener already")]
    AlreadyListened,
    #[error("the shares are already watched")]
    AlreadyWatched,
}

#[cfg(test)]
mod tests;
