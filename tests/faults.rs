//! Faults on real sockets and real processes: loss, duplication and reordering from
//! `inagg relay`; an aggregator killed and restarted; a worker stopped (SIGSTOP) past
//! the silence timeout while another job shares the aggregator.

mod common;

use std::time::{Duration, Instant};

use common::{
    aggregator, assert_new_job_runs, bench_json, expect_failure, inagg, run_bounded, worker,
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
    args.extend(["--iters", "2", "--warmup", "1", "--json"]);
    args.extend_from_slice(extra);
    bench_json(&args)
}

#[test]
fn lossy_duplicating_reordering_paths_give_the_lossless_bits() {
    let clean = bench(&[]);
    assert_eq!(clean[0]["retransmissions"], 0, "{}", clean[0]);
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
    let (agg, addr) = aggregator(&[]);
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
    std::thread::sleep(Duration::from_millis(1000));
    assert!(ws.iter_mut().all(|w| w.running()), "workers mid-run");
    agg.signal(libc::SIGKILL);
    let killed = Instant::now();
    for (r, w) in ws.iter_mut().enumerate() {
        let err = expect_failure(w, Duration::from_secs(15), &format!("rank {r}"));
        assert!(
            err.contains("nothing heard from the aggregator") || err.contains("connection refused"),
            "rank {r}: {err}"
        );
    }
    assert!(killed.elapsed() < Duration::from_secs(15));
    // A new aggregator on the same address serves a new job (and the old job's id).
    let mut cmd = inagg();
    cmd.args(["aggregator", "--listen", &addr.to_string()]);
    let mut again = common::Proc::spawn(cmd);
    std::thread::sleep(Duration::from_millis(300));
    assert!(again.running(), "restart failed: {}", again.stderr());
    assert_new_job_runs(addr, 1, &["--codec", "i32"]);
}

#[test]
fn a_stalled_worker_aborts_its_job_only() {
    let (mut agg, addr) = aggregator(&["--silence-timeout-ms", "2000"]);
    let long = ["--elements", "100000", "--iters", "100000", "--no-check"];
    let mut stalled_job: Vec<_> = (0..3).map(|r| worker(addr, 10, r, 3, &long)).collect();
    let other = ["--elements", "100000", "--iters", "150", "--codec", "i32"];
    let mut other_job: Vec<_> = (0..2).map(|r| worker(addr, 11, r, 2, &other)).collect();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        stalled_job.iter_mut().all(|w| w.running()),
        "job 10 mid-run"
    );
    stalled_job[1].signal(libc::SIGSTOP);
    let stopped = Instant::now();
    for r in [0, 2] {
        let what = format!("rank {r} behind a stopped rank");
        let err = expect_failure(&mut stalled_job[r], Duration::from_secs(15), &what);
        assert!(
            err.contains("rank 1") && err.contains("sent nothing"),
            "rank {r}: {err}"
        );
    }
    assert!(stopped.elapsed() < Duration::from_secs(15));
    // The stopped rank, resumed, learns its job is gone instead of hanging.
    stalled_job[1].signal(libc::SIGCONT);
    expect_failure(
        &mut stalled_job[1],
        Duration::from_secs(20),
        "the resumed rank",
    );
    // The other job was not touched.
    for w in &mut other_job {
        let st = w
            .wait_for(Duration::from_secs(60))
            .expect("job 11 finishes");
        assert!(st.success(), "job 11: {}", w.stderr());
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
        let killed = Instant::now();
        for (r, w) in ws.iter_mut().enumerate().filter(|(r, _)| *r != victim) {
            let what = format!("round {round}: rank {r} after rank {victim} died at {delay:?}");
            expect_failure(w, Duration::from_secs(20), &what);
        }
        assert!(killed.elapsed() < Duration::from_secs(20));
        assert!(agg.running(), "round {round}: the aggregator died");
    }
    assert_new_job_runs(addr, 50, &["--codec", "i32"]);
}
