//! `shoal-loadtest overlay`: times native overlay creation against
//! `qemu-img create -f qcow2 -b BASE -F raw`, interleaved in one run on the same disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use shoal_disk::qcow2::{
    create_overlay, inspect_with, BackingFormat, InspectPolicy, OverlaySpec, SyncMode,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Overlays to create with each method.
    #[arg(long, default_value_t = 200)]
    pub count: u32,
    /// Virtual size of each overlay.
    #[arg(long, default_value = "10G")]
    pub size: String,
    /// Directory for the base and the overlays (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

struct Series {
    name: &'static str,
    hist: Histogram<u64>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Series {
            name,
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        }
    }

    fn record(&mut self, d: Duration) {
        self.hist.saturating_record(d.as_micros() as u64);
    }

    fn median(&self) -> u64 {
        self.hist.value_at_quantile(0.5)
    }

    fn print(&self) {
        let h = &self.hist;
        println!(
            "{:<28} n={:<5} p50={:>7} us  p90={:>7} us  p99={:>7} us  max={:>7} us",
            self.name,
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
}

fn qemu_img(base: &Path, out: &Path, size: u64) -> anyhow::Result<()> {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", "raw"])
        .arg(out)
        .arg(size.to_string())
        .status()
        .context("running qemu-img (apt-get install qemu-utils)")?;
    if !status.success() {
        bail!("qemu-img create failed: {status}");
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let size = shoal_disk::qcow2::parse_size(&args.size)?;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let base = dir.join("base.raw");
    // A 1 GiB sparse raw base: only its size matters to either tool.
    std::fs::File::create(&base)?.set_len(1 << 30)?;
    let base = std::fs::canonicalize(&base)?;

    let mut ours = Series::new("shoal-disk (file+dir sync)");
    let mut ours_data = Series::new("shoal-disk (fdatasync)");
    let mut ours_nosync = Series::new("shoal-disk (no sync)");
    let mut qemu = Series::new("qemu-img create");
    for i in 0..args.count {
        // Interleaved so that both see the same disk and machine load.
        let out = dir.join(format!("ours-{i}.qcow2"));
        let t = Instant::now();
        create_overlay(&out, &OverlaySpec::new(&base, BackingFormat::Raw, size))?;
        ours.record(t.elapsed());

        let out = dir.join(format!("data-{i}.qcow2"));
        let mut spec = OverlaySpec::new(&base, BackingFormat::Raw, size);
        spec.sync = SyncMode::Data;
        let t = Instant::now();
        create_overlay(&out, &spec)?;
        ours_data.record(t.elapsed());

        let out = dir.join(format!("nosync-{i}.qcow2"));
        spec.sync = SyncMode::None;
        let t = Instant::now();
        create_overlay(&out, &spec)?;
        ours_nosync.record(t.elapsed());

        let out = dir.join(format!("qemu-{i}.qcow2"));
        let t = Instant::now();
        qemu_img(&base, &out, size)?;
        qemu.record(t.elapsed());
    }
    // What we timed is what qemu made: same layout (qemu's file ends after the L1 bytes, ours at
    // the end of the L1 cluster; both read as the same image).
    let a = inspect_with(&dir.join("ours-0.qcow2"), &InspectPolicy::overlay())?;
    let b = inspect_with(&dir.join("qemu-0.qcow2"), &InspectPolicy::overlay())?;
    if (a.virtual_size, a.l1_size, a.verified_clusters)
        != (b.virtual_size, b.l1_size, b.verified_clusters)
    {
        bail!("our overlay differs from qemu-img's: {a:?} vs {b:?}");
    }

    println!(
        "overlay creation, virtual size {size} bytes, raw base, {} each",
        args.count
    );
    for s in [&ours, &ours_data, &ours_nosync, &qemu] {
        s.print();
    }
    let ratio = |s: &Series| qemu.median() as f64 / s.median().max(1) as f64;
    println!(
        "median ratio qemu-img / shoal-disk: {:.1}x (file+dir sync), {:.1}x (fdatasync, \
         qemu-img's durability), {:.1}x (no sync)",
        ratio(&ours),
        ratio(&ours_data),
        ratio(&ours_nosync)
    );
    Ok(())
}
