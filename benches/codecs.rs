//! Codec and aggregator kernels against memcpy of the same bytes in the same pattern,
//! in one group each, so that the ratio is read from one run on a noisy machine.
//!
//! `cargo bench --bench codecs` (one codec: `cargo bench --bench codecs -- i8`; one
//! size: `-- /packet` or `-- /tensor`). Throughput is the f32 bytes a worker hands in
//! (encode, decode) or the wire bytes the aggregator takes in (sum), and the memcpy of
//! each group copies exactly that.
//!
//! The kernels run as inagg runs them. A worker encodes its tensor chunk by chunk into
//! one packet buffer and decodes each result from one receive buffer into the tensor;
//! the aggregator adds a packet's payload into a slot's lanes. Two sizes, chosen so
//! that a kernel and its memcpy work at the same level of the memory hierarchy (a
//! ratio across levels measures the caches, not the kernel):
//! - `packet`: 32 Ki elements, one default loopback chunk: everything in L1/L2.
//! - `tensor`: 64 Mi elements (256 MiB of f32), beyond every cache: encode and decode
//!   stream the tensor through one chunk-sized buffer (the memcpy too); the sum adds a
//!   whole tensor of payload into as many lanes, its worst case.
//!
//! In between, ratios measure where the caches' edges fall: at 1 Mi elements and with
//! whole-tensor buffers (how this bench ran before) i8's memcpy moved 2 MiB and stayed
//! in a 2 MiB L2 while the i8 sum's 3 MiB did not (0.34x, against 0.6-0.7x at either
//! size here); at 16 Mi the 2-byte codecs' 64 MiB memcpy still ran from the last-level
//! cache at twice the bandwidth of f32's 128 MiB.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use inagg_proto::codec::{self, Codec};

/// Elements per call, by name: one packet's chunk and one large gradient tensor.
const SIZES: [(&str, usize); 2] = [("packet", CHUNK), ("tensor", 64 << 20)];

/// Elements per chunk: 32 KiB of f32 (the default chunk to a loopback aggregator is
/// 32 KiB of wire bytes, so this is the largest chunk of any codec there).
const CHUNK: usize = 32 << 10;

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
    let (sum_src, mut sum_dst) = (vec![1u8; n * 4], vec![1u8; n * 4]);
    for codec in codec::ALL {
        let codec: &dyn Codec = *codec;
        let w = codec.wire_bytes();
        let e = codec::block_exponent(&src).unwrap_or(0);
        let scale = codec.scale(WORLD, e);
        let mut packet = vec![0u8; CHUNK * w];
        let mut wire = vec![0u8; n * w];
        codec.encode(&src, scale, &mut wire);
        let mut acc = vec![0u32; n];
        codec.sum_first(&mut acc, WORLD, &wire);

        let mut g = c.benchmark_group(format!("{}/encode/{size}", codec.name()));
        g.throughput(Throughput::Bytes((n * 4) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| {
                for chunk in black_box(&src).chunks(CHUNK) {
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
        g.throughput(Throughput::Bytes((n * w) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| codec.sum_add(black_box(&mut acc), WORLD, black_box(&wire)))
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| sum_dst[..n * w].copy_from_slice(black_box(&sum_src[..n * w])))
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
