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

/// The kind of a filtered thread, for its system call allow list (`jail::thread`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// With the `ioctl` requests its hypervisor backend makes on it (`None`: any).
    Vcpu(Option<&'static [u64]>),
    DeviceIo,
    FileServer,
}

/// Filters the calling thread's system calls to its kind's list before it handles anything
/// a guest sent (`jail::thread`; a call outside it kills the process). Every vCPU and device
/// thread of the builtin VMM calls it first. Not yet on other systems.
pub fn confine_thread(kind: ThreadKind) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        let kind = match kind {
            ThreadKind::Vcpu(ioctls) => jail::thread::ThreadKind::Vcpu(ioctls),
            ThreadKind::DeviceIo => jail::thread::ThreadKind::DeviceIo,
            ThreadKind::FileServer => jail::thread::ThreadKind::FileServer,
        };
        jail::thread::confine_this_thread(kind).map_err(|e| e.to_string())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = kind;
        Ok(())
    }
}

type SpawnRequest = (
    String,
    ThreadKind,
    Box<dyn FnOnce() + Send>,
    std::sync::mpsc::Sender<std::io::Result<()>>,
);

/// The unfiltered thread that starts device threads (see [`spawn_confined`]).
static SPAWNER: std::sync::Mutex<Option<std::sync::mpsc::Sender<SpawnRequest>>> =
    std::sync::Mutex::new(None);

/// Starts the thread that starts device threads, once per process. The first call must come
/// from an unfiltered thread (the spawner would inherit a filter): the VMM makes it as it
/// creates a VM, before any vCPU runs; [`spawn_confined`] makes it if none was made.
pub fn start_spawner() -> std::io::Result<()> {
    spawner().map(drop)
}

/// The spawner's request channel, the spawner started first if it is not running.
fn spawner() -> std::io::Result<std::sync::mpsc::Sender<SpawnRequest>> {
    use lock_ext::LockExt;
    let mut spawner = SPAWNER.lock_unpoisoned();
    if let Some(requests) = &*spawner {
        return Ok(requests.clone());
    }
    let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("vmm-spawner".into())
        .spawn(move || {
            for (name, kind, work, reply) in rx {
                let spawned = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || match confine_thread(kind) {
                        Ok(()) => work(),
                        Err(e) => log::error!("{name}: {e}"),
                    });
                let _ = reply.send(spawned.map(drop));
            }
        })?;
    *spawner = Some(tx.clone());
    Ok(tx)
}

/// Starts a device thread named `name` under `kind`'s filter, running `work`. A thread
/// inherits its creator's filter, and filters only add up, so a vCPU (which activates
/// devices and hands work to them) cannot start a thread of another kind itself: the
/// spawner, an unfiltered thread, starts it.
pub fn spawn_confined(
    name: impl Into<String>,
    kind: ThreadKind,
    work: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let gone = || std::io::Error::other("the device thread spawner is gone");
    let (reply, answer) = std::sync::mpsc::channel();
    spawner()?
        .send((name.into(), kind, Box::new(work), reply))
        .map_err(|_| gone())?;
    answer.recv().unwrap_or_else(|_| Err(gone()))
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
