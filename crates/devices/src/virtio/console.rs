//! virtio-console with the multiport feature and named ports, each backed by a Unix socket:
//! port 1 `agent.0` is the host↔agent channel, port 2 `fs.0` carries the shared
//! filesystem's FUSE messages. The guest sees `/dev/vportNp1`, `/dev/vportNp2` with those
//! names (what the QEMU engine's `virtserialport`s give it, so the agent does not know which
//! engine runs it).
//!
//! A port is "open" (VIRTIO_CONSOLE_PORT_OPEN) while the host end of its socket is; when
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

const QUEUE_SIZE: u16 = 64;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
/// Host bytes buffered per port before its reader thread waits for the guest to take some.
const RX_BUFFER_LIMIT: usize = 1 << 20;

/// The name the agent looks for.
pub const AGENT_PORT_NAME: &str = "agent.0";
/// The port of the shared filesystem's FUSE messages.
pub const FS_PORT_NAME: &str = "fs.0";

/// The guest's id of the port at `index` in the device's list: port 0 would be a console
/// and is not added, so the first named port is 1.
fn port_id(index: usize) -> u32 {
    index as u32 + 1
}

/// The receive queue of port `id` (its transmit queue is the next one); the control queues
/// sit between port 0's and port 1's.
fn rx_queue(id: u32) -> usize {
    if id == 0 {
        0
    } else {
        2 + 2 * id as usize
    }
}

/// A named port and the device's end of its host socket.
#[derive(Debug)]
pub struct NamedPort {
    pub name: String,
    pub socket: UnixStream,
}

#[derive(Debug)]
struct PortInner {
    name: String,
    rx_pending: VecDeque<u8>,
    host_open: bool,
    guest_ready: bool,
}

#[derive(Debug)]
struct Inner {
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    control_out: VecDeque<Vec<u8>>,
    ports: Vec<PortInner>,
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

    /// Moves the host bytes of the port at `index` into its receive buffers.
    fn flush_rx(&mut self, index: usize) {
        let mem = self.mem.clone();
        let Inner {
            queues,
            interrupt,
            ports,
            ..
        } = self;
        let rx_pending = &mut ports[index].rx_pending;
        fill_queue(
            &mem,
            &mut queues[rx_queue(port_id(index))],
            interrupt,
            |room| {
                if rx_pending.is_empty() {
                    return None;
                }
                let n = room.min(rx_pending.len());
                Some(rx_pending.drain(..n).collect())
            },
        );
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
            let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
            let event = u16::from_le_bytes([msg[4], msg[5]]);
            let value = u16::from_le_bytes([msg[6], msg[7]]);
            let index = (id as usize)
                .checked_sub(1)
                .filter(|&i| i < self.ports.len());
            match (event, index) {
                (DEVICE_READY, _) if value == 1 => {
                    for i in 0..self.ports.len() {
                        self.control(port_id(i), DEVICE_ADD, 0, &[]);
                    }
                }
                (PORT_READY, Some(i)) if value == 1 => {
                    let port = &mut self.ports[i];
                    port.guest_ready = true;
                    let (name, open) = (port.name.clone(), port.host_open);
                    self.control(id, PORT_NAME, 0, name.as_bytes());
                    if open {
                        self.control(id, PORT_OPEN, 1, &[]);
                    }
                }
                (PORT_OPEN, _) => log::debug!("virtio-console: guest port {id} open={value}"),
                (other, _) => {
                    log::debug!("virtio-console: control event {other} ({id}, {value})")
                }
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
    /// Control messages for the guest not yet delivered.
    pub control_out: Vec<Vec<u8>>,
    /// Each port, in id order.
    pub ports: Vec<PortState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortState {
    pub name: String,
    /// The guest's driver has opened the port.
    pub guest_ready: bool,
    /// Bytes from the host not yet delivered.
    pub rx_pending: Vec<u8>,
}

impl Persist for Console {
    type State = ConsoleState;

    fn save(&self) -> ConsoleState {
        let Some(shared) = &self.shared else {
            return ConsoleState {
                control_out: Vec::new(),
                ports: self
                    .ports
                    .iter()
                    .map(|port| PortState {
                        name: port.name.clone(),
                        ..PortState::default()
                    })
                    .collect(),
            };
        };
        let inner = shared.state.lock_unpoisoned();
        ConsoleState {
            control_out: inner.control_out.iter().cloned().collect(),
            ports: inner
                .ports
                .iter()
                .map(|port| PortState {
                    name: port.name.clone(),
                    guest_ready: port.guest_ready,
                    rx_pending: port.rx_pending.iter().copied().collect(),
                })
                .collect(),
        }
    }

    /// The ports stay open to the guest: the restored VM's sockets are new host ends, and
    /// the agent simply hears a new host on them (nothing in the guest relies on a
    /// connection surviving a snapshot). A state with other ports is refused.
    fn restore(&mut self, state: ConsoleState) -> Result<(), PersistError> {
        let saved: Vec<&str> = state.ports.iter().map(|p| p.name.as_str()).collect();
        let actual: Vec<&str> = self.ports.iter().map(|p| p.name.as_str()).collect();
        if saved != actual {
            return Err(PersistError::mismatch("the console's ports", saved, actual));
        }
        let Some(shared) = &self.shared else {
            // Only a running console has anything to restore into (the transport restores
            // device state after activation).
            return Err(PersistError::UnexpectedDeviceState);
        };
        let mut inner = shared.state.lock_unpoisoned();
        inner.control_out.extend(state.control_out);
        for (port, saved) in inner.ports.iter_mut().zip(state.ports) {
            port.guest_ready = saved.guest_ready;
            port.rx_pending.extend(saved.rx_pending);
        }
        inner.flush_control();
        for index in 0..inner.ports.len() {
            inner.flush_rx(index);
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Console {
    ports: Vec<NamedPort>,
    queue_sizes: Vec<u16>,
    shared: Option<Arc<Shared<Inner>>>,
}

impl Console {
    /// A console with `ports`, given ids 1, 2, … in order.
    pub fn new(ports: Vec<NamedPort>) -> Self {
        // Port 0's queues, the control queues, then a pair per named port.
        let queue_sizes = vec![QUEUE_SIZE; 4 + 2 * ports.len()];
        Console {
            ports,
            queue_sizes,
            shared: None,
        }
    }

    fn start_reader(&self, index: usize, shared: Arc<Shared<Inner>>) -> std::io::Result<()> {
        let mut socket = self.ports[index].socket.try_clone()?;
        let id = port_id(index);
        crate::spawn_confined(
            format!("virtio-console-{}", self.ports[index].name),
            crate::ThreadKind::DeviceIo,
            move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = socket.read(&mut buf).unwrap_or(0);
                    let mut inner = shared.state.lock_unpoisoned();
                    if n == 0 {
                        let port = &mut inner.ports[index];
                        port.host_open = false;
                        if port.guest_ready {
                            inner.control(id, PORT_OPEN, 0, &[]);
                            inner.flush_control();
                        }
                        return;
                    }
                    inner.ports[index].rx_pending.extend(&buf[..n]);
                    inner.flush_rx(index);
                    while inner.ports[index].rx_pending.len() > RX_BUFFER_LIMIT {
                        inner = shared.wait(inner, None);
                    }
                }
            },
        )
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
        &self.queue_sizes
    }

    fn describe(&self) -> String {
        let Some(shared) = &self.shared else {
            return String::new();
        };
        let Ok(inner) = shared.state.try_lock() else {
            return "console busy (locked)".into();
        };
        let mut out = vec![format!(
            "{} control messages queued",
            inner.control_out.len()
        )];
        for port in &inner.ports {
            out.push(format!(
                "port {}: {} bytes for the guest, host open {}, guest ready {}",
                port.name,
                port.rx_pending.len(),
                port.host_open,
                port.guest_ready
            ));
        }
        out.join(", ")
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
        // max_nr_ports counts port 0.
        let max_ports = self.ports.len() as u32 + 1;
        config[4..8].copy_from_slice(&max_ports.to_le_bytes());
        config
    }

    fn activate(&mut self, activation: Activation) {
        let shared = Shared::new(Inner {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            control_out: VecDeque::new(),
            ports: self
                .ports
                .iter()
                .map(|port| PortInner {
                    name: port.name.clone(),
                    rx_pending: VecDeque::new(),
                    host_open: true,
                    guest_ready: false,
                })
                .collect(),
        });
        for index in 0..self.ports.len() {
            if let Err(e) = self.start_reader(index, shared.clone()) {
                log::error!(
                    "virtio-console: cannot start the host reader of {}: {e}",
                    self.ports[index].name
                );
            }
        }
        self.shared = Some(shared);
    }

    fn notify(&mut self, queue: u16) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let queue = queue as usize;
        let mut inner = shared.state.lock_unpoisoned();
        match queue {
            CONTROL_TX => inner.handle_control_tx(),
            CONTROL_RX => inner.flush_control(),
            _ => {
                // A named port's queue (port 0's, queues 0 and 1, is not added).
                let Some(index) = (0..self.ports.len()).find(|&i| {
                    let rx = rx_queue(port_id(i));
                    queue == rx || queue == rx + 1
                }) else {
                    return;
                };
                if queue == rx_queue(port_id(index)) {
                    inner.flush_rx(index);
                    shared.progressed();
                    return;
                }
                let mem = inner.mem.clone();
                let mut out = Vec::new();
                let Inner {
                    queues, interrupt, ..
                } = &mut *inner;
                drain_queue(&mem, &mut queues[queue], interrupt, |chain| {
                    if let Ok(mut reader) = chain.reader(&mem) {
                        let _ = reader.read_to_end(&mut out);
                    }
                    0
                });
                drop(inner);
                // A closed host end drops what the guest writes, as a hung-up port does.
                if let Err(e) = (&self.ports[index].socket).write_all(&out) {
                    log::debug!(
                        "virtio-console: host end of {} gone: {e}",
                        self.ports[index].name
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, read, write, Buf, CountingIrq};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const PORT: u32 = 1;
    const PORT_RX: usize = 4;
    const PORT_TX: usize = 5;

    fn agent_port(socket: UnixStream) -> Vec<NamedPort> {
        vec![NamedPort {
            name: AGENT_PORT_NAME.into(),
            socket,
        }]
    }

    /// The driver's `count` receive buffers on the control queue, 0x100 bytes each from
    /// 0x40000.
    fn give_control_buffers(mem: &GuestMemory, queue: &MockSplitQueue<GuestMemory>, count: u16) {
        for i in 0..count {
            add_chain(
                mem,
                queue,
                i,
                &[Buf {
                    addr: 0x40000 + 0x100 * u64::from(i),
                    len: 0x100,
                    device_writes: true,
                }],
            );
        }
    }

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
        let mut console = Console::new(agent_port(device_end));
        console.activate(Activation {
            mem: mem.clone(),
            queues: vqs
                .iter()
                .map(|q| q.create_queue::<Queue>().unwrap())
                .collect(),
            interrupt: Interrupt::new(irq.clone()),
        });

        // The driver gives control receive buffers, then says DEVICE_READY.
        give_control_buffers(&mem, &vqs[CONTROL_RX], 4);
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
        assert!(saved.ports[0].guest_ready);
        let queues = console.queue_states().unwrap();
        let (host2, device2) = UnixStream::pair().unwrap();
        let mut restored = Console::new(agent_port(device2));
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
        let mut console = Console::new(agent_port(device_end));
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
        let err = console.restore(console.save()).unwrap_err();
        assert!(matches!(err, PersistError::UnexpectedDeviceState), "{err}");
        // A state of a console with other ports (an older one's, with the agent's alone).
        let (_host2, device2) = UnixStream::pair().unwrap();
        let (_fs_host, fs_device) = UnixStream::pair().unwrap();
        let mut two = Console::new(vec![
            NamedPort {
                name: AGENT_PORT_NAME.into(),
                socket: device2,
            },
            NamedPort {
                name: FS_PORT_NAME.into(),
                socket: fs_device,
            },
        ]);
        let err = two.restore(console.save()).unwrap_err();
        assert!(matches!(err, PersistError::Mismatch { .. }), "{err}");
    }

    /// Reads `len` bytes at `addr` once they are there (a reader thread writes them).
    fn wait_for(mem: &GuestMemory, addr: u64, expected: &[u8]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read(mem, addr, expected.len()) != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "{expected:?} never arrived at {addr:#x}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn two_named_ports_carry_their_own_bytes_independently() {
        let mem = memory();
        // Port 0's two queues, control, then ports 1 and 2: eight queues.
        let vqs: Vec<MockSplitQueue<GuestMemory>> = (0..8)
            .map(|i| MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2000 * i), 16))
            .collect();
        let (agent_host, agent_device) = UnixStream::pair().unwrap();
        let (fs_host, fs_device) = UnixStream::pair().unwrap();
        let mut console = Console::new(vec![
            NamedPort {
                name: AGENT_PORT_NAME.into(),
                socket: agent_device,
            },
            NamedPort {
                name: FS_PORT_NAME.into(),
                socket: fs_device,
            },
        ]);
        assert_eq!(console.queue_max_sizes().len(), 8);
        assert_eq!(console.config()[4..8], 3u32.to_le_bytes(), "max_nr_ports");
        console.activate(Activation {
            mem: mem.clone(),
            queues: vqs
                .iter()
                .map(|q| q.create_queue::<Queue>().unwrap())
                .collect(),
            interrupt: Interrupt::new(Arc::new(CountingIrq::default())),
        });

        // The driver is ready: both ports are added, then named and opened as it readies
        // them.
        give_control_buffers(&mem, &vqs[CONTROL_RX], 8);
        let messages = [
            control(0, DEVICE_READY, 1),
            control(1, PORT_READY, 1),
            control(2, PORT_READY, 1),
        ];
        for (i, msg) in messages.iter().enumerate() {
            let addr = 0x50000 + 0x100 * i as u64;
            write(&mem, addr, msg);
            add_chain(
                &mem,
                &vqs[CONTROL_TX],
                i as u16,
                &[Buf {
                    addr,
                    len: 8,
                    device_writes: false,
                }],
            );
            console.notify(CONTROL_TX as u16);
        }
        let mut agent_name = control(1, PORT_NAME, 0);
        agent_name.extend(AGENT_PORT_NAME.as_bytes());
        let mut fs_name = control(2, PORT_NAME, 0);
        fs_name.extend(FS_PORT_NAME.as_bytes());
        let expected = [
            control(1, DEVICE_ADD, 0),
            control(2, DEVICE_ADD, 0),
            agent_name,
            control(1, PORT_OPEN, 1),
            fs_name,
            control(2, PORT_OPEN, 1),
        ];
        for (i, msg) in expected.iter().enumerate() {
            assert_eq!(&read(&mem, 0x40000 + 0x100 * i as u64, msg.len()), msg);
        }

        // Guest -> host, each port to its own socket.
        for (port, tx, addr, bytes) in [(0, 5, 0x60000, b"to-agent"), (1, 7, 0x61000, b"to-fs.0!")]
        {
            write(&mem, addr, bytes);
            add_chain(
                &mem,
                &vqs[tx],
                0,
                &[Buf {
                    addr,
                    len: 8,
                    device_writes: false,
                }],
            );
            console.notify(tx as u16);
            let host = if port == 0 { &agent_host } else { &fs_host };
            let mut got = [0u8; 8];
            let mut reader: &UnixStream = host;
            reader.read_exact(&mut got).unwrap();
            assert_eq!(&got, bytes);
        }

        // Host -> guest: the fs host writes first, into port 2's buffer only.
        for (rx, addr) in [(4, 0x70000), (6, 0x71000)] {
            add_chain(
                &mem,
                &vqs[rx],
                0,
                &[Buf {
                    addr,
                    len: 64,
                    device_writes: true,
                }],
            );
            console.notify(rx as u16);
        }
        (&fs_host).write_all(b"fuse-reply").unwrap();
        wait_for(&mem, 0x71000, b"fuse-reply");
        assert_eq!(vqs[4].used().idx().load(), 0, "nothing on the agent's port");
        (&agent_host).write_all(b"agent-msg").unwrap();
        wait_for(&mem, 0x70000, b"agent-msg");

        // The fs host hangs up: only port 2 is closed.
        drop(fs_host);
        wait_for(&mem, 0x40600, &control(2, PORT_OPEN, 0));
        let saved = console.save();
        assert_eq!(saved.ports.len(), 2);
        assert_eq!(saved.ports[1].name, FS_PORT_NAME);
        assert!(saved.ports.iter().all(|p| p.guest_ready));
        drop(agent_host);
    }
}
