//! fp32 master weights in 4 bytes: the bf16 weight the model computes with and a 16-bit
//! remainder, which together give back the fp32 master exactly (TransformerEngine's
//! `store_param_remainders`). The remainder is the master's low 16 bits; the weight is its high
//! 16 bits, plus one when the remainder's top bit is set — the master rounded to the nearest bf16,
//! ties away from zero — and joining undoes that carry. Every one of the 2³² bit patterns round
//! trips (tests/lean.rs checks them all). The carry wraps as 16-bit arithmetic does, as in
//! TransformerEngine: a NaN master whose high half is 0x7FFF or 0xFFFF and whose remainder's top
//! bit is set (0x7FFFFFFF, CUDA's canonical NaN, among them) shows a zero weight; joined back, it
//! is the same NaN.

use half::bf16;

/// The master's bf16 weight and remainder.
pub fn split_master(master: f32) -> (bf16, i16) {
    let bits = master.to_bits();
    let remainder = bits as u16 as i16;
    let high = ((bits >> 16) as u16).wrapping_add(u16::from(remainder < 0));
    (bf16::from_bits(high), remainder)
}

/// The fp32 master that [`split_master`] split into `weight` and `remainder`.
pub fn join_master(weight: bf16, remainder: i16) -> f32 {
    let high = weight.to_bits().wrapping_sub(u16::from(remainder < 0));
    f32::from_bits(u32::from(high) << 16 | u32::from(remainder as u16))
}
