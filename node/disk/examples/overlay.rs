//! `cargo run -p shoal-disk --example overlay -- BASE raw|qcow2 SIZE OUT`: the CLI hook by hand,
//! until `shoal disk overlay` is wired.

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: overlay BASE raw|qcow2 SIZE OUT");
        std::process::exit(2);
    }
    match shoal_disk::cli::overlay_command(a[1].as_ref(), &a[2], &a[3], a[4].as_ref()) {
        Ok(info) => println!("{info:?}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
