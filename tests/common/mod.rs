//! Helpers for tests that run the real `inagg` binary: processes that are always
//! reaped, bounded waits, the aggregator's address from its first line.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn inagg() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_inagg"));
    c.stdin(Stdio::null());
    c
}

#[path = "../../src/children.rs"]
#[allow(dead_code, unreachable_pub)]
mod children;

/// A child process, killed when dropped: the binary's process supervision
/// (`src/children.rs`), with its output collected where asked.
pub struct Proc {
    proc: children::Proc,
    /// Threads reading all of stdout and of stderr, from [`Proc::spawn_collected`].
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

impl std::ops::Deref for Proc {
    type Target = children::Proc;
    fn deref(&self) -> &children::Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut children::Proc {
        &mut self.proc
    }
}

/// Reads all of a child's output on a thread of its own, kept for later.
fn collect(r: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
}

impl Proc {
    /// Spawns `cmd` with its output piped and left unread, for callers that read the
    /// first lines as they come; a child that writes more than a pipe holds then
    /// blocks until someone reads.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let proc = children::Proc::spawn_unlinked(&mut cmd, "inagg").expect("spawn inagg");
        Proc {
            proc,
            out: None,
            err: None,
        }
    }

    /// Spawns `cmd` with threads collecting all of its output as it comes, so that it
    /// never blocks on a full pipe (a worker's `--json` report of thousands of timed
    /// calls outgrew the 64 KiB pipe, and the worker never exited).
    pub fn spawn_collected(cmd: Command) -> Proc {
        let mut p = Proc::spawn(cmd);
        p.out = collect(p.child.stdout.take());
        p.err = collect(p.child.stderr.take());
        p
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits up to `limit`; None if still running.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Everything it wrote to stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        if let Some(h) = self.err.take() {
            return h.join().expect("stderr reader");
        }
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Everything it wrote to stdout (after it exited).
    pub fn stdout(&mut self) -> String {
        if let Some(h) = self.out.take() {
            return h.join().expect("stdout reader");
        }
        let mut s = String::new();
        if let Some(mut e) = self.child.stdout.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// The first line a server process prints on stdout (its address); the rest of its
/// stdout is not read.
fn first_line(p: &mut Proc) -> String {
    let out = p.child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read address");
    drain(reader);
    line
}

/// Reads the rest of a child's output on a thread of its own, so that the child
/// never blocks on a full pipe nor meets a closed one.
fn drain(mut r: impl Read + Send + 'static) {
    std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
}

/// Starts `inagg aggregator` on 127.0.0.1 with `extra` flags; returns it and its address.
pub fn aggregator(extra: &[&str]) -> (Proc, SocketAddr) {
    aggregator_on("127.0.0.1:0", extra)
}

/// `inagg aggregator --listen LISTEN`, as [`aggregator`].
pub fn aggregator_on(listen: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = inagg();
    cmd.args(["aggregator", "--listen", listen]).args(extra);
    let mut p = Proc::spawn(cmd);
    let addr = listening_address(&mut p, "aggregator")
        .parse()
        .expect("address");
    (p, addr)
}

/// The address a server (`what`) prints as its first line, `listening on ADDR`.
pub fn listening_address(p: &mut Proc, what: &str) -> String {
    let line = first_line(p);
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{what} said {line:?}"))
        .to_string()
}

/// Starts `inagg relay` in front of `upstream` with `faults`; returns it and the
/// address workers use.
pub fn relay(upstream: SocketAddr, faults: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = inagg();
    cmd.args(["relay", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string())
        .args(faults);
    let mut p = Proc::spawn(cmd);
    let out = p.child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("relay's address");
    // "relaying on ADDR to UPSTREAM"
    let addr = line
        .strip_prefix("relaying on ")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("relay said {line:?}"))
        .parse()
        .expect("address");
    (p, addr)
}

/// `inagg worker` flags for rank `rank` of `job`.
pub fn worker(addr: SocketAddr, job: u32, rank: u16, world: u16, extra: &[&str]) -> Proc {
    let mut cmd = inagg();
    cmd.args([
        "worker",
        "--aggregator",
        &addr.to_string(),
        "--job",
        &job.to_string(),
        "--rank",
        &rank.to_string(),
        "--world",
        &world.to_string(),
    ])
    .args(extra);
    Proc::spawn_collected(cmd)
}

/// Runs `cmd` to completion, killing it and failing the test if it takes longer than
/// `limit`. Returns (status, stdout, stderr).
pub fn run_bounded(cmd: Command, limit: Duration) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn_collected(cmd);
    let Some(status) = p.wait_for(limit) else {
        drop(p);
        panic!("still running after {limit:?}");
    };
    (status, p.stdout(), p.stderr())
}

/// One JSON value per non-empty line of `out` (what `--json` prints).
pub fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs `inagg bench` with `args` (bounded by 240 s), fails the test if it fails,
/// and returns its JSON rows.
pub fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = inagg();
    cmd.arg("bench").args(args);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(240));
    assert!(st.success(), "bench {args:?} failed: {out}\n{err}");
    json_lines(&out)
}

/// `inagg bench ARGS` for one codec: its one JSON row.
pub fn bench_row(args: &[&str]) -> serde_json::Value {
    let rows = bench_json(args);
    assert_eq!(rows.len(), 1, "bench {args:?}: {rows:?}");
    rows[0].clone()
}

/// Runs a new two-rank job `job` on the aggregator at `addr` and asserts that it
/// finishes: the aggregator serves on after whatever the test did to it.
pub fn assert_new_job_runs(addr: SocketAddr, job: u32, extra: &[&str]) {
    let mut args = vec!["--elements", "50000"];
    args.extend_from_slice(extra);
    let mut fresh: Vec<_> = (0..2).map(|r| worker(addr, job, r, 2, &args)).collect();
    for w in &mut fresh {
        let st = w
            .wait_for(Duration::from_secs(30))
            .expect("new job finishes");
        assert!(st.success(), "{}", w.stderr());
    }
}

/// Waits for `w`, which must fail within `limit`; returns its stderr.
pub fn expect_failure(w: &mut Proc, limit: Duration, what: &str) -> String {
    let st = w
        .wait_for(limit)
        .unwrap_or_else(|| panic!("{what}: still running after {limit:?}"));
    assert!(!st.success(), "{what}: succeeded");
    w.stderr()
}

/// Every rank in `ranks` fails within `limit` (each wait a hang guard), saying one
/// of `any_of`.
pub fn expect_every_failure(ranks: &mut [Proc], limit: Duration, any_of: &[&str]) {
    for (r, w) in ranks.iter_mut().enumerate() {
        let err = expect_failure(w, limit, &format!("rank {r}"));
        assert!(
            any_of.iter().any(|s| err.contains(s)),
            "rank {r} said: {err}"
        );
    }
}

/// An aggregator serving QUIC only on 127.0.0.1, its certificate and key generated in
/// `dir`.
pub struct QuicAggregator {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub cert: std::path::PathBuf,
}

/// Starts `inagg aggregator --quic 127.0.0.1:0` with its identity in `dir`.
pub fn quic_aggregator(dir: &std::path::Path, extra: &[&str]) -> QuicAggregator {
    let cert = dir.join("agg.crt.pem");
    let key = dir.join("agg.key.pem");
    let mut cmd = inagg();
    cmd.args(["aggregator", "--quic", "127.0.0.1:0", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(extra);
    let mut p = Proc::spawn(cmd);
    let line = first_line(&mut p);
    // "quic on ADDR sha256 HEX certificate FILE"
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(
        words.len() >= 6 && words[0] == "quic" && words[3] == "sha256",
        "aggregator said {line:?}"
    );
    QuicAggregator {
        proc: p,
        addr: words[2].parse().expect("address"),
        fingerprint: words[4].to_string(),
        cert,
    }
}

/// A fresh directory for one test's files, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p =
            std::env::temp_dir().join(format!("inagg-test-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `host:port` of the metrics endpoint an aggregator started with `--metrics`
/// printed on stderr (after its certificate's, where it generated one).
pub fn metrics_address(agg: &mut Proc) -> String {
    let err = agg.child.stderr.take().expect("stderr");
    let mut reader = BufReader::new(err);
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("metrics line");
        assert!(n > 0, "no metrics address; aggregator said {said:?}");
        if let Some(addr) = line
            .trim()
            .strip_prefix("metrics on http://")
            .and_then(|s| s.strip_suffix("/metrics"))
        {
            drain(reader);
            return addr.to_string();
        }
        said.push_str(&line);
    }
}

/// SIGKILLs rank `victim` of the running workers `ws` and asserts that every other
/// rank fails, naming the victim and the abort (what the aggregator tells them; a
/// rank that gave up on its own would say otherwise). `limit` bounds each wait, a
/// guard against hanging, not a speed asked for.
pub fn kill_rank_and_expect_aborts(ws: &mut [Proc], victim: usize, limit: Duration) {
    assert!(
        ws.iter_mut().all(|w| w.running()),
        "workers should be mid-run"
    );
    ws[victim].signal(libc::SIGKILL);
    for (r, w) in ws.iter_mut().enumerate().filter(|(r, _)| *r != victim) {
        let what = format!("rank {r} after rank {victim} died");
        let err = expect_failure(w, limit, &what);
        assert!(
            err.contains(&format!("rank {victim}")) && err.contains("aborted"),
            "rank {r} said: {err}"
        );
    }
}

/// The response to `GET /metrics` from the endpoint at `addr` (`host:port`).
pub fn scrape(addr: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// The value of the series `series` (name and labels, as printed) in a scrape.
pub fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until job `job` has completed `chunks` chunks on the aggregator whose
/// metrics are at `metrics`: its ranks have joined and are mid-run, an order a sleep
/// would only guess. Fails after `limit`, a guard against hanging.
pub fn wait_for_chunks(metrics: &str, job: u32, chunks: f64, limit: Duration) {
    let series = format!("inagg_job_chunks_completed_total{{job=\"{job}\"}}");
    wait_for_series(metrics, &series, chunks, limit);
}

/// Waits until `series` reaches `at_least` on the metrics endpoint at `metrics`
/// (published a few times a second). Fails after `limit`, a guard against hanging.
pub fn wait_for_series(metrics: &str, series: &str, at_least: f64, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        let body = scrape(metrics);
        if value(&body, series).is_some_and(|v| v >= at_least) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{series} did not reach {at_least}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
