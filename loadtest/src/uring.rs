//! `shoal-loadtest uring`: writes an image file through the io_uring writer and copies the same
//! file with `cp` (then fsyncs the copy, as the writer does), on the same disk, alternating.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_disk::uring::{Digest, UringWriter, WriterOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// File size.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Runs of each method; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Chunk size of the writer.
    #[arg(long, default_value = "4M")]
    pub chunk: String,
    /// Registered buffers (chunks in flight).
    #[arg(long, default_value_t = 8)]
    pub slots: usize,
    /// Directory on the disk to test (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Fills `block` with xorshift64 output from `state`: incompressible, cheap, reproducible.
pub fn pseudo_random(block: &mut [u8], state: &mut u64) {
    let mut x = *state;
    for w in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    *state = x;
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let size = shoal_disk::qcow2::parse_size(&args.size)?;
    let chunk = shoal_disk::qcow2::parse_size(&args.chunk)? as usize;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("source.img");
    let expected = {
        use sha2::Digest as _;
        let mut hasher = sha2::Sha256::new();
        // Incompressible content, written once; it stays in the page cache for both methods.
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut left = size;
        while left > 0 {
            pseudo_random(&mut block, &mut x);
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            hasher.update(&block[..n]);
            left -= n as u64;
        }
        f.flush()?;
        Digest(hasher.finalize().into())
    };
    let rt = tokio::runtime::Runtime::new()?;
    let opts = WriterOptions {
        chunk_size: chunk,
        slots: args.slots,
        direct: true,
        ..WriterOptions::default()
    };
    let (mut ours, mut cp) = (Vec::new(), Vec::new());
    let mut direct = false;
    for _ in 0..args.runs {
        let dst = dir.join("uring.img");
        let _ = std::fs::remove_file(&dst);
        let t = Instant::now();
        let digest = rt.block_on(async {
            let w = UringWriter::create(&dst, size, &opts)?;
            direct = w.is_direct();
            let f = tokio::fs::File::open(&src).await?;
            w.write_from(f).await?;
            anyhow::Ok(w.finish().await?)
        })?;
        ours.push(t.elapsed());
        if digest != expected {
            bail!("digest mismatch: {digest} != {expected}");
        }
        std::fs::remove_file(&dst)?;

        let dst = dir.join("cp.img");
        let _ = std::fs::remove_file(&dst);
        let t = Instant::now();
        let status = Command::new("cp")
            .arg(&src)
            .arg(&dst)
            .status()
            .context("running cp")?;
        if !status.success() {
            bail!("cp failed: {status}");
        }
        std::fs::File::open(&dst)?.sync_all()?;
        cp.push(t.elapsed());
        std::fs::remove_file(&dst)?;
    }
    let (o, c) = (median(ours), median(cp));
    let mib = size as f64 / (1 << 20) as f64;
    println!(
        "write {size} bytes, chunk {chunk}, {} slots, O_DIRECT {direct}, {} runs (medians)",
        args.slots, args.runs
    );
    println!(
        "io_uring writer (+fsync, +sha256)  {:>8.0} ms  {:>6.0} MiB/s",
        o.as_secs_f64() * 1e3,
        mib / o.as_secs_f64()
    );
    println!(
        "cp + fsync                          {:>8.0} ms  {:>6.0} MiB/s",
        c.as_secs_f64() * 1e3,
        mib / c.as_secs_f64()
    );
    println!(
        "writer throughput / cp throughput: {:.2}x",
        c.as_secs_f64() / o.as_secs_f64()
    );
    Ok(())
}
