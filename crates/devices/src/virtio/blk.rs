//! virtio-blk over a host file (read-only rootfs image, or a writable disk).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Queue};

use serde::{Deserialize, Serialize};

use super::{drain_queue, Activation, DeviceState, Interrupt, VirtioDevice, TYPE_BLOCK};
use crate::{GuestMemory, Persist, PersistError};

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const ID_LEN: usize = 20;

#[derive(Debug)]
struct Running {
    mem: std::sync::Arc<GuestMemory>,
    queue: Queue,
    interrupt: Interrupt,
}

/// What the guest's driver knows of the disk: a restored VM must get a disk of the same
/// shape (its page cache and file system hold the old one's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub sectors: u64,
    pub read_only: bool,
}

impl Persist for Block {
    type State = BlockState;

    fn save(&self) -> BlockState {
        BlockState {
            sectors: self.sectors,
            read_only: self.read_only,
        }
    }

    fn restore(&mut self, state: BlockState) -> Result<(), PersistError> {
        let actual = self.save();
        if state != actual {
            return Err(PersistError::mismatch("the disk", state, actual));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: String,
    running: Option<Running>,
}

impl Block {
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Block {
            file,
            read_only,
            sectors: len / SECTOR,
            id: id.to_string(),
            running: None,
        })
    }

    /// Serves one request; returns the bytes written into the chain.
    fn serve(
        file: &File,
        read_only: bool,
        sectors: u64,
        id: &str,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            return 0;
        };
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() || writer.available_bytes() == 0 {
            log::warn!("virtio-blk: malformed request");
            return 0;
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        // The last writable byte is the status.
        let data_len = writer.available_bytes() - 1;
        let in_range = |len: u64| {
            sector.checked_mul(SECTOR).is_some_and(|start| {
                start
                    .checked_add(len)
                    .is_some_and(|end| end <= sectors * SECTOR)
            })
        };
        let mut written = 0usize;
        let status = match kind {
            T_IN if in_range(data_len as u64) => {
                let mut buf = vec![0u8; data_len];
                match file.read_exact_at(&mut buf, sector * SECTOR) {
                    Ok(()) if writer.write_all(&buf).is_ok() => {
                        written = data_len;
                        S_OK
                    }
                    _ => S_IOERR,
                }
            }
            T_OUT if read_only => S_IOERR,
            T_OUT => {
                let mut buf = Vec::new();
                match reader.read_to_end(&mut buf) {
                    Ok(_) if in_range(buf.len() as u64) => {
                        match file.write_all_at(&buf, sector * SECTOR) {
                            Ok(()) => S_OK,
                            Err(_) => S_IOERR,
                        }
                    }
                    _ => S_IOERR,
                }
            }
            T_FLUSH => match file.sync_data() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_GET_ID => {
                let mut bytes = [0u8; ID_LEN];
                let n = id.len().min(ID_LEN);
                bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
                let n = data_len.min(ID_LEN);
                if writer.write_all(&bytes[..n]).is_ok() {
                    written = n;
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_IN => S_IOERR,
            _ => S_UNSUPP,
        };
        // Skip to the status byte (a short read leaves data bytes unwritten).
        let mut rest = writer.split_at(writer.available_bytes() - 1).ok();
        let status_written = match rest.as_mut() {
            Some(status_writer) => status_writer.write_all(&[status]).is_ok(),
            None => false,
        };
        (written + usize::from(status_written)) as u32
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn config(&self) -> Vec<u8> {
        // capacity (sectors); the rest of the layout is for features not offered.
        self.sectors.to_le_bytes().to_vec()
    }

    fn activate(&mut self, activation: Activation) {
        let Some(queue) = activation.queues.into_iter().next() else {
            return;
        };
        self.running = Some(Running {
            mem: activation.mem,
            queue,
            interrupt: activation.interrupt,
        });
    }

    fn notify(&mut self, _queue: u16) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let (file, read_only, sectors, id) = (&self.file, self.read_only, self.sectors, &self.id);
        let mem = running.mem.clone();
        drain_queue(&mem, &mut running.queue, &running.interrupt, |chain| {
            Self::serve(file, read_only, sectors, id, &mem, chain)
        });
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        let running = self.running.as_ref()?;
        Some(vec![super::QueueState::of(&running.queue)])
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Block(self.save())
    }

    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Block(state) => self.restore(state),
            other => Err(other.refused_by(TYPE_BLOCK)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, read, write, Buf, CountingIrq};
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend([0; 4]);
        h.extend(sector.to_le_bytes());
        h
    }

    #[test]
    fn reads_writes_and_refuses_writes_when_read_only() {
        let mut disk = tempfile::tempfile().unwrap();
        let mut image = vec![0u8; 4096];
        image[512..516].copy_from_slice(b"abcd");
        disk.write_all(&image).unwrap();

        for read_only in [true, false] {
            let mem = memory();
            let vq = MockSplitQueue::new(mem.as_ref(), 16);
            let irq = Arc::new(CountingIrq::default());
            let mut blk = Block::new(disk.try_clone().unwrap(), read_only, "rootfs").unwrap();
            assert_eq!(blk.config()[..8], 8u64.to_le_bytes());
            assert_eq!(blk.features() & F_RO != 0, read_only);
            blk.activate(Activation {
                mem: mem.clone(),
                queues: vec![vq.create_queue::<Queue>().unwrap()],
                interrupt: Interrupt::new(irq.clone()),
            });

            // Read sector 1 (512 bytes) into 0x20000, status at 0x30000.
            write(&mem, 0x10000, &header(T_IN, 1));
            add_chain(
                &mem,
                &vq,
                0,
                &[
                    Buf {
                        addr: 0x10000,
                        len: 16,
                        device_writes: false,
                    },
                    Buf {
                        addr: 0x20000,
                        len: 512,
                        device_writes: true,
                    },
                    Buf {
                        addr: 0x30000,
                        len: 1,
                        device_writes: true,
                    },
                ],
            );
            // Write "wxyz" at sector 2.
            write(&mem, 0x11000, &header(T_OUT, 2));
            write(&mem, 0x21000, b"wxyz");
            add_chain(
                &mem,
                &vq,
                3,
                &[
                    Buf {
                        addr: 0x11000,
                        len: 16,
                        device_writes: false,
                    },
                    Buf {
                        addr: 0x21000,
                        len: 4,
                        device_writes: false,
                    },
                    Buf {
                        addr: 0x31000,
                        len: 1,
                        device_writes: true,
                    },
                ],
            );
            // A read past the end of the disk.
            write(&mem, 0x12000, &header(T_IN, 8));
            add_chain(
                &mem,
                &vq,
                6,
                &[
                    Buf {
                        addr: 0x12000,
                        len: 16,
                        device_writes: false,
                    },
                    Buf {
                        addr: 0x22000,
                        len: 512,
                        device_writes: true,
                    },
                    Buf {
                        addr: 0x32000,
                        len: 1,
                        device_writes: true,
                    },
                ],
            );
            blk.notify(0);

            assert_eq!(read(&mem, 0x20000, 4), b"abcd");
            assert_eq!(read(&mem, 0x30000, 1), [S_OK]);
            assert_eq!(read(&mem, 0x32000, 1), [S_IOERR]);
            let mut on_disk = [0u8; 4];
            disk.read_exact_at(&mut on_disk, 1024).unwrap();
            if read_only {
                assert_eq!(read(&mem, 0x31000, 1), [S_IOERR]);
                assert_eq!(on_disk, [0; 4]);
            } else {
                assert_eq!(read(&mem, 0x31000, 1), [S_OK]);
                assert_eq!(&on_disk, b"wxyz");
            }
            let running = blk.running.as_ref().unwrap();
            assert_eq!(running.queue.next_used(), 3);
            let saved = blk.queue_states().unwrap();
            assert_eq!((saved[0].next_avail, saved[0].next_used), (3, 3));
            assert_eq!(irq.count(), 1, "one interrupt for the batch");
        }
    }

    #[test]
    fn a_disk_of_the_saved_shape_restores_and_another_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4 * SECTOR as usize]).unwrap();
        let open = || File::open(&path).unwrap();
        let saved = Block::new(open(), true, "rootfs").unwrap().save();
        assert_eq!(
            saved,
            BlockState {
                sectors: 4,
                read_only: true
            }
        );
        let mut same = Block::new(open(), true, "rootfs").unwrap();
        same.restore_device(DeviceState::Block(saved)).unwrap();
        assert_eq!(same.save(), saved);

        let mut writable = Block::new(open(), false, "rootfs").unwrap();
        let err = writable.restore(saved).unwrap_err();
        assert!(matches!(err, PersistError::Mismatch { .. }), "{err}");
        std::fs::write(&path, vec![0u8; 8 * SECTOR as usize]).unwrap();
        let mut bigger = Block::new(open(), true, "rootfs").unwrap();
        assert!(bigger.restore(saved).is_err(), "a disk of another size");
        let err = bigger
            .restore_device(DeviceState::Net(crate::virtio::net::NetState {
                mac: [0; 6],
            }))
            .unwrap_err();
        assert!(matches!(err, PersistError::WrongDevice { .. }), "{err}");
    }
}
