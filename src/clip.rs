//! Global-norm gradient clipping, folded into the step: one pass computes the norm, the update
//! multiplies each gradient by the factor on the fly.

use serde::{Deserialize, Serialize};

use crate::optim::Flavor;

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

    /// The factor every gradient is multiplied by, given the pre-clip norm `n`.
    pub fn factor(&self, n: f64) -> f64 {
        let max = self.max_norm;
        match self.formula {
            ClipFormula::PyTorch => {
                let c = max / (n + 1e-6);
                if c.is_nan() {
                    c
                } else {
                    c.min(1.0)
                }
            }
            ClipFormula::Keras => {
                // 1/0 = ∞ gives a factor of 1 at n = 0; TensorFlow adds (n − n), which turns the
                // factor into NaN when n is not finite.
                let nan_unless_finite = if n.is_finite() { 0.0 } else { f64::NAN };
                max * (1.0 / n).min(1.0 / max) + nan_unless_finite
            }
            ClipFormula::Optax => {
                if n < max {
                    1.0
                } else {
                    max / n
                }
            }
        }
    }
}
