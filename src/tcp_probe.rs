//! `inagg tcp-probe`: the short-flow probe of the emulated cluster's cross traffic. A
//! server answers each fixed-size request with a response of the same size; a client
//! sends requests one at a time over one TCP connection (Nagle off), spaced by an
//! interval, and reports the latency of each round trip as percentiles. It measures
//! what a job's traffic does to the tail latency of short flows crossing the same
//! link (RPCs, parameter lookups).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Flags of `inagg tcp-probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Answer requests on this address (the server side).
    #[arg(long, conflicts_with = "to")]
    pub serve: Option<SocketAddr>,
    /// Stop after this many seconds: the server stops serving, the client stops
    /// sending and reports the requests it completed.
    #[arg(long = "for", value_name = "SECONDS", default_value_t = 3600.0)]
    pub for_s: f64,
    /// Send requests to the server at this address (the client side).
    #[arg(long, required_unless_present = "serve")]
    pub to: Option<SocketAddr>,
    /// Requests to send, one at a time (fewer if --for passes first or SIGINT or
    /// SIGTERM comes: the report covers the completed ones).
    #[arg(long, default_value_t = 1000)]
    pub requests: u32,
    /// Bytes per request and per response.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Pause between one response and the next request, in milliseconds.
    #[arg(long, default_value_t = 10.0)]
    pub interval_ms: f64,
    /// A request unanswered after this many seconds ends the run with an error.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// With --json, also list every round trip as `[sent_unix_s, ms]` in `samples`,
    /// so that a report can take percentiles over a window of its own.
    #[arg(long, requires = "json")]
    pub samples: bool,
}

/// Largest request the server takes.
const MAX_SIZE: usize = 1 << 20;

/// What a client run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Round trips completed.
    pub requests: u32,
    pub size: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Every round trip as (when it was sent, Unix seconds; milliseconds), in order;
    /// only with `--samples`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<(f64, f64)>>,
}

pub fn run(a: &Args) -> Result<()> {
    if a.size == 0 || a.size > MAX_SIZE {
        bail!("--size must be between 1 and {MAX_SIZE} bytes");
    }
    if !(a.timeout_s > 0.0 && a.timeout_s.is_finite()) {
        bail!("--timeout-s must be a positive number of seconds");
    }
    if !(a.interval_ms >= 0.0 && a.interval_ms.is_finite()) {
        bail!("--interval-ms must be zero or more");
    }
    match (a.serve, a.to) {
        (Some(at), _) => serve(at, a.size, secs(a.for_s, "--for")?),
        (None, Some(to)) => {
            let r = probe(to, a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} requests of {} B to {to}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                    r.requests, r.size, r.p50_ms, r.p99_ms, r.max_ms
                );
            }
            Ok(())
        }
        (None, None) => bail!("give --serve ADDR or --to ADDR"),
    }
}

fn secs(s: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{flag} must be a number of seconds"))
}

/// Answers every connection's requests (each `size` bytes) with as many bytes, a
/// thread per connection, until `for_s` has passed.
fn serve(at: SocketAddr, size: usize, for_s: Duration) -> Result<()> {
    let listener = TcpListener::bind(at).with_context(|| format!("binding {at}"))?;
    listener.set_nonblocking(true)?;
    // The first line says where, as `inagg aggregator` does (for port 0).
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let end = Instant::now() + for_s;
    while Instant::now() < end {
        match listener.accept() {
            Ok((conn, _)) => {
                std::thread::spawn(move || {
                    // A peer that goes away ends its connection only.
                    let _ = answer(conn, size, end);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting a connection"),
        }
    }
    Ok(())
}

fn answer(mut conn: TcpStream, size: usize, end: Instant) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = vec![0u8; size];
    while Instant::now() < end {
        match conn.read_exact(&mut buf) {
            Ok(()) => conn.write_all(&buf)?,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `a.requests` requests one at a time and times each round trip, until done,
/// `--for` has passed or a signal asks it to stop.
fn probe(to: SocketAddr, a: &Args) -> Result<Report> {
    let timeout = secs(a.timeout_s, "--timeout-s")?;
    let end = Instant::now() + secs(a.for_s, "--for")?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handler")?;
    }
    let mut conn = connect(to, timeout)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let interval = Duration::from_secs_f64(a.interval_ms / 1e3);
    let request = vec![0x5au8; a.size];
    let mut response = vec![0u8; a.size];
    let mut times = Vec::with_capacity(a.requests as usize);
    let mut sent_at = Vec::new();
    for i in 0..a.requests {
        if stop.load(Ordering::Relaxed) || Instant::now() >= end {
            break;
        }
        if a.samples {
            sent_at.push(unix_s());
        }
        let t = Instant::now();
        conn.write_all(&request)
            .and_then(|()| conn.read_exact(&mut response))
            .with_context(|| format!("request {} of {} to {to}", i + 1, a.requests))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(interval);
    }
    let done = times.len() as u32;
    let samples = a
        .samples
        .then(|| sent_at.iter().copied().zip(times.iter().copied()).collect());
    Ok(Report {
        samples,
        ..summarize(done, a.size, &mut times)
    })
}

/// The wall clock in Unix seconds (0 before 1970, which no lab clock is).
fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Connects, trying again while the server is not there yet (refused) until
/// `timeout` has passed.
fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&to, left.max(Duration::from_millis(1))) {
            Ok(c) => return Ok(c),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() + Duration::from_millis(50) < end =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to the probe server at {to}"))
            }
        }
    }
}

fn summarize(requests: u32, size: usize, times: &mut [f64]) -> Report {
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if times.is_empty() {
            return 0.0;
        }
        // The nearest rank: the smallest time at or above the q-th fraction.
        let i = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
        times[i]
    };
    Report {
        requests,
        size,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: times.last().copied().unwrap_or(0.0),
        mean_ms: if times.is_empty() {
            0.0
        } else {
            times.iter().sum::<f64>() / times.len() as f64
        },
        samples: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_ranks() {
        let mut t: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let r = summarize(100, 1024, &mut t);
        assert_eq!((r.p50_ms, r.p99_ms, r.max_ms), (50.0, 99.0, 100.0));
        assert!((r.mean_ms - 50.5).abs() < 1e-9);
    }
}
