//! `inagg peers-report`: the last step of `scripts/compare-peers.sh`. Reads the JSON
//! lines that the Gloo and MPI helpers and `inagg bench --json` printed, a line
//! `{"round": R}` before each round's, writes `DIR/peers.csv` (one row per
//! measurement), `DIR/peers-summary.csv` (per system: the median over rounds of its
//! ratio to Gloo in the same round, and the spread) and `DIR/peers.png` (ATE/s per
//! system and codec, one line per worker count and size), and prints the summary with
//! the machine's CPU model and core count.

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
    /// The round it was measured in (from the round lines; 1 without them).
    #[serde(default = "first_round")]
    pub round: u32,
    /// The machine: CPU model and logical cores.
    #[serde(default)]
    pub cpu_model: String,
    #[serde(default)]
    pub cores: usize,
    /// Seconds of CPU one allreduce cost, all ranks (and for inagg its aggregators).
    #[serde(default)]
    pub cpu_s_per_allreduce: Option<f64>,
}

fn first_round() -> u32 {
    1
}

/// One system's figures at one worker count and size, over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub system: String,
    pub codec: String,
    pub workers: u16,
    pub elements: usize,
    pub rounds: usize,
    /// Median over rounds of its ATE/s.
    pub ate_per_s_median: f64,
    /// Median, least and largest over rounds of its ATE/s over Gloo's in the same
    /// round (null where Gloo has no measurement).
    pub vs_gloo_median: Option<f64>,
    pub vs_gloo_min: Option<f64>,
    pub vs_gloo_max: Option<f64>,
    pub line_rate_fraction_median: Option<f64>,
    /// Median over rounds of `cpu_s_per_allreduce`.
    pub cpu_s_per_allreduce_median: Option<f64>,
    pub cpu_model: String,
    pub cores: usize,
}

/// This machine's CPU model (`/proc/cpuinfo`'s first `model name`) and logical cores.
fn machine() -> (String, usize) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    (model, cores)
}

/// The median of `v` (`crate::stats::median`); `None` if empty.
fn median(v: Vec<f64>) -> Option<f64> {
    (!v.is_empty()).then(|| crate::stats::median(&v))
}

/// Per system, codec, worker count and size: the medians over rounds and the spread
/// of the ratio to Gloo measured in the same round.
fn summarize(points: &[Point]) -> Vec<Summary> {
    let mut keys: Vec<(String, String, u16, usize)> = Vec::new();
    for p in points {
        let k = (p.system.clone(), p.codec.clone(), p.workers, p.elements);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(system, codec, workers, elements)| {
            let mine: Vec<&Point> = points
                .iter()
                .filter(|p| {
                    p.system == system
                        && p.codec == codec
                        && p.workers == workers
                        && p.elements == elements
                })
                .collect();
            let ratios: Vec<f64> = mine
                .iter()
                .filter_map(|p| {
                    let g = points.iter().find(|g| {
                        g.system == "gloo"
                            && g.round == p.round
                            && g.workers == workers
                            && g.elements == elements
                    })?;
                    (g.ate_per_s > 0.0).then(|| p.ate_per_s / g.ate_per_s)
                })
                .collect();
            let first = mine.first().copied();
            Summary {
                system,
                codec,
                workers,
                elements,
                rounds: mine.len(),
                ate_per_s_median: median(mine.iter().map(|p| p.ate_per_s).collect()).unwrap_or(0.0),
                vs_gloo_min: ratios.iter().copied().reduce(f64::min),
                vs_gloo_max: ratios.iter().copied().reduce(f64::max),
                vs_gloo_median: median(ratios),
                line_rate_fraction_median: median(
                    mine.iter().filter_map(|p| p.line_rate_fraction).collect(),
                ),
                cpu_s_per_allreduce_median: median(
                    mine.iter().filter_map(|p| p.cpu_s_per_allreduce).collect(),
                ),
                cpu_model: first.map(|p| p.cpu_model.clone()).unwrap_or_default(),
                cores: first.map_or(0, |p| p.cores),
            }
        })
        .collect()
}

fn inagg() -> String {
    "inagg".into()
}

pub fn run(a: &Args) -> Result<()> {
    let f =
        std::fs::File::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let (cpu_model, cores) = machine();
    let mut points = Vec::new();
    let mut round = 1;
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        if v.get("codec").is_none() {
            if let Some(r) = v.get("round").and_then(|r| r.as_u64()) {
                round = u32::try_from(r).context("round number")?;
                continue;
            }
        }
        let mut p: Point =
            serde_json::from_value(v).with_context(|| format!("not a measurement: {line}"))?;
        p.round = round;
        p.cpu_model = cpu_model.clone();
        p.cores = cores;
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
    let summary = summarize(&points);
    let summary_path = a.out.join("peers-summary.csv");
    let mut w = csv::Writer::from_path(&summary_path)?;
    for s in &summary {
        w.serialize(s)?;
    }
    w.flush()?;
    // Categories on x: gloo, mpi, then inagg's codecs in the order measured.
    let mut names: Vec<String> = Vec::new();
    for p in &points {
        let n = label(&p.system, &p.codec);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let mut by_config: BTreeMap<(u16, usize), Vec<&Point>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.round == 1) {
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
                    let x = names
                        .iter()
                        .position(|x| *x == label(&p.system, &p.codec))?;
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
    let scaling = scaling_plots(a, &summary)?;
    let rounds = points.iter().map(|p| p.round).max().unwrap_or(1);
    println!("{cpu_model}, {cores} cores; {rounds} round(s), medians over rounds");
    println!(
        "{:<6} {:>10} {:<12} {:>12} {:>10} {:>13} {:>10} {:>12}",
        "N", "elements", "system", "ATE/s", "vs gloo", "(min-max)", "line rate", "CPU ms/call"
    );
    for s in &summary {
        let name = label(&s.system, &s.codec);
        println!(
            "{:<6} {:>10} {:<12} {:>12.4e} {:>10} {:>13} {:>10} {:>12}",
            s.workers,
            s.elements,
            name,
            s.ate_per_s_median,
            s.vs_gloo_median.map_or("-".into(), |r| format!("{r:.2}x")),
            match (s.vs_gloo_min, s.vs_gloo_max) {
                (Some(lo), Some(hi)) => format!("({lo:.2}-{hi:.2})"),
                _ => "-".into(),
            },
            s.line_rate_fraction_median
                .map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
            s.cpu_s_per_allreduce_median
                .map_or("-".into(), |c| format!("{:.1}", 1e3 * c)),
        );
    }
    println!(
        "wrote {}, {} and {}",
        csv_path.display(),
        summary_path.display(),
        a.out.join("peers.png").display()
    );
    if scaling {
        println!(
            "wrote {} and {}",
            a.out.join("ate_vs_workers.png").display(),
            a.out.join("ratio_vs_workers.png").display()
        );
    }
    Ok(())
}

/// With more than one worker count measured: `ate_vs_workers.png` (median ATE/s
/// against N) and `ratio_vs_workers.png` (median ratio to Gloo against N), one line
/// per system and codec at each size. Returns whether it drew them.
fn scaling_plots(a: &Args, summary: &[Summary]) -> Result<bool> {
    let mut counts: Vec<u16> = summary.iter().map(|s| s.workers).collect();
    counts.sort_unstable();
    counts.dedup();
    if counts.len() < 2 {
        return Ok(false);
    }
    let sizes = summary
        .iter()
        .map(|s| s.elements)
        .collect::<std::collections::BTreeSet<_>>();
    let line = |s: &Summary| {
        let name = label(&s.system, &s.codec);
        if sizes.len() > 1 {
            format!("{name}, {} Mi", s.elements >> 20)
        } else {
            name
        }
    };
    let mut ate: Vec<Series> = Vec::new();
    let mut ratio: Vec<Series> = Vec::new();
    for s in summary {
        let name = line(s);
        let n = f64::from(s.workers);
        let at = match ate.iter().position(|x| x.name == name) {
            Some(i) => i,
            None => {
                ate.push(Series {
                    name: name.clone(),
                    points: Vec::new(),
                    labels: Vec::new(),
                });
                ratio.push(Series {
                    name,
                    points: Vec::new(),
                    labels: Vec::new(),
                });
                ate.len() - 1
            }
        };
        ate[at].points.push((n, s.ate_per_s_median));
        if let Some(r) = s.vs_gloo_median {
            ratio[at].points.push((n, r));
        }
    }
    for s in ate.iter_mut().chain(ratio.iter_mut()) {
        s.points.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    ratio.retain(|s| !s.points.is_empty());
    for (file, what, y_desc, log_y, series) in [
        (
            "ate_vs_workers.png",
            "Allreduce throughput",
            "ATE/s (median over rounds)",
            true,
            &ate,
        ),
        (
            "ratio_vs_workers.png",
            "Ratio to Gloo",
            "ATE/s over Gloo's (median over rounds)",
            false,
            &ratio,
        ),
    ] {
        let title = format!("{what} against workers, {}", a.network);
        let style = Style {
            title: &title,
            x_desc: "workers (N)",
            y_desc,
            log_y,
            lines: true,
            markers: true,
            x_names: None,
        };
        plot::chart(&a.out.join(file), style, series)?;
    }
    Ok(true)
}

/// A system's name in the report: inagg's with its codec.
fn label(system: &str, codec: &str) -> String {
    if system == "inagg" {
        format!("inagg {codec}")
    } else {
        system.to_string()
    }
}
