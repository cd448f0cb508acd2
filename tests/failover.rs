//! Issue 25, finding 9: a job outlives its aggregator. Four `inagg worker` ranks with
//! `--failover B` run on aggregator A; A is killed (SIGKILL at seeded random points,
//! joining included, and once SIGTERM); every run finishes on B with the bits of a
//! run without a crash.

mod common;

use std::time::{Duration, Instant};

use common::*;

const WORLD: u16 = 4;

/// i32, no untimed allreduce: each rank compares every result with the first, bit for
/// bit (its `mismatches`), and the last with the exact sum, across the failover.
fn args(job: u32) -> Vec<String> {
    [
        "--codec",
        "i32",
        "--elements",
        "300000",
        "--iters",
        "150",
        "--warmup",
        "0",
        "--json",
        "--seed",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--job".to_string(), job.to_string()])
    .collect()
}

/// Starts the ranks of `job` on `agg`, failing over to `failover` if given.
fn ranks(agg: std::net::SocketAddr, job: u32, failover: Option<std::net::SocketAddr>) -> Vec<Proc> {
    (0..WORLD)
        .map(|r| {
            let mut cmd = inagg();
            cmd.args(["worker", "--aggregator", &agg.to_string()])
                .args(["--rank", &r.to_string(), "--world", &WORLD.to_string()])
                .args(args(job));
            if let Some(b) = failover {
                cmd.args(["--failover", &b.to_string()]);
            }
            Proc::spawn_collected(cmd)
        })
        .collect()
}

/// Waits for every rank; returns their JSON reports.
fn finish(ws: &mut [Proc], what: &str) -> Vec<serde_json::Value> {
    ws.iter_mut()
        .enumerate()
        .map(|(r, w)| {
            let st = w
                .wait_for(Duration::from_secs(90))
                .unwrap_or_else(|| panic!("{what}: rank {r} still running"));
            let (out, err) = (w.stdout(), w.stderr());
            assert!(st.success(), "{what}: rank {r} failed: {err}");
            let report = json_lines(&out).pop().expect("a report");
            assert_eq!(report["mismatches"], 0, "{what}: rank {r}: {report}");
            assert_eq!(
                report["check"]["within_bound"], true,
                "{what}: rank {r}: {report}"
            );
            report
        })
        .collect()
}

/// A seeded stream of numbers in [0, 1) (xorshift64*).
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn ranks_move_to_the_failover_aggregator_and_get_the_same_bits() {
    // The bits of a run without a crash, and how long it takes.
    let (_b, b) = aggregator(&[]);
    let started = Instant::now();
    let mut ws = ranks(b, 40, None);
    let want = finish(&mut ws, "crash-free run");
    let took = started.elapsed();
    let sum = want[0]["result_checksum"]
        .as_str()
        .expect("checksum")
        .to_string();
    assert!(want.iter().all(|r| r["result_checksum"] == sum.as_str()));
    let mut rng = Seeded(25);
    // While joining, then at seeded points of the run; the last one a clean shutdown.
    let mut cases = vec![(libc::SIGKILL, Duration::ZERO)];
    for sig in [libc::SIGKILL, libc::SIGKILL, libc::SIGTERM] {
        // Early enough in the run that it is always mid-run on a slower machine or a
        // quicker second start.
        cases.push((sig, took.mul_f64(0.05 + 0.3 * rng.next())));
    }
    for (i, &(sig, at)) in cases.iter().enumerate() {
        let what = format!("case {i}: signal {sig} after {at:?}");
        let (a_proc, a) = aggregator(&[]);
        let (mut b_proc, b) = aggregator(&[]);
        let job = 41 + i as u32;
        let mut ws = ranks(a, job, Some(b));
        std::thread::sleep(at);
        a_proc.signal(sig);
        let got = finish(&mut ws, &what);
        for (r, report) in got.iter().enumerate() {
            assert_eq!(
                report["result_checksum"].as_str(),
                Some(sum.as_str()),
                "{what}: rank {r}: {report}"
            );
            assert_eq!(report["allreduces"], 150, "{what}: rank {r}");
            let moved = report["failovers"].as_array().expect("failovers");
            assert_eq!(moved.len(), 1, "{what}: rank {r}: {report}");
            assert_eq!(moved[0]["to"], b.to_string().as_str(), "{what}");
        }
        assert!(b_proc.running(), "{what}: B stopped: {}", b_proc.stderr());
        drop(a_proc);
    }
}

/// Without `--failover`, a lost aggregator fails the ranks, as before.
#[test]
fn without_failover_a_lost_aggregator_fails_the_ranks() {
    let (mut a_proc, a) = aggregator(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut a_proc);
    let long = ["--elements", "300000", "--iters", "100000", "--no-check"];
    let mut ws: Vec<_> = (0..WORLD).map(|r| worker(a, 50, r, WORLD, &long)).collect();
    wait_for_chunks(&metrics, 50, 100.0, Duration::from_secs(60));
    assert!(ws.iter_mut().all(|w| w.running()), "ranks mid-run");
    a_proc.signal(libc::SIGKILL);
    expect_every_failure(
        &mut ws,
        Duration::from_secs(60),
        &["connection refused", "nothing heard"],
    );
}
