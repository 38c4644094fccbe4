//! Adadelta's per-element maths: `adadelta.cuh` beside it, line for line.

use super::Adadelta;
use crate::rules::{stored, Decay, StepContext, Update};
use crate::Element;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdadeltaCoefficients {
    gscale: f32,
    decay: Decay,
    lr: f32,
    rho: f32,
    one_minus_rho: f32,
    eps: f32,
}

impl AdadeltaCoefficients {
    pub(crate) fn new(r: &Adadelta, ctx: &StepContext) -> Self {
        AdadeltaCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            lr: ctx.lr as f32,
            rho: r.rho as f32,
            one_minus_rho: (1.0 - r.rho) as f32,
            eps: r.eps as f32,
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, a: &mut f32, b: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *a = self.rho * *a + self.one_minus_rho * (g * g);
        let delta = (*b + self.eps).sqrt() / (*a + self.eps).sqrt() * g;
        *b = self.rho * *b + self.one_minus_rho * (delta * delta);
        *p = p0 - self.lr * delta;
    }
}

impl Update for AdadeltaCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        if let [a, b, ..] = state {
            let it = p.iter_mut().zip(g).zip(a.iter_mut()).zip(b.iter_mut());
            for (((p, &g), a), b) in it {
                stored(a, |a| stored(b, |b| self.element(p, g.to_f32(), a, b)));
            }
        }
    }
}
