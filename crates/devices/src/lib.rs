//! The builtin VMM's emulated devices.
//!
//! Devices know nothing about a hypervisor: a device is reached through [`BusDevice`] reads
//! and writes at offsets within its range, raises its interrupt through an [`IrqLine`], and
//! reads and writes guest memory through vm-memory. Each device (the serial port, the
//! virtio-mmio transport, every virtio device) saves what a snapshot needs as a plain,
//! serializable struct and puts it back through [`Persist`]; a state that does not fit the
//! device it is restored into is refused with a [`PersistError`], never ignored.

pub mod serial;
pub mod virtio;

use std::fmt;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

/// Filters the calling thread's system calls before it handles anything a guest sent: no
/// new process or program, namespace, mount, credential or capability (`jail::thread`; a
/// denied call kills the process). Every vCPU and device thread of the builtin VMM calls it
/// first. Not yet on other systems.
pub fn confine_thread() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        jail::thread::confine_this_thread().map_err(|e| e.to_string())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(())
    }
}

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
    /// Puts `state` back into this device (built as it was before the snapshot, with this
    /// VM's host resources). A state this device cannot carry on from is refused, and the
    /// device is then unfit to run: the restore as a whole fails.
    fn restore(&mut self, state: Self::State) -> Result<(), PersistError>;
}

/// Why a saved device state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the state of a virtio device of type {saved} cannot restore one of type {actual}")]
    WrongDevice { saved: u32, actual: u32 },
    #[error("the state has {saved} queues, the device {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    #[error("the device was running when saved, but its state is missing")]
    MissingDeviceState,
    #[error("the device was not running when saved, yet its state is there")]
    UnexpectedDeviceState,
    #[error("{what} was {saved} when saved, this VM's device has {actual}")]
    Mismatch {
        what: &'static str,
        saved: String,
        actual: String,
    },
    #[error("serial port: {0}")]
    Serial(String),
}

impl PersistError {
    pub(crate) fn mismatch(
        what: &'static str,
        saved: impl fmt::Debug,
        actual: impl fmt::Debug,
    ) -> Self {
        PersistError::Mismatch {
            what,
            saved: format!("{saved:?}"),
            actual: format!("{actual:?}"),
        }
    }
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
