//! Interface lookups that respect the calling thread's network namespace (sysfs does
//! not: it shows the namespace of whoever mounted it).

use std::{ffi::CString, io, mem};

use crate::model::Mac;

/// The index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// Runs the interface ioctl `request` for `name` on a socket of the current network namespace
/// and returns the `ifreq` the kernel filled in.
fn ifreq_ioctl(name: &str, request: libc::Ioctl) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: plain socket(2) call; the returned fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `fd` is an open socket and `req` a valid ifreq the kernel fills in.
    let rc = unsafe { libc::ioctl(fd, request, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` was opened above and is not used afterwards.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(req)
}

/// The hardware address of interface `name` (SIOCGIFHWADDR on a socket of the current
/// network namespace).
pub fn mac(name: &str) -> io::Result<Mac> {
    let req = ifreq_ioctl(name, libc::SIOCGIFHWADDR)?;
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut m = [0u8; 6];
    for (dst, src) in m.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(Mac(m))
}

/// The MTU of interface `name` (SIOCGIFMTU on a socket of the current network namespace).
pub fn mtu(name: &str) -> io::Result<u32> {
    let req = ifreq_ioctl(name, libc::SIOCGIFMTU)?;
    // SAFETY: after a successful SIOCGIFMTU the union holds `ifru_mtu`.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(mtu as u32)
}

/// Interface lookups remembered between passes of a driver, forgotten whenever a link of the
/// namespace changes.
///
/// A node with many bound ports looked each device up (a socket and an ioctl, twice for the
/// eBPF driver) on every pass, found or not. The cache keeps the answers, missing devices
/// included, and listens on an rtnetlink socket subscribed to link events (`RTMGRP_LINK`) of
/// the namespace it was created in: any link added, removed, renamed, moved or changed since
/// the last [`DeviceCache::refresh`] drops everything, as does an overflow of that socket.
/// Without the socket (it could not be opened) nothing is remembered.
///
/// Create it on the thread that does the lookups, after that thread entered its namespace.
#[derive(Debug)]
pub struct DeviceCache {
    /// The subscribed rtnetlink socket; `None`: no caching.
    events: Option<std::os::fd::OwnedFd>,
    /// name -> ifindex, or `None` when the device did not exist.
    index: std::collections::HashMap<String, Option<u32>>,
    macs: std::collections::HashMap<String, Mac>,
    /// Lookups that went to the kernel since creation (for tests and diagnostics).
    misses: u64,
}

impl Default for DeviceCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceCache {
    /// Subscribes to the link events of the calling thread's network namespace.
    pub fn new() -> Self {
        let events = link_events().map_err(|e| {
            tracing::warn!(error = %e, "no rtnetlink link events: device lookups are not cached");
        });
        DeviceCache {
            events: events.ok(),
            index: std::collections::HashMap::new(),
            macs: std::collections::HashMap::new(),
            misses: 0,
        }
    }

    /// Forgets everything if a link changed since the last call (or the event queue
    /// overflowed). Call once per pass, before its lookups.
    pub fn refresh(&mut self) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.events else {
            self.forget();
            return;
        };
        let mut buf = [0u8; 8192];
        let mut changed = false;
        loop {
            // SAFETY: `fd` is an open socket and `buf` a writable buffer of the given length.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                changed = true;
                continue;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {}
                    Some(libc::EINTR) => continue,
                    // ENOBUFS: events were lost; anything may have changed.
                    _ => changed = true,
                }
            }
            break;
        }
        if changed {
            self.forget();
        }
    }

    /// Forgets every answer (after a failure that may come from a stale one).
    pub fn forget(&mut self) {
        self.index.clear();
        self.macs.clear();
    }

    /// [`ifindex`], remembered; a missing device is an error of kind `NotFound`.
    pub fn ifindex(&mut self, name: &str) -> io::Result<u32> {
        if let Some(known) = self.index.get(name) {
            return known.ok_or_else(|| not_found(name));
        }
        self.misses += 1;
        let found = match ifindex(name) {
            Ok(i) => Some(i),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => None,
            Err(e) => return Err(e),
        };
        if self.events.is_some() {
            self.index.insert(name.to_string(), found);
        }
        found.ok_or_else(|| not_found(name))
    }

    /// [`mac`], remembered.
    pub fn mac(&mut self, name: &str) -> io::Result<Mac> {
        if let Some(m) = self.macs.get(name) {
            return Ok(*m);
        }
        self.misses += 1;
        let m = mac(name)?;
        if self.events.is_some() {
            self.macs.insert(name.to_string(), m);
        }
        Ok(m)
    }

    /// Lookups that went to the kernel so far.
    pub fn misses(&self) -> u64 {
        self.misses
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no device named {name}"))
}

/// An rtnetlink socket subscribed to link events, non-blocking.
fn link_events() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: `addr` is a valid sockaddr_nl of the given size; `fd` is open.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A missing device is remembered until a link changes; a link added or deleted is then
    /// seen. As root it runs on a thread of its own in a fresh network namespace (gone with
    /// the thread); otherwise only the remembering part runs.
    #[test]
    fn missing_devices_are_remembered_until_a_link_changes() {
        if !is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true needs root for this test"
            );
            eprintln!("not root: only the remembering part runs");
            let mut c = DeviceCache::new();
            assert!(c.ifindex("sdc-none").is_err());
            assert!(c.ifindex("sdc-none").is_err());
            assert_eq!(c.misses(), 1, "the second lookup is answered from memory");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare only moves this thread, which nothing else uses, into a new
            // network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let mut c = DeviceCache::new();
            let name = "sdc0";
            c.refresh();
            assert!(c.ifindex(name).is_err());
            assert!(c.ifindex(name).is_err());
            assert_eq!(c.misses(), 1, "the second lookup is answered from memory");
            let lo = c.ifindex("lo").unwrap();
            assert_eq!(c.ifindex("lo").unwrap(), lo);
            assert_eq!(c.misses(), 2);
            // A child process starts in the namespace of the thread that spawns it.
            let ip = |args: &[&str]| {
                let ok = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "ip {args:?}");
            };
            ip(&["link", "add", name, "type", "veth", "peer", "name", "sdc1"]);
            assert!(
                c.ifindex(name).is_err(),
                "not refreshed yet: still remembered"
            );
            c.refresh();
            let i = c.ifindex(name).expect("found after the link event");
            assert_eq!(Some(i), ifindex(name).ok());
            c.refresh();
            assert_eq!(c.ifindex(name).unwrap(), i, "no event: remembered");
            assert_eq!(c.mac(name).unwrap(), c.mac(name).unwrap());
            let misses = c.misses();
            c.ifindex(name).unwrap();
            c.mac(name).unwrap();
            assert_eq!(c.misses(), misses);
            // The MTU as `ip link` sets it (what the network agent compares with a tap's
            // network before it takes the tap from libvirt).
            assert_eq!(mtu(name).unwrap(), 1500);
            ip(&["link", "set", "dev", name, "mtu", "1450"]);
            assert_eq!(mtu(name).unwrap(), 1450);
            ip(&["link", "del", name]);
            assert!(mtu(name).is_err(), "no MTU for a device that is gone");
            c.refresh();
            assert!(c.ifindex(name).is_err(), "gone after the delete's event");
        })
        .join()
        .unwrap();
    }
}
