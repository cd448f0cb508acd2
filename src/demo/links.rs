//! `inagg demo --link-rate`: the demo in `scripts/netlab.sh`'s emulated cluster (a
//! network namespace for the aggregator and one per worker, every worker link shaped
//! to the rate), once per rate. The demo runs itself inside the script, which places
//! its processes through the environment it sets ([`crate::harness::Netlab`]), and
//! gathers the rows: one CSV, the accuracy curves of every codec and rate, and with
//! several rates the step time against the rate.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::{accuracy_plot, print_table, replicas_agree, Args, Row};
use crate::children::{remove_on_signal, Proc};
use crate::plot::{self, Series, Style};

/// The emulated cluster's script, carried in the binary so that the demo needs no
/// checkout.
const NETLAB: &str = include_str!("../../scripts/netlab.sh");

/// The model's size with `--link-rate` unless `--model-parameters` says: large enough
/// that a ring allreduce's transfer is most of a step at 1 Gbit/s on 4 ranks.
pub const DEFAULT_MODEL_PARAMETERS: usize = 4_000_000;

/// Rows per rank per step with `--link-rate` unless `--batch` says: a small batch
/// keeps a step's compute, on the few cores of a test machine, below its allreduce.
pub const LINK_BATCH: usize = 8;

/// Runs the demo once per `--link-rate` in the emulated cluster.
pub fn run(a: &Args) -> Result<()> {
    check_namespaces()?;
    let out = a.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let script = Script::write()?;
    let parameters = a.model_parameters.unwrap_or(DEFAULT_MODEL_PARAMETERS);
    let exe = std::env::current_exe().context("locating the inagg binary")?;
    let mut rows: Vec<Row> = Vec::new();
    for rate in &a.link_rate {
        if !a.json {
            println!(
                "inagg demo at {rate} per link: {} workers, about {parameters} parameters, \
                 codecs {}",
                a.workers,
                a.codecs
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        let sub = out.join(format!("link-{rate}"));
        let mut cmd = Command::new("bash");
        cmd.arg(&script.0)
            .args([
                "--workers",
                &a.workers.to_string(),
                "--link-rate",
                rate,
                "--",
            ])
            .arg(&exe)
            .arg("demo")
            .args(child_args(a, parameters, &sub));
        let mut proc = Proc::spawn(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
            format!("demo at {rate}"),
        )?;
        let stdout = proc.child.stdout.take().context("the demo's stdout")?;
        let mut these = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(row) = serde_json::from_str::<Row>(&line) {
                these.push(row);
            }
        }
        let status = proc.child.wait()?;
        if !status.success() || these.is_empty() {
            bail!("the demo at {rate} per link failed ({status}); its errors are above");
        }
        rows.extend(these);
    }
    let csv_path = out.join("demo.csv");
    crate::job::write_csv(&csv_path, &rows)?;
    accuracy_plot(&out.join("accuracy_vs_time.png"), &rows)?;
    if a.link_rate.len() > 1 {
        step_time_plot(&out.join("step_time_vs_link_rate.png"), &rows)?;
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_table(&rows);
        println!(
            "wrote {} and {} (each rate's run and loss plot in {}/link-RATE)",
            csv_path.display(),
            out.join("accuracy_vs_time.png").display(),
            out.display()
        );
    }
    replicas_agree(&rows)
}

/// The flags of the demo that runs inside the script: this one's, with the model
/// sized, JSON rows out and each rate's files in `out`.
fn child_args(a: &Args, parameters: usize, out: &Path) -> Vec<String> {
    let t = &a.train;
    let codecs: Vec<&str> = a.codecs.iter().map(|c| c.name()).collect();
    let mut v: Vec<String> = [
        "--workers",
        &a.workers.to_string(),
        "--codecs",
        &codecs.join(","),
        "--transport",
        match a.transport {
            crate::args::Transport::Udp => "udp",
            crate::args::Transport::Quic => "quic",
        },
        "--json",
        "--steps",
        &t.steps.to_string(),
        "--batch",
        &t.batch.unwrap_or(LINK_BATCH).to_string(),
        "--lr",
        &t.lr.to_string(),
        "--seed",
        &t.seed.to_string(),
        "--data",
        &t.data,
        "--eval-every",
        &t.eval_every.to_string(),
        "--model-parameters",
        &parameters.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("--out".into());
    v.push(out.display().to_string());
    if let Some(target) = a.target_accuracy {
        v.push("--target-accuracy".into());
        v.push(target.to_string());
    }
    if t.no_error_feedback {
        v.push("--no-error-feedback".into());
    }
    if t.per_layer {
        v.push("--per-layer".into());
    }
    v
}

/// Fails at once, saying what is needed, where this process cannot make network
/// namespaces.
fn check_namespaces() -> Result<()> {
    let name = format!("inagg-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &name])
        .stdin(Stdio::null())
        .output();
    let why = match made {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "delete", &name]).output();
            return Ok(());
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("cannot run `ip`: {e}"),
    };
    bail!(
        "--link-rate runs every process in a network namespace of its own, with shaped \
         links (scripts/netlab.sh): it needs root or CAP_NET_ADMIN and iproute2's `ip` \
         and `tc` ({why})"
    )
}

/// The script written to a file of its own, removed when done.
struct Script(PathBuf);

impl Script {
    fn write() -> Result<Script> {
        let path = std::env::temp_dir().join(format!("inagg-netlab-{}.sh", std::process::id()));
        std::fs::write(&path, NETLAB).with_context(|| format!("writing {}", path.display()))?;
        remove_on_signal(path.clone());
        Ok(Script(path))
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Mean step time against the link rate, one line per codec.
fn step_time_plot(path: &Path, rows: &[Row]) -> Result<()> {
    let mut codecs: Vec<&str> = Vec::new();
    for r in rows {
        if !codecs.contains(&r.codec.as_str()) {
            codecs.push(&r.codec);
        }
    }
    let series: Vec<Series> = codecs
        .iter()
        .map(|c| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.codec == *c)
                .filter_map(|r| r.link_rate_bps.map(|b| (b / 1e6, 1e3 * r.step_s)))
                .collect();
            points.sort_by(|x, y| x.0.total_cmp(&y.0));
            Series {
                name: c.to_string(),
                points,
                labels: Vec::new(),
            }
        })
        .collect();
    plot::chart(
        path,
        Style {
            title: "Training step time against link rate",
            x_desc: "link rate, Mbit/s",
            y_desc: "step, ms",
            log_y: false,
            lines: true,
            markers: true,
            x_names: None,
        },
        &series,
    )
}
