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

/// `inagg demo` with small defaults that `extra` may override: few enough steps to
/// run in seconds, at a learning rate that makes them learn the synthetic task
/// ([`assert_learned`]).
fn short_demo(out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = inagg();
    c.arg("demo").arg("--out").arg(out).args(extra);
    for (flag, value) in [
        ("--workers", "3"),
        ("--steps", "30"),
        ("--batch", "16"),
        ("--hidden", "24"),
        ("--lr", "0.03"),
    ] {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c
}

/// The synthetic task's labels (seed 1) come from a random teacher: its most frequent
/// class is under a fifth of the held-out rows, and the labels' entropy is above 2.2
/// nats, the least loss of a model that ignores its inputs. A model that learned from
/// the summed gradients beats both by far; one whose gradients summed to zeros (or to
/// noise) stays at its random start, below a fifth and above 2.2, and replicas of it
/// are identical all the same.
const CHANCE_ACCURACY: f64 = 0.2;
const BLIND_LOSS: f64 = 2.2;

/// One codec's result, `(codec, final loss, accuracy)`, learned the task: its loss fell
/// well below what ignoring the inputs gives, its accuracy well above the most
/// frequent class's share, and both track f32's (`f32`, the exact sums), which every
/// codec's sums approximate.
fn assert_learned(rows: &[(String, f64, f64)]) {
    let f32_loss = rows
        .iter()
        .find(|r| r.0 == "f32")
        .map(|r| r.1)
        .expect("an f32 row");
    for (codec, loss, accuracy) in rows {
        assert!(
            loss.is_finite() && *loss < 0.8 * BLIND_LOSS,
            "{codec}: final loss {loss} did not fall"
        );
        assert!(
            *accuracy > 1.75 * CHANCE_ACCURACY && *accuracy <= 1.0,
            "{codec}: accuracy {accuracy} is no better than chance"
        );
        assert!(
            (loss - f32_loss).abs() <= 0.02 * f32_loss,
            "{codec}: final loss {loss} against f32's {f32_loss}"
        );
    }
}

/// `(codec, final_loss, accuracy)` of `--json` rows, which must all say their
/// replicas ended identical.
fn learned(rows: &[Value]) -> Vec<(String, f64, f64)> {
    rows.iter()
        .map(|r| {
            assert_eq!(r["replicas_identical"], true, "{r}");
            (
                r["codec"].as_str().expect("codec").to_string(),
                r["final_loss"].as_f64().expect("final_loss"),
                r["accuracy"].as_f64().expect("accuracy"),
            )
        })
        .collect()
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
    let header: Vec<&str> = lines[0].split(',').collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} in {csv}"))
    };
    let (loss, accuracy, identical) = (
        column("final_loss"),
        column("accuracy"),
        column("replicas_identical"),
    );
    let results: Vec<(String, f64, f64)> = lines[1..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f[identical], "true", "{l}");
            let num = |i: usize| f[i].parse::<f64>().unwrap_or_else(|e| panic!("{e}: {l}"));
            (f[0].to_string(), num(loss), num(accuracy))
        })
        .collect();
    assert_eq!(
        results.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["f32", "bf16", "i8"]
    );
    assert_learned(&results);
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
        assert_eq!(r["error_feedback"], false, "{r}");
    }
    assert_learned(&learned(&rows));
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
    assert_eq!(row["replicas_identical"], true, "{row}");
    // Ten classes in equal numbers: a tenth by chance, ln 10 nats of loss blind.
    assert!(row["accuracy"].as_f64().expect("accuracy") > 0.9, "{row}");
    assert!(
        row["final_loss"]
            .as_f64()
            .is_some_and(|l| l < 0.5 * 10f64.ln()),
        "{row}"
    );
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
    assert_learned(&learned(&rows));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The evaluations a row reports: `(training seconds, steps, accuracy)`.
fn evals(r: &Value) -> Vec<(f64, u64, f64)> {
    r["eval_accuracy"]
        .as_array()
        .expect("eval_accuracy is a list")
        .iter()
        .map(|p| {
            (
                p[0].as_f64().expect("seconds"),
                p[1].as_u64().expect("steps"),
                p[2].as_f64().expect("accuracy"),
            )
        })
        .collect()
}

/// Each row's time to accuracy is the training time of its first evaluation at or
/// above the target, or null when none reached it.
fn assert_time_to_accuracy(r: &Value) {
    let target = r["target_accuracy"].as_f64().expect("a target");
    let first = evals(r).into_iter().find(|e| e.2 >= target).map(|e| e.0);
    assert_eq!(r["time_to_accuracy_s"].as_f64(), first, "{r}");
}

#[test]
fn demo_evaluates_periodically_and_reports_time_to_accuracy() {
    let dir = scratch("demo-eval");
    let (st, out, err) = run_bounded(
        short_demo(
            &dir,
            &["--codecs", "f32,i8", "--json", "--eval-every", "10"],
        ),
        LIMIT,
    );
    assert!(st.success(), "demo failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let e = evals(r);
        // After steps 10, 20 and 30, in training time that only grows.
        assert_eq!(
            e.iter().map(|x| x.1).collect::<Vec<_>>(),
            [10, 20, 30],
            "{r}"
        );
        assert!(e.windows(2).all(|w| w[0].0 < w[1].0), "{r}");
        assert!(e.iter().all(|x| (0.0..=1.0).contains(&x.2)), "{r}");
        assert!(r["link_rate_bps"].is_null(), "{r}");
        assert_time_to_accuracy(r);
    }
    // The default target: f32's last evaluation less half a point, which f32 reached.
    let f32_last = evals(&rows[0]).last().expect("an evaluation").2;
    let target = rows[0]["target_accuracy"].as_f64().expect("target");
    assert!(
        (target - (f32_last - 0.005)).abs() < 1e-12,
        "{target} {f32_last}"
    );
    assert!(rows[0]["time_to_accuracy_s"].as_f64().is_some());
    let png = std::fs::read(dir.join("accuracy_vs_time.png")).expect("accuracy_vs_time.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    // A target nobody reaches is reported as not reached, not as a time.
    let (st, out, err) = run_bounded(
        short_demo(
            &dir,
            &["--codecs", "f32", "--json", "--target-accuracy", "1"],
        ),
        LIMIT,
    );
    assert!(st.success(), "demo failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert!(rows[0]["time_to_accuracy_s"].is_null(), "{}", rows[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    inagg_no_netns,
    ignore = "needs CAP_NET_ADMIN and iproute2 (ip, tc) to create network namespaces"
)]
fn demo_trains_on_shaped_links() {
    let dir = scratch("demo-links");
    let (st, out, err) = run_bounded(
        short_demo(
            &dir,
            &[
                "--link-rate",
                "200mbit",
                "--codecs",
                "f32,i8",
                "--json",
                "--steps",
                "12",
                "--eval-every",
                "4",
                "--model-parameters",
                "20000",
                "--batch",
                "16",
            ],
        ),
        LIMIT,
    );
    assert!(st.success(), "demo failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{out}");
    for r in &rows {
        assert_eq!(r["link_rate_bps"].as_f64(), Some(200e6), "{r}");
        assert_eq!(r["replicas_identical"], true, "{r}");
        assert!(r.get("time_to_accuracy_s").is_some(), "{r}");
        assert_eq!(evals(r).len(), 3, "{r}");
        assert_time_to_accuracy(r);
        // About 20,000 parameters: two hidden layers of 124.
        let p = r["parameters"].as_u64().expect("parameters");
        assert!((19_000..21_000).contains(&p), "{p}");
    }
    let png = std::fs::read(dir.join("accuracy_vs_time.png")).expect("accuracy_vs_time.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(dir.join("link-200mbit").join("demo.csv").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_link_rate_without_privileges_fails_at_once() {
    // An `ip` that refuses, as an unprivileged user's does.
    let dir = scratch("demo-noip");
    let fake = dir.join("ip");
    std::fs::write(&fake, "#!/bin/sh\necho 'mount --make-shared /run/netns failed: Operation not permitted' >&2\nexit 1\n")
        .expect("write a fake ip");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut cmd = short_demo(&dir, &["--link-rate", "1gbit"]);
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(30));
    assert!(!st.success(), "{out}");
    assert!(
        err.contains("CAP_NET_ADMIN") && err.contains("Operation not permitted"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    inagg_no_fashion_mnist,
    ignore = "needs Debian's dataset-fashion-mnist (.ci/run installs it; then touch build.rs)"
)]
fn demo_trains_on_debians_fashion_mnist() {
    let dir = scratch("demo-fashion");
    let (st, out, err) = run_bounded(
        short_demo(
            &dir,
            &[
                "--data",
                "fashion-mnist",
                "--codecs",
                "f32,i8",
                "--json",
                "--steps",
                "40",
                "--hidden",
                "64",
                "--lr",
                "0.002",
            ],
        ),
        LIMIT,
    );
    assert!(st.success(), "demo failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{out}");
    for r in &rows {
        // 28 x 28 pixels into 64 hidden units into 10 classes.
        assert_eq!(r["parameters"], 784 * 64 + 64 + 64 * 10 + 10, "{r}");
        // Ten balanced classes: chance is 10%; 40 steps of a small MLP reach far more.
        let acc = r["accuracy"].as_f64().expect("accuracy");
        assert!(acc > 0.5, "{r}");
        assert_eq!(r["replicas_identical"], true, "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
