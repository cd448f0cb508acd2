//! The wire form of a partial sum between aggregator levels (docs/protocol.md 8.5):
//! the 32-bit lanes that [`crate::AggregatorCodec::store_partial`] writes, packed at
//! the fewest bits that hold every lane of a block. A rack's sum of a few `i8`
//! contributions so goes up in about 9 bits per element rather than 32; f32 lanes
//! (the float codecs') go up whole.

use crate::{block_range, exponent_blocks, Alignment, Codec, MAX_BLOCKS, PARTIAL_LANE_BYTES};

/// Bytes of the head of each exponent block: width, unit, top.
pub const HEAD_BYTES: usize = 3;

/// Appends the payload of a partial sum of `lanes.len()` elements, summed block by
/// block as `at` says ([`crate::sum_blocks`]), to `out`: one head per block (the
/// width it is packed at, the exponents its lanes count and its largest), then each
/// block's lanes ([`crate::AggregatorCodec::store_partial`]) packed at that width:
/// the fewest bits for the fixed-point codecs, 32 for the float codecs' f32 lanes.
/// `scratch` is reused between calls.
pub fn encode(
    codec: &dyn Codec,
    lanes: &[u32],
    world: u16,
    at: &[Alignment; MAX_BLOCKS],
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    let count = lanes.len();
    let k = exponent_blocks(codec, count);
    let heads = out.len();
    out.resize(heads + k * HEAD_BYTES, 0);
    for (b, a) in at.iter().enumerate().take(k) {
        let r = block_range(b, count, k);
        let bytes = r.len() * PARTIAL_LANE_BYTES;
        let width = if codec.block_scaled() {
            // Every byte is written: no need to clear what a last call left.
            scratch.resize(bytes, 0);
            codec.store_partial(&lanes[r], world, *a, scratch);
            let width = int_width(scratch);
            pack(scratch, width, out);
            width
        } else {
            // f32 lanes go up whole: stored straight into the datagram.
            let start = out.len();
            out.resize(start + bytes, 0);
            codec.store_partial(&lanes[r], world, *a, &mut out[start..]);
            MAX_WIDTH
        };
        out[heads + b * HEAD_BYTES..heads + (b + 1) * HEAD_BYTES].copy_from_slice(&[
            width,
            a.unit as u8,
            a.top as u8,
        ]);
    }
}

/// Adds a partial sum's payload (as [`encode`] writes it, its length checked against
/// its heads) of `lanes.len()` elements to `lanes`, block by block
/// ([`crate::AggregatorCodec::add_partial`]), with the whole job's `world`.
pub fn add(
    codec: &dyn Codec,
    lanes: &mut [u32],
    world: u16,
    at: &mut [Alignment; MAX_BLOCKS],
    payload: &[u8],
    scratch: &mut Vec<u8>,
) {
    let count = lanes.len();
    let k = exponent_blocks(codec, count);
    let (heads, mut data) = payload.split_at((k * HEAD_BYTES).min(payload.len()));
    for (b, head) in heads.chunks_exact(HEAD_BYTES).enumerate() {
        let r = block_range(b, count, k);
        let width = head[0].clamp(1, MAX_WIDTH);
        let len = packed_bytes(r.len(), width).min(data.len());
        let (packed, rest) = data.split_at(len);
        data = rest;
        let bytes = r.len() * PARTIAL_LANE_BYTES;
        let lanes_in = if width == MAX_WIDTH && packed.len() == bytes {
            // Whole 32-bit lanes are added where they lie.
            packed
        } else {
            // `unpack` writes every byte.
            scratch.resize(bytes, 0);
            unpack(packed, width, scratch);
            &scratch[..]
        };
        let p = Alignment {
            first: false,
            unit: head[1] as i8,
            top: head[2] as i8,
            wide: true,
        };
        codec.add_partial(&mut lanes[r], world, &mut at[b], p, lanes_in);
    }
}

/// The most bits a packed lane takes: a whole 32-bit lane.
pub const MAX_WIDTH: u8 = 32;

/// The fewest bits (1 to 32) that hold every lane, each read as a little-endian
/// two's complement `i32` of [`crate::PARTIAL_LANE_BYTES`].
pub fn int_width(lanes: &[u8]) -> u8 {
    // A value fits `w` bits when it lies in `-2^(w-1)..2^(w-1)`: when `x ^ (x >> 31)`
    // (its magnitude bits, sign folded) is below `2^(w-1)`.
    let folded = lanes
        .chunks_exact(4)
        .map(|c| {
            let x = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            (x ^ (x >> 31)) as u32
        })
        .fold(0u32, |a, b| a | b);
    (33 - folded.leading_zeros()) as u8
}

/// Bytes of `n` lanes packed at `width` bits.
pub fn packed_bytes(n: usize, width: u8) -> usize {
    (n * usize::from(width)).div_ceil(8)
}

/// Appends `lanes` (4 bytes each) packed at `width` bits (1 to 32), lowest bits first;
/// each lane keeps its low `width` bits.
pub fn pack(lanes: &[u8], width: u8, out: &mut Vec<u8>) {
    let width = u32::from(width.clamp(1, MAX_WIDTH));
    if width == 32 {
        return out.extend_from_slice(lanes);
    }
    let (start, len) = (out.len(), packed_bytes(lanes.len() / 4, width as u8));
    // Whole 32-bit words go out as they fill: 4 bytes of slack for the last.
    out.resize(start + len + 4, 0);
    let dst = &mut out[start..];
    let mask = (1u64 << width) - 1;
    let (mut bits, mut held, mut at) = (0u64, 0u32, 0usize);
    for c in lanes.chunks_exact(4) {
        bits |= (u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) & mask) << held;
        held += width;
        if held >= 32 {
            dst[at..at + 4].copy_from_slice(&(bits as u32).to_le_bytes());
            at += 4;
            bits >>= 32;
            held -= 32;
        }
    }
    dst[at..at + 4].copy_from_slice(&(bits as u32).to_le_bytes());
    out.truncate(start + len);
}

/// Writes the lanes that `src` packs at `width` bits (1 to 32) into `out`, 4 bytes
/// each, sign-extended: as many as `out` holds, reading zeros past the end of `src`
/// (whose length the caller has checked against [`packed_bytes`]).
pub fn unpack(src: &[u8], width: u8, out: &mut [u8]) {
    let width = u32::from(width.clamp(1, MAX_WIDTH));
    if width == 32 {
        let n = out.len().min(src.len());
        out[..n].copy_from_slice(&src[..n]);
        out[n..].fill(0);
        return;
    }
    let mask = (1u64 << width) - 1;
    let shift = 64 - width;
    let (mut bits, mut held, mut at) = (0u64, 0u32, 0usize);
    for o in out.chunks_exact_mut(4) {
        if held < width {
            // The next 32-bit word, zeros past the end.
            let word = match src.get(at..at + 4) {
                Some(w) => u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
                None => {
                    let mut w = [0u8; 4];
                    let rest = src.get(at..).unwrap_or(&[]);
                    w[..rest.len().min(4)].copy_from_slice(&rest[..rest.len().min(4)]);
                    u32::from_le_bytes(w)
                }
            };
            bits |= u64::from(word) << held;
            held += 32;
            at += 4;
        }
        let v = bits & mask;
        bits >>= width;
        held -= width;
        o.copy_from_slice(&((((v << shift) as i64) >> shift) as i32).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn widths_are_the_fewest_bits() {
        assert_eq!(int_width(&lanes(&[0, 0])), 1);
        assert_eq!(int_width(&lanes(&[-1])), 1);
        assert_eq!(int_width(&lanes(&[1])), 2);
        assert_eq!(int_width(&lanes(&[255, -256])), 9);
        assert_eq!(int_width(&lanes(&[256])), 10);
        assert_eq!(int_width(&lanes(&[i32::MIN, 3])), 32);
        assert_eq!(int_width(&lanes(&[i32::MAX])), 32);
    }

    #[test]
    fn packing_round_trips_at_every_width() {
        for width in 1..=32u8 {
            let (lo, hi) = (-(1i64 << (width - 1)), (1i64 << (width - 1)) - 1);
            // The extremes, zero and a spread between, an odd count.
            let mut v = vec![lo, hi, 0, -1, hi.min(1)];
            v.extend((0..41).map(|i| lo + (i * 7919) % (hi - lo + 1)));
            let v: Vec<i32> = v.into_iter().map(|x| x as i32).collect();
            let src = lanes(&v);
            assert!(int_width(&src) <= width);
            let mut packed = Vec::new();
            pack(&src, width, &mut packed);
            assert_eq!(packed.len(), packed_bytes(v.len(), width), "width {width}");
            let mut back = vec![0u8; src.len()];
            unpack(&packed, width, &mut back);
            assert_eq!(back, src, "width {width}");
        }
    }

    #[test]
    fn a_short_source_reads_zeros() {
        let mut out = vec![0xffu8; 8];
        unpack(&[0x05], 4, &mut out);
        assert_eq!(out, lanes(&[5, 0]));
    }
}
