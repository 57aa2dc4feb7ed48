//! Descriptors the caller passes to the container's first process, with real VMs and beside
//! runc where it is installed: pipes and a connected socket through `--preserve-fds`,
//! listening sockets through systemd's socket activation (`LISTEN_FDS`), each at its own
//! number in the container; and what the VM cannot stand in for refused by `create`.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{guest_time, output_of, pass_fds, text, Bundle, Env};

/// Each runtime's `run` of a bundle, as a command that takes its options then the id.
enum Runtime<'a> {
    Ours(&'a Env),
    Runc(Box<common::Runc>),
}

impl Runtime<'_> {
    fn name(&self) -> &'static str {
        match self {
            Runtime::Ours(_) => "supermachine",
            Runtime::Runc(_) => "runc",
        }
    }

    /// `run` of `bundle` with `options`, as `id`, its descriptors 3.. being `fds`.
    fn command(&mut self, bundle: &Bundle, options: &[&str], id: &str) -> Command {
        let mut cmd = match self {
            Runtime::Ours(env) => {
                let mut cmd = env.cmd();
                cmd.args(["run", "--bundle", bundle.path_str()]);
                cmd
            }
            Runtime::Runc(runc) => std::mem::replace(&mut runc.command, Command::new("true")),
        };
        cmd.args(options).arg(match self {
            Runtime::Ours(_) => id.to_string(),
            Runtime::Runc(runc) => runc.id.clone(),
        });
        cmd
    }
}

/// Supermachine, then runc where it is installed.
fn runtimes<'a>(env: &'a Env, bundle: &Bundle) -> Vec<Runtime<'a>> {
    let mut all = vec![Runtime::Ours(env)];
    all.extend(common::runc(bundle).map(|r| Runtime::Runc(Box::new(r))));
    all
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

/// Runs `cmd` to its end, then drops it (and the passed descriptors it kept open).
fn finish(mut cmd: Command) -> Output {
    let out = output_of(&mut cmd);
    drop(cmd);
    out
}

#[test]
fn pipes_passed_with_preserve_fds_carry_bytes_in_and_out_as_under_runc() {
    let Some(env) = Env::new() else { return };
    // Reads descriptor 3 to its end onto descriptor 4; 5 is not open.
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "cat <&3 >&4 && echo done >&4; [ -e /proc/self/fd/5 ] || echo 'no descriptor 5'",
    ]);
    for mut runtime in runtimes(&env, &bundle) {
        let name = runtime.name();
        let (in_read, in_write) = pipe();
        let (out_read, out_write) = pipe();
        std::fs::File::from(in_write)
            .write_all(b"to the container\n")
            .unwrap();
        let mut cmd = runtime.command(&bundle, &["--preserve-fds", "2"], "c-pipes");
        pass_fds(&mut cmd, vec![in_read, out_write]);
        let out = finish(cmd);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "no descriptor 5\n", "{name}");
        let mut passed_out = String::new();
        std::fs::File::from(out_read)
            .read_to_string(&mut passed_out)
            .unwrap();
        assert_eq!(passed_out, "to the container\ndone\n", "{name}");
    }
    env.assert_clean("c-pipes");
}

#[test]
fn a_connected_socket_passed_with_preserve_fds_carries_bytes_both_ways_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sh", "-c", "read line <&3; echo \"got $line\" >&3"]);
    for mut runtime in runtimes(&env, &bundle) {
        let name = runtime.name();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        ours.write_all(b"hello\n").unwrap();
        let mut cmd = runtime.command(&bundle, &["--preserve-fds", "1"], "c-socket");
        pass_fds(&mut cmd, vec![theirs.into()]);
        let out = finish(cmd);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        // The container's end closed with it: the answer ends in EOF.
        ours.set_read_timeout(Some(guest_time(Duration::from_secs(30))))
            .unwrap();
        let mut answer = String::new();
        ours.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got hello\n", "{name}");
    }
    env.assert_clean("c-socket");
}

/// A bundle running `tests/fixtures/socket_activated.rs` with `args`; the program comes in
/// on stdin (see [`start_server`]), so that the container runs on the shared image.
fn server_bundle(env: &Env, args: &str) -> Bundle {
    env.bundle(&[
        "sh",
        "-c",
        &format!("cat > /tmp/server && chmod +x /tmp/server && exec /tmp/server {args}"),
    ])
}

/// A socket-activated run of a [`server_bundle`] given `listeners`, started in the
/// background: the run, and the file its stdout goes to (in `dir`).
fn start_server(
    runtime: &mut Runtime<'_>,
    bundle: &Bundle,
    listeners: Vec<OwnedFd>,
    dir: &std::path::Path,
) -> (std::process::Child, std::path::PathBuf) {
    let program = common::fixture_program("socket_activated");
    let run = runtime.command(bundle, &[], "c-activated");
    let mut cmd = common::socket_activated(&run, listeners.len());
    drop(run);
    let stdout = dir.join("stdout");
    cmd.stdin(std::fs::File::open(&program).unwrap())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(Stdio::inherit());
    pass_fds(&mut cmd, listeners);
    let child = cmd.spawn().unwrap();
    (child, stdout)
}

/// Sends `line` on a connection and reads the answer to its end.
fn exchange(mut stream: impl Read + Write, line: &str) -> String {
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut answer).unwrap();
    answer
}

#[test]
fn listening_sockets_of_socket_activation_serve_connections_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let bundle = server_bundle(&env, "");
    let timeout = Some(guest_time(Duration::from_secs(60)));
    for mut runtime in runtimes(&env, &bundle) {
        let name = runtime.name();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_address = tcp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let unix_path = dir.path().join("server.sock");
        let unix = UnixListener::bind(&unix_path).unwrap();
        let (mut child, stdout) = start_server(
            &mut runtime,
            &bundle,
            vec![tcp.into(), unix.into()],
            dir.path(),
        );
        // The host's listeners take the connections at once; the answers come once the
        // container's program accepts them, TCP first.
        let stream = std::net::TcpStream::connect(tcp_address).unwrap();
        stream.set_read_timeout(timeout).unwrap();
        assert_eq!(exchange(stream, "over tcp"), "echo: over tcp\n", "{name}");
        let stream = UnixStream::connect(&unix_path).unwrap();
        stream.set_read_timeout(timeout).unwrap();
        assert_eq!(exchange(stream, "over unix"), "echo: over unix\n", "{name}");
        let status = child.wait().unwrap();
        assert!(status.success(), "{name}: {status}");
        assert_eq!(
            std::fs::read_to_string(&stdout).unwrap(),
            "LISTEN_FDS=2 LISTEN_PID=1\nfd 3: served 1 line(s)\nfd 4: served 1 line(s)\n",
            "{name}"
        );
    }
    env.assert_clean("c-activated");
}

#[test]
fn socket_activation_for_another_process_passes_nothing_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "echo \"[$LISTEN_FDS]\"; [ -e /proc/self/fd/3 ] || echo 'no descriptor 3'",
    ]);
    for mut runtime in runtimes(&env, &bundle) {
        let name = runtime.name();
        let mut cmd = runtime.command(&bundle, &[], "c-not-ours");
        // LISTEN_PID names some other process: the descriptors are not this one's.
        cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
        let out = finish(cmd);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "[]\nno descriptor 3\n", "{name}");
    }
}

#[test]
fn exec_passes_preserved_descriptors_to_the_execd_process() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "600"]);
    let id = "c-exec-fds";
    let out = env.run(&["run", "--detach", "--bundle", bundle.path_str(), id]);
    assert!(out.status.success(), "run --detach: {}", text(&out.stderr));
    let exec = |options: &[&str], args: &[&str]| {
        let mut cmd = env.cmd();
        cmd.arg("exec").args(options).arg(id).args(args);
        cmd
    };

    // Pipes, in and out; with --detach (as containerd's runc shim execs) the process that
    // exec leaves behind relays them.
    for detach in [false, true] {
        let (in_read, in_write) = pipe();
        let (out_read, out_write) = pipe();
        std::fs::File::from(in_write)
            .write_all(b"to the exec\n")
            .unwrap();
        let options: &[&str] = if detach {
            &["--detach", "--preserve-fds", "2"]
        } else {
            &["--preserve-fds", "2"]
        };
        let mut cmd = exec(options, &["sh", "-c", "cat <&3 >&4 && echo done >&4"]);
        pass_fds(&mut cmd, vec![in_read, out_write]);
        let out = finish(cmd);
        assert!(out.status.success(), "exec: {}", text(&out.stderr));
        let mut passed_out = String::new();
        std::fs::File::from(out_read)
            .read_to_string(&mut passed_out)
            .unwrap();
        assert_eq!(passed_out, "to the exec\ndone\n", "detach: {detach}");
    }

    // A listening socket, served by the socket-activated program (brought in on stdin).
    let program = common::fixture_program("socket_activated");
    let mut cmd = exec(
        &[],
        &["sh", "-c", "cat > /tmp/server && chmod +x /tmp/server"],
    );
    cmd.stdin(std::fs::File::open(&program).unwrap());
    let out = finish(cmd);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = tcp.local_addr().unwrap();
    let mut cmd = exec(
        &["--preserve-fds", "1", "--env", "LISTEN_FDS=1"],
        &["/tmp/server"],
    );
    let dir = tempfile::tempdir().unwrap();
    let stdout = dir.path().join("stdout");
    cmd.stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(Stdio::inherit());
    pass_fds(&mut cmd, vec![tcp.into()]);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(guest_time(Duration::from_secs(60))))
        .unwrap();
    assert_eq!(exchange(stream, "to an exec"), "echo: to an exec\n");
    let status = child.wait().unwrap();
    assert!(status.success(), "exec of the server: {status}");
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        "LISTEN_FDS=1 LISTEN_PID=\nfd 3: served 1 line(s)\n"
    );

    let out = env.run(&["delete", "--force", id]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_clean(id);
}

#[test]
fn a_client_that_stops_reading_holds_only_its_own_connection_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let bundle = server_bundle(&env, "flood");
    for mut runtime in runtimes(&env, &bundle) {
        let name = runtime.name();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = tcp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut child, stdout) = start_server(&mut runtime, &bundle, vec![tcp.into()], dir.path());
        // Connected, and never read: the server's writes fill every buffer on the way.
        let client = std::net::TcpStream::connect(address).unwrap();
        // The container's stdout and exit still come through.
        let deadline = std::time::Instant::now() + guest_time(Duration::from_secs(60));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: the run did not end while a client did not read");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        drop(client);
        assert!(status.success(), "{name}: {status}");
        assert_eq!(
            std::fs::read_to_string(&stdout).unwrap(),
            "LISTEN_FDS=1 LISTEN_PID=1\nstill answering 0\nstill answering 1\nstill answering 2\n\
             the writer was held\n",
            "{name}"
        );
    }
    env.assert_clean("c-activated");
}
