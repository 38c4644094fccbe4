//! NAdam's per-element maths: `nadam.cuh` beside it, line for line.

use super::Nadam;
use crate::rules::{powu, stored, Decay, StepContext, Update};
use crate::Element;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct NadamCoefficients {
    gscale: f32,
    decay: Decay,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bc2: f32,
    eps: f32,
    /// lr·(1−μ_t)/(1−Π_t), on g/d.
    grad_size: f32,
    /// lr·μ_{t+1}/(1−Π_t·μ_{t+1}), on m/d.
    momentum_size: f32,
}

impl NadamCoefficients {
    pub(crate) fn new(r: &Nadam, ctx: &StepContext) -> Self {
        let [mu, mu_next, product] = ctx.scalars;
        NadamCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            one_minus_beta1: (1.0 - r.beta1) as f32,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            bc2: (1.0 - powu(r.beta2, ctx.step)) as f32,
            eps: r.eps as f32,
            grad_size: (ctx.lr * (1.0 - mu) / (1.0 - product)) as f32,
            momentum_size: (ctx.lr * mu_next / (1.0 - product * mu_next)) as f32,
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *m += self.one_minus_beta1 * (g - *m);
        *v = self.beta2 * *v + self.one_minus_beta2 * (g * g);
        let d = (*v / self.bc2).sqrt() + self.eps;
        let p1 = p0 - self.grad_size * (g / d);
        *p = p1 - self.momentum_size * (*m / d);
    }
}

impl Update for NadamCoefficients {
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
