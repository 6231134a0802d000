//! `shoal`: the node binary.

fn main() {}
