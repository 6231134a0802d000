//! `shoal-loadtest`: benchmarks for Shoal.

fn main() {}
