//! Round-trip time estimation and the retransmission timeout (RFC 6298's estimator).

use std::time::Duration;

/// Smoothed RTT and its variance, giving the retransmission timeout.
#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    min_rto: Duration,
    max_rto: Duration,
    initial_rto: Duration,
}

impl RttEstimator {
    /// A fresh estimator: the timeout is `initial_rto` until the first sample.
    pub fn new(initial_rto: Duration, min_rto: Duration, max_rto: Duration) -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            min_rto,
            max_rto: max_rto.max(min_rto),
            initial_rto,
        }
    }

    /// Takes one RTT sample (from a packet sent once: Karn's rule is the caller's).
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The smoothed RTT, once there is a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The timeout for a packet sent for the `tx`-th time (1 for the first): the base
    /// timeout doubled for every retransmission, within the bounds.
    pub fn rto(&self, tx: u32) -> Duration {
        let base = match self.srtt {
            None => self.initial_rto,
            Some(srtt) => srtt + (self.rttvar * 4).max(Duration::from_micros(100)),
        }
        .clamp(self.min_rto, self.max_rto);
        let backoff = 1u32 << tx.saturating_sub(1).min(16);
        (base * backoff).min(self.max_rto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_within_bounds() {
        let ms = Duration::from_millis;
        let mut r = RttEstimator::new(ms(50), ms(2), ms(400));
        assert_eq!(r.rto(1), ms(50));
        r.sample(ms(10));
        assert_eq!(r.srtt(), Some(ms(10)));
        assert_eq!(r.rto(1), ms(30));
        assert_eq!(r.rto(2), ms(60));
        assert_eq!(r.rto(10), ms(400));
        for _ in 0..100 {
            r.sample(Duration::from_micros(10));
        }
        assert_eq!(r.rto(1), ms(2));
    }
}
