//! Adam's per-element maths: `adam.cuh` beside it, line for line.

use super::{Adam, AdamEps, AmsGrad};
use crate::rules::{max_nan, powu, stored, Decay, StepContext, Update};
use crate::Element;

/// Adam: `m += (1−β1)(g − m)`; `v = β2·v + (1−β2)·g²`; `θ -= step·m / (√(u·vscale + eps_root) + ε)`
/// where `u` is `v`, or the running max for AMSGrad.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdamCoefficients {
    gscale: f32,
    decay: Decay,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// lr/bc1 (ε on the corrected scale) or lr·√bc2/bc1 (ε on the raw scale).
    step_size: f32,
    /// 1/bc2 when ε sits on the corrected scale, else 1.
    v_scale: f32,
    eps: f32,
    eps_root: f32,
    /// What `v` is multiplied by before the AMSGrad max: 1/bc2 for Optax's max over `v̂`, else 1.
    max_scale: f32,
    /// Nesterov: the step is `lr·(nm·m + ng·g)/denom`, with `nm = β1/bc1(t+1)`,
    /// `ng = (1−β1)/bc1(t)` (and `step_size` = lr).
    nesterov: bool,
    nm: f32,
    ng: f32,
}

impl AdamCoefficients {
    pub(crate) fn new(r: &Adam, ctx: &StepContext) -> Self {
        let beta1 = ctx.momentum.unwrap_or(r.beta1);
        let bc1 = 1.0 - powu(beta1, ctx.step);
        let bc2 = 1.0 - powu(r.beta2, ctx.step);
        let corrected = r.eps_scale == AdamEps::BiasCorrected;
        let max_corrected = r.amsgrad == AmsGrad::MaxCorrected;
        // Nesterov's m̂ is corrected already: the step leaves bc1 out.
        let bc1_step = if r.nesterov { 1.0 } else { bc1 };
        AdamCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            step_size: if corrected {
                ctx.lr / bc1_step
            } else {
                ctx.lr * bc2.sqrt() / bc1_step
            } as f32,
            // The running max of Optax's AMSGrad is on the corrected scale (it maxes v̂), so it is
            // taken back to raw scale when ε sits there.
            v_scale: match (corrected, max_corrected) {
                (true, false) => 1.0 / bc2,
                (false, true) => bc2,
                _ => 1.0,
            } as f32,
            eps: r.eps as f32,
            eps_root: r.eps_root as f32,
            max_scale: if max_corrected { 1.0 / bc2 } else { 1.0 } as f32,
            nesterov: r.nesterov,
            nm: (beta1 / (1.0 - powu(beta1, ctx.step.saturating_add(1)))) as f32,
            ng: ((1.0 - beta1) / bc1) as f32,
        }
    }

    #[inline(always)]
    pub(crate) fn element<const AMSGRAD: bool, const NESTEROV: bool>(
        &self,
        p: &mut f32,
        g: f32,
        m: &mut f32,
        v: &mut f32,
        vmax: &mut f32,
    ) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *m += self.one_minus_beta1 * (g - *m);
        *v = self.beta2 * *v + self.one_minus_beta2 * g * g;
        let u = if AMSGRAD {
            *vmax = max_nan(*vmax, *v * self.max_scale);
            *vmax
        } else {
            *v
        };
        let denom = (u * self.v_scale + self.eps_root).sqrt() + self.eps;
        let n = if NESTEROV {
            self.nm * *m + self.ng * g
        } else {
            *m
        };
        *p = p0 - self.step_size * n / denom;
    }
}

impl AdamCoefficients {
    #[inline(always)]
    fn two_slots<const NESTEROV: bool, G: Element, S: Element>(
        &self,
        p: &mut [f32],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
    ) {
        let mut unused = 0.0;
        let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
        for (((p, &g), m), v) in it {
            stored(m, |m| {
                stored(v, |v| {
                    self.element::<false, NESTEROV>(p, g.to_f32(), m, v, &mut unused)
                })
            });
        }
    }
}

impl Update for AdamCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        match state {
            [m, v, vmax, ..] => {
                let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
                for ((((p, &g), m), v), vmax) in it.zip(vmax.iter_mut()) {
                    stored(m, |m| {
                        stored(v, |v| {
                            stored(vmax, |x| {
                                self.element::<true, false>(p, g.to_f32(), m, v, x)
                            })
                        })
                    });
                }
            }
            [m, v] if self.nesterov => self.two_slots::<true, G, S>(p, g, m, v),
            [m, v] => self.two_slots::<false, G, S>(p, g, m, v),
            // The optimizer allocates exactly `state_names().len()` buffers for its rule.
            _ => debug_assert!(false, "state buffers do not follow state_names"),
        }
    }
}
