//! Writes the fuzzers' seed corpus (`inagg_proto::fuzzing::seeds`) under a directory,
//! one subdirectory per target, replacing what was there:
//!
//! ```sh
//! cargo run -p inagg-proto --example fuzz_seeds -- fuzz/seeds
//! ```
//!
//! `scripts/fuzz-seeds.sh` runs it; run it again whenever the wire changes.

use std::path::PathBuf;

use inagg_proto::fuzzing::seeds::{self, Target};

fn main() -> std::io::Result<()> {
    let Some(root) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz_seeds DIR");
        std::process::exit(2);
    };
    let all = seeds::all();
    for target in Target::ALL {
        let dir = root.join(target.name());
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let mut n = 0;
        for s in all.iter().filter(|s| s.target == target) {
            std::fs::write(dir.join(&s.name), &s.data)?;
            n += 1;
        }
        println!("{}: {n} seeds", dir.display());
    }
    Ok(())
}
