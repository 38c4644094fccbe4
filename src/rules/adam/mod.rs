//! Adam, AdamW (decoupled decay) and AMSGrad: knobs and presets. `math.rs` holds the per-element
//! maths, `adam.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{
    check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StepContext, WeightDecay,
};
use crate::error::Result;
pub(crate) use math::AdamCoefficients;

/// On which scale Adam's ε is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdamEps {
    /// `m̂ / (√v̂ + ε)`: ε on the bias-corrected scale (PyTorch, Optax).
    BiasCorrected,
    /// `lr·√bc2/bc1 · m / (√v + ε̂)`: "epsilon hat" on the raw scale (Keras, TF1).
    Raw,
}

/// AMSGrad: which second moment is max'ed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AmsGrad {
    Off,
    /// Max over the raw `v` (PyTorch, Keras).
    MaxRaw,
    /// Max over the bias-corrected `v̂` (Optax `amsgrad`).
    MaxCorrected,
}

/// Adam, AdamW (decoupled decay) and AMSGrad.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Added to `v̂` inside the root (Optax `eps_root`).
    pub eps_root: f64,
    pub eps_scale: AdamEps,
    pub amsgrad: AmsGrad,
    /// Nesterov's momentum: `m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t)` (Optax
    /// `adam(nesterov=True)`, which is its `nadam`).
    #[serde(default)]
    pub nesterov: bool,
}

impl Adam {
    /// The framework's `Adam` with its defaults.
    pub fn preset(flavor: Flavor) -> Self {
        Adam {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.999,
            eps: if flavor == Flavor::Keras { 1e-7 } else { 1e-8 },
            eps_root: 0.0,
            eps_scale: match flavor {
                Flavor::PyTorch | Flavor::Optax => AdamEps::BiasCorrected,
                Flavor::Keras | Flavor::Tf1 => AdamEps::Raw,
            },
            amsgrad: AmsGrad::Off,
            nesterov: false,
        }
    }

    /// Optax's `nadam`: `adam(nesterov=True)`.
    pub fn nadam_optax() -> Self {
        Adam {
            nesterov: true,
            ..Adam::preset(Flavor::Optax)
        }
    }

    /// The framework's `AdamW` with its default decay (PyTorch 0.01, Keras 0.004, Optax 1e-4;
    /// TF1 has none, so 0).
    pub fn adamw(flavor: Flavor) -> Self {
        let lambda = match flavor {
            Flavor::PyTorch => 0.01,
            Flavor::Keras => 0.004,
            Flavor::Optax => 1e-4,
            Flavor::Tf1 => 0.0,
        };
        Adam::preset(flavor).with_weight_decay(WeightDecay::Decoupled(lambda))
    }

    /// The framework's AMSGrad: max over raw `v` except in Optax, which maxes `v̂`.
    pub fn amsgrad(flavor: Flavor) -> Self {
        Adam {
            amsgrad: if flavor == Flavor::Optax {
                AmsGrad::MaxCorrected
            } else {
                AmsGrad::MaxRaw
            },
            ..Adam::preset(flavor)
        }
    }
}

/// `GroupConfig::flags` of an Adam group (`ADAM_*` in adam.cuh); params are β1, β2, ε, eps_root.
const EPS_RAW: u32 = 1 << 0;
const AMS_CORRECTED: u32 = 1 << 1;
const NESTEROV: u32 = 1 << 2;

impl RuleSpec for Adam {
    type Coefficients = AdamCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("eps_root", self.eps_root)?;
        super::check(!(self.nesterov && self.amsgrad != AmsGrad::Off), || {
            "Adam with both Nesterov momentum and AMSGrad: no framework has it".to_string()
        })
    }

    /// β1 (PyTorch's `betas[0]`).
    fn cycles_momentum(&self) -> bool {
        true
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_avg_sq" | "max_exp_avg_sq")
    }

    fn state_names(&self) -> &'static [&'static str] {
        if self.amsgrad != AmsGrad::Off {
            &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        } else {
            &["exp_avg", "exp_avg_sq"]
        }
    }

    fn family(&self) -> &'static str {
        match (self.amsgrad != AmsGrad::Off, self.nesterov) {
            (true, false) => "adam_amsgrad",
            (false, true) => "adam_nesterov",
            (false, false) => "adam",
            // Refused by validate: no framework has both.
            (true, true) => "adam_amsgrad",
        }
    }

    fn device_config(&self) -> DeviceConfig {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        DeviceConfig {
            flags: flag(self.eps_scale == AdamEps::Raw, EPS_RAW)
                | flag(self.amsgrad == AmsGrad::MaxCorrected, AMS_CORRECTED)
                | flag(self.nesterov, NESTEROV),
            params: [
                self.beta1,
                self.beta2,
                self.eps,
                self.eps_root,
                0.0,
                0.0,
                0.0,
                0.0,
            ],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> AdamCoefficients {
        AdamCoefficients::new(self, ctx)
    }
}
