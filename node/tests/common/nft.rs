//! Partitions between `shoal` processes on loopback: nftables rules that drop the UDP (QUIC)
//! packets between groups of peer ports, in a table the test owns and always removes.

use std::process::Command;

/// An nftables table of one test's own, removed on drop (a failing test included).
pub struct Firewall {
    table: String,
}

impl Firewall {
    /// `Some` if partitions can be made here. Without root or `nft` they are skipped with a
    /// message, except under `CI=true`, where they must run.
    pub fn new(test: &str) -> Option<Firewall> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let nft = Command::new("nft").arg("--version").output().is_ok();
        if !root || !nft {
            let msg = "partitions need root and nft (nftables rules on loopback)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}");
            }
            eprintln!("skipping partitions: {msg}");
            return None;
        }
        let fw = Firewall {
            table: format!("shoal_{test}_{}", std::process::id()),
        };
        fw.run(&format!(
            "add table inet {t}\n\
             add chain inet {t} out {{ type filter hook output priority 0; policy accept; }}\n",
            t = fw.table
        ));
        Some(fw)
    }

    fn run(&self, script: &str) {
        use std::io::Write;
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("running nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "nft -f failed on:\n{script}");
    }

    /// Drops every UDP packet between the peer ports of `a` and those of `b`, both ways.
    pub fn partition(&self, a: &[u16], b: &[u16]) {
        let set = |ports: &[u16]| {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        };
        let (a, b) = (set(a), set(b));
        self.run(&format!(
            "add rule inet {t} out udp sport {a} udp dport {b} drop\n\
             add rule inet {t} out udp sport {b} udp dport {a} drop\n",
            t = self.table
        ));
    }

    pub fn heal(&self) {
        self.run(&format!("flush chain inet {} out\n", self.table));
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}
