//! Stochastic rounding of fp32 to bf16 for pure-bf16 training, with a counter-based random
//! stream, so that every element's draw depends only on (seed, step, element): the same bits on
//! the CPU engine and the GPU, on every thread count and run.
//!
//! The rounding is torchao's (`bf16_stochastic_round`): a 16-bit random `r` rounds up in
//! magnitude when `r` is below the value's 16 low bits, so a value rounds up with probability
//! (low bits)/2¹⁶ and the result is unbiased. The stream is Philox4x32-10 (Random123; cuRAND's
//! and JAX's generator): one call gives eight 16-bit draws, for eight consecutive elements.

use half::bf16;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds of `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The 16-bit draw of element `index` at step `step` of the stream `seed`.
pub fn draw(seed: u64, step: u64, index: u64) -> u16 {
    let group = index / 8;
    let out = philox4x32_10(
        [
            group as u32,
            (group >> 32) as u32,
            step as u32,
            (step >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    let lane = (index % 8) as usize;
    (out[lane / 2] >> (16 * (lane % 2))) as u16
}

/// `x` rounded to bf16 by the draw `r`: up in magnitude when `r` is below `x`'s low 16 bits.
/// NaN stays NaN; a finite value may round up to infinity only from the largest bf16's binade.
pub fn round_bf16(x: f32, r: u16) -> bf16 {
    if x.is_nan() {
        return bf16::NAN;
    }
    let bits = x.to_bits();
    let truncated = bits & 0xFFFF_0000;
    let rounded = if u32::from(r) < bits & 0xFFFF {
        truncated + 0x1_0000
    } else {
        truncated
    };
    bf16::from_bits((rounded >> 16) as u16)
}

/// `x` rounded into `out` by the draws of elements `first..` at `step` of stream `seed`: what
/// [`round_bf16`] of [`draw`] gives element by element, with one Philox call per eight elements.
pub fn round_slice_bf16(x: &[f32], out: &mut [bf16], seed: u64, step: u64, first: u64) {
    let key = [seed as u32, (seed >> 32) as u32];
    let (step_lo, step_hi) = (step as u32, (step >> 32) as u32);
    let mut words = [0u32; 4];
    let mut group = u64::MAX;
    for (j, (&v, o)) in x.iter().zip(out.iter_mut()).enumerate() {
        let index = first + j as u64;
        if index / 8 != group {
            group = index / 8;
            words = philox4x32_10([group as u32, (group >> 32) as u32, step_lo, step_hi], key);
        }
        let lane = (index % 8) as usize;
        *o = round_bf16(v, (words[lane / 2] >> (16 * (lane % 2))) as u16);
    }
}
