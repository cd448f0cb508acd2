//! inagg over QUIC as real processes on 127.0.0.1: bench correctness (and bit-identity
//! with UDP), certificate pinning and CA trust, wrong secrets, garbage from a QUIC
//! client, a rank that disappears mid-allreduce.

mod common;

use std::time::Duration;

use common::{
    bench_json, expect_failure, kill_rank_and_expect_aborts, metrics_address, quic_aggregator,
    wait_for_chunks, wait_for_series, worker, QuicAggregator, TempDir,
};
use inagg_quic::{ClientOptions, Mode, QuicLink, Trust};

/// `inagg worker` flags that use QUIC and trust `agg` by its certificate file.
fn via_ca(agg: &QuicAggregator) -> Vec<String> {
    vec![
        "--transport".into(),
        "quic".into(),
        "--ca".into(),
        agg.cert.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A new two-rank job over QUIC finishes on `agg`.
fn assert_new_quic_job_runs(agg: &QuicAggregator, job: u32) {
    let mut args = via_ca(agg);
    args.extend(["--elements", "50000", "--codec", "i32"].map(String::from));
    let mut ws: Vec<_> = (0..2)
        .map(|r| worker(agg.addr, job, r, 2, &strs(&args)))
        .collect();
    for w in &mut ws {
        let st = w
            .wait_for(Duration::from_secs(30))
            .expect("new job finishes");
        assert!(st.success(), "{}", w.stderr());
    }
}

#[test]
fn bench_over_quic_four_workers_correct_and_i32_identical_to_udp() {
    let common = [
        "--workers",
        "4",
        "--elements",
        "300000",
        "--codec",
        "f32,i32",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--json",
        "--seed",
        "11",
    ];
    let mut quic = common.to_vec();
    quic.extend(["--transport", "quic"]);
    let quic_rows = bench_json(&quic);
    let udp_rows = bench_json(&common);
    assert_eq!(quic_rows.len(), 2);
    for row in &quic_rows {
        assert_eq!(row["transport"], "quic", "{row}");
        assert_eq!(row["within_bound"], true, "{row}");
        assert_eq!(row["ranks_identical"], true, "{row}");
    }
    let sum = |rows: &[serde_json::Value], codec: &str| {
        rows.iter()
            .find(|r| r["codec"] == codec)
            .map(|r| r["result_checksum"].clone())
            .expect("row")
    };
    assert_eq!(sum(&quic_rows, "i32"), sum(&udp_rows, "i32"));
    // Datagrams too: chunks shrink to the path's datagram size, results stay right.
    let rows = bench_json(&[
        "--workers",
        "4",
        "--elements",
        "300000",
        "--codec",
        "i32",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--json",
        "--seed",
        "11",
        "--transport",
        "quic",
        "--quic-mode",
        "datagram",
    ]);
    assert_eq!(rows[0]["within_bound"], true, "{}", rows[0]);
}

#[test]
fn a_wrong_fingerprint_or_ca_fails_clearly_and_the_aggregator_serves_on() {
    let dir = TempDir::new("quic-trust");
    let mut agg = quic_aggregator(&dir.0, &[]);
    // A pinned fingerprint that is not the aggregator's.
    let wrong = format!(
        "{}{}",
        &agg.fingerprint[..63],
        if agg.fingerprint.ends_with('0') {
            "1"
        } else {
            "0"
        }
    );
    let mut w = worker(
        agg.addr,
        1,
        0,
        1,
        &[
            "--transport",
            "quic",
            "--fingerprint",
            &wrong,
            "--join-timeout-ms",
            "5000",
        ],
    );
    let err = expect_failure(&mut w, Duration::from_secs(15), "wrong fingerprint");
    assert!(err.contains("fingerprint"), "said: {err}");
    // Another aggregator's certificate as the CA.
    let other = TempDir::new("quic-other");
    inagg_quic::Identity::load_or_generate(&other.0.join("c.pem"), &other.0.join("k.pem"))
        .expect("identity");
    let ca = other.0.join("c.pem").display().to_string();
    let mut w = worker(agg.addr, 2, 0, 1, &["--transport", "quic", "--ca", &ca]);
    let err = expect_failure(&mut w, Duration::from_secs(15), "wrong CA");
    assert!(err.to_lowercase().contains("certificate"), "said: {err}");
    // No trust at all is refused before any connection.
    let mut w = worker(agg.addr, 3, 0, 1, &["--transport", "quic"]);
    let err = expect_failure(&mut w, Duration::from_secs(15), "no trust");
    assert!(
        err.contains("--ca") && err.contains("--fingerprint"),
        "said: {err}"
    );
    // The right fingerprint works, and so does the certificate file.
    let mut ok = worker(
        agg.addr,
        4,
        0,
        1,
        &[
            "--transport",
            "quic",
            "--fingerprint",
            &agg.fingerprint,
            "--elements",
            "10000",
        ],
    );
    let st = ok.wait_for(Duration::from_secs(30)).expect("finishes");
    assert!(st.success(), "{}", ok.stderr());
    assert!(agg.proc.running());
    assert_new_quic_job_runs(&agg, 5);
    // A restart keeps the stored certificate: same fingerprint.
    drop(agg.proc);
    let again = quic_aggregator(&dir.0, &[]);
    assert_eq!(again.fingerprint, agg.fingerprint);
}

#[test]
fn a_wrong_secret_is_refused_and_never_touches_the_job() {
    let dir = TempDir::new("quic-secret");
    let mut agg = quic_aggregator(&dir.0, &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_address(&mut agg.proc);
    // Each rank checks every result: no untimed allreduce, i32 sums compared with the
    // first bit for bit, the last against the exact sum.
    let mut args = via_ca(&agg);
    args.extend(
        [
            "--secret",
            "right",
            "--elements",
            "200000",
            "--codec",
            "i32",
            "--iters",
            "20",
            "--warmup",
            "0",
            "--json",
        ]
        .map(String::from),
    );
    // Rank 0 first: once the aggregator holds the forming job (rank 1's seat open), an
    // intruder claims rank 1 with a wrong secret, and only after its refusal does the
    // real rank 1 come. The order is what the test says, not a race.
    let mut ws = vec![worker(agg.addr, 9, 0, 2, &strs(&args))];
    wait_for_series(
        &metrics,
        "inagg_job_packets_received_total{job=\"9\"}",
        1.0,
        Duration::from_secs(60),
    );
    let mut bad = via_ca(&agg);
    bad.extend(["--secret", "wrong", "--join-timeout-ms", "5000"].map(String::from));
    let mut intruder = worker(agg.addr, 9, 1, 2, &strs(&bad));
    let err = expect_failure(&mut intruder, Duration::from_secs(60), "wrong secret");
    assert!(err.contains("secret"), "said: {err}");
    assert!(ws[0].running(), "rank 0 gave up: {}", ws[0].stderr());
    ws.push(worker(agg.addr, 9, 1, 2, &strs(&args)));
    let mut reports = Vec::new();
    for w in &mut ws {
        let st = w.wait_for(Duration::from_secs(60)).expect("job finishes");
        assert!(st.success(), "{}", w.stderr());
        let r: serde_json::Value = serde_json::from_str(w.stdout().trim()).expect("json report");
        assert_eq!(r["allreduces"], 20, "{r}");
        assert_eq!(r["mismatches"], 0, "{r}");
        assert_eq!(r["check"]["within_bound"], true, "{r}");
        reports.push(r);
    }
    assert_eq!(reports[0]["result_checksum"], reports[1]["result_checksum"]);
    assert!(agg.proc.running());
}

#[test]
fn garbage_from_a_quic_client_and_a_vanished_rank_leave_the_aggregator_serving() {
    let dir = TempDir::new("quic-garbage");
    let mut agg = quic_aggregator(
        &dir.0,
        &["--silence-timeout-ms", "2000", "--metrics", "127.0.0.1:0"],
    );
    let metrics = metrics_address(&mut agg.proc);
    let trust = Trust::fingerprint(&agg.fingerprint).expect("fingerprint");
    // Authenticated clients that send garbage, on a stream and as datagrams.
    for mode in [Mode::Stream, Mode::Datagram] {
        let mut o = ClientOptions::new(trust.clone());
        o.mode = mode;
        let mut link =
            QuicLink::connect(&o, agg.addr, "127.0.0.1:0".parse().expect("addr")).expect("connect");
        let mut x = 0x1234_5678u32;
        for len in [0usize, 1, 2, 3, 39, 40, 41, 200, 1000] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            link.send(&junk).expect("send");
            // The protocol's magic with junk after it.
            let mut framed = b"IA\x03".to_vec();
            framed.extend_from_slice(&junk);
            link.send(&framed).expect("send");
        }
        // Nothing useful comes back, and the aggregator does not fall over.
        let _ = link.recv(Duration::from_millis(200), |_| {});
        link.close();
    }
    // Plain UDP junk at the QUIC port.
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for len in [1usize, 20, 1200, 1500] {
        s.send_to(&vec![0xab; len], agg.addr).expect("send");
    }
    assert!(agg.proc.running());
    assert_new_quic_job_runs(&agg, 20);

    // A rank that vanishes mid-allreduce: the others get the abort, as over UDP.
    let mut args = via_ca(&agg);
    args.extend(["--elements", "200000", "--iters", "100000", "--no-check"].map(String::from));
    let mut ws: Vec<_> = (0..3)
        .map(|r| worker(agg.addr, 21, r, 3, &strs(&args)))
        .collect();
    wait_for_chunks(&metrics, 21, 100.0, Duration::from_secs(60));
    kill_rank_and_expect_aborts(&mut ws, 1, Duration::from_secs(60));
    assert!(agg.proc.running(), "the aggregator must survive");
    assert_new_quic_job_runs(&agg, 22);
}
