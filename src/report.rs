//! What `inagg worker --json` prints, one line per rank: the record that `bench`,
//! `sweep`, scripts and tests read back.

use serde::{Deserialize, Serialize};

use crate::tensor::Check;

/// What `inagg worker --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub rank: u16,
    pub codec: String,
    pub elements: usize,
    /// Seconds of every timed allreduce.
    pub times_s: Vec<f64>,
    /// Wire bytes sent per timed allreduce (mean).
    pub bytes_sent: u64,
    /// Wire bytes received per timed allreduce (mean).
    pub bytes_recv: u64,
    /// Retransmissions over all timed allreduces.
    pub retransmissions: u64,
    /// Wire bytes of retransmissions per timed allreduce (mean; part of `bytes_sent`).
    #[serde(default)]
    pub retransmitted_bytes: u64,
    /// Retransmissions sent as header-only probes, over all timed allreduces.
    #[serde(default)]
    pub probes: u64,
    /// Results that carried a congestion mark (set by the aggregator, or CE on the
    /// path), over all timed allreduces.
    #[serde(default)]
    pub marks: u64,
    /// Dips the congestion control began, over all timed allreduces.
    #[serde(default)]
    pub dips: u64,
    /// Times the pacing rule held a send back, over all timed allreduces.
    #[serde(default)]
    pub pacing_holds: u64,
    /// Loss bursts that set the queue and dip rules aside, over all timed allreduces.
    #[serde(default)]
    pub overflows: u64,
    /// Timed allreduces done.
    #[serde(default)]
    pub allreduces: u64,
    /// Fixed-point codecs: timed results whose bits differ from the first one's (the
    /// input never changes, so any difference is an error).
    #[serde(default)]
    pub mismatches: u64,
    /// Elements per chunk, as granted (QUIC datagrams shrink it to fit).
    #[serde(default)]
    pub chunk_elements: u16,
    /// FNV-1a (64 bits, hex) of the last result's bytes: ranks, and runs of the same
    /// job, that got the same sum print the same value.
    #[serde(default)]
    pub result_checksum: String,
    /// Every failover (`--failover`): the aggregator the job moved to and the seconds
    /// from the failure to the grant there.
    #[serde(default)]
    pub failovers: Vec<FailoverRow>,
    /// Datagrams from the aggregator that this rank dropped, by reason (forged grants
    /// and errors carry the wrong nonce: `bad_nonce`), over its last session.
    #[serde(default)]
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// The smallest congestion window (packets in flight) at the end of a timed
    /// allreduce: the granted window, unless congestion control (marks, losses)
    /// shrank it; `--no-congestion-control` keeps it at the grant.
    #[serde(default)]
    pub congestion_window_min: Option<u64>,
    /// Results checked against the exact sum: 1 (the last), every allreduce's with
    /// `--check-every`, 0 with `--no-check`.
    #[serde(default)]
    pub checked: u64,
    /// The check of the last result, or with `--check-every` the worst of all
    /// (absent with --no-check).
    pub check: Option<Check>,
    /// Seconds of this rank's CPU (user and system, all its threads) per timed
    /// allreduce: the calls themselves, not the input copy or the checks around them.
    #[serde(default)]
    pub cpu_s_per_allreduce: Option<f64>,
}

/// One failover in a [`Report`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverRow {
    pub to: String,
    pub resume_s: f64,
    pub cause: String,
}
