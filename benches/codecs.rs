//! Codec and aggregator kernels against memcpy of the same bytes in the same pattern,
//! in one group each, so that the ratio is read from one run on a noisy machine.
//!
//! `cargo bench --bench codecs` (one codec: `cargo bench --bench codecs -- i8`; one
//! size: `-- /packet` or `-- /tensor`). Throughput is the f32 bytes a worker hands in
//! (encode, decode) or the wire bytes the aggregator takes in (sum), and the memcpy of
//! each group copies exactly that.
//!
//! The kernels run as inagg runs them. A worker encodes its tensor chunk by chunk into
//! one packet buffer (block-scaled codecs first find the chunk's exponent, a pass of
//! its own: it travels a window ahead) and decodes each result from one receive
//! buffer into the tensor; the aggregator adds a packet's payload into a slot's lanes.
//! Two sizes, chosen so that a kernel and its memcpy work at the same level of the
//! memory hierarchy (a ratio across levels measures the caches, not the kernel):
//! - `packet`: 8 Ki elements, the default chunk of i32 and i16 toward a loopback
//!   aggregator (f32 takes 16,256 there, f16 and bf16 32,512, i8 57,344; every codec
//!   takes 8 KiB of payload toward any other): everything in L1/L2. The sum takes a
//!   window's worth: 32 such payloads (a receive batch) into 32 slots' lanes, one
//!   call per packet, and its memcpy copies those payloads into 32 buffers; one
//!   payload into one slot would compare a sum that leaves L1 with a memcpy in it.
//! - `tensor`: 64 Mi elements (256 MiB of f32), beyond every cache: encode and decode
//!   stream the tensor through one chunk-sized buffer (the memcpy too); the sum adds a
//!   whole tensor of payload, packet by packet, into as many lanes: its worst case.
//!
//! In between, ratios measure where the caches' edges fall, not the kernels: a memcpy
//! that stays in a cache level its kernel has left makes the kernel look slow, and one
//! that fits the last-level cache where f32's does not makes the narrow codecs look
//! fast (docs/performance.md, "Codec bench sizes").

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use inagg_proto::codec::{self, Codec};

/// Elements per call, by name: one packet's chunk and one large gradient tensor.
const SIZES: [(&str, usize); 2] = [("packet", CHUNK), ("tensor", 64 << 20)];

/// Elements per chunk: 8 Ki, the default chunk of i32 and i16 toward a loopback
/// aggregator (module docs).
const CHUNK: usize = 8 << 10;

/// Slots the aggregator cycles through: the loopback default window of i32 and i16.
const WINDOW: usize = 32;

/// The world size the chunks are scaled and summed for (codecs may pick their sum's
/// lanes from it: i8 sums 4 ranks in 16-bit lanes).
const WORLD: u16 = 4;

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 2f32.powi((i / 4096 % 8) as i32 - 4))
        .collect()
}

fn kernels(c: &mut Criterion) {
    for (size, n) in SIZES {
        kernels_at(c, size, n);
    }
}

fn kernels_at(c: &mut Criterion, size: &str, n: usize) {
    let src = data(n);
    let mut out = vec![0f32; n];
    // What memcpy copies from and to: the tensor and one chunk's bytes.
    let (mut tensor_bytes, mut chunk_bytes) = (vec![1u8; n * 4], vec![0u8; CHUNK * 4]);
    // The sum: a window of packets at the packet size, the whole tensor else.
    let n_sum = if n == CHUNK { WINDOW * CHUNK } else { n };
    let sum_data = if n_sum == n { None } else { Some(data(n_sum)) };
    let sum_data = sum_data.as_deref().unwrap_or(&src);
    let (sum_src, mut sum_dst) = (vec![1u8; n_sum * 4], vec![1u8; n_sum * 4]);
    for codec in codec::ALL {
        let codec: &dyn Codec = *codec;
        let w = codec.wire_bytes();
        let e = codec::block_exponent(&src).unwrap_or(0);
        let scale = codec.scale(WORLD, e);
        let mut packet = vec![0u8; CHUNK * w];
        let mut wire = vec![0u8; n_sum * w];
        codec.encode(sum_data, scale, &mut wire);
        // The aggregator's path: each chunk's lanes set by a first contribution, then
        // added to at the same exponent (aligned i8 stays in 16-bit lanes so).
        let mut acc = vec![0u32; n_sum];
        let mut ats = vec![codec::Alignment::EMPTY; n_sum.div_ceil(CHUNK)];
        for ((lanes, payload), at) in acc
            .chunks_mut(CHUNK)
            .zip(wire.chunks(CHUNK * w))
            .zip(&mut ats)
        {
            codec.sum_at(lanes, WORLD, at, e, payload);
        }

        let mut g = c.benchmark_group(format!("{}/encode/{size}", codec.name()));
        g.throughput(Throughput::Bytes((n * 4) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| {
                for chunk in black_box(&src).chunks(CHUNK) {
                    if codec.block_scaled() {
                        let _ = black_box(codec::block_exponent(chunk));
                    }
                    codec.encode(chunk, scale, black_box(&mut packet[..chunk.len() * w]));
                }
            })
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                for chunk in black_box(&tensor_bytes).chunks(CHUNK * 4) {
                    black_box(&mut chunk_bytes[..chunk.len()]).copy_from_slice(chunk);
                }
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("{}/decode/{size}", codec.name()));
        g.throughput(Throughput::Bytes((n * 4) as u64));
        let result = &wire[..CHUNK.min(n) * w];
        g.bench_function("codec", |b| {
            b.iter(|| {
                for chunk in black_box(&mut out).chunks_mut(CHUNK) {
                    codec.decode(black_box(&result[..chunk.len() * w]), scale, chunk);
                }
            })
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                for chunk in black_box(&mut tensor_bytes).chunks_mut(CHUNK * 4) {
                    chunk.copy_from_slice(black_box(&chunk_bytes[..chunk.len()]));
                }
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("{}/sum/{size}", codec.name()));
        g.throughput(Throughput::Bytes((n_sum * w) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| {
                let chunks = acc.chunks_mut(CHUNK).zip(wire.chunks(CHUNK * w));
                for ((lanes, payload), at) in chunks.zip(&mut ats) {
                    codec.sum_at(black_box(lanes), WORLD, at, e, black_box(payload));
                }
            })
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                let (from, to) = (&sum_src[..n_sum * w], &mut sum_dst[..n_sum * w]);
                for (d, s) in to.chunks_mut(CHUNK * w).zip(from.chunks(CHUNK * w)) {
                    black_box(d).copy_from_slice(black_box(s));
                }
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = kernels
}
criterion_main!(benches);
