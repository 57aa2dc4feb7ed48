//! virtio-console with the multiport feature and one named port backed by a Unix socket: the
//! host↔agent channel. The guest sees `/dev/vportNp1` named `agent.0` (what the QEMU engine's
//! `virtserialport` gives it, so the agent does not know which engine runs it).
//!
//! The port is "open" (VIRTIO_CONSOLE_PORT_OPEN) while the host end of the socket is; when
//! the host closes it the guest reads end-of-file, as with QEMU.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use lock_ext::LockExt;
use virtio_queue::Queue;

use super::{drain_queue, Activation, DeviceState, Interrupt, Shared, VirtioDevice, TYPE_CONSOLE};
use crate::{GuestMemory, Persist, PersistError};

const F_MULTIPORT: u64 = 1 << 1;

// Control events (virtio 1.2, 5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// The port the agent channel lives on (port 0 would be a console; it is not added).
const PORT: u32 = 1;
const MAX_PORTS: u32 = 2;
const QUEUE_SIZE: u16 = 64;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
const PORT_RX: usize = 4;
const PORT_TX: usize = 5;
/// Host bytes buffered before the reader thread waits for the guest to take some.
const RX_BUFFER_LIMIT: usize = 1 << 20;

#[derive(Debug)]
struct Inner {
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    control_out: VecDeque<Vec<u8>>,
    rx_pending: VecDeque<u8>,
    host_open: bool,
    guest_ready: bool,
}

impl Inner {
    fn control(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) {
        let mut msg = id.to_le_bytes().to_vec();
        msg.extend(event.to_le_bytes());
        msg.extend(value.to_le_bytes());
        msg.extend(payload);
        self.control_out.push_back(msg);
    }

    /// Moves queued control messages into the guest's control receive buffers.
    fn flush_control(&mut self) {
        let mem = self.mem.clone();
        let Inner {
            queues,
            interrupt,
            control_out,
            ..
        } = self;
        fill_queue(&mem, &mut queues[CONTROL_RX], interrupt, |room| {
            let msg = control_out.pop_front()?;
            if msg.len() > room {
                log::warn!("virtio-console: control buffer too small ({room} bytes)");
            }
            Some(msg)
        });
    }

    fn flush_rx(&mut self) {
        let mem = self.mem.clone();
        let Inner {
            queues,
            interrupt,
            rx_pending,
            ..
        } = self;
        fill_queue(&mem, &mut queues[PORT_RX], interrupt, |room| {
            if rx_pending.is_empty() {
                return None;
            }
            let n = room.min(rx_pending.len());
            Some(rx_pending.drain(..n).collect())
        });
    }

    fn handle_control_tx(&mut self) {
        let mem = self.mem.clone();
        let mut received = Vec::new();
        let Inner {
            queues, interrupt, ..
        } = self;
        drain_queue(&mem, &mut queues[CONTROL_TX], interrupt, |chain| {
            let mut msg = Vec::new();
            if let Ok(mut reader) = chain.reader(&mem) {
                let _ = reader.read_to_end(&mut msg);
            }
            if msg.len() >= 8 {
                received.push(msg);
            }
            0
        });
        for msg in received {
            let id = u32::from_le_bytes(msg[0..4].try_into().expect("4 bytes"));
            let event = u16::from_le_bytes(msg[4..6].try_into().expect("2 bytes"));
            let value = u16::from_le_bytes(msg[6..8].try_into().expect("2 bytes"));
            match event {
                DEVICE_READY if value == 1 => self.control(PORT, DEVICE_ADD, 0, &[]),
                PORT_READY if id == PORT && value == 1 => {
                    self.guest_ready = true;
                    self.control(PORT, PORT_NAME, 0, AGENT_PORT_NAME.as_bytes());
                    if self.host_open {
                        self.control(PORT, PORT_OPEN, 1, &[]);
                    }
                }
                PORT_OPEN => log::debug!("virtio-console: guest port {id} open={value}"),
                other => log::debug!("virtio-console: control event {other} ({id}, {value})"),
            }
        }
        self.flush_control();
    }
}

/// Fills available device-writable buffers of `queue` with what `next(room)` gives.
fn fill_queue(
    mem: &GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut next: impl FnMut(usize) -> Option<Vec<u8>>,
) {
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let Ok(mut writer) = chain.writer(mem) else {
            break;
        };
        let Some(bytes) = next(writer.available_bytes()) else {
            // Nothing to send: give the buffer back.
            queue.go_to_previous_position();
            break;
        };
        let n = bytes.len().min(writer.available_bytes());
        let _ = writer.write_all(&bytes[..n]);
        if queue.add_used(mem, head, n as u32).is_err() {
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// What a running console holds beyond its queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// The guest's driver has opened the port.
    pub guest_ready: bool,
    /// Control messages for the guest not yet delivered.
    pub control_out: Vec<Vec<u8>>,
    /// Bytes from the host not yet delivered.
    pub rx_pending: Vec<u8>,
}

impl Persist for Console {
    type State = ConsoleState;

    fn save(&self) -> ConsoleState {
        let Some(shared) = &self.shared else {
            return ConsoleState::default();
        };
        let inner = shared.state.lock_unpoisoned();
        ConsoleState {
            guest_ready: inner.guest_ready,
            control_out: inner.control_out.iter().cloned().collect(),
            rx_pending: inner.rx_pending.iter().copied().collect(),
        }
    }

    /// The port stays open to the guest: the restored VM's socket is a new host end, and the
    /// agent simply hears a new host on it (nothing in the guest relies on a connection
    /// surviving a snapshot).
    fn restore(&mut self, state: ConsoleState) -> Result<(), PersistError> {
        let Some(shared) = &self.shared else {
            // Only a running console has anything to restore into (the transport restores
            // device state after activation).
            return Err(PersistError::UnexpectedDeviceState);
        };
        let mut inner = shared.state.lock_unpoisoned();
        inner.guest_ready = state.guest_ready;
        inner.control_out.extend(state.control_out);
        inner.rx_pending.extend(state.rx_pending);
        inner.flush_control();
        inner.flush_rx();
        Ok(())
    }
}

/// The name the agent looks for.
pub const AGENT_PORT_NAME: &str = "agent.0";

#[derive(Debug)]
pub struct Console {
    socket: UnixStream,
    shared: Option<Arc<Shared<Inner>>>,
}

impl Console {
    /// `socket` is the device's end of the host↔agent channel.
    pub fn new(socket: UnixStream) -> Self {
        Console {
            socket,
            shared: None,
        }
    }

    fn start_reader(&self, shared: Arc<Shared<Inner>>) -> std::io::Result<()> {
        let mut socket = self.socket.try_clone()?;
        std::thread::Builder::new()
            .name("virtio-console".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = socket.read(&mut buf).unwrap_or(0);
                    let mut inner = shared.state.lock_unpoisoned();
                    if n == 0 {
                        inner.host_open = false;
                        if inner.guest_ready {
                            inner.control(PORT, PORT_OPEN, 0, &[]);
                            inner.flush_control();
                        }
                        return;
                    }
                    inner.rx_pending.extend(&buf[..n]);
                    inner.flush_rx();
                    while inner.rx_pending.len() > RX_BUFFER_LIMIT {
                        inner = shared.wait(inner, None);
                    }
                }
            })?;
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        super::queue_states_of(&self.shared, |inner| &inner.queues)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2 + 2 * MAX_PORTS as usize]
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Console(self.save())
    }

    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Console(state) => self.restore(state),
            other => Err(other.refused_by(TYPE_CONSOLE)),
        }
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    fn config(&self) -> Vec<u8> {
        let mut config = vec![0u8; 12];
        config[4..8].copy_from_slice(&MAX_PORTS.to_le_bytes());
        config
    }

    fn activate(&mut self, activation: Activation) {
        let shared = Shared::new(Inner {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            control_out: VecDeque::new(),
            rx_pending: VecDeque::new(),
            host_open: true,
            guest_ready: false,
        });
        if let Err(e) = self.start_reader(shared.clone()) {
            log::error!("virtio-console: cannot start the host reader: {e}");
        }
        self.shared = Some(shared);
    }

    fn notify(&mut self, queue: u16) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let mut inner = shared.state.lock_unpoisoned();
        match queue as usize {
            CONTROL_TX => inner.handle_control_tx(),
            CONTROL_RX => inner.flush_control(),
            PORT_RX => {
                inner.flush_rx();
                shared.progressed();
            }
            PORT_TX => {
                let mem = inner.mem.clone();
                let mut out = Vec::new();
                let Inner {
                    queues, interrupt, ..
                } = &mut *inner;
                drain_queue(&mem, &mut queues[PORT_TX], interrupt, |chain| {
                    if let Ok(mut reader) = chain.reader(&mem) {
                        let _ = reader.read_to_end(&mut out);
                    }
                    0
                });
                drop(inner);
                // A closed host end drops what the guest writes, as a hung-up port does.
                if let Err(e) = self.socket.write_all(&out) {
                    log::debug!("virtio-console: host end gone: {e}");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, read, write, Buf, CountingIrq};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
        let mut m = id.to_le_bytes().to_vec();
        m.extend(event.to_le_bytes());
        m.extend(value.to_le_bytes());
        m
    }

    #[test]
    fn the_port_is_announced_named_opened_and_carries_bytes_both_ways() {
        let mem = memory();
        // Six queues, each in its own 8 KiB of test memory.
        let vqs: Vec<MockSplitQueue<GuestMemory>> = (0..6)
            .map(|i| MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2000 * i), 16))
            .collect();
        let (host, device_end) = UnixStream::pair().unwrap();
        let irq = Arc::new(CountingIrq::default());
        let mut console = Console::new(device_end);
        console.activate(Activation {
            mem: mem.clone(),
            queues: vqs
                .iter()
                .map(|q| q.create_queue::<Queue>().unwrap())
                .collect(),
            interrupt: Interrupt::new(irq.clone()),
        });

        // The driver gives control receive buffers, then says DEVICE_READY.
        for i in 0..4u16 {
            add_chain(
                &mem,
                &vqs[CONTROL_RX],
                i,
                &[Buf {
                    addr: 0x40000 + 0x100 * u64::from(i),
                    len: 0x100,
                    device_writes: true,
                }],
            );
        }
        write(&mem, 0x50000, &control(0, DEVICE_READY, 1));
        add_chain(
            &mem,
            &vqs[CONTROL_TX],
            0,
            &[Buf {
                addr: 0x50000,
                len: 8,
                device_writes: false,
            }],
        );
        console.notify(CONTROL_TX as u16);
        assert_eq!(read(&mem, 0x40000, 8), control(PORT, DEVICE_ADD, 0));

        write(&mem, 0x50100, &control(PORT, PORT_READY, 1));
        add_chain(
            &mem,
            &vqs[CONTROL_TX],
            1,
            &[Buf {
                addr: 0x50100,
                len: 8,
                device_writes: false,
            }],
        );
        console.notify(CONTROL_TX as u16);
        let name = read(&mem, 0x40100, 8 + AGENT_PORT_NAME.len());
        assert_eq!(name[..8], control(PORT, PORT_NAME, 0));
        assert_eq!(&name[8..], AGENT_PORT_NAME.as_bytes());
        assert_eq!(read(&mem, 0x40200, 8), control(PORT, PORT_OPEN, 1));

        // Guest -> host.
        write(&mem, 0x60000, b"ping");
        add_chain(
            &mem,
            &vqs[PORT_TX],
            0,
            &[Buf {
                addr: 0x60000,
                len: 4,
                device_writes: false,
            }],
        );
        console.notify(PORT_TX as u16);
        let mut got = [0u8; 4];
        (&host).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        // Host -> guest: the reader thread fills the receive buffer the guest posted.
        add_chain(
            &mem,
            &vqs[PORT_RX],
            0,
            &[Buf {
                addr: 0x70000,
                len: 64,
                device_writes: true,
            }],
        );
        console.notify(PORT_RX as u16);
        (&host).write_all(b"pong").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read(&mem, 0x70000, 4) != b"pong" {
            assert!(
                std::time::Instant::now() < deadline,
                "host bytes never arrived"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        // A console restored from this one's state and queue positions, on a new host
        // socket (as after a snapshot), carries on where it was.
        let saved = console.save();
        assert!(saved.guest_ready);
        let queues = console.queue_states().unwrap();
        let (host2, device2) = UnixStream::pair().unwrap();
        let mut restored = Console::new(device2);
        restored.activate(Activation {
            mem: mem.clone(),
            queues: vqs
                .iter()
                .zip(&queues)
                .enumerate()
                .map(|(i, (q, state))| {
                    let mut queue = q.create_queue::<Queue>().unwrap();
                    state.apply(i, &mut queue, &mem).unwrap();
                    queue
                })
                .collect(),
            interrupt: Interrupt::new(irq.clone()),
        });
        restored.restore(saved.clone()).unwrap();
        assert_eq!(restored.save(), saved);
        write(&mem, 0x60100, b"again");
        add_chain(
            &mem,
            &vqs[PORT_TX],
            1,
            &[Buf {
                addr: 0x60100,
                len: 5,
                device_writes: false,
            }],
        );
        restored.notify(PORT_TX as u16);
        let mut got = [0u8; 5];
        (&host2).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"again", "only the new write reaches the new host");

        // The new host hangs up: the guest is told the port closed (the restored device
        // knows the guest's port is ready).
        drop(host2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read(&mem, 0x40300, 8) != control(PORT, PORT_OPEN, 0) {
            assert!(std::time::Instant::now() < deadline, "no PORT_OPEN 0");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(host);
    }

    #[test]
    fn a_console_refuses_another_devices_state_and_state_before_it_runs() {
        let (_host, device_end) = UnixStream::pair().unwrap();
        let mut console = Console::new(device_end);
        let err = console
            .restore_device(DeviceState::Rng(crate::virtio::rng::RngState {}))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::WrongDevice {
                    saved: 4,
                    actual: 3
                }
            ),
            "{err}"
        );
        let err = console.restore(ConsoleState::default()).unwrap_err();
        assert!(matches!(err, PersistError::UnexpectedDeviceState), "{err}");
    }
}
