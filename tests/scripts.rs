//! `scripts/memory-floor.sh`: it builds its probe, runs the ranks at once and prints a
//! positive time per allreduce for each read count asked for; bad flags are refused
//! before anything is built.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::run_bounded;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/memory-floor.sh")
}

/// The script builds its probe with the machine's C compiler.
#[test]
#[cfg_attr(
    inagg_no_cc,
    ignore = "needs a C compiler (cc or $CC) to build scripts/memory-floor.sh's probe"
)]
fn memory_floor_prints_a_time_per_read_count() {
    let mut cmd = Command::new(script());
    cmd.args(["--workers", "2", "--elements", "4194304", "--reads", "1,2"]);
    let (status, stdout, stderr) = run_bounded(cmd, Duration::from_secs(300));
    assert!(status.success(), "{stdout}{stderr}");
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
fn memory_floor_refuses_bad_flags() {
    for (args, says) in [
        (&["--nodes", "3"][..], "unknown flag --nodes"),
        (&["--workers"][..], "--workers needs a value"),
        (
            &["--workers", "x"][..],
            "--workers must be a positive integer",
        ),
        (
            &["--elements", "0"][..],
            "--elements must be a positive integer",
        ),
        (&["--reads", "1,,2"][..], "--reads takes counts like 1,2"),
    ] {
        let mut cmd = Command::new(script());
        cmd.args(args);
        let (status, _, stderr) = run_bounded(cmd, Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
