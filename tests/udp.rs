//! inagg as real processes on real sockets (127.0.0.1): bench correctness, a worker
//! killed mid-allreduce, garbage sent at the aggregator, a dead aggregator, shutdown.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{
    aggregator, aggregator_on, assert_new_job_runs, expect_failure, inagg,
    kill_rank_and_expect_aborts, metrics_address, wait_for_chunks, worker,
};
use serde_json::Value;

#[test]
fn bench_four_workers_f32_and_i32_every_rank_correct() {
    // No untimed allreduce: each i32 rank compares every result with its first, bit
    // for bit, and the last with the exact sum.
    let rows = common::bench_json(&[
        "--workers",
        "4",
        "--elements",
        "1048576",
        "--codec",
        "f32,i32",
        "--transport",
        "udp",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_eq!(rows.len(), 2);
    for (row, codec) in rows.iter().zip(["f32", "i32"]) {
        assert_eq!(row["codec"], codec);
        assert_eq!(row["transport"], "udp");
        assert_eq!(row["workers"], 4);
        assert_eq!(row["elements"], 1048576);
        assert_eq!(row["within_bound"], true, "{row}");
        assert_eq!(row["ranks_identical"], true, "{row}");
        for f in [
            "median_s",
            "ate_per_s",
            "algbw_gbps",
            "max_abs_err",
            "rel_l2_err",
        ] {
            assert!(row[f].as_f64().is_some(), "{f} missing in {row}");
        }
        assert!(row["retransmissions"].as_u64().is_some());
        // Four bytes per element plus headers, each way, besides resends (a loaded
        // machine delays a rank past its timeout now and then): each resend is
        // counted, and brings back at most one result.
        let resent = row["retransmitted_bytes_per_worker"]
            .as_f64()
            .expect("bytes resent");
        let sent = row["bytes_sent_per_worker"].as_f64().expect("bytes sent") - resent;
        let recv = row["bytes_recv_per_worker"].as_f64().expect("bytes recv");
        assert!(
            (4.0 * 1048576.0..4.4 * 1048576.0).contains(&sent),
            "{sent} bytes sent in {row}"
        );
        assert!(
            (4.0 * 1048576.0..4.4 * 1048576.0 + resent).contains(&recv),
            "{recv} bytes received in {row}"
        );
        assert!(row["rel_l2_err"].as_f64().expect("err") < 1e-6);
        // CPU per allreduce: the ranks' part and the aggregator's, both measured (a
        // 4 MiB allreduce cannot cost no CPU), adding up to the total.
        let cpu = |f: &str| row[f].as_f64().unwrap_or_else(|| panic!("{f} in {row}"));
        let (total, workers, agg) = (
            cpu("cpu_s_per_allreduce"),
            cpu("worker_cpu_s_per_allreduce"),
            cpu("aggregator_cpu_s_per_allreduce"),
        );
        assert!(workers > 0.0 && agg >= 0.0, "{row}");
        assert!((total - (workers + agg)).abs() < 1e-9, "{row}");
    }
}

#[test]
fn a_killed_worker_aborts_the_others_and_the_aggregator_serves_on() {
    let (mut agg, addr) = aggregator(&["--silence-timeout-ms", "2000", "--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut agg);
    let long = ["--elements", "200000", "--iters", "100000", "--no-check"];
    let mut ws: Vec<_> = (0..3).map(|r| worker(addr, 7, r, 3, &long)).collect();
    wait_for_chunks(&metrics, 7, 100.0, Duration::from_secs(60));
    kill_rank_and_expect_aborts(&mut ws, 1, Duration::from_secs(60));
    assert!(agg.running(), "the aggregator must survive");
    // A new job runs to completion on the same aggregator.
    assert_new_job_runs(addr, 8, &["--codec", "i32"]);
}

#[test]
fn garbage_datagrams_change_nothing() {
    let (mut agg, addr) = aggregator(&[]);
    // No untimed allreduce: each rank compares every one of the 20 with the first, bit
    // for bit (i32 sums repeat), and the last with the exact sum.
    let args = [
        "--elements",
        "300000",
        "--iters",
        "20",
        "--warmup",
        "0",
        "--codec",
        "i32",
        "--json",
    ];
    let mut ws: Vec<_> = (0..3).map(|r| worker(addr, 3, r, 3, &args)).collect();
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut sent = 0u64;
    let end = Instant::now() + Duration::from_secs(60);
    let mut valid = Vec::new();
    // A well-formed contribution, to cut and corrupt.
    valid.extend_from_slice(b"IA\x05\x03"); // version 5, a contribution
    valid.extend_from_slice(&3u32.to_le_bytes());
    valid.extend_from_slice(&[0, 0, 2, 0]);
    valid.extend_from_slice(&[0xab; 8]); // guessed token
    valid.extend_from_slice(&[0; 8]); // seq
    valid.extend_from_slice(&[0; 4]); // slot
    valid.extend_from_slice(&[0, 0x80, 0x80, 0, 4, 0, 0, 0]);
    valid.extend_from_slice(&[0x7f; 16]);
    while ws.iter_mut().any(|w| w.running()) && Instant::now() < end {
        let i = sent as usize;
        let d: Vec<u8> = match i % 5 {
            0 => (0..(i * 7919) % 1400).map(|k| (k * 31 + i) as u8).collect(),
            1 => valid[..i % valid.len()].to_vec(),
            2 => vec![0x49; 65_507],
            3 => {
                let mut v = valid.clone();
                let k = (i / 5) % v.len();
                v[k] ^= 0x5a;
                v
            }
            _ => valid.clone(),
        };
        let _ = sock.send_to(&d, addr);
        sent += 1;
        if sent % 50 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut checksums = Vec::new();
    for w in &mut ws {
        let st = w.wait_for(Duration::from_secs(60)).expect("workers finish");
        assert!(st.success(), "worker failed: {}", w.stderr());
        let r: Value = serde_json::from_str(w.stdout().trim()).expect("json report");
        assert_eq!(r["allreduces"], 20, "{r}");
        assert_eq!(r["mismatches"], 0, "{r}");
        assert_eq!(r["check"]["within_bound"], true, "{r}");
        checksums.push(r["result_checksum"].clone());
    }
    assert!(
        checksums.iter().all(|c| c == &checksums[0]),
        "{checksums:?}"
    );
    assert!(sent > 100, "sent only {sent} garbage datagrams");
    assert!(agg.running());
    agg.signal(libc::SIGTERM);
    let st = agg
        .wait_for(Duration::from_secs(10))
        .expect("aggregator stops on SIGTERM");
    assert!(st.success());
    let err = agg.stderr();
    assert!(err.contains("malformed="), "aggregator said: {err}");
    assert!(
        err.contains("bad_token=") || err.contains("unknown_job="),
        "aggregator said: {err}"
    );
}

/// Before receives dropped datagrams from port 0, one such join stopped the whole
/// aggregator: the kernel refuses to send the grant there (EINVAL), and that send
/// error ended the serving loop.
#[test]
#[cfg_attr(inagg_no_raw, ignore = "needs CAP_NET_RAW to send from port 0")]
fn a_join_from_port_zero_is_dropped_and_the_aggregator_serves_on() {
    use socket2::{Domain, Protocol, Socket, Type};
    // Only a raw socket sends from port 0, and only with CAP_NET_RAW.
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .expect("a raw socket (CAP_NET_RAW) to send from port 0");
    let (mut agg, addr) = aggregator(&[]);
    // A one-rank job, which the aggregator would grant at once: a reply to port 0.
    let join = inagg_proto::wire::Join {
        job: 77,
        rank: 0,
        world: 1,
        codec: inagg_proto::codec::CodecId::F32,
        chunk_elems: 256,
        window: 8,
        secret: Vec::new(),
        groups: false,
        nonce: 1,
        completed: 0,
        proof: None,
        job_world: None,
    };
    let mut payload = Vec::new();
    inagg_proto::wire::encode_join(&join, &mut payload);
    let mut d = Vec::new();
    d.extend_from_slice(&0u16.to_be_bytes()); // source port
    d.extend_from_slice(&addr.port().to_be_bytes());
    d.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    d.extend_from_slice(&0u16.to_be_bytes()); // no checksum (allowed over IPv4)
    d.extend_from_slice(&payload);
    for _ in 0..3 {
        raw.send_to(&d, &addr.into()).expect("raw send");
    }
    // A raw UDP socket also takes a copy of every UDP datagram on the host.
    drop(raw);
    std::thread::sleep(Duration::from_millis(300));
    assert!(agg.running(), "aggregator stopped: {}", agg.stderr());
    assert_new_job_runs(addr, 78, &[]);
    agg.signal(libc::SIGTERM);
    let st = agg
        .wait_for(Duration::from_secs(10))
        .expect("aggregator stops on SIGTERM");
    let err = agg.stderr();
    assert!(st.success(), "aggregator said: {err}");
    assert!(err.contains("datagrams from port 0"), "not reported: {err}");
}

/// Strangers cannot claim unbounded memory, nor all of it: with no flags the
/// aggregator has a 1 GiB slot memory budget and a 16 MiB cap per job. Four one-rank
/// jobs that anyone on the network could start, each asking for the largest window of
/// the widest slots (670 MB each, 2.7 GB in all without a budget), each get a grant
/// within the cap (with the budget alone, the first two took all of it and the others
/// waited), and a real job runs beside them while they keep their jobs alive.
/// Sends rank 0's heartbeat for every granted job (job -> (window, token)) to `addr`.
fn heartbeat_all(
    sock: &UdpSocket,
    addr: std::net::SocketAddr,
    granted: &std::collections::HashMap<u32, (u32, u64)>,
) -> std::io::Result<()> {
    use inagg_proto::wire::{encode_heartbeat, Control};
    for (&job, &(_, token)) in granted {
        let mut d = Vec::new();
        encode_heartbeat(
            &Control {
                job,
                rank: 0,
                token,
            },
            &mut d,
        );
        sock.send_to(&d, addr)?;
    }
    Ok(())
}

#[test]
fn strangers_joins_get_no_more_than_the_default_slot_memory() {
    use inagg_proto::wire::{decode, encode_join, Join, Message, DATA_HEADER_LEN, MAX_DATAGRAM};
    let (mut agg, addr) = aggregator(&[]);
    let codec = inagg_proto::codec::CodecId::I8;
    // The widest i8 chunk that fits a datagram behind its header, with an exponent
    // for each 8 Ki-element block after the first.
    let chunk = (MAX_DATAGRAM - DATA_HEADER_LEN - (inagg_proto::codec::MAX_BLOCKS - 1)) as u16;
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let jobs: Vec<u32> = (900..904).collect();
    let mut granted = std::collections::HashMap::new();
    let mut buf = vec![0u8; 65536];
    // A hang guard, not a speed asked for: joins are resent (as workers do) until
    // every job has its grant. The jobs granted keep theirs alive with heartbeats
    // meanwhile, so that none frees its memory by falling silent: a job that must wait
    // for memory never gets a grant here, and the count below fails.
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && granted.len() < jobs.len() {
        heartbeat_all(&sock, addr, &granted).expect("send");
        for &job in jobs.iter().filter(|j| !granted.contains_key(*j)) {
            let join = Join {
                job,
                rank: 0,
                world: 1,
                codec,
                chunk_elems: chunk,
                window: 1024,
                secret: Vec::new(),
                groups: false,
                nonce: 1,
                completed: 0,
                proof: None,
                job_world: None,
            };
            let mut d = Vec::new();
            encode_join(&join, &mut d);
            sock.send_to(&d, addr).expect("send");
        }
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Ok(Message::Grant(g)) = decode(&buf[..n]) {
                assert_eq!(g.chunk_elems, chunk);
                granted.insert(g.job, (g.window, g.token));
            }
        }
    }
    let i8_codec = inagg_proto::codec::lookup(codec).expect("i8");
    let kept = inagg_proto::aggregator::kept_bytes(i8_codec, usize::from(chunk));
    let slot = inagg_proto::aggregator::slot_bytes(usize::from(chunk), kept, 1);
    assert_eq!(granted.len(), jobs.len(), "{granted:?}");
    for (job, &(w, _)) in &granted {
        assert!(
            w as usize * slot <= inagg_aggregator::DEFAULT_MAX_JOB_MEMORY,
            "job {job}: {w} slots of {slot} bytes"
        );
    }
    // The strangers keep their jobs (and memory) alive with heartbeats while a real
    // job runs; it must not wait for them.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                let _ = heartbeat_all(&sock, addr, &granted);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        // Stops the heartbeats however the job ends, a failed assertion included.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        assert_new_job_runs(addr, 905, &[]);
    });
    assert!(agg.running(), "aggregator stopped: {}", agg.stderr());
}

/// Ranks whose tensors differ in length fail at once, saying so, and the job's bits
/// never mix: a tensor that ends on a chunk boundary before the others' (16 Ki
/// against 24 Ki elements in chunks of 8 Ki) is caught by its last packet's flag,
/// one that ends inside a chunk by the element count. Before, both waited 60 s for
/// "no progress", and without the barrier between allreduces the first would have
/// summed its next tensor with the others' current one.
#[test]
fn ranks_with_tensors_of_different_lengths_fail_at_once_with_a_clear_error() {
    let (mut agg, addr) = aggregator(&[]);
    for (job, short, long) in [(21, "16384", "24576"), (22, "100000", "150000")] {
        let args = |n| ["--elements", n, "--chunk-elements", "8192", "--iters", "2"];
        let mut ws = [
            worker(addr, job, 0, 2, &args(short)),
            worker(addr, job, 1, 2, &args(long)),
        ];
        for w in &mut ws {
            let err = expect_failure(w, Duration::from_secs(20), "a rank of unequal length");
            assert!(err.contains("same length"), "job {job}: {err}");
            // Both sides named, neither blamed (issue 25, finding 5).
            assert!(
                err.contains("ranks 0 and 1 disagree") || err.contains("ranks 1 and 0 disagree"),
                "job {job}: {err}"
            );
            assert!(
                err.contains("rank 0 sent") && err.contains("rank 1 sent"),
                "job {job}: {err}"
            );
        }
    }
    assert_new_job_runs(addr, 23, &[]);
    assert!(agg.running());
}

#[test]
fn a_dead_aggregator_makes_workers_fail_not_hang() {
    let (mut agg, addr) = aggregator(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut agg);
    let args = [
        "--elements",
        "200000",
        "--iters",
        "100000",
        "--no-check",
        "--aggregator-timeout-ms",
        "2000",
    ];
    let mut ws: Vec<_> = (0..2).map(|r| worker(addr, 4, r, 2, &args)).collect();
    wait_for_chunks(&metrics, 4, 100.0, Duration::from_secs(60));
    agg.signal(libc::SIGKILL);
    for w in &mut ws {
        let st = w
            .wait_for(Duration::from_secs(60))
            .expect("worker gives up");
        assert!(!st.success());
        assert!(w.stderr().contains("aggregator"));
    }
}

#[test]
fn sigterm_aborts_jobs_and_exits_cleanly() {
    let (mut agg, addr) = aggregator(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut agg);
    let args = ["--elements", "100000", "--iters", "100000", "--no-check"];
    let mut ws: Vec<_> = (0..2).map(|r| worker(addr, 5, r, 2, &args)).collect();
    wait_for_chunks(&metrics, 5, 100.0, Duration::from_secs(60));
    agg.signal(libc::SIGTERM);
    assert!(agg
        .wait_for(Duration::from_secs(30))
        .expect("stops")
        .success());
    for w in &mut ws {
        let st = w.wait_for(Duration::from_secs(30)).expect("worker stops");
        assert!(!st.success());
        assert!(w.stderr().contains("shutting down"));
    }
}

/// The counts of the line an aggregator prints as it stops: datagrams in and out,
/// chunks completed.
fn stop_counts(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("aggregator stopped"))
        .unwrap_or_else(|| panic!("no stop line in {stderr}"));
    let n = |before: &str| -> u64 {
        let head = line
            .split(before)
            .next()
            .and_then(|h| h.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {before:?} in {line}"));
        head.parse()
            .unwrap_or_else(|_| panic!("{head:?} in {line}"))
    };
    (n(" datagrams in"), n(" out,"), n(" chunks completed"))
}

/// On loopback a job's results go out once, to a multicast group its ranks joined,
/// when every rank asks (the default). The sums are right (each worker checks its
/// result and fails otherwise).
#[test]
#[cfg_attr(
    inagg_no_multicast,
    ignore = "needs a host that lets sockets join a multicast group on loopback"
)]
fn results_go_once_to_a_multicast_group_its_ranks_joined() {
    results_go_out(&[("127.0.0.1:0", &[], None, 1)]);
}

/// One rank with `--no-multicast`, an aggregator with it, or one bound to the
/// wildcard (its ranks' group sockets could not bind its port), and each rank gets its
/// own result.
#[test]
fn results_go_to_each_rank_when_a_rank_or_the_aggregator_opts_out_of_multicast() {
    results_go_out(&[
        ("127.0.0.1:0", &[], Some(1u16), 3),
        ("127.0.0.1:0", &["--no-multicast"], None, 3),
        ("0.0.0.0:0", &[], None, 3),
    ]);
}

/// Runs a job of three ranks for each case (listen address, aggregator flags, the
/// rank that passes `--no-multicast`, results sent per chunk) and checks the
/// aggregator's count of datagrams out against its chunks.
fn results_go_out(cases: &[(&str, &[&str], Option<u16>, u64)]) {
    let world = 3u16;
    for &(listen, agg_flags, opt_out, per_chunk) in cases {
        let (mut agg, addr) = aggregator_on(listen, agg_flags);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()));
        let mut ws: Vec<_> = (0..world)
            .map(|r| {
                let mut args = vec!["--elements", "300000", "--iters", "3", "--codec", "i8"];
                // Enough chunks to count (37 per allreduce).
                args.extend(["--chunk-elements", "8192"]);
                if opt_out == Some(r) {
                    args.push("--no-multicast");
                }
                worker(addr, 4, r, world, &args)
            })
            .collect();
        for w in &mut ws {
            let st = w
                .wait_for(Duration::from_secs(60))
                .expect("worker finishes");
            assert!(
                st.success(),
                "{listen} {agg_flags:?} {opt_out:?}: {}",
                w.stderr()
            );
        }
        agg.signal(libc::SIGTERM);
        agg.wait_for(Duration::from_secs(5)).expect("stops");
        let (_, out, chunks) = stop_counts(&agg.stderr());
        assert!(chunks > 100, "{chunks} chunks");
        // Besides the results: grants, echoed heartbeats and leaves, answers to
        // retransmissions (a loaded machine delays a rank now and then).
        assert!(
            (per_chunk * chunks..per_chunk * chunks + chunks / 5 + 40).contains(&out),
            "{listen} {agg_flags:?} {opt_out:?}: {out} datagrams out for {chunks} chunks"
        );
    }
}

/// The aggregator's wait before sleeping: 0 sleeps at once, and a spin far longer
/// than any wait still ends at the loop's poll interval, so that jobs run and a stop
/// request is seen either way (a bad value: `bad_input_gets_a_clear_error`).
#[test]
fn aggregators_that_sleep_at_once_or_spin_long_serve_and_stop() {
    for yields in ["0", "4294967295"] {
        let (mut agg, addr) = aggregator(&["--yields-before-sleep", yields]);
        assert_new_job_runs(addr, 11, &["--codec", "i8"]);
        // No job now, and at u32::MAX the spins run into every wait's end (shrinking
        // each time): they must not keep the loop from its stop flag.
        std::thread::sleep(Duration::from_millis(300));
        agg.signal(libc::SIGTERM);
        let st = agg
            .wait_for(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("--yields-before-sleep {yields}: no stop"));
        assert!(
            st.success(),
            "--yields-before-sleep {yields}: {}",
            agg.stderr()
        );
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = inagg()
        .args(["bench", "--codec", "f64"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown codec"));
    // A budget of nothing would refuse every job: refused at the start instead.
    for flag in ["--slot-memory", "--max-job-memory"] {
        let mut cmd = inagg();
        cmd.args(["aggregator", "--listen", "127.0.0.1:0", flag, "0"]);
        let (st, _, err) = common::run_bounded(cmd, Duration::from_secs(10));
        assert!(!st.success(), "{flag} 0 accepted");
        assert!(
            err.contains(flag) && err.contains("0 is not in 1.."),
            "{err}"
        );
    }
    let mut cmd = inagg();
    cmd.args([
        "aggregator",
        "--listen",
        "127.0.0.1:0",
        "--yields-before-sleep",
        "often",
    ]);
    let (st, _, err) = common::run_bounded(cmd, Duration::from_secs(10));
    assert!(!st.success());
    assert!(
        err.contains("'often'") && err.contains("--yields-before-sleep"),
        "{err}"
    );
    // A gain below 1 would slow a rank down for good.
    for gain in ["0.5", "-1", "NaN", "fast"] {
        let mut cmd = inagg();
        cmd.args(["bench", "--workers", "2", &format!("--pacing-gain={gain}")]);
        let (st, _, err) = common::run_bounded(cmd, Duration::from_secs(10));
        assert!(!st.success(), "--pacing-gain {gain} accepted");
        assert!(
            err.contains("--pacing-gain") && err.contains("is not a pacing gain"),
            "{err}"
        );
    }
    // QUIC paces its own packets: a gain over it is refused, before anything starts.
    for cmd in ["bench", "worker"] {
        let mut c = inagg();
        c.args([cmd, "--transport", "quic", "--pacing-gain", "1.25"]);
        if cmd == "worker" {
            c.args(["--aggregator", "127.0.0.1:9", "--job", "1", "--rank", "0"]);
            c.args(["--world", "1", "--fingerprint", &"00".repeat(32)]);
        }
        let (st, _, err) = common::run_bounded(c, Duration::from_secs(10));
        assert!(!st.success(), "{cmd}: a pacing gain over QUIC was accepted");
        assert!(
            err.contains("--pacing-gain") && err.contains("QUIC paces its own packets"),
            "{cmd}: {err}"
        );
    }
    let out = inagg()
        .args([
            "worker",
            "--aggregator",
            "nowhere",
            "--job",
            "1",
            "--rank",
            "0",
            "--world",
            "1",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let out = inagg()
        .args([
            "worker",
            "--aggregator",
            "127.0.0.1:9",
            "--job",
            "1",
            "--rank",
            "3",
            "--world",
            "2",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank 3 is not below the world size 2"));
    // Nothing listens there: the join is refused (issue 25), which the worker says,
    // where a join left to time out would say that instead (after one second here).
    let mut cmd = inagg();
    cmd.args([
        "worker",
        "--aggregator",
        "127.0.0.1:9",
        "--job",
        "1",
        "--rank",
        "0",
        "--world",
        "1",
        "--join-timeout-ms",
        "1000",
    ]);
    let (st, _, err) = common::run_bounded(cmd, Duration::from_secs(60));
    assert!(!st.success());
    assert!(
        err.contains("connection refused") && !err.contains("no grant within"),
        "{err}"
    );
}

#[test]
fn bench_every_codec_sends_its_width() {
    let rows = common::bench_json(&[
        "--workers",
        "3",
        "--elements",
        "300000",
        "--codec",
        "f32,f16,bf16,i32,i16,i8",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let widths = [
        ("f32", 4.0),
        ("f16", 2.0),
        ("bf16", 2.0),
        ("i32", 4.0),
        ("i16", 2.0),
        ("i8", 1.0),
    ];
    assert_eq!(rows.len(), widths.len());
    for (row, (codec, width)) in rows.iter().zip(widths) {
        assert_eq!(row["codec"], codec);
        assert_eq!(row["within_bound"], true, "{row}");
        assert_eq!(row["ranks_identical"], true, "{row}");
        // Retransmissions depend on how busy the machine is; the width shows in the rest.
        let sent = row["bytes_sent_per_worker"].as_f64().expect("bytes")
            - row["retransmitted_bytes_per_worker"]
                .as_f64()
                .expect("retx");
        let ideal = 300000.0 * width;
        assert!(
            (sent - ideal).abs() < 0.1 * ideal,
            "{codec}: {sent} bytes against {ideal}"
        );
    }
}

/// Tensors of 4 MiB and more are decoded around the caches (non-temporal stores) for
/// f16, bf16 and i8: the results must be the same sums, at every rank, to the last
/// element of a tensor that ends inside a chunk.
#[test]
fn large_tensors_decoded_around_the_cache_are_right() {
    let elements = inagg_proto::codec::stream::STREAM_MIN_BYTES / 4 + 12_345;
    let rows = common::bench_json(&[
        "--workers",
        "2",
        "--elements",
        &elements.to_string(),
        "--codec",
        "f16,bf16,i8",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["within_bound"], true, "{row}");
        assert_eq!(row["ranks_identical"], true, "{row}");
    }
}

#[test]
fn bench_with_stochastic_rounding_and_zero_skipping() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--workers",
            "2",
            "--elements",
            "200000",
            "--codec",
            "i8,f16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--json",
            "--zero-fraction",
            "0.5",
        ];
        args.extend_from_slice(extra);
        common::bench_json(&args)
    };
    let dense = run(&[]);
    let sparse = run(&["--skip-zeros", "--stochastic"]);
    assert_eq!((dense.len(), sparse.len()), (2, 2));
    for (d, s) in dense.iter().zip(&sparse) {
        for r in [d, s] {
            assert_eq!(r["within_bound"], true, "{r}");
            assert_eq!(r["ranks_identical"], true, "{r}");
        }
        let (bd, bs) = (
            d["bytes_sent_per_worker"].as_f64().unwrap_or(0.0),
            s["bytes_sent_per_worker"].as_f64().unwrap_or(0.0),
        );
        assert!(bs < 0.65 * bd, "half the chunks are zero: {bs} vs {bd}");
    }
}

#[test]
#[cfg_attr(inagg_no_ipv6, ignore = "needs an IPv6 loopback (::1)")]
fn ipv6_loopback_carries_every_codec() {
    // Sends are built by hand (sendmmsg with GSO): IPv6 addresses must come out
    // right, at GSO-sized runs (8 KiB chunks) and single datagrams alike.
    let (_agg, addr) = aggregator_on("[::1]:0", &[]);
    assert!(addr.is_ipv6());
    for (job, codec, chunk) in [(1, "f32", "2048"), (2, "i8", "8192"), (3, "f16", "300")] {
        assert_new_job_runs(
            addr,
            job,
            &["--codec", codec, "--chunk-elements", chunk, "--iters", "2"],
        );
    }
}
