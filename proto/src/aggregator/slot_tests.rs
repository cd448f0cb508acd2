//! A slot pool that holds `i8` contributions and sums them when the last comes
//! (`AggregatorCodec::sum_store_all`) against one that sums them in turn: the same outcomes and
//! the same result bytes, whatever the exponents (within the narrow lanes' span, beyond
//! it, missing), the arrival order, the duplicates and the chunk's length.

use proptest::prelude::*;

use super::slots::{Outcome, SlotPool};
use crate::codec::{self, Codec, EXPONENT_BLOCK};
use crate::wire::{DataHeader, FLAG_LAST, NO_EXPONENT};

const SLOTS: u32 = 2;

/// The `i8` codec.
fn i8_codec() -> &'static dyn Codec {
    codec::by_name("i8").expect("i8 is built in")
}

/// Rank `r`'s contribution to packet `seq`: its header and payload, quantized at
/// `exps[b]` for block `b` (the first in the header, the others after the data).
fn contribution(seq: u64, r: u16, count: u16, exps: &[i8], data: &[u8]) -> (DataHeader, Vec<u8>) {
    let h = DataHeader {
        job: 1,
        rank: r,
        codec: i8_codec().id(),
        flags: FLAG_LAST,
        token: 7,
        seq,
        slot: (seq % u64::from(SLOTS)) as u32,
        version: ((seq / u64::from(SLOTS)) % 2) as u8,
        scale_exp: exps[0],
        next_exp: NO_EXPONENT,
        count,
    };
    let mut payload = data.to_vec();
    payload.extend(exps[1..].iter().map(|&e| e as u8));
    assert_eq!(
        payload.len(),
        codec::payload_bytes(i8_codec(), usize::from(count))
    );
    (h, payload)
}

/// A block exponent: missing one time in eight, at the ends of the range (where the
/// scale clamps the smallest together) one in eight, else within `spread` of 0.
fn exponent(spread: i8) -> impl Strategy<Value = i8> {
    prop_oneof![
        1 => Just(NO_EXPONENT),
        1 => prop_oneof![codec::MIN_EXPONENT..=-118, Just(codec::MAX_EXPONENT)],
        6 => -spread..=spread,
    ]
}

/// World, chunk length, each rank's block exponents and data, and an arrival order
/// with duplicates (rank indices, each rank at least once).
type Case = (u16, u16, Vec<Vec<i8>>, Vec<Vec<u8>>, Vec<usize>);

/// A [`Case`].
fn case() -> impl Strategy<Value = Case> {
    (
        1u16..=5,
        1u16..=20_000,
        prop_oneof![Just(3i8), Just(6), Just(40)],
    )
        .prop_flat_map(|(world, count, spread)| {
            let w = usize::from(world);
            let blocks = usize::from(count).div_ceil(EXPONENT_BLOCK);
            (
                Just(world),
                Just(count),
                proptest::collection::vec(proptest::collection::vec(exponent(spread), blocks), w),
                proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), usize::from(count)),
                    w,
                ),
                Just((0..w).collect::<Vec<_>>()).prop_shuffle(),
                proptest::collection::vec(0..w, 0..4),
            )
                .prop_map(|(world, count, exps, data, order, dups)| {
                    let mut order = order;
                    for (k, d) in dups.into_iter().enumerate() {
                        let at = (k * 3) % (order.len() + 1);
                        order.insert(at, d);
                    }
                    (world, count, exps, data, order)
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn holding_contributions_sums_what_summing_in_turn_does(
        (world, count, exps, data, order) in case()
    ) {
        let chunk = 20_000;
        let mut held = SlotPool::new(SLOTS, chunk, i8_codec(), world, 3);
        let mut in_turn = SlotPool::new(SLOTS, chunk, i8_codec(), world, 3).sum_in_turn();
        // Two rounds through the same version: the second restarts what the first held.
        for seq in [3, 3 + 2 * u64::from(SLOTS)] {
            for &r in &order {
                let (h, p) = contribution(seq, r as u16, count, &exps[r], &data[r]);
                let a = held.contribute(r as u16, &h, &p);
                let b = in_turn.contribute(r as u16, &h, &p);
                prop_assert_eq!(a, b, "rank {} of packet {}", r, seq);
            }
            let (ma, ra) = held.result(seq).expect("complete");
            let (mb, rb) = in_turn.result(seq).expect("complete");
            prop_assert_eq!(ma.scale_exp, mb.scale_exp);
            prop_assert_eq!(ra, rb);
            // Answers from the copy after completion.
            let (h, p) = contribution(seq, 0, count, &exps[0], &data[0]);
            prop_assert_eq!(held.contribute(0, &h, &p), Outcome::AnswerCopy);
        }
    }
}

#[test]
fn i8_pools_of_up_to_four_ranks_hold_and_wider_ones_sum_in_turn() {
    // What the property above compares: held for 1-4 ranks, in turn for 5.
    for world in 1..=5u16 {
        let pool = SlotPool::new(SLOTS, 32_768, i8_codec(), world, 0);
        assert_eq!(pool.holds(), world <= 4, "world {world}");
    }
    // The largest chunk holds; below three elements, three contributions and their
    // exponents do not fit the lanes.
    assert!(SlotPool::new(SLOTS, 65_460, i8_codec(), 4, 0).holds());
    assert!(SlotPool::new(SLOTS, 3, i8_codec(), 4, 0).holds());
    assert!(!SlotPool::new(SLOTS, 2, i8_codec(), 4, 0).holds());
    // Codecs that do not sum all at once never hold.
    for c in codec::ALL.iter().filter(|c| c.id() != i8_codec().id()) {
        assert!(
            !SlotPool::new(SLOTS, 4096, *c, 4, 0).holds(),
            "{}",
            c.name()
        );
    }
}
