//! A bundle joined to a network namespace (as CNI hands them over): the VM takes the place of
//! the namespace's veth end, and traffic flows both ways with the host side of the veth.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{text, Env};

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

/// A namespace with one veth end inside (10.231.N.2/30, default route via .1) and the other
/// on the host (10.231.N.1/30); removed on drop.
struct TestNetwork {
    netns: String,
    host_veth: String,
    host_addr: String,
    guest_addr: String,
}

impl TestNetwork {
    fn new() -> Self {
        let n = std::process::id() % 250 + 1;
        let netns = format!("smtest{}", std::process::id());
        let host_veth = format!("smh{}", std::process::id() % 100_000);
        let peer = format!("smc{}", std::process::id() % 100_000);
        let (host_addr, guest_addr) = (format!("10.231.{n}.1"), format!("10.231.{n}.2"));
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &netns]);
        ip(&["-n", &netns, "link", "set", &peer, "name", "eth0"]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_veth]);
        ip(&["link", "set", &host_veth, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{guest_addr}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "route", "add", "default", "via", &host_addr]);
        TestNetwork {
            netns,
            host_veth,
            host_addr,
            guest_addr,
        }
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// `accept` that gives up after `timeout` (a guest that never connects must fail the test,
/// not hang it).
fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                conn.set_nonblocking(false)?;
                return Ok((conn, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes the bundle's container join the named network namespace (`ip netns`), with PID
/// and mount namespaces of its own.
fn join_netns(bundle: &mut common::Bundle, netns: &str) {
    let path = format!("/var/run/netns/{netns}");
    bundle.edit(|c| {
        c["linux"] = serde_json::json!({
            "namespaces": [{ "type": "network", "path": path }, { "type": "pid" }, { "type": "mount" }]
        });
    });
}

/// `GET /` over HTTP/1.0: the whole answer.
fn http_get(addr: &std::net::SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    Ok(page)
}

#[test]
fn a_vm_joined_to_a_network_namespace_talks_to_the_host_side_of_its_veth() {
    let Some(env) = Env::new() else { return };
    let net = TestNetwork::new();
    // A server on the host side, for the guest to reach.
    let listener = TcpListener::bind(format!("{}:0", net.host_addr)).unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let script = format!(
        "ip -4 -o addr show eth0 | awk '{{print $4}}'; \
         echo from-guest | nc {} {host_port}; \
         mkdir -p /www && echo hello-from-the-vm > /www/index.html && exec httpd -f -p 8080 -h /www",
        net.host_addr
    );
    let mut bundle = env.bundle(&["sh", "-c", &script]);
    join_netns(&mut bundle, &net.netns);
    let out_file = env.root().join("net.out");
    let status = env
        .cmd()
        .args(["run", "--detach", "--bundle", bundle.path_str(), "c-net"])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .status()
        .unwrap();
    assert!(status.success());

    // Guest → host.
    let guest_output = || {
        format!(
            "its output: {:?}; console: {}",
            std::fs::read_to_string(&out_file).unwrap_or_default(),
            std::fs::read_to_string(env.root().join("c-net/console.log")).unwrap_or_default()
        )
    };
    let connect_within = common::guest_time(Duration::from_secs(30));
    let (mut conn, peer) = accept_within(&listener, connect_within).unwrap_or_else(|e| {
        panic!(
            "the guest did not connect to the host: {e}; {}",
            guest_output()
        )
    });
    conn.set_read_timeout(Some(common::guest_time(Duration::from_secs(10))))
        .unwrap();
    let mut got = String::new();
    if let Err(e) = conn.read_to_string(&mut got) {
        panic!(
            "reading what the guest sent (so far {got:?}): {e}; {}",
            guest_output()
        );
    }
    drop(conn); // the guest's nc waits for this end to close
    assert_eq!(got, "from-guest\n");
    assert_eq!(
        peer.ip().to_string(),
        net.guest_addr,
        "the guest has the veth's address"
    );

    // Host → guest.
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(20));
    let page = loop {
        let guest_http: std::net::SocketAddr = format!("{}:8080", net.guest_addr).parse().unwrap();
        match http_get(&guest_http) {
            Ok(page) => break page,
            Err(e) if Instant::now() > deadline => {
                panic!("no answer from the guest: {e}; {}", guest_output())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(page.ends_with("hello-from-the-vm\n"), "{page}");

    // A second container in the same namespace (docker's --network container:, a pod)
    // would take the same interface for a VM of its own: its create fails, saying why, and
    // leaves nothing; the first one goes on serving.
    let mut joiner = env.bundle(&["true"]);
    join_netns(&mut joiner, &net.netns);
    let out = env.run(&["create", "--bundle", joiner.path_str(), "c-net-2"]);
    assert!(
        !out.status.success(),
        "a second VM in the namespace was created"
    );
    assert!(
        text(&out.stderr).contains("already holds another container's VM"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !env.root().join("c-net-2").exists(),
        "its state dir is left"
    );
    let left: Vec<String> = env
        .processes()
        .into_iter()
        .filter(|p| p.contains("c-net-2"))
        .collect();
    assert!(left.is_empty(), "{left:#?}");
    let guest_http: std::net::SocketAddr = format!("{}:8080", net.guest_addr).parse().unwrap();
    let page = http_get(&guest_http).unwrap();
    assert!(page.ends_with("hello-from-the-vm\n"), "{page}");

    let out = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(
        out.lines().next(),
        Some(format!("{}/30", net.guest_addr).as_str()),
        "{out}"
    );

    assert!(env.run(&["delete", "--force", "c-net"]).status.success());
    env.assert_clean("c-net");
    // No tap or redirect left in the namespace.
    let links = Command::new("ip")
        .args(["-n", &net.netns, "-o", "link"])
        .output()
        .unwrap();
    assert!(
        !text(&links.stdout).contains("smtap"),
        "{}",
        text(&links.stdout)
    );
    let qdiscs = Command::new("tc")
        .args(["-n", &net.netns, "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(
        !text(&qdiscs.stdout).contains("ingress"),
        "{}",
        text(&qdiscs.stdout)
    );
}

#[test]
fn a_bundle_without_a_network_namespace_has_only_loopback() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sh", "-c", "ls /sys/class/net | tr '\\n' ' '"]);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-nonet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "lo ");
}
