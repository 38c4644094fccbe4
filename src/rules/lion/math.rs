//! Lion's per-element maths: `lion.cuh` beside it, line for line.

use super::{Lion, NanSign};
use crate::rules::{stored, Decay, StepContext, Update};
use crate::Element;

/// Lion: `c = β1·m + (1−β1)·g`; `θ -= lr·sign(c)`; `m = β2·m + (1−β2)·g`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LionCoefficients {
    gscale: f32,
    decay: Decay,
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    nan_sign_zero: bool,
}

impl LionCoefficients {
    pub(crate) fn new(r: &Lion, ctx: &StepContext) -> Self {
        let beta1 = ctx.momentum.unwrap_or(r.beta1);
        LionCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            lr: ctx.lr as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            nan_sign_zero: r.nan_sign == NanSign::Zero,
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, m: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        let c = self.beta1 * *m + self.one_minus_beta1 * g;
        let sign = if c > 0.0 {
            1.0
        } else if c < 0.0 {
            -1.0
        } else if c.is_nan() && !self.nan_sign_zero {
            c
        } else {
            0.0
        };
        *p = p0 - self.lr * sign;
        *m = self.beta2 * *m + self.one_minus_beta2 * g;
    }
}

impl Update for LionCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        if let [m, ..] = state {
            for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                stored(m, |m| self.element(p, g.to_f32(), m));
            }
        }
    }
}
