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
    Ok(())
}
