//! `inagg peers-report` (the last step of `scripts/compare-peers.sh --rounds R`): per
//! system, the median over rounds of its ratio to Gloo in the same round, with the
//! spread, and the machine.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{inagg, run_bounded};

/// Runs `inagg peers-report` on `results` into `dir`; returns what it printed.
fn peers_report(results: &Path, dir: &Path) -> String {
    let mut cmd = inagg();
    cmd.arg("peers-report")
        .arg("--input")
        .arg(results)
        .arg("--out")
        .arg(dir);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(60));
    assert!(st.success(), "{out}\n{err}");
    out
}

#[test]
fn the_report_takes_each_rounds_ratio_to_gloo_and_their_median_and_spread() {
    let dir = std::env::temp_dir().join(format!("inagg-test-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // Three rounds in which Gloo's rate moves: inagg's ratios to Gloo in the same round
    // are 2, 1.5 and 3, so the median is 2 and the spread 1.5-3.
    let line = |system: &str, codec: &str, ate: f64| {
        format!(
            r#"{{"system":"{system}","codec":"{codec}","workers":4,"elements":1024,"median_s":{},"ate_per_s":{ate}}}"#,
            1024.0 / ate
        )
    };
    let mut input = String::new();
    for (round, gloo, inagg_f32) in [(1, 100.0, 200.0), (2, 200.0, 300.0), (3, 50.0, 150.0)] {
        input.push_str(&format!("{{\"round\": {round}}}\n"));
        input.push_str(&line("gloo", "f32", gloo));
        input.push('\n');
        input.push_str(&format!(
            r#"{{"codec":"f32","workers":4,"elements":1024,"median_s":1.0,"ate_per_s":{inagg_f32},"line_rate_fraction":null,"cpu_s_per_allreduce":{}}}"#,
            0.01 * f64::from(round)
        ));
        input.push('\n');
    }
    let results = dir.join("results.jsonl");
    std::fs::write(&results, input).expect("write results");
    let out = peers_report(&results, &dir);
    assert!(out.contains("3 round(s)") && out.contains("cores"), "{out}");
    let mut rows = csv::Reader::from_path(dir.join("peers-summary.csv")).expect("summary");
    let rows: Vec<csv::StringRecord> = rows.records().map(|r| r.expect("row")).collect();
    let headers = csv::Reader::from_path(dir.join("peers-summary.csv"))
        .expect("summary")
        .headers()
        .expect("headers")
        .clone();
    let col = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let inagg_row = rows
        .iter()
        .find(|r| &r[col("system")] == "inagg")
        .expect("an inagg row");
    let f = |name: &str| inagg_row[col(name)].parse::<f64>().expect(name);
    assert_eq!(f("rounds"), 3.0);
    assert!((f("vs_gloo_median") - 2.0).abs() < 1e-9, "{inagg_row:?}");
    assert!((f("vs_gloo_min") - 1.5).abs() < 1e-9, "{inagg_row:?}");
    assert!((f("vs_gloo_max") - 3.0).abs() < 1e-9, "{inagg_row:?}");
    assert!(
        (f("ate_per_s_median") - 200.0).abs() < 1e-9,
        "{inagg_row:?}"
    );
    assert!(
        (f("cpu_s_per_allreduce_median") - 0.02).abs() < 1e-9,
        "{inagg_row:?}"
    );
    assert!(!inagg_row[col("cpu_model")].is_empty());
    assert!(f("cores") >= 1.0);
    // The per-measurement CSV keeps its columns and gains the round.
    let per = std::fs::read_to_string(dir.join("peers.csv")).expect("peers.csv");
    assert!(
        per.starts_with(
            "system,codec,workers,elements,median_s,ate_per_s,line_rate_fraction,round"
        ),
        "{per}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn several_worker_counts_are_plotted_against_n_and_one_is_not() {
    let dir = std::env::temp_dir().join(format!("inagg-test-peers-n-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let line = |system: &str, workers: u16, ate: f64| {
        format!(
            r#"{{"system":"{system}","codec":"f32","workers":{workers},"elements":1024,"median_s":{},"ate_per_s":{ate}}}"#,
            1024.0 / ate
        )
    };
    let report = |input: String| {
        let results = dir.join("results.jsonl");
        std::fs::write(&results, input).expect("write results");
        for png in ["ate_vs_workers.png", "ratio_vs_workers.png"] {
            let _ = std::fs::remove_file(dir.join(png));
        }
        peers_report(&results, &dir)
    };
    let mut input = String::new();
    for n in [2, 4, 8] {
        input += &line("gloo", n, 100.0 / f64::from(n));
        input.push('\n');
        input += &line("inagg", n, 150.0);
        input.push('\n');
    }
    let out = report(input);
    for png in ["ate_vs_workers.png", "ratio_vs_workers.png"] {
        let bytes = std::fs::read(dir.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
        assert!(out.contains(png), "{out}");
    }
    // One worker count: nothing to draw against N.
    let out = report(format!(
        "{}\n{}\n",
        line("gloo", 4, 100.0),
        line("inagg", 4, 150.0)
    ));
    assert!(!dir.join("ate_vs_workers.png").exists(), "{out}");
    assert!(!out.contains("ate_vs_workers"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
