//! RMSProp — plain, centered, with (Nesterov) momentum: knobs and presets. `math.rs` holds the
//! per-element maths, `rmsprop.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{StateInit, 
    check, check_nonneg, Common, DeviceConfig, EpsPlacement, Flavor, LrPlacement, RuleSpec,
    StepContext,
};
use crate::error::Result;
pub(crate) use math::RmsPropCoefficients;

/// RMSProp: plain, centered, with momentum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmsProp {
    #[serde(flatten)]
    pub common: Common,
    /// Decay of the squared-gradient average (PyTorch `alpha`, Keras `rho`, Optax/TF1 `decay`).
    pub alpha: f64,
    pub eps: f64,
    pub eps_placement: EpsPlacement,
    pub centered: bool,
    pub momentum: f64,
    /// Nesterov momentum (Optax only).
    pub nesterov: bool,
    pub lr_placement: LrPlacement,
    /// Initial value of the squared average (TF1: 1, Optax `initial_scale`).
    pub initial_square_avg: f64,
    /// Divide the averages by `1 − αᵗ` (Optax `bias_correction`).
    pub bias_correction: bool,
}

impl RmsProp {
    /// The framework's `RMSprop` with its defaults.
    pub fn preset(flavor: Flavor) -> Self {
        let pytorch = flavor == Flavor::PyTorch;
        RmsProp {
            common: Common::default(),
            alpha: if pytorch { 0.99 } else { 0.9 },
            eps: match flavor {
                Flavor::PyTorch | Flavor::Optax => 1e-8,
                Flavor::Keras => 1e-7,
                Flavor::Tf1 => 1e-10,
            },
            eps_placement: if pytorch {
                EpsPlacement::OutsideSqrt
            } else {
                EpsPlacement::InsideSqrt
            },
            centered: false,
            momentum: 0.0,
            nesterov: false,
            lr_placement: if pytorch {
                LrPlacement::Outside
            } else {
                LrPlacement::Inside
            },
            initial_square_avg: if flavor == Flavor::Tf1 { 1.0 } else { 0.0 },
            bias_correction: false,
        }
    }
}

/// `GroupConfig::flags` of an RMSProp group (`RMSPROP_*` in rmsprop.cuh); params are α, ε, μ.
const NESTEROV: u32 = 1 << 0;
const LR_INSIDE: u32 = 1 << 1;
const EPS_INSIDE: u32 = 1 << 2;
const CENTERED: u32 = 1 << 3;
const BIAS_CORRECTION: u32 = 1 << 4;

impl RuleSpec for RmsProp {
    type Coefficients = RmsPropCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_nonneg("alpha", self.alpha)?;
        check(self.alpha <= 1.0, || {
            format!("alpha must be <= 1, got {}", self.alpha)
        })?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("momentum", self.momentum)?;
        check_nonneg("initial_square_avg", self.initial_square_avg)?;
        check(!(self.bias_correction && self.alpha == 1.0), || {
            "bias correction divides by 1 - alpha^t: alpha must be < 1".into()
        })?;
        check(!self.nesterov || self.momentum > 0.0, || {
            "nesterov needs momentum > 0".into()
        })
    }

    /// Only with a momentum buffer (momentum ≠ 0 when built).
    fn cycles_momentum(&self) -> bool {
        self.momentum != 0.0
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "square_avg")
    }

    fn state_names(&self) -> &'static [&'static str] {
        match (self.centered, self.momentum != 0.0) {
            (false, false) => &["square_avg"],
            (true, false) => &["square_avg", "grad_avg"],
            (false, true) => &["square_avg", "momentum_buffer"],
            (true, true) => &["square_avg", "grad_avg", "momentum_buffer"],
        }
    }

    fn state_init(&self, name: &str) -> StateInit {
        StateInit::Value(if name == "square_avg" {
            self.initial_square_avg as f32
        } else {
            0.0
        })
    }

    fn family(&self) -> &'static str {
        match (self.centered, self.momentum != 0.0) {
            (false, false) => "rmsprop",
            (true, false) => "rmsprop_centered",
            (false, true) => "rmsprop_momentum",
            (true, true) => "rmsprop_centered_momentum",
        }
    }

    fn device_config(&self) -> DeviceConfig {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        DeviceConfig {
            flags: flag(self.nesterov, NESTEROV)
                | flag(self.lr_placement == LrPlacement::Inside, LR_INSIDE)
                | flag(self.eps_placement == EpsPlacement::InsideSqrt, EPS_INSIDE)
                | flag(self.centered, CENTERED)
                | flag(self.bias_correction, BIAS_CORRECTION),
            params: [self.alpha, self.eps, self.momentum, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> RmsPropCoefficients {
        RmsPropCoefficients::new(self, ctx)
    }
}
