//! Global-norm gradient clipping, folded into the step: one pass computes the norm, the update
//! multiplies each gradient by the factor on the fly. The formulas are `clip_factor` in
//! `mod.rs` and in `decide.cuh`.

use serde::{Deserialize, Serialize};

use crate::rules::Flavor;

/// Each framework's formula for the clip factor, non-finite norms included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClipFormula {
    /// `clip_grad_norm_`: `min(max / (n + 1e-6), 1)`, always applied. NaN `n` → NaN; ∞ → 0.
    PyTorch,
    /// `clip_by_global_norm` (Keras 3, TF1): `max·min(1/n, 1/max) + (n − n)`; non-finite → NaN.
    Keras,
    /// Optax `clip_by_global_norm`: `n < max ? 1 : max/n`.
    Optax,
}

impl From<Flavor> for ClipFormula {
    fn from(f: Flavor) -> Self {
        match f {
            Flavor::PyTorch => ClipFormula::PyTorch,
            Flavor::Keras | Flavor::Tf1 => ClipFormula::Keras,
            Flavor::Optax => ClipFormula::Optax,
        }
    }
}

/// Clip gradients so their global L2 norm is at most `max_norm`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalNormClip {
    pub max_norm: f64,
    pub formula: ClipFormula,
}

impl GlobalNormClip {
    pub fn new(max_norm: f64, formula: impl Into<ClipFormula>) -> Self {
        GlobalNormClip {
            max_norm,
            formula: formula.into(),
        }
    }

    /// The factor every gradient is multiplied by, given the pre-clip norm `n` (the step's own
    /// formula, `clip_factor` in decide.rs and decide.cuh).
    pub fn factor(&self, n: f64) -> f64 {
        let q = super::StepParams::new(&super::OptimizerOptions {
            clip: Some(*self),
            ..Default::default()
        });
        super::clip_factor(&q, n)
    }
}
