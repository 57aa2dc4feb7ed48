//! A container's bind mounts, served live to its VM.
//!
//! One share server (crate `share`) per VM holds the host files and directories the
//! container binds; the guest mounts them as one filesystem whose entry `i` is share `i`
//! and binds each entry onto its destination. The server reaches the guest two ways:
//! the builtin VMM's virtio-fs device calls it in the VMM's own process (guest memory stays
//! the snapshot's private copy-on-write mapping), and on every engine the VM's `fs.0` port
//! carries what the guest agent relays from `/dev/fuse` where there is no virtio-fs (QEMU)
//! and the server's notifications of host-side changes. Both are attached after a restore,
//! like a NIC's tap: a snapshot never depends on them.

use std::sync::Arc;

use engine::{FsBackend, Vm};

use crate::rootfs::OverlayRenewer;
use crate::translate::Share;
use crate::ContainerError;

/// The share server of one VM.
#[derive(Clone)]
pub struct Shares {
    server: Arc<share::Server>,
}

impl std::fmt::Debug for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shares").finish_non_exhaustive()
    }
}

impl Shares {
    /// Opens every source now, so a source gone since `create` fails the start naming it.
    /// None when the container binds nothing: the guest never mounts the share then.
    pub fn open(shares: &[Share]) -> Result<Option<Shares>, ContainerError> {
        if shares.is_empty() {
            return Ok(None);
        }
        let server = share::Server::new(shares.iter().map(share::ShareSpec::from).collect())?;
        Ok(Some(Shares {
            server: Arc::new(server),
        }))
    }

    /// Has `renewer` hear of the guest's changes to the names in share `upper`, the host
    /// overlay's upper directory.
    pub fn renew_after_changes(
        &self,
        upper: u32,
        renewer: OverlayRenewer,
    ) -> Result<(), ContainerError> {
        self.server
            .on_names_changed(upper as usize, Box::new(move || renewer.changed()))
            .map_err(|e| ContainerError::Monitor(format!("shared root: {e}")))
    }

    /// The server as the builtin VMM's virtio-fs device calls it.
    pub fn backend(&self) -> Arc<dyn FsBackend> {
        Arc::new(Backend(Arc::clone(&self.server)))
    }

    /// Serves the VM's `fs.0` port: requests the guest relays, and the host-side changes the
    /// guest must hear of. Its threads end when the VM does.
    pub fn serve(&self, vm: &mut dyn Vm) -> Result<(), ContainerError> {
        let stream = vm.take_fs_channel().ok_or_else(|| {
            ContainerError::Monitor("the VM has no shared filesystem channel".into())
        })?;
        share::serve_stream(Arc::clone(&self.server), stream).map_err(|e| {
            ContainerError::Monitor(format!("serving the shared filesystem channel: {e}"))
        })
    }
}

struct Backend(Arc<share::Server>);

impl FsBackend for Backend {
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.0.handle(request)
    }
}
