//! DHCP for the VMs of this node, answered on each VM's own tap from the port's row (as OVN's
//! native DHCP answers from its northbound database): no dnsmasq, no DHCP agent, no network
//! node.
//!
//! One AF_PACKET socket per served tap, bound to it with protocol `ETH_P_ALL`: such sockets
//! see a frame from the VM before the tc program on the tap's ingress drops it (the datapath
//! floods no broadcast), and a classic BPF filter keeps everything but IPv4/UDP to port 67 in
//! the kernel. Replies are written on the same socket and leave the tap towards the VM. The
//! server identifier and the replies' source address are 169.254.169.254, which the datapath
//! answers ARP for on every tap. Everything runs on one thread inside the node's network
//! namespace (sockets stay in the namespace they were made in).

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;

use crate::agent::{PortHooks, ServedPort};

/// The address the node's services answer from on every tap.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Neutron's `dhcp_lease_duration` default.
pub const LEASE_SECS: u32 = 86_400;

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const DECLINE: u8 = 4;
const ACK: u8 = 5;
const NAK: u8 = 6;
const RELEASE: u8 = 7;
const INFORM: u8 = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("frame too short for {0}")]
    Truncated(&'static str),
    #[error("not IPv4/UDP to port 67")]
    NotDhcp,
    #[error("not a BOOTP request over Ethernet")]
    NotBootRequest,
    #[error("no DHCP magic cookie")]
    NoMagic,
    #[error("option {0} runs past the end of the packet")]
    BadOption(u8),
    #[error("no DHCP message type")]
    NoMessageType,
}

/// A client's message, as far as the server needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub src_mac: [u8; 6],
    pub kind: u8,
    pub xid: [u8; 4],
    pub flags: [u8; 2],
    pub ciaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub requested: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses an Ethernet frame holding a DHCP request.
pub fn parse(frame: &[u8]) -> Result<Request, ParseError> {
    if frame.len() < 14 + 20 {
        return Err(ParseError::Truncated("Ethernet/IPv4 headers"));
    }
    if frame[12..14] != [0x08, 0x00] {
        return Err(ParseError::NotDhcp);
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 {
        return Err(ParseError::Truncated("IPv4/UDP headers"));
    }
    if ip[9] != 17 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return Err(ParseError::NotDhcp);
    }
    let udp = &ip[ihl..];
    if u16::from_be_bytes([udp[2], udp[3]]) != 67 {
        return Err(ParseError::NotDhcp);
    }
    let b = &udp[8..];
    if b.len() < 240 {
        return Err(ParseError::Truncated("BOOTP"));
    }
    if b[0] != BOOTREQUEST || b[1] != 1 || b[2] != 6 {
        return Err(ParseError::NotBootRequest);
    }
    if b[236..240] != MAGIC {
        return Err(ParseError::NoMagic);
    }
    let mut req = Request {
        src_mac: frame[6..12].try_into().expect("6 bytes"),
        kind: 0,
        xid: b[4..8].try_into().expect("4 bytes"),
        flags: b[10..12].try_into().expect("2 bytes"),
        ciaddr: ip_at(b, 12),
        chaddr: b[28..34].try_into().expect("6 bytes"),
        requested: None,
        server_id: None,
    };
    let mut i = 240;
    while i < b.len() {
        let code = b[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = usize::from(*b.get(i + 1).ok_or(ParseError::BadOption(code))?);
        let value = b
            .get(i + 2..i + 2 + len)
            .ok_or(ParseError::BadOption(code))?;
        match (code, len) {
            (53, 1) => req.kind = value[0],
            (50, 4) => req.requested = Some(ip_at(value, 0)),
            (54, 4) => req.server_id = Some(ip_at(value, 0)),
            _ => {}
        }
        i += 2 + len;
    }
    if req.kind == 0 {
        return Err(ParseError::NoMessageType);
    }
    Ok(req)
}

/// How an extra option's text becomes its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ip,
    Ips,
    Text,
    U8,
    U16,
    U32,
    Bool,
    Domains,
}

/// The IPv4 options served from a port's `extra_dhcp_opts`: the names (and codes) of
/// ML2/OVN's `SUPPORTED_DHCP_OPTS_MAPPING`, less the ones this server keeps for itself
/// (`server-id`) and the OVN-only ones (`bootfile-name-alt`, classless routes as text).
/// `server-ip-address` (or `255`) is not an option: it sets the reply's `siaddr`.
const EXTRA: [(&str, u8, Kind); 30] = [
    ("netmask", 1, Kind::Ip),
    ("router", 3, Kind::Ips),
    ("dns-server", 6, Kind::Ips),
    ("log-server", 7, Kind::Ips),
    ("lpr-server", 9, Kind::Ips),
    ("domain-name", 15, Kind::Text),
    ("swap-server", 16, Kind::Ip),
    ("ip-forward-enable", 19, Kind::Bool),
    ("policy-filter", 21, Kind::Ips),
    ("default-ttl", 23, Kind::U8),
    ("mtu", 26, Kind::U16),
    ("router-discovery", 31, Kind::Bool),
    ("router-solicitation", 32, Kind::Ip),
    ("arp-timeout", 35, Kind::U32),
    ("ethernet-encap", 36, Kind::Bool),
    ("tcp-ttl", 37, Kind::U8),
    ("tcp-keepalive", 38, Kind::U32),
    ("nis-server", 41, Kind::Ips),
    ("ntp-server", 42, Kind::Ips),
    ("lease-time", 51, Kind::U32),
    ("T1", 58, Kind::U32),
    ("T2", 59, Kind::U32),
    ("tftp-server", 66, Kind::Text),
    ("bootfile-name", 67, Kind::Text),
    ("domain-search", 119, Kind::Domains),
    ("tftp-server-address", 150, Kind::Ips),
    ("path-prefix", 210, Kind::Text),
    ("wpad", 252, Kind::Text),
    ("server-ip-address", 255, Kind::Ip),
    // Neutron's switch for a port whose VM must get no answer at all.
    ("dhcp_disabled", 0, Kind::Bool),
];

/// A port's `extra_dhcp_opts` as this server sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraOptions {
    /// (code, bytes), in the port's order; each replaces the subnet's option of that code.
    pub options: Vec<(u8, Vec<u8>)>,
    /// `server-ip-address`: the reply's `siaddr` (the next server, for PXE).
    pub next_server: Option<Ipv4Addr>,
    /// `dhcp_disabled=true`: the port gets no answer.
    pub disabled: bool,
}

impl ExtraOptions {
    /// Compiles the IPv4 options of `opts` by name or code. What this server cannot send (an
    /// unknown name, a value of the wrong shape, an IPv6 option: there is no DHCPv6) is left
    /// out and said in the second value, as ML2/OVN logs and skips it; the API stores every
    /// option whatever this server makes of it.
    pub fn compile(opts: &[shoal_state::records::ExtraDhcpOpt]) -> (ExtraOptions, Vec<String>) {
        let mut out = ExtraOptions::default();
        let mut skipped = Vec::new();
        for o in opts {
            if o.ip_version != 4 {
                skipped.push(format!("{} (IPv6: no DHCPv6 here)", o.opt_name));
                continue;
            }
            let Some(&(name, code, kind)) = EXTRA
                .iter()
                .find(|(n, c, _)| *n == o.opt_name || (*c != 0 && c.to_string() == o.opt_name))
            else {
                skipped.push(format!("{} (not an option this server sends)", o.opt_name));
                continue;
            };
            let Some(bytes) = encode(kind, &o.opt_value) else {
                skipped.push(format!(
                    "{} ({:?} is not a valid {kind:?} value)",
                    o.opt_name, o.opt_value
                ));
                continue;
            };
            match name {
                "server-ip-address" => {
                    out.next_server = <[u8; 4]>::try_from(bytes.as_slice())
                        .ok()
                        .map(Ipv4Addr::from)
                }
                "dhcp_disabled" => out.disabled = bytes == [1],
                _ => out.options.push((code, bytes)),
            }
        }
        (out, skipped)
    }
}

/// `value` as the bytes of an option of `kind`; `None` if it is not one.
fn encode(kind: Kind, value: &str) -> Option<Vec<u8>> {
    let v = value.trim();
    let ip = |s: &str| {
        s.trim()
            .parse::<Ipv4Addr>()
            .ok()
            .map(|a| a.octets().to_vec())
    };
    let bytes = match kind {
        Kind::Ip => ip(v)?,
        Kind::Ips => {
            // `a,b` or OVN's `{a, b}`.
            let inner = v
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .unwrap_or(v);
            let mut b = Vec::new();
            for part in inner.split(',') {
                b.extend(ip(part)?);
            }
            b
        }
        Kind::Text => v.trim_matches('"').as_bytes().to_vec(),
        Kind::U8 => vec![v.parse::<u8>().ok()?],
        Kind::U16 => v.parse::<u16>().ok()?.to_be_bytes().to_vec(),
        Kind::U32 => v.parse::<u32>().ok()?.to_be_bytes().to_vec(),
        Kind::Bool => match v.to_ascii_lowercase().as_str() {
            "1" | "true" => vec![1],
            "0" | "false" => vec![0],
            _ => return None,
        },
        Kind::Domains => {
            // RFC 3397: each name in DNS wire form (no compression), `a.com,b.org`.
            let inner = v.trim_matches('"');
            let mut b = Vec::new();
            for name in inner.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                for label in name.trim_end_matches('.').split('.') {
                    let len = u8::try_from(label.len())
                        .ok()
                        .filter(|l| (1..=63).contains(l))?;
                    b.push(len);
                    b.extend_from_slice(label.as_bytes());
                }
                b.push(0);
            }
            b
        }
    };
    // An option's length is one byte.
    (!bytes.is_empty() && bytes.len() <= 255).then_some(bytes)
}

/// What the server answers to `req` for `port`, if anything.
pub fn answer(req: &Request, port: &ServedPort, server_mac: [u8; 6]) -> Option<Vec<u8>> {
    if port.extra.disabled {
        return None;
    }
    let mac = parse_mac(&port.mac)?;
    // A VM asks only for its own port's address, from its own MAC.
    if req.src_mac != mac || req.chaddr != mac {
        return None;
    }
    let (kind, yiaddr) = match req.kind {
        DISCOVER => (OFFER, port.ip),
        REQUEST => {
            let asked = req
                .requested
                .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr));
            if req.server_id.is_some_and(|s| s != SERVER_IP) {
                return None; // it chose another server's offer
            }
            if asked == Some(port.ip) {
                (ACK, port.ip)
            } else {
                (NAK, Ipv4Addr::UNSPECIFIED)
            }
        }
        INFORM => (ACK, Ipv4Addr::UNSPECIFIED),
        DECLINE | RELEASE => {
            tracing::info!(port = %port.port_id, kind = req.kind, "DHCP decline/release");
            return None;
        }
        _ => return None,
    };
    Some(reply(req, port, server_mac, kind, yiaddr))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

fn option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    // Every value here is far below 255 bytes; longer ones are cut rather than corrupt.
    let len = value.len().min(255);
    out.push(code);
    out.push(len as u8);
    out.extend_from_slice(&value[..len]);
}

fn prefix_mask(len: u8) -> [u8; 4] {
    let len = u32::from(len.min(32));
    let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    m.to_be_bytes()
}

/// RFC 3442 classless static routes: the metadata address on-link, the subnet's host
/// routes, and the default route (clients that take option 121 ignore option 3).
fn classless_routes(port: &ServedPort) -> Vec<u8> {
    let mut v = Vec::new();
    let mut push = |dest: Ipv4Addr, len: u8, via: Ipv4Addr| {
        let len = len.min(32);
        v.push(len);
        let significant = usize::from(len).div_ceil(8);
        v.extend_from_slice(&dest.octets()[..significant]);
        v.extend_from_slice(&via.octets());
    };
    push(SERVER_IP, 32, Ipv4Addr::UNSPECIFIED);
    for (dest, len, via) in &port.host_routes {
        push(*dest, *len, *via);
    }
    if let Some(gw) = port.gateway {
        push(Ipv4Addr::UNSPECIFIED, 0, gw);
    }
    v
}

fn reply(
    req: &Request,
    port: &ServedPort,
    server_mac: [u8; 6],
    kind: u8,
    yiaddr: Ipv4Addr,
) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[0] = BOOTREPLY;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&req.xid);
    b[10..12].copy_from_slice(&req.flags);
    if kind != NAK {
        b[12..16].copy_from_slice(&req.ciaddr.octets());
    }
    b[16..20].copy_from_slice(&yiaddr.octets());
    b[28..34].copy_from_slice(&req.chaddr);
    b[236..240].copy_from_slice(&MAGIC);
    option(&mut b, 53, &[kind]);
    option(&mut b, 54, &SERVER_IP.octets());
    if kind != NAK {
        if let Some(next) = port.extra.next_server {
            b[20..24].copy_from_slice(&next.octets());
        }
        let mut opts: Vec<(u8, Vec<u8>)> = vec![(1, prefix_mask(port.prefix_len).to_vec())];
        if let Some(gw) = port.gateway {
            opts.push((3, gw.octets().to_vec()));
        }
        if !port.dns.is_empty() {
            opts.push((6, port.dns.iter().flat_map(|d| d.octets()).collect()));
        }
        if let Ok(mtu) = u16::try_from(port.mtu) {
            opts.push((26, mtu.to_be_bytes().to_vec()));
        }
        opts.push((121, classless_routes(port)));
        if kind != ACK || !yiaddr.is_unspecified() {
            opts.push((51, LEASE_SECS.to_be_bytes().to_vec()));
            opts.push((58, (LEASE_SECS / 2).to_be_bytes().to_vec()));
            opts.push((59, (LEASE_SECS / 8 * 7).to_be_bytes().to_vec()));
        }
        // The port's own options replace the subnet's and come after them.
        for (code, value) in &port.extra.options {
            match opts.iter_mut().find(|(c, _)| c == code) {
                Some(o) => o.1.clone_from(value),
                None => opts.push((*code, value.clone())),
            }
        }
        for (code, value) in &opts {
            option(&mut b, *code, value);
        }
    }
    b.push(255);
    if b.len() < 300 {
        b.resize(300, 0); // the BOOTP minimum some clients insist on
    }
    // RFC 2131 4.1: to ciaddr when the client has one; broadcast when it asks for it (or on
    // a NAK); else unicast to the offered address and the client's hardware address.
    let broadcast = req.flags[0] & 0x80 != 0;
    let (dst_ip, dst_mac) = if kind == NAK || (broadcast && req.ciaddr.is_unspecified()) {
        (Ipv4Addr::BROADCAST, [0xff; 6])
    } else if !req.ciaddr.is_unspecified() {
        (req.ciaddr, req.chaddr)
    } else {
        (yiaddr, req.chaddr)
    };
    frame(server_mac, dst_mac, SERVER_IP, dst_ip, &b)
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let word = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + UDP (67 → 68) around `payload`, both checksums set.
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut f = Vec::with_capacity(14 + 20 + udp_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + udp_len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let pseudo_sum = u32::from(!checksum(&pseudo, 0));
    let mut c = checksum(&udp, pseudo_sum);
    if c == 0 {
        c = 0xffff;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

// ---------------------------------------------------------------------------------------
// The server thread.

enum Command {
    Set(ServedPort),
    Remove(String),
    Stop,
}

/// DHCP on every served tap of this node. Dropping it stops the thread.
pub struct DhcpServer {
    commands: Mutex<mpsc::Sender<Command>>,
    wake: OwnedFd,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Replies sent, by device.
    pub replies: Arc<Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for DhcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhcpServer").finish_non_exhaustive()
    }
}

/// Accept IPv4/UDP (not a later fragment) to port 67; drop the rest in the kernel.
const FILTER: [libc::sock_filter; 11] = [
    bpf(0x28, 0, 0, 12),     // ldh [12]
    bpf(0x15, 0, 8, 0x0800), // jeq IPv4
    bpf(0x30, 0, 0, 23),     // ldb [23]
    bpf(0x15, 0, 6, 17),     // jeq UDP
    bpf(0x28, 0, 0, 20),     // ldh [20]
    bpf(0x45, 4, 0, 0x1fff), // jset fragment offset
    bpf(0xb1, 0, 0, 14),     // ldxb 4*([14]&0xf)
    bpf(0x48, 0, 0, 16),     // ldh [x+16]
    bpf(0x15, 0, 1, 67),     // jeq 67
    bpf(0x06, 0, 0, 0x4_0000),
    bpf(0x06, 0, 0, 0),
];

const fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

impl DhcpServer {
    /// Starts the server thread, inside `netns` when given (`/run/netns/NAME`).
    pub fn start(netns: Option<PathBuf>) -> io::Result<DhcpServer> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (tx, rx) = mpsc::channel();
        let replies = Arc::new(Mutex::new(HashMap::new()));
        let counted = replies.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("shoal-dhcp".into())
            .spawn(move || {
                if let Some(ns) = &netns {
                    if let Err(e) = crate::agent::enter_netns(ns) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                serve(rx, read_end, counted);
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the DHCP thread died"))??;
        Ok(DhcpServer {
            commands: Mutex::new(tx),
            wake: write_end,
            thread: Mutex::new(Some(thread)),
            replies,
        })
    }

    fn send(&self, c: Command) {
        let _ = self.commands.lock().expect("lock").send(c);
        // SAFETY: writing one byte from a valid buffer to our own pipe; a full pipe already
        // wakes the thread, so EAGAIN is fine.
        unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// Serves `port` on its device (replacing what that device served).
    pub fn set(&self, port: ServedPort) {
        self.send(Command::Set(port));
    }

    /// Stops serving `device`.
    pub fn remove(&self, device: &str) {
        self.send(Command::Remove(device.to_owned()));
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.lock().expect("lock").take() {
            let _ = t.join();
        }
    }
}

impl PortHooks for DhcpServer {
    fn port_up<'a>(&'a self, port: &'a ServedPort) -> BoxFuture<'a, ()> {
        if port.dhcp {
            self.set(port.clone());
        } else {
            self.remove(&port.device);
        }
        Box::pin(async {})
    }

    fn port_down<'a>(&'a self, device: &'a str) -> BoxFuture<'a, ()> {
        self.remove(device);
        Box::pin(async {})
    }
}

struct Served {
    port: ServedPort,
    socket: Option<(OwnedFd, [u8; 6])>,
    next_try: Instant,
}

const REOPEN: Duration = Duration::from_millis(500);

fn serve(rx: mpsc::Receiver<Command>, wake: OwnedFd, replies: Arc<Mutex<HashMap<String, u64>>>) {
    let mut served: HashMap<String, Served> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    loop {
        let mut drained = [0u8; 64];
        // SAFETY: reading into a valid buffer from our own non-blocking pipe.
        while unsafe { libc::read(wake.as_raw_fd(), drained.as_mut_ptr().cast(), drained.len()) }
            > 0
        {}
        while let Ok(c) = rx.try_recv() {
            match c {
                Command::Set(port) => {
                    let device = port.device.clone();
                    match served.get_mut(&device) {
                        Some(s) => s.port = port,
                        None => {
                            served.insert(
                                device,
                                Served {
                                    port,
                                    socket: None,
                                    next_try: Instant::now(),
                                },
                            );
                        }
                    }
                }
                Command::Remove(device) => {
                    served.remove(&device);
                }
                Command::Stop => return,
            }
        }
        for (device, s) in served.iter_mut() {
            if s.socket.is_none() && Instant::now() >= s.next_try {
                match open(device) {
                    Ok(sock) => {
                        tracing::info!(%device, "serving DHCP");
                        s.socket = Some(sock);
                    }
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "DHCP: device not there yet");
                        s.next_try = Instant::now() + REOPEN;
                    }
                }
            }
        }
        let mut fds = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut devices = Vec::new();
        for (device, s) in &served {
            if let Some((fd, _)) = &s.socket {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                devices.push(device.clone());
            }
        }
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                REOPEN.as_millis() as i32,
            )
        };
        if n <= 0 {
            continue;
        }
        for (pfd, device) in fds[1..].iter().zip(&devices) {
            if pfd.revents == 0 {
                continue;
            }
            let s = served.get_mut(device).expect("polled devices are served");
            let Some((fd, server_mac)) = &s.socket else {
                continue;
            };
            if pfd.revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0 {
                // The device went (its VM stopped): reopen when it is back, under a new ifindex.
                s.socket = None;
                s.next_try = Instant::now() + REOPEN;
                continue;
            }
            loop {
                let mut from: libc::sockaddr_ll = unsafe_zeroed();
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: valid buffer and address out-parameters of the given sizes.
                let got = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if got < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        s.socket = None;
                        s.next_try = Instant::now() + REOPEN;
                    }
                    break;
                }
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue; // our own replies, seen leaving
                }
                let frame = &buf[..got as usize];
                let req = match parse(frame) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "not a DHCP request");
                        continue;
                    }
                };
                let Some(reply) = answer(&req, &s.port, *server_mac) else {
                    continue;
                };
                // SAFETY: sending a valid buffer on a socket bound to the device.
                let sent =
                    unsafe { libc::send(fd.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
                if sent < 0 {
                    tracing::warn!(%device, error = %io::Error::last_os_error(), "DHCP reply not sent");
                } else {
                    *replies
                        .lock()
                        .expect("lock")
                        .entry(device.clone())
                        .or_default() += 1;
                    tracing::debug!(%device, kind = req.kind, ip = %s.port.ip, "DHCP reply");
                }
            }
        }
    }
}

fn unsafe_zeroed() -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// An AF_PACKET socket on `device` that sees DHCP requests before tc ingress.
fn open(device: &str) -> io::Result<(OwnedFd, [u8; 6])> {
    let ifindex = shoal_dataplane::netdev::ifindex(device)?;
    let mac = shoal_dataplane::netdev::mac(device)?.0;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) succeeded; we own the descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let prog = libc::sock_fprog {
        len: FILTER.len() as u16,
        filter: FILTER.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at a valid filter array that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addr = unsafe_zeroed();
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fd, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> ServedPort {
        ServedPort {
            port_id: "p".into(),
            device: "tapp".into(),
            mac: "fa:16:3e:00:00:01".into(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
            mtu: 1450,
            host_routes: vec![(
                Ipv4Addr::new(192, 168, 0, 0),
                16,
                Ipv4Addr::new(10, 0, 0, 254),
            )],
            dhcp: true,
            extra: ExtraOptions::default(),
        }
    }

    const MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 1];

    /// A client's message as udhcpc sends it: from 0.0.0.0 to the broadcast address.
    fn request(kind: u8, mac: [u8; 6], requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0] = BOOTREQUEST;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&[1, 2, 3, 4]);
        b[28..34].copy_from_slice(&mac);
        b[236..240].copy_from_slice(&MAGIC);
        option(&mut b, 53, &[kind]);
        if let Some(r) = requested {
            option(&mut b, 50, &r.octets());
            option(&mut b, 54, &SERVER_IP.octets());
        }
        b.push(255);
        let mut f = frame(
            mac,
            [0xff; 6],
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            &b,
        );
        // frame() writes 67 -> 68; a client sends 68 -> 67.
        f[34..36].copy_from_slice(&68u16.to_be_bytes());
        f[36..38].copy_from_slice(&67u16.to_be_bytes());
        f
    }

    /// The options of a reply frame, by code.
    fn options(reply: &[u8]) -> HashMap<u8, Vec<u8>> {
        let b = &reply[14 + 20 + 8..];
        let mut out = HashMap::new();
        let mut i = 240;
        while b[i] != 255 {
            let len = usize::from(b[i + 1]);
            out.insert(b[i], b[i + 2..i + 2 + len].to_vec());
            i += 2 + len;
        }
        out
    }

    #[test]
    fn discover_gets_an_offer_with_everything_the_guest_needs() {
        let req = parse(&request(DISCOVER, MAC, None)).unwrap();
        assert_eq!(req.kind, DISCOVER);
        let server_mac = [2, 0, 0, 0, 0, 9];
        let reply = answer(&req, &port(), server_mac).unwrap();
        assert_eq!(&reply[0..6], &MAC, "unicast to the client's MAC");
        assert_eq!(&reply[6..12], &server_mac);
        let b = &reply[42..];
        assert_eq!(b[0], BOOTREPLY);
        assert_eq!(ip_at(b, 16), Ipv4Addr::new(10, 0, 0, 5), "yiaddr");
        let o = options(&reply);
        assert_eq!(o[&53], vec![OFFER]);
        assert_eq!(o[&54], SERVER_IP.octets().to_vec());
        assert_eq!(o[&1], vec![255, 255, 255, 0]);
        assert_eq!(o[&3], vec![10, 0, 0, 1]);
        assert_eq!(o[&6], vec![10, 0, 0, 53]);
        assert_eq!(o[&26], 1450u16.to_be_bytes().to_vec());
        assert_eq!(
            o[&121],
            vec![
                32, 169, 254, 169, 254, 0, 0, 0, 0, // metadata on-link
                16, 192, 168, 10, 0, 0, 254, // host route
                0, 10, 0, 0, 1, // default
            ]
        );
        // Checksums: the IPv4 header and the UDP datagram (with its pseudo header) sum to 0.
        assert_eq!(checksum(&reply[14..34], 0), 0);
        let udp = &reply[34..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&reply[26..34]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        assert_eq!(checksum(udp, u32::from(!checksum(&pseudo, 0))), 0);
    }

    #[test]
    fn request_for_the_port_address_is_acked_and_any_other_is_refused() {
        let ok = parse(&request(REQUEST, MAC, Some(Ipv4Addr::new(10, 0, 0, 5)))).unwrap();
        let reply = answer(&ok, &port(), [2; 6]).unwrap();
        assert_eq!(options(&reply)[&53], vec![ACK]);
        let other = parse(&request(REQUEST, MAC, Some(Ipv4Addr::new(10, 0, 0, 6)))).unwrap();
        let reply = answer(&other, &port(), [2; 6]).unwrap();
        assert_eq!(options(&reply)[&53], vec![NAK]);
        assert_eq!(&reply[0..6], &[0xff; 6], "a NAK is broadcast");
    }

    #[test]
    fn a_ports_extra_options_are_sent_and_replace_the_subnets() {
        let opt = |name: &str, value: &str, ip_version: u8| shoal_state::records::ExtraDhcpOpt {
            opt_name: name.into(),
            opt_value: value.into(),
            ip_version,
        };
        let (extra, skipped) = ExtraOptions::compile(&[
            opt("bootfile-name", "pxelinux.0", 4),
            opt("66", "10.0.0.9", 4),
            opt("server-ip-address", "10.0.0.10", 4),
            opt("dns-server", "{10.0.0.2, 10.0.0.3}", 4),
            opt("domain-search", "a.example,b.example", 4),
            opt("mtu", "9000", 4),
            opt("T2", "not a number", 4),
            opt("tag:ipxe,bootfile-name", "x", 4),
            opt("bootfile-name", "v6.efi", 6),
        ]);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        let mut p = port();
        p.extra = extra;
        let req = parse(&request(DISCOVER, MAC, None)).unwrap();
        let reply = answer(&req, &p, [2; 6]).unwrap();
        let o = options(&reply);
        assert_eq!(o[&67], b"pxelinux.0".to_vec());
        assert_eq!(o[&66], b"10.0.0.9".to_vec());
        assert_eq!(
            o[&6],
            vec![10, 0, 0, 2, 10, 0, 0, 3],
            "the port's DNS replaces the subnet's"
        );
        assert_eq!(o[&26], 9000u16.to_be_bytes().to_vec());
        assert_eq!(
            o[&119],
            b"\x01a\x07example\x00\x01b\x07example\x00".to_vec()
        );
        assert_eq!(
            o[&59],
            (LEASE_SECS / 8 * 7).to_be_bytes().to_vec(),
            "a bad value changes nothing"
        );
        assert_eq!(
            ip_at(&reply[42..], 20),
            Ipv4Addr::new(10, 0, 0, 10),
            "siaddr"
        );
        // Neutron's switch: no answer at all.
        p.extra = ExtraOptions::compile(&[opt("dhcp_disabled", "true", 4)]).0;
        assert!(answer(&req, &p, [2; 6]).is_none());
    }

    #[test]
    fn another_mac_gets_nothing() {
        let req = parse(&request(DISCOVER, [0xfa, 0x16, 0x3e, 0, 0, 2], None)).unwrap();
        assert!(answer(&req, &port(), [2; 6]).is_none());
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let good = request(DISCOVER, MAC, None);
        for len in 0..good.len() {
            let _ = parse(&good[..len]);
        }
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] = 12; // an option whose length byte is missing
        assert!(parse(&bad).is_err());
        let mut state = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut f = good.clone();
            for _ in 0..8 {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let at = (state as usize >> 8) % f.len();
                f[at] = (state >> 24) as u8;
            }
            let _ = parse(&f);
        }
    }
}
