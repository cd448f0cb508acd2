//! Limits and modes of the real processes that no other test reaches: the aggregator's
//! `--max-jobs` and `--max-window`, the worker's `--no-congestion-control`,
//! `--threads` with QUIC, striping over QUIC, UDP and QUIC served by one process,
//! `--server-name`, SIGTERM to a QUIC aggregator, to a sharded one and to the relay,
//! and `inagg simulate`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    aggregator, expect_failure, inagg, json_lines, quic_aggregator, scrape, value, worker, Proc,
    TempDir,
};

/// Waits (up to 30 s) until the metrics at `addr` show `series`; returns its value.
fn series_value(addr: &str, series: &str) -> f64 {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = value(&scrape(addr), series) {
            return v;
        }
        assert!(Instant::now() < end, "no {series} at {addr} within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An aggregator with metrics; returns it, its address and the metrics address.
fn aggregator_with_metrics(extra: &[&str]) -> (Proc, SocketAddr, String) {
    let mut flags = vec!["--metrics", "127.0.0.1:0"];
    flags.extend(extra);
    let (mut agg, addr) = aggregator(&flags);
    let (metrics, _) = watch_stderr(&mut agg);
    (agg, addr, metrics)
}

/// Reads an aggregator's stderr as it comes: returns the metrics address from its
/// `metrics on` line, and a thread that returns all of stderr once it closes.
fn watch_stderr(p: &mut Proc) -> (String, std::thread::JoinHandle<String>) {
    let err = p.child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .strip_prefix("metrics on http://")
                .and_then(|s| s.strip_suffix("/metrics"))
            {
                let _ = tx.send(addr.to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the aggregator's metrics address");
    (addr, reader)
}

/// A one-rank job that runs for `secs` seconds.
fn lone_rank(addr: SocketAddr, job: u32, secs: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--elements",
        "1000",
        "--iters",
        "1000000000",
        "--duration-s",
        secs,
    ];
    args.extend(extra);
    worker(addr, job, 0, 1, &args)
}

#[test]
fn max_jobs_refuses_a_job_beyond_it_and_takes_one_once_a_job_ends() {
    let (_agg, addr, metrics) = aggregator_with_metrics(&["--max-jobs", "1"]);
    let mut first = lone_rank(addr, 1, "2", &[]);
    // The first job holds the only place before the second asks.
    assert_eq!(series_value(&metrics, "inagg_jobs"), 1.0);
    let mut second = lone_rank(addr, 2, "1", &["--join-timeout-ms", "5000"]);
    let err = expect_failure(&mut second, Duration::from_secs(30), "a second job");
    assert!(
        err.contains("holds 1 jobs already"),
        "the second job said: {err}"
    );
    let st = first
        .wait_for(Duration::from_secs(60))
        .expect("the first job ends");
    assert!(st.success(), "the first job: {}", first.stderr());
    // Its place is free again.
    let mut third = lone_rank(addr, 3, "0", &[]);
    let st = third.wait_for(Duration::from_secs(60)).expect("third job");
    assert!(
        st.success(),
        "a job after the first ended: {}",
        third.stderr()
    );
}

#[test]
fn max_window_caps_the_slots_a_job_is_granted() {
    for (cap, want) in [(None, 64.0), (Some("8"), 8.0)] {
        let flags: Vec<&str> = cap.map(|c| vec!["--max-window", c]).unwrap_or_default();
        let (_agg, addr, metrics) = aggregator_with_metrics(&flags);
        let _w = lone_rank(addr, 9, "30", &["--window", "64"]);
        let slots = series_value(&metrics, "inagg_job_slots{job=\"9\"}");
        assert_eq!(slots, want, "--max-window {cap:?}: {slots} slots");
    }
}

#[test]
fn congestion_control_shrinks_the_window_on_loss_unless_turned_off() {
    let (_agg, upstream) = aggregator(&[]);
    let (_relay, addr) = common::relay(upstream, &["--loss", "0.05", "--seed", "3"]);
    for (job, flags) in [(21u32, &[][..]), (22, &["--no-congestion-control"][..])] {
        let mut ws: Vec<_> = (0..2)
            .map(|r| {
                let mut args = vec![
                    "--elements",
                    "200000",
                    "--iters",
                    "10",
                    "--window",
                    "64",
                    "--chunk-elements",
                    "256",
                    "--json",
                ];
                args.extend(flags);
                worker(addr, job, r, 2, &args)
            })
            .collect();
        for w in &mut ws {
            let st = w.wait_for(Duration::from_secs(120)).expect("worker ends");
            let out = w.stdout();
            assert!(st.success(), "{flags:?}: {out}\n{}", w.stderr());
            let r = &json_lines(&out)[0];
            assert!(r["retransmissions"].as_u64() > Some(0), "{r}");
            let window = r["congestion_window_min"].as_u64().expect("a window");
            if flags.is_empty() {
                assert!(window < 64, "losses left the window at {window}: {r}");
            } else {
                assert_eq!(window, 64, "{flags:?}: {r}");
            }
        }
    }
}

#[test]
fn threads_with_quic_alone_is_refused() {
    let dir = TempDir::new("limits-threads");
    let mut cmd = inagg();
    cmd.args(["aggregator", "--quic", "127.0.0.1:0", "--threads", "2"])
        .arg("--cert")
        .arg(dir.0.join("c.pem"))
        .arg("--key")
        .arg(dir.0.join("k.pem"));
    let (st, out, err) = common::run_bounded(cmd, Duration::from_secs(30));
    assert!(!st.success(), "{out}{err}");
    assert!(
        err.contains("--threads 2") && err.contains("--listen"),
        "it said: {err}"
    );
}

/// Flags that make a worker trust the QUIC aggregator `agg` by its certificate.
fn quic_flags(cert: &std::path::Path) -> Vec<String> {
    vec![
        "--transport".into(),
        "quic".into(),
        "--ca".into(),
        cert.display().to_string(),
    ]
}

/// Runs ranks 0..world of `job` with `args` and expects each to succeed with its
/// result checked; returns their reports.
fn run_job(args: &[String], world: u16) -> Vec<serde_json::Value> {
    let mut ws: Vec<_> = (0..world)
        .map(|r| {
            let mut cmd = inagg();
            cmd.arg("worker")
                .args(args)
                .args(["--rank", &r.to_string(), "--world", &world.to_string()])
                .args(["--json"])
                .stdout(Stdio::piped());
            Proc::spawn_collected(cmd)
        })
        .collect();
    ws.iter_mut()
        .map(|w| {
            let st = w.wait_for(Duration::from_secs(120)).expect("worker ends");
            let out = w.stdout();
            assert!(st.success(), "{args:?}: {out}\n{}", w.stderr());
            let r = json_lines(&out).remove(0);
            assert_eq!(r["check"]["within_bound"], true, "{r}");
            r
        })
        .collect()
}

#[test]
fn a_job_stripes_over_two_quic_aggregators() {
    let dir = TempDir::new("limits-quic-stripes");
    // Both serve the same identity, so that one CA file trusts both.
    let a = quic_aggregator(&dir.0, &[]);
    let b = quic_aggregator(&dir.0, &[]);
    let mut args = quic_flags(&a.cert);
    args.extend(["--aggregators".into(), format!("{},{}", a.addr, b.addr)]);
    args.extend(
        [
            "--job",
            "31",
            "--elements",
            "300000",
            "--iters",
            "3",
            "--codec",
            "i32",
        ]
        .map(String::from),
    );
    let reports = run_job(&args, 3);
    let sums: Vec<_> = reports.iter().map(|r| &r["result_checksum"]).collect();
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
}

#[test]
fn one_process_serves_udp_and_quic_jobs_at_once() {
    let dir = TempDir::new("limits-both");
    let (cert, key) = (dir.0.join("c.pem"), dir.0.join("k.pem"));
    let mut cmd = inagg();
    cmd.args([
        "aggregator",
        "--listen",
        "127.0.0.1:0",
        "--quic",
        "127.0.0.1:0",
    ])
    .arg("--cert")
    .arg(&cert)
    .arg("--key")
    .arg(&key);
    let mut agg = Proc::spawn(cmd);
    let out = agg.child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let mut next = || lines.next().expect("a line").expect("read");
    let (first, second) = (next(), next());
    let udp: SocketAddr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{first:?}"))
        .parse()
        .expect("UDP address");
    let quic: SocketAddr = second
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("{second:?}"))
        .parse()
        .expect("QUIC address");
    let job = |transport: &[String], addr: SocketAddr, job: &str| {
        let mut args = transport.to_vec();
        args.extend(["--aggregator".into(), addr.to_string()]);
        args.extend(["--job", job, "--elements", "200000", "--iters", "5"].map(String::from));
        args
    };
    let (u, q) = (job(&[], udp, "41"), job(&quic_flags(&cert), quic, "42"));
    std::thread::scope(|s| {
        let a = s.spawn(|| run_job(&u, 2));
        let b = s.spawn(|| run_job(&q, 2));
        a.join().expect("UDP job");
        b.join().expect("QUIC job");
    });
    agg.signal(libc::SIGTERM);
    let st = agg.wait_for(Duration::from_secs(10)).expect("stops");
    assert!(st.success());
    let err = agg.stderr();
    assert!(
        err.contains("aggregator stopped (UDP)") && err.contains("aggregator stopped (QUIC)"),
        "{err}"
    );
}

#[test]
fn server_name_must_match_the_certificate() {
    let dir = TempDir::new("limits-server-name");
    let agg = quic_aggregator(&dir.0, &[]);
    let base = |name: &str, job: &str| {
        let mut args = quic_flags(&agg.cert);
        args.extend(["--server-name".into(), name.into()]);
        args.extend(["--aggregator".into(), agg.addr.to_string()]);
        args.extend(["--job", job, "--elements", "1000", "--iters", "1"].map(String::from));
        args
    };
    // The generated certificate names localhost; any of its names is accepted.
    run_job(&base("localhost", "51"), 1);
    let mut cmd = inagg();
    cmd.arg("worker")
        .args(base("aggregator.example", "52"))
        .args(["--rank", "0", "--world", "1"]);
    let (st, out, err) = common::run_bounded(cmd, Duration::from_secs(60));
    assert!(
        !st.success(),
        "a certificate for another name was taken: {out}"
    );
    assert!(
        err.contains("aggregator.example") || err.to_lowercase().contains("name"),
        "it said: {err}"
    );
}

/// Two long-running ranks of `job` at `addr` with `extra` flags, and a wait until
/// they are mid-run (their job has completed chunks, by the metrics at `metrics`).
fn running_pair(addr: SocketAddr, job: u32, extra: &[String]) -> Vec<Proc> {
    (0..2)
        .map(|r| {
            let mut cmd = inagg();
            cmd.args(["worker", "--aggregator", &addr.to_string()])
                .args(["--job", &job.to_string(), "--rank", &r.to_string()])
                .args([
                    "--world",
                    "2",
                    "--elements",
                    "100000",
                    "--iters",
                    "1000000000",
                ])
                .args(["--duration-s", "120", "--no-check"])
                .args(extra);
            Proc::spawn_collected(cmd)
        })
        .collect()
}

/// SIGTERMs `agg` once `metrics` shows chunks completed in `series`, and expects it
/// to stop cleanly and every rank of `ws` to fail saying that it shut down.
fn sigterm_mid_run(
    mut agg: Proc,
    (metrics, series): (&str, &str),
    stderr: std::thread::JoinHandle<String>,
    mut ws: Vec<Proc>,
    what: &str,
) -> String {
    let end = Instant::now() + Duration::from_secs(60);
    while value(&scrape(metrics), series).unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < end, "{what}: no chunk completed in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    agg.signal(libc::SIGTERM);
    let st = agg
        .wait_for(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{what}: the aggregator ignores SIGTERM"));
    let err = stderr.join().expect("stderr reader");
    assert!(st.success(), "{what}: {st}\n{err}");
    for (r, w) in ws.iter_mut().enumerate() {
        let said = expect_failure(w, Duration::from_secs(30), &format!("{what}: rank {r}"));
        // Over UDP the aggregator's Shutdown error; over QUIC that, or the
        // connection's close, whose reason says the same.
        assert!(
            said.contains("shutting down") || said.contains("aggregator stopping"),
            "{what}: rank {r} said: {said}"
        );
    }
    err
}

#[test]
fn sigterm_stops_a_quic_aggregator_and_tells_its_ranks() {
    let dir = TempDir::new("limits-quic-term");
    let mut agg = quic_aggregator(&dir.0, &["--metrics", "127.0.0.1:0"]);
    let (metrics, stderr) = watch_stderr(&mut agg.proc);
    let ws = running_pair(agg.addr, 61, &quic_flags(&agg.cert));
    let series = (metrics.as_str(), "inagg_chunks_completed_total");
    let err = sigterm_mid_run(agg.proc, series, stderr, ws, "QUIC");
    assert!(err.contains("aggregator stopped"), "{err}");
}

#[test]
fn sigterm_stops_every_shard_and_tells_the_ranks() {
    let (mut agg, addr) = aggregator(&["--threads", "2", "--metrics", "127.0.0.1:0"]);
    let (metrics, stderr) = watch_stderr(&mut agg);
    let ws = running_pair(addr, 62, &[]);
    // The shards' metrics carry a shard label; the job stripes over both.
    let series = (
        metrics.as_str(),
        "inagg_chunks_completed_total{shard=\"1\"}",
    );
    let err = sigterm_mid_run(agg, series, stderr, ws, "two shards");
    for k in 0..2 {
        assert!(
            err.contains(&format!("aggregator stopped (UDP shard {k})")),
            "{err}"
        );
    }
}

#[test]
fn sigterm_stops_the_relay() {
    let (_agg, upstream) = aggregator(&[]);
    let (mut relay, addr) = common::relay(upstream, &["--loss", "0.01"]);
    // Traffic through it first.
    let reports = run_job(
        &[
            "--aggregator",
            &addr.to_string(),
            "--job",
            "71",
            "--iters",
            "3",
        ]
        .map(String::from),
        2,
    );
    assert_eq!(reports.len(), 2);
    relay.signal(libc::SIGTERM);
    let st = relay
        .wait_for(Duration::from_secs(10))
        .expect("the relay stops on SIGTERM");
    assert!(st.success(), "{st}: {}", relay.stderr());
}

#[test]
fn simulate_checks_its_sums_for_every_codec() {
    for codec in ["f32", "f16", "bf16", "i32", "i16", "i8"] {
        let mut cmd = inagg();
        cmd.args(["simulate", "--codec", codec, "--workers", "3"])
            .args(["--elements", "20000", "--loss", "0.1", "--seed", "5"]);
        let (st, out, err) = common::run_bounded(cmd, Duration::from_secs(60));
        assert!(st.success(), "{codec}: {out}{err}");
        assert!(out.contains("ranks identical: true"), "{codec}: {out}");
        assert!(out.contains("lost "), "{codec}: {out}");
    }
}
