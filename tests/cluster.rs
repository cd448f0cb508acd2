//! A shared aggregator and a job spread over several: concurrent jobs stay correct,
//! a rogue sender with guessed tokens changes nothing, and striping over two
//! aggregators gives the bits of one.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{aggregator, inagg, run_bounded, worker};
use serde_json::Value;

fn bench(extra: &[&str]) -> Vec<Value> {
    let mut cmd = inagg();
    cmd.args(["bench", "--workers", "3", "--elements", "200000"])
        .args([
            "--codec", "i32,f32", "--iters", "2", "--warmup", "1", "--json",
        ])
        .args(extra);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(240));
    assert!(st.success(), "bench {extra:?} failed: {out}\n{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn concurrent_jobs_and_striped_jobs_are_correct() {
    let one = bench(&[]);
    let three = bench(&["--jobs", "3"]);
    let striped = bench(&["--aggregators", "2"]);
    for rows in [&one, &three, &striped] {
        for r in rows.iter() {
            assert_eq!(r["within_bound"], true, "{r}");
            assert_eq!(r["ranks_identical"], true, "{r}");
        }
    }
    let per_job = three[0]["per_job_ate_per_s"].as_array().expect("per job");
    assert_eq!(per_job.len(), 3);
    assert!(per_job.iter().all(|x| x.as_f64().is_some_and(|v| v > 0.0)));
    let jain = three[0]["jain"].as_f64().expect("jain");
    assert!((1.0 / 3.0..=1.0 + 1e-9).contains(&jain), "{jain}");
    // Fixed point: the same bits from one job, three jobs, and two aggregators.
    assert_eq!(three[0]["result_checksum"], one[0]["result_checksum"]);
    assert_eq!(striped[0]["result_checksum"], one[0]["result_checksum"]);
    assert_eq!(striped[0]["aggregators"], 2);
}

fn report(w: &mut common::Proc) -> Value {
    let st = w
        .wait_for(Duration::from_secs(60))
        .expect("worker finishes");
    assert!(st.success(), "{}", w.stderr());
    serde_json::from_str(w.stdout().trim()).expect("json report")
}

#[test]
fn a_rogue_sender_with_guessed_tokens_changes_nothing() {
    let (_agg, addr) = aggregator(&[]);
    let args = [
        "--elements",
        "100000",
        "--codec",
        "i32",
        "--iters",
        "40",
        "--json",
    ];
    let mut clean: Vec<_> = (0..2).map(|r| worker(addr, 20, r, 2, &args)).collect();
    let want = report(&mut clean[0])["check"]["checksum"].clone();
    assert!(want.is_u64(), "no checksum: {want}");
    report(&mut clean[1]);
    let mut ws: Vec<_> = (0..2).map(|r| worker(addr, 21, r, 2, &args)).collect();
    let rogue = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let end = Instant::now() + Duration::from_secs(60);
    let mut sent = 0u64;
    while ws.iter_mut().any(|w| w.running()) && Instant::now() < end {
        // Contributions for job 21 (and its neighbours) with guessed tokens, every rank,
        // the first slots, large values.
        let mut d = Vec::new();
        d.extend_from_slice(b"IA\x01\x03");
        d.extend_from_slice(&(20 + (sent % 3) as u32).to_le_bytes());
        d.extend_from_slice(&((sent % 2) as u16).to_le_bytes());
        d.extend_from_slice(&[2, 0]); // i32, no flags
        d.extend_from_slice(&sent.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        d.extend_from_slice(&(sent % 64).to_le_bytes()); // seq
        d.extend_from_slice(&((sent % 64) as u32 % 128).to_le_bytes()); // slot
        d.extend_from_slice(&[0, 0, 0x80, 0]); // version, scale, next, reserved
        d.extend_from_slice(&4u16.to_le_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&[0x7f; 16]);
        let _ = rogue.send_to(&d, addr);
        sent += 1;
        if sent % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(sent > 100, "the rogue sent only {sent}");
    for w in &mut ws {
        let r = report(w);
        assert_eq!(r["check"]["checksum"], want, "{r}");
        assert_eq!(r["mismatches"], 0, "{r}");
    }
}
