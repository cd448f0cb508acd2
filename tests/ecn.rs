//! ECN on the real path: contributions that a relay marks CE (congestion
//! experienced) at the IP layer count as congestion marks, which the aggregator's
//! results carry to the rank; `--no-ecn` ignores them.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{aggregator, bench_row, inagg, json_lines, relay, run_bounded, worker};

/// A relay on loopback between one rank and `upstream` that marks CE (the ECN bits
/// of its socket's TOS) what it forwards one way, as a congested switch on the path
/// would: the rank's datagrams (`Toward::Aggregator`) or the answers
/// (`Toward::Rank`); stops when dropped, or after a minute.
struct CeRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Clone, Copy)]
enum Toward {
    Aggregator,
    Rank,
}

impl CeRelay {
    fn new(upstream: SocketAddr, marked: Toward) -> CeRelay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind");
        back.connect(upstream).expect("connect");
        let marking = match marked {
            Toward::Aggregator => &back,
            Toward::Rank => &front,
        };
        socket2::SockRef::from(marking)
            .set_tos(0b11)
            .expect("TOS with CE");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
        }
        let addr = front.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let rank: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let end = Instant::now() + Duration::from_secs(60);
        let (front, back) = (Arc::new(front), Arc::new(back));
        let up = {
            let (front, back, stop, rank) =
                (front.clone(), back.clone(), stop.clone(), rank.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        *rank.lock().expect("lock") = Some(from);
                        let _ = back.send(&buf[..n]);
                    }
                }
            })
        };
        let down = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    if let Ok(n) = back.recv(&mut buf) {
                        if let Some(to) = *rank.lock().expect("lock") {
                            let _ = front.send_to(&buf[..n], to);
                        }
                    }
                }
            })
        };
        CeRelay {
            addr,
            stop,
            threads: vec![up, down],
        }
    }
}

impl Drop for CeRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One rank's `inagg worker --json` report (with `worker_flags`), through a relay
/// marking CE `marked`, to an aggregator started with `agg_flags`.
fn run_through_ce(
    job: u32,
    marked: Toward,
    agg_flags: &[&str],
    worker_flags: &[&str],
) -> serde_json::Value {
    let (_agg, addr) = aggregator(agg_flags);
    let relay = CeRelay::new(addr, marked);
    let mut cmd = inagg();
    cmd.args(["worker", "--aggregator", &relay.addr.to_string()])
        .args(["--job", &job.to_string(), "--rank", "0", "--world", "1"])
        .args([
            "--elements",
            "200000",
            "--chunk-elements",
            "2048",
            "--window",
            "8",
        ])
        // Every datagram through the relay, results too.
        .arg("--no-multicast")
        .args(worker_flags)
        .args(["--iters", "3", "--json"]);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(60));
    assert!(st.success(), "{out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{out}");
    rows[0].clone()
}

#[test]
fn contributions_marked_ce_on_the_path_come_back_as_congestion_marks() {
    let r = run_through_ce(1, Toward::Aggregator, &[], &[]);
    assert_eq!(r["check"]["within_bound"], true, "{r}");
    let marks = r["marks"].as_u64().expect("marks");
    assert!(marks > 0, "no result carried a mark: {r}");
    // The window reacted: it fell below the grant the unmarked run keeps.
    let unmarked = run_through_ce(2, Toward::Aggregator, &["--no-ecn"], &[]);
    assert_eq!(unmarked["marks"], 0, "{unmarked}");
    let (w, w0) = (
        r["congestion_window_min"].as_u64().expect("window"),
        unmarked["congestion_window_min"].as_u64().expect("window"),
    );
    assert!(w < w0, "window {w} with marks, {w0} without: {r}");
}

#[test]
fn results_marked_ce_on_the_path_count_as_marks_unless_the_rank_says_no_ecn() {
    let r = run_through_ce(3, Toward::Rank, &[], &[]);
    assert_eq!(r["check"]["within_bound"], true, "{r}");
    assert!(r["marks"].as_u64().expect("marks") > 0, "{r}");
    let off = run_through_ce(4, Toward::Rank, &[], &["--no-ecn"]);
    assert_eq!(off["marks"], 0, "{off}");
    assert!(
        r["congestion_window_min"].as_u64() < off["congestion_window_min"].as_u64(),
        "{r}\n{off}"
    );
}

/// Two ranks' reports through `inagg relay --rate-mbit 50 --mark-above 30000` to an
/// aggregator, both sides with `flags` (`--no-ecn` or none), and the relay's exit
/// line.
fn through_a_marking_relay(job: u32, ecn: &[&str]) -> (Vec<serde_json::Value>, String) {
    let (_agg, addr) = aggregator(ecn);
    let (mut relay, at) = relay(addr, &["--rate-mbit", "50", "--mark-above", "30000"]);
    let flags = [
        "--elements",
        "300000",
        "--iters",
        "2",
        "--chunk-elements",
        "2048",
        "--json",
    ];
    let flags: Vec<&str> = flags.iter().chain(ecn).copied().collect();
    let mut ranks: Vec<_> = (0..2).map(|r| worker(at, job, r, 2, &flags)).collect();
    let mut reports = Vec::new();
    for w in &mut ranks {
        let st = w
            .wait_for(Duration::from_secs(60))
            .expect("the rank finishes");
        let out = w.stdout();
        assert!(st.success(), "{out}\n{}", w.stderr());
        reports.extend(json_lines(&out));
    }
    relay.signal(libc::SIGTERM);
    relay
        .wait_for(Duration::from_secs(10))
        .expect("the relay stops");
    (reports, relay.stderr())
}

#[test]
fn inagg_relay_marks_ce_above_its_queue_threshold_and_the_ranks_slow_down() {
    let (reports, said) = through_a_marking_relay(5, &[]);
    assert!(
        !said.contains(" 0 marked CE"),
        "the relay marked nothing: {said}"
    );
    for r in &reports {
        assert_eq!(r["check"]["within_bound"], true, "{r}");
        assert!(r["marks"].as_u64().expect("marks") > 0, "{r}\n{said}");
    }
    // The same marks, ignored on both sides: the windows stay wider.
    let (ignored, said) = through_a_marking_relay(6, &["--no-ecn"]);
    assert!(!said.contains(" 0 marked CE"), "{said}");
    for r in &ignored {
        assert_eq!(r["marks"], 0, "{r}");
    }
    let narrowest = |rs: &[serde_json::Value]| {
        rs.iter()
            .map(|r| r["congestion_window_min"].as_u64().expect("window"))
            .min()
    };
    assert!(
        narrowest(&reports) < narrowest(&ignored),
        "{reports:?}\n{ignored:?}"
    );
}

/// `inagg bench --codec i32` of two ranks behind its relay as a 50 Mbit/s link that
/// marks CE above 30000 queued bytes, with `extra` flags: the row.
fn bench_behind_a_marking_link(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--workers", "2", "--elements", "300000"];
    args.extend(["--codec", "i32", "--iters", "2", "--chunk-elements", "2048"]);
    args.extend(["--rate-mbit", "50", "--mark-above", "30000", "--json"]);
    args.extend(extra);
    bench_row(&args)
}

#[test]
fn the_bench_row_counts_the_marks_of_a_marking_link_and_the_results_stay_exact() {
    let marked = bench_behind_a_marking_link(&[]);
    assert_eq!(marked["rate_mbit"], 50.0, "{marked}");
    assert_eq!(marked["mark_above"], 30000, "{marked}");
    assert!(marked["marks"].as_u64().expect("marks") > 0, "{marked}");
    let ignored = bench_behind_a_marking_link(&["--no-ecn"]);
    assert_eq!(ignored["marks"], 0, "{ignored}");
    for r in [&marked, &ignored] {
        assert_eq!(r["within_bound"], true, "{r}");
        assert_eq!(r["ranks_identical"], true, "{r}");
    }
    // Exact sums: the marks slowed the job down, and changed no bit of its result.
    assert_eq!(marked["result_checksum"], ignored["result_checksum"]);
    let window = |r: &serde_json::Value| r["congestion_window_min"].as_u64().expect("window");
    assert!(window(&marked) < window(&ignored), "{marked}\n{ignored}");
}
