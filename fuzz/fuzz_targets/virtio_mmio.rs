//! A guest driving a virtio-mmio device: arbitrary guest memory (descriptor tables, rings,
//! request headers and buffers all come from it) and arbitrary register reads and writes,
//! against the block (over a scratch file), entropy, balloon, network (no tap), console (one
//! named port whose host end writes a little and closes) and shared filesystem (no backend:
//! every request answered ENODEV) devices.
//! Whatever the guest does, the device answers or ignores it; it never panics, and it never
//! reads or writes outside guest memory.
//!
//! Input: byte 0 picks the device, byte 1 is the number of register accesses that follow,
//! each of 7 bytes: a kind (even: write, odd: read), a 2-byte offset into the transport's
//! registers and a 4-byte value; the rest (up to 64 KiB) is guest memory from address 0.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use devices::virtio::balloon::Balloon;
use devices::virtio::blk::Block;
use devices::virtio::console::{Console, NamedPort};
use devices::virtio::fs::Fs;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::Net;
use devices::virtio::rng::Rng;
use devices::virtio::VirtioDevice;
use devices::{BusDevice, GuestMemory, IrqLine};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 1 << 20;
const FILLED: usize = 64 << 10;

#[derive(Debug)]
struct NoIrq;
impl IrqLine for NoIrq {
    fn trigger(&self) {}
}

/// The block device's backing file, made once per run in the fuzz crate's target directory.
fn scratch() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/virtio-disk");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        path
    })
}

/// The device `kind` picks, and for the console the host's end of its port.
fn device(kind: u8) -> (Box<dyn VirtioDevice>, Option<UnixStream>) {
    let device: Box<dyn VirtioDevice> = match kind % 6 {
        0 => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(scratch())
                .unwrap();
            Box::new(Block::new(file, false, "fuzz").unwrap())
        }
        1 => Box::new(Rng::default()),
        2 => Box::new(Balloon::new(false)),
        3 => Box::new(Net::new(None, [2, 0, 0, 0, 0, 1]).unwrap()),
        4 => {
            let (mut host, device) = UnixStream::pair().unwrap();
            // Bytes for the guest's receive queue; the port closes when the run ends.
            host.write_all(b"from the host").unwrap();
            let console = Console::new(vec![NamedPort {
                name: "agent.0".into(),
                socket: device,
            }]);
            return (Box::new(console), Some(host));
        }
        _ => Box::new(Fs::new(None)),
    };
    (device, None)
}

fuzz_target!(|data: &[u8]| {
    let [kind, count, rest @ ..] = data else {
        return;
    };
    let (accesses, memory_bytes) = rest.split_at(rest.len().min(usize::from(*count) * 7));
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap());
    let memory_bytes = &memory_bytes[..memory_bytes.len().min(FILLED)];
    mem.write_slice(memory_bytes, GuestAddress(0)).unwrap();
    let (device, _host) = device(*kind);
    let mut transport = MmioTransport::new(device, mem, Arc::new(NoIrq));
    for access in accesses.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([access[1], access[2]]) & 0x1ff);
        if access[0] % 2 == 0 {
            transport.write(offset, &access[3..7]);
        } else {
            let mut out = [0u8; 4];
            transport.read(offset, &mut out);
        }
    }
});
