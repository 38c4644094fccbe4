//! RMSProp's per-element maths: `rmsprop.cuh` beside it, line for line.

use super::RmsProp;
use crate::rules::{powu, stored, Decay, EpsPlacement, LrPlacement, StepContext, Update};
use crate::Element;

/// RMSProp: `v = α·v + (1−α)·g²`; centered `ḡ += (1−α)(g − ḡ)`; `d = √(v̂ − ḡ̂²) + ε` or
/// `√(v̂ − ḡ̂² + ε)`; with momentum `b = μ·b + gin·g/d`, `θ -= outer·(nesterov ? gin·g/d + μ·b : b)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RmsPropCoefficients {
    gscale: f32,
    decay: Decay,
    alpha: f32,
    one_minus_alpha: f32,
    /// 1/(1 − αᵗ) with Optax's bias correction, else 1.
    avg_scale: f32,
    eps: f32,
    eps_inside: bool,
    centered: bool,
    momentum: f32,
    nesterov: bool,
    /// lr when it sits inside the momentum buffer (or there is none), else 1.
    gin: f32,
    /// lr when it sits outside the momentum buffer, else 1.
    outer: f32,
}

impl RmsPropCoefficients {
    pub(crate) fn new(r: &RmsProp, ctx: &StepContext) -> Self {
        let inside = r.lr_placement == LrPlacement::Inside || r.momentum == 0.0;
        RmsPropCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            alpha: r.alpha as f32,
            one_minus_alpha: (1.0 - r.alpha) as f32,
            avg_scale: if r.bias_correction {
                1.0 / (1.0 - powu(r.alpha, ctx.step))
            } else {
                1.0
            } as f32,
            eps: r.eps as f32,
            eps_inside: r.eps_placement == EpsPlacement::InsideSqrt,
            centered: r.centered,
            momentum: ctx.momentum.unwrap_or(r.momentum) as f32,
            nesterov: r.nesterov,
            gin: if inside { ctx.lr } else { 1.0 } as f32,
            outer: if inside { 1.0 } else { ctx.lr } as f32,
        }
    }

    /// The normalised gradient `g/d`, after updating the averages.
    #[inline(always)]
    fn normalised<const CENTERED: bool>(&self, g: f32, v: &mut f32, gavg: &mut f32) -> f32 {
        *v = self.alpha * *v + self.one_minus_alpha * g * g;
        let mut var = *v * self.avg_scale;
        if CENTERED {
            *gavg += self.one_minus_alpha * (g - *gavg);
            let mean = *gavg * self.avg_scale;
            var -= mean * mean;
        }
        let d = if self.eps_inside {
            (var + self.eps).sqrt()
        } else {
            var.sqrt() + self.eps
        };
        g / d
    }

    #[inline(always)]
    pub(crate) fn element<const CENTERED: bool>(
        &self,
        p: &mut f32,
        g: f32,
        v: &mut f32,
        gavg: &mut f32,
    ) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *p = p0 - self.gin * self.normalised::<CENTERED>(g, v, gavg);
    }

    #[inline(always)]
    pub(crate) fn element_momentum<const CENTERED: bool>(
        &self,
        p: &mut f32,
        g: f32,
        v: &mut f32,
        gavg: &mut f32,
        b: &mut f32,
    ) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        let step = self.gin * self.normalised::<CENTERED>(g, v, gavg);
        *b = self.momentum * *b + step;
        let d = if self.nesterov {
            step + self.momentum * *b
        } else {
            *b
        };
        *p = p0 - self.outer * d;
    }
}

impl Update for RmsPropCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        let [v, rest @ ..] = state else {
            return; // RMSProp keeps at least its square average (`state_names`).
        };
        let pgv = p.iter_mut().zip(g).zip(v.iter_mut());
        // `centered` picks the loop at compile time: a scratch average written every iteration
        // would keep the plain loop from vectorising.
        let mut unused = 0.0;
        match (self.centered, rest) {
            (false, []) => pgv.for_each(|((p, &g), v)| {
                stored(v, |v| self.element::<false>(p, g.to_f32(), v, &mut unused))
            }),
            (true, [a]) => pgv.zip(a.iter_mut()).for_each(|(((p, &g), v), a)| {
                stored(v, |v| {
                    stored(a, |a| self.element::<true>(p, g.to_f32(), v, a))
                })
            }),
            (false, [b]) => pgv.zip(b.iter_mut()).for_each(|(((p, &g), v), b)| {
                stored(v, |v| {
                    stored(b, |b| {
                        self.element_momentum::<false>(p, g.to_f32(), v, &mut unused, b)
                    })
                })
            }),
            (true, [a, b]) => {
                pgv.zip(a.iter_mut())
                    .zip(b.iter_mut())
                    .for_each(|((((p, &g), v), a), b)| {
                        stored(v, |v| {
                            stored(a, |a| {
                                stored(b, |b| self.element_momentum::<true>(p, g.to_f32(), v, a, b))
                            })
                        })
                    })
            }
            // Buffers follow `state_names`: no other shape is allocated.
            _ => debug_assert!(false, "state buffers do not follow state_names"),
        }
    }
}
