//! The per-element maths of every rule, and the per-step coefficients it reads.
//!
//! `kernels/rules.cuh` holds the same functions for the GPU, line for line. Coefficients that depend
//! only on the step (bias corrections, the learning rate, the clip factor) are computed once per
//! step and group in f64 and rounded to f32; the per-element arithmetic is f32, as in the frameworks.
//! Loops are plain zipped slices so the compiler vectorises them; mode checks are on loop-invariant
//! values and compile to selects.

use crate::Element;

use super::config::{
    Adagrad, Adam, AdamEps, AmsGrad, EpsPlacement, LrPlacement, MomentumInit, RmsProp, Rule, Sgd,
    WeightDecay,
};

/// What a step needs to know beyond the rule: the group's lr and decay, the 1-based step number, and
/// the factor every gradient is multiplied by first (clip factor × loss-scale inverse × ±1 for
/// `maximize`).
#[derive(Clone, Copy, Debug)]
pub struct StepContext {
    pub lr: f64,
    pub weight_decay: WeightDecay,
    pub step: u64,
    pub grad_scale: f64,
}

/// Weight decay folded into an element: `g += l2·θ + l1·sign θ`, then `θ *= keep`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Decay {
    l2: f32,
    l1: f32,
    keep: f32,
}

impl Decay {
    fn new(wd: WeightDecay, lr: f64) -> Self {
        let lambda = wd.coefficient();
        Decay {
            l2: if matches!(wd, WeightDecay::L2(_)) {
                lambda as f32
            } else {
                0.0
            },
            l1: if matches!(wd, WeightDecay::L1(_)) {
                lambda as f32
            } else {
                0.0
            },
            keep: if matches!(wd, WeightDecay::Decoupled(_)) {
                (1.0 - lr * lambda) as f32
            } else {
                1.0
            },
        }
    }

    /// Returns the decayed parameter and the gradient with coupled decay added.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32) -> (f32, f32) {
        let sign = if p > 0.0 {
            1.0
        } else if p < 0.0 {
            -1.0
        } else {
            0.0
        };
        let g = if self.l2 != 0.0 { g + self.l2 * p } else { g };
        let g = if self.l1 != 0.0 {
            g + self.l1 * sign
        } else {
            g
        };
        let p = if self.keep != 1.0 { p * self.keep } else { p };
        (p, g)
    }
}

/// Runs `f` on a state element widened to f32, then stores it back rounded to its dtype (the
/// identity for f32 state, which compiles away).
#[inline(always)]
fn stored<S: Element>(x: &mut S, f: impl FnOnce(&mut f32)) {
    let mut wide = x.to_f32();
    f(&mut wide);
    *x = S::from_f32(wide);
}

/// `max` that propagates NaN from either side, like `torch.maximum` and `jnp.maximum`.
#[inline(always)]
fn max_nan(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// Per-step coefficients of one rule for one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepCoefficients {
    Sgd(SgdStep),
    Adam(AdamStep),
    RmsProp(RmsPropStep),
    Adagrad(AdagradStep),
}

impl StepCoefficients {
    pub fn new(rule: &Rule, ctx: &StepContext) -> Self {
        match rule {
            Rule::Sgd(r) => StepCoefficients::Sgd(SgdStep::new(r, ctx)),
            Rule::Adam(r) => StepCoefficients::Adam(AdamStep::new(r, ctx)),
            Rule::RmsProp(r) => StepCoefficients::RmsProp(RmsPropStep::new(r, ctx)),
            Rule::Adagrad(r) => StepCoefficients::Adagrad(AdagradStep::new(r, ctx)),
        }
    }

    /// Updates one contiguous run of elements. `state` holds the rule's buffers in slot order
    /// ([`Rule::state_names`]), each the same length as `p`.
    #[inline(always)]
    pub fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        match (self, state) {
            (StepCoefficients::Sgd(c), []) => c.update_plain(p, g),
            (StepCoefficients::Sgd(c), [b]) => c.update_momentum(p, g, b),
            (StepCoefficients::Adam(c), [m, v]) => c.update::<false, G, S>(p, g, m, v, &mut []),
            (StepCoefficients::Adam(c), [m, v, vmax]) => c.update::<true, G, S>(p, g, m, v, vmax),
            (StepCoefficients::RmsProp(c), [v, rest @ ..]) => c.update(p, g, v, rest),
            (StepCoefficients::Adagrad(c), [s]) => c.update(p, g, s),
            // The optimizer allocates exactly `state_names().len()` buffers for its rule.
            _ => unreachable!("state buffers do not match the rule"),
        }
    }
}

// ---------------------------------------------------------------- SGD

/// SGD: `b = keep·b + gin·g`; `θ -= outer·(nesterov ? ng·g + μ·b : b)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
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

impl SgdStep {
    fn new(r: &Sgd, ctx: &StepContext) -> Self {
        let first_copy = ctx.step == 1 && r.momentum_init == MomentumInit::CopyGrad;
        let inside = r.lr_placement == LrPlacement::Inside;
        let lr_in = if inside { ctx.lr } else { 1.0 };
        SgdStep {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            lr: ctx.lr as f32,
            momentum: r.momentum as f32,
            keep: if first_copy { 0.0 } else { r.momentum as f32 },
            gin: (if first_copy { 1.0 } else { 1.0 - r.dampening } * lr_in) as f32,
            ng: lr_in as f32,
            outer: if inside { 1.0 } else { ctx.lr as f32 },
            nesterov: r.nesterov,
        }
    }

    #[inline(always)]
    pub fn element_plain(&self, p: &mut f32, g: f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *p = p0 - self.lr * g;
    }

    #[inline(always)]
    pub fn element_momentum(&self, p: &mut f32, g: f32, b: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *b = self.keep * *b + self.gin * g;
        let d = if self.nesterov {
            self.ng * g + self.momentum * *b
        } else {
            *b
        };
        *p = p0 - self.outer * d;
    }

    #[inline(always)]
    fn update_plain<G: Element>(&self, p: &mut [f32], g: &[G]) {
        for (p, &g) in p.iter_mut().zip(g) {
            self.element_plain(p, g.to_f32());
        }
    }

    #[inline(always)]
    fn update_momentum<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], b: &mut [S]) {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
            stored(b, |b| self.element_momentum(p, g.to_f32(), b));
        }
    }
}

/// `base^exp` by binary exponentiation: the same multiplications in the same order as `powu` in
/// kernels/rules.cuh, so bias corrections have the same bits on both engines (`f64::powi` and
/// CUDA's `pow` round differently from each other).
pub fn powu(base: f64, mut exp: u64) -> f64 {
    let (mut result, mut b) = (1.0, base);
    while exp > 0 {
        if exp & 1 == 1 {
            result *= b;
        }
        b *= b;
        exp >>= 1;
    }
    result
}

// ---------------------------------------------------------------- Adam

/// Adam: `m += (1−β1)(g − m)`; `v = β2·v + (1−β2)·g²`; `θ -= step·m / (√(u·vscale + eps_root) + ε)`
/// where `u` is `v`, or the running max for AMSGrad.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
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
}

impl AdamStep {
    fn new(r: &Adam, ctx: &StepContext) -> Self {
        let bc1 = 1.0 - powu(r.beta1, ctx.step);
        let bc2 = 1.0 - powu(r.beta2, ctx.step);
        let corrected = r.eps_scale == AdamEps::BiasCorrected;
        let max_corrected = r.amsgrad == AmsGrad::MaxCorrected;
        AdamStep {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            one_minus_beta1: (1.0 - r.beta1) as f32,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            step_size: if corrected {
                ctx.lr / bc1
            } else {
                ctx.lr * bc2.sqrt() / bc1
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
        }
    }

    #[inline(always)]
    pub fn element<const AMSGRAD: bool>(
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
        *p = p0 - self.step_size * *m / denom;
    }

    #[inline(always)]
    fn update<const AMSGRAD: bool, G: Element, S: Element>(
        &self,
        p: &mut [f32],
        g: &[G],
        m: &mut [S],
        v: &mut [S],
        vmax: &mut [S],
    ) {
        let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
        if AMSGRAD {
            for ((((p, &g), m), v), vmax) in it.zip(vmax.iter_mut()) {
                stored(m, |m| {
                    stored(v, |v| {
                        stored(vmax, |x| self.element::<true>(p, g.to_f32(), m, v, x))
                    })
                });
            }
        } else {
            let mut unused = 0.0;
            for (((p, &g), m), v) in it {
                stored(m, |m| {
                    stored(v, |v| {
                        self.element::<false>(p, g.to_f32(), m, v, &mut unused)
                    })
                });
            }
        }
    }
}

// ---------------------------------------------------------------- RMSProp

/// RMSProp: `v = α·v + (1−α)·g²`; centered `ḡ += (1−α)(g − ḡ)`; `d = √(v̂ − ḡ̂²) + ε` or
/// `√(v̂ − ḡ̂² + ε)`; with momentum `b = μ·b + gin·g/d`, `θ -= outer·(nesterov ? gin·g/d + μ·b : b)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsPropStep {
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

impl RmsPropStep {
    fn new(r: &RmsProp, ctx: &StepContext) -> Self {
        let inside = r.lr_placement == LrPlacement::Inside || r.momentum == 0.0;
        RmsPropStep {
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
            momentum: r.momentum as f32,
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
    pub fn element<const CENTERED: bool>(&self, p: &mut f32, g: f32, v: &mut f32, gavg: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *p = p0 - self.gin * self.normalised::<CENTERED>(g, v, gavg);
    }

    #[inline(always)]
    pub fn element_momentum<const CENTERED: bool>(
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

    #[inline(always)]
    fn update<G: Element, S: Element>(
        &self,
        p: &mut [f32],
        g: &[G],
        v: &mut [S],
        rest: &mut [&mut [S]],
    ) {
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
            _ => unreachable!("RMSProp's buffers follow Rule::state_names"),
        }
    }
}

// ---------------------------------------------------------------- Adagrad

/// Adagrad: `s += g²`; `θ -= clr·g / d` with `d = √s + ε` or `√(s + ε)`; optionally no update where
/// `s` is not positive (Optax).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradStep {
    gscale: f32,
    decay: Decay,
    clr: f32,
    eps: f32,
    eps_inside: bool,
    zero_where_empty: bool,
}

impl AdagradStep {
    fn new(r: &Adagrad, ctx: &StepContext) -> Self {
        AdagradStep {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(ctx.weight_decay, ctx.lr),
            clr: (ctx.lr / (1.0 + (ctx.step.saturating_sub(1)) as f64 * r.lr_decay)) as f32,
            eps: r.eps as f32,
            eps_inside: r.eps_placement == EpsPlacement::InsideSqrt,
            zero_where_empty: r.zero_where_empty,
        }
    }

    #[inline(always)]
    pub fn element(&self, p: &mut f32, g: f32, s: &mut f32) {
        let (p0, g) = self.decay.apply(*p, g * self.gscale);
        *s += g * g;
        let d = if self.eps_inside {
            (*s + self.eps).sqrt()
        } else {
            s.sqrt() + self.eps
        };
        let delta = self.clr * g / d;
        // Optax's `where(s > 0, …, 0)` is false for NaN too.
        let skip = self.zero_where_empty && (s.is_nan() || *s <= 0.0);
        *p = if skip { p0 } else { p0 - delta };
    }

    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], s: &mut [S]) {
        for ((p, &g), s) in p.iter_mut().zip(g).zip(s.iter_mut()) {
            stored(s, |s| self.element(p, g.to_f32(), s));
        }
    }
}
