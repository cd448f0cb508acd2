//! `inagg demo`: local multi-process data-parallel training. One aggregator and N
//! worker processes on 127.0.0.1 train the same MLP (candle, real autodiff) on their
//! shards, summing gradients through inagg after every backward pass; once per codec,
//! with a table, a CSV and a loss plot at the end. Replicas must end identical.

pub mod data;
mod model;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use inagg_proto::codec;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::children::Proc;
use crate::plot::{self, Series, Style};
use worker::{Line, Training};

/// Flags of `inagg demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: u16,
    /// Codecs to train with, one run each.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,i8", value_parser = crate::args::codec)]
    pub codecs: Vec<crate::args::CodecArg>,
    /// Transport between workers and aggregator.
    #[arg(long, value_enum, default_value_t = crate::args::Transport::Udp)]
    pub transport: crate::args::Transport,
    /// Folder for demo.csv and loss.png (default: inagg-out/demo).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object per codec on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub train: Training,
}

/// One codec's run. Field names are a contract (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub codec: String,
    pub error_feedback: bool,
    pub workers: u16,
    pub steps: usize,
    /// Loss of the final model on the training shards (mean over ranks).
    pub final_loss: f64,
    /// Held-out accuracy of the final model, in [0, 1].
    pub accuracy: f64,
    /// Bytes each worker sent and received per step, IP and UDP headers included.
    pub wire_bytes_per_step: f64,
    pub bytes_sent_per_step: f64,
    /// Mean time of a step's allreduce(s).
    pub allreduce_s: f64,
    /// Mean time of a whole step.
    pub step_s: f64,
    pub parameters: usize,
    pub replicas_identical: bool,
}

/// What the reader threads pass on from a worker process.
enum Msg {
    /// A line of a rank's stdout.
    Line(usize, String),
    /// A rank's stdout closed.
    Eof,
    /// A rank's whole stderr, once it closed.
    Stderr(usize, String),
}

/// Per-rank output of a run.
#[derive(Debug, Default)]
struct RankLog {
    steps: Vec<Line>,
    last: Option<Line>,
    stderr: String,
}

fn run_codec(
    a: &Args,
    addr: std::net::SocketAddr,
    ca: Option<&std::path::Path>,
    job: u32,
    codec: &str,
) -> Result<(Row, Vec<f64>)> {
    let exe = std::env::current_exe()?;
    let t = &a.train;
    let mut procs = Vec::new();
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut readers = Vec::new();
    for rank in 0..a.workers {
        let mut cmd = Command::new(&exe);
        cmd.args(["demo-worker", "--aggregator", &addr.to_string()])
            .args(["--job", &job.to_string(), "--rank", &rank.to_string()])
            .args(["--world", &a.workers.to_string(), "--codec", codec])
            .args([
                "--steps",
                &t.steps.to_string(),
                "--batch",
                &t.batch.to_string(),
            ])
            .args(["--lr", &t.lr.to_string(), "--seed", &t.seed.to_string()])
            .args(["--data", &t.data])
            .arg("--hidden")
            .arg(
                t.hidden
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        if let Some(ca) = ca {
            cmd.args(["--transport", "quic", "--ca"]).arg(ca);
        }
        if t.no_error_feedback {
            cmd.arg("--no-error-feedback");
        }
        if t.per_layer {
            cmd.arg("--per-layer");
        }
        let mut proc = Proc::spawn(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            format!("demo worker {rank}"),
        )?;
        let out = proc.child.stdout.take().context("stdout")?;
        let err = proc.child.stderr.take().context("stderr")?;
        let r = usize::from(rank);
        let txo = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = txo.send(Msg::Line(r, line));
            }
            let _ = txo.send(Msg::Eof);
        }));
        let txe = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut s = String::new();
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                s.push_str(&l);
                s.push('\n');
            }
            let _ = txe.send(Msg::Stderr(r, s));
        }));
        procs.push(proc);
    }
    drop(tx);
    let n = usize::from(a.workers);
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(t.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>5} [{bar:40}] {pos}/{len} steps, loss {msg} ({elapsed})",
        )
        .map_err(|e| anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    bar.set_prefix(codec.to_string());
    let mut logs: Vec<RankLog> = (0..n).map(|_| RankLog::default()).collect();
    let mut open = n;
    let mut stderr_left = n;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while open > 0 || stderr_left > 0 {
        let Ok(msg) = rx.recv_timeout(Duration::from_secs(120)) else {
            bail!("{codec}: no word from any worker for 120 s");
        };
        if Instant::now() > deadline {
            bail!("{codec}: training did not finish within an hour");
        }
        match msg {
            Msg::Stderr(r, s) => {
                logs[r].stderr = s;
                stderr_left -= 1;
            }
            Msg::Eof => open -= 1,
            Msg::Line(r, line) => match serde_json::from_str::<Line>(&line) {
                Ok(l @ Line::Step { .. }) => {
                    if r == 0 {
                        if let Line::Step { loss, .. } = &l {
                            bar.set_message(format!("{loss:.4}"));
                        }
                        bar.inc(1);
                    }
                    logs[r].steps.push(l);
                }
                Ok(l @ Line::Final { .. }) => logs[r].last = Some(l),
                Err(_) => {}
            },
        }
    }
    bar.finish();
    let mut failures = Vec::new();
    for (p, log) in procs.iter_mut().zip(&logs) {
        let st = p.child.wait()?;
        if !st.success() {
            failures.push(format!(
                "{} exited with {st}: {}",
                p.name,
                log.stderr.trim()
            ));
        }
    }
    if !failures.is_empty() {
        bail!("training with {codec} failed:\n{}", failures.join("\n"));
    }
    let finals: Vec<(u64, f64, f64, usize)> = logs
        .iter()
        .map(|l| match &l.last {
            Some(Line::Final {
                checksum,
                accuracy,
                train_loss,
                parameters,
            }) => Ok((*checksum, *accuracy, *train_loss, *parameters)),
            _ => Err(anyhow!("a worker ended without its final report")),
        })
        .collect::<Result<_>>()?;
    let identical = finals.windows(2).all(|w| w[0].0 == w[1].0);
    let steps = t.steps.max(1) as f64;
    let mut curve = vec![0f64; t.steps];
    let (mut ar, mut st, mut sent, mut wire) = (0f64, 0f64, 0f64, 0f64);
    for log in &logs {
        for l in &log.steps {
            if let Line::Step {
                step,
                loss,
                allreduce_s,
                step_s,
                bytes_sent,
                bytes_recv,
            } = l
            {
                if let Some(c) = curve.get_mut(*step) {
                    *c += loss / n as f64;
                }
                ar += allreduce_s;
                st += step_s;
                sent += *bytes_sent as f64;
                wire += (*bytes_sent + *bytes_recv) as f64;
            }
        }
    }
    let per = steps * n as f64;
    let c = codec::by_name(codec).context("codec")?;
    let row = Row {
        codec: codec.to_string(),
        error_feedback: c.block_scaled() && !t.no_error_feedback,
        workers: a.workers,
        steps: t.steps,
        final_loss: finals.iter().map(|f| f.2).sum::<f64>() / n as f64,
        accuracy: finals[0].1,
        wire_bytes_per_step: wire / per,
        bytes_sent_per_step: sent / per,
        allreduce_s: ar / per,
        step_s: st / per,
        parameters: finals[0].3,
        replicas_identical: identical,
    };
    for r in readers {
        let _ = r.join();
    }
    Ok((row, curve))
}

pub fn run(a: &Args) -> Result<()> {
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if a.train.steps == 0 || a.train.batch == 0 {
        bail!("--steps and --batch must be positive");
    }
    // Fail on bad data before starting anything.
    let split = a.train.dataset()?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("inagg-out/demo"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if !a.json {
        println!(
            "inagg demo: {} workers, {} training rows ({} features, {} classes), {} steps of {} rows per rank",
            a.workers,
            split.train.len(),
            split.train.dim,
            split.train.classes,
            a.train.steps,
            a.train.batch
        );
        if let Some(c) = split.ceiling {
            println!(
                "the noise-free teacher that labelled the data scores {:.2}% on the held-out rows",
                100.0 * c
            );
        }
    }
    drop(split);
    let quic = match a.transport {
        crate::args::Transport::Quic => Some(crate::harness::QuicIdentity::generate()?),
        crate::args::Transport::Udp => None,
    };
    let (mut agg, addr) = match &quic {
        Some(id) => {
            crate::harness::start_quic_aggregator_in(&crate::harness::Netlab::default(), id, &[])?
        }
        None => crate::harness::start_aggregator(&[])?,
    };
    let ca = quic.as_ref().map(|q| q.cert.as_path());
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for (i, c) in a.codecs.iter().enumerate() {
        let (row, curve) = run_codec(a, addr, ca, 100 + i as u32, c.name())?;
        if a.json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
        curves.push(curve);
    }
    agg.terminate();
    let csv_path = out.join("demo.csv");
    let mut w = csv::Writer::from_path(&csv_path)?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let series: Vec<Series> = rows
        .iter()
        .zip(&curves)
        .map(|(r, c)| Series {
            name: if r.error_feedback {
                format!("{} (error feedback)", r.codec)
            } else {
                r.codec.clone()
            },
            points: smooth(c)
                .into_iter()
                .enumerate()
                .map(|(s, l)| (s as f64, l))
                .collect(),
            labels: Vec::new(),
        })
        .collect();
    plot::chart(
        &out.join("loss.png"),
        Style {
            title: "Training loss (mean over ranks, smoothed over 10 steps)",
            x_desc: "step",
            y_desc: "cross-entropy",
            log_y: false,
            lines: true,
            markers: false,
            x_names: None,
        },
        &series,
    )?;
    if !a.json {
        println!(
            "{:<6} {:>4} {:>10} {:>9} {:>16} {:>13} {:>9}  replicas",
            "codec", "ef", "final loss", "accuracy", "wire B/step/wkr", "allreduce ms", "step ms"
        );
        for r in &rows {
            println!(
                "{:<6} {:>4} {:>10.4} {:>8.2}% {:>16.0} {:>13.2} {:>9.2}  {}",
                r.codec,
                if r.error_feedback { "on" } else { "off" },
                r.final_loss,
                100.0 * r.accuracy,
                r.wire_bytes_per_step,
                1e3 * r.allreduce_s,
                1e3 * r.step_s,
                if r.replicas_identical {
                    "identical"
                } else {
                    "DIFFER"
                }
            );
        }
        println!(
            "wrote {} and {}",
            csv_path.display(),
            out.join("loss.png").display()
        );
    }
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.replicas_identical)
        .map(|r| r.codec.as_str())
        .collect();
    if !bad.is_empty() {
        bail!(
            "replicas differ at the end of training with {}",
            bad.join(", ")
        );
    }
    Ok(())
}

/// A moving average over 10 steps.
fn smooth(v: &[f64]) -> Vec<f64> {
    (0..v.len())
        .map(|i| {
            let lo = i.saturating_sub(9);
            v[lo..=i].iter().sum::<f64>() / (i - lo + 1) as f64
        })
        .collect()
}
