//! Adamax's per-element maths: `adamax.cuh` beside it, line for line.

use super::{Adamax, AdamaxEps};
use crate::rules::{max_nan, powu, stored, Decay, StepContext, Update};
use crate::Element;

/// Adamax: `m += (1−β1)(g − m)`; `u = max(β2·u, |g| + ε_max)`; `θ -= step·(m / (u + ε_div))`,
/// with ε in exactly one of the two places (adding 0 is exact).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdamaxCoefficients {
    gscale: f32,
    decay: Decay,
    one_minus_beta1: f32,
    beta2: f32,
    /// lr / (1 − β1^t).
    step_size: f32,
    eps_max: f32,
    eps_div: f32,
}

impl AdamaxCoefficients {
    pub(crate) fn new(r: &Adamax, ctx: &StepContext) -> Self {
        let inside = r.eps_placement == AdamaxEps::InsideMax;
        let beta1 = ctx.momentum.unwrap_or(r.beta1);
        AdamaxCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: r.beta2 as f32,
            step_size: (ctx.lr / (1.0 - powu(beta1, ctx.step))) as f32,
            eps_max: if inside { r.eps as f32 } else { 0.0 },
            eps_div: if inside { 0.0 } else { r.eps as f32 },
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, m: &mut f32, u: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *m += self.one_minus_beta1 * (g - *m);
        *u = max_nan(self.beta2 * *u, g.abs() + self.eps_max);
        *p = p0 - self.step_size * (*m / (*u + self.eps_div));
    }
}

impl Update for AdamaxCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        if let [m, u, ..] = state {
            let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(u.iter_mut());
            for (((p, &g), m), u) in it {
                stored(m, |m| stored(u, |u| self.element(p, g.to_f32(), m, u)));
            }
        }
    }
}
