//! The processes a benchmark starts, the loopback ports it hands them, and finding which process
//! listens on a port (to kill one node of a cluster that another process started).

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
    let raw = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(raw, libc::SIGKILL) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("kill -9 {pid}"));
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

#[cfg(test)]
mod tests {
    use super::*;

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
