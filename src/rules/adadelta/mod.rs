//! Adadelta: knobs and presets. `math.rs` holds the per-element maths, `adadelta.cuh` the same
//! for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{check_nonneg, check_unit, Common, DeviceConfig, Flavor, RuleSpec, StepContext};
use crate::error::Result;
pub(crate) use math::AdadeltaCoefficients;

/// Adadelta: `a = ρ·a + (1−ρ)·g²`; `δ = √(b + ε)/√(a + ε) · g`; `b = ρ·b + (1−ρ)·δ²`;
/// `θ -= lr·δ`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adadelta {
    #[serde(flatten)]
    pub common: Common,
    pub rho: f64,
    pub eps: f64,
}

impl Adadelta {
    /// The framework's `Adadelta` with its defaults: PyTorch ρ 0.9, ε 1e-6; Keras ρ 0.95, ε 1e-7;
    /// Optax ρ 0.9, ε 1e-6 (its default lr `None` skips the lr scaling, which also leaves the
    /// sign unflipped: see `porting`). TF1: Keras' defaults. The frameworks' default lrs are
    /// the porting module's (`porting::rule_from_framework`).
    pub fn preset(flavor: Flavor) -> Self {
        let keras = matches!(flavor, Flavor::Keras | Flavor::Tf1);
        Adadelta {
            common: Common::default(),
            rho: if keras { 0.95 } else { 0.9 },
            eps: if keras { 1e-7 } else { 1e-6 },
        }
    }
}

impl RuleSpec for Adadelta {
    type Coefficients = AdadeltaCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("rho", self.rho)?;
        check_nonneg("eps", self.eps)
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "square_avg" | "acc_delta")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["square_avg", "acc_delta"]
    }

    fn family(&self) -> &'static str {
        "adadelta"
    }

    /// Params are ρ, ε (`adadelta.cuh`).
    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            flags: 0,
            params: [self.rho, self.eps, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> AdadeltaCoefficients {
        AdadeltaCoefficients::new(self, ctx)
    }
}
