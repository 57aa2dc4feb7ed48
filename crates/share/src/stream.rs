//! Serving a byte stream of raw FUSE messages (the guest's `fs.0` port): requests in,
//! replies and notifications out, each message framed by its header's `len`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use lock_ext::LockExt;

use crate::abi;
use crate::Server;

/// Requests handled at once; a FUSE_SETLKW gets a thread of its own besides these, so a lock
/// that waits never holds one of them.
const WORKERS: usize = 4;
/// The largest request the guest can send: a WRITE of the negotiated maximum plus headers.
const MAX_REQUEST: usize = abi::MAX_WRITE as usize + 4096;
/// Requests read ahead of the workers; past this the reader waits (and the guest's requests
/// wait in its queue), so a guest cannot grow the host's memory by sending faster than the
/// workers answer.
const QUEUED_REQUESTS: usize = 64;
/// Locks waiting at once (FUSE_SETLKW, a thread each); one more is answered ENOLCK, as a
/// full lock table is, so a guest cannot make the host start threads without bound.
pub const MAX_WAITING_LOCKS: usize = 64;

/// Serves a byte stream of raw FUSE messages (the guest's fs.0 port): requests in, replies
/// and notifications out. Spawns its threads and returns; ends when the stream closes.
/// It also starts [`Server::watch`] with the stream as the sink, when nothing watches the
/// server yet.
pub fn serve_stream(server: Arc<Server>, stream: UnixStream) -> std::io::Result<()> {
    let output = Arc::new(Mutex::new(stream.try_clone()?));
    let (requests, queue) = mpsc::sync_channel::<Vec<u8>>(QUEUED_REQUESTS);
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..WORKERS {
        let queue = queue.clone();
        let server = server.clone();
        let output = output.clone();
        std::thread::Builder::new()
            .name(format!("share-worker-{i}"))
            .spawn(move || loop {
                let request = match queue.lock_unpoisoned().recv() {
                    Ok(request) => request,
                    Err(_) => return,
                };
                if let Some(reply) = server.handle(&request) {
                    send(&output, &reply);
                }
            })?;
    }
    {
        let output = output.clone();
        let sink = move |message: Vec<u8>| send(&output, &message);
        match server.watch(Box::new(sink)) {
            Ok(()) => {}
            Err(crate::ShareError::AlreadyWatched) => {}
            Err(e) => log::warn!("share: host changes will not reach the guest: {e}"),
        }
    }
    let mut input = stream;
    let waiting_locks = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("share-reader".into())
        .spawn(move || {
            while let Some(request) = read_message(&mut input) {
                if request.get(4..8) == Some(&abi::SETLKW.to_le_bytes()) {
                    if waiting_locks.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING_LOCKS {
                        waiting_locks.fetch_sub(1, Ordering::SeqCst);
                        send(&output, &refusal(&request, libc::ENOLCK));
                        continue;
                    }
                    let server = server.clone();
                    let output = output.clone();
                    let waiting = waiting_locks.clone();
                    let spawned = std::thread::Builder::new()
                        .name("share-setlkw".into())
                        .spawn(move || {
                            if let Some(reply) = server.handle(&request) {
                                send(&output, &reply);
                            }
                            waiting.fetch_sub(1, Ordering::SeqCst);
                        });
                    if let Err(e) = spawned {
                        log::warn!("share: no thread for a waiting lock: {e}");
                        waiting_locks.fetch_sub(1, Ordering::SeqCst);
                    }
                } else if requests.send(request).is_err() {
                    return;
                }
            }
            // Closing our end stops the workers (the channel) and the peer.
            let _ = input.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(())
}

/// The reply that refuses `request` with `errno`.
fn refusal(request: &[u8], errno: i32) -> Vec<u8> {
    let unique = request
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    abi::message(unique, -errno, &[])
}

fn send(output: &Mutex<UnixStream>, message: &[u8]) {
    let mut out = output.lock_unpoisoned();
    if let Err(e) = out.write_all(message) {
        log::debug!("share: reply not sent, the stream is closed: {e}");
    }
}

/// One whole message from the stream, or None at its end or when the framing is broken
/// (a length shorter than a header or larger than any request).
fn read_message(input: &mut UnixStream) -> Option<Vec<u8>> {
    let mut header = [0u8; abi::IN_HEADER_SIZE];
    input.read_exact(&mut header).ok()?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(abi::IN_HEADER_SIZE..=MAX_REQUEST).contains(&len) {
        log::warn!("share: FUSE stream framing broken (a message of {len} bytes); closing it");
        return None;
    }
    let mut message = vec![0u8; len];
    message[..abi::IN_HEADER_SIZE].copy_from_slice(&header);
    input.read_exact(&mut message[abi::IN_HEADER_SIZE..]).ok()?;
    Some(message)
}
