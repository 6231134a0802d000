//! Compiles the kernel programs in `../ebpf/*.c` with clang into `OUT_DIR`, where
//! `include_bytes!` embeds them in the binary.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed={}", ebpf.join("include").display());

    for name in ["datapath", "aux"] {
        let src = ebpf.join(format!("{name}.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        for header in std::fs::read_dir(ebpf.join("include"))? {
            println!("cargo:rerun-if-changed={}", header?.path().display());
        }
        let obj = out.join(format!("{name}.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            // Debian puts asm/types.h under the multiarch directory.
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg(format!("-I{}", ebpf.join("include").display()))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .with_context(|| format!("running {clang} (install clang and libbpf-dev)"))?;
        if !status.success() {
            bail!("{clang} failed on {}", src.display());
        }
    }
    layout_probe(&clang, &ebpf, &out)
}

/// Compiles and runs a host program that prints the C compiler's sizes and offsets of
/// the structs in `shoal_abi.h`, as Rust constants for the layout test in `abi.rs`.
fn layout_probe(clang: &str, ebpf: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let fields: &[(&str, &[&str])] = &[
        (
            "shoal_config",
            &["local_vtep_be", "underlay_ifindex", "underlay_mac"],
        ),
        (
            "shoal_port",
            &["port_id", "vni", "mac", "host_mac", "leg_router_id"],
        ),
        ("shoal_ep_key", &["vni", "ip_be"]),
        (
            "shoal_endpoint",
            &["mac", "vtep_mac", "port_id", "ifindex", "vtep_be"],
        ),
        (
            "shoal_sg_key",
            &[
                "prefixlen",
                "port_id",
                "direction",
                "proto",
                "dport_be",
                "remote_be",
            ],
        ),
        (
            "shoal_ct_key",
            &[
                "port_id",
                "local_be",
                "remote_be",
                "local_port_be",
                "remote_port_be",
                "proto",
            ],
        ),
        ("shoal_ct_val", &["created_ns", "origin"]),
        ("shoal_rif_key", &["vni", "mac"]),
        ("shoal_rif", &["router_id"]),
        ("shoal_route_key", &["prefixlen", "router_id", "dst_be"]),
        ("shoal_route", &["vni", "mac", "nexthop_be", "leg_ifindex"]),
    ];
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"shoal_abi.h\"\nint main(void) {\n",
    );
    for (name, members) in fields {
        let upper = name.to_uppercase();
        c.push_str(&format!(
            "printf(\"pub const {upper}_SIZE: usize = %zu;\\n\", sizeof(struct {name}));\n"
        ));
        for m in *members {
            let mu = m.to_uppercase();
            c.push_str(&format!(
                "printf(\"pub const {upper}_{mu}: usize = %zu;\\n\", offsetof(struct {name}, {m}));\n"
            ));
        }
    }
    c.push_str(
        "printf(\"pub const SHOAL_CNT_MAX: usize = %d;\\n\", SHOAL_CNT_MAX);\nreturn 0;\n}\n",
    );
    let src = out.join("layout_probe.c");
    let exe = out.join("layout_probe");
    std::fs::write(&src, c)?;
    let status = Command::new(clang)
        .arg(format!("-I{}", ebpf.join("include").display()))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .context("compiling the layout probe")?;
    if !status.success() {
        bail!("compiling the layout probe failed");
    }
    let probe = Command::new(&exe)
        .output()
        .context("running the layout probe")?;
    if !probe.status.success() {
        bail!("the layout probe failed");
    }
    std::fs::write(out.join("abi_layout.rs"), probe.stdout)?;
    Ok(())
}
