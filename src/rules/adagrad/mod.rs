//! Adagrad: knobs and presets. `math.rs` holds the per-element maths, `adagrad.cuh` the same for
//! the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{StateInit, check_nonneg, Common, DeviceConfig, EpsPlacement, Flavor, RuleSpec, StepContext};
use crate::error::Result;
pub(crate) use math::AdagradCoefficients;

/// Adagrad.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adagrad {
    #[serde(flatten)]
    pub common: Common,
    /// PyTorch: `clr = lr / (1 + (t − 1)·lr_decay)`.
    pub lr_decay: f64,
    pub initial_accumulator: f64,
    pub eps: f64,
    pub eps_placement: EpsPlacement,
    /// Zero update where the accumulator is 0 (Optax's `where(sum > 0, …, 0)`).
    pub zero_where_empty: bool,
}

impl Adagrad {
    /// The framework's `Adagrad` with its defaults.
    pub fn preset(flavor: Flavor) -> Self {
        let pytorch = flavor == Flavor::PyTorch;
        Adagrad {
            common: Common::default(),
            lr_decay: 0.0,
            initial_accumulator: if pytorch { 0.0 } else { 0.1 },
            eps: match flavor {
                Flavor::PyTorch => 1e-10,
                Flavor::Keras | Flavor::Optax => 1e-7,
                Flavor::Tf1 => 0.0,
            },
            eps_placement: if pytorch {
                EpsPlacement::OutsideSqrt
            } else {
                EpsPlacement::InsideSqrt
            },
            zero_where_empty: flavor == Flavor::Optax,
        }
    }
}

/// `GroupConfig::flags` of an Adagrad group (`ADAGRAD_*` in adagrad.cuh); params are ε,
/// lr_decay.
const EPS_INSIDE: u32 = 1 << 0;
const ZERO_WHERE_EMPTY: u32 = 1 << 1;

impl RuleSpec for Adagrad {
    type Coefficients = AdagradCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        check_nonneg("lr_decay", self.lr_decay)?;
        check_nonneg("initial_accumulator", self.initial_accumulator)?;
        check_nonneg("eps", self.eps)
    }

    fn nonnegative_state(&self, name: &str) -> bool {
        matches!(name, "sum")
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["sum"]
    }

    fn state_init(&self, name: &str) -> StateInit {
        StateInit::Value(if name == "sum" {
            self.initial_accumulator as f32
        } else {
            0.0
        })
    }

    fn family(&self) -> &'static str {
        "adagrad"
    }

    fn device_config(&self) -> DeviceConfig {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        DeviceConfig {
            flags: flag(self.eps_placement == EpsPlacement::InsideSqrt, EPS_INSIDE)
                | flag(self.zero_where_empty, ZERO_WHERE_EMPTY),
            params: [self.eps, self.lr_decay, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> AdagradCoefficients {
        AdagradCoefficients::new(self, ctx)
    }
}
