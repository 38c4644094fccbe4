//! SGD with optional (Nesterov) momentum: its knobs and presets. `math.rs` holds the per-element
//! maths, `sgd.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{
    check, check_nonneg, Common, DeviceConfig, Flavor, LrPlacement, RuleSpec, StepContext,
};
use crate::error::Result;
pub(crate) use math::SgdCoefficients;

/// The SGD momentum buffer on the first step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MomentumInit {
    /// `b₁ = g`, undampened (PyTorch).
    CopyGrad,
    /// `b₀ = 0`, so `b₁ = (1 − dampening)·g` (Keras, Optax, TF1).
    Zero,
}

/// Stochastic gradient descent with optional (Nesterov) momentum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    #[serde(flatten)]
    pub common: Common,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub momentum_init: MomentumInit,
    pub lr_placement: LrPlacement,
}

impl Sgd {
    /// The framework's `SGD` with its defaults (its lr is the optimizer's).
    pub fn preset(flavor: Flavor) -> Self {
        Sgd {
            common: Common::default(),
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            momentum_init: if flavor == Flavor::PyTorch {
                MomentumInit::CopyGrad
            } else {
                MomentumInit::Zero
            },
            lr_placement: if flavor == Flavor::Keras {
                LrPlacement::Inside
            } else {
                LrPlacement::Outside
            },
        }
    }
}

/// `GroupConfig::flags` of an SGD group (`SGD_*` in sgd.cuh); params are μ, τ.
const NESTEROV: u32 = 1 << 0;
const COPY_FIRST: u32 = 1 << 1;
const LR_INSIDE: u32 = 1 << 2;

impl RuleSpec for Sgd {
    type Coefficients = SgdCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_nonneg("momentum", self.momentum)?;
        check_nonneg("dampening", self.dampening)?;
        check(
            !self.nesterov || (self.momentum > 0.0 && self.dampening == 0.0),
            || "nesterov needs momentum > 0 and zero dampening".into(),
        )
    }

    /// Only with a momentum buffer (momentum ≠ 0 when built).
    fn cycles_momentum(&self) -> bool {
        self.momentum != 0.0
    }

    fn state_names(&self) -> &'static [&'static str] {
        if self.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn family(&self) -> &'static str {
        if self.momentum != 0.0 {
            "sgd_momentum"
        } else {
            "sgd_plain"
        }
    }

    fn device_config(&self) -> DeviceConfig {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        DeviceConfig {
            flags: flag(self.nesterov, NESTEROV)
                | flag(self.momentum_init == MomentumInit::CopyGrad, COPY_FIRST)
                | flag(self.lr_placement == LrPlacement::Inside, LR_INSIDE),
            params: [self.momentum, self.dampening, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> SgdCoefficients {
        SgdCoefficients::new(self, ctx)
    }
}
