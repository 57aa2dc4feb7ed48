//! The builtin VMM's emulated devices.
//!
//! Devices know nothing about a hypervisor: a device is reached through [`BusDevice`] reads
//! and writes at offsets within its range, raises its interrupt through an [`IrqLine`], and
//! reads and writes guest memory through vm-memory. Each device keeps what a snapshot needs
//! in a plain, serializable struct ([`Persist`]).

pub mod serial;
pub mod virtio;

use std::fmt;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Something the vCPUs reach by port I/O or MMIO at an offset within its range.
pub trait BusDevice: Send + fmt::Debug {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// An interrupt line a device raises (edge): an irqfd, or a hypervisor call.
pub trait IrqLine: Send + Sync + fmt::Debug {
    fn trigger(&self);
}

pub type Irq = Arc<dyn IrqLine>;

/// Save and restore of a device's state, for snapshots.
pub trait Persist {
    type State: serde::Serialize + serde::de::DeserializeOwned;
    fn save(&self) -> Self::State;
    fn restore(&mut self, state: Self::State);
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
}
