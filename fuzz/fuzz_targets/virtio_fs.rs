//! The shared filesystem's device whole: a guest that set the virtio-fs device up through
//! its virtio-mmio registers as a driver does, then hands it arbitrary FUSE requests in
//! descriptor chains of its choosing, served by the project's FUSE server over a temporary
//! share (the same server the container layer attaches). Each request is split over two
//! readable descriptors and its reply over two writable ones, at points the input picks,
//! so the chain walking, the request gathering, the server and the reply scattering are
//! fuzzed together, on the device's own worker threads under their system call filter.
//!
//! Whatever the guest sends, the device hands every chain back, writes no more than the
//! chain's writable buffers hold, frames every reply by its header, and never panics; its
//! workers end with it.
//!
//! Input: byte 0 splits each request (its position modulo the request's length), bytes 1-2
//! are the reply buffers' total length, byte 3 splits them; the rest is FUSE requests, each
//! as long as its header's `len` says (bounded by what is left).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use devices::virtio::fs::{Fs, FsBackend};
use devices::virtio::mmio::MmioTransport;
use devices::{BusDevice, GuestMemory, IrqLine};
use libfuzzer_sys::fuzz_target;
use share::{Server, ShareSpec};
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
/// Per queue: its descriptor table, available ring and used ring.
const RINGS: [(u64, u64, u64); 2] = [(0x0000, 0x1000, 0x2000), (0x4000, 0x5000, 0x6000)];
/// The request queue (0 is the high-priority one).
const REQUESTS: u32 = 1;
const REQUEST_AT: u64 = 0x10000;
const REPLY_AT: u64 = 0x80000;
/// Long enough for any request the server serves; a device that takes longer has lost it.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// FUSE_SETLKW waits for a lock held by an earlier run's request (the server lives as long
/// as the process): a wait FUSE allows, not a fault; it is sent as FUSE_GETLK instead.
const FUSE_SETLKW: u32 = 33;
const FUSE_GETLK: u32 = 31;

#[derive(Debug)]
struct NoIrq;
impl IrqLine for NoIrq {
    fn trigger(&self) {}
}

struct Backend(Server);
impl FsBackend for Backend {
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.0.handle(request)
    }
}

/// The server over a shared tree made afresh by each fuzzing process in the fuzz crate's
/// own target directory (it lives as long as the process).
fn backend() -> Arc<Backend> {
    static BACKEND: OnceLock<Arc<Backend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fs-fixture");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("d")).expect("d");
            std::fs::write(dir.join("d/f"), b"fuzz").expect("f");
            std::os::unix::fs::symlink("/etc/shadow", dir.join("s")).expect("s");
            let server = Server::new(vec![ShareSpec {
                source: dir,
                read_only: false,
                joined_with: None,
            }])
            .expect("server");
            Arc::new(Backend(server))
        })
        .clone()
}

fn write_reg(transport: &mut MmioTransport, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

fn read_reg(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut out = [0u8; 4];
    transport.read(offset, &mut out);
    u32::from_le_bytes(out)
}

/// What a driver does before its first request: status, features, both queues, DRIVER_OK.
fn set_up(transport: &mut MmioTransport) {
    write_reg(transport, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for page in 0..2 {
        write_reg(transport, 0x14, page);
        let offered = read_reg(transport, 0x10);
        write_reg(transport, 0x24, page);
        write_reg(transport, 0x20, offered);
    }
    write_reg(
        transport,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for (queue, (desc, avail, used)) in RINGS.iter().enumerate() {
        write_reg(transport, 0x30, queue as u32);
        write_reg(transport, 0x38, u32::from(QUEUE_SIZE));
        write_reg(transport, 0x80, *desc as u32);
        write_reg(transport, 0x84, 0);
        write_reg(transport, 0x90, *avail as u32);
        write_reg(transport, 0x94, 0);
        write_reg(transport, 0xa0, *used as u32);
        write_reg(transport, 0xa4, 0);
        write_reg(transport, 0x44, 1);
    }
    write_reg(
        transport,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

fn descriptor(mem: &GuestMemory, table: u64, index: u16, addr: u64, len: u32, flags: u16) {
    let at = GuestAddress(table + u64::from(index) * 16);
    let mut bytes = [0u8; 16];
    bytes[0..8].copy_from_slice(&addr.to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    bytes[12..14].copy_from_slice(&flags.to_le_bytes());
    bytes[14..16].copy_from_slice(&(index + 1).to_le_bytes());
    mem.write_slice(&bytes, at).unwrap();
}

fn u16_at(mem: &GuestMemory, addr: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(addr)).unwrap()
}

fn u32_at(mem: &GuestMemory, addr: u64) -> u32 {
    mem.read_obj::<u32>(GuestAddress(addr)).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let [split, reply_lo, reply_hi, reply_split, rest @ ..] = data else {
        return;
    };
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap());
    let backend: Arc<dyn FsBackend> = backend();
    let mut transport = MmioTransport::new(
        Box::new(Fs::new(Some(backend))),
        mem.clone(),
        Arc::new(NoIrq),
    );
    set_up(&mut transport);
    let (desc, avail, used) = RINGS[REQUESTS as usize];
    let reply_len = u32::from(u16::from_le_bytes([*reply_lo, *reply_hi]));
    let reply_first = reply_len * u32::from(*reply_split) / 255;
    let mut rest = rest;
    let mut sent: u16 = 0;
    while !rest.is_empty() && sent < 64 {
        let len = match rest.get(0..4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            None => rest.len(),
        };
        let len = len
            .clamp(1, rest.len())
            .min((REPLY_AT - REQUEST_AT) as usize);
        let (request, tail) = rest.split_at(len);
        rest = tail;
        let mut request = request.to_vec();
        if request.get(4..8) == Some(&FUSE_SETLKW.to_le_bytes()[..]) {
            request[4..8].copy_from_slice(&FUSE_GETLK.to_le_bytes());
        }
        mem.write_slice(&request, GuestAddress(REQUEST_AT)).unwrap();
        // Two readable descriptors, then two writable ones (an empty part is left out).
        let first = (usize::from(*split) % request.len()) as u32;
        let parts = [
            (REQUEST_AT, first, 0),
            (
                REQUEST_AT + u64::from(first),
                request.len() as u32 - first,
                0,
            ),
            (REPLY_AT, reply_first, DESC_F_WRITE),
            (
                REPLY_AT + u64::from(reply_first),
                reply_len - reply_first,
                DESC_F_WRITE,
            ),
        ];
        let parts: Vec<_> = parts.into_iter().filter(|p| p.1 > 0).collect();
        let head = (sent % (QUEUE_SIZE / 4)) * 4;
        for (i, (addr, len, flags)) in parts.iter().enumerate() {
            let next = if i + 1 < parts.len() { DESC_F_NEXT } else { 0 };
            descriptor(&mem, desc, head + i as u16, *addr, *len, flags | next);
        }
        let slot = avail + 4 + u64::from(sent % QUEUE_SIZE) * 2;
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        sent += 1;
        mem.write_obj(sent, GuestAddress(avail + 2)).unwrap();
        write_reg(&mut transport, 0x50, REQUESTS);

        let started = Instant::now();
        while u16_at(&mem, used + 2) != sent {
            assert!(
                started.elapsed() < ANSWER_WITHIN,
                "the device did not hand back request {sent}"
            );
            std::thread::yield_now();
        }
        let entry = used + 4 + u64::from((sent - 1) % QUEUE_SIZE) * 8;
        assert_eq!(
            u32_at(&mem, entry),
            u32::from(head),
            "the chain handed back"
        );
        let written = u32_at(&mem, entry + 4);
        let writable: u32 = parts
            .iter()
            .filter(|p| p.2 == DESC_F_WRITE)
            .map(|p| p.1)
            .sum();
        assert!(
            written <= writable,
            "{written} bytes written into {writable}"
        );
        if written > 0 {
            // The whole reply, or an EIO header where it did not fit: framed by its header
            // either way (the writable descriptors are contiguous, so it starts at the first).
            let header = u32_at(&mem, REPLY_AT);
            assert_eq!(header, written, "a reply's header frames it");
        }
    }
    // The device's workers end with it (and before the leak check, which would take the
    // thread a worker is still leaving for a leak).
    drop(transport);
    let started = Instant::now();
    while workers() > 0 {
        assert!(
            started.elapsed() < ANSWER_WITHIN,
            "virtio-fs workers outlived their device"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
});

/// This process's threads named as the device names its workers.
fn workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|task| {
                    std::fs::read_to_string(task.path().join("comm"))
                        .is_ok_and(|comm| comm.trim_end() == "virtio-fs")
                })
                .count()
        })
        .unwrap_or(0)
}
