//! The guest's network interfaces.
//!
//! Every VM has its virtio-net devices from boot (a snapshot's device set is fixed), but a
//! container only sees an interface once the host connects it to one of its own: until then
//! the driver is unbound from the device (no `eth0` at all, as with `--network none`). The
//! host's `ConfigureNetwork` binds it and gives it the host interface's name, MAC, MTU,
//! addresses and routes. Configuration is by ioctl, which needs no netlink code.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use agent_proto::{InterfaceConfig, NetworkConfig, RouteConfig};

use crate::agent_debug;

const DRIVER: &str = "/sys/bus/virtio/drivers/virtio_net";

/// The detached network devices and the driver's `bind` file, opened at boot: later the
/// agent's `/sys` is the container's (read-only, or absent).
#[derive(Debug, Default)]
pub struct DetachedNics {
    devices: Vec<String>,
    bind: Option<std::fs::File>,
}

impl DetachedNics {
    /// Unbinds every virtio-net device.
    pub fn detach_all() -> Self {
        let devices = detach_all();
        let bind = std::fs::OpenOptions::new()
            .write(true)
            .open(Path::new(DRIVER).join("bind"))
            .ok();
        DetachedNics { devices, bind }
    }
}

/// Unbinds every virtio-net device; returns their virtio device names (`virtio2`), sorted.
fn detach_all() -> Vec<String> {
    let mut devices: Vec<String> = std::fs::read_dir(DRIVER)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("virtio"))
        .collect();
    devices.sort();
    for device in &devices {
        if let Err(e) = std::fs::write(Path::new(DRIVER).join("unbind"), device) {
            agent_debug!("unbind {device}: {e}");
        }
    }
    devices
}

#[derive(Debug)]
pub struct NetError(pub String);

fn err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> NetError {
    move |e| NetError(format!("{what}: {e}"))
}

/// The interfaces the kernel has now.
fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// Binds `device` and returns the name of the interface the kernel made for it.
fn attach(device: &str, bind: &mut std::fs::File) -> Result<String, NetError> {
    use std::io::Write;
    let before = interface_names();
    bind.write_all(device.as_bytes())
        .map_err(err(format!("bind {device}")))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(name) = interface_names().into_iter().find(|n| !before.contains(n)) {
            return Ok(name);
        }
        if Instant::now() > deadline {
            return Err(NetError(format!("no interface appeared for {device}")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn socket(family: libc::c_int) -> Result<OwnedFd, NetError> {
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError(format!(
            "socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a new, valid descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(NetError(format!("interface name {name:?} too long")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Runs an interface ioctl, naming it in the error.
fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), NetError> {
    // SAFETY: `arg` is the structure this request reads or writes, owned by the caller for
    // the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } != 0 {
        return Err(NetError(format!(
            "{what}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn set_flags(fd: &OwnedFd, name: &str, up: bool) -> Result<(), NetError> {
    let mut req = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFFLAGS, &mut req, "get flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        if up {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        } else {
            req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
        }
    }
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("set {name} {}", if up { "up" } else { "down" }),
    )
}

/// `ip link set lo up`.
pub fn loopback_up() -> Result<(), NetError> {
    let fd = socket(libc::AF_INET)?;
    set_flags(&fd, "lo", true)
}

fn parse_mac(mac: &str) -> Result<[u8; 6], NetError> {
    let bytes: Vec<u8> = mac
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| NetError(format!("invalid MAC {mac:?}")))
}

fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), NetError> {
    let (addr, prefix) = cidr.split_once('/').unwrap_or((cidr, ""));
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| NetError(format!("invalid address {cidr:?}")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse()
            .map_err(|_| NetError(format!("invalid prefix {cidr:?}")))?
    };
    if prefix > max {
        return Err(NetError(format!("invalid prefix {cidr:?}")));
    }
    Ok((addr, prefix))
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it by family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    })
}

/// glibc's `struct rtentry` (x86_64 and aarch64 layouts agree), for SIOCADDRT.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// The kernel's `struct in6_rtmsg`, for SIOCADDRT on an IPv6 socket.
#[repr(C)]
struct In6RtMsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

const RTF_UP: u16 = 0x1;
const RTF_GATEWAY: u16 = 0x2;

fn configure_interface(
    device: &str,
    bind: &mut std::fs::File,
    config: &InterfaceConfig,
) -> Result<(), NetError> {
    let mut name = attach(device, bind)?;
    let fd4 = socket(libc::AF_INET)?;
    set_flags(&fd4, &name, false)?;
    if !config.name.is_empty() && config.name != name {
        let mut req = ifreq(&name)?;
        let new = ifreq(&config.name)?;
        req.ifr_ifru.ifru_newname = new.ifr_name;
        ioctl(
            &fd4,
            libc::SIOCSIFNAME,
            &mut req,
            &format!("rename {name} to {}", config.name),
        )?;
        name = config.name.clone();
    }
    if !config.mac.is_empty() {
        let mac = parse_mac(&config.mac)?;
        let mut req = ifreq(&name)?;
        // SAFETY: writing the hwaddr member of the union, which SIOCSIFHWADDR reads.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                *dst = src as libc::c_char;
            }
        }
        ioctl(&fd4, libc::SIOCSIFHWADDR, &mut req, "set MAC")?;
    }
    if config.mtu > 0 {
        let mut req = ifreq(&name)?;
        req.ifr_ifru.ifru_mtu = config.mtu as libc::c_int;
        ioctl(&fd4, libc::SIOCSIFMTU, &mut req, "set MTU")?;
    }
    set_flags(&fd4, &name, true)?;
    let mut index_req = ifreq(&name)?;
    ioctl(&fd4, libc::SIOCGIFINDEX, &mut index_req, "get index")?;
    // SAFETY: SIOCGIFINDEX filled the index member.
    let index = unsafe { index_req.ifr_ifru.ifru_ifindex };
    let mut have_v4 = false;
    for cidr in &config.addresses {
        match parse_cidr(cidr)? {
            (IpAddr::V4(addr), prefix) => {
                if have_v4 {
                    agent_debug!("{name}: extra IPv4 address {cidr} not configured");
                    continue;
                }
                have_v4 = true;
                let mut req = ifreq(&name)?;
                req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
                ioctl(
                    &fd4,
                    libc::SIOCSIFADDR,
                    &mut req,
                    &format!("set address {cidr}"),
                )?;
                let mut req = ifreq(&name)?;
                req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask(prefix));
                ioctl(
                    &fd4,
                    libc::SIOCSIFNETMASK,
                    &mut req,
                    &format!("set netmask of {cidr}"),
                )?;
            }
            (IpAddr::V6(addr), prefix) => {
                let fd6 = socket(libc::AF_INET6)?;
                let mut req = libc::in6_ifreq {
                    ifr6_addr: libc::in6_addr {
                        s6_addr: addr.octets(),
                    },
                    ifr6_prefixlen: u32::from(prefix),
                    ifr6_ifindex: index,
                };
                ioctl(
                    &fd6,
                    libc::SIOCSIFADDR,
                    &mut req,
                    &format!("set address {cidr}"),
                )?;
            }
        }
    }
    let device_name = CString::new(name.clone()).map_err(|_| NetError("bad name".into()))?;
    for route in &config.routes {
        add_route(&fd4, index, &device_name, route)?;
    }
    agent_debug!("{name} configured: {:?}", config.addresses);
    Ok(())
}

fn add_route(
    fd4: &OwnedFd,
    index: i32,
    device: &CString,
    route: &RouteConfig,
) -> Result<(), NetError> {
    let destination = match &route.destination {
        Some(cidr) => Some(parse_cidr(cidr)?),
        None => None,
    };
    let gateway: Option<IpAddr> = match &route.gateway {
        Some(g) => Some(
            g.parse()
                .map_err(|_| NetError(format!("invalid gateway {g:?}")))?,
        ),
        None => None,
    };
    let v6 =
        matches!(destination, Some((IpAddr::V6(_), _))) || matches!(gateway, Some(IpAddr::V6(_)));
    let what = format!("route {route:?}");
    if v6 {
        let (dst, dst_len) = match destination {
            Some((IpAddr::V6(a), p)) => (a, p),
            _ => (Ipv6Addr::UNSPECIFIED, 0),
        };
        let zero = libc::in6_addr { s6_addr: [0; 16] };
        let mut msg = In6RtMsg {
            rtmsg_dst: libc::in6_addr {
                s6_addr: dst.octets(),
            },
            rtmsg_src: zero,
            rtmsg_gateway: zero,
            rtmsg_type: 0,
            rtmsg_dst_len: u16::from(dst_len),
            rtmsg_src_len: 0,
            rtmsg_metric: 1,
            rtmsg_info: 0,
            rtmsg_flags: u32::from(RTF_UP),
            rtmsg_ifindex: index,
        };
        if let Some(IpAddr::V6(g)) = gateway {
            msg.rtmsg_gateway = libc::in6_addr {
                s6_addr: g.octets(),
            };
            msg.rtmsg_flags |= u32::from(RTF_GATEWAY);
        }
        let fd6 = socket(libc::AF_INET6)?;
        return ioctl(&fd6, libc::SIOCADDRT, &mut msg, &what);
    }
    let (dst, prefix) = match destination {
        Some((IpAddr::V4(a), p)) => (a, p),
        _ => (Ipv4Addr::UNSPECIFIED, 0),
    };
    let mut entry = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(dst),
        rt_gateway: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_genmask: sockaddr_v4(netmask(prefix)),
        rt_flags: RTF_UP,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: device.as_ptr() as *mut libc::c_char,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    if let Some(IpAddr::V4(g)) = gateway {
        entry.rt_gateway = sockaddr_v4(g);
        entry.rt_flags |= RTF_GATEWAY;
    }
    match ioctl(fd4, libc::SIOCADDRT, &mut entry, &what) {
        // The kernel adds the route of an address's own subnet itself.
        Err(e) if e.0.contains("File exists") => Ok(()),
        other => other,
    }
}

/// Attaches and configures the interfaces, in the order of the detached devices.
pub fn configure(config: &NetworkConfig, detached: &mut DetachedNics) -> Result<(), NetError> {
    if config.interfaces.len() > detached.devices.len() {
        return Err(NetError(format!(
            "{} interfaces asked for, the VM has {} network devices",
            config.interfaces.len(),
            detached.devices.len()
        )));
    }
    let bind = detached
        .bind
        .as_mut()
        .ok_or_else(|| NetError("the virtio_net driver's bind file is not open".into()))?;
    for interface in &config.interfaces {
        let device = detached.devices.remove(0);
        configure_interface(&device, bind, interface)?;
    }
    Ok(())
}

/// docker's embedded resolver lives in the container's network namespace on the host, at
/// 127.0.0.11: the guest answers at the same address by relaying queries to the host.
#[derive(Debug)]
pub struct DnsRelay {
    pub socket: UdpSocket,
    pending: Vec<(u64, SocketAddr, Instant)>,
    next_id: u64,
}

pub const DNS_RELAY_ADDRESS: &str = "127.0.0.11:53";

impl DnsRelay {
    pub fn bind() -> Result<Self, NetError> {
        let socket = UdpSocket::bind(DNS_RELAY_ADDRESS).map_err(err("bind the DNS relay"))?;
        socket.set_nonblocking(true).map_err(err("DNS relay"))?;
        Ok(DnsRelay {
            socket,
            pending: Vec::new(),
            next_id: 1,
        })
    }

    /// The next query waiting, with the id to answer it by.
    pub fn receive(&mut self) -> Option<(u64, Vec<u8>)> {
        let mut buf = vec![0u8; 4096];
        let (n, peer) = self.socket.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        let id = self.next_id;
        self.next_id += 1;
        // Queries unanswered for long are forgotten (the client has retried or given up).
        self.pending
            .retain(|(_, _, at)| at.elapsed() < Duration::from_secs(30));
        self.pending.push((id, peer, Instant::now()));
        Some((id, buf))
    }

    pub fn answer(&mut self, id: u64, payload: &[u8]) {
        if let Some(i) = self.pending.iter().position(|(p, _, _)| *p == id) {
            let (_, peer, _) = self.pending.swap_remove(i);
            let _ = self.socket.send_to(payload, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_macs_parse() {
        assert_eq!(
            parse_cidr("172.17.0.2/16").unwrap(),
            ("172.17.0.2".parse().unwrap(), 16)
        );
        assert_eq!(
            parse_cidr("fd00::2/64").unwrap(),
            ("fd00::2".parse().unwrap(), 64)
        );
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert!(parse_mac("02:42").is_err());
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn route_structs_have_the_kernel_layout() {
        // 64-bit Linux: struct rtentry is 120 bytes, struct in6_rtmsg 80.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::size_of::<In6RtMsg>(), 80);
    }
}
