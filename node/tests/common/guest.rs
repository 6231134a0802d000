//! Real TCG guests through libvirtd at qemu:///system: the guest image
//! (node/scripts/guest-image.sh: a Debian cloud kernel and a busybox initramfs), its upload
//! through the `openstack` client, and the domains a test made, destroyed however it ends.

use std::path::PathBuf;
use std::process::Command;

use super::osc::Osc;

/// Runs one of `node/scripts/`, failing the test with its output if it fails.
pub fn script(name: &str, args: &[&str]) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/");
    let out = Command::new("bash")
        .arg(format!("{path}{name}"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts libvirtd and builds the guest image (cached); returns the image's directory.
pub fn prepare() -> PathBuf {
    script("libvirtd.sh", &[]);
    let guest = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap()
        .join(".cache/shoal/guest");
    script("guest-image.sh", &[guest.to_str().unwrap()]);
    guest
}

/// Uploads the kernel (`aki`), the ramdisk (`ari`) and the disk (`ami`, naming the other two
/// by `kernel_id`/`ramdisk_id`) through node 0; the disk's image is named `name`.
pub fn upload(osc: &Osc<'_>, dir: &std::path::Path, name: &str) -> String {
    let upload = |disk: &str, file: &str, name: &str, extra: &[&str]| {
        let path = dir.join(file);
        let mut args = vec![
            "image",
            "create",
            "--disk-format",
            disk,
            "--container-format",
            disk,
            "--file",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(name);
        osc.json(0, &args)["id"].as_str().unwrap().to_owned()
    };
    let kernel = upload("aki", "vmlinuz", &format!("{name}-kernel"), &[]);
    let ramdisk = upload("ari", "initrd.img", &format!("{name}-ramdisk"), &[]);
    let (k, r) = (
        format!("kernel_id={kernel}"),
        format!("ramdisk_id={ramdisk}"),
    );
    upload(
        "ami",
        "disk.raw",
        name,
        &["--property", &k, "--property", &r],
    )
}

/// `virsh -c qemu:///system ARGS`: whether it succeeded and its trimmed stdout.
pub fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// Destroys and undefines the test's domains however the test ends.
#[derive(Default)]
pub struct Domains(pub Vec<String>);

impl Drop for Domains {
    fn drop(&mut self) {
        for uuid in &self.0 {
            let _ = virsh(&["destroy", uuid]);
            let _ = virsh(&["undefine", uuid]);
        }
    }
}
