//! The host side of the agent channel.
//!
//! One reader thread decodes everything the agent sends: responses go to the waiting
//! request, stdio and exits go to the [`ProcessEvents`] registered for that process.
//! Requests may come from any thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::{
    encode_data, encode_message, read_frame, AgentInfo, AgentMessage, ExitStatus, Frame,
    FrameDecoder, HostMessage, ProcessId, ProtoError, Reply, Request, Stream, PROTOCOL_VERSION,
};
use lock_ext::LockExt;

use crate::ContainerError;

/// How long a request to the agent may take before the host gives up on it. Requests are
/// small and the agent answers each in turn; under TCG a container set-up is the slowest.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// At most this many exits of processes nobody registered are kept: an exit comes before
/// its registration only in a short race, and a guest that forges exits of processes that
/// never were must not grow the host's memory.
pub const MAX_UNCLAIMED_EXITS: usize = 256;

/// Frames per second the host reads from a guest, sustained, and in a burst. The reader is
/// the one host thread a guest's frames keep busy, and this caps how busy a guest that
/// forges tiny frames can keep it. Past the burst the reader waits (the guest's writes then
/// wait in its channel): nothing is dropped. A container's output comes in frames of up to
/// 64 KiB, which grow as the reader falls behind, so output that matters is not slowed.
pub const FRAME_RATE: u32 = 20_000;
pub const FRAME_BURST: u32 = 20_000;

/// A token bucket of frames: [`FrameBudget::take`] says how long the reader waits before it
/// handles the next one.
#[derive(Debug)]
struct FrameBudget {
    rate: f64,
    burst: f64,
    /// Negative while the reader is behind its budget (it then waits that debt off).
    tokens: f64,
    last: Instant,
    /// How often the reader had to wait, for the log.
    throttled: u64,
}

impl FrameBudget {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        FrameBudget {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
            throttled: 0,
        }
    }

    /// Takes one frame's token at `now`: how long to wait before handling the frame.
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        self.throttled += 1;
        Duration::from_secs_f64(-self.tokens / self.rate)
    }
}

/// Where a process's output and exit go.
pub trait ProcessEvents: Send {
    /// Output bytes; an empty slice means the stream closed.
    fn output(&mut self, stream: Stream, bytes: &[u8]);
    fn exited(&mut self, status: ExitStatus);
}

type Pending = HashMap<u64, mpsc::Sender<Result<Reply, String>>>;
type OnClose = Box<dyn FnOnce() + Send>;

struct Inner {
    writer: Mutex<UnixStream>,
    pending: Mutex<Pending>,
    sinks: Mutex<HashMap<ProcessId, Box<dyn ProcessEvents>>>,
    /// Exits that arrived for processes nobody registered (yet).
    unclaimed_exits: Mutex<HashMap<ProcessId, ExitStatus>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    on_close: Mutex<Option<OnClose>>,
    dns: Mutex<Option<DnsHandler>>,
    oom: Mutex<Option<OomHandler>>,
}

/// Called (on the reader thread) with each DNS query the guest relays.
pub type DnsHandler = Arc<dyn Fn(u64, Vec<u8>) + Send + Sync>;
/// Told how many more of the container's processes the guest's OOM killer killed.
pub type OomHandler = Arc<dyn Fn(u64) + Send + Sync>;

/// One reply of a [`AgentClient::pipeline`], and how long after the write it arrived.
#[derive(Debug)]
pub struct Answer {
    pub reply: Result<Reply, ContainerError>,
    pub after: Duration,
}

#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Waits for the agent's `Ready` on a freshly booted VM. `alive` is polled between reads so
/// that a VM that dies during boot fails fast instead of at the timeout.
pub fn wait_ready(
    stream: &mut UnixStream,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<AgentInfo, ContainerError> {
    let deadline = Instant::now() + timeout;
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| ContainerError::Agent(e.to_string()))?;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let why = alive()
                    .err()
                    .unwrap_or_else(|| "the agent channel closed".into());
                return Err(ContainerError::Agent(format!(
                    "VM ended before the agent was ready: {why}"
                )));
            }
            Ok(n) => decoder.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ContainerError::Agent(format!("agent channel: {e}"))),
        }
        while let Some(frame) = decoder
            .next_frame::<AgentMessage>()
            .map_err(|e| ContainerError::Agent(e.to_string()))?
        {
            if let Frame::Message(AgentMessage::Ready(info)) = frame {
                stream
                    .set_read_timeout(None)
                    .map_err(|e| ContainerError::Agent(e.to_string()))?;
                return Ok(info);
            }
        }
        if let Err(why) = alive() {
            return Err(ContainerError::Agent(format!(
                "VM ended before the agent was ready: {why}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(ContainerError::Agent(format!(
                "the agent did not answer within {}s",
                timeout.as_secs()
            )));
        }
    }
}

impl AgentClient {
    /// Starts the reader thread on a connected channel and says hello.
    pub fn start(
        stream: UnixStream,
        hello_timeout: Duration,
    ) -> Result<(Self, AgentInfo), ContainerError> {
        Self::start_with_budget(stream, hello_timeout, (FRAME_RATE, FRAME_BURST))
    }

    /// [`AgentClient::start`] reading at most `rate` frames a second after a burst of
    /// `burst` (see [`FRAME_RATE`]).
    fn start_with_budget(
        stream: UnixStream,
        hello_timeout: Duration,
        (rate, burst): (u32, u32),
    ) -> Result<(Self, AgentInfo), ContainerError> {
        let reader = stream
            .try_clone()
            .map_err(|e| ContainerError::Agent(e.to_string()))?;
        let inner = Arc::new(Inner {
            writer: Mutex::new(stream),
            pending: Mutex::new(HashMap::new()),
            sinks: Mutex::new(HashMap::new()),
            unclaimed_exits: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            on_close: Mutex::new(None),
            dns: Mutex::new(None),
            oom: Mutex::new(None),
        });
        let thread_inner = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || {
                let budget = FrameBudget::new(rate, burst, Instant::now());
                read_loop(thread_inner, reader, budget)
            })
            .map_err(|e| ContainerError::Agent(format!("spawn reader: {e}")))?;
        let client = AgentClient { inner };
        let info = match client.request(
            Request::Hello {
                version: PROTOCOL_VERSION,
            },
            hello_timeout,
        )? {
            Reply::Hello(info) => info,
            other => {
                return Err(ContainerError::Agent(format!(
                    "unexpected hello reply {other:?}"
                )))
            }
        };
        Ok((client, info))
    }

    /// Runs `f` once when the channel closes (the VM died or was stopped).
    pub fn on_close(&self, f: impl FnOnce() + Send + 'static) {
        if self.is_closed() {
            f();
            return;
        }
        *self.inner.on_close.lock_unpoisoned() = Some(Box::new(f));
        // The reader may have closed in between; it takes the callback only if it saw it.
        if self.is_closed() {
            if let Some(f) = self.inner.on_close.lock_unpoisoned().take() {
                f();
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Sends a request and waits for its response.
    pub fn request(&self, request: Request, timeout: Duration) -> Result<Reply, ContainerError> {
        self.pipeline(vec![request], timeout)?.pop().map_or_else(
            || Err(ContainerError::Agent("no reply".into())),
            |a| a.reply,
        )
    }

    /// Sends several requests in one write and then waits for all their replies (in order):
    /// each round trip to a guest costs a wake-up on both sides, and the agent answers
    /// requests in the order they come. `Err` only if nothing could be sent.
    pub fn pipeline(
        &self,
        requests: Vec<Request>,
        timeout: Duration,
    ) -> Result<Vec<Answer>, ContainerError> {
        let mut bytes = Vec::new();
        let mut waiting = Vec::new();
        for request in requests {
            let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel();
            self.inner.pending.lock_unpoisoned().insert(id, tx);
            waiting.push((id, request.name(), rx));
            encode_message(&HostMessage { id, request }, &mut bytes)
                .map_err(|e| ContainerError::Agent(e.to_string()))?;
        }
        if let Err(e) = self.write(&bytes) {
            let mut pending = self.inner.pending.lock_unpoisoned();
            for (id, _, _) in &waiting {
                pending.remove(id);
            }
            return Err(e);
        }
        let sent = Instant::now();
        let deadline = sent + timeout;
        Ok(waiting
            .into_iter()
            .map(|(id, name, rx)| {
                let left = deadline.saturating_duration_since(Instant::now());
                let answer = rx.recv_timeout(left);
                // Replies come in order and each wait starts once the one before is in,
                // so this is when this reply arrived.
                let after = sent.elapsed();
                let reply = match answer {
                    Ok(Ok(reply)) => Ok(reply),
                    Ok(Err(message)) => Err(ContainerError::Guest(message)),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.inner.pending.lock_unpoisoned().remove(&id);
                        Err(ContainerError::Agent(format!(
                            "no answer to {name} within {timeout:?}"
                        )))
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(ContainerError::Agent(
                        format!("connection lost during {name}"),
                    )),
                };
                Answer { reply, after }
            })
            .collect())
    }

    /// Sends a request whose answer nobody waits for (the reader drops it).
    pub fn notify(&self, request: Request) -> Result<(), ContainerError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        let mut bytes = Vec::new();
        encode_message(&HostMessage { id, request }, &mut bytes)
            .map_err(|e| ContainerError::Agent(e.to_string()))?;
        self.write(&bytes)
    }

    fn write(&self, bytes: &[u8]) -> Result<(), ContainerError> {
        if self.is_closed() {
            return Err(ContainerError::Agent("connection closed".into()));
        }
        self.inner
            .writer
            .lock_unpoisoned()
            .write_all(bytes)
            .map_err(|e| ContainerError::Agent(format!("channel write: {e}")))
    }

    /// Sends stdin bytes to a process; an empty slice closes its stdin.
    pub fn send_stdin(&self, process: ProcessId, bytes: &[u8]) -> Result<(), ContainerError> {
        self.send_input(process, Stream::STDIN, bytes)
    }

    /// Sends bytes of one of a process's input streams; an empty slice ends it.
    pub fn send_input(
        &self,
        process: ProcessId,
        stream: Stream,
        bytes: &[u8],
    ) -> Result<(), ContainerError> {
        let mut out = Vec::new();
        encode_data(process, stream, bytes, &mut out);
        self.write(&out)
    }

    /// Routes a process's output and exit to `events`. Register before creating the process;
    /// an exit that already arrived is delivered at once.
    pub fn register(&self, process: ProcessId, mut events: Box<dyn ProcessEvents>) {
        if let Some(status) = self
            .inner
            .unclaimed_exits
            .lock_unpoisoned()
            .remove(&process)
        {
            events.exited(status);
            return;
        }
        self.inner.sinks.lock_unpoisoned().insert(process, events);
    }

    pub fn unregister(&self, process: ProcessId) {
        self.inner.sinks.lock_unpoisoned().remove(&process);
    }

    /// Handles the guest's relayed DNS queries.
    pub fn on_dns_query(&self, handler: DnsHandler) {
        *self.inner.dns.lock_unpoisoned() = Some(handler);
    }

    /// Handles the guest's reports of OOM kills in the container's cgroup.
    pub fn on_oom(&self, handler: OomHandler) {
        *self.inner.oom.lock_unpoisoned() = Some(handler);
    }

    /// Closes the channel; the reader thread ends and pending requests fail.
    pub fn shutdown(&self) {
        let _ = self
            .inner
            .writer
            .lock_unpoisoned()
            .shutdown(std::net::Shutdown::Both);
    }
}

fn read_loop(inner: Arc<Inner>, mut reader: UnixStream, mut budget: FrameBudget) {
    loop {
        let frame = match read_frame::<AgentMessage, _>(&mut reader) {
            Ok(frame) => frame,
            Err(ProtoError::Closed) => break,
            Err(e) => {
                log::warn!("agent channel: {e}");
                break;
            }
        };
        let wait = budget.take(Instant::now());
        if !wait.is_zero() {
            if budget.throttled == 1 {
                log::debug!(
                    "agent channel: the guest sends more than {} frames a second; \
                     reading them at that rate",
                    budget.rate
                );
            }
            std::thread::sleep(wait);
        }
        match frame {
            Frame::Message(AgentMessage::Response { id, result }) => {
                if let Some(tx) = inner.pending.lock_unpoisoned().remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Frame::Message(AgentMessage::Exited { process, status }) => {
                let sink = inner.sinks.lock_unpoisoned().remove(&process);
                match sink {
                    Some(mut sink) => sink.exited(status),
                    None => {
                        let mut unclaimed = inner.unclaimed_exits.lock_unpoisoned();
                        if unclaimed.len() < MAX_UNCLAIMED_EXITS {
                            unclaimed.insert(process, status);
                        } else {
                            log::debug!("exit of unknown process {process} dropped");
                        }
                    }
                }
            }
            Frame::Message(AgentMessage::Ready(_)) => {}
            Frame::Message(AgentMessage::DnsQuery { id, payload }) => {
                let handler = inner.dns.lock_unpoisoned().clone();
                match handler {
                    Some(handler) => handler(id, payload),
                    None => log::debug!("DNS query {id} with no relay on the host"),
                }
            }
            Frame::Message(AgentMessage::OomKilled { kills }) => {
                let handler = inner.oom.lock_unpoisoned().clone();
                match handler {
                    Some(handler) => handler(kills),
                    None => log::info!("the guest's OOM killer killed {kills} process(es)"),
                }
            }
            Frame::Data {
                process,
                stream,
                bytes,
            } => {
                if let Some(sink) = inner.sinks.lock_unpoisoned().get_mut(&process) {
                    sink.output(stream, &bytes);
                }
            }
        }
    }
    inner.closed.store(true, Ordering::SeqCst);
    inner.pending.lock_unpoisoned().clear();
    // The handlers hold what serves them (the DNS relay's queue): they go with the channel.
    inner.dns.lock_unpoisoned().take();
    inner.oom.lock_unpoisoned().take();
    if let Some(f) = inner.on_close.lock_unpoisoned().take() {
        f();
    }
}

/// A guest that says what a test tells it to (forged frames included), in place of the
/// agent, for the host's bounds on what a guest can make it do. The real agent's side of
/// the same paths runs in `tests/` and `integration/`.
#[cfg(test)]
pub(crate) mod forged {
    use super::*;
    use agent_proto::write_message;

    /// A client connected to a guest that answers hello and, once the host sends anything
    /// more (see [`go`]: the test's handlers are registered by then), sends `messages`
    /// and an OOM report of `u64::MAX` kills that marks their end.
    pub fn client_of(messages: Vec<AgentMessage>) -> AgentClient {
        client_with_budget(messages, (FRAME_RATE, FRAME_BURST))
    }

    /// [`client_of`] with the host reading at most `budget` (rate, burst) frames.
    pub fn client_with_budget(messages: Vec<AgentMessage>, budget: (u32, u32)) -> AgentClient {
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let Ok(Frame::Message(HostMessage { id, .. })) =
                read_frame::<HostMessage, _>(&mut guest)
            else {
                return;
            };
            let info = AgentInfo {
                version: PROTOCOL_VERSION,
                kernel_release: "forged".into(),
                uptime_ms: 0,
                boot_id: String::new(),
            };
            let hello = AgentMessage::Response {
                id,
                result: Ok(Reply::Hello(info)),
            };
            let _ = write_message(&mut guest, &hello);
            if read_frame::<HostMessage, _>(&mut guest).is_err() {
                return;
            }
            let end = AgentMessage::OomKilled { kills: u64::MAX };
            for message in messages.into_iter().chain([end]) {
                if write_message(&mut guest, &message).is_err() {
                    return;
                }
            }
            // Stays connected, answering every later request with a plain "ok", until the
            // host closes.
            while let Ok(frame) = read_frame::<HostMessage, _>(&mut guest) {
                if let Frame::Message(HostMessage { id, .. }) = frame {
                    let ok = AgentMessage::Response {
                        id,
                        result: Ok(Reply::Ok),
                    };
                    if write_message(&mut guest, &ok).is_err() {
                        return;
                    }
                }
            }
        });
        AgentClient::start_with_budget(host, Duration::from_secs(5), budget)
            .unwrap()
            .0
    }

    /// Lets the guest send its messages; returns once the host has read them all.
    pub fn go(client: &AgentClient) {
        let (done, all_read) = mpsc::channel();
        client.on_oom(Arc::new(move |kills| {
            if kills == u64::MAX {
                let _ = done.send(());
            }
        }));
        client.send_stdin(0, b"go").unwrap();
        all_read
            .recv_timeout(Duration::from_secs(30))
            .expect("the forged messages were not all read");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_exits_of_processes_nobody_registered_are_kept_up_to_a_bound() {
        let forged = (0..10 * MAX_UNCLAIMED_EXITS as ProcessId)
            .map(|process| AgentMessage::Exited {
                process: 1000 + process,
                status: ExitStatus::Exited(0),
            })
            .collect();
        let client = forged::client_of(forged);
        forged::go(&client);
        assert_eq!(
            client.inner.unclaimed_exits.lock_unpoisoned().len(),
            MAX_UNCLAIMED_EXITS
        );
        client.shutdown();
    }

    #[test]
    fn the_frame_budget_lets_a_burst_through_then_paces_frames_at_its_rate() {
        // Waits in milliseconds, to a microsecond (the budget counts in floating point).
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let start = Instant::now();
        let mut budget = FrameBudget::new(100, 10, start);
        for _ in 0..10 {
            assert_eq!(budget.take(start), Duration::ZERO);
        }
        // The eleventh frame at once waits one frame's time; the twelfth two.
        assert_eq!(ms(budget.take(start)), 10.0);
        assert_eq!(ms(budget.take(start)), 20.0);
        // Having waited off its debt, the reader goes on at the rate.
        let later = start + Duration::from_millis(20);
        assert_eq!(ms(budget.take(later)), 10.0);
        // An idle second refills the burst, and no more than it.
        let idle = later + Duration::from_secs(5);
        for _ in 0..10 {
            assert_eq!(budget.take(idle), Duration::ZERO);
        }
        assert!(budget.take(idle) > Duration::ZERO);
        assert_eq!(budget.throttled, 4);
    }

    #[test]
    fn a_guest_flooding_tiny_frames_is_read_at_the_budgets_rate() {
        // 300 frames past a burst of 100, at 1000 a second: reading them all takes at least
        // 0.3 s however fast the host is (a slower host only takes longer).
        let forged = (0..400)
            .map(|_| AgentMessage::Exited {
                process: 7,
                status: ExitStatus::Exited(0),
            })
            .collect();
        let client = forged::client_with_budget(forged, (1000, 100));
        let started = Instant::now();
        forged::go(&client);
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        client.shutdown();
    }
}
