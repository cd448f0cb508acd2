//! The conformance suite over every transport: the protocol simulator of
//! `inagg_proto::sim` (the reference), and the real worker driver and aggregator server
//! over the in-memory network of `inagg_net::mem` (with seeded loss, duplication and
//! reordering), UDP, and QUIC (stream and datagram framing). Every codec with every
//! option (stochastic rounding, zero skipping, error feedback) sums the same inputs of
//! three ranks through each; the results must be bit-identical across transports (the
//! same state machines, only the wire differs; integer-valued inputs make even float
//! sums independent of arrival order) and within the codec's tolerance of the exact
//! sum. Every case runs; the failure lists each one that failed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use inagg_aggregator::{Identity, MemFaults, MemNet, Server, ServerConfig};
use inagg_proto::aggregator::AggregatorConfig;
use inagg_proto::codec::{Codec, CodecId, ALL};
use inagg_proto::sim::{Sim, SimConfig};
use inagg_worker::{Options, QuicMode, QuicOptions, Transport, Trust, Worker, WorkerConfig};

const WORLD: u16 = 3;
/// Elements: several chunks of every codec, the last one partial.
const N: usize = 9_000;
/// Error-feedback runs make this many allreduces (the residual of one feeds the next).
const ROUNDS: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Variant {
    stochastic: bool,
    skip_zeros: bool,
    feedback: bool,
}

impl Variant {
    fn rounds(self) -> usize {
        if self.feedback {
            ROUNDS
        } else {
            1
        }
    }
}

const PLAIN: Variant = Variant {
    stochastic: false,
    skip_zeros: false,
    feedback: false,
};

const VARIANTS: [Variant; 4] = [
    PLAIN,
    Variant {
        stochastic: true,
        ..PLAIN
    },
    Variant {
        skip_zeros: true,
        ..PLAIN
    },
    Variant {
        feedback: true,
        ..PLAIN
    },
];

/// Rank `r`'s input: small integers for the float codecs (exact in every float
/// format, so sums do not depend on order), gradient-like reals for fixed point; the
/// second quarter is zero on every rank (for zero skipping).
fn input(codec: &dyn Codec, r: u16, round: usize) -> Vec<f32> {
    let mut x = 0x9e37_79b9u32 ^ (u32::from(r) << 16) ^ ((round as u32) << 8) ^ 1;
    (0..N)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if (N / 4..N / 2).contains(&i) {
                0.0
            } else if codec.block_scaled() {
                (x as f32 / u32::MAX as f32 - 0.5) * 0.02
            } else {
                (x % 17) as f32 - 8.0
            }
        })
        .collect()
}

fn config(codec: &dyn Codec, v: Variant, job: u32, rank: u16) -> WorkerConfig {
    let mut c = WorkerConfig::new(job, rank, WORLD, codec.id());
    // A chunk that fits a QUIC datagram, so every transport runs the same chunks.
    c.chunk_elems = (1024 / codec.wire_bytes()) as u16;
    c.window = 16;
    c.stochastic_rounding = v.stochastic.then_some(42);
    c.skip_zeros = v.skip_zeros;
    c
}

/// The results of every round at rank 0 (all ranks are compared with it).
type Results = Vec<Vec<f32>>;

fn in_memory(codec: &dyn Codec, v: Variant) -> Results {
    let cfgs = (0..WORLD).map(|r| config(codec, v, 1, r)).collect();
    let mut sim = Sim::new(SimConfig::lossless(7), AggregatorConfig::default(), cfgs);
    sim.feedback = v.feedback.then_some(5);
    (0..v.rounds())
        .map(|round| {
            let inputs = (0..WORLD).map(|r| input(codec, r, round)).collect();
            let out = sim.allreduce(inputs).expect("in-memory allreduce");
            assert!(out.iter().all(|o| o == &out[0]), "ranks differ in memory");
            out[0].clone()
        })
        .collect()
}

fn over(addr: SocketAddr, transport: &Transport, codec: CodecId, v: Variant, job: u32) -> Results {
    let handles: Vec<JoinHandle<Results>> = (0..WORLD)
        .map(|r| {
            let codec = inagg_proto::codec::lookup(codec).expect("codec");
            let mut o = Options::new(addr, job, r, WORLD, codec.id());
            o.protocol = config(codec, v, job, r);
            o.transport = transport.clone();
            std::thread::spawn(move || {
                let w = Worker::connect(o).expect("connect");
                let out = (0..v.rounds())
                    .map(|round| {
                        let mut buf = input(codec, r, round);
                        if v.feedback {
                            w.allreduce_with_feedback(&mut buf, 5).expect("allreduce");
                        } else {
                            w.allreduce(&mut buf).expect("allreduce");
                        }
                        buf
                    })
                    .collect();
                w.close();
                out
            })
        })
        .collect();
    let all: Vec<Results> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    assert!(all.iter().all(|o| same_bits(o, &all[0])), "ranks differ");
    all.into_iter().next().expect("rank 0")
}

/// Largest error allowed, relative to the largest exact sum.
fn tolerance(id: CodecId) -> f32 {
    if [CodecId::F32, CodecId::F16, CodecId::BF16].contains(&id) {
        0.0
    } else if id == CodecId::I32 {
        1e-6
    } else if id == CodecId::I16 {
        1e-3
    } else {
        0.05
    }
}

/// A UDP, a QUIC and an in-memory aggregator in this process, stopped when dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    udp: SocketAddr,
    quic: SocketAddr,
    net: MemNet,
    memory: SocketAddr,
    ca: PathBuf,
    dir: PathBuf,
}

impl Servers {
    fn start() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("inagg-conf-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let id = Identity::load_or_generate(&dir.join("c.pem"), &dir.join("k.pem")).expect("id");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let udp = Server::bind(ServerConfig::new(any)).expect("udp");
        let quic = Server::bind_quic(ServerConfig::new(any), &id).expect("quic");
        let (udp_addr, quic_addr) = (
            udp.local_addr().expect("addr"),
            quic.local_addr().expect("addr"),
        );
        // Faults on every path of the in-memory network: the driver's retransmissions,
        // probes and duplicate handling run, as over a lossy link.
        let net = MemNet::new(MemFaults {
            loss: 0.02,
            duplicate: 0.01,
            reorder: 0.02,
            seed: 11,
        });
        let memory = Server::bind_memory(
            ServerConfig::new("10.1.0.1:7070".parse().expect("addr")),
            &net,
        )
        .expect("memory");
        let memory_addr = memory.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s1 = Arc::clone(&stop);
        let s2 = Arc::clone(&stop);
        let s3 = Arc::clone(&stop);
        let threads = vec![
            std::thread::spawn(move || {
                udp.run(&s1).expect("udp server");
            }),
            std::thread::spawn(move || {
                quic.run(&s2).expect("quic server");
            }),
            std::thread::spawn(move || {
                memory.run(&s3).expect("memory server");
            }),
        ];
        Self {
            stop,
            threads,
            udp: udp_addr,
            quic: quic_addr,
            net,
            memory: memory_addr,
            ca: id.cert_path,
            dir,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn every_codec_and_option_gives_the_same_bits_over_every_transport() {
    let servers = Servers::start();
    let quic = |mode| {
        let mut q = QuicOptions::new(Trust::Ca(servers.ca.clone()));
        q.mode = mode;
        Transport::Quic(q)
    };
    let transports = [
        (
            "memory",
            servers.memory,
            Transport::Memory(servers.net.clone()),
        ),
        ("udp", servers.udp, Transport::Udp),
        ("quic stream", servers.quic, quic(QuicMode::Stream)),
        ("quic datagram", servers.quic, quic(QuicMode::Datagram)),
    ];
    let mut job = 100;
    let mut failed = Vec::new();
    let mut cases = 0;
    for codec in ALL.iter().copied() {
        for v in VARIANTS {
            if v.stochastic && codec.id() == CodecId::F32 {
                continue; // nothing to round
            }
            let reference = in_memory(codec, v);
            // Against the exact sum (the last round's, for error feedback).
            let round = reference.len() - 1;
            let inputs: Vec<Vec<f32>> = (0..WORLD).map(|r| input(codec, r, round)).collect();
            let exact: Vec<f32> = (0..N)
                .map(|i| inputs.iter().map(|x| f64::from(x[i])).sum::<f64>() as f32)
                .collect();
            let peak = exact.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = reference[round]
                .iter()
                .zip(&exact)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let slack = if v.feedback { 2.0 } else { 1.0 };
            assert!(
                err <= tolerance(codec.id()) * peak * slack,
                "{} {v:?}: error {err} against peak {peak}",
                codec.name()
            );
            for (name, addr, t) in &transports {
                job += 1;
                cases += 1;
                let case = format!("{} {v:?} over {name}", codec.name());
                let run = || over(*addr, t, codec.id(), v, job);
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(got) if same_bits(&got, &reference) => {}
                    Ok(_) => failed.push(format!("{case}: other bits")),
                    Err(_) => failed.push(format!("{case}: failed (see its panic above)")),
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {cases} cases differ from the simulator: {failed:#?}",
        failed.len()
    );
    // Six codecs (f32 without stochastic rounding) by four options by four transports.
    assert_eq!(cases, (6 * 4 - 1) * 4);
}

/// Whether every round's result holds the same bits.
fn same_bits(a: &Results, b: &Results) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}
