//! `inagg peers-report`: the last step of `scripts/compare-peers.sh`. Reads the JSON
//! lines that the Gloo and MPI helpers and `inagg bench --json` printed, writes
//! `DIR/peers.csv` and `DIR/peers.png` (ATE/s per system and codec, one line per
//! worker count and size), and prints a table with each inagg codec's ratio to Gloo.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::plot::{self, Series, Style};

/// Flags of `inagg peers-report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The JSON lines (one measurement each).
    #[arg(long)]
    pub input: PathBuf,
    /// Folder for peers.csv and peers.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Label of the network the runs used (for the title): loopback, 1gbit, ...
    #[arg(long, default_value = "loopback")]
    pub network: String,
}

/// One measurement, from any system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    #[serde(default = "inagg")]
    pub system: String,
    pub codec: String,
    pub workers: u16,
    pub elements: usize,
    pub median_s: f64,
    pub ate_per_s: f64,
    #[serde(default)]
    pub line_rate_fraction: Option<f64>,
}

fn inagg() -> String {
    "inagg".into()
}

pub fn run(a: &Args) -> Result<()> {
    let f =
        std::fs::File::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let mut points = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let p: Point =
            serde_json::from_str(&line).with_context(|| format!("not a measurement: {line}"))?;
        points.push(p);
    }
    if points.is_empty() {
        bail!("{} holds no measurements", a.input.display());
    }
    std::fs::create_dir_all(&a.out)?;
    let csv_path = a.out.join("peers.csv");
    let mut w = csv::Writer::from_path(&csv_path)?;
    for p in &points {
        w.serialize(p)?;
    }
    w.flush()?;
    // Categories on x: gloo, mpi, then inagg's codecs in the order measured.
    let mut names: Vec<String> = Vec::new();
    for p in &points {
        let n = label(p);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let mut by_config: BTreeMap<(u16, usize), Vec<&Point>> = BTreeMap::new();
    for p in &points {
        by_config
            .entry((p.workers, p.elements))
            .or_default()
            .push(p);
    }
    let series: Vec<Series> = by_config
        .iter()
        .map(|((n, e), ps)| Series {
            name: format!("N={n}, {} Mi", e >> 20),
            points: ps
                .iter()
                .filter_map(|p| {
                    let x = names.iter().position(|x| *x == label(p))?;
                    Some((x as f64, p.ate_per_s))
                })
                .collect(),
            labels: Vec::new(),
        })
        .collect();
    let title = format!("Allreduce throughput, {}", a.network);
    plot::chart(
        &a.out.join("peers.png"),
        Style {
            title: &title,
            x_desc: "system / codec",
            y_desc: "ATE/s",
            log_y: true,
            lines: false,
            markers: true,
            x_names: Some(&names),
        },
        &series,
    )?;
    println!(
        "{:<6} {:>10} {:<12} {:>12} {:>10} {:>10}",
        "N", "elements", "system", "ATE/s", "vs gloo", "line rate"
    );
    for ((n, e), ps) in &by_config {
        let gloo = ps.iter().find(|p| p.system == "gloo").map(|p| p.ate_per_s);
        for p in ps {
            println!(
                "{:<6} {:>10} {:<12} {:>12.4e} {:>10} {:>10}",
                n,
                e,
                label(p),
                p.ate_per_s,
                gloo.map_or("-".into(), |g| format!("{:.2}x", p.ate_per_s / g)),
                p.line_rate_fraction
                    .map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
            );
        }
    }
    println!(
        "wrote {} and {}",
        csv_path.display(),
        a.out.join("peers.png").display()
    );
    Ok(())
}

fn label(p: &Point) -> String {
    if p.system == "inagg" {
        format!("inagg {}", p.codec)
    } else {
        p.system.clone()
    }
}
