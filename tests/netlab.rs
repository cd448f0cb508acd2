//! `scripts/netlab.sh`: the emulated cluster comes up, a tiny `inagg bench` runs
//! inside it on rate-limited links, and every namespace is gone afterwards. Ignored
//! where the build found no CAP_NET_ADMIN or no `ip`/`tc` (`build.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{json_lines, run_bounded};

/// The project's script `name` (in scripts/).
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn namespaces_work() -> bool {
    // Tests run in parallel threads of one process: each probe gets a name of its own.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("inagg-probe-{}-{n}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
    ok
}

fn namespaces() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
#[cfg_attr(
    inagg_no_netns,
    ignore = "needs CAP_NET_ADMIN and iproute2 (ip, tc) to create network namespaces"
)]
fn netlab_runs_a_bench_on_limited_links_and_tears_down() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN) and iproute2"
    );
    let script = script("netlab.sh");
    let mut cmd = Command::new(script);
    // A small token bucket: tbf lets a full bucket through at once, so a transfer of
    // B bytes can beat B / rate by the bucket (B / (B - burst) at most).
    let burst = 32 * 1024;
    cmd.args([
        "--workers",
        "2",
        "--link-rate",
        "200mbit",
        "--burst",
        "32kb",
        "--",
    ])
    .arg(env!("CARGO_BIN_EXE_inagg"))
    .args(["bench", "--workers", "2", "--elements", "200000"])
    .args([
        "--codec", "i32,f16", "--iters", "2", "--warmup", "1", "--json",
    ]);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(120));
    assert!(st.success(), "netlab failed: {out}\n{err}");
    let id = err
        .lines()
        .find_map(|l| l.split("(namespaces ").nth(1))
        .and_then(|s| s.strip_suffix("-*)"))
        .unwrap_or_else(|| panic!("no namespace id in: {err}"))
        .to_string();
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["within_bound"], true, "{r}");
        let f = r["line_rate_fraction"]
            .as_f64()
            .expect("line-rate fraction");
        // The links are the bottleneck at 200 Mbit/s: no run beats the bound by more
        // than the bucket's head start (1.04 for i32 here, 1.09 for f16).
        let sent = r["bytes_sent_per_worker"].as_f64().expect("bytes sent");
        let most = sent / (sent - f64::from(burst));
        assert!(
            f > 0.0 && f <= most * 1.01,
            "fraction {f}, at most {most}: {r}"
        );
    }
    assert!(
        !namespaces().contains(&format!("{id}-")),
        "namespaces left behind: {}",
        namespaces()
    );
}

#[test]
#[cfg_attr(
    inagg_no_netns,
    ignore = "needs CAP_NET_ADMIN and iproute2 (ip, tc) to create network namespaces"
)]
fn ranks_pace_over_udp_on_a_shaped_link_and_leave_pacing_to_quic_there() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN) and iproute2"
    );
    // Enough allreduces that the ranks' samples span a second (the pacing rule's
    // first rate): each later allreduce starts with a whole window, more than a burst.
    for transport in ["udp", "quic"] {
        let mut cmd = Command::new(script("netlab.sh"));
        cmd.args(["--workers", "2", "--link-rate", "200mbit", "--"])
            .arg(env!("CARGO_BIN_EXE_inagg"))
            .args([
                "bench",
                "--workers",
                "2",
                "--elements",
                "2000000",
                "--codec",
                "i32",
            ])
            .args([
                "--iters",
                "6",
                "--warmup",
                "1",
                "--json",
                "--transport",
                transport,
            ]);
        let (st, out, err) = run_bounded(cmd, Duration::from_secs(120));
        assert!(st.success(), "{transport}: netlab failed: {out}\n{err}");
        let rows = json_lines(&out);
        assert_eq!(rows.len(), 1, "{transport}: {out}");
        let r = &rows[0];
        assert_eq!(r["within_bound"], true, "{transport}: {r}");
        let holds = r["pacing_holds"].as_u64().expect("pacing_holds");
        if transport == "udp" {
            assert!(holds > 0, "no UDP send was paced: {r}");
        } else {
            assert_eq!(holds, 0, "QUIC paces its own packets: {r}");
        }
    }
}

/// Bits per second an iperf3 client sent (its JSON after SIGINT: the server's side
/// is not there, the sender's is).
fn iperf3_sent_bps(path: &Path) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()));
    v["end"]["sum_sent"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_sent in {}: {text}", path.display()))
}

#[test]
#[cfg_attr(
    any(inagg_no_netns, inagg_no_iperf3),
    ignore = "needs CAP_NET_ADMIN, iproute2 (ip, tc) and iperf3"
)]
fn netlab_runs_bulk_tcp_flows_and_a_probe_across_the_aggregators_link() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN)"
    );
    let dir = common::TempDir::new("netlab-cross");
    let script = script("netlab.sh");
    let mut cmd = Command::new(script);
    cmd.env("INAGG_BIN", env!("CARGO_BIN_EXE_inagg"))
        .args(["--workers", "2", "--link-rate", "200mbit"])
        .args([
            "--aggregator-link-rate",
            "100mbit",
            "--tcp-bulk",
            "2",
            "--tcp-probe",
            "--tcp-congestion",
            "reno",
        ])
        .arg("--cross-out")
        .arg(&dir.0)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_inagg"))
        .args(["bench", "--workers", "2", "--elements", "1000000"])
        .args(["--codec", "i32", "--iters", "3", "--warmup", "1", "--json"]);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(180));
    assert!(st.success(), "netlab failed: {out}\n{err}");
    assert!(
        err.contains("2 bulk TCP flows, a TCP probe, TCP with reno"),
        "{err}"
    );
    // The job's results stay exact beside the flows.
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["within_bound"], true, "{}", rows[0]);
    // The line-rate bound counts the aggregator's link: both ranks' bytes through
    // 100 Mbit/s, four times what each rank's own 200 Mbit/s link needs.
    let sent = rows[0]["bytes_sent_per_worker"]
        .as_f64()
        .expect("bytes sent")
        - rows[0]["retransmitted_bytes_per_worker"]
            .as_f64()
            .expect("retransmitted bytes");
    let bound = rows[0]["line_rate_bound_s"].as_f64().expect("bound");
    assert!(bound >= 0.99 * 2.0 * sent * 8.0 / 100e6, "{}", rows[0]);
    // Both flows ran through the 100 Mbit/s link (their own links are 200 Mbit/s).
    for k in 0..2 {
        let path = dir.0.join(format!("bulk-{k}.json"));
        let bps = iperf3_sent_bps(&path);
        assert!(bps > 1e6 && bps < 150e6, "flow {k}: {bps} bit/s");
        // The namespaces' congestion control (reno: every host allows it), whatever
        // the host's default.
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("iperf3 JSON"))
                .expect("iperf3 JSON");
        assert_eq!(report["end"]["sender_tcp_congestion"], "reno", "flow {k}");
    }
    let probe: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("probe.json")).expect("probe.json"),
    )
    .expect("the probe's JSON");
    assert!(probe["requests"].as_u64().is_some_and(|n| n > 0), "{probe}");
    assert!(
        probe["p99_ms"].as_f64() >= probe["p50_ms"].as_f64(),
        "{probe}"
    );
}

#[test]
#[cfg_attr(
    any(inagg_no_netns, inagg_no_iperf3, inagg_no_python),
    ignore = "needs CAP_NET_ADMIN, iproute2 (ip, tc), iperf3 and python3 with matplotlib"
)]
fn an_inagg_job_and_two_tcp_flows_each_get_a_share_of_a_shaped_bottleneck() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN)"
    );
    let dir = common::TempDir::new("sharing");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script("sharing.py"))
        .args(["--scenarios", "inagg", "--codec", "i32", "--workers", "2"])
        .args(["--link-rate", "200mbit", "--tcp-bulk", "2"])
        .args(["--elements", "1000000", "--iters", "8"])
        .arg("--inagg-bin")
        .arg(env!("CARGO_BIN_EXE_inagg"))
        .arg("--out")
        .arg(&dir.0);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(300));
    assert!(st.success(), "sharing.py failed: {out}\n{err}");
    let job: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("inagg/job.json")).expect("job.json"),
    )
    .expect("the job's JSON");
    assert_eq!(job["within_bound"], true, "{job}");
    // Two TCP flows and two ranks across the 200 Mbit/s bottleneck: a fair share is
    // 50 Mbit/s; none may fall below a fifth of it.
    let flows = std::fs::read_to_string(dir.0.join("sharing.csv")).expect("sharing.csv");
    let rates: Vec<(String, f64)> = flows
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), f[2].parse().expect("Mbit/s"))
        })
        .collect();
    assert_eq!(rates.len(), 4, "{flows}");
    for (flow, mbit) in &rates {
        assert!(*mbit >= 50.0 / 5.0, "{flow} got {mbit} Mbit/s: {flows}");
    }
    // Every flow is counted at the bottleneck over one window: together they fit the
    // link (the shaper's burst allows a little over).
    let total: f64 = rates.iter().map(|(_, m)| m).sum();
    assert!(total <= 200.0 * 1.05, "{total} Mbit/s through 200: {flows}");
    assert!(dir.0.join("sharing-inagg.png").exists());
    assert!(job["dips"].is_u64(), "the job's dips are counted: {job}");
    assert!(
        job["overflows"].is_u64(),
        "the job's loss bursts are counted: {job}"
    );
    // The same run over time, and a directory that holds no run.
    let png = dir.0.join("timeline.png");
    let png_arg = png.to_str().expect("a UTF-8 temporary path");
    let timeline = |run: &str, args: &[&str]| {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script("sharing_timeline.py"))
            .args(args)
            .arg(dir.0.join(run));
        run_bounded(cmd, Duration::from_secs(120))
    };
    let (st, out, err) = timeline("inagg", &["--out", png_arg]);
    assert!(st.success(), "sharing_timeline.py failed: {out}\n{err}");
    assert!(png.exists());
    let (st, _, err) = timeline("nothing-here", &["--out", png_arg]);
    assert!(!st.success() && err.contains("sharing_timeline: "), "{err}");
    // The probe's slowest round trips in the job's window, each beside the rates around
    // it; and a call that asks for nothing.
    let (st, out, err) = timeline("inagg", &["--slowest", "3"]);
    assert!(
        st.success(),
        "sharing_timeline.py --slowest failed: {out}\n{err}"
    );
    let rows: Vec<Vec<f64>> = out
        .lines()
        .skip_while(|l| !l.contains("TCP Mbit/s"))
        .skip(1)
        // A bucket outside the meter reads "-".
        .map(|l| {
            l.split_whitespace()
                .map(|f| f.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    // Seconds into the window, the round trip, three TCP rates and three of the job's;
    // the slowest are listed in time order.
    assert!(rows.iter().all(|r| r.len() == 8 && r[1] > 0.0), "{out}");
    assert!(rows.windows(2).all(|w| w[0][0] <= w[1][0]), "{out}");
    let (st, _, err) = timeline("inagg", &[]);
    assert!(!st.success() && err.contains("give --out PNG"), "{err}");
}

#[test]
fn netlab_refuses_bad_flags() {
    let script = script("netlab.sh");
    for (args, want) in [
        (&["--workers", "0", "--", "true"][..], "--workers must be"),
        (
            &["--link-rate", "fast", "--", "true"][..],
            "--link-rate must",
        ),
        (&["--workers", "2"][..], "no command"),
        (
            &["--aggregator-link-rate", "fast", "--", "true"][..],
            "--aggregator-link-rate must",
        ),
        (&["--tcp-bulk", "x", "--", "true"][..], "--tcp-bulk must"),
        (
            &["--tcp-congestion", "nosuch", "--", "true"][..],
            "--tcp-congestion nosuch is not allowed",
        ),
        (
            &["--workers", "2", "--racks", "3", "--", "true"][..],
            "--racks must be between 0 and --workers (2)",
        ),
        (
            &["--workers", "2", "--racks", "2", "--", "true"][..],
            "--racks needs --uplink-rate",
        ),
        (
            &["--uplink-rate", "1gbit", "--", "true"][..],
            "--uplink-rate needs --racks",
        ),
    ] {
        let out = Command::new(&script).args(args).output().expect("run");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The uplinks' counters, `rx tx` per rack, as the lab's command prints them.
fn uplink_counters(err: &str, tag: &str) -> Vec<(u64, u64)> {
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .unwrap_or_else(|| panic!("no {tag} line in: {err}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().expect("a counter"))
        .collect();
    n.chunks(2).map(|c| (c[0], c[1])).collect()
}

/// Issue 30's process test: 2 racks of 2 workers, a rack aggregator on each rack's
/// bridge under the aggregator at the spine (`inagg bench --racks 2`). The i32 and i8
/// results are the flat run's in the same lab bit for bit (equal checksums), and
/// each uplink carries one partial sum up and one result down per chunk: fewer bytes
/// than the flat job's two ranks' contributions and results.
#[test]
#[cfg_attr(
    inagg_no_netns,
    ignore = "needs CAP_NET_ADMIN and iproute2 (ip, tc) to create network namespaces"
)]
fn two_levels_in_the_lab_give_the_flat_results_with_less_on_the_uplinks() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN) and iproute2"
    );
    let run = r#"c() { printf '%s' "$1"; for k in $(seq 0 $((INAGG_NETLAB_RACKS - 1))); do for d in rx tx; do printf ' %s' "$(ip netns exec "$INAGG_NETLAB_BRIDGE_NETNS" cat "/sys/class/net/$INAGG_NETLAB_UPLINK_DEV$k/statistics/${d}_bytes")"; done; done; echo; }; b="$0 bench --workers 4 --elements 300000 --codec i32,i8 --iters 2 --warmup 1 --json"; c 'flat before:' >&2; $b || exit 1; c 'flat after:' >&2; $b --racks 2 || exit 1; c 'racks after:' >&2"#;
    let mut cmd = Command::new(script("netlab.sh"));
    cmd.args(["--workers", "4", "--link-rate", "1gbit"])
        .args(["--racks", "2", "--uplink-rate", "200mbit", "--"])
        .args(["sh", "-c", run])
        .arg(env!("CARGO_BIN_EXE_inagg"));
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(240));
    assert!(st.success(), "netlab failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 4, "{out}");
    let (flat, racks) = rows.split_at(2);
    for (f, r) in flat.iter().zip(racks) {
        assert_eq!(f["codec"], r["codec"], "{out}");
        assert!(f.get("racks").is_none() && r["racks"] == 2, "{f} {r}");
        for row in [f, r] {
            assert_eq!(row["within_bound"], true, "{row}");
            assert_eq!(row["ranks_identical"], true, "{row}");
        }
        assert_eq!(
            f["result_checksum"], r["result_checksum"],
            "{}: two levels changed the result",
            f["codec"]
        );
    }
    let counts = |tag| uplink_counters(&err, tag);
    let (before, mid, after) = (
        counts("flat before:"),
        counts("flat after:"),
        counts("racks after:"),
    );
    for k in 0..2 {
        let flat_bytes = (mid[k].0 - before[k].0, mid[k].1 - before[k].1);
        let rack_bytes = (after[k].0 - mid[k].0, after[k].1 - mid[k].1);
        // Up: one partial sum of at most 10 bits per element for i8 and 32 for i32,
        // against two ranks' 8 and 32; down: one result against two.
        assert!(
            rack_bytes.0 * 4 < flat_bytes.0 * 3 && rack_bytes.1 * 5 < flat_bytes.1 * 3,
            "rack {k}: up and down {rack_bytes:?} with racks, {flat_bytes:?} flat"
        );
    }
}

#[test]
#[cfg_attr(
    inagg_no_netns,
    ignore = "needs CAP_NET_ADMIN and iproute2 (ip, tc) to create network namespaces"
)]
fn netlab_puts_racks_behind_uplinks_that_a_flat_job_crosses() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN) and iproute2"
    );
    // Around the bench, every uplink's spine end: rx (up from the rack), tx (down).
    let counters = r#"c() { printf '%s' "$1"; for k in $(seq 0 $((INAGG_NETLAB_RACKS - 1))); do for d in rx tx; do printf ' %s' "$(ip netns exec "$INAGG_NETLAB_BRIDGE_NETNS" cat "/sys/class/net/$INAGG_NETLAB_UPLINK_DEV$k/statistics/${d}_bytes")"; done; done; echo; }; c 'before:' >&2; "$0" bench --workers 4 --elements 300000 --codec i32 --iters 3 --warmup 1 --json; c 'after:' >&2"#;
    let mut cmd = Command::new(script("netlab.sh"));
    cmd.args(["--workers", "4", "--link-rate", "1gbit"])
        .args(["--racks", "2", "--uplink-rate", "200mbit", "--"])
        .args(["sh", "-c", counters])
        .arg(env!("CARGO_BIN_EXE_inagg"));
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(180));
    assert!(st.success(), "netlab failed: {out}\n{err}");
    assert!(err.contains("in 2 racks behind 200mbit uplinks"), "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{out}");
    let row = &rows[0];
    assert_eq!(row["within_bound"], true, "{row}");
    let (before, after) = (
        uplink_counters(&err, "before:"),
        uplink_counters(&err, "after:"),
    );
    assert_eq!((before.len(), after.len()), (2, 2), "{err}");
    // Every rank's contributions went up its rack's uplink to the aggregator at the
    // spine, and its results came down: two ranks' worth per rack, per timed
    // allreduce at least.
    let sent = row["bytes_sent_per_worker"].as_u64().expect("bytes sent");
    let recv = row["bytes_recv_per_worker"]
        .as_u64()
        .expect("bytes received");
    for k in 0..2 {
        let (up, down) = (after[k].0 - before[k].0, after[k].1 - before[k].1);
        assert!(
            up >= 2 * 3 * sent,
            "rack {k}: {up} bytes up, {sent} per rank and allreduce"
        );
        assert!(
            down >= 2 * 3 * recv,
            "rack {k}: {down} bytes down, {recv} per rank and allreduce"
        );
    }
}

#[test]
#[cfg_attr(
    inagg_no_netns,
    ignore = "needs CAP_NET_ADMIN and iproute2 (ip, tc) to create network namespaces"
)]
fn the_queue_rule_narrows_windows_behind_a_queueing_link_that_marks_nothing() {
    assert!(
        namespaces_work(),
        "`ip netns add` failed: this test needs root (or CAP_NET_ADMIN) and iproute2"
    );
    // Each rank's own shaped link queues its 64 slots of 8 KiB (fewer bytes than the
    // shaper holds; nothing marks): with the queue rule the windows halve.
    // Same sums either way.
    let both = r#""$0" bench --workers 2 --elements 2000000 --codec i32 --iters 3 --json && "$0" bench --workers 2 --elements 2000000 --codec i32 --iters 3 --json --queue-target 0"#;
    let mut cmd = Command::new(script("netlab.sh"));
    cmd.args(["--workers", "2", "--link-rate", "200mbit", "--"])
        .args(["sh", "-c", both])
        .arg(env!("CARGO_BIN_EXE_inagg"));
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(180));
    assert!(st.success(), "netlab failed: {out}\n{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{out}");
    let (ruled, off) = (&rows[0], &rows[1]);
    for r in &rows {
        assert_eq!(r["within_bound"], true, "{r}");
        assert_eq!(r["marks"], 0, "{r}");
        assert_eq!(r["window"], 64, "{r}");
    }
    assert_eq!(ruled["result_checksum"], off["result_checksum"]);
    let window = |r: &serde_json::Value| r["congestion_window_min"].as_u64().expect("window");
    assert!(window(ruled) <= 32, "with the rule: {ruled}");
    // Retransmissions while the queue builds can halve a window too: the rule's
    // narrowing shows in a run without any, or as a narrower window than the run
    // without the rule.
    assert!(
        ruled["retransmissions"] == 0 || window(ruled) < window(off),
        "with the rule: {ruled}\nwithout: {off}"
    );
}
