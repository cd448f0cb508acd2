//! `inagg bench`: one aggregator process and N worker processes on 127.0.0.1, warm-up
//! and timed allreduces of seeded tensors, every rank checked against the exact sum.
//! What it runs is a [`JobSpec`] (its flags); the jobs, their reports and rows are
//! the `job` module's.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::args::Transport;
use crate::harness::{
    start_aggregator_in, start_quic_aggregator_in, start_rack_aggregator_in, start_relay,
    QuicIdentity,
};
use crate::job::{finish_job, row, spawn_job, JobSpec};

/// Flags of `inagg bench`.
pub type Args = JobSpec;

pub fn run(a: &Args) -> Result<()> {
    let quic = match a.transport {
        Transport::Quic => Some(QuicIdentity::generate()?),
        Transport::Udp => None,
    };
    let mut a = a.clone();
    a.ca = quic.as_ref().map(|q| q.cert.clone());
    let a = &a;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let faults = a.faults;
    faults.validate()?;
    if !faults.is_clean() && a.netlab.agg_netns.is_some() {
        bail!("the fault relay runs on 127.0.0.1 and cannot sit inside netlab's namespaces");
    }
    if a.jobs == 0 || a.aggregators == 0 || a.aggregator_threads == 0 {
        bail!("--jobs, --aggregators and --aggregator-threads must be at least 1");
    }
    if a.aggregator_threads > 1 && (quic.is_some() || !faults.is_clean()) {
        bail!(
            "--aggregator-threads shards the UDP aggregator on consecutive ports: not with \
             --transport quic, nor behind the fault relay (one port)"
        );
    }
    crate::args::check_pacing(a.tuning.pacing_gain, quic.is_some())?;
    if a.aggregator_yields.is_some() && quic.is_some() {
        bail!("--aggregator-yields sets the UDP aggregator's spin: not with --transport quic");
    }
    check_racks(a, quic.is_some())?;
    // Aggregators, each with a relay in front when faults are asked for; the workers
    // talk to the relays.
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    // The aggregators' process ids, whose CPU time each codec's row counts.
    let mut agg_pids = Vec::new();
    let mut agg_flags: Vec<String> = a
        .slot_memory
        .iter()
        .flat_map(|b| ["--slot-memory".to_string(), b.to_string()])
        .collect();
    if a.aggregator_threads > 1 {
        agg_flags.extend(["--threads".to_string(), a.aggregator_threads.to_string()]);
    }
    if let Some(y) = a.aggregator_yields {
        agg_flags.extend(["--yields-before-sleep".to_string(), y.to_string()]);
    }
    if a.tuning.no_multicast {
        agg_flags.push("--no-multicast".to_string());
    }
    if a.tuning.no_ecn {
        agg_flags.push("--no-ecn".to_string());
    }
    for _ in 0..a.aggregators {
        let (agg, agg_addr) = match &quic {
            Some(id) => start_quic_aggregator_in(&a.netlab, id, &agg_flags)?,
            None => start_aggregator_in(&a.netlab, &agg_flags)?,
        };
        agg_pids.push(agg.child.id());
        servers.push(agg);
        if faults.is_clean() {
            addrs.push(agg_addr);
        } else {
            let (relay, addr) = start_relay(agg_addr, &faults, a.fault_seed)?;
            servers.push(relay);
            addrs.push(addr);
        }
    }
    // Rack aggregators under the aggregator, each rank joining its rack's.
    let with_racks;
    let a = match a.racks {
        Some(racks) => {
            let mut rack_flags: Vec<String> = agg_flags
                .iter()
                .filter(|f| !f.starts_with("--slot-memory"))
                .cloned()
                .collect();
            // Cannot fail: `check_racks` asked for one aggregator, a UDP one.
            let parent = addrs
                .first()
                .copied()
                .ok_or_else(|| anyhow::anyhow!("no aggregator"))?;
            rack_flags.extend(["--parent".to_string(), parent.to_string()]);
            let mut b = a.clone();
            for k in 0..racks {
                let mut flags = rack_flags.clone();
                flags.extend(
                    ["--rack", &k.to_string(), "--racks", &racks.to_string()].map(String::from),
                );
                let (rack, addr) = start_rack_aggregator_in(&a.netlab, k, &flags)?;
                agg_pids.push(rack.child.id());
                servers.push(rack);
                b.rack_aggs.push(addr);
            }
            with_racks = b;
            &with_racks
        }
        None => a,
    };
    let with_standby;
    let a = if a.failover_standby {
        let (standby, addr) = match &quic {
            Some(id) => start_quic_aggregator_in(&a.netlab, id, &agg_flags)?,
            None => start_aggregator_in(&a.netlab, &agg_flags)?,
        };
        servers.push(standby);
        let mut b = a.clone();
        b.standby = Some(addr);
        with_standby = b;
        &with_standby
    } else {
        a
    };
    if !a.json {
        println!(
            "inagg bench: {} job(s) of {} workers, {} elements, window {}, {} warm-up + {} timed allreduces, aggregator(s) {:?}",
            a.jobs,
            a.workers,
            a.elements,
            a.tuning
                .window
                .map_or_else(|| "by codec".to_string(), |w| w.to_string()),
            a.runs.warmup,
            a.runs.iters,
            addrs
        );
        println!(
            "{:<6} {:>10} {:>12} {:>10} {:>14} {:>14} {:>10} {:>10} {:>6} {:>5}",
            "codec",
            "median ms",
            "ATE/s",
            "algbw GB/s",
            "sent/worker",
            "recv/worker",
            "max err",
            "rel l2",
            "retx",
            "ok"
        );
    }
    let mut wrong = Vec::new();
    for (i, codec) in a.codec.iter().map(|c| c.name()).enumerate() {
        let first = 1 + (i * usize::from(a.jobs)) as u32;
        let agg_cpu_before: Option<f64> = agg_pids.iter().map(|&p| crate::cputime::of(p)).sum();
        let running = (0..u32::from(a.jobs))
            .map(|j| spawn_job(a, &addrs, first + j, codec))
            .collect::<Result<Vec<_>>>()?;
        let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
        let jobs = running
            .into_iter()
            .map(|j| finish_job(j, deadline, a.timeout_s))
            .collect::<Result<Vec<_>>>()?;
        let agg_cpu_after: Option<f64> = agg_pids.iter().map(|&p| crate::cputime::of(p)).sum();
        // Every job's warm-up and timed allreduces (barriers ride along).
        let served = f64::from(a.jobs) * (a.runs.warmup + a.runs.iters).max(1) as f64;
        let agg_cpu = agg_cpu_before
            .zip(agg_cpu_after)
            .map(|(b, e)| (e - b).max(0.0) / served);
        let r = row(a, codec, &jobs, agg_cpu);
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:<6} {:>10.3} {:>12.4e} {:>10.3} {:>14} {:>14} {:>10.2e} {:>10.2e} {:>6} {:>5}",
                r.codec,
                r.median_s * 1e3,
                r.ate_per_s,
                r.algbw_gbps,
                r.bytes_sent_per_worker,
                r.bytes_recv_per_worker,
                r.max_abs_err,
                r.rel_l2_err,
                r.retransmissions,
                r.within_bound && r.ranks_identical
            );
        }
        if !(r.within_bound && r.ranks_identical) {
            wrong.push(codec);
        }
    }
    // Relays first (each follows its aggregator in the list).
    for s in servers.iter_mut().rev() {
        s.terminate();
    }
    if !wrong.is_empty() {
        bail!("wrong results for codec(s) {}", wrong.join(", "));
    }
    Ok(())
}

/// What `--racks` cannot go with, and where the lab cannot place the racks.
fn check_racks(a: &Args, quic: bool) -> Result<()> {
    let Some(racks) = a.racks else {
        return Ok(());
    };
    if racks > a.workers {
        bail!("--racks {racks}: more racks than --workers {}", a.workers);
    }
    if quic || a.aggregators != 1 || a.aggregator_threads != 1 || a.failover_standby {
        bail!(
            "--racks runs one UDP aggregator over its rack aggregators: not with --transport \
             quic, --aggregators, --aggregator-threads or --failover-standby"
        );
    }
    if !a.faults.is_clean() {
        bail!("--racks: the fault relay sits in front of one aggregator; the racks have none");
    }
    if a.netlab.agg_netns.is_some() {
        let lab = a.netlab.lab_racks.unwrap_or(0);
        if lab != racks
            || a.netlab.rack_netns.is_none()
            || a.netlab.rack_ips()?.len() != usize::from(racks)
        {
            bail!(
                "--racks {racks} inside scripts/netlab.sh needs the lab's racks: run it with \
                 --racks {racks} (it has {lab})"
            );
        }
    }
    Ok(())
}
