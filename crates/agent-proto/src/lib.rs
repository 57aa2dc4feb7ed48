//! The protocol between the host (monitor or shim) and the guest agent.
//!
//! One byte stream (a virtio-console port or a vsock connection; a Unix socket on the host)
//! carries everything: control messages and the stdio of every process, in frames
//!
//! ```text
//! u32 little-endian length of the rest | u8 kind | body
//! ```
//!
//! Kind [`KIND_MESSAGE`]: a [`HostMessage`] or [`AgentMessage`] as JSON. Kind [`KIND_DATA`]:
//! bytes of one of a process's streams, `u32 LE process | u32 LE stream | bytes`; an empty
//! payload closes that stream (see [`Stream`]).
//!
//! The host speaks first after every connect (`Hello`), and the agent answers with its
//! version: a connection never survives a snapshot, so the agent treats every `Hello` as a new
//! session and the host never assumes an earlier one.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change; `Hello` carries it both ways.
pub const PROTOCOL_VERSION: u32 = 2;

/// Frame kind: a JSON message.
pub const KIND_MESSAGE: u8 = 1;
/// Frame kind: stdio bytes of one process stream.
pub const KIND_DATA: u8 = 2;

/// Largest frame either side accepts; a larger length prefix means the stream is corrupt.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Bytes of a connection's output the agent sends ahead of the host's [`Request::Credit`].
pub const CONNECTION_WINDOW: u32 = 64 << 10;

/// Largest stdio chunk put in one data frame.
pub const MAX_DATA_CHUNK: usize = 64 << 10;

/// Identifies a process for the life of one container; chosen by the host.
pub type ProcessId = u32;

/// The container's first process (`create`/`start`); execs get other ids.
pub const INIT_PROCESS: ProcessId = 0;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    FrameTooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("undecodable message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("channel closed")]
    Closed,
}

/// A byte stream of a process: its stdio (0, 1, 2), a descriptor passed to it at that number
/// (3 up to [`Stream::FIRST_CONNECTION`]), or one connection accepted on a passed listening
/// socket (from [`Stream::FIRST_CONNECTION`] up, numbered by the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stream(pub u32);

impl Stream {
    pub const STDIN: Stream = Stream(0);
    pub const STDOUT: Stream = Stream(1);
    pub const STDERR: Stream = Stream(2);
    /// Connections get the numbers from here up; passed descriptors the ones below.
    pub const FIRST_CONNECTION: u32 = 1 << 16;

    /// The stream of the descriptor passed to the process as `fd`.
    pub fn passed(fd: u32) -> Stream {
        Stream(fd)
    }

    /// A connection accepted on a passed listener (its output is paced by credit).
    pub fn is_connection(self) -> bool {
        self.0 >= Self::FIRST_CONNECTION
    }
}

/// Host → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostMessage {
    /// Echoed in the matching [`AgentMessage::Response`].
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Starts a session; the agent answers `Reply::Hello`.
    Hello {
        version: u32,
    },
    /// Sets the guest's realtime clock (a restored VM wakes up in the past).
    SetClock {
        unix_secs: i64,
        nanos: u32,
    },
    /// Mixes host entropy into the guest RNG (restored VMs must not share RNG state).
    AddEntropy {
        bytes: Vec<u8>,
    },
    /// Mounts the image disk under the writable overlay: the part of the container root that
    /// depends only on the image, so that a snapshot can be baked with it done.
    PrepareRoot(RootfsSpec),
    /// Mounts the container's root (unless prepared) and mounts, sets its hostname, enters
    /// it; once per VM.
    SetupContainer(ContainerSetup),
    /// Prepares a process; it runs at `StartProcess`, or at once when `start` is set.
    CreateProcess {
        process: ProcessId,
        spec: ProcessSpec,
        start: bool,
    },
    StartProcess {
        process: ProcessId,
    },
    /// Signals a process (or, with `all`, every container process).
    Signal {
        process: ProcessId,
        signal: i32,
        all: bool,
    },
    ResizeTerminal {
        process: ProcessId,
        rows: u16,
        cols: u16,
    },
    /// Connects a new socket to the guest's end of a listening socket passed to `process` as
    /// descriptor `listener` ([`PassedKind::Listener`]): the host accepted a connection on
    /// its end, whose bytes go both ways as `stream`.
    Connect {
        process: ProcessId,
        listener: u32,
        stream: Stream,
    },
    /// The host wrote `bytes` more of a connection's output ([`Stream::FIRST_CONNECTION`]
    /// and up): the agent may read that many more from it. A connection's output flows at
    /// most [`CONNECTION_WINDOW`] bytes ahead of the host's credit, so that a client that
    /// stops reading holds its own connection, not the channel every stream shares.
    Credit {
        process: ProcessId,
        stream: Stream,
        bytes: u32,
    },
    /// Closes a process's stdin (EOF), as `close_io` does.
    CloseStdin {
        process: ProcessId,
    },
    ListProcesses,
    /// Attaches the guest's network interfaces (held detached until now) and configures
    /// them as the container's host-side interfaces are.
    ConfigureNetwork(NetworkConfig),
    /// The answer to a [`AgentMessage::DnsQuery`] the host relayed.
    DnsAnswer {
        id: u64,
        payload: Vec<u8>,
    },
    /// Writes cgroup v2 interface files of the container's cgroup in the guest, in order
    /// (a live `update`); answered `Reply::Ok` once every value is written.
    UpdateCgroup(Vec<CgroupSetting>),
    /// Keeps the guest's first `count` vCPUs online and the rest offline (a live update of
    /// the container's CPU limit); answered `Reply::Ok`, or an error naming how many the VM
    /// has when it has fewer.
    OnlineCpus {
        count: u32,
    },
    /// The container's usage, from its cgroup in the guest; answered `Reply::Stats`.
    Stats,
    /// Syncs filesystems and powers the guest off.
    Shutdown,
}

impl Request {
    /// The request's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::SetClock { .. } => "set_clock",
            Request::AddEntropy { .. } => "add_entropy",
            Request::PrepareRoot(_) => "prepare_root",
            Request::SetupContainer(_) => "setup_container",
            Request::CreateProcess { .. } => "create_process",
            Request::StartProcess { .. } => "start_process",
            Request::Signal { .. } => "signal",
            Request::ResizeTerminal { .. } => "resize_terminal",
            Request::Connect { .. } => "connect",
            Request::Credit { .. } => "credit",
            Request::CloseStdin { .. } => "close_stdin",
            Request::ListProcesses => "list_processes",
            Request::ConfigureNetwork(_) => "configure_network",
            Request::DnsAnswer { .. } => "dns_answer",
            Request::UpdateCgroup(_) => "update_cgroup",
            Request::OnlineCpus { .. } => "online_cpus",
            Request::Stats => "stats",
            Request::Shutdown => "shutdown",
        }
    }
}

/// Agent → host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMessage {
    /// Sent once after boot, before any request: the guest is up and the agent listens.
    Ready(AgentInfo),
    Response {
        id: u64,
        result: Result<Reply, String>,
    },
    /// A process ended; its stdout and stderr were closed (drained) before this is sent.
    Exited {
        process: ProcessId,
        status: ExitStatus,
    },
    /// A DNS query sent to the relay address in the guest (docker's 127.0.0.11), for the host
    /// to ask the resolver that lives in the container's network namespace.
    DnsQuery { id: u64, payload: Vec<u8> },
    /// The kernel's OOM killer killed `kills` more processes of the container's cgroup
    /// (its `memory.events` `oom_kill` count rose by that much since the last report).
    OomKilled { kills: u64 },
}

/// The container's network, as the guest must be configured.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub interfaces: Vec<InterfaceConfig>,
    /// Answer DNS on 127.0.0.11:53 by relaying queries to the host.
    pub dns_relay: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// The name in the guest (the host interface's).
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`, the host interface's, so that its neighbours keep working.
    pub mac: String,
    pub mtu: u32,
    /// `address/prefix`, IPv4 or IPv6.
    pub addresses: Vec<String>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RouteConfig {
    /// `address/prefix`; `None` is the default route.
    pub destination: Option<String>,
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Hello(AgentInfo),
    Created {
        pid: i32,
    },
    Processes(Vec<ProcessInfo>),
    /// The contents of the container cgroup's interface files, by name (`memory.current`,
    /// `memory.max`, `memory.stat`, `memory.events`, `memory.swap.current`, `cpu.stat`,
    /// `pids.current`, `pids.max`, `io.stat`); a file the guest kernel lacks is absent.
    /// The host parses them: the agent stays a reader.
    Stats(BTreeMap<String, String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: u32,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// Guest monotonic time since boot, for boot-phase timings.
    pub uptime_ms: u64,
    /// The guest kernel's boot id: VMs restored from one snapshot share it.
    #[serde(default)]
    pub boot_id: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The status a shell reports: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => 128 + signal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    /// One of the states of `/proc/PID/stat` (R, S, D, Z, T, …).
    pub state: char,
    /// Guest CPU time (user + system) in clock ticks.
    pub cpu_ticks: u64,
    /// The command line, NUL separators turned into spaces; the command name if it is empty.
    pub command: String,
}

/// What the agent mounts before any process runs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ContainerSetup {
    pub hostname: Option<String>,
    pub rootfs: RootfsSpec,
    /// In config.json order; each destination is relative to the container root.
    pub mounts: Vec<MountSpec>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctls: BTreeMap<String, String>,
    /// config.json asks for a pid namespace: the container's first process is PID 1 of a
    /// new one (with its signal and reaping semantics), and execs join it.
    #[serde(default)]
    pub pid_namespace: bool,
    /// The container's cgroup in the guest, as config.json's `linux.resources` asks; the
    /// container's processes run in it and see it as their `/sys/fs/cgroup` root (a cgroup
    /// namespace). `None`: no cgroup of its own.
    #[serde(default)]
    pub cgroup: Option<CgroupSpec>,
    /// config.json's `linux.devices`, made with `mknod` in the container's `/dev` after its
    /// mounts, as runc makes them (a node whose driver the guest lacks is made all the same).
    #[serde(default)]
    pub devices: Vec<DeviceNode>,
    /// config.json's `linux.rootfsPropagation`, applied to the container root once its
    /// mounts are made; `None`: the root stays private (nothing outside the VM propagates).
    #[serde(default)]
    pub root_propagation: Option<RootPropagation>,
    /// config.json's `linux.seccomp`: every container process (the first and each exec) runs
    /// under it from its first instruction.
    #[serde(default)]
    pub seccomp: Option<SeccompProfile>,
    /// config.json's `user` namespace: every container process runs in one new namespace
    /// with these mappings, of the VM's ids (a VM is the container's own host).
    #[serde(default)]
    pub user_namespace: Option<UserNamespace>,
}

/// A user namespace's `uidMappings` and `gidMappings`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserNamespace {
    pub uid_mappings: Vec<IdMapping>,
    pub gid_mappings: Vec<IdMapping>,
}

/// `size` ids from `container_id` inside are `host_id`… outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// An OCI seccomp profile, as config.json gives it (the host has checked its actions and
/// operators; the guest's libseccomp resolves its names for the guest's architecture).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompProfile {
    pub default_action: SeccompAction,
    /// libseccomp's names, e.g. `SCMP_ARCH_X86_64`; the native one is always in.
    pub architectures: Vec<String>,
    /// `SECCOMP_FILTER_FLAG_*` names.
    pub flags: Vec<String>,
    pub rules: Vec<SeccompRule>,
}

/// A rule: `action` for the system calls `names` when every argument condition holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompRule {
    pub names: Vec<String>,
    pub action: SeccompAction,
    pub args: Vec<SeccompArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    /// Kills the thread (`SCMP_ACT_KILL`, `SCMP_ACT_KILL_THREAD`).
    KillThread,
    KillProcess,
    Trap,
    /// Fails the call with this errno.
    Errno(u16),
    /// Notifies a tracer with this value.
    Trace(u16),
    Allow,
    Log,
}

/// A condition on argument `index`: `arg OP value` (`MaskedEqual`: `arg & value == value_two`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompArg {
    pub index: u32,
    pub value: u64,
    pub value_two: u64,
    pub op: SeccompOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompOp {
    NotEqual,
    LessThan,
    LessOrEqual,
    Equal,
    GreaterOrEqual,
    GreaterThan,
    MaskedEqual,
}

/// A device node of `linux.devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Absolute in the container, e.g. `/dev/fuse`.
    pub path: String,
    pub kind: DeviceKind,
    pub major: u64,
    pub minor: u64,
    /// Permission bits (`fileMode` without the type), e.g. `0o666`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Char,
    Block,
    Fifo,
}

/// The propagation the container root gets (`linux.rootfsPropagation`). Unbindable roots
/// are refused on the host, as runc fails to bind such a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootPropagation {
    pub kind: PropagationKind,
    /// The `r` forms: every mount under the root gets it too.
    pub recursive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropagationKind {
    Shared,
    Slave,
    Private,
}

/// A cgroup v2 for the container's processes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CgroupSpec {
    /// Interface files and their values, written in order before any process joins (the
    /// host translates config.json's resources into them: `memory.max`, `pids.max`,
    /// `cpu.max`, …).
    pub settings: Vec<CgroupSetting>,
}

/// One value for one cgroup v2 interface file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSetting {
    /// The interface file's name in the cgroup directory, e.g. `memory.max`.
    pub file: String,
    /// What is written to it, e.g. `67108864`, `max`, `50000 100000`.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Where the container root's files come from and where its writes go.
    pub source: RootSource,
    /// The container sees a read-only root (`root.readonly`): remounted read-only once its
    /// mount points are made, as runc does.
    pub readonly: bool,
    /// Programs the container is expected to run, read into the guest's page cache when the
    /// root is prepared, so before a snapshot is taken: a VM restored from it starts them
    /// from memory, not from its disk. Each is searched as `execvp` would in `warm_path`
    /// (`PATH`, else the default), and an ELF program's interpreter comes with it. Best
    /// effort: a program that is not found is skipped.
    #[serde(default)]
    pub warm: Vec<String>,
    #[serde(default)]
    pub warm_path: Option<String>,
    /// Paths the container's setup will resolve in the image (its mount destinations):
    /// looked up when the root is prepared, and read if they are small files, so a restored
    /// VM finds their directory entries, inodes and contents cached. Best effort, like `warm`.
    #[serde(default)]
    pub warm_lookups: Vec<String>,
}

/// Where a container root lives. Its writes always land on the host, in the bundle's root
/// filesystem, as they do under runc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSource {
    /// The bundle's root is an overlay on the host (docker's and containerd's snapshotters).
    /// Its image layers are a read-only disk (`device`), cached per image and read before a
    /// snapshot; the container's own layer (the host overlay's upper directory) is share
    /// `upper`, with share `work` beside it on the same host filesystem for the guest
    /// overlay's temporary files. The guest overlay writes the upper directory in the host
    /// overlay's own format (whiteouts, opaque directories), so the host's tools read it.
    Layered {
        device: String,
        fstype: String,
        upper: u32,
        work: u32,
    },
    /// The bundle's root is a plain host directory: the whole root is share `index`.
    Share { index: u32 },
}

impl Default for RootSource {
    fn default() -> Self {
        RootSource::Share { index: 0 }
    }
}

impl RootSource {
    /// The image disk to mount before a snapshot, if the root has one.
    pub fn image_disk(&self) -> Option<(&str, &str)> {
        match self {
            RootSource::Layered { device, fstype, .. } => Some((device, fstype)),
            RootSource::Share { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountSpec {
    pub destination: String,
    pub kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A filesystem the guest kernel makes itself (proc, sysfs, tmpfs, devpts, mqueue, …).
    Filesystem {
        fstype: String,
        source: String,
        options: Vec<String>,
    },
    /// A host file or directory shared live: entry `index` of the VM's share filesystem (the
    /// host FUSE server's root lists its shares as `0`, `1`, …), bound onto the destination
    /// (made an empty file or directory like the source if the image has none), read-only if
    /// `readonly`. The host serves the share filesystem before it sends the setup.
    /// `options` are the bind's other mount options (`nosuid`, `noexec`, `rprivate`,
    /// `runbindable`, …), applied to the bind in the guest.
    Share {
        index: u32,
        readonly: bool,
        #[serde(default)]
        options: Vec<String>,
    },
}

/// An OCI process, resolved to what the guest needs (numeric ids, parsed rlimits).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub terminal: bool,
    /// (rows, cols) of the terminal at start.
    pub console_size: Option<(u16, u16)>,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    /// `None`: config.json has no `capabilities`, and the process gets none (the host gives
    /// an exec'd process without them the container's, before it asks).
    pub capabilities: Option<Capabilities>,
    pub oom_score_adj: Option<i32>,
    /// Descriptors beyond stdio, each at its own number (`--preserve-fds`, `LISTEN_FDS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed_fds: Vec<PassedFd>,
}

/// A host descriptor handed to the container's process, as the guest makes it: bytes
/// cross the channel as the process's stream of the same number ([`Stream::passed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedFd {
    pub fd: u32,
    pub kind: PassedKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassedKind {
    /// The read end of a pipe whose write end the agent holds: the host's bytes come in.
    PipeReader,
    /// The write end of a pipe whose read end the agent holds: the process's bytes go out.
    PipeWriter,
    /// A connected stream socket: one end of a Unix socket pair, the agent the other.
    Connected,
    /// A listening stream socket of this family on the guest's loopback (an abstract
    /// address for Unix): each connection the host accepts becomes a [`Request::Connect`].
    Listener { family: SocketFamily },
    /// The null device, open for reading and writing.
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketFamily {
    Unix,
    Inet,
    Inet6,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// The OCI name (`RLIMIT_NOFILE`).
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

/// The capabilities the guest knows, by OCI name, in kernel bit order (bit N is entry N).
pub const CAPABILITY_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Capability sets by name (`CAP_CHOWN`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<M> {
    Message(M),
    /// A stream's bytes; empty `bytes` means the stream is closed.
    Data {
        process: ProcessId,
        stream: Stream,
        bytes: Vec<u8>,
    },
}

/// Appends one message frame to `out`.
pub fn encode_message<M: Serialize>(message: &M, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(message)?;
    if body.len() + 1 > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge(body.len() + 1));
    }
    out.extend_from_slice(&frame_len(body.len() + 1));
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&body);
    Ok(())
}

/// Appends data frames carrying `bytes` (split in chunks; an empty slice encodes an EOF).
pub fn encode_data(process: ProcessId, stream: Stream, bytes: &[u8], out: &mut Vec<u8>) {
    let mut push = |chunk: &[u8]| {
        out.extend_from_slice(&frame_len(1 + 4 + 4 + chunk.len()));
        out.push(KIND_DATA);
        out.extend_from_slice(&process.to_le_bytes());
        out.extend_from_slice(&stream.0.to_le_bytes());
        out.extend_from_slice(chunk);
    };
    if bytes.is_empty() {
        push(bytes);
    }
    for chunk in bytes.chunks(MAX_DATA_CHUNK) {
        push(chunk);
    }
}

fn frame_len(len: usize) -> [u8; 4] {
    // Callers bound `len` by MAX_FRAME_LEN, far below u32::MAX.
    (len as u32).to_le_bytes()
}

fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<Frame<M>, ProtoError> {
    let (&kind, rest) = body
        .split_first()
        .ok_or(ProtoError::Malformed("empty frame"))?;
    match kind {
        KIND_MESSAGE => Ok(Frame::Message(serde_json::from_slice(rest)?)),
        KIND_DATA => {
            if rest.len() < 8 {
                return Err(ProtoError::Malformed("short data header"));
            }
            let word = |at: usize| {
                u32::from_le_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]])
            };
            Ok(Frame::Data {
                process: word(0),
                stream: Stream(word(4)),
                bytes: rest[8..].to_vec(),
            })
        }
        _ => Err(ProtoError::Malformed("unknown frame kind")),
    }
}

/// Incremental decoder for non-blocking readers: push what arrived, pop whole frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Drops a partial frame, e.g. when the peer went away mid-frame.
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    pub fn next_frame<M: DeserializeOwned>(&mut self) -> Result<Option<Frame<M>>, ProtoError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }
}

/// Reads one frame from a blocking reader; `Closed` at a clean end of stream.
pub fn read_frame<M: DeserializeOwned, R: Read>(reader: &mut R) -> Result<Frame<M>, ProtoError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    decode_body(&body)
}

/// Writes one message frame to a blocking writer.
pub fn write_message<M: Serialize, W: Write>(
    writer: &mut W,
    message: &M,
) -> Result<(), ProtoError> {
    let mut out = Vec::new();
    encode_message(message, &mut out)?;
    writer.write_all(&out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(bytes: &[u8]) -> Vec<Frame<HostMessage>> {
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        // Feed one byte at a time: frames must come out whole whatever the read boundaries.
        for b in bytes {
            decoder.push(std::slice::from_ref(b));
            while let Some(frame) = decoder.next_frame().expect("valid frame") {
                frames.push(frame);
            }
        }
        frames
    }

    #[test]
    fn frames_survive_arbitrary_read_boundaries() {
        let hello = HostMessage {
            id: 7,
            request: Request::Hello {
                version: PROTOCOL_VERSION,
            },
        };
        let mut out = Vec::new();
        encode_message(&hello, &mut out).expect("encode");
        encode_data(3, Stream::STDIN, b"abc", &mut out);
        encode_data(3, Stream::STDIN, b"", &mut out);
        let connection = Stream(Stream::FIRST_CONNECTION + 7);
        encode_data(0, connection, b"conn", &mut out);
        let frames = roundtrip(&out);
        assert_eq!(
            frames,
            vec![
                Frame::Message(hello),
                Frame::Data {
                    process: 3,
                    stream: Stream::STDIN,
                    bytes: b"abc".to_vec()
                },
                Frame::Data {
                    process: 3,
                    stream: Stream::STDIN,
                    bytes: vec![]
                },
                Frame::Data {
                    process: 0,
                    stream: connection,
                    bytes: b"conn".to_vec()
                },
            ]
        );
    }

    #[test]
    fn large_data_is_split_into_bounded_chunks() {
        let data = vec![0x5a; MAX_DATA_CHUNK * 2 + 10];
        let mut out = Vec::new();
        encode_data(1, Stream::STDOUT, &data, &mut out);
        let mut reader = &out[..];
        let mut total = 0;
        let mut frames = 0;
        loop {
            match read_frame::<AgentMessage, _>(&mut reader) {
                Ok(Frame::Data { bytes, .. }) => {
                    assert!(bytes.len() <= MAX_DATA_CHUNK);
                    total += bytes.len();
                    frames += 1;
                }
                Ok(other) => panic!("unexpected frame {other:?}"),
                Err(ProtoError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((total, frames), (data.len(), 3));
    }

    #[test]
    fn oversized_length_prefix_is_rejected_not_allocated() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decoder.next_frame::<HostMessage>(),
            Err(ProtoError::FrameTooLarge(_))
        ));
    }

    #[test]
    fn unknown_frame_kind_is_malformed() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&[1, 0, 0, 0, 9]);
        assert!(matches!(
            decoder.next_frame::<HostMessage>(),
            Err(ProtoError::Malformed(_))
        ));
    }

    #[test]
    fn exit_status_code_follows_shell_convention() {
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
    }
}
