//! virtio-fs (virtio 1.2, 5.11): the guest's FUSE requests served by an in-process
//! [`FsBackend`], tag [`TAG`], one high-priority queue and one request queue.
//!
//! The device only moves bytes: each chain's readable descriptors are one FUSE request, its
//! writable descriptors take the reply. Requests are served on worker threads, never on the
//! vCPU that notified: a FUSE_SETLKW may block its worker for as long as another process
//! holds the lock, and neither that vCPU nor the other requests may wait for it. The pool
//! grows while every worker is busy, up to [`WORKERS_MAX`].
//!
//! The backend is not part of a snapshot: a restored VM's device gets this VM's backend (or
//! none, and every request is answered ENODEV), as a NIC gets its tap.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use lock_ext::{CondvarExt, LockExt};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{Activation, DeviceState, Interrupt, Shared, VirtioDevice};
use crate::{GuestMemory, Persist, PersistError};

pub const TYPE_FS: u32 = 26;
/// The tag the guest mounts (`mount -t virtiofs sm …`).
pub const TAG: &str = "sm";
const TAG_LEN: usize = 36;
const HIPRIO: usize = 0;
const REQUESTS: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// The largest request read from a chain. The guest's largest is a FUSE_WRITE of its
/// `max_pages` (256 pages, 1 MiB, at most) plus headers; anything far beyond is refused
/// rather than allocated on the guest's say-so.
const REQUEST_MAX: usize = 4 << 20;
/// Worker threads at most; more blocked requests than this wait for one to end.
pub const WORKERS_MAX: usize = 16;

/// `struct fuse_in_header` and `struct fuse_out_header`.
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
// Opcodes the kernel expects no reply to.
const FUSE_FORGET: u32 = 2;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;

/// The FUSE server behind the device.
pub trait FsBackend: Send + Sync {
    /// One FUSE request (fuse_in_header + arguments) -> the reply (fuse_out_header + data),
    /// or `None` for requests without one. Called from several threads at once.
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>>;
}

/// What a running device's queues hold: nothing beyond them (requests in flight at a
/// snapshot are not carried over; a VM is snapshotted before it mounts anything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {}

#[derive(Debug)]
struct Inner {
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// A chain taken off a queue: the request's bytes and where its reply goes.
#[derive(Debug)]
struct Job {
    queue: usize,
    head: u16,
    request: Vec<u8>,
    /// Why the request cannot go to the backend (an errno), if it cannot.
    refused: Option<i32>,
    reply_to: Vec<(GuestAddress, usize)>,
}

/// Jobs waiting for a worker, and how many workers there are and wait.
#[derive(Debug, Default)]
struct Pending {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
    closed: bool,
}

/// What the workers of one activation share.
struct Pool {
    pending: Mutex<Pending>,
    work: Condvar,
    backend: Option<Arc<dyn FsBackend>>,
    mem: Arc<GuestMemory>,
    device: Arc<Shared<Inner>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("pending", &self.pending)
            .field("backend", &self.backend.is_some())
            .finish()
    }
}

impl Pool {
    /// Queues `job` for a worker, starting one if none is idle; the job back if no worker
    /// can take it (none could be started).
    fn submit(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        let mut pending = self.pending.lock_unpoisoned();
        if pending.idle == 0 && pending.workers < WORKERS_MAX {
            let pool = self.clone();
            let spawned =
                crate::spawn_confined("virtio-fs", crate::ThreadKind::FileServer, move || {
                    pool.work()
                });
            match spawned {
                Ok(_) => pending.workers += 1,
                Err(e) if pending.workers == 0 => {
                    log::error!("virtio-fs: cannot start a worker: {e}");
                    return Err(job);
                }
                Err(e) => log::warn!("virtio-fs: cannot start another worker: {e}"),
            }
        }
        pending.jobs.push_back(job);
        drop(pending);
        self.work.notify_one();
        Ok(())
    }

    fn work(&self) {
        loop {
            let mut pending = self.pending.lock_unpoisoned();
            let job = loop {
                if let Some(job) = pending.jobs.pop_front() {
                    break job;
                }
                if pending.closed {
                    pending.workers -= 1;
                    return;
                }
                pending.idle += 1;
                pending = self.work.wait_unpoisoned(pending);
                pending.idle -= 1;
            };
            drop(pending);
            self.serve(job);
        }
    }

    /// Answers `job` and hands its chain back to the guest.
    fn serve(&self, job: Job) {
        let reply = match job.refused {
            Some(errno) => error_reply(&job.request, errno),
            None => match &self.backend {
                Some(backend) => backend.handle(&job.request),
                None => error_reply(&job.request, libc::ENODEV),
            },
        };
        let mem = self.mem.as_ref();
        let written = match reply {
            Some(reply) => write_reply(mem, &job.reply_to, &reply),
            None => 0,
        };
        let mut inner = self.device.state.lock_unpoisoned();
        let Inner {
            queues, interrupt, ..
        } = &mut *inner;
        let queue = &mut queues[job.queue];
        if let Err(e) = queue.add_used(mem, job.head, written) {
            log::warn!("virtio-fs: cannot add used entry: {e}");
            return;
        }
        if queue.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_used();
        }
    }

    fn close(&self) {
        self.pending.lock_unpoisoned().closed = true;
        self.work.notify_all();
    }
}

/// A fuse_out_header carrying `-errno` for `request` (its unique), or `None` for a request
/// that gets no reply or has no header to answer.
fn error_reply(request: &[u8], errno: i32) -> Option<Vec<u8>> {
    let field = |at: usize| request.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
    let opcode = u32::from_le_bytes(field(4)?);
    if matches!(opcode, FUSE_FORGET | FUSE_INTERRUPT | FUSE_BATCH_FORGET) {
        return None;
    }
    let unique = request.get(8..16)?;
    let mut reply = Vec::with_capacity(OUT_HEADER_LEN);
    reply.extend((OUT_HEADER_LEN as u32).to_le_bytes());
    reply.extend((-errno).to_le_bytes());
    reply.extend(unique);
    Some(reply)
}

/// Scatters `reply` over the chain's writable buffers; the bytes written. A reply larger
/// than the buffers becomes an EIO error header (for the reply's unique), so that the
/// request fails in the guest instead of arriving cut short or never.
fn write_reply(mem: &GuestMemory, reply_to: &[(GuestAddress, usize)], reply: &[u8]) -> u32 {
    let room: usize = reply_to.iter().map(|(_, len)| len).sum();
    let eio;
    let reply = if reply.len() > room {
        log::warn!(
            "virtio-fs: a reply of {} bytes does not fit the guest's {room}",
            reply.len()
        );
        let mut header = vec![0u8; IN_HEADER_LEN];
        header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        header[8..16].copy_from_slice(reply.get(8..16).unwrap_or(&[0; 8]));
        match error_reply(&header, libc::EIO) {
            Some(header) if header.len() <= room => {
                eio = header;
                &eio[..]
            }
            _ => return 0,
        }
    } else {
        reply
    };
    let mut done = 0;
    for &(addr, len) in reply_to {
        if done == reply.len() {
            break;
        }
        let n = len.min(reply.len() - done);
        if let Err(e) = mem.write_slice(&reply[done..done + n], addr) {
            log::warn!("virtio-fs: reply buffer outside guest memory: {e}");
            return 0;
        }
        done += n;
    }
    done as u32
}

/// Reads the chain at `head` of `queue` into a job: its readable bytes (at most
/// [`REQUEST_MAX`]) and its writable buffers.
fn take_job(
    mem: &GuestMemory,
    queue: usize,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Job {
    let head = chain.head_index();
    let mut job = Job {
        queue,
        head,
        request: Vec::new(),
        refused: None,
        reply_to: Vec::new(),
    };
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            job.reply_to.push((desc.addr(), len));
            continue;
        }
        if job.refused.is_some() {
            continue;
        }
        if job.request.len() + len > REQUEST_MAX {
            log::warn!("virtio-fs: a request of over {REQUEST_MAX} bytes refused");
            job.refused = Some(libc::E2BIG);
            continue;
        }
        let start = job.request.len();
        job.request.resize(start + len, 0);
        if let Err(e) = mem.read_slice(&mut job.request[start..], desc.addr()) {
            log::warn!("virtio-fs: request buffer outside guest memory: {e}");
            job.request.truncate(start);
            job.refused = Some(libc::EFAULT);
        }
    }
    job
}

#[derive(Default)]
pub struct Fs {
    backend: Option<Arc<dyn FsBackend>>,
    pool: Option<Arc<Pool>>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("backend", &self.backend.is_some())
            .field("pool", &self.pool)
            .finish()
    }
}

impl Fs {
    /// A device served by `backend`; without one every request is answered ENODEV.
    pub fn new(backend: Option<Arc<dyn FsBackend>>) -> Self {
        Fs {
            backend,
            pool: None,
        }
    }

    fn stop_workers(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.close();
        }
    }
}

impl Persist for Fs {
    type State = FsState;

    fn save(&self) -> FsState {
        FsState {}
    }

    fn restore(&mut self, _state: FsState) -> Result<(), PersistError> {
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        0
    }

    /// `struct virtio_fs_config`: the tag, NUL-padded, and the number of request queues.
    fn config(&self) -> Vec<u8> {
        let mut config = vec![0u8; TAG_LEN + 4];
        config[..TAG.len()].copy_from_slice(TAG.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        config
    }

    fn activate(&mut self, activation: Activation) {
        self.stop_workers();
        let mem = activation.mem;
        let device = Shared::new(Inner {
            mem: mem.clone(),
            queues: activation.queues,
            interrupt: activation.interrupt,
        });
        self.pool = Some(Arc::new(Pool {
            pending: Mutex::new(Pending::default()),
            work: Condvar::new(),
            backend: self.backend.clone(),
            mem,
            device,
        }));
    }

    fn notify(&mut self, queue: u16) {
        let queue = queue as usize;
        let Some(pool) = &self.pool else { return };
        if queue != HIPRIO && queue != REQUESTS {
            return;
        }
        let mut jobs = Vec::new();
        {
            let mut inner = pool.device.state.lock_unpoisoned();
            let mem = inner.mem.clone();
            while let Some(chain) = inner.queues[queue].pop_descriptor_chain(mem.as_ref()) {
                jobs.push(take_job(&mem, queue, chain));
            }
        }
        for job in jobs {
            if let Err(job) = pool.submit(job) {
                // No worker thread at all: serving here beats leaving the guest waiting.
                pool.serve(job);
            }
        }
    }

    fn reset(&mut self) {
        self.stop_workers();
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        let pool = self.pool.as_ref()?;
        let inner = pool.device.state.lock_unpoisoned();
        Some(inner.queues.iter().map(super::QueueState::of).collect())
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Fs(self.save())
    }

    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Fs(state) => self.restore(state),
            other => Err(other.refused_by(TYPE_FS)),
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, read, write, Buf, CountingIrq};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    use virtio_queue::mock::MockSplitQueue;

    const FUSE_GETATTR: u32 = 3;
    const FUSE_SETLKW: u32 = 33;

    fn in_header(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut h = ((IN_HEADER_LEN + body.len()) as u32).to_le_bytes().to_vec();
        h.extend(opcode.to_le_bytes());
        h.extend(unique.to_le_bytes());
        h.extend([0u8; 24]); // nodeid, uid, gid, pid, padding
        h.extend(body);
        h
    }

    fn out_header(error: i32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut h = ((OUT_HEADER_LEN + body.len()) as u32)
            .to_le_bytes()
            .to_vec();
        h.extend(error.to_le_bytes());
        h.extend(unique.to_le_bytes());
        h.extend(body);
        h
    }

    /// Answers each request with its own body; a FUSE_SETLKW waits until the test lets
    /// it go; FORGET gets no reply. Says which requests it has seen.
    struct Echo {
        release: Mutex<mpsc::Receiver<()>>,
        seen: mpsc::Sender<u64>,
        reply_padding: usize,
    }

    impl FsBackend for Echo {
        fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
            let opcode = u32::from_le_bytes(request[4..8].try_into().unwrap());
            let unique = u64::from_le_bytes(request[8..16].try_into().unwrap());
            let _ = self.seen.send(unique);
            if opcode == FUSE_FORGET {
                return None;
            }
            if opcode == FUSE_SETLKW {
                let _ = self.release.lock().unwrap().recv();
            }
            let mut body = request[IN_HEADER_LEN..].to_vec();
            body.extend(vec![b'+'; self.reply_padding]);
            Some(out_header(0, unique, &body))
        }
    }

    struct Rig<'a> {
        mem: Arc<GuestMemory>,
        vqs: Vec<MockSplitQueue<'a, GuestMemory>>,
        irq: Arc<CountingIrq>,
        fs: Fs,
    }

    /// A started device on two queues in `mem`, over `backend`.
    fn rig(mem: &Arc<GuestMemory>, backend: Option<Arc<dyn FsBackend>>) -> Rig<'_> {
        let vqs: Vec<MockSplitQueue<GuestMemory>> = (0..2)
            .map(|i| MockSplitQueue::create(mem.as_ref(), GuestAddress(0x4000 * i), 16))
            .collect();
        let irq = Arc::new(CountingIrq::default());
        let mut fs = Fs::new(backend);
        fs.activate(Activation {
            mem: mem.clone(),
            queues: vqs
                .iter()
                .map(|q| q.create_queue::<Queue>().unwrap())
                .collect(),
            interrupt: Interrupt::new(irq.clone()),
        });
        Rig {
            mem: mem.clone(),
            vqs,
            irq,
            fs,
        }
    }

    impl Rig<'_> {
        /// Posts a request at `req_addr` (in two readable pieces) with writable buffers
        /// of `reply_lens` at `reply_addr`, as chain `first` of `queue`.
        fn post(&mut self, queue: usize, first: u16, request: &[u8], reply: (u64, &[u32])) {
            let req_addr = 0x20000 + u64::from(first) * 0x2000;
            write(&self.mem, req_addr, request);
            let split = request.len().min(IN_HEADER_LEN);
            let mut bufs = vec![Buf {
                addr: req_addr,
                len: split as u32,
                device_writes: false,
            }];
            if request.len() > split {
                bufs.push(Buf {
                    addr: req_addr + split as u64,
                    len: (request.len() - split) as u32,
                    device_writes: false,
                });
            }
            let mut addr = reply.0;
            for &len in reply.1 {
                bufs.push(Buf {
                    addr,
                    len,
                    device_writes: true,
                });
                addr += u64::from(len);
            }
            add_chain(&self.mem, &self.vqs[queue], first, &bufs);
            self.fs.notify(queue as u16);
        }

        /// The used entries of `queue` (descriptor head, length), once there are `count`.
        fn used(&self, queue: usize, count: u16) -> Vec<(u32, u32)> {
            let used = self.vqs[queue].used();
            let deadline = Instant::now() + Duration::from_secs(5);
            while used.idx().load() < count {
                assert!(Instant::now() < deadline, "no reply on queue {queue}");
                std::thread::sleep(Duration::from_millis(2));
            }
            (0..usize::from(used.idx().load()))
                .map(|i| {
                    let elem = used.ring().ref_at(i).unwrap().load();
                    (elem.id(), elem.len())
                })
                .collect()
        }
    }

    fn echo(reply_padding: usize) -> (Arc<Echo>, mpsc::Sender<()>, mpsc::Receiver<u64>) {
        let (release, wait) = mpsc::channel();
        let (seen, heard) = mpsc::channel();
        let echo = Arc::new(Echo {
            release: Mutex::new(wait),
            seen,
            reply_padding,
        });
        (echo, release, heard)
    }

    #[test]
    fn the_config_space_names_the_tag_and_one_request_queue() {
        let fs = Fs::new(None);
        assert_eq!(fs.device_type(), 26);
        assert_eq!(
            fs.queue_max_sizes().len(),
            2,
            "hiprio and one request queue"
        );
        let config = fs.config();
        assert_eq!(config.len(), 40);
        assert_eq!(&config[..2], b"sm");
        assert!(config[2..36].iter().all(|&b| b == 0), "NUL-padded tag");
        assert_eq!(config[36..], 1u32.to_le_bytes());
    }

    #[test]
    fn a_request_in_pieces_reaches_the_backend_whole_and_its_reply_is_scattered() {
        let (backend, _release, _) = echo(0);
        let mem = memory();
        let mut rig = rig(&mem, Some(backend));
        let request = in_header(FUSE_GETATTR, 7, b"attributes please");
        // The reply (16 + 17 bytes) spans a 20-byte and a 64-byte buffer.
        rig.post(REQUESTS, 0, &request, (0x80000, &[20, 64]));
        let expected = out_header(0, 7, b"attributes please");
        assert_eq!(rig.used(REQUESTS, 1), vec![(0, expected.len() as u32)]);
        assert_eq!(read(&rig.mem, 0x80000, expected.len()), expected);
        assert!(rig.irq.count() >= 1, "the guest was interrupted");
    }

    #[test]
    fn without_a_backend_every_request_is_answered_enodev() {
        let mem = memory();
        let mut rig = rig(&mem, None);
        rig.post(
            REQUESTS,
            0,
            &in_header(FUSE_GETATTR, 0x1234_5678_9abc, b""),
            (0x80000, &[64]),
        );
        assert_eq!(rig.used(REQUESTS, 1), vec![(0, 16)]);
        assert_eq!(
            read(&rig.mem, 0x80000, 16),
            out_header(-libc::ENODEV, 0x1234_5678_9abc, b"")
        );
        // A FORGET has no reply, backend or not.
        rig.post(HIPRIO, 0, &in_header(FUSE_FORGET, 9, &[0; 8]), (0, &[]));
        assert_eq!(rig.used(HIPRIO, 1), vec![(0, 0)]);
    }

    #[test]
    fn a_reply_larger_than_the_guests_buffers_is_an_eio_error() {
        let (backend, _release, _) = echo(100);
        let mem = memory();
        let mut rig = rig(&mem, Some(backend));
        rig.post(
            REQUESTS,
            0,
            &in_header(FUSE_GETATTR, 5, b"x"),
            (0x80000, &[32]),
        );
        assert_eq!(rig.used(REQUESTS, 1), vec![(0, 16)]);
        assert_eq!(read(&rig.mem, 0x80000, 16), out_header(-libc::EIO, 5, b""));
    }

    #[test]
    fn a_blocked_request_does_not_hold_up_the_next_one_or_the_notifier() {
        let (backend, release, heard) = echo(0);
        let mem = memory();
        let mut rig = rig(&mem, Some(backend));
        // notify returns although the backend blocks on the lock request.
        rig.post(
            REQUESTS,
            0,
            &in_header(FUSE_SETLKW, 1, b"lock"),
            (0x80000, &[64]),
        );
        assert_eq!(heard.recv_timeout(Duration::from_secs(5)), Ok(1));
        rig.post(
            REQUESTS,
            2,
            &in_header(FUSE_GETATTR, 2, b"stat"),
            (0x90000, &[64]),
        );
        assert_eq!(
            rig.used(REQUESTS, 1),
            vec![(2, 20)],
            "only the stat answered"
        );
        assert_eq!(read(&rig.mem, 0x90000, 20), out_header(0, 2, b"stat"));

        release.send(()).unwrap();
        assert_eq!(rig.used(REQUESTS, 2), vec![(2, 20), (0, 20)]);
        assert_eq!(read(&rig.mem, 0x80000, 20), out_header(0, 1, b"lock"));
    }

    #[test]
    fn a_restored_device_carries_on_from_its_queues_with_the_new_backend() {
        let mem = memory();
        let mut first = rig(&mem, None);
        first.post(
            REQUESTS,
            0,
            &in_header(FUSE_GETATTR, 1, b""),
            (0x80000, &[64]),
        );
        first.used(REQUESTS, 1);
        let saved = first.fs.save_device();
        assert_eq!(saved, DeviceState::Fs(FsState {}));
        let queues = first.fs.queue_states().unwrap();
        assert_eq!(queues[REQUESTS].next_avail, 1);
        assert_eq!(queues[REQUESTS].next_used, 1);

        // The same guest memory and queues, a device with a backend now.
        let (backend, _release, _) = echo(0);
        let mut restored = Fs::new(Some(backend));
        restored.activate(Activation {
            mem: first.mem.clone(),
            queues: first
                .vqs
                .iter()
                .zip(&queues)
                .enumerate()
                .map(|(i, (q, state))| {
                    let mut queue = q.create_queue::<Queue>().unwrap();
                    state.apply(i, &mut queue, &first.mem).unwrap();
                    queue
                })
                .collect(),
            interrupt: Interrupt::new(first.irq.clone()),
        });
        restored.restore_device(saved).unwrap();
        first.fs = restored;
        first.post(
            REQUESTS,
            2,
            &in_header(FUSE_GETATTR, 2, b"again"),
            (0x90000, &[64]),
        );
        assert_eq!(first.used(REQUESTS, 2), vec![(0, 16), (2, 21)]);
        assert_eq!(read(&first.mem, 0x90000, 21), out_header(0, 2, b"again"));
    }

    #[test]
    fn an_fs_device_refuses_another_devices_state() {
        let mut fs = Fs::new(None);
        let err = fs
            .restore_device(DeviceState::Rng(crate::virtio::rng::RngState {}))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::WrongDevice {
                    saved: 4,
                    actual: 26
                }
            ),
            "{err}"
        );
    }
}
