//! Adamax, Adam's infinity-norm variant: knobs and presets. `math.rs` holds the per-element
//! maths, `adamax.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StepContext};
use crate::error::Result;
pub(crate) use math::AdamaxCoefficients;

/// Where Adamax's ε enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdamaxEps {
    /// `u = max(β2·u, |g| + ε)`; `θ -= lr/bc1 · m/u` (PyTorch, Optax).
    InsideMax,
    /// `u = max(β2·u, |g|)`; `θ -= lr/bc1 · m/(u + ε)` (Keras, TF1's contrib AdaMax).
    Denominator,
}

/// Adamax: `m += (1−β1)(g − m)`; `u = max(β2·u, |g|)` (ε inside the max or in the denominator);
/// `θ -= lr/(1 − β1^t) · m/u`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adamax {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub eps_placement: AdamaxEps,
}

impl Adamax {
    /// The framework's `Adamax` with its defaults (Keras' ε 1e-7; the default lrs are the
    /// porting module's).
    pub fn preset(flavor: Flavor) -> Self {
        Adamax {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.999,
            eps: if flavor == Flavor::Keras { 1e-7 } else { 1e-8 },
            eps_placement: match flavor {
                Flavor::PyTorch | Flavor::Optax => AdamaxEps::InsideMax,
                Flavor::Keras | Flavor::Tf1 => AdamaxEps::Denominator,
            },
        }
    }
}

/// `GroupConfig::flags` of an Adamax group (`ADAMAX_*` in adamax.cuh); params are β1, β2, ε.
const EPS_DENOMINATOR: u32 = 1 << 0;

impl RuleSpec for Adamax {
    type Coefficients = AdamaxCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_nonneg("eps", self.eps)
    }

    /// β1 (PyTorch's `betas[0]`).
    fn cycles_momentum(&self) -> bool {
        true
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_inf")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_inf"]
    }

    fn family(&self) -> &'static str {
        "adamax"
    }

    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            flags: if self.eps_placement == AdamaxEps::Denominator {
                EPS_DENOMINATOR
            } else {
                0
            },
            params: [self.beta1, self.beta2, self.eps, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> AdamaxCoefficients {
        AdamaxCoefficients::new(self, ctx)
    }
}
