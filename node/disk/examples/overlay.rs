//! `cargo run --example overlay -- BASE FORMAT SIZE OUT`: the CLI hook, by hand.

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match shoal_disk::cli::overlay_command(a[1].as_ref(), &a[2], &a[3], a[4].as_ref()) {
        Ok(info) => println!("{info:?}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
