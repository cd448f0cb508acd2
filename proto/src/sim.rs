//! A deterministic simulator: one aggregator and many workers on a virtual clock, the
//! datagrams between them lost, duplicated, reordered and delayed by a seeded RNG.
//!
//! The same seed gives the same run, event for event. Runs are bounded in events, so a
//! protocol bug shows up as [`SimError::TooManySteps`] or [`SimError::Stalled`], never
//! as a test that hangs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thiserror::Error;

use crate::aggregator::{Aggregator, AggregatorConfig};
use crate::worker::{AllreduceStats, Event, Worker, WorkerConfig, WorkerError};

/// The network the simulator emulates.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seeds every random choice.
    pub seed: u64,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub dup: f64,
    /// Probability that a datagram is held back by up to `reorder_delay`.
    pub reorder: f64,
    /// One-way delay of every datagram.
    pub latency: Duration,
    /// Uniform extra delay in `0..jitter`.
    pub jitter: Duration,
    /// The most a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// The most events (deliveries and timeouts) one call may process.
    pub max_steps: u64,
    /// A shared bottleneck in front of the aggregator (a switch's port), if any.
    pub bottleneck: Option<Bottleneck>,
}

/// A link every datagram to the aggregator crosses: it serializes datagrams at
/// `bytes_per_sec`, drops what would queue beyond `queue_bytes`, and marks
/// contributions (as ECN would) while more than `mark_bytes` wait.
#[derive(Debug, Clone, Copy)]
pub struct Bottleneck {
    /// The link's rate.
    pub bytes_per_sec: f64,
    /// The most bytes that may wait; a datagram that would queue beyond is dropped.
    pub queue_bytes: usize,
    /// Contributions are marked while more than this many bytes wait.
    pub mark_bytes: usize,
    /// A stretch in which others sharing the link drain their part of its queue
    /// (`None`: none).
    pub drain: Option<Drain>,
}

/// Other flows sharing the bottleneck draining their part of its queue, as TCP BBR
/// does for its PROBE_RTT: from `from` until `until` after the simulation's start,
/// the link serves the job at `bytes_per_sec` (the link's whole rate, where
/// `Bottleneck::bytes_per_sec` is the part the others leave it).
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// When the drain begins, after the simulation's start.
    pub from: Duration,
    /// When it ends.
    pub until: Duration,
    /// The rate at which the link serves the job meanwhile.
    pub bytes_per_sec: f64,
}

impl Bottleneck {
    /// The drain under way `since` the simulation's start, if any.
    fn draining(&self, since: Duration) -> Option<Drain> {
        self.drain.filter(|d| (d.from..d.until).contains(&since))
    }

    /// The rate at which the link serves the job `since` the simulation's start.
    fn rate(&self, since: Duration) -> f64 {
        self.draining(since)
            .map_or(self.bytes_per_sec, |d| d.bytes_per_sec)
    }
}

impl SimConfig {
    /// A perfect network with a fixed 10 µs delay.
    pub fn lossless(seed: u64) -> Self {
        Self {
            seed,
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            latency: Duration::from_micros(10),
            jitter: Duration::ZERO,
            reorder_delay: Duration::ZERO,
            max_steps: 5_000_000,
            bottleneck: None,
        }
    }

    /// 5% loss, 2% duplication, 5% reordering and jitter, in both directions.
    pub fn lossy(seed: u64) -> Self {
        Self {
            loss: 0.05,
            dup: 0.02,
            reorder: 0.05,
            jitter: Duration::from_micros(20),
            reorder_delay: Duration::from_micros(200),
            ..Self::lossless(seed)
        }
    }
}

/// Why a simulated run did not finish.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    /// Nothing left to deliver and no timer armed, yet not finished.
    #[error("stalled after {0:?} of virtual time")]
    Stalled(Duration),
    /// The event budget ran out.
    #[error("not finished after {0} events")]
    TooManySteps(u64),
    /// A worker failed.
    #[error("worker {index} failed: {error}")]
    Worker {
        /// Its index.
        index: usize,
        /// Its error.
        error: WorkerError,
    },
}

/// One end of a simulated datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    /// The aggregator the workers join, or with racks, the parent.
    Aggregator,
    /// Rack aggregator `k` ([`Sim::with_racks`]).
    Rack(usize),
    Worker(usize),
}

/// How a rack aggregator addresses its parent in the simulator (it addresses its
/// ranks by worker index, the parent by rack index).
const PARENT: usize = usize::MAX;

/// A datagram on the wire, ordered by arrival time, then by send order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Flight {
    at: Instant,
    n: u64,
    from: Node,
    to: Node,
    bytes: Vec<u8>,
}

/// What the network did, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to the network.
    pub sent: u64,
    /// Lost.
    pub lost: u64,
    /// Delivered twice.
    pub duplicated: u64,
    /// Held back.
    pub reordered: u64,
    /// Delivered.
    pub delivered: u64,
    /// Dropped by the bottleneck's full queue.
    pub queue_drops: u64,
    /// Marked by the bottleneck.
    pub marked: u64,
    /// Datagrams that reached the bottleneck (dropped ones included).
    pub bottleneck_arrivals: u64,
    /// The time those datagrams found queued ahead of them, summed, in nanoseconds:
    /// what a short flow crossing the link would have waited.
    pub bottleneck_wait_ns: u64,
    /// Datagrams that reached the bottleneck during its drain ([`Drain`]).
    pub drain_arrivals: u64,
    /// The time those found queued ahead of them, summed, in nanoseconds.
    pub drain_wait_ns: u64,
}

impl NetStats {
    /// The mean time a datagram arriving at the bottleneck found queued ahead of it.
    pub fn mean_bottleneck_wait(&self) -> Duration {
        Duration::from_nanos(self.bottleneck_wait_ns / self.bottleneck_arrivals.max(1))
    }

    /// The mean time a datagram arriving at the bottleneck during its drain found
    /// queued ahead of it.
    pub fn mean_drain_wait(&self) -> Duration {
        Duration::from_nanos(self.drain_wait_ns / self.drain_arrivals.max(1))
    }
}

/// What became of each worker.
#[derive(Debug, Clone, Default)]
struct Status {
    joined: bool,
    done: Option<AllreduceStats>,
    failed: Option<WorkerError>,
}

/// The simulator. The aggregator addresses workers by their index.
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    start: Instant,
    now: Instant,
    agg: Aggregator<usize>,
    workers: Vec<Worker>,
    buffers: Vec<Vec<f32>>,
    status: Vec<Status>,
    wire: BinaryHeap<Reverse<Flight>>,
    sent: u64,
    /// The aggregator crashed: it takes and sends nothing more.
    agg_dead: bool,
    /// Crashed workers.
    dead: Vec<bool>,
    /// The error-feedback key every allreduce uses (`None`: no feedback).
    pub feedback: Option<u64>,
    /// Counters of the network.
    pub net: NetStats,
    scratch: Vec<u8>,
    /// When the bottleneck finishes sending what it holds.
    link_free: Instant,
    /// Each worker's configuration, to recreate it.
    configs: Vec<WorkerConfig>,
    /// The most slot memory the aggregator held at any step.
    pub peak_slot_memory: usize,
    /// Pools the aggregator re-sized (its `Regranted` events).
    pub regrants: u64,
    /// Rack aggregators between the workers and the aggregator, if any.
    racks: Vec<Aggregator<usize>>,
    /// Crashed rack aggregators.
    racks_dead: Vec<bool>,
    /// Each worker's rack.
    rack_of: Vec<usize>,
}

impl Sim {
    /// A simulator with these workers, all starting to join at time zero.
    ///
    /// # Panics
    /// If a worker configuration is invalid (this is test support).
    pub fn new(cfg: SimConfig, agg: AggregatorConfig, workers: Vec<WorkerConfig>) -> Self {
        let start = Instant::now();
        let n = workers.len();
        let workers_cfg = workers;
        let workers = workers_cfg
            .iter()
            .map(|c| Worker::new(c.clone(), start).expect("valid worker configuration"))
            .collect();
        Self {
            rng: SmallRng::seed_from_u64(cfg.seed),
            cfg,
            start,
            now: start,
            agg: Aggregator::new(agg),
            workers,
            buffers: vec![Vec::new(); n],
            status: vec![Status::default(); n],
            wire: BinaryHeap::new(),
            sent: 0,
            agg_dead: false,
            dead: vec![false; n],
            feedback: None,
            net: NetStats::default(),
            scratch: Vec::with_capacity(crate::wire::MAX_DATAGRAM),
            link_free: start,
            configs: workers_cfg,
            peak_slot_memory: 0,
            regrants: 0,
            racks: Vec::new(),
            racks_dead: Vec::new(),
            rack_of: Vec::new(),
        }
    }

    /// A simulator of two levels: `racks` rack aggregators (configured as `rack`,
    /// each seeded apart) under the aggregator, each serving its block of every
    /// job's ranks ([`crate::aggregator::rack_ranks`]); worker `i` reaches the rack of
    /// its rank. Loss, duplication and reordering apply to every link.
    ///
    /// # Panics
    /// If a worker configuration is invalid or `racks` is 0 or above `u16::MAX`.
    pub fn with_racks(
        cfg: SimConfig,
        top: AggregatorConfig,
        rack: AggregatorConfig,
        racks: usize,
        workers: Vec<WorkerConfig>,
    ) -> Self {
        let n = u16::try_from(racks).expect("racks fit a u16");
        assert!(n > 0, "at least one rack");
        let rack_of = workers
            .iter()
            .map(|w| {
                (0..n)
                    .position(|k| crate::aggregator::rack_ranks(w.world, k, n).contains(&w.rank))
                    .unwrap_or(0)
            })
            .collect();
        let mut sim = Self::new(cfg, top, workers);
        sim.racks = (0..n)
            .map(|k| {
                let mut a = Aggregator::new(AggregatorConfig {
                    seed: rack.seed ^ (u64::from(k) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ..rack.clone()
                });
                a.set_parent(PARENT, k, n);
                a
            })
            .collect();
        sim.racks_dead = vec![false; racks];
        sim.rack_of = rack_of;
        sim
    }

    /// Rack aggregator `k`.
    pub fn rack(&self, k: usize) -> &Aggregator<usize> {
        &self.racks[k]
    }

    /// Crashes rack aggregator `k`: from now on it takes and sends nothing.
    pub fn kill_rack(&mut self, k: usize) {
        self.racks_dead[k] = true;
    }

    /// Where worker `i` sends: its rack, or the aggregator.
    fn first_hop(&self, i: usize) -> Node {
        match self.rack_of.get(i) {
            Some(&k) => Node::Rack(k),
            None => Node::Aggregator,
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The aggregator.
    pub fn aggregator(&self) -> &Aggregator<usize> {
        &self.agg
    }

    /// The aggregator, to change (mark it backlogged, for one).
    pub fn aggregator_mut(&mut self) -> &mut Aggregator<usize> {
        &mut self.agg
    }

    /// Worker `i`.
    pub fn worker(&self, i: usize) -> &Worker {
        &self.workers[i]
    }

    /// Worker `i`, to call its methods directly.
    pub fn worker_mut(&mut self, i: usize) -> &mut Worker {
        &mut self.workers[i]
    }

    /// The statistics of worker `i`'s last allreduce.
    pub fn last_stats(&self, i: usize) -> Option<&AllreduceStats> {
        self.status[i].done.as_ref()
    }

    /// How worker `i` failed, if it did.
    pub fn failure(&self, i: usize) -> Option<&WorkerError> {
        self.status[i].failed.as_ref()
    }

    /// Crashes the aggregator: from now on it takes and sends nothing.
    pub fn kill_aggregator(&mut self) {
        self.agg_dead = true;
    }

    /// Crashes worker `i`: from now on it takes and sends nothing.
    pub fn kill_worker(&mut self, i: usize) {
        self.dead[i] = true;
    }

    /// Hands a datagram to the aggregator now, as if worker `from` had sent it.
    pub fn inject(&mut self, from: usize, datagram: &[u8]) {
        self.agg.handle_datagram(self.now, from, datagram);
    }

    /// Runs until every worker has joined.
    pub fn join(&mut self) -> Result<(), SimError> {
        self.run_until(|s| s.status.iter().all(|st| st.joined))
    }

    /// Runs until the workers listed have joined.
    pub fn join_some(&mut self, workers: &[usize]) -> Result<(), SimError> {
        self.run_until(|s| workers.iter().all(|&i| s.status[i].joined))
    }

    /// Every worker allreduces its input (joining first if needed); returns the outputs.
    pub fn allreduce(&mut self, inputs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, SimError> {
        let out = self.allreduce_some(inputs.into_iter().map(Some).collect())?;
        Ok(out.into_iter().flatten().collect())
    }

    /// The workers given an input allreduce it (joining first if needed), the others do
    /// nothing; returns the outputs of the first.
    pub fn allreduce_some(
        &mut self,
        inputs: Vec<Option<Vec<f32>>>,
    ) -> Result<Vec<Option<Vec<f32>>>, SimError> {
        assert_eq!(inputs.len(), self.workers.len(), "one input per worker");
        let active: Vec<bool> = inputs.iter().map(Option::is_some).collect();
        let joining: Vec<usize> = (0..active.len()).filter(|i| active[*i]).collect();
        self.join_some(&joining)?;
        self.buffers = inputs.into_iter().map(Option::unwrap_or_default).collect();
        for i in (0..self.workers.len()).filter(|i| active[*i]) {
            self.status[i].done = None;
            let key = self.feedback;
            if let Err(error) = self.workers[i].start_allreduce(self.now, &mut self.buffers[i], key)
            {
                return Err(SimError::Worker { index: i, error });
            }
        }
        self.run_until(|s| (0..s.workers.len()).all(|i| !active[i] || s.status[i].done.is_some()))?;
        // Some rank's tensor held NaN or infinity under a block-scaled codec: every
        // rank's allreduce is that error.
        if let Some(i) = (0..self.workers.len()).find(|i| {
            active[*i]
                && self.status[*i]
                    .done
                    .as_ref()
                    .is_some_and(|st| st.nonfinite_chunks > 0)
        }) {
            return Err(SimError::Worker {
                index: i,
                error: crate::codec::NonFinite.into(),
            });
        }
        let n = self.buffers.len();
        let out = std::mem::replace(&mut self.buffers, vec![Vec::new(); n]);
        Ok(out
            .into_iter()
            .zip(active)
            .map(|(b, a)| a.then_some(b))
            .collect())
    }

    /// Worker `i` starts over, joining `after` from now: a rank that arrives while
    /// other jobs run. (For a worker that has joined, this is a restarted process.)
    pub fn delay_join(&mut self, i: usize, after: Duration) {
        let at = self.now + after;
        self.workers[i] = Worker::new(self.configs[i].clone(), at).expect("valid configuration");
        self.status[i] = Status::default();
    }

    /// Worker `i` leaves its job (it sends a leave and takes part in nothing more).
    pub fn leave(&mut self, i: usize) {
        self.workers[i].close();
    }

    /// Every worker allreduces its input, worker `i` starting `starts[i]` after the
    /// others could (a rank still busy with its backward pass), and not before it has
    /// joined; returns the outputs.
    pub fn allreduce_staggered(
        &mut self,
        inputs: Vec<Vec<f32>>,
        starts: &[Duration],
    ) -> Result<Vec<Vec<f32>>, SimError> {
        assert_eq!(inputs.len(), self.workers.len(), "one input per worker");
        assert_eq!(starts.len(), self.workers.len(), "one start per worker");
        let t0 = self.now;
        self.buffers = inputs;
        let mut started = vec![false; self.workers.len()];
        loop {
            for i in 0..self.workers.len() {
                if !started[i] && self.now >= t0 + starts[i] && self.status[i].joined {
                    started[i] = true;
                    self.status[i].done = None;
                    let key = self.feedback;
                    if let Err(error) =
                        self.workers[i].start_allreduce(self.now, &mut self.buffers[i], key)
                    {
                        return Err(SimError::Worker { index: i, error });
                    }
                }
            }
            if started.iter().all(|s| *s) {
                break;
            }
            let n = self.workers.len();
            self.run_until(|s| {
                (0..n).any(|i| !started[i] && s.now >= t0 + starts[i] && s.status[i].joined)
            })?;
        }
        self.run_until(|s| s.status.iter().all(|st| st.done.is_some()))?;
        let n = self.buffers.len();
        Ok(std::mem::replace(&mut self.buffers, vec![Vec::new(); n]))
    }

    /// Every worker allreduces its input again and again, from when it has joined (a
    /// job may wait for slot memory that others hold), starting the next call as soon
    /// as one ends, for `duration` of virtual time. Returns, per worker, the allreduces
    /// that ended after `warmup`, and the virtual time they span.
    pub fn run_continuously(
        &mut self,
        inputs: Vec<Vec<f32>>,
        warmup: Duration,
        duration: Duration,
    ) -> Result<(Vec<u64>, Duration), SimError> {
        assert_eq!(inputs.len(), self.workers.len(), "one input per worker");
        let t0 = self.now;
        let n = self.workers.len();
        let mut counts = vec![0u64; n];
        let mut started = vec![false; n];
        self.buffers = inputs.clone();
        let end = t0 + duration;
        while self.now < end {
            for (i, started) in started.iter_mut().enumerate() {
                if *started || !self.status[i].joined {
                    continue;
                }
                *started = true;
                self.status[i].done = None;
                let key = self.feedback;
                if let Err(error) =
                    self.workers[i].start_allreduce(self.now, &mut self.buffers[i], key)
                {
                    return Err(SimError::Worker { index: i, error });
                }
            }
            self.run_until(|s| {
                s.now >= end
                    || s.status.iter().any(|st| st.done.is_some())
                    || (0..n).any(|i| !started[i] && s.status[i].joined)
            })?;
            for i in 0..n {
                if self.status[i].done.take().is_some() {
                    if self.now >= t0 + warmup {
                        counts[i] += 1;
                    }
                    self.buffers[i].copy_from_slice(&inputs[i]);
                    let key = self.feedback;
                    if let Err(error) =
                        self.workers[i].start_allreduce(self.now, &mut self.buffers[i], key)
                    {
                        return Err(SimError::Worker { index: i, error });
                    }
                }
            }
        }
        Ok((counts, duration.saturating_sub(warmup)))
    }

    /// Runs until `done` holds, a worker fails, or time stops.
    pub fn run_until(&mut self, mut done: impl FnMut(&Sim) -> bool) -> Result<(), SimError> {
        let mut steps = 0u64;
        loop {
            self.flush();
            if let Some((index, st)) = self
                .status
                .iter()
                .enumerate()
                .find(|(_, s)| s.failed.is_some())
            {
                let error = st.failed.clone().unwrap_or(WorkerError::Closed);
                return Err(SimError::Worker { index, error });
            }
            if done(self) {
                return Ok(());
            }
            steps += 1;
            if steps > self.cfg.max_steps {
                return Err(SimError::TooManySteps(steps));
            }
            self.step()?;
        }
    }

    /// Runs until nothing is in flight and no timer is due within `horizon`.
    pub fn settle(&mut self, horizon: Duration) -> Result<(), SimError> {
        let end = self.now + horizon;
        let mut steps = 0u64;
        loop {
            self.flush();
            match self.next_time() {
                Some(t) if t <= end => {}
                _ => return Ok(()),
            }
            steps += 1;
            if steps > self.cfg.max_steps {
                return Err(SimError::TooManySteps(steps));
            }
            self.step()?;
        }
    }

    fn next_time(&mut self) -> Option<Instant> {
        let mut t = self.wire.peek().map(|Reverse(f)| f.at);
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if !self.agg_dead {
            take(self.agg.poll_timeout());
        }
        for (a, _) in self
            .racks
            .iter()
            .zip(&self.racks_dead)
            .filter(|(_, d)| !**d)
        {
            take(a.poll_timeout());
        }
        for (w, _) in self
            .workers
            .iter_mut()
            .zip(&self.dead)
            .filter(|(_, d)| !**d)
        {
            take(w.poll_timeout());
        }
        t
    }

    /// Advances to the next event and processes everything due then.
    fn step(&mut self) -> Result<(), SimError> {
        let Some(t) = self.next_time() else {
            return Err(SimError::Stalled(self.elapsed()));
        };
        self.now = self.now.max(t);
        let now = self.now;
        while self.wire.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Some(Reverse(f)) = self.wire.pop() else {
                break;
            };
            self.net.delivered += 1;
            match (f.from, f.to) {
                (_, Node::Aggregator) if self.agg_dead => {}
                (Node::Worker(i), Node::Aggregator) => self.agg.handle_datagram(now, i, &f.bytes),
                (Node::Rack(k), Node::Aggregator) => self.agg.handle_datagram(now, k, &f.bytes),
                (_, Node::Rack(k)) if self.racks_dead[k] => {}
                (Node::Worker(i), Node::Rack(k)) => self.racks[k].handle_datagram(now, i, &f.bytes),
                (Node::Aggregator, Node::Rack(k)) => {
                    self.racks[k].handle_datagram(now, PARENT, &f.bytes)
                }
                (_, Node::Worker(i)) if self.dead[i] => {}
                (_, Node::Worker(i)) => {
                    self.workers[i].handle_datagram(now, &f.bytes, &mut self.buffers[i])
                }
                _ => {}
            }
        }
        if !self.agg_dead && self.agg.poll_timeout().is_some_and(|t| t <= now) {
            self.agg.handle_timeout(now);
        }
        for (a, _) in self
            .racks
            .iter_mut()
            .zip(&self.racks_dead)
            .filter(|(_, d)| !**d)
        {
            if a.poll_timeout().is_some_and(|t| t <= now) {
                a.handle_timeout(now);
            }
        }
        self.peak_slot_memory = self.peak_slot_memory.max(self.agg.slot_memory());
        for (w, _) in self
            .workers
            .iter_mut()
            .zip(&self.dead)
            .filter(|(_, d)| !**d)
        {
            if w.poll_timeout().is_some_and(|t| t <= now) {
                w.handle_timeout(now);
            }
        }
        Ok(())
    }

    /// Sends everything every node has to send, and collects worker events.
    fn flush(&mut self) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let mut any = false;
            for i in 0..self.workers.len() {
                if self.dead[i] {
                    continue;
                }
                let hop = self.first_hop(i);
                while self.workers[i].poll_transmit(self.now, &self.buffers[i], &mut buf) {
                    self.send(Node::Worker(i), hop, &buf);
                    any = true;
                }
                while let Some(ev) = self.workers[i].poll_event() {
                    let st = &mut self.status[i];
                    match ev {
                        Event::Joined(_) => st.joined = true,
                        Event::AllreduceDone { stats, .. } => st.done = Some(stats),
                        Event::Failed(e) => st.failed = Some(e),
                    }
                }
            }
            let members_are_racks = !self.racks.is_empty();
            while let Some(to) = self.agg.poll_transmit(&mut buf).filter(|_| !self.agg_dead) {
                let to = if members_are_racks {
                    Node::Rack(to)
                } else {
                    Node::Worker(to)
                };
                self.send(Node::Aggregator, to, &buf);
                any = true;
            }
            for k in 0..self.racks.len() {
                while let Some(to) = self.racks[k].poll_transmit(&mut buf) {
                    if self.racks_dead[k] {
                        continue;
                    }
                    let to = if to == PARENT {
                        Node::Aggregator
                    } else {
                        Node::Worker(to)
                    };
                    self.send(Node::Rack(k), to, &buf);
                    any = true;
                }
                while self.racks[k].poll_event().is_some() {}
            }
            while let Some(ev) = self.agg.poll_event() {
                if matches!(ev, crate::aggregator::Event::Regranted { .. }) {
                    self.regrants += 1;
                }
            }
            if !any {
                break;
            }
        }
        self.scratch = buf;
    }

    fn send(&mut self, from: Node, to: Node, bytes: &[u8]) {
        self.net.sent += 1;
        if self.rng.random_bool(self.cfg.loss) {
            self.net.lost += 1;
            return;
        }
        if let (Some(b), Node::Aggregator) = (self.cfg.bottleneck, to) {
            let start = self.link_free.max(self.now);
            let wait = u64::try_from((start - self.now).as_nanos()).unwrap_or(u64::MAX);
            self.net.bottleneck_arrivals += 1;
            self.net.bottleneck_wait_ns += wait;
            if b.draining(self.now - self.start).is_some() {
                self.net.drain_arrivals += 1;
                self.net.drain_wait_ns += wait;
            }
            let rate = b.rate(start - self.start);
            let queued = (start - self.now).as_secs_f64() * rate;
            if queued > b.queue_bytes as f64 {
                self.net.queue_drops += 1;
                return;
            }
            let mut bytes = bytes.to_vec();
            if queued > b.mark_bytes as f64 && crate::wire::mark_contribution(&mut bytes) {
                self.net.marked += 1;
            }
            self.link_free = start + Duration::from_secs_f64(bytes.len() as f64 / rate);
            self.sent += 1;
            self.wire.push(Reverse(Flight {
                at: self.link_free + self.cfg.latency,
                n: self.sent,
                from,
                to,
                bytes,
            }));
            return;
        }
        let copies = if self.rng.random_bool(self.cfg.dup) {
            self.net.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self.cfg.latency;
            if !self.cfg.jitter.is_zero() {
                delay += self.cfg.jitter.mul_f64(self.rng.random::<f64>());
            }
            if self.rng.random_bool(self.cfg.reorder) {
                self.net.reordered += 1;
                delay += self.cfg.reorder_delay.mul_f64(self.rng.random::<f64>());
            }
            self.sent += 1;
            self.wire.push(Reverse(Flight {
                at: self.now + delay,
                n: self.sent,
                from,
                to,
                bytes: bytes.to_vec(),
            }));
        }
    }
}
