//! Lean state's building blocks against independent oracles: the quantization maps and block
//! codes against torchao's own (recorded by scripts/record-lean.sh) and against the published
//! construction in f64; round-trip error bounds per block; the bf16 + remainder masters over every
//! one of the 2³² bit patterns; Philox against Random123's known answers; stochastic rounding
//! unbiased over many draws.

mod common;

use common::repo_root;
use fusedopt::lean::quantize::{
    block_scale, code_in, code_of, dequantize_block, pack_nibbles, quantize_block, unpack_nibbles,
    BLOCK_4BIT, BLOCK_8BIT,
};
use fusedopt::lean::remainder::{join_master, split_master};
use fusedopt::lean::stochastic::{draw, philox4x32_10, round_bf16};
use fusedopt::lean::QuantMap;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::Value;

const MAPS: [QuantMap; 4] = [
    QuantMap::DynamicSigned8,
    QuantMap::DynamicUnsigned8,
    QuantMap::DynamicSigned4,
    QuantMap::LinearUnsigned4,
];

fn recorded() -> Value {
    let path = repo_root().join("tests/data/lean/torchao.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn map_named(name: &str) -> QuantMap {
    *MAPS.iter().find(|m| format!("{m:?}") == name).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    let bits = v.as_array().unwrap();
    bits.iter()
        .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
        .collect()
}

/// The codes torchao gave a recorded block.
fn recorded_codes(case: &Value) -> Vec<u8> {
    let codes = case["codes"].as_array().unwrap();
    codes.iter().map(|c| c.as_u64().unwrap() as u8).collect()
}

/// torchao's block size for `map`.
fn block_of(map: QuantMap) -> usize {
    if map.bits() == 8 {
        BLOCK_8BIT
    } else {
        BLOCK_4BIT
    }
}

/// The tables are torchao's, bit for bit.
#[test]
fn maps_are_torchaos() {
    let r = recorded();
    for map in MAPS {
        let want = f32s(&r["maps"][format!("{map:?}")]);
        let got = map.values();
        assert_eq!(got.len(), 1 << map.bits(), "{map:?}");
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{map:?} differs from torchao's");
    }
}

/// bitsandbytes' `create_dynamic_map` in f64 (the published construction): for each exponent
/// level i, the midpoints of linspace(0.1, 1, k + 1) times 10^(i − (levels − 1)), k = 2^i signed
/// (both signs) or 2^(i+1) unsigned, then 0 and 1. The tables agree within f32 rounding.
#[test]
fn maps_follow_the_published_construction() {
    let dynamic = |signed: bool, exponent_bits: u32| -> Vec<f64> {
        let mut v = Vec::new();
        for i in 0..exponent_bits {
            let k = if signed { 1u32 << i } else { 1u32 << (i + 1) };
            let step = 0.9 / k as f64;
            for j in 0..k {
                let mid = 0.1 + step * (j as f64 + 0.5);
                let x = mid * 10f64.powi(i as i32 - (exponent_bits as i32 - 1));
                v.push(x);
                if signed {
                    v.push(-x);
                }
            }
        }
        v.push(0.0);
        v.push(1.0);
        v.sort_by(f64::total_cmp);
        v
    };
    for (map, want) in [
        (QuantMap::DynamicSigned8, dynamic(true, 7)),
        (QuantMap::DynamicUnsigned8, dynamic(false, 7)),
        (QuantMap::DynamicSigned4, dynamic(true, 3)),
        (
            QuantMap::LinearUnsigned4,
            (1..=16).map(|k| k as f64 / 16.0).collect(),
        ),
    ] {
        let got = map.values();
        assert_eq!(got.len(), want.len(), "{map:?}");
        for (c, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let tolerance = 4.0 * f32::EPSILON as f64 * w.abs().max(1e-30);
            assert!(
                (g as f64 - w).abs() <= tolerance,
                "{map:?}[{c}]: {g} against {w}"
            );
        }
    }
}

/// Every recorded block codes to torchao's codes and scale, bit for bit.
#[test]
fn blocks_code_as_torchao_codes_them() {
    let r = recorded();
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for (i, case) in cases.iter().enumerate() {
        let map = map_named(case["map"].as_str().unwrap());
        let values = f32s(&case["values"]);
        let want = recorded_codes(case);
        let mut codes = vec![0u8; values.len()];
        let scale = quantize_block(map, &values, &mut codes);
        assert_eq!(
            scale.to_bits(),
            case["scale"].as_u64().unwrap() as u32,
            "case {i} ({map:?}): scale"
        );
        if let Some(j) = (0..codes.len()).find(|&j| codes[j] != want[j]) {
            panic!(
                "case {i} ({map:?}) element {j}: {} / {scale} coded {} where torchao gives {}",
                values[j], codes[j], want[j]
            );
        }
    }
}

/// Random blocks of awkward sizes: each code is the nearest table entry to value / scale (an f64
/// search over the whole table), so the round-trip error is at most half the gap there, plus
/// f32 rounding; the scale is the block's largest magnitude.
#[test]
fn round_trip_error_is_bounded_by_half_a_gap() {
    let mut rng = StdRng::seed_from_u64(31);
    for map in MAPS {
        let table = map.values();
        let signed = table[0] < 0.0;
        for (len, magnitude) in [
            (1, 1.0f32),
            (7, 1e-20),
            (BLOCK_4BIT, 3.0),
            (BLOCK_8BIT, 1e12),
        ] {
            let values: Vec<f32> = (0..len)
                .map(|_| {
                    let x = rng.gen_range(-1.0f32..1.0) * magnitude;
                    if signed {
                        x
                    } else {
                        x.abs()
                    }
                })
                .collect();
            let mut codes = vec![0u8; len];
            let scale = quantize_block(map, &values, &mut codes);
            let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(scale, absmax.max(1e-12));
            let mut back = vec![0.0f32; len];
            dequantize_block(map, &codes, scale, &mut back);
            for ((&x, &c), &y) in values.iter().zip(&codes).zip(&back) {
                let u = (x / scale) as f64;
                let nearest = table
                    .iter()
                    .map(|&q| (q as f64 - u).abs())
                    .fold(f64::INFINITY, f64::min);
                let chosen = (table[c as usize] as f64 - u).abs();
                // Chosen by f32 comparisons: as near as the nearest, but for f32 rounding.
                assert!(chosen <= nearest + 1e-6, "{map:?}: {x} coded {c}");
                assert!(((y - x) as f64).abs() <= (nearest + 1e-6) * scale as f64);
                // Inside the table, the nearest entry is at most half a gap away.
                if u >= table[0] as f64 && u <= *table.last().unwrap() as f64 {
                    let gap = table
                        .windows(2)
                        .map(|w| (w[1] - w[0]) as f64)
                        .fold(0.0, f64::max);
                    assert!(nearest <= gap / 2.0 + 1e-7, "{map:?}: {u}");
                }
            }
        }
    }
}

/// Exactly halfway between two entries the upper code is taken; below the table the first,
/// above it the last.
/// The indexed lookup the step uses gives the binary search's code for every value tried: one
/// bit pattern in 251 over all 2³² (every sign, exponent, NaN and ∞), the ends of every index
/// range, and every pattern within 64 ulps of each table entry and each midpoint.
#[test]
fn the_indexed_lookup_gives_the_searchs_code() {
    for map in MAPS {
        let t = map.values();
        let check = |bits: u32| {
            let x = f32::from_bits(bits);
            (code_in(map, x) != code_of(t, x)).then_some(bits)
        };
        let strided = (0..u32::MAX / 251)
            .into_par_iter()
            .find_map_any(|i| check(i * 251));
        assert_eq!(
            strided, None,
            "{map:?}: a strided pattern codes differently"
        );
        // The first and last patterns of every index range (sign, exponent, 4 mantissa bits).
        for key in 0u32..1 << 13 {
            for bits in [
                key << 19,
                key << 19 | 1,
                (key << 19) | 0x7FFFF,
                (key << 19) | 0x7FFFE,
            ] {
                assert_eq!(check(bits), None, "{map:?}: {:e}", f32::from_bits(bits));
            }
        }
        let near = |x: f32| (-64i64..=64).map(move |d| (x.to_bits() as i64 + d) as u32);
        for k in 0..t.len() {
            let mid = t[k] + (t[(k + 1).min(t.len() - 1)] - t[k]) * 0.5;
            for bits in near(t[k]).chain(near(mid)).chain(near(-t[k])) {
                assert_eq!(check(bits), None, "{map:?}: {:e}", f32::from_bits(bits));
            }
        }
    }
}

#[test]
fn ties_go_up_and_the_ends_clamp() {
    for map in MAPS {
        let t = map.values();
        for k in 0..t.len() - 1 {
            let mid = t[k] + (t[k + 1] - t[k]) * 0.5;
            if mid - t[k] == (t[k + 1] - t[k]) * 0.5 {
                assert_eq!(
                    code_of(t, mid) as usize,
                    k + 1,
                    "{map:?} between {k} and {}",
                    k + 1
                );
            }
            assert_eq!(code_of(t, t[k]) as usize, k, "{map:?}: entry {k}");
        }
        assert_eq!(code_of(t, -2.0), 0);
        assert_eq!(code_of(t, 2.0) as usize, t.len() - 1);
    }
    assert_eq!(block_scale(&[0.0; 4]), 1e-12);
    assert!(block_scale(&[1.0, f32::NAN]).is_nan());
}

#[test]
fn nibbles_pack_high_first_and_unpack() {
    let codes: Vec<u8> = (0..13).map(|i| (i * 7 % 16) as u8).collect();
    let mut packed = vec![0u8; 7];
    pack_nibbles(&codes, &mut packed);
    assert_eq!(packed[0], codes[0] << 4 | codes[1]);
    assert_eq!(packed[6], codes[12] << 4);
    let mut back = vec![0u8; 13];
    unpack_nibbles(&packed, &mut back);
    assert_eq!(back, codes);
}

/// Every fp32 bit pattern splits into a bf16 weight and a remainder that join back to it
/// exactly; for finite masters the weight is the nearest bf16 (ties away from zero) or, where
/// that overflows, the infinity the carry reaches.
#[test]
fn every_fp32_master_round_trips_through_bf16_and_remainder() {
    let failures: u64 = (0u32..=u16::MAX as u32)
        .into_par_iter()
        .map(|high| {
            let mut bad = 0u64;
            for low in 0u32..=u16::MAX as u32 {
                let master = f32::from_bits(high << 16 | low);
                let (weight, remainder) = split_master(master);
                if join_master(weight, remainder).to_bits() != master.to_bits() {
                    bad += 1;
                }
            }
            bad
        })
        .sum();
    assert_eq!(failures, 0, "fp32 patterns that do not round trip");
    // The weight against an f64 oracle: nearest bf16, ties away from zero.
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..200_000 {
        let master = f32::from_bits(rng.gen::<u32>());
        if !master.is_finite() {
            continue;
        }
        let (weight, _) = split_master(master);
        let truncated = master.to_bits() & 0xFFFF_0000;
        let down = f32::from_bits(truncated) as f64;
        let up = f32::from_bits(truncated + 0x1_0000) as f64; // infinity past the largest bf16
                                                              // The bf16 spacing where the master is: 2^(e − 7), e its exponent (subnormals: −126).
        let exponent = ((truncated >> 23) & 0xFF) as i32;
        let spacing = 2f64.powi(exponent.max(1) - 127 - 7);
        let m = master as f64;
        let want = if (m - down).abs() >= spacing / 2.0 {
            up
        } else {
            down
        };
        assert_eq!(weight.to_f64(), want, "{master:e}");
    }
}

/// Random123's known answers for Philox4x32-10 (tests/kat_vectors).
#[test]
fn philox_gives_random123s_known_answers() {
    let cases = [
        (
            [0u32; 4],
            [0u32; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (counter, key, want) in cases {
        assert_eq!(philox4x32_10(counter, key), want);
    }
}

/// Over many draws a value's stochastic rounding averages to the value itself (within 5 standard
/// errors), it only ever gives one of the two bf16 neighbours, and a draw is a function of
/// (seed, step, element) alone.
#[test]
fn stochastic_rounding_is_unbiased_and_reproducible() {
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..40 {
        let x: f32 = rng.gen_range(-1e3f32..1e3);
        let down = f32::from_bits(x.to_bits() & 0xFFFF_0000) as f64;
        let up = f32::from_bits((x.to_bits() & 0xFFFF_0000) + 0x1_0000) as f64;
        let n = 1u64 << 16;
        let mut sum = 0.0f64;
        for i in 0..n {
            let y = round_bf16(x, draw(77, 3, i)).to_f64();
            assert!(y == down || y == up, "{x}: {y}");
            sum += y;
        }
        let p = (x as f64 - down) / (up - down);
        let sd = (up - down).abs() * (p * (1.0 - p) / n as f64).sqrt();
        let mean = sum / n as f64;
        assert!(
            (mean - x as f64).abs() <= 5.0 * sd + 1e-12 * x.abs() as f64,
            "{x}: mean {mean}"
        );
    }
    assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
    assert_ne!(draw(1, 2, 3), draw(1, 3, 3));
    assert_ne!(draw(1, 2, 3), draw(2, 2, 3));
    let lanes: Vec<u16> = (0..8).map(|i| draw(9, 1, i)).collect();
    assert!(lanes.windows(2).any(|w| w[0] != w[1]));
    assert!(round_bf16(f32::NAN, 0).is_nan());
    assert_eq!(round_bf16(1.0, 0), bf16::ONE);
    assert_eq!(round_bf16(f32::INFINITY, 0), bf16::INFINITY);
}

/// The device twins (src/lean/lean.cuh, kernels/lean.cu) give the CPU's bits: codes and scales of
/// awkward lengths in every map (torchao's recorded blocks among them), their decoding, masters
/// split and joined, stochastic rounding.
#[test]
fn the_device_gives_the_cpus_bits() {
    if !common::gpu_or_skip("the_device_gives_the_cpus_bits") {
        return;
    }
    use fusedopt::cuda::lean as device;
    let mut rng = StdRng::seed_from_u64(13);
    for map in MAPS {
        let block = block_of(map);
        let signed = map.values()[0] < 0.0;
        for len in [1, 31, block - 1, block, block + 1, 3 * block + 17] {
            let values: Vec<f32> = (0..len)
                .map(|_| {
                    let x = rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-6..6));
                    if signed {
                        x
                    } else {
                        x.abs()
                    }
                })
                .collect();
            let (codes, scales) = device::quantize_blocks(0, map, block, &values).unwrap();
            let mut want_codes = vec![0u8; len];
            let want_scales: Vec<f32> = values
                .chunks(block)
                .zip(want_codes.chunks_mut(block))
                .map(|(v, c)| quantize_block(map, v, c))
                .collect();
            assert_eq!(codes, want_codes, "{map:?} {len}: codes");
            let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&scales), bits(&want_scales), "{map:?} {len}: scales");
            let back = device::dequantize_blocks(0, map, block, &codes, &scales).unwrap();
            let mut want_back = vec![0.0f32; len];
            for ((c, o), s) in codes
                .chunks(block)
                .zip(want_back.chunks_mut(block))
                .zip(&scales)
            {
                dequantize_block(map, c, *s, o);
            }
            assert_eq!(bits(&back), bits(&want_back), "{map:?} {len}: decoded");
        }
    }
    for case in recorded()["cases"].as_array().unwrap() {
        let map = map_named(case["map"].as_str().unwrap());
        let block = block_of(map);
        let values = f32s(&case["values"]);
        let (codes, scales) = device::quantize_blocks(0, map, block, &values).unwrap();
        let want = recorded_codes(case);
        assert_eq!(codes, want, "{map:?}: a recorded block");
        assert_eq!(scales[0].to_bits(), case["scale"].as_u64().unwrap() as u32);
    }
    // Masters: random patterns and the edges (signs, ties, carries into the exponent, NaN, inf).
    let mut masters: Vec<f32> = (0..100_000).map(|_| f32::from_bits(rng.gen())).collect();
    masters.extend(
        [
            0x0000_8000u32,
            0x3F80_8000,
            0x7F7F_8000,
            0xFF7F_FFFF,
            0x7F80_0000,
            0x7FC0_0001,
            0x8000_0000,
        ]
        .map(f32::from_bits),
    );
    let (weights, remainders) = device::split_masters(0, &masters).unwrap();
    for (i, &m) in masters.iter().enumerate() {
        let (w, r) = split_master(m);
        assert_eq!((weights[i], remainders[i]), (w.to_bits(), r), "{m:e}");
    }
    let joined = device::join_masters(0, &weights, &remainders).unwrap();
    assert!(joined
        .iter()
        .zip(&masters)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // Stochastic rounding: the same draws and the same roundings.
    let values: Vec<f32> = (0..10_007).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    let rounded = device::stochastic_round(0, &values, 1234, 56).unwrap();
    for (i, (&x, &r)) in values.iter().zip(&rounded).enumerate() {
        assert_eq!(
            r,
            round_bf16(x, draw(1234, 56, i as u64)).to_bits(),
            "{x} at {i}"
        );
    }
}
