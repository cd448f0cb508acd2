//! The commands that start processes (`bench`, `sweep`, `demo`) leave none behind,
//! however they end: SIGTERM or SIGINT (they stop their children, then exit with
//! 128 + the signal) or SIGKILL (each child gets SIGTERM from the kernel when its
//! parent dies). Every process started under the command is found in `/proc` while
//! it runs and must be gone afterwards.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{inagg, Proc};

/// A process as `/proc/PID/stat` shows it: its pid, parent, state and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pid: u32,
    ppid: u32,
    state: char,
    start: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: parse after it.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(Stat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        // Field 22 of stat(5), the 20th after the name.
        start: f.get(19)?.parse().ok()?,
    })
}

/// Every live process below `root`.
fn descendants(root: u32) -> Vec<Stat> {
    let all: Vec<Stat> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect();
    let mut out: Vec<Stat> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for s in all.iter().filter(|s| s.ppid == p && s.state != 'Z') {
            out.push(*s);
            frontier.push(s.pid);
        }
    }
    out
}

/// Whether the process recorded as `s` still runs (not reaped, not a zombie, and its
/// pid not reused since).
fn alive(s: &Stat) -> bool {
    stat(s.pid).is_some_and(|now| now.start == s.start && now.state != 'Z')
}

/// Starts `inagg args`, waits until at least `n` processes run below it, and returns
/// it with them.
fn start_with_children(args: &[&str], n: usize) -> (Proc, Vec<Stat>) {
    let mut cmd = inagg();
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut p = Proc::spawn_collected(cmd);
    let pid = p.child.id();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let below = descendants(pid);
        if below.len() >= n {
            return (p, below);
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!(
                "inagg {args:?} ended ({st}) before starting {n} processes: {}",
                p.stderr()
            );
        }
        assert!(
            Instant::now() < end,
            "inagg {args:?} started {} of {n} processes in 60 s",
            below.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to the command, checks how it exits, and that every process that ran
/// below it is gone.
fn signal_and_check(mut p: Proc, below: Vec<Stat>, sig: libc::c_int, what: &str) {
    p.signal(sig);
    let st = p
        .wait_for(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{what}: still running 30 s after signal {sig}"));
    if sig == libc::SIGKILL {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{what}: {st}");
    } else {
        assert_eq!(st.code(), Some(128 + sig), "{what}: {st}\n{}", p.stderr());
    }
    // Children stop within their grace period (SIGKILL after 5 s); orphans of a
    // SIGKILLed parent get their SIGTERM at once.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<_> = below.iter().filter(|s| alive(s)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: processes left behind 20 s after it ended: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bench that would run for hours: an aggregator and two workers.
const LONG_BENCH: &[&str] = &[
    "bench",
    "--workers",
    "2",
    "--elements",
    "100000",
    "--iters",
    "100000000",
    "--warmup",
    "0",
    "--codec",
    "f32",
    "--timeout-s",
    "3600",
];

#[test]
fn sigterm_to_bench_leaves_no_process_behind() {
    let (p, below) = start_with_children(LONG_BENCH, 3);
    signal_and_check(p, below, libc::SIGTERM, "bench, SIGTERM");
}

#[test]
fn sigint_to_bench_with_a_relay_leaves_no_process_behind() {
    let mut args = LONG_BENCH.to_vec();
    args.extend(["--loss", "0.001"]);
    // The aggregator, the relay and two workers.
    let (p, below) = start_with_children(&args, 4);
    signal_and_check(p, below, libc::SIGINT, "bench with a relay, SIGINT");
}

#[test]
fn sigkill_of_bench_still_stops_its_children() {
    let (p, below) = start_with_children(LONG_BENCH, 3);
    signal_and_check(p, below, libc::SIGKILL, "bench, SIGKILL");
}

#[test]
fn sigterm_to_sweep_leaves_no_process_behind() {
    let out = common::TempDir::new("signals-sweep");
    let dir = out.0.display().to_string();
    let args = [
        "sweep",
        "--workers",
        "2",
        "--codec",
        "f32",
        "--elements",
        "100000",
        "--iters",
        "100000000",
        "--out",
        &dir,
    ];
    let (p, below) = start_with_children(&args, 3);
    signal_and_check(p, below, libc::SIGTERM, "sweep, SIGTERM");
}

#[test]
fn sigterm_to_demo_leaves_no_process_behind() {
    let out = common::TempDir::new("signals-demo");
    let dir = out.0.display().to_string();
    let args = [
        "demo",
        "--workers",
        "2",
        "--codecs",
        "f32",
        "--steps",
        "1000000",
        "--out",
        &dir,
    ];
    let (p, below) = start_with_children(&args, 3);
    signal_and_check(p, below, libc::SIGTERM, "demo, SIGTERM");
}
