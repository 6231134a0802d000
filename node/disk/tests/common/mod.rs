//! Helpers for the tests that use qemu's own tools as the judge.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Whether `qemu-img` and `qemu-io` run here. When they do not, the test prints why and passes,
/// except under `CI=true`, where that is a failure.
pub fn qemu_tools() -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{tool} is required under CI=true (apt-get install qemu-utils)"
            );
            eprintln!("skipping: {tool} is not installed (apt-get install qemu-utils)");
            return false;
        }
    }
    true
}

pub fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    out
}

/// Runs a command and insists on success.
pub fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `qemu-img check`: no errors, no leaks, no corruptions.
pub fn qemu_img_check(path: &Path) {
    let out = ok(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["check-errors"], 0, "{out}");
    for key in ["leaks", "corruptions", "leaks-fixed", "corruptions-fixed"] {
        assert!(v.get(key).is_none_or(|n| n == 0), "{key} in {out}");
    }
}

/// Reads through `path` with qemu-io, expecting `pattern` at `[off, off + len)`.
pub fn qemu_io_expect(path: &Path, fmt: &str, pattern: u8, off: u64, len: u64) {
    let cmd = format!("read -P {pattern:#04x} {off} {len}");
    let out = ok("qemu-io", &["-f", fmt, "-c", &cmd, path.to_str().unwrap()]);
    assert!(
        !out.contains("Pattern verification failed"),
        "{cmd} on {path:?}: {out}"
    );
    assert!(
        out.contains(&format!("read {len}/{len} bytes")),
        "{cmd} on {path:?}: {out}"
    );
}

/// Writes `pattern` at `[off, off + len)` through qemu-io.
pub fn qemu_io_write(path: &Path, fmt: &str, pattern: u8, off: u64, len: u64) {
    let cmd = format!("write -P {pattern:#04x} {off} {len}");
    let out = ok("qemu-io", &["-f", fmt, "-c", &cmd, path.to_str().unwrap()]);
    assert!(
        out.contains(&format!("wrote {len}/{len} bytes")),
        "{cmd} on {path:?}: {out}"
    );
}

pub fn sha(path: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}
