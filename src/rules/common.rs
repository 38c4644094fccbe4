//! What every rule's CPU half shares (`common.cuh` beside it, for the GPU): weight decay folded
//! into an element, state stored back in its dtype, NaN-propagating max, and the bias-correction
//! power.

use super::WeightDecay;
use crate::Element;

/// Weight decay folded into an element: `g += l2·θ + l1·sign θ`, then `θ *= keep`
/// (`Decay` in common.cuh).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Decay {
    l2: f32,
    l1: f32,
    keep: f32,
}

impl Decay {
    pub(crate) fn new(wd: WeightDecay, lr: f64) -> Self {
        let lambda = wd.coefficient();
        Decay {
            l2: if matches!(wd, WeightDecay::L2(_)) {
                lambda as f32
            } else {
                0.0
            },
            l1: if matches!(wd, WeightDecay::L1(_)) {
                lambda as f32
            } else {
                0.0
            },
            keep: if matches!(wd, WeightDecay::Decoupled(_)) {
                (1.0 - lr * lambda) as f32
            } else {
                1.0
            },
        }
    }

    /// Returns the decayed parameter and the gradient with coupled decay added.
    #[inline(always)]
    pub(crate) fn apply(&self, p: f32, g: f32) -> (f32, f32) {
        let sign = if p > 0.0 {
            1.0
        } else if p < 0.0 {
            -1.0
        } else {
            0.0
        };
        let g = if self.l2 != 0.0 { g + self.l2 * p } else { g };
        let g = if self.l1 != 0.0 {
            g + self.l1 * sign
        } else {
            g
        };
        let p = if self.keep != 1.0 { p * self.keep } else { p };
        (p, g)
    }
}

/// Runs `f` on a state element widened to f32, then stores it back rounded to its dtype (the
/// identity for f32 state, which compiles away).
#[inline(always)]
pub(crate) fn stored<S: Element>(x: &mut S, f: impl FnOnce(&mut f32)) {
    let mut wide = x.to_f32();
    f(&mut wide);
    *x = S::from_f32(wide);
}

/// `max` that propagates NaN from either side, like `torch.maximum` and `jnp.maximum`.
#[inline(always)]
pub(crate) fn max_nan(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// `base^exp` by binary exponentiation: the same multiplications in the same order as `powu` in
/// common.cuh, so bias corrections have the same bits on both engines (`f64::powi` and CUDA's
/// `pow` round differently from each other).
pub(crate) fn powu(base: f64, mut exp: u64) -> f64 {
    let (mut result, mut b) = (1.0, base);
    while exp > 0 {
        if exp & 1 == 1 {
            result *= b;
        }
        b *= b;
        exp >>= 1;
    }
    result
}
