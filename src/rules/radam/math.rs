//! RAdam's per-element maths: `radam.cuh` beside it, line for line.

use super::Radam;
use crate::rules::adam::AdamEps;
use crate::rules::{powu, stored, Decay, MomentForm, StepContext, Update};
use crate::Element;

/// RAdam: `m += (1−β1)(g − m)` (or `β1·m + (1−β1)·g`); `v = β2·v + (1−β2)·g²`; `n = m` (or Nesterov's
/// `nm·m + ng·g`); rectified: `θ -= step·n / (√(v·vscale + eps_root) + ε)`, else `θ -= plain·n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RadamCoefficients {
    gscale: f32,
    decay: Decay,
    average: bool,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    nesterov: bool,
    /// Nesterov: `m̂ = β1·m/bc1(t+1) + (1−β1)·g/bc1(t)` as `nm·m + ng·g`.
    nm: f32,
    ng: f32,
    rectified: bool,
    /// The rectified step: lr·r·√bc2/bc1 (ε raw) or lr·r/bc1 (ε corrected); bc1 left out with
    /// Nesterov, whose `n` is corrected already.
    step_size: f32,
    /// The unrectified step: lr/bc1 (lr with Nesterov).
    plain_size: f32,
    v_scale: f32,
    eps: f32,
    eps_root: f32,
}

/// `ρ_t` and whether step `t` is rectified, with its rectification `r_t` (f64 on both engines).
pub(crate) fn rectification(r: &Radam, t: u64) -> (bool, f64) {
    let rho_inf = 2.0 / (1.0 - r.beta2) - 1.0;
    let b2t = powu(r.beta2, t);
    let rho = rho_inf - 2.0 * t as f64 * b2t / (1.0 - b2t);
    let on = if r.threshold_inclusive {
        rho >= r.threshold
    } else {
        rho > r.threshold
    };
    let rect = ((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho)).sqrt();
    (on, rect)
}

impl RadamCoefficients {
    pub(crate) fn new(r: &Radam, ctx: &StepContext) -> Self {
        let t = ctx.step;
        let beta1 = ctx.momentum.unwrap_or(r.beta1);
        let bc1 = 1.0 - powu(beta1, t);
        let bc2 = 1.0 - powu(r.beta2, t);
        let (rectified, rect) = rectification(r, t);
        let corrected = r.eps_scale == AdamEps::BiasCorrected;
        // Nesterov's m̂ is corrected already: the step leaves bc1 out.
        let bc1_step = if r.nesterov { 1.0 } else { bc1 };
        RadamCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            average: r.moment == MomentForm::Average,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            nesterov: r.nesterov,
            nm: (beta1 / (1.0 - powu(beta1, t.saturating_add(1)))) as f32,
            ng: ((1.0 - beta1) / bc1) as f32,
            rectified,
            step_size: if corrected {
                ctx.lr * rect / bc1_step
            } else {
                ctx.lr * rect * bc2.sqrt() / bc1_step
            } as f32,
            plain_size: (ctx.lr / bc1_step) as f32,
            v_scale: if corrected { 1.0 / bc2 } else { 1.0 } as f32,
            eps: r.eps as f32,
            eps_root: r.eps_root as f32,
        }
    }

    #[inline(always)]
    pub(crate) fn element(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *m = if self.average {
            self.beta1 * *m + self.one_minus_beta1 * g
        } else {
            *m + self.one_minus_beta1 * (g - *m)
        };
        *v = self.beta2 * *v + self.one_minus_beta2 * (g * g);
        let n = if self.nesterov {
            self.nm * *m + self.ng * g
        } else {
            *m
        };
        *p = if self.rectified {
            let denom = (*v * self.v_scale + self.eps_root).sqrt() + self.eps;
            p0 - self.step_size * n / denom
        } else {
            p0 - self.plain_size * n
        };
    }
}

impl Update for RadamCoefficients {
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
