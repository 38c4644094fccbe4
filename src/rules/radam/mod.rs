//! RAdam (rectified Adam): knobs and presets. `math.rs` holds the per-element maths,
//! `radam.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::adam::AdamEps;
use super::{
    check_nonneg, check_unit, Common, DeviceConfig, Flavor, MomentForm, RuleSpec, StepContext,
};
use crate::error::Result;
pub(crate) use math::RadamCoefficients;

/// RAdam: Adam's moments; while the variance's degrees of freedom `ρ_t` pass the threshold the
/// step is Adam's scaled by the rectification `r_t`, before that it is momentum SGD on `m̂`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Radam {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Added to `v̂` inside the root (Optax `eps_root`).
    pub eps_root: f64,
    /// `lr·√bc2/bc1 · m/(√v + ε)` (PyTorch: ε on the raw scale) or `lr · m̂/(√v̂ + ε)` (Optax).
    pub eps_scale: AdamEps,
    /// Rectify once `ρ_t` passes this (5).
    pub threshold: f64,
    /// `ρ_t >= threshold` (Optax) rather than `ρ_t > threshold` (PyTorch).
    pub threshold_inclusive: bool,
    /// Nesterov's momentum on `m̂` (Optax `nesterov`).
    pub nesterov: bool,
    /// Before rectification the step is `m̂` alone, so an infinite gradient shows the form.
    pub moment: MomentForm,
}

impl Radam {
    /// The framework's RAdam with its defaults (PyTorch `RAdam`, Optax `radam`). Keras and TF1
    /// have none: PyTorch's formulas.
    pub fn preset(flavor: Flavor) -> Self {
        let optax = flavor == Flavor::Optax;
        Radam {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            eps_root: 0.0,
            eps_scale: if optax {
                AdamEps::BiasCorrected
            } else {
                AdamEps::Raw
            },
            threshold: 5.0,
            threshold_inclusive: optax,
            nesterov: false,
            moment: if optax {
                MomentForm::Average
            } else {
                MomentForm::Lerp
            },
        }
    }
}

/// `GroupConfig::flags` of a RAdam group (`RADAM_*` in radam.cuh); params are β1, β2, ε,
/// eps_root, threshold.
const EPS_RAW: u32 = 1 << 0;
const INCLUSIVE: u32 = 1 << 1;
const NESTEROV: u32 = 1 << 2;
const AVERAGE: u32 = 1 << 3;

impl RuleSpec for Radam {
    type Coefficients = RadamCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_unit("beta1", self.beta1)?;
        check_unit("beta2", self.beta2)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("eps_root", self.eps_root)?;
        check_nonneg("threshold", self.threshold)
    }

    /// β1 (PyTorch's `betas[0]`).
    fn cycles_momentum(&self) -> bool {
        true
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "exp_avg_sq")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn family(&self) -> &'static str {
        "radam"
    }

    fn device_config(&self) -> DeviceConfig {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        DeviceConfig {
            flags: flag(self.eps_scale == AdamEps::Raw, EPS_RAW)
                | flag(self.threshold_inclusive, INCLUSIVE)
                | flag(self.nesterov, NESTEROV)
                | flag(self.moment == MomentForm::Average, AVERAGE),
            params: [
                self.beta1,
                self.beta2,
                self.eps,
                self.eps_root,
                self.threshold,
                0.0,
                0.0,
                0.0,
            ],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> RadamCoefficients {
        RadamCoefficients::new(self, ctx)
    }
}
