//! `run`: create, start, and (unless `--detach`) wait for the container, forwarding signals
//! to its monitor, then delete it (unless `--keep`). Exits with the container's status.

use anyhow::{bail, Result};
use container::bundle::Bundle;
use container::lifecycle;
use container::monitored::MonitoredContainer;
use liboci_cli::Run;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;

use super::create::{create_container, PassedFds};
use super::Context;
use crate::terminal::ForegroundTerminal;

/// Signals `run` forwards to the monitor (which forwards them to the container).
pub fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGWINCH,
        Signal::SIGCONT,
    ] {
        set.add(s);
    }
    set
}

pub fn run(args: Run, context: &Context) -> Result<i32> {
    let passed = PassedFds::from_caller(args.preserve_fds)?;
    let bundle = Bundle::load(&args.bundle)?;
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let foreground = match (terminal, &args.console_socket, args.detach) {
        (true, None, true) => {
            bail!("cannot allocate tty if supermachine will detach without setting console socket")
        }
        (true, None, false) => Some(ForegroundTerminal::listen(context.store.root())?),
        _ => None,
    };
    let console_socket = args
        .console_socket
        .clone()
        .or_else(|| foreground.as_ref().map(|f| f.socket().to_path_buf()));
    let signals = forwarded_signals();
    if !args.detach {
        signals.thread_block()?;
    }
    let mut created = create_container(
        &args.container_id,
        bundle,
        &passed,
        console_socket.as_deref(),
        args.pid_file.as_deref(),
        context,
    )?;
    let container = MonitoredContainer {
        dir: created.dir.clone(),
    };
    let attached = match foreground {
        Some(f) => match f.attach() {
            Ok(t) => Some(t),
            Err(e) => {
                let _ = lifecycle::delete(&container, true);
                let _ = created.monitor.wait();
                return Err(e);
            }
        },
        None => None,
    };
    if let Err(e) = lifecycle::start(&container) {
        let _ = lifecycle::delete(&container, true);
        let _ = created.monitor.wait();
        return Err(e.into());
    }
    if args.detach {
        return Ok(0);
    }
    let monitor = Pid::from_raw(created.monitor.id() as i32);
    let master = attached.as_ref().map(|t| t.raw_master());
    std::thread::spawn(move || loop {
        let Ok(signal) = signals.wait() else { continue };
        match (signal, master) {
            (Signal::SIGWINCH, Some(fd)) => crate::terminal::copy_size(fd),
            (Signal::SIGWINCH, None) => {}
            _ => {
                let _ = kill(monitor, signal);
            }
        }
    });
    let status = created.monitor.wait()?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255);
    if let Some(t) = attached {
        t.finish();
    }
    if !args.keep {
        lifecycle::delete(&container, true)?;
    }
    Ok(code)
}
