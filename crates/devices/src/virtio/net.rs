//! virtio-net over a tap (opened with IFF_VNET_HDR), offloads off: each frame crosses with
//! the 12-byte virtio-net header the tap also speaks, so no bytes are copied to rewrite it.
//! A device without a tap is detached: the guest sees a NIC whose frames go nowhere (a
//! snapshot's device set is fixed; the network is attached to the restored VM's device).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};

use lock_ext::LockExt;
use serde::{Deserialize, Serialize};

use super::{drain_queue, Activation, DeviceState, Interrupt, Shared, VirtioDevice};
use crate::{GuestMemory, Persist, PersistError};

pub const TYPE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`.
pub const HEADER_LEN: usize = 12;
/// A frame of the largest MTU a tap carries here, with its header.
const FRAME_MAX: usize = HEADER_LEN + 65550;

/// TUNSETVNETHDRSZ: _IOW('T', 216, int).
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

#[derive(Debug)]
struct Inner {
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// What the guest's driver knows of the NIC beyond its queues: its MAC address (the
/// guest's network configuration was made for it). Frames in flight are not saved: a
/// restored VM's network is a new one, and the guest's stack retransmits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

impl Persist for Net {
    type State = NetState;

    fn save(&self) -> NetState {
        NetState { mac: self.mac }
    }

    fn restore(&mut self, state: NetState) -> Result<(), PersistError> {
        if state.mac != self.mac {
            return Err(PersistError::mismatch(
                "the MAC address",
                state.mac,
                self.mac,
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Net {
    tap: Option<File>,
    mac: [u8; 6],
    shared: Option<Arc<Shared<Inner>>>,
    stop: Arc<AtomicBool>,
}

impl Net {
    /// `tap` is duplicated; the caller keeps its own descriptor. Without one the device is
    /// detached.
    pub fn new(tap: Option<RawFd>, mac: [u8; 6]) -> std::io::Result<Self> {
        let tap = tap.map(open_tap).transpose()?;
        Ok(Net {
            tap,
            mac,
            shared: None,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    fn start_receiver(&self, shared: Arc<Shared<Inner>>) -> std::io::Result<()> {
        let Some(tap) = &self.tap else {
            return Ok(());
        };
        let mut tap = tap.try_clone()?;
        let stop = self.stop.clone();
        crate::spawn_confined("virtio-net-rx", crate::ThreadKind::DeviceIo, move || {
            let mut frame = vec![0u8; FRAME_MAX];
            while !stop.load(Ordering::Relaxed) {
                if !readable(&tap, Duration::from_millis(200)) {
                    continue;
                }
                let n = match tap.read(&mut frame) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        log::debug!("virtio-net: tap read: {e}");
                        return;
                    }
                };
                if n < HEADER_LEN {
                    continue;
                }
                // One buffer per frame (no VIRTIO_NET_F_MRG_RXBUF).
                frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                let mut inner = shared.state.lock_unpoisoned();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if inner.deliver(&frame[..n]) {
                        break;
                    }
                    // No receive buffer: wait for the guest to post some.
                    inner = shared.wait(inner, Some(Duration::from_millis(200)));
                }
            }
        })
    }
}

/// Duplicates `tap` and sets its virtio-net header size.
fn open_tap(tap: RawFd) -> std::io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller says is open; checked below.
    let fd = unsafe { libc::fcntl(tap, libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is the fresh duplicate, owned from here on.
    let tap = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let size: libc::c_int = HEADER_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tap)
}

fn readable(file: &File, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

impl Inner {
    /// Puts one frame in the next receive buffer; false when the guest has posted none.
    fn deliver(&mut self, frame: &[u8]) -> bool {
        let mem = self.mem.clone();
        let queue = &mut self.queues[RX];
        let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
            return false;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem.as_ref()) {
            Ok(mut writer) => {
                let n = frame.len().min(writer.available_bytes());
                if n < frame.len() {
                    log::debug!(
                        "virtio-net: frame of {} bytes truncated to {n}",
                        frame.len()
                    );
                }
                writer.write_all(&frame[..n]).map(|_| n).unwrap_or(0)
            }
            Err(_) => 0,
        };
        if queue.add_used(mem.as_ref(), head, written as u32).is_ok()
            && queue.needs_notification(mem.as_ref()).unwrap_or(true)
        {
            self.interrupt.signal_used();
        }
        true
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        super::queue_states_of(&self.shared, |inner| &inner.queues)
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Net(self.save())
    }

    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Net(state) => self.restore(state),
            other => Err(other.refused_by(TYPE_NET)),
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn config(&self) -> Vec<u8> {
        let mut config = self.mac.to_vec();
        config.extend([0u8; 6]); // status, max_virtqueue_pairs, mtu: features not offered
        config
    }

    fn activate(&mut self, activation: Activation) {
        let shared = Shared::new(Inner {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
        });
        if let Err(e) = self.start_receiver(shared.clone()) {
            log::error!("virtio-net: cannot start the receiver: {e}");
        }
        self.shared = Some(shared);
    }

    fn notify(&mut self, queue: u16) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        match queue as usize {
            RX => shared.progressed(),
            TX => {
                let mut inner = shared.state.lock_unpoisoned();
                let mem = inner.mem.clone();
                let Inner {
                    queues, interrupt, ..
                } = &mut *inner;
                let mut tap = self.tap.as_ref();
                drain_queue(&mem, &mut queues[TX], interrupt, |chain| {
                    let mut frame = Vec::with_capacity(2048);
                    if let Ok(mut reader) = chain.reader(&mem) {
                        let _ = reader.read_to_end(&mut frame);
                    }
                    if let (Some(tap), true) = (&mut tap, frame.len() > HEADER_LEN) {
                        // A tap whose veth vanished refuses frames; the guest sees loss.
                        if let Err(e) = tap.write(&frame) {
                            log::debug!("virtio-net: tap write: {e}");
                        }
                    }
                    0
                });
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stop = Arc::new(AtomicBool::new(false));
        self.shared = None;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Parses `02:00:00:00:00:01`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, read, write, Buf, CountingIrq};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
    }

    /// A socketpair of datagrams stands in for the tap (a frame per read and write, as a tap
    /// gives), so the queue handling is checked without root; tests/network.rs runs a real
    /// tap through the whole path.
    fn device_on_socketpair() -> (Net, std::os::unix::net::UnixDatagram) {
        let (host, device) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let net = Net {
            tap: Some(File::from(OwnedFd::from(device))),
            mac: [2, 0, 0, 0, 0, 1],
            shared: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        (net, host)
    }

    #[test]
    fn frames_cross_both_ways_with_their_header() {
        let mem = memory();
        let rx = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), 16);
        let tx = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x4000), 16);
        let irq = Arc::new(CountingIrq::default());
        let (mut net, host) = device_on_socketpair();
        assert_eq!(net.config()[..6], [2, 0, 0, 0, 0, 1]);
        net.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                rx.create_queue::<Queue>().unwrap(),
                tx.create_queue::<Queue>().unwrap(),
            ],
            interrupt: Interrupt::new(irq.clone()),
        });

        // Guest -> tap: header and frame in two descriptors, one write on the tap.
        let mut header = [0u8; HEADER_LEN];
        header[0] = 0;
        write(&mem, 0x20000, &header);
        write(&mem, 0x21000, b"frame-out");
        add_chain(
            &mem,
            &tx,
            0,
            &[
                Buf {
                    addr: 0x20000,
                    len: HEADER_LEN as u32,
                    device_writes: false,
                },
                Buf {
                    addr: 0x21000,
                    len: 9,
                    device_writes: false,
                },
            ],
        );
        net.notify(TX as u16);
        let mut got = [0u8; 64];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[HEADER_LEN..n], b"frame-out");

        // Tap -> guest: a frame arrives before any buffer; it is delivered once one is posted.
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend(b"frame-in");
        host.send(&frame).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        add_chain(
            &mem,
            &rx,
            0,
            &[Buf {
                addr: 0x30000,
                len: 2048,
                device_writes: true,
            }],
        );
        net.notify(RX as u16);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while read(&mem, 0x30000 + HEADER_LEN as u64, 8) != b"frame-in" {
            assert!(
                std::time::Instant::now() < deadline,
                "the frame never arrived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // num_buffers is 1 for a frame in one buffer.
        assert_eq!(read(&mem, 0x30000 + 10, 2), [1, 0]);
        drop(net);
    }

    #[test]
    fn a_nic_restores_its_mac_and_refuses_another() {
        let mac = [2, 0, 0, 0, 0, 1];
        let saved = Net::new(None, mac).unwrap().save_device();
        assert_eq!(saved, DeviceState::Net(NetState { mac }));
        let mut same = Net::new(None, mac).unwrap();
        same.restore_device(saved.clone()).unwrap();
        assert_eq!(same.save(), NetState { mac });
        let mut other = Net::new(None, [2, 0, 0, 0, 0, 2]).unwrap();
        let err = other.restore_device(saved).unwrap_err();
        assert!(matches!(err, PersistError::Mismatch { .. }), "{err}");
    }
}
