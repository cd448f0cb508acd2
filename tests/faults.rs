//! Faults on real sockets and real processes: loss, duplication and reordering from
//! `inagg relay`; an aggregator killed and restarted; a worker stopped (SIGSTOP) past
//! the silence timeout while another job shares the aggregator.

mod common;

use std::time::Duration;

use common::{
    aggregator, aggregator_on, assert_new_job_runs, bench_json, expect_every_failure,
    expect_failure, inagg, metrics_address, run_bounded, wait_for_chunks, worker,
};
use serde_json::Value;

fn bench(extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "--workers",
        "4",
        "--elements",
        "300000",
        "--codec",
        "i32,f32",
    ];
    // No untimed allreduce: each rank of an i32 job compares every result with its
    // first, bit for bit, and the last with the exact sum.
    args.extend(["--iters", "2", "--warmup", "0", "--json"]);
    args.extend_from_slice(extra);
    bench_json(&args)
}

#[test]
fn lossy_duplicating_reordering_paths_give_the_lossless_bits() {
    // Retransmissions happen on a clean path too when a busy machine delays a rank
    // past its timeout: the lossless run is judged by its results, like the others.
    let clean = bench(&[]);
    for r in &clean {
        assert_eq!(r["within_bound"], true, "clean: {r}");
        assert_eq!(r["ranks_identical"], true, "clean: {r}");
    }
    for faults in [
        &["--loss", "0.01"][..],
        &["--loss", "0.05", "--dup", "0.02", "--reorder", "0.05"][..],
    ] {
        let rows = bench(faults);
        assert_eq!(rows.len(), 2);
        let (i32_row, f32_row) = (&rows[0], &rows[1]);
        assert_eq!(i32_row["codec"], "i32");
        assert_eq!(
            i32_row["result_checksum"], clean[0]["result_checksum"],
            "{faults:?}: i32 must give the lossless run's bits"
        );
        assert!(
            i32_row["retransmissions"].as_u64().expect("retx") > 0,
            "the relay lost nothing? {i32_row}"
        );
        for r in &rows {
            assert_eq!(r["within_bound"], true, "{faults:?}: {r}");
            assert_eq!(r["ranks_identical"], true, "{faults:?}: {r}");
        }
        assert!(
            f32_row["max_abs_err"].as_f64().expect("err") < 1e-3,
            "{f32_row}"
        );
    }
}

#[test]
fn relay_rejects_bad_flags() {
    for (args, want) in [
        (&["--loss", "1.5"][..], "--loss must be a probability"),
        (&["--dup=-1"][..], "--dup must be a probability"),
        (&["--delay-ms", "99999"][..], "--delay-ms must be between"),
        (&["--rate-mbit", "0"][..], "--rate-mbit must be"),
    ] {
        let mut cmd = inagg();
        cmd.args([
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(args);
        let (st, _, err) = run_bounded(cmd, Duration::from_secs(30));
        assert!(!st.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_killed_aggregator_fails_its_workers_and_a_restarted_one_serves_new_jobs() {
    let (mut agg, addr) = aggregator(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut agg);
    let long = [
        "--elements",
        "100000",
        "--iters",
        "100000",
        "--no-check",
        "--aggregator-timeout-ms",
        "2000",
    ];
    let mut ws: Vec<_> = (0..3).map(|r| worker(addr, 1, r, 3, &long)).collect();
    wait_for_chunks(&metrics, 1, 100.0, Duration::from_secs(60));
    assert!(ws.iter_mut().all(|w| w.running()), "workers mid-run");
    agg.signal(libc::SIGKILL);
    // Each wait is a hang guard; what is asserted is how the ranks fail.
    expect_every_failure(
        &mut ws,
        Duration::from_secs(60),
        &["nothing heard from the aggregator", "connection refused"],
    );
    // A new aggregator on the same address (it says so once bound) serves a new job
    // (and the old job's id).
    let (mut again, again_addr) = aggregator_on(&addr.to_string(), &[]);
    assert_eq!(again_addr, addr);
    assert_new_job_runs(addr, 1, &["--codec", "i32"]);
    assert!(
        again.running(),
        "restarted aggregator stopped: {}",
        again.stderr()
    );
}

#[test]
fn a_stalled_worker_aborts_its_job_only() {
    let (mut agg, addr) = aggregator(&["--silence-timeout-ms", "2000", "--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut agg);
    let long = ["--elements", "100000", "--iters", "100000", "--no-check"];
    let mut stalled_job: Vec<_> = (0..3).map(|r| worker(addr, 10, r, 3, &long)).collect();
    // The other job checks every result: no untimed allreduce, each compared with the
    // first bit for bit (i32), the last with the exact sum.
    let other = [
        "--elements",
        "100000",
        "--iters",
        "150",
        "--warmup",
        "0",
        "--codec",
        "i32",
        "--json",
    ];
    let mut other_job: Vec<_> = (0..2).map(|r| worker(addr, 11, r, 2, &other)).collect();
    wait_for_chunks(&metrics, 10, 100.0, Duration::from_secs(60));
    assert!(
        stalled_job.iter_mut().all(|w| w.running()),
        "job 10 mid-run"
    );
    stalled_job[1].signal(libc::SIGSTOP);
    // Each wait is a hang guard; what is asserted is how the ranks fail.
    for r in [0, 2] {
        let what = format!("rank {r} behind a stopped rank");
        let err = expect_failure(&mut stalled_job[r], Duration::from_secs(60), &what);
        assert!(
            err.contains("rank 1") && err.contains("sent nothing"),
            "rank {r}: {err}"
        );
    }
    // The stopped rank, resumed, learns its job is gone instead of hanging.
    stalled_job[1].signal(libc::SIGCONT);
    expect_failure(
        &mut stalled_job[1],
        Duration::from_secs(60),
        "the resumed rank",
    );
    // The other job was not touched.
    for w in &mut other_job {
        let st = w
            .wait_for(Duration::from_secs(60))
            .expect("job 11 finishes");
        assert!(st.success(), "job 11: {}", w.stderr());
        let r: Value = serde_json::from_str(w.stdout().trim()).expect("json report");
        assert_eq!(r["allreduces"], 150, "job 11: {r}");
        assert_eq!(r["mismatches"], 0, "job 11: {r}");
        assert_eq!(r["check"]["within_bound"], true, "job 11: {r}");
    }
    assert!(agg.running());
    assert_new_job_runs(addr, 10, &[]);
}

#[test]
fn ranks_with_a_duration_agree_on_when_to_stop() {
    let (_agg, addr) = aggregator(&[]);
    let args = [
        "--elements",
        "20000",
        "--codec",
        "i32",
        "--iters",
        "1000000",
        "--duration-s",
        "1.5",
        "--json",
    ];
    let mut ws = vec![worker(addr, 4, 0, 2, &args)];
    // The second rank starts late: its clock runs out later than the first's.
    std::thread::sleep(Duration::from_millis(400));
    ws.push(worker(addr, 4, 1, 2, &args));
    let mut counts = Vec::new();
    for w in &mut ws {
        let st = w.wait_for(Duration::from_secs(30)).expect("worker stops");
        assert!(st.success(), "{}", w.stderr());
        let report: Value = serde_json::from_str(w.stdout().trim()).expect("json");
        assert_eq!(report["mismatches"], 0, "{report}");
        assert_eq!(report["check"]["within_bound"], true, "{report}");
        counts.push(report["allreduces"].as_u64().expect("allreduces"));
    }
    assert_eq!(counts[0], counts[1]);
    assert!(counts[0] > 1);
}

#[test]
fn workers_killed_at_random_points_abort_their_jobs_and_nothing_hangs() {
    let (mut agg, addr) = aggregator(&["--silence-timeout-ms", "1500"]);
    // Seeded "random" points: right after joining, early, and deep into the run; a
    // different rank each time.
    let mut state = 0x9e37_79b9_u64;
    for (round, job) in (40u32..43).enumerate() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(100 + (state >> 33) % 1500);
        let victim = round % 3;
        // A kill before every rank joined ends the others' wait for a grant.
        let long = [
            "--elements",
            "150000",
            "--iters",
            "100000",
            "--no-check",
            "--join-timeout-ms",
            "5000",
        ];
        let mut ws: Vec<_> = (0..3).map(|r| worker(addr, job, r, 3, &long)).collect();
        std::thread::sleep(delay);
        ws[victim].signal(libc::SIGKILL);
        // The others fail, none hangs (the wait is a hang guard): aborted by the
        // aggregator, which names the dead rank, or, where it died before every rank
        // joined, giving up their join.
        for (r, w) in ws.iter_mut().enumerate().filter(|(r, _)| *r != victim) {
            let what = format!("round {round}: rank {r} after rank {victim} died at {delay:?}");
            let err = expect_failure(w, Duration::from_secs(60), &what);
            assert!(
                err.contains(&format!("rank {victim}")) || err.contains("no grant within"),
                "{what}: {err}"
            );
        }
        assert!(agg.running(), "round {round}: the aggregator died");
    }
    assert_new_job_runs(addr, 50, &["--codec", "i32"]);
}

/// `--check-every`: every allreduce's result, warm-up included, is checked against the
/// exact sum, for float codecs too (whose results may differ in their last bits from
/// call to call, so that comparing with the first proves nothing), through a relay
/// that loses, duplicates and reorders.
#[test]
fn every_result_of_a_lossy_float_job_is_checked() {
    let (_agg, upstream) = common::aggregator(&[]);
    let faults = [
        "--loss",
        "0.02",
        "--dup",
        "0.01",
        "--reorder",
        "0.01",
        "--seed",
        "9",
    ];
    let (_relay, addr) = common::relay(upstream, &faults);
    for (job, codec) in (80u32..).zip(["f16", "bf16", "f32"]) {
        let mut ws: Vec<_> = (0..3)
            .map(|r| {
                common::worker(
                    addr,
                    job,
                    r,
                    3,
                    &[
                        "--codec",
                        codec,
                        "--elements",
                        "50000",
                        "--warmup",
                        "2",
                        "--iters",
                        "5",
                        "--check-every",
                        "--json",
                    ],
                )
            })
            .collect();
        for w in &mut ws {
            let st = w.wait_for(Duration::from_secs(120)).expect("worker ends");
            let out = w.stdout();
            assert!(st.success(), "{codec}: {out}\n{}", w.stderr());
            let r = &common::json_lines(&out)[0];
            assert_eq!(r["checked"], 7, "{codec}: {r}");
            assert_eq!(r["check"]["within_bound"], true, "{codec}: {r}");
            assert_eq!(r["check"]["violations"], 0, "{codec}: {r}");
        }
    }
}
