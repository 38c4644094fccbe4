//! Schedule-free learning (Defazio et al., "The Road Less Scheduled", 2024) over SGD or AdamW,
//! as Optax's `contrib.schedule_free_sgd` / `schedule_free_adamw` and the reference
//! implementation (the `schedulefree` package's `SGDScheduleFree` / `AdamWScheduleFree`) compute
//! it. The parameters hold `y`, where gradients are taken; the state holds `z`, the base
//! optimizer's iterate; the averaged `x`, where the model is evaluated, is found from the two
//! ([`crate::Optimizer::eval_param`]). `math.rs` holds the per-element maths, `schedule_free.cuh`
//! the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{
    check, check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StateInit,
    StepContext, StepMemo, StepScalars, WeightDecay,
};
use crate::error::Result;
pub(crate) use math::ScheduleFreeCoefficients;
use math::{optax_warmup, torch_lerp};

/// The optimizer whose momentum schedule-free replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleFreeBase {
    /// `z -= lr·g`.
    Sgd,
    /// `z -= lr·(g/(√(v/bc2) + ε) + λ·y)`, `v` AdamW's second moment (no first moment).
    AdamW,
}

/// How the frameworks write the same step: not the same rounding, nor the same warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleFreeForm {
    /// Optax: `x` rebuilt from `y` and the old `z`, averaged with the new `z`, and `y` rebuilt
    /// from both; the averaging weights in f32; under warmup the weighting's lr is one step
    /// ahead of the step's (Optax counts them from 1 and 0).
    Explicit,
    /// The reference: `y` lerped toward the old `z`, then stepped in place,
    /// `y += lr·(β1·(1−c)−1)·d`; the averaging weights in f64.
    InPlace,
}

/// Schedule-free: with `d` the base optimizer's direction at `y` and `c_t` the averaging
/// weight `w_t/Σw`, `w_t = t^r·max_lr^p`: `z' = z − lr·d`, `x' = (1−c)·x + c·z'`,
/// `y' = β1·x' + (1−β1)·z'`, where `x = (y − (1−β1)·z)/β1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleFree {
    #[serde(flatten)]
    pub common: Common,
    pub base: ScheduleFreeBase,
    /// β1: where `y` sits between `x` and `z` (the reference SGD's `momentum`).
    pub beta1: f64,
    /// AdamW's second-moment decay and ε (SGD ignores them).
    pub beta2: f64,
    pub eps: f64,
    /// The lr rises linearly over this many steps (0: from the first step on).
    pub warmup_steps: u64,
    /// The averaging weight's power of the step number (the reference's `r`; Optax has none).
    pub r: f64,
    /// The averaging weight's power of the largest lr so far.
    pub weight_lr_power: f64,
    pub form: ScheduleFreeForm,
}

impl ScheduleFree {
    /// Schedule-free SGD with the framework's defaults (β1 0.9; the frameworks' lr 1 is the
    /// optimizer's): Optax
    /// `contrib.schedule_free_sgd`, or for PyTorch, which has none, the reference
    /// `SGDScheduleFree`. Keras and TF1 have none: the reference's.
    pub fn sgd(flavor: Flavor) -> Self {
        Self::preset(flavor, ScheduleFreeBase::Sgd)
    }

    /// Schedule-free AdamW with the framework's defaults (β 0.9/0.999, ε 1e-8; lr 2.5e-3 there):
    /// Optax `contrib.schedule_free_adamw` or the reference `AdamWScheduleFree`.
    pub fn adamw(flavor: Flavor) -> Self {
        Self::preset(flavor, ScheduleFreeBase::AdamW)
            .with_weight_decay(WeightDecay::Decoupled(0.0))
    }

    fn preset(flavor: Flavor, base: ScheduleFreeBase) -> Self {
        ScheduleFree {
            common: Common::default(),
            base,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
            form: if flavor == Flavor::Optax {
                ScheduleFreeForm::Explicit
            } else {
                ScheduleFreeForm::InPlace
            },
        }
    }

    /// The reference's warmup: step `t` (1-based) runs at `lr·min(1, t/warmup)`.
    fn warmup_factor(&self, t: u64) -> f64 {
        if t <= self.warmup_steps {
            t as f64 / self.warmup_steps as f64
        } else {
            1.0
        }
    }
}

/// `GroupConfig::flags` of a schedule-free group (`SCHEDULE_FREE_*` in schedule_free.cuh);
/// params are β1, β2, ε, warmup steps.
const EXPLICIT: u32 = 1 << 0;

impl RuleSpec for ScheduleFree {
    type Coefficients = ScheduleFreeCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check(self.beta1 > 0.0 && self.beta1 < 1.0, || {
            format!("beta1 must be in (0, 1), got {}", self.beta1)
        })?;
        check_unit("beta2", self.beta2)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("r", self.r)?;
        check_nonneg("weight_lr_power", self.weight_lr_power)?;
        check(
            self.form == ScheduleFreeForm::InPlace || self.r == 0.0,
            || "Optax's schedule_free has no r (the reference's): r must be 0".into(),
        )?;
        check(
            self.warmup_steps < 1 << 31,
            || format!("warmup_steps {} is past 2^31", self.warmup_steps),
        )?;
        check(
            self.base == ScheduleFreeBase::AdamW
                || !matches!(self.common.weight_decay, WeightDecay::Decoupled(_)),
            || {
                "schedule-free SGD's weight decay joins the gradient at y (L2), as both \
                 frameworks do: decoupled decay is AdamW's"
                    .into()
            },
        )
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_avg_sq")
    }

    fn state_names(&self) -> &'static [&'static str] {
        match self.base {
            ScheduleFreeBase::Sgd => &["z"],
            ScheduleFreeBase::AdamW => &["z", "exp_avg_sq"],
        }
    }

    fn state_init(&self, name: &str) -> StateInit {
        match name {
            "z" => StateInit::Params,
            _ => StateInit::Value(0.0),
        }
    }

    fn family(&self) -> &'static str {
        match self.base {
            ScheduleFreeBase::Sgd => "schedule_free_sgd",
            ScheduleFreeBase::AdamW => "schedule_free_adamw",
        }
    }

    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            flags: if self.form == ScheduleFreeForm::Explicit {
                EXPLICIT
            } else {
                0
            },
            params: [
                self.beta1,
                self.beta2,
                self.eps,
                self.warmup_steps as f64,
                0.0,
                0.0,
                0.0,
                0.0,
            ],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> ScheduleFreeCoefficients {
        ScheduleFreeCoefficients::new(self, ctx)
    }

    fn needs_step_scalars(&self) -> bool {
        true
    }

    fn scalars_follow_lr(&self) -> bool {
        true
    }

    fn memo_is_history(&self) -> bool {
        true
    }

    /// `[c_t, 0, 0]`: the averaging weight of step `t`, from the running weight sum and largest
    /// lr in `memo` (which must stand at step `t − 1`). The weight comes from the optimizer's
    /// lr, before any group's scale: a constant scale cancels in `w_t/Σw`.
    fn step_scalars(&self, t: u64, lr: f64, memo: &mut StepMemo) -> StepScalars {
        debug_assert_eq!(memo.t + 1, t, "schedule-free weights follow every step");
        let ck = match self.form {
            ScheduleFreeForm::InPlace => {
                let max_lr = memo.max_lr.max(lr * self.warmup_factor(t));
                let weight = (t as f64).powf(self.r) * max_lr.powf(self.weight_lr_power);
                memo.max_lr = max_lr;
                memo.weight_sum += weight;
                // Python's ZeroDivisionError, caught: 0.
                if memo.weight_sum == 0.0 {
                    0.0
                } else {
                    weight / memo.weight_sum
                }
            }
            ScheduleFreeForm::Explicit => {
                let lr = optax_warmup(lr, t, self.warmup_steps);
                let max_lr = (memo.max_lr as f32).max(lr);
                let weight = max_lr.powf(self.weight_lr_power as f32);
                let weight_sum = memo.weight_sum as f32 + weight;
                memo.max_lr = max_lr as f64;
                memo.weight_sum = weight_sum as f64;
                // jnp.nan_to_num(0/0) = 0.
                let ck = weight / weight_sum;
                if ck.is_nan() {
                    0.0
                } else {
                    ck as f64
                }
            }
        };
        memo.t = t;
        [ck, 0.0, 0.0]
    }

    /// Optax weights step t by its schedule at count t but steps at count t − 1: one lr per step
    /// cannot say both. Its warmup is `warmup_steps`; `set_lr` gives both the same lr, as
    /// Optax's injected hyperparameters do.
    fn schedule_conflict(&self) -> Option<&'static str> {
        match self.form {
            ScheduleFreeForm::Explicit => Some(
                "Optax's schedule_free evaluates its schedule one step apart for the weights and \
                 the step, which one lr per step cannot follow: use warmup_steps, or set_lr",
            ),
            ScheduleFreeForm::InPlace => None,
        }
    }

    /// `x`: Optax's `(y − (1−β1)·z)/β1`, or the reference's `eval()`, `lerp(y, z, 1 − 1/β1)`.
    fn eval_params(&self, y: &[f32], state: &[Vec<f32>]) -> Option<Vec<f32>> {
        let z = state.first()?;
        Some(match self.form {
            ScheduleFreeForm::Explicit => {
                // `schedule_free_eval_params` reads β1 from the state, in f32: 1 − β1 too.
                let b1 = self.beta1 as f32;
                let c1 = 1.0 - b1;
                y.iter().zip(z).map(|(&y, &z)| (y - c1 * z) / b1).collect()
            }
            ScheduleFreeForm::InPlace => {
                let w = (1.0 - 1.0 / self.beta1) as f32;
                y.iter().zip(z).map(|(&y, &z)| torch_lerp(y, z, w)).collect()
            }
        })
    }
}
