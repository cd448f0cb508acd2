//! Pacing: a rank sends its contributions no faster than a little more than the rate
//! its results have been coming back, smoothed over about a second, so that its
//! packets leave spread out and, when others drain a shared queue, the rank does not
//! rush into the room they leave.
//!
//! A window alone keeps its whole window in flight whatever the RTT: when flows
//! beside the job drain the queue (TCP BBR's PROBE_RTT), the results come back
//! faster, the rank sends faster, and its packets keep the queue standing through
//! the drain, so the flows take the job's queue for their path. A rank paced at
//! [`PACING_GAIN`] times its recent rate, below the link's rate, lets such a queue
//! empty; its window still bounds what it keeps in flight.

use std::time::{Duration, Instant};

/// How much faster than its smoothed rate of results a rank may send: room to grow
/// into a link that frees up (about a quarter more a second), little enough that a
/// rank holding most of a link still lets a drain through.
pub const PACING_GAIN: f64 = 1.25;

/// Results per rate sample.
pub const PACING_ROUND: u64 = 64;

/// How long the rate estimate remembers: longer than a drain (200 ms), so that a
/// drain moves it little.
pub const RATE_MEMORY: Duration = Duration::from_secs(1);

/// The burst a pacer lets out at once: this long at its rate, at least
/// [`MIN_BURST`] packets, so that a driver that wakes late loses no time.
pub const BURST_TIME: Duration = Duration::from_millis(1);

/// The smallest burst, in packets.
pub const MIN_BURST: f64 = 2.0;

/// A token bucket filled at the pacing rate.
#[derive(Debug, Clone)]
pub struct Pacer {
    gain: f64,
    /// Results per second, smoothed over [`RATE_MEMORY`]; `None` until samples span
    /// [`RATE_MEMORY`] (no pacing then).
    rate: Option<f64>,
    /// Until then, the results and the time of the samples so far: the first rate is
    /// their mean. A single sample of results that came back in a clump, or while
    /// something else held the rank back, would set it far off, and the smoothing
    /// then takes seconds to bring it back.
    warming: (u64, Duration),
    /// The current sample: when it began, and the results since.
    sample: Option<(Instant, u64)>,
    /// Packets that may go out now, and when they were last counted.
    tokens: f64,
    counted: Option<Instant>,
    /// When the next packet may go out, once a send was held back.
    held_until: Option<Instant>,
    /// Times a send was held back until the pacing timer (since the owner last set it
    /// to 0: `Cwnd` does at each allreduce's start).
    pub holds: u64,
}

impl Pacer {
    /// A pacer at `gain` times the rate of results.
    pub fn new(gain: f64) -> Self {
        Self {
            gain,
            rate: None,
            warming: (0, Duration::ZERO),
            sample: None,
            tokens: 0.0,
            counted: None,
            held_until: None,
            holds: 0,
        }
    }

    /// The pacing rate, in packets per second (`None`: not pacing yet).
    pub fn rate(&self) -> Option<f64> {
        self.rate.map(|r| r * self.gain)
    }

    /// A result arrived at `now`.
    pub fn on_result(&mut self, now: Instant) {
        let Some((start, n)) = self.sample else {
            self.sample = Some((now, 0));
            return;
        };
        let n = n + 1;
        let dt = now.saturating_duration_since(start);
        if n < PACING_ROUND || dt.is_zero() {
            self.sample = Some((start, n));
            return;
        }
        self.sample = Some((now, 0));
        let Some(r) = self.rate else {
            let (results, time) = (self.warming.0 + n, self.warming.1 + dt);
            self.warming = (results, time);
            if time >= RATE_MEMORY {
                self.rate = Some(results as f64 / time.as_secs_f64());
            }
            return;
        };
        let sample = n as f64 / dt.as_secs_f64();
        let weight = (dt.as_secs_f64() / RATE_MEMORY.as_secs_f64()).min(1.0);
        self.rate = Some(r + (sample - r) * weight);
    }

    /// Results until the next one do not show the rank's rate (a gap between
    /// allreduces, a dip): the current sample is dropped.
    pub fn restart_sample(&mut self) {
        self.sample = None;
    }

    /// Whether a packet may go out at `now`; if not, [`Pacer::held_until`] says when.
    pub fn may_send(&mut self, now: Instant) -> bool {
        let Some(rate) = self.rate() else {
            return true;
        };
        let cap = (rate * BURST_TIME.as_secs_f64()).max(MIN_BURST);
        self.tokens = match self.counted {
            Some(t) => {
                (self.tokens + now.saturating_duration_since(t).as_secs_f64() * rate).min(cap)
            }
            None => cap,
        };
        self.counted = Some(now);
        // A little short of a whole token is one: the wait below is rounded up.
        if self.tokens >= 1.0 - 1e-9 {
            self.held_until = None;
            true
        } else {
            // Whole microseconds, rounded up, so that the token is there when the wait
            // ends and every wait moves time on.
            let wait_us = ((1.0 - self.tokens) / rate * 1e6).ceil().max(1.0);
            if self.held_until.is_none() {
                self.holds += 1;
            }
            self.held_until = Some(now + Duration::from_micros(wait_us as u64));
            false
        }
    }

    /// A packet went out.
    pub fn on_sent(&mut self) {
        if self.rate.is_some() {
            self.tokens -= 1.0;
        }
    }

    /// When a held-back packet may go out.
    pub fn held_until(&self) -> Option<Instant> {
        self.held_until
    }

    /// The time [`Pacer::held_until`] named has come.
    pub fn release(&mut self) {
        self.held_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `n` results, one every `every`, from `t`; returns the time after the last.
    fn results(p: &mut Pacer, mut t: Instant, n: u64, every: Duration) -> Instant {
        for _ in 0..n {
            p.on_result(t);
            t += every;
        }
        t
    }

    #[test]
    fn no_pacing_before_samples_span_the_rate_memory() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PACING_GAIN);
        for i in 0..1000 {
            assert!(p.may_send(t0), "packet {i} held back without a rate");
            p.on_sent();
        }
        // 900 ms of samples, one result a millisecond.
        let t = results(&mut p, t0, 901, MS);
        assert_eq!(p.rate(), None, "samples of 900 ms set a rate");
        assert_eq!(p.held_until(), None);
        results(&mut p, t, 128, MS);
        let rate = p.rate().expect("a rate once samples span a second");
        assert!((rate - PACING_GAIN * 1000.0).abs() < 1.0, "rate {rate}");
    }

    #[test]
    fn a_clump_of_results_does_not_set_the_rate() {
        // The first round's results come back within half a millisecond, the rest at
        // 1,000 a second: the rate is about the second's mean, not the clump's.
        let t0 = Instant::now();
        let mut p = Pacer::new(PACING_GAIN);
        let t = results(&mut p, t0, PACING_ROUND + 1, Duration::from_micros(7));
        results(&mut p, t, 1_100, MS);
        let rate = p.rate().expect("a rate") / PACING_GAIN;
        assert!(rate < 1_100.0, "a clump set the rate at {rate} a second");
    }

    #[test]
    fn sends_at_the_gain_times_the_rate_of_results_in_bursts_of_a_millisecond() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PACING_GAIN);
        // 4 results a millisecond: 4,000 a second, for a second.
        let mut t = results(&mut p, t0, 4_000 + PACING_ROUND + 1, MS / 4);
        let rate = p.rate().expect("a rate after a second of results");
        assert!((rate - PACING_GAIN * 4000.0).abs() < 1.0, "rate {rate}");
        // A burst of a millisecond at the rate, then one packet per 1 / rate.
        let mut burst = 0;
        while p.may_send(t) {
            p.on_sent();
            burst += 1;
        }
        assert_eq!(burst, 5, "a millisecond at 5,000 a second");
        let held = p.held_until().expect("held back once the burst is spent");
        assert!(held > t && held <= t + Duration::from_secs_f64(1.0 / rate));
        // Over the next second, as often as the pacer lets it: the rate, give or take a packet.
        let end = t + Duration::from_secs(1);
        let mut sent = 0;
        while t < end {
            if p.may_send(t) {
                p.on_sent();
                sent += 1;
            } else {
                t = p.held_until().expect("a time to wait for");
                p.release();
            }
        }
        assert!(
            (sent as f64 - rate).abs() <= 2.0,
            "{sent} sent in a second at {rate}"
        );
    }

    #[test]
    fn a_drain_moves_the_rate_little_and_a_lasting_change_moves_it_in_a_second() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PACING_GAIN);
        let t = results(&mut p, t0, 3_000, MS / 2);
        let before = p.rate().expect("a rate");
        // Others drain for 200 ms and results come twice as fast.
        let t = results(&mut p, t, 800, MS / 4);
        let during = p.rate().expect("a rate");
        assert!(
            during < before * 1.3,
            "a drain of 200 ms moved the rate from {before} to {during}"
        );
        // A link that stays twice as fast for two seconds.
        results(&mut p, t, 8_000, MS / 4);
        let after = p.rate().expect("a rate");
        assert!(
            after > before * 1.8,
            "two seconds at twice the rate moved it from {before} to {after}"
        );
    }

    #[test]
    fn a_gap_is_not_a_sample() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PACING_GAIN);
        let t = results(&mut p, t0, 1_200, MS);
        let before = p.rate().expect("a rate");
        // Half a round, the gap between allreduces, then the next allreduce's results.
        let t = results(&mut p, t, PACING_ROUND / 2, MS);
        p.restart_sample();
        results(&mut p, t + Duration::from_millis(500), PACING_ROUND * 4, MS);
        let after = p.rate().expect("a rate");
        assert!(
            (after - before).abs() < before * 0.01,
            "the gap moved the rate from {before} to {after}"
        );
    }
}
