//! `inagg tcp-probe`, the cross traffic's short-flow probe: a server and a client
//! over real sockets on loopback, and the client's errors.

mod common;

use std::time::Duration;

use common::{inagg, json_lines, listening_address, run_bounded, Proc};

fn server() -> (Proc, String) {
    let mut cmd = inagg();
    cmd.args(["tcp-probe", "--serve", "127.0.0.1:0", "--for", "60"]);
    let mut p = Proc::spawn(cmd);
    let addr = listening_address(&mut p, "tcp-probe");
    (p, addr)
}

#[test]
fn the_client_times_every_round_trip_and_reports_percentiles() {
    let (_server, addr) = server();
    let mut cmd = inagg();
    cmd.args([
        "tcp-probe",
        "--to",
        &addr,
        "--requests",
        "200",
        "--size",
        "1024",
    ])
    .args(["--interval-ms", "0", "--json", "--samples"]);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(60));
    assert!(st.success(), "{out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{out}");
    let r = &rows[0];
    assert_eq!(r["requests"], 200);
    assert_eq!(r["size"], 1024);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert!(f("p50_ms") > 0.0, "{r}");
    assert!(
        f("p50_ms") <= f("p99_ms") && f("p99_ms") <= f("max_ms"),
        "{r}"
    );
    // --samples lists every round trip with its send time, in order: the largest is
    // the max, and the times are today's wall clock.
    let samples = r["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 200, "{r}");
    let pair = |s: &serde_json::Value| (s[0].as_f64().expect("sent"), s[1].as_f64().expect("ms"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64();
    let sent: Vec<f64> = samples.iter().map(|s| pair(s).0).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{r}");
    assert!(sent[0] > now - 120.0 && sent[199] <= now, "{r}");
    let max = samples.iter().map(|s| pair(s).1).fold(0.0, f64::max);
    assert_eq!(max, f("max_ms"), "{r}");
}

#[test]
fn bad_flags_and_an_absent_server_are_clear_errors() {
    // A port nobody listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    for (args, says) in [
        (
            vec!["--to", closed.as_str(), "--timeout-s", "1"],
            "connecting to the probe server",
        ),
        (
            vec!["--to", closed.as_str(), "--size", "0"],
            "--size must be",
        ),
        (
            vec!["--to", closed.as_str(), "--interval-ms", "nan"],
            "--interval-ms must",
        ),
        (vec![], "--to"),
    ] {
        let mut cmd = inagg();
        cmd.arg("tcp-probe").args(&args);
        let (st, out, err) = run_bounded(cmd, Duration::from_secs(30));
        assert!(!st.success(), "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn the_client_stops_at_its_time_limit_or_a_signal_and_reports_what_it_completed() {
    let (_server, addr) = server();
    let many = ["--requests", "1000000", "--interval-ms", "1", "--json"];
    let mut cmd = inagg();
    cmd.args(["tcp-probe", "--to", &addr, "--for", "1"])
        .args(many);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(60));
    assert!(st.success(), "{out}\n{err}");
    let n = json_lines(&out)[0]["requests"].as_u64().expect("requests");
    assert!(n > 0 && n < 1_000_000, "{out}");

    let mut cmd = inagg();
    cmd.args(["tcp-probe", "--to", &addr]).args(many);
    let mut client = Proc::spawn_collected(cmd);
    std::thread::sleep(Duration::from_millis(500));
    client.signal(libc::SIGTERM);
    let st = client
        .wait_for(Duration::from_secs(30))
        .expect("the client stops");
    let out = client.stdout();
    assert!(st.success(), "{out}\n{}", client.stderr());
    let n = json_lines(&out)[0]["requests"].as_u64().expect("requests");
    assert!(n > 0 && n < 1_000_000, "{out}");
}
