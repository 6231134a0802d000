//! The processes a benchmark starts, the loopback ports it hands them, finding which process
//! listens on a port (to kill one node of a cluster that another process started), and what a
//! process has consumed: CPU time and I/O from /proc.

use std::fs::{self, File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Owns every process the benchmark started. Each runs in its own process group so that a
/// Ctrl-C on the terminal reaches only us, and so that stopping one also stops what it spawned
/// (`shoal dev` starts the nodes as its children). Dropping the guard stops them all.
#[derive(Debug, Default)]
pub struct ProcGuard {
    procs: Vec<Managed>,
}

#[derive(Debug)]
struct Managed {
    name: String,
    child: Child,
}

impl ProcGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `cmd` in a new process group, stdout and stderr appended to `log`. Returns its pid.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> Result<u32> {
        let out = open_log(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        self.procs.push(Managed {
            name: name.to_owned(),
            child,
        });
        Ok(pid)
    }

    /// Whether `pid` is one of ours.
    pub fn owns(&self, pid: u32) -> bool {
        self.procs.iter().any(|p| p.child.id() == pid)
    }

    /// SIGKILLs the process group of `pid` (one we started) and reaps it.
    pub fn kill(&mut self, pid: u32) -> Result<()> {
        let Some(pos) = self.procs.iter().position(|p| p.child.id() == pid) else {
            bail!("process {pid} was not started by this benchmark");
        };
        let mut p = self.procs.remove(pos);
        signal_group(pid, libc::SIGKILL);
        p.child
            .wait()
            .with_context(|| format!("reaping {}", p.name))?;
        Ok(())
    }

    /// Fails if a process we started has exited, naming it and its exit status.
    pub fn check_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} (pid {}) exited: {status}", p.name, p.child.id());
            }
        }
        Ok(())
    }

    /// SIGTERM to every group, up to `grace` for them to exit, then SIGKILL to the rest.
    pub fn shutdown(&mut self, grace: Duration) {
        for p in &self.procs {
            signal_group(p.child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            let all_exited = self
                .procs
                .iter_mut()
                .all(|p| matches!(p.child.try_wait(), Ok(Some(_))));
            if all_exited {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        for mut p in self.procs.drain(..) {
            // The leader of the group may have exited while children it spawned did not:
            // signal the group whether or not the leader is still there.
            signal_group(p.child.id(), libc::SIGKILL);
            let _ = p.child.wait();
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}

fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. A negative pid names
    // the process group we created for this child (`process_group(0)` makes pgid == pid).
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// SIGKILLs one process that we did not start ourselves (a node that `shoal dev` spawned).
pub fn kill_pid(pid: u32) -> Result<()> {
    signal(pid, libc::SIGKILL)
}

/// Sends `sig` to one process (as SIGSTOP and SIGCONT to freeze a node and thaw it).
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let raw = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(raw, sig) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("kill -{sig} {pid}"));
    }
    Ok(())
}

/// Whether a process with this pid exists (and is not a zombie we could still reap).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// `n` distinct loopback ports that were free a moment ago. The listeners are held until all
/// are picked so that the OS does not hand out the same port twice.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding a loopback port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The pid of the process holding a listening TCP socket on `port` (IPv4 or IPv6), found
/// through /proc/net/tcp{,6} and the socket inodes in /proc/PID/fd.
pub fn pid_listening_on(port: u16) -> Result<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        bail!("no process listens on port {port}");
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                    return Ok(pid);
                }
            }
        }
    }
    bail!("port {port} is listened on, but by no process this user can see")
}

/// Inodes of the sockets in LISTEN state (0A) on `port`, from the text of /proc/net/tcp.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
            (local.ends_with(&suffix) && *state == "0A")
                .then(|| inode.parse().ok())
                .flatten()
        })
        .collect()
}

/// The counters of /proc/PID/io (all threads of the process). `read_bytes` and `write_bytes`
/// are what reached the storage layer; `syscr`/`rchar` count every read(2)-family call and its
/// bytes, page-cache hits, pipes and eventfds included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcIo {
    pub rchar: u64,
    pub wchar: u64,
    pub syscr: u64,
    pub syscw: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

impl ProcIo {
    pub fn read(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/io");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Self::parse(&text).with_context(|| format!("parsing {path}"))
    }

    fn parse(text: &str) -> Result<Self> {
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .with_context(|| format!("no {name} line"))?
                .trim()
                .parse()
                .with_context(|| format!("{name} is not a number"))
        };
        Ok(Self {
            rchar: field("rchar")?,
            wchar: field("wchar")?,
            syscr: field("syscr")?,
            syscw: field("syscw")?,
            read_bytes: field("read_bytes")?,
            write_bytes: field("write_bytes")?,
        })
    }

    /// `self - earlier`, field by field (saturating: the counters only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            rchar: self.rchar.saturating_sub(earlier.rchar),
            wchar: self.wchar.saturating_sub(earlier.wchar),
            syscr: self.syscr.saturating_sub(earlier.syscr),
            syscw: self.syscw.saturating_sub(earlier.syscw),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(earlier.write_bytes),
        }
    }
}

/// User plus system CPU time used so far by process `pid` (all its threads), or by this
/// process for `None`.
pub fn cpu_time(pid: Option<u32>) -> Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    Ok(ticks_to_duration(ticks))
}

/// The whole machine's CPU time so far, from /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineCpu {
    /// Everything but idle and iowait.
    pub busy: Duration,
    /// The part of `busy` spent in interrupts and softirqs.
    pub interrupts: Duration,
    pub cpus: usize,
}

pub fn machine_cpu() -> Result<MachineCpu> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let (busy, interrupts, cpus) = machine_cpu_ticks(&text).context("parsing /proc/stat")?;
    Ok(MachineCpu {
        busy: ticks_to_duration(busy),
        interrupts: ticks_to_duration(interrupts),
        cpus,
    })
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf(3) reads a constant of the C library and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz)
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line, in clock ticks.
fn stat_cpu_ticks(stat: &str) -> Result<u64> {
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    let (_, rest) = stat
        .rsplit_once(')')
        .context("no ')' after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state), so field N is at index N - 3.
    let get = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("no field {n}"))?
            .parse()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(get(14)? + get(15)?)
}

/// Busy ticks, interrupt and softirq ticks, and the number of CPUs.
fn machine_cpu_ticks(stat: &str) -> Result<(u64, u64, usize)> {
    let total = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .context("no aggregate cpu line")?;
    let v = total
        .split_whitespace()
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .context("a cpu field is not a number")?;
    if v.len() < 7 {
        bail!("the cpu line has {} fields, expected at least 7", v.len());
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let busy = v.iter().take(8).sum::<u64>() - v[3] - v[4];
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Ok((busy, v[5] + v[6], cpus.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_io_and_subtracts() {
        let text = "rchar: 1000\nwchar: 200\nsyscr: 10\nsyscw: 4\nread_bytes: 4096\n\
                    write_bytes: 8192\ncancelled_write_bytes: 0\n";
        let io = ProcIo::parse(text).unwrap();
        assert_eq!(
            (io.rchar, io.syscr, io.read_bytes, io.write_bytes),
            (1000, 10, 4096, 8192)
        );
        let later = ProcIo {
            read_bytes: 4096,
            write_bytes: 12288,
            ..io
        };
        assert_eq!(later.since(&io).write_bytes, 4096);
        assert_eq!(later.since(&io).read_bytes, 0);
        assert!(ProcIo::parse("rchar: 1\n").is_err());
        assert!(ProcIo::read(std::process::id()).is_ok());
    }

    #[test]
    fn cpu_ticks_from_stat_with_an_awkward_name() {
        let stat = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(stat_cpu_ticks(stat).unwrap(), 300);
        assert!(stat_cpu_ticks("42 (x) S 1").is_err());
        assert!(cpu_time(None).is_ok());
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 50 2 25 500 10 0 1 1 0 0\n\
                    cpu1 50 3 25 500 10 1 1 2 0 0\nintr 1 2 3\n";
        assert_eq!(machine_cpu_ticks(stat).unwrap(), (161, 3, 2));
        assert!(machine_cpu_ticks("intr 1\n").is_err());
    }

    #[test]
    fn finds_listening_inode_for_port() {
        let table = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0929 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0100007F:0929 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1
   2: 0100007F:092A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1
";
        assert_eq!(listening_inodes(table, 0x0929), vec![4242]);
        assert_eq!(listening_inodes(table, 0x092A), vec![4444]);
        assert!(listening_inodes(table, 80).is_empty());
    }

    #[test]
    fn finds_our_own_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port).unwrap(), std::process::id());
        drop(l);
        assert!(pid_listening_on(port).is_err());
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(8).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 8);
    }

    #[test]
    fn guard_kills_its_group() {
        let dir = std::env::temp_dir().join(format!("shoal-lt-procs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut guard = ProcGuard::new();
        let mut cmd = Command::new("sh");
        // The shell's child `sleep` must die with the group, not only the shell.
        cmd.args([
            "-c",
            "sleep 300 & echo $! > \"$0\"; wait",
            dir.join("pid").to_str().unwrap(),
        ]);
        let pid = guard.spawn("sh", cmd, &dir.join("log")).unwrap();
        let pidfile = dir.join("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        let sleeper: u32 = loop {
            if let Some(p) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "sleep never started");
            thread::sleep(Duration::from_millis(10));
        };
        assert!(guard.owns(pid));
        guard.check_running().unwrap();
        drop(guard);
        assert!(!pid_alive(pid));
        // The grandchild is reparented to init, which reaps it shortly after the kill.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(sleeper) {
            assert!(
                Instant::now() < deadline,
                "sleep {sleeper} outlived the guard"
            );
            thread::sleep(Duration::from_millis(10));
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
