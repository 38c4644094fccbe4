//! ADOPT (Taniguchi et al. 2024) as Optax ships it (`optax.contrib.adopt`): knobs and presets.
//! `math.rs` holds the per-element maths, `adopt.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StepContext};
use crate::error::Result;
pub(crate) use math::AdoptCoefficients;

/// ADOPT: the gradient is normalised by the *previous* second moment before it enters the
/// momentum: `u = clip(g / max(√v, ε), ±c^¼)`, `v = β2·v + (1−β2)·g²`, `m = β1·m + (1−β1)·u`,
/// `θ -= lr·m` (c the 0-based count); the first step only sets `v = g²`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adopt {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip `u` to ±c^¼ (Optax's `use_clipping` with its default `clip_value_fn`).
    pub clipping: bool,
    /// The step uses `β1·m + (1−β1)·u` once more (Optax `nesterov`).
    pub nesterov: bool,
}

impl Adopt {
    /// `optax.contrib.adopt`'s defaults (β 0.9/0.9999, ε 1e-6, clipping on). The other
    /// frameworks have none: the same.
    pub fn preset(_flavor: Flavor) -> Self {
        Adopt {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.9999,
            eps: 1e-6,
            clipping: true,
            nesterov: false,
        }
    }
}

/// `GroupConfig::flags` of an ADOPT group (`ADOPT_*` in adopt.cuh); params are β1, β2, ε.
const CLIPPING: u32 = 1 << 0;
const NESTEROV: u32 = 1 << 1;

impl RuleSpec for Adopt {
    type Coefficients = AdoptCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_nonneg("eps", self.eps)
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_avg_sq")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn family(&self) -> &'static str {
        "adopt"
    }

    fn device_config(&self) -> DeviceConfig {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        DeviceConfig {
            flags: flag(self.clipping, CLIPPING) | flag(self.nesterov, NESTEROV),
            params: [self.beta1, self.beta2, self.eps, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> AdoptCoefficients {
        AdoptCoefficients::new(self, ctx)
    }
}
