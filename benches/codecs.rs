//! Codec and aggregator kernels against memcpy of the same bytes, in one group each, so
//! that the ratio is read from one run on a noisy machine.
//!
//! `cargo bench --bench codecs` (one codec: `cargo bench --bench codecs -- i8`).
//! Throughput is the f32 bytes a worker hands in (encode, decode) or the wire bytes
//! the aggregator takes in (sum), and the memcpy of each group copies exactly that.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use inagg_proto::codec::{self, Codec};

/// Elements per call: 1 Mi, beyond the caches that a packet's chunk would sit in, as
/// a whole gradient tensor is.
const N: usize = 1 << 20;

/// The world size the chunks are scaled and summed for (codecs may pick their sum's
/// lanes from it: i8 sums 4 ranks in 16-bit lanes).
const WORLD: u16 = 4;

fn data() -> Vec<f32> {
    (0..N)
        .map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 2f32.powi((i / 4096 % 8) as i32 - 4))
        .collect()
}

fn kernels(c: &mut Criterion) {
    let src = data();
    for codec in codec::ALL {
        let codec: &dyn Codec = *codec;
        let w = codec.wire_bytes();
        let e = codec::block_exponent(&src).unwrap_or(0);
        let scale = codec.scale(WORLD, e);
        let mut wire = vec![0u8; N * w];
        codec.encode(&src, scale, &mut wire);
        let mut out = vec![0f32; N];
        let mut acc = vec![0u32; N];
        codec.sum_first(&mut acc, WORLD, &wire);
        let (mut copy_src, mut copy_dst) = (vec![0u8; N * 4], vec![0u8; N * 4]);
        copy_src
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);

        let mut g = c.benchmark_group(format!("{}/encode", codec.name()));
        g.throughput(Throughput::Bytes((N * 4) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| codec.encode(black_box(&src), scale, black_box(&mut wire)))
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| copy_dst.copy_from_slice(black_box(&copy_src)))
        });
        g.finish();

        let mut g = c.benchmark_group(format!("{}/decode", codec.name()));
        g.throughput(Throughput::Bytes((N * 4) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| codec.decode(black_box(&wire), scale, black_box(&mut out)))
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| copy_dst.copy_from_slice(black_box(&copy_src)))
        });
        g.finish();

        let mut g = c.benchmark_group(format!("{}/sum", codec.name()));
        g.throughput(Throughput::Bytes((N * w) as u64));
        g.bench_function("codec", |b| {
            b.iter(|| codec.sum_add(black_box(&mut acc), WORLD, black_box(&wire)))
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| copy_dst[..N * w].copy_from_slice(black_box(&copy_src[..N * w])))
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
