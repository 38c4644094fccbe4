//! Lion (evolved sign momentum): knobs and presets. `math.rs` holds the per-element maths,
//! `lion.cuh` the same for the GPU.

mod math;

use serde::{Deserialize, Serialize};

use super::{check, Common, DeviceConfig, Flavor, RuleSpec, StepContext, WeightDecay};
use crate::error::Result;
pub(crate) use math::LionCoefficients;

/// What the sign of a NaN is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NanSign {
    /// `sign(NaN) = NaN` (`jnp.sign`, `tf.sign`: Optax, Keras).
    Nan,
    /// `sign(NaN) = 0` (`torch.sign`: the reference `lion-pytorch`).
    Zero,
}

/// Lion: `θ -= lr·sign(β1·m + (1−β1)·g)`, then `m = β2·m + (1−β2)·g`; weight decay decoupled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lion {
    #[serde(flatten)]
    pub common: Common,
    pub beta1: f64,
    pub beta2: f64,
    pub nan_sign: NanSign,
}

impl Lion {
    /// The framework's Lion with its defaults: Optax `lion` (decoupled decay 1e-3), Keras `Lion`,
    /// and for PyTorch, which has none, the reference implementation `lion-pytorch`. TF1 has
    /// none: Keras' formulas. The default lrs are the porting module's.
    pub fn preset(flavor: Flavor) -> Self {
        Lion {
            common: Common::default(),
            beta1: 0.9,
            beta2: 0.99,
            nan_sign: if flavor == Flavor::PyTorch {
                NanSign::Zero
            } else {
                NanSign::Nan
            },
        }
        .with_weight_decay(if flavor == Flavor::Optax {
            WeightDecay::Decoupled(1e-3)
        } else {
            WeightDecay::None
        })
    }
}

/// `GroupConfig::flags` of a Lion group (`LION_*` in lion.cuh); params are β1, β2.
const NAN_SIGN_ZERO: u32 = 1 << 0;

impl RuleSpec for Lion {
    type Coefficients = LionCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        // Keras allows β1 = 1 (the update then ignores the gradient); both in [0, 1].
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            check((0.0..=1.0).contains(&b), || {
                format!("{name} must be in [0, 1], got {b}")
            })?;
        }
        Ok(())
    }

    /// β1 (PyTorch's `betas[0]`).
    fn cycles_momentum(&self) -> bool {
        true
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg"]
    }

    fn family(&self) -> &'static str {
        "lion"
    }

    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            flags: if self.nan_sign == NanSign::Zero {
                NAN_SIGN_ZERO
            } else {
                0
            },
            params: [self.beta1, self.beta2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    fn coefficients(&self, ctx: &StepContext) -> LionCoefficients {
        LionCoefficients::new(self, ctx)
    }
}
