//! SGD's per-element maths: `sgd.cuh` beside it, line for line.

use super::{MomentumInit, Sgd};
use crate::rules::{stored, Decay, LrPlacement, StepContext, Update};
use crate::Element;

/// SGD: `b = keep·b + gin·g`; `θ -= outer·(nesterov ? ng·g + μ·b : b)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SgdCoefficients {
    gscale: f32,
    decay: Decay,
    lr: f32,
    momentum: f32,
    /// Weight of the old buffer: μ, or 0 on a PyTorch first step (buffer = copy of g).
    keep: f32,
    /// Weight of g entering the buffer: (1 − τ), × lr when lr sits inside.
    gin: f32,
    /// Weight of g in the Nesterov look-ahead: 1, or lr when lr sits inside.
    ng: f32,
    /// Multiplier of the final update: lr, or 1 when lr sits inside.
    outer: f32,
    nesterov: bool,
}

impl SgdCoefficients {
    pub(crate) fn new(r: &Sgd, ctx: &StepContext) -> Self {
        let first_copy = ctx.step == 1 && r.momentum_init == MomentumInit::CopyGrad;
        let momentum = ctx.momentum.unwrap_or(r.momentum);
        let inside = r.lr_placement == LrPlacement::Inside;
        let lr_in = if inside { ctx.lr } else { 1.0 };
        SgdCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            lr: ctx.lr as f32,
            momentum: momentum as f32,
            keep: if first_copy { 0.0 } else { momentum as f32 },
            gin: (if first_copy { 1.0 } else { 1.0 - r.dampening } * lr_in) as f32,
            ng: lr_in as f32,
            outer: if inside { 1.0 } else { ctx.lr as f32 },
            nesterov: r.nesterov,
        }
    }

    #[inline(always)]
    pub(crate) fn element_plain(&self, p: &mut f32, g: f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *p = p0 - self.lr * g;
    }

    #[inline(always)]
    pub(crate) fn element_momentum(&self, p: &mut f32, g: f32, b: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *b = self.keep * *b + self.gin * g;
        let d = if self.nesterov {
            self.ng * g + self.momentum * *b
        } else {
            *b
        };
        *p = p0 - self.outer * d;
    }
}

impl Update for SgdCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        match state {
            [] => {
                for (p, &g) in p.iter_mut().zip(g) {
                    self.element_plain(p, g.to_f32());
                }
            }
            [b, ..] => {
                for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                    stored(b, |b| self.element_momentum(p, g.to_f32(), b));
                }
            }
        }
    }
}
