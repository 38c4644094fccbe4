//! AdEMAMix (Pagliardini et al. 2024) as Optax ships it (`optax.contrib.ademamix`): knobs and
//! presets. `math.rs` holds the per-element maths, `ademamix.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StepContext};
use crate::error::Result;
pub(crate) use math::AdemamixCoefficients;

/// AdEMAMix: a fast EMA `m1` (β1, bias-corrected) and a slow one `m2` (β3, not corrected) mixed
/// by α over Adam's denominator: `θ -= lr·(m̂1 + α·m2)/(√(v̂ + eps_root) + ε)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ademamix {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: f64,
    pub alpha: f64,
    pub eps: f64,
    pub eps_root: f64,
}

impl Ademamix {
    /// `optax.contrib.ademamix`'s defaults (β 0.9/0.999/0.9999, α 5, ε 1e-8). The other
    /// frameworks have none: the same.
    pub fn preset(_flavor: Flavor) -> Self {
        Ademamix {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.9999,
            alpha: 5.0,
            eps: 1e-8,
            eps_root: 0.0,
        }
    }
}

impl RuleSpec for Ademamix {
    type Coefficients = AdemamixCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_unit("beta3", self.beta3)?;
        check_nonneg("alpha", self.alpha)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("eps_root", self.eps_root)
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_avg_sq")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg_fast", "exp_avg_slow", "exp_avg_sq"]
    }

    fn family(&self) -> &'static str {
        "ademamix"
    }

    /// Params are β1, β2, β3, α, ε, eps_root (`ademamix.cuh`).
    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            flags: 0,
            params: [
                self.beta1,
                self.beta2,
                self.beta3,
                self.alpha,
                self.eps,
                self.eps_root,
                0.0,
                0.0,
            ],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> AdemamixCoefficients {
        AdemamixCoefficients::new(self, ctx)
    }
}
