//! The wire form of a partial sum between aggregator levels (docs/protocol.md 8.5):
//! the 32-bit lanes that [`crate::AggregatorCodec::store_partial`] writes. The
//! fixed-point codecs' lanes go up zigzag-coded in groups of [`GROUP_LANES`], each
//! bit-packed at the fewest bits that hold it (the `bitpacking` crate's
//! [`BitPacker4x`] layout, little-endian words), so that a block's quiet stretches go
//! up narrower than its largest values: a rack's sum of two `i8` contributions takes
//! at most 9 bits per element (and a width byte per 128) where their exponents agree,
//! fewer where the values are small beside the block's largest, none where they are
//! zero. f32 lanes (the float codecs') go up whole.

use bitpacking::{BitPacker, BitPacker4x};

use crate::{block_range, exponent_blocks, Alignment, Codec, MAX_BLOCKS, PARTIAL_LANE_BYTES};

/// Bytes of the head of each exponent block: width, unit, top.
pub const HEAD_BYTES: usize = 3;

/// The most bits a packed lane takes: a whole 32-bit lane.
pub const MAX_WIDTH: u8 = 32;

/// Swaps each 32-bit word of `bytes` between the machine's byte order, in which
/// [`BitPacker4x`] reads and writes them, and the wire's little-endian: nothing to
/// do on a little-endian machine.
fn words_to_le(bytes: &mut [u8]) {
    if cfg!(target_endian = "big") {
        bytes.chunks_exact_mut(4).for_each(<[u8]>::reverse);
    }
}

/// Lanes in a group of a fixed-point block's partial sum, packed at one width: one
/// [`BitPacker4x`] block. Small enough that a block's quiet stretches go up narrow,
/// large enough that the width byte costs a sixteenth of a bit a lane.
pub const GROUP_LANES: usize = BitPacker4x::BLOCK_LEN;

/// Bytes of one group packed at `width` bits: its width byte and 128 lanes' bits (a
/// block's last group is padded with zero lanes).
pub fn group_bytes(width: u8) -> usize {
    1 + GROUP_LANES * usize::from(width) / 8
}

/// The most bytes the payload of a partial sum of `count` elements of `codec` takes:
/// its heads, and every lane at 32 bits (with a width byte per group for the
/// fixed-point codecs).
pub fn max_bytes(codec: &dyn Codec, count: usize) -> usize {
    let k = exponent_blocks(codec, count);
    (0..k)
        .map(|b| {
            let n = block_range(b, count, k).len();
            HEAD_BYTES
                + if codec.block_scaled() {
                    n.div_ceil(GROUP_LANES) * group_bytes(MAX_WIDTH)
                } else {
                    n * PARTIAL_LANE_BYTES
                }
        })
        .sum()
}

/// Appends the payload of a partial sum of `lanes.len()` elements, summed block by
/// block as `at` says ([`crate::sum_blocks`]), to `out`: one head per block (the
/// widest its lanes are packed at, the exponents its lanes count and its largest),
/// then each block's lanes ([`crate::AggregatorCodec::store_partial`]): for the
/// fixed-point codecs in groups of [`GROUP_LANES`], each a width byte and its lanes
/// zigzag-coded and packed at the fewest bits that hold them; for the float codecs
/// whole f32 lanes. `scratch` is reused between calls.
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
    let packer = BitPacker4x::new();
    for (b, a) in at.iter().enumerate().take(k) {
        let r = block_range(b, count, k);
        let bytes = r.len() * PARTIAL_LANE_BYTES;
        let width = if codec.block_scaled() {
            // Every byte is written: no need to clear what a last call left.
            scratch.resize(bytes, 0);
            codec.store_partial(&lanes[r], world, *a, scratch);
            let mut widest = 0;
            for group in scratch.chunks(GROUP_LANES * PARTIAL_LANE_BYTES) {
                let mut zigzag = [0u32; GROUP_LANES];
                for (z, c) in zigzag
                    .iter_mut()
                    .zip(group.chunks_exact(PARTIAL_LANE_BYTES))
                {
                    let x = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    *z = ((x << 1) ^ (x >> 31)) as u32;
                }
                let width = packer.num_bits(&zigzag);
                widest = widest.max(width);
                let start = out.len();
                out.resize(start + group_bytes(width), 0);
                out[start] = width;
                packer.compress(&zigzag, &mut out[start + 1..], width);
                words_to_le(&mut out[start + 1..]);
            }
            widest
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

/// Bytes of a block of `n` lanes whose head gives `width`, as [`encode`] writes it,
/// read from `data` (what follows the block's start): for the fixed-point codecs
/// (`grouped`), its groups', `None` where a group's width is missing or above
/// `width`, or where `width` is not the widest group's; for the float codecs `n`
/// whole lanes. The length may run past `data` (a last group cut short): the caller
/// checks it.
pub fn block_bytes(n: usize, width: u8, grouped: bool, data: &[u8]) -> Option<usize> {
    if !grouped {
        return Some(n * PARTIAL_LANE_BYTES);
    }
    let (mut len, mut widest) = (0, 0);
    for _ in 0..n.div_ceil(GROUP_LANES) {
        let w = *data.get(len)?;
        if w > width {
            return None;
        }
        widest = widest.max(w);
        len += group_bytes(w);
    }
    (widest == width).then_some(len)
}

/// Adds a partial sum's payload (as [`encode`] writes it, its length checked against
/// its heads and groups by the wire, [`block_bytes`]) of `lanes.len()` elements to
/// `lanes`, block by block ([`crate::AggregatorCodec::add_partial`]), with the whole
/// job's `world`. Each block's lanes are read where the block before ended.
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
    let grouped = codec.block_scaled();
    let (heads, mut data) = payload.split_at((k * HEAD_BYTES).min(payload.len()));
    for (b, head) in heads.chunks_exact(HEAD_BYTES).enumerate() {
        let r = block_range(b, count, k);
        let bytes = r.len() * PARTIAL_LANE_BYTES;
        let lanes_in = match data.split_at_checked(bytes) {
            // Whole 32-bit lanes are added where they lie.
            Some((whole, rest)) if !grouped => {
                data = rest;
                whole
            }
            _ => {
                // Every byte is written.
                scratch.resize(bytes, 0);
                data = &data[unpack(data, grouped, scratch)..];
                &scratch[..]
            }
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

/// Writes the lanes of one block that `src` starts with into `out`, 4 bytes each,
/// every byte written: groups of [`GROUP_LANES`] (each a width byte and its packed
/// lanes), or (`grouped` false) whole lanes; returns the bytes of `src` it read. A
/// group cut short, or past the end of `src`, reads as zeros.
fn unpack(src: &[u8], grouped: bool, out: &mut [u8]) -> usize {
    if !grouped {
        let n = out.len().min(src.len());
        out[..n].copy_from_slice(&src[..n]);
        out[n..].fill(0);
        return n;
    }
    let packer = BitPacker4x::new();
    let mut read = 0;
    for group in out.chunks_mut(GROUP_LANES * PARTIAL_LANE_BYTES) {
        let rest = &src[read..];
        // A width above 32 never passes the wire's checks; read as 32, it stays total.
        let width = rest.first().copied().unwrap_or(0).min(MAX_WIDTH);
        let mut zigzag = [0u32; GROUP_LANES];
        if let Some(packed) = rest.get(1..group_bytes(width)) {
            if cfg!(target_endian = "little") {
                packer.decompress(packed, &mut zigzag, width);
            } else {
                let mut words = [0u8; GROUP_LANES * PARTIAL_LANE_BYTES];
                let words = &mut words[..packed.len()];
                words.copy_from_slice(packed);
                words_to_le(words);
                packer.decompress(words, &mut zigzag, width);
            }
        }
        read += group_bytes(width).min(rest.len());
        for (o, &z) in group.chunks_exact_mut(PARTIAL_LANE_BYTES).zip(&zigzag) {
            let x = (z >> 1) as i32 ^ -((z & 1) as i32);
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each group of a fixed-point block goes up at its own fewest bits (zigzag: a
    /// group of zeros at none), and the sum comes back whole, the last short group
    /// included.
    #[test]
    fn groups_go_up_at_their_own_widths_and_add_back_whole() {
        let codec = &crate::fixed::I16;
        // Group g holds values in -2^(g-1)..2^(g-1) (group 0 zeros), signs alternating;
        // group 6 the extremes.
        let n = 6 * GROUP_LANES + 7;
        let sums: Vec<u32> = (0..n)
            .map(|i| {
                let g = (i / GROUP_LANES) as u32;
                let v = match g {
                    0 => 0,
                    6 => [i32::MIN, i32::MAX][i % 2],
                    _ => {
                        let v = (i as i32 * 7919) % (1 << (g - 1));
                        if i % 2 == 0 {
                            v
                        } else {
                            -v - 1
                        }
                    }
                };
                v as u32
            })
            .collect();
        let at = [Alignment::EMPTY; MAX_BLOCKS];
        let (mut payload, mut scratch) = (Vec::new(), Vec::new());
        encode(codec, &sums, 4, &at, &mut scratch, &mut payload);
        let widths: Vec<u8> = (0..7)
            .scan(HEAD_BYTES, |at, _| {
                let w = payload[*at];
                *at += group_bytes(w);
                Some(w)
            })
            .collect();
        assert_eq!(widths, [0, 1, 2, 3, 4, 5, 32]);
        assert_eq!(payload[0], 32, "the head has the widest group's width");
        let len = block_bytes(n, 32, true, &payload[HEAD_BYTES..]);
        assert_eq!(len, Some(payload.len() - HEAD_BYTES));
        assert_eq!(
            payload.len(),
            HEAD_BYTES + 7 + 16 * (1 + 2 + 3 + 4 + 5 + 32)
        );
        let mut back = vec![0u32; n];
        let mut back_at = [Alignment::EMPTY; MAX_BLOCKS];
        add(codec, &mut back, 4, &mut back_at, &payload, &mut scratch);
        assert_eq!(back, sums);
        // A group wider than its head is no block, nor a head wider than its widest
        // group, nor one cut short.
        let mut p = payload[HEAD_BYTES..].to_vec();
        p[0] = 6;
        assert_eq!(block_bytes(n, 5, true, &p), None);
        assert_eq!(block_bytes(n, 31, true, &payload[HEAD_BYTES..]), None);
        assert_eq!(block_bytes(n, 32, true, &p[..p.len() - 1 - 32 * 16]), None);
    }

    /// The packed bits lie where docs/protocol.md 8.5 says: lane `m` of a group at
    /// width `w` in column `m % 4`, at bit `(m / 4) * w` of that column, whose 32-bit
    /// words interleave with the other columns' (word `k` of column `j` is word
    /// `4k + j` of the group).
    #[test]
    fn packed_lanes_lie_where_the_specification_says() {
        let codec = &crate::fixed::I16;
        for w in [1u32, 7, 9, 13, 31] {
            // Values in -2^(w-1)..2^(w-1), the lowest first: w bits zigzag-coded.
            let sums: Vec<u32> = (0..GROUP_LANES as i32)
                .map(|m| {
                    let v = if m == 0 {
                        (1 << (w - 1)) - 1
                    } else {
                        (m * 2_654_435) % (1 << (w - 1))
                    };
                    if m % 3 == 0 {
                        -v - 1
                    } else {
                        v
                    }
                })
                .map(|x| x as u32)
                .collect();
            let (mut payload, mut scratch) = (Vec::new(), Vec::new());
            encode(
                codec,
                &sums,
                4,
                &[Alignment::EMPTY; MAX_BLOCKS],
                &mut scratch,
                &mut payload,
            );
            let words: Vec<u32> = payload[HEAD_BYTES + 1..]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(u32::from(payload[HEAD_BYTES]), w);
            for (m, &sum) in sums.iter().enumerate() {
                let (column, bit) = (m % 4, (m / 4) * w as usize);
                let (k, shift) = (bit / 32, bit % 32);
                let mut z = u64::from(words[4 * k + column]);
                if shift + w as usize > 32 {
                    z |= u64::from(words[4 * (k + 1) + column]) << 32;
                }
                let z = ((z >> shift) & ((1 << w) - 1)) as u32;
                let x = (z >> 1) as i32 ^ -((z & 1) as i32);
                assert_eq!(x as u32, sum, "lane {m} at width {w}");
            }
        }
    }

    /// A payload cut short (which the wire decoder refuses before this) adds zeros
    /// where its lanes are missing, and never reads past its end.
    #[test]
    fn a_short_payload_adds_zeros() {
        let codec = &crate::fixed::I16;
        let sums: Vec<u32> = (0..300).map(|i| i as u32).collect();
        let at = [Alignment::EMPTY; MAX_BLOCKS];
        let (mut payload, mut scratch) = (Vec::new(), Vec::new());
        encode(codec, &sums, 4, &at, &mut scratch, &mut payload);
        // Heads and the first group whole, the second cut.
        let cut = HEAD_BYTES + group_bytes(payload[HEAD_BYTES]) + 5;
        let mut back = vec![0u32; 300];
        let mut back_at = [Alignment::EMPTY; MAX_BLOCKS];
        add(
            codec,
            &mut back,
            4,
            &mut back_at,
            &payload[..cut],
            &mut scratch,
        );
        assert_eq!(&back[..128], &sums[..128]);
        assert!(back[128..].iter().all(|&x| x == 0));
    }
}
