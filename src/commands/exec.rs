//! `exec`: run another process in a running container.
//!
//! Without `--detach` this process relays the new process's stdio and exits with its status.
//! With `--detach` (what containerd's runc shim uses) it starts a relay process that does
//! that, writes the relay's pid to `--pid-file`, and returns once the process runs.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::process::Stdio;

use agent_proto::ProcessSpec;
use anyhow::{anyhow, bail, Context as _, Result};
use container::exec_client::ExecSession;
use container::state::Verb;
use container::state::{write_atomic, ContainerState};
use container::translate;
use liboci_cli::Exec;
use nix::fcntl::OFlag;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use serde::{Deserialize, Serialize};

use super::create::{absolute, PassedFds};
use super::run::forwarded_signals;
use super::Context;
use crate::ExecRelayArgs;

/// The relay's answer to `exec --detach`, one JSON line on the sync pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RelaySync {
    Started { pid: i32 },
    Failed { error: String },
}

pub fn run(args: Exec, context: &Context) -> Result<i32> {
    let passed = PassedFds::preserved(args.preserve_fds)?;
    let (dir, state) = context.open(&args.container_id)?;
    state.current_status().allows(Verb::Exec {
        ignore_paused: args.ignore_paused,
    })?;
    let mut spec = process_spec(&args, &state)?;
    passed.give_to(&mut spec);
    let console_socket = args.console_socket.as_deref().map(absolute).transpose()?;
    if args.detach {
        if spec.terminal && console_socket.is_none() {
            bail!("cannot allocate tty if supermachine will detach without setting console socket");
        }
        let pid = spawn_relay(
            &args.container_id,
            &spec,
            console_socket.as_deref(),
            &dir.path,
            context,
        )?;
        if let Some(path) = &args.pid_file {
            write_atomic(&absolute(path)?, pid.to_string().as_bytes())?;
        }
        return Ok(0);
    }
    let signals = forwarded_signals();
    signals.thread_block()?;
    let foreground_tty = spec.terminal && console_socket.is_none();
    let session = ExecSession::start(&dir.path, spec, console_socket.as_deref())?;
    if let Some(path) = &args.pid_file {
        write_atomic(&absolute(path)?, std::process::id().to_string().as_bytes())?;
    }
    let _raw = foreground_tty.then(RawStdin::enter).flatten();
    Ok(session.relay(signals, foreground_tty)?)
}

/// Our terminal in raw mode while a foreground tty process runs.
struct RawStdin(nix::sys::termios::Termios);

impl RawStdin {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawStdin(saved))
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

fn spawn_relay(
    id: &str,
    spec: &ProcessSpec,
    console_socket: Option<&std::path::Path>,
    dir: &std::path::Path,
    context: &Context,
) -> Result<u32> {
    let spec_file = dir.join(format!("exec-{}.json", std::process::id()));
    write_atomic(&spec_file, &serde_json::to_vec(spec)?)?;
    let (sync_read, sync_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let mut command = context.helper(&sync_write)?;
    command
        .args(["exec-relay", "--id", id])
        .arg("--spec")
        .arg(&spec_file);
    if let Some(socket) = console_socket {
        command.arg("--console-socket").arg(socket);
        // The pty carries the process's stdio; the caller reads ours to EOF.
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let mut child = command.spawn().context("start the exec relay")?;
    drop(sync_write);
    let mut text = String::new();
    let _ = File::from(sync_read).read_to_string(&mut text);
    let _ = std::fs::remove_file(&spec_file);
    match serde_json::from_str::<RelaySync>(text.trim()) {
        Ok(RelaySync::Started { pid }) => {
            log::debug!("exec in {id}: guest pid {pid}, relay pid {}", child.id());
            Ok(child.id())
        }
        Ok(RelaySync::Failed { error }) => {
            let _ = child.wait();
            Err(anyhow!(error))
        }
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            bail!("the exec relay exited before the process started ({status})")
        }
    }
}

/// The hidden `exec-relay` verb: the host process of a detached exec.
pub fn relay(args: ExecRelayArgs, context: &Context) -> Result<i32> {
    let signals = forwarded_signals();
    signals.thread_block()?;
    let _ = nix::unistd::setsid();
    let mut sync = container::monitor::take_sync_fd().map(File::from);
    let mut report = |message: RelaySync| {
        if let Some(file) = sync.take() {
            let mut file = file;
            let _ = serde_json::to_writer(&mut file, &message);
        }
    };
    let started = (|| -> Result<ExecSession> {
        let spec: ProcessSpec = serde_json::from_slice(
            &std::fs::read(&args.spec).with_context(|| format!("read {}", args.spec.display()))?,
        )?;
        let dir = context.store.open(&args.id)?;
        Ok(ExecSession::start(
            &dir.path,
            spec,
            args.console_socket.as_deref(),
        )?)
    })();
    match started {
        Ok(session) => {
            report(RelaySync::Started { pid: session.pid });
            Ok(session.relay(signals, false)?)
        }
        Err(e) => {
            report(RelaySync::Failed {
                error: format!("{e:#}"),
            });
            Err(e)
        }
    }
}

/// The container's own process, as config.json gives it (capabilities resolved as for its
/// first process); the default one if the bundle is gone.
fn container_process(state: &ContainerState) -> ProcessSpec {
    let mut spec = container::bundle::Bundle::load(&state.bundle)
        .ok()
        .and_then(|b| b.spec.process().as_ref().map(translate::process_spec))
        .unwrap_or_default();
    spec.capabilities.get_or_insert_with(Default::default);
    spec
}

/// The process to run: `--process` (a full OCI process, as containerd passes it), or the
/// command line applied over the container's own process settings.
fn process_spec(args: &Exec, state: &ContainerState) -> Result<ProcessSpec> {
    if let Some(path) = &args.process {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let process: oci_spec::runtime::Process = serde_json::from_str(&text)
            .with_context(|| format!("invalid process in {}", path.display()))?;
        let mut spec = translate::process_spec(&process);
        if spec.args.is_empty() {
            bail!("process args must not be empty");
        }
        translate::inherit_capabilities(&mut spec, &container_process(state));
        return Ok(spec);
    }
    if args.command.is_empty() {
        bail!("exec needs a command or --process");
    }
    let mut spec = container_process(state);
    spec.args = args.command.clone();
    spec.terminal = args.tty;
    spec.console_size = None;
    for (key, value) in &args.env {
        spec.env.retain(|e| !e.starts_with(&format!("{key}=")));
        spec.env.push(format!("{key}={value}"));
    }
    if let Some(cwd) = &args.cwd {
        spec.cwd = cwd.to_string_lossy().into_owned();
    }
    if let Some((uid, gid)) = args.user {
        spec.uid = uid;
        spec.gid = gid.unwrap_or(spec.gid);
    }
    spec.additional_gids.extend(&args.additional_gids);
    spec.no_new_privileges |= args.no_new_privs;
    if !args.cap.is_empty() {
        let caps = spec.capabilities.get_or_insert_with(Default::default);
        for cap in &args.cap {
            for set in [
                &mut caps.bounding,
                &mut caps.effective,
                &mut caps.permitted,
                &mut caps.inheritable,
            ] {
                set.push(cap.clone());
            }
        }
    }
    if spec.cwd.is_empty() {
        spec.cwd = "/".into();
    }
    Ok(spec)
}
