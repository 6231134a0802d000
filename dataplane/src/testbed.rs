//! Network-namespace fixtures shared by the privileged tests and `shoal-loadtest pps`:
//! namespaces and links that are deleted on drop, and running code inside a namespace.
//!
//! Every name carries the process id and a counter, so parallel tests never collide,
//! and nothing here touches the namespace the process started in except creating
//! veth pairs whose ends are moved out immediately.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique name: `<prefix><pid % 100000>x<counter>` (fits IFNAMSIZ for short prefixes).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("command `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not enter network namespace {0}")]
    Setns(String, #[source] io::Error),
}

/// Runs a command and returns its output, failing on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> Result<Output, TestbedError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// A named network namespace (`ip netns add`), deleted with everything in it on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self, TestbedError> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace with nsenter (unlike `ip netns exec`, it
    /// does not remount /sys).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, TestbedError> {
        let net = format!("--net={}", self.path());
        let mut all = vec![net.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TestbedError> {
        let path = self.path();
        let name = self.name.clone();
        thread::spawn(move || -> Result<T, TestbedError> {
            enter(&path).map_err(|e| TestbedError::Setns(name, e))?;
            Ok(f())
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Spawns a thread that enters this namespace and runs `f`; the caller joins it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<Result<T, TestbedError>> {
        let path = self.path();
        let name = self.name.clone();
        thread::spawn(move || {
            enter(&path).map_err(|e| TestbedError::Setns(name, e))?;
            Ok(f())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its interfaces; veth peers elsewhere go too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid namespace fd only changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Result<(), TestbedError> {
    // Created directly inside `a`, so no interface ever appears in the caller's namespace.
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ])?;
    Ok(())
}

/// True when the process may create namespaces and load BPF programs. Privileged tests
/// call this: without root they print why and skip, unless `CI=true`, where they fail.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (network namespaces, BPF) and CI=true forbids skipping");
    }
    eprintln!("{test}: skipped, needs root for network namespaces and BPF");
    false
}
