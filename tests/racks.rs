//! Two levels of aggregators as processes on loopback (docs/protocol.md 8.5): an
//! aggregator at the spine, two rack aggregators under it (`inagg aggregator
//! --parent`), two ranks on each. A dead spine or a dead rack aggregator ends the job
//! at every rank with an error that says why; nothing hangs.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{aggregator, expect_every_failure, expect_failure, worker, Proc};

/// Timeouts short enough for a test, the same at every level.
const SILENCE_MS: &str = "1000";

/// The spine, its two racks, and four ranks allreducing i32 tensors until stopped.
fn two_levels() -> (Proc, Vec<Proc>, Vec<Proc>) {
    let (spine, spine_addr) = aggregator(&["--silence-timeout-ms", SILENCE_MS]);
    let (racks, addrs): (Vec<Proc>, Vec<SocketAddr>) = (0..2)
        .map(|k: u16| {
            aggregator(&[
                "--parent",
                &spine_addr.to_string(),
                "--rack",
                &k.to_string(),
                "--racks",
                "2",
                "--silence-timeout-ms",
                SILENCE_MS,
            ])
        })
        .unzip();
    let ranks = (0..4u16)
        .map(|r| {
            worker(
                addrs[usize::from(r / 2)],
                1,
                r,
                4,
                &[
                    "--codec",
                    "i32",
                    "--elements",
                    "100000",
                    "--iters",
                    "1000000",
                    "--aggregator-timeout-ms",
                    "2000",
                ],
            )
        })
        .collect();
    (spine, racks, ranks)
}

/// Lets the ranks run a while, so that the job runs at both levels.
fn running(ranks: &mut [Proc]) {
    std::thread::sleep(Duration::from_millis(1500));
    for (r, w) in ranks.iter_mut().enumerate() {
        assert!(w.running(), "rank {r} stopped early: {}", w.stderr());
    }
}

#[test]
fn a_dead_spine_aggregator_ends_the_job_at_every_rank() {
    let (spine, _racks, mut ranks) = two_levels();
    running(&mut ranks);
    spine.signal(libc::SIGKILL);
    expect_every_failure(
        &mut ranks,
        Duration::from_secs(30),
        &["ParentLost", "parent aggregator"],
    );
}

#[test]
fn a_dead_rack_aggregator_ends_the_job_at_every_rank() {
    let (_spine, racks, mut ranks) = two_levels();
    running(&mut ranks);
    racks[1].signal(libc::SIGKILL);
    for (r, w) in ranks.iter_mut().enumerate() {
        let err = expect_failure(w, Duration::from_secs(30), &format!("rank {r}"));
        // Rack 1's ranks lose their aggregator (on loopback the kernel says at once
        // that nothing listens there); rack 0's hear from the spine that rack 1 went
        // silent.
        let ok = if r >= 2 {
            err.contains("no aggregator listens there") || err.contains("silent")
        } else {
            err.contains("rack 1 of job 1") && err.contains("parent aggregator")
        };
        assert!(ok, "rank {r} said: {err}");
    }
}
