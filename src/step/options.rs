//! The step-wide options beside the rule, and what a step reports.

use crate::error::{Error, Result};
use crate::lean::{quantize, QuantMap};
use crate::DType;

use super::{usable_loss_scale, GlobalNormClip};

/// The largest step count an optimizer reaches or loads (exact in f64, so schedules and bias
/// corrections see it exactly).
pub const MAX_STEP: u64 = 1 << 53;

/// What a step does when the gradients hold NaN or ±∞ (detected in the norm pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NonFinitePolicy {
    /// Leave parameters, state and the step count untouched and report the skip.
    #[default]
    Skip,
    /// Compute what the framework computes (NaN/0 propagate through clipping and the update).
    Propagate,
    /// Return [`Error::NonFiniteGradient`]; nothing changes.
    Error,
}

/// Loss scaling for low-precision training: gradients arrive multiplied by the scale, and the step
/// divides it out on the fly (fused into the update, no extra pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LossScale {
    #[default]
    None,
    Static(f64),
    /// PyTorch `GradScaler`'s policy: a step with non-finite gradients is skipped and the scale
    /// multiplied by `backoff_factor`; after `growth_interval` applied steps in a row it is
    /// multiplied by `growth_factor`.
    Dynamic {
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u64,
    },
}

impl LossScale {
    /// `GradScaler`'s defaults: 2^16, ×2 every 2000 good steps, ×0.5 on overflow.
    pub fn dynamic() -> Self {
        LossScale::Dynamic {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }

    /// The scale before any step.
    pub(crate) fn initial(&self) -> f64 {
        match *self {
            LossScale::None => 1.0,
            LossScale::Static(s) => s,
            LossScale::Dynamic { init_scale, .. } => init_scale,
        }
    }
}

/// Step-wide options beside the rule.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerOptions {
    pub clip: Option<GlobalNormClip>,
    pub non_finite: NonFinitePolicy,
    /// Storage dtype of the optimizer state (moments): f32, or bf16 to halve its memory.
    pub state_dtype: DType,
    pub loss_scale: LossScale,
    /// Block-wise quantized state (8 or 4 bits per moment); `None` keeps `state_dtype`.
    #[serde(default)]
    pub quantized_state: QuantizedState,
}

/// Optimizer state stored block-wise quantized, as torchao's low-bit optimizers store it: each
/// block of a tensor holds one code per element and one f32 scale (its largest magnitude), first
/// moments on a signed map and non-negative buffers on an unsigned one. Tensors smaller than
/// [`quantize::MIN_QUANTIZED_SIZE`], or not a whole number of blocks, keep f32 state.
/// Each step decodes a block, updates it in f32 and codes it again, inside the fused pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QuantizedState {
    #[default]
    None,
    /// 8 bits per element in blocks of 256: the dynamic maps of bitsandbytes and torchao's
    /// `AdamW8bit`.
    Block8,
    /// 4 bits per element in blocks of 128: torchao's `AdamW4bit` maps.
    Block4,
}

impl Default for OptimizerOptions {
    fn default() -> Self {
        OptimizerOptions {
            clip: None,
            non_finite: NonFinitePolicy::Skip,
            state_dtype: DType::F32,
            loss_scale: LossScale::None,
            quantized_state: QuantizedState::None,
        }
    }
}

impl QuantizedState {
    /// Elements per block.
    pub fn block(self) -> usize {
        match self {
            QuantizedState::Block4 => quantize::BLOCK_4BIT,
            _ => quantize::BLOCK_8BIT,
        }
    }

    /// The map a buffer is coded on.
    pub fn map(self, nonnegative: bool) -> QuantMap {
        match (self, nonnegative) {
            (QuantizedState::Block4, false) => QuantMap::DynamicSigned4,
            (QuantizedState::Block4, true) => QuantMap::LinearUnsigned4,
            (_, false) => QuantMap::DynamicSigned8,
            (_, true) => QuantMap::DynamicUnsigned8,
        }
    }

    /// Bytes holding the codes of `elems` elements.
    pub(crate) fn code_bytes(self, elems: usize) -> usize {
        match self {
            QuantizedState::Block4 => elems.div_ceil(2),
            _ => elems,
        }
    }
}

/// What one call of [`crate::Optimizer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The step count after this call (unchanged when skipped).
    pub step: u64,
    /// The learning rate used (before group scales).
    pub lr: f64,
    /// The pre-clip global L2 norm of the gradients, when it was computed (clipping on, or a
    /// non-finite policy other than `Propagate`).
    pub global_norm: Option<f64>,
    /// The factor the gradients were multiplied by (1 without clipping).
    pub clip_factor: f64,
    pub skipped: bool,
    /// The loss scale the gradients of this step were divided by (1 without loss scaling).
    pub loss_scale: f64,
}

impl OptimizerOptions {
    /// Refuses options that would corrupt every step, as the constructor does.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidHyperparameter(m));
        if let Some(clip) = self.clip {
            if !(clip.max_norm > 0.0 && (clip.max_norm as f32).is_finite()) {
                return bad(format!(
                    "clip max_norm must be finite and > 0, got {}",
                    clip.max_norm
                ));
            }
        }
        if self.state_dtype == DType::F16 {
            return bad(
                "optimizer state is f32 or bf16 (f16's range is too narrow for second moments)"
                    .into(),
            );
        }
        if self.quantized_state != QuantizedState::None && self.state_dtype != DType::F32 {
            return bad(
                "quantized state keeps the tensors it does not quantize in f32: leave state_dtype \
                 at F32"
                    .into(),
            );
        }
        match self.loss_scale {
            LossScale::None => Ok(()),
            LossScale::Static(s) => check_loss_scale("loss scale", s),
            LossScale::Dynamic {
                init_scale,
                growth_factor,
                backoff_factor,
                growth_interval,
            } => {
                check_loss_scale("init_scale", init_scale)?;
                let growth_ok = growth_factor >= 1.0 && (growth_factor as f32).is_finite();
                let backoff_ok = backoff_factor > 0.0 && backoff_factor < 1.0;
                if !growth_ok || !backoff_ok || growth_interval == 0 {
                    bad(format!(
                        "dynamic loss scale needs a finite growth >= 1, backoff in (0, 1) and \
                         interval > 0, got {growth_factor}, {backoff_factor}, {growth_interval}"
                    ))
                } else if self.non_finite != NonFinitePolicy::Skip {
                    bad(
                        "dynamic loss scaling skips overflowing steps: use NonFinitePolicy::Skip"
                            .into(),
                    )
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A loss scale the step can divide by (see [`usable_loss_scale`]), or a typed error.
pub(crate) fn check_loss_scale(what: &str, s: f64) -> Result<()> {
    if usable_loss_scale(s) {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter(format!(
            "{what} must be positive with a finite reciprocal in f32, got {s}"
        )))
    }
}
