//! Address buses: port I/O and MMIO ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use lock_ext::LockExt;

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

/// Non-overlapping `[base, base + len)` ranges, each served by one device that sees offsets
/// from its base. Reads of an address no device serves return all ones, as an empty bus does.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(base, (len, _))| (base, len)))
            .finish()
    }
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other, &(other_len, _))) = before {
            if other + other_len > base {
                return Err(Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, device))
    }

    /// False when no device serves `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                // A device whose handler panicked is still the best answer we have.
                device.lock_unpoisoned().read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                device.lock_unpoisoned().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_of_their_range_at_its_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x2000, 0x1000, b.clone()).unwrap();

        let mut data = [0u8; 4];
        assert!(bus.read(0x1010, &mut data));
        assert_eq!(data, [0x10; 4]);
        assert!(bus.write(0x2ffc, &[1, 2]));
        assert_eq!(b.lock().unwrap().writes, vec![(0xffc, vec![1, 2])]);
        assert!(a.lock().unwrap().writes.is_empty());

        // Between and past the ranges: nobody.
        assert!(!bus.read(0x1100, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x3000, &[0]));
        assert!(!bus.read(0xfff, &mut data));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::default();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(0x1000, 0x100, dev()).unwrap();
        assert!(bus.insert(0x10ff, 1, dev()).is_err());
        assert!(bus.insert(0xf00, 0x101, dev()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
        bus.insert(0x1100, 1, dev()).unwrap();
        bus.insert(0xf00, 0x100, dev()).unwrap();
    }
}
