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
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let column = |field: &str| {
        header
            .iter()
            .position(|h| *h == field)
            .unwrap_or_else(|| panic!("{field} missing from {header:?}"))
    };
    for field in ["workers", "ate_per_s"] {
        column(field);
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    let get = |row: &[&str], field: &str| row[column(field)].to_string();
    let num = |row: &[&str], field: &str| {
        get(row, field)
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("{field}: {e} in {csv}"))
    };
    for (row, codec) in rows.iter().zip(["f32", "i8"]) {
        assert_eq!(get(row, "codec"), codec, "{csv}");
        // Every rank checked its result against the exact sum (a rank outside the
        // bound fails the sweep), and the ranks' results have the same bits, which
        // `inagg sweep` itself does not check.
        assert_eq!(get(row, "within_bound"), "true", "{codec}: {csv}");
        assert_eq!(get(row, "ranks_identical"), "true", "{codec}: {csv}");
        let checksum = get(row, "result_checksum");
        assert!(
            checksum.len() == 16 && checksum.chars().all(|c| c.is_ascii_hexdigit()),
            "{codec}: no checked result in {csv}"
        );
    }
    // f32 rounds the sum of two ranks' values once: far below i8's 8-bit steps, which
    // do show.
    let (f32_err, i8_err) = (num(&rows[0], "rel_l2_err"), num(&rows[1], "rel_l2_err"));
    assert!(f32_err < 1e-6, "{csv}");
    assert!(i8_err > f32_err && i8_err < 0.05, "{csv}");
    // A quarter of f32's bytes on the wire, headers aside.
    let ratio = num(&rows[1], "bytes_sent_per_worker") / num(&rows[0], "bytes_sent_per_worker");
    assert!((0.24..0.3).contains(&ratio), "i8/f32 bytes {ratio}: {csv}");
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
