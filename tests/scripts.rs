//! `scripts/memory-floor.sh`: it builds its probe, runs the ranks at once and prints a
//! positive time per allreduce for each read count asked for; bad flags are refused.

use std::path::Path;
use std::process::Command;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/memory-floor.sh")
}

#[test]
fn memory_floor_prints_a_time_per_read_count() {
    let out = Command::new(script())
        .args(["--workers", "2", "--elements", "4194304", "--reads", "1,2"])
        .output()
        .expect("run scripts/memory-floor.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("memory-floor: 2 ranks, 4194304 f32 elements each"),
        "{stdout}"
    );
    for reads in ["1", "2"] {
        let prefix = format!("reads {reads} + write 1: ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line for {reads} reads in {stdout}"));
        let ms: f64 = line[prefix.len()..]
            .trim_end_matches(" ms per allreduce")
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(ms > 0.0, "{line}");
    }
}

#[test]
fn memory_floor_refuses_an_unknown_flag() {
    let out = Command::new(script())
        .args(["--nodes", "3"])
        .output()
        .expect("run scripts/memory-floor.sh");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown flag --nodes"));
}
