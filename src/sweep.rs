//! `inagg sweep`: the bench over codecs, worker counts and chunk sizes, written to
//! `DIR/sweep.csv` with two plots: error against wire bytes per element, and ATE/s per
//! codec.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::job::{self, JobSpec, Row};
use crate::plot::{self, Series, Style};

/// Flags of `inagg sweep`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder for sweep.csv and the PNG plots (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Worker counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub workers: Vec<u16>,
    /// Codecs, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,f16,bf16,i32,i16,i8",
        value_parser = crate::args::codec
    )]
    pub codec: Vec<crate::args::CodecArg>,
    /// Chunk sizes in elements, comma-separated (default: each codec's default chunk
    /// toward a loopback aggregator, `inagg_worker::default_chunk_elems`).
    #[arg(long, value_delimiter = ',')]
    pub chunk_elements: Vec<u16>,
    /// Elements of the tensor.
    #[arg(long, default_value_t = 4 << 20)]
    pub elements: usize,
    /// Timed allreduces per configuration.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Untimed allreduces first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Round stochastically.
    #[arg(long)]
    pub stochastic: bool,
}

pub fn run(a: &Args) -> Result<()> {
    if a.workers.contains(&0) {
        bail!("--workers must be at least 1");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let chunks: Vec<Option<u16>> = if a.chunk_elements.is_empty() {
        vec![None]
    } else {
        a.chunk_elements.iter().copied().map(Some).collect()
    };
    let (mut agg, addr) = crate::harness::start_aggregator(&[])?;
    let mut rows: Vec<Row> = Vec::new();
    let mut job = 1;
    for &workers in &a.workers {
        for &chunk in &chunks {
            for c in &a.codec {
                let mut b = JobSpec::defaults();
                b.workers = workers;
                b.elements = a.elements;
                b.codec = vec![*c];
                b.runs.iters = a.iters;
                b.runs.warmup = a.warmup;
                b.tuning.chunk_elements = chunk;
                b.tuning.stochastic = a.stochastic;
                b.json = true;
                // The sweep's aggregator is on loopback, whatever netlab's environment
                // says.
                b.netlab = Default::default();
                let reports = job::run_job(&b, &[addr], job, c.name())?;
                job += 1;
                let r = job::row(&b, c.name(), &[reports], None);
                eprintln!(
                    "sweep: N={workers} {c} chunk {}: {:.3e} ATE/s, rel l2 {:.2e}",
                    r.chunk_elements, r.ate_per_s, r.rel_l2_err
                );
                rows.push(r);
            }
        }
    }
    agg.terminate();
    let csv_path = a.out.join("sweep.csv");
    job::write_csv(&csv_path, &rows)?;
    plots(a, &rows)?;
    println!(
        "{:<4} {:<6} {:>6} {:>12} {:>10} {:>10}",
        "N", "codec", "chunk", "ATE/s", "B/elem", "rel l2"
    );
    for r in &rows {
        println!(
            "{:<4} {:<6} {:>6} {:>12.4e} {:>10.3} {:>10.2e}",
            r.workers,
            r.codec,
            r.chunk_elements,
            r.ate_per_s,
            r.bytes_sent_per_worker as f64 / r.elements as f64,
            r.rel_l2_err
        );
    }
    println!(
        "wrote {}, error_vs_bytes.png and ate_per_codec.png in {}",
        csv_path.display(),
        a.out.display()
    );
    // As `inagg bench`: the table and files are written, and wrong results fail.
    let wrong: Vec<String> = rows
        .iter()
        .filter(|r| !(r.within_bound && r.ranks_identical))
        .map(|r| format!("{} (N={}, chunk {})", r.codec, r.workers, r.chunk_elements))
        .collect();
    if !wrong.is_empty() {
        bail!("wrong results for {}", wrong.join(", "));
    }
    Ok(())
}

fn plots(a: &Args, rows: &[Row]) -> Result<()> {
    let names: Vec<String> = a.codec.iter().map(|c| c.name().to_string()).collect();
    let mut err = Vec::new();
    let mut ate = Vec::new();
    for &n in &a.workers {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.workers == n).collect();
        err.push(Series {
            name: format!("N = {n}"),
            points: mine
                .iter()
                .map(|r| {
                    (
                        r.bytes_sent_per_worker as f64 / r.elements as f64,
                        r.rel_l2_err.max(1e-12),
                    )
                })
                .collect(),
            labels: mine
                .iter()
                .map(|r| format!("{} ({})", r.codec, r.chunk_elements))
                .collect(),
        });
        ate.push(Series {
            name: format!("N = {n}"),
            points: mine
                .iter()
                .map(|r| {
                    let i = a
                        .codec
                        .iter()
                        .position(|c| c.name() == r.codec)
                        .unwrap_or(0);
                    (i as f64, r.ate_per_s / 1e6)
                })
                .collect(),
            labels: Vec::new(),
        });
    }
    plot::chart(
        &a.out.join("error_vs_bytes.png"),
        Style {
            title: "Error against bytes on the wire",
            x_desc: "wire bytes sent per element (headers included)",
            y_desc: "relative L2 error vs exact sum",
            log_y: true,
            lines: false,
            markers: true,
            x_names: None,
        },
        &err,
    )?;
    plot::chart(
        &a.out.join("ate_per_codec.png"),
        Style {
            title: "Allreduce throughput per codec (loopback)",
            x_desc: "codec",
            y_desc: "million aggregated elements per second",
            log_y: false,
            lines: true,
            markers: true,
            x_names: Some(&names),
        },
        &ate,
    )?;
    Ok(())
}
