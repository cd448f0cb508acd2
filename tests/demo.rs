//! `inagg demo` end to end through the real binary: a short training run per codec
//! with its table, CSV and plot; MNIST from tiny IDX files the test writes; bad flags.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{inagg, json_lines, run_bounded};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("inagg-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `inagg demo` with small defaults that `extra` may override.
fn short_demo(out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = inagg();
    c.arg("demo").arg("--out").arg(out).args(extra);
    for (flag, value) in [
        ("--workers", "3"),
        ("--steps", "12"),
        ("--batch", "16"),
        ("--hidden", "24"),
    ] {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c
}

#[test]
fn short_demo_prints_the_table_and_writes_csv_and_png() {
    let dir = scratch("demo");
    let (st, out, err) = run_bounded(short_demo(&dir, &["--codecs", "f32,bf16,i8"]), LIMIT);
    assert!(st.success(), "demo failed: {out}\n{err}");
    let header = out
        .lines()
        .position(|l| l.starts_with("codec") && l.contains("accuracy"))
        .unwrap_or_else(|| panic!("no table in {out}"));
    let rows: Vec<&str> = out.lines().skip(header + 1).take(3).collect();
    for (row, codec) in rows.iter().zip(["f32", "bf16", "i8"]) {
        assert!(row.starts_with(codec), "{row}");
        assert!(row.ends_with("identical"), "replicas: {row}");
    }
    assert!(
        rows[2].contains(" on "),
        "i8 trains with error feedback: {}",
        rows[2]
    );
    let csv = std::fs::read_to_string(dir.join("demo.csv")).expect("demo.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[0].starts_with("codec,"), "{csv}");
    assert!(lines[1..].iter().all(|l| l.contains(",true")), "{csv}");
    let png = std::fs::read(dir.join("loss.png")).expect("loss.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5000);
    assert!(out.contains(&dir.join("demo.csv").display().to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_json_has_the_contract_fields_and_sizes_follow_the_codec() {
    let dir = scratch("demo-json");
    let (st, out, err) = run_bounded(
        short_demo(
            &dir,
            &["--codecs", "f32,i8", "--no-error-feedback", "--json"],
        ),
        LIMIT,
    );
    assert!(st.success(), "demo failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        for f in [
            "final_loss",
            "accuracy",
            "wire_bytes_per_step",
            "allreduce_s",
            "step_s",
        ] {
            assert!(
                r[f].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0),
                "{f}: {r}"
            );
        }
        assert_eq!(r["replicas_identical"], true, "{r}");
        assert_eq!(r["error_feedback"], false, "{r}");
    }
    assert_eq!(rows[0]["codec"], "f32");
    assert_eq!(rows[1]["codec"], "i8");
    // 32*24+24 + 24*10+10 parameters; i8 puts a quarter of f32's payload on the wire.
    assert_eq!(rows[0]["parameters"], 1042);
    let ratio = rows[1]["bytes_sent_per_step"].as_f64().expect("bytes")
        / rows[0]["bytes_sent_per_step"].as_f64().expect("bytes");
    assert!(ratio < 0.6, "i8/f32 bytes {ratio}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_idx(path: &Path, magic: u32, dims: &[u32], data: &[u8]) {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    std::fs::write(path, b).expect("write idx");
}

#[test]
fn demo_trains_on_mnist_idx_files() {
    let data = scratch("mnist");
    // Digits drawn as 6x6 images: class c lights up pixel c (and a noisy pixel).
    let make = |n: usize, prefix: &str| {
        let mut px = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let c = (i * 7 + 3) % 10;
            let mut img = [0u8; 36];
            img[c] = 255;
            img[10 + (i * 13) % 26] = 128;
            px.extend_from_slice(&img);
            labels.push(c as u8);
        }
        let n = n as u32;
        write_idx(
            &data.join(format!("{prefix}-images-idx3-ubyte")),
            0x803,
            &[n, 6, 6],
            &px,
        );
        write_idx(
            &data.join(format!("{prefix}-labels-idx1-ubyte")),
            0x801,
            &[n],
            &labels,
        );
    };
    make(240, "train");
    make(50, "t10k");
    let out = scratch("mnist-out");
    let mut cmd = short_demo(
        &out,
        &["--codecs", "f16", "--json", "--steps", "40", "--lr", "0.01"],
    );
    cmd.arg("--data").arg(format!("mnist:{}", data.display()));
    let (st, stdout, err) = run_bounded(cmd, LIMIT);
    assert!(st.success(), "demo failed: {stdout}\n{err}");
    let row: Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(row["parameters"], 36 * 24 + 24 + 24 * 10 + 10);
    assert!(row["accuracy"].as_f64().expect("accuracy") > 0.9, "{row}");
    // A truncated label file is refused before anything starts.
    write_idx(&data.join("t10k-labels-idx1-ubyte"), 0x801, &[49], &[1; 49]);
    let mut cmd = short_demo(&out, &["--codecs", "f16"]);
    cmd.arg("--data").arg(format!("mnist:{}", data.display()));
    let (st, _, err) = run_bounded(cmd, LIMIT);
    assert!(!st.success());
    assert!(err.contains("MNIST files disagree"), "{err}");
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn demo_rejects_bad_flags_clearly() {
    let dir = scratch("demo-bad");
    for (args, want) in [
        (vec!["--codecs", "f8"], "unknown codec"),
        (vec!["--data", "imagenet"], "--data must be"),
        (
            vec!["--data", "mnist:/nonexistent/inagg"],
            "reading /nonexistent/inagg",
        ),
        (vec!["--workers", "0"], "--workers must be at least 1"),
        (vec!["--steps", "0"], "must be positive"),
    ] {
        let (st, _, err) = run_bounded(short_demo(&dir, &args), Duration::from_secs(60));
        assert!(!st.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_over_quic_trains_with_every_codec() {
    let dir = scratch("demo-quic");
    let (st, out, err) = run_bounded(
        short_demo(
            &dir,
            &[
                "--transport",
                "quic",
                "--codecs",
                "f32,f16,bf16,i32,i16,i8",
                "--json",
            ],
        ),
        LIMIT,
    );
    assert!(st.success(), "demo failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 6);
    for r in &rows {
        assert_eq!(r["replicas_identical"], true, "{r}");
        assert!(r["final_loss"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
