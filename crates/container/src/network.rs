//! The container's network on the host side: its network namespace's interfaces (docker's
//! or CNI's veth), bridged to the VM's virtio-net device through a tap with tc (an ingress
//! qdisc and a mirred redirect each way, the Kata "tcfilter" model), and described to the
//! agent, which gives the guest interface the veth's MAC, MTU, addresses and routes.
//!
//! Everything here runs in the container's network namespace: the monitor lives in it, and
//! the shim does this work on the thread that entered it. `ip` and `tc` (iproute2) do the
//! netlink work.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_proto::{InterfaceConfig, NetworkConfig, Request, RouteConfig};
use serde_json::Value;

use lock_ext::LockExt;

use crate::agent_client::AgentClient;
use crate::ContainerError;

/// Our taps are named with this prefix, so that discovery never mistakes one for the
/// container's own interface.
pub const TAP_PREFIX: &str = "smtap";

/// A tap device, alive as long as its fd (a non-persistent tap vanishes with the VMM).
#[derive(Debug)]
pub struct Tap {
    pub fd: OwnedFd,
    pub name: String,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Makes a tap in the calling thread's network namespace.
///
/// With `persist`, the tap outlives its fds and goes with the namespace: only for a namespace
/// the runtime made for the container, which the kernel tears down (tap included) in the
/// background once the container's last process has gone. Closing a non-persistent tap
/// unregisters it there and then, which waits for RCU grace periods: 15-30 ms measured here,
/// added to every container's exit.
pub fn create_tap(name: &str, persist: bool) -> Result<Tap, ContainerError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_cloexec()
        .open("/dev/net/tun")
        .map_err(ContainerError::io("/dev/net/tun"))?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (dst, src) in req
        .name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads an ifreq-sized struct we own for the duration of the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        let error = std::io::Error::last_os_error();
        // The namespace's tap is attached: another container's VM serves this namespace.
        if error.raw_os_error() == Some(libc::EBUSY) {
            return Err(ContainerError::Unsupported(format!(
                "the container's network namespace already holds another container's VM (its \
                 tap {name} is in use): containers that share a network namespace (docker's \
                 --network container:NAME, a Kubernetes pod) would each redirect the same \
                 interface to their own VM, and this runtime does not run them in one VM yet"
            )));
        }
        return Err(ContainerError::Monitor(format!(
            "create tap {name}: {error}"
        )));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if persist && unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1) } != 0 {
        return Err(ContainerError::Monitor(format!(
            "make tap {name} persistent: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(Tap {
        fd: OwnedFd::from(file),
        name: name.to_string(),
    })
}

trait CloexecOpen {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecOpen for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC)
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, ContainerError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => {
                ContainerError::Monitor(format!("{program} not found: install iproute2"))
            }
            _ => ContainerError::Monitor(format!("{program}: {e}")),
        })?;
    if !output.status.success() {
        return Err(ContainerError::Monitor(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The container's interfaces: every one but loopback and our taps, with what the guest
/// needs to take its place.
pub fn discover() -> Result<Vec<InterfaceConfig>, ContainerError> {
    let addresses: Value = serde_json::from_str(&run("ip", &["-j", "addr", "show"])?)
        .map_err(|e| ContainerError::Monitor(format!("ip -j addr: {e}")))?;
    let mut routes4: Value = serde_json::from_str(&run("ip", &["-j", "-4", "route", "show"])?)
        .map_err(|e| ContainerError::Monitor(format!("ip -j route: {e}")))?;
    let routes6: Value =
        serde_json::from_str(&run("ip", &["-j", "-6", "route", "show"])?).unwrap_or(Value::Null);
    if let (Some(v4), Some(v6)) = (routes4.as_array_mut(), routes6.as_array()) {
        v4.extend(v6.iter().cloned());
    }
    Ok(interfaces_from(&addresses, &routes4))
}

/// Builds the interface list from `ip -j addr` and `ip -j route` output.
pub fn interfaces_from(addresses: &Value, routes: &Value) -> Vec<InterfaceConfig> {
    let mut interfaces = Vec::new();
    for link in addresses.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default().to_string();
        if name.is_empty()
            || name == "lo"
            || name.starts_with(TAP_PREFIX)
            || link["link_type"] != "ether"
        {
            continue;
        }
        let addrs: Vec<String> = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            // Link-local IPv6 is the kernel's to make, from the MAC.
            .filter(|a| a["scope"] != "link")
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a["local"].as_str()?,
                    a["prefixlen"].as_u64()?
                ))
            })
            .collect();
        let routes: Vec<RouteConfig> = routes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["dev"] == name.as_str() && r["protocol"] != "kernel")
            .filter_map(|r| {
                let dst = r["dst"].as_str()?;
                Some(RouteConfig {
                    destination: (dst != "default").then(|| dst.to_string()),
                    gateway: r["gateway"].as_str().map(String::from),
                })
            })
            .collect();
        interfaces.push(InterfaceConfig {
            name,
            mac: link["address"].as_str().unwrap_or_default().to_string(),
            mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
            addresses: addrs,
            routes,
        });
    }
    interfaces
}

/// Moves every frame between `host` and `tap`, both ways.
pub fn connect(host: &str, tap: &str) -> Result<(), ContainerError> {
    run("ip", &["link", "set", tap, "up"])?;
    for (from, to) in [(host, tap), (tap, host)] {
        run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        run(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

/// Removes what `connect` added on the host interface (the tap goes with its fd).
pub fn disconnect(host: &str) {
    // The interface may be gone already (docker removed the veth): nothing to do then.
    let _ = run("tc", &["qdisc", "del", "dev", host, "ingress"]);
}

/// Whether a resolv.conf points at docker's embedded resolver.
pub fn wants_dns_relay(resolv_conf: &[u8]) -> bool {
    String::from_utf8_lossy(resolv_conf)
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["nameserver", "127.0.0.11"])
}

/// The network of a running container: what was connected, to undo it at the end.
#[derive(Debug, Default)]
pub struct Attachment {
    pub connected: Vec<String>,
    pub done: bool,
}

impl Attachment {
    /// Connects the namespace's interfaces (up to the VM's `taps`) and configures the guest.
    /// Nothing to connect is not an error (`--network none`); it is tried again later.
    /// `resolv_conf` is the host file bound on the container's `/etc/resolv.conf` (docker
    /// writes it when it connects the network; the guest sees it live through the share).
    pub fn attach(
        &mut self,
        agent: &AgentClient,
        taps: &[String],
        resolv_conf: Option<&Path>,
    ) -> Result<(), ContainerError> {
        if self.done || taps.is_empty() {
            return Ok(());
        }
        let interfaces: Vec<InterfaceConfig> = discover()?.into_iter().take(taps.len()).collect();
        if interfaces.is_empty() {
            return Ok(());
        }
        let dns_relay = match resolv_conf {
            Some(path) => wants_dns_relay(&std::fs::read(path).map_err(ContainerError::io(path))?),
            None => false,
        };
        for (interface, tap) in interfaces.iter().zip(taps) {
            connect(&interface.name, tap)?;
            self.connected.push(interface.name.clone());
        }
        if dns_relay {
            relay_dns(agent);
        }
        log::debug!(
            "network: {:?}",
            interfaces
                .iter()
                .map(|i| (&i.name, &i.addresses))
                .collect::<Vec<_>>()
        );
        agent.request(
            Request::ConfigureNetwork(NetworkConfig {
                interfaces,
                dns_relay,
            }),
            Duration::from_secs(30),
        )?;
        self.done = true;
        Ok(())
    }

    pub fn detach(&mut self) {
        for host in self.connected.drain(..) {
            disconnect(&host);
        }
    }
}

/// Threads that answer the guest's relayed DNS queries.
const DNS_WORKERS: usize = 4;
/// Queries waiting for a worker; one that finds the queue full is dropped (the guest's
/// resolver asks again), so a guest cannot make the host spend more than [`DNS_WORKERS`]
/// threads and this many buffered queries on it.
const DNS_QUEUE: usize = 64;

/// Answers the guest's DNS queries by asking the resolver at 127.0.0.11 in this namespace,
/// on a fixed pool of threads that ends when the agent's channel closes.
fn relay_dns(agent: &AgentClient) {
    relay_dns_to(agent, DOCKER_RESOLVER);
}

/// docker's embedded DNS server, in the container's network namespace.
const DOCKER_RESOLVER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53));

fn relay_dns_to(agent: &AgentClient, resolver: SocketAddr) {
    let (queue, queries) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(DNS_QUEUE);
    let queries = std::sync::Arc::new(std::sync::Mutex::new(queries));
    for _ in 0..DNS_WORKERS {
        let queries = std::sync::Arc::clone(&queries);
        let client = agent.clone();
        let _ = std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || loop {
                // Ends when the channel closes and the handler, the queue's sender, goes.
                let next = queries.lock_unpoisoned().recv();
                let Ok((id, payload)) = next else { break };
                if client.is_closed() {
                    break;
                }
                match ask_resolver(resolver, &payload) {
                    Ok(payload) => {
                        let _ = client
                            .request(Request::DnsAnswer { id, payload }, Duration::from_secs(5));
                    }
                    Err(e) => log::debug!("DNS relay: {e}"),
                }
            });
    }
    agent.on_dns_query(std::sync::Arc::new(move |id, payload| {
        if queue.try_send((id, payload)).is_err() {
            log::debug!("DNS relay: query {id} dropped, {DNS_QUEUE} already waiting");
        }
    }));
}

fn ask_resolver(resolver: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(query, resolver)?;
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_client::forged;
    use agent_proto::AgentMessage;

    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .count()
    }

    #[test]
    fn a_flood_of_relayed_dns_queries_is_served_by_a_fixed_pool_that_ends_with_the_channel() {
        let flood = (0..1000)
            .map(|id| AgentMessage::DnsQuery {
                id,
                payload: vec![0; 12],
            })
            .collect();
        // A resolver that answers at once, with the query.
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = resolver.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = resolver.recv_from(&mut buf) {
                let _ = resolver.send_to(&buf[..n], from);
            }
        });
        let client = forged::client_of(flood);
        relay_dns_to(&client, address);
        forged::go(&client);
        assert_eq!(threads_named("dns"), DNS_WORKERS);
        client.shutdown();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while threads_named("dns") > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the DNS workers stayed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn interfaces_come_from_ip_json_without_loopback_taps_or_kernel_routes() {
        let addresses = serde_json::json!([
            { "ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00", "mtu": 65536,
              "addr_info": [{ "family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host" }] },
            { "ifname": "eth0", "link_type": "ether", "address": "02:42:ac:11:00:02", "mtu": 1500,
              "addr_info": [
                { "family": "inet", "local": "172.17.0.2", "prefixlen": 16, "scope": "global" },
                { "family": "inet6", "local": "fe80::42:acff:fe11:2", "prefixlen": 64, "scope": "link" } ] },
            { "ifname": "smtap0", "link_type": "ether", "address": "aa:bb:cc:dd:ee:ff", "mtu": 1500, "addr_info": [] }
        ]);
        let routes = serde_json::json!([
            { "dst": "default", "gateway": "172.17.0.1", "dev": "eth0", "flags": [] },
            { "dst": "172.17.0.0/16", "dev": "eth0", "protocol": "kernel", "scope": "link" },
            { "dst": "10.9.0.0/16", "gateway": "172.17.0.254", "dev": "eth0" }
        ]);
        let interfaces = interfaces_from(&addresses, &routes);
        assert_eq!(interfaces.len(), 1);
        let eth0 = &interfaces[0];
        assert_eq!(
            (eth0.name.as_str(), eth0.mac.as_str(), eth0.mtu),
            ("eth0", "02:42:ac:11:00:02", 1500)
        );
        assert_eq!(eth0.addresses, vec!["172.17.0.2/16".to_string()]);
        assert_eq!(
            eth0.routes,
            vec![
                RouteConfig {
                    destination: None,
                    gateway: Some("172.17.0.1".into())
                },
                RouteConfig {
                    destination: Some("10.9.0.0/16".into()),
                    gateway: Some("172.17.0.254".into())
                },
            ]
        );
    }

    #[test]
    fn docker_embedded_dns_is_detected_from_resolv_conf() {
        assert!(wants_dns_relay(
            b"search x\nnameserver 127.0.0.11\noptions ndots:0\n"
        ));
        assert!(!wants_dns_relay(b"nameserver 10.0.0.1\n"));
    }
}
