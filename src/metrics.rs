//! `inagg aggregator --metrics ADDR`: the aggregator's counters in Prometheus text
//! format over HTTP. The server loop hands its state machine to [`publish`] a few
//! times a second; the `metrics` facade with metrics-exporter-prometheus keeps and
//! renders the values; tiny_http answers the scrapes on a thread of its own.

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use inagg_aggregator::DropReason;
use inagg_proto::aggregator::{Aggregator, Stats};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the recorder and serves `GET /metrics` on `addr`; returns the bound
/// address (port 0 picks one).
pub fn serve(addr: SocketAddr) -> Result<SocketAddr> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| anyhow!("{e}"))?;
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .context("metrics: not an IP listener")?;
    std::thread::Builder::new()
        .name("inagg-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url().starts_with("/metrics") {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4"[..],
                    );
                    let r = tiny_http::Response::from_string(handle.render());
                    match header {
                        Ok(h) => r.with_header(h),
                        Err(()) => r,
                    }
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .context("metrics: starting the HTTP thread")?;
    Ok(bound)
}

/// The labels of a series: the shard's number when there are several, and the job's
/// id for per-job series.
fn labels(shard: Option<u16>, job: Option<u32>) -> Vec<(&'static str, String)> {
    let shard = shard.map(|k| ("shard", k.to_string()));
    let job = job.map(|j| ("job", j.to_string()));
    shard.into_iter().chain(job).collect()
}

fn counters(prefix: &str, s: &Stats, shard: Option<u16>, job: Option<u32>) {
    let labels = labels(shard, job);
    let set = |name: &str, v: u64| {
        counter!(format!("{prefix}{name}_total"), &labels).absolute(v);
    };
    set("packets_received", s.packets_received);
    set("bytes_received", s.bytes_received);
    set("packets_sent", s.packets_sent);
    set("bytes_sent", s.bytes_sent);
    set("contributions", s.contributions);
    set("chunks_completed", s.chunks_completed);
    set("retransmissions_answered", s.copies_answered);
    set("held_answered", s.probes_held);
    set("marks", s.marks);
    if job.is_none() {
        set("pending_evicted", s.pending_evicted);
    }
    for r in DropReason::ALL {
        let n = s.dropped(r);
        if n > 0 || job.is_none() {
            let mut l = labels.clone();
            l.push(("reason", r.name().to_string()));
            counter!(format!("{prefix}dropped_total"), &l).absolute(n);
        }
    }
}

/// Publishes the aggregator's totals and every present job's counters; those of one
/// shard of several (`inagg aggregator --threads`) carry its number as `shard`.
pub fn publish(agg: &Aggregator<SocketAddr>, shard: Option<u16>) {
    counters("inagg_", agg.stats(), shard, None);
    let jobs = agg.jobs();
    let totals = labels(shard, None);
    gauge!("inagg_jobs", &totals).set(jobs.len() as f64);
    gauge!("inagg_slot_memory_bytes", &totals).set(agg.slot_memory() as f64);
    if let Some(budget) = agg.slot_budget() {
        gauge!("inagg_slot_memory_budget_bytes", &totals).set(budget as f64);
    }
    for j in jobs {
        if let Some(s) = agg.job_stats(j) {
            counters("inagg_job_", s, shard, Some(j));
        }
        let slots = agg.job_slots(j).unwrap_or(0);
        gauge!("inagg_job_slots", &labels(shard, Some(j))).set(f64::from(slots));
    }
}
