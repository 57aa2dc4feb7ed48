//! `supermachine`: a runc-compatible OCI runtime that runs each container in its own microVM.
//!
//! This binary is the runc front door: it parses runc's command line (liboci-cli) and maps
//! each verb onto the `container` library, one file per verb under `commands/`.

/// `println!` that does not panic when stdout is gone (a reader that closed its pipe).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod commands;
mod logging;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use liboci_cli::GlobalOpts;

use crate::logging::LogConfig;

#[derive(Parser, Debug)]
#[command(
    name = "supermachine",
    about = "An OCI runtime that runs every container in its own microVM",
    disable_version_flag = true,
    // liboci-cli's own wording names another runtime and a flag runc does not have.
    mut_arg("log", |a| a.help("Where to write the runtime's log (default: stderr)")),
    mut_arg("debug", |a| a.help("Log at debug level")),
    mut_arg("log_format", |a| a.help("The log format: text (default) or json")),
    mut_arg("root", |a| a.help("Root directory for container state")),
    mut_arg("systemd_cgroup", |a| a.help(
        "Use systemd's cgroups: cgroupsPath must be slice:prefix:name, which becomes a \
         transient scope created through systemd where systemd is PID 1 (else a cgroupfs \
         path of that name)"
    )),
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,

    /// The VM engine: auto, qemu or builtin (also SUPERMACHINE_ENGINE)
    #[arg(long, env = "SUPERMACHINE_ENGINE", default_value = "auto")]
    engine: String,

    /// Use the snapshot cache (restore baked VMs, bake new images): on or off
    /// (also SUPERMACHINE_SNAPSHOTS)
    #[arg(long, env = "SUPERMACHINE_SNAPSHOTS", default_value = "on", value_parser = ["on", "off"])]
    snapshots: String,

    /// Accepted for runc compatibility; checkpointing is not supported
    #[arg(long, hide = true)]
    criu: Option<String>,

    /// Accepted for runc compatibility
    #[arg(long, hide = true)]
    rootless: Option<String>,

    /// Print the version
    #[arg(short = 'v', long)]
    version: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

/// runc's verbs. liboci-cli parses each one's arguments, except `kill`, whose signal runc
/// makes optional (SIGTERM).
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a container
    Create(liboci_cli::Create),
    /// Start a created container
    Start(liboci_cli::Start),
    /// Show the state of a container
    State(liboci_cli::State),
    /// Send a signal to the container's process (default SIGTERM)
    Kill(KillArgs),
    /// Delete a container and everything it holds
    Delete(liboci_cli::Delete),
    /// Create and start a container
    Run(Box<liboci_cli::Run>),
    /// Run a process in a running container
    Exec(Box<liboci_cli::Exec>),
    /// List containers
    List(liboci_cli::List),
    /// Show the processes of a container
    Ps(liboci_cli::Ps),
    /// Pause a container's VM
    Pause(liboci_cli::Pause),
    /// Resume a paused container's VM
    Resume(liboci_cli::Resume),
    /// Update a container's resource limits
    Update(Box<liboci_cli::Update>),
    /// Show the container's resource usage (its cgroup in the VM)
    Events(liboci_cli::Events),
    /// Show what this runtime supports and which engine it picks here
    Features(liboci_cli::Features),
    /// Write a starter config.json
    Spec(liboci_cli::Spec),
    /// The snapshot cache: ls, rm, prune
    Cache(commands::cache::CacheArgs),
    /// Whether this host can run containers in microVMs, and how to fix what it lacks
    Check,
    /// The container's host process (started by create; not for direct use)
    #[command(hide = true)]
    Monitor(MonitorArgs),
    /// The host process of a detached exec (started by exec; not for direct use)
    #[command(hide = true, name = "exec-relay")]
    ExecRelay(ExecRelayArgs),
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// Container identifier
    #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub container_id: String,
    /// Signal name or number (KILL, SIGTERM, 9)
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
    /// Send the signal to every process of the container
    #[arg(short, long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct MonitorArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    console_socket: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExecRelayArgs {
    #[arg(long)]
    id: String,
    /// The process, as the agent runs it (JSON)
    #[arg(long)]
    spec: PathBuf,
    #[arg(long)]
    console_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        commands::version::print();
        return ExitCode::SUCCESS;
    }
    let log = match LogConfig::new(
        cli.global.log.clone(),
        cli.global.log_format.as_deref(),
        cli.global.debug,
    ) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("supermachine: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(command) = cli.command else {
        eprintln!("supermachine: no command given; see --help");
        return ExitCode::FAILURE;
    };
    let mut context = commands::Context::new(&cli.global, cli.engine.clone(), log.clone());
    context.snapshots = cli.snapshots == "on";
    let in_container_stdio = matches!(command, Command::Monitor(_) | Command::ExecRelay(_));
    let fallback = match &command {
        Command::Monitor(args) if cli.global.debug => {
            Some(context.store.root().join(&args.id).join("monitor.log"))
        }
        _ => None,
    };
    log.install(in_container_stdio, fallback.as_deref());
    // As runc: an `exec` that cannot run its process exits 255, apart from the process's own
    // statuses; every other verb's failure is 1.
    let failure = if matches!(command, Command::Exec(_)) {
        ExitCode::from(255)
    } else {
        ExitCode::FAILURE
    };
    match commands::dispatch(command, &context) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            log.fatal(&format!("{e:#}"));
            failure
        }
    }
}
