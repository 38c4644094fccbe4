//! NAdam as PyTorch and Keras compute it: Adam with Nesterov momentum under a momentum-decay
//! schedule μ_t and its running product. `math.rs` holds the per-element maths, `nadam.cuh` the
//! same for the GPU. (Optax's `nadam` is another algorithm: `Adam { nesterov: true, .. }`.)

mod math;

use serde::{Deserialize, Serialize};

use super::{
    check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StepContext, StepMemo,
    StepScalars,
};
use crate::error::Result;
pub(crate) use math::NadamCoefficients;

/// NAdam: `μ_t = β1·(1 − ½·0.96^(t·ψ))`, `Π_t = μ_1⋯μ_t` (kept in f32, as both frameworks keep it;
/// PyTorch's rounding exactly, Keras' within its own f32 evaluation of μ_t);
/// `m += (1−β1)(g − m)`, `v = β2·v + (1−β2)·g²`, `d = √(v/bc2) + ε`;
/// `θ -= lr·(1−μ_t)/(1−Π_t) · g/d + lr·μ_{t+1}/(1−Π_t·μ_{t+1}) · m/d`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nadam {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// ψ: PyTorch's `momentum_decay` (4e-3); Keras has ψ = 1 (its μ_t uses 0.96^t).
    pub momentum_decay: f64,
}

impl Nadam {
    /// The framework's NAdam with its defaults: PyTorch `NAdam` (ε 1e-8, ψ 4e-3) or Keras
    /// `Nadam` (ε 1e-7, ψ 1). Optax and TF1 have none of this kind: PyTorch's.
    pub fn preset(flavor: Flavor) -> Self {
        let keras = flavor == Flavor::Keras;
        Nadam {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.999,
            eps: if keras { 1e-7 } else { 1e-8 },
            momentum_decay: if keras { 1.0 } else { 4e-3 },
        }
    }

    /// μ_t in f64, as PyTorch computes it (Keras computes it in f32).
    fn mu(&self, t: u64) -> f64 {
        self.beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * self.momentum_decay))
    }
}

impl RuleSpec for Nadam {
    type Coefficients = NadamCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("momentum_decay", self.momentum_decay)
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_avg_sq")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn family(&self) -> &'static str {
        "nadam"
    }

    /// Params are β1, β2, ε (`nadam.cuh`); μ_t, μ_{t+1} and Π_t come per step.
    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            flags: 0,
            params: [self.beta1, self.beta2, self.eps, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> NadamCoefficients {
        NadamCoefficients::new(self, ctx)
    }

    fn needs_step_scalars(&self) -> bool {
        true
    }

    /// `[μ_t, μ_{t+1}, Π_t]`, the product rounded to f32 after every factor, as PyTorch's
    /// `mu_product` tensor holds it (Keras' `_u_product` rounds twice per factor: within the
    /// tolerance of its recorded cases).
    fn step_scalars(&self, t: u64, _lr: f64, memo: &mut StepMemo) -> StepScalars {
        if memo.t > t {
            *memo = StepMemo::default();
        }
        while memo.t < t {
            if memo.product == 0.0 {
                // Underflowed (within a few hundred steps): it stays 0 from here on.
                memo.t = t;
                break;
            }
            memo.t += 1;
            memo.product = (memo.product as f32 * self.mu(memo.t) as f32) as f64;
        }
        [self.mu(t), self.mu(t.saturating_add(1)), memo.product]
    }
}
