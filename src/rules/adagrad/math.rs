//! Adagrad's per-element maths: `adagrad.cuh` beside it, line for line.

use super::Adagrad;
use crate::rules::{stored, Decay, EpsPlacement, StepContext, Update};
use crate::Element;

/// Adagrad: `s += g²`; `θ -= clr·g / d` with `d = √s + ε` or `√(s + ε)`; optionally no update where
/// `s` is not positive (Optax).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdagradCoefficients {
    gscale: f32,
    decay: Decay,
    clr: f32,
    eps: f32,
    eps_inside: bool,
    zero_where_empty: bool,
}

impl AdagradCoefficients {
    pub(crate) fn new(r: &Adagrad, ctx: &StepContext) -> Self {
        AdagradCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            clr: (ctx.lr / (1.0 + (ctx.step.saturating_sub(1)) as f64 * r.lr_decay)) as f32,
            eps: r.eps as f32,
            eps_inside: r.eps_placement == EpsPlacement::InsideSqrt,
            zero_where_empty: r.zero_where_empty,
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, s: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *s += g * g;
        let d = if self.eps_inside {
            (*s + self.eps).sqrt()
        } else {
            s.sqrt() + self.eps
        };
        let delta = self.clr * g / d;
        // Optax's `where(s > 0, …, 0)` is false for NaN too.
        let skip = self.zero_where_empty && (s.is_nan() || *s <= 0.0);
        *p = if skip { p0 } else { p0 - delta };
    }
}

impl Update for AdagradCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        if let [s, ..] = state {
            for ((p, &g), s) in p.iter_mut().zip(g).zip(s.iter_mut()) {
                stored(s, |s| self.element(p, g.to_f32(), s));
            }
        }
    }
}
