//! Schedule-free's per-element maths: `schedule_free.cuh` beside it, line for line.

use super::{ScheduleFree, ScheduleFreeForm};
use crate::rules::{stored, Decay, StepContext, Update, WeightDecay};
use crate::Element;

/// `torch.lerp(s, e, w)` as PyTorch evaluates it: from the nearer end.
#[inline(always)]
pub(crate) fn torch_lerp(s: f32, e: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        s + w * (e - s)
    } else {
        e - (e - s) * (1.0 - w)
    }
}

/// Optax's `warmup_constant_schedule(0, peak, steps)` at step count `count`, in its f32 steps:
/// `(0 − peak)·(1 − count/steps) + peak` before `steps`, then `peak`.
pub(crate) fn optax_warmup(peak: f64, count: u64, steps: u64) -> f32 {
    let peak = peak as f32;
    if count >= steps {
        return peak;
    }
    let frac = 1.0 - count as f32 / steps as f32;
    -peak * frac + peak
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScheduleFreeCoefficients {
    gscale: f32,
    /// Coupled decay (L2, L1) on the gradient; decoupled decay joins the direction instead.
    decay: Decay,
    direction_decay: f32,
    explicit: bool,
    beta2: f32,
    one_minus_beta2: f32,
    bc2: f32,
    eps: f32,
    /// In place: the z step's lr, the y step's `lr·(β1·(1−c)−1)`, and the lerp weight `c`.
    lr: f32,
    y_step: f32,
    /// Explicit: `−lr`, `β1`, `1−β1`, `c`, `1−c`.
    neg_lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    ck: f32,
    one_minus_ck: f32,
    /// The first applied step: z starts as the parameters then (as the reference's lazy
    /// `z = clone(p)`, and Optax's `init(params)`), whatever was written to them since.
    first: bool,
}

impl ScheduleFreeCoefficients {
    pub(crate) fn new(r: &ScheduleFree, ctx: &StepContext) -> Self {
        let (coupled, direction_decay) = match ctx.weight_decay {
            WeightDecay::Decoupled(l) => (WeightDecay::None, l),
            wd => (wd, 0.0),
        };
        let ck = ctx.scalars[0];
        let explicit = r.form == ScheduleFreeForm::Explicit;
        // Optax's base optimizer counts from 0, so its step t runs at the warmup's count t − 1.
        let lr = if explicit {
            optax_warmup(ctx.lr, ctx.step.saturating_sub(1), r.warmup_steps) as f64
        } else {
            ctx.lr * r.warmup_factor(ctx.step)
        };
        ScheduleFreeCoefficients {
            gscale: ctx.grad_scale as f32,
            decay: Decay::new(coupled, ctx.lr),
            direction_decay: direction_decay as f32,
            explicit,
            beta2: r.beta2 as f32,
            one_minus_beta2: (1.0 - r.beta2) as f32,
            bc2: (1.0 - crate::rules::powu(r.beta2, ctx.step)) as f32,
            eps: r.eps as f32,
            lr: lr as f32,
            y_step: (lr * (r.beta1 * (1.0 - ck) - 1.0)) as f32,
            neg_lr: -lr as f32,
            beta1: r.beta1 as f32,
            one_minus_beta1: (1.0 - r.beta1) as f32,
            ck: ck as f32,
            one_minus_ck: (1.0 - ck) as f32,
            first: ctx.step == 1,
        }
    }

    /// AdamW's direction at `y` for gradient `g` (second moment `v` updated).
    #[inline(always)]
    fn adamw_direction(&self, y: f32, g: f32, v: &mut f32) -> f32 {
        let d = if self.explicit {
            *v = self.one_minus_beta2 * (g * g) + self.beta2 * *v;
            (1.0 / ((*v / self.bc2).sqrt() + self.eps)) * g
        } else {
            *v = self.beta2 * *v + self.one_minus_beta2 * g * g;
            g / ((*v / self.bc2).sqrt() + self.eps)
        };
        if self.direction_decay != 0.0 {
            d + self.direction_decay * y
        } else {
            d
        }
    }

    /// Moves `y` and `z` along direction `d`.
    #[inline(always)]
    fn step(&self, y: &mut f32, z: &mut f32, d: f32) {
        if self.explicit {
            let z1 = *z + self.neg_lr * d;
            let x0 = (*y - self.one_minus_beta1 * *z) / self.beta1;
            let x = self.one_minus_ck * x0 + self.ck * z1;
            let y1 = self.beta1 * x + self.one_minus_beta1 * z1;
            *y = *y + (y1 - *y);
            *z = z1;
        } else {
            *y = torch_lerp(*y, *z, self.ck);
            *y += self.y_step * d;
            *z -= self.lr * d;
        }
    }

    #[inline(always)]
    pub(crate) fn sgd(&self, y: &mut f32, g: f32, z: &mut f32) {
        if self.first {
            *z = *y;
        }
        let (_, g) = self.decay.apply(*y, g * self.gscale);
        self.step(y, z, g);
    }

    #[inline(always)]
    pub(crate) fn adamw(&self, y: &mut f32, g: f32, z: &mut f32, v: &mut f32) {
        if self.first {
            *z = *y;
        }
        let (_, g) = self.decay.apply(*y, g * self.gscale);
        let d = self.adamw_direction(*y, g, v);
        self.step(y, z, d);
    }
}

impl Update for ScheduleFreeCoefficients {
    #[inline(always)]
    fn update<G: Element, S: Element>(&self, p: &mut [f32], g: &[G], state: &mut [&mut [S]]) {
        match state {
            [z, v] => {
                let it = p.iter_mut().zip(g).zip(z.iter_mut()).zip(v.iter_mut());
                for (((p, &g), z), v) in it {
                    stored(z, |z| stored(v, |v| self.adamw(p, g.to_f32(), z, v)));
                }
            }
            [z] => {
                for ((p, &g), z) in p.iter_mut().zip(g).zip(z.iter_mut()) {
                    stored(z, |z| self.sgd(p, g.to_f32(), z));
                }
            }
            // The optimizer allocates exactly `state_names().len()` buffers for its rule.
            _ => debug_assert!(false, "state buffers do not follow state_names"),
        }
    }
}
