//! The virtio-mmio transport (virtio 1.2, 4.2; register layout version 2).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::{Activation, DeviceState, Interrupt, QueueState, VirtioDevice, F_VERSION_1};
use crate::{BusDevice, GuestMemory, Irq, Persist, PersistError};

/// The size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x534d_4348; // "SMCH"

// Device status bits.
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;

/// The registers the driver has written, for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The type of the device behind the transport.
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueState>,
    /// The device's own state, once the driver has started it.
    pub device: Option<DeviceState>,
}

#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<GuestMemory>, irq: Irq) -> Self {
        let queues = new_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new(irq),
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    fn features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    /// Where the device and its driver are, for a person chasing a guest that stopped
    /// answering: the device type and status, the interrupt status, then per ready queue
    /// the device's next indexes beside the rings' own (in guest memory) and the driver's
    /// "no interrupt" flag; with what the device itself holds. An interrupt status left set
    /// with the driver's ring behind says an interrupt was lost; rings that agree with
    /// nothing pending say the guest did not ask.
    pub fn describe(&self) -> String {
        use vm_memory::{Bytes, GuestAddress};
        let ring = |addr: u64| -> String {
            let flags = self.mem.read_obj::<u16>(GuestAddress(addr));
            let idx = self.mem.read_obj::<u16>(GuestAddress(addr + 2));
            match (flags, idx) {
                (Ok(flags), Ok(idx)) => format!("{idx} (flags {flags})"),
                _ => "unreadable".into(),
            }
        };
        let queues = self.queue_states();
        let mut out = vec![format!(
            "type {} status {:#x} interrupt status {:#x}",
            self.device.device_type(),
            self.status,
            self.interrupt.status()
        )];
        for (index, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            out.push(format!(
                "q{index}: device next avail {} next used {}, ring avail {} used {}",
                q.next_avail,
                q.next_used,
                ring(q.avail_ring),
                ring(q.used_ring)
            ));
        }
        let device = self.device.describe();
        if !device.is_empty() {
            out.push(device);
        }
        out.join("; ")
    }

    /// The queues' positions: the running device's once activated (it owns the queues
    /// then), else the registers the driver has written.
    fn queue_states(&self) -> Vec<QueueState> {
        match self.device.queue_states() {
            Some(queues) if self.activated => queues,
            _ => self.queues.iter().map(QueueState::of).collect(),
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.as_ref());
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        self.status = status;
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FAILED == 0 && !self.activated {
            let offered = self.features();
            if self.driver_features & !offered != 0 {
                log::warn!(
                    "virtio-mmio: driver accepted features {:#x} not offered ({offered:#x})",
                    self.driver_features
                );
            }
            self.activated = true;
            self.device.activate(Activation {
                mem: self.mem.clone(),
                queues: self.queues.iter().map(copy_queue).collect(),
                interrupt: self.interrupt.clone(),
            });
        }
    }
}

impl Persist for MmioTransport {
    type State = TransportState;

    fn save(&self) -> TransportState {
        let queues = self.queue_states();
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
            device: self.activated.then(|| self.device.save_device()),
        }
    }

    /// Puts the registers and queues back and, if the driver had started the device,
    /// activates it on the restored queues and restores its own state (so it carries on
    /// where the saved one was).
    fn restore(&mut self, state: TransportState) -> Result<(), PersistError> {
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(PersistError::WrongDevice {
                saved: state.device_type,
                actual,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(PersistError::QueueCount {
                saved: state.queues.len(),
                actual: self.queues.len(),
            });
        }
        self.reset();
        for (index, (queue, saved)) in self.queues.iter_mut().zip(&state.queues).enumerate() {
            saved.apply(index, queue, &self.mem)?;
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt.ack(u32::MAX);
        self.interrupt.raise(state.interrupt_status);
        self.set_status(state.status);
        match (self.activated, state.device) {
            (true, Some(device)) => self.device.restore_device(device),
            (true, None) => Err(PersistError::MissingDeviceState),
            (false, Some(_)) => Err(PersistError::UnexpectedDeviceState),
            (false, None) => Ok(()),
        }
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
        .collect()
}

/// A copy of `queue` for the device to own once activated; the transport keeps its own (it
/// is the driver's view of the registers).
fn copy_queue(queue: &Queue) -> Queue {
    let mut copy = Queue::new(queue.max_size()).expect("the size of an existing queue");
    let state = QueueState::of(queue);
    copy.set_size(state.size);
    copy.set_desc_table_address(
        Some(state.desc_table as u32),
        Some((state.desc_table >> 32) as u32),
    );
    copy.set_avail_ring_address(
        Some(state.avail_ring as u32),
        Some((state.avail_ring >> 32) as u32),
    );
    copy.set_used_ring_address(
        Some(state.used_ring as u32),
        Some((state.used_ring >> 32) as u32),
    );
    copy.set_next_avail(state.next_avail);
    copy.set_next_used(state.next_used);
    copy.set_ready(state.ready);
    copy
}

fn write_u32(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let config = self.device.config();
            let start = (offset - 0x100) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let value = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => 0, // config generation: the config never changes under the driver
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        write_u32(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        let high = |q: &mut Queue| q.ready();
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 => {
                if let Some(q) = self.selected() {
                    q.set_size(value as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            0x50 => {
                if self.activated {
                    self.device.notify(value as u16);
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let Some(q) = self.selected() else { return };
                if high(q) {
                    log::warn!("virtio-mmio: queue address written while the queue is ready");
                    return;
                }
                match offset {
                    0x80 => q.set_desc_table_address(Some(value), None),
                    0x84 => q.set_desc_table_address(None, Some(value)),
                    0x90 => q.set_avail_ring_address(Some(value), None),
                    0x94 => q.set_avail_ring_address(None, Some(value)),
                    0xa0 => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            _ => log::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{memory, CountingIrq};
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Probe {
        activated: Option<usize>,
        notified: Vec<u16>,
        restored: bool,
    }

    #[derive(Debug)]
    struct FakeDevice(Arc<Mutex<Probe>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn config(&self) -> Vec<u8> {
            vec![0xaa, 0xbb, 0xcc, 0xdd]
        }
        fn activate(&mut self, activation: Activation) {
            self.0.lock().unwrap().activated = Some(activation.queues.len());
        }
        fn notify(&mut self, queue: u16) {
            self.0.lock().unwrap().notified.push(queue);
        }
        fn save_device(&self) -> DeviceState {
            DeviceState::Rng(crate::virtio::rng::RngState {})
        }
        fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
            match state {
                DeviceState::Rng(_) => {
                    self.0.lock().unwrap().restored = true;
                    Ok(())
                }
                other => Err(other.refused_by(42)),
            }
        }
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn a_driver_negotiates_sets_up_queues_and_notifies() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let irq = Arc::new(CountingIrq::default());
        let mut t = MmioTransport::new(Box::new(FakeDevice(probe.clone())), memory(), irq);
        assert_eq!(read32(&mut t, 0x00), MAGIC);
        assert_eq!(read32(&mut t, 0x04), 2);
        assert_eq!(read32(&mut t, 0x08), 42);
        write32(&mut t, 0x14, 0);
        assert_eq!(read32(&mut t, 0x10), 1 << 5);
        write32(&mut t, 0x14, 1);
        assert_eq!(read32(&mut t, 0x10), 1, "VIRTIO_F_VERSION_1 is offered");
        write32(&mut t, 0x30, 1);
        assert_eq!(read32(&mut t, 0x34), 8);
        write32(&mut t, 0x30, 2);
        assert_eq!(read32(&mut t, 0x34), 0, "no third queue");

        // Notifications before DRIVER_OK are dropped.
        write32(&mut t, 0x50, 0);
        for q in 0..2 {
            write32(&mut t, 0x30, q);
            write32(&mut t, 0x38, 8);
            write32(&mut t, 0x80, 0x1000 * (q + 1));
            write32(&mut t, 0x90, 0x1000 * (q + 1) + 0x400);
            write32(&mut t, 0xa0, 0x1000 * (q + 1) + 0x800);
            write32(&mut t, 0x44, 1);
            assert_eq!(read32(&mut t, 0x44), 1);
        }
        write32(&mut t, 0x70, 1 | 2 | 8 | 4);
        assert_eq!(probe.lock().unwrap().activated, Some(2));
        write32(&mut t, 0x50, 1);
        assert_eq!(probe.lock().unwrap().notified, vec![1]);

        let state = t.save();
        assert_eq!(state.queues[1].desc_table, 0x2000);
        assert_eq!(state.queues[1].used_ring, 0x2800);
        assert!(state.queues[0].ready);

        // A transport restored from that state is the same to the driver, and its device
        // runs again.
        let probe2 = Arc::new(Mutex::new(Probe::default()));
        let mut restored = MmioTransport::new(
            Box::new(FakeDevice(probe2.clone())),
            memory(),
            Arc::new(CountingIrq::default()),
        );
        restored.restore(state.clone()).unwrap();
        assert_eq!(restored.save(), state);
        assert!(
            probe2.lock().unwrap().restored,
            "the device got its own state"
        );
        assert_eq!(read32(&mut restored, 0x70), 1 | 2 | 8 | 4);
        assert_eq!(probe2.lock().unwrap().activated, Some(2));
        write32(&mut restored, 0x50, 0);
        assert_eq!(probe2.lock().unwrap().notified, vec![0]);

        // Config space reads at any width.
        let mut b = [0u8; 2];
        t.read(0x101, &mut b);
        assert_eq!(b, [0xbb, 0xcc]);

        // Reset: status 0 drops the queues' setup.
        write32(&mut t, 0x70, 0);
        assert_eq!(read32(&mut t, 0x70), 0);
        write32(&mut t, 0x30, 0);
        assert_eq!(read32(&mut t, 0x44), 0);
    }

    #[test]
    fn interrupt_status_is_acknowledged_by_the_driver() {
        let irq = Arc::new(CountingIrq::default());
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut t = MmioTransport::new(Box::new(FakeDevice(probe)), memory(), irq.clone());
        t.interrupt.signal_used();
        assert_eq!(irq.count(), 1);
        assert_eq!(read32(&mut t, 0x60), 1);
        write32(&mut t, 0x64, 1);
        assert_eq!(read32(&mut t, 0x60), 0);
    }

    /// A started transport's state, for the refusal tests to damage.
    fn started() -> (MmioTransport, TransportState) {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut t = MmioTransport::new(
            Box::new(FakeDevice(probe)),
            memory(),
            Arc::new(CountingIrq::default()),
        );
        for q in 0..2 {
            write32(&mut t, 0x30, q);
            write32(&mut t, 0x38, 8);
            write32(&mut t, 0x80, 0x1000 * (q + 1));
            write32(&mut t, 0x90, 0x1000 * (q + 1) + 0x400);
            write32(&mut t, 0xa0, 0x1000 * (q + 1) + 0x800);
            write32(&mut t, 0x44, 1);
        }
        write32(&mut t, 0x70, 1 | 2 | 8 | 4);
        let state = t.save();
        (t, state)
    }

    #[test]
    fn the_description_gives_each_ready_queue_as_device_and_driver_have_it() {
        use vm_memory::{Bytes, GuestAddress};
        let (t, _) = started();
        // The driver has made three buffers available on queue 1 (avail idx at +2) and the
        // device has not taken them: the gap a stall shows.
        t.mem
            .write_obj(3u16, GuestAddress(0x2000 + 0x400 + 2))
            .unwrap();
        t.interrupt.raise(crate::virtio::INT_USED_RING);
        let described = t.describe();
        assert!(
            described.contains("status 0xf interrupt status 0x1"),
            "{described}"
        );
        assert!(
            described
                .contains("q0: device next avail 0 next used 0, ring avail 0 (flags 0) used 0"),
            "{described}"
        );
        assert!(
            described
                .contains("q1: device next avail 0 next used 0, ring avail 3 (flags 0) used 0"),
            "{described}"
        );
    }

    fn refusal(state: TransportState) -> PersistError {
        let (mut fresh, _) = started();
        fresh.restore(state).unwrap_err()
    }

    #[test]
    fn corrupt_or_mismatched_transport_state_is_refused() {
        let (_, good) = started();
        assert!(good.device.is_some());

        let mut other_type = good.clone();
        other_type.device_type = 2;
        assert!(matches!(
            refusal(other_type),
            PersistError::WrongDevice {
                saved: 2,
                actual: 42
            }
        ));

        let mut one_queue = good.clone();
        one_queue.queues.pop();
        assert!(matches!(
            refusal(one_queue),
            PersistError::QueueCount {
                saved: 1,
                actual: 2
            }
        ));

        let mut bad_size = good.clone();
        bad_size.queues[1].size = 3;
        assert!(matches!(
            refusal(bad_size),
            PersistError::Queue { index: 1, .. }
        ));

        let mut outside_memory = good.clone();
        outside_memory.queues[0].used_ring = 0x1_0000_0000;
        assert!(matches!(
            refusal(outside_memory),
            PersistError::Queue { index: 0, .. }
        ));

        let mut no_device = good.clone();
        no_device.device = None;
        assert!(matches!(
            refusal(no_device),
            PersistError::MissingDeviceState
        ));

        let mut wrong_device = good.clone();
        wrong_device.device = Some(DeviceState::Net(crate::virtio::net::NetState {
            mac: [0; 6],
        }));
        assert!(matches!(
            refusal(wrong_device),
            PersistError::WrongDevice {
                saved: 1,
                actual: 42
            }
        ));

        let mut not_started = good;
        not_started.status = 1 | 2 | 8;
        assert!(matches!(
            refusal(not_started),
            PersistError::UnexpectedDeviceState
        ));
    }
}
