//! ADOPT's per-element maths: `adopt.cuh` beside it, line for line.

use super::Adopt;
use crate::rules::{max_nan, stored, Decay, StepContext, Update};
use crate::Element;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdoptCoefficients {
    gscale: f32,
    decay: Decay,
    lr: f32,
    /// β1 and β2 of this step: 1 and 0 on the first, which only sets `v`.
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    clipping: bool,
    /// c^¼ (c the 0-based count).
    clip: f32,
    nesterov: bool,
}

impl AdoptCoefficients {
    pub(crate) fn new(r: &Adopt, ctx: &StepContext) -> Self {
        let first = ctx.step <= 1;
        let (beta1, beta2) = if first { (1.0, 0.0) } else { (r.beta1, r.beta2) };
        let count = ctx.step.saturating_sub(1) as f64;
        AdoptCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            lr: ctx.lr as f32,
            // Optax's β are f32 arrays here (jnp.where), so 1 − β is taken in f32.
            beta1: beta1 as f32,
            one_minus_beta1: 1.0 - beta1 as f32,
            beta2: beta2 as f32,
            one_minus_beta2: 1.0 - beta2 as f32,
            eps: r.eps as f32,
            clipping: r.clipping,
            clip: count.sqrt().sqrt() as f32,
            nesterov: r.nesterov,
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        let x = g / max_nan(v.sqrt(), self.eps);
        // jnp.clip keeps a NaN.
        let u = if !self.clipping {
            x
        } else if x > self.clip {
            self.clip
        } else if x < -self.clip {
            -self.clip
        } else {
            x
        };
        *v = self.one_minus_beta2 * (g * g) + self.beta2 * *v;
        *m = self.one_minus_beta1 * u + self.beta1 * *m;
        let n = if self.nesterov {
            self.one_minus_beta1 * u + self.beta1 * *m
        } else {
            *m
        };
        *p = p0 - self.lr * n;
    }
}

impl Update for AdoptCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        if let [m, v, ..] = state {
            let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
            for (((p, &g), m), v) in it {
                stored(m, |m| stored(v, |v| self.element(p, g.to_f32(), m, v)));
            }
        }
    }
}
