//! The libvirt domain XML of a server, written as Nova's libvirt driver writes it, so that
//! what runs inside the guest (cloud-init's OpenStack detection by SMBIOS, device names) and
//! what an operator sees in `virsh dumpxml` are what they know from Nova.

use std::fmt::Write as _;
use std::path::PathBuf;

/// A NIC: libvirt creates the tap `target` (Nova: `tap` + the port id cut to 14 characters)
/// and the network agent plugs it into the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub tap: String,
    pub mac: String,
    pub mtu: Option<u32>,
}

/// Everything the XML says about one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// `instance-%08x`.
    pub name: String,
    pub uuid: String,
    /// `kvm` where /dev/kvm is usable, else `qemu` (TCG).
    pub virt_type: String,
    pub memory_mb: u64,
    pub vcpus: u32,
    /// The server's name and flavor, kept in Nova's `<metadata>` block for operators.
    pub display_name: String,
    pub flavor_name: String,
    pub project_id: String,
    pub user_id: String,
    pub image_id: String,
    /// The qcow2 overlay, vda.
    pub disk: PathBuf,
    /// `none` where the file system takes O_DIRECT, else `writethrough` (as Nova chooses).
    pub disk_cache: &'static str,
    /// Extra disks after the root disk (ephemeral, swap), vdb onwards.
    pub extra_disks: Vec<PathBuf>,
    /// The config drive (ISO 9660), attached as Nova attaches it: a CD-ROM on IDE `hdd`.
    pub config_drive: Option<PathBuf>,
    /// Direct kernel boot, when the image names a kernel (and maybe a ramdisk).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub interfaces: Vec<Interface>,
    /// The serial console's log, what `os-getConsoleOutput` reads.
    pub console_log: PathBuf,
}

/// `tap` + the port id cut to 14 characters, Nova's tap device name.
pub fn tap_name(port_id: &str) -> String {
    shoal_state::records::tap_device(port_id)
}

/// The kernel command line when the image does not give one: the root disk and the serial
/// console, as Nova's driver defaults it (`root=/dev/vda console=tty0 console=ttyS0`).
pub const DEFAULT_CMDLINE: &str = "root=/dev/vda console=tty0 console=ttyS0";

/// Escapes text for an XML element or a double-quoted attribute.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

fn path(p: &std::path::Path) -> String {
    esc(&p.to_string_lossy())
}

impl DomainSpec {
    pub fn to_xml(&self) -> String {
        let mut x = String::with_capacity(4096);
        let _ = writeln!(x, "<domain type=\"{}\">", esc(&self.virt_type));
        let _ = writeln!(x, "  <uuid>{}</uuid>", esc(&self.uuid));
        let _ = writeln!(x, "  <name>{}</name>", esc(&self.name));
        let _ = writeln!(
            x,
            "  <memory unit=\"KiB\">{}</memory>",
            self.memory_mb * 1024
        );
        let _ = writeln!(x, "  <vcpu>{}</vcpu>", self.vcpus);
        let _ = writeln!(x, "  <metadata>");
        let _ = writeln!(
            x,
            "    <nova:instance xmlns:nova=\"http://openstack.org/xmlns/libvirt/nova/1.1\">"
        );
        let _ = writeln!(x, "      <nova:package version=\"shoal\"/>");
        let _ = writeln!(
            x,
            "      <nova:name>{}</nova:name>",
            esc(&self.display_name)
        );
        let _ = writeln!(
            x,
            "      <nova:flavor name=\"{}\"><nova:memory>{}</nova:memory><nova:vcpus>{}</nova:vcpus></nova:flavor>",
            esc(&self.flavor_name),
            self.memory_mb,
            self.vcpus
        );
        let _ = writeln!(
            x,
            "      <nova:owner><nova:user uuid=\"{u}\">{u}</nova:user><nova:project uuid=\"{p}\">{p}</nova:project></nova:owner>",
            u = esc(&self.user_id),
            p = esc(&self.project_id)
        );
        let _ = writeln!(
            x,
            "      <nova:root type=\"image\" uuid=\"{}\"/>",
            esc(&self.image_id)
        );
        let _ = writeln!(x, "    </nova:instance>");
        let _ = writeln!(x, "  </metadata>");
        // cloud-init recognises OpenStack by this SMBIOS product name.
        let _ = writeln!(x, "  <sysinfo type=\"smbios\">");
        let _ = writeln!(x, "    <system>");
        let _ = writeln!(
            x,
            "      <entry name=\"manufacturer\">OpenStack Foundation</entry>"
        );
        let _ = writeln!(x, "      <entry name=\"product\">OpenStack Nova</entry>");
        let _ = writeln!(
            x,
            "      <entry name=\"version\">{}</entry>",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            x,
            "      <entry name=\"serial\">{}</entry>",
            esc(&self.uuid)
        );
        let _ = writeln!(x, "      <entry name=\"uuid\">{}</entry>", esc(&self.uuid));
        let _ = writeln!(x, "      <entry name=\"family\">Virtual Machine</entry>");
        let _ = writeln!(x, "    </system>");
        let _ = writeln!(x, "  </sysinfo>");
        let _ = writeln!(x, "  <os>");
        let _ = writeln!(x, "    <type arch=\"x86_64\" machine=\"pc\">hvm</type>");
        match &self.kernel {
            Some(kernel) => {
                let _ = writeln!(x, "    <kernel>{}</kernel>", path(kernel));
                if let Some(initrd) = &self.initrd {
                    let _ = writeln!(x, "    <initrd>{}</initrd>", path(initrd));
                }
                let cmdline = self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(cmdline));
            }
            None => {
                let _ = writeln!(x, "    <boot dev=\"hd\"/>");
            }
        }
        let _ = writeln!(x, "    <smbios mode=\"sysinfo\"/>");
        let _ = writeln!(x, "  </os>");
        let _ = writeln!(x, "  <features><acpi/><apic/></features>");
        let _ = writeln!(x, "  <clock offset=\"utc\"/>");
        if self.virt_type == "kvm" {
            let _ = writeln!(x, "  <cpu mode=\"host-model\"/>");
        }
        let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
        let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
        let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
        let _ = writeln!(x, "  <devices>");
        let disks = std::iter::once(&self.disk).chain(self.extra_disks.iter());
        for (i, disk) in disks.enumerate() {
            let dev = format!("vd{}", (b'a' + i as u8) as char);
            let _ = writeln!(x, "    <disk type=\"file\" device=\"disk\">");
            let _ = writeln!(
                x,
                "      <driver name=\"qemu\" type=\"qcow2\" cache=\"{}\"/>",
                self.disk_cache
            );
            let _ = writeln!(x, "      <source file=\"{}\"/>", path(disk));
            let _ = writeln!(x, "      <target bus=\"virtio\" dev=\"{dev}\"/>");
            let _ = writeln!(x, "    </disk>");
        }
        if let Some(iso) = &self.config_drive {
            let _ = writeln!(x, "    <disk type=\"file\" device=\"cdrom\">");
            let _ = writeln!(
                x,
                "      <driver name=\"qemu\" type=\"raw\" cache=\"{}\"/>",
                self.disk_cache
            );
            let _ = writeln!(x, "      <source file=\"{}\"/>", path(iso));
            let _ = writeln!(x, "      <target bus=\"ide\" dev=\"hdd\"/>");
            let _ = writeln!(x, "      <readonly/>");
            let _ = writeln!(x, "    </disk>");
        }
        for nic in &self.interfaces {
            let _ = writeln!(x, "    <interface type=\"ethernet\">");
            let _ = writeln!(x, "      <mac address=\"{}\"/>", esc(&nic.mac));
            let _ = writeln!(x, "      <model type=\"virtio\"/>");
            let _ = writeln!(x, "      <driver name=\"qemu\"/>");
            if let Some(mtu) = nic.mtu {
                let _ = writeln!(x, "      <mtu size=\"{mtu}\"/>");
            }
            let _ = writeln!(x, "      <target dev=\"{}\"/>", esc(&nic.tap));
            let _ = writeln!(x, "    </interface>");
        }
        let _ = writeln!(x, "    <serial type=\"file\">");
        // Appended, not truncated, when the domain starts again (stop/start, reboot).
        let _ = writeln!(
            x,
            "      <source path=\"{}\" append=\"on\"/>",
            path(&self.console_log)
        );
        let _ = writeln!(x, "      <target port=\"0\"/>");
        let _ = writeln!(x, "    </serial>");
        let _ = writeln!(x, "    <memballoon model=\"virtio\"/>");
        let _ = writeln!(x, "  </devices>");
        let _ = writeln!(x, "</domain>");
        x
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> DomainSpec {
        DomainSpec {
            name: "instance-0000002a".into(),
            uuid: "6f1c2d7e-0000-4000-8000-000000000001".into(),
            virt_type: "qemu".into(),
            memory_mb: 256,
            vcpus: 1,
            display_name: "web <1> & \"two\"".into(),
            flavor_name: "m1.tiny".into(),
            project_id: "p".into(),
            user_id: "u".into(),
            image_id: "img".into(),
            disk: "/var/lib/shoal/instances/x/disk".into(),
            disk_cache: "none",
            extra_disks: vec![],
            config_drive: None,
            kernel: Some("/cache/kernel".into()),
            initrd: Some("/cache/ramdisk".into()),
            cmdline: None,
            interfaces: vec![Interface {
                tap: tap_name("3f0b8a4c-1111-2222-3333-444455556666"),
                mac: "fa:16:3e:00:00:01".into(),
                mtu: Some(1450),
            }],
            console_log: "/var/lib/shoal/instances/x/console.log".into(),
        }
    }

    #[test]
    fn xml_says_what_nova_says() {
        let xml = spec().to_xml();
        assert!(xml.starts_with("<domain type=\"qemu\">"));
        assert!(xml.contains("<name>instance-0000002a</name>"));
        assert!(xml.contains("<memory unit=\"KiB\">262144</memory>"));
        assert!(xml.contains("<entry name=\"product\">OpenStack Nova</entry>"));
        assert!(xml.contains("<entry name=\"manufacturer\">OpenStack Foundation</entry>"));
        assert!(xml.contains("<kernel>/cache/kernel</kernel>"));
        assert!(xml.contains("<initrd>/cache/ramdisk</initrd>"));
        assert!(xml.contains(DEFAULT_CMDLINE));
        assert!(xml.contains("<target dev=\"tap3f0b8a4c-11\"/>"));
        assert!(xml.contains("<target bus=\"virtio\" dev=\"vda\"/>"));
        // A user's server name cannot break out of its element.
        assert!(xml.contains("web &lt;1&gt; &amp; &quot;two&quot;"));
        assert!(!xml.contains("<boot dev"));
    }

    /// Ephemeral and swap come after the root disk on virtio, the config drive is a CD-ROM on
    /// IDE `hdd`, as in Nova's XML.
    #[test]
    fn extra_disks_and_the_config_drive() {
        let mut s = spec();
        s.extra_disks = vec!["/i/x/disk.eph0".into(), "/i/x/disk.swap".into()];
        s.config_drive = Some("/i/x/disk.config".into());
        let xml = s.to_xml();
        let at = |needle: &str| {
            xml.find(needle)
                .unwrap_or_else(|| panic!("{needle}: {xml}"))
        };
        assert!(at("/i/x/disk.eph0") < at("dev=\"vdb\""));
        assert!(at("/i/x/disk.swap") < at("dev=\"vdc\""));
        assert!(at("dev=\"vdb\"") < at("/i/x/disk.swap"));
        assert!(xml.contains("<target bus=\"ide\" dev=\"hdd\"/>"));
        assert!(at("device=\"cdrom\"") < at("/i/x/disk.config"));
        assert!(xml.contains("<driver name=\"qemu\" type=\"raw\""));
    }

    /// Every shape of domain the agent defines is valid against libvirt's schema (the agent
    /// defines without libvirt's validation, which costs a schema parse per define).
    #[test]
    fn every_variant_passes_libvirts_schema() {
        let installed = std::process::Command::new("virsh")
            .arg("--version")
            .output()
            .is_ok();
        if !installed && std::env::var("CI").as_deref() != Ok("true") {
            eprintln!("skipped: virsh (libvirt-clients) is not installed");
            return;
        }
        let mut full = spec();
        full.extra_disks = vec!["/i/x/disk.eph0".into(), "/i/x/disk.swap".into()];
        full.config_drive = Some("/i/x/disk.config".into());
        full.cmdline = Some("console=ttyS0".into());
        let mut bare = spec();
        bare.kernel = None;
        bare.initrd = None;
        bare.interfaces.clear();
        bare.virt_type = "kvm".into();
        let dir = tempfile::tempdir().unwrap();
        for (i, s) in [spec(), full, bare].iter().enumerate() {
            let path = dir.path().join(format!("d{i}.xml"));
            std::fs::write(&path, s.to_xml()).unwrap();
            // `define --validate` is the check the agent used to ask of every define.
            let out = std::process::Command::new("virsh")
                .args(["-q", "-c", "test:///default", "define", "--validate"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "variant {i} fails libvirt's schema: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                s.to_xml()
            );
        }
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let t = tap_name("3f0b8a4c-1111-2222-3333-444455556666");
        assert_eq!(t, "tap3f0b8a4c-11");
        assert_eq!(t.len(), 14);
    }

    #[test]
    fn images_without_a_kernel_boot_from_disk() {
        let mut s = spec();
        s.kernel = None;
        s.initrd = None;
        let xml = s.to_xml();
        assert!(xml.contains("<boot dev=\"hd\"/>"));
        assert!(!xml.contains("<kernel>"));
    }
}
