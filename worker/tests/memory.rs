//! The worker driver and the aggregator server over the in-memory network, with loss:
//! what was only ever tested over real sockets and processes (striping, heartbeats
//! through idle time, a shutdown that tells every rank, failover to a standby) runs
//! here in one process, through the same driver loop as UDP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use inagg_aggregator::{MemFaults, MemNet, Server, ServerConfig, Stats};
use inagg_proto::codec::CodecId;
use inagg_worker::{Error, Options, Transport, Worker, WorkerError};

/// A lossy in-memory network.
fn lossy(seed: u64) -> MemNet {
    MemNet::new(MemFaults {
        loss: 0.01,
        duplicate: 0.01,
        reorder: 0.01,
        seed,
    })
}

/// An aggregator serving at `addr` on `net` until its flag is set.
struct Agg {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Stats>>,
}

impl Agg {
    fn start(net: &MemNet, addr: &str, tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        let mut cfg = ServerConfig::new(addr.parse().expect("address"));
        tweak(&mut cfg);
        let server = Server::bind_memory(cfg, net).expect("bind");
        let addr = server.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || server.run(&flag).expect("server"));
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the server (it tells every rank) and returns its counters.
    fn stop(&mut self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("server thread"))
            .unwrap_or_default()
    }
}

impl Drop for Agg {
    fn drop(&mut self) {
        self.stop();
    }
}

fn options(net: &MemNet, agg: SocketAddr, job: u32, rank: u16, world: u16) -> Options {
    let mut o = Options::new(agg, job, rank, world, CodecId::I32);
    o.transport = Transport::Memory(net.clone());
    o.protocol.chunk_elems = 256;
    o.protocol.window = 8;
    o
}

/// Rank `r`'s input of allreduce `i`: small integers, whose sums are exact.
fn input(r: u16, i: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| ((k * 7 + usize::from(r) * 3 + i) % 11) as f32 - 5.0)
        .collect()
}

fn exact(world: u16, i: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| (0..world).map(|r| input(r, i, n)[k]).sum())
        .collect()
}

/// Runs `world` ranks on threads, each `f(rank, worker)`, and returns their results.
fn ranks<T: Send + 'static>(
    world: u16,
    opts: impl Fn(u16) -> Options,
    f: impl Fn(u16, &Worker) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let o = opts(r);
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let w = Worker::connect(o).expect("connect");
                let out = f(r, &w);
                w.close();
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect()
}

#[test]
fn a_job_stripes_over_two_aggregators_in_memory() {
    let net = lossy(1);
    let mut a = Agg::start(&net, "10.1.0.1:7070", |_| {});
    let mut b = Agg::start(&net, "10.1.0.2:7070", |_| {});
    let (aa, ba) = (a.addr, b.addr);
    let n = 5000;
    let stripes = ranks(
        3,
        |r| {
            let mut o = options(&net, aa, 1, r, 3);
            o.stripes = vec![ba];
            o
        },
        move |r, w| {
            for i in 0..3 {
                let mut buf = input(r, i, n);
                w.allreduce(&mut buf).expect("allreduce");
                assert_eq!(buf, exact(3, i, n), "rank {r}, allreduce {i}");
            }
            w.stripes()
        },
    );
    assert_eq!(stripes, vec![2; 3]);
    for (name, s) in [("a", a.stop()), ("b", b.stop())] {
        assert!(s.chunks_completed > 0, "aggregator {name} summed nothing");
    }
}

#[test]
fn heartbeats_keep_an_idle_job_alive_past_the_silence_timeout() {
    let net = lossy(2);
    let agg = Agg::start(&net, "10.1.0.1:7070", |c| {
        c.protocol.silence_timeout = Duration::from_millis(400);
    });
    let addr = agg.addr;
    ranks(
        2,
        |r| {
            let mut o = options(&net, addr, 2, r, 2);
            // Below the silence timeout, so that a heartbeat or two can be lost.
            o.protocol.heartbeat_interval = Duration::from_millis(100);
            o
        },
        move |r, w| {
            for i in 0..2 {
                let mut buf = input(r, i, 1000);
                w.allreduce(&mut buf).expect("allreduce after idling");
                assert_eq!(buf, exact(2, i, 1000));
                // Idle for three silence timeouts: only heartbeats speak for the rank.
                std::thread::sleep(Duration::from_millis(1200));
            }
        },
    );
}

#[test]
fn a_stopping_aggregator_tells_every_rank() {
    let net = lossy(3);
    let mut agg = Agg::start(&net, "10.1.0.1:7070", |_| {});
    let addr = agg.addr;
    let started = Arc::new(std::sync::Barrier::new(3));
    let go = Arc::clone(&started);
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let o = options(&net, addr, 3, r, 2);
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                let w = Worker::connect(o).expect("connect");
                let mut buf = input(r, 0, 1000);
                w.allreduce(&mut buf).expect("first allreduce");
                go.wait();
                // Bounded: the aggregator stops after the barrier.
                for _ in 0..100_000 {
                    if let Err(e) = w.allreduce(&mut buf) {
                        return e;
                    }
                }
                panic!("rank {r}: the aggregator stopped and allreduces went on");
            })
        })
        .collect();
    started.wait();
    agg.stop();
    for h in handles {
        let e = h.join().expect("rank");
        assert!(
            matches!(e, Error::Protocol(WorkerError::Aborted { .. })),
            "not told of the shutdown: {e}"
        );
        assert!(e.to_string().contains("shutting down"), "{e}");
    }
}

#[test]
fn a_job_fails_over_to_a_standby_aggregator() {
    let net = lossy(4);
    let mut a = Agg::start(&net, "10.1.0.1:7070", |_| {});
    let b = Agg::start(&net, "10.1.0.2:7070", |_| {});
    let (aa, ba) = (a.addr, b.addr);
    let n = 3000;
    let started = Arc::new(std::sync::Barrier::new(3));
    let go = Arc::clone(&started);
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let mut o = options(&net, aa, 4, r, 2);
            o.failover = vec![ba];
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                let w = Worker::connect(o).expect("connect");
                let mut buf = input(r, 0, n);
                w.allreduce(&mut buf).expect("on the first aggregator");
                go.wait();
                for i in 1..20 {
                    let mut buf = input(r, i, n);
                    w.allreduce(&mut buf).expect("across the failover");
                    assert_eq!(buf, exact(2, i, n), "rank {r}, allreduce {i}");
                }
                let moves = w.failovers();
                w.close();
                moves
            })
        })
        .collect();
    started.wait();
    a.stop();
    for h in handles {
        let moves = h.join().expect("rank");
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].to, ba);
    }
}
