//! virtio-balloon (virtio 1.2, 5.5): guest memory given back to the host.
//!
//! Two ways memory comes back. Free page reporting (`VIRTIO_BALLOON_F_REPORTING`): the guest
//! posts ranges of free memory (2 MiB and up, a couple of seconds after they were freed) on
//! the reporting queue. Inflation: the host sets a target (`num_pages`, through a
//! [`BalloonControl`]) and the guest hands over that many 4 KiB pages on the inflate queue,
//! taking them back on the deflate queue (and, with `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`, on
//! its own when it runs out of memory). The host discards every page it is given
//! ([`discard`]), so the VMM's resident memory falls.
//!
//! What a discarded page reads back as depends on the mapping, and the guest never relies
//! on it (a reported or inflated page is free memory the guest rewrites before use): in
//! guest RAM mapped shared (a booted VM's memfd) the page is punched out of the file and
//! reads back as zero; in guest RAM mapped private from a snapshot's memory file (a restored
//! VM) the VM's private copy is dropped and the page reads back as the snapshot's page.

use std::sync::{Arc, Mutex};

use lock_ext::LockExt;
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{drain_queue, Activation, DeviceState, Interrupt, VirtioDevice};
use crate::{GuestMemory, Persist, PersistError};

pub const TYPE_BALLOON: u32 = 5;

/// The guest may take inflated pages back when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// The guest reports free pages on a queue of their own.
pub const F_REPORTING: u64 = 1 << 5;

/// The balloon's page size, whatever the guest's (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SIZE: u64 = 1 << 12;

/// Queue indexes: without the statistics and free page hinting queues (not offered), the
/// reporting queue follows the deflate queue.
const INFLATE: u16 = 0;
const DEFLATE: u16 = 1;
const REPORTING: u16 = 2;

/// What the balloon holds beyond its queues: the host's target and the guest's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// `num_pages`: how many pages the host asks the guest to hand over.
    pub target_pages: u32,
    /// `actual`: how many the guest says it has handed over.
    pub actual_pages: u32,
}

/// Why a range of guest memory could not be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("guest range {addr:#x}+{len:#x} is not page aligned")]
    Unaligned { addr: u64, len: u64 },
    #[error("guest range {addr:#x}+{len:#x} is not within one RAM region")]
    OutsideRam { addr: u64, len: u64 },
    #[error("madvise of guest range {addr:#x}+{len:#x}: {source}")]
    Madvise {
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// Gives the host back the memory behind guest range `addr`..`addr + len`: punched out of a
/// shared mapping's file (`MADV_REMOVE`: it then reads back as zero), dropped from a private
/// mapping (`MADV_DONTNEED`: it then reads back as the mapped file's page, or zero where
/// nothing is mapped behind it).
pub fn discard(mem: &GuestMemory, addr: u64, len: u64) -> Result<(), DiscardError> {
    if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Unaligned { addr, len });
    }
    if len == 0 {
        return Ok(());
    }
    let outside = || DiscardError::OutsideRam { addr, len };
    let region = mem.find_region(GuestAddress(addr)).ok_or_else(outside)?;
    let offset = addr - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(outside());
    }
    let advice = if region.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: the range lies within this region's mapping (checked above) and is page
    // aligned (the mapping is). It is guest memory the guest has given up; no host reference
    // into it is held across this call (devices copy guest memory in and out), so replacing
    // its pages with zero or file pages breaks no Rust invariant.
    let rc = unsafe {
        libc::madvise(
            region.as_ptr().add(offset as usize).cast(),
            len as usize,
            advice,
        )
    };
    if rc != 0 {
        return Err(DiscardError::Madvise {
            addr,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The host's side of the balloon: set a target, read how far the guest has got. Cloned out
/// of the device before it goes into its transport.
#[derive(Debug, Clone, Default)]
pub struct BalloonControl {
    shared: Arc<Mutex<Control>>,
}

#[derive(Debug, Default)]
struct Control {
    state: BalloonState,
    /// Discard what the guest gives; off only to measure what that is worth.
    discards: bool,
    /// The driver's interrupt, once it has started the device: a new target raises a
    /// configuration change on it.
    interrupt: Option<Interrupt>,
    /// Bytes discarded since the device was built (reported and inflated).
    discarded_bytes: u64,
}

impl BalloonControl {
    /// Asks the guest to hand over `pages` pages of [`PAGE_SIZE`] (0: give all back).
    pub fn set_target_pages(&self, pages: u32) {
        let mut control = self.shared.lock_unpoisoned();
        control.state.target_pages = pages;
        if let Some(interrupt) = &control.interrupt {
            interrupt.signal_config();
        }
    }

    /// The target and the guest's answer.
    pub fn state(&self) -> BalloonState {
        self.shared.lock_unpoisoned().state
    }

    /// Bytes the host has discarded since the device was built.
    pub fn discarded_bytes(&self) -> u64 {
        self.shared.lock_unpoisoned().discarded_bytes
    }
}

#[derive(Debug)]
pub struct Balloon {
    control: BalloonControl,
    features: u64,
    running: Option<(Arc<GuestMemory>, Vec<Queue>)>,
}

impl Balloon {
    /// A balloon that offers free page reporting and deflate-on-OOM. With `discards` off the
    /// guest still reports and inflates, but the host keeps the pages (for comparisons).
    pub fn new(discards: bool) -> Self {
        let control = BalloonControl::default();
        control.shared.lock_unpoisoned().discards = discards;
        Balloon {
            control,
            features: F_DEFLATE_ON_OOM | F_REPORTING,
            running: None,
        }
    }

    pub fn control(&self) -> BalloonControl {
        self.control.clone()
    }

    /// Discards `(addr, len)` ranges, counting what went back.
    fn give_back(&self, mem: &GuestMemory, ranges: impl IntoIterator<Item = (u64, u64)>) {
        let mut control = self.control.shared.lock_unpoisoned();
        if !control.discards {
            return;
        }
        for (addr, len) in ranges {
            match discard(mem, addr, len) {
                Ok(()) => control.discarded_bytes += len,
                Err(e) => log::warn!("virtio-balloon: {e}"),
            }
        }
    }
}

/// Guest page frame numbers (little-endian u32s) as ranges of contiguous pages.
fn pfn_ranges(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for pfn in bytes.chunks_exact(4) {
        let addr = u64::from(u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]])) * PAGE_SIZE;
        match ranges.last_mut() {
            Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
            _ => ranges.push((addr, PAGE_SIZE)),
        }
    }
    ranges
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
    }

    fn features(&self) -> u64 {
        self.features
    }

    /// `num_pages`, then `actual` (little-endian: a VERSION_1 device); the free page hint
    /// command id and poison value of features not offered read as zero.
    fn config(&self) -> Vec<u8> {
        let state = self.control.state();
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&state.target_pages.to_le_bytes());
        config.extend_from_slice(&state.actual_pages.to_le_bytes());
        config.extend_from_slice(&[0; 8]);
        config
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset != 4 || data.len() != 4 {
            log::debug!(
                "virtio-balloon: config write of {} bytes at {offset}",
                data.len()
            );
            return;
        }
        let actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.control.shared.lock_unpoisoned().state.actual_pages = actual;
    }

    fn activate(&mut self, activation: Activation) {
        self.control.shared.lock_unpoisoned().interrupt = Some(activation.interrupt);
        self.running = Some((activation.mem, activation.queues));
    }

    fn notify(&mut self, queue: u16) {
        let Some((mem, mut queues)) = self.running.take() else {
            return;
        };
        let interrupt = self.control.shared.lock_unpoisoned().interrupt.clone();
        if let (Some(q), Some(interrupt)) = (queues.get_mut(usize::from(queue)), interrupt) {
            drain_queue(&mem, q, &interrupt, |chain| {
                match queue {
                    INFLATE => {
                        // Arrays of page frame numbers the guest no longer uses.
                        let mut pfns = Vec::new();
                        for desc in chain.clone() {
                            if desc.is_write_only() {
                                continue;
                            }
                            let mut bytes = vec![0u8; desc.len() as usize];
                            if mem.read_slice(&mut bytes, desc.addr()).is_ok() {
                                pfns.extend_from_slice(&bytes);
                            }
                        }
                        self.give_back(&mem, pfn_ranges(&pfns));
                    }
                    // The guest takes pages back by touching them; nothing to do.
                    DEFLATE => {}
                    // Each buffer is a free range of guest memory.
                    REPORTING => {
                        let ranges: Vec<_> = chain
                            .clone()
                            .map(|desc| (desc.addr().0, u64::from(desc.len())))
                            .collect();
                        self.give_back(&mem, ranges);
                    }
                    _ => {}
                }
                0
            });
        }
        self.running = Some((mem, queues));
    }

    fn reset(&mut self) {
        self.running = None;
        let mut control = self.control.shared.lock_unpoisoned();
        control.interrupt = None;
        // A driver that starts again has no pages in the balloon.
        control.state.actual_pages = 0;
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        let (_, queues) = self.running.as_ref()?;
        Some(queues.iter().map(super::QueueState::of).collect())
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Balloon(self.save())
    }

    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Balloon(state) => self.restore(state),
            other => Err(other.refused_by(TYPE_BALLOON)),
        }
    }
}

impl Persist for Balloon {
    type State = BalloonState;

    fn save(&self) -> BalloonState {
        self.control.state()
    }

    /// The target and the pages the guest holds in the balloon carry over: the restored
    /// guest's driver goes on from its own count.
    fn restore(&mut self, state: BalloonState) -> Result<(), PersistError> {
        self.control.shared.lock_unpoisoned().state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, write, Buf, CountingIrq};
    use crate::virtio::{INT_CONFIG, INT_USED_RING};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    fn rss_of(mem: &GuestMemory, addr: u64) -> bool {
        // mincore says whether the page behind `addr` is resident in this mapping.
        let region = mem.find_region(GuestAddress(addr)).unwrap();
        let ptr = region
            .as_ptr()
            .wrapping_add((addr - region.start_addr().0) as usize);
        let mut vec = [0u8; 1];
        // SAFETY: `ptr` is page aligned and within the region's mapping; `vec` holds one
        // entry for one page.
        let rc = unsafe { libc::mincore(ptr.cast(), PAGE_SIZE as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec[0] & 1 == 1
    }

    #[test]
    fn reported_free_ranges_are_discarded_and_acknowledged() {
        let mem = memory();
        // The reported range (2 pages at 0x40000) holds data and is resident.
        write(&mem, 0x40000, &[0xaa; 2 * PAGE_SIZE as usize]);
        write(&mem, 0x42000, &[0xbb; PAGE_SIZE as usize]);
        let inflate = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x0), 16);
        let deflate = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2000), 16);
        let report = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x4000), 16);
        let irq = Arc::new(CountingIrq::default());
        let mut balloon = Balloon::new(true);
        let control = balloon.control();
        balloon.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                inflate.create_queue::<Queue>().unwrap(),
                deflate.create_queue::<Queue>().unwrap(),
                report.create_queue::<Queue>().unwrap(),
            ],
            interrupt: Interrupt::new(irq.clone()),
        });
        add_chain(
            &mem,
            &report,
            0,
            &[Buf {
                addr: 0x40000,
                len: 2 * PAGE_SIZE as u32,
                device_writes: true,
            }],
        );
        balloon.notify(REPORTING);
        // The pages left this process (checked before a read maps the zero page in)...
        assert!(!rss_of(&mem, 0x40000));
        assert!(!rss_of(&mem, 0x41000));
        // ...and the test memory is anonymous and private: they read back as zero.
        assert_eq!(
            crate::virtio::testing::read(&mem, 0x40000, 2 * PAGE_SIZE as usize),
            vec![0; 2 * PAGE_SIZE as usize]
        );
        // The page after the range is untouched.
        assert_eq!(
            crate::virtio::testing::read(&mem, 0x42000, 4),
            vec![0xbb; 4]
        );
        assert_eq!(control.discarded_bytes(), 2 * PAGE_SIZE);
        assert_eq!(irq.count(), 1);
        let (_, queues) = balloon.running.as_ref().unwrap();
        assert_eq!(queues[usize::from(REPORTING)].next_used(), 1);
    }

    #[test]
    fn inflated_pages_are_discarded_in_contiguous_runs() {
        let mem = memory();
        write(&mem, 0x50000, &[0xcc; 3 * PAGE_SIZE as usize]);
        let inflate = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x0), 16);
        let deflate = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2000), 16);
        let irq = Arc::new(CountingIrq::default());
        let mut balloon = Balloon::new(true);
        let control = balloon.control();
        balloon.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                inflate.create_queue::<Queue>().unwrap(),
                deflate.create_queue::<Queue>().unwrap(),
            ],
            interrupt: Interrupt::new(irq.clone()),
        });
        // PFNs 0x50 and 0x52 (not 0x51) in the balloon.
        let pfns: Vec<u8> = [0x50u32, 0x52]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        write(&mem, 0x30000, &pfns);
        add_chain(
            &mem,
            &inflate,
            0,
            &[Buf {
                addr: 0x30000,
                len: pfns.len() as u32,
                device_writes: false,
            }],
        );
        balloon.notify(INFLATE);
        let read = |addr| crate::virtio::testing::read(&mem, addr, 4);
        assert_eq!(read(0x50000), vec![0; 4]);
        assert_eq!(read(0x51000), vec![0xcc; 4]);
        assert_eq!(read(0x52000), vec![0; 4]);
        assert_eq!(control.discarded_bytes(), 2 * PAGE_SIZE);
    }

    #[test]
    fn with_discards_off_the_guest_is_answered_but_keeps_its_pages() {
        let mem = memory();
        write(&mem, 0x40000, &[0xaa; PAGE_SIZE as usize]);
        let inflate = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x0), 16);
        let deflate = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2000), 16);
        let report = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x4000), 16);
        let irq = Arc::new(CountingIrq::default());
        let mut balloon = Balloon::new(false);
        balloon.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                inflate.create_queue::<Queue>().unwrap(),
                deflate.create_queue::<Queue>().unwrap(),
                report.create_queue::<Queue>().unwrap(),
            ],
            interrupt: Interrupt::new(irq.clone()),
        });
        add_chain(
            &mem,
            &report,
            0,
            &[Buf {
                addr: 0x40000,
                len: PAGE_SIZE as u32,
                device_writes: true,
            }],
        );
        balloon.notify(REPORTING);
        assert_eq!(
            crate::virtio::testing::read(&mem, 0x40000, 4),
            vec![0xaa; 4]
        );
        assert_eq!(balloon.control().discarded_bytes(), 0);
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn a_new_target_reaches_the_config_and_raises_a_config_interrupt() {
        let mem = memory();
        let irq = Arc::new(CountingIrq::default());
        let mut balloon = Balloon::new(true);
        let control = balloon.control();
        // Before the driver starts the device a target only changes the config.
        control.set_target_pages(7);
        assert_eq!(irq.count(), 0);
        let interrupt = Interrupt::new(irq.clone());
        balloon.activate(Activation {
            mem,
            queues: Vec::new(),
            interrupt: interrupt.clone(),
        });
        control.set_target_pages(256);
        assert_eq!(irq.count(), 1);
        assert_eq!(interrupt.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(interrupt.status() & INT_USED_RING, 0);
        assert_eq!(&balloon.config()[..4], &256u32.to_le_bytes());
        balloon.write_config(4, &200u32.to_le_bytes());
        assert_eq!(
            control.state(),
            BalloonState {
                target_pages: 256,
                actual_pages: 200
            }
        );
        assert_eq!(&balloon.config()[4..8], &200u32.to_le_bytes());
    }

    #[test]
    fn a_balloon_restores_its_target_and_count_and_refuses_another_devices_state() {
        let mut balloon = Balloon::new(true);
        let saved = BalloonState {
            target_pages: 1000,
            actual_pages: 900,
        };
        balloon.restore_device(DeviceState::Balloon(saved)).unwrap();
        assert_eq!(balloon.save_device(), DeviceState::Balloon(saved));
        assert_eq!(balloon.control().state(), saved);
        let err = balloon
            .restore_device(DeviceState::Rng(crate::virtio::rng::RngState {}))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::WrongDevice {
                    saved: 4,
                    actual: 5
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn discard_refuses_unaligned_ranges_and_ranges_outside_ram() {
        let mem = memory();
        assert!(matches!(
            discard(&mem, 0x1001, PAGE_SIZE),
            Err(DiscardError::Unaligned { .. })
        ));
        assert!(matches!(
            discard(&mem, 0xff000, 2 * PAGE_SIZE),
            Err(DiscardError::OutsideRam { .. })
        ));
        assert!(matches!(
            discard(&mem, 0x200000, PAGE_SIZE),
            Err(DiscardError::OutsideRam { .. })
        ));
    }

    #[test]
    fn contiguous_pfns_make_one_range() {
        let bytes: Vec<u8> = [1u32, 2, 3, 7, 8]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        assert_eq!(
            pfn_ranges(&bytes),
            vec![(0x1000, 3 * PAGE_SIZE), (0x7000, 2 * PAGE_SIZE)]
        );
    }
}
