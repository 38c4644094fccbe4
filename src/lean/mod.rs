//! Lean optimizer state, the building blocks: the 8-bit and 4-bit quantization maps and block
//! quantizers of bitsandbytes' and torchao's low-bit optimizers (`qmap.rs`, `quantize.rs`), fp32
//! masters stored in 4 bytes as a bf16 weight and a 16-bit remainder (`remainder.rs`), and
//! stochastic rounding to bf16 over a counter-based random stream (`stochastic.rs`).
//!
//! These are the element and block operations the fused step applies to lean state; they are
//! public so that quantized moments can be read back (dequantized) and so that their tests check
//! them against the reference libraries (`tests/lean.rs`). The CPU engine's step over quantized
//! state (`OptimizerOptions::quantized_state`) is `host/quantized.rs`; the masters and stochastic
//! rounding are not in the step yet.
mod qmap;
pub mod quantize;
pub mod remainder;
pub mod stochastic;

pub use qmap::QuantMap;
