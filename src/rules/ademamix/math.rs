//! AdEMAMix's per-element maths: `ademamix.cuh` beside it, line for line.

use super::Ademamix;
use crate::rules::{powu, stored, Decay, StepContext, Update};
use crate::Element;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdemamixCoefficients {
    gscale: f32,
    decay: Decay,
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    beta3: f32,
    one_minus_beta3: f32,
    alpha: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    eps_root: f32,
}

impl AdemamixCoefficients {
    pub(crate) fn new(r: &Ademamix, ctx: &StepContext) -> Self {
        AdemamixCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            lr: ctx.lr as f32,
            beta1: r.beta1 as f32,
            one_minus_beta1: (1.0 - r.beta1) as f32,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            beta3: r.beta3 as f32,
            one_minus_beta3: (1.0 - r.beta3) as f32,
            alpha: r.alpha as f32,
            bc1: (1.0 - powu(r.beta1, ctx.step)) as f32,
            bc2: (1.0 - powu(r.beta2, ctx.step)) as f32,
            eps: r.eps as f32,
            eps_root: r.eps_root as f32,
        }
    }

    /// Optax's order: moments as `(1−β)·g + β·m`, then `(m1/bc1 + α·m2) / (√(v/bc2 + eps_root) + ε)`.
    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, fast: &mut f32, slow: &mut f32, v: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *fast = self.one_minus_beta1 * g + self.beta1 * *fast;
        *slow = self.one_minus_beta3 * g + self.beta3 * *slow;
        *v = self.one_minus_beta2 * (g * g) + self.beta2 * *v;
        let d = (*v / self.bc2 + self.eps_root).sqrt() + self.eps;
        *p = p0 - self.lr * ((*fast / self.bc1 + self.alpha * *slow) / d);
    }
}

impl Update for AdemamixCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        if let [fast, slow, v, ..] = state {
            let it = p.iter_mut().zip(g).zip(fast.iter_mut()).zip(slow.iter_mut());
            for ((((p, &g), fast), slow), v) in it.zip(v.iter_mut()) {
                stored(fast, |fast| {
                    stored(slow, |slow| {
                        stored(v, |v| self.element(p, g.to_f32(), fast, slow, v))
                    })
                });
            }
        }
    }
}
