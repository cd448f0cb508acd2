//! `inagg sweep` through the real binary: CSV and plots are written.

mod common;

use common::inagg;

#[test]
fn sweep_writes_csv_and_plots() {
    let dir = std::env::temp_dir().join(format!("inagg-sweep-{}", std::process::id()));
    let out = inagg()
        .args([
            "sweep",
            "--workers",
            "2",
            "--elements",
            "30000",
            "--iters",
            "1",
            "--codec",
            "f32,i8",
            "--out",
        ])
        .arg(&dir)
        .output()
        .expect("run sweep");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(dir.join("sweep.csv")).expect("sweep.csv");
    let mut lines = csv.lines();
    let header = lines.next().expect("header");
    for field in [
        "codec",
        "workers",
        "ate_per_s",
        "rel_l2_err",
        "bytes_sent_per_worker",
    ] {
        assert!(
            header.split(',').any(|h| h == field),
            "{field} missing from {header}"
        );
    }
    assert_eq!(lines.count(), 2);
    for png in ["error_vs_bytes.png", "ate_per_codec.png"] {
        let bytes = std::fs::read(dir.join(png)).expect(png);
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5000, "{png}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = inagg()
        .args(["sweep", "--out", "/tmp/x", "--codec", "nope"])
        .output()
        .expect("run");
    assert!(!out.status.success());
}
