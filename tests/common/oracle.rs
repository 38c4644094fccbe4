//! The f64 oracle: each rule's update written from the frameworks' equations (SEMANTICS.md), per
//! element, independent of the engine's coefficient factoring.

use fusedopt::{
    AdamEps, AdamaxEps, AmsGrad, ClipFormula, EpsPlacement, GlobalNormClip, LrPlacement,
    MomentForm, MomentumInit, NanSign, Rule, ScheduleFree, ScheduleFreeBase, ScheduleFreeForm,
    WeightDecay,
};

use super::{Tensor, NODECAY_LR_SCALE};

/// The f64 reference: per-element state, updated with the equations as the frameworks write them.
pub struct Oracle {
    pub rule: Rule,
    pub clip: Option<GlobalNormClip>,
    pub params: Vec<Vec<f64>>,
    pub groups: Vec<&'static str>,
    s1: Vec<Vec<f64>>,
    s2: Vec<Vec<f64>>,
    s3: Vec<Vec<f64>>,
    pub t: u64,
    /// Schedule-free's running weight sum and largest lr, per tensor (each at its own lr).
    averaging: Vec<(f64, f64)>,
    /// Rounds state after every update, as storage in a narrower dtype does.
    pub state_round: fn(f64) -> f64,
}

impl Oracle {
    pub fn new(rule: Rule, clip: Option<GlobalNormClip>, tensors: &[Tensor]) -> Self {
        let zeros =
            || -> Vec<Vec<f64>> { tensors.iter().map(|t| vec![0.0; t.values.len()]).collect() };
        let fill =
            |x: f64| -> Vec<Vec<f64>> { tensors.iter().map(|t| vec![x; t.values.len()]).collect() };
        let s1 = match &rule {
            Rule::RmsProp(r) => fill(r.initial_square_avg),
            Rule::Adagrad(r) => fill(r.initial_accumulator),
            // z starts at the parameters.
            Rule::ScheduleFree(_) => tensors
                .iter()
                .map(|t| t.values.iter().map(|&x| x as f64).collect())
                .collect(),
            _ => zeros(),
        };
        Oracle {
            params: tensors
                .iter()
                .map(|t| t.values.iter().map(|&x| x as f64).collect())
                .collect(),
            groups: tensors.iter().map(|t| t.group).collect(),
            s1,
            s2: zeros(),
            s3: zeros(),
            t: 0,
            averaging: vec![(0.0, 0.0); tensors.len()],
            rule,
            clip,
            state_round: |x| x,
        }
    }

    /// One step with `lr` (before group scaling); returns the pre-clip norm. Indexes five parallel
    /// arrays per element, which reads more plainly than five zipped iterators.
    #[allow(clippy::needless_range_loop)]
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> f64 {
        let norm = grads
            .iter()
            .flatten()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt();
        let factor = match self.clip {
            None => 1.0,
            Some(c) => match c.formula {
                ClipFormula::PyTorch => (c.max_norm / (norm + 1e-6)).min(1.0),
                ClipFormula::Keras => {
                    if norm > c.max_norm {
                        c.max_norm / norm
                    } else {
                        1.0
                    }
                }
                ClipFormula::Optax => {
                    if norm < c.max_norm {
                        1.0
                    } else {
                        c.max_norm / norm
                    }
                }
            },
        };
        self.t += 1;
        let t = self.t as i32;
        for i in 0..self.params.len() {
            let nodecay = self.groups[i] == "nodecay";
            let lr = if nodecay { lr * NODECAY_LR_SCALE } else { lr };
            let wd = if nodecay {
                WeightDecay::L2(0.0)
            } else {
                self.rule_weight_decay()
            };
            if let Rule::ScheduleFree(r) = &self.rule {
                let r = r.clone();
                let c = averaging_weight(&r, &mut self.averaging[i], lr, self.t);
                for j in 0..self.params[i].len() {
                    let g = grads[i][j] as f64 * factor;
                    let g = if self.maximize() { -g } else { g };
                    let (z, v) = (&mut self.s1[i][j], &mut self.s2[i][j]);
                    self.params[i][j] = schedule_free(&r, self.params[i][j], g, lr, t, c, wd, z, v);
                    *z = (self.state_round)(*z);
                    *v = (self.state_round)(*v);
                }
                continue;
            }
            for j in 0..self.params[i].len() {
                let mut g = grads[i][j] as f64 * factor;
                let mut p = self.params[i][j];
                if self.maximize() {
                    g = -g;
                }
                match wd {
                    WeightDecay::None => {}
                    WeightDecay::L2(l) => g += l * p,
                    WeightDecay::L1(l) => g += l * (if p == 0.0 { 0.0 } else { p.signum() }),
                    WeightDecay::Decoupled(l) => p -= lr * l * p,
                }
                let (a, b, c) = (&mut self.s1[i][j], &mut self.s2[i][j], &mut self.s3[i][j]);
                self.params[i][j] = update(&self.rule, p, g, lr, t, a, b, c);
                let round = self.state_round;
                for x in [a, b, c] {
                    *x = round(*x);
                }
            }
        }
        norm
    }

    /// Tensor `i`'s parameters to evaluate at: schedule-free's `x = (y − (1−β1)·z)/β1`.
    pub fn eval_params(&self, i: usize) -> Vec<f64> {
        match &self.rule {
            Rule::ScheduleFree(r) => self.params[i]
                .iter()
                .zip(&self.s1[i])
                .map(|(y, z)| (y - (1.0 - r.beta1) * z) / r.beta1)
                .collect(),
            _ => self.params[i].clone(),
        }
    }

    fn rule_weight_decay(&self) -> WeightDecay {
        self.rule.weight_decay()
    }

    fn maximize(&self) -> bool {
        self.rule.maximize()
    }
}

/// The textbook update of one element; `a`, `b`, `c` are the rule's state in slot order.
#[allow(clippy::too_many_arguments)]
fn update(
    rule: &Rule,
    p: f64,
    g: f64,
    lr: f64,
    t: i32,
    a: &mut f64,
    b: &mut f64,
    c: &mut f64,
) -> f64 {
    match rule {
        Rule::Sgd(r) => {
            if r.momentum == 0.0 {
                return p - lr * g;
            }
            let mu = r.momentum;
            match r.lr_placement {
                LrPlacement::Outside => {
                    // PyTorch: first buffer is a copy of g; Optax/TF1: zero-initialised trace.
                    *a = if t == 1 && r.momentum_init == MomentumInit::CopyGrad {
                        g
                    } else {
                        mu * *a + (1.0 - r.dampening) * g
                    };
                    let d = if r.nesterov { g + mu * *a } else { *a };
                    p - lr * d
                }
                LrPlacement::Inside => {
                    // Keras: m = μm − lr·g (dampening scales g).
                    *a = mu * *a - lr * (1.0 - r.dampening) * g;
                    if r.nesterov {
                        p + mu * *a - lr * g
                    } else {
                        p + *a
                    }
                }
            }
        }
        Rule::Adam(r) => {
            let (b1, b2) = (r.beta1, r.beta2);
            *a = b1 * *a + (1.0 - b1) * g;
            *b = b2 * *b + (1.0 - b2) * g * g;
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            if r.nesterov {
                // Optax: m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t), ε on the corrected scale.
                let m_hat = b1 * *a / (1.0 - b1.powi(t + 1)) + (1.0 - b1) * g / bc1;
                return p - lr * m_hat / ((*b / bc2 + r.eps_root).sqrt() + r.eps);
            }
            match (r.eps_scale, r.amsgrad) {
                (AdamEps::Raw, ams) => {
                    let v = match ams {
                        AmsGrad::Off => *b,
                        AmsGrad::MaxRaw => {
                            *c = c.max(*b);
                            *c
                        }
                        AmsGrad::MaxCorrected => {
                            *c = c.max(*b / bc2);
                            *c * bc2
                        }
                    };
                    let alpha = lr * bc2.sqrt() / bc1;
                    p - alpha * *a / ((v + r.eps_root).sqrt() + r.eps)
                }
                (AdamEps::BiasCorrected, ams) => {
                    let m_hat = *a / bc1;
                    let v_hat = match ams {
                        AmsGrad::Off => *b / bc2,
                        AmsGrad::MaxRaw => {
                            *c = c.max(*b);
                            *c / bc2
                        }
                        AmsGrad::MaxCorrected => {
                            *c = c.max(*b / bc2);
                            *c
                        }
                    };
                    p - lr * m_hat / ((v_hat + r.eps_root).sqrt() + r.eps)
                }
            }
        }
        Rule::RmsProp(r) => {
            let al = r.alpha;
            *a = al * *a + (1.0 - al) * g * g;
            let corr = if r.bias_correction {
                1.0 - al.powi(t)
            } else {
                1.0
            };
            let mut var = *a / corr;
            let (gavg, buf) = if r.centered { (b, c) } else { (c, b) };
            if r.centered {
                *gavg = al * *gavg + (1.0 - al) * g;
                var -= (*gavg / corr).powi(2);
            }
            let denom = match r.eps_placement {
                EpsPlacement::OutsideSqrt => var.sqrt() + r.eps,
                EpsPlacement::InsideSqrt => (var + r.eps).sqrt(),
            };
            if r.momentum == 0.0 {
                return p - lr * g / denom;
            }
            match r.lr_placement {
                LrPlacement::Outside => {
                    *buf = r.momentum * *buf + g / denom;
                    if r.nesterov {
                        p - lr * (g / denom + r.momentum * *buf)
                    } else {
                        p - lr * *buf
                    }
                }
                LrPlacement::Inside => {
                    let u = lr * g / denom;
                    *buf = r.momentum * *buf + u;
                    if r.nesterov {
                        p - (u + r.momentum * *buf)
                    } else {
                        p - *buf
                    }
                }
            }
        }
        Rule::Adagrad(r) => {
            *a += g * g;
            let clr = lr / (1.0 + (t - 1) as f64 * r.lr_decay);
            if r.zero_where_empty && *a <= 0.0 {
                return p;
            }
            let denom = match r.eps_placement {
                EpsPlacement::OutsideSqrt => a.sqrt() + r.eps,
                EpsPlacement::InsideSqrt => (*a + r.eps).sqrt(),
            };
            p - clr * g / denom
        }
        Rule::Adamax(r) => {
            *a = r.beta1 * *a + (1.0 - r.beta1) * g;
            let bc1 = 1.0 - r.beta1.powi(t);
            match r.eps_placement {
                AdamaxEps::InsideMax => {
                    *b = max_nan(r.beta2 * *b, g.abs() + r.eps);
                    p - lr / bc1 * *a / *b
                }
                AdamaxEps::Denominator => {
                    *b = max_nan(r.beta2 * *b, g.abs());
                    p - lr * *a / (bc1 * (*b + r.eps))
                }
            }
        }
        Rule::Lion(r) => {
            let c = r.beta1 * *a + (1.0 - r.beta1) * g;
            *a = r.beta2 * *a + (1.0 - r.beta2) * g;
            let zero = c == 0.0 || (c.is_nan() && r.nan_sign == NanSign::Zero);
            let sign = if zero { 0.0 } else { c.signum() };
            p - lr * sign
        }
        Rule::Radam(r) => {
            let (b1, b2) = (r.beta1, r.beta2);
            *a = match r.moment {
                MomentForm::Lerp => *a + (1.0 - b1) * (g - *a),
                MomentForm::Average => b1 * *a + (1.0 - b1) * g,
            };
            *b = b2 * *b + (1.0 - b2) * g * g;
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            let m_hat = if r.nesterov {
                b1 * *a / (1.0 - b1.powi(t + 1)) + (1.0 - b1) * g / bc1
            } else {
                *a / bc1
            };
            let rho_inf = 2.0 / (1.0 - b2) - 1.0;
            let rho = rho_inf - 2.0 * t as f64 * b2.powi(t) / bc2;
            let rectified = if r.threshold_inclusive {
                rho >= r.threshold
            } else {
                rho > r.threshold
            };
            if !rectified {
                return p - lr * m_hat;
            }
            let rect = ((rho - 4.0) * (rho - 2.0) * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
                .sqrt();
            match r.eps_scale {
                // PyTorch: lr·m̂·√bc2/(√v + ε)·r.
                AdamEps::Raw => p - lr * m_hat * bc2.sqrt() / (b.sqrt() + r.eps) * rect,
                // Optax: lr·r·m̂/(√(v̂ + eps_root) + ε).
                AdamEps::BiasCorrected => {
                    p - lr * rect * m_hat / ((*b / bc2 + r.eps_root).sqrt() + r.eps)
                }
            }
        }
        Rule::Nadam(r) => {
            let mu = |t: i32| r.beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * r.momentum_decay));
            let product: f64 = (1..=t).map(mu).product();
            *a = r.beta1 * *a + (1.0 - r.beta1) * g;
            *b = r.beta2 * *b + (1.0 - r.beta2) * g * g;
            let d = (*b / (1.0 - r.beta2.powi(t))).sqrt() + r.eps;
            let (mu_t, mu_next) = (mu(t), mu(t + 1));
            p - lr * (1.0 - mu_t) / (1.0 - product) * g / d
                - lr * mu_next / (1.0 - product * mu_next) * *a / d
        }
        Rule::Adopt(r) => {
            // The first step only sets v = g² (β1 = 1, β2 = 0, clip 0).
            let (b1, b2) = if t == 1 {
                (1.0, 0.0)
            } else {
                (r.beta1, r.beta2)
            };
            let x = g / b.sqrt().max(r.eps);
            let clip = ((t - 1) as f64).powf(0.25);
            let u = if r.clipping { x.clamp(-clip, clip) } else { x };
            *b = b2 * *b + (1.0 - b2) * g * g;
            *a = b1 * *a + (1.0 - b1) * u;
            let n = if r.nesterov {
                b1 * *a + (1.0 - b1) * u
            } else {
                *a
            };
            p - lr * n
        }
        Rule::Ademamix(r) => {
            *a = r.beta1 * *a + (1.0 - r.beta1) * g;
            *b = r.beta3 * *b + (1.0 - r.beta3) * g;
            *c = r.beta2 * *c + (1.0 - r.beta2) * g * g;
            let m_hat = *a / (1.0 - r.beta1.powi(t));
            let v_hat = *c / (1.0 - r.beta2.powi(t));
            p - lr * (m_hat + r.alpha * *b) / ((v_hat + r.eps_root).sqrt() + r.eps)
        }
        Rule::ScheduleFree(_) => unreachable!("schedule-free steps in Oracle::step"),
        Rule::CustomRule(_) => {
            panic!("a custom rule is checked against the built-in rule it copies")
        }
        Rule::Adadelta(r) => {
            *a = r.rho * *a + (1.0 - r.rho) * g * g;
            let delta = (*b + r.eps).sqrt() / (*a + r.eps).sqrt() * g;
            *b = r.rho * *b + (1.0 - r.rho) * delta * delta;
            p - lr * delta
        }
    }
}

/// Schedule-free's warmup factor of the lr at 1-based step `t`: `min(1, t/W)`.
fn warmup(r: &ScheduleFree, t: u64) -> f64 {
    if r.warmup_steps == 0 {
        1.0
    } else {
        (t as f64 / r.warmup_steps as f64).min(1.0)
    }
}

/// Step `t`'s averaging weight `c_t = w_t/Σw`, `w_t = t^r·max_lr^p` (Optax weights step t by its
/// warmup at t, and steps by it at t − 1; the reference by both at t).
fn averaging_weight(r: &ScheduleFree, (sum, max_lr): &mut (f64, f64), lr: f64, t: u64) -> f64 {
    *max_lr = max_lr.max(lr * warmup(r, t));
    let w = (t as f64).powf(r.r) * max_lr.powf(r.weight_lr_power);
    *sum += w;
    if *sum == 0.0 {
        0.0
    } else {
        w / *sum
    }
}

/// Schedule-free, as the paper writes it: `x = (y − (1−β1)·z)/β1`, `z' = z − lr·d`,
/// `x' = (1−c)·x + c·z'`, `y' = β1·x' + (1−β1)·z'`, with `d` the base optimizer's direction at `y`
/// (AdamW's decoupled decay joins it, coupled decay the gradient).
#[allow(clippy::too_many_arguments)]
fn schedule_free(
    r: &ScheduleFree,
    y: f64,
    g: f64,
    lr: f64,
    t: i32,
    c: f64,
    wd: WeightDecay,
    z: &mut f64,
    v: &mut f64,
) -> f64 {
    let t = t as u64;
    let step_lr = match r.form {
        ScheduleFreeForm::Explicit => lr * warmup(r, t - 1),
        ScheduleFreeForm::InPlace => lr * warmup(r, t),
    };
    let g = match wd {
        WeightDecay::L2(l) => g + l * y,
        WeightDecay::L1(l) => g + l * (if y == 0.0 { 0.0 } else { y.signum() }),
        _ => g,
    };
    let mut d = match r.base {
        ScheduleFreeBase::Sgd => g,
        ScheduleFreeBase::AdamW => {
            *v = r.beta2 * *v + (1.0 - r.beta2) * g * g;
            g / ((*v / (1.0 - r.beta2.powi(t as i32))).sqrt() + r.eps)
        }
    };
    if let WeightDecay::Decoupled(l) = wd {
        d += l * y;
    }
    let x = (y - (1.0 - r.beta1) * *z) / r.beta1;
    *z -= step_lr * d;
    let x = (1.0 - c) * x + c * *z;
    r.beta1 * x + (1.0 - r.beta1) * *z
}

/// `max` that propagates NaN from either side (`torch.maximum`, `jnp.maximum`, `tf.maximum`).
fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}
