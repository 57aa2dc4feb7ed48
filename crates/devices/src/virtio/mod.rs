//! Virtio devices over the MMIO transport.
//!
//! A [`VirtioDevice`] says what it is (type, features, config space, queue sizes) and handles
//! its queues once the driver has set them up; [`mmio::MmioTransport`] is the register block
//! the guest driver talks to. Queue notifications are handled on the vCPU thread that wrote
//! `QueueNotify` (devices here do short, synchronous work); a device that receives from the
//! host (the console) has its own thread and takes the same lock.

pub mod balloon;
pub mod blk;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use lock_ext::{CondvarExt, LockExt};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::{GuestMemory, Irq, PersistError};

pub use fs::FsBackend;

/// Device ids (virtio 1.2, 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;

/// Feature bits every device here offers.
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt: a status word the driver reads and acknowledges, and a line.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Irq,
}

impl Interrupt {
    pub fn new(line: Irq) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// Tells the driver that used rings have new entries.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        self.line.trigger();
    }

    /// Tells the driver that the device's configuration changed.
    pub fn signal_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.line.trigger();
    }

    /// Sets status bits without raising the line (restoring a saved state).
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device needs to run: guest memory, its queues (as the driver set them up) and its
/// interrupt.
#[derive(Debug)]
pub struct Activation {
    pub mem: Arc<GuestMemory>,
    pub queues: Vec<Queue>,
    pub interrupt: Interrupt,
}

pub trait VirtioDevice: Send + std::fmt::Debug {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    /// The device-specific configuration space.
    fn config(&self) -> Vec<u8>;
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: the queues are ready.
    fn activate(&mut self, activation: Activation);
    /// The driver made buffers available on `queue`.
    fn notify(&mut self, queue: u16);
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The queues' positions as the running device has them (after activation the device
    /// owns the queues), for snapshots; `None` before activation.
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
    /// What the device holds beyond its queues (bytes for the guest, for one), in words, for
    /// [`mmio::MmioTransport::describe`]; empty by default.
    fn describe(&self) -> String {
        String::new()
    }
    /// The device's [`crate::Persist`] state (what it holds beyond the queues, which the transport
    /// saves), for snapshots.
    fn save_device(&self) -> DeviceState;
    /// Puts back what [`VirtioDevice::save_device`] gave; called after the transport has
    /// activated the device on its restored queues.
    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError>;
}

/// The [`crate::Persist`] state of each kind of virtio device, so that the transport can save the
/// device it holds (a trait object) and a state is never given to a device of another kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Balloon(balloon::BalloonState),
    Block(blk::BlockState),
    Console(console::ConsoleState),
    Fs(fs::FsState),
    Net(net::NetState),
    Rng(rng::RngState),
}

impl DeviceState {
    /// The virtio device type the state was saved from.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceState::Balloon(_) => balloon::TYPE_BALLOON,
            DeviceState::Block(_) => TYPE_BLOCK,
            DeviceState::Console(_) => TYPE_CONSOLE,
            DeviceState::Fs(_) => fs::TYPE_FS,
            DeviceState::Net(_) => net::TYPE_NET,
            DeviceState::Rng(_) => TYPE_RNG,
        }
    }

    /// The refusal of this state by a device of type `actual`.
    pub(crate) fn refused_by(&self, actual: u32) -> PersistError {
        PersistError::WrongDevice {
            saved: self.device_type(),
            actual,
        }
    }
}

/// A running device's state, shared by the vCPU threads that notify it and the device's own
/// host-side thread, with a condition each side signals when it made room or work for the
/// other (the guest posted buffers; the host took bytes).
#[derive(Debug)]
pub(crate) struct Shared<T> {
    pub(crate) state: Mutex<T>,
    progress: Condvar,
}

impl<T> Shared<T> {
    pub(crate) fn new(state: T) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(state),
            progress: Condvar::new(),
        })
    }

    /// Waits for the other side's progress (at most `timeout`, if given).
    pub(crate) fn wait<'a>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Option<std::time::Duration>,
    ) -> MutexGuard<'a, T> {
        match timeout {
            None => self.progress.wait_unpoisoned(guard),
            Some(t) => self.progress.wait_timeout_unpoisoned(guard, t).0,
        }
    }

    pub(crate) fn progressed(&self) {
        self.progress.notify_all();
    }
}

/// A running device's queues, for [`VirtioDevice::queue_states`].
pub(crate) fn queue_states_of<T>(
    shared: &Option<Arc<Shared<T>>>,
    queues: impl Fn(&T) -> &[Queue],
) -> Option<Vec<QueueState>> {
    let state = shared.as_ref()?.state.lock_unpoisoned();
    Some(queues(&state).iter().map(QueueState::of).collect())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueueState {
    pub fn of(queue: &Queue) -> Self {
        QueueState {
            size: queue.size(),
            ready: queue.ready(),
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    /// Puts this position and these addresses into `queue` (queue `index` of its device); a
    /// size or an address the queue refuses is an error, as is a ready queue whose rings are
    /// not in `mem`.
    pub fn apply(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<(), PersistError> {
        let refused = |what: &str, e: virtio_queue::Error| PersistError::Queue {
            index,
            reason: format!("{what}: {e}"),
        };
        queue
            .try_set_size(self.size)
            .map_err(|e| refused("size", e))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|e| refused("descriptor table", e))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|e| refused("available ring", e))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|e| refused("used ring", e))?;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_ready(self.ready);
        if self.ready && !queue.is_valid(mem) {
            return Err(PersistError::Queue {
                index,
                reason: "ready, but its rings are not in guest memory".into(),
            });
        }
        Ok(())
    }
}

/// Pops every available chain of `queue`, lets `handle` answer it (returning the number of
/// bytes it wrote into the chain), and signals the driver once if anything was used.
pub(crate) fn drain_queue(
    mem: &GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
) {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = handle(chain);
        if let Err(e) = queue.add_used(mem, head, written) {
            log::warn!("virtio: cannot add used entry: {e}");
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A driver's half of a virtqueue in test guest memory.

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use crate::{GuestMemory, IrqLine};

    pub const VIRTQ_DESC_F_NEXT: u16 = 1;
    pub const VIRTQ_DESC_F_WRITE: u16 = 2;

    #[derive(Debug, Default)]
    pub struct CountingIrq(pub AtomicU32);
    impl IrqLine for CountingIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl CountingIrq {
        pub fn count(&self) -> u32 {
            self.0.load(Ordering::SeqCst)
        }
    }

    pub fn memory() -> Arc<GuestMemory> {
        Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("test guest memory"),
        )
    }

    /// A buffer of a chain: its guest address, length and whether the device writes it.
    pub struct Buf {
        pub addr: u64,
        pub len: u32,
        pub device_writes: bool,
    }

    /// Puts one chain of `bufs` on the avail ring of `queue` at descriptor `first`.
    pub fn add_chain(
        mem: &GuestMemory,
        queue: &MockSplitQueue<GuestMemory>,
        first: u16,
        bufs: &[Buf],
    ) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut flags = if b.device_writes {
                    VIRTQ_DESC_F_WRITE
                } else {
                    0
                };
                if i + 1 < bufs.len() {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(
                    b.addr,
                    b.len,
                    flags,
                    first + i as u16 + 1,
                ))
            })
            .collect();
        queue
            .add_desc_chains(&descs, first)
            .expect("chain fits the queue");
        let _ = mem;
    }

    pub fn write(mem: &GuestMemory, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr))
            .expect("write test memory");
    }

    pub fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        mem.read_slice(&mut out, GuestAddress(addr))
            .expect("read test memory");
        out
    }
}
