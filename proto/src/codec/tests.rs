//! Codec round trips, sums and the block exponent, for every codec through the same
//! tests.

use super::*;

fn sum_through(codec: &dyn Codec, world: u16, inputs: &[Vec<f32>]) -> Vec<f32> {
    let e_max = if codec.block_scaled() {
        inputs
            .iter()
            .map(|v| block_exponent(v).expect("finite"))
            .max()
            .unwrap_or(NO_EXPONENT)
    } else {
        NO_EXPONENT
    };
    let scale = codec.scale(world, e_max);
    let n = inputs[0].len();
    let mut acc = vec![0u32; n];
    let mut wire = vec![0u8; n * codec.wire_bytes()];
    for (i, v) in inputs.iter().enumerate() {
        codec.encode(v, scale, &mut wire);
        if i == 0 {
            codec.sum_first(&mut acc, &wire);
        } else {
            codec.sum_add(&mut acc, &wire);
        }
    }
    codec.sum_store(&acc, &mut wire);
    let mut out = vec![0f32; n];
    codec.decode(&wire, scale, &mut out);
    out
}

#[test]
fn registry_is_consistent() {
    for (i, c) in ALL.iter().enumerate() {
        assert_eq!(lookup(c.id()).map(|x| x.name()), Some(c.name()));
        assert_eq!(by_name(c.name()).map(|x| x.id()), Some(c.id()));
        assert!(ALL[..i]
            .iter()
            .all(|o| o.id() != c.id() && o.name() != c.name()));
    }
    assert!(lookup(CodecId(0)).is_none());
    assert!(by_name("f64").is_none());
}

#[test]
fn block_exponent_bounds_every_value() {
    assert_eq!(block_exponent(&[0.0, -0.0]), Ok(NO_EXPONENT));
    assert_eq!(block_exponent(&[]), Ok(NO_EXPONENT));
    assert_eq!(block_exponent(&[1.0]), Ok(0));
    assert_eq!(block_exponent(&[0.75, -1.5]), Ok(0));
    assert_eq!(block_exponent(&[-2.0]), Ok(1));
    assert_eq!(block_exponent(&[f32::MAX]), Ok(MAX_EXPONENT));
    assert_eq!(block_exponent(&[f32::MIN_POSITIVE]), Ok(-126));
    assert_eq!(block_exponent(&[1e-45]), Ok(MIN_EXPONENT));
    assert_eq!(block_exponent(&[1.0, f32::NAN]), Err(NonFinite));
    assert_eq!(block_exponent(&[f32::NEG_INFINITY]), Err(NonFinite));
    for x in [3.0f32, 1e-30, 7e30, 0.1, 1e-40] {
        let e = i32::from(block_exponent(&[x]).expect("finite"));
        assert!(f64::from(x) < 2f64.powi(e + 1) && f64::from(x) >= 2f64.powi(e.max(-126)) * 0.0);
    }
}

#[test]
fn every_codec_sums_within_its_bound() {
    for codec in ALL {
        for world in [1u16, 2, 3, 4, 8, 64] {
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|r| {
                    (0..100)
                        .map(|i| ((i * 37 + usize::from(r) * 11) % 97) as f32 / 13.0 - 3.5)
                        .collect()
                })
                .collect();
            let out = sum_through(*codec, world, &inputs);
            let e_max = inputs
                .iter()
                .map(|v| block_exponent(v).expect("finite"))
                .max();
            for (i, o) in out.iter().enumerate() {
                let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
                let step = codec
                    .step_error(codec.scale(world, e_max.unwrap_or(NO_EXPONENT)))
                    .unwrap_or(0.0);
                let bound =
                    f64::from(world) * (step + 4.0 * 2f64.powi(-24)) + exact.abs() * 2f64.powi(-23);
                assert!(
                    (f64::from(*o) - exact).abs() <= bound,
                    "{} world {world} element {i}: {o} vs {exact}",
                    codec.name()
                );
            }
        }
    }
}

#[test]
fn fixed_point_never_overflows_at_the_extremes() {
    let codec = lookup(CodecId::I32).expect("i32");
    for world in [1u16, 2, 3, 4, 8, 1024] {
        // The largest magnitude whose sum over 1024 ranks is still a finite f32.
        let top = f32::MAX / 1024.0;
        for big in [top, -top, 1.0, -1.0, 1e-40, f32::MIN_POSITIVE] {
            // Every rank at the top of the range, with values that round up.
            let v = vec![big, big * 0.999_999_9, -big, 0.0];
            let inputs = vec![v; usize::from(world)];
            let out = sum_through(codec, world, &inputs);
            let want = f64::from(big) * f64::from(world);
            let rel = (f64::from(out[0]) - want).abs() / want.abs();
            assert!(
                rel < 1e-3 || want.abs() < 1e-30,
                "world {world} x {big}: {} vs {want}",
                out[0]
            );
            assert_eq!(out[0].signum(), big.signum(), "no wrap-around");
            assert_eq!(out[2], -out[0]);
            assert_eq!(out[3], 0.0);
        }
    }
}

#[test]
fn hostile_payloads_wrap_without_panicking() {
    let codec = lookup(CodecId::I32).expect("i32");
    let mut acc = vec![0u32; 2];
    codec.sum_first(&mut acc, &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0x80]);
    codec.sum_add(&mut acc, &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0x80]);
    let f = lookup(CodecId::F32).expect("f32");
    f.sum_add(&mut acc, &[1, 2, 3]);
}

#[test]
fn f32_is_exact_and_passes_non_finite_values_through() {
    let codec = lookup(CodecId::F32).expect("f32");
    let out = sum_through(codec, 2, &[vec![1.5, f32::INFINITY], vec![2.25, 1.0]]);
    assert_eq!(out, vec![3.75, f32::INFINITY]);
}
